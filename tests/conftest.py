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
