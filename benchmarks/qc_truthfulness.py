"""Does the QC tell the truth? Per-tile QC scores against true per-tile F1, and planted failures.

For each source folder of ``NAME_img.tif`` / ``NAME_masks.tif`` pairs under ``--data``:

1. train a student on the source's images from weak labels alone (`train_model`; the
   human masks are never shown to it);
2. segment every image with it: by default the loaded predictor on the whole image
   (`load_predictor(...).predict_batch`, the slide normalised by its percentiles), saved
   as a label TIFF; ``--segmenter segment`` uses the production `segment_slide` instead
   (tiles, tissue mask, stitching, OME-Zarr + table);
3. run the QC (`write_qc_report`, no ground truth; with ``model_dir`` so that the model's
   heads rescore every nucleus, or from the table with ``segment``) on a grid of about six
   nucleus diameters (128 to 512 px), and score each QC tile's labels against the human
   masks (`score_instances` on the tile crop: the true ``f1_50``).

It prints the Spearman correlation between the per-tile QC score and the true F1 over all
tiles of all sources (target >= 0.6), the correlation of every QC component alone, and the
status of planted failures on a few images per source: the human masks (a good
segmentation: must pass), the student's own segmentation (must pass when its true F1 is
at least 0.7 and must not pass below 0.5), a model trained for zero steps, the human masks
shifted by half a nucleus diameter, the human masks with every second nucleus deleted, and
the image replaced by pure noise (segmented by the student). Each failure should come out ``fail`` (or at least
``warn``) with the expected reason.

    python benchmarks/qc_truthfulness.py --data ../shared/data/nuclei-gt --steps 250 --rounds 0 --minutes 7 \
        --out benchmarks/results/qc_truthfulness.json

The QC runs the weak teacher on a stratified sample of each image's tiles (``QCThresholds``
defaults: at least 16 tiles or 10 %); ``--teacher-tiles-share 1`` runs it on every tile, as
before sampling existed, and ``--reuse-models`` compares such variants on the same students.
A tile outside the sample has no ``teacher_student_f1`` / ``seed_recall``: those components'
correlations are over the sampled tiles only, the QC score's over every tile.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
from scipy.stats import spearmanr

from nuclei_app.config import QCThresholds, TrainingConfig
from nuclei_app.core.metrics import score_instances
from nuclei_app.io.labels import read_labels, write_label_tiff
from nuclei_app.qc.slide import write_qc_report
from nuclei_app.model.predictor import load_predictor
from nuclei_app.io.slides import channel_percentiles, open_slide
from nuclei_app.core.intensity import normalise_intensities
from nuclei_app.segment.predictors import PredictorSpec
from nuclei_app.segment.pipeline import resolve_channels, segment_slide
from nuclei_app.train.loop import train_model
from nuclei_app.core.weak import estimate_nucleus_diameter
from nuclei_app.core.intensity import nuclear_composite

COMPONENTS = ("teacher_student_f1", "seed_recall", "foreground_coverage", "foreground_precision", "score_mean",
              "head_agreement_mean", "morphology_outlier_share", "signal_coverage", "clump_share", "qc_score")
EXPECTED = {
    "zero_step_model": {"no_nuclei", "low_foreground_coverage", "low_seed_recall", "low_teacher_agreement",
                        "low_detection_scores", "low_foreground_precision"},
    "shifted_half_diameter": {"low_teacher_agreement", "low_foreground_precision", "low_foreground_coverage"},
    "half_deleted": {"low_seed_recall", "low_foreground_coverage", "low_teacher_agreement"},
    "noise_image": {"no_nuclear_signal"},
}


def qc_tile_size(image: np.ndarray) -> int:
    """About six nucleus diameters, a multiple of 64, between 128 and 512 px."""
    diameter = estimate_nucleus_diameter(nuclear_composite(image.astype(np.float32)))
    return int(np.clip(round(6 * diameter / 64) * 64, 128, 512))


def shift_labels(labels: np.ndarray, dy: int, dx: int) -> np.ndarray:
    shifted = np.zeros_like(labels)
    h, w = labels.shape
    shifted[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = labels[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return shifted


def segment_image(model_dir: Path, image_path: Path, output: Path, segmenter: str) -> tuple[Path, dict]:
    """Segment one image with a model; return the labels path and the QC keyword arguments."""
    if segmenter == "segment":
        table = output.with_name(output.name.replace("_FLUO.ome.zarr", "_objects.tsv"))
        segment_slide(image_path, output, PredictorSpec("model", str(model_dir)), table_path=table, progress=False)
        return output, {}
    predictor = load_predictor(model_dir)
    with open_slide(image_path) as slide:
        channels = resolve_channels(slide, predictor, None)
        percentiles = channel_percentiles(slide, channels)
        _, height, width = slide.shape
        image = normalise_intensities(slide.read_region(0, 0, height, width, channels=channels), percentiles)
    labels = predictor.predict_batch([image])[0].to_label_image()
    path = output.with_name(output.name.replace("_FLUO.ome.zarr", "_labels.tif"))
    write_label_tiff(path, labels)
    return path, {"model_dir": model_dir}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/nuclei-gt"))
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work/qc_truthfulness"))
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of round 0")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--minutes", type=float, default=6.0, help="training budget per source")
    parser.add_argument("--planted-per-source", type=int, default=2)
    parser.add_argument("--segmenter", choices=("predictor", "segment"), default="predictor")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher-tiles-min", type=int, default=QCThresholds.teacher_tiles_min,
                        help="QC runs the weak teacher on at least this many tiles per image ...")
    parser.add_argument("--teacher-tiles-share", type=float, default=QCThresholds.teacher_tiles_share,
                        help="... or this share of them (1: every tile, as before sampling existed)")
    parser.add_argument("--reuse-models", action="store_true",
                        help="keep models already trained under --work (compare QC variants on the same students)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sampling = {"teacher_tiles_min": args.teacher_tiles_min, "teacher_tiles_share": args.teacher_tiles_share}

    started = time.time()

    def say(line: str) -> None:
        print(f"[{time.time() - started:7.1f}s] {line}", flush=True)

    sources = sorted(p for p in args.data.iterdir() if p.is_dir() and any(p.glob("*_img.tif")))
    rows: list[dict] = []
    planted: list[dict] = []
    slides: list[dict] = []
    for source in sources:
        pairs = sorted(source.glob("*_img.tif"))
        work = args.work / source.name
        config = TrainingConfig(steps_per_round=args.steps, rounds=args.rounds, max_minutes=args.minutes,
                                seed=args.seed)
        say(f"{source.name}: training on {len(pairs)} images ({config.steps_per_round} steps, {config.rounds} rounds)")
        model_dir = work / "model"
        zero_dir = work / "model-zero-steps"
        if not (args.reuse_models and (model_dir / "model_card.json").is_file()):
            train_model(pairs, model_dir, config, progress=lambda line: None)
        if not (args.reuse_models and (zero_dir / "model_card.json").is_file()):
            # A budget of a few nanoseconds: the optimiser never takes a step (random weights).
            train_model(pairs[:1], zero_dir, TrainingConfig(steps_per_round=1, rounds=0, max_minutes=1e-9,
                                                            seed=args.seed), progress=lambda line: None)
        for index, image_path in enumerate(pairs):
            name = image_path.name[: -len("_img.tif")]
            truth = read_labels(image_path.with_name(f"{name}_masks.tif"))
            image = tifffile.imread(image_path)
            tile = qc_tile_size(image)
            thresholds = QCThresholds(tile_size_px=tile, max_overlays=0, **sampling)
            store, qc_options = segment_image(model_dir, image_path, work / f"{name}_desc-nuclei_FLUO.ome.zarr",
                                              args.segmenter)
            result = write_qc_report(store, image_path, work / f"{name}_desc-nuclei_qc.json", thresholds=thresholds,
                                     **qc_options)
            labels = read_labels(store)
            slide_truth = score_instances(labels, truth)
            slides.append({"source": source.name, "image": name, "status": result.status,
                           "n_nuclei": result.report["slide"]["n_nuclei"],
                           "reasons": [r["code"] for r in result.report["reasons"]],
                           "true_f1_50": slide_truth["f1_50"], "qc_score_mean": result.report["slide"]["qc_score_mean"]})
            for record in result.report["tiles"]:
                y0, x0, h, w = record["y0"], record["x0"], record["height"], record["width"]
                truth_tile = score_instances(labels[y0 : y0 + h, x0 : x0 + w], truth[y0 : y0 + h, x0 : x0 + w])
                rows.append({"source": source.name, "image": name, "tile": record["index"], "tile_size": tile,
                             "true_f1_50": truth_tile["f1_50"], **{k: record.get(k) for k in COMPONENTS}})
            say(f"  {name}: {len(result.report['tiles'])} tiles of {tile} px, status {result.status}, "
                f"true F1 {slide_truth['f1_50']:.3f}, QC score {result.report['slide']['qc_score_mean']}")

            if index >= args.planted_per_source:
                continue
            # Planted failures on this image. Controls: the human masks (a good segmentation:
            # must pass) and the student's own segmentation (judged against its true F1).
            masks_path = image_path.with_name(f"{name}_masks.tif")
            cases = {"human_masks": (masks_path, image_path, {}), "student": (store, image_path, qc_options)}
            zero_store, zero_options = segment_image(zero_dir, image_path,
                                                     work / f"{name}_zero_desc-nuclei_FLUO.ome.zarr", args.segmenter)
            cases["zero_step_model"] = (zero_store, image_path, zero_options)
            diameter = result.report["provenance"]["parameters"]["nucleus_diameter_px"]
            half = int(round(diameter / 2))
            shifted = work / f"{name}_shifted.tif"
            write_label_tiff(shifted, shift_labels(truth, half, half))
            cases["shifted_half_diameter"] = (shifted, image_path, {})
            ids = np.unique(truth)
            ids = ids[ids != 0]
            deleted = work / f"{name}_half_deleted.tif"
            write_label_tiff(deleted, np.where(np.isin(truth, ids[::2]), 0, truth))
            cases["half_deleted"] = (deleted, image_path, {})
            noise_image = work / f"{name}_noise_img.tif"
            rng = np.random.default_rng(args.seed)
            tifffile.imwrite(noise_image, rng.integers(0, 256, size=image.shape[-2:], dtype=np.uint8))
            noise_store, noise_options = segment_image(model_dir, noise_image,
                                                       work / f"{name}_noise_desc-nuclei_FLUO.ome.zarr", args.segmenter)
            cases["noise_image"] = (noise_store, noise_image, noise_options)
            for case, (labels_path, case_image, options) in cases.items():
                report = write_qc_report(labels_path, case_image, work / f"{name}_{case}_qc.json",
                                         thresholds=thresholds, **options).report
                codes = [r["code"] for r in report["reasons"]]
                expected = EXPECTED.get(case)
                if case == "human_masks":
                    caught = report["status"] == "pass"
                elif case == "student":  # truthful: pass a good student, warn/fail a poor one
                    f1 = slide_truth["f1_50"]
                    caught = (report["status"] == "pass") if f1 >= 0.7 else (
                        report["status"] != "pass" if f1 < 0.5 else True)
                else:
                    caught = report["status"] in ("warn", "fail") and bool(expected & set(codes))
                planted.append({"source": source.name, "image": name, "case": case, "status": report["status"],
                                "reasons": codes, "ok": bool(caught)})
                say(f"    planted {case:22s} -> {report['status']:4s} {codes} {'OK' if caught else 'MISSED'}")

    truth = np.array([r["true_f1_50"] for r in rows])
    print(f"\n{len(rows)} tiles from {len(slides)} images of {len(sources)} sources")
    correlations = {}
    for component in COMPONENTS:
        values = np.array([np.nan if r[component] is None else r[component] for r in rows], dtype=float)
        keep = np.isfinite(values)
        rho = spearmanr(values[keep], truth[keep]).statistic if keep.sum() > 2 else float("nan")
        correlations[component] = {"spearman": float(rho), "n_tiles": int(keep.sum())}
        print(f"  Spearman({component:26s}, true f1_50) = {rho:+.3f}  over {keep.sum()} tiles")
    per_source = {}
    for source in sources:
        mine = [r for r in rows if r["source"] == source.name and r["qc_score"] is not None]
        rho = spearmanr([r["qc_score"] for r in mine], [r["true_f1_50"] for r in mine]).statistic
        per_source[source.name] = {"spearman": float(rho), "n_tiles": len(mine)}
        print(f"  {source.name}: Spearman(qc_score, true f1_50) = {rho:+.3f} over {len(mine)} tiles")
    segmented = {(s["source"], s["image"]) for s in slides if s["n_nuclei"] > 0}
    kept = [r for r in rows if (r["source"], r["image"]) in segmented and r["qc_score"] is not None]
    rho_segmented = spearmanr([r["qc_score"] for r in kept], [r["true_f1_50"] for r in kept]).statistic
    correlations["qc_score_images_with_nuclei"] = {"spearman": float(rho_segmented), "n_tiles": len(kept)}
    print(f"  without images the segmentation left empty: Spearman(qc_score, true f1_50) = {rho_segmented:+.3f} "
          f"over {len(kept)} tiles")
    n_ok = sum(p["ok"] for p in planted)
    print(f"planted failures and controls: {n_ok}/{len(planted)} as expected")
    target = correlations["qc_score"]["spearman"] >= 0.6
    print(f"QC truthfulness target (Spearman >= 0.6): {'met' if target else 'NOT met'}; "
          f"{time.time() - started:.0f} s in all")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"correlations": correlations, "per_source": per_source,
                                        "planted": planted, "slides": slides, "tiles": rows,
                                        "seconds": time.time() - started}, indent=2))
    return 0 if target and n_ok == len(planted) else 1


if __name__ == "__main__":
    sys.exit(main())
