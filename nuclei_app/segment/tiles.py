"""Tile jobs: the unit of work that runs in-process or on a Dask worker."""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
import numpy as np
from nuclei_app.errors import (
    BadDataError,
    MissingInputError,
)
from nuclei_app.core.intensity import normalise_intensities
from nuclei_app.core.stitching import Box, tile_candidates
from nuclei_app.segment.predictors import PredictorSpec, get_predictor
from nuclei_app.io.slides import open_slide


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
    device : {"auto", "cpu", "cuda"}
        Where a model runs (`nuclei_app.config.SegmentConfig.device`).
    score_threshold : float or None
        A model's score cut-off (None: its card's).
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
    device: str = "cpu"
    score_threshold: float | None = None
    torch_threads: int | None = None


@lru_cache(maxsize=4)
def _open_slide_cached(path: str, modified_ns: int) -> Any:

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
    predictor = get_predictor(job.spec, job.pixel_size_um, job.device, job.score_threshold)
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


def batches_of(positions: list[tuple[int, int]], size: int) -> list[list[tuple[int, int]]]:
    """``positions`` cut into consecutive batches of ``size`` (the last may be shorter)."""
    return [positions[start : start + size] for start in range(0, len(positions), size)]


def tile_cache_file(cache_dir: Path, position: tuple[int, int]) -> Path:
    """Where the cached result of the tile at ``position`` (row, col) lives."""
    return cache_dir / f"tile_r{position[0]:05d}_c{position[1]:05d}.npz"

