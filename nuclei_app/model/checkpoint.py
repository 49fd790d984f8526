"""Weights and model card: the only place that loads or saves a model."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from nuclei_app.atomic import atomic_directory, atomic_write_json
from nuclei_app.model.mask_rcnn import MultiHeadMaskRCNN, build_model
from nuclei_app.config import get_preset
from nuclei_app.errors import BadDataError, MissingInputError
from nuclei_app.schemas import validate_instance


# ----------------------------------------------------------------------------- saved models and inference

WEIGHTS_FILE = "weights.pt"


#: Score cut-off of models whose card predates per-model thresholds (`model_score_threshold`).
DEFAULT_SCORE_THRESHOLD = 0.5


MODEL_CARD_FILE = "model_card.json"


TRAINING_REPORT_FILE = "training_report.json"


def load_model(model_dir, device: str = "cpu") -> tuple[MultiHeadMaskRCNN, dict]:
    """Load a trained student and its card; weights go through ``torch.load(weights_only=True)``."""
    import json
    from pathlib import Path


    model_dir = Path(model_dir)
    card_path = model_dir / MODEL_CARD_FILE
    if not card_path.is_file() or not (model_dir / WEIGHTS_FILE).is_file():
        raise MissingInputError(
            f"not a model folder (needs {MODEL_CARD_FILE} and {WEIGHTS_FILE}); train one with `nuclei-app train`",
            model_dir,
        )
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as error:
        raise BadDataError(f"unreadable model card ({error}); retrain the model", card_path) from None
    validate_instance(card, "model_card", card_path)
    architecture = card["architecture"]
    model = build_model(
        architecture["in_channels"], get_preset(architecture["preset"]), heads=architecture["heads"],
        use_eca=architecture["eca"],
    )
    try:
        state = torch.load(model_dir / WEIGHTS_FILE, map_location=device, weights_only=True)
        model.load_state_dict(state)
    except Exception as error:  # corrupt or foreign weights: the user must retrain, not debug
        raise BadDataError(
            f"cannot load weights ({type(error).__name__}); retrain the model", model_dir / WEIGHTS_FILE
        ) from None
    return model.to(device).eval(), card


def model_score_threshold(card: dict) -> float:
    """The score cut-off a model card records (chosen at training), or 0.5 for older cards."""
    return float(card.get("inference", {}).get("score_threshold", DEFAULT_SCORE_THRESHOLD))


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's keys and tensor bytes, in key order (the model id comes from it)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].numpy().tobytes())
    return digest.hexdigest()


def save_model(output_dir: str | Path, state: dict[str, torch.Tensor], card: dict, report: dict) -> Path:
    """Write a model folder atomically: ``weights.pt`` (plain state dict), ``model_card.json``,
    ``training_report.json``; card and report are validated against their schemas first."""
    validate_instance(card, "model_card")
    validate_instance(report, "training_report")
    output_dir = Path(output_dir)
    with atomic_directory(output_dir) as staging:
        torch.save(state, staging / WEIGHTS_FILE)
        atomic_write_json(staging / MODEL_CARD_FILE, card)
        atomic_write_json(staging / TRAINING_REPORT_FILE, report)
    return output_dir
