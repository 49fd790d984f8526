"""`nuclei-app validate`: a valid dataset, and one broken copy per rule."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from nuclei_app.errors import ExitCode
from nuclei_app.schemas import schema_errors
from nuclei_app.bids.validate import RULES, validate_dataset
from nuclei_app.io.ome_tiff import write_ome_tiff

A = "sub-01/ses-01/micr/sub-01_ses-01_sample-A_FLUO"
B = "sub-01/ses-02/micr/sub-01_ses-02_sample-B_FLUO"
C = "sub-02/ses-01/micr/sub-02_ses-01_sample-C_FLUO"
D = "sub-03/ses-01/micr/sub-03_ses-01_sample-D_FLUO"


@pytest.fixture(scope="module")
def sample_bids(tmp_path_factory) -> Path:
    from nuclei_app.sample_data import make_sample_dataset

    return make_sample_dataset(tmp_path_factory.mktemp("sample"), seed=0).bids_dir


@pytest.fixture
def copy(sample_bids, tmp_path) -> Path:
    target = tmp_path / "bids"
    shutil.copytree(sample_bids, target, symlinks=True)
    return target


def _edit_json(path: Path, **changes) -> None:
    content = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            content.pop(key, None)
        else:
            content[key] = value
    path.write_text(json.dumps(content))


def _rename(root: Path, old: str, new: str) -> None:
    """Rename an image and, as a person would, its own sidecar (it holds the slide's PixelSize)."""
    (root / old).rename(root / new)
    old_sidecar = (root / old).with_name(Path(old).name.split(".")[0] + ".json")
    new_sidecar = (root / new).with_name(Path(new).name.split(".")[0] + ".json")
    if old_sidecar != new_sidecar and old_sidecar.is_file():
        old_sidecar.rename(new_sidecar)


def _break_dataset_description(root: Path) -> None:
    (root / "dataset_description.json").unlink()


def _break_samples_tsv(root: Path) -> None:
    (root / "samples.tsv").unlink()


def _break_entity_order(root: Path) -> None:
    _rename(root, f"{A}.ome.tif", "sub-01/ses-01/micr/sub-01_sample-A_ses-01_FLUO.ome.tif")


def _break_label_characters(root: Path) -> None:
    _rename(root, f"{A}.ome.tif", "sub-01/ses-01/micr/sub-01_ses-01_sample-A-1_FLUO.ome.tif")


def _break_folder(root: Path) -> None:
    _rename(root, f"{A}.ome.tif", "sub-01/ses-01/micr/sub-01_ses-02_sample-A_FLUO.ome.tif")


def _break_suffix(root: Path) -> None:
    _rename(root, f"{A}.ome.tif", f"{A[:-4]}IMG.ome.tif")


def _break_extension(root: Path) -> None:
    _rename(root, f"{A}.ome.tif", f"{A}.tiff")


def _break_bigtiff_name(root: Path) -> None:
    _rename(root, f"{C}.ome.btf", f"{C}.ome.tif")


def _break_classic_as_btf(root: Path) -> None:
    _rename(root, f"{A}.ome.tif", f"{A}.ome.btf")


def _break_sample_listing(root: Path) -> None:
    rows = list(csv.reader((root / "samples.tsv").open(), delimiter="\t"))
    kept = [row for row in rows if row[0] != "sample-B"]
    (root / "samples.tsv").write_text("\n".join("\t".join(row) for row in kept) + "\n")


def _break_sidecar_json(root: Path) -> None:
    (root / f"{A}.json").write_text('{"SampleStaining": ["DAPI",')


def _break_pixel_size_missing(root: Path) -> None:
    _edit_json(root / "FLUO.json", PixelSizeUnits=None)  # inherited by every slide; none has its own


def _break_pixel_size_mismatch(root: Path) -> None:
    _edit_json(root / f"{A}.json", PixelSize=[0.3, 0.3])


def _break_truncated_image(root: Path) -> None:
    path = root / f"{C}.ome.btf"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _break_zarr_chunk(root: Path) -> None:
    store = root / f"{B}.ome.zarr"
    smallest = sorted(p for p in store.iterdir() if p.is_dir())[-1]  # s2: the level validate decodes
    for chunk in (p for p in smallest.rglob("*") if p.is_file() and not p.name.startswith(".")):
        chunk.write_bytes(b"garbage")


def _break_nuclear_channel(root: Path) -> None:
    image = np.random.default_rng(1).integers(0, 200, (2, 64, 64)).astype(np.uint8)
    (root / f"{D}.ome.tif").unlink()
    write_ome_tiff(root / f"{D}.ome.tif", image, ["CD45", "Ki67"], (0.65, 0.65))
    _edit_json(root / f"{D}.json", SampleStaining=["CD45", "Ki67"])


def _break_symlink_outside(root: Path) -> None:
    outside = root.parent / "outside.ome.tif"
    shutil.move(root / f"{A}.ome.tif", outside)
    (root / f"{A}.ome.tif").symlink_to(outside)


BROKEN = {
    # case: (mutation, rule, file that must be named)
    "no-dataset-description": (_break_dataset_description, "dataset-description", "dataset_description.json"),
    "no-samples-tsv": (_break_samples_tsv, "samples-tsv", "samples.tsv"),
    "entity-order": (_break_entity_order, "filename", "sub-01/ses-01/micr/sub-01_sample-A_ses-01_FLUO.ome.tif"),
    "label-characters": (_break_label_characters, "filename", "sub-01/ses-01/micr/sub-01_ses-01_sample-A-1_FLUO.ome.tif"),
    "wrong-folder": (_break_folder, "filename", "sub-01/ses-01/micr/sub-01_ses-02_sample-A_FLUO.ome.tif"),
    "suffix": (_break_suffix, "suffix", f"{A[:-4]}IMG.ome.tif"),
    "extension": (_break_extension, "extension", f"{A}.tiff"),
    "bigtiff-named-tif": (_break_bigtiff_name, "bigtiff-extension", f"{C}.ome.tif"),
    "classic-named-btf": (_break_classic_as_btf, "bigtiff-extension", f"{A}.ome.btf"),
    "sample-not-listed": (_break_sample_listing, "sample-not-listed", f"{B}.ome.zarr"),
    "sidecar-json": (_break_sidecar_json, "sidecar-json", f"{A}.json"),
    "pixel-size-missing": (_break_pixel_size_missing, "pixel-size-missing", f"{A}.ome.tif"),
    "pixel-size-mismatch": (_break_pixel_size_mismatch, "pixel-size-mismatch", f"{A}.ome.tif"),
    "truncated-image": (_break_truncated_image, "unreadable-image", f"{C}.ome.btf"),
    "corrupt-zarr-chunks": (_break_zarr_chunk, "unreadable-image", f"{B}.ome.zarr"),
    "no-nuclear-channel": (_break_nuclear_channel, "no-nuclear-channel", f"{D}.ome.tif"),
    "symlink-outside": (_break_symlink_outside, "outside-dataset", f"{A}.ome.tif"),
}


def test_sample_dataset_is_valid(sample_bids, run_cli, tmp_path):
    report_path = tmp_path / "report.json"
    result = run_cli("validate", sample_bids, "--json", report_path)
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "valid BIDS microscopy dataset" in result.stdout
    report = json.loads(report_path.read_text())
    assert schema_errors(report, "validation_report") == []
    assert report["valid"] is True and report["problems"] == [] and report["files_checked"] == 6


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_each_broken_copy_fails_its_rule_with_one_line_naming_file_and_fix(copy, run_cli, tmp_path, case):
    mutate, rule, named = BROKEN[case]
    mutate(copy)
    report_path = tmp_path / "report.json"
    result = run_cli("validate", copy, "--json", report_path)
    assert result.exit_code == ExitCode.INVALID_BIDS, result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    report = json.loads(report_path.read_text())
    assert schema_errors(report, "validation_report") == []
    assert report["valid"] is False
    assert {problem["rule"] for problem in report["problems"]} == {rule}, report["problems"]
    assert named in {problem["path"] for problem in report["problems"]}
    lines = result.stdout.strip().splitlines()
    assert len(lines) == report["problem_count"]  # one line per problem
    for line, problem in zip(lines, report["problems"]):
        assert line.startswith(f"{problem['path']}: [{problem['rule']}]") and "; fix: " in line
    stderr = result.stderr.strip().splitlines()
    assert len(stderr) == 1 and "problem(s)" in stderr[0]


def test_every_rule_is_exercised():
    assert {rule for _, rule, _ in BROKEN.values()} == set(RULES)


def test_one_problem_per_file_and_rule_and_library_report(copy):
    _break_pixel_size_missing(copy)
    _break_sample_listing(copy)
    report = validate_dataset(copy)
    pairs = [(p.path, p.rule) for p in report.problems]
    assert len(pairs) == len(set(pairs))
    assert ("sub-01/ses-02/micr/sub-01_ses-02_sample-B_FLUO.ome.zarr", "sample-not-listed") in pairs
    missing = {p.path for p in report.problems if p.rule == "pixel-size-missing"}
    assert missing == {f"{A}.ome.tif", f"{B}.ome.zarr", f"{C}.ome.btf", f"{D}.ome.tif"}  # all inherit the units
    assert json.loads(report.to_json())["problem_count"] == len(report.problems) == 5


def test_missing_or_file_bids_dir_exits_66(run_cli, tmp_path):
    for target in (tmp_path / "absent", tmp_path / "file.txt"):
        if target.name == "file.txt":
            target.write_text("x")
        result = run_cli("validate", target)
        assert result.exit_code == ExitCode.MISSING_INPUT
        assert len(result.stderr.strip().splitlines()) == 1 and str(target) in result.stderr
