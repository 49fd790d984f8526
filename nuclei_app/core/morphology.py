"""Shape descriptors of nuclei (area, solidity, eccentricity): one definition for the table and the QC.

`shape_descriptors` is the only place solidity and eccentricity are computed: the objects
table (through `nuclei_app.core.stitching`) calls it on each nucleus's mask, and
`object_properties` (the QC) calls it on each object of a label image, so a nucleus gets
the same values in both.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import regionprops_table
from skimage.morphology import convex_hull_image


def shape_descriptors(mask: np.ndarray) -> tuple[float, float]:
    """Solidity and eccentricity of one nucleus mask, as scikit-image's ``regionprops`` defines them.

    Solidity is the pixel count over the pixel count of the mask's convex hull image
    (``area / area_convex``: the pixels whose centres lie in the convex hull of the mask's
    pixel squares). It is 1 for a rectangle; a digitised disc of radius 6-40 px scores about
    0.92-0.98 (smaller ones less), concave or merged shapes less. Eccentricity is that of the ellipse with the same second central moments (0 = circle,
    towards 1 = elongated).

    Parameters
    ----------
    mask : ndarray of bool, shape (H, W)
        One nucleus (its bounding-box crop or any larger window; padding does not matter).

    Returns
    -------
    solidity, eccentricity : float
        Both in [0, 1]; (0.0, 0.0) for an empty mask.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return 0.0, 0.0
    # regionprops' own definitions, computed directly: building a RegionProperties object per
    # nucleus cost 3x as much (it ran for every candidate of every tile).
    ys, xs = np.nonzero(mask)
    ys = ys - ys.mean()
    xs = xs - xs.mean()
    var_y, var_x, cov = float((ys * ys).mean()), float((xs * xs).mean()), float((ys * xs).mean())
    spread = math.sqrt(((var_y - var_x) / 2) ** 2 + cov * cov)
    major, minor = (var_y + var_x) / 2 + spread, max((var_y + var_x) / 2 - spread, 0.0)
    eccentricity = math.sqrt(1.0 - minor / major) if major > 0 else 0.0
    return solidity(mask), eccentricity


def solidity(mask: np.ndarray) -> float:
    """Pixel count of a non-empty mask (H, W, bool) over that of its convex hull image (see
    `shape_descriptors`); in (0, 1]."""
    with warnings.catch_warnings():  # one-pixel-wide objects: scikit-image may warn about the hull
        warnings.simplefilter("ignore")
        hull = convex_hull_image(mask, offset_coordinates=True)
    return float(np.count_nonzero(mask) / max(int(hull.sum()), 1))


def label_solidities(labels: np.ndarray) -> np.ndarray:
    """`solidity` of every object of a label image with consecutive ids 1..n.

    Parameters
    ----------
    labels : ndarray of int, shape (H, W)
        Ids 1..n, each present; 0 = background.

    Returns
    -------
    ndarray of float64, shape (n,)
        Entry ``i`` belongs to id ``i + 1``.
    """
    labels = np.asarray(labels)
    boxes = ndi.find_objects(labels.astype(np.int64, copy=False))
    return np.asarray([solidity(labels[box] == index + 1) for index, box in enumerate(boxes)], dtype=np.float64)


def object_properties(labels: np.ndarray, shapes: bool = True) -> dict[str, np.ndarray]:
    """Per-object morphology of a label image (objects must not overlap within it).

    Parameters
    ----------
    labels : ndarray of int, shape (H, W)
    shapes : bool
        Compute solidity and eccentricity (most of the cost); when False they are NaN (for
        callers that know them already, e.g. from the segmentation's table).

    Returns
    -------
    dict of ndarray, each shape (n,)
        ``label`` (int64), ``area``, ``solidity``, ``eccentricity`` (`shape_descriptors` of
        each object's mask), ``centroid_y``, ``centroid_x``, ``bbox_y0``, ``bbox_x0``,
        ``bbox_y1``, ``bbox_x1`` (float64, pixel coordinates of ``labels``; the box end is
        exclusive).
    """
    names = ("label", "area", "solidity", "eccentricity", "centroid_y", "centroid_x", "bbox_y0", "bbox_x0",
             "bbox_y1", "bbox_x1")
    labels = np.asarray(labels)
    if not labels.any():
        return {name: np.zeros(0, dtype=np.int64 if name == "label" else np.float64) for name in names}
    table = regionprops_table(
        labels.astype(np.int64, copy=False),
        properties=("label", "area", "centroid", "bbox", "image") if shapes else ("label", "area", "centroid", "bbox"),
    )
    if shapes:
        values = np.asarray([shape_descriptors(image) for image in table["image"]], dtype=np.float64).reshape(-1, 2)
    else:
        values = np.full((len(table["label"]), 2), np.nan)
    return {
        "label": np.asarray(table["label"], dtype=np.int64),
        "area": np.asarray(table["area"], dtype=np.float64),
        "solidity": values[:, 0],
        "eccentricity": values[:, 1],
        "centroid_y": np.asarray(table["centroid-0"], dtype=np.float64),
        "centroid_x": np.asarray(table["centroid-1"], dtype=np.float64),
        "bbox_y0": np.asarray(table["bbox-0"], dtype=np.float64),
        "bbox_x0": np.asarray(table["bbox-1"], dtype=np.float64),
        "bbox_y1": np.asarray(table["bbox-2"], dtype=np.float64),
        "bbox_x1": np.asarray(table["bbox-3"], dtype=np.float64),
    }
