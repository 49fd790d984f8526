"""Tissue detection on a low-resolution nuclear composite."""
from __future__ import annotations

from typing import Sequence
import numpy as np
from nuclei_app.core.intensity import signal_autocorrelation
from nuclei_app.core.tiling import TileGrid
import math


#: Lag-1 spatial autocorrelation of the nuclear composite needed to call anything tissue:
#: pure camera noise scores about 0, stained nuclei (blobs several pixels wide) 0.5 to 1.
MIN_TISSUE_AUTOCORRELATION = 0.2


#: Side (pixels) the level used for tissue detection should at least have.
TISSUE_LEVEL_MIN_SIDE = 256


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


def tissue_tiles(low: np.ndarray, factors: tuple[float, float], grid: TileGrid) -> np.ndarray:
    """Which tiles of ``grid`` hold tissue, from Otsu on a low-resolution nuclear composite.

    Parameters
    ----------
    low : ndarray of float, shape (y, x)
        The nuclear composite of a low pyramid level (`nuclei_app.io.slides.tissue_overview`).
    factors : tuple of float
        Level-0 pixels per ``low`` pixel, (y, x).
    grid : TileGrid
        The level-0 tile grid.

    Returns
    -------
    ndarray of bool, shape (n_rows, n_cols)
    """
    factor_y, factor_x = factors
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
