"""Pure QC metrics over arrays: coverage, seeds, morphology outliers, overlaps, cuts, the tile score."""
from __future__ import annotations

import math
from typing import Any, Sequence
import numpy as np
from scipy import ndimage as ndi
from nuclei_app.core.intensity import robust_reference, robust_z
from nuclei_app.core.metrics import score_instances


#: Weights of the components of the per-tile QC score (see the ``qc_report`` schema).
QC_SCORE_WEIGHTS: dict[str, float] = {
    "teacher_student_f1": 3.0,
    "seed_recall": 1.0,
    "foreground_coverage": 1.0,
    "foreground_precision": 1.0,
    "score_mean": 1.0,
    "head_agreement_mean": 1.0,
    "morphology_regular_share": 1.0,
}


#: A tile with no nuclei and less than this share of foreground pixels is empty (not analysed).
MIN_FOREGROUND_SHARE = 0.002


#: Teacher objects need at least this share of their pixels on the slide's foreground
#: (the weak labeler re-thresholds each tile, so on empty tiles it would split noise).
TEACHER_MIN_FOREGROUND = 0.5


#: IoU at which a segmented nucleus and a model (re)prediction are the same object.
MATCH_IOU = 0.5


#: Head agreement (mean pairwise mask IoU) at which every head found the same nucleus.
ALL_HEADS_FOUND_IOU = 0.5


#: Floors of the robust spread (1.4826 MAD) of log-area, solidity and eccentricity, so that
#: a very uniform slide does not call ordinary nuclei outliers.
MORPHOLOGY_SPREAD_FLOOR = {"log_area": 0.15, "solidity": 0.04, "eccentricity": 0.08}


def nuclear_foreground(composite: np.ndarray, threshold: float) -> np.ndarray:
    """Nuclear-stain foreground: the composite, lightly smoothed (sigma 1 px), above ``threshold``.

    Parameters
    ----------
    composite : ndarray of float, shape (H, W)
        Nuclear signal in [0, 1] (`nuclei_app.weak.nuclear_composite`).
    threshold : float
        The slide's Otsu threshold (`otsu_threshold` of the slide overview).

    Returns
    -------
    ndarray of bool, shape (H, W)
    """
    if not np.isfinite(threshold):
        return np.zeros(np.shape(composite), dtype=bool)
    return ndi.gaussian_filter(np.asarray(composite, dtype=np.float32), 1.0) > threshold


def foreground_coverage(nuclei: np.ndarray, foreground: np.ndarray) -> float | None:
    """Share of foreground pixels inside some nucleus; None without foreground.

    Parameters
    ----------
    nuclei, foreground : ndarray of bool, shape (H, W)
    """
    total = int(np.count_nonzero(foreground))
    return None if total == 0 else int(np.count_nonzero(nuclei & foreground)) / total


def foreground_precision(nuclei: np.ndarray, foreground: np.ndarray) -> float | None:
    """Share of nucleus pixels on the foreground; None without nuclei.

    Parameters
    ----------
    nuclei, foreground : ndarray of bool, shape (H, W)
    """
    total = int(np.count_nonzero(nuclei))
    return None if total == 0 else int(np.count_nonzero(nuclei & foreground)) / total


def seed_points(labels: np.ndarray) -> np.ndarray:
    """One point per object: its innermost pixel (farthest from the object's outline).

    Used for the LoG teacher's objects: each grew from one LoG seed, and the innermost
    pixel always lies inside the object (a centroid may not).

    Parameters
    ----------
    labels : ndarray of int, shape (H, W)
        Instance ids, 0 = background.

    Returns
    -------
    ndarray of int64, shape (n, 2)
        (row, col) per object, in increasing id order.
    """
    from skimage.segmentation import find_boundaries

    labels = np.asarray(labels)
    ids = np.unique(labels)
    ids = ids[ids != 0]
    if ids.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    interior = (labels != 0) & ~find_boundaries(labels, mode="inner")
    distance = ndi.distance_transform_edt(interior)
    points = np.zeros((ids.size, 2), dtype=np.int64)
    # Objects thinner than two pixels have no interior: any of their pixels will do (the +1).
    slices = ndi.find_objects(labels.astype(np.int64, copy=False))
    for row, object_id in enumerate(ids):
        window = slices[int(object_id) - 1]
        inside = labels[window] == object_id
        score = np.where(inside, distance[window] + 1.0, 0.0)
        flat_index = int(np.argmax(score))
        y, x = np.unravel_index(flat_index, inside.shape)
        points[row] = (window[0].start + y, window[1].start + x)
    return points


def seed_recall(seeds: np.ndarray, nuclei: np.ndarray) -> float | None:
    """Share of seed points (n, 2) that fall inside a nucleus (bool (H, W)); None without seeds."""
    seeds = np.asarray(seeds, dtype=np.int64).reshape(-1, 2)
    if len(seeds) == 0:
        return None
    return float(np.mean(nuclei[seeds[:, 0], seeds[:, 1]]))


def morphology_outliers(
    area: np.ndarray, solidity: np.ndarray, eccentricity: np.ndarray, k: float
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Nuclei whose shape is unusual for their own slide.

    Rules (robust z-scores against the slide's median and 1.4826 MAD, with the floors of
    `MORPHOLOGY_SPREAD_FLOOR`): area outlier when ``|z(log area)| > k``; solidity outlier
    when ``z(solidity) < -k`` (ragged or merged); eccentricity outlier when
    ``z(eccentricity) > k`` (elongated slivers).

    Parameters
    ----------
    area, solidity, eccentricity : ndarray of float, shape (n,)
    k : float

    Returns
    -------
    flags : dict of ndarray of bool, shape (n,)
        ``area``, ``solidity``, ``eccentricity`` and ``any``.
    reference : dict of float
        Medians and spreads used (``log_area_median``, ``log_area_spread``, ...).
    """
    log_area = np.log(np.maximum(np.asarray(area, dtype=np.float64), 1.0))
    reference: dict[str, float] = {}
    flags: dict[str, np.ndarray] = {}
    for name, values, sided in (
        ("log_area", log_area, "both"),
        ("solidity", np.asarray(solidity, dtype=np.float64), "low"),
        ("eccentricity", np.asarray(eccentricity, dtype=np.float64), "high"),
    ):
        median, spread = robust_reference(values, MORPHOLOGY_SPREAD_FLOOR[name])
        reference[f"{name}_median"], reference[f"{name}_spread"] = median, spread
        z = robust_z(values, median, spread)
        flag = np.abs(z) > k if sided == "both" else (z < -k if sided == "low" else z > k)
        flags["area" if name == "log_area" else name] = flag & np.isfinite(values)
    flags["any"] = flags["area"] | flags["solidity"] | flags["eccentricity"]
    return flags, reference


def overlapping_ids(layers: Sequence[np.ndarray]) -> np.ndarray:
    """Ids of objects that share pixels with an object of another layer.

    Parameters
    ----------
    layers : sequence of ndarray of int, each shape (H, W)
        Overlap layers: each holds non-overlapping full masks; ids are unique across layers.

    Returns
    -------
    ndarray of int64, sorted unique ids
    """
    found = []
    for a in range(len(layers)):
        for b in range(a + 1, len(layers)):
            both = (layers[a] != 0) & (layers[b] != 0)
            if both.any():
                found.extend([layers[a][both], layers[b][both]])
    return np.unique(np.concatenate(found)).astype(np.int64) if found else np.zeros(0, dtype=np.int64)


def straight_cut_ids(labels: np.ndarray, axis: int, position: int, min_run: int) -> np.ndarray:
    """Objects whose outline runs straight along a grid line for at least ``min_run`` pixels.

    The line lies between index ``position - 1`` and ``position`` along ``axis`` (0: a
    horizontal line between two rows; 1: a vertical line between two columns). An object
    is cut there when ``min_run`` consecutive pixels of it on one side face pixels that are
    not it on the other side: a nucleus cut by a tile edge. Round nuclei touch a line with
    a run of about ``sqrt(diameter)`` pixels only.

    Parameters
    ----------
    labels : ndarray of int, shape (H, W)
    axis : {0, 1}
    position : int, 1 <= position < labels.shape[axis]
    min_run : int

    Returns
    -------
    ndarray of int64, sorted unique ids
    """
    labels = np.asarray(labels)
    if axis == 0:
        before, after = labels[position - 1, :], labels[position, :]
    else:
        before, after = labels[:, position - 1], labels[:, position]
    found = []
    for side, other in ((before, after), (after, before)):
        edge = np.where((side != 0) & (side != other), side, 0)
        if not edge.any():
            continue
        change = np.flatnonzero(np.diff(edge) != 0) + 1
        starts = np.concatenate([[0], change])
        lengths = np.diff(np.concatenate([starts, [edge.size]]))
        values = edge[starts]
        found.append(values[(values != 0) & (lengths >= min_run)])
    return np.unique(np.concatenate(found)).astype(np.int64) if found else np.zeros(0, dtype=np.int64)


def teacher_agreement(labels: np.ndarray, teacher: np.ndarray) -> dict[str, Any]:
    """F1 at IoU 0.5 (and counts) of a segmentation against the weak teacher's labels.

    Returns the dict of `nuclei_app.evaluate.score_instances` with the teacher as reference.
    """

    return score_instances(labels, teacher)


def tile_qc_score(components: dict[str, float | None], weights: dict[str, float] = QC_SCORE_WEIGHTS) -> float | None:
    """Weighted mean of the available quality components (each in [0, 1], higher is better).

    ``qc_score = sum(w_i * c_i) / sum(w_i)`` over the components ``c_i`` that are not None
    (see `QC_SCORE_WEIGHTS`); None when none is available.
    """
    total = weight_sum = 0.0
    for name, weight in weights.items():
        value = components.get(name)
        if value is None or not np.isfinite(value):
            continue
        total += weight * float(np.clip(value, 0.0, 1.0))
        weight_sum += weight
    return total / weight_sum if weight_sum > 0 else None


# =====================================================================================
# The slide
# =====================================================================================


def format_number(value: Any, digits: int = 6) -> Any:
    """JSON-ready number: rounded float, int kept, NaN/inf/None -> None."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None


def mean_or_none(values: np.ndarray) -> float | None:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


def score_summary(scores: np.ndarray) -> dict[str, float | None]:
    scores = np.asarray(scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    if scores.size == 0:
        return {"score_mean": None, "score_p10": None, "score_p50": None, "score_share_below_0_5": None}
    return {
        "score_mean": float(scores.mean()),
        "score_p10": float(np.percentile(scores, 10)),
        "score_p50": float(np.percentile(scores, 50)),
        "score_share_below_0_5": float(np.mean(scores < 0.5)),
    }

