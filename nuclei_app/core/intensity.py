"""Intensity: robust normalisation, the nuclear composite, robust statistics and thresholds."""
from __future__ import annotations

import math
import numpy as np


DEFAULT_PERCENTILES = (1.0, 99.8)


# --------------------------------------------------------------------------- composite


def nuclear_composite(image: np.ndarray, percentiles: np.ndarray | None = None) -> np.ndarray:
    """Robustly normalise each nuclear channel to [0, 1] and average them.

    Parameters
    ----------
    image : ndarray, shape (C, Y, X) or (Y, X)
        The nuclear channel(s); any real dtype. NaN counts as 0 after normalisation.
    percentiles : array-like, shape (C, 2), optional
        ``[low, high]`` intensity per channel mapped to 0 and 1 (e.g. whole-slide
        percentiles so that tiles agree). Computed from ``image`` (1st and 99.8th
        percentiles) when absent.

    Returns
    -------
    ndarray of float32, shape (Y, X)
        Values in [0, 1].
    """
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"image must be (C, Y, X) or (Y, X), got shape {array.shape}")
    array = array.astype(np.float32, copy=False)
    if percentiles is None:
        flat = array.reshape(array.shape[0], -1)
        percentiles = np.stack(
            [np.nanpercentile(channel, DEFAULT_PERCENTILES) if np.isfinite(channel).any() else (0.0, 1.0) for channel in flat]
        )
    percentiles = np.asarray(percentiles, dtype=np.float64).reshape(array.shape[0], 2)
    composite = np.zeros(array.shape[1:], dtype=np.float32)
    for channel, (low, high) in zip(array, percentiles):
        span = high - low
        if not np.isfinite(span) or span <= 0:
            continue  # a flat channel carries no nuclei signal
        normalised = (channel - np.float32(low)) / np.float32(span)
        composite += np.clip(np.nan_to_num(normalised, nan=0.0), 0.0, 1.0)
    composite /= array.shape[0]
    return composite


def signal_autocorrelation(composite: np.ndarray) -> float | None:
    """Pearson correlation of the composite with itself shifted by one pixel (mean of y and x).

    Stained nuclei are blobs many pixels wide, so neighbouring pixels agree (about 0.9 and
    more); white noise has none (about 0). None when the image is constant.

    Parameters
    ----------
    composite : ndarray of float, shape (H, W), H and W >= 2

    Returns
    -------
    float in [-1, 1] or None
    """
    image = np.asarray(composite, dtype=np.float64)
    values = []
    for a, b in ((image[:, :-1], image[:, 1:]), (image[:-1, :], image[1:, :])):
        if a.size < 2:
            continue
        a = a - a.mean()
        b = b - b.mean()
        denominator = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
        if denominator > 0:
            values.append(float((a * b).sum()) / denominator)
    return float(np.mean(values)) if values else None


def normalise_intensities(raw: np.ndarray, percentiles: np.ndarray) -> np.ndarray:
    """Map each channel of (C, H, W) so its whole-slide low/high percentiles go to 0/1.

    Returns float32, NaN -> 0, clipped to [0, 1.5] (bright nuclei keep some headroom).
    The model is trained and applied with this one mapping, so tiles of a slide agree.
    """
    low = np.asarray(percentiles, dtype=np.float32)[:, 0][:, None, None]
    high = np.asarray(percentiles, dtype=np.float32)[:, 1][:, None, None]
    scaled = (raw.astype(np.float32) - low) / np.maximum(high - low, 1e-6)
    return np.clip(np.nan_to_num(scaled, nan=0.0), 0.0, 1.5)


# =====================================================================================
# Metric functions on numpy arrays
# =====================================================================================


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of the finite values; ``inf`` when they are constant (no foreground).

    Parameters
    ----------
    values : ndarray of float, any shape

    Returns
    -------
    float
    """
    from skimage.filters import threshold_otsu

    finite = np.asarray(values, dtype=np.float32)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0 or float(finite.max() - finite.min()) < 1e-6:
        return math.inf
    return float(threshold_otsu(finite))


#: 1.4826 times the median absolute deviation (MAD) estimates the standard deviation of
#: normally distributed values.
MAD_TO_SD = 1.4826


#: sqrt(pi / 2): 1.2533 times the mean absolute deviation estimates it too; the spread when
#: the MAD is 0 (Iglewicz and Hoaglin, 1993).
MEAN_AD_TO_SD = 1.2533


def robust_reference(values: np.ndarray, floor: float = 0.0) -> tuple[float, float]:
    """Median and robust spread of the finite values: the one robust-z reference of the app.

    The spread is ``1.4826 * MAD`` (the median absolute deviation from the median). When the
    MAD is 0 (more than half of the values equal the median) it is ``1.2533 *`` the mean
    absolute deviation from the median instead, so that the values that differ still get
    finite z-scores scaled by how far they lie; it stays 0 only when every finite value
    equals the median. Then the spread is raised to ``floor``.

    Parameters
    ----------
    values : ndarray of float, any shape
        NaN and inf are ignored.
    floor : float
        Smallest spread returned (e.g. so that a very uniform slide does not call ordinary
        nuclei outliers).

    Returns
    -------
    median, spread : float
        NaN, NaN when no value is finite.
    """
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return math.nan, math.nan
    median = float(np.median(finite))
    deviations = np.abs(finite - median)
    spread = MAD_TO_SD * float(np.median(deviations))
    if spread == 0:
        spread = MEAN_AD_TO_SD * float(np.mean(deviations))
    return median, max(spread, floor)


def robust_z(values: np.ndarray, median: float, spread: float) -> np.ndarray:
    """Robust z-scores ``(values - median) / spread`` against a `robust_reference`.

    Parameters
    ----------
    values : ndarray of float, any shape
    median, spread : float
        From `robust_reference`.

    Returns
    -------
    ndarray of float64, shape of ``values``
        NaN where a value is NaN or the spread is NaN (no reference). A spread of 0 means
        every reference value equals the median: z is 0 for a value equal to the median
        and +-inf for any other.
    """
    values = np.asarray(values, dtype=np.float64)
    if not spread > 0:
        with np.errstate(invalid="ignore"):  # 0 * inf where a value equals the median: replaced by 0
            return np.where(values == median, 0.0, np.sign(values - median) * np.inf)
    return (values - median) / spread


def robust_z_scores(values: np.ndarray, floor: float = 0.0) -> np.ndarray:
    """Robust z-score of each value against the values' own median and spread.

    `robust_z` of ``values`` against `robust_reference` of ``values`` (see there for a MAD
    of 0: the mean absolute deviation takes over; all values equal: z = 0).

    Parameters
    ----------
    values : ndarray of float, shape (n,)
        NaN for missing values.
    floor : float
        Smallest spread (see `robust_reference`).

    Returns
    -------
    ndarray of float64, shape (n,)
        NaN where the value is not finite.
    """
    values = np.asarray(values, dtype=np.float64)
    median, spread = robust_reference(values, floor)
    return np.where(np.isfinite(values), robust_z(values, median, spread), np.nan)
