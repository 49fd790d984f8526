"""Tile grids and their edge rules: every grid the app lays over an image lives here."""
from __future__ import annotations

import math
from dataclasses import dataclass
from nuclei_app.errors import (
    UsageError,
)
from nuclei_app.core.stitching import Box


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


def qc_tile_edges(size: int, tile: int) -> list[int]:
    """Tile boundaries along one axis: multiples of ``tile``, the last tile widened instead of
    leaving a sliver narrower than a quarter tile (its metrics would be noise).

    Returns
    -------
    list of int
        ``[0, tile, 2 * tile, ..., size]``.
    """
    edges = list(range(0, max(int(size), 1), int(tile))) + [int(size)]
    if len(edges) > 2 and edges[-1] - edges[-2] < tile / 4:
        del edges[-2]
    return edges


def tile_cores(starts: list[int], tile: int, size: int) -> list[tuple[float, float]]:
    """The part of one axis each tile owns: cores meet half-way across each overlap and
    partition ``[0, size)`` (the last tile, placed flush with the end, may overlap its
    neighbour by more than the nominal overlap)."""
    bounds = [0.0] + [(start + previous + tile) / 2 for previous, start in zip(starts, starts[1:])] + [float(size)]
    return list(zip(bounds[:-1], bounds[1:]))
