"""Open an OME-Zarr segmentation in a real napari viewer; report what it shows (run as a child process).

    python tests/napari_view.py STORE SCREENSHOT.png REPORT.json

Used by tests/test_napari_viewer.py under ``QT_QPA_PLATFORM=offscreen`` with a virtual X
display (Mesa's software OpenGL): it opens STORE the way a user does
(``napari --plugin napari-ome-zarr STORE``: ``viewer.open(..., plugin="napari-ome-zarr")``),
records every layer (kind, name, scale, units, pyramid shapes, label ids), then shows the
image and the flattened labels, saves a screenshot of the canvas and measures how much of
the canvas each of them changes. The parent test asserts; this script only observes.
A child process, so that Qt and the X connection never outlive the virtual display.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def _settle(viewer, app) -> None:
    viewer._layer_slicer.wait_until_idle(timeout=30)
    for _ in range(5):
        app.processEvents()
        time.sleep(0.02)


def main(store: str, screenshot: str, report_path: str) -> int:
    import imageio.v3 as iio
    import napari
    from napari_ome_zarr import napari_get_reader
    from qtpy.QtWidgets import QApplication

    report: dict = {"napari": napari.__version__, "layers": []}
    viewer = napari.Viewer(show=False)
    app = QApplication.instance()
    # Paint the empty window once: it makes the canvas's OpenGL context real before the first
    # layer asks for the GL extensions (napari caches the answer; asked too early it is None).
    viewer.screenshot(canvas_only=False, flash=False)
    opened = viewer.open(store, plugin="napari-ome-zarr")
    report["opened"] = len(opened)
    for layer in viewer.layers:
        data = layer.data if layer.multiscale else [layer.data]
        entry = {
            "kind": type(layer).__name__.lower(),
            "name": layer.name,
            "scale": [float(s) for s in layer.scale],
            "units": [str(u) for u in layer.units],
            "multiscale": bool(layer.multiscale),
            "shapes": [list(map(int, level.shape)) for level in data],
            "dtype": str(data[0].dtype),
        }
        if entry["kind"] == "labels":
            level0 = np.asarray(data[0])
            ids = np.unique(level0[level0 > 0])
            entry["n_ids"], entry["max_id"] = int(ids.size), int(ids.max()) if ids.size else 0
        report["layers"].append(entry)
    viewer.close()

    # The reader shows labels hidden (a user ticks them on). For the picture, the image and then
    # the flattened labels are added, visible, from the reader's own layer data, and the window
    # is grabbed after each step (showing or hiding a layer later does not repaint a hidden
    # window): what each step adds to the screen is measured.
    viewer = napari.Viewer(show=False)

    def grab() -> np.ndarray:
        # The whole window, as a user sees it: with the offscreen platform, napari's canvas-only
        # screenshot (QOpenGLWidget.grabFramebuffer) comes back black; the window grab does not.
        _settle(viewer, app)
        return viewer.screenshot(canvas_only=False, flash=False)[..., :3]

    def colours(frame: np.ndarray) -> dict:
        """Hues on screen: the share of vivid pixels in each 10-degree hue bin."""
        rgb = frame.astype(float) / 255.0
        high, low = rgb.max(axis=-1), rgb.min(axis=-1)
        vivid = (high > 0.25) & (high - low > 0.35 * high)
        r, g, b = (rgb[..., k][vivid] for k in range(3))
        hue = np.degrees(np.arctan2(np.sqrt(3.0) * (g - b), 2.0 * r - g - b)) % 360.0
        counts = np.bincount((hue // 10).astype(int), minlength=36)[:36]
        return {"vivid": float(vivid.mean()), "hue_bins": [float(c) / frame[..., 0].size for c in counts]}

    layer_data = napari_get_reader(store)(store)
    report["frames"] = {"empty": colours(grab())}
    for wanted in ("image", "labels"):
        for data, kwargs, kind in layer_data:
            if kind == wanted and (kind == "image" or kwargs["name"].endswith("/nuclei")):
                getattr(viewer, f"add_{kind}")(data, **{**kwargs, "visible": True})  # add_image / add_labels
        viewer.reset_view()
        frame = grab()
        report["frames"][wanted] = colours(frame)
    iio.imwrite(screenshot, frame)
    report["window_px"] = [int(frame.shape[0]), int(frame.shape[1])]
    viewer.close()
    with open(report_path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
