"""The derivative dataset: description, names and paths of every output."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping
from nuclei_app import __version__
from nuclei_app.errors import (
    CannotCreateOutputError,
    NucleiAppError,
    UsageError,
)
from nuclei_app.progress import get_logger
from nuclei_app.atomic import atomic_write_json
from nuclei_app.schemas import validate_instance
from nuclei_app.bids.discover import bids_derivative_name
from nuclei_app.io.slides import open_slide
from nuclei_app.atomic import atomic_write_text

log = get_logger("nuclei_app.bids_app")


DESC = "nuclei"
MODELS_DIR = "models"
GROUP_FAILURES = "group_failures.json"
#: Lines of ``OUTPUT_DIR/.bidsignore`` (gitignore syntax, as NiPreps write it): the outputs that
#: the BIDS specification has no name for (models, per-nucleus tables, QC reports and their
#: overlays, the group files), so that the official BIDS validator skips them instead of
#: reporting NOT_INCLUDED / SIDECAR_WITHOUT_DATAFILE. ``logs/`` is a BIDS folder already.
BIDSIGNORE_LINES: tuple[str, ...] = (
    "# nuclei-app: outputs that BIDS has no file name for",
    f"/{MODELS_DIR}",
    f"*_desc-{DESC}_objects.tsv",
    f"*_desc-{DESC}_objects.json",
    f"*_desc-{DESC}_qc.json",
    f"*_desc-{DESC}_qc",
    "/group_qc.tsv",
    "/group_qc.json",
    f"/{GROUP_FAILURES}",
    "/report.html",
)


DEFAULT_BIDS_VERSION = "1.9.0"


# ======================================================================================
# Provenance: container, dataset_description.json
# ======================================================================================


def container_info(environ: Mapping[str, str] | None = None, dockerenv: str | Path = "/.dockerenv") -> dict[str, str] | None:
    """``{"Type": ..., "Tag": ...}`` of the container the app runs in, or None outside one.

    The Apptainer/Singularity runtime sets ``APPTAINER_CONTAINER`` / ``SINGULARITY_CONTAINER``
    (it wins, so a Docker image run by Apptainer reports Apptainer); the images built from
    this repository's ``Dockerfile`` / ``apptainer.def`` set ``NUCLEI_APP_CONTAINER_TYPE`` and
    ``NUCLEI_APP_CONTAINER_TAG``; any Docker container has ``/.dockerenv``.
    """
    env = os.environ if environ is None else environ
    tag = env.get("NUCLEI_APP_CONTAINER_TAG") or None
    for variable, kind in (("APPTAINER_CONTAINER", "apptainer"), ("SINGULARITY_CONTAINER", "singularity")):
        if env.get(variable):
            return {"Type": kind, "Tag": tag or Path(env[variable]).name}
    declared = (env.get("NUCLEI_APP_CONTAINER_TYPE") or "").strip().lower()
    if declared in ("docker", "apptainer", "singularity"):
        return {"Type": declared, **({"Tag": tag} if tag else {})}
    if Path(dockerenv).exists():
        return {"Type": "docker", **({"Tag": tag} if tag else {})}
    return None


def derivative_description(bids_dir: str | Path, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``dataset_description.json`` of the output (schema ``derivative_description``).

    Deterministic for given inputs (no time stamps), so that parallel jobs write the same file.
    """
    bids_dir = Path(bids_dir)
    source: dict[str, Any] = {}
    try:
        loaded = json.loads((bids_dir / "dataset_description.json").read_text(encoding="utf-8"))
        source = loaded if isinstance(loaded, dict) else {}
    except (OSError, ValueError):
        pass
    generated: dict[str, Any] = {
        "Name": "nuclei-app",
        "Version": __version__,
        "Description": "Nuclei segmented by a multi-head Mask R-CNN trained de novo from weak labels "
                       "(weak-to-strong self-training, no human annotation), with per-slide QC.",
    }
    container = container_info(environ)
    if container is not None:
        generated["Container"] = container
    source_entry: dict[str, Any] = {"URL": bids_dir.resolve().as_uri()}
    if isinstance(source.get("DatasetDOI"), str):
        source_entry["Version"] = source["DatasetDOI"]
    name = source.get("Name")
    return {
        "Name": f"nuclei-app nuclei segmentation of {name}" if isinstance(name, str) and name else "nuclei-app nuclei segmentation",
        "BIDSVersion": source.get("BIDSVersion") if isinstance(source.get("BIDSVersion"), str) else DEFAULT_BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
        "SourceDatasets": [source_entry],
    }


def write_dataset_description(output_dir: str | Path, bids_dir: str | Path) -> Path:
    """Write ``OUTPUT_DIR/dataset_description.json`` atomically, unless identical content is there.

    Raises
    ------
    CannotCreateOutputError
        The folder already holds a dataset that nuclei-app did not make.
    """

    path = Path(output_dir) / "dataset_description.json"
    description = derivative_description(bids_dir)
    validate_instance(description, "derivative_description", path)
    if path.is_file():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            existing = None
        if existing == description:
            return path
        generated = existing.get("GeneratedBy") if isinstance(existing, dict) else None
        ours = isinstance(generated, list) and generated and isinstance(generated[0], dict) and generated[0].get("Name") == "nuclei-app"
        if not ours:
            raise CannotCreateOutputError(
                "OUTPUT_DIR already holds a dataset not made by nuclei-app; choose an empty or nuclei-app output folder", path
            )
    return atomic_write_json(path, description)


# ======================================================================================
# Inputs, outputs, selection
# ======================================================================================


def write_bidsignore(output_dir: str | Path) -> Path:
    """Add the lines of `BIDSIGNORE_LINES` missing from ``OUTPUT_DIR/.bidsignore``.

    Lines already there (the user's own included) are kept; nothing is written when every
    line is present, and the file is replaced atomically, so parallel jobs agree.
    """
    path = Path(output_dir) / ".bidsignore"
    try:
        existing = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        existing = []
    except (OSError, UnicodeDecodeError) as error:
        raise CannotCreateOutputError(f"cannot read .bidsignore ({error}); remove or repair it", path) from None
    missing = [line for line in BIDSIGNORE_LINES if line not in existing]
    if not missing:
        return path
    return atomic_write_text(path, "\n".join(existing + missing) + "\n")


def check_output_location(bids_dir: str | Path, output_dir: str | Path) -> None:
    """Refuse an output folder that is the input dataset or lies inside it (exit 64)."""
    source, target = Path(bids_dir).resolve(), Path(output_dir).resolve()
    if target == source or target.is_relative_to(source):
        raise UsageError(
            f"OUTPUT_DIR must not be BIDS_DIR or inside it ({source}); choose a folder outside the input dataset",
            output_dir,
        )
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise CannotCreateOutputError("OUTPUT_DIR exists and is not a folder; choose a folder path", output_dir)


@dataclass(frozen=True)
class DerivativePaths:
    """Where the derivatives of one slide go (all beside each other in the ``micr`` folder)."""

    folder: Path
    stem: str  # <entities>_desc-nuclei_<suffix>, the slide's BIDS name in reports
    store: Path
    sidecar: Path
    table: Path
    qc: Path


def derivative_paths(record: Any, output_dir: str | Path) -> DerivativePaths:
    """Derivative paths of a `SlideRecord`: the source entities plus ``desc-nuclei``."""

    folder = Path(output_dir) / record.relative_dir
    store_name = bids_derivative_name(record, DESC, record.suffix, ".ome.zarr")
    return DerivativePaths(
        folder=folder,
        stem=store_name[: -len(".ome.zarr")],
        store=folder / store_name,
        sidecar=folder / bids_derivative_name(record, DESC, record.suffix, ".json"),
        table=folder / bids_derivative_name(record, DESC, "objects", ".tsv"),
        qc=folder / bids_derivative_name(record, DESC, "qc", ".json"),
    )


def relative_source(record: Any) -> str:
    """The slide's path inside its BIDS dataset (POSIX form), as logs and sidecars name it."""
    return record.path.relative_to(record.bids_dir).as_posix()


def pixel_size_fields(record: Any) -> dict[str, Any]:
    """``PixelSize`` / ``PixelSizeUnits`` of the source (its inherited sidecars, else the file's metadata)."""
    size, unit = record.metadata.get("PixelSize"), record.metadata.get("PixelSizeUnits")
    if (
        isinstance(size, list) and 2 <= len(size) <= 3 and unit in ("mm", "um", "nm")
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        return {"PixelSize": [float(v) for v in size], "PixelSizeUnits": unit}

    try:
        with open_slide(record.path) as slide:
            measured = slide.pixel_size_um
    except NucleiAppError:
        measured = None
    if measured is None:
        log.warning("%s: no pixel size in its sidecars or metadata; the derivative sidecar has none", record.path)
        return {}
    return {"PixelSize": [float(measured[1]), float(measured[0])], "PixelSizeUnits": "um"}


def relative_path(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (POSIX form) when it lies inside it, else absolute."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())

