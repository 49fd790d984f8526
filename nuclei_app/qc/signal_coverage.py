"""The seed paper's no-ground-truth measures, so users can set our numbers beside theirs.

- *Signal coverage*: the intensity-weighted share of above-noise nuclear signal that lies inside
  the predicted nuclei, for the masks as they are and dilated by 1-4 px (the paper reports
  93.9-98.6 % on its unlabelled sets).
- *Clumps*: after eroding the nuclei foreground by a disk of radius 2, connected blobs
  (4-connectivity) that hold more than one predicted nucleus; each clump's nucleus count.

Pure functions over arrays; `nuclei_app.core.noise.noise_threshold` gives the noise level.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

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
    total = float(signal.sum())
    mask = np.asarray(labels) > 0
    result: dict[int, float | None] = {}
    radius = 0
    for target in sorted(dilations):
        if target > radius:
            mask = ndimage.binary_dilation(mask, structure=_CROSS, iterations=target - radius)
            radius = target
        result[target] = None if total <= 0 else float(signal[:, mask].sum() / total)
    return result


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
