"""One-shot GPU check (run by ``benchmarks/gpu_check.sh``; under 8 minutes on one modern GPU).

1. Makes the embedded sample dataset (`nuclei_app.sample_data`, 3 synthetic slides + 1 real).
2. Trains the ``tiny`` and the ``paper`` presets for a few hundred steps each with
   ``nuclei-app train ... --device cuda`` (round 0 only).
3. Writes a 16k x 16k pyramidal OME-TIFF with 2 % tissue (`segment_memory.write_slide`) and
   segments it with each model, ``--device cuda``: prints wall time, MP/s of tissue and of
   slide area, and the peak GPU memory torch allocated.
4. Segments one sample slide (1024 x 1024) with each model on ``cpu`` and on ``cuda`` and
   prints F1@0.5 between the CPU and the GPU labels (1.000: the devices agree).

Each step is the real CLI (`nuclei_app.cli.main`) run in this process, so that
``torch.cuda.max_memory_allocated`` sees it. Exits 2 with one line when CUDA is absent.

    python benchmarks/gpu_check.py [--work benchmarks/work/gpu_check] [--tiny-steps 300] [--paper-steps 200]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))


def require_cuda() -> None:
    """Exit 2 with one line unless torch sees a CUDA GPU."""
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible to torch (torch.cuda.is_available() is False); "
              "run this on a GPU machine with a CUDA build of torch", file=sys.stderr)
        raise SystemExit(2)
    print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)


def cli(*args: object) -> float:
    """Run ``nuclei-app ARGS`` in this process; its wall seconds (exit on failure)."""
    from nuclei_app.cli import main

    started = time.monotonic()
    code = main([str(arg) for arg in args])
    if code != 0:
        raise SystemExit(f"gpu_check: nuclei-app {' '.join(map(str, args))} exited {code}")
    return time.monotonic() - started


def peak_gpu_gb(reset: bool = False) -> float:
    import torch

    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 1e9
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return peak


def segment(slide: Path, model: Path, output: Path, device: str) -> tuple[float, dict]:
    """Segment ``slide`` (QC off); wall seconds and the run record's summary."""
    from nuclei_app.segment.record import read_run_record

    shutil.rmtree(output, ignore_errors=True)
    seconds = cli("segment", slide, "--model", model, "-o", output, "--device", device, "--no-qc", "--no-resume")
    return seconds, read_run_record(output)["summary"]


def labels_f1(a: Path, b: Path) -> float:
    from nuclei_app.core.metrics import score_instances
    from nuclei_app.io.labels import read_labels

    return float(score_instances(read_labels(a), read_labels(b))["f1_50"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO_ROOT / "benchmarks" / "work" / "gpu_check")
    parser.add_argument("--tiny-steps", type=int, default=300)
    parser.add_argument("--paper-steps", type=int, default=200)
    parser.add_argument("--size", type=int, default=16384, help="side of the big slide, pixels")
    parser.add_argument("--tissue-share", type=float, default=0.02)
    args = parser.parse_args(argv)
    require_cuda()
    from nuclei_app.sample_data import make_sample_dataset
    from segment_memory import make_patches, patch_layout, write_slide

    started = time.monotonic()
    args.work.mkdir(parents=True, exist_ok=True)
    sample = make_sample_dataset(args.work / "sample_data", seed=0)
    big = args.work / f"slide{args.size}.ome.tif"
    if not big.exists():
        write_slide(big, args.size, make_patches(0), patch_layout(args.size, args.tissue_share, 0))
    rows = []
    for preset, steps in (("tiny", args.tiny_steps), ("paper", args.paper_steps)):
        model = args.work / f"model-{preset}"
        shutil.rmtree(model, ignore_errors=True)
        peak_gpu_gb(reset=True)
        train_seconds = cli("train", sample.bids_dir, "-o", model, "--preset", preset, "--steps", steps,
                            "--rounds", "0", "--max-minutes", 3, "--device", "cuda", "--seed", 0)
        train_gb = peak_gpu_gb(reset=True)
        seconds, summary = segment(big, model, args.work / f"big-{preset}.ome.zarr", "cuda")
        segment_gb = peak_gpu_gb(reset=True)
        small = sample.slides[0].path
        gpu_store, cpu_store = args.work / f"small-{preset}-gpu.ome.zarr", args.work / f"small-{preset}-cpu.ome.zarr"
        segment(small, model, gpu_store, "cuda")
        cpu_seconds, _ = segment(small, model, cpu_store, "cpu")
        row = {
            "preset": preset, "train_steps": steps, "train_seconds": round(train_seconds, 1),
            "train_peak_gpu_gb": round(train_gb, 2), "slide_megapixels": args.size**2 / 1e6,
            "tissue_megapixels": summary["tissue_megapixels"], "segment_seconds": round(seconds, 1),
            "tissue_mp_per_second": round(summary["tissue_megapixels"] / seconds, 3),
            "slide_mp_per_second": round(args.size**2 / 1e6 / seconds, 2), "segment_peak_gpu_gb": round(segment_gb, 2),
            "n_nuclei": summary["n_nuclei"], "cpu_seconds_1mp": round(cpu_seconds, 1),
            "f1_50_cpu_vs_gpu": round(labels_f1(gpu_store, cpu_store), 4),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'preset':6s} {'train s':>8s} {'train GB':>8s} {'seg s':>7s} {'tissue MP/s':>11s} {'slide MP/s':>10s} "
          f"{'seg GB':>7s} {'F1 cpu/gpu':>10s}")
    for r in rows:
        print(f"{r['preset']:6s} {r['train_seconds']:8.1f} {r['train_peak_gpu_gb']:8.2f} {r['segment_seconds']:7.1f} "
              f"{r['tissue_mp_per_second']:11.2f} {r['slide_mp_per_second']:10.2f} {r['segment_peak_gpu_gb']:7.2f} "
              f"{r['f1_50_cpu_vs_gpu']:10.3f}")
    (args.work / "gpu_check.json").write_text(json.dumps(rows, indent=1))
    print(f"gpu_check: done in {time.monotonic() - started:.0f} s; rows in {args.work / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
