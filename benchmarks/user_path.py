"""Weak-to-strong exactly as a user runs it: `weak` -> `train` (defaults) -> `segment` -> `evaluate`.

For each source folder of ``NAME_img.tif`` / ``NAME_masks.tif`` pairs this runs the CLI, in
subprocesses, the way the README tells a new user to:

    nuclei-app weak IMG -o TEACHER.tif --method log|otsu      (the two teachers)
    nuclei-app train IMG... -o MODEL --seed 0 [TRAIN_OPTIONS]  (defaults unless given)
    nuclei-app segment IMG --model MODEL -o OUT.ome.zarr --no-qc
    nuclei-app evaluate PRED_DIR GT_DIR --json SCORES.json

and prints teacher and student F1@0.5 / AJI+ pooled over the source's images, student minus the
better teacher, and the training time and peak memory. The human masks are never shown to
training. Every step's output is kept under ``--work`` and reused when rerun (delete a folder
to redo it), so a run cut short continues where it stopped.

    python benchmarks/user_path.py --data ../shared/data/nuclei-gt --sources kromp2020-nontissue
    python benchmarks/user_path.py --data DIR --train-options "--max-minutes 5" --work /tmp/up
"""
from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path


def cli(*args: str, log: Path) -> None:
    """Run ``nuclei-app ARGS`` (this interpreter's package), appending its output to ``log``."""
    command = [sys.executable, "-m", "nuclei_app", *args]
    with log.open("a", encoding="utf-8") as handle:
        handle.write("$ nuclei-app " + shlex.join(args) + "\n")
        handle.flush()
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"nuclei-app {args[0]} failed (exit {result.returncode}); see {log}")


def evaluate(pred_dir: Path, gt_dir: Path, out: Path, log: Path) -> dict:
    if not out.exists():
        cli("evaluate", str(pred_dir), str(gt_dir), "--json", str(out), log=log)
    return json.loads(out.read_text())


def run_source(source: Path, work: Path, train_options: list[str], seed: int) -> dict:
    """Teachers and the student on one source; returns pooled scores and training facts."""
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    images = sorted(source.glob("*_img.tif"))
    gt_dir = work / "gt"
    gt_dir.mkdir(exist_ok=True)
    for image in images:  # evaluate pairs files by name: NAME.tif in each folder
        name = image.name[: -len("_img.tif")]
        link = gt_dir / f"{name}.tif"
        if not link.exists():
            link.symlink_to(image.with_name(f"{name}_masks.tif").resolve())
    result: dict = {"source": source.name, "images": len(images), "train_options": train_options, "seed": seed}
    for method in ("log", "otsu"):
        folder = work / f"teacher_{method}"
        folder.mkdir(exist_ok=True)
        for image in images:
            target = folder / f"{image.name[: -len('_img.tif')]}.tif"
            if not target.exists():
                cli("weak", str(image), "-o", str(target), "--method", method, log=log)
        result[f"teacher_{method}"] = evaluate(folder, gt_dir, work / f"teacher_{method}.json", log)["pooled"]
    model = work / "model"
    if not (model / "model_card.json").exists():
        started = time.time()
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        cli("train", *map(str, images), "-o", str(model), "--seed", str(seed), *train_options, log=log)
        (work / "train_facts.json").write_text(json.dumps({
            "seconds": round(time.time() - started, 1),
            "peak_rss_mb": round(max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024),
        }))
    result["train"] = json.loads((work / "train_facts.json").read_text())
    result["train"]["report"] = json.loads((model / "training_report.json").read_text())["rounds"]
    predictions = work / "student"
    predictions.mkdir(exist_ok=True)
    for image in images:
        name = image.name[: -len("_img.tif")]
        target = predictions / f"{name}.ome.zarr"
        if not target.exists():
            cli("segment", str(image), "--model", str(model), "-o", str(target), "--no-qc", log=log)
    result["student"] = evaluate(predictions, gt_dir, work / "student.json", log)["pooled"]
    better = max(("log", "otsu"), key=lambda m: result[f"teacher_{m}"]["f1_50"])
    result["better_teacher"] = better
    result["student_minus_teacher"] = {
        key: round(result["student"][key] - result[f"teacher_{better}"][key], 4) for key in ("f1_50", "aji_plus")
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a source folder, or a folder of them")
    parser.add_argument("--sources", default=None, help="comma-separated source folder names (default: all)")
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work/user_path"))
    parser.add_argument("--train-options", default="", help='extra `train` options, e.g. "--max-minutes 5"')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write every source's result as JSON")
    args = parser.parse_args(argv)
    sources = [args.data] if any(args.data.glob("*_img.tif")) else sorted(p for p in args.data.iterdir() if p.is_dir())
    if args.sources:
        wanted = set(args.sources.split(","))
        sources = [s for s in sources if s.name in wanted]
    results = []
    for source in sources:
        result = run_source(source, args.work / source.name, shlex.split(args.train_options), args.seed)
        results.append(result)
        t_log, t_otsu, s = result["teacher_log"], result["teacher_otsu"], result["student"]
        print(f"{source.name}: {result['images']} images; train {result['train']['seconds']:.0f} s, "
              f"peak RSS {result['train']['peak_rss_mb']} MB", flush=True)
        for label, scores in (("teacher log", t_log), ("teacher otsu", t_otsu), ("student", s)):
            print(f"  {label:13s} F1@0.5 {scores['f1_50']:.3f}  AJI+ {scores['aji_plus']:.3f}", flush=True)
        delta = result["student_minus_teacher"]
        print(f"  student - {result['better_teacher']}: F1 {delta['f1_50']:+.3f}  AJI+ {delta['aji_plus']:+.3f}",
              flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
