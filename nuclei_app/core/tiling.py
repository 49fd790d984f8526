"""Tile grids and their edge rules: every grid the app lays over an image lives here.

One edge rule splits an axis into pieces (`axis_edges`): edges at multiples of a step, and
a last piece narrower than a minimum merged into the one before it, so that no piece is a
sliver. The segmentation grid (`make_tile_grid`: its cores are the output chunks) and the
QC tile grid (`qc_tile_edges`) both use it, each with its own minimum. Training-time tiled
prediction (`tile_cores`) is a different thing, described there.

The settings a user gives (which tile and overlap are accepted) are validated by
`nuclei_app.config.SegmentConfig`; the functions here only refuse impossible geometry.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from nuclei_app.core.stitching import Box


# ======================================================================================
# The edge rule
# ======================================================================================


def axis_edges(size: int, step: int, min_last: float) -> tuple[int, ...]:
    """Boundaries of the pieces one axis is cut into.

    Pieces start at multiples of ``step``; the last one ends at ``size``. When that last
    piece would be narrower than ``min_last`` it is merged into the one before it (which
    grows by less than ``min_last``), so no piece is a sliver.

    Parameters
    ----------
    size : int
        Length of the axis, pixels (0 gives the single empty piece ``(0, 0)``).
    step : int
        Nominal piece length, pixels (at least 1).
    min_last : float
        Narrowest last piece kept on its own, pixels (0: never merge).

    Returns
    -------
    tuple of int
        ``(0, step, 2 * step, ..., size)``: ``n_pieces + 1`` increasing values.

    Raises
    ------
    ValueError
        ``step`` below 1.
    """
    size, step = int(size), int(step)
    if step < 1:
        raise ValueError(f"the step between edges must be at least 1 pixel, got {step}")
    edges = list(range(0, max(size, 1), step)) + [size]
    if len(edges) > 2 and edges[-1] - edges[-2] < min_last:
        del edges[-2]
    return tuple(edges)


# ======================================================================================
# Segmentation grid: cores are output chunks
# ======================================================================================


@dataclass(frozen=True)
class TileGrid:
    """Overlapping tiles over a slide whose cores partition it.

    Cores start at multiples of ``stride = tile - overlap`` (so they coincide with output
    chunks of side ``stride``; `axis_edges` with a minimum of ``overlap``: a last core
    thinner than the overlap joins the one before it); a tile's window is its core plus half
    the overlap on every side that is not a slide border, clipped to the slide.

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
        """Distance between core starts (``tile - overlap``), the output chunk side."""
        return self.tile - self.overlap

    @property
    def n_rows(self) -> int:
        """Rows of tiles."""
        return len(self.row_edges) - 1

    @property
    def n_cols(self) -> int:
        """Columns of tiles."""
        return len(self.col_edges) - 1

    def __len__(self) -> int:
        return self.n_rows * self.n_cols

    def core(self, row: int, col: int) -> Box:
        """(y0, x0, y1, x1) of the tile's core."""
        return self.row_edges[row], self.col_edges[col], self.row_edges[row + 1], self.col_edges[col + 1]

    def core_area(self, row: int, col: int) -> int:
        """Pixels in the tile's core."""
        y0, x0, y1, x1 = self.core(row, col)
        return (y1 - y0) * (x1 - x0)

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

    The tile and overlap a user may choose are validated by `nuclei_app.config.SegmentConfig`
    (tile at least 64, overlap below half of it); this accepts any geometry that works.

    Raises
    ------
    ValueError
        ``tile`` below 1, or ``overlap`` negative or more than half the tile (windows two
        tiles apart would overlap).
    """
    tile, overlap = int(tile), int(overlap)
    if tile < 1 or overlap < 0 or 2 * overlap > tile:
        raise ValueError(f"impossible tile geometry: tile {tile}, overlap {overlap} (0 <= 2 * overlap <= tile)")
    height, width = int(shape_yx[0]), int(shape_yx[1])
    return TileGrid(
        shape=(height, width),
        tile=tile,
        overlap=overlap,
        row_edges=axis_edges(height, tile - overlap, overlap),
        col_edges=axis_edges(width, tile - overlap, overlap),
    )


#: The overlap `fit_tiles_to_nuclei` keeps, in typical nucleus diameters: a window reaches
#: half the overlap past its core, so a nucleus centred on the core's edge fits in the window
#: while it is at most this many typical diameters wide (large nuclei run about 1.5x the median).
OVERLAP_IN_DIAMETERS = 2.0

#: ... and the tile side at least this many overlaps, so cores stay most of every window.
TILE_IN_OVERLAPS = 4


def fit_tiles_to_nuclei(tile: int, overlap: int, diameter_px: float | None) -> tuple[int, int]:
    """The tile side and overlap to segment with, grown where nuclei are too big for them.

    A nucleus is kept by the tile whose core holds its centre, so the window must reach
    past the core by more than the nucleus' radius; otherwise nuclei on seams are cut. On
    a 63x slide nuclei are 80-150 px wide, far more than a 64-px default overlap: there the
    overlap grows to `OVERLAP_IN_DIAMETERS` diameters (rounded up to 16 px) and the tile to
    `TILE_IN_OVERLAPS` overlaps. Settings that already fit are returned unchanged.

    Parameters
    ----------
    tile, overlap : int
        The requested tile side and overlap, level-0 pixels.
    diameter_px : float or None
        Typical nucleus diameter in level-0 pixels (None: unknown, nothing changes).

    Returns
    -------
    (int, int)
        ``(tile, overlap)`` to build the grid with (`make_tile_grid`).
    """
    if not diameter_px or diameter_px <= 0:
        return int(tile), int(overlap)
    needed = 16 * math.ceil(OVERLAP_IN_DIAMETERS * float(diameter_px) / 16)
    if overlap >= needed:
        return int(tile), int(overlap)
    return max(int(tile), TILE_IN_OVERLAPS * needed), needed


# ======================================================================================
# QC grid: tiles without overlap
# ======================================================================================


def qc_tile_edges(size: int, tile: int) -> list[int]:
    """QC tile boundaries along one axis: `axis_edges` with a minimum of a quarter tile (a
    narrower last tile would give noisy metrics, so it widens the one before instead).

    Returns
    -------
    list of int
        ``[0, tile, 2 * tile, ..., size]``.
    """
    return list(axis_edges(size, tile, tile / 4))


# ======================================================================================
# Training-time tiled prediction: fixed-size windows, cores derived
# ======================================================================================


def tile_cores(starts: list[int], tile: int, size: int) -> list[tuple[float, float]]:
    """The part of one axis each fixed-size window owns, for tiled prediction during training.

    Kept apart from `TileGrid` because the geometry is built the other way round: there the
    cores are fixed first (they are the output chunks) and windows are derived and clipped at
    the slide border; here the windows are fixed first (every one exactly ``tile`` wide, the
    last placed flush with the end, so the model never sees a padded window) and the cores
    are derived. Cores meet half-way across each overlap, as `TileGrid`'s do, and partition
    ``[0, size)``; the last window may overlap its neighbour by more than the nominal overlap.
    Bounds are fractional: they are compared with box centres.

    Parameters
    ----------
    starts : list of int
        Window origins along the axis, increasing.
    tile : int
        Window side.
    size : int
        Axis length.

    Returns
    -------
    list of (float, float)
        ``[start, end)`` of each window's core.
    """
    bounds = [0.0] + [(start + previous + tile) / 2 for previous, start in zip(starts, starts[1:])] + [float(size)]
    return list(zip(bounds[:-1], bounds[1:]))
