"""`nuclei-app demo`: the embedded sample dataset, end to end.

`run_demo` is a list of steps; each appends a `DemoStep` to the summary: make (or reuse)
the sample dataset, validate it, then the BIDS App's three levels on it (`run ... train`,
`run ... participant`, `run ... group`, into ``OUTPUT_DIR/derivatives``), and finally the
accuracy of every slide against its ground truth (F1 at IoU 0.5, AJI+), which the app
itself never sees.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nuclei_app.errors import CannotCreateOutputError
from nuclei_app.sample_data import make_sample_dataset
from nuclei_app.bids.validate import validate_dataset
from nuclei_app.bids_app.app import run_bids_app
from nuclei_app.config import RunConfig, SegmentConfig
from nuclei_app.evaluate import evaluate_paths
from nuclei_app.bids_app.models import read_models_index

__all__ = ["DemoStep", "DemoSummary", "run_demo", "DEMO_STEPS", "DEMO_ROUNDS", "DEMO_MAX_MINUTES"]

#: Default training length of the demo: a few minutes on 2 CPU cores (the budget caps it).
#: No self-training round by default: on 2 cores relabelling the training slides costs more
#: time than the demo has (`nuclei-app demo --rounds 1` shows it).
DEMO_STEPS = 150
DEMO_ROUNDS = 0
DEMO_MAX_MINUTES = 5.0


@dataclass
class DemoStep:
    """One finished step: its name, a one-line result and the paths it produced."""

    name: str
    detail: str
    paths: list[Path] = field(default_factory=list)


@dataclass
class DemoSummary:
    output_dir: Path
    data_dir: Path
    seed: int
    steps: list[DemoStep] = field(default_factory=list)
    dataset: object = None  # nuclei_app.sample_data.SampleDataset
    validation: object = None  # nuclei_app.validate.ValidationReport
    runs: dict = field(default_factory=dict)  # level -> nuclei_app.bids_app.RunResult
    scores: dict = field(default_factory=dict)  # source slide name -> evaluate scores (f1_50, aji_plus, ...)

    def raise_for_failures(self) -> None:
        """Raise `SlidesFailedError` (exit 1) when a slide failed in the participant level."""
        if "participant" in self.runs:
            self.runs["participant"].raise_for_failures()

    def lines(self) -> list[str]:
        """Human-readable summary, one line per step and path."""
        out = []
        for step in self.steps:
            out.append(f"[{step.name}] {step.detail}")
            out.extend(f"    {path}" for path in step.paths)
        return out


def run_demo(
    output_dir: str | Path,
    data_dir: str | Path | None = None,
    seed: int = 0,
    steps: int = DEMO_STEPS,
    rounds: int = DEMO_ROUNDS,
    max_minutes: float = DEMO_MAX_MINUTES,
    device: str = "auto",
) -> DemoSummary:
    """Create (or reuse) the sample dataset, validate it, run the BIDS App on it and score the result.

    Every level resumes: a second call with the same settings reuses the model and the
    finished slides.

    Parameters
    ----------
    output_dir : str or Path
        Where the demo writes its results (the BIDS derivative in ``output_dir / "derivatives"``).
    data_dir : str or Path, optional
        Where the sample dataset lives; default ``output_dir / "sample_data"``.
    seed : int
        Seed of the sample dataset (and of every later step).
    steps, rounds, max_minutes : training length: optimizer steps of round 0, self-training
        rounds after it, wall-clock budget (the defaults fit in a few minutes on 2 CPU cores).
    device : str
        ``auto``, ``cpu`` or ``cuda``.

    Returns
    -------
    DemoSummary
        ``raise_for_failures()`` raises when a slide failed.
    """

    output_dir = Path(output_dir)
    data_dir = Path(data_dir) if data_dir is not None else output_dir / "sample_data"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CannotCreateOutputError(f"cannot create folder ({error.strerror}); choose a writable path", output_dir) from None
    summary = DemoSummary(output_dir=output_dir, data_dir=data_dir, seed=seed)
    dataset = make_sample_dataset(data_dir, seed=seed)
    summary.dataset = dataset
    summary.steps.append(
        DemoStep(
            "sample-data",
            f"BIDS dataset with {len(dataset.slides)} slides at {dataset.bids_dir}; ground truth in {dataset.ground_truth_dir}",
            dataset.slide_paths,
        )
    )
    report = validate_dataset(dataset.bids_dir)
    summary.validation = report
    summary.steps.append(DemoStep("validate", report.summary()))
    if not report.valid:
        return summary
    _run_pipeline(summary, output_dir / "derivatives", steps, rounds, max_minutes, device)
    return summary


def _run_pipeline(summary: DemoSummary, derivatives: Path, steps: int, rounds: int, max_minutes: float,
                  device: str) -> None:
    """`run BIDS OUT train`, `... participant`, `... group`, then the scores against ground truth."""

    dataset = summary.dataset
    # validated just above; the three levels share one configuration, as a pipeline would
    config = RunConfig(seed=summary.seed, steps=steps, rounds=rounds, max_minutes=max_minutes,
                       skip_bids_validation=True, segment=SegmentConfig(device=device))
    train = run_bids_app(dataset.bids_dir, derivatives, "train", config)
    summary.runs["train"] = train
    index_entry = _index_entry(derivatives, train.model.model_id)
    excluded = len(index_entry.get("excluded_slides", []))
    summary.steps.append(DemoStep(
        "train",
        f"run {dataset.bids_dir} {derivatives} train: model {train.model.model_id} learned from "
        f"{len(index_entry['slides'])} slide(s) on channels {index_entry['nuclear_channels']}"
        + (f" ({excluded} slide(s) with another panel segmented through the stain alias)" if excluded else ""),
        [train.model.path],
    ))
    participant = run_bids_app(dataset.bids_dir, derivatives, "participant", config)
    summary.runs["participant"] = participant
    done = [o for o in participant.slides if o.status != "failed"]
    summary.steps.append(DemoStep(
        "participant",
        f"run {dataset.bids_dir} {derivatives} participant: {len(done)} of {len(participant.slides)} slide(s) segmented, "
        f"{sum(o.n_nuclei or 0 for o in done)} nuclei in all",
    ))
    group = run_bids_app(dataset.bids_dir, derivatives, "group", config)
    summary.runs["group"] = group
    if group.group is not None:
        counts = group.group.summary["status_counts"]
        summary.steps.append(DemoStep(
            "group",
            f"run {dataset.bids_dir} {derivatives} group: QC {counts['pass']} pass, {counts['warn']} warn, "
            f"{counts['fail']} fail; open the report:",
            [group.group.html, group.group.tsv],
        ))
    for outcome in participant.slides:
        if outcome.status == "failed":
            summary.steps.append(DemoStep("slide", f"{outcome.source}: FAILED (exit {outcome.exit_code}): {outcome.error}"))
            continue
        truth = dataset.ground_truth_for(outcome.source.rsplit("/", 1)[-1])
        scores = evaluate_paths(outcome.paths.store, truth.labels).images[0]
        summary.scores[outcome.source] = scores
        summary.steps.append(DemoStep(
            "slide",
            f"{outcome.bids_name}: {outcome.n_nuclei} nuclei, QC {outcome.qc_status}; against ground truth "
            f"({scores['n_gt']} nuclei): f1_50 {scores['f1_50']:.3f}, aji_plus {scores['aji_plus']:.3f}",
            [outcome.paths.store],
        ))


def _index_entry(derivatives: Path, model_id: str) -> dict:

    for entry in read_models_index(derivatives)["models"]:
        if entry.get("model_id") == model_id:
            return entry
    return {"slides": [], "nuclear_channels": []}
