"""Shape descriptors of nuclei (area, solidity, eccentricity): one definition for the table and the QC."""
from __future__ import annotations

import numpy as np
from scipy.spatial import ConvexHull, QhullError
import warnings


def shape_descriptors(mask: np.ndarray) -> tuple[float, float]:
    """Solidity and eccentricity of one mask (H, W) bool.

    Solidity is the pixel count over the area of the convex hull of the pixel squares
    (1.0 for a rectangle; a digitised disc or ellipse scores about 0.92-0.96, concave or
    merged shapes less); eccentricity is that of the ellipse with the same second central
    moments (0 = circle, towards 1 = elongated), as scikit-image's ``regionprops`` defines it.
    """
    ys, xs = np.nonzero(mask)
    area = len(ys)
    if area == 0:
        return 0.0, 0.0
    # Corners of boundary pixels are enough for the hull.
    padded = np.pad(mask, 1)
    interior = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    by, bx = np.nonzero(mask & ~interior)
    corners = np.concatenate(
        [np.stack([by + dy, bx + dx], axis=1) for dy in (0, 1) for dx in (0, 1)]
    ).astype(np.float64)
    try:
        hull_area = float(ConvexHull(corners).volume)
    except QhullError:  # all corners on a line cannot happen for pixel squares; be safe
        hull_area = float(area)
    solidity = min(1.0, area / hull_area) if hull_area > 0 else 1.0
    cy, cx = ys.mean(), xs.mean()
    var_y = ((ys - cy) ** 2).mean()
    var_x = ((xs - cx) ** 2).mean()
    cov = ((ys - cy) * (xs - cx)).mean()
    spread = np.sqrt(((var_y - var_x) / 2) ** 2 + cov**2)
    major = (var_y + var_x) / 2 + spread
    minor = (var_y + var_x) / 2 - spread
    eccentricity = float(np.sqrt(max(0.0, 1.0 - minor / major))) if major > 0 else 0.0
    return float(solidity), eccentricity


def object_properties(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per-object morphology of a label image (objects must not overlap within it).

    Parameters
    ----------
    labels : ndarray of int, shape (H, W)

    Returns
    -------
    dict of ndarray, each shape (n,)
        ``label`` (int64), ``area``, ``solidity``, ``eccentricity``, ``centroid_y``,
        ``centroid_x``, ``bbox_y0``, ``bbox_x0``, ``bbox_y1``, ``bbox_x1`` (float64, pixel
        coordinates of ``labels``; the box end is exclusive).
    """
    from skimage.measure import regionprops_table

    names = ("label", "area", "solidity", "eccentricity", "centroid_y", "centroid_x", "bbox_y0", "bbox_x0",
             "bbox_y1", "bbox_x1")
    labels = np.asarray(labels)
    if not labels.any():
        return {name: np.zeros(0, dtype=np.int64 if name == "label" else np.float64) for name in names}
    with warnings.catch_warnings():  # one-pixel-wide objects: scikit-image warns about the hull
        warnings.simplefilter("ignore")
        table = regionprops_table(
            labels.astype(np.int64, copy=False), properties=("label", "area", "solidity", "eccentricity", "centroid", "bbox")
        )
    return {
        "label": np.asarray(table["label"], dtype=np.int64),
        "area": np.asarray(table["area"], dtype=np.float64),
        "solidity": np.asarray(table["solidity"], dtype=np.float64),
        "eccentricity": np.asarray(table["eccentricity"], dtype=np.float64),
        "centroid_y": np.asarray(table["centroid-0"], dtype=np.float64),
        "centroid_x": np.asarray(table["centroid-1"], dtype=np.float64),
        "bbox_y0": np.asarray(table["bbox-0"], dtype=np.float64),
        "bbox_x0": np.asarray(table["bbox-1"], dtype=np.float64),
        "bbox_y1": np.asarray(table["bbox-2"], dtype=np.float64),
        "bbox_x1": np.asarray(table["bbox-3"], dtype=np.float64),
    }

