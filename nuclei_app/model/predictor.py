"""Inference on tiles: scale, batch, heads + flips consensus, score cut-off, outline trim."""
from __future__ import annotations

import math
import numpy as np
import torch
from nuclei_app.model.checkpoint import load_model, model_score_threshold
from nuclei_app.model.transform import pad_batch, to_canonical
from nuclei_app.model.mask_rcnn import MAX_HIDDEN_SHARE, MultiHeadMaskRCNN, SCALE_GRID, paste_mask_crops
from nuclei_app.core.instances import Instances, suppress_hidden, trim_to_local_contrast


class NucleiPredictor:
    """A loaded student that turns normalised tiles into `Instances` at the tiles' own scale.

    Tiles are resized so nuclei have the model's canonical diameter, predicted with the
    heads' consensus, and the masks are pasted back at the original tile resolution.
    """

    def __init__(self, model: MultiHeadMaskRCNN, card: dict, device: str = "cpu", scale: float = 1.0,
                 flips: tuple[str, ...] = ("none",), score_threshold: float = 0.5) -> None:
        self.model = model
        self.card = card
        self.device = device
        self.scale = scale
        self.flips = flips
        self.score_threshold = score_threshold

    @property
    def channel_names(self) -> list[str]:
        return list(self.card["channels"])

    @property
    def diameter_px(self) -> float:
        """Typical nucleus diameter the model expects, in tile pixels."""
        return self.model.preset.canonical_diameter / self.scale

    @property
    def tile_origin_quantum_px(self) -> int:
        """Tile origins that are multiples of this many tile pixels land on the model's coarsest
        feature grid after resizing, so a nucleus is seen with the same feature-grid phase in
        every tile (and in a whole-image pass): tiling then does not change what is detected."""
        steps = round(self.scale * SCALE_GRID)  # scale = steps / SCALE_GRID (see load_predictor)
        period = SCALE_GRID * self.model.feature_stride
        return period // math.gcd(steps, period)

    @torch.inference_mode()
    def predict_batch(self, tiles: list) -> list:
        """Predict tiles, each float32 (C, H, W) normalised by slide percentiles -> list of `Instances`."""

        if not tiles:
            return []
        shapes = [tile.shape[1:] for tile in tiles]
        resized = [to_canonical(tile, self.scale) for tile in tiles]
        batch = pad_batch(resized)
        results = self.model.predict(batch.to(self.device), flips=self.flips, score_threshold=self.score_threshold)
        output = []
        for (tile_h, tile_w), original, tile, result in zip(shapes, tiles, resized, results):
            # Drop detections centred in the padding, then map boxes back to tile pixels.
            centre_y = (result.boxes[:, 1] + result.boxes[:, 3]) / 2
            centre_x = (result.boxes[:, 0] + result.boxes[:, 2]) / 2
            inside = (centre_y < tile.shape[1]) & (centre_x < tile.shape[2])
            boxes = result.boxes[inside].cpu() / self.scale
            if len(boxes) == 0:
                output.append(Instances.empty((tile_h, tile_w)))
                continue
            mask_boxes, crops = paste_mask_crops(result.mask_probs[inside], boxes)
            instances = Instances.from_crops((tile_h, tile_w), mask_boxes, crops, result.scores[inside].cpu().numpy(),
                                             result.head_agreement[inside].cpu().numpy())
            instances = trim_to_local_contrast(instances, np.asarray(original, dtype=np.float32).mean(axis=0),
                                               self.diameter_px)
            output.append(suppress_hidden(instances.select(instances.areas() > 0), MAX_HIDDEN_SHARE))
        return output


def load_predictor(model_dir, device: str = "cpu", pixel_size_um=None, diameter_px: float | None = None,
                   flips: tuple[str, ...] = ("none",), score_threshold: float | None = None) -> NucleiPredictor:
    """Load a model folder as a `NucleiPredictor` for slides of the given pixel size.

    The resize factor maps the slide's nuclei to the model's canonical diameter: from
    ``diameter_px`` when given, else from the training diameter in micrometres and the
    slide's pixel size, else assuming the training images' resolution. Objects scoring
    below ``score_threshold`` (default: the model card's, see `model_score_threshold`) are dropped.
    """
    model, card = load_model(model_dir, device)
    if score_threshold is None:
        score_threshold = model_score_threshold(card)
    scale_info = card["scale"]
    if diameter_px is None:
        if pixel_size_um and scale_info.get("training_diameter_um"):
            diameter_px = scale_info["training_diameter_um"] / float(sum(pixel_size_um) / 2)
        else:
            diameter_px = scale_info["training_diameter_px"]
    scale = scale_info["canonical_diameter_px"] / max(float(diameter_px), 1.0)
    # Snap to a multiple of 1/SCALE_GRID: tiles whose origins are multiples of SCALE_GRID slide
    # pixels then map onto whole canonical pixels, so a nucleus is resampled identically in every
    # tile that sees it (a few per cent of scale is harmless; a phase shift is not).
    scale = max(round(scale * SCALE_GRID), 1) / SCALE_GRID
    return NucleiPredictor(model, card, device=device, scale=scale, flips=flips, score_threshold=score_threshold)

