"""JSON Schemas of every JSON the app writes or reads, and validation against them.

The schemas live in `nuclei_app/schemas/*.schema.json` (the top-level `schemas/`
folder of the repository is a link to it), so an installed package carries them.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from nuclei_app.errors import BadDataError, CannotCreateOutputError
from nuclei_app.atomic import atomic_write_text

SCHEMA_SUFFIX = ".schema.json"


def schema_names() -> list[str]:
    """Names of all shipped schemas, e.g. ``["validation_report", ...]``."""
    folder = resources.files("nuclei_app") / "schemas"
    return sorted(
        entry.name[: -len(SCHEMA_SUFFIX)] for entry in folder.iterdir() if entry.name.endswith(SCHEMA_SUFFIX)
    )


@lru_cache(maxsize=None)
def load_schema(name: str) -> dict[str, Any]:
    """Load the schema ``<name>.schema.json`` shipped with the package."""
    text = (resources.files("nuclei_app") / "schemas" / f"{name}{SCHEMA_SUFFIX}").read_text(encoding="utf-8")
    return json.loads(text)


def schema_errors(instance: Any, name: str) -> list[str]:
    """Every way ``instance`` breaks schema ``name``, one readable line each (empty when valid)."""
    validator_class = jsonschema.validators.validator_for(load_schema(name))
    validator = validator_class(load_schema(name), format_checker=jsonschema.FormatChecker())
    problems = []
    for error in sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(part) for part in error.absolute_path) or "(top level)"
        problems.append(f"{where}: {error.message}")
    return problems


def validate_instance(instance: Any, name: str, source: str | Path | None = None) -> None:
    """Raise `BadDataError` naming the first problem when ``instance`` breaks schema ``name``."""
    problems = schema_errors(instance, name)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise BadDataError(f"does not match schema {name}: {problems[0]}{more}", source)


def export_schemas(output_dir: str | Path) -> list[Path]:
    """Write every schema into ``output_dir``; return the written paths."""
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CannotCreateOutputError(f"cannot create folder ({error.strerror}); choose a writable path", output_dir)
    written = []
    for name in schema_names():

        path = output_dir / f"{name}{SCHEMA_SUFFIX}"
        atomic_write_text(path, json.dumps(load_schema(name), indent=2) + "\n")
        written.append(path)
    return written
