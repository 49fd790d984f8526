"""Instance segmentation accuracy: predicted label images against ground-truth label images.

Definitions (the ones the field uses; every metric is in [0, 1], higher is better):

- Matching. Objects are matched one-to-one by the Hungarian algorithm
  (`scipy.optimize.linear_sum_assignment`) on their intersection over union (IoU).
  At a threshold ``t`` a predicted and a true object form a true positive (TP)
  when they are matched and **IoU >= t** (``>=`` everywhere, as Cellpose does;
  for ``t >= 0.5`` a match is unique, so the assignment only matters for exact ties).
  Unmatched predictions are false positives (FP), unmatched true objects false
  negatives (FN). The assignment maximises the number of pairs with IoU >= t first
  and their summed IoU second (the Cellpose cost), separately for every threshold.
- ``precision_50 = TP/(TP+FP)``, ``recall_50 = TP/(TP+FN)``, ``f1_50 = 2TP/(2TP+FP+FN)`` at t = 0.5.
- ``ap_50_95``: mean over t in 0.50, 0.55, ..., 0.95 of ``TP/(TP+FP+FN)``: the
  "average precision" of the 2018 Data Science Bowl and of Cellpose.
- ``aji_plus``: AJI+ (Graham et al. 2019, HoVer-Net). Unique one-to-one pairs by
  maximal summed IoU (Hungarian on IoU, pairs with IoU > 0 kept); ``C`` = summed
  intersections of the pairs, ``U`` = summed unions of the pairs + areas of every
  unpaired predicted and true object; AJI+ = C / U.
- ``pq``: panoptic quality at t = 0.5 (Kirillov et al. 2019): ``SQ * DQ`` with
  ``SQ`` = mean IoU of the TPs and ``DQ = TP/(TP + FP/2 + FN/2)``.
- ``mean_matched_iou``: mean IoU of the TPs at t = 0.5 (equal to SQ).

Edge cases: when both images are empty every score is 1.0 (nothing to find, nothing
wrongly found); otherwise a ratio whose denominator is 0 is 0.0 (e.g. the scores of an
empty prediction against a non-empty truth are all 0).

Pooled scores over several images sum TP/FP/FN per threshold, the TP IoUs and the
AJI+ C and U over all images before dividing (so large images weigh more); the mean
over images averages the per-image scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components

from nuclei_app.errors import BadDataError, MissingInputError, UsageError

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


def _check_same_shape(pred: np.ndarray, gt: np.ndarray, pred_source: Any = None, gt_source: Any = None) -> None:
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


def _overlaps(pred: np.ndarray, gt: np.ndarray) -> _Overlaps:
    """All overlapping (pred, gt) pairs in one pass over the pixels (bincount, no per-object loop)."""
    pred_flat = pred.ravel()
    gt_flat = gt.ravel()
    pred_ids, pred_index = np.unique(pred_flat, return_inverse=True)
    gt_ids, gt_index = np.unique(gt_flat, return_inverse=True)
    # Index 0 is background only when 0 occurs; shift so that objects are 0..n-1.
    pred_offset = 1 if pred_ids.size and pred_ids[0] == 0 else 0
    gt_offset = 1 if gt_ids.size and gt_ids[0] == 0 else 0
    n_pred_all, n_gt_all = pred_ids.size, gt_ids.size
    pred_areas_all = np.bincount(pred_index, minlength=n_pred_all)
    gt_areas_all = np.bincount(gt_index, minlength=n_gt_all)
    both = (pred_index >= pred_offset) & (gt_index >= gt_offset)
    pair_code = pred_index[both].astype(np.int64) * n_gt_all + gt_index[both]
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
    _check_same_shape(pred, gt)
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
class _Tally:
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

    def __add__(self, other: "_Tally") -> "_Tally":
        return _Tally(
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


def _tally(pred: np.ndarray, gt: np.ndarray) -> _Tally:
    overlaps = _overlaps(pred, gt)
    n_pred, n_gt = overlaps.pred_ids.size, overlaps.gt_ids.size
    ious = overlaps.ious
    tally = _Tally(n_pred=n_pred, n_gt=n_gt)
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


def _scores(tally: _Tally) -> dict[str, Any]:
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
    _check_same_shape(pred, gt)
    return _scores(_tally(pred, gt))


def _pooled_tally(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> _Tally:
    total = _Tally()
    for pred, gt in pairs:
        pred = as_label_image(pred)
        gt = as_label_image(gt)
        _check_same_shape(pred, gt)
        total = total + _tally(pred, gt)
    return total


def score_pooled(pairs: Iterable[tuple[np.ndarray, np.ndarray]], with_aji_plus_loss: bool = False) -> dict[str, Any]:
    """Accuracy pooled over several ``(pred, gt)`` image pairs (counts summed before dividing).

    Returns the same keys as `score_instances`, plus ``aji_plus_loss`` (`aji_plus_breakdown`)
    when ``with_aji_plus_loss``. An empty iterable scores as two empty images.
    """
    total = _pooled_tally(pairs)
    scores = _scores(total)
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


def _aji_plus_shares(total: _Tally) -> dict[str, float]:
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


# --------------------------------------------------------------------------- files and folders

# Pairing rule: a file's *key* is its name without extension and without trailing
# role suffixes; a prediction pairs with the ground truth of the same key, or else
# with the ground truth whose key is the longest prefix of its key followed by
# "_", "-" or "." (so "NAME_weak-log.tif" pairs with "NAME_masks.tif").
LABEL_EXTENSIONS: tuple[str, ...] = (".ome.zarr", ".ome.tiff", ".ome.tif", ".ome.btf", ".tiff", ".tif", ".btf", ".zarr")
ROLE_SUFFIXES: tuple[str, ...] = (
    "_masks", "_mask", "_labels", "_label", "_gt", "_pred", "_prediction", "_predictions", "_seg", "_img", "_image",
)
GROUND_TRUTH_SUFFIXES: tuple[str, ...] = ("_masks", "_mask", "_labels", "_label", "_gt")
_PREFIX_SEPARATORS = ("_", "-", ".")


def _label_extension(path: Path) -> str | None:
    name = path.name.lower()
    for extension in LABEL_EXTENSIONS:
        if name.endswith(extension):
            return extension
    return None


def _stem(path: Path) -> str:
    extension = _label_extension(path) or path.suffix
    return path.name[: len(path.name) - len(extension)] if extension else path.name


def pairing_key(path: str | Path) -> str:
    """The name a label file is paired by: no extension, no trailing role suffix.

    ``NAME_masks.tif``, ``NAME_img.ome.zarr`` and ``NAME_pred.tif`` all give ``NAME``.
    """
    stem = _stem(Path(path))
    changed = True
    while changed:
        changed = False
        for suffix in ROLE_SUFFIXES:
            if stem.lower().endswith(suffix) and len(stem) > len(suffix):
                stem = stem[: -len(suffix)]
                changed = True
    return stem


def _is_label_source(path: Path) -> bool:
    """A single label store (a TIFF file or an OME-Zarr folder), as opposed to a folder of them."""
    if path.is_file():
        return True
    if path.is_dir():
        return path.name.lower().endswith(".zarr") or (path / ".zattrs").exists() or (path / "zarr.json").exists()
    return False


def _list_label_files(folder: Path) -> list[Path]:
    entries = [
        entry
        for entry in sorted(folder.iterdir())
        if not entry.name.startswith(".") and ".partial-" not in entry.name and _label_extension(entry)
    ]
    return [entry for entry in entries if entry.is_file() or entry.is_dir()]


def _ground_truth_files(folder: Path) -> list[Path]:
    files = _list_label_files(folder)
    # A ground-truth folder may hold the images too (NAME_img.tif beside NAME_masks.tif):
    # when any file is named as a mask, only those count.
    masks = [f for f in files if any(_stem(f).lower().endswith(s) for s in GROUND_TRUTH_SUFFIXES)]
    return masks or files


def pair_label_files(pred_dir: str | Path, gt_dir: str | Path) -> tuple[list[tuple[str, Path, Path]], list[Path], list[Path]]:
    """Pair prediction files with ground-truth files by name (see `pairing_key`).

    Returns
    -------
    pairs : list of (key, prediction path, ground-truth path), sorted by key
    predictions_without_truth : list of Path
    truth_without_prediction : list of Path

    Raises
    ------
    BadDataError
        When two files of one folder claim the same partner.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    truths: dict[str, Path] = {}
    for path in _ground_truth_files(gt_dir):
        key = pairing_key(path)
        if key in truths:
            raise BadDataError(f"{truths[key].name} and {path.name} have the same name key {key!r}; keep one", gt_dir)
        truths[key] = path
    pairs: dict[str, tuple[Path, Path]] = {}
    orphans: list[Path] = []
    for path in _list_label_files(pred_dir):
        key = pairing_key(path)
        match = key if key in truths else None
        if match is None:
            prefixes = [k for k in truths if any(key.startswith(k + sep) for sep in _PREFIX_SEPARATORS)]
            match = max(prefixes, key=len) if prefixes else None
        if match is None:
            orphans.append(path)
            continue
        if match in pairs:
            raise BadDataError(
                f"{pairs[match][0].name} and {path.name} both pair with {truths[match].name}; keep one prediction",
                pred_dir,
            )
        pairs[match] = (path, truths[match])
    missing = [truths[key] for key in sorted(truths) if key not in pairs]
    ordered = [(key, *pairs[key]) for key in sorted(pairs)]
    return ordered, orphans, missing


@dataclass
class EvaluationReport:
    """Scores of predictions against ground truth over one or more images.

    Attributes
    ----------
    prediction, ground_truth : str
        The paths given (files or folders).
    images : list of dict
        One row per paired image: ``name``, ``prediction``, ``ground_truth``, ``shape``
        and the keys of `score_instances`.
    mean : dict
        Per-image metrics averaged over images (counts summed).
    pooled : dict
        Metrics from counts pooled over all images (see `score_pooled`).
    predictions_without_truth, truth_without_prediction : list of str
        Files in one folder with no partner in the other (reported, not scored).
    """

    prediction: str
    ground_truth: str
    images: list[dict[str, Any]]
    mean: dict[str, Any]
    pooled: dict[str, Any]
    predictions_without_truth: list[str] = field(default_factory=list)
    truth_without_prediction: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, valid against ``evaluation_report.schema.json``."""
        from nuclei_app import __version__

        return {
            "tool": "nuclei-app",
            "version": __version__,
            "prediction": self.prediction,
            "ground_truth": self.ground_truth,
            "matching": {
                "assignment": "hungarian",
                "rule": "iou >= threshold",
                "iou_thresholds": list(IOU_THRESHOLDS),
            },
            "n_images": len(self.images),
            "images": self.images,
            "mean": self.mean,
            "pooled": self.pooled,
            "predictions_without_truth": self.predictions_without_truth,
            "truth_without_prediction": self.truth_without_prediction,
        }


    def write_json(self, path: str | Path) -> Path:
        """Validate against the schema, then write the JSON form atomically."""
        from nuclei_app.atomic import atomic_write_json
        from nuclei_app.schemas import validate_instance

        payload = self.to_dict()
        validate_instance(payload, "evaluation_report", source=path)
        return atomic_write_json(path, payload)

    def table(self) -> Any:
        """A `rich.table.Table`: one row per image, then the mean and the pooled scores."""
        from rich.table import Table

        table = Table(title="instance segmentation accuracy (IoU >= t, Hungarian matching)")
        table.add_column("image")
        for name in ("n_pred", "n_gt"):
            table.add_column(name, justify="right")
        for name in ("precision_50", "recall_50", "f1_50", "ap_50_95", "aji_plus", "pq"):
            table.add_column(name.replace("_50_95", "@.5:.95").replace("_50", "@.5"), justify="right")

        def add(label: str, row: dict[str, Any], style: str | None = None) -> None:
            table.add_row(
                label,
                str(row["n_pred"]),
                str(row["n_gt"]),
                *(f"{row[k]:.3f}" for k in ("precision_50", "recall_50", "f1_50", "ap_50_95", "aji_plus", "pq")),
                style=style,
            )

        for row in self.images:
            add(row["name"], row)
        if len(self.images) > 1:
            add("mean over images", self.mean, "bold")
            add("pooled", self.pooled, "bold")
        return table


def _score_files(name: str, pred_path: Path, gt_path: Path) -> tuple[dict[str, Any], _Tally]:
    from nuclei_app.labels import read_labels

    pred = read_labels(pred_path)
    gt = read_labels(gt_path)
    _check_same_shape(pred, gt, pred_path, gt_path)
    tally = _tally(as_label_image(pred, pred_path), as_label_image(gt, gt_path))
    row = {
        "name": name,
        "prediction": str(pred_path),
        "ground_truth": str(gt_path),
        "shape": [int(n) for n in gt.shape],
        **_scores(tally),
    }
    return row, tally


def evaluate_paths(pred_path: str | Path, gt_path: str | Path) -> EvaluationReport:
    """Score predicted labels against ground truth: two label files, or two folders paired by name.

    Parameters
    ----------
    pred_path, gt_path : path
        Both label stores (label TIFF, plain TIFF mask, OME-Zarr or its label group), or
        both folders of them. In folders, files pair by `pairing_key` (``NAME_masks.tif``
        pairs with ``NAME.tif``, ``NAME_pred.tif``, ``NAME_img.ome.zarr`` or
        ``NAME_anything.tif``); files without a partner are listed in the report.

    Raises
    ------
    MissingInputError
        A path does not exist, or two folders hold no pair at all.
    UsageError
        One path is a folder and the other a single label store.
    BadDataError
        Shapes differ, a label image is not integer-valued, or pairing is ambiguous.
    """
    pred_path, gt_path = Path(pred_path), Path(gt_path)
    for path in (pred_path, gt_path):
        if not path.exists():
            raise MissingInputError("does not exist; give an existing label file or folder", path)
    pred_single, gt_single = _is_label_source(pred_path), _is_label_source(gt_path)
    if pred_single != gt_single:
        raise UsageError(
            f"{pred_path} vs {gt_path}: give two label files or two folders, not one of each"
        )
    if pred_single:
        pairs = [(pairing_key(gt_path), pred_path, gt_path)]
        orphans: list[Path] = []
        missing: list[Path] = []
    else:
        pairs, orphans, missing = pair_label_files(pred_path, gt_path)
        if not pairs:
            raise MissingInputError(
                f"no prediction in {pred_path} pairs with a ground-truth file in {gt_path}; "
                "name them NAME*.tif / NAME*.ome.zarr and NAME_masks.tif"
            )
    rows, tallies = [], []
    for name, pred_file, gt_file in pairs:
        row, tally = _score_files(name, pred_file, gt_file)
        rows.append(row)
        tallies.append(tally)
    pooled = _scores(sum(tallies[1:], tallies[0]))
    return EvaluationReport(
        prediction=str(pred_path),
        ground_truth=str(gt_path),
        images=rows,
        mean=mean_scores(rows),
        pooled=pooled,
        predictions_without_truth=[str(p) for p in orphans],
        truth_without_prediction=[str(p) for p in missing],
    )
