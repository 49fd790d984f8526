"""The CLI's own contract: version, help, usage errors, schema export."""

from __future__ import annotations

import json

import jsonschema
import pytest

from nuclei_app import __version__
from nuclei_app.errors import ExitCode
from nuclei_app.schemas import schema_names


def test_version_prints_package_version(run_cli):
    result = run_cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"nuclei-app {__version__}"


def test_unknown_option_is_a_usage_error(run_cli):
    result = run_cli("schemas", "--no-such-option")
    assert result.exit_code == ExitCode.USAGE
    assert "Traceback" not in result.stderr


def test_schemas_export_writes_every_schema_as_valid_json_schema(run_cli, tmp_path):
    result = run_cli("schemas", "-o", tmp_path / "out")
    assert result.exit_code == 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted(f"{name}.schema.json" for name in schema_names())
    assert written, "the package ships no schema"
    for path in (tmp_path / "out").iterdir():
        schema = json.loads(path.read_text())
        jsonschema.validators.validator_for(schema).check_schema(schema)


def test_schemas_export_to_unwritable_place_is_one_line_error(run_cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_cli("schemas", "-o", blocker / "sub")
    assert result.exit_code == ExitCode.CANNOT_CREATE_OUTPUT
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_unforeseen_failure_is_one_line_not_a_traceback(run_cli, monkeypatch, tmp_path):
    """The error boundary of `main`: a bug deep in a stage reaches the user as one line and exit 1."""
    import nuclei_app.cli

    def broken(*_args, **_kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(nuclei_app.cli, "export_schemas", broken)  # the name the CLI calls
    monkeypatch.delenv("NUCLEI_APP_DEBUG", raising=False)
    result = run_cli("schemas", "-o", tmp_path / "out")
    assert result.exit_code == ExitCode.FAILURE
    (line,) = result.stderr.strip().splitlines()
    assert "internal error: RuntimeError: simulated bug" in line and "NUCLEI_APP_DEBUG=1" in line


# ------------------------------------------------------------- segment and run: one SegmentConfig

BAD_SEGMENT_OPTIONS = [
    (["--tile", "48"], "--tile must be at least 64 pixels, got 48"),
    (["--tile", "512", "--overlap", "256"], "--overlap must be 0 or more and below half the tile"),
    (["--overlap", "-1"], "--overlap must be 0 or more and below half the tile"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--nprocs", "0"], "--nprocs must be at least 1"),
    (["--nprocs", "2", "--dask-scheduler", "tcp://127.0.0.1:8786"], "either --nprocs or --dask-scheduler"),
    (["--device", "tpu"], "--device must be auto, cpu or cuda"),
    (["--score-threshold", "1.5"], "--score-threshold must be between 0 and 1"),
    (["--mem", "lots"], "is not a memory size"),
]


@pytest.mark.parametrize(("options", "message"), BAD_SEGMENT_OPTIONS)
def test_segment_and_run_refuse_the_same_values_with_the_same_line(run_cli, tmp_path, options, message):
    segment = run_cli("segment", tmp_path / "slide.ome.tif", "--method", "weak", "-o", tmp_path / "o.ome.zarr", *options)
    run = run_cli("run", tmp_path / "bids", tmp_path / "out", "participant", *options)
    for result in (segment, run):
        assert result.exit_code == ExitCode.USAGE
        (line,) = result.stderr.strip().splitlines()
        assert message in line
    assert segment.stderr == run.stderr
    assert not (tmp_path / "o.ome.zarr").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("options", [["--tile", "64", "--overlap", "31"], ["--tile", "96", "--overlap", "0"],
                                     ["--tile", "512", "--overlap", "255", "--score-threshold", "0"]])
def test_segment_and_run_accept_the_same_values(run_cli, tmp_path, options):
    """Accepted settings get past the configuration to the missing input (exit 66), in both commands."""
    segment = run_cli("segment", tmp_path / "slide.ome.tif", "--model", tmp_path, "-o", tmp_path / "o.ome.zarr", *options)
    run = run_cli("run", tmp_path / "bids", tmp_path / "out", "participant", *options)
    assert segment.exit_code == run.exit_code == ExitCode.MISSING_INPUT, (segment.stderr, run.stderr)


def test_a_run_config_file_is_checked_by_the_same_rule_and_named(run_cli, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("tile = 128\noverlap = 64\n")
    result = run_cli("run", tmp_path / "bids", tmp_path / "out", "participant", "--config", config)
    assert result.exit_code == ExitCode.USAGE
    (line,) = result.stderr.strip().splitlines()
    assert "--overlap must be 0 or more and below half the tile (128 / 2 = 64), got 64" in line and str(config) in line


def test_run_option_and_config_defaults_are_the_typed_configs_defaults():
    from nuclei_app.config import RunConfig, SegmentConfig
    from nuclei_app.schemas import load_schema

    properties = load_schema("run_config")["properties"]
    flat = RunConfig().to_dict()
    assert set(properties) == set(flat)
    assert {name: spec["default"] for name, spec in properties.items() if "default" in spec} == {
        name: flat[name] for name, spec in properties.items() if "default" in spec}
    assert RunConfig.from_settings(flat) == RunConfig()
    custom = RunConfig.from_settings({"tile": 256, "overlap": 32, "device": "cpu", "nuclear_channels": ["DAPI", "H3"]})
    assert custom.segment == SegmentConfig(tile=256, overlap=32, device="cpu", nuclear_channels="DAPI,H3")
    assert custom.training_config().device == "cpu"


def test_settings_files_share_one_reader_with_the_same_messages_and_codes(tmp_path):
    from nuclei_app.config import read_settings_file
    from nuclei_app.errors import MissingInputError, UsageError
    from nuclei_app.qc.rules import load_qc_config

    with pytest.raises(MissingInputError, match="QC config file not found"):
        load_qc_config(tmp_path / "none.json")
    broken = tmp_path / "broken.toml"
    broken.write_text("tile = = 3\n")
    for schema, what in (("qc_config", "QC config"), ("run_config", "run config")):
        with pytest.raises(UsageError, match=f"cannot parse the {what}"):
            read_settings_file(broken, schema, what)
    nested = tmp_path / "nested.toml"
    nested.write_text("[qc]\nmax_overlays = 3\n")
    assert load_qc_config(nested).max_overlays == 3
