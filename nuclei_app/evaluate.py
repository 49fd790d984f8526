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
from typing import Any
from nuclei_app.errors import BadDataError, MissingInputError, UsageError
from nuclei_app.io.ngff import is_zarr_store
from nuclei_app.core.metrics import IOU_THRESHOLDS, Tally, check_same_shape, scores_from_tally, tally_matches, as_label_image, mean_scores
from nuclei_app.io.labels import read_labels
from nuclei_app import __version__
from nuclei_app.atomic import atomic_write_json
from nuclei_app.schemas import validate_instance


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
        return path.name.lower().endswith(".zarr") or is_zarr_store(path)
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


def _score_files(name: str, pred_path: Path, gt_path: Path) -> tuple[dict[str, Any], Tally]:

    pred = read_labels(pred_path)
    gt = read_labels(gt_path)
    check_same_shape(pred, gt, pred_path, gt_path)
    tally = tally_matches(as_label_image(pred, pred_path), as_label_image(gt, gt_path))
    row = {
        "name": name,
        "prediction": str(pred_path),
        "ground_truth": str(gt_path),
        "shape": [int(n) for n in gt.shape],
        **scores_from_tally(tally),
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
    pooled = scores_from_tally(sum(tallies[1:], tallies[0]))
    return EvaluationReport(
        prediction=str(pred_path),
        ground_truth=str(gt_path),
        images=rows,
        mean=mean_scores(rows),
        pooled=pooled,
        predictions_without_truth=[str(p) for p in orphans],
        truth_without_prediction=[str(p) for p in missing],
    )

