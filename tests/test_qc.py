"""QC without ground truth: metric functions, config, the `qc` command, planted failures, bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from nuclei_app.config import QCThresholds
from nuclei_app.qc.slide import InvalidQCReportError, validate_qc_report, write_qc_report
from nuclei_app.core.tiling import qc_tile_edges
from nuclei_app.core.intensity import signal_autocorrelation
from nuclei_app.qc.rules import load_qc_config, qc_status
from nuclei_app.qc.metrics import SLIDE_METRICS, foreground_coverage, foreground_precision, morphology_outliers, overlapping_ids, seed_points, seed_recall, straight_cut_ids, tile_qc_score
from nuclei_app.schemas import load_schema, schema_errors

#: 360 x 360 px, 36 nuclei of about 40 px (DSB 2018 stage 1, CC0): fast and a clean "good" case.
SMALL = "dsb_5488e8df5440"


def disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


@pytest.fixture(scope="module")
def small_pair(nuclei_gt_dir: Path) -> tuple[Path, Path]:
    folder = nuclei_gt_dir / "dsb2018-stage1-fixed"
    return folder / f"{SMALL}_img.tif", folder / f"{SMALL}_masks.tif"


def read_report(path: Path) -> dict:
    report = json.loads(path.read_text())
    assert schema_errors(report, "qc_report") == []
    return report


def codes(report: dict) -> set[str]:
    return {reason["code"] for reason in report["reasons"]}


# ------------------------------------------------------------------------ metric functions


def test_signal_autocorrelation_tells_nuclei_from_noise():
    rng = np.random.default_rng(0)
    blobs = np.zeros((128, 128), np.float32)
    for centre in rng.integers(10, 118, size=(20, 2)):
        blobs[disc(blobs.shape, centre, 6)] = 1.0
    blobs += rng.normal(0, 0.05, blobs.shape).astype(np.float32)
    noise = rng.random((128, 128)).astype(np.float32)
    assert signal_autocorrelation(blobs) > 0.8
    assert abs(signal_autocorrelation(noise)) < 0.1
    assert signal_autocorrelation(np.ones((16, 16))) is None


def test_foreground_coverage_and_precision_count_pixels():
    foreground = np.zeros((10, 10), bool)
    foreground[:, :5] = True  # 50 px
    nuclei = np.zeros((10, 10), bool)
    nuclei[:, 3:8] = True  # 50 px, 20 of them on the foreground
    assert foreground_coverage(nuclei, foreground) == pytest.approx(20 / 50)
    assert foreground_precision(nuclei, foreground) == pytest.approx(20 / 50)
    assert foreground_coverage(nuclei, np.zeros_like(foreground)) is None
    assert foreground_precision(np.zeros_like(nuclei), foreground) is None


def test_seed_points_lie_inside_their_objects_and_recall_counts_them():
    labels = np.zeros((64, 64), np.uint32)
    labels[disc(labels.shape, (16, 16), 8)] = 1
    # A crescent: its centroid lies outside it, its innermost pixel does not.
    labels[disc(labels.shape, (44, 44), 12) & ~disc(labels.shape, (44, 52), 10)] = 2
    seeds = seed_points(labels)
    assert seeds.shape == (2, 2)
    assert labels[seeds[0, 0], seeds[0, 1]] == 1 and labels[seeds[1, 0], seeds[1, 1]] == 2
    assert tuple(seeds[0]) == (16, 16)
    assert seed_recall(seeds, labels == 1) == pytest.approx(0.5)
    assert seed_recall(np.zeros((0, 2), int), labels > 0) is None
    # Ids need not be consecutive; a one-pixel-wide object (no interior) keeps its first pixel.
    labels[60, 2:9] = 70
    sparse = seed_points(labels)
    assert np.array_equal(sparse[:2], seeds) and tuple(sparse[2]) == (60, 2)


def test_straight_cut_ids_finds_nuclei_cut_at_a_line_but_not_round_ones():
    labels = np.zeros((80, 80), np.uint32)
    labels[disc(labels.shape, (20, 20), 12)] = 1  # whole: touches column 33 with a short run only
    cut = disc(labels.shape, (60, 40), 12)
    cut[:, 40:] = False  # cut flat at the line between columns 39 and 40
    labels[cut] = 2
    assert straight_cut_ids(labels, axis=1, position=40, min_run=8).tolist() == [2]
    assert straight_cut_ids(labels, axis=1, position=33, min_run=8).tolist() == []
    # The same cut seen from the other side, on a horizontal line.
    assert straight_cut_ids(labels.T, axis=0, position=40, min_run=8).tolist() == [2]


def test_overlapping_ids_finds_pairs_across_layers():
    layer0 = np.zeros((20, 20), np.uint32)
    layer1 = np.zeros((20, 20), np.uint32)
    layer0[2:8, 2:8] = 1
    layer0[12:18, 12:18] = 3
    layer1[5:10, 5:10] = 2  # overlaps 1
    assert overlapping_ids([layer0, layer1]).tolist() == [1, 2]
    assert overlapping_ids([layer0]).tolist() == []


def test_morphology_outliers_flag_giants_ragged_and_slivers_against_the_slide():
    rng = np.random.default_rng(1)
    area = rng.normal(300, 20, 200)
    solidity = rng.normal(0.95, 0.01, 200)
    eccentricity = rng.normal(0.5, 0.05, 200)
    area[0], solidity[1], eccentricity[2] = 3000, 0.6, 0.99
    eccentricity[3] = 0.0  # rounder than usual is not an error
    flags, reference = morphology_outliers(area, solidity, eccentricity, k=3.5)
    assert flags["area"][0] and flags["solidity"][1] and flags["eccentricity"][2]
    assert not flags["any"][3]
    assert flags["any"].sum() <= 6
    assert reference["solidity_median"] == pytest.approx(0.95, abs=0.01)


def test_tile_qc_score_is_the_weighted_mean_of_available_components():
    assert tile_qc_score({"teacher_student_f1": 1.0, "seed_recall": 0.0}) == pytest.approx(3 / 4)
    assert tile_qc_score({"teacher_student_f1": None, "seed_recall": 0.5}) == pytest.approx(0.5)
    assert tile_qc_score({}) is None


def test_qc_status_lists_failures_first_with_machine_readable_reasons():
    status, reasons = qc_status({"n_nuclei": 10, "foreground_share": 0.3, "seed_recall": 0.6,
                                 "teacher_student_f1": 0.1, "score_mean": None}, QCThresholds())
    assert status == "fail"
    assert [r["code"] for r in reasons] == ["low_teacher_agreement", "low_seed_recall"]
    assert reasons[0] == {"code": "low_teacher_agreement", "severity": "fail", "metric": "teacher_student_f1",
                          "value": 0.1, "threshold": 0.25, "comparison": "<",
                          "message": reasons[0]["message"]}
    assert reasons[1]["severity"] == "warn"
    assert qc_status({"n_nuclei": 5, "foreground_share": 0.2, "seed_recall": 0.95})[0] == "pass"
    assert qc_status({"n_nuclei": 0, "foreground_share": 0.2})[1][0]["code"] == "no_nuclei"


def test_qc_tile_edges_widen_the_last_tile_instead_of_a_sliver():
    assert qc_tile_edges(520, 128) == [0, 128, 256, 384, 520]
    assert qc_tile_edges(600, 128) == [0, 128, 256, 384, 512, 600]
    assert qc_tile_edges(100, 512) == [0, 100]


def test_a_report_that_breaks_its_schema_fails_loudly():
    with pytest.raises(InvalidQCReportError, match="breaks its schema"):
        validate_qc_report({"status": "maybe"})


# ------------------------------------------------------------------------ QC config


def test_qc_config_from_json_and_toml(tmp_path: Path):
    json_path = tmp_path / "qc.json"
    json_path.write_text(json.dumps({"tile_size_px": 256, "seed_recall_warn": 0.8}))
    toml_path = tmp_path / "qc.toml"
    toml_path.write_text("[qc]\nteacher_student_f1_fail = 0.2\nmax_overlays = 3\n")
    assert load_qc_config(json_path) == QCThresholds(tile_size_px=256, seed_recall_warn=0.8)
    assert load_qc_config(toml_path) == QCThresholds(teacher_student_f1_fail=0.2, max_overlays=3)
    assert load_qc_config(None) == QCThresholds()


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("unknown.json", '{"seed_recal_warn": 0.5}', "'seed_recal_warn' was unexpected"),
        ("range.toml", "seed_recall_fail = 1.5\n", "seed_recall_fail: 1.5 is greater than the maximum of 1"),
        ("order.json", '{"seed_recall_fail": 0.9, "seed_recall_warn": 0.8}', "must not exceed"),
        ("type.json", '{"tile_size_px": "big"}', "is not of type 'integer'"),
        ("syntax.toml", "tile_size_px = = 3\n", "cannot parse the QC config"),
    ],
)
def test_bad_qc_config_is_a_one_line_usage_error(run_cli, small_pair, tmp_path, name, text, message):
    image, masks = small_pair
    config = tmp_path / name
    config.write_text(text)
    result = run_cli("qc", masks, image, "-o", tmp_path / "qc.json", "--config", config)
    assert result.exit_code == 64
    assert message in result.stderr and str(config) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "qc.json").exists()


def test_missing_qc_config_exits_66(run_cli, small_pair, tmp_path):
    image, masks = small_pair
    result = run_cli("qc", masks, image, "-o", tmp_path / "qc.json", "--config", tmp_path / "absent.toml")
    assert result.exit_code == 66 and len(result.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------ real data


def test_cli_qc_of_human_masks_passes_with_a_schema_valid_report(run_cli, small_pair, tmp_path):
    image, masks = small_pair
    output = tmp_path / "sub-01_sample-A_desc-nuclei_qc.json"
    result = run_cli("qc", masks, image, "-o", output)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("status: pass;")
    report = read_report(output)
    assert report["status"] == "pass" and report["reasons"] == []
    slide = report["slide"]
    assert slide["n_nuclei"] == 36
    assert slide["foreground_coverage"] > 0.9 and slide["seed_recall"] > 0.9
    assert slide["teacher_student_f1"] > 0.6
    assert slide["signal_autocorrelation"] > 0.9
    assert slide["score_mean"] is None and slide["density_per_mm2"] is None  # no table, no pixel size
    tile = report["tiles"][0]
    assert (tile["y0"], tile["x0"], tile["height"], tile["width"]) == (0, 0, 360, 360)
    provenance = report["provenance"]
    assert provenance["image"]["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    assert provenance["labels"]["sha256"] == hashlib.sha256(masks.read_bytes()).hexdigest()
    assert provenance["software"]["name"] == "nuclei-app"
    assert provenance["parameters"]["thresholds"] == QCThresholds().to_dict()
    assert report["timings"]["total_seconds"] > 0


def shifted(labels: np.ndarray, by: int) -> np.ndarray:
    out = np.zeros_like(labels)
    out[by:, by:] = labels[:-by, :-by]
    return out


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("shifted_half_diameter", {"low_teacher_agreement", "low_foreground_coverage"}),
        ("half_deleted", {"low_seed_recall", "low_foreground_coverage"}),
    ],
)
def test_planted_label_failures_fail_with_the_right_reason(small_pair, tmp_path, case, expected):
    image, masks = small_pair
    truth = tifffile.imread(masks)
    good = write_qc_report(masks, image, tmp_path / "good.json").report
    diameter = good["provenance"]["parameters"]["nucleus_diameter_px"]
    if case == "shifted_half_diameter":
        planted = shifted(truth, int(round(diameter / 2)))
    else:
        ids = np.unique(truth)[1:]
        planted = np.where(np.isin(truth, ids[::2]), 0, truth)
    path = tmp_path / f"{case}.tif"
    tifffile.imwrite(path, planted)
    report = write_qc_report(path, image, tmp_path / f"{case}_qc.json").report
    assert good["status"] == "pass"
    assert report["status"] == "fail"
    assert expected <= codes(report)
    failed = {r["code"] for r in report["reasons"] if r["severity"] == "fail"}
    assert failed & expected
    # The seed paper's coverage falls too: stained nuclei lie outside the (deleted or shifted) masks.
    assert report["slide"]["signal_coverage"] < good["slide"]["signal_coverage"] - 0.1
    assert report["slide"]["noise_threshold"] == good["slide"]["noise_threshold"]  # the image's, not the labels'


def test_noise_slide_fails_for_missing_nuclear_signal(run_cli, small_pair, tmp_path):
    from nuclei_app.segment.predictors import PredictorSpec
    from nuclei_app.segment.pipeline import segment_slide

    image, _ = small_pair
    noise = tmp_path / "noise.tif"
    tifffile.imwrite(noise, np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8))
    store = tmp_path / "noise_desc-nuclei_FLUO.ome.zarr"
    segmented = segment_slide(noise, store, PredictorSpec("weak"), progress=False)
    assert segmented.n_nuclei == 0
    result = run_cli("qc", store, noise, "-o", tmp_path / "noise_qc.json")
    assert result.exit_code == 0, result.stderr
    report = read_report(tmp_path / "noise_qc.json")
    assert report["status"] == "fail"
    assert {"no_nuclear_signal", "no_nuclei"} <= codes(report)
    assert report["slide"]["signal_autocorrelation"] < 0.1
    # Noise above its own threshold, and no nucleus to hold it: nothing is covered, nothing clumps.
    assert report["slide"]["signal_coverage"] == 0.0 and report["slide"]["clump_count"] == 0


def test_zero_step_model_fails_and_model_rescoring_flags_it(run_cli, small_pair, tmp_path):
    from nuclei_app.config import TrainingConfig
    from nuclei_app.segment.predictors import PredictorSpec
    from nuclei_app.segment.pipeline import segment_slide
    from nuclei_app.train.loop import train_model

    image, masks = small_pair
    model_dir = tmp_path / "model-zero"
    # A budget of a nanosecond: not a single optimiser step (the weights stay random).
    result = train_model([image], model_dir, TrainingConfig(steps_per_round=1, rounds=0, max_minutes=1e-9))
    assert result.report["rounds"][0]["steps"] == 0
    store = tmp_path / "zero_desc-nuclei_FLUO.ome.zarr"
    segment_slide(image, store, PredictorSpec("model", str(model_dir)), progress=False)
    report = write_qc_report(store, image, tmp_path / "zero_qc.json").report
    assert report["status"] == "fail"
    assert codes(report) & {"no_nuclei", "low_foreground_coverage", "low_teacher_agreement", "low_seed_recall"}
    assert report["provenance"]["model"]["source"] == "run_record"
    # Rescoring the human masks with the untrained model's heads: it confirms none of them.
    cli = run_cli("qc", masks, image, "-o", tmp_path / "rescored.json", "--model", model_dir, "--device", "cpu")
    assert cli.exit_code == 0, cli.stderr
    rescored = read_report(tmp_path / "rescored.json")
    assert rescored["provenance"]["parameters"]["scores_from"] == "model"
    assert rescored["provenance"]["model"]["model_id"] == result.card["model_id"]
    assert rescored["slide"]["score_mean"] < 0.4
    assert "low_detection_scores" in codes(rescored)


def test_segmentation_store_uses_its_table_layers_and_tile_grid(nuclei_gt_dir, tmp_path):
    from nuclei_app.config import SegmentConfig
    from nuclei_app.segment.predictors import PredictorSpec
    from nuclei_app.segment.pipeline import segment_slide

    image = nuclei_gt_dir / "dsb2018-stage1-fixed" / "dsb_f6863b83d75e_img.tif"
    store = tmp_path / "sub-01_sample-B_desc-nuclei_FLUO.ome.zarr"
    table = tmp_path / "sub-01_sample-B_desc-nuclei_objects.tsv"
    segment_slide(image, store, PredictorSpec("weak"), SegmentConfig(tile=128, overlap=32), table_path=table,
                  progress=False)
    report = write_qc_report(store, image, tmp_path / "sub-01_sample-B_desc-nuclei_qc.json",
                             thresholds=QCThresholds(tile_size_px=128)).report
    parameters = report["provenance"]["parameters"]
    assert parameters["scores_from"] == "table" and report["provenance"]["table"]["path"] == str(table.resolve())
    # The stride of the grid segment used (grown from 128 / 32 to hold this image's 35-px nuclei).
    from nuclei_app.segment.record import read_run_record

    grid = read_run_record(store)["parameters"]
    assert grid["overlap"] > 32
    assert parameters["seam_lines_from"] == "run_record" and parameters["seam_stride_px"] == grid["tile"] - grid["overlap"]
    slide = report["slide"]
    assert slide["score_mean"] is not None and slide["head_agreement_mean"] == pytest.approx(1.0)
    assert slide["n_layers"] >= 1 and slide["overlap_share"] is not None
    # The stitcher keeps nuclei whole across tiles: no more straight cuts at seams than elsewhere.
    assert slide["seam_excess"] is not None and slide["seam_excess"] < QCThresholds().seam_excess_warn
    assert "seam_artifacts" not in codes(report)
    assert len(report["tiles"]) == slide["n_tiles_analysed"] > 1


def test_flagged_tiles_are_ranked_and_drawn_beside_the_report(small_pair, tmp_path):
    image, masks = small_pair
    output = tmp_path / "x_desc-nuclei_qc.json"
    thresholds = QCThresholds(tile_size_px=128, flag_tile_score_below=1.0, max_overlays=3)
    result = write_qc_report(masks, image, output, thresholds=thresholds)
    flagged = result.report["flagged_tiles"]
    assert len(flagged) == 9 and [f["rank"] for f in flagged] == list(range(1, 10))  # 3 x 3 tiles
    assert [f["qc_score"] for f in flagged] == sorted(f["qc_score"] for f in flagged)
    assert result.overlay_dir == tmp_path / "x_desc-nuclei_qc"
    drawn = [f for f in flagged if f["overlay"]]
    assert len(drawn) == 3 and all(f["overlay"] is None for f in flagged[3:])
    for entry in drawn:
        png = (output.parent / entry["overlay"]).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert entry["overlay"] == f"x_desc-nuclei_qc/tile-{entry['y0']}-{entry['x0']}.png"


# ------------------------------------------------------------------------ bad input


def test_labels_of_another_shape_exit_65_with_one_line(run_cli, small_pair, tmp_path):
    image, _ = small_pair
    labels = tmp_path / "labels.tif"
    tifffile.imwrite(labels, np.zeros((100, 120), np.uint16))
    result = run_cli("qc", labels, image, "-o", tmp_path / "qc.json")
    assert result.exit_code == 65
    assert "labels shape (100, 120) differs from image shape (360, 360)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "qc.json").exists()


def test_non_integer_labels_exit_65_with_one_line(run_cli, small_pair, tmp_path):
    image, _ = small_pair
    labels = tmp_path / "float_labels.tif"
    tifffile.imwrite(labels, np.random.default_rng(0).random((360, 360)).astype(np.float32))
    result = run_cli("qc", labels, image, "-o", tmp_path / "qc.json")
    assert result.exit_code == 65 and "non-integer" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_labels_exit_66(run_cli, small_pair, tmp_path):
    image, _ = small_pair
    result = run_cli("qc", tmp_path / "absent.ome.zarr", image, "-o", tmp_path / "qc.json")
    assert result.exit_code == 66 and len(result.stderr.strip().splitlines()) == 1


def test_multichannel_ome_tiff_uses_the_nuclear_channel_and_the_pixel_size(small_pair, tmp_path):
    image, masks = small_pair
    dapi = tifffile.imread(image)
    other = np.random.default_rng(2).integers(0, 50, dapi.shape, dtype=np.uint8)
    slide = tmp_path / "slide.ome.tif"
    tifffile.imwrite(slide, np.stack([other, dapi]), ome=True, photometric="minisblack",
                     metadata={"axes": "CYX", "Channel": {"Name": ["CD3", "DAPI"]},
                               "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    report = write_qc_report(masks, slide, tmp_path / "qc.json", thresholds=QCThresholds(tile_size_px=128)).report
    assert report["status"] == "pass"
    assert report["provenance"]["parameters"]["nuclear_channels"] == ["DAPI"]
    assert report["image"]["pixel_size_um"] == [0.5, 0.5]
    tile = report["tiles"][4]
    assert (tile["y0_um"], tile["x0_um"], tile["height_um"]) == (64.0, 64.0, 64.0)
    area_mm2 = 360 * 360 * 0.25 / 1e6
    assert report["slide"]["density_per_mm2"] == pytest.approx(36 / area_mm2, rel=1e-4)


def test_every_metric_is_documented_like_an_mriqc_iqm():
    from nuclei_app.schemas import load_schema

    schema = load_schema("qc_report")
    documented = {
        **schema["properties"]["slide"]["properties"],
        **schema["properties"]["tiles"]["items"]["properties"],
    }
    metrics = {name: spec for name, spec in documented.items() if "x-better" in spec}
    assert len(metrics) >= 35
    for name, spec in metrics.items():
        assert spec["x-better"] in ("higher", "lower", "none"), name
        assert "Unit:" in spec["description"] and "Range:" in spec["description"], name
        assert spec["x-unit"] and len(spec["x-range"]) == 2, name


def test_qc_config_schema_matches_the_thresholds_dataclass():
    from dataclasses import fields

    from nuclei_app.schemas import load_schema

    properties = load_schema("qc_config")["properties"]
    assert list(properties) == [f.name for f in fields(QCThresholds)]
    assert {name: spec["default"] for name, spec in properties.items()} == QCThresholds().to_dict()


def test_slide_metrics_are_written_in_the_schema_order():
    from nuclei_app.qc.signal_coverage import SEED_PAPER_SLIDE_METRICS

    slide = load_schema("qc_report")["properties"]["slide"]
    assert list(SLIDE_METRICS + SEED_PAPER_SLIDE_METRICS) == slide["required"] == list(slide["properties"])


# ------------------------------------------------------------------------ pictures of every slide


def test_thumbnail_built_tile_by_tile_equals_the_whole_slide_block_averaged():
    from skimage.transform import downscale_local_mean

    from nuclei_app.qc.thumbnail import ThumbnailCanvas

    image = np.random.default_rng(5).random((100, 130))
    canvas = ThumbnailCanvas((100, 130), factor=3)
    for y0, y1 in ((0, 40), (40, 77), (77, 100)):  # tile edges that are not multiples of the factor
        for x0, x1 in ((0, 64), (64, 130)):
            canvas.add(image[y0:y1, x0:x1], y0, x0)
    padded = np.pad(image, ((0, 2), (0, 2)), constant_values=np.nan)
    expected = np.nanmean(padded.reshape(34, 3, 44, 3), axis=(1, 3))
    np.testing.assert_allclose(canvas.image(), expected)
    np.testing.assert_allclose(canvas.image()[:33, :43], downscale_local_mean(image[:99, :129], (3, 3)))


def test_every_slide_gets_a_score_thumbnail_and_its_worst_and_median_tile(small_pair, tmp_path):
    import imagecodecs

    image, masks = small_pair
    output = tmp_path / "y_desc-nuclei_qc.json"
    result = write_qc_report(masks, image, output, thresholds=QCThresholds(tile_size_px=128, max_overlays=0))
    report = read_report(output)
    pictures = report["pictures"]
    assert report["flagged_tiles"] == [] and result.overlay_dir == tmp_path / "y_desc-nuclei_qc"
    thumbnail = imagecodecs.png_decode((tmp_path / pictures["thumbnail"]).read_bytes())
    assert thumbnail.shape == (360, 360, 3) and pictures["thumbnail_downsample"] == 1
    scores = sorted((t["qc_score"], t["index"]) for t in report["tiles"])
    assert pictures["worst_tile"]["tile_index"] == scores[0][1]
    assert pictures["median_tile"]["tile_index"] == scores[(len(scores) - 1) // 2][1]
    for entry in (pictures["worst_tile"], pictures["median_tile"]):
        assert (tmp_path / entry["overlay"]).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    # The worst tile is framed in magenta on the thumbnail.
    worst = pictures["worst_tile"]
    assert tuple(thumbnail[worst["y0"], worst["x0"]]) == (230, 0, 230)


# ------------------------------------------------------------------------ the summary at the end of qc and segment


def test_qc_ends_with_a_plain_summary_in_a_pipe_and_a_table_on_a_terminal(run_cli, small_pair, tmp_path, monkeypatch):
    import sys

    image, masks = small_pair
    truth = tifffile.imread(masks)
    half = tmp_path / "half.tif"
    tifffile.imwrite(half, np.where(np.isin(truth, np.unique(truth)[1::2]), 0, truth))
    config = tmp_path / "qc.json"
    config.write_text(json.dumps({"tile_size_px": 128}))
    result = run_cli("qc", half, image, "-o", tmp_path / "half_qc.json", "--config", config)
    assert result.exit_code == 0, result.stderr
    report = read_report(tmp_path / "half_qc.json")
    lines = result.stdout.splitlines()
    assert lines[0].startswith("status: fail (") and lines[0].endswith(str(tmp_path / "half_qc.json"))
    labels = [line.split(":", 1)[0] for line in lines[1:]]
    assert labels == ["reasons", "signal coverage", "clumps", "worst tile 1", "worst tile 2", "worst tile 3"]
    assert f"fail: {report['reasons'][0]['message']}" in lines[1]
    assert lines[2].startswith(f"signal coverage: {report['slide']['signal_coverage']:.3f} (dilated 1-4 px: ")
    worst = min(report["tiles"], key=lambda t: (t["qc_score"], t["index"]))
    assert lines[4].startswith(f"worst tile 1: y {worst['y0']}, x {worst['x0']} ")
    # On a terminal: the same rows in a rich table.
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    table = run_cli("qc", half, image, "-o", tmp_path / "again.json", "--config", config)
    assert table.exit_code == 0, table.stderr
    assert "QC summary" in table.stdout and "│" in table.stdout and "signal coverage" in table.stdout
    assert table.stdout.rstrip().splitlines()[-1].startswith("status: fail (")


def test_segment_ends_with_the_qc_summary(run_cli, small_pair, tmp_path):
    image, _ = small_pair
    result = run_cli("segment", image, "--method", "weak", "-o", tmp_path / "s.ome.zarr", "--tile", 256,
                     "--overlap", 32)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    status_line = next(i for i, line in enumerate(lines) if line.startswith("QC "))
    assert lines[status_line] == f"QC pass -> {tmp_path / 's_qc.json'}"
    assert lines[status_line + 1] == "reasons: none"
    assert lines[status_line + 2].startswith("signal coverage: ")
    assert lines[status_line + 4].startswith("worst tile 1: y 0, x 0 (360x360 px): QC score ")


def test_teacher_runs_on_a_seeded_stratified_sample_of_tiles_documented_in_the_report(small_pair, tmp_path):
    from nuclei_app.qc.sampling import stratified_sample

    image, masks = small_pair
    thresholds = QCThresholds(tile_size_px=64, teacher_tiles_min=3, teacher_tiles_share=0.2, max_overlays=0)
    reports = [
        read_report(write_qc_report(masks, image, tmp_path / f"qc{seed}-{run}.json", thresholds=QCThresholds(
            **{**thresholds.to_dict(), "teacher_sample_seed": seed})).path)
        for seed, run in ((0, 0), (0, 1), (7, 0))
    ]
    first, again, other = reports
    sample = first["provenance"]["parameters"]["teacher_sample"]
    tiles = first["tiles"]
    assert len(tiles) > 20 and sample["n_tiles"] == max(3, int(np.ceil(0.2 * len(tiles))))
    assert sample["seed"] == 0 and sample["stratified_by"] == "provisional_qc_score"
    assert sample["tile_indices"] == [t["index"] for t in tiles if t["teacher_sampled"]]
    for tile in tiles:  # tiles outside the sample have no teacher fields, yet a QC score
        if not tile["teacher_sampled"]:
            assert tile["teacher_student_f1"] is None and tile["seed_recall"] is None and tile["n_seeds"] is None
            assert tile["qc_score"] is not None
    # An unsampled tile's QC score takes the slide's (sampled) teacher values for those components.
    from nuclei_app.qc.metrics import quality_components

    slide = first["slide"]
    tile = next(t for t in tiles if not t["teacher_sampled"])
    filled = {**quality_components(tile), "teacher_student_f1": slide["teacher_student_f1"],
              "seed_recall": slide["seed_recall"]}
    assert tile["qc_score"] == pytest.approx(tile_qc_score(filled), abs=1e-5)
    # The same seed gives the same tiles and the same report numbers; another seed, other tiles.
    assert again["provenance"]["parameters"]["teacher_sample"] == sample and again["tiles"] == tiles
    assert other["provenance"]["parameters"]["teacher_sample"]["tile_indices"] != sample["tile_indices"]
    # One item per stratum: keys 9..0 cut into 5 strata of two give one of each pair.
    picks = stratified_sample(np.arange(10.0)[::-1], 5, seed=0)
    assert sorted(picks // 2) == [0, 1, 2, 3, 4]
    # teacher_tiles_share = 1: the teacher runs on every tile, as before sampling existed.
    full = write_qc_report(masks, image, tmp_path / "all.json", thresholds=QCThresholds(
        tile_size_px=64, teacher_tiles_share=1.0, max_overlays=0)).report
    assert all(t["teacher_sampled"] for t in full["tiles"])
    assert full["provenance"]["parameters"]["teacher_sample"]["n_tiles"] == len(full["tiles"])
