"""The BIDS App: ``nuclei-app run BIDS_DIR OUTPUT_DIR {train,participant,group}``.

Levels (BIDS Apps 1.0):

- ``train``: one dataset model learned from tiles of every selected slide, written to
  ``OUTPUT_DIR/models/<model-id>/`` and registered as ``latest`` in
  ``OUTPUT_DIR/models/index.json`` (schema ``models_index``).
- ``participant``: each selected slide segmented with that model (trained first when
  there is none, by exactly one of any number of parallel jobs: the others wait on
  ``OUTPUT_DIR/models/.train.lock``), then its QC. Per slide, beside the source's
  entities plus ``desc-nuclei``::

      sub-<l>/[ses-<l>/]micr/<entities>_desc-nuclei_<suffix>.ome.zarr   labels + nuclear channels
      sub-<l>/[ses-<l>/]micr/<entities>_desc-nuclei_<suffix>.json       sidecar (PixelSize, model...)
      sub-<l>/[ses-<l>/]micr/<entities>_desc-nuclei_objects.tsv (+.json)
      sub-<l>/[ses-<l>/]micr/<entities>_desc-nuclei_qc.json

  A slide that fails is recorded (``logs/failures/<name>.json``, schema ``slide_failure``,
  and the participant's log ``logs/sub-<label>.log``); the other slides go on, and the
  run ends with exit code 1 and a summary naming each failed slide.
- ``group``: ``group_qc.tsv``, ``group_qc.json``, ``report.html`` (`nuclei_app.report`) and
  ``group_failures.json`` (schema ``group_failures``).

Every level writes ``OUTPUT_DIR/dataset_description.json`` (schema
``derivative_description``; atomically and idempotently, so parallel jobs agree), a
``.bidsignore`` naming the outputs BIDS has no name for (`write_bidsignore`), and its
effective configuration to ``OUTPUT_DIR/logs/config-<level>-<time>-<pid>.json`` (a valid
``--config`` file). Every file is written under a temporary name and renamed when
complete, so parallel jobs into one output folder never see half-written files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from nuclei_app import __version__
from nuclei_app.config import RunConfig
from nuclei_app.errors import (
    BadDataError,
    CannotCreateOutputError,
    ExitCode,
    InvalidBIDSError,
    MissingInputError,
    NothingSelectedError,
    NucleiAppError,
    UnknownLevelError,
    UsageError,
)
from nuclei_app.progress import get_logger

__all__ = [
    "ANALYSIS_LEVELS",
    "DatasetModel",
    "DerivativePaths",
    "RunResult",
    "SlideOutcome",
    "SlidesFailedError",
    "TrainingPlan",
    "bids_app_argv",
    "build_run_config",
    "check_output_location",
    "container_info",
    "derivative_description",
    "derivative_paths",
    "latest_model",
    "plan_training_panel",
    "read_config_file",
    "read_label_arguments",
    "read_models_index",
    "run_bids_app",
    "select_slides",
    "write_bidsignore",
    "write_dataset_description",
]

log = get_logger("nuclei_app.bids_app")

ANALYSIS_LEVELS: tuple[str, ...] = ("train", "participant", "group")
DESC = "nuclei"
MODELS_DIR = "models"
MODELS_INDEX = "index.json"
TRAIN_LOCK = ".train.lock"
LOGS_DIR = "logs"
FAILURES_DIR = "failures"
GROUP_FAILURES = "group_failures.json"
DEFAULT_WORK_DIR = ".work"
DEFAULT_BIDS_VERSION = "1.9.0"
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
#: A training lock whose holder gave no sign of life for this long is taken over.
LOCK_STALE_SECONDS = 1800.0
LOCK_POLL_SECONDS = 2.0

#: Options of `run` that take no value; every other ``--option`` takes one.
RUN_FLAGS = frozenset({"--skip-bids-validation", "--resume", "--no-resume", "--help"})
LABEL_OPTIONS = frozenset({"--participant-label", "--session-label", "--sample-label"})
_LABEL_KINDS = {"participant_label": "participant", "session_label": "session", "sample_label": "sample"}


class SlidesFailedError(NucleiAppError):
    """Some slides failed while the others were processed (exit code 1)."""

    exit_code = ExitCode.FAILURE


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# ======================================================================================
# Command line: the bare BIDS-Apps form and label lists
# ======================================================================================


def _is_option(token: str) -> bool:
    return token.startswith("-") and len(token) > 1


def _positional_indices(args: Sequence[str]) -> list[int]:
    indices, index = [], 0
    while index < len(args):
        token = args[index]
        if token == "--":
            indices.extend(range(index + 1, len(args)))
            break
        if _is_option(token):
            index += 1 if ("=" in token or token in RUN_FLAGS) else 2
            continue
        indices.append(index)
        index += 1
    return indices


def _split_label_lists(args: Sequence[str]) -> list[str]:
    """``--participant-label 01 02`` -> ``--participant-label 01 --participant-label 02``.

    Only after BIDS_DIR OUTPUT_DIR LEVEL were given: then a bare word after a label option
    can only be another label (before them it could be a positional argument).
    """
    out: list[str] = []
    positionals, index = 0, 0
    while index < len(args):
        token = args[index]
        if token in LABEL_OPTIONS and index + 1 < len(args):
            out += [token, args[index + 1]]
            index += 2
            while positionals >= 3 and index < len(args) and not _is_option(args[index]):
                out += [token, args[index]]
                index += 1
            continue
        if _is_option(token):
            width = 1 if ("=" in token or token in RUN_FLAGS) else 2
            out += list(args[index : index + width])
            index += width
            continue
        positionals += 1
        out.append(token)
        index += 1
    return out


def bids_app_argv(args: Sequence[str], commands: Sequence[str]) -> list[str]:
    """Rewrite a command line into the typer form of `nuclei-app`.

    ``nuclei-app BIDS_DIR OUTPUT_DIR LEVEL ...`` (the BIDS-Apps form, the container's entry
    point) becomes ``nuclei-app run BIDS_DIR OUTPUT_DIR LEVEL ...`` when the first word is
    neither a subcommand nor an option and three positional arguments are present; an
    unknown LEVEL is then reported by `run` (exit 17). Space-separated label lists after a
    label option are split into repeated options.
    """
    args = [str(arg) for arg in args]
    if args and args[0] not in commands and not _is_option(args[0]) and len(_positional_indices(args)) >= 3:
        args = ["run", *args]
    if args and args[0] == "run":
        args = ["run", *_split_label_lists(args[1:])]
    return args


def read_label_arguments(values: str | Sequence[str] | None, kind: str) -> tuple[str, ...] | None:
    """Labels from option values: ``01``, ``sub-01``, ``"01 02"``, ``01,02``, ``@FILE`` or a FILE path.

    A file holds labels one per line (commas and spaces also separate; ``#`` starts a
    comment line). A value is read as a file when it starts with ``@``, or when it is not
    a label list and names an existing file.

    Returns
    -------
    tuple of str or None
        Labels without prefix, unique, in the given order; None when ``values`` is None.

    Raises
    ------
    UsageError
        An empty list or a malformed label (``..``, path separators, non-alphanumerics).
    MissingInputError
        ``@FILE`` does not exist or cannot be read.
    """
    from nuclei_app.discover import normalise_label

    if values is None:
        return None
    items = [values] if isinstance(values, str) else list(values)
    option = f"--{kind}-label"
    labels: list[str] = []
    for item in items:
        text = str(item).strip()
        source = None
        if text.startswith("@"):
            source = Path(text[1:])
        elif not re.fullmatch(r"[A-Za-z0-9,\s-]*", text) and Path(text).is_file():
            source = Path(text)
        if source is not None:
            try:
                content = source.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                reason = getattr(error, "strerror", None) or str(error)
                raise MissingInputError(f"cannot read the {option} file ({reason}); give a text file with one label per line", source) from None
            lines = [line for line in content.splitlines() if not line.strip().startswith("#")]
            pieces = [piece for line in lines for piece in re.split(r"[,\s]+", line) if piece]
            if not pieces:
                raise UsageError(f"the {option} file holds no label; write one label per line", source)
        else:
            pieces = [piece for piece in re.split(r"[,\s]+", text) if piece]
        labels.extend(normalise_label(piece, kind) for piece in pieces)
    if not labels:
        raise UsageError(f"{option} is empty; give a label such as 01 or leave the option out")
    return tuple(dict.fromkeys(labels))


# ======================================================================================
# Configuration
# ======================================================================================


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a ``--config`` file (JSON, or TOML when it ends in ``.toml``) and check it against ``run_config``.

    Raises
    ------
    MissingInputError
        The file does not exist or cannot be read (66).
    UsageError
        Not valid JSON/TOML, not a table/object, unknown keys or wrong types (64).
    """
    import tomllib

    from nuclei_app.schemas import schema_errors

    path = Path(path)
    if not path.is_file():
        raise MissingInputError("config file not found; check the path given to --config", path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise MissingInputError(f"cannot read the config file ({reason}); check its permissions and encoding", path) from None
    is_toml = path.suffix.lower() == ".toml"
    try:
        values = tomllib.loads(text) if is_toml else json.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as error:
        kind = "TOML" if is_toml else "JSON"
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(f"config file is not valid {kind} ({first_line}); fix its syntax", path) from None
    if not isinstance(values, dict):
        raise UsageError("config file must hold one object / table of settings", path)
    problems = schema_errors(values, "run_config")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UsageError(
            f"config does not match schema run_config: {problems[0]}{more}; "
            "see `nuclei-app schemas` for the allowed keys",
            path,
        )
    return values


def build_run_config(file_values: Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """The effective `RunConfig`: defaults, then the config file, then command-line values (None = not given).

    Label values are expanded (``@FILE``, lists, prefixes) by `read_label_arguments`.
    """
    merged: dict[str, Any] = dict(file_values or {})
    merged.update({key: value for key, value in (overrides or {}).items() if value is not None})
    known = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise UsageError(f"unknown run setting(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    for key, kind in _LABEL_KINDS.items():
        if key in merged:
            merged[key] = read_label_arguments(merged[key], kind)
    return RunConfig(**merged)


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
    from nuclei_app.atomic import atomic_write_json
    from nuclei_app.schemas import validate_instance

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


def write_bidsignore(output_dir: str | Path) -> Path:
    """Add the lines of `BIDSIGNORE_LINES` missing from ``OUTPUT_DIR/.bidsignore``.

    Lines already there (the user's own included) are kept; nothing is written when every
    line is present, and the file is replaced atomically, so parallel jobs agree.
    """
    from nuclei_app.atomic import atomic_write_text

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


# ======================================================================================
# Inputs, outputs, selection
# ======================================================================================


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
    from nuclei_app.discover import bids_derivative_name

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


def _relative_source(record: Any) -> str:
    return record.path.relative_to(record.bids_dir).as_posix()


def select_slides(bids_dir: str | Path, config: RunConfig) -> list[Any]:
    """The slides the filters of ``config`` select, sorted by path.

    Raises
    ------
    NothingSelectedError
        A participant label that does not exist, or filters that select no slide; the
        message lists the labels that do exist (18).
    """
    from nuclei_app.discover import discover

    everything = discover(bids_dir)
    participants = sorted({record.subject for record in everything})
    if config.participant_label:
        missing = [label for label in config.participant_label if label not in participants]
        if missing:
            raise NothingSelectedError(
                f"participant label(s) {', '.join(missing)} not found; available: {', '.join(participants) or 'none'}",
                bids_dir,
            )
    records = discover(bids_dir, config.participant_label, config.session_label, config.sample_label)
    if not records:
        if not everything:
            raise NothingSelectedError("the dataset holds no slide (sub-*/[ses-*/]micr/*_<suffix>.ome.tif|.ome.btf|.ome.zarr)", bids_dir)
        sessions = sorted({record.session for record in everything if record.session})
        samples = sorted({record.sample for record in everything})
        raise NothingSelectedError(
            "the filters select no slide; available participants: "
            f"{', '.join(participants)}; sessions: {', '.join(sessions) or 'none'}; samples: {', '.join(samples)}",
            bids_dir,
        )
    return records


def _fingerprint(path: Path) -> list[int]:
    """Cheap identity of a file or folder: total size, file count, newest modification (ns)."""
    if path.is_dir():
        size = count = newest = 0
        for root, _, names in os.walk(path):
            for name in names:
                stat = os.stat(os.path.join(root, name))
                size, count, newest = size + stat.st_size, count + 1, max(newest, stat.st_mtime_ns)
        return [size, count, newest]
    stat = path.stat()
    return [stat.st_size, 1, stat.st_mtime_ns]


def _hash(payload: Any, length: int = 32) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:length]


# ======================================================================================
# The dataset model: channel panel, training, index, lock
# ======================================================================================


@dataclass
class TrainingPlan:
    """Which selected slides one model can learn from, and on which nuclear channels.

    Attributes
    ----------
    records : list of SlideRecord
        Training slides: they all offer the same nuclear channel names.
    requested : str or None
        The channel request passed to training: the user's, or a stain group common to
        every slide (e.g. ``"dapi"`` for slides with DAPI and others with Hoechst).
    channel_names : list of str
        The channel names the model will learn.
    excluded : list of (SlideRecord, str)
        Selected slides left out of training and why (they are still segmented when the
        model's channels can be found in them, e.g. Hoechst for a DAPI model).
    """

    records: list[Any]
    requested: str | None
    channel_names: list[str]
    excluded: list[tuple[Any, str]] = field(default_factory=list)


def plan_training_panel(records: Sequence[Any], requested: str | None = None) -> TrainingPlan:
    """Pick the training slides and channels so that one dataset model covers as many slides as possible.

    Training needs the same nuclear stains in every input (by stain: DAPI and Hoechst are one,
    see `nuclei_app.read.stain_key`). When no channels are
    requested and the slides' automatic choices differ, the stain groups every slide offers
    (`nuclei_app.read.NUCLEAR_STAIN_ALIASES`, e.g. DAPI ~ Hoechst) are requested instead;
    the largest set of slides with identical names then trains the model (ties: the set
    whose first slide comes first).

    Raises
    ------
    BadDataError
        No slide offers a usable nuclear channel (the first slide's problem is named).
    """
    from nuclei_app.read import NUCLEAR_STAIN_ALIASES, open_slide, select_nuclear_channels, stain_key

    channels: dict[int, list[str]] = {}
    excluded: list[tuple[Any, str]] = []
    first_error: NucleiAppError | None = None
    for index, record in enumerate(records):
        try:
            with open_slide(record.path) as slide:
                channels[index] = list(slide.channel_names)
        except NucleiAppError as error:
            excluded.append((record, str(error)))
            first_error = first_error or error

    def chosen(index: int, request: str | None) -> tuple[str, ...] | None:
        try:
            picked = select_nuclear_channels(channels[index], request, records[index].path)
        except NucleiAppError:
            return None
        return tuple(channels[index][i] for i in picked)

    request = requested
    if request is None:
        automatic = {chosen(index, None) for index in channels}
        if len({None if names is None else tuple(stain_key(n) for n in names) for names in automatic}) > 1:
            common = [group for group in NUCLEAR_STAIN_ALIASES if all(chosen(index, group) for index in channels)]
            if common:
                request = ",".join(common)
    groups: dict[tuple[str, ...], list[int]] = {}
    for index in channels:
        names = chosen(index, request)
        if names is None:
            excluded.append((records[index], f"no nuclear channel matches {request or 'the known stain names'} in {channels[index]}"))
            continue
        groups.setdefault(tuple(stain_key(n) for n in names), []).append(index)
    if not groups:
        if first_error is not None:
            raise first_error
        raise BadDataError(
            f"no selected slide offers a nuclear channel ({request or 'automatic choice'}); pass --nuclear-channels NAME[,NAME]",
            records[0].path if records else None,
        )
    best = max(groups.values(), key=lambda members: (len(members), -members[0]))
    names = list(chosen(best[0], request) or ())
    for members in groups.values():
        if members is best:
            continue
        for index in members:
            excluded.append((records[index], f"its nuclear channels {list(chosen(index, request) or ())} differ from the training panel {names}"))
    excluded.sort(key=lambda item: str(item[0].path))
    return TrainingPlan([records[i] for i in best], request, names, excluded)


@dataclass(frozen=True)
class DatasetModel:
    """A model folder and its id (from its model card)."""

    model_id: str
    path: Path
    trained_now: bool = False


def _models_dir(output_dir: Path) -> Path:
    return output_dir / MODELS_DIR


def read_models_index(output_dir: str | Path) -> dict[str, Any]:
    """``OUTPUT_DIR/models/index.json`` (an empty index when absent or unreadable)."""
    path = _models_dir(Path(output_dir)) / MODELS_INDEX
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"latest": None, "models": []}
    if not isinstance(index, dict) or not isinstance(index.get("models"), list):
        return {"latest": None, "models": []}
    return index


def _model_at(path: Path, trained_now: bool = False) -> DatasetModel | None:
    from nuclei_app.model import MODEL_CARD_FILE, WEIGHTS_FILE

    try:
        card = json.loads((path / MODEL_CARD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(card, dict) or not isinstance(card.get("model_id"), str) or not (path / WEIGHTS_FILE).is_file():
        return None
    return DatasetModel(card["model_id"], path, trained_now)


def latest_model(output_dir: str | Path) -> DatasetModel | None:
    """The dataset model registered as ``latest`` in the models index, if it is complete."""
    latest = read_models_index(output_dir).get("latest")
    if not isinstance(latest, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", latest):
        return None
    return _model_at(_models_dir(Path(output_dir)) / latest)


def _register_model(output_dir: Path, entry: dict[str, Any]) -> None:
    from nuclei_app.atomic import atomic_write_json
    from nuclei_app.schemas import validate_instance

    index = read_models_index(output_dir)
    models = [m for m in index["models"] if isinstance(m, dict) and m.get("model_id") != entry["model_id"]]
    index = {"latest": entry["model_id"], "models": [*models, entry]}
    path = _models_dir(output_dir) / MODELS_INDEX
    validate_instance(index, "models_index", path)
    atomic_write_json(path, index)


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _try_lock(path: Path) -> bool:
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "pid_namespace": _pid_namespace(), "since": _now()}
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        json.dump(owner, handle)
    return True


def _lock_is_stale(path: Path, stale_after_s: float) -> bool:
    """True when the holder is a dead process of this host (same PID namespace) or silent too long."""
    try:
        modified = path.stat().st_mtime
        owner = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        owner = {}
    if (
        isinstance(owner, dict)
        and owner.get("host") == socket.gethostname()
        and owner.get("pid_namespace") == _pid_namespace() != ""
        and isinstance(owner.get("pid"), int)
        and not _process_alive(owner["pid"])
    ):
        return True
    return time.time() - modified > stale_after_s


@contextmanager
def _training_lock(
    models_dir: Path,
    finished: Callable[[], DatasetModel | None],
    poll_s: float = LOCK_POLL_SECONDS,
    stale_after_s: float = LOCK_STALE_SECONDS,
) -> Iterator[DatasetModel | None]:
    """Hold ``models/.train.lock`` (yield None) or yield the model another job finished meanwhile.

    Creating the lock with ``O_CREAT | O_EXCL`` is atomic on local and NFS v3+ file
    systems, so exactly one of many parallel jobs trains; the others poll until the
    model is registered. A lock left by a killed job is taken over (see `_lock_is_stale`).
    """
    lock = models_dir / TRAIN_LOCK
    models_dir.mkdir(parents=True, exist_ok=True)
    waiting = False
    while not _try_lock(lock):
        done = finished()
        if done is not None:
            yield done
            return
        if _lock_is_stale(lock, stale_after_s):
            log.warning("taking over the stale training lock %s (its job is gone)", lock)
            lock.unlink(missing_ok=True)
            continue
        if not waiting:
            log.info("another job is training the dataset model (lock %s); waiting for it", lock)
            waiting = True
        time.sleep(poll_s)
    try:
        yield None
    finally:
        lock.unlink(missing_ok=True)


def train_dataset_model(
    records: Sequence[Any], output_dir: str | Path, config: RunConfig, resume: bool | None = None
) -> DatasetModel:
    """Train one model on tiles of ``records`` into ``OUTPUT_DIR/models/<model-id>/`` and register it as latest.

    The model is trained into a staging folder and renamed to its id (a hash of its
    weights) when complete. With ``resume``, a registered model trained on the same slides
    (same fingerprints) with the same settings is reused instead. The caller holds the
    training lock.
    """
    from nuclei_app.train import train_model

    output_dir = Path(output_dir)
    resume = config.resume if resume is None else resume
    models_dir = _models_dir(output_dir)
    plan = plan_training_panel(records, config.nuclear_channels)
    for record, reason in plan.excluded:
        log.warning("not training on %s: %s", _relative_source(record), reason)
    training = config.training_config()
    key = _hash({
        "training": training.to_dict(),
        "channels": plan.requested,
        "slides": [[_relative_source(r), _fingerprint(r.path)] for r in plan.records],
        "version": __version__,
    })
    if resume:
        for entry in reversed(read_models_index(output_dir)["models"]):
            if isinstance(entry, dict) and entry.get("training_key") == key:
                model = _model_at(models_dir / str(entry.get("model_id")))
                if model is not None:
                    log.info("model %s was trained on the same slides and settings; reusing it (--no-resume retrains)", model.model_id)
                    _register_model(output_dir, {**entry, "created_at": entry.get("created_at", _now())})
                    return model
    staging = models_dir / f".staging-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    lock = models_dir / TRAIN_LOCK

    def say(line: str) -> None:
        log.info("%s", line)
        try:  # heartbeat: a lock that keeps being touched is not stale
            os.utime(lock)
        except OSError:
            pass

    log.info(
        "training the dataset model on %d slide(s), channels %s: %s",
        len(plan.records), plan.channel_names, ", ".join(_relative_source(r) for r in plan.records),
    )
    try:
        result = train_model([r.path for r in plan.records], staging, training, nuclear_channels=plan.requested, progress=say)
        model_id = result.card["model_id"]
        final = models_dir / model_id
        if _model_at(final) is not None:  # same weights trained before (training is deterministic)
            shutil.rmtree(staging, ignore_errors=True)
        else:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _register_model(output_dir, {
        "model_id": model_id,
        "path": f"{MODELS_DIR}/{model_id}",
        "created_at": _now(),
        "training_key": key,
        "slides": [_relative_source(r) for r in plan.records],
        "excluded_slides": [{"path": _relative_source(r), "reason": reason} for r, reason in plan.excluded],
        "nuclear_channels": plan.channel_names,
        "nuclear_channels_requested": plan.requested,
        "training_config": training.to_dict(),
    })
    log.info("dataset model %s -> %s", model_id, final)
    return DatasetModel(model_id, final, trained_now=True)


def _explicit_model(config: RunConfig) -> DatasetModel:
    path = Path(config.model)
    if not path.is_dir():
        raise MissingInputError("model folder not found; give a folder written by `nuclei-app train` or `run ... train`", path)
    model = _model_at(path)
    if model is None:
        raise MissingInputError("not a complete model folder (model_card.json + weights.pt); train one first", path)
    return model


def ensure_dataset_model(training_records: Sequence[Any], output_dir: str | Path, config: RunConfig) -> DatasetModel:
    """The model the participant level uses: ``--model``, the registered latest, or one trained now.

    Parallel jobs agree: only the job holding the training lock trains; the others wait
    for the model to be registered.
    """
    output_dir = Path(output_dir)
    if config.model:
        return _explicit_model(config)
    existing = latest_model(output_dir)
    if existing is not None:
        return existing
    with _training_lock(_models_dir(output_dir), lambda: latest_model(output_dir)) as finished:
        if finished is not None:
            return finished
        existing = latest_model(output_dir)  # registered between our check and the lock
        if existing is not None:
            return existing
        log.info("no dataset model in %s yet; training one first", _models_dir(output_dir))
        return train_dataset_model(training_records, output_dir, config)


# ======================================================================================
# Participant level
# ======================================================================================


@dataclass
class SlideOutcome:
    """What happened to one slide at the participant level.

    ``status`` is ``"ok"`` (segmented now), ``"reused"`` (complete from an earlier run) or
    ``"failed"`` (``error`` and ``exit_code`` say why).
    """

    source: str
    bids_name: str
    participant: str
    status: str
    paths: DerivativePaths
    n_nuclei: int | None = None
    qc_status: str | None = None
    error: str | None = None
    exit_code: int | None = None

    def line(self) -> str:
        if self.status == "failed":
            return f"{self.source}: FAILED (exit {self.exit_code}): {self.error}"
        verb = "reused" if self.status == "reused" else "segmented"
        return f"{self.bids_name}: {self.n_nuclei} nuclei, QC {self.qc_status} ({verb}) -> {self.paths.store}"


def _failure_path(output_dir: Path, stem: str) -> Path:
    return output_dir / LOGS_DIR / FAILURES_DIR / f"{stem}.json"


@contextmanager
def _log_to_file(path: Path) -> Iterator[Path]:
    """Also send the package's log records (segment, train, QC...) to ``path`` (appended)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"))
    logger = get_logger()
    previous = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(previous)


def _pixel_size_fields(record: Any) -> dict[str, Any]:
    """``PixelSize`` / ``PixelSizeUnits`` of the source (its inherited sidecars, else the file's metadata)."""
    size, unit = record.metadata.get("PixelSize"), record.metadata.get("PixelSizeUnits")
    if (
        isinstance(size, list) and 2 <= len(size) <= 3 and unit in ("mm", "um", "nm")
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        return {"PixelSize": [float(v) for v in size], "PixelSizeUnits": unit}
    from nuclei_app.read import open_slide

    try:
        with open_slide(record.path) as slide:
            measured = slide.pixel_size_um
    except NucleiAppError:
        measured = None
    if measured is None:
        log.warning("%s: no pixel size in its sidecars or metadata; the derivative sidecar has none", record.path)
        return {}
    return {"PixelSize": [float(measured[1]), float(measured[0])], "PixelSizeUnits": "um"}


def _slide_complete(paths: DerivativePaths, resume_key: str) -> dict[str, Any] | None:
    from nuclei_app.segment import RUN_RECORD_NAME

    try:
        sidecar = json.loads(paths.sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    complete = (
        isinstance(sidecar, dict) and sidecar.get("ResumeKey") == resume_key
        and (paths.store / RUN_RECORD_NAME).is_file() and paths.table.is_file() and paths.qc.is_file()
    )
    return sidecar if complete else None


def _relative_to(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def process_slide(
    record: Any,
    output_dir: str | Path,
    model: DatasetModel,
    config: RunConfig,
    work_dir: Path,
    dask_scheduler: str | None = None,
    run_config_path: Path | None = None,
) -> SlideOutcome:
    """Segment one slide, compute its QC and write its sidecar (last: it marks the slide complete).

    Raises whatever `segment_slide` / `write_qc_report` raise; the caller decides whether
    the run goes on.
    """
    from nuclei_app.atomic import atomic_write_json
    from nuclei_app.qc import write_qc_report
    from nuclei_app.schemas import validate_instance
    from nuclei_app.segment import PredictorSpec, read_run_record, segment_slide

    output_dir = Path(output_dir)
    paths = derivative_paths(record, output_dir)
    source = _relative_source(record)
    parameters = {
        "tile": config.tile,
        "overlap": config.overlap,
        "batch_size": config.batch_size,
        "nuclear_channels": config.nuclear_channels,
        "qc_config": None if config.qc_config is None else [config.qc_config, _fingerprint(Path(config.qc_config))],
    }
    resume_key = _hash({
        "source": source, "fingerprint": _fingerprint(record.path), "model": model.model_id,
        "parameters": parameters, "version": __version__,
    })
    outcome = SlideOutcome(source, paths.stem, record.subject, "ok", paths)
    if config.resume:
        done = _slide_complete(paths, resume_key)
        if done is not None:
            log.info("%s: complete from an earlier run with the same inputs; skipping (--no-resume redoes it)", source)
            outcome.status, outcome.n_nuclei, outcome.qc_status = "reused", done["NumberOfNuclei"], done["QCStatus"]
            _failure_path(output_dir, paths.stem).unlink(missing_ok=True)
            return outcome
    log.info("%s: segmenting with model %s", source, model.model_id)
    paths.folder.mkdir(parents=True, exist_ok=True)
    spec = PredictorSpec("model", model_dir=str(model.path), device=config.device)
    segmentation = segment_slide(
        record.path, paths.store, spec, tile=config.tile, overlap=config.overlap, batch_size=config.batch_size,
        nuclear_channels=config.nuclear_channels, table_path=paths.table, nprocs=config.nprocs,
        dask_scheduler=dask_scheduler, resume=config.resume, work_dir=work_dir / paths.stem, progress=True,
    )
    for warning in segmentation.warnings:
        log.warning("%s: %s", source, warning)
    qc = write_qc_report(
        paths.store, record.path, paths.qc, table_path=paths.table,
        nuclear_channels=segmentation.nuclear_channels, config_path=config.qc_config, device=config.device,
    )
    record_json = read_run_record(paths.store) or {}
    sidecar: dict[str, Any] = {
        "Description": "Nuclei segmented by nuclei-app: labels/nuclei is the flattened instance view (uint32), "
                       "labels/nuclei_layer-<k> hold every nucleus's full mask (overlapping nuclei in different layers); "
                       "the image holds the nuclear channels the model saw.",
        "Sources": [f"bids:raw:{source}"],
        **_pixel_size_fields(record),
        "GeneratedBy": {"Name": "nuclei-app", "Version": __version__},
        "ModelID": model.model_id,
        "Model": _relative_to(model.path, output_dir),
        "NuclearChannels": list(segmentation.nuclear_channels),
        "NumberOfNuclei": int(segmentation.n_nuclei),
        "NumberOfOverlapLayers": int(segmentation.n_layers),
        "ObjectsTable": paths.table.name,
        "QCReport": paths.qc.name,
        "QCStatus": qc.status,
        "SegmentationCompletedAt": record_json.get("completed_at"),
        "Parameters": parameters,
        "ResumeKey": resume_key,
    }
    if run_config_path is not None:
        sidecar["RunConfig"] = _relative_to(run_config_path, output_dir)
    validate_instance(sidecar, "derivative_sidecar", paths.sidecar)
    atomic_write_json(paths.sidecar, sidecar)
    _failure_path(output_dir, paths.stem).unlink(missing_ok=True)
    outcome.n_nuclei, outcome.qc_status = int(segmentation.n_nuclei), qc.status
    log.info("%s: %d nuclei, QC %s", source, outcome.n_nuclei, outcome.qc_status)
    return outcome


def _append_traceback(log_path: Path) -> None:
    try:
        with open(log_path, "a", encoding="utf-8") as handle:
            handle.write(traceback.format_exc())
    except OSError:
        pass


def _record_failure(output_dir: Path, outcome: SlideOutcome, error: BaseException, log_path: Path) -> None:
    from nuclei_app.atomic import atomic_write_json
    from nuclei_app.schemas import validate_instance

    payload = {
        "slide": outcome.source,
        "bids_name": outcome.paths.qc.name[: -len(f"_desc-{DESC}_qc.json")],  # as in group_qc.tsv
        "participant": outcome.participant,
        "level": "participant",
        "exit_code": int(outcome.exit_code or 1),
        "error": outcome.error or type(error).__name__,
        "error_type": type(error).__name__,
        "failed_at": _now(),
        "log": _relative_to(log_path, output_dir),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    path = _failure_path(output_dir, outcome.bids_name)
    validate_instance(payload, "slide_failure", path)
    atomic_write_json(path, payload)


@contextmanager
def _dask_scheduler(config: RunConfig) -> Iterator[str | None]:
    """The scheduler address tiles go to: ``--dask-scheduler``, a local cluster of ``--nprocs``
    workers sharing ``--mem`` (one cluster for all the run's slides), or None (in-process)."""
    if config.dask_scheduler or config.nprocs <= 1:
        yield config.dask_scheduler
        return
    from distributed import LocalCluster

    logging.getLogger("distributed").setLevel(logging.WARNING)
    limit = config.memory_limit_bytes
    cluster = LocalCluster(
        n_workers=config.nprocs, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
        memory_limit=(limit // config.nprocs) if limit else "auto",
    )
    try:
        yield cluster.scheduler_address
    finally:
        cluster.close()


#: Errors after which the next slide would fail too (disk full, ...): the run stops.
_FATAL_EXIT_CODES = frozenset({ExitCode.IO_ERROR})


def run_participant_level(
    records: Sequence[Any],
    output_dir: Path,
    model: DatasetModel,
    config: RunConfig,
    work_dir: Path,
    run_config_path: Path | None = None,
) -> list[SlideOutcome]:
    """Process every slide, participant by participant, each logged to ``logs/sub-<label>.log``.

    A slide that fails is logged and recorded (``logs/failures/<name>.json``) and the next
    slide is processed; only an I/O error (e.g. a full disk) stops the run.
    """
    outcomes: list[SlideOutcome] = []
    subjects = list(dict.fromkeys(record.subject for record in records))
    with _dask_scheduler(config) as scheduler:
        for subject in subjects:
            log_path = output_dir / LOGS_DIR / f"sub-{subject}.log"
            with _log_to_file(log_path):
                log.info("participant %s: %s %s (pid %d on %s)", subject, "nuclei-app", __version__, os.getpid(), socket.gethostname())
                for record in (r for r in records if r.subject == subject):
                    try:
                        outcomes.append(process_slide(record, output_dir, model, config, work_dir, scheduler, run_config_path))
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except BaseException as error:  # noqa: BLE001 - recorded, then the other slides go on
                        paths = derivative_paths(record, output_dir)
                        failed = SlideOutcome(_relative_source(record), paths.stem, subject, "failed", paths)
                        failed.exit_code = int(error.exit_code) if isinstance(error, NucleiAppError) else int(ExitCode.FAILURE)
                        failed.error = str(error).splitlines()[0] if str(error) else type(error).__name__
                        if isinstance(error, NucleiAppError):
                            log.error("%s failed: %s", failed.source, failed.error)
                        else:  # a bug, not bad input: one line here, the traceback in the participant's log
                            log.error("%s failed with an unexpected %s: %s (traceback in %s)", failed.source,
                                      type(error).__name__, failed.error, log_path)
                            _append_traceback(log_path)
                        _record_failure(output_dir, failed, error, log_path)
                        outcomes.append(failed)
                        if isinstance(error, NucleiAppError) and error.exit_code in _FATAL_EXIT_CODES:
                            log.error("stopping: the remaining slides would fail the same way")
                            raise
    return outcomes


# ======================================================================================
# Group level
# ======================================================================================


def run_group_level(records: Sequence[Any], output_dir: Path) -> tuple[Any, list[dict[str, Any]]]:
    """Group QC report of the selected slides, and ``group_failures.json``.

    Returns the `nuclei_app.report.GroupReport` (None when every selected slide failed)
    and the failure records of the selected slides.

    Raises
    ------
    NothingSelectedError
        No selected slide has a QC report or a failure record (run the participant level).
    """
    from nuclei_app.atomic import atomic_write_json
    from nuclei_app.report import write_group_report
    from nuclei_app.schemas import validate_instance

    reports, failures, not_processed = [], [], []
    for record in records:
        paths = derivative_paths(record, output_dir)
        failure_path = _failure_path(output_dir, paths.stem)
        if paths.qc.is_file():
            reports.append(paths.qc)
        elif failure_path.is_file():
            try:
                failures.append(json.loads(failure_path.read_text(encoding="utf-8")))
            except (OSError, ValueError) as error:
                raise BadDataError(f"cannot read the failure record ({error}); delete it and rerun the participant level", failure_path) from None
        else:
            not_processed.append(_relative_source(record))
    if not reports and not failures:
        raise NothingSelectedError(
            "no selected slide has a QC report yet; run the participant level first", output_dir
        )
    for source in not_processed:
        log.warning("%s has no result yet; run the participant level for it", source)
    summary = {
        "created_at": _now(),
        "software": {"name": "nuclei-app", "version": __version__},
        "n_selected": len(records),
        "n_reported": len(reports),
        "failures": failures,
        "not_processed": not_processed,
    }
    validate_instance(summary, "group_failures", output_dir / GROUP_FAILURES)
    atomic_write_json(output_dir / GROUP_FAILURES, summary)
    group = write_group_report(reports, output_dir) if reports else None
    return group, failures


# ======================================================================================
# One run
# ======================================================================================


@dataclass
class RunResult:
    """What `run_bids_app` did.

    Attributes
    ----------
    level : str
    output_dir : Path
    config : RunConfig
        The effective configuration (also written to ``config_path``).
    config_path : Path
    model : DatasetModel or None
        The dataset model trained or used (train, participant).
    slides : list of SlideOutcome
        Participant level: one per selected slide.
    group : nuclei_app.report.GroupReport or None
        Group level.
    failures : list of dict
        Failure records (schema ``slide_failure``) of this run (participant) or of the
        selected slides (group).
    """

    level: str
    output_dir: Path
    config: RunConfig
    config_path: Path
    model: DatasetModel | None = None
    slides: list[SlideOutcome] = field(default_factory=list)
    group: Any = None
    failures: list[dict[str, Any]] = field(default_factory=list)

    def lines(self) -> list[str]:
        """Human-readable summary."""
        out = []
        if self.model is not None:
            how = "trained" if self.model.trained_now else "using"
            out.append(f"{how} model {self.model.model_id} -> {self.model.path}")
        out.extend(outcome.line() for outcome in self.slides)
        if self.group is not None:
            counts = self.group.summary["status_counts"]
            out.append(
                f"group report: {self.group.html} ({self.group.summary['n_slides']} slide(s): "
                f"{counts['pass']} pass, {counts['warn']} warn, {counts['fail']} fail; "
                f"{self.group.summary['n_outliers']} outlier(s)); table {self.group.tsv}"
            )
        for failure in self.failures if self.level == "group" else []:
            out.append(f"{failure['slide']}: FAILED at the participant level (exit {failure['exit_code']}): {failure['error']}")
        out.append(f"configuration: {self.config_path}")
        return out

    def raise_for_failures(self) -> None:
        """Raise `SlidesFailedError` (exit 1) naming each failed slide, if any failed."""
        if not self.failures:
            return
        named = "; ".join(f"{f['slide']} (exit {f['exit_code']}: {f['error']})" for f in self.failures)
        logs = self.output_dir / LOGS_DIR
        raise SlidesFailedError(
            f"{len(self.failures)} slide(s) failed: {named}; details in {logs}/sub-<label>.log and {logs}/{FAILURES_DIR}/"
        )


def _write_run_config(output_dir: Path, level: str, config: RunConfig) -> Path:
    from nuclei_app.atomic import atomic_write_json
    from nuclei_app.schemas import validate_instance

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    path = output_dir / LOGS_DIR / f"config-{level}-{stamp}-{os.getpid()}.json"
    values = config.to_dict()
    validate_instance(values, "run_config", path)
    return atomic_write_json(path, values)


def _validate_input(bids_dir: Path) -> None:
    from nuclei_app.validate import validate_dataset

    report = validate_dataset(bids_dir)
    if not report.valid:
        for line in report.lines():
            log.error("%s", line)
        raise InvalidBIDSError(
            f"{report.summary()}; fix the problems listed above, or pass --skip-bids-validation", bids_dir
        )


def run_bids_app(
    bids_dir: str | Path,
    output_dir: str | Path,
    analysis_level: str,
    config: RunConfig | None = None,
) -> RunResult:
    """Run one analysis level of the BIDS App.

    Parameters
    ----------
    bids_dir : path
        The input BIDS microscopy dataset (read only).
    output_dir : path
        The BIDS derivative dataset to write (not the input, nor inside it).
    analysis_level : {"train", "participant", "group"}
    config : RunConfig, optional
        Filters and settings (defaults: every slide, tiny preset, resume on).

    Returns
    -------
    RunResult
        Call ``raise_for_failures()`` to turn failed slides into exit code 1.

    Raises
    ------
    UnknownLevelError (17), MissingInputError (66), UsageError (64),
    InvalidBIDSError (16), NothingSelectedError (18), CannotCreateOutputError (73),
    and the errors of training (65, 66, ...).
    """
    config = config or RunConfig()
    if analysis_level not in ANALYSIS_LEVELS:
        raise UnknownLevelError(
            f"unknown analysis level {analysis_level!r}; choose one of {', '.join(ANALYSIS_LEVELS)}"
        )
    bids_dir, output_dir = Path(bids_dir), Path(output_dir)
    if not bids_dir.is_dir():
        what = "is not a folder" if bids_dir.exists() else "does not exist"
        raise MissingInputError(f"BIDS_DIR {what}; give the root folder of a BIDS dataset", bids_dir)
    check_output_location(bids_dir, output_dir)
    if config.model and analysis_level != "participant":
        raise UsageError(f"--model is for the participant level; the {analysis_level} level does not use it")
    if config.model:
        _explicit_model(config)
    if not config.skip_bids_validation:
        _validate_input(bids_dir)
    records = select_slides(bids_dir, config)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CannotCreateOutputError(f"cannot create OUTPUT_DIR ({error.strerror}); choose a writable folder", output_dir) from None
    write_dataset_description(output_dir, bids_dir)
    write_bidsignore(output_dir)
    config_path = _write_run_config(output_dir, analysis_level, config)
    result = RunResult(analysis_level, output_dir, config, config_path)

    if analysis_level == "group":
        with _log_to_file(output_dir / LOGS_DIR / "group.log"):
            result.group, result.failures = run_group_level(records, output_dir)
        return result

    if analysis_level == "train":
        with _log_to_file(output_dir / LOGS_DIR / "train.log"):
            with _training_lock(_models_dir(output_dir), lambda: None):
                result.model = train_dataset_model(records, output_dir, config)
        return result

    default_work = config.work_dir is None
    work_dir = output_dir / DEFAULT_WORK_DIR if default_work else Path(config.work_dir)
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CannotCreateOutputError(f"cannot create the work folder ({error.strerror}); pass a writable --work-dir", work_dir) from None
    with _log_to_file(output_dir / LOGS_DIR / "train.log"):
        # the dataset model learns from every slide of the dataset (the session and sample
        # filters apply, the participant filter does not), so all parallel jobs share one
        from nuclei_app.discover import discover

        training_records = discover(bids_dir, None, config.session_label, config.sample_label) or records
        result.model = ensure_dataset_model(training_records, output_dir, config)
    result.slides = run_participant_level(records, output_dir, result.model, config, work_dir, config_path)
    if default_work:
        try:
            work_dir.rmdir()  # only when empty: other jobs may still be using it
        except OSError:
            pass
    failure_records = []
    for outcome in result.slides:
        if outcome.status == "failed":
            failure_records.append({"slide": outcome.source, "exit_code": outcome.exit_code, "error": outcome.error})
    result.failures = failure_records
    return result
