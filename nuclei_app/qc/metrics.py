"""Pure QC metrics over arrays: coverage, seeds, morphology outliers, overlaps, cuts, the tile score."""
from __future__ import annotations

import math
from typing import Any, Sequence
import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries
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


#: Floors of the robust spread (`robust_reference`) of log-area, solidity and eccentricity, so that
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


def pixel_share(pixels: np.ndarray, within: np.ndarray) -> float | None:
    """Share of the True pixels of ``pixels`` that are True in ``within``; None when ``pixels`` has none.

    Parameters
    ----------
    pixels, within : ndarray of bool, shape (H, W)

    Returns
    -------
    float in [0, 1] or None
    """
    total = int(np.count_nonzero(pixels))
    return None if total == 0 else int(np.count_nonzero(pixels & within)) / total


def foreground_coverage(nuclei: np.ndarray, foreground: np.ndarray) -> float | None:
    """Share of foreground pixels inside some nucleus; None without foreground.

    Parameters
    ----------
    nuclei, foreground : ndarray of bool, shape (H, W)

    Returns
    -------
    float in [0, 1] or None
    """
    return pixel_share(foreground, nuclei)


def foreground_precision(nuclei: np.ndarray, foreground: np.ndarray) -> float | None:
    """Share of nucleus pixels on the foreground; None without nuclei.

    Parameters
    ----------
    nuclei, foreground : ndarray of bool, shape (H, W)

    Returns
    -------
    float in [0, 1] or None
    """
    return pixel_share(nuclei, foreground)


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
    labels = np.asarray(labels)
    if not labels.any():
        return np.zeros((0, 2), dtype=np.int64)
    interior = (labels != 0) & ~find_boundaries(labels, mode="inner")
    distance = ndi.distance_transform_edt(interior)
    # Per object, its pixel farthest from the outline; ties go to the first in row-major order.
    # Objects thinner than two pixels have no interior (distance 0 everywhere): their first pixel.
    pixels = np.flatnonzero(labels)
    owner = labels.ravel()[pixels]
    order = np.lexsort((pixels, -distance.ravel()[pixels], owner))  # by id, then farthest, then first
    first = np.flatnonzero(np.r_[True, owner[order][1:] != owner[order][:-1]])
    rows, cols = np.unravel_index(pixels[order[first]], labels.shape)
    return np.stack([rows, cols], axis=1).astype(np.int64)


def seed_recall(seeds: np.ndarray, nuclei: np.ndarray) -> float | None:
    """Share of seed points that fall inside a nucleus; None without seeds.

    Parameters
    ----------
    seeds : ndarray of int, shape (n, 2)
        (row, col) of each seed (`seed_points`).
    nuclei : ndarray of bool, shape (H, W)

    Returns
    -------
    float in [0, 1] or None
    """
    seeds = np.asarray(seeds, dtype=np.int64).reshape(-1, 2)
    if len(seeds) == 0:
        return None
    return float(np.mean(nuclei[seeds[:, 0], seeds[:, 1]]))


def morphology_outliers(
    area: np.ndarray, solidity: np.ndarray, eccentricity: np.ndarray, k: float
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Nuclei whose shape is unusual for their own slide.

    Rules (robust z-scores against the slide's median and robust spread, `robust_reference`:
    1.4826 MAD, or 1.2533 times the mean absolute deviation when the MAD is 0, at least the
    floors of `MORPHOLOGY_SPREAD_FLOOR`): area outlier when ``|z(log area)| > k``; solidity outlier
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

    Parameters
    ----------
    labels, teacher : ndarray of int, shape (H, W)
        The segmentation and the teacher's objects on the same pixels.

    Returns
    -------
    dict
        `nuclei_app.core.metrics.score_instances` with the teacher as the reference
        (``f1_50``, ``tp_50``, ``fp_50``, ``fn_50``, ``n_gt``, ...).
    """

    return score_instances(labels, teacher)


def tile_qc_score(components: dict[str, float | None], weights: dict[str, float] = QC_SCORE_WEIGHTS) -> float | None:
    """Weighted mean of the available quality components (each in [0, 1], higher is better).

    ``qc_score = sum(w_i * c_i) / sum(w_i)`` over the components ``c_i`` that are not None
    (see `QC_SCORE_WEIGHTS`); None when none is available.

    Parameters
    ----------
    components : dict of float or None
        Keyed like ``weights``; values clipped to [0, 1].
    weights : dict of float

    Returns
    -------
    float in [0, 1] or None
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
# Summaries of per-nucleus values (a tile's or the slide's)
# =====================================================================================


#: Per-nucleus columns the slide driver collects over the tiles (see `judge_morphology`,
#: `object_summary` and `object_metrics`).
OBJECT_COLUMNS: tuple[str, ...] = (
    "tile", "area", "solidity", "eccentricity", "score", "agreement", "overlap", "seam_cut", "control_cut", "at_border",
)


#: Slide metrics in report order (the ``slide`` object of the ``qc_report`` schema).
SLIDE_METRICS: tuple[str, ...] = (
    "n_tiles", "n_tiles_analysed", "n_tiles_empty", "n_nuclei", "density_per_mm2",
    "foreground_share", "foreground_coverage", "foreground_precision", "n_seeds", "seed_recall",
    "score_mean", "score_p10", "score_p50", "score_share_below_0_5", "head_agreement_mean", "head_all_found_share",
    "teacher_nuclei", "teacher_student_f1",
    "area_outlier_share", "solidity_outlier_share", "eccentricity_outlier_share", "morphology_outlier_share",
    "median_area_px", "median_area_um2", "median_solidity", "median_eccentricity",
    "overlap_share", "n_layers", "seam_cut_share", "control_cut_share", "seam_excess",
    "signal_autocorrelation", "qc_score_mean", "qc_score_p10", "n_flagged_tiles", "flagged_tile_share",
)


#: Pixel and object counts a slide pools over its analysed tiles (see `tile_counts`).
POOLED_COUNTS: tuple[str, ...] = (
    "fg", "fg_covered", "nuclei_px", "nuclei_on_fg", "seeds", "seeds_in", "tp", "fp", "fn", "teacher", "pixels",
    "autocorr", "autocorr_px",
)


def format_number(value: Any, digits: int = 6) -> Any:
    """JSON-ready number: rounded float, int kept, NaN/inf/None -> None.

    Parameters
    ----------
    value : int, float, bool, numpy scalar or None
    digits : int
        Decimal places a float is rounded to.

    Returns
    -------
    int, float, bool or None
    """
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None


def mean_or_none(values: np.ndarray) -> float | None:
    """Mean of the finite values; None when there is none.

    Parameters
    ----------
    values : ndarray of float, shape (n,)

    Returns
    -------
    float or None
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


def share_or_none(flags: np.ndarray, applies: bool = True) -> float | None:
    """Share of True in ``flags``; None when it does not apply or ``flags`` is empty.

    Parameters
    ----------
    flags : ndarray of bool (or 0/1), shape (n,)
    applies : bool
        False when the flags were not computed (e.g. no seam lines known).

    Returns
    -------
    float in [0, 1] or None
    """
    flags = np.asarray(flags).astype(bool)
    return float(flags.mean()) if applies and flags.size else None


def score_summary(scores: np.ndarray) -> dict[str, float | None]:
    """Mean, 10th and 50th percentile of the finite detection scores and the share below 0.5.

    Parameters
    ----------
    scores : ndarray of float, shape (n,)
        NaN for nuclei without a score.

    Returns
    -------
    dict
        ``score_mean``, ``score_p10``, ``score_p50``, ``score_share_below_0_5`` (None without scores).
    """
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


def agreement_summary(agreements: np.ndarray) -> dict[str, float | None]:
    """Mean head agreement of the nuclei and the share where every head found the nucleus.

    Parameters
    ----------
    agreements : ndarray of float, shape (n,)
        Mean pairwise mask IoU between the model's heads per nucleus; NaN when unknown.

    Returns
    -------
    dict
        ``head_agreement_mean`` and ``head_all_found_share`` (agreement >= `ALL_HEADS_FOUND_IOU`),
        None without a finite agreement.
    """
    finite = np.asarray(agreements, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return {
        "head_agreement_mean": float(finite.mean()) if finite.size else None,
        "head_all_found_share": float(np.mean(finite >= ALL_HEADS_FOUND_IOU)) if finite.size else None,
    }


def judge_morphology(
    objects: dict[str, np.ndarray], k: float, min_nuclei: int
) -> tuple[dict[str, np.ndarray] | None, dict[str, float] | None, np.ndarray]:
    """Morphology outliers of a slide's nuclei, judged against the nuclei off the slide border.

    Nuclei cut by the slide's own border are not judged for shape; with fewer than
    ``min_nuclei`` others there is no reference and no outlier.

    Parameters
    ----------
    objects : dict of ndarray, each shape (n,)
        At least ``area``, ``solidity``, ``eccentricity`` (float) and ``at_border`` (bool).
    k : float
        Robust z-score beyond which a nucleus is an outlier (`morphology_outliers`).
    min_nuclei : int

    Returns
    -------
    flags : dict of ndarray of bool, shape (n,), or None
        As `morphology_outliers` (False for border nuclei); None without a reference.
    reference : dict of float or None
        Medians and spreads used.
    interior : ndarray of bool, shape (n,)
        The nuclei judged (not touching the slide border).
    """
    interior = ~np.asarray(objects["at_border"]).astype(bool)
    if int(interior.sum()) < min_nuclei:
        return None, None, interior
    judged = {name: np.where(interior, objects[name], np.nan) for name in ("area", "solidity", "eccentricity")}
    flags, reference = morphology_outliers(judged["area"], judged["solidity"], judged["eccentricity"], k)
    return flags, reference, interior


def object_summary(
    objects: dict[str, np.ndarray], select: np.ndarray, interior: np.ndarray,
    outlier_flags: dict[str, np.ndarray] | None, seams_known: bool,
) -> dict[str, float | None]:
    """Per-nucleus values of one tile, summarised for its record.

    Parameters
    ----------
    objects : dict of ndarray, each shape (n,)
        The slide's nuclei (`OBJECT_COLUMNS`).
    select : ndarray of bool, shape (n,)
        The tile's nuclei.
    interior : ndarray of bool, shape (n,)
        Nuclei judged for shape (`judge_morphology`).
    outlier_flags : dict of ndarray of bool, shape (n,), or None
    seams_known : bool
        Whether the seam lines were known (else no seam share).

    Returns
    -------
    dict
        `score_summary`, `agreement_summary`, ``morphology_outlier_share``, ``overlap_share``,
        ``seam_cut_share``.
    """
    judged_here = select & interior
    return {
        **score_summary(objects["score"][select]),
        **agreement_summary(objects["agreement"][select]),
        "morphology_outlier_share": (
            share_or_none(outlier_flags["any"][judged_here]) if outlier_flags is not None else None
        ),
        "overlap_share": mean_or_none(objects["overlap"][select]),
        "seam_cut_share": share_or_none(objects["seam_cut"][select], seams_known),
    }


def quality_components(record: dict[str, Any]) -> dict[str, float | None]:
    """The components of a tile's QC score (`tile_qc_score`) from its record.

    Parameters
    ----------
    record : dict
        A tile record with its pixel metrics and `object_summary`.

    Returns
    -------
    dict of float or None
        Keyed like `QC_SCORE_WEIGHTS`; ``morphology_regular_share`` is 1 - the outlier share.
    """
    outlier_share = record["morphology_outlier_share"]
    return {
        "teacher_student_f1": record["teacher_student_f1"],
        "seed_recall": record["seed_recall"],
        "foreground_coverage": record["foreground_coverage"],
        "foreground_precision": record["foreground_precision"],
        "score_mean": record["score_mean"],
        "head_agreement_mean": record["head_agreement_mean"],
        "morphology_regular_share": None if outlier_share is None else 1.0 - outlier_share,
    }


# =====================================================================================
# Pixel counts (a tile's, pooled over the slide)
# =====================================================================================


def tile_counts(
    core_nuclei: np.ndarray, core_foreground: np.ndarray, core_stained: np.ndarray, seeds_inside: int,
    n_seeds: int, agreement: dict[str, Any], autocorrelation: float | None,
) -> dict[str, float]:
    """A tile's pixel and object counts, summed over the slide into its pooled metrics.

    Parameters
    ----------
    core_nuclei, core_foreground, core_stained : ndarray of bool, shape (H, W)
        Nucleus pixels, nuclear foreground and stained pixels of the tile (no halo).
    seeds_inside, n_seeds : int
        Teacher seeds of the tile inside some nucleus, and all of them.
    agreement : dict
        `teacher_agreement` of the tile (``tp_50``, ``fp_50``, ``fn_50``, ``n_gt``).
    autocorrelation : float or None
        `signal_autocorrelation` of the tile's composite.

    Returns
    -------
    dict
        Keyed by `POOLED_COUNTS`; ``autocorr`` is the autocorrelation weighted by the pixel count.
    """
    pixels = core_foreground.size
    return {
        "fg": int(core_foreground.sum()),
        "fg_covered": int((core_foreground & core_nuclei).sum()),
        "nuclei_px": int(core_nuclei.sum()),
        "nuclei_on_fg": int((core_stained & core_nuclei).sum()),
        "seeds": n_seeds,
        "seeds_in": seeds_inside,
        "tp": agreement["tp_50"],
        "fp": agreement["fp_50"],
        "fn": agreement["fn_50"],
        "teacher": agreement["n_gt"],
        "pixels": pixels,
        "autocorr": 0.0 if autocorrelation is None else autocorrelation * pixels,
        "autocorr_px": 0 if autocorrelation is None else pixels,
    }


def pooled_pixel_metrics(pooled: dict[str, float], n_tiles_analysed: int) -> dict[str, float | None]:
    """Slide metrics of the pooled tile counts (ratios of sums, not means of tile ratios).

    Parameters
    ----------
    pooled : dict
        Sums of `tile_counts` over the analysed tiles.
    n_tiles_analysed : int

    Returns
    -------
    dict
        ``foreground_share``, ``foreground_coverage``, ``foreground_precision``, ``n_seeds``,
        ``seed_recall``, ``teacher_nuclei``, ``teacher_student_f1`` (1 when neither the
        teacher nor the segmentation found anything on an analysed tile),
        ``signal_autocorrelation``.
    """
    teacher_denominator = 2 * pooled["tp"] + pooled["fp"] + pooled["fn"]
    return {
        "foreground_share": pooled["fg"] / pooled["pixels"] if pooled["pixels"] else 0.0,
        "foreground_coverage": pooled["fg_covered"] / pooled["fg"] if pooled["fg"] else None,
        "foreground_precision": pooled["nuclei_on_fg"] / pooled["nuclei_px"] if pooled["nuclei_px"] else None,
        "n_seeds": pooled["seeds"],
        "seed_recall": pooled["seeds_in"] / pooled["seeds"] if pooled["seeds"] else None,
        "teacher_nuclei": pooled["teacher"],
        "teacher_student_f1": (
            2 * pooled["tp"] / teacher_denominator if teacher_denominator else (1.0 if n_tiles_analysed else None)
        ),
        "signal_autocorrelation": pooled["autocorr"] / pooled["autocorr_px"] if pooled["autocorr_px"] else None,
    }


def object_metrics(
    objects: dict[str, np.ndarray], outlier_flags: dict[str, np.ndarray] | None, interior: np.ndarray,
    seams_known: bool, pixel_size_um: tuple[float, float] | None,
) -> dict[str, float | None]:
    """Slide metrics of the nuclei: scores, agreement, morphology, overlaps and cuts.

    Parameters
    ----------
    objects : dict of ndarray, each shape (n,)
        The slide's nuclei (`OBJECT_COLUMNS`).
    outlier_flags : dict of ndarray of bool, shape (n,), or None
        From `judge_morphology`.
    interior : ndarray of bool, shape (n,)
        Nuclei judged for shape.
    seams_known : bool
        Whether seam and control cuts were computed.
    pixel_size_um : (float, float) or None

    Returns
    -------
    dict
        Score, head-agreement, outlier-share, median-shape, overlap and seam metrics.
    """
    n_nuclei = len(objects["area"])
    seam_cut = objects["seam_cut"].astype(bool)
    control_cut = objects["control_cut"].astype(bool)
    median_area = float(np.median(objects["area"])) if n_nuclei else None
    metrics: dict[str, float | None] = {**score_summary(objects["score"]), **agreement_summary(objects["agreement"])}
    for name in ("area", "solidity", "eccentricity", "any"):
        key = "morphology_outlier_share" if name == "any" else f"{name}_outlier_share"
        metrics[key] = None if outlier_flags is None else float(outlier_flags[name][interior].mean())
    metrics.update({
        "median_area_px": median_area,
        "median_area_um2": (
            median_area * pixel_size_um[0] * pixel_size_um[1] if n_nuclei and pixel_size_um is not None else None
        ),
        "median_solidity": float(np.median(objects["solidity"])) if n_nuclei else None,
        "median_eccentricity": float(np.median(objects["eccentricity"])) if n_nuclei else None,
        "overlap_share": mean_or_none(objects["overlap"]),
        "seam_cut_share": share_or_none(seam_cut, seams_known),
        "control_cut_share": share_or_none(control_cut, seams_known),
        "seam_excess": float(seam_cut.mean() - control_cut.mean()) if seams_known and n_nuclei else None,
    })
    return metrics


def tile_score_metrics(tiles: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Slide metrics of the analysed tiles' QC scores and flags.

    Parameters
    ----------
    tiles : sequence of dict
        Tile records with ``qc_score`` (float or None) and ``flagged`` (bool).

    Returns
    -------
    dict
        ``qc_score_mean``, ``qc_score_p10``, ``n_flagged_tiles``, ``flagged_tile_share``.
    """
    qc_scores = np.asarray([t["qc_score"] for t in tiles if t["qc_score"] is not None], dtype=np.float64)
    n_flagged = sum(1 for t in tiles if t["flagged"])
    return {
        "qc_score_mean": float(qc_scores.mean()) if qc_scores.size else None,
        "qc_score_p10": float(np.percentile(qc_scores, 10)) if qc_scores.size else None,
        "n_flagged_tiles": n_flagged,
        "flagged_tile_share": n_flagged / len(tiles) if tiles else None,
    }


# =====================================================================================
# Slide reference and objects of a tile
# =====================================================================================


def stained_threshold(overview: np.ndarray, threshold: float) -> float:
    """Composite level down to which nucleus pixels count as on the nuclear stain.

    Outlines of nuclei fade into the background, so a nucleus pixel is on the stain down to
    half-way between the background level (median of the composite at or below Otsu's
    threshold) and Otsu's threshold.

    Parameters
    ----------
    overview : ndarray of float32, shape (H, W)
        Nuclear composite of the slide overview.
    threshold : float
        Otsu's threshold of ``overview`` (``inf`` when it is constant).

    Returns
    -------
    float
        ``threshold`` itself when it is not finite.
    """
    if not np.isfinite(threshold):
        return threshold
    below = overview[overview <= threshold]
    background_level = float(np.median(below)) if below.size else 0.0
    return 0.5 * (background_level + threshold)


def merge_properties(per_layer: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate the `object_properties` of several label images (e.g. overlap layers), column by column.

    Parameters
    ----------
    per_layer : sequence of dict of ndarray
        At least one; each as `nuclei_app.core.morphology.object_properties` returns.

    Returns
    -------
    dict of ndarray, each shape (sum of n,)
    """
    return {name: np.concatenate([p[name] for p in per_layer]) for name in per_layer[0]}


def centred_in(properties: dict[str, np.ndarray], offset: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """Which objects have their centroid inside ``box`` (each object belongs to one tile).

    Parameters
    ----------
    properties : dict of ndarray, each shape (n,)
        ``centroid_y`` and ``centroid_x`` in the pixels of a window.
    offset : (int, int)
        (y, x) of the window's first pixel in the slide.
    box : (int, int, int, int)
        (y0, x0, y1, x1) in slide pixels, end exclusive.

    Returns
    -------
    ndarray of bool, shape (n,)
    """
    oy, ox = offset
    y0, x0, y1, x1 = box
    return (
        (properties["centroid_y"] + oy >= y0) & (properties["centroid_y"] + oy < y1)
        & (properties["centroid_x"] + ox >= x0) & (properties["centroid_x"] + ox < x1)
    )


def touching_border(properties: dict[str, np.ndarray], offset: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """Which objects touch the slide's border (their shape is cut by it).

    Parameters
    ----------
    properties : dict of ndarray, each shape (n,)
        ``bbox_y0``, ``bbox_x0``, ``bbox_y1``, ``bbox_x1`` in the pixels of a window (end exclusive).
    offset : (int, int)
        (y, x) of the window's first pixel in the slide.
    shape : (int, int)
        (Y, X) of the slide.

    Returns
    -------
    ndarray of bool, shape (n,)
    """
    oy, ox = offset
    height, width = shape
    return (
        (properties["bbox_y0"] + oy <= 0) | (properties["bbox_x0"] + ox <= 0)
        | (properties["bbox_y1"] + oy >= height) | (properties["bbox_x1"] + ox >= width)
    )
