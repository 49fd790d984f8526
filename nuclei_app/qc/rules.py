"""QC status rules: thresholds to pass | warn | fail, with reasons."""
from __future__ import annotations

from pathlib import Path
from typing import Any
from nuclei_app.config import QCThresholds, read_settings_file
from nuclei_app.errors import UsageError
from nuclei_app.qc.metrics import format_number


#: Rule of each judged metric: metric -> (threshold prefix in QCThresholds, better direction,
#: reason code). A value worse than ``<prefix>_fail`` fails, worse than ``<prefix>_warn`` warns.
RULES: dict[str, tuple[str, str, str]] = {
    "signal_autocorrelation": ("signal_autocorrelation", "higher", "no_nuclear_signal"),
    "foreground_coverage": ("foreground_coverage", "higher", "low_foreground_coverage"),
    "foreground_precision": ("foreground_precision", "higher", "low_foreground_precision"),
    "seed_recall": ("seed_recall", "higher", "low_seed_recall"),
    "teacher_student_f1": ("teacher_student_f1", "higher", "low_teacher_agreement"),
    "score_mean": ("score_mean", "higher", "low_detection_scores"),
    "head_agreement_mean": ("head_agreement", "higher", "low_head_agreement"),
    "morphology_outlier_share": ("morphology_outlier_share", "lower", "morphology_outliers"),
    "seam_excess": ("seam_excess", "lower", "seam_artifacts"),
    "flagged_tile_share": ("flagged_tile_share", "lower", "many_flagged_tiles"),
}


#: Slide metrics judged for the slide's status, in the order their reasons are listed.
STATUS_METRICS: tuple[str, ...] = (
    "signal_autocorrelation", "foreground_coverage", "foreground_precision", "seed_recall", "teacher_student_f1",
    "score_mean", "head_agreement_mean", "morphology_outlier_share", "seam_excess", "flagged_tile_share",
)


#: Tile metrics named in a flagged tile's reasons (against the slide's warn thresholds), in order.
TILE_METRICS: tuple[str, ...] = (
    "foreground_coverage", "foreground_precision", "seed_recall", "teacher_student_f1", "score_mean",
    "head_agreement_mean", "morphology_outlier_share", "signal_autocorrelation",
)


def is_worse(value: float, threshold: float, better: str) -> bool:
    """Whether ``value`` is worse than ``threshold`` for a metric whose ``better`` is higher | lower.

    Parameters
    ----------
    value, threshold : float
    better : {"higher", "lower"}

    Returns
    -------
    bool
    """
    return value < threshold if better == "higher" else value > threshold


def qc_status(metrics: dict[str, Any], thresholds: QCThresholds = QCThresholds()) -> tuple[str, list[dict[str, Any]]]:
    """``pass | warn | fail`` of a slide and the machine-readable reasons.

    Parameters
    ----------
    metrics : dict
        Slide metrics (the report's ``slide`` object).
    thresholds : QCThresholds

    Returns
    -------
    status : str
    reasons : list of dict
        ``{"code", "severity", "metric", "value", "threshold", "comparison", "message"}``,
        failures first. ``no_nuclei`` fails a slide with nuclear foreground but no nucleus.
    """
    reasons: list[dict[str, Any]] = []
    if metrics.get("n_nuclei", 0) == 0 and (metrics.get("foreground_share") or 0) > 0:
        reasons.append({
            "code": "no_nuclei", "severity": "fail", "metric": "n_nuclei", "value": 0, "threshold": 1,
            "comparison": "<", "message": "the image has nuclear foreground but the segmentation holds no nucleus",
        })
    for metric in STATUS_METRICS:
        prefix, better, code = RULES[metric]
        value = metrics.get(metric)
        if value is None:
            continue
        for severity in ("fail", "warn"):
            threshold = float(getattr(thresholds, f"{prefix}_{severity}"))
            if is_worse(value, threshold, better):
                comparison = "<" if better == "higher" else ">"
                reasons.append({
                    "code": code, "severity": severity, "metric": metric, "value": format_number(value),
                    "threshold": threshold, "comparison": comparison,
                    "message": f"{metric} {value:.3f} {comparison} {severity} threshold {threshold:g}",
                })
                break
    reasons.sort(key=lambda reason: reason["severity"] != "fail")
    severities = {reason["severity"] for reason in reasons}
    status = "fail" if "fail" in severities else "warn" if "warn" in severities else "pass"
    return status, reasons


# =====================================================================================
# Inputs: QC config, label stores, per-nucleus table
# =====================================================================================


def load_qc_config(path: str | Path | None) -> QCThresholds:
    """Read a QC config file (JSON or TOML) into `QCThresholds`; None gives the defaults.

    The file holds an object (a TOML document) with any fields of `QCThresholds`, either at
    the top level or under a ``qc`` key/table. It is read and checked against the
    ``qc_config`` schema by `nuclei_app.config.read_settings_file`.

    Raises
    ------
    MissingInputError (66)
        The file does not exist or cannot be read.
    UsageError (64)
        Unreadable JSON/TOML, an unknown key, a wrong type or an out-of-range threshold:
        the config is an option the user gave, so it is a usage error.
    """
    if path is None:
        return QCThresholds()
    values = read_settings_file(path, "qc_config", "QC config", section="qc")
    try:
        return QCThresholds(**values)
    except UsageError as error:
        raise UsageError(f"{error.message}; fix the QC config", path) from None


def clean_tile_record(record: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready copy of a tile record: numbers rounded, NaN -> None, lists, strings and objects kept.

    Parameters
    ----------
    record : dict
        Tile record or flagged-tile entry.

    Returns
    -------
    dict
        Same keys, in the same order.
    """
    return {key: (value if isinstance(value, (list, str, dict)) else format_number(value)) for key, value in record.items()}


def tile_reasons(record: dict[str, Any], thresholds: QCThresholds) -> list[str]:
    """Codes of the tile metrics worse than their warn thresholds (why the tile is flagged).

    Parameters
    ----------
    record : dict
        A tile record (metrics of `TILE_METRICS`, ``n_nuclei``).
    thresholds : QCThresholds

    Returns
    -------
    list of str
        ``no_nuclei`` first when the tile holds none, then the codes in `TILE_METRICS` order.
    """
    codes = []
    for metric in TILE_METRICS:
        prefix, better, code = RULES[metric]
        value = record.get(metric)
        if value is not None and is_worse(value, getattr(thresholds, f"{prefix}_warn"), better):
            codes.append(code)
    if record.get("n_nuclei") == 0:
        codes.insert(0, "no_nuclei")
    return codes

