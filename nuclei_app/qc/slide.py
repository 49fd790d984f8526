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
  tiles, and the segmentation. The teacher costs about as much as the segmentation, so it
  runs on a stratified, seeded sample of the analysed tiles (`nuclei_app.qc.sampling`: at
  least ``teacher_tiles_min`` = 16 tiles or ``teacher_tiles_share`` = 10 % of them, one per
  stratum of the tiles sorted by their provisional QC score; the tiles are listed in
  ``provenance.parameters.teacher_sample``). Tiles outside the sample have these two fields
  (and ``n_seeds``, ``teacher_nuclei``) null and ``teacher_sampled`` false; their QC score
  takes the slide's values of the two (pooled over the sample) for those components, so it
  has the same weights as a sampled tile's; the slide's values pool the sample;
- detection scores and head agreement per nucleus: those the segmentation computed, read
  from the scores sidecar inside its store (``nuclei-app_scores.tsv``, written by every
  ``segment``) or from a per-nucleus table; recomputed by running the model's heads on every
  tile only when a model is given to ``qc`` (``--model``), e.g. for a store written before
  the sidecar existed. ``segment`` therefore never runs the model twice;
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
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import skimage
from scipy import ndimage as ndi

from nuclei_app import __version__
from nuclei_app.atomic import atomic_directory, atomic_write_json
from nuclei_app.config import QCThresholds
from nuclei_app.core.channels import select_nuclear_channels
from nuclei_app.core.intensity import nuclear_composite, normalise_intensities, otsu_threshold, signal_autocorrelation
from nuclei_app.core.metrics import iou_matrix
from nuclei_app.core.morphology import object_properties
from nuclei_app.core.noise import NOISE_CROP_SIDE, NOISE_CROPS, NOISE_COMPONENTS, crop_origins, noise_threshold_of_sample
from nuclei_app.core.tiling import make_tile_grid, qc_tile_edges
from nuclei_app.core.weak import weak_labels
from nuclei_app.errors import BadDataError, CannotCreateOutputError, MissingInputError
from nuclei_app.io.label_source import LabelSource, find_objects_table, find_segmentation_scores, open_label_source
from nuclei_app.io.slides import channel_percentiles, measure_nucleus_diameter, open_slide
from nuclei_app.io.tables import read_nuclei_table
from nuclei_app.provenance import path_sha256, utc_timestamp
from nuclei_app.qc.metrics import (
    MATCH_IOU, MIN_FOREGROUND_SHARE, OBJECT_COLUMNS, POOLED_COUNTS, QC_SCORE_WEIGHTS, SLIDE_METRICS, TEACHER_MIN_FOREGROUND,
    centred_in, foreground_coverage, foreground_precision, format_number, judge_morphology, merge_properties,
    nuclear_foreground, object_metrics, object_summary, overlapping_ids, pooled_pixel_metrics, quality_components,
    seed_points, stained_threshold, straight_cut_ids, teacher_agreement, tile_counts, tile_qc_score,
    tile_score_metrics, touching_border,
)
from nuclei_app.qc.overlays import overlay_dir_for, overlay_png
from nuclei_app.qc.rules import clean_tile_record, load_qc_config, qc_status, tile_reasons
from nuclei_app.qc.signal_coverage import (
    CLUMP_EROSION_RADIUS, COVERAGE_DILATIONS, SignalCoverageTotals, above_noise_signal, clump_links, seed_paper_slide_metrics,
    seed_paper_tile_clumps, signal_coverage_fields, signal_coverage_sums,
)
from nuclei_app.qc.thumbnail import RED_BELOW_FLAG, SCORE_ALPHA, ThumbnailCanvas, score_thumbnail_png
from nuclei_app.qc.sampling import stratified_sample, teacher_sample_size
from nuclei_app.schemas import schema_errors
from nuclei_app.seeding import seed_sequence
from nuclei_app.segment.pipeline import resolve_channels
from nuclei_app.segment.record import read_run_record


#: File name ending of a per-slide QC report in a BIDS derivative.
QC_SUFFIX = "_desc-nuclei_qc.json"


SCHEMA_VERSION = "1.0"


#: Stages whose wall-clock seconds the report's ``timings`` lists (then ``total_seconds``).
TIMED_STAGES: tuple[str, ...] = ("prepare", "metrics", "overlay", "read", "teacher", "model", "provenance")


class InvalidQCReportError(RuntimeError):
    """The QC report does not match its schema: a bug in nuclei-app, never a user error."""


class Stopwatch:
    """Wall-clock seconds per named stage, summed over every time the stage runs."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Add the time spent in the ``with`` block to stage ``name``."""
        clock = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - clock

    def timings(self) -> dict[str, float]:
        """``<stage>_seconds`` of every `TIMED_STAGES` (0 when it did not run) and ``total_seconds``, rounded to ms."""
        timings = {f"{name}_seconds": self.seconds.get(name, 0.0) for name in TIMED_STAGES}
        timings["total_seconds"] = time.monotonic() - self.started
        return {key: round(value, 3) for key, value in timings.items()}


# ------------------------------------------------------------------------- inputs


@dataclass
class _ObjectLookup:
    """Per-label values from the nuclei table, looked up by id.

    Attributes
    ----------
    labels : ndarray of int64, shape (n,)
        The table's label ids, sorted.
    columns : dict of ndarray, each shape (n,)
        Every column of the table, in the order of ``labels``.
    """

    labels: np.ndarray
    columns: dict[str, np.ndarray]

    @classmethod
    def from_table(cls, path: Path) -> "_ObjectLookup":
        """Read the per-nucleus TSV written by segment (`BadDataError` when unreadable)."""
        try:
            columns = read_nuclei_table(path)
        except (OSError, ValueError, IndexError) as error:
            raise BadDataError(f"cannot read the nuclei table ({error}); give the TSV written by segment", path) from None
        if "label" not in columns:
            raise BadDataError("the nuclei table has no 'label' column; give the TSV written by segment", path)
        order = np.argsort(columns["label"], kind="stable")
        return cls(columns["label"][order], {name: values[order] for name, values in columns.items()})

    def has(self, name: str) -> bool:
        """Whether the table has column ``name``."""
        return name in self.columns

    def get(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Values of column ``name`` for ``ids`` (float64, shape of ``ids``; NaN for ids or columns the table lacks)."""
        ids = np.asarray(ids, dtype=np.int64)
        result = np.full(ids.shape, np.nan)
        if name not in self.columns or self.labels.size == 0:
            return result
        position = np.clip(np.searchsorted(self.labels, ids), 0, self.labels.size - 1)
        found = self.labels[position] == ids
        result[found] = self.columns[name][position[found]].astype(np.float64)
        return result


@dataclass
class QCInputs:
    """The segmentation to judge, the slide it was made from, and what segment recorded beside it.

    Attributes
    ----------
    labels_path, image_path : Path
    source : LabelSource
        The label image(s), read region by region.
    run_record : dict or None
        The segmentation store's completion record (None for a label TIFF).
    table_file : Path or None
        The per-nucleus TSV the scores are read from: the one given, else a table found
        beside the labels, else the store's scores sidecar.
    lookup : _ObjectLookup or None
        The table's per-nucleus values (None when there is no table or a model rescores).
    scores_from : {"segmentation", "table"} or None
        ``segmentation``: the store's scores sidecar; ``table``: a per-nucleus table.
    """

    labels_path: Path
    image_path: Path
    source: LabelSource
    run_record: dict | None
    table_file: Path | None
    lookup: _ObjectLookup | None
    scores_from: str | None = None


def open_qc_inputs(
    labels_path: str | Path, image_path: str | Path, table_path: str | Path | None, model_dir: str | Path | None
) -> QCInputs:
    """Open the labels, find the run record and the nuclei table.

    Parameters
    ----------
    labels_path, image_path : str or Path
        The segmentation (label TIFF or OME-Zarr store) and the slide.
    table_path : str or Path, optional
        Per-nucleus TSV (default: a table found beside the labels, `find_objects_table`, else
        the store's scores sidecar, `find_segmentation_scores`).
    model_dir : str or Path, optional
        When given, no table's scores are used (the model rescores).

    Returns
    -------
    QCInputs

    Raises
    ------
    MissingInputError
        The image, the labels or a given table does not exist.
    BadDataError
        The table cannot be read.
    """
    labels_path, image_path = Path(labels_path), Path(image_path)
    if not image_path.exists():
        raise MissingInputError("image not found; give the slide the labels were made from", image_path)
    source = open_label_source(labels_path)
    run_record = read_run_record(source.store) if source.store is not None else None
    table_file = Path(table_path) if table_path is not None else find_objects_table(labels_path, run_record)
    if table_path is not None and not table_file.is_file():
        raise MissingInputError("nuclei table not found; give the TSV written by segment", table_file)
    scores_from = "table"
    sidecar = find_segmentation_scores(source.store) if table_file is None else None
    if sidecar is not None:
        table_file, scores_from = sidecar, "segmentation"
    if table_file is None or model_dir is not None:
        return QCInputs(labels_path, image_path, source, run_record, table_file, None, None)
    return QCInputs(labels_path, image_path, source, run_record, table_file, _ObjectLookup.from_table(table_file),
                    scores_from)


def _check_same_shape(slide: Any, inputs: QCInputs) -> None:
    """`BadDataError` when the labels are not the slide's (Y, X) shape."""
    _, height, width = slide.shape
    if (height, width) != tuple(inputs.source.shape):
        raise BadDataError(
            f"labels shape {tuple(inputs.source.shape)} differs from image shape {(height, width)} (Y, X); "
            "give the labels made from this image",
            inputs.labels_path,
        )


def _open_model_and_channels(
    slide: Any, inputs: QCInputs, model_dir: str | Path | None, device: str,
    score_threshold: float | None, nuclear_channels: str | Sequence[str] | None,
) -> tuple[Any, list[int]]:
    """The model's predictor (None without ``model_dir``) and the slide channels to judge.

    Parameters
    ----------
    slide : nuclei_app.io.slides.Slide
    inputs : QCInputs
    model_dir : str or Path, optional
    device : str
        ``cpu``, ``cuda`` or ``auto``.
    score_threshold : float, optional
        The cut-off the labels were made with (default: the model card's).
    nuclear_channels : str or sequence of str, optional
        Channel names (default: the model's, or every recognised nuclear stain).

    Returns
    -------
    predictor : NucleiPredictor or None
    channels : list of int
    """
    if model_dir is None:
        return None, select_nuclear_channels(slide.channel_names, nuclear_channels, inputs.image_path)
    from nuclei_app.model.device import resolve_device
    from nuclei_app.model.predictor import load_predictor

    predictor = load_predictor(model_dir, device=resolve_device(device), pixel_size_um=slide.pixel_size_um,
                               score_threshold=score_threshold)
    return predictor, resolve_channels(slide, predictor, nuclear_channels)


# ------------------------------------------------------------------------- the slide reference


def _overview(slide: Any, channels: list[int], percentiles: np.ndarray) -> tuple[np.ndarray, int]:
    """Nuclear composite of the slide at a small scale, and the pyramid level it was read from.

    The smallest pyramid level with at least 1 MP; when that level is over 16 MP, a 4 x 4
    grid of 1024 px windows of it, stitched together.

    Parameters
    ----------
    slide : nuclei_app.io.slides.Slide
    channels : list of int
        Nuclear channels.
    percentiles : ndarray, shape (C, 2)
        Whole-slide normalisation.

    Returns
    -------
    overview : ndarray of float32, shape (h, w)
    level : int
    """
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
    """Level-0 window (y0, x0, h, w) of at most 1024 px around the most nucleus-rich area.

    Parameters
    ----------
    slide : nuclei_app.io.slides.Slide
    overview : ndarray of float32, shape (h, w)
        From `_overview`.
    level : int
        The pyramid level of ``overview``.
    threshold : float
        Foreground threshold of the composite.

    Returns
    -------
    (int, int, int, int)
    """
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
    """Seam lines of the segmentation's tile grid and control lines half a stride away.

    Parameters
    ----------
    shape : (int, int)
        (Y, X) of the slide.
    thresholds : QCThresholds
        ``seam_stride_px`` > 0 sets the grid; else it comes from the run record.
    run_record : dict or None
        The segmentation's completion record (its ``tile`` and ``overlap`` parameters).

    Returns
    -------
    seams : dict of list of int, or None
        ``seam_rows``, ``seam_cols``, ``control_rows``, ``control_cols`` (level-0 line
        positions); None when the grid is unknown.
    source : {"config", "run_record"} or None
    stride : int or None
    """
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


@dataclass
class SlideReference:
    """What every tile of a slide is judged against, computed once per slide.

    Attributes
    ----------
    shape : (int, int)
        (Y, X) of the slide, level 0.
    channels : list of int
        The nuclear channels judged.
    channel_names : list of str
        Their names.
    percentiles : ndarray of float, shape (C, 2)
        Whole-slide normalisation of ``channels``.
    pixel_size : (float, float) or None
        µm per pixel (Y, X).
    foreground_threshold : float
        Otsu's threshold of the overview composite (``inf``: no foreground).
    precision_threshold : float
        `stained_threshold` of the overview: nucleus pixels above it count as on the stain
        (``foreground_precision``).
    diameter : float
        Nucleus diameter estimated for the slide, pixels.
    halo : int
        Pixels read around every tile (objects are judged whole).
    min_run : int
        Run length (pixels) of a straight cut along a seam.
    seams : dict or None
        `_seam_lines`; ``seam_source`` and ``seam_stride`` say where they came from.
    """

    shape: tuple[int, int]
    channels: list[int]
    channel_names: list[str]
    percentiles: np.ndarray
    pixel_size: tuple[float, float] | None
    foreground_threshold: float
    precision_threshold: float
    diameter: float
    halo: int
    min_run: int
    seams: dict[str, list[int]] | None
    seam_source: str | None
    seam_stride: int | None
    noise_thresholds: np.ndarray | None = None


#: Random stream (`nuclei_app.seeding`) of the crops the noise thresholds are fitted to.
NOISE_STREAM = "qc_noise_crops"


def slide_noise_thresholds(slide: Any, channels: list[int], seed: int) -> np.ndarray:
    """The seed paper's noise threshold of each nuclear channel, from random crops of the slide.

    The crops (`crop_origins`: 20 of 64 x 64 px, positions drawn from the ``qc_noise_crops``
    stream of ``seed``) are read lazily, so memory stays at a few crops whatever the slide size;
    each channel's threshold is `noise_threshold_of_sample` of its pooled crop pixels, in raw
    intensity units. The same crops serve every channel, so a channel's threshold equals
    ``noise_threshold(channel, seed_sequence(seed, "qc_noise_crops"))`` of the whole channel.

    Parameters
    ----------
    slide : nuclei_app.io.slides.Slide
    channels : list of int
        Nuclear channels.
    seed : int

    Returns
    -------
    ndarray of float64, shape (C,)
    """
    _, height, width = slide.shape
    origins = crop_origins((height, width), seed_sequence(seed, NOISE_STREAM))
    if origins is None:  # no larger than one crop in some direction: the whole slide, as the toolkit does
        pixels = slide.read_region(0, 0, height, width, channels=channels).reshape(len(channels), -1)
    else:
        side = NOISE_CROP_SIDE
        pixels = np.concatenate([
            slide.read_region(int(y), int(x), side, side, channels=channels).reshape(len(channels), -1)
            for y, x in origins
        ], axis=1)
    return np.asarray([noise_threshold_of_sample(row) for row in pixels], dtype=np.float64)


def _slide_diameter(slide: Any, channels: list[int], percentiles: np.ndarray, overview: np.ndarray, level: int,
                    threshold: float, run_record: dict | None) -> float:
    """The nucleus diameter (px) QC judges the slide at: the one its segmentation settled on.

    A segmentation that measured the slide's nuclei recorded the size (``diameter_px`` of its
    predictor); QC takes it rather than measuring again. Otherwise (a model that took its
    scale from the pixel size, or labels from elsewhere) the slide is measured by the same
    rule (`nuclei_app.io.slides.measure_nucleus_diameter`) around its most nucleus-rich area.
    """
    recorded = (((run_record or {}).get("parameters") or {}).get("predictor") or {}).get("diameter_px")
    if recorded:
        return float(recorded)
    wy0, wx0, wh, ww = _diameter_window(slide, overview, level, threshold)
    return float(measure_nucleus_diameter(slide, channels, percentiles, [(wy0, wx0, wy0 + wh, wx0 + ww)],
                                          slide.pixel_size_um))


def slide_reference(
    slide: Any, channels: list[int], thresholds: QCThresholds, run_record: dict | None
) -> SlideReference:
    """Normalisation, foreground thresholds, nucleus size and seam lines of a slide.

    Parameters
    ----------
    slide : nuclei_app.io.slides.Slide
    channels : list of int
        Nuclear channels.
    thresholds : QCThresholds
    run_record : dict or None
        The segmentation's completion record (seam lines, nucleus size).

    Returns
    -------
    SlideReference
    """
    _, height, width = slide.shape
    percentiles = channel_percentiles(slide, channels)
    overview, overview_level = _overview(slide, channels, percentiles)
    threshold = otsu_threshold(overview)
    diameter = _slide_diameter(slide, channels, percentiles, overview, overview_level, threshold, run_record)
    seams, seam_source, seam_stride = _seam_lines((height, width), thresholds, run_record)
    return SlideReference(
        shape=(height, width),
        channels=list(channels),
        channel_names=[slide.channel_names[i] for i in channels],
        percentiles=percentiles,
        pixel_size=slide.pixel_size_um,
        foreground_threshold=threshold,
        precision_threshold=stained_threshold(overview, threshold),
        diameter=diameter,
        halo=int(np.clip(math.ceil(2.0 * diameter), 16, 128)),
        min_run=max(5, int(round(0.6 * diameter))),
        seams=seams,
        seam_source=seam_source,
        seam_stride=seam_stride,
        # One QC seed for every random sample (teacher tiles, noise crops): same seed, same report.
        noise_thresholds=slide_noise_thresholds(slide, channels, thresholds.teacher_sample_seed),
    )


# ------------------------------------------------------------------------- tiles


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
    window: tuple[int, int, int, int], min_run: int,
) -> np.ndarray:
    """Which of ``ids`` run straight along a ``kind`` line (`straight_cut_ids`) inside ``window``.

    Parameters
    ----------
    sources : list of ndarray of int, each shape (h, w)
        The window's label images (overlap layers, or the flat view).
    ids : ndarray of int, shape (n,)
    seams : dict or None
        `_seam_lines` (None: nothing is cut).
    kind : {"seam", "control"}
    window : (int, int, int, int)
        (y0, x0, y1, x1) of the label images in slide pixels.
    min_run : int

    Returns
    -------
    ndarray of bool, shape (n,)
    """
    flags = np.zeros(len(ids), dtype=bool)
    if seams is None:
        return flags
    y0, x0, y1, x1 = window
    rows = [p - y0 for p in seams[f"{kind}_rows"] if y0 < p < y1]  # both neighbouring pixels inside
    cols = [p - x0 for p in seams[f"{kind}_cols"] if x0 < p < x1]
    cut: list[np.ndarray] = []
    for labels in sources:
        cut += [straight_cut_ids(labels, 0, p, min_run) for p in rows]
        cut += [straight_cut_ids(labels, 1, p, min_run) for p in cols]
    return np.isin(ids, np.concatenate(cut)) if cut else flags


def _overlap_flags(ids: np.ndarray, layers: list[np.ndarray], lookup: _ObjectLookup | None) -> np.ndarray:
    """1.0 for nuclei that overlap another, 0.0 for the others, NaN when unknown.

    From the overlap layers when there are some, else from the table's
    ``n_overlapping_neighbours``.

    Parameters
    ----------
    ids : ndarray of int, shape (n,)
    layers : list of ndarray of int, each shape (h, w)
    lookup : _ObjectLookup or None

    Returns
    -------
    ndarray of float64, shape (n,)
    """
    if layers:
        return np.isin(ids, overlapping_ids(layers)).astype(np.float64)
    if lookup is not None:
        neighbours = lookup.get("n_overlapping_neighbours", ids)
        return np.where(np.isfinite(neighbours), (neighbours > 0).astype(np.float64), np.nan)
    return np.full(len(ids), np.nan)


@dataclass
class TileView:
    """One QC tile of the slide, read with a halo so that the nuclei on its edge are whole.

    Attributes
    ----------
    index : int
        Position in the QC tile grid (row-major).
    box : (int, int, int, int)
        (y0, x0, y1, x1) of the tile in slide pixels (end exclusive).
    window : (int, int, int, int)
        (y0, x0, y1, x1) of the tile with its halo, clipped to the slide.
    raw : ndarray, shape (C, h, w)
        Nuclear channels of the window (raw intensities).
    flat : ndarray of uint32, shape (h, w)
        Flattened view of the segmentation in the window.
    layers : list of ndarray of uint32, each shape (h, w)
        Overlap layers in the window (empty when the segmentation has none).
    """

    index: int
    box: tuple[int, int, int, int]
    window: tuple[int, int, int, int]
    raw: np.ndarray
    flat: np.ndarray
    layers: list[np.ndarray]

    @property
    def core(self) -> tuple[slice, slice]:
        """The tile without its halo, as slices of the window's arrays."""
        y0, x0, y1, x1 = self.box
        return slice(y0 - self.window[0], y1 - self.window[0]), slice(x0 - self.window[1], x1 - self.window[1])


def qc_tile_boxes(shape: tuple[int, int], tile_size: int) -> list[tuple[int, int, int, int]]:
    """The QC tile grid (`qc_tile_edges`: the last tile widened instead of a sliver).

    Parameters
    ----------
    shape : (int, int)
        (Y, X) of the slide.
    tile_size : int
        Tile side, pixels.

    Returns
    -------
    list of (int, int, int, int)
        (y0, x0, y1, x1) per tile, end exclusive, in row-major order.
    """
    row_edges = qc_tile_edges(shape[0], tile_size)
    col_edges = qc_tile_edges(shape[1], tile_size)
    return [
        (y0, x0, y1, x1)
        for y0, y1 in zip(row_edges[:-1], row_edges[1:])
        for x0, x1 in zip(col_edges[:-1], col_edges[1:])
    ]


def grown_box(box: tuple[int, int, int, int], margin: int, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """``box`` (y0, x0, y1, x1) grown by ``margin`` pixels on every side, clipped to a slide of ``shape``."""
    y0, x0, y1, x1 = box
    return max(0, y0 - margin), max(0, x0 - margin), min(shape[0], y1 + margin), min(shape[1], x1 + margin)


def read_tile(slide: Any, source: LabelSource, index: int, box: tuple[int, int, int, int],
              reference: SlideReference) -> TileView:
    """Read one QC tile of the slide and of the segmentation, with the reference's halo.

    Parameters
    ----------
    slide : nuclei_app.io.slides.Slide
    source : LabelSource
    index : int
        Position in the QC grid.
    box : (int, int, int, int)
        (y0, x0, y1, x1) of the tile, slide pixels.
    reference : SlideReference
        Channels, halo and slide shape.

    Returns
    -------
    TileView
    """
    hy0, hx0, hy1, hx1 = grown_box(box, reference.halo, reference.shape)
    raw = slide.read_region(hy0, hx0, hy1 - hy0, hx1 - hx0, channels=reference.channels)
    flat = source.read(source.flat, hy0, hx0, hy1, hx1)
    layers = [source.read(layer, hy0, hx0, hy1, hx1) for layer in source.layers]
    return TileView(index, box, (hy0, hx0, hy1, hx1), raw, flat, layers)


#: Margin of the small read that tells an empty tile: the reach of the foreground's sigma-1
#: Gaussian (4 px), and wide enough for the widest coverage dilation to reach into the core.
EMPTY_CHECK_MARGIN_PX = max(4, max(COVERAGE_DILATIONS))


def empty_tile_view(slide: Any, source: LabelSource, index: int, box: tuple[int, int, int, int],
                    reference: SlideReference) -> TileView | None:
    """A small view of a QC tile when it is empty (`analyse_tile`'s rule), else None.

    Reads the flat labels of the tile with a small margin and, only when its core holds no
    nucleus, the image on the same window: the decision is exactly `analyse_tile`'s, while a
    sparse slide's many empty tiles cost a fraction of a full `read_tile`. The view (no layers,
    ``EMPTY_CHECK_MARGIN_PX`` instead of the halo) still serves the thumbnail and the signal
    coverage of the tile (`SlideAccumulators.add_tile`). Parameters as `read_tile`'s.

    Returns
    -------
    TileView or None
    """
    y0, x0, y1, x1 = box
    wy0, wx0, wy1, wx1 = grown_box(box, EMPTY_CHECK_MARGIN_PX, reference.shape)
    flat = source.read(source.flat, wy0, wx0, wy1, wx1)
    if flat[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0].any():
        return None
    raw = slide.read_region(wy0, wx0, wy1 - wy0, wx1 - wx0, channels=reference.channels)
    foreground = nuclear_foreground(nuclear_composite(raw, reference.percentiles), reference.foreground_threshold)
    if float(foreground[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0].mean()) >= MIN_FOREGROUND_SHARE:
        return None
    return TileView(index, box, (wy0, wx0, wy1, wx1), raw, flat, [])


def tile_objects(
    tile: TileView, reference: SlideReference, lookup: _ObjectLookup | None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The nuclei whose centroid lies in the tile, with their shape, overlap and cut flags.

    Objects come from the overlap layers (full masks) when present, else the flat view. With
    layers and a table (or the store's scores sidecar) that lists solidity and eccentricity,
    those (`nuclei_app.core.morphology.shape_descriptors` of the same full masks, measured by
    the segmentation) are read instead of measured again.

    Parameters
    ----------
    tile : TileView
    reference : SlideReference
    lookup : _ObjectLookup or None
        The nuclei table (overlaps when the segmentation has no layers).

    Returns
    -------
    ids : ndarray of int64, shape (n,)
    columns : dict of ndarray, each shape (n,)
        ``area``, ``solidity``, ``eccentricity`` (float64), ``overlap`` (float64, NaN:
        unknown), ``seam_cut``, ``control_cut`` and ``at_border`` (bool).
    """
    sources = tile.layers if tile.layers else [tile.flat]
    # Full masks (layers) whose shapes the segmentation measured already: read, not recomputed.
    known = bool(tile.layers) and lookup is not None and lookup.has("solidity") and lookup.has("eccentricity")
    properties = merge_properties([object_properties(labels, shapes=not known) for labels in sources])
    offset = tile.window[:2]
    keep = centred_in(properties, offset, tile.box)
    ids = properties["label"][keep]
    solidity, eccentricity = properties["solidity"][keep], properties["eccentricity"][keep]
    if known:
        solidity, eccentricity = lookup.get("solidity", ids), lookup.get("eccentricity", ids)
        if not (np.isfinite(solidity).all() and np.isfinite(eccentricity).all()):  # ids the table lacks
            measured = merge_properties([object_properties(labels) for labels in sources])
            solidity, eccentricity = measured["solidity"][keep], measured["eccentricity"][keep]
    seams, min_run = reference.seams, reference.min_run
    return ids, {
        "area": properties["area"][keep],
        "solidity": solidity,
        "eccentricity": eccentricity,
        "overlap": _overlap_flags(ids, tile.layers, lookup),
        "seam_cut": _cut_flags(sources, ids, seams, "seam", tile.window, min_run),
        "control_cut": _cut_flags(sources, ids, seams, "control", tile.window, min_run),
        "at_border": touching_border(properties, offset, reference.shape)[keep],
    }


def tile_scores(
    tile: TileView, ids: np.ndarray, predictor: Any, lookup: _ObjectLookup | None, percentiles: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Detection score and head agreement of the tile's nuclei.

    From the model's heads rerun on the tile (`rescore_with_model`) when there is a
    predictor, else from the nuclei table, else NaN.

    Parameters
    ----------
    tile : TileView
    ids : ndarray of int, shape (n,)
        The tile's nuclei (`tile_objects`).
    predictor : NucleiPredictor or None
    lookup : _ObjectLookup or None
    percentiles : ndarray of float, shape (C, 2)
        Whole-slide normalisation for the model's input.

    Returns
    -------
    scores, agreements : ndarray of float64, shape (n,)
    """
    if predictor is not None:
        predicted = predictor.predict_batch([normalise_intensities(tile.raw, percentiles)])[0]
        return rescore_with_model(tile.flat, ids, predicted)
    if lookup is not None:
        return lookup.get("score", ids), lookup.get("head_agreement", ids)
    return np.full(len(ids), np.nan), np.full(len(ids), np.nan)


def _seeds_in_core(teacher: np.ndarray, core: tuple[slice, slice]) -> np.ndarray:
    """The teacher's seeds (`seed_points`) that lie in the tile without its halo.

    Parameters
    ----------
    teacher : ndarray of uint32, shape (h, w)
        The teacher's objects in the tile's window.
    core : (slice, slice)
        The tile in the window (`TileView.core`).

    Returns
    -------
    ndarray of int64, shape (n, 2)
        (row, col) in window pixels.
    """
    seeds = seed_points(teacher)
    in_core = (
        (seeds[:, 0] >= core[0].start) & (seeds[:, 0] < core[0].stop)
        & (seeds[:, 1] >= core[1].start) & (seeds[:, 1] < core[1].stop)
    )
    return seeds[in_core]


def tile_geometry(index: int, box: tuple[int, int, int, int], pixel_size: tuple[float, float] | None) -> dict[str, Any]:
    """A tile record's position and size, in pixels and in µm.

    Parameters
    ----------
    index : int
        Position in the QC grid.
    box : (int, int, int, int)
        (y0, x0, y1, x1), slide pixels.
    pixel_size : (float, float) or None
        µm per pixel (Y, X); None gives None for the µm values.

    Returns
    -------
    dict
        ``index, y0, x0, height, width, y0_um, x0_um, height_um, width_um``.
    """
    y0, x0, y1, x1 = box
    return {
        "index": index,
        "y0": y0, "x0": x0, "height": y1 - y0, "width": x1 - x0,
        "y0_um": None if pixel_size is None else y0 * pixel_size[0],
        "x0_um": None if pixel_size is None else x0 * pixel_size[1],
        "height_um": None if pixel_size is None else (y1 - y0) * pixel_size[0],
        "width_um": None if pixel_size is None else (x1 - x0) * pixel_size[1],
    }


@dataclass
class TileAnalysis:
    """What one analysed QC tile contributes to its slide.

    Attributes
    ----------
    record : dict
        The tile's position and pixel metrics (the report's tile record, before `finish_tile_records`).
    objects : dict of ndarray, each shape (n,)
        The tile's nuclei: `OBJECT_COLUMNS` but ``tile``.
    counts : dict
        `tile_counts`, pooled over the slide.
    """

    record: dict[str, Any]
    objects: dict[str, np.ndarray]
    counts: dict[str, float]


#: The teacher's fields of a tile record the teacher did not run on (`qc_report` schema: null).
NO_TEACHER: dict[str, Any] = {
    "n_seeds": None, "seed_recall": None, "teacher_nuclei": None, "teacher_student_f1": None, "teacher_sampled": False,
}


def analyse_tile(
    tile: TileView, reference: SlideReference, lookup: _ObjectLookup | None, predictor: Any, watch: Stopwatch
) -> TileAnalysis | None:
    """Pixel metrics and nuclei of one QC tile, without the teacher; None for an empty tile.

    A tile is empty (not analysed) when it holds no nucleus and less than
    `MIN_FOREGROUND_SHARE` of nuclear foreground. The teacher's fields stay null
    (`NO_TEACHER`) until `teach_tile` fills them for the tiles of the teacher's sample.

    Parameters
    ----------
    tile : TileView
    reference : SlideReference
    lookup : _ObjectLookup or None
        The nuclei table (scores, head agreement, overlaps).
    predictor : NucleiPredictor or None
        Rescores the nuclei when given.
    watch : Stopwatch
        Receives the ``metrics`` and ``model`` seconds.

    Returns
    -------
    TileAnalysis or None
    """
    core = tile.core
    with watch.stage("metrics"):
        composite = nuclear_composite(tile.raw, reference.percentiles)
        foreground = nuclear_foreground(composite, reference.foreground_threshold)
        core_fg, core_flat = foreground[core], tile.flat[core]
        fg_share = float(core_fg.mean())
        if not core_flat.any() and fg_share < MIN_FOREGROUND_SHARE:
            return None
        stained = nuclear_foreground(composite, reference.precision_threshold)[core]
        autocorr = signal_autocorrelation(composite[core])
        ids, objects = tile_objects(tile, reference, lookup)
    with watch.stage("model"):
        objects["score"], objects["agreement"] = tile_scores(tile, ids, predictor, lookup, reference.percentiles)

    core_nuclei = core_flat != 0
    pixel_size = reference.pixel_size
    y0, x0, y1, x1 = tile.box
    area_mm2 = None if pixel_size is None else (y1 - y0) * (x1 - x0) * pixel_size[0] * pixel_size[1] / 1e6
    n_objects = int(ids.size)
    record = {
        **tile_geometry(tile.index, tile.box, pixel_size),
        "n_nuclei": n_objects,
        "density_per_mm2": None if area_mm2 is None else n_objects / area_mm2,
        "foreground_share": fg_share,
        "foreground_coverage": foreground_coverage(core_nuclei, core_fg),
        "foreground_precision": foreground_precision(core_nuclei, stained),
        **NO_TEACHER,
        "signal_autocorrelation": autocorr,
    }
    no_agreement = {"tp_50": 0, "fp_50": 0, "fn_50": 0, "n_gt": 0}
    counts = tile_counts(core_nuclei, core_fg, stained, 0, 0, no_agreement, autocorr)
    return TileAnalysis(record, objects, counts)


def teach_tile(tile: TileView, reference: SlideReference, analysis: TileAnalysis, watch: Stopwatch) -> None:
    """Run the weak LoG teacher on an analysed tile; fill its record's teacher fields and counts (in place).

    Parameters
    ----------
    tile : TileView
        The tile, read again with its halo.
    reference : SlideReference
    analysis : TileAnalysis
        From `analyse_tile` on the same tile.
    watch : Stopwatch
        Receives the ``teacher`` and ``metrics`` seconds.
    """
    core = tile.core
    with watch.stage("teacher"):
        composite = nuclear_composite(tile.raw, reference.percentiles)
        foreground = nuclear_foreground(composite, reference.foreground_threshold)
        teacher = teacher_labels(tile.raw, foreground, reference.diameter, reference.percentiles, reference.pixel_size)
    with watch.stage("metrics"):
        agreement = teacher_agreement(tile.flat[core], teacher[core])
        seeds = _seeds_in_core(teacher, core)
        seeds_inside = int((tile.flat[seeds[:, 0], seeds[:, 1]] != 0).sum()) if len(seeds) else 0
    analysis.record.update({
        "n_seeds": int(len(seeds)),
        "seed_recall": None if len(seeds) == 0 else seeds_inside / len(seeds),
        "teacher_nuclei": int(agreement["n_gt"]),
        "teacher_student_f1": float(agreement["f1_50"]),
        "teacher_sampled": True,
    })
    analysis.counts.update({"seeds": int(len(seeds)), "seeds_in": seeds_inside, "tp": agreement["tp_50"],
                            "fp": agreement["fp_50"], "fn": agreement["fn_50"], "teacher": agreement["n_gt"]})


def provisional_score(analysis: TileAnalysis) -> float:
    """A tile's QC score from the components known before the teacher runs (NaN: none known).

    Foreground coverage and precision, mean detection score and mean head agreement (the
    stratification key of the teacher's sample, `nuclei_app.qc.sampling`).
    """
    record, objects = analysis.record, analysis.objects
    scores, agreements = objects["score"], objects["agreement"]
    score = tile_qc_score({
        "foreground_coverage": record["foreground_coverage"],
        "foreground_precision": record["foreground_precision"],
        "score_mean": float(np.nanmean(scores)) if np.isfinite(scores).any() else None,
        "head_agreement_mean": float(np.nanmean(agreements)) if np.isfinite(agreements).any() else None,
    })
    return np.nan if score is None else score


def teacher_sample(analyses: list[TileAnalysis], thresholds: QCThresholds) -> list[int]:
    """Positions in ``analyses`` of the tiles the teacher runs on (`nuclei_app.qc.sampling`)."""
    size = teacher_sample_size(len(analyses), thresholds.teacher_tiles_min, thresholds.teacher_tiles_share)
    keys = np.asarray([provisional_score(analysis) for analysis in analyses], dtype=np.float64)
    return [int(i) for i in stratified_sample(keys, size, thresholds.teacher_sample_seed)]


def measure_tile_signal(tile: TileView, reference: SlideReference, totals: SignalCoverageTotals) -> dict[str, Any]:
    """The seed paper's signal coverage of one tile, with its sums and clump links added to ``totals``.

    Measured on every tile, empty ones included, so that the slide's coverage is the whole
    slide's (the above-noise signal of an empty tile counts, uncovered). The masks are dilated
    on the window (the halo is wider than the largest dilation plus the clump erosion), the sums
    taken over the core, so the tiles add up to the slide exactly.

    Parameters
    ----------
    tile : TileView
    reference : SlideReference
        ``noise_thresholds`` (raw units, per nuclear channel) and the slide's shape.
    totals : SignalCoverageTotals
        Receives the tile's sums (`signal_coverage_sums`) and clump links (`clump_links`).

    Returns
    -------
    dict
        ``signal_coverage`` and ``signal_coverage_by_dilation`` of the tile (`signal_coverage_fields`).
    """
    signal = above_noise_signal(tile.raw, reference.noise_thresholds)
    covered, total = signal_coverage_sums(signal, tile.flat, tile.core, totals.dilations)
    totals.add_coverage(covered, total)
    if tile.flat[tile.core].any():  # clumps start only on nucleus pixels of the core
        totals.add_clump_links(*clump_links(tile.flat, tile.core, tile.window[:2], reference.shape[1]))
    return signal_coverage_fields(covered, total, totals.dilations)


@dataclass
class SlideAccumulators:
    """What the QC gathers from every tile besides the tile's record (memory: O(nuclei) + the thumbnail).

    Attributes
    ----------
    signal : SignalCoverageTotals
        The seed paper's coverage sums and clump links.
    thumbnail : ThumbnailCanvas
        The slide's nuclear composite, block-averaged.
    """

    signal: SignalCoverageTotals
    thumbnail: ThumbnailCanvas

    @classmethod
    def for_slide(cls, reference: SlideReference) -> "SlideAccumulators":
        """Empty accumulators for the slide of ``reference``."""
        return cls(SignalCoverageTotals(), ThumbnailCanvas.for_slide(reference.shape))

    def add_tile(self, tile: TileView, reference: SlideReference) -> dict[str, Any]:
        """Add one tile (empty or not) to the thumbnail and the seed paper's sums; its coverage fields."""
        core_raw = tile.raw[(slice(None), *tile.core)]
        self.thumbnail.add(nuclear_composite(core_raw, reference.percentiles), tile.box[0], tile.box[1])
        return measure_tile_signal(tile, reference, self.signal)


def analyse_tiles(
    slide: Any, inputs: QCInputs, reference: SlideReference, predictor: Any,
    boxes: list[tuple[int, int, int, int]], watch: Stopwatch, thresholds: QCThresholds = QCThresholds(),
    accumulators: SlideAccumulators | None = None,
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray], dict[str, float]]:
    """Read and analyse every QC tile, then run the teacher on a sample of them.

    Memory: one tile with its halo at a time (the sampled tiles are read a second time).

    Parameters
    ----------
    slide : nuclei_app.io.slides.Slide
    inputs : QCInputs
    reference : SlideReference
    predictor : NucleiPredictor or None
    boxes : list of (int, int, int, int)
        The QC tile grid (`qc_tile_boxes`).
    watch : Stopwatch
    thresholds : QCThresholds
        The size and seed of the teacher's sample.
    accumulators : SlideAccumulators, optional
        Receives every tile (the thumbnail, the seed paper's sums: `measure_tile_signal`); the
        coverage fields join the analysed tiles' records.

    Returns
    -------
    tiles : list of dict
        Records of the analysed (non-empty) tiles, in grid order.
    objects : dict of ndarray, each shape (n,)
        Every analysed nucleus (`OBJECT_COLUMNS`; ``tile`` indexes ``tiles``).
    pooled : dict
        Sums of the tiles' `tile_counts` (the teacher's counts over its sample).
    """
    analyses: list[TileAnalysis] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # weak labels on empty tiles warn
        for index, box in enumerate(boxes):
            with watch.stage("read"):
                empty = empty_tile_view(slide, inputs.source, index, box, reference)
                tile = empty if empty is not None else read_tile(slide, inputs.source, index, box, reference)
            if accumulators is not None:  # every tile, empty or not, counts in the thumbnail and coverage
                with watch.stage("metrics"):
                    signal_fields = accumulators.add_tile(tile, reference)
            if empty is not None:
                continue
            analysis = analyse_tile(tile, reference, inputs.lookup, predictor, watch)
            if analysis is not None:
                if accumulators is not None:
                    analysis.record.update(signal_fields)
                analyses.append(analysis)
        for position in teacher_sample(analyses, thresholds):
            analysis = analyses[position]
            with watch.stage("read"):
                tile = read_tile(slide, inputs.source, analysis.record["index"], boxes[analysis.record["index"]],
                                 reference)
            teach_tile(tile, reference, analysis, watch)
    columns: dict[str, list[np.ndarray]] = {name: [] for name in OBJECT_COLUMNS}
    pooled: dict[str, float] = dict.fromkeys(POOLED_COUNTS, 0)
    for position, analysis in enumerate(analyses):
        analysis.objects["tile"] = np.full(len(analysis.objects["area"]), position)
        for name in OBJECT_COLUMNS:
            columns[name].append(np.asarray(analysis.objects[name]))
        for key in POOLED_COUNTS:
            pooled[key] += analysis.counts[key]
    objects = {name: (np.concatenate(values) if values else np.zeros(0)) for name, values in columns.items()}
    return [analysis.record for analysis in analyses], objects, pooled


# ------------------------------------------------------------------------- the slide


def finish_tile_records(
    tiles: list[dict[str, Any]], objects: dict[str, np.ndarray], outlier_flags: dict[str, np.ndarray] | None,
    interior: np.ndarray, seams_known: bool, thresholds: QCThresholds,
    teacher_fill: dict[str, float | None] | None = None,
) -> None:
    """Add to each tile record its nuclei's `object_summary`, QC score, flag and reasons (in place).

    A tile outside the teacher's sample scores its teacher components (``teacher_student_f1``,
    ``seed_recall``) at ``teacher_fill`` (the slide's values pooled over the sample), so that
    its QC score has the same weights as a sampled tile's; without it, at none.

    Parameters
    ----------
    tiles : list of dict
        From `analyse_tiles`.
    objects : dict of ndarray, each shape (n,)
        The slide's nuclei (``tile`` indexes ``tiles``).
    outlier_flags : dict of ndarray of bool, shape (n,), or None
    interior : ndarray of bool, shape (n,)
        From `judge_morphology`.
    seams_known : bool
    thresholds : QCThresholds
        ``flag_tile_score_below`` and the warn thresholds (reasons).
    teacher_fill : dict of float or None, optional
        ``teacher_student_f1`` and ``seed_recall`` for the tiles the teacher did not run on.
    """
    tile_of = objects["tile"].astype(np.int64)
    for t, record in enumerate(tiles):
        record.update(object_summary(objects, tile_of == t, interior, outlier_flags, seams_known))
        components = quality_components(record)
        if teacher_fill and not record.get("teacher_sampled", True):
            components.update({name: teacher_fill.get(name) for name in ("teacher_student_f1", "seed_recall")})
        record["qc_score"] = tile_qc_score(components)
        record["flagged"] = record["qc_score"] is not None and record["qc_score"] < thresholds.flag_tile_score_below
        record["flag_reasons"] = tile_reasons(record, thresholds) if record["flagged"] else []


def slide_metrics(
    n_tiles: int, tiles: list[dict[str, Any]], objects: dict[str, np.ndarray], pooled: dict[str, float],
    outlier_flags: dict[str, np.ndarray] | None, interior: np.ndarray, reference: SlideReference,
    n_layers: int | None, totals: SignalCoverageTotals | None = None,
) -> dict[str, Any]:
    """The report's ``slide`` object: every metric of `SLIDE_METRICS`, JSON-ready.

    Parameters
    ----------
    n_tiles : int
        Tiles of the QC grid, analysed or empty.
    tiles : list of dict
        Finished records of the analysed tiles.
    objects : dict of ndarray, each shape (n,)
        The slide's nuclei.
    pooled : dict
        Pooled `tile_counts`.
    outlier_flags, interior
        From `judge_morphology`.
    reference : SlideReference
    n_layers : int or None
        Overlap layers of the segmentation (None without).
    totals : SignalCoverageTotals, optional
        The seed paper's sums over the tiles: adds `seed_paper_slide_metrics` after `SLIDE_METRICS`.

    Returns
    -------
    dict
    """
    n_nuclei = len(objects["tile"])
    pixel_size = reference.pixel_size
    analysed_mm2 = None
    if pixel_size is not None:
        analysed_mm2 = sum(t["height"] * t["width"] for t in tiles) * pixel_size[0] * pixel_size[1] / 1e6
    values = {
        "n_tiles": n_tiles,
        "n_tiles_analysed": len(tiles),
        "n_tiles_empty": n_tiles - len(tiles),
        "n_nuclei": n_nuclei,
        "density_per_mm2": None if not analysed_mm2 else n_nuclei / analysed_mm2,
        "n_layers": n_layers,
        **pooled_pixel_metrics(pooled, len(tiles)),
        **object_metrics(objects, outlier_flags, interior, reference.seams is not None, pixel_size),
        **tile_score_metrics(tiles),
    }
    metrics = {key: format_number(values[key]) for key in SLIDE_METRICS}
    if totals is not None:
        metrics.update(seed_paper_slide_metrics(totals, n_nuclei, reference.noise_thresholds))
    return metrics


# ------------------------------------------------------------------------- flagged tiles


def overlay_name(record: dict[str, Any]) -> str:
    """File name of a tile's overlay PNG: ``tile-<y0>-<x0>.png``."""
    return f"tile-{record['y0']}-{record['x0']}.png"


def rank_flagged_tiles(tiles: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The flagged tile records, worst QC score first (ties: grid order).

    Parameters
    ----------
    tiles : list of dict
        Finished tile records (`finish_tile_records`).
    limit : int
        At most this many (``max_flagged_tiles``).

    Returns
    -------
    list of dict
    """
    flagged = sorted((t for t in tiles if t["flagged"]), key=lambda t: (t["qc_score"], t["index"]))
    return flagged[:limit]


def draw_overlays(
    image_path: Path, source: LabelSource, tiles: list[dict[str, Any]], reference: SlideReference
) -> dict[str, bytes]:
    """PNG overlays (`overlay_png`) of the given tiles: nuclear composite and nucleus outlines.

    Parameters
    ----------
    image_path : Path
        The slide (opened only when there is a tile to draw).
    source : LabelSource
        The segmentation (its flattened view is drawn).
    tiles : list of dict
        Tile records to draw.
    reference : SlideReference
        Channels and normalisation.

    Returns
    -------
    dict of str to bytes
        PNG file content by `overlay_name`.
    """
    overlays: dict[str, bytes] = {}
    if not tiles:
        return overlays
    with open_slide(image_path) as slide:
        for record in tiles:
            y0, x0, h, w = record["y0"], record["x0"], record["height"], record["width"]
            composite = nuclear_composite(
                slide.read_region(y0, x0, h, w, channels=reference.channels), reference.percentiles
            )
            labels = source.read(source.flat, y0, x0, y0 + h, x0 + w)
            overlays[overlay_name(record)] = overlay_png(composite, labels)
    return overlays


def flagged_tile_entries(
    flagged: list[dict[str, Any]], overlays: dict[str, bytes], overlay_prefix: str
) -> list[dict[str, Any]]:
    """The report's ``flagged_tiles`` entries.

    Parameters
    ----------
    flagged : list of dict
        Ranked tile records (`rank_flagged_tiles`).
    overlays : dict of str to bytes
        The overlays drawn, by `overlay_name`.
    overlay_prefix : str
        Folder of the overlays relative to the report.

    Returns
    -------
    list of dict
        Rank (from 1), tile index, position (px, µm), size, QC score, reasons and the overlay's
        relative path (None when not drawn).
    """
    entries = []
    for rank, record in enumerate(flagged, start=1):
        name = overlay_name(record)
        entries.append({
            "rank": rank,
            "tile_index": record["index"],
            "y0": record["y0"], "x0": record["x0"],
            "height": record["height"], "width": record["width"],
            "y0_um": record["y0_um"], "x0_um": record["x0_um"],
            "qc_score": record["qc_score"],
            "reasons": record["flag_reasons"],
            "overlay": f"{overlay_prefix}/{name}" if name in overlays else None,
        })
    return entries


# ------------------------------------------------------------------------- pictures of every slide


#: File name of a slide's thumbnail (QC scores as colours) in the report's overlay folder.
THUMBNAIL_NAME = "thumbnail.png"


def worst_and_median_tiles(tiles: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The tile record of lowest QC score and the one of median score (the lower middle; ties: grid order).

    Parameters
    ----------
    tiles : list of dict
        Finished tile records.

    Returns
    -------
    worst, median : dict or None
        None when no tile has a QC score.
    """
    scored = sorted((t for t in tiles if t["qc_score"] is not None), key=lambda t: (t["qc_score"], t["index"]))
    if not scored:
        return None, None
    return scored[0], scored[(len(scored) - 1) // 2]


def tile_box(record: dict[str, Any] | None) -> tuple[int, int, int, int] | None:
    """(y0, x0, height, width) of a tile record; None for None."""
    return None if record is None else (record["y0"], record["x0"], record["height"], record["width"])


def picture_entry(record: dict[str, Any] | None, overlays: dict[str, bytes], overlay_prefix: str,
                  thresholds: QCThresholds) -> dict | None:
    """The report's ``pictures.worst_tile`` / ``median_tile``: where the tile is, its score, reasons, overlay.

    The reasons are the tile's metrics worse than their warn thresholds (`tile_reasons`), flagged or not.
    """
    if record is None:
        return None
    name = overlay_name(record)
    return {
        "tile_index": record["index"], "y0": record["y0"], "x0": record["x0"],
        "height": record["height"], "width": record["width"], "qc_score": format_number(record["qc_score"]),
        "reasons": record["flag_reasons"] if record["flagged"] else tile_reasons(record, thresholds),
        "overlay": f"{overlay_prefix}/{name}" if name in overlays else None,
    }


def draw_pictures(
    inputs: QCInputs, tiles: list[dict[str, Any]], reference: SlideReference, thresholds: QCThresholds,
    thumbnail: ThumbnailCanvas, overlay_prefix: str,
) -> tuple[list[dict[str, Any]], dict[str, bytes], dict[str, Any]]:
    """Every picture of a slide's report: flagged tiles, worst and median tile, the score thumbnail.

    Parameters
    ----------
    inputs : QCInputs
    tiles : list of dict
        Finished tile records.
    reference : SlideReference
    thresholds : QCThresholds
        ``max_flagged_tiles``, ``max_overlays`` and ``flag_tile_score_below`` (the colour scale).
    thumbnail : ThumbnailCanvas
        The slide's composite, accumulated over the tiles.
    overlay_prefix : str
        Folder of the PNGs relative to the report.

    Returns
    -------
    flagged_entries : list of dict
        The report's ``flagged_tiles`` (`flagged_tile_entries`).
    overlays : dict of str to bytes
        PNG files by name.
    pictures : dict
        The report's ``pictures``.
    """
    flagged = rank_flagged_tiles(tiles, thresholds.max_flagged_tiles)
    overlays = draw_overlays(inputs.image_path, inputs.source, flagged[: thresholds.max_overlays], reference)
    flagged_entries = flagged_tile_entries(flagged, overlays, overlay_prefix)
    worst, median = worst_and_median_tiles(tiles)
    unseen = {overlay_name(t): t for t in (worst, median) if t is not None and overlay_name(t) not in overlays}
    overlays.update(draw_overlays(inputs.image_path, inputs.source, list(unseen.values()), reference))
    overlays[THUMBNAIL_NAME] = score_thumbnail_png(
        thumbnail.image(), thumbnail.factor, [(*tile_box(t), t["qc_score"]) for t in tiles],
        thresholds.flag_tile_score_below, worst=tile_box(worst), median=tile_box(median),
    )
    flag = thresholds.flag_tile_score_below
    pictures = {
        "thumbnail": f"{overlay_prefix}/{THUMBNAIL_NAME}",
        "thumbnail_downsample": thumbnail.factor,
        "thumbnail_shape_yx": list(thumbnail.sums.shape),
        "score_scale": {"red_at": format_number(flag - RED_BELOW_FLAG), "yellow_at": flag, "green_at": 1.0,
                        "alpha": SCORE_ALPHA},
        "worst_tile": picture_entry(worst, overlays, overlay_prefix, thresholds),
        "median_tile": picture_entry(median, overlays, overlay_prefix, thresholds),
    }
    return flagged_entries, overlays, pictures


# ------------------------------------------------------------------------- provenance


def _model_of_run_record(run_record: dict) -> dict[str, Any] | None:
    """The model the run record lists as an input (id read from its card when still there)."""
    for entry in run_record.get("inputs", [])[1:]:
        card_path = Path(entry.get("path", "")) / "model_card.json"
        model_id = None
        if card_path.is_file():
            try:
                model_id = json.loads(card_path.read_text(encoding="utf-8")).get("model_id")
            except (OSError, ValueError):
                model_id = None
        return {"model_id": model_id, "path": entry.get("path"), "sha256": entry.get("sha256"), "source": "run_record"}
    return None


def model_provenance(predictor: Any, model_dir: str | Path | None, run_record: dict | None) -> dict[str, Any] | None:
    """The model behind the scores: the one given to QC, else the one the run record names.

    Parameters
    ----------
    predictor : NucleiPredictor or None
    model_dir : str or Path, optional
        The model folder given to QC.
    run_record : dict or None
        The segmentation's completion record.

    Returns
    -------
    dict or None
        ``model_id``, ``path``, ``sha256``, ``source`` (``model`` or ``run_record``).
    """
    card = predictor.card if predictor is not None else None
    if card is not None:
        return {"model_id": card.get("model_id"), "path": str(Path(model_dir).resolve()),
                "sha256": path_sha256(model_dir), "source": "model"}
    return _model_of_run_record(run_record) if run_record else None


def qc_parameters(
    reference: SlideReference, thresholds: QCThresholds, scores_from: str | None,
    morphology_reference: dict[str, float] | None, teacher_tiles: list[int] | None = None,
) -> dict[str, Any]:
    """The report's ``provenance.parameters``: thresholds and what was derived from the slide.

    Parameters
    ----------
    reference : SlideReference
    thresholds : QCThresholds
    scores_from : {"model", "segmentation", "table"} or None
    morphology_reference : dict of float or None
        Medians and spreads of `judge_morphology`.
    teacher_tiles : list of int, optional
        Grid indices of the tiles the teacher ran on (`teacher_sample`).

    Returns
    -------
    dict
    """
    teacher_tiles = list(teacher_tiles or [])
    return {
        "thresholds": thresholds.to_dict(),
        "qc_score_weights": dict(QC_SCORE_WEIGHTS),
        "nuclear_channels": list(reference.channel_names),
        "percentiles": [[format_number(v) for v in row] for row in np.asarray(reference.percentiles, dtype=float)],
        "foreground_threshold": format_number(reference.foreground_threshold),
        "stained_threshold": format_number(reference.precision_threshold),
        "nucleus_diameter_px": format_number(reference.diameter),
        "halo_px": reference.halo,
        "teacher": "log",
        "teacher_sample": {
            "n_tiles": len(teacher_tiles),
            "tile_indices": teacher_tiles,
            "stratified_by": "provisional_qc_score",
            "seed": thresholds.teacher_sample_seed,
        },
        "scores_from": scores_from,
        "seam_lines_from": reference.seam_source,
        "seam_stride_px": reference.seam_stride,
        "seam_min_run_px": reference.min_run,
        "morphology_reference": (
            None if morphology_reference is None
            else {key: format_number(value) for key, value in morphology_reference.items()}
        ),
    }


def seed_paper_parameters(seed: int) -> dict[str, Any]:
    """The report's ``provenance.parameters.seed_paper``: how the noise thresholds and clumps were measured."""
    return {"seed_paper": {
        "noise_crops": NOISE_CROPS, "noise_crop_side_px": NOISE_CROP_SIDE, "noise_components": NOISE_COMPONENTS,
        "seed": int(seed), "random_stream": NOISE_STREAM, "coverage_dilations_px": list(COVERAGE_DILATIONS),
        "clump_erosion_radius_px": CLUMP_EROSION_RADIUS, "intensities": "raw",
    }}


def qc_provenance(
    inputs: QCInputs, model: dict[str, Any] | None, run_record: dict | None, parameters: dict[str, Any]
) -> dict[str, Any]:
    """The report's ``provenance``: inputs with sha256, model, segmentation, software, time, parameters.

    Parameters
    ----------
    inputs : QCInputs
    model : dict or None
        `model_provenance`.
    run_record : dict or None
    parameters : dict
        `qc_parameters`.

    Returns
    -------
    dict
    """
    return {
        "image": {"path": str(inputs.image_path.resolve()), "sha256": path_sha256(inputs.image_path)},
        "labels": {"path": str(inputs.labels_path.resolve()), "sha256": path_sha256(inputs.labels_path)},
        "table": None if inputs.lookup is None else {
            "path": str(inputs.table_file.resolve()), "sha256": path_sha256(inputs.table_file)
        },
        "model": model,
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
            "scikit-image": skimage.__version__,
        },
        "created_at": utc_timestamp(),
        "parameters": parameters,
    }


def image_geometry(reference: SlideReference, thresholds: QCThresholds) -> dict[str, Any]:
    """The report's ``image``: shape (Y, X), pixel size (µm, or None) and the QC tile size."""
    pixel_size = reference.pixel_size
    return {
        "shape_yx": list(reference.shape),
        "pixel_size_um": None if pixel_size is None else [float(pixel_size[0]), float(pixel_size[1])],
        "tile_size_px": thresholds.tile_size_px,
    }


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
        Model folder whose heads rescore every nucleus on every tile (otherwise scores come from
        the store's scores sidecar or the nuclei table); `segment_then_qc` gives none.
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
        PNG files by file name: the flagged tiles drawn, the worst and the median tile, and the
        slide's thumbnail (`THUMBNAIL_NAME`).

    Raises
    ------
    MissingInputError, BadDataError, UsageError
        Missing inputs, labels of another shape than the image, non-integer labels.
    """
    thresholds = thresholds or QCThresholds()
    watch = Stopwatch()
    inputs = open_qc_inputs(labels_path, image_path, table_path, model_dir)
    with open_slide(inputs.image_path) as slide:
        _check_same_shape(slide, inputs)
        predictor, channels = _open_model_and_channels(slide, inputs, model_dir, device, score_threshold,
                                                       nuclear_channels)
        reference = slide_reference(slide, channels, thresholds, inputs.run_record)
        watch.seconds["prepare"] = time.monotonic() - watch.started
        boxes = qc_tile_boxes(reference.shape, thresholds.tile_size_px)
        accumulators = SlideAccumulators.for_slide(reference)
        tiles, objects, pooled = analyse_tiles(slide, inputs, reference, predictor, boxes, watch, thresholds,
                                               accumulators)

    with watch.stage("metrics"):
        outlier_flags, morphology_reference, interior = judge_morphology(objects, thresholds.morphology_k,
                                                                         thresholds.min_nuclei_for_statistics)
        finish_tile_records(tiles, objects, outlier_flags, interior, reference.seams is not None, thresholds,
                            pooled_pixel_metrics(pooled, len(tiles)))
        seed_paper_tile_clumps(tiles, accumulators.signal, reference.shape[1])
        metrics = slide_metrics(len(boxes), tiles, objects, pooled, outlier_flags, interior, reference,
                                len(inputs.source.layers) or None, accumulators.signal)
        status, reasons = qc_status(metrics, thresholds)

    with watch.stage("overlay"):
        flagged_entries, overlays, pictures = draw_pictures(
            inputs, tiles, reference, thresholds, accumulators.thumbnail, overlay_prefix)

    with watch.stage("provenance"):
        scores_from = "model" if predictor is not None else inputs.scores_from
        provenance = qc_provenance(
            inputs, model_provenance(predictor, model_dir, inputs.run_record), inputs.run_record,
            qc_parameters(reference, thresholds, scores_from, morphology_reference,
                          [t["index"] for t in tiles if t["teacher_sampled"]])
            | seed_paper_parameters(thresholds.teacher_sample_seed),
        )
    report = {
        "schema_version": SCHEMA_VERSION,
        "status": status,
        "reasons": reasons,
        "image": image_geometry(reference, thresholds),
        "slide": metrics,
        "tiles": [clean_tile_record(t) for t in tiles],
        "flagged_tiles": [clean_tile_record(entry) for entry in flagged_entries],
        "pictures": pictures,
        "provenance": provenance,
        "timings": watch.timings(),
    }
    return report, overlays


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
        """``pass``, ``warn`` or ``fail``."""
        return self.report["status"]


def check_built_report(instance: dict[str, Any], schema: str, what: str) -> None:
    """Raise `InvalidQCReportError` naming the first five ways ``instance`` breaks ``schema``.

    For what the app itself built (a bug when it breaks its schema, never a user error).

    Parameters
    ----------
    instance : dict
    schema : str
        Schema name (``qc_report``, ``group_qc``).
    what : str
        What it is, for the message (``QC report``).
    """
    problems = schema_errors(instance, schema)
    if problems:
        raise InvalidQCReportError(
            f"nuclei-app built a {what} that breaks its schema (a bug; please report it): {'; '.join(problems[:5])}"
        )


def validate_qc_report(report: dict[str, Any]) -> None:
    """Raise `InvalidQCReportError` listing every way ``report`` breaks the ``qc_report`` schema."""
    check_built_report(report, "qc_report", "QC report")


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
        shutil.rmtree(overlay_dir, ignore_errors=True)
    atomic_write_json(output_path, report)
    return QCResult(report, output_path, written_dir)
