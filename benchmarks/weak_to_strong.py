"""Weak-to-strong on real data: does the student beat its own weak teacher?

For each source folder of `NAME_img.tif` / `NAME_masks.tif` pairs, trains a student on
the source's images from weak labels alone (the human masks are never shown to it),
then scores teacher (LoG-watershed), student after every round, against the human masks
with our own `evaluate`. Prints a table and writes JSON.

    python benchmarks/weak_to_strong.py --data ../shared/data/nuclei-gt/dsb2018-stage1-fixed \
        --minutes 12 --out benchmarks/results/weak_to_strong_dsb.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

from nuclei_app.config import TrainingConfig
from nuclei_app.core.metrics import score_pooled
from nuclei_app.core.intensity import normalise_intensities
from nuclei_app.train.pseudo_labels import predict_native_labels
from nuclei_app.train.loop import train_model
from nuclei_app.core.weak import weak_labels


def load_pairs(folder: Path) -> list[tuple[str, Path, np.ndarray]]:
    pairs = []
    for image_path in sorted(folder.glob("*_img.tif")):
        mask_path = image_path.with_name(image_path.name.replace("_img.tif", "_masks.tif"))
        pairs.append((image_path.name[: -len("_img.tif")], image_path, tifffile.imread(mask_path)))
    return pairs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=12.0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work"))
    parser.add_argument("--weak-methods", default="otsu,log", help="teacher per head, in order")
    parser.add_argument("--no-agreement", action="store_true", help="ablation: no cross-check between teachers")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images (quick checks)")
    args = parser.parse_args()

    pairs = load_pairs(args.data)[: args.limit]
    images = {name: tifffile.imread(path).astype(np.float32) for name, path, _ in pairs}
    gts = {name: gt for name, _, gt in pairs}

    def normalised(name: str) -> np.ndarray:
        image = images[name][None] if images[name].ndim == 2 else images[name]
        low, high = np.percentile(image, [1.0, 99.8])
        return normalise_intensities(image, np.array([[low, high]] * image.shape[0], dtype=np.float32))

    teacher = {}
    for method in ("log", "otsu"):
        teacher[method] = score_pooled(
            (weak_labels(normalised(name), method=method).labels, gts[name]) for name in gts
        )

    def evaluation(model, round_index, training_images):
        scales = {Path(item.source["path"]).name[: -len("_img.tif")]: item.scale for item in training_images}
        scores = {}
        for threshold in (0.3, 0.5, 0.7):
            predictions = [(predict_native_labels(model, normalised(name), scales[name], score_threshold=threshold),
                            gts[name]) for name in gts]
            scores[f"score_threshold_{threshold}"] = score_pooled(predictions)
        return scores

    config = TrainingConfig(preset=args.preset, heads=args.heads, rounds=args.rounds, max_minutes=args.minutes,
                            steps_per_round=args.steps, seed=args.seed,
                            weak_methods=tuple(args.weak_methods.split(",")), teacher_agreement=not args.no_agreement)

    started = time.time()

    def progress(line: str) -> None:
        print(f"[{time.time() - started:7.1f}s] {line}", flush=True)

    result = train_model([path for _, path, _ in pairs], args.work / f"model-{args.data.name}", config,
                         progress=progress, evaluation=evaluation)
    train_seconds = time.time() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    rows = [("teacher log-watershed", teacher["log"]), ("teacher otsu-watershed", teacher["otsu"])]
    rows += [(f"student round {r['round']} @{key[-3:]}", value) for r in result.report["rounds"]
             for key, value in r["evaluation"].items()]
    print(f"\nsource {args.data.name}: {len(pairs)} images, {sum(int(g.max()) for g in gts.values())} GT nuclei; "
          f"train {train_seconds:.0f} s, peak RSS {peak_mb:.0f} MB")
    print(f"{'method':28s} {'F1@0.5':>7s} {'AJI+':>7s} {'AP.5:.95':>9s} {'PQ':>7s} {'prec':>7s} {'rec':>7s} {'n_pred':>7s}")
    for name, s in rows:
        print(f"{name:28s} {s['f1_50']:7.3f} {s['aji_plus']:7.3f} {s['ap_50_95']:9.3f} {s['pq']:7.3f} "
              f"{s['precision_50']:7.3f} {s['recall_50']:7.3f} {s['n_pred']:7d}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"source": args.data.name, "teacher": teacher, "report": result.report,
                                        "train_seconds": train_seconds, "peak_rss_mb": peak_mb,
                                        "config": config.to_dict()}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
