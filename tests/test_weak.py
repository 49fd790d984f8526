"""The weak teacher on real nuclei images with human masks, on synthetic edge cases, and `nuclei-app weak`."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from nuclei_app.errors import ExitCode
from nuclei_app.core.metrics import score_instances
from nuclei_app.core.instances import Instances
from nuclei_app.io.labels import read_labels
from nuclei_app.core.weak import IGNORE_BELOW_CONFIDENCE, WeakLabels, estimate_nucleus_diameter, log_watershed, otsu_watershed, weak_labels
from nuclei_app.core.intensity import nuclear_composite

DSB_DENSE = ("dsb2018-stage1-fixed", "dsb_07fb37aafa66")  # U2OS Hoechst, 313 nuclei, many touching
DSB_SMALL = ("dsb2018-stage1-fixed", "dsb_f6863b83d75e")  # 256 x 256, dense clusters
COELHO = ("coelho2009-isbi", "coelho_gnf_dna41")  # large textured nuclei (~100 px)


def load_pair(root, source_name):
    source, name = source_name
    image = tifffile.imread(root / source / f"{name}_img.tif")
    mask = tifffile.imread(root / source / f"{name}_masks.tif")
    return image, mask


def median_equivalent_diameter(mask: np.ndarray) -> float:
    areas = np.bincount(mask.ravel())[1:]
    return float(np.sqrt(4 * np.median(areas[areas > 0]) / np.pi))


def disks_image(radius=8, rows=5, cols=6, touching_pairs=True, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Bright disks (some pairs touching) on a noisy, unevenly lit background, and their true labels."""
    rng = np.random.default_rng(seed)
    shape = (rows * 5 * radius, cols * 5 * radius)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    truth = np.zeros(shape, dtype=np.uint32)
    label = 0
    for row in range(rows):
        for col in range(cols):
            cy, cx = (row + 0.5) * 5 * radius, (col + 0.5) * 5 * radius
            centres = [(cy, cx - 0.95 * radius), (cy, cx + 0.95 * radius)] if touching_pairs and (row + col) % 3 == 0 else [(cy, cx)]
            for y, x in centres:
                label += 1
                truth[((yy - y) ** 2 + (xx - x) ** 2 <= radius**2) & (truth == 0)] = label
    image = 40 + 0.1 * xx + 120 * (truth > 0) + rng.normal(0, 6, shape)
    return image.astype(np.float32), truth


def test_weak_labels_on_a_dense_real_image_beat_a_floor(nuclei_gt_dir):
    image, mask = load_pair(nuclei_gt_dir, DSB_DENSE)
    log = weak_labels(image, method="log")
    otsu = weak_labels(image, method="otsu")
    log_scores = score_instances(log.labels, mask)
    otsu_scores = score_instances(otsu.labels, mask)
    # Measured: log f1 0.69 / AJI+ 0.56, otsu f1 0.75 / AJI+ 0.58 (benchmarks/weak_teacher.py).
    assert log_scores["f1_50"] > 0.6 and log_scores["aji_plus"] > 0.5
    assert otsu_scores["f1_50"] > 0.45 and otsu_scores["aji_plus"] > 0.38


def test_weak_labels_on_large_textured_nuclei(nuclei_gt_dir):
    image, mask = load_pair(nuclei_gt_dir, COELHO)
    result = weak_labels(image, method="otsu")
    scores = score_instances(result.labels, mask)
    assert scores["f1_50"] > 0.8 and scores["aji_plus"] > 0.65  # measured 0.94 / 0.83


@pytest.mark.parametrize("pair", [DSB_DENSE, DSB_SMALL, COELHO])
def test_diameter_estimate_is_within_a_factor_of_the_human_masks(nuclei_gt_dir, pair):
    image, mask = load_pair(nuclei_gt_dir, pair)
    estimate = estimate_nucleus_diameter(nuclear_composite(image))
    truth = median_equivalent_diameter(mask)
    assert truth / 1.5 < estimate < truth * 1.5, (estimate, truth)


def test_diameter_is_clamped_to_a_physical_range_when_pixel_size_is_known(nuclei_gt_dir):
    image, _ = load_pair(nuclei_gt_dir, DSB_SMALL)
    composite = nuclear_composite(image)
    assert estimate_nucleus_diameter(composite, pixel_size_um=(5.0, 5.0)) <= 30.0 / 5.0 + 1e-6
    assert estimate_nucleus_diameter(composite, pixel_size_um=0.05) >= 3.0 / 0.05 - 1e-6


def test_synthetic_disks_with_touching_pairs_are_found_and_split():
    image, truth = disks_image()
    for method in ("log", "otsu"):
        result = weak_labels(image, method=method)
        assert 16 / 1.3 < result.diameter < 16 * 1.3
        scores = score_instances(result.labels, truth)
        assert scores["f1_50"] > 0.9, (method, scores)
        assert scores["aji_plus"] > 0.75, (method, scores)


def test_weak_labels_contract(nuclei_gt_dir):
    image, _ = load_pair(nuclei_gt_dir, DSB_SMALL)
    result = weak_labels(image, method="log")
    assert isinstance(result, WeakLabels) and result.method == "log"
    n = result.count
    assert n > 20
    assert result.labels.dtype == np.uint32 and result.labels.shape == image.shape
    np.testing.assert_array_equal(np.unique(result.labels), np.arange(n + 1))  # ids 1..n, consecutive
    assert result.confidence.dtype == np.float32 and result.confidence.shape == (n,)
    assert np.all((result.confidence >= 0) & (result.confidence <= 1))
    assert result.ignore.dtype == bool and result.ignore.shape == image.shape
    low = np.flatnonzero(result.confidence < IGNORE_BELOW_CONFIDENCE) + 1
    assert np.all(result.ignore[np.isin(result.labels, low)])
    confident = np.setdiff1d(np.arange(1, n + 1), low)
    assert not result.ignore[np.isin(result.labels, confident)].any()
    areas = np.bincount(result.labels.ravel())[1:]
    assert areas.min() >= 0.1 * np.pi * result.diameter**2 / 4  # fragments removed
    instances = result.to_instances()
    assert isinstance(instances, Instances) and len(instances) == n
    np.testing.assert_allclose(instances.scores, result.confidence)
    np.testing.assert_array_equal(instances.to_label_image(), result.labels)


def test_weak_labels_are_deterministic(nuclei_gt_dir):
    image, _ = load_pair(nuclei_gt_dir, DSB_SMALL)
    for method in ("log", "otsu"):
        first, second = weak_labels(image, method=method), weak_labels(image, method=method)
        np.testing.assert_array_equal(first.labels, second.labels)
        np.testing.assert_array_equal(first.confidence, second.confidence)
        np.testing.assert_array_equal(first.ignore, second.ignore)


@pytest.mark.parametrize("image", [np.zeros((64, 64), np.uint16), np.full((2, 64, 64), 7.0)], ids=["empty", "flat"])
@pytest.mark.parametrize("labeler", ["log", "otsu"])
def test_empty_and_flat_images_give_no_objects_and_a_warning(image, labeler):
    with pytest.warns(RuntimeWarning, match="no objects"):
        result = weak_labels(image, method=labeler)
    assert result.count == 0 and not result.labels.any() and not result.ignore.any()
    assert result.labels.shape == (64, 64)


def test_composite_normalises_each_channel_and_averages():
    channel = np.linspace(0, 100, 64 * 64).reshape(64, 64)
    composite = nuclear_composite(np.stack([channel, 10 * channel]), percentiles=[[0, 100], [0, 1000]])
    assert composite.dtype == np.float32
    np.testing.assert_allclose(composite, channel / 100, atol=1e-6)
    clipped = nuclear_composite(channel, percentiles=[[25, 50]])
    assert clipped.min() == 0.0 and clipped.max() == 1.0
    auto = nuclear_composite(channel)
    assert 0.0 <= auto.min() and auto.max() <= 1.0


def test_given_diameter_is_used_and_both_labelers_accept_a_composite(nuclei_gt_dir):
    image, mask = load_pair(nuclei_gt_dir, DSB_SMALL)
    composite = nuclear_composite(image)
    diameter = median_equivalent_diameter(mask)
    for labeler in (log_watershed, otsu_watershed):
        result = labeler(composite, diameter)
        assert result.diameter == pytest.approx(diameter)
        assert score_instances(result.labels, mask)["f1_50"] > 0.5
    with pytest.raises(ValueError):
        weak_labels(image, method="cellpose")


def test_cli_weak_writes_tiff_and_ome_zarr(run_cli, tmp_path, nuclei_gt_dir):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    source = nuclei_gt_dir / DSB_SMALL[0] / f"{DSB_SMALL[1]}_img.tif"
    mask = tifffile.imread(nuclei_gt_dir / DSB_SMALL[0] / f"{DSB_SMALL[1]}_masks.tif")
    result = run_cli("weak", source, "-o", tmp_path / "labels.tif")
    assert result.exit_code == 0, result.stderr
    labels = read_labels(tmp_path / "labels.tif")
    assert f"{labels.max()} nuclei" in result.stdout and "diameter" in result.stdout
    assert score_instances(labels, mask)["f1_50"] > 0.5

    result = run_cli("weak", source, "-o", tmp_path / "labels.ome.zarr", "--method", "otsu", "--diameter", "18")
    assert result.exit_code == 0, result.stderr
    assert "diameter 18.0 px" in result.stdout
    zarr_labels = read_labels(tmp_path / "labels.ome.zarr")
    assert zarr_labels.shape == mask.shape and zarr_labels.max() > 20
    nodes = list(Reader(parse_url(str(tmp_path / "labels.ome.zarr")))())
    image_node = nodes[0]
    np.testing.assert_array_equal(np.asarray(image_node.data[0])[0], tifffile.imread(source))
    label_node = next(node for node in nodes if any(isinstance(spec, Label) for spec in node.specs))
    np.testing.assert_array_equal(np.asarray(label_node.data[0]), zarr_labels)


def test_cli_weak_errors(run_cli, tmp_path, nuclei_gt_dir):
    source = nuclei_gt_dir / DSB_SMALL[0] / f"{DSB_SMALL[1]}_img.tif"
    result = run_cli("weak", source, "-o", tmp_path / "x.tif", "--method", "magic")
    assert result.exit_code == ExitCode.USAGE and "log, otsu" in result.stderr
    result = run_cli("weak", source, "-o", tmp_path / "x.png")
    assert result.exit_code == ExitCode.USAGE
    result = run_cli("weak", tmp_path / "missing.tif", "-o", tmp_path / "x.tif")
    assert result.exit_code == ExitCode.MISSING_INPUT and "missing.tif" in result.stderr
    assert not (tmp_path / "x.tif").exists()


def test_cli_weak_on_an_empty_image_warns_and_writes_empty_labels(run_cli, tmp_path):
    tifffile.imwrite(tmp_path / "blank.tif", np.zeros((64, 64), np.uint16))
    result = run_cli("weak", tmp_path / "blank.tif", "-o", tmp_path / "blank_labels.tif")
    assert result.exit_code == 0, result.stderr
    assert "0 nuclei" in result.stdout and "warning" in result.stderr
    assert not read_labels(tmp_path / "blank_labels.tif").any()
