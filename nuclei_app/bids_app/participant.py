"""The participant level: segment and QC each slide, record failures."""
from __future__ import annotations

import json
import logging
import os
import socket
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

from nuclei_app import __version__
from nuclei_app.atomic import atomic_write_json
from nuclei_app.bids_app.derivatives import (
    DESC,
    DerivativePaths,
    derivative_paths,
    pixel_size_fields,
    relative_path,
    relative_source,
)
from nuclei_app.bids_app.models import DatasetModel, file_fingerprint, short_hash
from nuclei_app.config import RunConfig
from nuclei_app.errors import ExitCode, NucleiAppError
from nuclei_app.progress import get_logger
from nuclei_app.provenance import utc_timestamp
from nuclei_app.qc.group_report import read_qc_report
from nuclei_app.schemas import validate_instance
from nuclei_app.segment.executors import DaskCluster, dask_cluster
from nuclei_app.segment.predictors import PredictorSpec
from nuclei_app.segment.record import RUN_RECORD_NAME, SegmentationResult, read_run_record
from nuclei_app.workflows import segment_then_qc

log = get_logger("nuclei_app.bids_app")


LOGS_DIR = "logs"


FAILURES_DIR = "failures"


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
        """One line of the run's summary."""
        if self.status == "failed":
            return f"{self.source}: FAILED (exit {self.exit_code}): {self.error}"
        verb = "reused" if self.status == "reused" else "segmented"
        return f"{self.bids_name}: {self.n_nuclei} nuclei, QC {self.qc_status} ({verb}) -> {self.paths.store}"


def failure_record_path(output_dir: Path, stem: str) -> Path:
    """``OUTPUT_DIR/logs/failures/<stem>.json``: the failure record of one slide."""
    return output_dir / LOGS_DIR / FAILURES_DIR / f"{stem}.json"


@contextmanager
def log_to_file(path: Path) -> Iterator[Path]:
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


def _slide_complete(paths: DerivativePaths, resume_key: str) -> dict[str, Any] | None:
    """The slide's sidecar when its derivatives are complete and current, else None (redo it).

    Current includes a QC report the group level can read: one written before the report
    gained fields (same app version, older code) is redone rather than reused.
    """
    try:
        sidecar = json.loads(paths.sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    complete = (
        isinstance(sidecar, dict) and sidecar.get("ResumeKey") == resume_key
        and (paths.store / RUN_RECORD_NAME).is_file() and paths.table.is_file() and paths.qc.is_file()
    )
    if not complete:
        return None
    try:
        read_qc_report(paths.qc)
    except NucleiAppError:
        return None
    return sidecar


def slide_parameters(config: RunConfig) -> dict[str, Any]:
    """The settings that change a slide's derivatives (its sidecar's ``Parameters``, part of its resume key)."""
    segment = config.segment
    parameters: dict[str, Any] = {
        "tile": segment.tile,
        "overlap": segment.overlap,
        "batch_size": segment.batch_size,
        "nuclear_channels": segment.nuclear_channels,
        "qc_config": None if config.qc_config is None else [config.qc_config, file_fingerprint(Path(config.qc_config))],
    }
    if segment.score_threshold is not None:  # absent when unset, so earlier resume keys still match
        parameters["score_threshold"] = segment.score_threshold
    return parameters


def process_slide(
    record: Any,
    output_dir: str | Path,
    model: DatasetModel,
    config: RunConfig,
    work_dir: Path,
    cluster: DaskCluster | None = None,
    run_config_path: Path | None = None,
) -> SlideOutcome:
    """Segment one slide, compute its QC and write its sidecar (last: it marks the slide complete).

    Parameters
    ----------
    record : SlideRecord
        The slide (`nuclei_app.bids.discover`).
    output_dir : str or Path
        The derivative dataset.
    model : DatasetModel
        The model that segments it.
    config : RunConfig
        The run's settings (``config.segment`` is how the slide is segmented).
    work_dir : Path
        The run's work folder (the slide's tile cache is ``work_dir/<slide name>``).
    cluster : DaskCluster, optional
        The run's Dask cluster (None: in this process).
    run_config_path : Path, optional
        The run's recorded configuration, named in the sidecar.

    Returns
    -------
    SlideOutcome

    Raises
    ------
    Whatever `nuclei_app.workflows.segment_then_qc` raises; the caller decides whether the run goes on.
    """

    output_dir = Path(output_dir)
    paths = derivative_paths(record, output_dir)
    source = relative_source(record)
    parameters = slide_parameters(config)
    resume_key = short_hash({
        "source": source, "fingerprint": file_fingerprint(record.path), "model": model.model_id,
        "parameters": parameters, "version": __version__,
    })
    outcome = SlideOutcome(source, paths.stem, record.subject, "ok", paths)
    if config.segment.resume:
        done = _slide_complete(paths, resume_key)
        if done is not None:
            log.info("%s: complete from an earlier run with the same inputs; skipping (--no-resume redoes it)", source)
            outcome.status, outcome.n_nuclei, outcome.qc_status = "reused", done["NumberOfNuclei"], done["QCStatus"]
            failure_record_path(output_dir, paths.stem).unlink(missing_ok=True)
            return outcome
    log.info("%s: segmenting with model %s", source, model.model_id)
    paths.folder.mkdir(parents=True, exist_ok=True)
    done_now = segment_then_qc(
        record.path, paths.store, PredictorSpec("model", model_dir=str(model.path)),
        replace(config.segment, work_dir=str(work_dir / paths.stem)),
        table_path=paths.table, qc_path=paths.qc, qc_config=config.qc_config, cluster=cluster, progress=True,
    )
    segmentation, qc = done_now.segmentation, done_now.qc
    for warning in segmentation.warnings:
        log.warning("%s: %s", source, warning)
    sidecar = _sidecar(record, output_dir, model, segmentation, paths, qc.status, parameters, resume_key)
    if run_config_path is not None:
        sidecar["RunConfig"] = relative_path(run_config_path, output_dir)
    validate_instance(sidecar, "derivative_sidecar", paths.sidecar)
    atomic_write_json(paths.sidecar, sidecar)
    failure_record_path(output_dir, paths.stem).unlink(missing_ok=True)
    outcome.n_nuclei, outcome.qc_status = int(segmentation.n_nuclei), qc.status
    log.info("%s: %d nuclei, QC %s", source, outcome.n_nuclei, outcome.qc_status)
    return outcome


def _sidecar(
    record: Any,
    output_dir: Path,
    model: DatasetModel,
    segmentation: SegmentationResult,
    paths: DerivativePaths,
    qc_status: str,
    parameters: dict[str, Any],
    resume_key: str,
) -> dict[str, Any]:
    """The JSON sidecar of a slide's segmentation (schema ``derivative_sidecar``)."""
    record_json = read_run_record(paths.store) or {}
    return {
        "Description": "Nuclei segmented by nuclei-app: labels/nuclei is the flattened instance view (uint32), "
                       "labels/nuclei_layer-<k> hold every nucleus's full mask (overlapping nuclei in different layers); "
                       "the image holds the nuclear channels the model saw.",
        "Sources": [f"bids:raw:{relative_source(record)}"],
        **pixel_size_fields(record),
        "GeneratedBy": {"Name": "nuclei-app", "Version": __version__},
        "ModelID": model.model_id,
        "Model": relative_path(model.path, output_dir),
        "NuclearChannels": list(segmentation.nuclear_channels),
        "NumberOfNuclei": int(segmentation.n_nuclei),
        "NumberOfOverlapLayers": int(segmentation.n_layers),
        "ObjectsTable": paths.table.name,
        "QCReport": paths.qc.name,
        "QCStatus": qc_status,
        "SegmentationCompletedAt": record_json.get("completed_at"),
        "Parameters": parameters,
        "ResumeKey": resume_key,
    }


def _append_traceback(log_path: Path) -> None:
    try:
        with open(log_path, "a", encoding="utf-8") as handle:
            handle.write(traceback.format_exc())
    except OSError:
        pass


def _record_failure(output_dir: Path, outcome: SlideOutcome, error: BaseException, log_path: Path) -> None:

    payload = {
        "slide": outcome.source,
        "bids_name": outcome.paths.qc.name[: -len(f"_desc-{DESC}_qc.json")],  # as in group_qc.tsv
        "participant": outcome.participant,
        "level": "participant",
        "exit_code": int(outcome.exit_code or 1),
        "error": outcome.error or type(error).__name__,
        "error_type": type(error).__name__,
        "failed_at": utc_timestamp(),
        "log": relative_path(log_path, output_dir),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    path = failure_record_path(output_dir, outcome.bids_name)
    validate_instance(payload, "slide_failure", path)
    atomic_write_json(path, payload)


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
    with dask_cluster(config.segment) as cluster:  # one cluster for all the run's slides
        for subject in subjects:
            log_path = output_dir / LOGS_DIR / f"sub-{subject}.log"
            with log_to_file(log_path):
                log.info("participant %s: %s %s (pid %d on %s)", subject, "nuclei-app", __version__, os.getpid(), socket.gethostname())
                for record in (r for r in records if r.subject == subject):
                    try:
                        outcomes.append(process_slide(record, output_dir, model, config, work_dir, cluster, run_config_path))
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except BaseException as error:  # noqa: BLE001 - recorded, then the other slides go on
                        paths = derivative_paths(record, output_dir)
                        failed = SlideOutcome(relative_source(record), paths.stem, subject, "failed", paths)
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

