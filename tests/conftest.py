"""Shared fixtures: the shared real data (skip locally when absent, fail in CI) and a CLI runner."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def shared_data(subfolder: str) -> Path:
    """Path of ``../shared/data/<subfolder>``; skip when absent, but fail in CI so it never hides."""
    path = SHARED_DATA / subfolder
    if not path.is_dir():
        message = f"shared data {path} is absent (it ships beside the repository in CI)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def nuclei_gt_dir() -> Path:
    return shared_data("nuclei-gt")


@pytest.fixture(scope="session")
def ome_samples_dir() -> Path:
    return shared_data("ome-samples")


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        """The stderr lines that report an error (progress log lines are not errors)."""
        return [line for line in self.stderr.splitlines() if line.startswith("nuclei-app: error")
                or line.startswith("nuclei-app: usage error") or "Traceback" in line]


@pytest.fixture
def run_cli(capsys):
    """Run `nuclei-app ARGS...` in-process through its real entry point; return code and output."""
    from nuclei_app.cli import main

    def invoke(*args: str | os.PathLike) -> CliResult:
        capsys.readouterr()
        code = main([str(arg) for arg in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return invoke


SAMPLE_IMAGE = REPO_ROOT / "nuclei_app" / "sample_assets" / "dsb_0ea221716cf1_img.tif"
SAMPLE_MASKS = REPO_ROOT / "nuclei_app" / "sample_assets" / "dsb_0ea221716cf1_masks.tif"


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory) -> Path:
    """A tiny student trained once per test session on the packaged real image (CC0 DSB2018).

    Long enough (150 steps, ~1-2 min on 2 cores) to find most nuclei, so tests that need a
    model that works (seams, QC, the BIDS app) are not passing on an empty prediction.
    """
    from nuclei_app.config import TrainingConfig
    from nuclei_app.train.loop import train_model

    model_dir = tmp_path_factory.mktemp("session-model") / "tiny"
    config = TrainingConfig(rounds=0, steps_per_round=150, heads=2, seed=0, max_minutes=30, device="cpu")
    train_model([SAMPLE_IMAGE], model_dir, config)
    return model_dir


#: Training as short as it gets: the tests that use it check the plumbing, not accuracy.
TINY_TRAINING = ["--steps", "4", "--rounds", "0", "--heads", "1", "--max-minutes", "2", "--device", "cpu"]


@pytest.fixture(scope="session")
def sample(tmp_path_factory):
    """The embedded sample dataset (`nuclei_app.sample_data`), made once per test session."""
    from nuclei_app.sample_data import make_sample_dataset

    return make_sample_dataset(tmp_path_factory.mktemp("sample") / "data", seed=0)


@pytest.fixture(scope="session")
def derivatives(sample, tmp_path_factory):
    """`run BIDS OUT train` on participant 01, then the bare BIDS-Apps form `BIDS OUT participant`.

    One derivative dataset per test session, shared by tests/test_bids_app.py and the official
    BIDS validator's test: (output folder, exit code of train, exit code of participant).
    """
    from nuclei_app.cli import main

    output = tmp_path_factory.mktemp("derivatives") / "out"
    train_code = main(["run", str(sample.bids_dir), str(output), "train", "--participant-label", "01", *TINY_TRAINING])
    participant_code = main([str(sample.bids_dir), str(output), "participant", "--participant-label", "sub-01",
                             "--device", "cpu"])
    return output, train_code, participant_code
