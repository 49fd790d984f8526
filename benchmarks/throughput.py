"""Whole-slide throughput: `nuclei-app segment` beside StarDist and the weak labeler, one after the other.

Makes three slides (kept under ``--work`` and reused):

- ``mosaic``: a 12 x 12 mosaic of a 512 x 512 crop of a real DSB2018 image from
  ``../shared/data/nuclei-gt`` (nuclei about 20 px), 37.7 MP, pyramidal OME-TIFF, with its
  human masks tiled alike as ground truth;
- ``small``: the same crop downsampled 2x (nuclei about 10 px), 24 x 24 tiles, 37.7 MP;
- ``sparse16k``: a 16k x 16k synthetic slide with 1 % tissue (`segment_memory.write_slide`).

``--quick`` makes the mosaics 6 x 6 (9.4 MP; ``small`` 12 x 12 of the half-size crop) so that
a whole run with StarDist takes about 10 minutes on a 2-core machine.

Then, on each slide, each in its own child process (wall time and the child's own peak RSS
from ``os.wait4``): ``nuclei-app segment --no-qc``; the default ``nuclei-app segment``
(self-diagnosis on); the default with ``--table`` (QC and table: what a lab runs);
``nuclei-app segment --method weak --no-qc`` (the teacher alone); and StarDist's ``predict_instances_big`` (block 1024) with a
StarDist 2D model trained de novo for ``--stardist-seconds`` on the weak teacher's labels of the
source crop, run in the peers' venv (``make benchmark`` builds ``.venv-benchmark``). Prints
MP/s (slide area over wall time), the ratio to StarDist, peak RSS and, on ``mosaic``, F1@0.5
against the tiled human masks. The nuclei_app model is the tiny preset trained on the source
crop (``--train-steps``), cached.

    .venv/bin/python benchmarks/throughput.py [--quick] [--slides mosaic,small,sparse16k] [--skip-stardist]
        [--stardist-python .venv-benchmark/bin/python] [--profile PROFILE.txt] [--out ROWS.json]

``--commands no-qc,default`` runs only those (e.g. the QC overhead on the full mosaic).
``--repeat N`` runs the nuclei_app commands in N interleaved rounds and reports each one's
fastest run (all runs are in ``--out``): on a shared machine a single pair of runs moves the
QC overhead ratio by +-0.1.
``--profile`` also runs the default ``segment`` on the first slide in-process under cProfile
and writes the functions with the most cumulative time to that file.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from nuclei_app.core.metrics import score_instances  # noqa: E402
from nuclei_app.io.labels import read_labels, write_label_tiff  # noqa: E402
from nuclei_app.io.ome_tiff import write_ome_tiff  # noqa: E402

SOURCE = Path("dsb2018-stage1-fixed") / "dsb_a102535b0e88_img.tif"
CROP = 512
REPEATS = 12
QUICK_REPEATS = 6
STARDIST_PYTHON = REPO_ROOT / ".venv-benchmark" / "bin" / "python"


def source_crop(data: Path) -> tuple[np.ndarray, np.ndarray]:
    """The 512 x 512 crop (uint8/uint16 image, uint32 masks) the mosaics repeat."""
    image = tifffile.imread(data / SOURCE)
    masks = tifffile.imread(data / str(SOURCE).replace("_img.tif", "_masks.tif"))
    image = image if image.ndim == 2 else image[..., 0]
    return image[:CROP, :CROP], masks[:CROP, :CROP].astype(np.uint32)


def mosaic(tile: np.ndarray, repeats: int, labels: bool = False) -> np.ndarray:
    """``tile`` repeated ``repeats`` x ``repeats`` times; label ids made unique per copy."""
    if not labels:
        return np.tile(tile, (repeats, repeats))
    n = int(tile.max())
    rows = []
    for row in range(repeats):
        copies = [np.where(tile > 0, tile + (row * repeats + col) * n, 0) for col in range(repeats)]
        rows.append(np.concatenate(copies, axis=1))
    return np.concatenate(rows, axis=0).astype(np.uint32)


def make_slides(work: Path, data: Path, wanted: list[str], repeats: int) -> dict[str, tuple[Path, Path | None]]:
    """Write the slides (and ground truth where there is one) unless already there."""
    work.mkdir(parents=True, exist_ok=True)
    image, masks = source_crop(data)
    slides: dict[str, tuple[Path, Path | None]] = {}
    if "mosaic" in wanted:
        path, truth = work / f"mosaic{repeats}.ome.tif", work / f"mosaic{repeats}_masks.tif"
        if not path.exists():
            write_ome_tiff(path, mosaic(image, repeats)[None], ["DAPI"], tile=(512, 512))
            write_label_tiff(truth, mosaic(masks, repeats, labels=True))
        slides["mosaic"] = (path, truth)
    if "small" in wanted:
        path = work / f"small{repeats}.ome.tif"
        if not path.exists():
            half = image.reshape(CROP // 2, 2, CROP // 2, 2).mean(axis=(1, 3)).astype(image.dtype)
            write_ome_tiff(path, mosaic(half, 2 * repeats)[None], ["DAPI"], tile=(512, 512))
        slides["small"] = (path, None)
    if "sparse16k" in wanted:
        from segment_memory import make_patches, patch_layout, write_slide

        path = work / "sparse16k.ome.tif"
        if not path.exists():
            write_slide(path, 16384, make_patches(0), patch_layout(16384, 0.01, 16384))
        slides["sparse16k"] = (path, None)
    return slides


def child(command: list[str], cwd: Path = REPO_ROOT) -> tuple[float, float, str]:
    """Run ``command``; its wall seconds, its own peak RSS (GB) and its output."""
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.monotonic() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{output[-3000:]}")
    return seconds, usage.ru_maxrss * 1024 / 1e9, output


def train_model(work: Path, data: Path, steps: int) -> Path:
    """The tiny nuclei_app model, trained on the source crop (channel named DAPI, as the slides' channel)."""
    model = work / "model"
    tifffile.imwrite(work / "source_crop.tif", source_crop(data)[0])  # StarDist's and the teacher's input
    if not (model / "model_card.json").exists():
        crop = work / "source_crop.ome.tif"
        write_ome_tiff(crop, source_crop(data)[0][None], ["DAPI"])
        child([sys.executable, "-m", "nuclei_app", "train", str(crop), "-o", str(model), "--steps", str(steps),
               "--rounds", "0", "--seed", "0", "--device", "cpu"])
    return model


STARDIST_SCRIPT = r"""
import json, sys, time
import numpy as np, tifffile
from csbdeep.utils import normalize
from stardist import fill_label_holes
from stardist.models import Config2D, StarDist2D
mode, work = sys.argv[1], sys.argv[2]
if mode == "train":
    image = normalize(tifffile.imread(work + "/source_crop.tif").astype(np.float32), 1, 99.8)
    labels = fill_label_holes(tifffile.imread(work + "/teacher_labels.tif"))
    config = Config2D(n_rays=32, grid=(2, 2), n_channel_in=1, train_patch_size=(128, 128), train_batch_size=4,
                      use_gpu=False, train_tensorboard=False)
    model = StarDist2D(config, name="stardist", basedir=work)
    deadline = time.time() + float(sys.argv[3])
    import tensorflow as tf
    class WallClock(tf.keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if time.time() > deadline:
                self.model.stop_training = True
    model.prepare_for_training(); model.callbacks.append(WallClock())
    model.train([image], [labels], validation_data=([image], [labels]), epochs=10_000, steps_per_epoch=20)
    model.optimize_thresholds([image], [labels])
else:
    model = StarDist2D(None, name="stardist", basedir=work)
    slide = tifffile.imread(sys.argv[3]).squeeze().astype(np.float32)
    labels, _ = model.predict_instances_big(normalize(slide, 1, 99.8), axes="YX", block_size=1024,
                                            min_overlap=64, context=64, verbose=False, show_progress=False)
    tifffile.imwrite(sys.argv[4], labels.astype(np.uint32), compression="zlib")
    print(json.dumps({"n_nuclei": int(len(np.unique(labels)) - 1)}))
"""


def stardist(work: Path, slide: Path, output: Path, train_seconds: float, python: Path) -> tuple[float, float]:
    script = work / "stardist_child.py"
    script.write_text(STARDIST_SCRIPT)
    if not (work / "stardist" / "config.json").exists():
        teacher = work / "teacher_labels.tif"
        child([sys.executable, "-m", "nuclei_app", "weak", str(work / "source_crop.tif"), "-o", str(teacher)])
        child([str(python), str(script), "train", str(work), str(train_seconds)])
    seconds, rss, _ = child([str(python), str(script), "predict", str(work), str(slide), str(output)])
    return seconds, rss


def f1_against(prediction: Path, truth: Path | None) -> float | None:
    if truth is None:
        return None
    return round(score_instances(read_labels(prediction), read_labels(truth))["f1_50"], 4)


def profile_default(work: Path, slide: Path, model: Path, report: Path, top: int = 30) -> None:
    """Run the default ``segment`` on ``slide`` under cProfile; write the top functions to ``report``."""
    import pstats

    output, stats_file = work / "profile.ome.zarr", work / "profile.pstats"
    shutil.rmtree(output, ignore_errors=True)
    child([sys.executable, "-m", "cProfile", "-o", str(stats_file), "-m", "nuclei_app", "segment", str(slide),
           "-o", str(output), "--no-resume", "--device", "cpu", "--model", str(model)])
    with report.open("w") as handle:
        stats = pstats.Stats(str(stats_file), stream=handle).strip_dirs()
        handle.write(f"default segment of {slide.name}, sorted by cumulative time\n")
        stats.sort_stats("cumulative").print_stats(top)
        handle.write("\nsorted by own time\n")
        stats.sort_stats("tottime").print_stats(top)
    print(f"profile written to {report}")


def run_slide(name: str, slide: Path, truth: Path | None, model: Path, args: argparse.Namespace) -> dict[str, dict]:
    """Every command on one slide, one after the other: wall seconds, peak RSS, F1@0.5 where there is truth."""
    runs = {
        "no-qc": ("nuclei_app --no-qc", ["--model", str(model), "--no-qc"]),
        "default": ("nuclei_app default (QC)", ["--model", str(model)]),
        "table": ("nuclei_app default + --table", ["--model", str(model), "--table", "{out}.tsv"]),
        "weak": ("weak labeler --no-qc", ["--method", "weak", "--no-qc"]),
    }
    wanted = args.commands.split(",")
    results: dict[str, dict] = {}
    # Rounds interleave the commands, so a burst of load from elsewhere hits one run of each
    # rather than every run of one; each command keeps its fastest (least disturbed) run.
    for repetition in range(args.repeat):
        for key, (label, options) in runs.items():
            if key not in wanted:
                continue
            output = args.work / f"{name}_{key}.ome.zarr"
            shutil.rmtree(output, ignore_errors=True)
            command = [sys.executable, "-m", "nuclei_app", "segment", str(slide), "-o", str(output), "--no-resume",
                       "--device", "cpu", *(o.replace("{out}", str(output)) for o in options)]
            seconds, rss, _ = child(command)
            runs_so_far = results.get(label, {}).get("all_seconds", []) + [round(seconds, 2)]
            if label not in results or seconds < results[label]["seconds"]:
                results[label] = {"seconds": seconds, "peak_rss_gb": rss, "f1_50": f1_against(output, truth)}
            results[label]["all_seconds"] = runs_so_far
            print(f"  {name}: {label} {seconds:.1f} s (round {repetition + 1} of {args.repeat})", flush=True)
    if "stardist" in wanted and not args.skip_stardist and args.stardist_python.exists():
        output = args.work / f"{name}_stardist.tif"
        seconds, rss = stardist(args.work, slide, output, args.stardist_seconds, args.stardist_python)
        results["StarDist predict_instances_big"] = {"seconds": seconds, "peak_rss_gb": rss,
                                                     "f1_50": f1_against(output, truth)}
    return results


def print_table(name: str, slide: Path, megapixels: float, results: dict[str, dict]) -> None:
    reference = results.get("StarDist predict_instances_big", {}).get("seconds")
    no_qc = results.get("nuclei_app --no-qc", {}).get("seconds")
    print(f"\n{name}: {megapixels:.1f} MP ({slide.name})")
    print(f"  {'command':34s} {'wall s':>7s} {'MP/s':>6s} {'x StarDist':>10s} {'/ --no-qc':>9s} "
          f"{'peak RSS GB':>11s} {'F1@0.5':>7s}")
    for label, r in results.items():
        ratio = f"{reference / r['seconds']:.2f}" if reference else "-"
        over = f"{r['seconds'] / no_qc:.2f}" if no_qc else "-"
        f1 = "-" if r["f1_50"] is None else f"{r['f1_50']:.3f}"
        print(f"  {label:34s} {r['seconds']:7.1f} {megapixels / r['seconds']:6.2f} {ratio:>10s} {over:>9s} "
              f"{r['peak_rss_gb']:11.2f} {f1:>7s}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "nuclei-gt")
    parser.add_argument("--work", type=Path, default=REPO_ROOT / "benchmarks" / "work" / "throughput")
    parser.add_argument("--slides", default="mosaic,small,sparse16k")
    parser.add_argument("--quick", action="store_true", help="6 x 6 mosaics (9.4 MP) instead of 12 x 12")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--stardist-seconds", type=float, default=180.0)
    parser.add_argument("--stardist-python", type=Path, default=STARDIST_PYTHON,
                        help="python of the benchmark venv with StarDist (make benchmark builds it)")
    parser.add_argument("--skip-stardist", action="store_true")
    parser.add_argument("--commands", default="no-qc,default,table,weak,stardist",
                        help="which of no-qc, default, table, weak, stardist to run on each slide")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the nuclei_app commands this many interleaved rounds; report each one's fastest")
    parser.add_argument("--profile", type=Path, default=None, help="cProfile the default segment; summary here")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    slides = make_slides(args.work, args.data, args.slides.split(","), QUICK_REPEATS if args.quick else REPEATS)
    model = train_model(args.work, args.data, args.train_steps)
    rows = []
    for name, (slide, truth) in slides.items():
        megapixels = float(np.prod(tifffile.TiffFile(slide).series[0].shape[-2:])) / 1e6
        results = run_slide(name, slide, truth, model, args)
        print_table(name, slide, megapixels, results)
        rows += [{"slide": name, "command": label, "megapixels": megapixels, **r,
                  "megapixels_per_second": megapixels / r["seconds"]} for label, r in results.items()]
        if args.out:
            args.out.write_text(json.dumps(rows, indent=1))
    if args.profile:
        name, (slide, _) = next(iter(slides.items()))
        profile_default(args.work, slide, model, args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
