"""The dataset model: training plan, lock so one job trains, the models index."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from nuclei_app import __version__
from nuclei_app.config import RunConfig
from nuclei_app.errors import (
    BadDataError,
    MissingInputError,
    NucleiAppError,
)
from nuclei_app.bids_app.derivatives import relative_source
from nuclei_app.progress import get_logger
from nuclei_app.provenance import utc_timestamp
from nuclei_app.core.channels import NUCLEAR_STAIN_ALIASES, select_nuclear_channels, stain_key
from nuclei_app.io.slides import open_slide
from nuclei_app.atomic import atomic_write_json
from nuclei_app.schemas import validate_instance
from nuclei_app.bids_app.derivatives import MODELS_DIR

log = get_logger("nuclei_app.bids_app")




MODELS_INDEX = "index.json"


TRAIN_LOCK = ".train.lock"


#: A training lock whose holder gave no sign of life for this long is taken over.
LOCK_STALE_SECONDS = 1800.0


LOCK_POLL_SECONDS = 2.0


def file_fingerprint(path: Path) -> list[int]:
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


def short_hash(payload: Any, length: int = 32) -> str:
    """The first ``length`` hex digits of the sha256 of ``payload`` as sorted JSON."""
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


def models_folder(output_dir: Path) -> Path:
    """``OUTPUT_DIR/models``: where dataset models and their index live."""
    return output_dir / MODELS_DIR


def read_models_index(output_dir: str | Path) -> dict[str, Any]:
    """``OUTPUT_DIR/models/index.json`` (an empty index when absent or unreadable)."""
    path = models_folder(Path(output_dir)) / MODELS_INDEX
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"latest": None, "models": []}
    if not isinstance(index, dict) or not isinstance(index.get("models"), list):
        return {"latest": None, "models": []}
    return index


def _model_at(path: Path, trained_now: bool = False) -> DatasetModel | None:
    from nuclei_app.model.checkpoint import MODEL_CARD_FILE, WEIGHTS_FILE

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
    return _model_at(models_folder(Path(output_dir)) / latest)


def _register_model(output_dir: Path, entry: dict[str, Any]) -> None:

    index = read_models_index(output_dir)
    models = [m for m in index["models"] if isinstance(m, dict) and m.get("model_id") != entry["model_id"]]
    index = {"latest": entry["model_id"], "models": [*models, entry]}
    path = models_folder(output_dir) / MODELS_INDEX
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
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "pid_namespace": _pid_namespace(), "since": utc_timestamp()}
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
def training_lock(
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
    from nuclei_app.train.loop import train_model

    output_dir = Path(output_dir)
    resume = config.segment.resume if resume is None else resume
    models_dir = models_folder(output_dir)
    plan = plan_training_panel(records, config.segment.nuclear_channels)
    for record, reason in plan.excluded:
        log.warning("not training on %s: %s", relative_source(record), reason)
    training = config.training_config()
    key = short_hash({
        "training": training.to_dict(),
        "channels": plan.requested,
        "slides": [[relative_source(r), file_fingerprint(r.path)] for r in plan.records],
        "version": __version__,
    })
    if resume:
        for entry in reversed(read_models_index(output_dir)["models"]):
            if isinstance(entry, dict) and entry.get("training_key") == key:
                model = _model_at(models_dir / str(entry.get("model_id")))
                if model is not None:
                    log.info("model %s was trained on the same slides and settings; reusing it (--no-resume retrains)", model.model_id)
                    _register_model(output_dir, {**entry, "created_at": entry.get("created_at", utc_timestamp())})
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
        len(plan.records), plan.channel_names, ", ".join(relative_source(r) for r in plan.records),
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
        "created_at": utc_timestamp(),
        "training_key": key,
        "slides": [relative_source(r) for r in plan.records],
        "excluded_slides": [{"path": relative_source(r), "reason": reason} for r, reason in plan.excluded],
        "nuclear_channels": plan.channel_names,
        "nuclear_channels_requested": plan.requested,
        "training_config": training.to_dict(),
    })
    log.info("dataset model %s -> %s", model_id, final)
    return DatasetModel(model_id, final, trained_now=True)


def explicit_model(config: RunConfig) -> DatasetModel:
    """The model folder ``--model`` names.

    Raises
    ------
    MissingInputError (66)
        Not a folder, or not a complete model folder.
    """
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
        return explicit_model(config)
    existing = latest_model(output_dir)
    if existing is not None:
        return existing
    with training_lock(models_folder(output_dir), lambda: latest_model(output_dir)) as finished:
        if finished is not None:
            return finished
        existing = latest_model(output_dir)  # registered between our check and the lock
        if existing is not None:
            return existing
        log.info("no dataset model in %s yet; training one first", models_folder(output_dir))
        return train_dataset_model(training_records, output_dir, config)

