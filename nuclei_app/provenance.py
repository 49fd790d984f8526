"""Provenance shared by every output: content hashes and software versions.

Kept free of heavy imports (no torch) so light code paths (weak labeler, QC) can use it.
"""

from __future__ import annotations

import hashlib
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
