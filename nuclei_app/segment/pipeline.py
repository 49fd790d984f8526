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
import os
import shutil
import time
from dataclasses import replace
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
from nuclei_app.provenance import path_sha256
from nuclei_app.progress import get_logger, progress_reporter
from nuclei_app.core.stitching import SlideStitcher, TileCandidates, paint_region
from nuclei_app.core.tiling import TileGrid, align_window, make_tile_grid
from nuclei_app.segment.executors import run_in_process, run_on_dask
from nuclei_app.segment.predictors import PredictorSpec, SCALE_MISMATCH, estimate_slide_diameter, get_predictor
from nuclei_app.segment.record import RUN_RECORD_NAME, write_run_record, read_run_record
from nuclei_app.segment.tiles import TileJob, batches_of, tile_cache_file
from nuclei_app.core.tissue import tissue_tiles
from nuclei_app.io.slides import tissue_overview
from nuclei_app.segment.record import SegmentationResult
from nuclei_app.core.channels import select_nuclear_channels
from nuclei_app.io.slides import channel_percentiles, open_slide
from nuclei_app.atomic import atomic_write_bytes
from nuclei_app.atomic import atomic_directory
from nuclei_app.io.tables import GeoJSONWriter, NucleiTableWriter
from nuclei_app.io.ngff import FLAT_LABEL_NAME, layer_label_name
from nuclei_app.io.ome_zarr import SegmentationZarrWriter


log = get_logger("nuclei_app.segment")


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
        tissue = tissue_tiles(*tissue_overview(slide, channels, percentiles), grid)

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
        batches = batches_of(tissue_positions, batch_size)
        cached = {p for p in tissue_positions if tile_cache_file(cache_dir, p).is_file()}
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

        with progress_reporter(sum(len(b) for b in todo), "segmenting tiles", enabled=progress, logger=log) as bar:

            def store(results: list[tuple[tuple[int, int], bytes]]) -> None:
                for position, data in results:
                    atomic_write_bytes(tile_cache_file(cache_dir, position), data)
                bar.advance(len(results))

            if jobs and (nprocs > 1 or dask_scheduler):
                run_on_dask(jobs, store, nprocs, dask_scheduler)
            else:
                run_in_process(jobs, store)

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
            write_run_record(temporary, outcome, inputs, parameters)
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

    stitcher = SlideStitcher(grid.n_rows, grid.n_cols, load)
    table: NucleiTableWriter | None = None
    geojson: GeoJSONWriter | None = None
    try:
        table = NucleiTableWriter(table_path, slide.channel_names, slide.pixel_size_um) if table_path else None
        geojson = GeoJSONWriter(geojson_path) if geojson_path else None
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

