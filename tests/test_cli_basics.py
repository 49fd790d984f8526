"""The CLI's own contract: version, help, usage errors, schema export."""

from __future__ import annotations

import json

import jsonschema

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
