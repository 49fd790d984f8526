"""The `nuclei-app` command line: a thin typer layer over library functions.

Each subcommand parses options, calls one library function a user could import,
and maps `NucleiAppError` to a one-line message plus the documented exit code.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

from nuclei_app import __version__
from nuclei_app.bids.validate import validate_dataset
from nuclei_app.bids_app.app import run_bids_app
from nuclei_app.bids_app.settings import bids_app_argv, load_run_config, read_label_arguments
from nuclei_app.config import RunConfig, SegmentConfig, TrainingConfig, override
from nuclei_app.core.channels import select_nuclear_channels
from nuclei_app.demo import run_demo
from nuclei_app.errors import ExitCode, InvalidBIDSError, NucleiAppError
from nuclei_app.evaluate import evaluate_paths
from nuclei_app.io.slides import open_slide
from nuclei_app.progress import configure_logging
from nuclei_app.qc.slide import write_qc_report
from nuclei_app.qc.summary import summary_lines, summary_rows, summary_table
from nuclei_app.schemas import export_schemas
from nuclei_app.segment.predictors import WEAK_METHODS, PredictorSpec
from nuclei_app.workflows import segment_then_qc, weak_label_file

#: Defaults of every option that sets a `SegmentConfig`, `TrainingConfig` or `RunConfig` field.
SEGMENT = SegmentConfig()
TRAINING = TrainingConfig()
RUN = RunConfig()

app = typer.Typer(
    name="nuclei-app",
    help="Learn to segment overlapping nuclei in multiplex IF slides with no human annotation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"nuclei-app {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """nuclei-app: de novo nuclei segmentation with self-diagnosis."""


@app.command("schemas")
def schemas_command(
    output_dir: Path = typer.Option(..., "-o", "--output-dir", help="Folder to write every JSON Schema into."),
) -> None:
    """Export every JSON Schema the app writes or reads."""

    for path in export_schemas(output_dir):
        typer.echo(str(path))


@app.command("validate")
def validate_command(
    bids_dir: Path = typer.Argument(..., help="Root folder of the BIDS microscopy dataset."),
    json_report: Optional[Path] = typer.Option(
        None, "--json", help="Also write the report as JSON (schemas/validation_report.schema.json)."
    ),
) -> None:
    """Check a BIDS microscopy dataset: one line per problem naming the file and the fix (exit 16 if invalid)."""

    report = validate_dataset(bids_dir)
    for line in report.lines():
        typer.echo(line)
    if json_report is not None:
        report.write_json(json_report)
    if not report.valid:
        raise InvalidBIDSError(f"{report.summary()}; fix the problems listed above")
    typer.echo(report.summary())


@app.command("demo")
def demo_command(
    output_dir: Path = typer.Option(Path("demo_output"), "-o", "--output-dir", help="Folder for the demo results."),
    data_dir: Optional[Path] = typer.Option(
        None, "--data-dir", help="Where the sample dataset is made or reused (default: OUTPUT_DIR/sample_data)."
    ),
    seed: int = typer.Option(0, help="Random seed of the sample dataset and every step."),
    steps: int = typer.Option(150, "--steps", help="Training: optimizer steps of round 0."),
    rounds: int = typer.Option(0, "--rounds", help="Training: self-training rounds after round 0 (each costs a pass of self-labelling)."),
    max_minutes: float = typer.Option(5.0, "--max-minutes", help="Training: time budget in minutes."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
) -> None:
    """Run the embedded sample dataset end to end: `run ... train`, `participant`, `group`, then scores vs ground truth."""

    configure_logging()
    summary = run_demo(output_dir, data_dir=data_dir, seed=seed, steps=steps, rounds=rounds, max_minutes=max_minutes,
                       device=device)
    for line in summary.lines():
        typer.echo(line)
    if summary.validation is not None and not summary.validation.valid:
        for line in summary.validation.lines():
            typer.echo(line)
        raise InvalidBIDSError("the sample dataset does not validate; delete it and run the demo again")
    summary.raise_for_failures()


@app.command("info")
def info_command(
    image: Path = typer.Argument(..., help="An OME-TIFF / TIFF file or an OME-Zarr folder."),
    series: int = typer.Option(0, help="Series (image) of a multi-series file."),
    nuclear_channels: Optional[str] = typer.Option(None, help="Comma-separated nuclear channel names (default: auto)."),
) -> None:
    """Show how a slide is read: format, pyramid levels, dtype, channels, pixel size, nuclear channels."""

    with open_slide(image, series=series) as slide:
        typer.echo(f"path: {slide.path}")
        typer.echo(f"format: {slide.format}")
        typer.echo(f"dtype: {slide.dtype}")
        for level, shape in enumerate(slide.level_shapes):
            typer.echo(f"level {level}: C, Y, X = {shape[0]}, {shape[1]}, {shape[2]}")
        typer.echo(f"channels: {', '.join(slide.channel_names)}")
        size = slide.pixel_size_um
        typer.echo(f"pixel size (y, x): {'unknown' if size is None else f'{size[0]:g}, {size[1]:g} um'}")
        chosen = select_nuclear_channels(slide.channel_names, nuclear_channels, path=slide.path)
        typer.echo(f"nuclear channels: {', '.join(slide.channel_names[i] for i in chosen)}")


@app.command("train")
def train_command(
    inputs: list[Path] = typer.Argument(..., help="Image files (OME-TIFF, OME-Zarr, TIFF) and/or BIDS folders."),
    output_dir: Path = typer.Option(..., "-o", "--output-dir", help="Model folder to write."),
    preset: str = typer.Option(TRAINING.preset, help="Model size: tiny (CPU, minutes), small, paper (ResNet-50-FPN, GPU)."),
    heads: int = typer.Option(TRAINING.heads, help="Number of RoI heads sharing the backbone (K >= 1)."),
    rounds: int = typer.Option(TRAINING.rounds, help="Self-training rounds after round 0 (correct + expand + retrain)."),
    max_minutes: float = typer.Option(TRAINING.max_minutes, help="Wall-clock budget for training; rounds stop early when spent."),
    steps: Optional[int] = typer.Option(
        TRAINING.steps_per_round, help="Optimizer steps in round 0 (later rounds: half). Default: the preset's."
    ),
    fill_budget: bool = typer.Option(
        TRAINING.fill_budget, "--fill-budget",
        help="Train until --max-minutes is spent (steps fitted to the measured speed; not with --steps). "
             "The step count then depends on the machine, so runs are not bit-identical."),
    seed: int = typer.Option(TRAINING.seed, help="Random seed; same inputs and seed give the same model on CPU."),
    nuclear_channels: Optional[str] = typer.Option(None, help="Comma-separated nuclear channel names (default: auto)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
) -> None:
    """Train a student de novo from weak labels (no human annotation, no pretrained weights)."""
    from nuclei_app.train.loop import train_model

    logger = configure_logging()
    config = TrainingConfig(
        preset=preset, heads=heads, rounds=rounds, max_minutes=max_minutes, steps_per_round=steps,
        fill_budget=fill_budget, seed=seed, device=device,
    )
    result = train_model(inputs, output_dir, config, nuclear_channels=nuclear_channels, progress=logger.info)
    last = result.report["rounds"][-1]
    typer.echo(
        f"{result.card['model_id']}: {len(result.report['rounds'])} round(s), "
        f"{last['pseudo_labels']['objects']} pseudo-labelled nuclei, {result.report['total_seconds']:.0f} s -> {output_dir}"
    )


@app.command("evaluate")
def evaluate_command(
    prediction: Path = typer.Argument(..., help="Predicted labels: a label TIFF / OME-Zarr, or a folder of them."),
    ground_truth: Path = typer.Argument(..., help="Ground-truth labels: a file, or a folder (NAME_masks.tif pairs with NAME*)."),
    json_report: Optional[Path] = typer.Option(
        None, "--json", help="Also write the report as JSON (schemas/evaluation_report.schema.json)."
    ),
) -> None:
    """Score predicted nuclei against ground truth: F1@0.5, AP@0.5:0.95, AJI+, PQ per image, mean and pooled."""
    from rich.console import Console

    report = evaluate_paths(prediction, ground_truth)
    Console(width=140).print(report.table())
    for path in report.predictions_without_truth:
        typer.echo(f"nuclei-app: warning: {path}: no ground-truth partner; not scored", err=True)
    for path in report.truth_without_prediction:
        typer.echo(f"nuclei-app: warning: {path}: no prediction partner; not scored", err=True)
    if json_report is not None:
        report.write_json(json_report)
        typer.echo(f"report -> {json_report}")


@app.command("weak")
def weak_command(
    image: Path = typer.Argument(..., help="An OME-TIFF / TIFF file or an OME-Zarr folder (read whole into memory)."),
    output: Path = typer.Option(..., "-o", "--output", help="Labels to write: .tif (uint32 label TIFF) or .ome.zarr (NGFF labels)."),
    method: str = typer.Option("log", help="Weak labeler: log (LoG seeds + watershed) or otsu (Otsu + distance watershed)."),
    nuclear_channels: Optional[str] = typer.Option(None, help="Comma-separated nuclear channel names (default: auto)."),
    diameter: Optional[float] = typer.Option(None, help="Nucleus diameter in pixels (default: estimated from the image)."),
) -> None:
    """Label nuclei with a classical weak labeler (the teacher), for one image or tile held in memory."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        result = weak_label_file(image, output, method=method, nuclear_channels=nuclear_channels, diameter=diameter)
    for warning in caught:
        typer.echo(f"nuclei-app: warning: {image}: {warning.message}", err=True)
    typer.echo(f"{result.count} nuclei, estimated diameter {result.diameter:.1f} px ({method}) -> {output}")


def _print_qc_summary(report: dict, first_line: str) -> None:
    """End a command with the QC summary: a rich table on a terminal, plain ``label: text`` lines otherwise.

    ``first_line`` (the status and where the report went) is printed after the table, or
    first among the plain lines in place of the summary's own status row.
    """
    rows = summary_rows(report)
    if sys.stdout.isatty():
        from rich.console import Console

        Console().print(summary_table(rows))
        typer.echo(first_line)
        return
    typer.echo(first_line)
    for line in summary_lines(rows[1:]):
        typer.echo(line)


@app.command("segment")
def segment_command(
    image: Path = typer.Argument(..., help="The slide: OME-TIFF / TIFF file or OME-Zarr folder."),
    output: Path = typer.Option(..., "-o", "--output", help="Segmentation store to write (OUT.ome.zarr, NGFF 0.4)."),
    model: Optional[Path] = typer.Option(None, "--model", help="Trained model folder (from `nuclei-app train`)."),
    method: Optional[str] = typer.Option(
        None, "--method", help=f"Segment without a model: {', '.join(WEAK_METHODS)} (the weak labeler)."
    ),
    table: Optional[Path] = typer.Option(None, "--table", help="Per-nucleus TSV (+ .json column sidecar)."),
    geojson: Optional[Path] = typer.Option(None, "--geojson", help="Nucleus polygons as GeoJSON (QuPath detections)."),
    tile: int = typer.Option(SEGMENT.tile, help="Tile side in pixels (at least 64)."),
    overlap: int = typer.Option(
        SEGMENT.overlap, help="Tile overlap in pixels: 0 or more, below half the tile (both grow on slides with bigger nuclei)."
    ),
    batch_size: int = typer.Option(SEGMENT.batch_size, "--batch-size", help="Tiles per predictor call and per parallel task."),
    device: str = typer.Option(SEGMENT.device, help="auto, cpu or cuda (model only)."),
    nuclear_channels: Optional[str] = typer.Option(
        SEGMENT.nuclear_channels, help="Comma-separated nuclear channel names (default: auto)."
    ),
    nprocs: int = typer.Option(SEGMENT.nprocs, help="Worker processes of a local Dask cluster (1: no cluster)."),
    mem: Optional[str] = typer.Option(
        SEGMENT.mem, "--mem", help="Total memory of the Dask workers, e.g. 8GB (split evenly as dask's memory_limit)."
    ),
    dask_scheduler: Optional[str] = typer.Option(
        SEGMENT.dask_scheduler, "--dask-scheduler",
        help="Use an existing Dask scheduler, e.g. tcp://HOST:8786 (dask-jobqueue on SLURM/PBS).",
    ),
    resume: bool = typer.Option(SEGMENT.resume, "--resume/--no-resume", help="Reuse finished tiles of an interrupted run."),
    work_dir: Optional[Path] = typer.Option(
        SEGMENT.work_dir, "--work-dir", help="Cache of per-tile results (default: beside the output)."
    ),
    qc_report: Optional[Path] = typer.Option(
        None, "--qc", help="Self-diagnosis report to write (default: OUT_qc.json beside the output)."
    ),
    skip_qc: bool = typer.Option(False, "--no-qc", help="Do not write the self-diagnosis report."),
    score_threshold: Optional[float] = typer.Option(
        SEGMENT.score_threshold, "--score-threshold",
        help="Drop nuclei whose consensus score is below this (default: the cut-off the model chose at training, "
             "recorded in its model_card.json).",
    ),
) -> None:
    """Segment a whole slide tile by tile: OME-Zarr labels (+ overlap layers), table, GeoJSON, QC report."""

    configure_logging()
    config = SegmentConfig(
        tile=tile, overlap=overlap, batch_size=batch_size, device=device, nuclear_channels=nuclear_channels,
        score_threshold=score_threshold, nprocs=nprocs, mem=mem, dask_scheduler=dask_scheduler, resume=resume,
        work_dir=None if work_dir is None else str(work_dir),
    )
    done = segment_then_qc(
        image, output, PredictorSpec.choose(model, method), config, table_path=table, geojson_path=geojson,
        qc_path=qc_report, write_qc=not skip_qc,
    )
    result = done.segmentation
    for warning in result.warnings:
        typer.echo(f"nuclei-app: warning: {image}: {warning}", err=True)
    typer.echo(
        f"{result.n_nuclei} nuclei ({result.n_layers} overlap layer(s)) in {result.n_tiles} tiles "
        f"({result.n_tiles_skipped_empty} without tissue, {result.n_tiles_reused} reused), "
        f"{result.megapixels_per_second:.2f} MP/s of tissue -> {result.output_path}"
    )
    if done.qc is not None:
        _print_qc_summary(done.qc.report, f"QC {done.qc.status} -> {done.qc.path}")


@app.command("qc")
def qc_command(
    labels: Path = typer.Argument(..., help="Segmentation: OUT.ome.zarr (flattened view + overlap layers) or a label TIFF."),
    image: Path = typer.Argument(..., help="The slide the labels were made from (OME-TIFF / TIFF / OME-Zarr)."),
    output: Path = typer.Option(..., "-o", "--output", help="QC report to write (JSON, schemas/qc_report.schema.json)."),
    model: Optional[Path] = typer.Option(
        None, "--model",
        help="Model folder: rerun its heads on every tile for scores and head agreement (without it they come from "
             "the table or from the scores the segmentation kept in its store, nuclei-app_scores.tsv; a store of an "
             "older version has none).",
    ),
    config: Optional[Path] = typer.Option(
        None, "--config", help="QC thresholds, JSON or TOML (schemas/qc_config.schema.json); bad keys/values exit 64."
    ),
    table: Optional[Path] = typer.Option(None, "--table", help="Per-nucleus TSV (default: found beside the labels)."),
    nuclear_channels: Optional[str] = typer.Option(None, help="Comma-separated nuclear channel names (default: auto)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda (with --model)."),
) -> None:
    """Diagnose a segmentation without ground truth: per-tile and per-slide QC, pass/warn/fail with reasons.

    The weak teacher (teacher agreement, seed recall) runs on a stratified, seeded sample of the tiles
    (QC config: teacher_tiles_min, teacher_tiles_share, teacher_sample_seed; the report lists them).

    Exit codes: 0 report written (whatever the status), 64 bad option or QC config, 65 bad data (labels not integer, labels and image of different shapes), 66 missing input, 73 cannot write.
    """

    result = write_qc_report(
        labels, image, output, model_dir=model, config_path=config, table_path=table,
        nuclear_channels=nuclear_channels, device=device,
    )
    report = result.report
    codes = ", ".join(reason["code"] for reason in report["reasons"])
    slide = report["slide"]
    _print_qc_summary(report, (
        f"status: {report['status']}{f' ({codes})' if codes else ''}; {slide['n_nuclei']} nuclei, "
        f"{slide['n_tiles_analysed']} tiles analysed, {slide['n_flagged_tiles']} flagged -> {output}"
    ))


@app.command("run")
def run_command(
    bids_dir: Path = typer.Argument(..., help="Root folder of the input BIDS microscopy dataset (read only)."),
    output_dir: Path = typer.Argument(..., help="The BIDS derivative folder to write (not BIDS_DIR, nor inside it)."),
    analysis_level: str = typer.Argument(..., help="train, participant or group."),
    participant_label: Optional[list[str]] = typer.Option(
        None, "--participant-label", help="Participant(s) to process: 01, sub-01, '01 02', 01,02, or @FILE (one per line). Repeatable."
    ),
    session_label: Optional[list[str]] = typer.Option(None, "--session-label", help="Session(s), as --participant-label."),
    sample_label: Optional[list[str]] = typer.Option(None, "--sample-label", help="Sample(s), as --participant-label."),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="Intermediate files (default: OUTPUT_DIR/.work)."),
    nprocs: Optional[int] = typer.Option(
        None, "--nprocs", help=f"Dask worker processes per slide (default {SEGMENT.nprocs}: in-process)."
    ),
    mem: Optional[str] = typer.Option(None, "--mem", help="Total memory of the Dask workers, e.g. 8GB (dask memory_limit)."),
    device: Optional[str] = typer.Option(None, "--device", help=f"auto, cpu or cuda (default {SEGMENT.device})."),
    preset: Optional[str] = typer.Option(None, "--preset", help=f"Model size: tiny, small, paper (default {RUN.preset})."),
    model: Optional[Path] = typer.Option(None, "--model", help="Use this model folder instead of OUTPUT_DIR/models/<id> (participant)."),
    nuclear_channels: Optional[str] = typer.Option(None, "--nuclear-channels", help="Comma-separated nuclear channel names (default: auto)."),
    seed: Optional[int] = typer.Option(None, "--seed", help=f"Random seed (default {RUN.seed})."),
    skip_bids_validation: Optional[bool] = typer.Option(
        None, "--skip-bids-validation", help="Do not validate the input dataset first."
    ),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Skip finished work (default: on)."),
    dask_scheduler: Optional[str] = typer.Option(
        None, "--dask-scheduler", help="Existing Dask scheduler for the tiles, e.g. tcp://HOST:8786 (dask-jobqueue)."
    ),
    heads: Optional[int] = typer.Option(None, "--heads", help=f"Training: RoI heads (default {RUN.heads})."),
    rounds: Optional[int] = typer.Option(
        None, "--rounds", help=f"Training: self-training rounds after round 0 (default {RUN.rounds})."
    ),
    max_minutes: Optional[float] = typer.Option(
        None, "--max-minutes", help=f"Training: time budget in minutes (default {RUN.max_minutes:g})."
    ),
    steps: Optional[int] = typer.Option(None, "--steps", help="Training: optimizer steps of round 0 (default: the preset's)."),
    tile: Optional[int] = typer.Option(
        None, "--tile", help=f"Segmentation tile side in pixels, at least 64 (default {SEGMENT.tile})."
    ),
    overlap: Optional[int] = typer.Option(
        None, "--overlap", help=f"Segmentation tile overlap in pixels, below half the tile (default {SEGMENT.overlap})."
    ),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", help=f"Tiles per predictor call (default {SEGMENT.batch_size})."
    ),
    score_threshold: Optional[float] = typer.Option(
        None, "--score-threshold", help="Drop nuclei scored below this (default: the model's own cut-off)."
    ),
    qc_config: Optional[Path] = typer.Option(None, "--qc-config", help="QC thresholds file (schemas/qc_config.schema.json)."),
    config: Optional[Path] = typer.Option(
        None, "--config", help="Settings file, JSON or TOML (schemas/run_config.schema.json); options given here override it."
    ),
) -> None:
    """The BIDS App: train a dataset model, segment each participant's slides, or aggregate QC over the group.

    Also callable as `nuclei-app BIDS_DIR OUTPUT_DIR LEVEL ...` (the container entry point).
    Exit codes: 0 ok, 1 some slides failed (the others are done; see OUTPUT_DIR/logs), 16 invalid BIDS input,
    17 unknown level, 18 the filters select nothing, 64 usage (bad option or config; OUTPUT_DIR inside BIDS_DIR),
    65 bad data, 66 missing input, 73 cannot create output, 74 I/O error.
    """

    configure_logging()
    base = load_run_config(config)
    segment = override(
        base.segment, tile=tile, overlap=overlap, batch_size=batch_size, device=device,
        nuclear_channels=nuclear_channels, score_threshold=score_threshold, nprocs=nprocs, mem=mem,
        dask_scheduler=dask_scheduler, resume=resume, work_dir=None if work_dir is None else str(work_dir),
    )
    run_config = override(
        base, segment=segment, participant_label=read_label_arguments(participant_label, "participant"),
        session_label=read_label_arguments(session_label, "session"),
        sample_label=read_label_arguments(sample_label, "sample"), preset=preset,
        model=None if model is None else str(model), seed=seed, skip_bids_validation=skip_bids_validation,
        heads=heads, rounds=rounds, max_minutes=max_minutes, steps=steps,
        qc_config=None if qc_config is None else str(qc_config),
    )
    result = run_bids_app(bids_dir, output_dir, analysis_level, run_config)
    for line in result.lines():
        typer.echo(line)
    result.raise_for_failures()


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the typer app, turning user errors into one line and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)

    args = bids_app_argv(args, [command.name for command in app.registered_commands])
    try:
        app(args=args, prog_name="nuclei-app", standalone_mode=False)
    except NucleiAppError as error:
        typer.echo(f"nuclei-app: error: {error}", err=True)
        return int(error.exit_code)
    except typer.Exit as done:
        return int(done.exit_code)
    except typer.Abort:
        typer.echo("nuclei-app: aborted", err=True)
        return int(ExitCode.FAILURE)
    except KeyboardInterrupt:
        typer.echo("nuclei-app: interrupted", err=True)
        return 130
    except typer.TyperException as usage_problem:  # bad options or arguments
        if str(usage_problem):  # an empty message means help was already shown
            typer.echo(f"nuclei-app: usage error: {usage_problem}; see 'nuclei-app --help'", err=True)
        return int(ExitCode.USAGE)
    except Exception as error:  # a bug or an unforeseen environment problem: one line, not a traceback
        if os.environ.get("NUCLEI_APP_DEBUG"):
            raise
        kind = "I/O error" if isinstance(error, OSError) else "internal error"
        typer.echo(f"nuclei-app: {kind}: {type(error).__name__}: {error}; rerun with NUCLEI_APP_DEBUG=1 for the "
                   "traceback and report it if the inputs are fine", err=True)
        return int(ExitCode.IO_ERROR if isinstance(error, OSError) else ExitCode.FAILURE)
    return int(ExitCode.OK)


if __name__ == "__main__":
    sys.exit(main())
