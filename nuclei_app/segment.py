"""Whole-slide segmentation: tissue mask, tile grid, batched tiled inference, stitching, streamed output.

Data flow of `segment_slide`::

    slide (lazy) ─► nuclear channels + whole-slide percentiles ─► tissue mask (low level)
      ─► tile grid (cores = output chunks) ─► batches of tissue tiles ─► predictor
      (in-process | dask.distributed) ─► per-tile candidates cached in the work dir
      ─► stitch in raster order (de-duplicate, ids, overlap layers) ─► table rows
      ─► label chunks + image chunks + pyramids ─► completion record ─► rename

Memory is bounded by a few tiles: tiles are read lazily, candidates are kept as cropped
masks and re-read from the cache, and every output array is written chunk by chunk.
The tile function is a plain picklable job (`TileJob`, `run_tile_job`), so the same
code runs in-process, on a local `dask.distributed` cluster (``nprocs > 1``) or on an
existing scheduler; batches are fixed before any work starts and ids are assigned in
raster order afterwards, so every way of running gives identical labels.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from nuclei_app import __version__
from nuclei_app.config import OUTLINE_CONTRAST_FRACTION
from nuclei_app.errors import (
    BadDataError,
    CannotCreateOutputError,
    InputOutputError,
    MissingInputError,
    NucleiAppError,
    UsageError,
)
from nuclei_app.instances import Instances
from nuclei_app.provenance import path_sha256
from nuclei_app.read import normalise_intensities
from nuclei_app.progress import get_logger, progress_reporter
from nuclei_app.weak import signal_autocorrelation
from nuclei_app.stitch import Box, SlideStitcher, TileCandidates, paint_region, tile_candidates

log = get_logger("nuclei_app.segment")

#: File inside a finished output folder that vouches for it; written last.
RUN_RECORD_NAME = "nuclei-app_run.json"
#: Lag-1 spatial autocorrelation of the nuclear composite needed to call anything tissue:
#: pure camera noise scores about 0, stained nuclei (blobs several pixels wide) 0.5 to 1.
MIN_TISSUE_AUTOCORRELATION = 0.2
#: Side (pixels) the level used for tissue detection should at least have.
TISSUE_LEVEL_MIN_SIDE = 256


# ======================================================================================
# Predictors: one picklable description, one cached instance per process
# ======================================================================================


@dataclass(frozen=True)
class PredictorSpec:
    """What segments the tiles, in a form that can be sent to another process.

    Attributes
    ----------
    kind : "model" or "weak"
        ``"model"``: a trained student (`nuclei_app.model.load_predictor`);
        ``"weak"``: the classical weak labeler (`nuclei_app.weak.weak_labels`), no model needed.
    model_dir : str, optional
        Model folder (``kind="model"``).
    method : str
        Weak labeler method (``kind="weak"``): ``"log"`` or ``"otsu"``.
    device : str
        ``"cpu"``, ``"cuda"`` or ``"auto"`` (model only).
    diameter : float, optional
        Nucleus diameter in pixels (weak labeler; a model when the pixel size cannot give its
        scale); `segment_slide` estimates it once
        per slide when absent, so every tile uses the same scale.
    score_threshold : float, optional
        Consensus-score cut-off (model only); default: the one the model card records.
    """

    kind: str
    model_dir: str | None = None
    method: str = "log"
    device: str = "cpu"
    diameter: float | None = None
    score_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("model", "weak"):
            raise UsageError(f"predictor kind must be 'model' or 'weak', got {self.kind!r}")
        if self.kind == "model" and not self.model_dir:
            raise UsageError("a model predictor needs a model folder (--model MODEL_DIR)")
        if self.device not in ("cpu", "cuda", "auto"):
            raise UsageError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.score_threshold is not None and not 0.0 <= self.score_threshold <= 1.0:
            raise UsageError(f"--score-threshold must be between 0 and 1, got {self.score_threshold}")


class WeakPredictor:
    """The weak labeler behind the predictor interface (``predict_batch`` of normalised tiles).

    Tiles arrive already normalised by whole-slide percentiles, so the labeler is told
    that 0 and 1 are the low and high percentiles (it must not re-normalise per tile,
    which would make tiles disagree).
    """

    channel_names: list[str] | None = None  # works on any nuclear channels

    def __init__(self, method: str, pixel_size_um: tuple[float, float] | None, diameter: float | None = None) -> None:
        self.method = method
        self.pixel_size_um = pixel_size_um
        self.diameter = diameter

    def predict_batch(self, tiles: list[np.ndarray]) -> list[Instances]:
        """Label each (C, H, W) float32 tile -> list of `Instances` over the tile."""
        import warnings

        from nuclei_app.weak import weak_labels

        results = []
        for tile in tiles:
            identity = np.tile(np.asarray([[0.0, 1.0]], dtype=np.float32), (tile.shape[0], 1))
            with warnings.catch_warnings():  # an empty tile is normal on a slide; no warning per tile
                warnings.simplefilter("ignore", RuntimeWarning)
                labels = weak_labels(
                    tile, method=self.method, pixel_size_um=self.pixel_size_um, diameter=self.diameter,
                    percentiles=identity,
                )
            results.append(labels.to_instances())
        return results


# A model's scale from the pixel size is overruled when the slide's nuclei measure more than
# this factor away from it (a wrong nominal pixel size would otherwise resize nuclei badly).
SCALE_MISMATCH = 1.6


def estimate_slide_diameter(
    slide: Any, channels: Sequence[int], percentiles: np.ndarray, windows: Sequence[Box], max_windows: int = 3
) -> float | None:
    """Median nucleus diameter (pixels) estimated on a few tissue windows spread over the slide.

    The weak labeler would otherwise estimate it per tile, and tiles would disagree.
    """
    from nuclei_app.weak import estimate_nucleus_diameter, nuclear_composite

    if not windows:
        return None
    picks = sorted({int(round(i)) for i in np.linspace(0, len(windows) - 1, min(max_windows, len(windows)))})
    estimates = []
    for index in picks:
        y0, x0, y1, x1 = windows[index]
        tile = normalise_intensities(slide.read_region(y0, x0, y1 - y0, x1 - x0, channels=channels), percentiles)
        identity = np.tile(np.asarray([[0.0, 1.0]], dtype=np.float32), (tile.shape[0], 1))
        estimates.append(estimate_nucleus_diameter(nuclear_composite(tile, identity), slide.pixel_size_um))
    return round(float(np.median(estimates)), 2)


_PREDICTORS: dict[tuple, Any] = {}


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is usable, else ``"cpu"``; ``"cuda"`` without one is a usage error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return device


def get_predictor(spec: PredictorSpec, pixel_size_um: tuple[float, float] | None) -> Any:
    """The predictor ``spec`` describes, loaded once per process (workers reuse it across tasks)."""
    key = (spec, None if pixel_size_um is None else tuple(float(v) for v in pixel_size_um))
    if key not in _PREDICTORS:
        if spec.kind == "weak":
            _PREDICTORS[key] = WeakPredictor(spec.method, key[1], spec.diameter)
        else:
            from nuclei_app.model import load_predictor

            _PREDICTORS[key] = load_predictor(
                spec.model_dir, device=resolve_device(spec.device), pixel_size_um=key[1], diameter_px=spec.diameter,
                score_threshold=spec.score_threshold,
            )
    return _PREDICTORS[key]


# ======================================================================================
# Tile grid and tissue
# ======================================================================================


def _core_edges(size: int, stride: int, overlap: int) -> tuple[int, ...]:
    """Core boundaries along one axis: multiples of ``stride``; a last core thinner than the
    overlap is merged into the one before it (so no tile is a sliver)."""
    count = max(1, math.ceil(size / stride))
    if count > 1 and size - (count - 1) * stride < max(overlap, 1):
        count -= 1
    return tuple(min(k * stride, size) for k in range(count)) + (size,)


@dataclass(frozen=True)
class TileGrid:
    """Overlapping tiles over a slide whose cores partition it.

    Cores start at multiples of ``stride = tile - overlap`` (so they coincide with output
    chunks of side ``stride``); a tile's window is its core plus half the overlap on every
    side that is not a slide border, clipped to the slide.

    Attributes
    ----------
    shape : (int, int)
        (Y, X) of the slide's level 0.
    tile, overlap : int
        Window side and overlap between neighbouring windows, pixels.
    row_edges, col_edges : tuple of int
        Core boundaries (``n_rows + 1`` and ``n_cols + 1`` values).
    """

    shape: tuple[int, int]
    tile: int
    overlap: int
    row_edges: tuple[int, ...]
    col_edges: tuple[int, ...]

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    @property
    def n_rows(self) -> int:
        return len(self.row_edges) - 1

    @property
    def n_cols(self) -> int:
        return len(self.col_edges) - 1

    def __len__(self) -> int:
        return self.n_rows * self.n_cols

    def core(self, row: int, col: int) -> Box:
        """(y0, x0, y1, x1) of the tile's core."""
        return self.row_edges[row], self.col_edges[col], self.row_edges[row + 1], self.col_edges[col + 1]

    def window(self, row: int, col: int) -> Box:
        """(y0, x0, y1, x1) of the pixels the tile reads."""
        y0, x0, y1, x1 = self.core(row, col)
        before = self.overlap // 2
        after = self.overlap - before
        return max(0, y0 - before), max(0, x0 - before), min(self.shape[0], y1 + after), min(self.shape[1], x1 + after)

    def positions(self) -> list[tuple[int, int]]:
        """Every (row, col) in raster order."""
        return [(row, col) for row in range(self.n_rows) for col in range(self.n_cols)]


def align_window(window: Box, quantum: int) -> Box:
    """Grow a window up and left so that its origin is a multiple of ``quantum`` pixels.

    A model sees a nucleus identically in every tile only when tile origins sit on its
    feature grid (`nuclei_app.model.NucleiPredictor.tile_origin_quantum_px`); the grid's
    cores, and so the output chunks, stay as they are.
    """
    y0, x0, y1, x1 = window
    quantum = max(1, int(quantum))
    return y0 - y0 % quantum, x0 - x0 % quantum, y1, x1


def make_tile_grid(shape_yx: tuple[int, int], tile: int = 512, overlap: int = 64) -> TileGrid:
    """Tile grid over a (Y, X) slide; see `TileGrid`.

    Raises
    ------
    UsageError
        ``overlap`` negative or more than half the tile (tiles two apart would overlap).
    """
    tile, overlap = int(tile), int(overlap)
    if tile < 32:
        raise UsageError(f"--tile must be at least 32 pixels, got {tile}")
    if overlap < 0 or 2 * overlap > tile:
        raise UsageError(f"--overlap must be between 0 and half the tile ({tile // 2}), got {overlap}")
    stride = tile - overlap
    height, width = int(shape_yx[0]), int(shape_yx[1])
    return TileGrid(
        shape=(height, width),
        tile=tile,
        overlap=overlap,
        row_edges=_core_edges(height, stride, overlap),
        col_edges=_core_edges(width, stride, overlap),
    )


def tissue_level(level_shapes: Sequence[tuple[int, int, int]], min_side: int = TISSUE_LEVEL_MIN_SIDE) -> int:
    """The smallest pyramid level whose shorter side still has ``min_side`` pixels (else level 0)."""
    chosen = 0
    for level, (_, size_y, size_x) in enumerate(level_shapes):
        if min(size_y, size_x) >= min_side:
            chosen = level
    return chosen


def tissue_mask_from_image(composite: np.ndarray, dilation: int = 2) -> np.ndarray:
    """Tissue where the smoothed nuclear composite is above Otsu's threshold, dilated.

    Parameters
    ----------
    composite : ndarray, shape (Y, X)
        Mean of the normalised nuclear channels at a low pyramid level.
    dilation : int
        Pixels to grow the mask by (so nuclei at the rim are not cut off).

    Returns
    -------
    ndarray of bool, shape (Y, X)
        All False when the image has no structure worth calling tissue (blank or pure noise:
        its spatial autocorrelation is below `MIN_TISSUE_AUTOCORRELATION`).
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    image = np.asarray(composite, dtype=np.float32)
    empty = np.zeros(image.shape, dtype=bool)
    if image.size == 0 or not np.isfinite(image).any():
        return empty
    image = np.nan_to_num(image, nan=0.0)
    smooth = ndimage.gaussian_filter(image, sigma=1.0)
    if float(smooth.max() - smooth.min()) < 1e-4:
        return empty
    # Pure noise has no spatial structure (neighbouring pixels do not agree); stained nuclei do.
    structure = signal_autocorrelation(image)
    if structure is None or structure < MIN_TISSUE_AUTOCORRELATION:
        return empty
    foreground = smooth > threshold_otsu(smooth)
    if not foreground.any():
        return empty
    return ndimage.binary_dilation(foreground, iterations=max(0, int(dilation))) if dilation else foreground


def tissue_tiles(slide: Any, channels: Sequence[int], percentiles: np.ndarray, grid: TileGrid) -> np.ndarray:
    """Which tiles hold tissue, from Otsu on the nuclear composite of a low pyramid level.

    Returns
    -------
    ndarray of bool, shape (n_rows, n_cols)
    """
    level = tissue_level(slide.level_shapes)
    low = normalise_intensities(slide.read_level(level, channels), percentiles).mean(axis=0)
    factor_y, factor_x = slide.downsample_factor(level)
    # Grow by half the overlap (in low-level pixels) so nuclei at the rim still reach a tile.
    dilation = 1 + math.ceil(grid.overlap / 2 / max(factor_y, factor_x))
    mask = tissue_mask_from_image(low, dilation=dilation)
    result = np.zeros((grid.n_rows, grid.n_cols), dtype=bool)
    for row, col in grid.positions():
        y0, x0, y1, x1 = grid.window(row, col)
        region = mask[
            int(y0 / factor_y) : max(int(math.ceil(y1 / factor_y)), int(y0 / factor_y) + 1),
            int(x0 / factor_x) : max(int(math.ceil(x1 / factor_x)), int(x0 / factor_x) + 1),
        ]
        result[row, col] = bool(region.any())
    return result


# ======================================================================================
# The tile job: picklable, runs anywhere
# ======================================================================================


@dataclass(frozen=True)
class TileJob:
    """One batch of tiles to segment; everything a worker needs, nothing it must share.

    Attributes
    ----------
    image_path : str
        The slide (workers open it themselves; it must be readable where they run).
    spec : PredictorSpec
        What segments the tiles.
    pixel_size_um : (float, float) or None
        Slide pixel size, for the predictor's scale.
    nuclear_channels : tuple of int
        Channel indices fed to the predictor, in the predictor's order.
    percentiles : tuple of (float, float)
        Whole-slide normalisation per nuclear channel.
    tiles : tuple of ((row, col), window, core)
        The batch, in raster order.
    image_shape : (int, int)
        Slide (Y, X), to tell internal tile edges from slide borders.
    margin : int
        Candidate margin beyond the core (see `nuclei_app.stitch.tile_candidates`).
    torch_threads : int or None
        Intra-op threads for a model on CPU in a worker process (None: leave as is).
    """

    image_path: str
    spec: PredictorSpec
    pixel_size_um: tuple[float, float] | None
    nuclear_channels: tuple[int, ...]
    percentiles: tuple[tuple[float, float], ...]
    tiles: tuple[tuple[tuple[int, int], Box, Box], ...]
    image_shape: tuple[int, int]
    margin: int
    torch_threads: int | None = None


@lru_cache(maxsize=4)
def _open_slide_cached(path: str, modified_ns: int) -> Any:
    from nuclei_app.read import open_slide

    return open_slide(path)


def _worker_slide(path: str) -> Any:
    try:
        modified = os.stat(path).st_mtime_ns
    except OSError:
        raise MissingInputError("the slide is not readable where this worker runs; share it with the workers", path)
    return _open_slide_cached(path, modified)


def run_tile_job(job: TileJob) -> list[tuple[tuple[int, int], bytes]]:
    """Segment one batch of tiles; return each tile's candidates as bytes (`TileCandidates.to_bytes`).

    Reads every channel of each window (for per-nucleus marker intensities), normalises
    the nuclear channels by the whole-slide percentiles, predicts the batch, and keeps the
    instances each tile proposes (`nuclei_app.stitch.tile_candidates`).
    """
    if job.torch_threads and job.spec.kind == "model":
        import torch

        torch.set_num_threads(job.torch_threads)
    slide = _worker_slide(job.image_path)
    predictor = get_predictor(job.spec, job.pixel_size_um)
    percentiles = np.asarray(job.percentiles, dtype=np.float32).reshape(-1, 2)
    raw_windows, inputs = [], []
    for _, (y0, x0, y1, x1), _ in job.tiles:
        raw = slide.read_region(y0, x0, y1 - y0, x1 - x0)
        raw_windows.append(raw)
        inputs.append(normalise_intensities(raw[list(job.nuclear_channels)], percentiles))
    predictions = predictor.predict_batch(inputs)
    if len(predictions) != len(inputs):
        raise BadDataError(
            f"the predictor returned {len(predictions)} results for {len(inputs)} tiles; the model is broken",
            job.spec.model_dir,
        )
    results = []
    for (position, window, core), raw, instances in zip(job.tiles, raw_windows, predictions):
        candidates = tile_candidates(instances, window, core, job.image_shape, job.margin, channels=raw)
        results.append((position, candidates.to_bytes()))
    return results


# ======================================================================================
# Execution back ends
# ======================================================================================


def _run_in_process(jobs: list[TileJob], on_result: Callable[[list], None]) -> None:
    for job in jobs:
        on_result(run_tile_job(job))


def _run_on_dask(
    jobs: list[TileJob], on_result: Callable[[list], None], nprocs: int, scheduler: str | None
) -> None:
    """Run jobs on a LocalCluster (``nprocs`` worker processes, loopback) or an existing scheduler.

    At most two jobs per worker are in flight, so finished results never pile up in memory.
    """
    import logging

    from distributed import Client, LocalCluster, as_completed

    logging.getLogger("distributed").setLevel(logging.WARNING)
    cluster = None
    try:
        if scheduler:
            try:
                # Waits up to dask's `distributed.comm.timeouts.connect` (30 s by default).
                client = Client(scheduler)
            except (OSError, TimeoutError) as error:
                raise InputOutputError(
                    f"cannot reach the Dask scheduler at {scheduler} ({error}); check the address and that it runs"
                ) from None
        else:
            cluster = LocalCluster(
                n_workers=nprocs,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
            )
            client = Client(cluster)
        with client:
            n_workers = max(1, len(client.scheduler_info().get("workers", {})) or nprocs)
            run_token = uuid.uuid4().hex[:12]  # task keys must not collide with other runs on a shared scheduler
            in_flight = as_completed()
            pending = iter(enumerate(jobs))

            def submit_next() -> None:
                entry = next(pending, None)
                if entry is not None:
                    index, job = entry
                    in_flight.add(client.submit(run_tile_job, job, key=f"nuclei-app-tiles-{run_token}-{index}"))

            for _ in range(2 * n_workers):
                submit_next()
            for future in in_flight:
                on_result(future.result())
                future.release()
                submit_next()
    finally:
        if cluster is not None:
            cluster.close()


# ======================================================================================
# Inputs, outputs, resume
# ======================================================================================


def read_run_record(output_path: str | Path) -> dict | None:
    """The completion record of a finished segmentation output, or None when it has none."""
    record_path = Path(output_path) / RUN_RECORD_NAME
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("tool") == "nuclei-app" else None


def _check_output_path(output_path: Path) -> None:
    if not output_path.name.endswith(".zarr"):
        raise UsageError("the output must be an OME-Zarr folder name ending in .ome.zarr", output_path)
    if output_path.exists():
        if not output_path.is_dir() or read_run_record(output_path) is None:
            raise CannotCreateOutputError(
                "exists and is not a nuclei-app segmentation output; choose a new path or remove it", output_path
            )


def _remove_stale_partials(path: Path) -> None:
    """Remove ``<name>.partial-<pid>`` siblings left by killed runs (their process is gone)."""
    if not path.parent.is_dir():
        return
    prefix = f"{path.name}.partial-"
    for candidate in path.parent.iterdir():
        if not candidate.name.startswith(prefix):
            continue
        suffix = candidate.name[len(prefix) :]
        if suffix.isdigit() and int(suffix) != os.getpid() and _process_alive(int(suffix)):
            continue  # another run is writing it right now
        if candidate.is_dir():
            shutil.rmtree(candidate, ignore_errors=True)
        else:
            candidate.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _os_error(error: OSError, fallback: Path) -> NucleiAppError:
    """A user error for an OS-level write failure: 74 for a full disk, 73 for a forbidden path."""
    where = error.filename or fallback
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return InputOutputError(
            f"disk full or file size limit reached ({error.strerror}); free space or choose another output folder",
            where,
        )
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return CannotCreateOutputError(f"cannot write ({error.strerror}); choose a writable output path", where)
    return InputOutputError(f"I/O error ({error.strerror}); check the disk and rerun", where)


# ======================================================================================
# The whole slide
# ======================================================================================


@dataclass
class SegmentationResult:
    """What `segment_slide` produced.

    Attributes
    ----------
    output_path : Path
        The OME-Zarr segmentation store.
    table_path, geojson_path : Path or None
        The per-nucleus table (TSV, with ``.json`` sidecar) and GeoJSON, when asked for.
    record_path : Path
        The completion record inside the store.
    n_nuclei : int
        Nuclei in the output.
    n_layers : int
        Overlap layers written (``labels/nuclei_layer-0`` .. ``-<n_layers - 1>``).
    n_tiles : int
        Tiles in the grid.
    n_tiles_skipped_empty : int
        Tiles skipped because the tissue mask found nothing there.
    n_tiles_reused : int
        Tissue tiles whose results came from the work-dir cache of an earlier run.
    seconds : float
        Wall time of this call.
    tissue_megapixels : float
        Area of the tissue tiles' cores, megapixels.
    megapixels_per_second : float
        ``tissue_megapixels / seconds``.
    nuclear_channels : list of str
        Names of the channels the predictor saw.
    warnings : list of str
        Things the user should know (e.g. no tissue found).
    """

    output_path: Path
    table_path: Path | None
    geojson_path: Path | None
    record_path: Path
    n_nuclei: int
    n_layers: int
    n_tiles: int
    n_tiles_skipped_empty: int
    n_tiles_reused: int
    seconds: float
    tissue_megapixels: float
    megapixels_per_second: float
    nuclear_channels: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-ready dict of the result."""
        values = asdict(self)
        for key in ("output_path", "table_path", "geojson_path", "record_path"):
            values[key] = None if values[key] is None else str(values[key])
        return values


def resolve_channels(
    slide: Any, predictor: Any, requested: str | Sequence[str] | None
) -> list[int]:
    """Slide channel indices to feed the predictor, in the predictor's order.

    A model names the channels it was trained on; each must be found in the slide (by
    name, or by ``requested`` names that map them one to one). The weak labeler takes
    whatever nuclear channels are requested or recognised.

    Raises
    ------
    BadDataError
        The slide lacks a channel the model needs (the message lists both sets).
    """
    from nuclei_app.read import select_nuclear_channels

    names = list(slide.channel_names)
    wanted = getattr(predictor, "channel_names", None)
    if not wanted:
        return select_nuclear_channels(names, requested, slide.path)
    if requested is not None:
        chosen = select_nuclear_channels(names, requested, slide.path)
        if len(chosen) != len(wanted):
            raise BadDataError(
                f"the model was trained on {len(wanted)} channel(s) {wanted} but --nuclear-channels selects "
                f"{[names[i] for i in chosen]}; give exactly one slide channel per model channel, in order",
                slide.path,
            )
        return chosen
    chosen = []
    for name in wanted:
        try:
            matches = select_nuclear_channels(names, [name], slide.path)
        except NucleiAppError:
            matches = []
        exact = [i for i in matches if names[i].strip().lower() == str(name).strip().lower()]
        pick = (exact or matches)[:1]
        if not pick or pick[0] in chosen:
            raise BadDataError(
                f"the model was trained on channels {wanted} but the slide has {names}; "
                "pass --nuclear-channels to map slide channels to the model's, or use a model trained on this panel",
                slide.path,
            )
        chosen.extend(pick)
    return chosen


def _batches(positions: list[tuple[int, int]], size: int) -> list[list[tuple[int, int]]]:
    return [positions[start : start + size] for start in range(0, len(positions), size)]


def _tile_file(cache_dir: Path, position: tuple[int, int]) -> Path:
    return cache_dir / f"tile_r{position[0]:05d}_c{position[1]:05d}.npz"


def segment_slide(
    image_path: str | Path,
    output_path: str | Path,
    predictor_spec: PredictorSpec,
    tile: int = 512,
    overlap: int = 64,
    batch_size: int = 4,
    nuclear_channels: str | Sequence[str] | None = None,
    table_path: str | Path | None = None,
    geojson_path: str | Path | None = None,
    nprocs: int = 1,
    dask_scheduler: str | None = None,
    resume: bool = True,
    work_dir: str | Path | None = None,
    progress: bool = True,
) -> SegmentationResult:
    """Segment every nucleus of a slide into an OME-Zarr store (+ table, GeoJSON), tile by tile.

    Parameters
    ----------
    image_path : str or Path
        OME-TIFF, plain TIFF or OME-Zarr slide.
    output_path : str or Path
        ``OUT.ome.zarr`` folder to create (an earlier nuclei-app output there is replaced;
        anything else there is refused).
    predictor_spec : PredictorSpec
        A model folder or the weak labeler.
    tile, overlap : int
        Tile side and overlap in level-0 pixels; the overlap should exceed the largest
        nucleus. Output chunks are ``tile - overlap`` pixels.
    batch_size : int
        Tiles per predictor call (and per parallel task).
    nuclear_channels : str or sequence of str, optional
        Channel names to segment on (default: the model's channels, or every recognised
        nuclear stain for the weak labeler).
    table_path : str or Path, optional
        Per-nucleus TSV to write (a ``.json`` column sidecar is written beside it).
    geojson_path : str or Path, optional
        GeoJSON FeatureCollection of nucleus polygons (QuPath detections).
    nprocs : int
        Worker processes of a local dask.distributed cluster (1: run in this process).
    dask_scheduler : str, optional
        Address of an existing Dask scheduler (``tcp://HOST:PORT``); overrides ``nprocs``.
    resume : bool
        Reuse per-tile results of an interrupted run with the same inputs and parameters
        (and return at once when the output is already complete and matches).
    work_dir : str or Path, optional
        Where per-tile results are cached (default: ``.<output name>.work`` beside the output).
    progress : bool
        Show a progress bar (terminal) or log lines.

    Returns
    -------
    SegmentationResult

    Raises
    ------
    MissingInputError (66), BadDataError (65), UsageError (64), CannotCreateOutputError (73),
    InputOutputError (74)
    """
    started = time.monotonic()
    output_path = Path(output_path)
    table_path = None if table_path is None else Path(table_path)
    geojson_path = None if geojson_path is None else Path(geojson_path)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if nprocs < 1:
        raise UsageError(f"--nprocs must be at least 1, got {nprocs}")
    work_root = Path(work_dir) if work_dir is not None else output_path.parent / f".{output_path.name}.work"
    try:
        return _segment(
            Path(image_path), output_path, predictor_spec, tile, overlap, batch_size, nuclear_channels,
            table_path, geojson_path, nprocs, dask_scheduler, resume, work_root, progress, started,
        )
    except OSError as error:
        raise _os_error(error, output_path) from None


def _segment(
    image_path: Path,
    output_path: Path,
    spec: PredictorSpec,
    tile: int,
    overlap: int,
    batch_size: int,
    nuclear_channels: str | Sequence[str] | None,
    table_path: Path | None,
    geojson_path: Path | None,
    nprocs: int,
    dask_scheduler: str | None,
    resume: bool,
    work_root: Path,
    progress: bool,
    started: float,
) -> SegmentationResult:
    from nuclei_app.read import channel_percentiles, open_slide

    _check_output_path(output_path)
    for extra in (table_path, geojson_path):
        if extra is not None and extra.exists() and extra.is_dir():
            raise CannotCreateOutputError("is a folder; give a file path for the table / GeoJSON", extra)
    if spec.kind == "model" and not Path(spec.model_dir).is_dir():
        raise MissingInputError("model folder not found; train one with `nuclei-app train`", spec.model_dir)

    with open_slide(image_path) as slide:
        _, height, width = slide.shape
        grid = make_tile_grid((height, width), tile, overlap)
        predictor = get_predictor(spec, slide.pixel_size_um)
        channels = resolve_channels(slide, predictor, nuclear_channels)
        channel_names = [slide.channel_names[i] for i in channels]
        largest = getattr(predictor, "max_object_px", None)
        if largest is not None and overlap < 0.5 * float(largest):
            log.warning("the overlap (%d px) is small next to the largest nucleus the model can output", overlap)
        percentiles = channel_percentiles(slide, channels)
        tissue = tissue_tiles(slide, channels, percentiles, grid)

        tissue_positions = [position for position in grid.positions() if tissue[position]]
        # The weak labeler always needs the slide's nucleus scale; a model needs it when the
        # physical pixel size cannot map the slide onto the scale it was trained at.
        model_knows_scale = spec.kind == "model" and bool(
            slide.pixel_size_um and predictor.card["scale"].get("training_diameter_um")
        )
        scale_warnings = []
        if spec.diameter is None and (tissue_positions or not model_knows_scale):
            measured = estimate_slide_diameter(
                slide, channels, percentiles, [grid.window(*p) for p in tissue_positions]
            )
            if not model_knows_scale:
                spec = replace(spec, diameter=measured)
            else:
                # Nominal pixel sizes are often wrong (a default written by the scanner software or
                # a converter): check the size they imply against the nuclei actually in the slide.
                implied = predictor.card["scale"]["training_diameter_um"] / float(np.mean(slide.pixel_size_um))
                if measured and max(measured / implied, implied / measured) > SCALE_MISMATCH:
                    message = (
                        f"nuclei measure {measured:.1f} px in this slide, but its pixel size and the model's "
                        f"training scale imply {implied:.1f} px; segmenting at the measured size (check the pixel size)"
                    )
                    log.warning(message)
                    scale_warnings.append(message)
                    spec = replace(spec, diameter=measured)
        predictor = get_predictor(spec, slide.pixel_size_um)  # the one the workers will build from this spec
        inputs = [{"path": str(image_path.resolve()), "sha256": path_sha256(image_path)}]
        if spec.kind == "model":
            inputs.append({"path": str(Path(spec.model_dir).resolve()), "sha256": path_sha256(spec.model_dir)})
        parameters = {
            "predictor": {
                "kind": spec.kind,
                "method": spec.method if spec.kind == "weak" else None,
                "diameter_px": spec.diameter,
                "score_threshold": predictor.score_threshold if spec.kind == "model" else None,
                "outline_contrast_fraction": OUTLINE_CONTRAST_FRACTION if spec.kind == "model" else None,
            },
            "tile": grid.tile,
            "overlap": grid.overlap,
            "batch_size": int(batch_size),
            "nuclear_channels": channel_names,
            "percentiles": [[float(v) for v in row] for row in percentiles],
            "table": str(table_path) if table_path else None,
            "geojson": str(geojson_path) if geojson_path else None,
            "ngff_version": "0.4",
        }
        if resume:
            finished = _finished_result(output_path, inputs, parameters, table_path, geojson_path, started)
            if finished is not None:
                log.info("output is complete and matches this run; nothing to do (%s)", output_path)
                return finished

        # Tile results depend on the inputs and these parameters; output paths, parallelism and
        # the device are left out, so a resumed run may use another worker count (or GPU).
        tile_parameters = {key: value for key, value in parameters.items() if key not in ("table", "geojson")}
        cache_key = hashlib.sha256(
            json.dumps({"inputs": [i["sha256"] for i in inputs], "parameters": tile_parameters,
                        "version": __version__}, sort_keys=True).encode()
        ).hexdigest()[:16]
        cache_dir = work_root / f"segment-{cache_key}"
        if not resume and cache_dir.exists():
            shutil.rmtree(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        for path in (output_path, table_path, geojson_path, table_path and table_path.with_suffix(".json")):
            if path is not None:
                _remove_stale_partials(path)

        warnings_list = list(scale_warnings)
        if not tissue_positions:
            message = "no tissue found (the nuclear channels are blank or pure noise); the output has no nuclei"
            log.warning(message)
            warnings_list.append(message)
        batches = _batches(tissue_positions, batch_size)
        cached = {p for p in tissue_positions if _tile_file(cache_dir, p).is_file()}
        # A batch is redone whole when any of its tiles is missing: the predictor then sees
        # exactly the same batch as an uninterrupted run (batching can change its output).
        todo = [batch for batch in batches if any(p not in cached for p in batch)]
        reused = len(tissue_positions) - sum(len(batch) for batch in todo)
        if tissue_positions:
            log.info(
                "%d of %d tiles hold tissue; reusing %d finished tile(s) from %s",
                len(tissue_positions), len(grid), reused, cache_dir,
            )

        margin = max(1, grid.overlap // 4)
        quantum = getattr(predictor, "tile_origin_quantum_px", 1)
        # Worker processes of a local cluster share the cores; a remote worker keeps its own setting.
        threads = max(1, (os.cpu_count() or 1) // nprocs) if (nprocs > 1 and not dask_scheduler) else None
        jobs = [
            TileJob(
                image_path=str(image_path.resolve()),
                spec=spec,
                pixel_size_um=slide.pixel_size_um,
                nuclear_channels=tuple(channels),
                percentiles=tuple((float(a), float(b)) for a, b in percentiles),
                tiles=tuple((p, align_window(grid.window(*p), quantum), grid.core(*p)) for p in batch),
                image_shape=(height, width),
                margin=margin,
                torch_threads=threads,
            )
            for batch in todo
        ]
        from nuclei_app.atomic import atomic_write_bytes

        with progress_reporter(sum(len(b) for b in todo), "segmenting tiles", enabled=progress, logger=log) as bar:

            def store(results: list[tuple[tuple[int, int], bytes]]) -> None:
                for position, data in results:
                    atomic_write_bytes(_tile_file(cache_dir, position), data)
                bar.advance(len(results))

            if jobs and (nprocs > 1 or dask_scheduler):
                _run_on_dask(jobs, store, nprocs, dask_scheduler)
            else:
                _run_in_process(jobs, store)

        tissue_mp = sum(
            (grid.core(*p)[2] - grid.core(*p)[0]) * (grid.core(*p)[3] - grid.core(*p)[1]) for p in tissue_positions
        ) / 1e6
        finished: list[SegmentationResult] = []

        def complete(temporary: Path, n_nuclei: int, n_layers: int) -> None:
            seconds = time.monotonic() - started
            outcome = SegmentationResult(
                output_path=output_path,
                table_path=table_path,
                geojson_path=geojson_path,
                record_path=output_path / RUN_RECORD_NAME,
                n_nuclei=n_nuclei,
                n_layers=n_layers,
                n_tiles=len(grid),
                n_tiles_skipped_empty=len(grid) - len(tissue_positions),
                n_tiles_reused=reused,
                seconds=round(seconds, 3),
                tissue_megapixels=round(tissue_mp, 4),
                megapixels_per_second=round(tissue_mp / seconds, 4) if seconds > 0 else 0.0,
                nuclear_channels=channel_names,
                warnings=warnings_list,
            )
            _write_record(temporary, outcome, inputs, parameters)
            finished.append(outcome)

        _write_outputs(
            slide, grid, tissue, cache_dir, output_path, channels, channel_names, percentiles,
            table_path, geojson_path, progress, complete,
        )
        outcome = finished[0]
    shutil.rmtree(cache_dir, ignore_errors=True)
    if work_root.is_dir() and not any(work_root.iterdir()):
        work_root.rmdir()
    log.info(
        "%d nuclei in %d layer(s); %d tiles (%d without tissue, %d reused) in %.1f s, %.2f MP/s of tissue -> %s",
        outcome.n_nuclei, outcome.n_layers, outcome.n_tiles, outcome.n_tiles_skipped_empty,
        outcome.n_tiles_reused, outcome.seconds, outcome.megapixels_per_second, output_path,
    )
    return outcome


def _write_record(store: Path, outcome: SegmentationResult, inputs: list[dict], parameters: dict) -> None:
    """Write the completion record (schema ``run_record``) into the finished store."""
    from nuclei_app.atomic import atomic_write_json
    from nuclei_app.schemas import validate_instance

    summary = outcome.summary()
    for key in ("output_path", "table_path", "geojson_path", "record_path", "seconds", "megapixels_per_second",
                "n_tiles_reused"):
        summary.pop(key)
    outputs = [{"path": str(outcome.output_path)}]
    for extra in (outcome.table_path, outcome.geojson_path):
        if extra is not None:
            outputs.append({"path": str(extra), "sha256": path_sha256(extra)})
    record = {
        "tool": "nuclei-app",
        "version": __version__,
        "completed_at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "output": str(outcome.output_path),
        "command": "segment",
        "inputs": inputs,
        "parameters": parameters,
        "outputs": outputs,
        "summary": summary,
    }
    validate_instance(record, "run_record", store / RUN_RECORD_NAME)
    validate_instance(record, "segmentation_record", store / RUN_RECORD_NAME)
    atomic_write_json(store / RUN_RECORD_NAME, record)


def _finished_result(
    output_path: Path,
    inputs: list[dict],
    parameters: dict,
    table_path: Path | None,
    geojson_path: Path | None,
    started: float,
) -> SegmentationResult | None:
    """The result of an earlier complete run with the same inputs and parameters, if any."""
    record = read_run_record(output_path) if output_path.is_dir() else None
    if record is None or record.get("inputs") != inputs or record.get("parameters") != parameters:
        return None
    if any(path is not None and not path.is_file() for path in (table_path, geojson_path)):
        return None
    summary = dict(record.get("summary", {}))
    try:
        outcome = SegmentationResult(
            output_path=output_path,
            table_path=table_path,
            geojson_path=geojson_path,
            record_path=output_path / RUN_RECORD_NAME,
            n_nuclei=int(summary["n_nuclei"]),
            n_layers=int(summary["n_layers"]),
            n_tiles=int(summary["n_tiles"]),
            n_tiles_skipped_empty=int(summary["n_tiles_skipped_empty"]),
            n_tiles_reused=int(summary["n_tiles"]) - int(summary["n_tiles_skipped_empty"]),
            seconds=round(time.monotonic() - started, 3),
            tissue_megapixels=float(summary["tissue_megapixels"]),
            megapixels_per_second=0.0,
            nuclear_channels=list(summary.get("nuclear_channels", [])),
            warnings=list(summary.get("warnings", [])),
        )
    except (KeyError, TypeError, ValueError):
        return None
    return outcome


def _write_outputs(
    slide: Any,
    grid: TileGrid,
    tissue: np.ndarray,
    cache_dir: Path,
    output_path: Path,
    channels: list[int],
    channel_names: list[str],
    percentiles: np.ndarray,
    table_path: Path | None,
    geojson_path: Path | None,
    progress: bool,
    on_complete: Callable[[Path, int, int], None],
) -> None:
    """Stitch the cached tiles and stream the store, table and GeoJSON to temporary names.

    ``on_complete(temporary_store, n_nuclei, n_layers)`` runs last, before the store is
    renamed to its final name (it writes the completion record).
    """
    from nuclei_app.atomic import atomic_directory
    from nuclei_app.table import GeoJSONWriter, NucleiTableWriter
    from nuclei_app.write import FLAT_LABEL_NAME, SegmentationZarrWriter, layer_label_name

    def load(row: int, col: int) -> TileCandidates | None:
        if not tissue[row, col]:
            return None
        path = _tile_file(cache_dir, (row, col))
        try:
            return TileCandidates.from_bytes(path.read_bytes())
        except FileNotFoundError:
            raise InputOutputError("a cached tile result vanished during the run; rerun the command", path)
        except (ValueError, KeyError, OSError) as error:
            raise BadDataError(f"cached tile result is damaged ({error}); rerun with --no-resume", path) from None

    stitcher = SlideStitcher(grid.n_rows, grid.n_cols, load)
    table: NucleiTableWriter | None = None
    geojson: GeoJSONWriter | None = None
    try:
        table = NucleiTableWriter(table_path, slide.channel_names, slide.pixel_size_um) if table_path else None
        geojson = GeoJSONWriter(geojson_path, slide.channel_names, slide.pixel_size_um) if geojson_path else None
        with progress_reporter(len(grid), "stitching", enabled=progress, logger=log) as bar:
            for stitched in stitcher.run():
                if table is not None:
                    table.write_tile(stitched)
                if geojson is not None:
                    geojson.write_tile(stitched)
                bar.advance()
        n_layers = max(1, stitcher.n_layers)
        with atomic_directory(output_path) as temporary:
            writer = SegmentationZarrWriter(
                temporary, grid.shape, slide.dtype, channel_names, slide.pixel_size_um, chunk=grid.stride
            )
            names = [FLAT_LABEL_NAME, *(layer_label_name(k) for k in range(n_layers))]
            writer.add_labels(names)
            with progress_reporter(len(grid), "writing labels", enabled=progress, logger=log) as bar:
                for row, col in grid.positions():
                    box = grid.core(row, col)
                    y0, x0, y1, x1 = box
                    writer.write_image_region(y0, x0, slide.read_region(y0, x0, y1 - y0, x1 - x0, channels=channels))
                    instances = stitcher.instances_in(box, row, col)
                    if instances:
                        flat, layers = paint_region(box, instances, n_layers)
                        writer.write_label_region(FLAT_LABEL_NAME, y0, x0, flat)
                        for layer in range(n_layers):
                            writer.write_label_region(layer_label_name(layer), y0, x0, layers[layer])
                    bar.advance()
            writer.finish(display_windows=[(float(a), float(b)) for a, b in percentiles])
            # Tables first, then the record, then the store's rename: the record is the last word.
            if table is not None:
                table.close()
            if geojson is not None:
                geojson.close()
            on_complete(temporary, stitcher.n_instances, n_layers)
    except BaseException:
        if table is not None:
            table.discard()
        if geojson is not None:
            geojson.discard()
        raise
