"""How well can any QC score rank tiles by their true F1? The split-half reliability of the target.

`qc_truthfulness.py` correlates each tile's QC score with the tile's true F1@0.5. That true F1
is itself a noisy measurement when a tile holds few nuclei: F1 = 2 TP / (2 TP + FP + FN) is the
share of the tile's *items* (its true nuclei and its predictions) that are matched at IoU > 0.5.
Splitting every tile's items at random into two halves gives two estimates of the same tile
quality; their rank correlation across tiles, corrected to full length (Spearman-Brown,
``2 r / (1 + r)``), is the reliability of the per-tile true F1. By the attenuation formula no
score can correlate with the true F1 above about ``sqrt(reliability)``, however good it is.

Reads the folder a `qc_truthfulness.py --work DIR` run left (its student labels and QC
reports, whose tiles it uses) and the human masks; prints one line per source.

    python benchmarks/tile_f1_reliability.py --work benchmarks/work/qc_truthfulness_r4 \
        --data ../shared/data/nuclei-gt
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import tifffile
from scipy.stats import spearmanr

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from nuclei_app.core.metrics import iou_matrix  # noqa: E402


def tile_items(labels: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """1.0 for every matched item (prediction or true nucleus, IoU > 0.5), 0.0 for every other."""
    iou, pred_ids, true_ids = iou_matrix(labels, truth)
    matched_pred = (iou > 0.5).any(axis=1) if iou.size else np.zeros(len(pred_ids), bool)
    matched_true = (iou > 0.5).any(axis=0) if iou.size else np.zeros(len(true_ids), bool)
    return np.concatenate([matched_pred, matched_true]).astype(np.float64)


def source_tiles(work: Path, data: Path) -> list[np.ndarray]:
    """Every QC tile's items, for the student segmentations of one source folder."""
    tiles = []
    for report_path in sorted(work.glob("*_desc-nuclei_qc.json")):
        name = report_path.name[: -len("_desc-nuclei_qc.json")]
        labels_path = work / f"{name}_desc-nuclei_labels.tif"
        truth_path = data / f"{name}_masks.tif"
        if not (labels_path.is_file() and truth_path.is_file()):
            continue  # planted cases (noise image, zero-step model) have no human masks
        labels = tifffile.imread(labels_path).astype(np.int64)
        truth = tifffile.imread(truth_path).astype(np.int64)
        for tile in json.loads(report_path.read_text())["tiles"]:
            window = (slice(tile["y0"], tile["y0"] + tile["height"]), slice(tile["x0"], tile["x0"] + tile["width"]))
            items = tile_items(labels[window], truth[window])
            if items.size >= 2:
                tiles.append(items)
    return tiles


def split_half_reliability(tiles: list[np.ndarray], rng: np.random.Generator, splits: int = 200) -> float:
    """Mean Spearman between the two random halves' F1 over tiles, Spearman-Brown corrected."""
    correlations = []
    for _ in range(splits):
        halves = np.empty((len(tiles), 2))
        for row, items in enumerate(tiles):
            order = rng.permutation(items.size)
            cut = items.size // 2
            halves[row] = items[order[:cut]].mean(), items[order[cut:]].mean()
        correlations.append(spearmanr(halves[:, 0], halves[:, 1])[0])
    half = float(np.nanmean(correlations))
    return 2 * half / (1 + half)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="a qc_truthfulness.py --work folder")
    parser.add_argument("--data", type=Path, required=True, help="the folder of source folders with the human masks")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    for source in sorted(path for path in args.work.iterdir() if path.is_dir()):
        tiles = source_tiles(source, args.data / source.name)
        if len(tiles) < 3:
            continue
        reliability = split_half_reliability(tiles, rng)
        print(f"{source.name}: {len(tiles)} tiles, median {np.median([t.size for t in tiles]):.0f} items per tile, "
              f"reliability of the true tile F1 {reliability:.3f}, ceiling of any score's Spearman "
              f"{np.sqrt(max(reliability, 0.0)):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
