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
``derivative_description``; atomically and idempotently, so parallel jobs agree) and its
effective configuration to ``OUTPUT_DIR/logs/config-<level>-<time>-<pid>.json`` (a valid
``--config`` file). Every file is written under a temporary name and renamed when
complete, so parallel jobs into one output folder never see half-written files.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from nuclei_app.provenance import utc_compact_timestamp, utc_timestamp
from pathlib import Path
from typing import Any, Sequence
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
from nuclei_app.bids_app.derivatives import relative_source, check_output_location, derivative_paths, write_dataset_description
from nuclei_app.bids_app.models import DatasetModel, explicit_model, models_folder, training_lock, ensure_dataset_model, train_dataset_model
from nuclei_app.bids_app.participant import FAILURES_DIR, LOGS_DIR, SlideOutcome, failure_record_path, log_to_file, run_participant_level
from nuclei_app.bids_app.settings import ANALYSIS_LEVELS
from nuclei_app.bids.discover import discover
from nuclei_app.atomic import atomic_write_json
from nuclei_app.qc.group_report import write_group_report
from nuclei_app.schemas import validate_instance
from nuclei_app.bids.validate import validate_dataset
from nuclei_app.bids_app.derivatives import GROUP_FAILURES
from nuclei_app.bids_app.derivatives import write_bidsignore




log = get_logger("nuclei_app.bids_app")




DEFAULT_WORK_DIR = ".work"


class SlidesFailedError(NucleiAppError):
    """Some slides failed while the others were processed (exit code 1)."""

    exit_code = ExitCode.FAILURE


def select_slides(bids_dir: str | Path, config: RunConfig) -> list[Any]:
    """The slides the filters of ``config`` select, sorted by path.

    Raises
    ------
    NothingSelectedError
        A participant label that does not exist, or filters that select no slide; the
        message lists the labels that do exist (18).
    """

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

    reports, failures, not_processed = [], [], []
    for record in records:
        paths = derivative_paths(record, output_dir)
        failure_path = failure_record_path(output_dir, paths.stem)
        if paths.qc.is_file():
            reports.append(paths.qc)
        elif failure_path.is_file():
            try:
                failures.append(json.loads(failure_path.read_text(encoding="utf-8")))
            except (OSError, ValueError) as error:
                raise BadDataError(f"cannot read the failure record ({error}); delete it and rerun the participant level", failure_path) from None
        else:
            not_processed.append(relative_source(record))
    if not reports and not failures:
        raise NothingSelectedError(
            "no selected slide has a QC report yet; run the participant level first", output_dir
        )
    for source in not_processed:
        log.warning("%s has no result yet; run the participant level for it", source)
    summary = {
        "created_at": utc_timestamp(),
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

    stamp = utc_compact_timestamp()
    path = output_dir / LOGS_DIR / f"config-{level}-{stamp}-{os.getpid()}.json"
    values = config.to_dict()
    validate_instance(values, "run_config", path)
    return atomic_write_json(path, values)


def _validate_input(bids_dir: Path) -> None:

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
        explicit_model(config)
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
        with log_to_file(output_dir / LOGS_DIR / "group.log"):
            result.group, result.failures = run_group_level(records, output_dir)
        return result

    if analysis_level == "train":
        with log_to_file(output_dir / LOGS_DIR / "train.log"):
            with training_lock(models_folder(output_dir), lambda: None):
                result.model = train_dataset_model(records, output_dir, config)
        return result

    run_participant_slides(bids_dir, output_dir, records, config, result)
    return result


def run_participant_slides(
    bids_dir: Path, output_dir: Path, records: Sequence[Any], config: RunConfig, result: RunResult
) -> None:
    """The participant level: the dataset model (found or trained), then every selected slide.

    Fills ``result.model``, ``result.slides`` and ``result.failures``. The default work
    folder ``OUTPUT_DIR/.work`` is removed at the end when no other job still uses it.

    Raises
    ------
    CannotCreateOutputError (73)
        The work folder cannot be created.
    """
    default_work = config.segment.work_dir is None
    work_dir = output_dir / DEFAULT_WORK_DIR if default_work else Path(config.segment.work_dir)
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CannotCreateOutputError(f"cannot create the work folder ({error.strerror}); pass a writable --work-dir", work_dir) from None
    with log_to_file(output_dir / LOGS_DIR / "train.log"):
        # the dataset model learns from every slide of the dataset (the session and sample
        # filters apply, the participant filter does not), so all parallel jobs share one
        training_records = discover(bids_dir, None, config.session_label, config.sample_label) or records
        result.model = ensure_dataset_model(training_records, output_dir, config)
    result.slides = run_participant_level(records, output_dir, result.model, config, work_dir, result.config_path)
    if default_work:
        try:
            work_dir.rmdir()  # only when empty: other jobs may still be using it
        except OSError:
            pass
    result.failures = [
        {"slide": outcome.source, "exit_code": outcome.exit_code, "error": outcome.error}
        for outcome in result.slides
        if outcome.status == "failed"
    ]
