"""Provenance shared by every output: content hashes and software versions.

Kept free of heavy imports (no torch) so light code paths (weak labeler, QC) can use it.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
import platform
from importlib import metadata
from pathlib import Path


def path_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file, or of every file below a folder (relative path + bytes, sorted).

    A folder (an OME-Zarr store) hashes the same wherever it is copied.
    """
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def software_versions(packages: tuple[str, ...] = ("nuclei-app", "torch", "torchvision", "numpy")) -> dict[str, str]:
    """Python and the versions of the packages that shape results."""
    versions = {"python": platform.python_version()}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def utc_timestamp() -> str:
    """Now in UTC as ISO 8601 to the second with a ``Z`` suffix (``2026-12-03T10:26:00Z``).

    Every ``created_at``/``completed_at``/``failed_at`` the app writes comes from here.
    """
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def utc_compact_timestamp() -> str:
    """Now in UTC for file names, to the microsecond (``20261203T102600123456Z``)."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
