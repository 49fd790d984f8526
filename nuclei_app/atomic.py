"""Atomic writes: a file or folder appears under its final name only when complete.

Readers (and `--resume`) can therefore trust that anything under a final name is whole;
a killed run leaves only `*.partial-*` names behind, which are redone on the next run.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, NoReturn

from nuclei_app.errors import os_error_to_user_error


def partial_name(path: Path) -> Path:
    """The temporary sibling name used while ``path`` is being written."""
    return path.with_name(f"{path.name}.partial-{os.getpid()}")


def raise_for_os_error(error: OSError, path: str | Path) -> NoReturn:
    """Raise the user error `nuclei_app.errors.os_error_to_user_error` maps ``error`` to, naming ``path``."""
    raise os_error_to_user_error(error, path) from None


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    temporary = partial_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise_for_os_error(error, path)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path`` in one rename.

    On failure the temporary folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    temporary = partial_name(path)
    try:
        if temporary.exists():
            shutil.rmtree(temporary)
        temporary.mkdir(parents=True)
    except OSError as error:
        raise_for_os_error(error, path)
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    try:
        if path.exists():
            shutil.rmtree(path)
        os.replace(temporary, path)
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        raise_for_os_error(error, path)
