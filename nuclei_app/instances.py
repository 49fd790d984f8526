"""`Instances`: the one in-memory form of a set of (possibly overlapping) nuclei.

Everything that predicts nuclei (weak labelers, the model, its heads) returns
`Instances`; everything that consumes them (stitching, writing, QC) takes them.
Unlike a label image, `Instances` keeps every object's full mask, so two nuclei
that overlap both survive.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Instances:
    """N object masks over one image (or tile) of shape (H, W).

    Attributes
    ----------
    masks : ndarray of bool, shape (N, H, W)
        Full-size mask of every object; masks may overlap.
    scores : ndarray of float32, shape (N,)
        Detection confidence in [0, 1].
    head_agreement : ndarray of float32, shape (N,)
        Mean mask IoU between the model's heads for this object, in [0, 1]
        (1.0 for sources with a single opinion, e.g. weak labels).
    """

    masks: np.ndarray
    scores: np.ndarray
    head_agreement: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.masks = np.asarray(self.masks, dtype=bool)
        if self.masks.ndim != 3:
            raise ValueError(f"masks must be (N, H, W), got shape {self.masks.shape}")
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        if self.head_agreement is None:
            self.head_agreement = np.ones(len(self.scores), dtype=np.float32)
        self.head_agreement = np.asarray(self.head_agreement, dtype=np.float32).reshape(-1)
        if not (len(self.masks) == len(self.scores) == len(self.head_agreement)):
            raise ValueError("masks, scores and head_agreement must have the same length")

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the image the masks cover."""
        return int(self.masks.shape[1]), int(self.masks.shape[2])

    @classmethod
    def empty(cls, shape: tuple[int, int]) -> "Instances":
        return cls(np.zeros((0, *shape), dtype=bool), np.zeros(0, dtype=np.float32))

    @classmethod
    def from_label_image(cls, labels: np.ndarray, scores: np.ndarray | None = None) -> "Instances":
        """Split a label image (H, W) of integer ids (0 = background) into instances, ordered by id."""
        labels = np.asarray(labels)
        ids = np.unique(labels)
        ids = ids[ids != 0]
        masks = labels[None, :, :] == ids[:, None, None] if len(ids) else np.zeros((0, *labels.shape), bool)
        if scores is None:
            scores = np.ones(len(ids), dtype=np.float32)
        return cls(masks, scores)

    def select(self, keep: np.ndarray) -> "Instances":
        """The subset given by a boolean mask or index array."""
        return Instances(self.masks[keep], self.scores[keep], self.head_agreement[keep])

    def areas(self) -> np.ndarray:
        """Pixel count of every mask, shape (N,), int64."""
        return self.masks.reshape(len(self), -1).sum(axis=1)

    def to_label_image(self) -> np.ndarray:
        """Flatten to a uint32 label image (H, W); ids are 1..N in instance order.

        Where masks overlap, the pixel goes to the instance with the higher score
        (the flattened view viewers show; the full masks stay in `masks`).
        """
        labels = np.zeros(self.shape, dtype=np.uint32)
        best = np.full(self.shape, -np.inf, dtype=np.float32)
        for index in range(len(self)):
            take = self.masks[index] & (self.scores[index] > best)
            labels[take] = index + 1
            best[take] = self.scores[index]
        return labels
