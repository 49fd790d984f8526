"""Self-diagnosis: how far to trust a segmentation, measured without ground truth.

The QC reads the image (nuclear channels, normalised with whole-slide percentiles) and
the label image(s) tile by tile (a grid of ``tile_size_px``; memory is bounded by one
tile plus a halo), and computes per tile and per slide:

- nuclear-stain signal: ``signal_autocorrelation`` (nuclei are smooth blobs, noise is not)
  and the nuclear foreground (the composite above the slide's Otsu threshold);
- ``foreground_coverage`` (foreground inside some nucleus) and ``foreground_precision``
  (nucleus pixels on foreground);
- ``seed_recall``: the share of LoG seeds (one per object of the LoG weak teacher, at the
  object's innermost pixel) that lie inside some nucleus;
- ``teacher_student_f1``: F1 at IoU 0.5 between the weak LoG teacher, run on the same
  tiles, and the segmentation;
- detection scores and head agreement per nucleus (from the per-nucleus table beside the
  labels, or recomputed by running the model's heads on the tiles);
- morphology outliers (area, solidity, eccentricity against the slide's own robust
  distribution: median and MAD), overlap statistics (from the overlap layers), seam
  consistency (straight cuts along the segmentation's tile lines versus lines half a
  tile away), nucleus count and density per mm².

The per-tile QC score (weighted mean of the tile's quality components, formula in the
``qc_report`` schema) ranks tiles by their likely error; tiles below a threshold are
flagged and the worst are drawn as PNG overlays. Each slide gets ``pass | warn | fail``
with machine-readable reasons from the thresholds of `nuclei_app.config.QCThresholds`.
Every metric is documented (definition, unit, range, better direction) in
``schemas/qc_report.schema.json``; the report is validated against it before it is
written, and an invalid report raises `InvalidQCReportError` (a bug, never a file).
"""
from __future__ import annotations

import json
import math
import platform
import time
import warnings
from dataclasses import dataclass
from nuclei_app.provenance import utc_timestamp
from pathlib import Path
from typing import Any, Sequence
import numpy as np
from scipy import ndimage as ndi
from nuclei_app import __version__
from nuclei_app.config import QCThresholds
from nuclei_app.errors import BadDataError, MissingInputError
from nuclei_app.core.intensity import signal_autocorrelation
from nuclei_app.core.intensity import otsu_threshold
from nuclei_app.core.morphology import object_properties
from nuclei_app.io.label_source import find_objects_table, open_label_source
from nuclei_app.qc.metrics import ALL_HEADS_FOUND_IOU, MATCH_IOU, MIN_FOREGROUND_SHARE, QC_SCORE_WEIGHTS, TEACHER_MIN_FOREGROUND, mean_or_none, format_number, score_summary, foreground_coverage, foreground_precision, morphology_outliers, nuclear_foreground, overlapping_ids, seed_points, straight_cut_ids, teacher_agreement, tile_qc_score
from nuclei_app.qc.overlays import overlay_png, overlay_dir_for
from nuclei_app.qc.rules import clean_tile_record, tile_reasons, load_qc_config, qc_status
from nuclei_app.core.intensity import nuclear_composite
from nuclei_app.core.tiling import make_tile_grid
from nuclei_app.core.weak import weak_labels
from nuclei_app.core.metrics import iou_matrix
from nuclei_app.provenance import path_sha256
from nuclei_app.io.slides import channel_percentiles, open_slide
from nuclei_app.core.intensity import normalise_intensities
from nuclei_app.core.channels import select_nuclear_channels
from nuclei_app.segment.record import read_run_record
from nuclei_app.segment.pipeline import resolve_channels
from nuclei_app.core.weak import estimate_nucleus_diameter
from nuclei_app.schemas import schema_errors
from nuclei_app.atomic import atomic_directory, atomic_write_json
from nuclei_app.errors import CannotCreateOutputError
from nuclei_app.io.tables import read_nuclei_table
from nuclei_app.core.tiling import qc_tile_edges


#: File name ending of a per-slide QC report in a BIDS derivative.
QC_SUFFIX = "_desc-nuclei_qc.json"


SCHEMA_VERSION = "1.0"


class InvalidQCReportError(RuntimeError):
    """The QC report does not match its schema: a bug in nuclei-app, never a user error."""


@dataclass
class _ObjectLookup:
    """Per-label values from the nuclei table, looked up by id."""

    labels: np.ndarray
    columns: dict[str, np.ndarray]

    @classmethod
    def from_table(cls, path: Path) -> "_ObjectLookup":

        try:
            columns = read_nuclei_table(path)
        except (OSError, ValueError, IndexError) as error:
            raise BadDataError(f"cannot read the nuclei table ({error}); give the TSV written by segment", path) from None
        if "label" not in columns:
            raise BadDataError("the nuclei table has no 'label' column; give the TSV written by segment", path)
        order = np.argsort(columns["label"], kind="stable")
        return cls(columns["label"][order], {name: values[order] for name, values in columns.items()})

    def get(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Values of column ``name`` for ``ids`` (NaN for ids or columns the table lacks)."""
        ids = np.asarray(ids, dtype=np.int64)
        result = np.full(ids.shape, np.nan)
        if name not in self.columns or self.labels.size == 0:
            return result
        position = np.clip(np.searchsorted(self.labels, ids), 0, self.labels.size - 1)
        found = self.labels[position] == ids
        result[found] = self.columns[name][position[found]].astype(np.float64)
        return result


def _overview(slide: Any, channels: list[int], percentiles: np.ndarray) -> tuple[np.ndarray, int]:
    """Composite of the smallest pyramid level with >= 1 MP (bounded to ~16 MP by sampling windows)."""

    level = 0
    for candidate in range(slide.n_levels - 1, -1, -1):
        _, size_y, size_x = slide.level_shapes[candidate]
        if size_y * size_x >= 1_000_000:
            level = candidate
            break
    _, size_y, size_x = slide.level_shapes[level]
    if size_y * size_x <= 16_000_000:
        return nuclear_composite(slide.read_level(level, channels), percentiles), level
    window, n_side = 1024, 4
    starts_y = np.linspace(0, max(0, size_y - window), n_side).astype(int)
    starts_x = np.linspace(0, max(0, size_x - window), n_side).astype(int)
    rows = [
        np.concatenate(
            [nuclear_composite(slide.read_region(int(y), int(x), window, window, level=level, channels=channels),
                               percentiles) for x in starts_x],
            axis=1,
        )
        for y in starts_y
    ]
    return np.concatenate(rows, axis=0), level


def _diameter_window(slide: Any, overview: np.ndarray, level: int, threshold: float) -> tuple[int, int, int, int]:
    """Level-0 window (y0, x0, h, w) of at most 1024 px around the most nucleus-rich area."""
    _, height, width = slide.shape
    side = 1024
    if height <= 2 * side and width <= 2 * side:
        return 0, 0, height, width
    fy, fx = slide.downsample_factor(level) if overview.shape != (height, width) else (1.0, 1.0)
    density = ndi.uniform_filter((overview > threshold).astype(np.float32), size=max(3, int(side / max(fy, fx))))
    cy, cx = np.unravel_index(int(np.argmax(density)), density.shape)
    y0 = int(np.clip(cy * fy - side / 2, 0, max(0, height - side)))
    x0 = int(np.clip(cx * fx - side / 2, 0, max(0, width - side)))
    return y0, x0, min(side, height), min(side, width)


def _seam_lines(
    shape: tuple[int, int], thresholds: QCThresholds, run_record: dict | None
) -> tuple[dict[str, list[int]] | None, str | None, int | None]:
    """Seam lines of the segmentation's tile grid (rows, cols) and control lines half a stride away."""
    height, width = shape
    if thresholds.seam_stride_px > 0:
        stride = thresholds.seam_stride_px
        rows = list(range(stride, height, stride))
        cols = list(range(stride, width, stride))
        source = "config"
    else:
        parameters = (run_record or {}).get("parameters") or {}
        if not isinstance(parameters.get("tile"), int) or not isinstance(parameters.get("overlap"), int):
            return None, None, None

        grid = make_tile_grid((height, width), parameters["tile"], parameters["overlap"])
        rows, cols, stride = list(grid.row_edges[1:-1]), list(grid.col_edges[1:-1]), grid.stride
        source = "run_record"
    half = max(1, stride // 2)
    return (
        {
            "seam_rows": rows,
            "seam_cols": cols,
            "control_rows": [r - half for r in rows if r - half >= 1],
            "control_cols": [c - half for c in cols if c - half >= 1],
        },
        source,
        stride,
    )


def _lines_in(lines: list[int], start: int, stop: int) -> list[int]:
    """Line positions p with start < p < stop (both neighbouring pixels inside the region)."""
    return [p - start for p in lines if start < p < stop]


@dataclass
class QCResult:
    """What `write_qc_report` wrote.

    Attributes
    ----------
    report : dict
        The schema-valid report (also written to ``path``).
    path : Path
        The QC JSON.
    overlay_dir : Path or None
        Folder of the overlay PNGs (None when no tile was drawn).
    """

    report: dict[str, Any]
    path: Path
    overlay_dir: Path | None

    @property
    def status(self) -> str:
        return self.report["status"]


def teacher_labels(
    raw: np.ndarray,
    foreground: np.ndarray,
    diameter: float,
    percentiles: np.ndarray,
    pixel_size_um: tuple[float, float] | None = None,
) -> np.ndarray:
    """The weak LoG teacher's objects on a tile, keeping those that lie on the slide's foreground.

    The weak labeler thresholds each tile anew, so on a tile without nuclei it would split
    noise; objects with less than `TEACHER_MIN_FOREGROUND` of their pixels on the slide-level
    foreground are dropped.

    Parameters
    ----------
    raw : ndarray, shape (C, H, W)
        Nuclear channels of the tile (raw intensities).
    foreground : ndarray of bool, shape (H, W)
        The slide-level nuclear foreground of the tile (`nuclear_foreground`).
    diameter : float
        Nucleus diameter (pixels) estimated for the slide.
    percentiles : ndarray, shape (C, 2)
        Whole-slide normalisation.
    pixel_size_um : (float, float), optional

    Returns
    -------
    ndarray of uint32, shape (H, W)
    """

    teacher = weak_labels(raw, "log", pixel_size_um=pixel_size_um, diameter=diameter, percentiles=percentiles).labels
    if not teacher.any():
        return teacher
    ids = np.arange(1, int(teacher.max()) + 1)
    on_foreground = np.asarray(ndi.mean(foreground, teacher, ids))
    dropped = ids[~(on_foreground >= TEACHER_MIN_FOREGROUND)]
    return np.where(np.isin(teacher, dropped), 0, teacher).astype(np.uint32) if dropped.size else teacher


def rescore_with_model(labels: np.ndarray, ids: np.ndarray, predicted: Any) -> tuple[np.ndarray, np.ndarray]:
    """Score and head agreement of each segmented nucleus from a model's prediction of the same tile.

    A nucleus takes the score and head agreement of the predicted object it overlaps most,
    when their IoU is at least `MATCH_IOU`; otherwise its score is 0 (the model does not
    confirm it) and its head agreement is NaN (no heads to compare).

    Parameters
    ----------
    labels : ndarray of int, shape (H, W)
        Segmentation (flattened view) of the tile.
    ids : ndarray of int, shape (n,)
        The nuclei to score.
    predicted : nuclei_app.instances.Instances
        The model's prediction over the same tile.

    Returns
    -------
    scores, agreements : ndarray of float64, shape (n,)
    """

    scores = np.zeros(len(ids))
    agreements = np.full(len(ids), np.nan)
    if len(ids) == 0 or len(predicted) == 0:
        return scores, agreements
    iou, seg_ids, pred_ids = iou_matrix(labels, predicted.to_label_image())
    if iou.size == 0:
        return scores, agreements
    best = np.argmax(iou, axis=1)
    matched = iou[np.arange(len(seg_ids)), best] >= MATCH_IOU
    position = {int(v): i for i, v in enumerate(seg_ids)}
    for row, object_id in enumerate(ids):
        i = position.get(int(object_id))
        if i is None or not matched[i]:
            continue
        j = int(pred_ids[best[i]]) - 1  # predicted ids are 1..N in instance order
        scores[row] = float(predicted.scores[j])
        agreements[row] = float(predicted.head_agreement[j])
    return scores, agreements


def _cut_flags(
    sources: list[np.ndarray], ids: np.ndarray, seams: dict[str, list[int]] | None, kind: str,
    region: tuple[int, int, int, int], min_run: int,
) -> np.ndarray:
    """Which of ``ids`` run straight along a ``kind`` ("seam" or "control") line inside ``region``."""
    flags = np.zeros(len(ids), dtype=bool)
    if seams is None:
        return flags
    y0, x0, y1, x1 = region
    cut: list[np.ndarray] = []
    for labels in sources:
        cut += [straight_cut_ids(labels, 0, p, min_run) for p in _lines_in(seams[f"{kind}_rows"], y0, y1)]
        cut += [straight_cut_ids(labels, 1, p, min_run) for p in _lines_in(seams[f"{kind}_cols"], x0, x1)]
    return np.isin(ids, np.concatenate(cut)) if cut else flags


def compute_qc(
    labels_path: str | Path,
    image_path: str | Path,
    *,
    model_dir: str | Path | None = None,
    thresholds: QCThresholds | None = None,
    table_path: str | Path | None = None,
    nuclear_channels: str | Sequence[str] | None = None,
    overlay_prefix: str = "overlays",
    device: str = "cpu",
    score_threshold: float | None = None,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """QC of a segmentation of one slide, without ground truth.

    Parameters
    ----------
    labels_path : path
        Label TIFF or OME-Zarr segmentation (``OUT.ome.zarr``: flattened view + layers).
    image_path : path
        The slide the labels were made from (OME-TIFF, TIFF, OME-Zarr).
    model_dir : path, optional
        Model folder: its heads are run on every tile to recompute per-nucleus scores and
        head agreement (otherwise they come from the nuclei table, when one is found).
    thresholds : QCThresholds, optional
        Grid, outlier rule and status thresholds (defaults when absent).
    table_path : path, optional
        Per-nucleus TSV (default: found beside the labels, see `find_objects_table`).
    nuclear_channels : str or sequence of str, optional
        Channel names (default: the model's channels, or every recognised nuclear stain).
    overlay_prefix : str
        Relative folder written into the report for overlay PNG paths.
    score_threshold : float, optional
        The model's score cut-off the labels were made with (default: its card's).
    device : str
        Device for the model (``cpu``, ``cuda``, ``auto``).

    Returns
    -------
    report : dict
        Valid against the ``qc_report`` schema (not yet validated here).
    overlays : dict of str to bytes
        PNG files by file name, for the flagged tiles drawn.

    Raises
    ------
    MissingInputError, BadDataError, UsageError
        Missing inputs, labels of another shape than the image, non-integer labels.
    """
    from nuclei_app.model.device import resolve_device

    thresholds = thresholds or QCThresholds()
    started = time.monotonic()
    timings: dict[str, float] = {}
    labels_path, image_path = Path(labels_path), Path(image_path)
    if not image_path.exists():
        raise MissingInputError("image not found; give the slide the labels were made from", image_path)
    source = open_label_source(labels_path)
    run_record = read_run_record(source.store) if source.store is not None else None
    table_file = Path(table_path) if table_path is not None else find_objects_table(labels_path, run_record)
    if table_path is not None and not table_file.is_file():
        raise MissingInputError("nuclei table not found; give the TSV written by segment", table_file)
    lookup = _ObjectLookup.from_table(table_file) if (table_file is not None and model_dir is None) else None

    with open_slide(image_path) as slide:
        _, height, width = slide.shape
        if (height, width) != tuple(source.shape):
            raise BadDataError(
                f"labels shape {tuple(source.shape)} differs from image shape {(height, width)} (Y, X); "
                "give the labels made from this image",
                labels_path,
            )
        predictor = None
        model_card = None
        if model_dir is not None:
            from nuclei_app.model.predictor import load_predictor

            predictor = load_predictor(model_dir, device=resolve_device(device), pixel_size_um=slide.pixel_size_um,
                                       score_threshold=score_threshold)
            model_card = predictor.card
            channels = resolve_channels(slide, predictor, nuclear_channels)
        else:
            channels = select_nuclear_channels(slide.channel_names, nuclear_channels, image_path)
        percentiles = channel_percentiles(slide, channels)
        overview, overview_level = _overview(slide, channels, percentiles)
        threshold = otsu_threshold(overview)
        # Outlines of nuclei fade into the background: nucleus pixels count as on the stain
        # down to half-way between the background level and Otsu's threshold.
        below = overview[overview <= threshold] if np.isfinite(threshold) else overview
        background_level = float(np.median(below)) if below.size else 0.0
        precision_threshold = 0.5 * (background_level + threshold) if np.isfinite(threshold) else threshold
        wy0, wx0, wh, ww = _diameter_window(slide, overview, overview_level, threshold)
        diameter = float(estimate_nucleus_diameter(
            nuclear_composite(slide.read_region(wy0, wx0, wh, ww, channels=channels), percentiles),
            slide.pixel_size_um,
        ))
        halo = int(np.clip(math.ceil(2.0 * diameter), 16, 128))
        min_run = max(5, int(round(0.6 * diameter)))
        seams, seam_source, seam_stride = _seam_lines((height, width), thresholds, run_record)
        pixel_size = slide.pixel_size_um
        timings["prepare_seconds"] = time.monotonic() - started

        row_edges = qc_tile_edges(height, thresholds.tile_size_px)
        col_edges = qc_tile_edges(width, thresholds.tile_size_px)
        boxes = [
            (y0, x0, y1, x1)
            for y0, y1 in zip(row_edges[:-1], row_edges[1:])
            for x0, x1 in zip(col_edges[:-1], col_edges[1:])
        ]
        tiles: list[dict[str, Any]] = []
        objects: dict[str, list[np.ndarray]] = {
            name: [] for name in ("tile", "area", "solidity", "eccentricity", "score", "agreement", "overlap",
                                  "seam_cut", "control_cut", "at_border")
        }
        pooled = {"fg": 0, "fg_covered": 0, "nuclei_px": 0, "nuclei_on_fg": 0, "seeds": 0, "seeds_in": 0,
                  "tp": 0, "fp": 0, "fn": 0, "teacher": 0, "pixels": 0, "autocorr": 0.0, "autocorr_px": 0}
        n_empty = 0
        read_s = teacher_s = model_s = metric_s = 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # weak labels on empty tiles warn
            for index, (y0, x0, y1, x1) in enumerate(boxes):
                clock = time.monotonic()
                hy0, hx0, hy1, hx1 = max(0, y0 - halo), max(0, x0 - halo), min(height, y1 + halo), min(width, x1 + halo)
                raw = slide.read_region(hy0, hx0, hy1 - hy0, hx1 - hx0, channels=channels)
                flat = source.read(source.flat, hy0, hx0, hy1, hx1)
                layers = [source.read(layer, hy0, hx0, hy1, hx1) for layer in source.layers]
                read_s += time.monotonic() - clock
                clock = time.monotonic()
                composite = nuclear_composite(raw, percentiles)
                core = (slice(y0 - hy0, y1 - hy0), slice(x0 - hx0, x1 - hx0))
                foreground = nuclear_foreground(composite, threshold)
                stained = nuclear_foreground(composite, precision_threshold)[core]
                core_fg, core_flat = foreground[core], flat[core]
                nuclei = flat != 0
                fg_share = float(core_fg.mean())
                if not core_flat.any() and fg_share < MIN_FOREGROUND_SHARE:
                    n_empty += 1
                    metric_s += time.monotonic() - clock
                    continue
                autocorr = signal_autocorrelation(composite[core])
                metric_s += time.monotonic() - clock

                clock = time.monotonic()
                teacher = teacher_labels(raw, foreground, diameter, percentiles, pixel_size)
                teacher_s += time.monotonic() - clock

                clock = time.monotonic()
                agreement_scores = teacher_agreement(core_flat, teacher[core])
                seeds = seed_points(teacher)
                in_core = (
                    (seeds[:, 0] >= core[0].start) & (seeds[:, 0] < core[0].stop)
                    & (seeds[:, 1] >= core[1].start) & (seeds[:, 1] < core[1].stop)
                )
                seeds = seeds[in_core]
                # Objects: from the overlap layers (full masks) when present, else the flat view.
                sources = layers if layers else [flat]
                props = [object_properties(layer) for layer in sources]
                merged = {name: np.concatenate([p[name] for p in props]) for name in props[0]}
                keep = (
                    (merged["centroid_y"] + hy0 >= y0) & (merged["centroid_y"] + hy0 < y1)
                    & (merged["centroid_x"] + hx0 >= x0) & (merged["centroid_x"] + hx0 < x1)
                )
                ids = merged["label"][keep]
                n_objects = int(ids.size)
                # Nuclei cut by the slide's own border are not judged for shape.
                at_border = (
                    (merged["bbox_y0"][keep] + hy0 <= 0) | (merged["bbox_x0"][keep] + hx0 <= 0)
                    | (merged["bbox_y1"][keep] + hy0 >= height) | (merged["bbox_x1"][keep] + hx0 >= width)
                )
                overlap = np.full(n_objects, np.nan)
                if layers:
                    overlap = np.isin(ids, overlapping_ids(layers)).astype(np.float64)
                elif lookup is not None:
                    neighbours = lookup.get("n_overlapping_neighbours", ids)
                    overlap = np.where(np.isfinite(neighbours), (neighbours > 0).astype(np.float64), np.nan)
                seam_cut = _cut_flags(sources, ids, seams, "seam", (hy0, hx0, hy1, hx1), min_run)
                control_cut = _cut_flags(sources, ids, seams, "control", (hy0, hx0, hy1, hx1), min_run)
                metric_s += time.monotonic() - clock

                clock = time.monotonic()
                scores = np.full(n_objects, np.nan)
                agreements = np.full(n_objects, np.nan)
                if predictor is not None:
                    predicted = predictor.predict_batch([normalise_intensities(raw, percentiles)])[0]
                    scores, agreements = rescore_with_model(flat, ids, predicted)
                elif lookup is not None:
                    scores = lookup.get("score", ids)
                    agreements = lookup.get("head_agreement", ids)
                model_s += time.monotonic() - clock

                for name, values in (
                    ("tile", np.full(n_objects, len(tiles))), ("area", merged["area"][keep]),
                    ("solidity", merged["solidity"][keep]), ("eccentricity", merged["eccentricity"][keep]),
                    ("score", scores), ("agreement", agreements), ("overlap", overlap),
                    ("seam_cut", seam_cut), ("control_cut", control_cut), ("at_border", at_border),
                ):
                    objects[name].append(np.asarray(values))

                core_nuclei = nuclei[core]
                n_fg = int(core_fg.sum())
                n_px = int(core_nuclei.sum())
                seeds_inside = int(nuclei[seeds[:, 0], seeds[:, 1]].sum()) if len(seeds) else 0
                pooled["fg"] += n_fg
                pooled["fg_covered"] += int((core_fg & core_nuclei).sum())
                pooled["nuclei_px"] += n_px
                pooled["nuclei_on_fg"] += int((stained & core_nuclei).sum())
                pooled["seeds"] += len(seeds)
                pooled["seeds_in"] += seeds_inside
                pooled["tp"] += agreement_scores["tp_50"]
                pooled["fp"] += agreement_scores["fp_50"]
                pooled["fn"] += agreement_scores["fn_50"]
                pooled["teacher"] += agreement_scores["n_gt"]
                pooled["pixels"] += core_fg.size
                if autocorr is not None:
                    pooled["autocorr"] += autocorr * core_fg.size
                    pooled["autocorr_px"] += core_fg.size
                area_mm2 = None
                if pixel_size is not None:
                    area_mm2 = (y1 - y0) * (x1 - x0) * pixel_size[0] * pixel_size[1] / 1e6
                tiles.append({
                    "index": index,
                    "y0": y0, "x0": x0, "height": y1 - y0, "width": x1 - x0,
                    "y0_um": None if pixel_size is None else y0 * pixel_size[0],
                    "x0_um": None if pixel_size is None else x0 * pixel_size[1],
                    "height_um": None if pixel_size is None else (y1 - y0) * pixel_size[0],
                    "width_um": None if pixel_size is None else (x1 - x0) * pixel_size[1],
                    "n_nuclei": n_objects,
                    "density_per_mm2": None if area_mm2 is None else n_objects / area_mm2,
                    "foreground_share": fg_share,
                    "foreground_coverage": foreground_coverage(core_nuclei, core_fg),
                    "foreground_precision": foreground_precision(core_nuclei, stained),
                    "n_seeds": int(len(seeds)),
                    "seed_recall": None if len(seeds) == 0 else seeds_inside / len(seeds),
                    "teacher_nuclei": int(agreement_scores["n_gt"]),
                    "teacher_student_f1": float(agreement_scores["f1_50"]),
                    "signal_autocorrelation": autocorr,
                })

    clock = time.monotonic()
    merged_objects = {
        name: (np.concatenate(values) if values else np.zeros(0)) for name, values in objects.items()
    }
    tile_of = merged_objects["tile"].astype(np.int64)
    n_nuclei = int(tile_of.size)
    morphology: dict[str, Any] = {"reference": None}
    outlier_flags: dict[str, np.ndarray] | None = None
    interior = ~merged_objects["at_border"].astype(bool)
    if int(interior.sum()) >= thresholds.min_nuclei_for_statistics:
        judged = {name: np.where(interior, merged_objects[name], np.nan) for name in ("area", "solidity", "eccentricity")}
        outlier_flags, reference = morphology_outliers(
            judged["area"], judged["solidity"], judged["eccentricity"], thresholds.morphology_k
        )
        morphology["reference"] = reference

    n_per_tile = np.bincount(tile_of, minlength=len(tiles)) if len(tiles) else np.zeros(0, int)
    for t, record in enumerate(tiles):
        select = tile_of == t
        count = int(n_per_tile[t])
        record.update(score_summary(merged_objects["score"][select]))
        agreement_values = merged_objects["agreement"][select]
        record["head_agreement_mean"] = mean_or_none(agreement_values)
        finite = agreement_values[np.isfinite(agreement_values)]
        record["head_all_found_share"] = float(np.mean(finite >= ALL_HEADS_FOUND_IOU)) if finite.size else None
        judged_here = select & interior
        record["morphology_outlier_share"] = (
            float(outlier_flags["any"][judged_here].mean()) if outlier_flags is not None and judged_here.any() else None
        )
        overlap_values = merged_objects["overlap"][select]
        finite_overlap = overlap_values[np.isfinite(overlap_values)]
        record["overlap_share"] = float(finite_overlap.mean()) if finite_overlap.size else None
        record["seam_cut_share"] = (
            float(merged_objects["seam_cut"][select].astype(bool).mean()) if seams is not None and count else None
        )
        components = {
            "teacher_student_f1": record["teacher_student_f1"],
            "seed_recall": record["seed_recall"],
            "foreground_coverage": record["foreground_coverage"],
            "foreground_precision": record["foreground_precision"],
            "score_mean": record["score_mean"],
            "head_agreement_mean": record["head_agreement_mean"],
            "morphology_regular_share": (
                None if record["morphology_outlier_share"] is None else 1.0 - record["morphology_outlier_share"]
            ),
        }
        record["qc_score"] = tile_qc_score(components)
        record["flagged"] = record["qc_score"] is not None and record["qc_score"] < thresholds.flag_tile_score_below
        record["flag_reasons"] = tile_reasons(record, thresholds) if record["flagged"] else []

    qc_scores = np.asarray([t["qc_score"] for t in tiles if t["qc_score"] is not None], dtype=np.float64)
    n_flagged = sum(1 for t in tiles if t["flagged"])
    analysed_mm2 = None
    if pixel_size is not None:
        analysed_mm2 = sum(t["height"] * t["width"] for t in tiles) * pixel_size[0] * pixel_size[1] / 1e6
    seam_cut = merged_objects["seam_cut"].astype(bool)
    control_cut = merged_objects["control_cut"].astype(bool)
    overlap_all = merged_objects["overlap"]
    overlap_finite = overlap_all[np.isfinite(overlap_all)]
    agreement_all = merged_objects["agreement"]
    agreement_finite = agreement_all[np.isfinite(agreement_all)]
    teacher_denominator = 2 * pooled["tp"] + pooled["fp"] + pooled["fn"]
    slide_metrics: dict[str, Any] = {
        "n_tiles": len(boxes),
        "n_tiles_analysed": len(tiles),
        "n_tiles_empty": n_empty,
        "n_nuclei": n_nuclei,
        "density_per_mm2": None if not analysed_mm2 else n_nuclei / analysed_mm2,
        "foreground_share": pooled["fg"] / pooled["pixels"] if pooled["pixels"] else 0.0,
        "foreground_coverage": pooled["fg_covered"] / pooled["fg"] if pooled["fg"] else None,
        "foreground_precision": pooled["nuclei_on_fg"] / pooled["nuclei_px"] if pooled["nuclei_px"] else None,
        "n_seeds": pooled["seeds"],
        "seed_recall": pooled["seeds_in"] / pooled["seeds"] if pooled["seeds"] else None,
        **score_summary(merged_objects["score"]),
        "head_agreement_mean": float(agreement_finite.mean()) if agreement_finite.size else None,
        "head_all_found_share": float(np.mean(agreement_finite >= ALL_HEADS_FOUND_IOU)) if agreement_finite.size else None,
        "teacher_nuclei": pooled["teacher"],
        "teacher_student_f1": (
            2 * pooled["tp"] / teacher_denominator if teacher_denominator else (1.0 if len(tiles) else None)
        ),
        "area_outlier_share": None if outlier_flags is None else float(outlier_flags["area"][interior].mean()),
        "solidity_outlier_share": None if outlier_flags is None else float(outlier_flags["solidity"][interior].mean()),
        "eccentricity_outlier_share": None if outlier_flags is None else float(outlier_flags["eccentricity"][interior].mean()),
        "morphology_outlier_share": None if outlier_flags is None else float(outlier_flags["any"][interior].mean()),
        "median_area_px": float(np.median(merged_objects["area"])) if n_nuclei else None,
        "median_area_um2": (
            float(np.median(merged_objects["area"])) * pixel_size[0] * pixel_size[1]
            if n_nuclei and pixel_size is not None else None
        ),
        "median_solidity": float(np.median(merged_objects["solidity"])) if n_nuclei else None,
        "median_eccentricity": float(np.median(merged_objects["eccentricity"])) if n_nuclei else None,
        "overlap_share": float(overlap_finite.mean()) if overlap_finite.size else None,
        "n_layers": len(source.layers) if source.layers else None,
        "seam_cut_share": float(seam_cut.mean()) if seams is not None and n_nuclei else None,
        "control_cut_share": float(control_cut.mean()) if seams is not None and n_nuclei else None,
        "seam_excess": float(seam_cut.mean() - control_cut.mean()) if seams is not None and n_nuclei else None,
        "signal_autocorrelation": pooled["autocorr"] / pooled["autocorr_px"] if pooled["autocorr_px"] else None,
        "qc_score_mean": float(qc_scores.mean()) if qc_scores.size else None,
        "qc_score_p10": float(np.percentile(qc_scores, 10)) if qc_scores.size else None,
        "n_flagged_tiles": n_flagged,
        "flagged_tile_share": n_flagged / len(tiles) if tiles else None,
    }
    slide_metrics = {key: format_number(value) for key, value in slide_metrics.items()}
    status, reasons = qc_status(slide_metrics, thresholds)
    timings["metrics_seconds"] = time.monotonic() - clock + metric_s

    # Ranked flagged tiles (worst first) and overlays of the worst ones.
    clock = time.monotonic()
    flagged = sorted((t for t in tiles if t["flagged"]), key=lambda t: (t["qc_score"], t["index"]))
    flagged = flagged[: thresholds.max_flagged_tiles]
    overlays: dict[str, bytes] = {}
    flagged_entries = []
    if flagged and thresholds.max_overlays:

        with open_slide(image_path) as slide:
            for tile_record in flagged[: thresholds.max_overlays]:
                y0, x0, h, w = tile_record["y0"], tile_record["x0"], tile_record["height"], tile_record["width"]
                composite = nuclear_composite(slide.read_region(y0, x0, h, w, channels=channels), percentiles)
                labels = source.read(source.flat, y0, x0, y0 + h, x0 + w)
                overlays[f"tile-{y0}-{x0}.png"] = overlay_png(composite, labels)
    for rank, tile_record in enumerate(flagged, start=1):
        name = f"tile-{tile_record['y0']}-{tile_record['x0']}.png"
        flagged_entries.append({
            "rank": rank,
            "tile_index": tile_record["index"],
            "y0": tile_record["y0"], "x0": tile_record["x0"],
            "height": tile_record["height"], "width": tile_record["width"],
            "y0_um": tile_record["y0_um"], "x0_um": tile_record["x0_um"],
            "qc_score": tile_record["qc_score"],
            "reasons": tile_record["flag_reasons"],
            "overlay": f"{overlay_prefix}/{name}" if name in overlays else None,
        })
    timings["overlay_seconds"] = time.monotonic() - clock
    timings["read_seconds"] = read_s
    timings["teacher_seconds"] = teacher_s
    timings["model_seconds"] = model_s

    clock = time.monotonic()
    model_info = None
    if model_card is not None:
        model_info = {"model_id": model_card.get("model_id"), "path": str(Path(model_dir).resolve()),
                      "sha256": path_sha256(model_dir), "source": "model"}
    elif run_record:
        for entry in run_record.get("inputs", [])[1:]:
            card_path = Path(entry.get("path", "")) / "model_card.json"
            model_id = None
            if card_path.is_file():
                try:
                    model_id = json.loads(card_path.read_text(encoding="utf-8")).get("model_id")
                except (OSError, ValueError):
                    model_id = None
            model_info = {"model_id": model_id, "path": entry.get("path"), "sha256": entry.get("sha256"),
                          "source": "run_record"}
            break
    provenance = {
        "image": {"path": str(image_path.resolve()), "sha256": path_sha256(image_path)},
        "labels": {"path": str(labels_path.resolve()), "sha256": path_sha256(labels_path)},
        "table": None if lookup is None else {"path": str(table_file.resolve()), "sha256": path_sha256(table_file)},
        "model": model_info,
        "segmentation": None if run_record is None else {
            "command": run_record.get("command"),
            "version": run_record.get("version"),
            "predictor": (run_record.get("parameters") or {}).get("predictor"),
        },
        "software": {
            "name": "nuclei-app",
            "version": __version__,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scikit-image": __import__("skimage").__version__,
        },
        "created_at": utc_timestamp(),
        "parameters": {
            "thresholds": thresholds.to_dict(),
            "qc_score_weights": dict(QC_SCORE_WEIGHTS),
            "nuclear_channels": [slide.channel_names[i] for i in channels],
            "percentiles": [[format_number(v) for v in row] for row in np.asarray(percentiles, dtype=float)],
            "foreground_threshold": format_number(threshold),
            "stained_threshold": format_number(precision_threshold),
            "nucleus_diameter_px": format_number(diameter),
            "halo_px": halo,
            "teacher": "log",
            "scores_from": "model" if predictor is not None else ("table" if lookup is not None else None),
            "seam_lines_from": seam_source,
            "seam_stride_px": seam_stride,
            "seam_min_run_px": min_run,
            "morphology_reference": (
                None if morphology["reference"] is None
                else {key: format_number(value) for key, value in morphology["reference"].items()}
            ),
        },
    }
    timings["provenance_seconds"] = time.monotonic() - clock
    timings["total_seconds"] = time.monotonic() - started
    report = {
        "schema_version": SCHEMA_VERSION,
        "status": status,
        "reasons": reasons,
        "image": {
            "shape_yx": [height, width],
            "pixel_size_um": None if pixel_size is None else [float(pixel_size[0]), float(pixel_size[1])],
            "tile_size_px": thresholds.tile_size_px,
        },
        "slide": slide_metrics,
        "tiles": [clean_tile_record(t) for t in tiles],
        "flagged_tiles": [clean_tile_record(entry) for entry in flagged_entries],
        "provenance": provenance,
        "timings": {key: round(value, 3) for key, value in timings.items()},
    }
    return report, overlays


def validate_qc_report(report: dict[str, Any]) -> None:
    """Raise `InvalidQCReportError` listing every way ``report`` breaks the ``qc_report`` schema."""

    problems = schema_errors(report, "qc_report")
    if problems:
        raise InvalidQCReportError(
            f"nuclei-app built a QC report that breaks its schema (a bug; please report it): {'; '.join(problems[:5])}"
        )


def write_qc_report(
    labels_path: str | Path,
    image_path: str | Path,
    output_path: str | Path,
    *,
    model_dir: str | Path | None = None,
    thresholds: QCThresholds | None = None,
    config_path: str | Path | None = None,
    table_path: str | Path | None = None,
    nuclear_channels: str | Sequence[str] | None = None,
    device: str = "cpu",
    score_threshold: float | None = None,
) -> QCResult:
    """Compute the QC of a segmentation and write the schema-valid JSON (+ overlay PNGs).

    The overlays of flagged tiles go to the folder named like the report without ``.json``
    (``<name>_desc-nuclei_qc/tile-<y0>-<x0>.png``), referenced from the report by relative
    path. The folder is written first and the JSON last, both atomically.

    Parameters
    ----------
    labels_path, image_path : path
        Segmentation (label TIFF or OME-Zarr) and the slide it was made from.
    output_path : path
        The QC JSON to write (e.g. ``<entities>_desc-nuclei_qc.json``).
    model_dir : path, optional
        Recompute scores and head agreement with this model's heads.
    thresholds : QCThresholds, optional
        Thresholds; overrides ``config_path``.
    config_path : path, optional
        QC config file (JSON/TOML, schema ``qc_config``).
    table_path : path, optional
        Per-nucleus TSV (default: found beside the labels).
    nuclear_channels : str or sequence of str, optional
    device : str
    score_threshold : float, optional
        The model's score cut-off the labels were made with (default: its card's).

    Returns
    -------
    QCResult

    Raises
    ------
    MissingInputError (66), BadDataError (65), UsageError (64), CannotCreateOutputError (73)
    InvalidQCReportError
        The report breaks its schema (a bug: nothing is written).
    """

    output_path = Path(output_path)
    if output_path.is_dir():
        raise CannotCreateOutputError("is a folder; give the QC JSON file path (e.g. QC.json)", output_path)
    if thresholds is None:
        thresholds = load_qc_config(config_path)
    overlay_dir = overlay_dir_for(output_path)
    report, overlays = compute_qc(
        labels_path, image_path, model_dir=model_dir, thresholds=thresholds, table_path=table_path,
        nuclear_channels=nuclear_channels, overlay_prefix=overlay_dir.name, device=device,
        score_threshold=score_threshold,
    )
    validate_qc_report(report)
    written_dir = None
    if overlays:
        with atomic_directory(overlay_dir) as temporary:
            for name, data in overlays.items():
                (temporary / name).write_bytes(data)
        written_dir = overlay_dir
    elif overlay_dir.is_dir():  # overlays of an earlier run that no longer apply
        import shutil

        shutil.rmtree(overlay_dir, ignore_errors=True)
    atomic_write_json(output_path, report)
    return QCResult(report, output_path, written_dir)
