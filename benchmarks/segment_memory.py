"""Peak memory and throughput of whole-slide segmentation on 16k x 16k and 32k x 32k slides.

Writes two synthetic 4-channel (DAPI, Histone H3, NeuN, GFAP) pyramidal OME-TIFFs (BigTIFF,
512 x 512 zlib tiles, pyramid in SubIFDs down to <= 256 px): constant camera-offset
background with square tissue patches of real-looking nuclei (from
`nuclei_app.sample_data.synthesize_slide`) covering about the same share of each slide.
Each slide is then segmented by `nuclei-app segment` in a child process; the child's peak
resident memory comes from ``os.wait4`` (that child alone) and the throughput is the
tissue area (cores of the tiles with tissue) over the wall time of the whole command.

Memory must be bounded by tile size, not by slide size: peak RSS below 3 GB on both slides
and within 20 % of each other.

Usage::

    .venv/bin/python benchmarks/segment_memory.py [--method weak | --model MODEL_DIR]
        [--sizes 16384 32768] [--tissue-share 0.025] [--work-dir benchmarks/work/segment_memory]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from nuclei_app.sample_data import SYNTHETIC_CHANNELS, synthesize_slide  # noqa: E402
from nuclei_app.io.ome_tiff import downsample_mean2  # noqa: E402

PATCH = 1024  # tissue patch side (level 0), aligned to the patch grid
TILE = 512
BACKGROUND = 100  # camera offset of the empty glass


def make_patches(seed: int, count: int = 3) -> list[np.ndarray]:
    """A few distinct tissue patches (4, PATCH, PATCH) uint16, reused across the slide."""
    rng = np.random.default_rng(seed)
    return [synthesize_slide(rng, (PATCH, PATCH)).image for _ in range(count)]


def patch_layout(size: int, share: float, seed: int) -> list[tuple[int, int, int]]:
    """(y0, x0, patch index) of the tissue patches: ``share`` of the slide area, spread at random."""
    cells = size // PATCH
    n_patches = max(1, round(share * cells * cells))
    rng = np.random.default_rng(seed)
    chosen = rng.choice(cells * cells, size=n_patches, replace=False)
    return sorted((int(c // cells) * PATCH, int(c % cells) * PATCH, int(i % 3)) for i, c in enumerate(chosen))


def _level_patch(patch: np.ndarray, level: int) -> np.ndarray:
    for _ in range(level):
        patch = downsample_mean2(patch)
    return patch


def write_slide(path: Path, size: int, patches: list[np.ndarray], layout: list[tuple[int, int, int]]) -> None:
    """Write the pyramidal OME-TIFF tile by tile (never the whole level in memory)."""
    import tifffile

    n_levels = 1 + max(0, math.ceil(math.log2(size / 256)))
    level_patches = {(i, level): _level_patch(p, level) for i, p in enumerate(patches) for level in range(n_levels)}

    def tiles(level: int):
        side = math.ceil(size / 2**level)
        scale = 2**level
        for channel in range(4):
            for y0 in range(0, side, TILE):
                for x0 in range(0, side, TILE):
                    out = np.full((TILE, TILE), BACKGROUND, np.uint16)
                    for py, px, index in layout:
                        ly, lx = py // scale, px // scale
                        content = level_patches[(index, level)][channel]
                        ys = slice(max(y0, ly), min(y0 + TILE, ly + content.shape[0], side))
                        xs = slice(max(x0, lx), min(x0 + TILE, lx + content.shape[1], side))
                        if ys.start < ys.stop and xs.start < xs.stop:
                            out[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = content[
                                ys.start - ly : ys.stop - ly, xs.start - lx : xs.stop - lx
                            ]
                    yield out

    metadata = {
        "axes": "CYX",
        "Channel": {"Name": list(SYNTHETIC_CHANNELS)},
        "PhysicalSizeX": 0.5, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": 0.5, "PhysicalSizeYUnit": "µm",
    }
    options = dict(tile=(TILE, TILE), compression="zlib", compressionargs={"level": 1}, dtype=np.uint16,
                   photometric="minisblack")
    temporary = path.with_name(path.name + ".partial")
    with tifffile.TiffWriter(temporary, bigtiff=True, ome=True) as tif:
        tif.write(tiles(0), shape=(4, size, size), subifds=n_levels - 1, metadata=metadata, **options)
        for level in range(1, n_levels):
            side = math.ceil(size / 2**level)
            tif.write(tiles(level), shape=(4, side, side), subfiletype=1, metadata=None, **options)
    os.replace(temporary, path)


def segment_in_child(slide: Path, output: Path, predictor: list[str], extra: list[str]) -> dict:
    """Run `nuclei-app segment` in a child process; its own peak RSS, wall time and summary."""
    if output.exists():
        shutil.rmtree(output)
    command = [sys.executable, "-m", "nuclei_app", "segment", str(slide), *predictor, "-o", str(output),
               "--table", str(output.with_suffix(".tsv")), "--no-resume", *extra]
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.monotonic() - started
    stdout, stderr = process.stdout.read(), process.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"segment failed on {slide}:\n{stderr}")
    record = json.loads((output / "nuclei-app_run.json").read_text())
    summary = record["summary"]
    return {
        "slide": slide.name,
        "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,  # ru_maxrss is in KiB on Linux
        "seconds": seconds,
        "tissue_megapixels": summary["tissue_megapixels"],
        "megapixels_per_second": summary["tissue_megapixels"] / seconds,
        "n_nuclei": summary["n_nuclei"],
        "n_tiles": summary["n_tiles"],
        "n_tiles_skipped_empty": summary["n_tiles_skipped_empty"],
        "stdout": stdout.strip(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default=None, help="weak labeler instead of a model (weak, weak-otsu)")
    parser.add_argument("--model", default=None, help="model folder (e.g. the tiny preset)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--tissue-share", type=float, default=0.025, help="share of the slide covered by tissue")
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "benchmarks" / "work" / "segment_memory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `segment` options")
    args = parser.parse_args()
    if (args.method is None) == (args.model is None):
        args.method = args.method or "weak"
    predictor = ["--model", args.model, "--device", "cpu"] if args.model else ["--method", args.method]
    args.work_dir.mkdir(parents=True, exist_ok=True)
    patches = make_patches(args.seed)
    rows = []
    for size in args.sizes:
        slide = args.work_dir / f"synthetic_{size}.ome.tif"
        if not slide.exists():
            started = time.monotonic()
            write_slide(slide, size, patches, patch_layout(size, args.tissue_share, args.seed + size))
            print(f"wrote {slide} ({slide.stat().st_size / 1e6:.0f} MB) in {time.monotonic() - started:.0f} s",
                  flush=True)
        row = segment_in_child(slide, args.work_dir / f"synthetic_{size}.ome.zarr", predictor, args.extra)
        row["size"] = size
        rows.append(row)
        print(row["stdout"], flush=True)

    label = args.model or args.method
    print(f"\nsegment memory benchmark ({label}, 1 process, {os.cpu_count()} CPU cores)")
    print(f"{'slide':>13} {'tiles':>6} {'tissue MP':>10} {'nuclei':>8} {'seconds':>8} {'MP/s':>6} {'peak RSS GB':>12}")
    for row in rows:
        print(
            f"{row['size']:>6} x {row['size']:<6}{row['n_tiles']:>6} {row['tissue_megapixels']:>10.1f} "
            f"{row['n_nuclei']:>8} {row['seconds']:>8.0f} {row['megapixels_per_second']:>6.2f} "
            f"{row['peak_rss_gb']:>12.2f}"
        )
    peaks = [row["peak_rss_gb"] for row in rows]
    spread = (max(peaks) - min(peaks)) / min(peaks)
    print(f"peak RSS spread {spread:.0%} (target: < 20 %); largest {max(peaks):.2f} GB (target: < 3 GB)")


if __name__ == "__main__":
    main()
