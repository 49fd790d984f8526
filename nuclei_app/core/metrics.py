"""Instance segmentation accuracy over label arrays: IoU matching, F1, AP, AJI+, PQ."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable
import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components
from nuclei_app.errors import BadDataError


IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))


METRIC_NAMES: tuple[str, ...] = (
    "precision_50",
    "recall_50",
    "f1_50",
    "ap_50_95",
    "aji_plus",
    "pq",
    "mean_matched_iou",
)


COUNT_NAMES: tuple[str, ...] = ("n_pred", "n_gt", "tp_50", "fp_50", "fn_50")


# --------------------------------------------------------------------------- inputs


def as_label_image(labels: np.ndarray, source: str | Path | None = None) -> np.ndarray:
    """Check that ``labels`` is a 2-D image of non-negative integer ids; return it as int64.

    Singleton leading axes (e.g. ``(1, 1, H, W)``) are dropped. Float images are accepted
    only when every value is a whole number (some tools save labels as float).

    Raises
    ------
    BadDataError
        When the image is not 2-D or holds negative, fractional or non-finite values.
    """
    array = np.asarray(labels)
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise BadDataError(f"expected a 2-D label image, got shape {array.shape}; give one label plane", source)
    if array.dtype == bool:
        return array.astype(np.int64)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise BadDataError(
                "label image holds non-integer values; give an instance label image (integer ids, 0 = background)",
                source,
            )
    elif not np.issubdtype(array.dtype, np.integer):
        raise BadDataError(f"label image has dtype {array.dtype}; give integer ids (0 = background)", source)
    if array.size and array.min() < 0:
        raise BadDataError("label image holds negative ids; give ids >= 0 (0 = background)", source)
    return array.astype(np.int64, copy=False)


def check_same_shape(pred: np.ndarray, gt: np.ndarray, pred_source: Any = None, gt_source: Any = None) -> None:
    if pred.shape != gt.shape:
        names = f"{pred_source} vs {gt_source}: " if pred_source is not None or gt_source is not None else ""
        raise BadDataError(
            f"{names}prediction shape {pred.shape} differs from ground truth shape {gt.shape}; "
            "compare label images of the same image"
        )


# --------------------------------------------------------------------------- overlaps


@dataclass
class _Overlaps:
    """Sparse pairwise overlap of two label images."""

    pred_ids: np.ndarray  # (n_pred,)
    gt_ids: np.ndarray  # (n_gt,)
    pred_areas: np.ndarray  # (n_pred,) int64
    gt_areas: np.ndarray  # (n_gt,) int64
    rows: np.ndarray  # (k,) index into pred_ids of each overlapping pair
    cols: np.ndarray  # (k,) index into gt_ids
    intersections: np.ndarray  # (k,) int64

    @property
    def unions(self) -> np.ndarray:
        return self.pred_areas[self.rows] + self.gt_areas[self.cols] - self.intersections

    @property
    def ious(self) -> np.ndarray:
        return self.intersections / self.unions


def _dense_ids(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(flat, return_inverse=True)`` for non-negative ids, by counting instead of
    sorting when the largest id is not far above the pixel count (label images almost always)."""
    top = int(flat.max()) if flat.size else 0
    if top > 4 * flat.size + 65536:  # sparse huge ids: a lookup table would be too big
        return np.unique(flat, return_inverse=True)
    ids = np.flatnonzero(np.bincount(flat, minlength=1))
    lookup = np.zeros(top + 1, dtype=np.int64)
    lookup[ids] = np.arange(ids.size)
    return ids, lookup[flat]


def _overlaps(pred: np.ndarray, gt: np.ndarray) -> _Overlaps:
    """All overlapping (pred, gt) pairs in one pass over the pixels (bincount, no per-object loop)."""
    pred_flat = pred.ravel()
    gt_flat = gt.ravel()
    pred_ids, pred_index = _dense_ids(pred_flat)
    gt_ids, gt_index = _dense_ids(gt_flat)
    # Index 0 is background only when 0 occurs; shift so that objects are 0..n-1.
    pred_offset = 1 if pred_ids.size and pred_ids[0] == 0 else 0
    gt_offset = 1 if gt_ids.size and gt_ids[0] == 0 else 0
    n_pred_all, n_gt_all = pred_ids.size, gt_ids.size
    pred_areas_all = np.bincount(pred_index, minlength=n_pred_all)
    gt_areas_all = np.bincount(gt_index, minlength=n_gt_all)
    both = (pred_index >= pred_offset) & (gt_index >= gt_offset)
    pair_code = pred_index[both].astype(np.int64) * n_gt_all + gt_index[both]
    if n_pred_all * n_gt_all <= 4 * pair_code.size + 65536:
        counts = np.bincount(pair_code, minlength=1)
        codes = np.flatnonzero(counts)
        counts = counts[codes]
    else:
        codes, counts = np.unique(pair_code, return_counts=True)
    return _Overlaps(
        pred_ids=pred_ids[pred_offset:],
        gt_ids=gt_ids[gt_offset:],
        pred_areas=pred_areas_all[pred_offset:].astype(np.int64),
        gt_areas=gt_areas_all[gt_offset:].astype(np.int64),
        rows=(codes // n_gt_all - pred_offset).astype(np.int64),
        cols=(codes % n_gt_all - gt_offset).astype(np.int64),
        intersections=counts.astype(np.int64),
    )


def iou_matrix(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intersection over union of every predicted object with every true object.

    Parameters
    ----------
    pred, gt : ndarray of int, shape (H, W)
        Label images, 0 = background; ids need not be consecutive.

    Returns
    -------
    iou : ndarray of float64, shape (n_pred, n_gt)
        ``iou[i, j]`` is the IoU of object ``pred_ids[i]`` with ``gt_ids[j]``.
    pred_ids : ndarray of int64, shape (n_pred,)
        Sorted object ids present in ``pred``.
    gt_ids : ndarray of int64, shape (n_gt,)
        Sorted object ids present in ``gt``.
    """
    pred = as_label_image(pred)
    gt = as_label_image(gt)
    check_same_shape(pred, gt)
    overlaps = _overlaps(pred, gt)
    iou = np.zeros((overlaps.pred_ids.size, overlaps.gt_ids.size), dtype=np.float64)
    iou[overlaps.rows, overlaps.cols] = overlaps.ious
    return iou, overlaps.pred_ids, overlaps.gt_ids


# --------------------------------------------------------------------------- matching


def _assign(rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, n_rows: int, n_cols: int) -> np.ndarray:
    """Maximum-weight one-to-one assignment over a sparse bipartite graph.

    The graph is split into connected components and the Hungarian algorithm runs on
    each component's small dense block, which is exact (the objective is a sum over
    components) and fast for thousands of objects. Returns the indices (into
    ``rows``/``cols``/``weights``) of the chosen edges.
    """
    if rows.size == 0:
        return np.zeros(0, dtype=np.int64)
    graph = sparse.coo_matrix(
        (np.ones(rows.size), (rows, n_rows + cols)), shape=(n_rows + n_cols, n_rows + n_cols)
    )
    _, component = connected_components(graph, directed=False)
    edge_component = component[rows]
    order = np.argsort(edge_component, kind="stable")
    boundaries = np.flatnonzero(np.diff(edge_component[order])) + 1
    chosen: list[np.ndarray] = []
    for edges in np.split(order, boundaries):
        if edges.size == 1:  # the common case: one predicted object over one true object
            chosen.append(edges)
            continue
        block_rows, row_pos = np.unique(rows[edges], return_inverse=True)
        block_cols, col_pos = np.unique(cols[edges], return_inverse=True)
        block = np.zeros((block_rows.size, block_cols.size))
        edge_at = np.full(block.shape, -1, dtype=np.int64)
        block[row_pos, col_pos] = weights[edges]
        edge_at[row_pos, col_pos] = edges
        picked_rows, picked_cols = linear_sum_assignment(block, maximize=True)
        picked = edge_at[picked_rows, picked_cols]
        chosen.append(picked[picked >= 0])
    return np.sort(np.concatenate(chosen))


@dataclass
class Tally:
    """Sums from which every metric is computed; adding tallies pools images."""

    n_pred: int = 0
    n_gt: int = 0
    tp: np.ndarray = field(default_factory=lambda: np.zeros(len(IOU_THRESHOLDS), dtype=np.int64))
    matched_iou_sum_50: float = 0.0
    # AJI+: the intersection and the other parts of its union (see `aji_plus_breakdown`).
    aji_intersection: int = 0
    aji_pred_excess: int = 0
    aji_gt_missed: int = 0
    aji_unpaired_pred: int = 0
    aji_unpaired_gt: int = 0

    def __add__(self, other: "Tally") -> "Tally":
        return Tally(
            self.n_pred + other.n_pred,
            self.n_gt + other.n_gt,
            self.tp + other.tp,
            self.matched_iou_sum_50 + other.matched_iou_sum_50,
            *(getattr(self, name) + getattr(other, name) for name in _AJI_PARTS),
        )

    @property
    def aji_union(self) -> int:
        return sum(getattr(self, name) for name in _AJI_PARTS)


_AJI_PARTS = ("aji_intersection", "aji_pred_excess", "aji_gt_missed", "aji_unpaired_pred", "aji_unpaired_gt")


def tally_matches(pred: np.ndarray, gt: np.ndarray) -> Tally:
    overlaps = _overlaps(pred, gt)
    n_pred, n_gt = overlaps.pred_ids.size, overlaps.gt_ids.size
    ious = overlaps.ious
    tally = Tally(n_pred=n_pred, n_gt=n_gt)
    for k, threshold in enumerate(IOU_THRESHOLDS):
        # Small tolerance so that an IoU of exactly t (e.g. 1/2 as a float) counts at t.
        candidate = ious >= threshold - 1e-12
        # Cellpose cost: first the number of pairs above t, then (tie-break) their IoU.
        weights = 1.0 + ious[candidate] / 2.0
        picked = _assign(overlaps.rows[candidate], overlaps.cols[candidate], weights, n_pred, n_gt)
        tally.tp[k] = picked.size
        if k == 0:
            tally.matched_iou_sum_50 = float(ious[candidate][picked].sum())
    # AJI+: one assignment on all IoU > 0 pairs, maximising the summed IoU.
    picked = _assign(overlaps.rows, overlaps.cols, ious, n_pred, n_gt)
    intersections = overlaps.intersections[picked]
    unpaired_pred = np.ones(n_pred, dtype=bool)
    unpaired_pred[overlaps.rows[picked]] = False
    unpaired_gt = np.ones(n_gt, dtype=bool)
    unpaired_gt[overlaps.cols[picked]] = False
    tally.aji_intersection = int(intersections.sum())
    tally.aji_pred_excess = int((overlaps.pred_areas[overlaps.rows[picked]] - intersections).sum())
    tally.aji_gt_missed = int((overlaps.gt_areas[overlaps.cols[picked]] - intersections).sum())
    tally.aji_unpaired_pred = int(overlaps.pred_areas[unpaired_pred].sum())
    tally.aji_unpaired_gt = int(overlaps.gt_areas[unpaired_gt].sum())
    return tally


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator > 0 else 0.0


def scores_from_tally(tally: Tally) -> dict[str, Any]:
    tp = tally.tp
    fp = tally.n_pred - tp
    fn = tally.n_gt - tp
    tp50, fp50, fn50 = int(tp[0]), int(fp[0]), int(fn[0])
    counts = {"n_pred": tally.n_pred, "n_gt": tally.n_gt, "tp_50": tp50, "fp_50": fp50, "fn_50": fn50}
    if tally.n_pred == 0 and tally.n_gt == 0:
        return {**{name: 1.0 for name in METRIC_NAMES}, **counts}
    mean_matched_iou = _ratio(tally.matched_iou_sum_50, tp50)
    detection_quality = _ratio(tp50, tp50 + 0.5 * fp50 + 0.5 * fn50)
    scores = {
        "precision_50": _ratio(tp50, tp50 + fp50),
        "recall_50": _ratio(tp50, tp50 + fn50),
        "f1_50": _ratio(2 * tp50, 2 * tp50 + fp50 + fn50),
        "ap_50_95": float(np.mean([_ratio(t, t + p + n) for t, p, n in zip(tp, fp, fn)])),
        "aji_plus": _ratio(tally.aji_intersection, tally.aji_union),
        "pq": mean_matched_iou * detection_quality,
        "mean_matched_iou": mean_matched_iou,
    }
    return {**scores, **counts}


def score_instances(pred: np.ndarray, gt: np.ndarray) -> dict[str, Any]:
    """Accuracy of one predicted label image against its ground truth.

    Parameters
    ----------
    pred, gt : ndarray of int, shape (H, W)
        Instance label images (0 = background), same shape. Ids need not be consecutive.

    Returns
    -------
    dict
        ``precision_50, recall_50, f1_50, ap_50_95, aji_plus, pq, mean_matched_iou``
        (floats in [0, 1], higher is better) and ``n_pred, n_gt, tp_50, fp_50, fn_50``
        (ints). See the module docstring for the definitions.

    Raises
    ------
    BadDataError
        When the shapes differ or a label image is not integer-valued.
    """
    pred = as_label_image(pred)
    gt = as_label_image(gt)
    check_same_shape(pred, gt)
    return scores_from_tally(tally_matches(pred, gt))


def _pooled_tally(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> Tally:
    total = Tally()
    for pred, gt in pairs:
        pred = as_label_image(pred)
        gt = as_label_image(gt)
        check_same_shape(pred, gt)
        total = total + tally_matches(pred, gt)
    return total


def score_pooled(pairs: Iterable[tuple[np.ndarray, np.ndarray]], with_aji_plus_loss: bool = False) -> dict[str, Any]:
    """Accuracy pooled over several ``(pred, gt)`` image pairs (counts summed before dividing).

    Returns the same keys as `score_instances`, plus ``aji_plus_loss`` (`aji_plus_breakdown`)
    when ``with_aji_plus_loss``. An empty iterable scores as two empty images.
    """
    total = _pooled_tally(pairs)
    scores = scores_from_tally(total)
    if with_aji_plus_loss:
        scores["aji_plus_loss"] = _aji_plus_shares(total)
    return scores


def aji_plus_breakdown(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Where AJI+ is lost, pooled over ``(pred, gt)`` image pairs, as shares of its denominator.

    AJI+ pairs each true nucleus with at most one predicted one and divides the summed
    intersections by everything either side covers. That denominator splits into the
    intersection (= ``aji_plus``), and four losses: ``pred_excess`` (pixels of paired
    predictions outside their true nucleus: outlines drawn too wide), ``gt_missed`` (pixels of
    paired true nuclei outside their prediction: outlines too tight, or fragments),
    ``unpaired_pred`` (false objects) and ``unpaired_gt`` (missed nuclei). The five sum to 1.

    Parameters
    ----------
    pairs : iterable of (ndarray of int, ndarray of int), each shape (H, W)
        Predicted and true label images of the same shape.

    Returns
    -------
    dict of str to float
        ``aji_plus, pred_excess, gt_missed, unpaired_pred, unpaired_gt``; all 0 when both
        sides are empty.
    """
    return _aji_plus_shares(_pooled_tally(pairs))


def _aji_plus_shares(total: Tally) -> dict[str, float]:
    parts = {"aji_plus": total.aji_intersection, "pred_excess": total.aji_pred_excess,
             "gt_missed": total.aji_gt_missed, "unpaired_pred": total.aji_unpaired_pred,
             "unpaired_gt": total.aji_unpaired_gt}
    return {name: _ratio(value, total.aji_union) for name, value in parts.items()}


def mean_scores(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Mean of every metric over per-image score dicts; counts are summed. Empty input -> ``{}``."""
    rows = list(rows)
    if not rows:
        return {}
    result: dict[str, Any] = {name: float(np.mean([row[name] for row in rows])) for name in METRIC_NAMES}
    result.update({name: int(sum(row[name] for row in rows)) for name in COUNT_NAMES})
    return result

