"""The seed paper's coverage and clump measures on hand-built images where the answer is known."""
from __future__ import annotations

import numpy as np
import pytest

from nuclei_app.core.noise import fit_gaussian_mixture_1d, noise_threshold
from nuclei_app.qc.signal_coverage import (
    above_noise_signal,
    clump_sizes,
    clump_summary,
    signal_coverage_by_dilation,
)


def _disk_labels(shape, centres, radius, start=1):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    for index, (cy, cx) in enumerate(centres, start=start):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = index
    return labels


def test_mixture_recovers_four_separated_levels():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(level, 0.5, 2000) for level in (10, 20, 60, 100)])
    weights, means, _ = fit_gaussian_mixture_1d(values)
    np.testing.assert_allclose(means, [10, 20, 60, 100], atol=0.2)
    np.testing.assert_allclose(weights, 0.25, atol=0.01)


def test_noise_threshold_lies_midway_between_the_second_and_third_levels():
    rng = np.random.default_rng(1)
    image = rng.choice(np.array([10.0, 20.0, 60.0, 100.0]), size=(256, 256))
    # Midway between the brightest pixel of the 2nd component (20) and the darkest of the 3rd (60).
    assert noise_threshold(image) == pytest.approx(40.0)
    assert noise_threshold(image, seed=5) == pytest.approx(40.0)
    assert noise_threshold(np.full((100, 100), 7.0)) == 7.0  # flat: nothing is above noise


def test_signal_coverage_is_the_intensity_weighted_share_inside_the_nuclei():
    channels = np.zeros((2, 10, 10))
    channels[0, 2, 2] = 3.0   # inside nucleus 1
    channels[1, 2, 2] = 1.0   # second channel, same pixel
    channels[0, 2, 3] = 2.0   # one pixel right of it: inside after a 1-px dilation
    channels[0, 8, 8] = 4.0   # far away: never covered
    channels[0, 5, 5] = 0.5   # below the noise threshold of channel 0: ignored
    labels = np.zeros((10, 10), np.int32)
    labels[2, 2] = 1
    signal = above_noise_signal(channels, np.array([1.0, 0.5]))
    coverage = signal_coverage_by_dilation(signal, labels)
    assert coverage[0] == pytest.approx(4.0 / 10.0)
    assert coverage[1] == pytest.approx(6.0 / 10.0)
    assert coverage[4] == pytest.approx(6.0 / 10.0)  # (8, 8) is 12 px away
    assert signal_coverage_by_dilation(np.zeros((1, 4, 4)), np.ones((4, 4), int))[0] is None


def test_clumps_are_touching_groups_that_survive_a_radius_2_erosion():
    separate = _disk_labels((80, 80), [(20, 20), (20, 60)], 8)
    assert clump_sizes(separate).tolist() == []
    pair = _disk_labels((80, 120), [(40, 30), (40, 44)], 8)  # centres 14 px apart: wide contact
    row_of_three = _disk_labels((80, 120), [(40, 30), (40, 44), (40, 58)], 8)
    assert clump_sizes(pair).tolist() == [2]
    assert clump_sizes(row_of_three).tolist() == [3]
    summary = clump_summary(row_of_three)
    assert summary == {"clump_count": 1, "clump_share": pytest.approx(1 / 3), "clump_mean_size": 3.0}
    assert clump_summary(np.zeros((5, 5), int)) == {"clump_count": 0, "clump_share": None, "clump_mean_size": None}


def test_a_thin_bridge_does_not_make_a_clump():
    labels = _disk_labels((60, 100), [(30, 25), (30, 75)], 10)
    labels[29:31, 35:66] = 3  # a 2-px wide bridge: gone after the radius-2 erosion
    assert clump_sizes(labels).tolist() == []
