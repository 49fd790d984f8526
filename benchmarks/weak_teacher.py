"""Accuracy of the weak teacher (classical labelers) against human masks.

Runs both labelers of `nuclei_app.weak` on every image of the shared nuclei-gt
benchmark (no parameter is tuned per image: each image's nucleus diameter is
estimated from the image itself) and prints, per source, the scores pooled over its
images and the mean over images, the estimated diameter against the median
equivalent diameter of the human masks, and the time per megapixel.

Usage::

    python benchmarks/weak_teacher.py [NUCLEI_GT_DIR] [--json OUT.json]

NUCLEI_GT_DIR defaults to ../shared/data/nuclei-gt beside the repository.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import tifffile

from nuclei_app.core.metrics import mean_scores, score_instances, score_pooled
from nuclei_app.core.weak import METHODS, weak_labels

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "nuclei-gt"
SHOWN = ("f1_50", "aji_plus", "ap_50_95", "pq", "precision_50", "recall_50")


def median_equivalent_diameter(mask: np.ndarray) -> float:
    areas = np.bincount(mask.ravel())[1:]
    areas = areas[areas > 0]
    return float(np.sqrt(4.0 * np.median(areas) / np.pi)) if areas.size else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--json", type=Path, default=None, help="also write all numbers as JSON")
    args = parser.parse_args(argv)
    manifest = json.loads((args.data / "manifest.json").read_text())
    by_source: dict[str, list[dict]] = defaultdict(list)
    for pair in manifest["pairs"]:
        by_source[pair["source"]].append(pair)

    results: dict = {}
    for source, pairs in sorted(by_source.items()):
        images = [(p["name"], tifffile.imread(args.data / p["image"]), tifffile.imread(args.data / p["mask"])) for p in pairs]
        results[source] = {}
        print(f"\n== {source}: {len(images)} images")
        for method in METHODS:
            rows, predictions, ratios = [], [], []
            seconds, megapixels = 0.0, 0.0
            for name, image, mask in images:
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    weak = weak_labels(image, method=method)
                seconds += time.perf_counter() - start
                megapixels += image.size / 1e6
                predictions.append((weak.labels, mask))
                ratio = weak.diameter / median_equivalent_diameter(mask)
                ratios.append(ratio)
                rows.append({"name": name, "diameter_ratio": ratio, **score_instances(weak.labels, mask)})
            pooled = score_pooled(predictions)
            mean = mean_scores(rows)
            results[source][method] = {"pooled": pooled, "mean": mean, "images": rows, "seconds_per_mp": seconds / megapixels}
            print(f"  {method:5s} pooled: " + "  ".join(f"{k}={pooled[k]:.3f}" for k in SHOWN)
                  + f"  (pred {pooled['n_pred']} / gt {pooled['n_gt']})")
            print(f"  {method:5s} mean  : " + "  ".join(f"{k}={mean[k]:.3f}" for k in SHOWN))
            print(f"  {method:5s} diameter estimate / GT median: min {min(ratios):.2f} median {np.median(ratios):.2f} "
                  f"max {max(ratios):.2f};  {seconds / megapixels:.2f} s per megapixel")
        for name in [row["name"] for row in results[source]["log"]["images"]]:
            cells = []
            for method in METHODS:
                row = next(r for r in results[source][method]["images"] if r["name"] == name)
                cells.append(f"{method} f1 {row['f1_50']:.2f} aji {row['aji_plus']:.2f} d {row['diameter_ratio']:.2f}")
            print(f"    {name:22s} " + " | ".join(cells))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
