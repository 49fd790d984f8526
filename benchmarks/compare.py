"""Benchmark nuclei_app against five widely used methods, plus ablations and upper bounds.

On a folder of ``NAME_img.tif`` / ``NAME_masks.tif`` pairs (or a folder of such folders, one
per source), every method runs in its own worker process on the same CPU, trained methods
on the same wall-clock budget and the same pseudo-labels (the LoG-watershed teacher's), and
our own `evaluate` scores each against the human masks, which no unsupervised method sees.
nuclei_app's rows train through `train_model` (what `nuclei-app train` runs) and label every
image through `segment_slide` (what `nuclei-app segment` runs), so they score what a user gets:

    python benchmarks/compare.py --data ../shared/data/nuclei-gt --budget-minutes 10

Writes ``<out>/<source>.json`` (schema ``benchmark_results``), ``<out>/<source>.md`` and, with
matplotlib, ``<out>/<source>.png``; with nuclei_app in the run, they also show per self-training
round how many of the teacher's wrong nuclei the student corrected and missed ones it found. A pair with a missing or misshapen mask, and a method that
crashes, is missing or overruns its budget, is recorded with its reason; the rest of the
table is still produced. Reruns reuse finished method runs (same task, data and code: same result).
Peers come from ``pip install .[benchmark]`` (``make benchmark`` does it in its own venv).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods import RUNNERS, Task  # noqa: E402  (a sibling script, not a package)

#: (name, what it is, group) in table order.
METHODS: list[tuple[str, str, str]] = [
    ("otsu_watershed", "Otsu threshold + distance-transform watershed", "training-free"),
    ("log_watershed", "LoG seeds + marker-controlled watershed (the teacher)", "training-free"),
    ("stardist", "StarDist 2D, from scratch on the teacher's labels", "trained"),
    ("cellpose3", "Cellpose 3 CPnet, from scratch on the teacher's labels", "trained"),
    ("plain_maskrcnn", "plain Mask R-CNN: 1 head, no ECA, no ignore, no rounds, score 0.5", "trained"),
    ("nuclei_app", "nuclei_app, full method", "trained"),
    ("ablation_no_eca", "nuclei_app without ECA", "ablation"),
    ("ablation_one_head", "nuclei_app with 1 head instead of 3", "ablation"),
    ("ablation_no_correction", "nuclei_app without correction", "ablation"),
    ("ablation_no_expansion", "nuclei_app without expansion", "ablation"),
    ("ablation_no_ignore", "nuclei_app without ignore regions", "ablation"),
    ("ablation_one_teacher", "nuclei_app with the LoG teacher only", "ablation"),
    # Inference-only ablation: nuclei_app's own weights, segmented without one step.
    ("ablation_fixed_threshold", "nuclei_app at score 0.5 instead of the chosen cut-off (same weights)", "ablation"),
    ("stardist_supervised", "StarDist on human masks of the train split", "upper bound"),
    ("nuclei_app_supervised", "nuclei_app on human masks of the train split", "upper bound"),
]
#: Rows scored from the full nuclei_app run's extra predictions, not run on their own.
FROM_NUCLEI_APP_RUN = ("ablation_fixed_threshold",)
GROUP = {name: group for name, _, group in METHODS}
DESCRIPTION = {name: text for name, text, _ in METHODS}
TEACHER = "log"
SCORE_KEYS = ("f1_50", "ap_50_95", "aji_plus", "pq", "precision_50", "recall_50", "n_pred", "n_gt")
PEER_PACKAGES = ("nuclei-app", "torch", "tensorflow-cpu", "stardist", "csbdeep", "cellpose", "numpy")


# ----------------------------------------------------------------------------- data


def find_sources(data: Path) -> list[Path]:
    """``data`` itself when it holds image/mask pairs, else each subfolder that does."""
    if any(data.glob("*_img.tif")):
        return [data]
    return sorted(folder for folder in data.iterdir() if folder.is_dir() and any(folder.glob("*_img.tif")))


def load_pairs(folder: Path) -> tuple[dict[str, tuple[Path, Path]], list[dict]]:
    """Usable (image, mask) pairs by name, and the pairs left out with their reason."""
    from nuclei_app.io.slides import open_slide

    pairs, failures = {}, []
    for image_path in sorted(folder.glob("*_img.tif")):
        name = image_path.name[: -len("_img.tif")]
        mask_path = image_path.with_name(f"{name}_masks.tif")
        try:
            if not mask_path.exists():
                raise ValueError(f"no mask file {mask_path.name}")
            with open_slide(image_path) as slide:
                image_shape = tuple(slide.shape[1:])
            mask_shape = tifffile.TiffFile(mask_path).series[0].shape
            if tuple(mask_shape) != image_shape:
                raise ValueError(f"mask shape {tuple(mask_shape)} differs from the image's {image_shape}")
        except Exception as error:  # noqa: BLE001  (any unreadable pair is recorded, not fatal)
            failures.append({"image": name, "reason": _one_line(error)})
            continue
        pairs[name] = (image_path, mask_path)
    return pairs, failures


def split_names(names: list[str], seed: int) -> tuple[list[str], list[str]]:
    """Train / held-out halves for the supervised upper bounds (seeded, the larger half trains)."""
    order = np.random.default_rng(seed).permutation(len(names))
    cut = math.ceil(len(names) / 2) if len(names) > 1 else 1
    train = sorted(names[i] for i in order[:cut])
    return train, sorted(set(names) - set(train)) or train


def data_signature(pairs: dict[str, tuple[Path, Path]]) -> str:
    """Names, sizes and modification times of every file: a rerun reuses results only for the same data."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(pairs):
        for path in pairs[name]:
            stat = path.stat()
            digest.update(f"{name}:{path.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def code_signature() -> str:
    """Hash of this benchmark's methods and of the nuclei_app package: changed code means rerun."""
    import hashlib

    import nuclei_app

    digest = hashlib.sha256()
    files = [Path(__file__).with_name("methods.py"), *sorted(Path(nuclei_app.__file__).parent.rglob("*.py"))]
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def write_teacher_labels(pairs: dict[str, tuple[Path, Path]], folder: Path) -> None:
    """The pseudo-labels every trained method learns from (the training-free LoG teacher)."""
    from nuclei_app.workflows import weak_label_file

    folder.mkdir(parents=True, exist_ok=True)
    for name, (image_path, _) in pairs.items():
        target = folder / f"{name}.tif"
        if not target.exists():
            partial = folder / f".{name}.partial.tif"
            weak_label_file(image_path, partial, method=TEACHER)
            partial.replace(target)


# ----------------------------------------------------------------------------- running methods


def _one_line(error: BaseException | str) -> str:
    text = str(error).strip().splitlines()
    line = text[-1] if text else type(error).__name__
    if isinstance(error, BaseException):
        line = f"{type(error).__name__}: {line}"
    return line[:400]


def run_method(task: Task, timeout_seconds: float) -> dict:
    """Run one method in a worker process; a crash, a missing package or a timeout is a failure."""
    work = Path(task.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    task_file, result_file = work / "task.json", work / "result.json"
    task_json = json.dumps(asdict(task), indent=1, sort_keys=True)
    if result_file.exists() and task_file.exists() and task_file.read_text() == task_json:
        return json.loads(result_file.read_text())  # finished by an earlier run of the same task
    result_file.unlink(missing_ok=True)
    task_file.write_text(task_json)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONHASHSEED": str(task.seed)}
    started = time.time()
    with open(work / "worker.log", "w") as log:
        process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(task_file)],
                                   stdout=log, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        try:
            _, stderr = process.communicate(timeout=timeout_seconds)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            outcome = {"status": "failed", "reason": f"timed out after {timeout_seconds:.0f} s "
                                                     "(budget plus inference allowance)"}
            result_file.write_text(json.dumps(outcome))
            return outcome
        log.write(stderr)
    if process.returncode != 0 or not result_file.exists():
        lines = [line for line in stderr.splitlines() if line.strip()]
        reason = lines[-1][:400] if lines else f"worker exited with status {process.returncode}"
        outcome = {"status": "failed", "reason": reason}
        result_file.write_text(json.dumps(outcome))
        return outcome
    outcome = json.loads(result_file.read_text())
    outcome["wall_seconds"] = time.time() - started
    result_file.write_text(json.dumps(outcome))
    return outcome


def worker(task_file: Path) -> int:
    """Entry point of a worker process: run the task's method, write result.json, or one error line."""
    task = Task.load(task_file)
    try:
        result = RUNNERS[task.method](task)
    except ModuleNotFoundError as error:
        print(f"{error.name} is not installed: pip install '.[benchmark]' (or run make benchmark)", file=sys.stderr)
        return 1
    except Exception as error:  # noqa: BLE001  (recorded as this method's failure)
        import traceback

        traceback.print_exc()
        print(_one_line(error), file=sys.stderr)
        return 1
    (task_file.parent / "result.json").write_text(json.dumps({"status": "ok", "reason": None, **result}))
    return 0


# ----------------------------------------------------------------------------- scoring and reporting


@functools.lru_cache(maxsize=None)
def read_labels(path: Path) -> np.ndarray:
    """A label image, read once per run: every method is scored against the same masks."""
    return tifffile.imread(path)


def score_folder(prediction_dir: Path, names: list[str], pairs: dict[str, tuple[Path, Path]]) -> dict:
    from nuclei_app.core.metrics import score_pooled

    scores = score_pooled(((tifffile.imread(prediction_dir / f"{n}.tif"), read_labels(pairs[n][1])) for n in names),
                          with_aji_plus_loss=True)
    return {key: scores[key] for key in (*SCORE_KEYS, "aji_plus_loss")} | {"n_images": len(names)}


#: A true nucleus the teacher "labelled" overlaps a teacher object at IoU >= this (below: missed).
LABELLED_IOU = 0.1


def teacher_error_fates(teacher: np.ndarray, student: np.ndarray, truth: np.ndarray) -> dict[str, int]:
    """What the student made of the teacher's errors, counted over the true nuclei of one image.

    A true nucleus is *right* for a labeler when one of its objects matches it at IoU >= 0.5,
    *wrong* when the teacher labelled it badly (best IoU in [0.1, 0.5): merged, fragmented or
    misdrawn) and *missed* when no teacher object overlaps it at IoU >= 0.1.

    Parameters
    ----------
    teacher, student, truth : ndarray of int, shape (H, W)
        Label images (0 = background).

    Returns
    -------
    dict of int
        ``teacher_right``, ``teacher_wrong``, ``teacher_missed`` (they sum to the true nuclei),
        ``corrected`` (wrong for the teacher, right for the student), ``broken`` (right for the
        teacher, not for the student) and ``found`` (missed by the teacher, right for the student).
    """
    from nuclei_app.core.metrics import iou_matrix

    def best_iou(labels: np.ndarray) -> np.ndarray:
        iou, _, truth_ids = iou_matrix(labels, truth)
        best = iou.max(axis=0) if iou.shape[0] else np.zeros(truth_ids.size)
        return best

    teacher_best, student_best = best_iou(teacher), best_iou(student)
    teacher_right = teacher_best >= 0.5
    teacher_missed = teacher_best < LABELLED_IOU
    teacher_wrong = ~teacher_right & ~teacher_missed
    student_right = student_best >= 0.5
    return {
        "teacher_right": int(teacher_right.sum()),
        "teacher_wrong": int(teacher_wrong.sum()),
        "teacher_missed": int(teacher_missed.sum()),
        "corrected": int((teacher_wrong & student_right).sum()),
        "broken": int((teacher_right & ~student_right).sum()),
        "found": int((teacher_missed & student_right).sum()),
    }


def correction_and_expansion(round_dirs: dict[str, str], teacher_dir: Path, names: list[str],
                             pairs: dict[str, tuple[Path, Path]]) -> list[dict]:
    """Per self-training round, pooled over images: the share of the teacher's errors on the
    nuclei it labelled that the student fixed (correction), the share of the nuclei it missed
    that the student found (expansion), and the share of its right answers the student broke."""
    rows = []
    for round_index, round_dir in sorted(round_dirs.items(), key=lambda item: int(item[0])):
        totals: dict[str, int] = {}
        for name in names:
            fates = teacher_error_fates(read_labels(teacher_dir / f"{name}.tif"),
                                        tifffile.imread(Path(round_dir) / f"{name}.tif"), read_labels(pairs[name][1]))
            totals = {key: totals.get(key, 0) + value for key, value in fates.items()}
        rows.append({"round": int(round_index), **totals,
                     "correction_rate": totals["corrected"] / max(totals["teacher_wrong"], 1),
                     "expansion_recall": totals["found"] / max(totals["teacher_missed"], 1),
                     "broken_rate": totals["broken"] / max(totals["teacher_right"], 1)})
    return rows


def method_row(name: str, outcome: dict, prediction_dir: Path, names: dict[str, list[str]],
               pairs: dict[str, tuple[Path, Path]], group: str | None = None, description: str | None = None) -> dict:
    row = {"method": name, "description": description or DESCRIPTION[name], "group": group or GROUP[name],
           "status": outcome["status"], "reason": outcome.get("reason"), "scores": {"all": None, "held_out": None},
           "train_seconds": outcome.get("train_seconds"), "inference_mp_per_s": None}
    if row["group"] == "rounds":
        row["train_seconds"] = None  # the run's time is on the method's own row; a round is part of it
    elif outcome["status"] == "ok" and outcome.get("inference_seconds"):
        row["inference_mp_per_s"] = outcome["inference_megapixels"] / outcome["inference_seconds"]
    if outcome["status"] == "ok":
        for subset in ("all", "held_out"):
            if row["group"] == "upper bound" and subset == "all":
                continue  # trained on half of these images' human masks
            row["scores"][subset] = score_folder(prediction_dir, names[subset], pairs)
    return row


def software_versions() -> dict:
    versions = {}
    for package in PEER_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def markdown_table(result: dict) -> str:
    def fmt(value, digits=3):
        return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    lines = [f"# {result['source']}: nuclei_app vs. peers", "",
             f"{result['n_images']} images, {result['n_gt_nuclei']} human-annotated nuclei; trained methods get "
             f"{result['budget_minutes']:g} CPU-minutes each and the {TEACHER}-watershed teacher's pseudo-labels "
             "(upper bounds: the human masks of the train split). Scores pooled over images by `nuclei-app evaluate`.",
             f"Command: `{result['command']}`  ", f"Machine: {result['machine']['description']}", ""]
    header = ("| method | group | F1@0.5 | AP.5:.95 | AJI+ | PQ | precision | recall | n_pred | n_gt | images "
              "| train s | MP/s | status |")
    for subset, title in (("all", "All images (no method saw a human mask)"),
                          ("held_out", "Held-out split (the upper bounds' test set)")):
        lines += [f"## {title}", "", header, "|" + "---|" * 14]
        for row in result["methods"]:
            s = row["scores"][subset]
            if s is None and row["status"] == "ok":
                continue
            cells = [row["method"], row["group"]]
            cells += [fmt(s[k]) if s else "–" for k in ("f1_50", "ap_50_95", "aji_plus", "pq", "precision_50",
                                                         "recall_50", "n_pred", "n_gt", "n_images")]
            cells += [fmt(row["train_seconds"], 0), fmt(row["inference_mp_per_s"], 2),
                      "ok" if row["status"] == "ok" else f"failed: {row['reason']}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Where AJI+ is lost (all images)", "",
              "Shares of the AJI+ denominator: the intersection (= AJI+), pixels of paired predictions outside "
              "their true nucleus (outline too wide), pixels of paired true nuclei outside their prediction "
              "(outline too tight, fragments), unpaired predictions (false objects) and unpaired true nuclei "
              "(missed).", "",
              "| method | AJI+ | too wide | too tight | false objects | missed nuclei |", "|" + "---|" * 6]
    for row in result["methods"]:
        loss = (row["scores"]["all"] or {}).get("aji_plus_loss")
        if loss:
            lines.append(f"| {row['method']} | " + " | ".join(f"{loss[k]:.3f}" for k in (
                "aji_plus", "pred_excess", "gt_missed", "unpaired_pred", "unpaired_gt")) + " |")
    lines.append("")
    if result["correction_and_expansion"]:
        lines += [f"## Correction and expansion per self-training round (nuclei_app vs. the {TEACHER} teacher)", "",
                  f"Over the {result['n_gt_nuclei']} true nuclei: the teacher got a nucleus *right* (IoU >= 0.5), "
                  f"*wrong* (best IoU {LABELLED_IOU}-0.5: merged, fragmented, misdrawn) or *missed* it (IoU < "
                  f"{LABELLED_IOU}). Correction: share of its wrong ones the student gets right; expansion: share "
                  "of its missed ones the student gets right; broken: share of its right ones the student loses.", "",
                  "| round | teacher right / wrong / missed | corrected | correction | found | expansion "
                  "| broken | broken share |", "|" + "---|" * 8]
        for row in result["correction_and_expansion"]:
            lines.append(f"| {row['round']} | {row['teacher_right']} / {row['teacher_wrong']} / {row['teacher_missed']} "
                         f"| {row['corrected']} | {row['correction_rate']:.3f} | {row['found']} "
                         f"| {row['expansion_recall']:.3f} | {row['broken']} | {row['broken_rate']:.3f} |")
        lines.append("")
    if result["data_failures"]:
        lines += ["## Pairs left out", ""] + [f"- {f['image']}: {f['reason']}" for f in result["data_failures"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, target: Path) -> str | None:
    """F1@0.5 and AJI+ per method and per self-training round; returns why not, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install '.[benchmark]')"
    rows = [r for r in result["methods"] if r["scores"]["all"] and r["group"] != "rounds"]
    rounds = [r for r in result["methods"] if r["scores"]["all"] and r["group"] == "rounds"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 1]})
    positions = np.arange(len(rows))
    for offset, key, label in ((-0.2, "f1_50", "F1@0.5"), (0.2, "aji_plus", "AJI+")):
        left.bar(positions + offset, [r["scores"]["all"][key] for r in rows], width=0.4, label=label)
    left.set_xticks(positions, [r["method"] for r in rows], rotation=45, ha="right", fontsize=8)
    left.set_ylim(0, 1)
    left.legend()
    left.set_title(f"{result['source']}: {result['n_images']} images, {result['n_gt_nuclei']} nuclei")
    for key, label in (("f1_50", "F1@0.5"), ("aji_plus", "AJI+")):
        right.plot([int(r["method"].rsplit("_", 1)[1]) for r in rounds], [r["scores"]["all"][key] for r in rounds],
                   marker="o", label=label)
    right.set_xlabel("self-training round")
    right.set_ylim(0, 1)
    right.legend()
    right.set_title("nuclei_app per round")
    figure.tight_layout()
    figure.savefig(target, dpi=100)
    plt.close(figure)
    return None


# ----------------------------------------------------------------------------- one source


def benchmark_source(folder: Path, args: argparse.Namespace, methods: list[str]) -> dict:
    pairs, data_failures = load_pairs(folder)
    if not pairs:
        raise SystemExit(f"compare: {folder}: no usable image/mask pairs ({len(data_failures)} left out)")
    names = sorted(pairs)
    train, held_out = split_names(names, args.seed)
    subsets = {"all": names, "held_out": held_out}
    work = args.work / folder.name
    pseudo_dir = work / "teacher_labels"
    signature = data_signature(pairs)
    marker = work / "data_signature.txt"
    if marker.exists() and marker.read_text() != signature:
        import shutil

        shutil.rmtree(work)  # the images or masks changed since the last run: nothing there is reusable
    work.mkdir(parents=True, exist_ok=True)
    marker.write_text(signature)
    write_teacher_labels(pairs, pseudo_dir)
    budget = args.budget_minutes * 60
    code = code_signature()
    rows, phenomena = [], []
    for method in methods:
        supervised = GROUP[method] == "upper bound"
        method_dir = work / method
        task = Task(method=method, image_paths={n: str(pairs[n][0]) for n in names},
                    train_names=train if supervised else names, predict_names=held_out if supervised else names,
                    pseudo_label_dir=str(pseudo_dir), prediction_dir=str(method_dir / "predictions"),
                    work_dir=str(method_dir), budget_seconds=budget, seed=args.seed,
                    human_mask_paths={n: str(pairs[n][1]) for n in train} if supervised else {},
                    code_signature=code)
        trained = GROUP[method] != "training-free"
        print(f"[{time.strftime('%H:%M:%S')}] {folder.name}: {method} ...", flush=True)
        outcome = run_method(task, (budget if trained else 0) + args.grace_seconds)
        print(f"[{time.strftime('%H:%M:%S')}] {folder.name}: {method} {outcome['status']} "
              f"{outcome.get('reason') or ''}", flush=True)
        rows.append(method_row(method, outcome, Path(task.prediction_dir), subsets, pairs))
        rounds = (outcome.get("round_prediction_dirs") or {}) if method == "nuclei_app" else {}
        for round_index, round_dir in rounds.items():
            rows.append(method_row(f"{method}_round_{round_index}", outcome, Path(round_dir), subsets, pairs,
                                   group="rounds", description=f"{method} after self-training round {round_index}"))
        if rounds:
            phenomena = correction_and_expansion(rounds, pseudo_dir, names, pairs)
        for name, prediction_dir in (outcome.get("inference_ablation_dirs") or {}).items():
            if not args.no_ablations:
                rows.append(method_row(name, outcome, Path(prediction_dir), subsets, pairs))
    result = {
        "source": folder.name,
        "data": str(folder),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python", "benchmarks/compare.py", *sys.argv[1:]]),
        "machine": {"description": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
                    "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "versions": software_versions(),
        "budget_minutes": args.budget_minutes,
        "seed": args.seed,
        "teacher": f"{TEACHER}_watershed",
        "n_images": len(names),
        "n_gt_nuclei": int(sum(len(np.unique(read_labels(pairs[n][1]))) - 1 for n in names)),
        "split": {"train": train, "held_out": held_out},
        "data_failures": data_failures,
        "methods": rows,
        "correction_and_expansion": phenomena,
        "plot": None,
        "plot_skipped": None,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / f"{folder.name}.png"
    result["plot_skipped"] = plot(result, png)
    result["plot"] = None if result["plot_skipped"] else png.name
    from nuclei_app.schemas import validate_instance

    validate_instance(result, "benchmark_results")
    (args.out / f"{folder.name}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{folder.name}.md").write_text(markdown_table(result))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help="a folder of NAME_img.tif/NAME_masks.tif pairs, or of such folders")
    parser.add_argument("--budget-minutes", type=float, default=10.0, help="wall-clock training budget per method")
    parser.add_argument("--methods", default=",".join(name for name, _, _ in METHODS if name not in FROM_NUCLEI_APP_RUN),
                        help="comma-separated subset, in table order (default: all)")
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--no-upper-bounds", action="store_true")
    parser.add_argument("--grace-seconds", type=float, default=900.0,
                        help="time allowed on top of the budget for loading, labelling and inference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work/compare"))
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.data is None:
        parser.error("--data is required")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(GROUP) | set(methods) & set(FROM_NUCLEI_APP_RUN))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(n for n in GROUP if n not in FROM_NUCLEI_APP_RUN)}")
    methods = [name for name, _, group in METHODS if name in methods
               and not (args.no_ablations and group == "ablation")
               and not (args.no_upper_bounds and group == "upper bound")]
    sources = find_sources(args.data)
    if not sources:
        print(f"compare: {args.data}: no NAME_img.tif files here or in its subfolders", file=sys.stderr)
        return 66
    for folder in sources:
        result = benchmark_source(folder, args, methods)
        print(markdown_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
