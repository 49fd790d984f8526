"""The seed paper's no-ground-truth measures, so users can set our numbers beside theirs.

- *Signal coverage*: the intensity-weighted share of above-noise nuclear signal that lies inside
  the predicted nuclei, for the masks as they are and dilated by 1-4 px (the paper reports
  93.9-98.6 % on its unlabelled sets).
- *Clumps*: after eroding the nuclei foreground by a disk of radius 2, connected blobs
  (4-connectivity) that hold more than one predicted nucleus; each clump's nucleus count.

Pure functions over arrays; `nuclei_app.core.noise.noise_threshold` gives the noise level.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from nuclei_app.qc.metrics import format_number

#: Dilations (px) at which signal coverage is reported, as in the paper's toolkit.
COVERAGE_DILATIONS: tuple[int, ...] = (0, 1, 2, 3, 4)
CLUMP_EROSION_RADIUS = 2
_CROSS = ndimage.generate_binary_structure(2, 1)


def _disk(radius: int) -> np.ndarray:
    grid = np.arange(-radius, radius + 1)
    return (grid[:, None] ** 2 + grid[None, :] ** 2) <= radius**2


def above_noise_signal(channels: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """The nuclear signal with every pixel below its channel's noise threshold set to 0.

    Parameters
    ----------
    channels : ndarray, shape (C, Y, X)
    thresholds : ndarray, shape (C,)

    Returns
    -------
    ndarray of float64, shape (C, Y, X)
    """
    signal = np.nan_to_num(np.asarray(channels, dtype=np.float64))
    limits = np.asarray(thresholds, dtype=np.float64).reshape(-1, 1, 1)
    return np.where(signal < limits, 0.0, signal)


def signal_coverage_sums(signal: np.ndarray, labels: np.ndarray, region: tuple[slice, slice] | None = None,
                         dilations: tuple[int, ...] = COVERAGE_DILATIONS) -> tuple[dict[int, float], float]:
    """Numerators and denominator of the signal coverage over ``region``, masks dilated on the whole array.

    Summing these over the tiles of a slide (each tile's region its core, the array its window
    with a halo of more than the largest dilation) gives the slide's coverage exactly, as if the
    whole slide had been measured at once.

    Parameters
    ----------
    signal : ndarray of float, shape (C, Y, X)
        `above_noise_signal`.
    labels : ndarray of int, shape (Y, X)
        Predicted nuclei (0 = background).
    region : (slice, slice), optional
        Where the sums are taken (default: everywhere).
    dilations : tuple of int
        Radii (px); dilation by r is r successive dilations by a disk of radius 1 (a cross).

    Returns
    -------
    covered : dict of int to float
        Signal inside the (dilated) nuclei in ``region``, per radius.
    total : float
        All the above-noise signal in ``region``.
    """
    region = region if region is not None else (slice(None), slice(None))
    inside = signal[(slice(None), *region)].sum(axis=0)
    total = float(inside.sum())
    mask = np.asarray(labels) > 0
    covered: dict[int, float] = {}
    radius = 0
    for target in sorted(dilations):
        if target > radius:
            mask = ndimage.binary_dilation(mask, structure=_CROSS, iterations=target - radius)
            radius = target
        covered[target] = float(inside[mask[region]].sum())
    return covered, total


def signal_coverage_by_dilation(signal: np.ndarray, labels: np.ndarray,
                                dilations: tuple[int, ...] = COVERAGE_DILATIONS) -> dict[int, float | None]:
    """Share of the above-noise signal inside the nuclei, per dilation of the nuclei mask.

    Parameters
    ----------
    signal : ndarray of float, shape (C, Y, X)
        `above_noise_signal` (every nuclear channel counts, summed).
    labels : ndarray of int, shape (Y, X)
        Predicted nuclei (0 = background).
    dilations : tuple of int
        Radii (px); dilation by r is r successive dilations by a disk of radius 1 (a cross).

    Returns
    -------
    dict of int to float or None
        Coverage in [0, 1] per radius; None when the region holds no signal above noise.
    """
    covered, total = signal_coverage_sums(signal, labels, None, dilations)
    return {radius: coverage_ratio(value, total) for radius, value in covered.items()}


def coverage_ratio(covered: float, total: float) -> float | None:
    """``covered / total`` clipped to [0, 1] (float sums can overshoot by an ulp); None when ``total`` is 0."""
    return None if total <= 0 else float(min(1.0, max(0.0, covered / total)))


def clump_sizes(labels: np.ndarray, erosion_radius: int = CLUMP_EROSION_RADIUS) -> np.ndarray:
    """Nucleus count of every clump: a 4-connected blob of the eroded foreground holding > 1 nucleus.

    Parameters
    ----------
    labels : ndarray of int, shape (Y, X)

    Returns
    -------
    ndarray of int64, shape (n_clumps,)
        Nuclei per clump, in blob order (raster order of each blob's first pixel).
    """
    labels = np.asarray(labels)
    eroded = ndimage.binary_erosion(labels > 0, structure=_disk(erosion_radius))
    blobs, n_blobs = ndimage.label(eroded, structure=_CROSS)
    if n_blobs == 0:
        return np.zeros(0, dtype=np.int64)
    pairs = np.unique(np.stack([blobs[eroded], labels[eroded]]), axis=1)
    counts = np.bincount(pairs[0], minlength=n_blobs + 1)[1:]
    return counts[counts > 1].astype(np.int64)


def clump_summary(labels: np.ndarray) -> dict[str, float | int | None]:
    """``clump_count`` (clumps), ``clump_share`` (clumps per nucleus) and ``clump_mean_size``."""
    sizes = clump_sizes(labels)
    n_nuclei = len(np.unique(labels[labels > 0]))
    return {
        "clump_count": int(len(sizes)),
        "clump_share": None if n_nuclei == 0 else float(len(sizes) / n_nuclei),
        "clump_mean_size": None if len(sizes) == 0 else float(sizes.mean()),
    }


def clump_links(labels: np.ndarray, region: tuple[slice, slice], origin: tuple[int, int], slide_width: int,
                erosion_radius: int = CLUMP_EROSION_RADIUS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What one tile tells about the slide's clumps: nuclei linked by an eroded blob, and where each starts.

    The foreground of ``labels`` (a tile's window: its core plus a halo) is eroded and its
    4-connected blobs are labelled, as `clump_sizes` does. Every blob links the nuclei it holds
    (an edge between consecutive ids). Erosion at the window's edge only removes pixels, so the
    links are never false, and every pair of neighbouring eroded pixels of the slide lies in the
    core of some tile, so the links of all tiles connect exactly the nuclei of each slide-wide
    clump (`SignalCoverageTotals.clumps`), however far a clump reaches across tiles.

    Parameters
    ----------
    labels : ndarray of int, shape (h, w)
        Predicted nuclei of the window.
    region : (slice, slice)
        The tile's core in the window.
    origin : (int, int)
        (y, x) of the window's first pixel in the slide.
    slide_width : int
        X of the slide (raster positions).
    erosion_radius : int

    Returns
    -------
    links : ndarray of int64, shape (k, 2)
        Pairs of nucleus ids in one blob.
    ids : ndarray of int64, shape (m,)
        Nuclei with an eroded pixel in the core.
    first_pixel : ndarray of int64, shape (m,)
        Raster position (``y * slide_width + x``, slide pixels) of each one's first eroded pixel in the core.
    """
    labels = np.asarray(labels)
    eroded = ndimage.binary_erosion(labels > 0, structure=_disk(erosion_radius))
    blobs, _ = ndimage.label(eroded, structure=_CROSS)
    pairs = np.unique(np.stack([blobs[eroded], labels[eroded]]).astype(np.int64), axis=1)  # sorted by blob, id
    same_blob = pairs[0, 1:] == pairs[0, :-1]
    links = np.stack([pairs[1, :-1][same_blob], pairs[1, 1:][same_blob]], axis=1)
    core_eroded = np.zeros_like(eroded)
    core_eroded[region] = eroded[region]
    rows, cols = np.nonzero(core_eroded)  # raster order: the first pixel of each id comes first
    ids, first = np.unique(labels[rows, cols].astype(np.int64), return_index=True)
    first_pixel = (rows[first] + origin[0]).astype(np.int64) * slide_width + (cols[first] + origin[1])
    return links, ids, first_pixel


@dataclass
class SignalCoverageTotals:
    """The seed paper's measures of a slide, accumulated tile by tile (memory: O(nuclei), not O(pixels)).

    Attributes
    ----------
    dilations : tuple of int
        Radii of the coverage.
    covered : dict of int to float
        Above-noise signal inside the (dilated) nuclei, summed over the tiles' cores.
    total : float
        All above-noise signal, summed over the tiles' cores.
    links, ids, first_pixels : list of ndarray
        `clump_links` of each tile.
    """

    dilations: tuple[int, ...] = COVERAGE_DILATIONS
    covered: dict[int, float] = field(default_factory=dict)
    total: float = 0.0
    links: list[np.ndarray] = field(default_factory=list)
    ids: list[np.ndarray] = field(default_factory=list)
    first_pixels: list[np.ndarray] = field(default_factory=list)

    def add_coverage(self, covered: dict[int, float], total: float) -> None:
        """Add one tile's `signal_coverage_sums`."""
        for radius, value in covered.items():
            self.covered[radius] = self.covered.get(radius, 0.0) + value
        self.total += total

    def add_clump_links(self, links: np.ndarray, ids: np.ndarray, first_pixel: np.ndarray) -> None:
        """Add one tile's `clump_links`."""
        self.links.append(links)
        self.ids.append(ids)
        self.first_pixels.append(first_pixel)

    def coverage(self) -> dict[int, float | None]:
        """Slide coverage per radius: the ratio of the summed numerators and denominator."""
        return {radius: coverage_ratio(self.covered.get(radius, 0.0), self.total) for radius in self.dilations}

    def clumps(self) -> tuple[np.ndarray, np.ndarray]:
        """Every clump of the slide, each once: its nucleus count and its first pixel.

        Returns
        -------
        sizes : ndarray of int64, shape (n_clumps,)
            Nuclei per clump (> 1), in raster order of the clumps' first eroded pixels.
        first_pixel : ndarray of int64, shape (n_clumps,)
            Raster position (``y * slide_width + x``) of each clump's first eroded pixel: the
            tile whose core holds it owns the clump.
        """
        if not self.ids or not any(len(ids) for ids in self.ids):
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        all_ids = np.concatenate(self.ids)
        all_first = np.concatenate(self.first_pixels)
        nodes = np.unique(all_ids)
        first = np.full(len(nodes), np.iinfo(np.int64).max)
        np.minimum.at(first, np.searchsorted(nodes, all_ids), all_first)
        links = np.concatenate(self.links) if self.links else np.zeros((0, 2), dtype=np.int64)
        # Links name only nuclei with eroded pixels, and those have eroded pixels in some core.
        a, b = np.searchsorted(nodes, links[:, 0]), np.searchsorted(nodes, links[:, 1])
        graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(len(nodes), len(nodes)))
        _, component = connected_components(graph, directed=False)
        sizes = np.bincount(component)
        starts = np.full(len(sizes), np.iinfo(np.int64).max)
        np.minimum.at(starts, component, first)
        clumped = sizes > 1
        order = np.argsort(starts[clumped], kind="stable")
        return sizes[clumped][order].astype(np.int64), starts[clumped][order]


#: Slide metrics of the seed paper, in report order after `nuclei_app.qc.metrics.SLIDE_METRICS`.
SEED_PAPER_SLIDE_METRICS: tuple[str, ...] = (
    "signal_coverage", "signal_coverage_by_dilation", "noise_threshold", "clump_count", "clump_share", "clump_mean_size",
)


#: Tile metrics of the seed paper (the noise thresholds are the slide's, measured once).
SEED_PAPER_TILE_METRICS: tuple[str, ...] = (
    "signal_coverage", "signal_coverage_by_dilation", "clump_count", "clump_share", "clump_mean_size",
)


def signal_coverage_fields(covered: dict[int, float], total: float,
                           dilations: tuple[int, ...] = COVERAGE_DILATIONS) -> dict[str, Any]:
    """A report's ``signal_coverage`` (undilated) and ``signal_coverage_by_dilation`` (keys: radius in px).

    Parameters
    ----------
    covered : dict of int to float
        Signal inside the (dilated) nuclei per radius (`signal_coverage_sums`, or their sums over tiles).
    total : float
        All above-noise signal.
    dilations : tuple of int

    Returns
    -------
    dict
        Ratios rounded to 6 decimals; None without above-noise signal.
    """
    ratios = {radius: format_number(coverage_ratio(covered.get(radius, 0.0), total)) for radius in dilations}
    return {"signal_coverage": ratios[0], "signal_coverage_by_dilation": {str(r): v for r, v in ratios.items()}}


def clump_fields(sizes: np.ndarray, n_nuclei: int) -> dict[str, Any]:
    """``clump_count``, ``clump_share`` (clumps per nucleus; None without nuclei) and ``clump_mean_size``.

    Parameters
    ----------
    sizes : ndarray of int, shape (n_clumps,)
        Nuclei per clump.
    n_nuclei : int
        Nuclei the share is taken over.

    Returns
    -------
    dict
    """
    sizes = np.asarray(sizes)
    return {
        "clump_count": int(len(sizes)),
        "clump_share": None if n_nuclei == 0 else format_number(len(sizes) / n_nuclei),
        "clump_mean_size": None if len(sizes) == 0 else format_number(float(sizes.mean())),
    }


def seed_paper_tile_clumps(tiles: list[dict[str, Any]], totals: SignalCoverageTotals, slide_width: int) -> None:
    """Give each tile record the clumps it owns (in place): each clump once, by the tile holding its first pixel.

    A clump's first pixel (raster order, `SignalCoverageTotals.clumps`) is a nucleus pixel, so
    the tile whose core holds it always holds nuclei and is analysed. ``clump_share`` is the
    tile's clumps per nucleus centred in the tile (None without such nuclei).

    Parameters
    ----------
    tiles : list of dict
        Analysed tile records (``y0``, ``x0``, ``n_nuclei``).
    totals : SignalCoverageTotals
    slide_width : int
        X of the slide (decodes the raster positions).
    """
    sizes, starts = totals.clumps()
    by_origin = {(t["y0"], t["x0"]): t for t in tiles}
    rows = np.unique([t["y0"] for t in tiles]).astype(np.int64)
    cols = np.unique([t["x0"] for t in tiles]).astype(np.int64)
    owned: dict[tuple[int, int], list[int]] = {}
    if len(sizes) and len(tiles):
        ys, xs = starts // slide_width, starts % slide_width
        owner_y = rows[np.clip(np.searchsorted(rows, ys, side="right") - 1, 0, None)]
        owner_x = cols[np.clip(np.searchsorted(cols, xs, side="right") - 1, 0, None)]
        for size, y0, x0 in zip(sizes, owner_y, owner_x):
            owned.setdefault((int(y0), int(x0)), []).append(int(size))
    for origin, record in by_origin.items():
        record.update(clump_fields(np.asarray(owned.get(origin, []), dtype=np.int64), record["n_nuclei"]))


def seed_paper_slide_metrics(totals: SignalCoverageTotals, n_nuclei: int,
                             noise_thresholds: np.ndarray | None) -> dict[str, Any]:
    """The slide's `SEED_PAPER_SLIDE_METRICS` from the sums over its tiles, JSON-ready.

    Parameters
    ----------
    totals : SignalCoverageTotals
    n_nuclei : int
        The slide's nuclei (``clump_share`` = clumps / nuclei).
    noise_thresholds : ndarray of float, shape (C,), or None
        Per nuclear channel, raw units.

    Returns
    -------
    dict
    """
    sizes, _ = totals.clumps()
    thresholds = [] if noise_thresholds is None else [format_number(v) for v in np.asarray(noise_thresholds, float)]
    return {
        **signal_coverage_fields(totals.covered, totals.total, totals.dilations),
        "noise_threshold": thresholds,
        **clump_fields(sizes, n_nuclei),
    }
