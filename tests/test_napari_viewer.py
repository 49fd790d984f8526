"""A `nuclei-app segment` output opened in a real napari viewer, through the napari-ome-zarr reader.

napari, napari-ome-zarr and PyQt5 are the ``viewer`` extra that `make test` installs; the
viewer runs under ``QT_QPA_PLATFORM=offscreen`` with a virtual X display (Debian's ``xvfb``,
installed by `make test` when it runs as root) that gives Qt an OpenGL context (Mesa's
software renderer). The viewer runs in a child process (tests/napari_view.py). Without these
tools the tests fail in CI (CI=true) and are skipped elsewhere, with the reason.

The screenshot is kept in ``test-artifacts/napari_segment_output.png`` (gitignored) for a
person to look at.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import REPO_ROOT

HELPER = Path(__file__).with_name("napari_view.py")
ARTIFACTS = REPO_ROOT / "test-artifacts"
PIXEL_SIZE_UM = (0.4, 0.4)


def missing(message: str) -> None:
    """Fail in CI, skip elsewhere: a viewer test never passes silently without its tools."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def require_viewer_extra() -> None:
    import importlib.util

    absent = [name for name in ("napari", "napari_ome_zarr", "PyQt5") if importlib.util.find_spec(name) is None]
    if absent:
        missing(f"{', '.join(absent)} not installed: `make setup` installs the viewer extra (.[test,viewer])")


@pytest.fixture(scope="module")
def display():
    """A virtual X display (Xvfb) for the viewer's OpenGL context; its number."""
    require_viewer_extra()
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        missing("Xvfb is not installed (`apt-get install xvfb`; `make test` does it as root)")
    read_fd, write_fd = os.pipe()
    server = subprocess.Popen([xvfb, "-displayfd", str(write_fd), "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
                              pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        number = pipe.readline().strip()
    if not number:
        server.kill()
        pytest.fail("Xvfb did not start")
    yield f":{number}"
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def segmented(tmp_path_factory) -> Path:
    """`nuclei-app segment --method weak` on a synthetic 2-channel slide with overlapping nuclei."""
    from nuclei_app.cli import main
    from nuclei_app.sample_data import synthesize_slide
    from nuclei_app.io.ome_tiff import write_ome_tiff

    folder = tmp_path_factory.mktemp("napari")
    # seed 4: the weak labeler finds overlapping nuclei here, so there are two overlap layers
    synthetic = synthesize_slide(np.random.default_rng(4), (512, 512))
    slide = write_ome_tiff(folder / "slide.ome.tif", synthetic.image[:2], ["DAPI", "Histone H3"], PIXEL_SIZE_UM,
                           tile=(128, 128))
    out = folder / "slide.ome.zarr"
    assert main(["segment", str(slide), "--method", "weak", "-o", str(out), "--no-qc"]) == 0
    return out


@pytest.fixture(scope="module")
def viewed(display, segmented, tmp_path_factory) -> dict:
    """Run tests/napari_view.py on the segmentation; its report (the screenshot is in ARTIFACTS)."""
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "napari_segment_output.png"
    screenshot.unlink(missing_ok=True)
    report_path = tmp_path_factory.mktemp("napari-report") / "report.json"
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "DISPLAY": display, "OMP_NUM_THREADS": "1",
           "XDG_RUNTIME_DIR": str(report_path.parent), "NAPARI_CONFIG": str(report_path.parent / "napari.yaml")}
    result = subprocess.run([sys.executable, str(HELPER), str(segmented), str(screenshot), str(report_path)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    report["screenshot"] = str(screenshot)
    return report


def test_reader_gives_the_image_channels_and_every_labels_layer(viewed, segmented):
    group = zarr.open_group(str(segmented), mode="r")
    label_names = list(group["labels"].attrs["labels"])
    assert label_names[0] == "nuclei" and "nuclei_layer-0" in label_names and "nuclei_layer-1" in label_names
    layers = viewed["layers"]
    assert viewed["opened"] == len(layers) == 2 + len(label_names)
    images = [layer for layer in layers if layer["kind"] == "image"]
    assert [layer["name"] for layer in images] == ["slide: DAPI", "slide: Histone H3"]
    labels = {layer["name"].rsplit("/", 1)[-1]: layer for layer in layers if layer["kind"] == "labels"}
    assert sorted(labels) == sorted(label_names)
    n_levels = len(group.attrs["multiscales"][0]["datasets"])
    for layer in layers:
        assert layer["multiscale"] and len(layer["shapes"]) == n_levels >= 2
        assert layer["shapes"][0] == [512, 512]
    flat = np.asarray(group["labels/nuclei/0"])
    assert labels["nuclei"]["dtype"] == "uint32"
    assert labels["nuclei"]["n_ids"] == labels["nuclei"]["max_id"] == int(flat.max()) > 50
    # every nucleus is whole in exactly one overlap layer: the layers together hold every id
    held = sum(layer["n_ids"] for name, layer in labels.items() if name != "nuclei")
    assert held == labels["nuclei"]["n_ids"]


def test_every_layer_has_the_physical_scale_in_micrometres(viewed):
    for layer in viewed["layers"]:
        assert layer["scale"] == list(PIXEL_SIZE_UM), layer["name"]
        assert layer["units"] == ["micrometer", "micrometer"], layer["name"]


def test_screenshot_shows_the_image_and_the_labels(viewed):
    screenshot = Path(viewed["screenshot"])
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000
    empty, image, labels = (viewed["frames"][key] for key in ("empty", "image", "labels"))
    # the nuclear channels light the canvas (blue/green) ...
    assert image["vivid"] > max(0.01, 4 * empty["vivid"])
    # ... and the labels paint nuclei in many colours, which the image alone never shows
    def hues(frame):
        return sum(1 for share in frame["hue_bins"] if share > 2e-4)

    assert hues(image) <= 8 and hues(labels) >= 24
    assert labels["vivid"] > image["vivid"]
