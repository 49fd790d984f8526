"""Which predictor segments a slide (model or weak teacher), and at what scale."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nuclei_app.errors import UsageError
from nuclei_app.core.instances import Instances
from nuclei_app.model.device import resolve_device
from nuclei_app.core.weak import weak_labels


# ======================================================================================
# Predictors: one picklable description, one cached instance per process
# ======================================================================================


#: Names of `segment --method`, and the weak labeler each one runs.
WEAK_METHODS: dict[str, str] = {"weak": "log", "weak-log": "log", "weak-otsu": "otsu"}


@dataclass(frozen=True)
class PredictorSpec:
    """What segments the tiles, in a form that can be sent to another process.

    How it runs (device, score cut-off) is `nuclei_app.config.SegmentConfig`'s.

    Attributes
    ----------
    kind : "model" or "weak"
        ``"model"``: a trained student (`nuclei_app.model.load_predictor`);
        ``"weak"``: the classical weak labeler (`nuclei_app.weak.weak_labels`), no model needed.
    model_dir : str, optional
        Model folder (``kind="model"``).
    method : str
        Weak labeler method (``kind="weak"``): ``"log"`` or ``"otsu"``.
    diameter : float, optional
        Nucleus diameter in pixels (weak labeler; a model when the pixel size cannot give its
        scale); `segment_slide` estimates it once
        per slide when absent, so every tile uses the same scale.
    """

    kind: str
    model_dir: str | None = None
    method: str = "log"
    diameter: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("model", "weak"):
            raise UsageError(f"predictor kind must be 'model' or 'weak', got {self.kind!r}")
        if self.kind == "model" and not self.model_dir:
            raise UsageError("a model predictor needs a model folder (--model MODEL_DIR)")

    @classmethod
    def choose(cls, model_dir: str | Path | None, method: str | None) -> "PredictorSpec":
        """The predictor of `segment --model MODEL_DIR` or `segment --method NAME` (exactly one).

        Raises
        ------
        UsageError
            Both or neither given, or an unknown method (one of `WEAK_METHODS`).
        """
        if (model_dir is None) == (method is None):
            raise UsageError("give exactly one of --model MODEL_DIR or --method weak")
        if model_dir is not None:
            return cls("model", model_dir=str(model_dir))
        if method not in WEAK_METHODS:
            raise UsageError(f"--method must be one of {', '.join(WEAK_METHODS)}, got {method!r}")
        return cls("weak", method=WEAK_METHODS[method])


class WeakPredictor:
    """The weak labeler behind the predictor interface (``predict_batch`` of normalised tiles).

    Tiles arrive already normalised by whole-slide percentiles, so the labeler is told
    that 0 and 1 are the low and high percentiles (it must not re-normalise per tile,
    which would make tiles disagree).
    """

    channel_names: list[str] | None = None  # works on any nuclear channels

    def __init__(self, method: str, pixel_size_um: tuple[float, float] | None, diameter: float | None = None) -> None:
        self.method = method
        self.pixel_size_um = pixel_size_um
        self.diameter = diameter

    @property
    def diameter_px(self) -> float | None:
        """Typical nucleus diameter in tile pixels (None until the slide's is measured)."""
        return self.diameter

    def predict_batch(self, tiles: list[np.ndarray]) -> list[Instances]:
        """Label each (C, H, W) float32 tile -> list of `Instances` over the tile."""
        results = []
        for tile in tiles:
            identity = np.tile(np.asarray([[0.0, 1.0]], dtype=np.float32), (tile.shape[0], 1))
            with warnings.catch_warnings():  # an empty tile is normal on a slide; no warning per tile
                warnings.simplefilter("ignore", RuntimeWarning)
                labels = weak_labels(
                    tile, method=self.method, pixel_size_um=self.pixel_size_um, diameter=self.diameter,
                    percentiles=identity,
                )
            results.append(labels.to_instances())
        return results


# A model's scale from the pixel size is overruled when the slide's nuclei measure more than
# this factor away from it (a wrong nominal pixel size would otherwise resize nuclei badly).
SCALE_MISMATCH = 1.6


_PREDICTORS: dict[tuple, Any] = {}


def get_predictor(
    spec: PredictorSpec,
    pixel_size_um: tuple[float, float] | None,
    device: str = "cpu",
    score_threshold: float | None = None,
) -> Any:
    """The predictor ``spec`` describes, loaded once per process (workers reuse it across tasks).

    Parameters
    ----------
    spec : PredictorSpec
    pixel_size_um : (float, float) or None
        The slide's pixel size, for the predictor's scale.
    device : {"auto", "cpu", "cuda"}
        Where a model runs (ignored by the weak labeler).
    score_threshold : float, optional
        A model's consensus-score cut-off (default: its card's; ignored by the weak labeler).
    """
    pixel_size = None if pixel_size_um is None else tuple(float(v) for v in pixel_size_um)
    key = (spec, pixel_size) if spec.kind == "weak" else (spec, pixel_size, device, score_threshold)
    if key not in _PREDICTORS:
        if spec.kind == "weak":
            _PREDICTORS[key] = WeakPredictor(spec.method, pixel_size, spec.diameter)
        else:
            from nuclei_app.model.predictor import load_predictor

            _PREDICTORS[key] = load_predictor(
                spec.model_dir, device=resolve_device(device), pixel_size_um=pixel_size, diameter_px=spec.diameter,
                score_threshold=score_threshold,
            )
    return _PREDICTORS[key]

