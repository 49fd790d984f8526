"""PNG overlays of nuclei outlines for flagged tiles."""
from __future__ import annotations

import math
from pathlib import Path
import imagecodecs
import numpy as np
from skimage.segmentation import find_boundaries
from skimage.transform import downscale_local_mean


#: Longest side of an overlay PNG (larger tiles are downsampled).
OVERLAY_MAX_SIDE = 512


def overlay_png(composite: np.ndarray, labels: np.ndarray) -> bytes:
    """RGB PNG of the nuclear composite (grey) with nucleus outlines (yellow).

    Parameters
    ----------
    composite : ndarray of float, shape (H, W)
        Nuclear signal in [0, 1].
    labels : ndarray of int, shape (H, W)
        Segmentation of the same pixels (0 = background).

    Returns
    -------
    bytes
        The PNG file, at most `OVERLAY_MAX_SIDE` pixels on its longer side (larger tiles are
        downsampled by a whole factor).
    """
    outlines = find_boundaries(labels, mode="inner")
    factor = max(1, math.ceil(max(composite.shape) / OVERLAY_MAX_SIDE))
    if factor > 1:
        composite = downscale_local_mean(composite, (factor, factor))
        outlines = downscale_local_mean(outlines.astype(np.float32), (factor, factor)) > 0.15
    grey = (np.clip(composite, 0.0, 1.0) * 255).astype(np.uint8)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    rgb[outlines] = (255, 214, 0)
    return bytes(imagecodecs.png_encode(np.ascontiguousarray(rgb)))


def overlay_dir_for(report_path: str | Path) -> Path:
    """Folder of a report's overlay PNGs: the report path without ``.json`` (else + ``_overlays``).

    Parameters
    ----------
    report_path : str or Path
        The QC JSON.

    Returns
    -------
    Path
    """
    report_path = Path(report_path)
    name = report_path.name[:-5] if report_path.name.lower().endswith(".json") else report_path.name + "_overlays"
    return report_path.with_name(name)

