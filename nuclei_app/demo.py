"""`nuclei-app demo`: the embedded sample dataset, end to end.

`run_demo` is a list of steps; each appends a `DemoStep` to the summary, so later stages
(training, segmentation, QC, evaluation) add their step here without touching the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nuclei_app.errors import CannotCreateOutputError

__all__ = ["DemoStep", "DemoSummary", "run_demo"]


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

    def lines(self) -> list[str]:
        """Human-readable summary, one line per step and path."""
        out = []
        for step in self.steps:
            out.append(f"[{step.name}] {step.detail}")
            out.extend(f"    {path}" for path in step.paths)
        return out


def run_demo(output_dir: str | Path, data_dir: str | Path | None = None, seed: int = 0) -> DemoSummary:
    """Create (or reuse) the sample dataset and validate it.

    Parameters
    ----------
    output_dir : str or Path
        Where the demo writes its results.
    data_dir : str or Path, optional
        Where the sample dataset lives; default ``output_dir / "sample_data"``.
    seed : int
        Seed of the sample dataset (and of every later step).

    Returns
    -------
    DemoSummary
    """
    from nuclei_app.sample_data import make_sample_dataset
    from nuclei_app.validate import validate_dataset

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
    return summary
