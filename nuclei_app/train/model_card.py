"""The model card: what a trained student is, how it was made, and how to use it (schema ``model_card``)."""
from __future__ import annotations

from typing import Any

import numpy as np

from nuclei_app import __version__
from nuclei_app.config import TrainingConfig
from nuclei_app.model.checkpoint import WEIGHTS_FILE
from nuclei_app.model.mask_rcnn import MultiHeadMaskRCNN, count_parameters
from nuclei_app.provenance import software_versions, utc_timestamp
from nuclei_app.train.data import TrainingImage
from nuclei_app.train.threshold import jsonable


def build_model_card(
    model: MultiHeadMaskRCNN,
    images: list[TrainingImage],
    channel_names: list[str],
    provenance: list[dict],
    config: TrainingConfig,
    device: str,
    threshold_choice: dict,
    weights_sha256: str,
    seconds: float,
    timed_out: bool,
    human_labels_used: bool,
) -> dict[str, Any]:
    """The card of a freshly trained model.

    Parameters
    ----------
    model : the trained student.
    images : its training images (their measured nucleus diameters give the training scale).
    channel_names : the nuclear channels it reads, in order.
    provenance : one entry per input (path, sha256, pixel size...).
    config : the `TrainingConfig` it was trained with (recorded whole).
    device : where it was trained.
    threshold_choice : the score cut-off chosen without labels (`choose_score_threshold`).
    weights_sha256 : hash of the state dict (`nuclei_app.model.checkpoint.weights_sha256`); its
        first 12 hex digits make the model id.
    seconds, timed_out, human_labels_used : how the training went.
    """
    preset = config.model_preset
    diameters = [item.source["diameter_px"] for item in images]
    physical = [
        item.source["diameter_px"] * float(np.mean(item.source["pixel_size_um"]))
        for item in images
        if item.source["pixel_size_um"]
    ]
    return {
        "model_id": f"nuclei-{preset.name}-{weights_sha256[:12]}",
        "tool": "nuclei-app",
        "version": __version__,
        "created_at": utc_timestamp(),
        "architecture": {
            "name": "multi-head Mask R-CNN with efficient channel attention",
            "preset": preset.name,
            "preset_parameters": jsonable(preset.__dict__),
            "heads": config.heads,
            "eca": config.use_eca,
            "in_channels": len(channel_names),
            "parameters": count_parameters(model),
            "pretrained_weights": None,
        },
        "channels": channel_names,
        "normalisation": {
            "method": "per-channel whole-slide percentiles mapped to [0, 1]",
            "low_percentile": 1.0,
            "high_percentile": 99.8,
        },
        "scale": {
            "canonical_diameter_px": preset.canonical_diameter,
            "training_diameter_px": float(np.median(diameters)),
            "training_diameter_um": float(np.median(physical)) if physical else None,
        },
        "training": {
            "config": config.to_dict(),
            "device": device,
            "seed": config.seed,
            "seconds": round(seconds, 2),
            "timed_out": timed_out,
            "data": provenance,
            "human_labels_used": human_labels_used,
        },
        "inference": threshold_choice,
        "weights": {"file": WEIGHTS_FILE, "sha256": weights_sha256},
        "software": software_versions(),
    }
