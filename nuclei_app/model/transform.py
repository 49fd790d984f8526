"""Resampling to the model's canonical scale."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- data


def rescale_image(image: np.ndarray, scale: float) -> np.ndarray:
    """Resize (C, H, W) float32 by ``scale`` with antialiased bilinear interpolation."""
    if abs(scale - 1.0) < 1e-3:
        return image.astype(np.float32, copy=False)
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    size = [max(1, round(image.shape[1] * scale)), max(1, round(image.shape[2] * scale))]
    return F.interpolate(tensor, size=size, mode="bilinear", antialias=scale < 1, align_corners=False)[0].numpy()

