"""benchmarks/compare.py end to end: real images and human masks, real workers, our own evaluate."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from nuclei_app.core.metrics import score_pooled
from nuclei_app.io.labels import read_labels
from nuclei_app.schemas import schema_errors
from nuclei_app.workflows import weak_label_file

COMPARE = Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py"
CROPS = {"crop0": "dsb_a102535b0e88", "crop1": "dsb_0ea221716cf1", "crop2": "dsb_f728de042672"}
METHODS = "log_watershed,stardist,nuclei_app,nuclei_app_supervised"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source(tmp_path_factory, nuclei_gt_dir) -> Path:
    """Three real 192 x 192 crops with their human masks, plus a pair without masks and one misshapen."""
    folder = tmp_path_factory.mktemp("compare") / "dsb-crops"
    folder.mkdir()
    window = (slice(100, 292), slice(300, 492))
    for name, original in CROPS.items():
        tifffile.imwrite(folder / f"{name}_img.tif", tifffile.imread(nuclei_gt_dir / "dsb2018-stage1-fixed" / f"{original}_img.tif")[window])
        tifffile.imwrite(folder / f"{name}_masks.tif", tifffile.imread(nuclei_gt_dir / "dsb2018-stage1-fixed" / f"{original}_masks.tif")[window])
    image = tifffile.imread(folder / "crop0_img.tif")
    tifffile.imwrite(folder / "nomask_img.tif", image)
    tifffile.imwrite(folder / "misshapen_img.tif", image)
    tifffile.imwrite(folder / "misshapen_masks.tif", tifffile.imread(folder / "crop0_masks.tif")[:100])
    return folder


def run_compare(source: Path, out: Path, work: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(COMPARE), "--data", str(source), "--out", str(out),
                           "--work", str(work), *options], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def benchmark(source, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    root = tmp_path_factory.mktemp("results")
    options = ["--budget-minutes", "0.1", "--methods", METHODS]
    completed = run_compare(source, root / "out", root / "work", *options)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return root, source, options


def rows_by_method(result: dict) -> dict[str, dict]:
    return {row["method"]: row for row in result["methods"]}


def test_results_validate_and_record_the_bad_pairs(benchmark):
    root, source, _ = benchmark
    result = json.loads((root / "out" / f"{source.name}.json").read_text())
    assert schema_errors(result, "benchmark_results") == []
    assert result["n_images"] == 3
    left_out = {failure["image"]: failure["reason"] for failure in result["data_failures"]}
    assert "no mask file" in left_out["nomask"]
    assert "differs from the image" in left_out["misshapen"]
    assert result["n_gt_nuclei"] == sum(len(np.unique(tifffile.imread(source / f"{n}_masks.tif"))) - 1 for n in CROPS)
    table = (root / "out" / f"{source.name}.md").read_text()
    assert "| log_watershed | training-free |" in table and "misshapen" in table
    # a plot when matplotlib is there, otherwise the reason
    assert (result["plot"] is None) != (result["plot_skipped"] is None)
    if result["plot"]:
        assert (root / "out" / result["plot"]).stat().st_size > 0


def test_scores_are_our_evaluate_on_the_methods_own_output(benchmark, tmp_path):
    root, source, _ = benchmark
    rows = rows_by_method(json.loads((root / "out" / f"{source.name}.json").read_text()))
    pairs = []
    for name in CROPS:
        weak_label_file(source / f"{name}_img.tif", tmp_path / f"{name}.tif", method="log")
        pairs.append((tifffile.imread(tmp_path / f"{name}.tif"), tifffile.imread(source / f"{name}_masks.tif")))
    expected = score_pooled(pairs)
    scores = rows["log_watershed"]["scores"]["all"]
    assert scores["n_gt"] == expected["n_gt"] and scores["n_pred"] == expected["n_pred"] > 0
    assert scores["f1_50"] == pytest.approx(expected["f1_50"]) and scores["aji_plus"] == pytest.approx(expected["aji_plus"])
    assert scores["aji_plus_loss"]["aji_plus"] == pytest.approx(expected["aji_plus"])
    assert sum(scores["aji_plus_loss"].values()) == pytest.approx(1.0)


def test_trained_methods_rounds_and_upper_bounds(benchmark):
    root, source, _ = benchmark
    result = json.loads((root / "out" / f"{source.name}.json").read_text())
    rows = rows_by_method(result)
    ours = rows["nuclei_app"]
    assert ours["status"] == "ok" and ours["scores"]["all"]["n_images"] == 3
    assert 0 < ours["train_seconds"] < 6 + 60  # the 6-second budget, plus loading and weak labelling
    assert [r for r in rows if r.startswith("nuclei_app_round_")][0] == "nuclei_app_round_0"
    assert all(rows[r]["group"] == "rounds" and rows[r]["train_seconds"] is None
               for r in rows if r.startswith("nuclei_app_round_"))
    # Inference-only ablation: the full run's own weights, scored without one inference step.
    for name in ("ablation_fixed_threshold",):
        assert rows[name]["group"] == "ablation" and rows[name]["status"] == "ok"
        assert rows[name]["scores"]["all"]["n_images"] == 3
        assert rows[name]["scores"]["all"]["n_gt"] == ours["scores"]["all"]["n_gt"]
    upper = rows["nuclei_app_supervised"]
    assert upper["status"] == "ok" and upper["scores"]["all"] is None  # never scored on its own training images
    assert upper["scores"]["held_out"]["n_images"] == len(result["split"]["held_out"]) == 1
    assert not set(result["split"]["train"]) & set(result["split"]["held_out"])
    # A peer that is not installed is a recorded failure, not a crash of the benchmark.
    stardist = rows["stardist"]
    if importlib.util.find_spec("stardist") is None:
        assert stardist["status"] == "failed" and "not installed" in stardist["reason"]
        assert stardist["scores"] == {"all": None, "held_out": None}
    else:
        assert stardist["status"] == "ok"


def test_the_benchmarks_labels_are_what_segment_writes(benchmark, tmp_path):
    """One path: the benchmark's nuclei_app labels equal `nuclei-app segment`'s for the same model."""
    root, source, _ = benchmark
    method_dir = root / "work" / source.name / "nuclei_app"
    output = tmp_path / "crop1.ome.zarr"
    completed = subprocess.run([sys.executable, "-m", "nuclei_app", "segment", str(source / "crop1_img.tif"),
                                "--model", str(method_dir / "model"), "-o", str(output), "--no-qc"],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    benchmark_labels = tifffile.imread(method_dir / "predictions" / "crop1.tif")
    np.testing.assert_array_equal(benchmark_labels, read_labels(output))
    # and every round's labels come from a model folder `segment` can read, as `train` writes it
    for round_dir in sorted(method_dir.glob("model_round_*")):
        assert (round_dir / "model_card.json").is_file() and (round_dir / "weights.pt").is_file()


def test_correction_and_expansion_are_counted_per_round_over_every_true_nucleus(benchmark):
    root, source, _ = benchmark
    result = json.loads((root / "out" / f"{source.name}.json").read_text())
    rounds = [row["method"] for row in result["methods"] if row["group"] == "rounds"]
    phenomena = result["correction_and_expansion"]
    assert [f"nuclei_app_round_{row['round']}" for row in phenomena] == rounds
    for row in phenomena:
        assert row["teacher_right"] + row["teacher_wrong"] + row["teacher_missed"] == result["n_gt_nuclei"]
        assert row["corrected"] <= row["teacher_wrong"] and row["found"] <= row["teacher_missed"]
    assert "Correction and expansion" in (root / "out" / f"{source.name}.md").read_text()


def load_compare_module():
    spec = importlib.util.spec_from_file_location("compare", COMPARE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_teacher_error_fates_on_a_merge_a_miss_and_a_broken_nucleus():
    compare = load_compare_module()
    truth = np.zeros((40, 60), np.int32)
    truth[5:15, 5:15], truth[5:15, 16:26] = 1, 2  # two touching nuclei ...
    truth[25:35, 5:15] = 3  # ... one the teacher misses ...
    truth[25:35, 40:50] = 4  # ... and one it gets right
    teacher = np.zeros_like(truth)
    teacher[5:15, 5:26] = 1  # merged: IoU ~0.48 with each
    teacher[25:35, 40:50] = 2
    student = np.zeros_like(truth)
    student[5:15, 5:15], student[5:15, 16:26], student[25:35, 5:15] = 1, 2, 3  # split, found, but #4 lost
    fates = compare.teacher_error_fates(teacher, student, truth)
    assert fates == {"teacher_right": 1, "teacher_wrong": 2, "teacher_missed": 1,
                     "corrected": 2, "broken": 1, "found": 1}


def test_rerun_reuses_finished_methods(benchmark):
    root, source, options = benchmark
    before = json.loads((root / "out" / f"{source.name}.json").read_text())
    completed = run_compare(source, root / "out", root / "work", *options)
    assert completed.returncode == 0
    after = json.loads((root / "out" / f"{source.name}.json").read_text())
    assert after["methods"] == before["methods"]


def test_a_method_over_its_time_is_a_recorded_failure(source, tmp_path):
    completed = run_compare(source, tmp_path / "out", tmp_path / "work", "--methods", "otsu_watershed,log_watershed",
                            "--budget-minutes", "0.1", "--grace-seconds", "0.5")
    assert completed.returncode == 0, completed.stderr[-2000:]
    rows = rows_by_method(json.loads((tmp_path / "out" / f"{source.name}.json").read_text()))
    assert all(row["status"] == "failed" and "timed out" in row["reason"] for row in rows.values())


def test_unknown_method_and_empty_folder_are_usage_errors(tmp_path):
    assert run_compare(tmp_path, tmp_path / "out", tmp_path / "work", "--methods", "magic").returncode == 2
    # rows scored from the nuclei_app run cannot be run on their own
    assert run_compare(tmp_path, tmp_path / "out", tmp_path / "work", "--methods",
                       "ablation_fixed_threshold").returncode == 2
    completed = run_compare(tmp_path, tmp_path / "out", tmp_path / "work")
    assert completed.returncode == 66 and "no NAME_img.tif" in completed.stderr


def test_changed_method_code_is_rerun_not_reused(source, tmp_path):
    """Reuse is keyed on the code too: an edited methods.py must not serve a stale result."""
    scripts = tmp_path / "benchmarks"
    scripts.mkdir()
    for script in ("compare.py", "methods.py"):
        (scripts / script).write_text((COMPARE.parent / script).read_text())
    result_file = tmp_path / "work" / source.name / "log_watershed" / "result.json"

    def run_and_stamp() -> int:
        completed = subprocess.run([sys.executable, str(scripts / "compare.py"), "--data", str(source), "--out",
                                    str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--methods",
                                    "log_watershed"], capture_output=True, text=True, timeout=600)
        assert completed.returncode == 0, completed.stderr[-2000:]
        return result_file.stat().st_mtime_ns

    first = run_and_stamp()
    assert run_and_stamp() == first  # same code: reused
    with open(scripts / "methods.py", "a") as methods:
        methods.write("\n# an edit\n")
    assert run_and_stamp() != first  # edited code: rerun
