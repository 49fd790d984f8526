"""The weak teacher: classical nuclei labelers that need no training and no annotation.

Two labelers share one preprocessing and one post-processing, and differ in how they
place seeds and flood them, so that they make different mistakes (two views of the
pseudo-labels for the multi-head student):

- `log_watershed`: seeds are maxima of the scale-normalised Laplacian-of-Gaussian
  response at the nucleus scale; the watershed floods the negated LoG response, so
  touching nuclei split along the dim valleys between them.
- `otsu_watershed`: seeds are maxima of the distance transform of the foreground;
  the watershed floods the negated distance, so touching nuclei split at necks.

Everything is relative to the nucleus diameter, estimated from the image itself by
`estimate_nucleus_diameter` (a granulometry, refined in LoG scale space). The
foreground is a threshold of the background-corrected image (a white top-hat with a
structuring element larger than a nucleus), so slowly varying background (uneven
illumination, out-of-focus tissue) does not become nuclei.

Every object gets a confidence in [0, 1] from its contrast against the local
background, its solidity and its size relative to the estimated diameter; foreground
not covered by a confident object is marked "ignore" so that training does not teach
unlabeled nuclei as background.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.segmentation import relabel_sequential, watershed
from skimage.transform import downscale_local_mean, resize
from nuclei_app.core.instances import Instances
from nuclei_app.core.intensity import nuclear_composite
from nuclei_app.core.morphology import label_solidities


METHODS = ("log", "otsu")


# Plausible nucleus diameters when the pixel size is known (µm): from small lymphocytes
# and glia to large tumour or neuronal nuclei.
PHYSICAL_DIAMETER_RANGE_UM = (3.0, 30.0)


MIN_DIAMETER_PX = 4.0


# Objects smaller than this fraction of the expected nucleus area are fragments.
MIN_AREA_FRACTION = 0.1


# Objects below this confidence are also marked ignore.
IGNORE_BELOW_CONFIDENCE = 0.35


# Working resolution: images are segmented with nuclei about this many pixels across
# (larger nuclei are handled on a downsampled copy; boundaries are refined at full size).
WORKING_DIAMETER_PX = 16.0


# A square of side k no longer fits in a nucleus of diameter ~ GRANULOMETRY_FACTOR * k.
GRANULOMETRY_FACTOR = 1.2


@dataclass
class WeakLabels:
    """Pseudo-labels of one image from a classical labeler.

    Attributes
    ----------
    labels : ndarray of uint32, shape (H, W)
        Instance ids 1..n, 0 = background.
    confidence : ndarray of float32, shape (n,)
        Confidence of object ``i + 1`` in [0, 1].
    ignore : ndarray of bool, shape (H, W)
        Ambiguous pixels: foreground covered by no object, and objects with confidence
        below `IGNORE_BELOW_CONFIDENCE`. Training should neither reward nor punish them.
    diameter : float
        Nucleus diameter (pixels) the labeler used (0.0 for a flat image with no
        diameter given: there is nothing to estimate it from).
    method : str
        ``"log"`` or ``"otsu"``.
    """

    labels: np.ndarray
    confidence: np.ndarray
    ignore: np.ndarray
    diameter: float
    method: str

    @property
    def count(self) -> int:
        """Number of objects."""
        return int(self.confidence.size)

    def to_instances(self) -> Instances:
        """The objects as `Instances` (one full mask each, scores = confidence)."""
        return Instances.from_label_image(self.labels, scores=self.confidence)


# --------------------------------------------------------------------------- scale


def _diameter_limits(shape: tuple[int, int], pixel_size_um: tuple[float, float] | float | None) -> tuple[float, float]:
    low, high = MIN_DIAMETER_PX, max(MIN_DIAMETER_PX, min(shape) / 4.0)
    if pixel_size_um is not None:
        size = float(np.mean(np.atleast_1d(np.asarray(pixel_size_um, dtype=float))))
        if size > 0 and np.isfinite(size):
            low = max(low, PHYSICAL_DIAMETER_RANGE_UM[0] / size)
            high = max(low, min(high, PHYSICAL_DIAMETER_RANGE_UM[1] / size))
    return low, high


def _pyramid_level(levels: dict[int, np.ndarray], octave: int) -> np.ndarray:
    while octave not in levels:
        finest = max(levels)
        levels[finest + 1] = downscale_local_mean(levels[finest], (2, 2)).astype(np.float32)
    return levels[octave]


def _granulometry_diameter(smoothed: np.ndarray, low: float, high: float, steps_per_octave: int = 8) -> float | None:
    """Diameter at the peak of the grey-level pattern spectrum (openings by squares).

    The intensity removed by opening with a square of side k comes from structures
    that a k-square no longer fits into; most of it is nuclei bodies. Texture inside
    nuclei and noise carry little intensity mass, a whole tissue body is larger than
    the largest size searched. Large squares run on a 2x-downsampled pyramid.
    """
    k_min = max(2.0, low / GRANULOMETRY_FACTOR / 1.5)
    k_max = high / GRANULOMETRY_FACTOR
    if k_max <= k_min:
        return None
    sides = k_min * 2.0 ** (np.arange(0, 64) / steps_per_octave)
    sides = sides[sides <= k_max * 1.2]
    levels = {0: smoothed}
    remaining = []
    for side in sides:
        octave = int(max(0, np.floor(np.log2(side / 8.0))))
        level = _pyramid_level(levels, octave)
        side_at_level = max(1, int(round(side / 2**octave)))
        opened = ndi.grey_opening(level, size=(side_at_level, side_at_level)) if side_at_level > 1 else level
        remaining.append(float(opened.mean()))
    spectrum = -np.diff(np.asarray(remaining))  # intensity removed per step (per log-size)
    if spectrum.size < 3 or spectrum.max() <= 0:
        return None
    sizes = sides[1:]
    # Weight by size**-0.5: a mild preference for many objects over one large one
    # (mass alone would favour a large tissue body over its nuclei).
    weighted = np.convolve(spectrum * sizes**-0.5, [0.25, 0.5, 0.25], mode="same")
    valid = (sizes * GRANULOMETRY_FACTOR >= low) & (sizes * GRANULOMETRY_FACTOR <= high)
    if not valid.any():
        return None
    weighted[~valid] = -np.inf
    return float(GRANULOMETRY_FACTOR * sizes[int(np.argmax(weighted))])


def _normalised_log(image: np.ndarray, sigma: float) -> np.ndarray:
    """Scale-normalised blob response ``-sigma**2 * LoG``, computed on a pyramid for large sigma.

    Returns an array of the shape of ``image``, positive on bright blobs of radius
    about ``sigma * sqrt(2)``.
    """
    octave = int(max(0, np.floor(np.log2(sigma / 3.0))))
    levels = {0: image}
    level = _pyramid_level(levels, octave)
    sigma_at_level = sigma / 2**octave
    response = -(sigma_at_level**2) * ndi.gaussian_laplace(level, sigma_at_level)
    if octave:
        response = resize(response, image.shape, order=1, mode="edge", anti_aliasing=False)
    return response.astype(np.float32)


def _log_refined_diameter(composite: np.ndarray, diameter: float, low: float, high: float) -> float:
    """Refine a diameter in LoG scale space: the sigma with the largest mean normalised
    LoG response over blob candidates (the response maxima at the starting scale)."""
    scale = max(1.0, diameter / (4.0 * WORKING_DIAMETER_PX))
    factor = int(scale)
    image = downscale_local_mean(composite, (factor, factor)).astype(np.float32) if factor > 1 else composite
    sigma0 = diameter / factor / (2.0 * np.sqrt(2.0))
    response0 = _normalised_log(image, sigma0)
    floor = max(0.05, 0.25 * float(np.percentile(response0, 99.5)))
    candidates = peak_local_max(
        response0, min_distance=max(1, int(round(sigma0))), threshold_abs=floor, exclude_border=False
    )
    if len(candidates) < 3:
        return diameter
    sigmas = sigma0 * 2.0 ** (np.arange(-4, 5) / 8.0)
    means = []
    for sigma in sigmas:
        response = _normalised_log(image, float(sigma))
        means.append(float(response[candidates[:, 0], candidates[:, 1]].mean()))
    best = float(sigmas[int(np.argmax(means))]) * 2.0 * np.sqrt(2.0) * factor
    return float(np.clip(best, low, high))


def estimate_nucleus_diameter(
    composite: np.ndarray, pixel_size_um: tuple[float, float] | float | None = None
) -> float:
    """Typical nucleus diameter in pixels, from the image alone.

    A grey-level granulometry (pattern spectrum of openings) finds the dominant
    object size; it is refined in LoG scale space as the sigma with the largest mean
    scale-normalised LoG response over the blob candidates, ``d = 2 * sqrt(2) * sigma``.

    Parameters
    ----------
    composite : ndarray, shape (Y, X)
        Nuclear signal in ~[0, 1] (see `nuclear_composite`).
    pixel_size_um : float or (float, float), optional
        Pixel size; when known the estimate is clamped to 3-30 µm.

    Returns
    -------
    float
        Diameter in pixels (a lower bound of 4 px when the image has no structure).
    """
    composite = np.asarray(composite, dtype=np.float32)
    low, high = _diameter_limits(composite.shape, pixel_size_um)
    smoothed = ndi.gaussian_filter(composite, 1.0)
    coarse = _granulometry_diameter(smoothed, low, high)
    if coarse is None:
        return float(np.clip(low * 2.0, low, high))
    return _log_refined_diameter(composite, coarse, low, high)


# --------------------------------------------------------------------------- shared steps


@dataclass
class _Prepared:
    """Background-corrected signal and foreground, at full and working resolution."""

    signal: np.ndarray  # (Y, X) float32, smoothed composite minus background, >= 0
    foreground: np.ndarray  # (Y, X) bool
    threshold: float
    factor: int  # working resolution = full / factor
    diameter: float  # px at full resolution


def _background(smoothed: np.ndarray, diameter: float) -> np.ndarray:
    """Slowly varying background: grey opening by a square larger than a nucleus, smoothed.

    Computed on a downsampled copy (nuclei ~8 px there) and resized back.
    """
    factor = max(1, int(diameter / 8.0))
    small = downscale_local_mean(smoothed, (factor, factor)).astype(np.float32) if factor > 1 else smoothed
    side = max(3, int(round(2.0 * diameter / factor)))
    opened = ndi.grey_opening(small, size=(side, side))
    opened = ndi.uniform_filter(opened, size=side)
    if factor > 1:
        opened = resize(opened, smoothed.shape, order=1, mode="edge", anti_aliasing=False)
    return opened.astype(np.float32)


def _prepare(composite: np.ndarray, diameter: float, threshold_scale: float) -> _Prepared | None:
    smoothed = ndi.gaussian_filter(composite, max(0.5, diameter / 16.0)).astype(np.float32)
    signal = np.clip(smoothed - _background(smoothed, diameter), 0.0, None)
    if not np.isfinite(signal).all() or signal.max() - signal.min() < 1e-3:
        return None
    threshold = threshold_scale * float(threshold_otsu(signal))
    foreground = signal > threshold
    foreground = ndi.binary_fill_holes(foreground)
    factor = max(1, int(diameter / WORKING_DIAMETER_PX))
    return _Prepared(signal, foreground, threshold, factor, diameter)


def _downsample(array: np.ndarray, factor: int) -> np.ndarray:
    return downscale_local_mean(array, (factor, factor)).astype(np.float32) if factor > 1 else array


def _upsample_markers(markers: np.ndarray, shape: tuple[int, int], factor: int) -> np.ndarray:
    """Seed points at working resolution -> seed points at full resolution (block centres)."""
    if factor == 1:
        return markers
    full = np.zeros(shape, dtype=markers.dtype)
    rows, cols = np.nonzero(markers)
    full[np.minimum(rows * factor + factor // 2, shape[0] - 1), np.minimum(cols * factor + factor // 2, shape[1] - 1)] = (
        markers[rows, cols]
    )
    return full


def _seed_markers(peaks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    markers = np.zeros(shape, dtype=np.int32)
    markers[peaks[:, 0], peaks[:, 1]] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    return markers


def _finish(labels: np.ndarray, prepared: _Prepared, method: str) -> WeakLabels:
    """Drop fragments, fill holes, relabel 1..n, score confidence, mark ignore."""
    diameter = prepared.diameter
    expected_area = np.pi * diameter**2 / 4.0
    labels = labels.astype(np.int64, copy=False)
    areas = np.bincount(labels.ravel())
    small = np.flatnonzero(areas < MIN_AREA_FRACTION * expected_area)
    small = small[small > 0]
    if small.size:
        labels = np.where(np.isin(labels, small), 0, labels)
    labels, _, _ = relabel_sequential(labels)
    labels = _fill_label_holes(labels)
    labels = labels.astype(np.uint32)
    confidence = _confidence(labels, prepared)
    ignore = prepared.foreground & (labels == 0)
    low = np.flatnonzero(confidence < IGNORE_BELOW_CONFIDENCE) + 1
    if low.size:
        ignore |= np.isin(labels, low)
    return WeakLabels(labels, confidence, ignore, float(diameter), method)


def _fill_label_holes(labels: np.ndarray) -> np.ndarray:
    """Give background holes enclosed by objects to the nearest object."""
    holes = ndi.binary_fill_holes(labels > 0) & (labels == 0)
    if not holes.any():
        return labels
    _, (rows, cols) = ndi.distance_transform_edt(labels == 0, return_indices=True)
    filled = labels.copy()
    filled[holes] = labels[rows[holes], cols[holes]]
    return filled


def _confidence(labels: np.ndarray, prepared: _Prepared) -> np.ndarray:
    """Per-object confidence in [0, 1]: geometric mean of contrast, solidity and size scores."""
    n = int(labels.max())
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    diameter = prepared.diameter
    ids = np.arange(1, n + 1)
    inside = np.asarray(ndi.mean(prepared.signal, labels, ids))
    # Local background: a ring around each object, outside every object.
    ring_width = max(2, int(round(diameter / 4.0)))
    grown = ndi.grey_dilation(labels, size=(2 * ring_width + 1, 2 * ring_width + 1))
    ring = np.where(labels == 0, grown, 0)
    # An object with no free ring (enclosed by others) has no local background: use 0.
    ring_sum = np.bincount(ring.ravel(), weights=prepared.signal.ravel(), minlength=n + 1)[1:]
    ring_count = np.bincount(ring.ravel(), minlength=n + 1)[1:]
    outside = np.divide(ring_sum, ring_count, out=np.zeros(n), where=ring_count > 0)
    contrast = np.clip((inside - outside) / (2.0 * max(prepared.threshold, 1e-6)), 0.0, 1.0)
    solidity_score = np.clip((label_solidities(labels) - 0.75) / 0.2, 0.0, 1.0)
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    ratio = areas / (np.pi * diameter**2 / 4.0)
    size_score = np.exp(-(np.log(np.maximum(ratio, 1e-6)) ** 2) / (2 * 0.8**2))
    confidence = np.cbrt(contrast * solidity_score * size_score)
    return confidence.astype(np.float32)


def _empty(shape: tuple[int, int], diameter: float, method: str, reason: str) -> WeakLabels:
    warnings.warn(f"weak labels: {reason}; returning no objects", RuntimeWarning, stacklevel=3)
    return WeakLabels(
        np.zeros(shape, dtype=np.uint32),
        np.zeros(0, dtype=np.float32),
        np.zeros(shape, dtype=bool),
        float(diameter),
        method,
    )


def _check_composite(composite: np.ndarray) -> np.ndarray:
    composite = np.asarray(composite, dtype=np.float32)
    if composite.ndim != 2:
        raise ValueError(f"composite must be (Y, X), got shape {composite.shape}")
    return np.nan_to_num(composite, nan=0.0)


def _is_flat(composite: np.ndarray) -> bool:
    return composite.size == 0 or float(composite.max() - composite.min()) < 1e-3


# --------------------------------------------------------------------------- labelers


def _prepare_or_empty(
    composite: np.ndarray, diameter: float | None, pixel_size_um, threshold_scale: float, method: str
) -> "_Prepared | WeakLabels":
    """The shared first steps of both labelers, or the empty result (with its warning) when
    the image is flat or has no foreground."""
    if _is_flat(composite):
        return _empty(composite.shape, diameter or 0.0, method, "the image is flat")
    if diameter is None:
        diameter = estimate_nucleus_diameter(composite, pixel_size_um)
    prepared = _prepare(composite, float(diameter), threshold_scale)
    if prepared is None or not prepared.foreground.any():
        return _empty(composite.shape, diameter, method, "no foreground above the background")
    return prepared


def log_watershed(
    composite: np.ndarray,
    diameter: float | None = None,
    *,
    seed_scale: float = 1.0,
    min_seed_distance: float = 0.35,
    threshold_scale: float = 0.7,
    pixel_size_um: tuple[float, float] | float | None = None,
) -> WeakLabels:
    """LoG seeds + marker-controlled watershed inside the background-corrected foreground.

    Parameters
    ----------
    composite : ndarray, shape (Y, X)
        Nuclear signal in ~[0, 1] (see `nuclear_composite`).
    diameter : float, optional
        Nucleus diameter in pixels; estimated when absent.
    seed_scale : float
        LoG sigma as a fraction of the blob-matched sigma ``diameter / (2 sqrt 2)``
        (lower values split touching nuclei more eagerly, and textured nuclei too).
    min_seed_distance : float
        Minimum distance between seeds, as a fraction of the diameter.
    threshold_scale : float
        Foreground threshold as a fraction of the Otsu threshold of the corrected signal.
    pixel_size_um : float or (float, float), optional
        Used only to clamp the estimated diameter.

    Returns
    -------
    WeakLabels
    """
    composite = _check_composite(composite)
    prepared = _prepare_or_empty(composite, diameter, pixel_size_um, threshold_scale, "log")
    if isinstance(prepared, WeakLabels):
        return prepared
    diameter = prepared.diameter
    factor = prepared.factor
    work = _downsample(prepared.signal, factor)
    sigma = seed_scale * diameter / factor / (2.0 * np.sqrt(2.0))
    response = _normalised_log(work, sigma)
    foreground_work = _downsample(prepared.foreground.astype(np.float32), factor) > 0.5
    peaks = peak_local_max(
        response,
        min_distance=max(1, int(round(min_seed_distance * diameter / factor))),
        threshold_abs=0.25 * prepared.threshold,
        labels=foreground_work.astype(np.int32),
        exclude_border=False,
    )
    if len(peaks) == 0:
        return _empty(composite.shape, diameter, "log", "no LoG seeds in the foreground")
    elevation = -response if factor == 1 else -resize(response, composite.shape, order=1, mode="edge")
    return _watershed_from_peaks(peaks, work.shape, elevation, prepared, "log")


def _watershed_from_peaks(peaks: np.ndarray, work_shape: tuple[int, int], elevation: np.ndarray,
                          prepared: "_Prepared", method: str) -> WeakLabels:
    """Seeds at ``peaks`` (found on the ``work_shape`` grid) flooded over ``elevation`` inside
    the foreground, at full resolution: the common last step of both labelers."""
    markers = _upsample_markers(_seed_markers(peaks, work_shape), elevation.shape, prepared.factor)
    return _finish(watershed(elevation, markers, mask=prepared.foreground), prepared, method)


def otsu_watershed(
    composite: np.ndarray,
    diameter: float | None = None,
    *,
    min_seed_distance: float = 0.25,
    threshold_scale: float = 0.7,
    pixel_size_um: tuple[float, float] | float | None = None,
) -> WeakLabels:
    """Otsu foreground + distance-transform peaks + watershed on the negated distance.

    Parameters
    ----------
    composite : ndarray, shape (Y, X)
        Nuclear signal in ~[0, 1] (see `nuclear_composite`).
    diameter : float, optional
        Nucleus diameter in pixels; estimated when absent.
    min_seed_distance : float
        Minimum distance between seeds, as a fraction of the diameter.
    threshold_scale : float
        Foreground threshold as a fraction of the Otsu threshold of the corrected signal.
    pixel_size_um : float or (float, float), optional
        Used only to clamp the estimated diameter.

    Returns
    -------
    WeakLabels
    """
    composite = _check_composite(composite)
    prepared = _prepare_or_empty(composite, diameter, pixel_size_um, threshold_scale, "otsu")
    if isinstance(prepared, WeakLabels):
        return prepared
    diameter = prepared.diameter
    factor = prepared.factor
    distance = ndi.distance_transform_edt(prepared.foreground).astype(np.float32)
    # Smooth so that ragged outlines do not make extra maxima.
    distance = ndi.gaussian_filter(distance, max(0.5, diameter / 16.0))
    work = _downsample(distance, factor)
    peaks = peak_local_max(
        work,
        min_distance=max(1, int(round(min_seed_distance * diameter / factor))),
        threshold_abs=0.15 * diameter / factor,
        labels=(work > 0).astype(np.int32),
        exclude_border=False,
    )
    if len(peaks) == 0:
        return _empty(composite.shape, diameter, "otsu", "no distance peaks in the foreground")
    return _watershed_from_peaks(peaks, work.shape, -distance, prepared, "otsu")


def weak_labels(
    image: np.ndarray,
    method: str = "log",
    pixel_size_um: tuple[float, float] | float | None = None,
    diameter: float | None = None,
    percentiles: np.ndarray | None = None,
) -> WeakLabels:
    """Pseudo-labels of the nuclei in an image by a classical labeler.

    Parameters
    ----------
    image : ndarray, shape (C, Y, X) or (Y, X)
        Nuclear channel(s).
    method : {"log", "otsu"}
        `log_watershed` or `otsu_watershed`.
    pixel_size_um : float or (float, float), optional
        Clamps the estimated diameter to a plausible physical range.
    diameter : float, optional
        Nucleus diameter in pixels; estimated from the image when absent.
    percentiles : array-like, shape (C, 2), optional
        Per-channel normalisation range (see `nuclear_composite`).

    Returns
    -------
    WeakLabels
        Empty (with a warning) for a flat or empty image.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if diameter is not None and not (np.isfinite(diameter) and diameter > 0):
        raise ValueError(f"diameter must be a positive number of pixels, got {diameter!r}")
    composite = nuclear_composite(image, percentiles)
    labeler = log_watershed if method == "log" else otsu_watershed
    return labeler(composite, diameter, pixel_size_um=pixel_size_um)

