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


# ------------------------------------------------------------------------ through the slide QC, on files


def _hand_built_slide(folder):
    """A 192 x 192 slide where every value is known: background 10/20 (noise), predicted nuclei at 100,
    missed nuclei at 60, and two clumps that straddle the 64 px QC tile edges (a pair, a row of three)."""
    import tifffile

    shape = (192, 192)
    image = np.random.default_rng(3).choice(np.array([10, 20], np.uint16), size=shape)
    labels = np.zeros(shape, np.uint32)
    clumps = (((40, 57), (40, 71)), ((121, 100), (135, 100), (149, 100)))
    clump_area = np.zeros(shape, bool)
    for centres in clumps:
        for centre in centres:
            clump_area |= _disk_labels(shape, [centre], 8) > 0
    n = 0
    for cy in range(12, 192, 24):
        for cx in range(12, 192, 24):
            disc = _disk_labels(shape, [(cy, cx)], 6) > 0
            if (_disk_labels(shape, [(cy, cx)], 14) > 0)[clump_area].any():
                continue  # keep the grid clear of the clumps: no contact, no dilation reaching them
            if (cy // 24 + cx // 24) % 2:
                image[disc] = 60  # stained, but the segmentation missed it
            else:
                n += 1
                labels[disc], image[disc] = n, 100
    for centres in clumps:
        for centre in centres:
            n += 1
            disc = _disk_labels(shape, [centre], 8) > 0
            labels[disc], image[disc] = n, 100
    tifffile.imwrite(folder / "slide.tif", image)
    tifffile.imwrite(folder / "labels.tif", labels)
    return image, labels


def test_slide_qc_reports_the_exact_coverage_and_counts_each_clump_once(tmp_path):
    """Through the public QC call on files: 9 tiles of 64 px; the slide equals the whole image measured at once."""
    import json

    import tifffile

    from nuclei_app.config import QCThresholds
    from nuclei_app.qc.slide import write_qc_report
    from nuclei_app.schemas import schema_errors
    from nuclei_app.seeding import seed_sequence

    image, labels = _hand_built_slide(tmp_path)
    report = write_qc_report(tmp_path / "labels.tif", tmp_path / "slide.tif", tmp_path / "qc.json",
                             thresholds=QCThresholds(tile_size_px=64)).report
    assert schema_errors(json.loads((tmp_path / "qc.json").read_text()), "qc_report") == []
    slide = report["slide"]
    (threshold,) = slide["noise_threshold"]
    # The seed paper's threshold of the slide's 20 seeded 64 px crops (the QC's default seed, 0).
    assert threshold == pytest.approx(noise_threshold(image, seed=seed_sequence(0, "qc_noise_crops")), abs=1e-6)
    above = image >= threshold
    expected = float(image[above & (labels > 0)].sum()) / float(image[above].sum())
    assert slide["signal_coverage"] == pytest.approx(expected, abs=1e-6)
    # Dilated masks: the slide, measured tile by tile, equals the whole image measured at once.
    whole = signal_coverage_by_dilation(above_noise_signal(image[None], np.array([threshold])), labels)
    assert slide["signal_coverage_by_dilation"] == pytest.approx({str(r): v for r, v in whole.items()}, abs=1e-6)
    assert slide["clump_count"] == 2 and slide["clump_mean_size"] == 2.5
    assert slide["clump_share"] == pytest.approx(2 / slide["n_nuclei"], abs=1e-6)
    assert slide["n_nuclei"] == int(labels.max())
    assert len(report["tiles"]) == 9 and sum(tile["clump_count"] for tile in report["tiles"]) == 2
    # The clumps belong to the tiles holding their first pixel: (33, 50) and (113, 100).
    owners = {(tile["y0"], tile["x0"]): tile["clump_count"] for tile in report["tiles"] if tile["clump_count"]}
    assert owners == {(0, 0): 1, (64, 64): 1}
    # Each tile's coverage is its own pixels' (a tile without stain above noise has none).
    for tile in report["tiles"]:
        box = (slice(tile["y0"], tile["y0"] + tile["height"]), slice(tile["x0"], tile["x0"] + tile["width"]))
        tile_above = image[box] >= threshold
        inside = float(image[box][tile_above & (labels[box] > 0)].sum())
        everything = float(image[box][tile_above].sum())
        assert tile["signal_coverage"] == pytest.approx(inside / everything, abs=1e-6)
    # Half of the nuclei deleted: coverage falls.
    ids = np.unique(labels)[1:]
    tifffile.imwrite(tmp_path / "half.tif", np.where(np.isin(labels, ids[::2]), 0, labels).astype(np.uint32))
    half = write_qc_report(tmp_path / "half.tif", tmp_path / "slide.tif", tmp_path / "half.json",
                           thresholds=QCThresholds(tile_size_px=64)).report["slide"]
    assert half["signal_coverage"] < slide["signal_coverage"] - 0.1


def test_the_qc_seed_draws_the_noise_crops(tmp_path):
    """One seed for the QC's random samples (``teacher_sample_seed`` of its config): on a slide
    whose crops differ, another seed gives another, reproducible noise threshold."""
    import tifffile

    from nuclei_app.config import QCThresholds
    from nuclei_app.qc.slide import write_qc_report
    from nuclei_app.seeding import seed_sequence

    rng = np.random.default_rng(1)
    image = np.concatenate([rng.gamma(2, 10, (400, 300)),
                            rng.gamma(2, 10, (400, 300)) + rng.choice([0, 80], (400, 300), p=[0.7, 0.3])], 1)
    tifffile.imwrite(tmp_path / "slide.tif", image.astype(np.float32))
    tifffile.imwrite(tmp_path / "labels.tif", np.zeros(image.shape, np.uint32))
    found = {}
    for seed in (0, 5):
        report = write_qc_report(tmp_path / "labels.tif", tmp_path / "slide.tif", tmp_path / f"qc{seed}.json",
                                 thresholds=QCThresholds(teacher_sample_seed=seed)).report
        found[seed] = report["slide"]["noise_threshold"][0]
        assert found[seed] == pytest.approx(
            noise_threshold(image.astype(np.float32), seed=seed_sequence(seed, "qc_noise_crops")), abs=1e-4)
        assert report["provenance"]["parameters"]["seed_paper"]["seed"] == seed
    assert found[0] != pytest.approx(found[5], abs=0.1)


def test_noise_thresholds_of_a_slide_come_from_its_seeded_crops(tmp_path):
    """The slide's threshold is the pure function's on the same crops (the ``qc_noise_crops`` stream)."""
    import tifffile

    from nuclei_app.io.slides import open_slide
    from nuclei_app.qc.slide import slide_noise_thresholds
    from nuclei_app.seeding import seed_sequence

    image = np.random.default_rng(4).choice(np.array([10.0, 20.0, 60.0, 100.0]), size=(200, 300)).astype(np.float32)
    tifffile.imwrite(tmp_path / "slide.tif", image)
    with open_slide(tmp_path / "slide.tif") as slide:
        thresholds = slide_noise_thresholds(slide, [0], seed=7)
        again = slide_noise_thresholds(slide, [0], seed=7)
    assert thresholds.tolist() == again.tolist()
    assert thresholds[0] == pytest.approx(noise_threshold(image, seed=seed_sequence(7, "qc_noise_crops")))
    assert thresholds[0] == pytest.approx(40.0)


def test_mixture_on_distinct_values_with_counts_equals_the_mixture_on_every_pixel():
    from nuclei_app.core.noise import sample_quantiles

    sample = np.round(np.random.default_rng(2).normal(50, 12, 20000))
    distinct, counts = np.unique(sample, return_counts=True)
    q = np.array([0.0, 0.125, 0.375, 0.5, 0.625, 0.875, 1.0])
    np.testing.assert_allclose(sample_quantiles(distinct, counts, q), np.quantile(sample, q))
    for full, compact in zip(fit_gaussian_mixture_1d(sample), fit_gaussian_mixture_1d(distinct, counts=counts)):
        np.testing.assert_allclose(compact, full, rtol=1e-8)
