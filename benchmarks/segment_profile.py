"""Where the time of model inference goes, on one dense 2k x 2k synthetic slide with known truth.

Writes a synthetic 4-channel OME-TIFF (2048 x 2048, 0.5 µm pixels, ~13,000 nuclei from
`nuclei_app.sample_data.synthesize_slide`) and its true labels, trains a tiny model on it
unless one is given, segments it in-process under cProfile, and prints the throughput
(tissue megapixels per second, whole run including imports and model loading), the F1@0.5
of the result against the truth, and the functions that took the most time.

Usage::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/segment_profile.py [--model MODEL_DIR]
        [--work-dir benchmarks/work/prof] [--steps 300] [--top 25]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from nuclei_app.sample_data import SYNTHETIC_CHANNELS, synthesize_slide  # noqa: E402

SIDE = 2048


def write_inputs(work: Path, seed: int) -> tuple[Path, Path]:
    """The slide (OME-TIFF, 512 px tiles) and its true labels (uint32 TIFF), written once."""
    slide, truth = work / "slide2k.ome.tif", work / "truth2k.tif"
    if not (slide.exists() and truth.exists()):
        synthetic = synthesize_slide(np.random.default_rng(seed), (SIDE, SIDE))
        metadata = {"axes": "CYX", "Channel": {"Name": list(SYNTHETIC_CHANNELS)},
                    "PhysicalSizeX": 0.5, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": 0.5, "PhysicalSizeYUnit": "µm"}
        tifffile.imwrite(slide, synthetic.image, ome=True, metadata=metadata, tile=(512, 512), compression="zlib")
        tifffile.imwrite(truth, synthetic.labels.astype(np.uint32))
    return slide, truth


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: train one on the slide)")
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "benchmarks" / "work" / "prof")
    parser.add_argument("--steps", type=int, default=300, help="training steps when no model is given")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top", type=int, default=25, help="functions listed by own time")
    args = parser.parse_args()

    from nuclei_app.config import SegmentConfig, TrainingConfig
    from nuclei_app.core.metrics import score_instances
    from nuclei_app.io.labels import read_labels
    from nuclei_app.segment.predictors import PredictorSpec
    from nuclei_app.segment.pipeline import segment_slide
    from nuclei_app.train.loop import train_model

    args.work_dir.mkdir(parents=True, exist_ok=True)
    slide, truth = write_inputs(args.work_dir, args.seed)
    model = args.model or args.work_dir / "model"
    if not (model / "weights.pt").exists():
        started = time.monotonic()
        train_model([slide], model, TrainingConfig(rounds=0, steps_per_round=args.steps, seed=args.seed,
                                                   device="cpu", max_minutes=60))
        print(f"trained {model} ({args.steps} steps) in {time.monotonic() - started:.0f} s", flush=True)

    output = args.work_dir / "profiled.ome.zarr"
    shutil.rmtree(output, ignore_errors=True)
    profile = cProfile.Profile()
    started = time.monotonic()
    profile.enable()
    result = segment_slide(slide, output, PredictorSpec("model", model_dir=str(model)),
                           SegmentConfig(device="cpu", resume=False), progress=False)
    profile.disable()
    seconds = time.monotonic() - started
    scores = score_instances(read_labels(output), tifffile.imread(truth))
    print(f"\n{result.n_nuclei} nuclei, {result.tissue_megapixels:.2f} MP of tissue in {seconds:.1f} s "
          f"= {result.tissue_megapixels / seconds:.3f} MP/s (under cProfile); "
          f"F1@0.5 vs truth {scores['f1_50']:.3f}, AJI+ {scores['aji_plus']:.3f}")
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
