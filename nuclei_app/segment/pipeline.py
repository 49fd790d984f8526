"""Whole-slide segmentation: tissue mask, tile grid, batched tiled inference, stitching, streamed output.

Data flow of `segment_slide`::

    slide (lazy) ─► nuclear channels + whole-slide percentiles ─► tissue mask (low level)
      ─► tile grid (cores = output chunks) ─► batches of tissue tiles ─► predictor
      (in-process | dask.distributed) ─► per-tile candidates cached in the work dir
      ─► stitch in raster order (de-duplicate, ids, overlap layers) ─► table rows
      ─► label chunks + image chunks + pyramids ─► scores sidecar ─► completion record ─► rename

Whatever the options, the store keeps each nucleus's detection score, head agreement and
overlap count in ``nuclei-app_scores.tsv`` (`nuclei_app.io.tables.SCORES_NAME`): the
self-diagnosis reads them there instead of running the model a second time.

Memory is bounded by a few tiles: tiles are read lazily, candidates are kept as cropped
masks and re-read from the cache, and every output array is written chunk by chunk.
The tile function is a plain picklable job (`TileJob`, `run_tile_job`), so the same
code runs in-process, on a local `dask.distributed` cluster (``nprocs > 1``) or on an
existing scheduler; batches are fixed before any work starts and ids are assigned in
raster order afterwards, so every way of running gives identical labels.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from nuclei_app import __version__
from nuclei_app.atomic import atomic_directory, atomic_write_bytes
from nuclei_app.config import OUTLINE_CONTRAST_FRACTION, SegmentConfig
from nuclei_app.core.channels import select_nuclear_channels
from nuclei_app.core.stitching import SlideStitcher, TileCandidates, paint_region
from nuclei_app.core.tiling import TileGrid, align_window, fit_tiles_to_nuclei, make_tile_grid
from nuclei_app.core.tissue import tissue_tiles
from nuclei_app.errors import (
    BadDataError,
    CannotCreateOutputError,
    InputOutputError,
    MissingInputError,
    NucleiAppError,
    UsageError,
    os_error_to_user_error,
)
from nuclei_app.io.ngff import FLAT_LABEL_NAME, layer_label_name
from nuclei_app.io.ome_zarr import SegmentationZarrWriter
from nuclei_app.io.slides import channel_percentiles, open_slide, tissue_overview
from nuclei_app.io.tables import SCORES_NAME, GeoJSONWriter, NucleiTableWriter, NucleusScoresWriter
from nuclei_app.progress import get_logger, progress_reporter
from nuclei_app.provenance import path_sha256
from nuclei_app.segment.executors import DaskCluster, dask_cluster, run_jobs
from nuclei_app.io.slides import measure_nucleus_diameter
from nuclei_app.segment.predictors import PredictorSpec, SCALE_MISMATCH, get_predictor
from nuclei_app.segment.record import RUN_RECORD_NAME, SegmentationResult, read_run_record, write_run_record
from nuclei_app.segment.tiles import TileJob, batches_of, tile_cache_file


log = get_logger("nuclei_app.segment")


def _check_output_path(output_path: Path) -> None:
    """Refuse an output that is not an ``.ome.zarr`` name or holds something other than our output."""
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
    """Whether process ``pid`` runs (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def segment_slide(
    image_path: str | Path,
    output_path: str | Path,
    predictor: PredictorSpec,
    config: SegmentConfig = SegmentConfig(),
    *,
    table_path: str | Path | None = None,
    geojson_path: str | Path | None = None,
    cluster: DaskCluster | None = None,
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
    predictor : PredictorSpec
        A model folder or the weak labeler.
    config : SegmentConfig
        Tile geometry, batch size, device, score cut-off, nuclear channels, parallelism
        (``nprocs``, ``dask_scheduler``), ``resume`` and the work dir (default: ``.<output
        name>.work`` beside the output). Recorded in the store's run record.
    table_path : str or Path, optional
        Per-nucleus TSV to write (a ``.json`` column sidecar is written beside it).
    geojson_path : str or Path, optional
        GeoJSON FeatureCollection of nucleus polygons (QuPath detections).
    cluster : DaskCluster, optional
        A cluster the caller holds open (the BIDS App shares one across slides); default:
        the one ``config`` asks for, started only when tiles remain to be segmented.
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
    try:
        return _segment(
            _Request(Path(image_path), output_path, table_path, geojson_path, predictor, config, started),
            cluster, progress,
        )
    except OSError as error:
        raise os_error_to_user_error(error, error.filename or output_path) from None


@dataclass(frozen=True)
class _Request:
    """What `segment_slide` was asked for."""

    image_path: Path
    output_path: Path
    table_path: Path | None
    geojson_path: Path | None
    spec: PredictorSpec
    config: SegmentConfig
    started: float

    @property
    def work_root(self) -> Path:
        """The work dir: the configured one, or ``.<output name>.work`` beside the output."""
        if self.config.work_dir is not None:
            return Path(self.config.work_dir)
        return self.output_path.parent / f".{self.output_path.name}.work"


@dataclass(frozen=True)
class _SlidePlan:
    """What is known about the slide before any tile is segmented.

    ``spec`` carries the nucleus diameter settled for the whole slide (`_settle_scale`);
    ``predictor`` is the one the workers will build from it.
    """

    grid: TileGrid
    tissue: np.ndarray
    tissue_positions: list[tuple[int, int]]
    spec: PredictorSpec
    predictor: Any
    channels: list[int]
    channel_names: list[str]
    percentiles: np.ndarray
    pixel_size_um: tuple[float, float] | None
    warnings: list[str]


def _segment(request: _Request, cluster: DaskCluster | None, progress: bool) -> SegmentationResult:
    """`segment_slide` once its arguments are typed: plan, resume, segment tiles, write, clean up."""
    _check_request(request)
    with open_slide(request.image_path) as slide:
        plan = _plan_slide(slide, request)
        inputs = _input_records(request.image_path, plan.spec)
        parameters = _run_parameters(plan, request)
        if request.config.resume:
            finished = _finished_result(
                request.output_path, inputs, parameters, request.table_path, request.geojson_path, request.started
            )
            if finished is not None:
                log.info("output is complete and matches this run; nothing to do (%s)", request.output_path)
                return finished
        cache_dir = _prepare_cache(request, inputs, parameters)
        todo, reused = _pending_batches(plan, cache_dir, request.config.batch_size)
        _segment_tiles(plan, todo, cache_dir, request, cluster, progress)
        outcome = _write_outputs(slide, plan, cache_dir, request, reused, inputs, parameters, progress)
    shutil.rmtree(cache_dir, ignore_errors=True)
    work_root = request.work_root
    if work_root.is_dir() and not any(work_root.iterdir()):
        work_root.rmdir()
    log.info(
        "%d nuclei in %d layer(s); %d tiles (%d without tissue, %d reused) in %.1f s, %.2f MP/s of tissue -> %s",
        outcome.n_nuclei, outcome.n_layers, outcome.n_tiles, outcome.n_tiles_skipped_empty,
        outcome.n_tiles_reused, outcome.seconds, outcome.megapixels_per_second, request.output_path,
    )
    return outcome


def _check_request(request: _Request) -> None:
    """Refuse outputs that cannot be written and predictors that cannot run, before any work.

    Raises
    ------
    UsageError, CannotCreateOutputError, MissingInputError
    """
    _check_output_path(request.output_path)
    for extra in (request.table_path, request.geojson_path):
        if extra is not None and extra.exists() and extra.is_dir():
            raise CannotCreateOutputError("is a folder; give a file path for the table / GeoJSON", extra)
    spec = request.spec
    if spec.kind == "model" and not Path(spec.model_dir).is_dir():
        raise MissingInputError("model folder not found; train one with `nuclei-app train`", spec.model_dir)
    if spec.kind == "weak" and request.config.score_threshold is not None:
        raise UsageError("--score-threshold applies to a model (--model), not to the weak labeler")


def _plan_slide(slide: Any, request: _Request) -> _SlidePlan:
    """Grid, nuclear channels, whole-slide percentiles, tissue tiles and the slide's nucleus scale.

    The grid is laid twice when the slide's nuclei turn out too big for the requested
    overlap: once to find the tissue the nuclei are measured on, once grown to fit them
    (`nuclei_app.core.tiling.fit_tiles_to_nuclei`); the run record holds the grid used.
    """
    config = request.config
    _, height, width = slide.shape
    grid = make_tile_grid((height, width), config.tile, config.overlap)
    predictor = _predictor(request.spec, slide, config)
    channels = resolve_channels(slide, predictor, config.nuclear_channels)
    percentiles = channel_percentiles(slide, channels)
    overview = tissue_overview(slide, channels, percentiles)
    tissue = tissue_tiles(*overview, grid)
    tissue_positions = [position for position in grid.positions() if tissue[position]]
    spec, warnings = _settle_scale(slide, request.spec, predictor, channels, percentiles, grid, tissue_positions)
    predictor = _predictor(spec, slide, config)
    tile, overlap = fit_tiles_to_nuclei(config.tile, config.overlap, predictor.diameter_px)
    if (tile, overlap) != (grid.tile, grid.overlap):
        log.info("nuclei of %.0f px: tiles of %d px overlapping by %d px (asked: %d / %d)",
                 predictor.diameter_px, tile, overlap, config.tile, config.overlap)
        grid = make_tile_grid((height, width), tile, overlap)
        tissue = tissue_tiles(*overview, grid)
        tissue_positions = [position for position in grid.positions() if tissue[position]]
    if not tissue_positions:
        message = "no tissue found (the nuclear channels are blank or pure noise); the output has no nuclei"
        log.warning(message)
        warnings.append(message)
    return _SlidePlan(
        grid=grid, tissue=tissue, tissue_positions=tissue_positions, spec=spec,
        predictor=predictor, channels=channels,
        channel_names=[slide.channel_names[i] for i in channels], percentiles=percentiles,
        pixel_size_um=slide.pixel_size_um, warnings=warnings,
    )


def _predictor(spec: PredictorSpec, slide: Any, config: SegmentConfig) -> Any:
    """The predictor of ``spec`` for this slide, as ``config`` runs it."""
    return get_predictor(spec, slide.pixel_size_um, config.device, config.score_threshold)


def _settle_scale(
    slide: Any,
    spec: PredictorSpec,
    predictor: Any,
    channels: list[int],
    percentiles: np.ndarray,
    grid: TileGrid,
    tissue_positions: list[tuple[int, int]],
) -> tuple[PredictorSpec, list[str]]:
    """The spec with the nucleus diameter every tile will use, and any warning about the scale.

    The weak labeler always needs the slide's nucleus scale; a model needs it when the
    physical pixel size cannot map the slide onto the scale it was trained at. Nominal pixel
    sizes are often wrong (a default written by the scanner software or a converter), so a
    model's implied scale is checked against the nuclei actually in the slide.
    """
    model_knows_scale = spec.kind == "model" and bool(
        slide.pixel_size_um and predictor.card["scale"].get("training_diameter_um")
    )
    if spec.diameter is not None or (not tissue_positions and model_knows_scale):
        return spec, []
    measured = measure_nucleus_diameter(slide, channels, percentiles, [grid.window(*p) for p in tissue_positions])
    if not model_knows_scale:
        return replace(spec, diameter=measured), []
    implied = predictor.card["scale"]["training_diameter_um"] / float(np.mean(slide.pixel_size_um))
    if not measured or max(measured / implied, implied / measured) <= SCALE_MISMATCH:
        return spec, []
    message = (
        f"nuclei measure {measured:.1f} px in this slide, but its pixel size and the model's "
        f"training scale imply {implied:.1f} px; segmenting at the measured size (check the pixel size)"
    )
    log.warning(message)
    return replace(spec, diameter=measured), [message]


def _input_records(image_path: Path, spec: PredictorSpec) -> list[dict[str, str]]:
    """The slide (and the model folder) with their content hashes, for the run record."""
    inputs = [{"path": str(image_path.resolve()), "sha256": path_sha256(image_path)}]
    if spec.kind == "model":
        inputs.append({"path": str(Path(spec.model_dir).resolve()), "sha256": path_sha256(spec.model_dir)})
    return inputs


def _run_parameters(plan: _SlidePlan, request: _Request) -> dict[str, Any]:
    """Everything that influences the output (compared by ``resume``; recorded in the run record)."""
    spec, is_model = plan.spec, plan.spec.kind == "model"
    return {
        "predictor": {
            "kind": spec.kind,
            "method": None if is_model else spec.method,
            "diameter_px": spec.diameter,
            "score_threshold": plan.predictor.score_threshold if is_model else None,
            "outline_contrast_fraction": OUTLINE_CONTRAST_FRACTION if is_model else None,
        },
        "tile": plan.grid.tile,
        "overlap": plan.grid.overlap,
        "batch_size": int(request.config.batch_size),
        "nuclear_channels": plan.channel_names,
        "percentiles": [[float(v) for v in row] for row in plan.percentiles],
        "table": str(request.table_path) if request.table_path else None,
        "geojson": str(request.geojson_path) if request.geojson_path else None,
        "ngff_version": "0.4",
    }


def _prepare_cache(request: _Request, inputs: list[dict[str, str]], parameters: dict[str, Any]) -> Path:
    """The per-tile cache folder of these inputs and parameters (emptied without ``resume``),
    with partial outputs of killed runs removed.

    Tile results depend on the inputs and the parameters; output paths, parallelism and the
    device are left out of the key, so a resumed run may use another worker count (or GPU).
    """
    tile_parameters = {key: value for key, value in parameters.items() if key not in ("table", "geojson")}
    cache_key = hashlib.sha256(
        json.dumps({"inputs": [i["sha256"] for i in inputs], "parameters": tile_parameters,
                    "version": __version__}, sort_keys=True).encode()
    ).hexdigest()[:16]
    cache_dir = request.work_root / f"segment-{cache_key}"
    if not request.config.resume and cache_dir.exists():
        shutil.rmtree(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    table = request.table_path
    for path in (request.output_path, table, request.geojson_path, table and table.with_suffix(".json")):
        if path is not None:
            _remove_stale_partials(path)
    return cache_dir


def _pending_batches(
    plan: _SlidePlan, cache_dir: Path, batch_size: int
) -> tuple[list[list[tuple[int, int]]], int]:
    """Batches of tissue tiles still to segment, and how many tiles the cache already holds.

    A batch is redone whole when any of its tiles is missing: the predictor then sees
    exactly the same batch as an uninterrupted run (batching can change its output).
    """
    positions = plan.tissue_positions
    cached = {p for p in positions if tile_cache_file(cache_dir, p).is_file()}
    todo = [batch for batch in batches_of(positions, batch_size) if any(p not in cached for p in batch)]
    reused = len(positions) - sum(len(batch) for batch in todo)
    if positions:
        log.info(
            "%d of %d tiles hold tissue; reusing %d finished tile(s) from %s",
            len(positions), len(plan.grid), reused, cache_dir,
        )
    return todo, reused


def _segment_tiles(
    plan: _SlidePlan,
    todo: list[list[tuple[int, int]]],
    cache_dir: Path,
    request: _Request,
    cluster: DaskCluster | None,
    progress: bool,
) -> None:
    """Segment the pending batches (in this process or on Dask), caching each tile's result."""
    with progress_reporter(sum(len(b) for b in todo), "segmenting tiles", enabled=progress, logger=log) as bar:

        def store(results: list[tuple[tuple[int, int], bytes]]) -> None:
            for position, data in results:
                atomic_write_bytes(tile_cache_file(cache_dir, position), data)
            bar.advance(len(results))

        if not todo:
            return
        held: AbstractContextManager[DaskCluster | None] = (
            nullcontext(cluster) if cluster is not None else dask_cluster(request.config)
        )
        with held as target:
            threads = target.torch_threads if target is not None else None
            run_jobs(_tile_jobs(plan, todo, request, threads), store, target)


def _tile_jobs(
    plan: _SlidePlan, todo: list[list[tuple[int, int]]], request: _Request, torch_threads: int | None
) -> list[TileJob]:
    """One picklable `TileJob` per pending batch."""
    grid = plan.grid
    quantum = getattr(plan.predictor, "tile_origin_quantum_px", 1)
    return [
        TileJob(
            image_path=str(request.image_path.resolve()),
            spec=plan.spec,
            pixel_size_um=plan.pixel_size_um,
            nuclear_channels=tuple(plan.channels),
            percentiles=tuple((float(a), float(b)) for a, b in plan.percentiles),
            tiles=tuple((p, align_window(grid.window(*p), quantum), grid.core(*p)) for p in batch),
            image_shape=grid.shape,
            margin=max(1, grid.overlap // 4),
            device=request.config.device,
            score_threshold=request.config.score_threshold,
            torch_threads=torch_threads,
        )
        for batch in todo
    ]


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
    plan: _SlidePlan,
    cache_dir: Path,
    request: _Request,
    reused: int,
    inputs: list[dict[str, str]],
    parameters: dict[str, Any],
    progress: bool,
) -> SegmentationResult:
    """Stitch the cached tiles and stream the store, table and GeoJSON to temporary names.

    Tables first, then the run record (the last word), then the store's rename to its
    final name. On any failure the partial table and GeoJSON are discarded.
    """
    grid = plan.grid
    stitcher = SlideStitcher(grid.n_rows, grid.n_cols, _cached_tile_loader(plan.tissue, cache_dir))
    table: NucleiTableWriter | None = None
    geojson: GeoJSONWriter | None = None
    scores = NucleusScoresWriter(cache_dir / SCORES_NAME)
    try:
        if request.table_path:
            table = NucleiTableWriter(request.table_path, slide.channel_names, slide.pixel_size_um)
        geojson = (GeoJSONWriter(request.geojson_path, slide.channel_names, slide.pixel_size_um)
                   if request.geojson_path else None)
        with progress_reporter(len(grid), "stitching", enabled=progress, logger=log) as bar:
            for stitched in stitcher.run():
                for writer in (scores, table, geojson):
                    if writer is not None:
                        writer.write_tile(stitched)
                bar.advance()
        n_layers = max(1, stitcher.n_layers)
        with atomic_directory(request.output_path) as temporary:
            _write_store(temporary, slide, plan, stitcher, n_layers, progress)
            scores.close()
            shutil.move(str(scores.path), str(temporary / SCORES_NAME))
            for writer in (table, geojson):
                if writer is not None:
                    writer.close()
            outcome = _result(plan, request, reused, stitcher.n_instances, n_layers)
            write_run_record(temporary, outcome, inputs, parameters, request.config.to_dict())
    except BaseException:
        for writer in (scores, table, geojson):
            if writer is not None:
                writer.discard()
        raise
    return outcome


def _cached_tile_loader(tissue: np.ndarray, cache_dir: Path) -> Callable[[int, int], TileCandidates | None]:
    """The stitcher's source of tile results: the cache (None for tiles without tissue)."""

    def load(row: int, col: int) -> TileCandidates | None:
        if not tissue[row, col]:
            return None
        path = tile_cache_file(cache_dir, (row, col))
        try:
            return TileCandidates.from_bytes(path.read_bytes())
        except FileNotFoundError:
            raise InputOutputError("a cached tile result vanished during the run; rerun the command", path)
        except (ValueError, KeyError, OSError) as error:
            raise BadDataError(f"cached tile result is damaged ({error}); rerun with --no-resume", path) from None

    return load


def _write_store(
    store: Path, slide: Any, plan: _SlidePlan, stitcher: SlideStitcher, n_layers: int, progress: bool
) -> None:
    """Write the nuclear channels, the flat label view and the overlap layers, one output chunk (core) at a time."""
    grid = plan.grid
    writer = SegmentationZarrWriter(
        store, grid.shape, slide.dtype, plan.channel_names, slide.pixel_size_um, chunk=grid.stride
    )
    writer.add_labels([FLAT_LABEL_NAME, *(layer_label_name(k) for k in range(n_layers))])
    with progress_reporter(len(grid), "writing labels", enabled=progress, logger=log) as bar:
        for row, col in grid.positions():
            box = grid.core(row, col)
            y0, x0, y1, x1 = box
            writer.write_image_region(y0, x0, slide.read_region(y0, x0, y1 - y0, x1 - x0, channels=plan.channels))
            instances = stitcher.instances_in(box, row, col)
            if instances:
                flat, layers = paint_region(box, instances, n_layers)
                writer.write_label_region(FLAT_LABEL_NAME, y0, x0, flat)
                for layer in range(n_layers):
                    writer.write_label_region(layer_label_name(layer), y0, x0, layers[layer])
            bar.advance()
    writer.finish(display_windows=[(float(a), float(b)) for a, b in plan.percentiles])


def _result(plan: _SlidePlan, request: _Request, reused: int, n_nuclei: int, n_layers: int) -> SegmentationResult:
    """The `SegmentationResult` of a run that segmented (part of) the slide now."""
    grid = plan.grid
    seconds = time.monotonic() - request.started
    tissue_mp = sum(grid.core_area(*p) for p in plan.tissue_positions) / 1e6
    return SegmentationResult(
        output_path=request.output_path,
        table_path=request.table_path,
        geojson_path=request.geojson_path,
        record_path=request.output_path / RUN_RECORD_NAME,
        n_nuclei=n_nuclei,
        n_layers=n_layers,
        n_tiles=len(grid),
        n_tiles_skipped_empty=len(grid) - len(plan.tissue_positions),
        n_tiles_reused=reused,
        seconds=round(seconds, 3),
        tissue_megapixels=round(tissue_mp, 4),
        megapixels_per_second=round(tissue_mp / seconds, 4) if seconds > 0 else 0.0,
        nuclear_channels=plan.channel_names,
        warnings=list(plan.warnings),
    )
