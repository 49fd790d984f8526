"""The BIDS App end to end: `nuclei-app run BIDS_DIR OUTPUT_DIR {train,participant,group}`.

One tiny model (a few optimizer steps, no self-training round) is trained once per test
session and shared (fixture `derivatives` in conftest.py, also checked by the official BIDS
validator in test_bids_validator.py); the tests check layout, provenance and exit codes, not
segmentation quality.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nuclei_app.errors import ExitCode
from nuclei_app.schemas import schema_errors

from conftest import TINY_TRAINING  # the fixtures `sample` and `derivatives` live there too

pytestmark = pytest.mark.slow

SLIDE_A = "sub-01/ses-01/micr/sub-01_ses-01_sample-A_FLUO.ome.tif"


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _model_dir(output: Path) -> Path:
    return output / "models" / _load(output / "models" / "index.json")["latest"]


# ------------------------------------------------------------------------- train + participant


def test_train_level_writes_one_registered_dataset_model(derivatives, sample):
    output, train_code, _ = derivatives
    assert train_code == 0
    index = _load(output / "models" / "index.json")
    assert schema_errors(index, "models_index") == []
    assert len(index["models"]) == 1
    entry = index["models"][0]
    assert entry["model_id"] == index["latest"] and entry["path"] == f"models/{index['latest']}"
    assert entry["slides"] == [SLIDE_A, "sub-01/ses-02/micr/sub-01_ses-02_sample-B_FLUO.ome.zarr"]
    assert entry["training_config"]["steps_per_round"] == 4 and entry["training_config"]["rounds"] == 0
    card = _load(_model_dir(output) / "model_card.json")
    assert card["model_id"] == index["latest"] and card["channels"] == entry["nuclear_channels"]
    assert (_model_dir(output) / "weights.pt").is_file()
    assert not list((output / "models").glob(".staging-*")) and not (output / "models" / ".train.lock").exists()
    configs = sorted((output / "logs").glob("config-train-*.json"))
    assert len(configs) == 1
    recorded = _load(configs[0])
    assert schema_errors(recorded, "run_config") == []  # the record is itself a valid --config file
    assert recorded["participant_label"] == ["01"] and recorded["steps"] == 4 and recorded["heads"] == 1


def test_derivative_dataset_description(derivatives, sample):
    output, _, _ = derivatives
    description = _load(output / "dataset_description.json")
    assert schema_errors(description, "derivative_description") == []
    assert description["DatasetType"] == "derivative"
    generated = description["GeneratedBy"][0]
    from nuclei_app import __version__
    from nuclei_app.bids_app.derivatives import container_info

    assert generated["Name"] == "nuclei-app" and generated["Version"] == __version__
    assert generated.get("Container") == container_info()  # whatever this machine is
    assert description["SourceDatasets"] == [{"URL": sample.bids_dir.resolve().as_uri()}]
    assert description["BIDSVersion"] == _load(sample.bids_dir / "dataset_description.json")["BIDSVersion"]


def test_participant_level_writes_the_design_layout(derivatives, sample):
    output, _, participant_code = derivatives
    assert participant_code == 0
    model_id = _load(output / "models" / "index.json")["latest"]
    for session, sample_label in (("01", "A"), ("02", "B")):
        micr = output / "sub-01" / f"ses-{session}" / "micr"
        stem = f"sub-01_ses-{session}_sample-{sample_label}_desc-nuclei"
        store = micr / f"{stem}_FLUO.ome.zarr"
        record = _load(store / "nuclei-app_run.json")  # the slide's SegmentConfig, from the run's settings
        assert record["config"]["device"] == "cpu" and record["config"]["tile"] == 512
        assert record["config"]["work_dir"] == str(output / ".work" / store.name.removesuffix(".ome.zarr"))
        assert (store / "labels" / "nuclei").is_dir()
        assert (micr / f"{stem}_objects.tsv").is_file() and (micr / f"{stem}_objects.json").is_file()
        qc = _load(micr / f"{stem}_qc.json")
        assert schema_errors(qc, "qc_report") == []
        sidecar = _load(micr / f"{stem}_FLUO.json")
        assert schema_errors(sidecar, "derivative_sidecar") == []
        assert sidecar["PixelSize"] == [0.5, 0.5] and sidecar["PixelSizeUnits"] == "um"  # from the source's sidecars
        assert sidecar["Sources"] == [f"bids:raw:sub-01/ses-{session}/micr/sub-01_ses-{session}_sample-{sample_label}_FLUO"
                                      + (".ome.tif" if sample_label == "A" else ".ome.zarr")]
        assert sidecar["ModelID"] == model_id and sidecar["QCStatus"] == qc["status"]
        assert (output / sidecar["RunConfig"]).is_file()
    assert not (output / "sub-02").exists() and not (output / "sub-03").exists()  # filtered out
    log = (output / "logs" / "sub-01.log").read_text()
    assert "sample-A" in log and "sample-B" in log
    assert not (output / ".work").exists()  # the default work folder is cleaned up
    assert not list(output.rglob("*.partial-*"))


def test_participant_rerun_resumes_finished_slides(derivatives, sample, run_cli):
    output, _, _ = derivatives
    sidecar = output / "sub-01" / "ses-01" / "micr" / "sub-01_ses-01_sample-A_desc-nuclei_FLUO.json"
    before = sidecar.stat().st_mtime_ns
    result = run_cli("run", sample.bids_dir, output, "participant", "--participant-label", "01",
                     "--skip-bids-validation", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count("(reused)") == 2
    assert sidecar.stat().st_mtime_ns == before
    # A QC report written by older code (a field the group level now needs is missing) is not
    # reused: that slide is redone, the other still reused.
    qc_b = output / "sub-01" / "ses-02" / "micr" / "sub-01_ses-02_sample-B_desc-nuclei_qc.json"
    report = _load(qc_b)
    del report["pictures"]
    qc_b.write_text(json.dumps(report))
    result = run_cli("run", sample.bids_dir, output, "participant", "--participant-label", "01",
                     "--skip-bids-validation", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count("(reused)") == 1
    assert "pictures" in _load(qc_b) and sidecar.stat().st_mtime_ns == before


def test_group_level_aggregates_with_config_file_and_cli_override(derivatives, sample, run_cli, tmp_path):
    output, _, _ = derivatives
    config = tmp_path / "run.toml"
    config.write_text('participant_label = ["99"]\nskip_bids_validation = true\n')
    # the file alone selects a participant that does not exist ...
    assert run_cli("run", sample.bids_dir, output, "group", "--config", config).exit_code == ExitCode.NOTHING_SELECTED
    # ... the command line overrides it; a space-separated BIDS-Apps label list is accepted
    result = run_cli(sample.bids_dir, output, "group", "--config", config, "--participant-label", "01", "02")
    assert result.exit_code == 0, result.stderr
    assert "report.html" in result.stdout
    summary = _load(output / "group_qc.json")
    assert sorted(s["bids_name"] for s in summary["slides"]) == [
        "sub-01_ses-01_sample-A", "sub-01_ses-02_sample-B"]
    assert (output / "group_qc.tsv").is_file() and (output / "report.html").is_file()
    failures = _load(output / "group_failures.json")
    assert schema_errors(failures, "group_failures") == []
    assert failures["n_selected"] == 3 and failures["failures"] == []
    assert failures["not_processed"] == ["sub-02/ses-01/micr/sub-02_ses-01_sample-C_FLUO.ome.btf"]
    recorded = _load(sorted((output / "logs").glob("config-group-*.json"))[-1])
    assert recorded["participant_label"] == ["01", "02"] and recorded["skip_bids_validation"] is True


def test_participant_labels_from_a_file(derivatives, sample, run_cli, tmp_path):
    output, _, _ = derivatives
    labels = tmp_path / "labels.txt"
    labels.write_text("# participants of this array job\nsub-01\n")
    result = run_cli("run", sample.bids_dir, output, "group", f"@{labels}")
    assert result.exit_code == ExitCode.USAGE  # a stray positional is a usage error, not a label
    result = run_cli("run", sample.bids_dir, output, "group", "--participant-label", f"@{labels}")
    assert result.exit_code == 0, result.stderr
    assert _load(output / "group_failures.json")["n_selected"] == 2
    missing = run_cli("run", sample.bids_dir, output, "group", "--participant-label", f"@{tmp_path / 'none.txt'}")
    assert missing.exit_code == ExitCode.MISSING_INPUT


# ------------------------------------------------------------------------- failures


def test_a_failing_slide_is_recorded_and_the_others_finish(derivatives, sample, run_cli, tmp_path):
    output, _, _ = derivatives
    bids = tmp_path / "bids"  # slide A and a slide whose file is truncated (validation skipped)
    bids.mkdir()
    for name in ("dataset_description.json", "participants.tsv", "samples.tsv", "FLUO.json"):
        shutil.copy(sample.bids_dir / name, bids / name)
    shutil.copytree(sample.bids_dir / "sub-01" / "ses-01", bids / "sub-01" / "ses-01")
    broken = bids / "sub-04" / "micr" / "sub-04_sample-E_FLUO.ome.tif"
    broken.parent.mkdir(parents=True)
    broken.write_bytes((bids / SLIDE_A).read_bytes()[:4096])
    out = tmp_path / "out"
    result = run_cli("run", bids, out, "participant", "--skip-bids-validation", "--model", _model_dir(output),
                     "--device", "cpu")
    assert result.exit_code == ExitCode.FAILURE
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("nuclei-app: error:")]
    assert len(error_lines) == 1 and "1 slide(s) failed: sub-04/micr/sub-04_sample-E_FLUO.ome.tif" in error_lines[0]
    assert "Traceback" not in result.stderr
    micr = out / "sub-01" / "ses-01" / "micr"
    assert (micr / "sub-01_ses-01_sample-A_desc-nuclei_qc.json").is_file()  # the good slide is complete
    assert (micr / "sub-01_ses-01_sample-A_desc-nuclei_FLUO.json").is_file()
    assert not (out / "sub-04" / "micr" / "sub-04_sample-E_desc-nuclei_FLUO.json").exists()
    record = _load(out / "logs" / "failures" / "sub-04_sample-E_desc-nuclei_FLUO.json")
    assert schema_errors(record, "slide_failure") == []
    assert record["exit_code"] in (ExitCode.BAD_DATA, ExitCode.MISSING_INPUT) and record["log"] == "logs/sub-04.log"
    assert "sub-04_sample-E_FLUO.ome.tif" in (out / "logs" / "sub-04.log").read_text()

    group = run_cli("run", bids, out, "group", "--skip-bids-validation")
    assert group.exit_code == ExitCode.FAILURE  # the group report exists but says a slide is missing
    assert "sub-04/micr/sub-04_sample-E_FLUO.ome.tif" in group.stdout
    summary = _load(out / "group_failures.json")
    assert [f["slide"] for f in summary["failures"]] == ["sub-04/micr/sub-04_sample-E_FLUO.ome.tif"]
    assert [s["bids_name"] for s in _load(out / "group_qc.json")["slides"]] == ["sub-01_ses-01_sample-A"]
    assert summary["failures"][0]["bids_name"] == "sub-04_sample-E"  # named as in group_qc.tsv

    # once the slide is fixed, the participant level succeeds and clears the record
    shutil.copy(bids / SLIDE_A, broken)
    retry = run_cli("run", bids, out, "participant", "--participant-label", "04", "--skip-bids-validation",
                    "--model", _model_dir(output), "--device", "cpu")
    assert retry.exit_code == 0, retry.stderr
    assert not (out / "logs" / "failures" / "sub-04_sample-E_desc-nuclei_FLUO.json").exists()


def test_parallel_participant_jobs_share_one_training(sample, tmp_path):
    """Two jobs start at once into one empty output: one trains (the other waits), both segment."""
    bids = tmp_path / "bids"
    shutil.copytree(sample.bids_dir, bids, ignore=lambda folder, names: [n for n in names if n == "sub-01"])
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    jobs = [
        subprocess.Popen(
            [sys.executable, "-m", "nuclei_app", str(bids), str(out), "participant", "--participant-label", label,
             *TINY_TRAINING],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for label in ("02", "03")
    ]
    results = [job.communicate(timeout=300) for job in jobs]
    for job, (stdout, stderr) in zip(jobs, results):
        assert job.returncode == 0, stderr
    index = _load(out / "models" / "index.json")
    assert len(index["models"]) == 1  # trained once
    entry = index["models"][0]
    # the panels differ (DAPI + Histone vs Hoechst): the common DAPI-like stain is used, and
    # the Hoechst slide trains too (DAPI and Hoechst are one stain to the model)
    assert entry["nuclear_channels"] == ["DAPI"] and entry["nuclear_channels_requested"] == "dapi"
    assert entry["excluded_slides"] == []
    assert sum("trained model" in stdout for stdout, _ in results) == 1
    assert sum("using model" in stdout for stdout, _ in results) == 1
    for stem in ("sub-02/ses-01/micr/sub-02_ses-01_sample-C", "sub-03/ses-01/micr/sub-03_ses-01_sample-D"):
        sidecar = _load(out / f"{stem}_desc-nuclei_FLUO.json")
        assert sidecar["ModelID"] == index["latest"]
        assert (out / f"{stem}_desc-nuclei_qc.json").is_file() and (out / f"{stem}_desc-nuclei_objects.tsv").is_file()
    assert _load(out / "sub-03/ses-01/micr/sub-03_ses-01_sample-D_desc-nuclei_FLUO.json")["PixelSize"] == [0.65, 0.65]
    assert schema_errors(_load(out / "dataset_description.json"), "derivative_description") == []
    assert not (out / "models" / ".train.lock").exists()
    assert not list(out.rglob("*.partial-*")) and not list((out / "models").glob(".staging-*"))
    assert (out / "logs" / "sub-02.log").is_file() and (out / "logs" / "sub-03.log").is_file()


# ------------------------------------------------------------------------- exit codes


@pytest.fixture
def invalid_bids(tmp_path):
    root = tmp_path / "not_bids"
    (root / "sub-01" / "micr").mkdir(parents=True)
    (root / "sub-01" / "micr" / "slide1.tif").write_bytes(b"II*\x00")
    return root


def test_exit_16_for_an_invalid_dataset_with_the_report(invalid_bids, run_cli, tmp_path):
    result = run_cli("run", invalid_bids, tmp_path / "out", "participant")
    assert result.exit_code == ExitCode.INVALID_BIDS
    assert "dataset_description.json" in result.stderr  # the validation report's lines
    assert result.stderr.strip().splitlines()[-1].startswith("nuclei-app: error:")
    assert "--skip-bids-validation" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing written for a refused input


def test_exit_17_for_an_unknown_level(sample, run_cli, tmp_path):
    for args in (("run", sample.bids_dir, tmp_path / "out", "subject"), (sample.bids_dir, tmp_path / "out", "subject")):
        result = run_cli(*args)
        assert result.exit_code == ExitCode.UNKNOWN_LEVEL
        assert "train, participant, group" in result.stderr


def test_exit_18_when_filters_select_nothing(sample, run_cli, tmp_path):
    result = run_cli("run", sample.bids_dir, tmp_path / "out", "participant", "--participant-label", "01,99")
    assert result.exit_code == ExitCode.NOTHING_SELECTED
    assert "99 not found; available: 01, 02, 03" in result.stderr
    result = run_cli("run", sample.bids_dir, tmp_path / "out", "participant", "--session-label", "07")
    assert result.exit_code == ExitCode.NOTHING_SELECTED
    assert "sessions: 01, 02" in result.stderr


def test_exit_18_for_group_before_participant(sample, run_cli, tmp_path):
    result = run_cli("run", sample.bids_dir, tmp_path / "out", "group")
    assert result.exit_code == ExitCode.NOTHING_SELECTED
    assert "run the participant level first" in result.stderr


def test_exit_66_for_missing_inputs(sample, run_cli, tmp_path):
    assert run_cli("run", tmp_path / "nowhere", tmp_path / "out", "participant").exit_code == ExitCode.MISSING_INPUT
    result = run_cli("run", sample.bids_dir, tmp_path / "out", "participant", "--config", tmp_path / "none.json")
    assert result.exit_code == ExitCode.MISSING_INPUT
    result = run_cli("run", sample.bids_dir, tmp_path / "out", "participant", "--model", tmp_path / "no_model")
    assert result.exit_code == ExitCode.MISSING_INPUT


def test_exit_64_for_output_inside_input_and_bad_settings(sample, run_cli, tmp_path):
    for output in (sample.bids_dir, sample.bids_dir / "derivatives" / "nuclei-app"):
        result = run_cli("run", sample.bids_dir, output, "participant")
        assert result.exit_code == ExitCode.USAGE
        assert "must not be BIDS_DIR or inside it" in result.stderr
    assert not (sample.bids_dir / "derivatives").exists()
    bad_key = tmp_path / "bad_key.json"
    bad_key.write_text(json.dumps({"participant_label": "01", "speed": "fast"}))
    result = run_cli("run", sample.bids_dir, tmp_path / "out", "participant", "--config", bad_key)
    assert result.exit_code == ExitCode.USAGE and "'speed' was unexpected" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert run_cli("run", sample.bids_dir, tmp_path / "out", "participant", "--config", broken).exit_code == ExitCode.USAGE
    assert run_cli("run", sample.bids_dir, tmp_path / "out", "participant", "--mem", "lots").exit_code == ExitCode.USAGE
    result = run_cli("run", sample.bids_dir, tmp_path / "out", "participant", "--nprocs", "2",
                     "--dask-scheduler", "tcp://127.0.0.1:8786")
    assert result.exit_code == ExitCode.USAGE
    result = run_cli("run", sample.bids_dir, tmp_path / "out", "train", "--model", tmp_path)
    assert result.exit_code == ExitCode.USAGE
    result = run_cli("run", sample.bids_dir, tmp_path / "out", "participant", "--participant-label", "../01")
    assert result.exit_code == ExitCode.USAGE


def test_exit_73_when_the_output_cannot_be_created(sample, run_cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert run_cli("run", sample.bids_dir, blocker, "group").exit_code == ExitCode.CANNOT_CREATE_OUTPUT
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1.9.0"}))
    result = run_cli("run", sample.bids_dir, foreign, "participant", "--participant-label", "01")
    assert result.exit_code == ExitCode.CANNOT_CREATE_OUTPUT
    assert "not made by nuclei-app" in result.stderr


# ------------------------------------------------------------------------- library pieces


def test_container_detection_from_environment(tmp_path):
    from nuclei_app.bids_app.derivatives import container_info

    absent = tmp_path / "no-dockerenv"
    assert container_info({}, dockerenv=absent) is None
    docker = {"NUCLEI_APP_CONTAINER_TYPE": "docker", "NUCLEI_APP_CONTAINER_TAG": "nuclei-app:0.1.0"}
    assert container_info(docker, dockerenv=absent) == {"Type": "docker", "Tag": "nuclei-app:0.1.0"}
    # the Docker image run by Apptainer is reported as Apptainer (the runtime's variable wins)
    assert container_info({**docker, "APPTAINER_CONTAINER": "/images/nuclei-app.sif"}, dockerenv=absent) == {
        "Type": "apptainer", "Tag": "nuclei-app:0.1.0"}
    assert container_info({"SINGULARITY_CONTAINER": "/images/app.sif"}, dockerenv=absent) == {
        "Type": "singularity", "Tag": "app.sif"}
    marker = tmp_path / ".dockerenv"
    marker.write_text("")
    assert container_info({}, dockerenv=marker) == {"Type": "docker"}


def test_bare_form_and_label_lists_are_rewritten_for_typer():
    from nuclei_app.bids_app.settings import bids_app_argv

    commands = ["run", "segment", "train"]
    assert bids_app_argv(["/data", "/out", "participant", "--participant-label", "01", "02", "--nprocs", "2"], commands) == [
        "run", "/data", "/out", "participant", "--participant-label", "01", "--participant-label", "02", "--nprocs", "2"]
    # before the three positionals, a bare word after a label option is a positional
    assert bids_app_argv(["run", "--participant-label", "01", "/data", "/out", "group"], commands) == [
        "run", "--participant-label", "01", "/data", "/out", "group"]
    assert bids_app_argv(["train", "a.tif", "-o", "m", "--steps", "3"], commands)[0] == "train"
    assert bids_app_argv(["--version"], commands) == ["--version"]
