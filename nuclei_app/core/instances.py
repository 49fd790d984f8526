"""`Instances`: the one in-memory form of a set of (possibly overlapping) nuclei.

Everything that predicts nuclei (weak labelers, the model, its heads) returns
`Instances`; everything that consumes them (stitching, writing, QC) takes them.
Unlike a label image, `Instances` keeps every object's full mask, so two nuclei
that overlap both survive.

Masks are stored sparsely, as a box and the mask cropped to it: a 512 x 512 tile
holds a few hundred nuclei of a few hundred pixels each, and dense (N, H, W) masks
would cost ~1000x the memory and time of the crops. `masks` builds the dense form
on demand for callers that want it.
"""
from __future__ import annotations

from collections.abc import Sequence
import numpy as np
from scipy import ndimage as ndi
from nuclei_app.config import OUTLINE_CONTRAST_FRACTION


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Half-open ``(y0, x0, y1, x1)`` of the True pixels of a 2-D mask, None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if len(rows) == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


class Instances:
    """N object masks over one image (or tile) of shape (H, W).

    Build from dense masks, ``Instances(masks, scores, head_agreement)``, or from crops,
    `Instances.from_crops`. Either way the masks are kept as tight boxes plus crops.

    Attributes
    ----------
    boxes : ndarray of int64, shape (N, 4)
        Half-open ``(y0, x0, y1, x1)`` box of each mask in image pixels (tight: the crop's
        first and last rows and columns hold mask pixels; (0, 0, 0, 0) for an empty mask).
    crops : list of N ndarrays of bool, shapes (y1 - y0, x1 - x0)
        Each object's mask inside its box.
    scores : ndarray of float32, shape (N,)
        Detection confidence in [0, 1].
    head_agreement : ndarray of float32, shape (N,)
        Mean mask IoU between the model's heads for this object, in [0, 1]
        (1.0 for sources with a single opinion, e.g. weak labels).
    """

    def __init__(self, masks: np.ndarray, scores: np.ndarray, head_agreement: np.ndarray | None = None) -> None:
        masks = np.asarray(masks, dtype=bool)
        if masks.ndim != 3:
            raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
        boxes, crops = [], []
        for mask in masks:
            box = _tight_box(mask)
            boxes.append(box or (0, 0, 0, 0))
            crops.append(mask[box[0] : box[2], box[1] : box[3]].copy() if box else np.zeros((0, 0), bool))
        self._set(masks.shape[1:], np.asarray(boxes, np.int64).reshape(-1, 4), crops, scores, head_agreement)

    def _set(self, shape: Sequence[int], boxes: np.ndarray, crops: list[np.ndarray], scores: np.ndarray,
             head_agreement: np.ndarray | None) -> None:
        self._shape = (int(shape[0]), int(shape[1]))
        self.boxes = boxes
        self.crops = crops
        self.scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        if head_agreement is None:
            head_agreement = np.ones(len(self.scores), dtype=np.float32)
        self.head_agreement = np.asarray(head_agreement, dtype=np.float32).reshape(-1)
        if not (len(self.boxes) == len(self.crops) == len(self.scores) == len(self.head_agreement)):
            raise ValueError("masks, scores and head_agreement must have the same length")

    @classmethod
    def from_crops(cls, shape: tuple[int, int], boxes: np.ndarray, crops: Sequence[np.ndarray],
                   scores: np.ndarray, head_agreement: np.ndarray | None = None) -> "Instances":
        """Instances from per-object boxes ``(y0, x0, y1, x1)`` (N, 4) and bool crops of those boxes.

        Boxes may be loose or reach outside the image: each crop is clipped to the image
        and trimmed to its pixels here.
        """
        height, width = shape
        tight_boxes, tight_crops = [], []
        for (y0, x0, y1, x1), crop in zip(np.asarray(boxes, np.int64).reshape(-1, 4), crops):
            crop = np.asarray(crop, dtype=bool)
            cy0, cx0 = max(0, -y0), max(0, -x0)
            clipped = crop[cy0 : crop.shape[0] - max(0, y1 - height), cx0 : crop.shape[1] - max(0, x1 - width)]
            box = _tight_box(clipped) if clipped.size else None
            if box is None:
                tight_boxes.append((0, 0, 0, 0))
                tight_crops.append(np.zeros((0, 0), bool))
                continue
            by0, bx0, by1, bx1 = box
            oy, ox = y0 + cy0, x0 + cx0
            tight_boxes.append((oy + by0, ox + bx0, oy + by1, ox + bx1))
            tight_crops.append(clipped[by0:by1, bx0:bx1])
        instances = cls.__new__(cls)
        instances._set(shape, np.asarray(tight_boxes, np.int64).reshape(-1, 4), tight_crops, scores, head_agreement)
        return instances

    def __len__(self) -> int:
        return len(self.crops)

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the image the masks cover."""
        return self._shape

    @property
    def masks(self) -> np.ndarray:
        """Dense masks, bool (N, H, W). Memory grows with N x H x W: prefer `boxes` and `crops`."""
        dense = np.zeros((len(self), *self.shape), dtype=bool)
        for index, ((y0, x0, y1, x1), crop) in enumerate(zip(self.boxes, self.crops)):
            dense[index, y0:y1, x0:x1] = crop
        return dense

    @classmethod
    def empty(cls, shape: tuple[int, int]) -> "Instances":
        return cls(np.zeros((0, *shape), dtype=bool), np.zeros(0, dtype=np.float32))

    @classmethod
    def from_label_image(cls, labels: np.ndarray, scores: np.ndarray | None = None) -> "Instances":
        """Split a label image (H, W) of integer ids (0 = background) into instances, ordered by id."""
        labels = np.asarray(labels)
        ids = np.unique(labels)
        ids = ids[ids != 0]
        if scores is None:
            scores = np.ones(len(ids), dtype=np.float32)
        if len(ids) == 0:
            return cls.empty(labels.shape)
        # Consecutive ids let find_objects index slices by id without a huge sparse table.
        compact = np.searchsorted(ids, labels).astype(np.int64) + 1
        compact[labels == 0] = 0
        boxes, crops = [], []
        for index, found in enumerate(ndi.find_objects(compact, max_label=len(ids))):
            rows, cols = found
            boxes.append((rows.start, cols.start, rows.stop, cols.stop))
            crops.append(compact[found] == index + 1)
        return cls.from_crops(labels.shape, np.asarray(boxes), crops, scores)

    def select(self, keep: np.ndarray) -> "Instances":
        """The subset given by a boolean mask or index array."""
        indices = np.arange(len(self))[np.asarray(keep)] if len(self) else np.zeros(0, np.intp)
        subset = Instances.__new__(Instances)
        subset._set(self.shape, self.boxes[indices].reshape(-1, 4), [self.crops[i] for i in indices],
                    self.scores[indices], self.head_agreement[indices])
        return subset

    def areas(self) -> np.ndarray:
        """Pixel count of every mask, shape (N,), int64."""
        return np.asarray([int(crop.sum()) for crop in self.crops], dtype=np.int64)

    def to_label_image(self) -> np.ndarray:
        """Flatten to a uint32 label image (H, W); ids are 1..N in instance order.

        Where masks overlap, the pixel goes to the instance with the higher score
        (the flattened view viewers show; the full masks stay in `crops`).
        """
        labels = np.zeros(self.shape, dtype=np.uint32)
        best = np.full(self.shape, -np.inf, dtype=np.float32)
        for index, ((y0, x0, y1, x1), crop) in enumerate(zip(self.boxes, self.crops)):
            window_best = best[y0:y1, x0:x1]
            take = crop & (self.scores[index] > window_best)
            labels[y0:y1, x0:x1][take] = index + 1
            window_best[take] = self.scores[index]
        return labels


def suppress_hidden(instances: Instances, max_hidden_share: float = 0.5) -> Instances:
    """Drop instances whose masks lie mostly under higher-scoring instances' masks.

    Box NMS has to let overlapping boxes through (nuclei do overlap), and then a second,
    weaker detection of one nucleus survives beside the first. Overlapping nuclei rarely
    hide more than half of each other; duplicates and fragments of one nucleus do.

    Parameters
    ----------
    instances : Instances
        Candidate objects.
    max_hidden_share : float
        Largest share of an instance's pixels that may be covered by the union of the
        masks of the higher-scoring instances kept before it.

    Returns
    -------
    Instances
        The kept instances, in their original order.
    """
    covered = np.zeros(instances.shape, dtype=bool)
    keep = np.zeros(len(instances), dtype=bool)
    for index in np.argsort(-instances.scores, kind="stable"):
        y0, x0, y1, x1 = instances.boxes[index]
        crop = instances.crops[index]
        area = int(crop.sum())
        if area == 0:
            continue
        window = covered[y0:y1, x0:x1]
        if int((window & crop).sum()) > max_hidden_share * area:
            continue
        keep[index] = True
        window |= crop
    return instances.select(keep)


def trim_to_local_contrast(instances: Instances, composite: np.ndarray, diameter: float,
                           fraction: float = OUTLINE_CONTRAST_FRACTION) -> Instances:
    """Trim each mask to the pixels that stand out from that nucleus' own surroundings.

    The model draws outlines at its canonical scale from a coarse feature map, so its masks
    spill a pixel or two past the stain edge (more where the slide was downscaled). Per
    object, pixels darker than ``background + fraction * (nucleus - background)`` are
    removed, where ``nucleus`` is the median of the smoothed stain inside the mask and
    ``background`` its median on a ring around the mask that no other object covers; holes
    this opens inside a nucleus (dim nucleoli) are filled again. Only local levels are used,
    so a tile and the whole slide trim a nucleus alike.

    Parameters
    ----------
    instances : Instances
        Objects over the image, shape (H, W).
    composite : ndarray of float, shape (H, W)
        The nuclear stain the objects were found in (any intensity scale).
    diameter : float
        Typical nucleus diameter in pixels (sets the smoothing and the ring width).
    fraction : float
        Where between the background and the nucleus level the outline is drawn.

    Returns
    -------
    Instances
        Same objects, order, scores and head agreement; masks trimmed (possibly to empty
        when an object does not stand out at all).
    """
    if len(instances) == 0:
        return instances
    smoothed = ndi.gaussian_filter(np.asarray(composite, dtype=np.float32), max(0.5, diameter / 16.0))
    height, width = instances.shape
    covered = np.zeros(instances.shape, dtype=bool)
    for (y0, x0, y1, x1), crop in zip(instances.boxes, instances.crops):
        covered[y0:y1, x0:x1] |= crop
    ring_width = max(2, int(round(0.25 * diameter)))
    boxes, crops = [], []
    for (y0, x0, y1, x1), crop in zip(instances.boxes, instances.crops):
        wy0, wx0 = max(y0 - ring_width, 0), max(x0 - ring_width, 0)
        wy1, wx1 = min(y1 + ring_width, height), min(x1 + ring_width, width)
        mask = np.zeros((wy1 - wy0, wx1 - wx0), dtype=bool)
        mask[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0] = crop
        ring = ndi.binary_dilation(mask, iterations=ring_width) & ~covered[wy0:wy1, wx0:wx1]
        stain = smoothed[wy0:wy1, wx0:wx1]
        trimmed = mask
        if mask.any() and ring.sum() >= 5:
            background, level = float(np.median(stain[ring])), float(np.median(stain[mask]))
            if level > background:
                trimmed = ndi.binary_fill_holes(mask & (stain >= background + fraction * (level - background)))
        boxes.append((wy0, wx0, wy1, wx1))
        crops.append(trimmed)
    return Instances.from_crops(instances.shape, np.asarray(boxes), crops, instances.scores, instances.head_agreement)

