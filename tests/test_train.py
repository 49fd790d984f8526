"""Weak-to-strong training through the CLI and the library, on real images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from nuclei_app.config import TrainingConfig
from nuclei_app.errors import ExitCode
from nuclei_app.model.checkpoint import MODEL_CARD_FILE, TRAINING_REPORT_FILE, WEIGHTS_FILE, load_model
from nuclei_app.model.predictor import load_predictor
from nuclei_app.schemas import schema_errors
from nuclei_app.train.threshold import SCORE_THRESHOLD_CANDIDATES, threshold_agreement
from nuclei_app.train.pseudo_labels import refine_pseudo_labels

FAST = ["--steps", "12", "--rounds", "1", "--heads", "2", "--max-minutes", "5"]


@pytest.fixture(scope="module")
def crop_image(tmp_path_factory, nuclei_gt_dir) -> Path:
    """A 256x256 crop of a real DSB2018 image (dense small nuclei), as a plain TIFF."""
    image = tifffile.imread(nuclei_gt_dir / "dsb2018-stage1-fixed" / "dsb_a102535b0e88_img.tif")
    path = tmp_path_factory.mktemp("train") / "crop.tif"
    tifffile.imwrite(path, image[100:356, 300:556])
    return path


@pytest.fixture(scope="module")
def trained(crop_image, tmp_path_factory):
    """One short training run through the CLI, shared by the tests that only read its outputs."""
    from nuclei_app.cli import main

    model_dir = tmp_path_factory.mktemp("models") / "m1"
    code = main(["train", str(crop_image), "-o", str(model_dir), "--seed", "3", "--device", "cpu", *FAST])
    assert code == 0
    return model_dir


def test_train_writes_weights_card_and_report_that_match_their_schemas(trained, crop_image):
    card = json.loads((trained / MODEL_CARD_FILE).read_text())
    report = json.loads((trained / TRAINING_REPORT_FILE).read_text())
    assert schema_errors(card, "model_card") == []
    assert schema_errors(report, "training_report") == []
    assert card["architecture"]["pretrained_weights"] is None
    assert card["training"]["human_labels_used"] is False
    assert card["architecture"]["heads"] == 2
    assert card["training"]["data"][0]["path"] == str(crop_image)
    assert len(card["training"]["data"][0]["sha256"]) == 64
    # round 0 plus one self-training round, each with its pseudo-label statistics
    assert [entry["round"] for entry in report["rounds"]][0] == 0
    assert report["rounds"][0]["pseudo_labels"]["objects"] > 20
    state = torch.load(trained / WEIGHTS_FILE, weights_only=True)
    assert all(isinstance(value, torch.Tensor) for value in state.values())


def test_score_threshold_is_chosen_against_the_pseudo_labels_recorded_and_used(trained_model_dir, crop_image):
    card = json.loads((trained_model_dir / MODEL_CARD_FILE).read_text())
    choice = card["inference"]
    assert choice["candidates"] == list(SCORE_THRESHOLD_CANDIDATES)
    f1 = choice["f1_vs_pseudo_labels"]
    # A trained student reproduces most of its pseudo-labels at its best cut-off, and worse
    # at the strictest one (it is less sure of dim and crowded nuclei).
    assert len(f1) == len(SCORE_THRESHOLD_CANDIDATES) and max(f1) > 0.5 and f1[-1] < max(f1)
    assert choice["score_threshold"] == choice["candidates"][int(np.argmax(f1))]
    tile = tifffile.imread(crop_image).astype(np.float32)[None] / 255.0
    chosen = load_predictor(trained_model_dir)
    assert chosen.score_threshold == choice["score_threshold"]
    scores = chosen.predict_batch([tile])[0].scores
    assert len(scores) > 10 and scores.min() >= choice["score_threshold"]
    strict = load_predictor(trained_model_dir, score_threshold=0.9)
    assert len(strict.predict_batch([tile])[0]) == int((scores >= 0.9).sum()) < len(scores)


def test_an_untrained_student_keeps_the_default_score_threshold():
    from nuclei_app.config import get_preset
    from nuclei_app.model.checkpoint import DEFAULT_SCORE_THRESHOLD
    from nuclei_app.model.mask_rcnn import build_model
    from nuclei_app.train.data import TrainingImage
    from nuclei_app.train.threshold import choose_score_threshold

    torch.manual_seed(0)
    model = build_model(1, get_preset("tiny"), heads=1)
    labels = _labels((256, 256), [((y, x), 7) for y in range(24, 256, 48) for x in range(24, 256, 48)])
    image = np.random.default_rng(0).random((1, 256, 256)).astype(np.float32)
    item = TrainingImage("noise", image, 1.0, {}, labels=labels, confidence=_confident(int(labels.max())),
                         ignore=np.zeros(labels.shape, bool))
    choice = choose_score_threshold(model, [item])
    assert max(choice["f1_vs_pseudo_labels"]) < 0.2
    assert choice["score_threshold"] == DEFAULT_SCORE_THRESHOLD and choice["method"].startswith("default")


def test_threshold_agreement_counts_matches_misses_and_ignores_unknown_ground():
    shape = (64, 96)
    teacher = _labels(shape, [((16, 16), 6), ((16, 48), 6), ((16, 80), 6)])
    # The student finds the three teacher nuclei (scores 0.9, 0.6, 0.3), one nucleus inside
    # the teacher's ignore region (0.8) and one on plain background (0.2).
    student = _labels(shape, [((16, 16), 6), ((16, 48), 6), ((16, 80), 6), ((48, 20), 6), ((48, 70), 6)])
    scores = np.array([0.0, 0.9, 0.6, 0.3, 0.8, 0.2], np.float32)
    ignore = np.zeros(shape, bool)
    ignore[38:60, 8:32] = True
    tallies = threshold_agreement(student, scores, teacher, ignore, candidates=(0.1, 0.25, 0.5, 0.95))
    assert tallies.tolist() == [[3, 1, 0], [3, 0, 0], [2, 0, 1], [0, 0, 3]]


def test_same_inputs_and_seed_give_identical_weights_and_labels(trained, crop_image, tmp_path, run_cli):
    again = tmp_path / "m2"
    assert run_cli("train", crop_image, "-o", again, "--seed", "3", "--device", "cpu", *FAST).exit_code == 0
    first = json.loads((trained / MODEL_CARD_FILE).read_text())["weights"]["sha256"]
    second = json.loads((again / MODEL_CARD_FILE).read_text())["weights"]["sha256"]
    assert first == second
    tile = tifffile.imread(crop_image).astype(np.float32)[None] / 255.0
    one = load_predictor(trained).predict_batch([tile])[0]
    two = load_predictor(again).predict_batch([tile])[0]
    assert np.array_equal(one.to_label_image(), two.to_label_image())


def test_loaded_model_predicts_nuclei_with_scores_and_head_agreement(trained, crop_image):
    model, card = load_model(trained)
    assert card["channels"] == ["channel_0"]
    assert not model.training
    predictor = load_predictor(trained)
    tile = tifffile.imread(crop_image).astype(np.float32)[None] / 255.0
    instances = predictor.predict_batch([tile])[0]
    assert instances.shape == tile.shape[1:]
    assert ((instances.head_agreement >= 0) & (instances.head_agreement <= 1)).all()


def test_a_trained_model_finds_nothing_on_a_blank_tile(trained_model_dir, crop_image):
    """A blank tile (glass between tissue): no anchor passes the objectness threshold. Checked on
    the session's 150-step model: after the 12 steps of `trained`, what a blank tile gives depends
    on the random initialisation (0 to 150 detections over seeds 3-5), not on what was learnt."""
    tile = tifffile.imread(crop_image).astype(np.float32)[None] / 255.0
    (blank,) = load_predictor(trained_model_dir).predict_batch([np.zeros_like(tile)])
    assert len(blank) == 0 and blank.shape == tile.shape[1:]


def test_flat_image_stops_training_with_bad_data_error(tmp_path, run_cli):
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, np.full((128, 128), 7, dtype=np.uint8))
    result = run_cli("train", flat, "-o", tmp_path / "model", *FAST)
    assert result.exit_code == ExitCode.BAD_DATA
    assert len(result.error_lines) == 1 and "nothing to learn" in result.error_lines[0]
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize(
    "options, code",
    [
        (["--preset", "huge"], ExitCode.USAGE),
        (["--heads", "0"], ExitCode.USAGE),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--heads", "-1"], ExitCode.USAGE),
        (["--steps", "5", "--fill-budget"], ExitCode.USAGE),
    ],
)
def test_bad_training_options_are_one_line_usage_errors(crop_image, tmp_path, run_cli, options, code):
    result = run_cli("train", crop_image, "-o", tmp_path / "model", *options)
    assert result.exit_code == code
    assert len(result.error_lines) == 1


def test_unwritable_model_dir_is_cannot_create_output(crop_image, tmp_path, run_cli):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    result = run_cli("train", crop_image, "-o", blocker / "model", *FAST)
    assert result.exit_code == ExitCode.CANNOT_CREATE_OUTPUT


def test_supervised_upper_bound_trains_on_the_human_masks_and_says_so(crop_image, nuclei_gt_dir, tmp_path):
    """benchmarks/compare.py's upper bounds: the same model taught by human masks instead of weak labels."""
    from nuclei_app.errors import BadDataError, UsageError
    from nuclei_app.train.loop import train_model

    masks = tifffile.imread(nuclei_gt_dir / "dsb2018-stage1-fixed" / "dsb_a102535b0e88_masks.tif")[100:356, 300:556]
    mask_path = tmp_path / "crop_masks.tif"
    tifffile.imwrite(mask_path, masks)
    config = TrainingConfig(steps_per_round=2, rounds=0, heads=1, max_minutes=5)
    result = train_model([crop_image], tmp_path / "supervised", config, human_labels=[mask_path])
    assert result.card["training"]["human_labels_used"] is True
    assert schema_errors(result.card, "model_card") == []
    n_human = len(np.unique(masks)) - 1
    # every human nucleus becomes one training object (a sliver cut by the crop edge may vanish on resizing)
    assert 0.95 * n_human <= result.report["rounds"][0]["pseudo_labels"]["objects"] <= n_human

    tifffile.imwrite(tmp_path / "wrong.tif", masks[:200])
    with pytest.raises(BadDataError, match="do not match"):
        train_model([crop_image], tmp_path / "wrong", config, human_labels=[tmp_path / "wrong.tif"])
    with pytest.raises(UsageError, match="rounds=0"):
        train_model([crop_image], tmp_path / "rounds", config.with_changes(rounds=1), human_labels=[mask_path])


def test_fill_budget_trains_until_the_budget_with_a_schedule_fitted_to_it(crop_image, tmp_path, run_cli):
    """--fill-budget: the step count comes from the measured speed, so each round spends its share."""
    result = run_cli("train", crop_image, "-o", tmp_path / "model", "--fill-budget", "--max-minutes", "0.25",
                     "--rounds", "1", "--heads", "1", "--device", "cpu")
    assert result.exit_code == 0, result.error_lines
    report = json.loads((tmp_path / "model" / TRAINING_REPORT_FILE).read_text())
    first = report["rounds"][0]
    share = 0.5 * 0.25 * 60  # round 0 gets half the budget
    assert 0.6 * share <= first["seconds"] <= share + 3
    # the schedule was planned for the steps that fit, and they ran to its end (not cut mid-way)
    assert first["steps"] == first["steps_planned"] > 10 and not first["timed_out"]
    card = json.loads((tmp_path / "model" / MODEL_CARD_FILE).read_text())
    assert card["training"]["config"]["fill_budget"] is True  # recorded where it influenced the model


def test_missing_input_is_exit_66(tmp_path, run_cli):
    result = run_cli("train", tmp_path / "nope.tif", "-o", tmp_path / "model")
    assert result.exit_code == ExitCode.MISSING_INPUT


# ----------------------------------------------------------------------------- correction and expansion


def _disk(shape, centre, radius):
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def _labels(shape, disks):
    labels = np.zeros(shape, dtype=np.uint32)
    for index, (centre, radius) in enumerate(disks, start=1):
        labels[_disk(shape, centre, radius) & (labels == 0)] = index
    return labels


def _confident(n, value=0.95):
    return np.concatenate([[0.0], np.full(n, value)]).astype(np.float32)


def test_refinement_splits_a_teacher_merge_into_confident_student_nuclei():
    shape = (64, 64)
    student = _labels(shape, [((32, 22), 8), ((32, 40), 8)])
    teacher = (student > 0).astype(np.uint32)  # one object covering both nuclei
    labels, confidence, _, stats = refine_pseudo_labels(
        teacher, _confident(1, 0.5), student, _confident(2), _confident(2, 0.9), TrainingConfig()
    )
    assert stats.split == 1
    assert labels.max() == 2 and len(confidence) == 3


def test_refinement_merges_teacher_fragments_covered_by_one_student_nucleus():
    shape = (64, 64)
    student = _labels(shape, [((32, 32), 12)])
    teacher = student.copy()
    teacher[:, 32:][teacher[:, 32:] == 1] = 2  # the teacher cut the nucleus in two
    labels, _, _, stats = refine_pseudo_labels(
        teacher, _confident(2, 0.5), student, _confident(1), _confident(1, 0.9), TrainingConfig()
    )
    assert stats.merged == 1
    assert labels.max() == 1


def test_refinement_adds_confident_nuclei_the_teacher_missed_and_keeps_the_rest():
    shape = (64, 96)
    teacher = _labels(shape, [((30, 20), 8)])
    student = _labels(shape, [((30, 20), 8), ((30, 60), 8)])
    labels, _, ignore, stats = refine_pseudo_labels(
        teacher, _confident(1, 0.6), student, _confident(2), _confident(2, 0.9), TrainingConfig()
    )
    assert stats.added == 1 and stats.kept == 1
    assert labels.max() == 2
    off = refine_pseudo_labels(teacher, _confident(1, 0.6), student, _confident(2), _confident(2, 0.9),
                               TrainingConfig(use_expansion=False))
    assert off[3].added == 0 and off[0].max() == 1


def test_refinement_turns_unsupported_teacher_objects_into_ignore():
    shape = (64, 96)
    teacher = _labels(shape, [((30, 20), 8), ((30, 60), 8)])
    student = _labels(shape, [((30, 20), 8)])
    labels, _, ignore, stats = refine_pseudo_labels(
        teacher, _confident(2, 0.4), student, _confident(1), _confident(1, 0.9), TrainingConfig()
    )
    assert stats.removed == 1
    assert labels.max() == 1
    assert ignore[30, 60] and not ignore[30, 20]


def test_refinement_keeps_unsupported_teacher_objects_the_teacher_was_sure_of():
    shape = (64, 96)
    teacher = _labels(shape, [((30, 20), 8), ((30, 60), 8)])
    student = _labels(shape, [((30, 20), 8)])
    labels, _, _, stats = refine_pseudo_labels(
        teacher, _confident(2, 0.9), student, _confident(1), _confident(1, 0.9), TrainingConfig()
    )
    assert stats.removed == 0 and labels.max() == 2


@pytest.mark.parametrize("preset", ["tiny", "small", "paper"])
def test_every_preset_builds_from_scratch_and_takes_a_training_step_and_predicts(preset):
    from nuclei_app.config import get_preset
    from nuclei_app.model.heads import integral_image
    from nuclei_app.model.mask_rcnn import build_model

    torch.manual_seed(0)
    model = build_model(2, get_preset(preset), heads=2)
    size = 64
    masks = torch.zeros((1, size, size), dtype=torch.uint8)
    masks[0, 20:36, 24:40] = 1
    target = {"boxes": torch.tensor([[24.0, 20.0, 40.0, 36.0]]), "labels": torch.ones(1, dtype=torch.int64),
              "masks": masks, "ignore_integral": integral_image(torch.zeros(size, size))}
    model.train()
    losses = model.training_losses(torch.rand(1, 2, size, size), [[target], [target]])
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total)
    assert {name.split("_", 1)[0] for name in losses if name.startswith("head")} == {"head0", "head1"}
    model.eval()
    (result,) = model.predict(torch.rand(1, 2, size, size), score_threshold=0.0)
    assert result.mask_probs.shape[1:] == (28, 28)
    assert result.head_scores.shape[0] == 2


@pytest.mark.slow
def test_tiled_prediction_of_training_images_has_no_duplicates_at_tile_overlaps(trained_model_dir):
    """Self-labelling predicts images in tiles; a tile placed flush with the
    image end overlaps its neighbour by more than the nominal overlap, and both used to claim the
    nuclei there (each as its own label: 116 duplicates on coelho2009's 430 nuclei)."""
    from conftest import SAMPLE_IMAGE
    from nuclei_app.core.metrics import score_instances
    from nuclei_app.train.data import load_training_images
    from nuclei_app.train.pseudo_labels import predict_label_image

    (item,), _, _ = load_training_images([SAMPLE_IMAGE], TrainingConfig())
    model, _ = load_model(trained_model_dir)
    height, width = item.image.shape[1:]
    assert (height - 320) % 272 and (width - 320) % 272, "the last tiles must sit flush with the image end"
    tiled, _, _ = predict_label_image(model, item.image, tile=320, overlap=48)
    whole, _, _ = predict_label_image(model, item.image, tile=max(height, width))
    assert whole.max() > 100
    assert abs(int(tiled.max()) - int(whole.max())) <= 0.03 * whole.max()
    assert score_instances(tiled, whole)["f1_50"] >= 0.95


@pytest.mark.slow
def test_mixed_magnifications_are_each_trained_and_segmented_at_their_own_nucleus_size(
        crop_image, trained_model_dir, tmp_path):
    """A 10x image beside a 25x one: each is brought to the canonical size by its own measured
    nucleus size (never one average), and `segment` measures each slide on its own."""
    from nuclei_app.config import SegmentConfig
    from nuclei_app.segment.pipeline import segment_slide
    from nuclei_app.segment.predictors import PredictorSpec
    from nuclei_app.train.data import load_training_images
    from nuclei_app.core.weak import estimate_nucleus_diameter

    low = tifffile.imread(crop_image).astype(np.float32)
    high = torch.nn.functional.interpolate(torch.from_numpy(low)[None, None], scale_factor=2.5,
                                           mode="bilinear")[0, 0].numpy()
    paths = [tmp_path / "low.tif", tmp_path / "high.tif"]
    for path, image in zip(paths, (low, high)):
        tifffile.imwrite(path, image.astype(np.uint16))
    images, _, _ = load_training_images(paths, TrainingConfig())
    low_item, high_item = images
    assert high_item.source["diameter_px"] / low_item.source["diameter_px"] == pytest.approx(2.5, rel=0.2)
    canonical = TrainingConfig().model_preset.canonical_diameter
    for item in images:  # both arrive with nuclei of the canonical size
        assert estimate_nucleus_diameter(item.image.mean(0)) == pytest.approx(canonical, rel=0.25)
    diameters = []
    for path in paths:  # no pixel size: the model's scale comes from each slide's measured nuclei
        out = tmp_path / f"{path.stem}.ome.zarr"
        segment_slide(path, out, PredictorSpec("model", model_dir=str(trained_model_dir)),
                      SegmentConfig(device="cpu"), progress=False)
        diameters.append(json.loads((out / "nuclei-app_run.json").read_text())["parameters"]["predictor"]["diameter_px"])
    assert diameters[1] / diameters[0] == pytest.approx(2.5, rel=0.2)


# ----------------------------------------------------------------------------- teachers' clumps


def test_a_probable_clump_loses_its_confidence_and_single_nuclei_keep_theirs():
    from nuclei_app.train.pseudo_labels import CLUMP_AREA_RATIO, distrust_clumps

    shape = (64, 200)
    singles = [((16, 16 + 30 * k), 7) for k in range(6)]
    labels = _labels(shape, singles)
    labels[_disk(shape, (48, 30), 7) | _disk(shape, (48, 43), 7) | _disk(shape, (48, 56), 7)] = 7  # one object
    config = TrainingConfig()
    confidence = distrust_clumps(labels, _confident(7, 0.9), config)
    areas = np.bincount(labels.ravel())[1:]
    assert areas[6] > CLUMP_AREA_RATIO * np.median(areas)
    assert confidence[7] < config.min_teacher_confidence  # taught as "ignore", not one nucleus
    assert np.all(confidence[1:7] == np.float32(0.9))
    # Too few objects for a typical size: nothing is judged.
    few = _labels(shape, [((16, 16), 7), ((16, 46), 12)])
    assert np.all(distrust_clumps(few, _confident(2, 0.9), config)[1:] == np.float32(0.9))


def test_round_zero_views_never_teach_a_clump_as_one_nucleus(nuclei_gt_dir):
    """On a crowded real image the weak labelers leave touching nuclei unsplit; such objects
    (more than twice the median area) are "ignore" in the views of every head that learns
    from that labeler (heads 0 and 2 here, from the first labeler: the same ids)."""
    from nuclei_app.train.data import load_training_images
    from nuclei_app.train.pseudo_labels import CLUMP_AREA_RATIO, weak_pseudo_labels

    config = TrainingConfig(heads=3)
    image = nuclei_gt_dir / "dsb2018-stage1-fixed" / "dsb_0ea221716cf1_img.tif"
    images, _, _ = load_training_images([image], config)
    weak_pseudo_labels(images, config)
    item = images[0]
    areas = np.bincount(item.labels.ravel())[1:]
    clumps = np.flatnonzero(areas > CLUMP_AREA_RATIO * np.median(areas[areas > 0])) + 1
    assert len(clumps) >= 3  # the labeler did merge some touching nuclei here
    for view_labels, _, view_ignore in item.views[::2]:
        taught = np.bincount(view_labels.ravel(), minlength=len(areas) + 1)[1:]
        assert not np.isin(clumps, np.flatnonzero(taught) + 1).any()
        assert view_ignore[np.isin(item.labels, clumps)].all()


def test_the_score_cut_off_is_not_charged_for_splitting_an_untaught_clump(trained_model_dir, crop_image):
    """Counting a clump the student was never taught as a missed nucleus (and its parts as
    false ones) would push the cut-off up; with the clump untaught, the choice is made on the
    nuclei the student did learn."""
    from nuclei_app.model.checkpoint import load_model
    from nuclei_app.train.data import load_training_images
    from nuclei_app.train.pseudo_labels import weak_pseudo_labels
    from nuclei_app.train.threshold import choose_score_threshold

    model, _ = load_model(trained_model_dir)
    config = TrainingConfig(heads=1)
    images, _, _ = load_training_images([crop_image], config)
    weak_pseudo_labels(images, config)
    item = images[0]
    # Glue every pair of touching pseudo-labels into one confident object: a teacher's merges.
    merged = item.labels.copy()
    right = (merged[:, :-1] > 0) & (merged[:, 1:] > 0) & (merged[:, :-1] != merged[:, 1:])
    for a, b in zip(merged[:, :-1][right], merged[:, 1:][right]):
        merged[merged == b] = a
    assert len(np.unique(merged)) < len(np.unique(item.labels)) - 3
    item.labels = merged
    item.confidence = np.full(int(merged.max()) + 1, 0.9, np.float32)
    areas = np.bincount(merged.ravel())
    glued = np.flatnonzero(areas[1:] > 2 * np.median(areas[1:][areas[1:] > 0])) + 1
    item.confidence[glued] = 0.1  # what distrust_clumps does
    taught = choose_score_threshold(model, [item], min_confidence=config.min_teacher_confidence)
    charged = choose_score_threshold(model, [item])
    assert max(taught["f1_vs_pseudo_labels"]) > max(charged["f1_vs_pseudo_labels"])
