"""The one canonical-scale transform: resize to the model's scale and pad to its stride.

Training images, self-labelling tiles and inference tiles all go through `to_canonical` and
`pad_batch` (as torchvision's ``GeneralizedRCNNTransform`` serves training and inference),
so the model sees exactly the same resampling whichever way an image reaches it.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

#: Feature strides need image sides divisible by this.
SIZE_DIVISIBLE = 32


def round_up_to_multiple(n: int, multiple: int = SIZE_DIVISIBLE) -> int:
    """Smallest multiple of ``multiple`` >= n (feature strides need divisible sizes)."""
    return int(math.ceil(n / multiple) * multiple)


def to_canonical(image: np.ndarray | torch.Tensor, scale: float) -> torch.Tensor:
    """Resize an image by ``scale`` with bilinear interpolation (antialiased when shrinking).

    The sampling grid is the exact ``scale`` (``recompute_scale_factor=False``): canonical pixel
    ``i`` samples native coordinate ``(i + 0.5) / scale - 0.5`` whatever the image size, so a
    nucleus is resampled identically in a whole image, a training crop and any inference tile.

    Parameters
    ----------
    image : ndarray or Tensor, shape (C, H, W)
        Normalised intensities; any real dtype.
    scale : float
        Canonical pixels per native pixel.

    Returns
    -------
    Tensor of float32, shape (C, floor(H * scale), floor(W * scale))
        The input as float32 when ``scale`` is 1 (within 1e-3).
    """
    tensor = torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32))
    if abs(scale - 1.0) <= 1e-3:
        return tensor
    return F.interpolate(tensor[None], scale_factor=scale, mode="bilinear", antialias=scale < 1,
                         align_corners=False, recompute_scale_factor=False)[0]


def rescale_image(image: np.ndarray, scale: float) -> np.ndarray:
    """`to_canonical` as a numpy array: float32 (C, floor(H * scale), floor(W * scale))."""
    return to_canonical(image, scale).numpy()


def pad_batch(images: Sequence[np.ndarray | torch.Tensor]) -> torch.Tensor:
    """Stack canonical images into one zero-padded batch whose sides divide by `SIZE_DIVISIBLE`.

    Parameters
    ----------
    images : sequence of ndarray or Tensor, each shape (C, h_i, w_i)

    Returns
    -------
    Tensor of float32, shape (N, C, H, W)
        Image ``i`` at the top left of slot ``i``; H, W the largest sides rounded up.
    """
    tensors = [torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32)) for image in images]
    height = max(round_up_to_multiple(t.shape[1]) for t in tensors)
    width = max(round_up_to_multiple(t.shape[2]) for t in tensors)
    batch = torch.zeros((len(tensors), tensors[0].shape[0], height, width))
    for index, tensor in enumerate(tensors):
        batch[index, :, : tensor.shape[1], : tensor.shape[2]] = tensor
    return batch
