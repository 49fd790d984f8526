"""A slide at a glance: a thumbnail of the nuclear channel(s), built tile by tile, with the QC scores on it.

The QC reads a slide one tile at a time, so the thumbnail is built the same way: each tile's
nuclear composite is summed into blocks of ``factor x factor`` slide pixels
(`ThumbnailCanvas`, memory: the thumbnail only, at most `THUMBNAIL_MAX_SIDE` px a side), and
the block means are the thumbnail's pixels, exactly as if the whole slide had been averaged
at once. `score_thumbnail_png` then tints every analysed tile by its QC score (red below the
flag threshold, through yellow at it, to green at 1) and frames the worst and the median tile.
Pure arrays in, PNG bytes out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import imagecodecs
import numpy as np

#: Longest side of a slide thumbnail, pixels.
THUMBNAIL_MAX_SIDE = 512

#: How strongly a tile's score colour covers the grey image (0: not at all, 1: opaque).
SCORE_ALPHA = 0.35

#: Colours of the score scale (RGB): bad, at the flag threshold, perfect.
SCORE_RED, SCORE_YELLOW, SCORE_GREEN = (215, 48, 39), (254, 224, 100), (26, 152, 80)

#: Score below the flag threshold at which a tile is fully red.
RED_BELOW_FLAG = 0.2

#: Frames of the tiles drawn in the report (RGB).
WORST_FRAME, MEDIAN_FRAME = (230, 0, 230), (0, 200, 255)


def thumbnail_factor(shape: tuple[int, int], max_side: int = THUMBNAIL_MAX_SIDE) -> int:
    """Smallest whole downsampling factor that brings the slide's longer side to ``max_side`` or less.

    Parameters
    ----------
    shape : (int, int)
        (Y, X) of the slide.
    max_side : int

    Returns
    -------
    int, at least 1
    """
    return max(1, math.ceil(max(shape) / max_side))


@dataclass
class ThumbnailCanvas:
    """Block means of a slide's composite, accumulated tile by tile.

    Attributes
    ----------
    shape : (int, int)
        (Y, X) of the slide.
    factor : int
        Slide pixels per thumbnail pixel, each way.
    sums, counts : ndarray of float64, shape (ceil(Y / factor), ceil(X / factor))
        Sum and number of the slide pixels added to each thumbnail pixel.
    """

    shape: tuple[int, int]
    factor: int
    sums: np.ndarray = field(init=False)
    counts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        size = (math.ceil(self.shape[0] / self.factor), math.ceil(self.shape[1] / self.factor))
        self.sums = np.zeros(size)
        self.counts = np.zeros(size)

    @classmethod
    def for_slide(cls, shape: tuple[int, int], max_side: int = THUMBNAIL_MAX_SIDE) -> "ThumbnailCanvas":
        """A canvas for a slide of ``shape`` at `thumbnail_factor`."""
        return cls(tuple(shape), thumbnail_factor(shape, max_side))

    def _groups(self, start: int, length: int) -> tuple[np.ndarray, int]:
        """Starts (in the tile) of the runs of pixels that fall into one thumbnail pixel, and the first one's index."""
        positions = start + np.arange(length)
        starts = np.flatnonzero(positions % self.factor == 0)
        if starts.size == 0 or starts[0] != 0:
            starts = np.concatenate([[0], starts])
        return starts, start // self.factor

    def add(self, values: np.ndarray, y0: int, x0: int) -> None:
        """Add a tile's values (e.g. its nuclear composite, without halo) whose first pixel is at (y0, x0).

        Parameters
        ----------
        values : ndarray of float, shape (h, w)
        y0, x0 : int
            Position of the tile in slide pixels.
        """
        values = np.nan_to_num(np.asarray(values, dtype=np.float64))
        rows, first_row = self._groups(y0, values.shape[0])
        cols, first_col = self._groups(x0, values.shape[1])
        block = np.add.reduceat(np.add.reduceat(values, rows, axis=0), cols, axis=1)
        heights = np.diff(np.concatenate([rows, [values.shape[0]]]))
        widths = np.diff(np.concatenate([cols, [values.shape[1]]]))
        target = (slice(first_row, first_row + len(rows)), slice(first_col, first_col + len(cols)))
        self.sums[target] += block
        self.counts[target] += np.outer(heights, widths)

    def image(self) -> np.ndarray:
        """The thumbnail: block means (0 where nothing was added), float64 of shape ``sums.shape``."""
        return np.divide(self.sums, self.counts, out=np.zeros_like(self.sums), where=self.counts > 0)


def score_colours(scores: np.ndarray, flag_below: float) -> np.ndarray:
    """RGB colour of each QC score: red up to ``flag_below - RED_BELOW_FLAG``, yellow at ``flag_below``, green at 1.

    Parameters
    ----------
    scores : ndarray of float, shape (n,)
    flag_below : float
        The flag threshold (``QCThresholds.flag_tile_score_below``).

    Returns
    -------
    ndarray of float64, shape (n, 3)
    """
    scores = np.asarray(scores, dtype=np.float64)
    red_at = flag_below - RED_BELOW_FLAG
    low = np.clip((scores - red_at) / max(flag_below - red_at, 1e-9), 0.0, 1.0)[:, None]
    high = np.clip((scores - flag_below) / max(1.0 - flag_below, 1e-9), 0.0, 1.0)[:, None]
    red, yellow, green = (np.asarray(c, dtype=np.float64) for c in (SCORE_RED, SCORE_YELLOW, SCORE_GREEN))
    return np.where(scores[:, None] < flag_below, red + low * (yellow - red), yellow + high * (green - yellow))


def _frame(rgb: np.ndarray, box: tuple[int, int, int, int], colour: Sequence[int], width: int) -> None:
    """Draw a rectangle's outline (``box``: y0, x0, y1, x1 in thumbnail pixels, end exclusive) in place."""
    y0, x0, y1, x1 = box
    y1, x1 = max(y1, y0 + 1), max(x1, x0 + 1)
    for k in range(width):
        top, bottom, left, right = y0 + k, y1 - 1 - k, x0 + k, x1 - 1 - k
        if top > bottom or left > right:
            break
        rgb[top, left : right + 1] = colour
        rgb[bottom, left : right + 1] = colour
        rgb[top : bottom + 1, left] = colour
        rgb[top : bottom + 1, right] = colour


def score_thumbnail_png(
    grey: np.ndarray, factor: int, tiles: Sequence[tuple[int, int, int, int, float | None]], flag_below: float,
    worst: tuple[int, int, int, int] | None = None, median: tuple[int, int, int, int] | None = None,
) -> bytes:
    """RGB PNG of a thumbnail with each analysed tile tinted by its QC score; worst and median tile framed.

    Parameters
    ----------
    grey : ndarray of float, shape (h, w)
        `ThumbnailCanvas.image` of the nuclear composite, values in [0, 1].
    factor : int
        Slide pixels per thumbnail pixel.
    tiles : sequence of (y0, x0, height, width, qc_score)
        Analysed tiles in slide pixels; a None score is left untinted. Tiles not listed (empty)
        stay grey.
    flag_below : float
        The flag threshold (the yellow of the scale, `score_colours`).
    worst, median : (y0, x0, height, width), optional
        Framed in magenta and cyan.

    Returns
    -------
    bytes
        The PNG file.
    """
    grey = np.clip(np.nan_to_num(np.asarray(grey, dtype=np.float64)), 0.0, 1.0)
    rgb = np.repeat(grey[:, :, None] * 255.0, 3, axis=2)
    scored = [t for t in tiles if t[4] is not None]
    colours = score_colours(np.asarray([t[4] for t in scored], dtype=np.float64), flag_below) if scored else []

    def to_thumb(y0: int, x0: int, height: int, width: int) -> tuple[int, int, int, int]:
        return y0 // factor, x0 // factor, math.ceil((y0 + height) / factor), math.ceil((x0 + width) / factor)

    for (y0, x0, height, width, _), colour in zip(scored, colours):
        ty0, tx0, ty1, tx1 = to_thumb(y0, x0, height, width)
        rgb[ty0:ty1, tx0:tx1] = (1 - SCORE_ALPHA) * rgb[ty0:ty1, tx0:tx1] + SCORE_ALPHA * colour
    image = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    frame_width = max(1, min(image.shape[:2]) // 150)
    for box, colour in ((median, MEDIAN_FRAME), (worst, WORST_FRAME)):
        if box is not None:
            _frame(image, to_thumb(*box), colour, frame_width)
    return bytes(imagecodecs.png_encode(np.ascontiguousarray(image)))
