"""Background noise level of a nuclear channel, as the seed paper's toolkit estimates it.

The method (Bai et al.'s public whole-brain toolkit, ``eval_nogt.py``): pool the pixels of
20 random 64 x 64 crops, fit a 4-component 1-D Gaussian mixture, order the components by
mean, and put the threshold midway between the brightest pixel assigned to the 2nd component
and the darkest pixel assigned to the 3rd. Pixels below it are noise. The mixture is fitted
here with a small deterministic EM (quantile initialisation), so no scikit-learn is needed
and the same image always gives the same threshold.
"""
from __future__ import annotations

import numpy as np

NOISE_CROPS = 20
NOISE_CROP_SIDE = 64
NOISE_COMPONENTS = 4


def sample_quantiles(values: np.ndarray, counts: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``np.quantile`` (linear interpolation) of the sample in which each of ``values`` occurs ``counts`` times.

    Parameters
    ----------
    values : ndarray of float, shape (U,)
        Distinct values, increasing.
    counts : ndarray of int, shape (U,)
        How often each occurs (> 0).
    q : ndarray of float, shape (K,)
        Probabilities in [0, 1].

    Returns
    -------
    ndarray of float64, shape (K,)
        Equal to ``np.quantile(np.repeat(values, counts), q)``.
    """
    ends = np.cumsum(counts)  # the expanded sample's positions [ends[i-1], ends[i]) hold values[i]
    position = (ends[-1] - 1) * np.asarray(q, dtype=np.float64)
    below = np.floor(position).astype(np.int64)
    above = np.minimum(below + 1, ends[-1] - 1)
    low, high = values[np.searchsorted(ends, below, side="right")], values[np.searchsorted(ends, above, side="right")]
    return low + (position - below) * (high - low)


def fit_gaussian_mixture_1d(values: np.ndarray, components: int = NOISE_COMPONENTS, iterations: int = 100,
                            tolerance: float = 1e-6, counts: np.ndarray | None = None,
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit a 1-D Gaussian mixture by EM, initialised at quantiles (deterministic).

    Parameters
    ----------
    values : ndarray of float, shape (N,)
    components : int
        Number of Gaussians K.
    counts : ndarray of int, shape (N,), optional
        How often each value occurs (``values`` then distinct and increasing, e.g. from
        ``np.unique(sample, return_counts=True)``). The fit is the same as on the expanded
        sample, up to rounding, but an 8- or 16-bit image has few distinct values, so it is
        hundreds of times faster.

    Returns
    -------
    weights, means, variances : ndarray of float64, shape (K,) each, ordered by increasing mean.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    w = np.ones_like(x) if counts is None else np.asarray(counts, dtype=np.float64).ravel()
    n = float(w.sum())
    spread = float((w * (x - (w * x).sum() / n) ** 2).sum() / n) or 1.0
    floor = 1e-6 * spread + 1e-12
    quantiles = (np.arange(components) + 0.5) / components
    means = np.quantile(x, quantiles) if counts is None else sample_quantiles(x, np.asarray(counts), quantiles)
    variances = np.full(components, spread / components**2 + floor)
    weights = np.full(components, 1.0 / components)
    previous = -np.inf
    for _ in range(iterations):
        log_density = (-0.5 * (x[:, None] - means) ** 2 / variances - 0.5 * np.log(2 * np.pi * variances)
                       + np.log(weights))
        top = log_density.max(axis=1, keepdims=True)
        log_total = top[:, 0] + np.log(np.exp(log_density - top).sum(axis=1))
        responsibility = np.exp(log_density - log_total[:, None]) * w[:, None]
        mass = responsibility.sum(axis=0) + 1e-12
        weights = mass / n
        means = (responsibility * x[:, None]).sum(axis=0) / mass
        variances = (responsibility * (x[:, None] - means) ** 2).sum(axis=0) / mass + floor
        likelihood = float((w * log_total).sum() / n)
        if likelihood - previous < tolerance:
            break
        previous = likelihood
    order = np.argsort(means, kind="stable")
    return weights[order], means[order], variances[order]


def crop_origins(shape: tuple[int, int], seed: int | np.random.SeedSequence = 0, crops: int = NOISE_CROPS,
                 side: int = NOISE_CROP_SIDE) -> np.ndarray | None:
    """Top-left corners of the random crops the noise level is fitted to.

    Parameters
    ----------
    shape : (int, int)
        (Y, X) of the image.
    seed : int or numpy.random.SeedSequence
        Seed of the positions (a `nuclei_app.seeding` stream in the QC; same seed, same crops).
    crops, side : int
        Number and side of the crops.

    Returns
    -------
    ndarray of int64, shape (crops, 2), or None
        (y, x) per crop; None when the image is not larger than one crop in both directions
        (the whole image is used then).
    """
    height, width = shape
    if height <= side or width <= side:
        return None
    rng = np.random.default_rng(seed)
    ys = rng.integers(0, height - side, size=crops)
    xs = rng.integers(0, width - side, size=crops)
    return np.stack([ys, xs], axis=1).astype(np.int64)


def noise_threshold_of_sample(sample: np.ndarray) -> float:
    """The seed paper's noise threshold of pooled pixel values (see `noise_threshold`).

    Parameters
    ----------
    sample : ndarray of real, any shape
        Pixels of one channel (e.g. the crops of `crop_origins`, concatenated); NaN ignored.

    Returns
    -------
    float
        Midway between the brightest pixel assigned to the 2nd-darkest component and the darkest
        pixel assigned to the 3rd; when either component gets no pixel, the midpoint of their means;
        the value itself for a constant sample, 0 for an empty one.
    """
    sample = np.asarray(sample, dtype=np.float64).ravel()
    sample = sample[np.isfinite(sample)]
    if sample.size == 0 or float(sample.max()) == float(sample.min()):
        return float(sample.max()) if sample.size else 0.0
    # The fit and the assignment on the distinct values (with their counts) equal those on every pixel.
    distinct, counts = np.unique(sample, return_counts=True)
    weights, means, variances = fit_gaussian_mixture_1d(distinct, counts=counts)
    log_density = (-0.5 * (distinct[:, None] - means) ** 2 / variances - 0.5 * np.log(variances) + np.log(weights))
    assigned = np.argmax(log_density, axis=1)
    second, third = distinct[assigned == 1], distinct[assigned == 2]
    if second.size and third.size:
        return float((second.max() + third.min()) / 2)
    return float((means[1] + means[2]) / 2)


def noise_threshold(channel: np.ndarray, seed: int | np.random.SeedSequence = 0, crops: int = NOISE_CROPS,
                    side: int = NOISE_CROP_SIDE) -> float:
    """Intensity below which a nuclear channel is background noise (the seed paper's rule).

    Parameters
    ----------
    channel : ndarray, shape (Y, X)
        One nuclear channel, any real dtype (raw or normalised: the threshold is in its units).
    seed : int or numpy.random.SeedSequence
        Seed of the crop positions (same seed, same threshold).
    crops, side : int
        Number and side of the random crops whose pixels the mixture is fitted to (the whole
        image when it is smaller than one crop).

    Returns
    -------
    float
        Midway between the brightest pixel assigned to the 2nd-darkest component and the darkest
        pixel assigned to the 3rd; when either component gets no pixel, the midpoint of their means.
    """
    image = np.asarray(channel, dtype=np.float64)
    origins = crop_origins(image.shape, seed, crops, side)
    if origins is None:
        return noise_threshold_of_sample(image)
    return noise_threshold_of_sample(np.concatenate([image[y : y + side, x : x + side].ravel() for y, x in origins]))
