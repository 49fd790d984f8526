"""Instance segmentation metrics on hand-built label images with known answers, and `nuclei-app evaluate`."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
import tifffile

from nuclei_app.errors import BadDataError, ExitCode, MissingInputError
from nuclei_app.evaluate import evaluate_paths, pairing_key
from nuclei_app.core.metrics import iou_matrix, score_instances, score_pooled
from nuclei_app.schemas import load_schema

METRICS = ("precision_50", "recall_50", "f1_50", "ap_50_95", "aji_plus", "pq", "mean_matched_iou")


def canvas(shape=(40, 60)) -> np.ndarray:
    return np.zeros(shape, dtype=np.uint16)


def two_squares() -> np.ndarray:
    labels = canvas()
    labels[5:15, 5:15] = 1
    labels[20:30, 30:40] = 2
    return labels


def test_perfect_match_scores_one_even_with_other_ids():
    gt = two_squares()
    pred = np.where(gt == 1, 7, np.where(gt == 2, 3, 0)).astype(np.int32)
    scores = score_instances(pred, gt)
    for name in METRICS:
        assert scores[name] == pytest.approx(1.0), name
    assert (scores["n_pred"], scores["n_gt"], scores["tp_50"], scores["fp_50"], scores["fn_50"]) == (2, 2, 2, 0, 0)


def test_one_missed_object():
    gt = two_squares()
    pred = np.where(gt == 1, 1, 0)
    scores = score_instances(pred, gt)
    assert scores["precision_50"] == pytest.approx(1.0)
    assert scores["recall_50"] == pytest.approx(0.5)
    assert scores["f1_50"] == pytest.approx(2 / 3)
    assert scores["ap_50_95"] == pytest.approx(0.5)  # TP/(TP+FP+FN) = 1/2 at every threshold
    assert scores["aji_plus"] == pytest.approx(100 / 200)  # C = 100, U = 100 + missed 100
    assert scores["pq"] == pytest.approx(1.0 * 1 / 1.5)  # SQ 1, DQ = 1/(1 + 0 + 0.5)
    assert (scores["tp_50"], scores["fp_50"], scores["fn_50"]) == (1, 0, 1)


def test_split_object_at_exactly_half_iou_counts_at_05_only():
    gt = canvas()
    gt[10:20, 10:30] = 1  # area 200
    pred = canvas()
    pred[10:20, 10:20] = 1  # each half: IoU = 100 / 200 = 0.5 exactly
    pred[10:20, 20:30] = 2
    scores = score_instances(pred, gt)
    assert (scores["tp_50"], scores["fp_50"], scores["fn_50"]) == (1, 1, 0)  # IoU >= 0.5 counts
    assert scores["precision_50"] == pytest.approx(0.5)
    assert scores["recall_50"] == pytest.approx(1.0)
    assert scores["ap_50_95"] == pytest.approx(0.5 / 10)  # 1/2 at t = 0.5, 0 above
    assert scores["aji_plus"] == pytest.approx(100 / 300)  # pair (100 / 200) + unpaired half 100
    assert scores["mean_matched_iou"] == pytest.approx(0.5)


def test_shifted_object():
    gt = canvas()
    gt[10:20, 10:20] = 1
    pred = canvas()
    pred[10:20, 12:22] = 1  # intersection 80, union 120, IoU 2/3
    scores = score_instances(pred, gt)
    assert scores["mean_matched_iou"] == pytest.approx(2 / 3)
    assert scores["ap_50_95"] == pytest.approx(4 / 10)  # matched at t = 0.50, 0.55, 0.60, 0.65
    assert scores["aji_plus"] == pytest.approx(80 / 120)
    assert scores["pq"] == pytest.approx(2 / 3)
    assert scores["f1_50"] == pytest.approx(1.0)


def test_aji_plus_counts_a_merged_prediction_once():
    """AJI (original) would reuse the merged object for both true nuclei: C/U = 200/400.
    AJI+ pairs it once: C = 100, U = 200 (pair) + 100 (unpaired true object) -> 1/3."""
    gt = canvas()
    gt[10:20, 0:10] = 1
    gt[10:20, 10:20] = 2
    pred = canvas()
    pred[10:20, 0:20] = 5
    scores = score_instances(pred, gt)
    assert scores["aji_plus"] == pytest.approx(1 / 3)
    assert (scores["tp_50"], scores["fp_50"], scores["fn_50"]) == (1, 0, 1)


def test_aji_plus_breakdown_splits_the_union_into_outline_and_object_errors():
    from nuclei_app.core.metrics import aji_plus_breakdown

    gt = canvas((70, 60))
    gt[10:20, 0:10] = 1  # drawn 2 px too wide -> 20 excess pixels
    gt[30:40, 0:10] = 2  # drawn 1 px too tight -> 10 missed pixels
    gt[50:60, 0:10] = 3  # missed outright -> 100 unpaired true pixels
    pred = canvas((70, 60))
    pred[10:20, 0:12] = 1
    pred[30:40, 0:9] = 2
    pred[50:55, 40:50] = 3  # a false object -> 50 unpaired predicted pixels
    union = 100 + 20 + 90 + 10 + 50 + 100
    shares = aji_plus_breakdown([(pred, gt)])
    assert shares == pytest.approx({"aji_plus": 190 / union, "pred_excess": 20 / union, "gt_missed": 10 / union,
                                    "unpaired_pred": 50 / union, "unpaired_gt": 100 / union})
    assert shares["aji_plus"] == pytest.approx(score_instances(pred, gt)["aji_plus"])
    assert sum(shares.values()) == pytest.approx(1.0)


def test_aji_plus_uses_maximal_iou_assignment():
    gt = canvas()
    gt[0:10, 0:10] = 1  # area 100
    gt[0:10, 10:30] = 2  # area 200
    pred = canvas()
    pred[0:10, 0:15] = 1  # with gt 1: 100/150; with gt 2: 50/300
    pred[0:10, 15:30] = 2  # with gt 2: 150/200
    iou, pred_ids, gt_ids = iou_matrix(pred, gt)
    np.testing.assert_allclose(iou, [[100 / 150, 50 / 300], [0.0, 150 / 200]])
    assert list(pred_ids) == [1, 2] and list(gt_ids) == [1, 2]
    assert score_instances(pred, gt)["aji_plus"] == pytest.approx((100 + 150) / (150 + 200))


def test_iou_matrix_with_sparse_ids_and_background_only_image():
    gt = canvas()
    gt[0:4, 0:4] = 10
    pred = canvas()
    pred[0:4, 0:2] = 3
    iou, pred_ids, gt_ids = iou_matrix(pred, gt)
    assert iou.shape == (1, 1) and iou.dtype == np.float64
    assert iou[0, 0] == pytest.approx(0.5)
    assert list(pred_ids) == [3] and list(gt_ids) == [10]
    empty_iou, empty_pred, _ = iou_matrix(canvas(), gt)
    assert empty_iou.shape == (0, 1) and empty_pred.size == 0


def test_empty_cases():
    both = score_instances(canvas(), canvas())
    assert all(both[name] == 1.0 for name in METRICS)
    assert (both["n_pred"], both["n_gt"], both["tp_50"]) == (0, 0, 0)
    missed = score_instances(canvas(), two_squares())
    assert all(missed[name] == 0.0 for name in METRICS)
    assert missed["fn_50"] == 2
    spurious = score_instances(two_squares(), canvas())
    assert all(spurious[name] == 0.0 for name in METRICS)
    assert spurious["fp_50"] == 2


def test_scores_invariant_to_label_permutation_and_symmetric(nuclei_gt_dir):
    gt = tifffile.imread(nuclei_gt_dir / "dsb2018-stage1-fixed" / "dsb_f6863b83d75e_masks.tif").astype(np.int64)
    pred = np.roll(gt, (2, 3), axis=(0, 1))
    pred[:, :40] = 0  # some objects missed as well
    rng = np.random.default_rng(0)
    permute_gt = np.concatenate([[0], rng.permutation(int(gt.max())) + 1])
    permute_pred = np.concatenate([[0], rng.permutation(int(pred.max())) + 1000])
    base = score_instances(pred, gt)
    permuted = score_instances(permute_pred[pred], permute_gt[gt])
    for name in METRICS:
        assert permuted[name] == pytest.approx(base[name]), name
    swapped = score_instances(gt, pred)
    assert swapped["precision_50"] == pytest.approx(base["recall_50"])
    assert swapped["recall_50"] == pytest.approx(base["precision_50"])
    for name in ("f1_50", "ap_50_95", "aji_plus", "pq", "mean_matched_iou"):
        assert swapped[name] == pytest.approx(base[name]), name
    assert 0.2 < base["f1_50"] < 0.95  # the shift and the cut make a real, imperfect case


def test_scores_are_the_same_whatever_the_ids_however_large(nuclei_gt_dir):
    # Ids are counted through a lookup table when they are dense and sorted when they are
    # huge and sparse (a table would not fit): both ways must give the same scores.
    gt = tifffile.imread(nuclei_gt_dir / "kromp2020-nontissue" / "kromp_bmcyto_7_masks.tif").astype(np.int64)
    pred = np.roll(gt, (3, -2), axis=(0, 1))
    pred[pred % 5 == 0] = 0
    base = score_instances(pred, gt)
    for offset in (7, 2**40):  # a few gaps; ids far above the pixel count
        shifted = np.where(pred > 0, pred * 3 + offset, 0)
        again = score_instances(shifted, np.where(gt > 0, gt + offset, 0))
        assert {name: again[name] for name in base} == base
    iou, pred_ids, gt_ids = iou_matrix(np.where(pred > 0, pred + 2**40, 0), gt)
    assert pred_ids.min() > 2**40 and np.array_equal(iou, iou_matrix(pred, gt)[0])


def test_pooled_sums_counts_over_images():
    gt = two_squares()
    perfect = (gt, gt)
    missed_all = (canvas(), gt)
    pooled = score_pooled([perfect, missed_all])
    assert (pooled["tp_50"], pooled["fp_50"], pooled["fn_50"]) == (2, 0, 2)
    assert pooled["f1_50"] == pytest.approx(4 / 6)
    assert pooled["aji_plus"] == pytest.approx(200 / 400)
    assert pooled["ap_50_95"] == pytest.approx(0.5)
    assert score_pooled([]) == score_instances(canvas(), canvas())


def test_shape_mismatch_and_non_integer_labels_are_bad_data():
    with pytest.raises(BadDataError, match="differs"):
        score_instances(canvas((10, 10)), canvas((10, 11)))
    with pytest.raises(BadDataError, match="non-integer"):
        score_instances(np.full((10, 10), 0.5), canvas((10, 10)))
    with pytest.raises(BadDataError, match="negative"):
        score_instances(np.full((10, 10), -1), canvas((10, 10)))
    whole_floats = two_squares().astype(np.float32)  # labels saved as float by some tools
    assert score_instances(whole_floats, two_squares())["f1_50"] == 1.0


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("dsb_1_masks.tif", "dsb_1"),
        ("dsb_1_img.ome.zarr", "dsb_1"),
        ("dsb_1_pred.tif", "dsb_1"),
        ("dsb_1_img_labels.ome.tif", "dsb_1"),
        ("dsb_1.tiff", "dsb_1"),
        ("dsb_1_weak-log.tif", "dsb_1_weak-log"),
    ],
)
def test_pairing_key(name, key):
    assert pairing_key(name) == key


def write_folder_pair(tmp_path, nuclei_gt_dir):
    """GT folder (masks + images, as distributed) and a prediction folder with one partner missing."""
    source = nuclei_gt_dir / "dsb2018-stage1-fixed"
    names = ["dsb_f6863b83d75e", "dsb_693bc6458127", "dsb_c53326fe49fc"]
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    for name in names:
        mask = tifffile.imread(source / f"{name}_masks.tif")
        tifffile.imwrite(gt_dir / f"{name}_masks.tif", mask)
        tifffile.imwrite(gt_dir / f"{name}_img.tif", tifffile.imread(source / f"{name}_img.tif"))
    # Prediction 1: perfect, named NAME_pred.tif; prediction 2: shifted, named NAME_weak-log.tif.
    tifffile.imwrite(pred_dir / f"{names[0]}_pred.tif", tifffile.imread(gt_dir / f"{names[0]}_masks.tif"))
    shifted = np.roll(tifffile.imread(gt_dir / f"{names[1]}_masks.tif"), 3, axis=1)
    tifffile.imwrite(pred_dir / f"{names[1]}_weak-log.tif", shifted.astype(np.uint32))
    tifffile.imwrite(pred_dir / "unrelated.tif", np.zeros((8, 8), np.uint16))  # no ground truth
    return pred_dir, gt_dir, names


def test_directory_mode_pairs_by_name_and_reports_missing_partners(tmp_path, nuclei_gt_dir):
    pred_dir, gt_dir, names = write_folder_pair(tmp_path, nuclei_gt_dir)
    report = evaluate_paths(pred_dir, gt_dir)
    assert [row["name"] for row in report.images] == sorted(names[:2])
    by_name = {row["name"]: row for row in report.images}
    assert by_name[names[0]]["f1_50"] == 1.0
    assert by_name[names[1]]["f1_50"] < 1.0
    assert report.truth_without_prediction == [str(gt_dir / f"{names[2]}_masks.tif")]
    assert report.predictions_without_truth == [str(pred_dir / "unrelated.tif")]
    assert report.mean["f1_50"] == pytest.approx(np.mean([r["f1_50"] for r in report.images]))
    assert report.pooled["n_gt"] == sum(r["n_gt"] for r in report.images)


def test_cli_evaluate_folders_writes_schema_valid_json(run_cli, tmp_path, nuclei_gt_dir):
    pred_dir, gt_dir, names = write_folder_pair(tmp_path, nuclei_gt_dir)
    out = tmp_path / "reports" / "evaluation.json"
    result = run_cli("evaluate", pred_dir, gt_dir, "--json", out)
    assert result.exit_code == 0, result.stderr
    assert names[0] in result.stdout and "pooled" in result.stdout
    assert f"{names[2]}_masks.tif: no prediction partner" in result.stderr
    payload = json.loads(out.read_text())
    jsonschema.Draft202012Validator(load_schema("evaluation_report")).validate(payload)
    assert payload["n_images"] == 2
    assert payload["pooled"]["tp_50"] == sum(row["tp_50"] for row in payload["images"])
    assert not list(out.parent.glob("*.partial-*"))


def test_cli_evaluate_two_files(run_cli, tmp_path, nuclei_gt_dir):
    gt = nuclei_gt_dir / "dsb2018-stage1-fixed" / "dsb_c53326fe49fc_masks.tif"
    result = run_cli("evaluate", gt, gt, "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "r.json").read_text())["pooled"]["f1_50"] == 1.0


def test_cli_evaluate_shape_mismatch_is_one_line_naming_both_files(run_cli, tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", np.ones((10, 10), np.uint16))
    tifffile.imwrite(tmp_path / "b.tif", np.ones((10, 12), np.uint16))
    result = run_cli("evaluate", tmp_path / "a.tif", tmp_path / "b.tif")
    assert result.exit_code == ExitCode.BAD_DATA
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "a.tif" in lines[0] and "b.tif" in lines[0]


def test_cli_evaluate_non_integer_and_missing(run_cli, tmp_path):
    tifffile.imwrite(tmp_path / "float.tif", np.full((10, 10), 0.25, np.float32))
    tifffile.imwrite(tmp_path / "gt.tif", np.ones((10, 10), np.uint16))
    result = run_cli("evaluate", tmp_path / "float.tif", tmp_path / "gt.tif")
    assert result.exit_code == ExitCode.BAD_DATA
    assert "float.tif" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("evaluate", tmp_path / "nope.tif", tmp_path / "gt.tif")
    assert result.exit_code == ExitCode.MISSING_INPUT
    assert "nope.tif" in result.stderr


def test_folders_without_any_pair_are_missing_input(tmp_path):
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    tifffile.imwrite(tmp_path / "gt" / "x_masks.tif", np.ones((4, 4), np.uint16))
    with pytest.raises(MissingInputError):
        evaluate_paths(tmp_path / "pred", tmp_path / "gt")
