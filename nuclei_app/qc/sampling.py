"""Which QC tiles the weak teacher runs on: a stratified, seeded sample (pure).

The weak LoG teacher behind ``teacher_student_f1`` and ``seed_recall`` costs about as much per
tile as the segmentation itself, so QC runs it on a sample of the analysed tiles only:

- how many: ``max(teacher_tiles_min, ceil(teacher_tiles_share * n))`` of the ``n`` analysed
  tiles, at most ``n`` (`QCThresholds`; with ``teacher_tiles_share = 1`` every tile);
- how chosen: the analysed tiles are sorted by their provisional QC score (the score of the
  components known without the teacher: foreground coverage and precision, mean detection
  score, mean head agreement; tiles without any first, then ties in grid order), cut into as
  many strata of consecutive tiles as there are tiles to draw (sizes differ by at most one),
  and one tile is drawn uniformly from each stratum. Every quality level of the slide, the
  worst tiles included, is therefore represented (tiles outside the sample take the slide's
  pooled teacher values in their QC score, `nuclei_app.qc.slide.finish_tile_records`);
- the draws come from the ``qc_teacher_tiles`` stream of `nuclei_app.seeding` keyed by
  ``teacher_sample_seed``: the same slide, labels and seed give the same tiles.
"""
from __future__ import annotations

import math

import numpy as np

from nuclei_app.seeding import generator


def teacher_sample_size(n_tiles: int, minimum: int, share: float) -> int:
    """How many of ``n_tiles`` analysed tiles the teacher runs on (see the module docstring)."""
    return min(n_tiles, max(minimum, math.ceil(share * n_tiles)))


def stratified_sample(keys: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Positions of ``size`` items drawn one per stratum of ``keys`` (see the module docstring).

    Parameters
    ----------
    keys : ndarray of float, shape (n,)
        The stratification key per item (NaN: unknown, sorted first).
    size : int
        Items to draw (at most n).
    seed : int
        Seed of the ``qc_teacher_tiles`` stream.

    Returns
    -------
    ndarray of int64, shape (size,)
        Sorted positions into ``keys``.
    """
    keys = np.asarray(keys, dtype=np.float64)
    size = min(int(size), keys.size)
    if size <= 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(np.where(np.isfinite(keys), keys, -np.inf), kind="stable")
    edges = np.linspace(0, keys.size, size + 1).round().astype(np.int64)
    rng = generator(seed, "qc_teacher_tiles")
    picks = [order[int(rng.integers(start, stop))] for start, stop in zip(edges[:-1], edges[1:])]
    return np.sort(np.asarray(picks, dtype=np.int64))
