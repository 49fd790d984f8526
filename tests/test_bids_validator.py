"""The official BIDS validator (`bids-validator-deno`, pinned in the test extra) on what we read and write.

- the embedded sample dataset: no error and no SIDECAR_FIELD_OVERRIDE;
- the derivative dataset that `run ... train`, `participant` and `group` write: no error
  (BIDS derivative names where the specification has them, `.bidsignore` for the rest);
- every broken copy of tests/test_validate.py: where the official validator has a rule it
  reports the same file as `nuclei-app validate`; where it has none (the rules that are ours
  alone, listed in the README) it reports no error, so the README's table stays true.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import test_validate  # the broken copies (BROKEN) and what `nuclei-app validate` says of each

VALIDATOR_VERSION = "3.0.2"

#: Broken copy -> the official validator's error code for it, or None where only we check.
OFFICIAL_CODES: dict[str, str | None] = {
    "no-dataset-description": "MISSING_DATASET_DESCRIPTION",
    "entity-order": "FILENAME_MISMATCH",
    "label-characters": "INVALID_ENTITY_LABEL",
    "wrong-folder": "INVALID_LOCATION",
    "suffix": "NOT_INCLUDED",
    "extension": "EXTENSION_MISMATCH",
    "sidecar-json": "JSON_INVALID",
    "pixel-size-missing": "SIDECAR_KEY_REQUIRED",
    # ours alone
    "no-samples-tsv": None,
    "sample-not-listed": None,
    "bigtiff-named-tif": None,
    "classic-named-btf": None,
    "pixel-size-mismatch": None,
    "truncated-image": None,
    "corrupt-zarr-chunks": None,
    "no-nuclear-channel": None,
    "symlink-outside": None,
}


def validator() -> str:
    """The `bids-validator-deno` executable installed beside this Python (the test extra)."""
    candidate = Path(sys.executable).with_name("bids-validator-deno")
    found = str(candidate) if candidate.is_file() else shutil.which("bids-validator-deno")
    if found is None:
        pytest.fail("bids-validator-deno is not installed: `make setup` (it is in the test extra)")
    return found


def official(dataset: Path) -> dict:
    """Run the official validator on ``dataset``; its JSON report."""
    result = subprocess.run([validator(), str(dataset), "--format", "json"], capture_output=True, text=True,
                            timeout=300)
    assert result.stdout.strip(), result.stderr[-2000:]
    return json.loads(result.stdout)


def issues(report: dict, severity: str | None = None) -> list[dict]:
    return [i for i in report["issues"]["issues"] if severity is None or i["severity"] == severity]


def test_the_pinned_validator_runs():
    result = subprocess.run([validator(), "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    from importlib.metadata import version

    assert version("bids-validator-deno") == VALIDATOR_VERSION


def test_sample_dataset_has_no_error_and_no_sidecar_override(sample):
    report = official(sample.bids_dir)
    assert issues(report, "error") == []
    codes = {i["code"] for i in issues(report)}
    assert "SIDECAR_FIELD_OVERRIDE" not in codes
    assert report["summary"]["subjects"] and report["summary"]["dataTypes"] == ["micr"]


def test_derivative_dataset_has_no_error(derivatives, sample, run_cli, tmp_path):
    output, train_code, participant_code = derivatives
    assert train_code == participant_code == 0
    group = run_cli("run", sample.bids_dir, output, "group", "--participant-label", "01")
    assert group.exit_code == 0, group.stderr
    for name in ("group_qc.tsv", "group_qc.json", "report.html", "group_failures.json", ".bidsignore"):
        assert (output / name).is_file(), name
    report = official(output)
    assert issues(report, "error") == [], issues(report, "error")
    assert report["summary"]["dataTypes"] == ["micr"] and report["summary"]["subjects"] == ["01"]

    # Without the .bidsignore the same files are errors: it is what hides them, and it hides
    # nothing else (the segmentation stores and their sidecars carry BIDS names).
    bare = tmp_path / "bare"
    shutil.copytree(output, bare, ignore=shutil.ignore_patterns("weights.pt"))
    (bare / ".bidsignore").unlink()
    errors = issues(official(bare), "error")
    assert {e["code"] for e in errors} == {"NOT_INCLUDED", "SIDECAR_WITHOUT_DATAFILE"}
    flagged = {e["location"] for e in errors}
    assert "/group_qc.tsv" in flagged and "/models/index.json" in flagged
    assert any(path.endswith("_desc-nuclei_objects.tsv") for path in flagged)
    assert any(path.endswith("_desc-nuclei_qc.json") for path in flagged)
    assert not any("_desc-nuclei_FLUO" in path for path in flagged)


def test_every_broken_case_is_classified():
    assert set(OFFICIAL_CODES) == set(test_validate.BROKEN)


@pytest.mark.parametrize("case", sorted(test_validate.BROKEN))
def test_official_validator_agrees_with_ours_on_each_broken_copy(case, sample, tmp_path):
    mutate, _, named = test_validate.BROKEN[case]
    root = tmp_path / "bids"
    shutil.copytree(sample.bids_dir, root, symlinks=True)
    mutate(root)
    ours = {p.path for p in test_validate.validate_dataset(root).problems}
    assert named in ours  # what tests/test_validate.py checks in detail
    errors = issues(official(root), "error")
    code = OFFICIAL_CODES[case]
    if code is None:
        assert errors == [], f"the official validator now has a rule for {case}: update the README table"
        return
    assert code in {e["code"] for e in errors}, errors
    located = {(e.get("location") or "/dataset_description.json").lstrip("/").rstrip("/") for e in errors
               if e["code"] == code}
    assert named in located, (located, ours)


def test_bidsignore_keeps_the_users_lines_and_is_written_once(tmp_path):
    from nuclei_app.bids_app.derivatives import BIDSIGNORE_LINES, write_bidsignore

    path = tmp_path / ".bidsignore"
    path.write_text("extra/\n/models\n")
    write_bidsignore(tmp_path)
    lines = path.read_text().splitlines()
    assert lines[:2] == ["extra/", "/models"]
    assert lines.count("/models") == 1 and set(BIDSIGNORE_LINES) <= set(lines)
    before = path.stat().st_mtime_ns
    write_bidsignore(tmp_path)
    assert path.stat().st_mtime_ns == before and path.read_text().splitlines() == lines
