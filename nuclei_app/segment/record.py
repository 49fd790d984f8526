"""The completion record of a segmentation store."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nuclei_app import __version__
from nuclei_app.atomic import atomic_write_json
from nuclei_app.provenance import path_sha256, utc_timestamp
from nuclei_app.schemas import validate_instance


#: File inside a finished output folder that vouches for it; written last.
RUN_RECORD_NAME = "nuclei-app_run.json"


# ======================================================================================
# Inputs, outputs, resume
# ======================================================================================


def read_run_record(output_path: str | Path) -> dict | None:
    """The completion record of a finished segmentation output, or None when it has none."""
    record_path = Path(output_path) / RUN_RECORD_NAME
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("tool") == "nuclei-app" else None


def write_run_record(
    store: Path, outcome: SegmentationResult, inputs: list[dict], parameters: dict, config: dict[str, Any]
) -> None:
    """Write the completion record (schemas ``run_record``, ``segmentation_record``) into the finished store.

    Parameters
    ----------
    store : Path
        The store being completed (its temporary name).
    outcome : SegmentationResult
    inputs : list of dict
        ``{"path", "sha256"}`` of the slide and the model folder.
    parameters : dict
        Everything that influenced the output (what ``--resume`` compares).
    config : dict
        The `nuclei_app.config.SegmentConfig` of the run (``SegmentConfig.to_dict()``).
    """

    summary = outcome.summary()
    for key in ("output_path", "table_path", "geojson_path", "record_path", "seconds", "megapixels_per_second",
                "n_tiles_reused"):
        summary.pop(key)
    outputs = [{"path": str(outcome.output_path)}]
    for extra in (outcome.table_path, outcome.geojson_path):
        if extra is not None:
            outputs.append({"path": str(extra), "sha256": path_sha256(extra)})
    record = {
        "tool": "nuclei-app",
        "version": __version__,
        "completed_at": utc_timestamp(),
        "output": str(outcome.output_path),
        "command": "segment",
        "inputs": inputs,
        "parameters": parameters,
        "config": config,
        "outputs": outputs,
        "summary": summary,
    }
    validate_instance(record, "run_record", store / RUN_RECORD_NAME)
    validate_instance(record, "segmentation_record", store / RUN_RECORD_NAME)
    atomic_write_json(store / RUN_RECORD_NAME, record)


# ======================================================================================
# The whole slide
# ======================================================================================


@dataclass
class SegmentationResult:
    """What `segment_slide` produced.

    Attributes
    ----------
    output_path : Path
        The OME-Zarr segmentation store.
    table_path, geojson_path : Path or None
        The per-nucleus table (TSV, with ``.json`` sidecar) and GeoJSON, when asked for.
    record_path : Path
        The completion record inside the store.
    n_nuclei : int
        Nuclei in the output.
    n_layers : int
        Overlap layers written (``labels/nuclei_layer-0`` .. ``-<n_layers - 1>``).
    n_tiles : int
        Tiles in the grid.
    n_tiles_skipped_empty : int
        Tiles skipped because the tissue mask found nothing there.
    n_tiles_reused : int
        Tissue tiles whose results came from the work-dir cache of an earlier run.
    seconds : float
        Wall time of this call.
    tissue_megapixels : float
        Area of the tissue tiles' cores, megapixels.
    megapixels_per_second : float
        ``tissue_megapixels / seconds``.
    nuclear_channels : list of str
        Names of the channels the predictor saw.
    warnings : list of str
        Things the user should know (e.g. no tissue found).
    """

    output_path: Path
    table_path: Path | None
    geojson_path: Path | None
    record_path: Path
    n_nuclei: int
    n_layers: int
    n_tiles: int
    n_tiles_skipped_empty: int
    n_tiles_reused: int
    seconds: float
    tissue_megapixels: float
    megapixels_per_second: float
    nuclear_channels: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-ready dict of the result."""
        values = asdict(self)
        for key in ("output_path", "table_path", "geojson_path", "record_path"):
            values[key] = None if values[key] is None else str(values[key])
        return values
