"""Weak-to-strong self-training: weak labels -> student -> correct + expand -> retrain.

Round 0 teaches the multi-head student from the weak labelers' output (each head a
different view: another labeler or a bootstrap subset), with unconfident foreground
marked "ignore". Each later round lets the student relabel its own training images
(heads + flips vote), keeps the teacher where the student is unsure, replaces the
teacher where the heads agree confidently (split merges, merge fragments, fix outlines),
adds confident nuclei the teacher missed, and retrains. Every round's statistics go
to ``training_report.json``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from nuclei_app import __version__
from nuclei_app.config import OUTLINE_CONTRAST_FRACTION, TrainingConfig
from nuclei_app.errors import BadDataError, CannotCreateOutputError, MissingInputError, UsageError
from nuclei_app.provenance import path_sha256, software_versions
from nuclei_app.read import normalise_intensities
from nuclei_app.model import (
    MAX_HIDDEN_SHARE,
    DEFAULT_SCORE_THRESHOLD,
    MODEL_CARD_FILE,
    TRAINING_REPORT_FILE,
    WEIGHTS_FILE,
    MultiHeadMaskRCNN,
    _integral,
    round_up_to_multiple,
    build_model,
    count_parameters,
    paste_mask_crops,
)
from nuclei_app.instances import Instances, suppress_hidden, trim_to_local_contrast

log = logging.getLogger(__name__)
MIN_NUCLEI_TO_TRAIN = 5


@dataclass
class TrainingImage:
    """One training image at canonical scale, with its pseudo-labels.

    image : float32 (C, H, W), normalised with whole-slide percentiles.
    labels : uint32 (H, W), current pseudo-labels of the consensus view (0 = background).
    confidence : float32 (n+1,), confidence of label id i at index i (index 0 unused).
    ignore : bool (H, W), ambiguous foreground that teaches neither object nor background.
    views : per head, (labels, confidence, ignore) as that head sees them.
    """

    name: str
    image: np.ndarray
    scale: float
    source: dict
    labels: np.ndarray = None  # type: ignore[assignment]
    confidence: np.ndarray = None  # type: ignore[assignment]
    ignore: np.ndarray = None  # type: ignore[assignment]
    views: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)


# ----------------------------------------------------------------------------- data


def rescale_image(image: np.ndarray, scale: float) -> np.ndarray:
    """Resize (C, H, W) float32 by ``scale`` with antialiased bilinear interpolation."""
    if abs(scale - 1.0) < 1e-3:
        return image.astype(np.float32, copy=False)
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    size = [max(1, round(image.shape[1] * scale)), max(1, round(image.shape[2] * scale))]
    return F.interpolate(tensor, size=size, mode="bilinear", antialias=scale < 1, align_corners=False)[0].numpy()


def tissue_tiles(slide, channels: Sequence[int], percentiles: np.ndarray, tile: int, rng: np.random.Generator,
                 limit: int) -> list[tuple[int, int, int, int]]:
    """Up to ``limit`` tiles (y0, x0, h, w) of level 0 on tissue, drawn at random (seeded).

    Tissue is found exactly as segmentation finds it (`nuclei_app.segment.tissue_tiles`), on a
    grid of non-overlapping tiles.
    """
    from nuclei_app import segment

    grid = segment.make_tile_grid(slide.shape[1:], tile=tile, overlap=0)
    on_tissue = segment.tissue_tiles(slide, channels, percentiles, grid)
    candidates = []
    for row, col in grid.positions():
        if on_tissue[row, col]:
            y0, x0, y1, x1 = grid.window(row, col)
            candidates.append((y0, x0, y1 - y0, x1 - x0))
    if len(candidates) > limit:
        chosen = rng.choice(len(candidates), size=limit, replace=False)
        candidates = [candidates[i] for i in sorted(chosen)]
    return candidates


def load_training_images(
    paths: Sequence[str | Path],
    config: TrainingConfig,
    nuclear_channels: str | Sequence[str] | None = None,
    whole_image_limit: int = 2048 * 2048,
) -> tuple[list[TrainingImage], list[str], list[dict]]:
    """Read every input (image files or BIDS folders) as canonical-scale training images.

    Small images are used whole; large slides contribute tiles sampled from tissue.
    Returns the images, the nuclear channel names (identical across inputs) and provenance.
    """
    from nuclei_app.read import channel_percentiles, open_slide, select_nuclear_channels, stain_key
    from nuclei_app.weak import estimate_nucleus_diameter

    files = expand_inputs(paths)
    rng = np.random.default_rng(config.seed)
    per_slide_tiles = max(1, config.max_training_tiles // max(len(files), 1))
    images, provenance, channel_names = [], [], None
    for path, known_pixel_size in files:
        with open_slide(path) as slide:
            channels = select_nuclear_channels(slide.channel_names, nuclear_channels, path=path)
            names = [slide.channel_names[i] for i in channels]
            if channel_names is None:
                channel_names = names
            elif [stain_key(n) for n in names] != [stain_key(n) for n in channel_names]:
                raise BadDataError(
                    f"nuclear channels {names} differ from the first input's {channel_names}; "
                    "pass --nuclear-channels so every input offers the same stains",
                    path,
                )
            pixel_size = slide.pixel_size_um or known_pixel_size
            percentiles = channel_percentiles(slide, channels)
            _, height, width = slide.shape
            if height * width <= whole_image_limit:
                regions = [(0, 0, height, width)]
            else:
                regions = tissue_tiles(slide, channels, percentiles, config.training_tile_size, rng, per_slide_tiles)
            raw_regions = [normalise_intensities(slide.read_region(*region, channels=channels), percentiles) for region in regions]
            provenance.append(
                {
                    "path": str(path),
                    "sha256": path_sha256(path),
                    "shape": list(slide.shape),
                    "channels": names,
                    "pixel_size_um": list(pixel_size) if pixel_size else None,
                    "regions": [list(r) for r in regions],
                }
            )
        # One scale per slide (from a few regions), so all its tiles are resized alike.
        diameter = float(np.median([estimate_nucleus_diameter(region.mean(0), pixel_size_um=pixel_size)
                                    for region in raw_regions[:3]]))
        scale = config.model_preset.canonical_diameter / max(diameter, 1.0)
        for index, region in enumerate(raw_regions):
            images.append(
                TrainingImage(
                    name=f"{Path(path).name}#{index}",
                    image=rescale_image(region, scale),
                    scale=scale,
                    source={"path": str(path), "shape": [height, width], "region": list(regions[index]),
                            "diameter_px": float(diameter),
                            "pixel_size_um": list(pixel_size) if pixel_size else None},
                )
            )
    return images, channel_names or [], provenance


def expand_inputs(paths: Sequence[str | Path]) -> list[tuple[Path, tuple[float, float] | None]]:
    """Image files as given; BIDS folders expanded to their slides (with sidecar pixel sizes)."""
    files: list[tuple[Path, tuple[float, float] | None]] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise MissingInputError("no such file or folder; check the path", path)
        if path.is_dir() and (path / "dataset_description.json").is_file():
            from nuclei_app.discover import discover

            for record in discover(path):
                files.append((Path(record.path), record.pixel_size_um))
        else:
            files.append((path, None))
    return files


# ----------------------------------------------------------------------------- pseudo-labels


def weak_pseudo_labels(images: list[TrainingImage], config: TrainingConfig) -> None:
    """Round 0: every head's view from a weak labeler, with a bootstrap share of objects hidden."""
    from nuclei_app.weak import weak_labels

    diameter = config.model_preset.canonical_diameter
    for image_index, item in enumerate(images):
        per_method = {}
        for method in dict.fromkeys(config.weak_methods):
            # The image is already normalised with whole-slide percentiles: keep that scaling.
            identity = np.tile(np.array([0.0, 1.0], dtype=np.float32), (item.image.shape[0], 1))
            result = weak_labels(item.image, method=method, diameter=diameter, percentiles=identity)
            confidence = np.concatenate([[0.0], result.confidence]).astype(np.float32)
            per_method[method] = (result.labels.astype(np.uint32), confidence, result.ignore.astype(bool))
        if config.teacher_agreement and len(per_method) > 1:
            per_method = {method: cross_checked(view, [v for m, v in per_method.items() if m != method])
                          for method, view in per_method.items()}
        item.labels, item.confidence, item.ignore = per_method[config.weak_methods[0]]
        item.views = [
            _bootstrap_view(*per_method[config.weak_methods[k % len(config.weak_methods)]], config,
                            seed=(config.seed, image_index, k))
            for k in range(config.heads)
        ]


def human_pseudo_labels(images: list[TrainingImage], label_files: dict[str, Path], config: TrainingConfig) -> None:
    """Supervised variant of round 0: every head learns from human masks (upper bounds in benchmarks).

    label_files maps each input's resolved path (``TrainingImage.source["path"]``) to a label
    image of the same height and width. Regions are cut out and resized to canonical scale
    with nearest-neighbour sampling; every object gets confidence 1, nothing is "ignore"
    (beyond the heads' bootstrap subsets, as in weak training).
    """
    from nuclei_app.evaluate import as_label_image

    for image_index, item in enumerate(images):
        path = label_files[str(Path(item.source["path"]).resolve())]
        full = _read_human_labels(path)
        y0, x0, height, width = item.source["region"]
        if list(full.shape) != item.source["shape"]:
            raise BadDataError(f"human masks of shape {list(full.shape)} do not match the image's "
                               f"{item.source['shape']}; give the masks drawn on this image", path)
        region = as_label_image(full[y0:y0 + height, x0:x0 + width], path)
        rows = np.minimum((np.arange(item.image.shape[1]) / item.scale).astype(int), height - 1)
        cols = np.minimum((np.arange(item.image.shape[2]) / item.scale).astype(int), width - 1)
        (labels,) = _relabel(region[np.ix_(rows, cols)])
        confidence = np.ones(int(labels.max()) + 1, dtype=np.float32)
        confidence[0] = 0.0
        item.labels, item.confidence, item.ignore = labels, confidence, np.zeros(labels.shape, bool)
        item.views = [_bootstrap_view(labels, confidence, item.ignore, config, seed=(config.seed, image_index, k))
                      for k in range(config.heads)]


def _read_human_labels(path: Path) -> np.ndarray:
    from nuclei_app.read import open_slide

    with open_slide(path) as slide:
        if slide.shape[0] != 1:
            raise BadDataError(f"a mask file has one channel, this one {slide.shape[0]}", path)
        return slide.read_region(0, 0, slide.shape[1], slide.shape[2], channels=[0])[0]


def cross_checked(view: tuple, others: list[tuple]) -> tuple:
    """One teacher's labels checked against the other teachers'.

    An object another teacher also found (IoU >= 0.5) keeps its confidence; a disputed one
    has it halved (so an unsure disputed object ends up "ignore"); nuclei only the other
    teachers found become "ignore" rather than background in this view.

    view, others : (labels uint32 (H, W), confidence float32 (n+1,), ignore bool (H, W)).
    """
    from nuclei_app.evaluate import iou_matrix

    labels, confidence, ignore = view
    confidence = confidence.copy()
    ignore = ignore.copy()
    for other_labels, _, _ in others:
        iou, own_ids, other_ids = iou_matrix(labels, other_labels)
        if not len(own_ids):
            ignore |= other_labels > 0
            continue
        agreed_own = iou.max(axis=1) >= 0.5 if iou.size else np.zeros(len(own_ids), bool)
        confidence[own_ids[~agreed_own]] *= 0.5
        if len(other_ids):
            agreed_other = iou.max(axis=0) >= 0.5 if iou.size else np.zeros(len(other_ids), bool)
            disputed = np.zeros(int(other_labels.max()) + 1, dtype=bool)
            disputed[other_ids[~agreed_other]] = True
            ignore |= disputed[other_labels] & (labels == 0)
    return labels, confidence, ignore


def _bootstrap_view(labels, confidence, ignore, config: TrainingConfig, seed) -> tuple:
    """A head's view: unconfident objects and a random share of the rest become "ignore"."""
    rng = np.random.default_rng(list(seed))
    n = len(confidence) - 1
    hidden = np.zeros(n + 1, dtype=bool)
    hidden[1:] = confidence[1:] < config.min_teacher_confidence
    if config.heads > 1 and config.bootstrap_ignore_fraction > 0 and n:
        hidden[1:] |= rng.random(n) < config.bootstrap_ignore_fraction
    if not config.use_ignore:
        # Ablation: hidden objects become background instead of "ignore".
        return np.where(hidden[labels], 0, labels).astype(np.uint32), confidence, np.zeros_like(ignore)
    view_ignore = (ignore | hidden[labels]) if config.use_ignore else np.zeros_like(ignore)
    return np.where(hidden[labels], 0, labels).astype(np.uint32), confidence, view_ignore


# ----------------------------------------------------------------------------- batches


def _crop_targets(labels: np.ndarray, ignore: np.ndarray) -> dict[str, torch.Tensor]:
    """Targets for one crop: objects cut below half their size by the crop edge become "ignore"."""
    ids, counts = np.unique(labels, return_counts=True)
    keep_ids, masks, boxes = [], [], []
    ignore = ignore.copy()
    objects = ndimage.find_objects(labels)
    for label_id, count in zip(ids, counts):
        if label_id == 0:
            continue
        window = objects[label_id - 1]
        if window is None:
            continue
        mask = labels[window] == label_id
        ys, xs = np.nonzero(mask)
        y0, x0 = window[0].start + ys.min(), window[1].start + xs.min()
        y1, x1 = window[0].start + ys.max() + 1, window[1].start + xs.max() + 1
        touches_edge = y0 == 0 or x0 == 0 or y1 == labels.shape[0] or x1 == labels.shape[1]
        if count < 12 or (touches_edge and count < 40):
            ignore |= labels == label_id
            continue
        full = np.zeros(labels.shape, dtype=np.uint8)
        full[window][mask] = 1
        masks.append(full)
        boxes.append([x0, y0, x1, y1])
        keep_ids.append(label_id)
    height, width = labels.shape
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.ones(len(boxes), dtype=torch.int64),
        "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, height, width), dtype=torch.uint8),
        "ignore_integral": _integral(torch.from_numpy(ignore)),
    }


def sample_batch(images: list[TrainingImage], config: TrainingConfig, rng: np.random.Generator):
    """A batch of augmented crops (B, C, S, S) and every head's targets for them."""
    preset = config.model_preset
    size = preset.crop_size
    areas = np.array([item.image.shape[1] * item.image.shape[2] for item in images], dtype=np.float64)
    picks = rng.choice(len(images), size=preset.batch_size, p=areas / areas.sum())
    crops, head_targets = [], [[] for _ in range(config.heads)]
    for index in picks:
        item = images[index]
        _, height, width = item.image.shape
        y0 = int(rng.integers(0, max(height - size, 0) + 1))
        x0 = int(rng.integers(0, max(width - size, 0) + 1))
        window = (slice(y0, y0 + size), slice(x0, x0 + size))
        flips = (bool(rng.random() < 0.5), bool(rng.random() < 0.5))
        turns = int(rng.integers(0, 4))

        def augment(array: np.ndarray) -> np.ndarray:
            array = array[..., window[0], window[1]]
            pad = [(0, 0)] * (array.ndim - 2) + [(0, size - array.shape[-2]), (0, size - array.shape[-1])]
            array = np.pad(array, pad)
            if flips[0]:
                array = array[..., ::-1, :]
            if flips[1]:
                array = array[..., :, ::-1]
            return np.ascontiguousarray(np.rot90(array, turns, axes=(-2, -1)))

        crop = augment(item.image)
        gain, gamma = rng.uniform(0.75, 1.3), rng.uniform(0.8, 1.25)
        crop = np.clip(crop * gain, 0, 1.5) ** gamma
        crops.append(torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32)))
        for k, (labels, _, ignore) in enumerate(item.views):
            head_targets[k].append(_crop_targets(augment(labels), augment(ignore)))
    return torch.stack(crops), head_targets


# ----------------------------------------------------------------------------- prediction on training images


@torch.no_grad()
def predict_label_image(
    model: MultiHeadMaskRCNN,
    image: np.ndarray,
    tile: int = 320,
    overlap: int = 48,
    flips: tuple[str, ...] = ("none", "h"),
    score_threshold: float = 0.3,
    device: str = "cpu",
    output_shape: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predict a canonical-scale image (C, H, W) in overlapping tiles.

    Returns a uint32 label image (H, W; higher score wins where masks overlap) and, per
    label id (index 0 unused), the consensus score and the head agreement. Each tile keeps
    the objects centred in its core; as two tiles' boxes for one nucleus differ slightly, both
    may claim it, so copies mostly hidden under a higher-scoring object are dropped
    (`suppress_hidden`) over the whole image before the labels are painted.

    With ``output_shape``, ``image`` is a native image of that shape resized to canonical scale,
    and the labels are drawn at native resolution: each mask grid is resized straight into its
    native box, as `segment` does. Upsampling canonical labels instead would give a nucleus
    downscaled 5x a staircase outline of 5-pixel steps.
    """
    model.eval()
    _, height, width = image.shape
    out_height, out_width = output_shape if output_shape is not None else (height, width)
    # Canonical -> output factors per axis (`rescale_image` rounds each side of the native image).
    to_output = torch.tensor([out_width / width, out_height / height] * 2)
    min_pixels = 4 * float(to_output[0] * to_output[1])  # 4 canonical pixels
    boxes, crops, scores, agreements = [], [], [], []
    step = tile - overlap
    ys = list(range(0, max(height - tile, 0) + 1, step)) or [0]
    xs = list(range(0, max(width - tile, 0) + 1, step)) or [0]
    if ys[-1] + tile < height:
        ys.append(height - tile)
    if xs[-1] + tile < width:
        xs.append(width - tile)
    row_cores, col_cores = _tile_cores(ys, tile, height), _tile_cores(xs, tile, width)
    for y0, (core_y0, core_y1) in zip(ys, row_cores):
        for x0, (core_x0, core_x1) in zip(xs, col_cores):
            window = image[:, y0 : y0 + tile, x0 : x0 + tile]
            h, w = window.shape[1:]
            padded = np.zeros((image.shape[0], round_up_to_multiple(h), round_up_to_multiple(w)), dtype=np.float32)
            padded[:, :h, :w] = window
            result = model.predict(torch.from_numpy(padded)[None].to(device), flips=flips,
                                   score_threshold=score_threshold)[0]
            if len(result.boxes) == 0:
                continue
            centres_y = (result.boxes[:, 1] + result.boxes[:, 3]).cpu().numpy() / 2 + y0
            centres_x = (result.boxes[:, 0] + result.boxes[:, 2]).cpu().numpy() / 2 + x0
            keep = (centres_y >= core_y0) & (centres_y < core_y1) & (centres_x >= core_x0) & (centres_x < core_x1)
            if not keep.any():
                continue
            keep_t = torch.from_numpy(np.nonzero(keep)[0])
            image_boxes = (result.boxes[keep_t].cpu() + torch.tensor([x0, y0, x0, y0])) * to_output
            tile_boxes, tile_crops = paste_mask_crops(result.mask_probs[keep_t], image_boxes)
            tile_instances = Instances.from_crops((out_height, out_width), tile_boxes, tile_crops,
                                                  result.scores[keep_t].cpu().numpy(),
                                                  result.head_agreement[keep_t].cpu().numpy())
            boxes.append(tile_instances.boxes)
            crops += tile_instances.crops
            scores.append(tile_instances.scores)
            agreements.append(tile_instances.head_agreement)
    if not crops:
        empty = np.zeros(1, np.float32)
        return np.zeros((out_height, out_width), dtype=np.uint32), empty, empty
    instances = suppress_hidden(
        Instances.from_crops((out_height, out_width), np.concatenate(boxes), crops, np.concatenate(scores),
                             np.concatenate(agreements)),
        MAX_HIDDEN_SHARE,
    )
    labels = np.zeros((out_height, out_width), dtype=np.uint32)
    kept_scores, kept_agreements = [0.0], [0.0]
    for index in np.argsort(-instances.scores, kind="stable"):  # higher score wins shared pixels
        by0, bx0, by1, bx1 = instances.boxes[index]
        window_labels = labels[by0:by1, bx0:bx1]
        take = instances.crops[index] & (window_labels == 0)
        if take.sum() < min_pixels:
            continue
        kept_scores.append(float(instances.scores[index]))
        kept_agreements.append(float(instances.head_agreement[index]))
        window_labels[take] = len(kept_scores) - 1
    return _relabel(labels, np.asarray(kept_scores, np.float32), np.asarray(kept_agreements, np.float32))


def _tile_cores(starts: list[int], tile: int, size: int) -> list[tuple[float, float]]:
    """The part of one axis each tile owns: cores meet half-way across each overlap and
    partition ``[0, size)`` (the last tile, placed flush with the end, may overlap its
    neighbour by more than the nominal overlap)."""
    bounds = [0.0] + [(start + previous + tile) / 2 for previous, start in zip(starts, starts[1:])] + [float(size)]
    return list(zip(bounds[:-1], bounds[1:]))


def _relabel(labels: np.ndarray, *per_label: np.ndarray):
    """Make ids consecutive 1..n (dropping ids that lost all pixels); reorder per-label arrays alike."""
    present = np.unique(labels)
    present = present[present != 0]
    lookup = np.zeros(int(labels.max()) + 1 if labels.size else 1, dtype=np.uint32)
    lookup[present] = np.arange(1, len(present) + 1, dtype=np.uint32)
    relabelled = lookup[labels]
    return (relabelled, *[np.concatenate([[0.0], values[present]]).astype(np.float32) for values in per_label])


# ----------------------------------------------------------------------------- correction and expansion


@dataclass
class RefinementStats:
    kept: int = 0
    outline_fixed: int = 0
    split: int = 0
    merged: int = 0
    added: int = 0
    removed: int = 0
    teacher_objects: int = 0
    student_objects: int = 0
    teacher_student_f1: float = 0.0
    head_agreement: float | None = None

    @property
    def corrected(self) -> int:
        return self.outline_fixed + self.split + self.merged

    @property
    def changed_fraction(self) -> float:
        return (self.corrected + self.added + self.removed) / max(self.teacher_objects, 1)


def refine_pseudo_labels(
    teacher: np.ndarray,
    teacher_confidence: np.ndarray,
    student: np.ndarray,
    student_score: np.ndarray,
    student_agreement: np.ndarray,
    config: TrainingConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, RefinementStats]:
    """Correct the teacher where the student is confident, expand where the teacher saw nothing.

    Parameters
    ----------
    teacher, student : uint32 (H, W) label images.
    teacher_confidence, student_score, student_agreement : float32 (n+1,) per label id.

    Returns
    -------
    labels : uint32 (H, W) new pseudo-labels; confidence : float32 (m+1,);
    ignore : bool (H, W) where the student saw a possible nucleus it was unsure of, or a
    teacher object it did not support; stats : what changed.
    """
    from nuclei_app.evaluate import iou_matrix

    stats = RefinementStats()
    iou, student_ids, teacher_ids = iou_matrix(student, teacher)
    stats.teacher_objects, stats.student_objects = len(teacher_ids), len(student_ids)
    areas_t = np.bincount(teacher.ravel(), minlength=len(teacher_confidence))
    areas_s = np.bincount(student.ravel(), minlength=len(student_score))
    # intersection counts from IoU and areas: |A∩B| = IoU (|A|+|B|) / (1 + IoU)
    a_s = areas_s[student_ids][:, None].astype(np.float64)
    a_t = areas_t[teacher_ids][None, :].astype(np.float64)
    intersection = iou * (a_s + a_t) / (1.0 + iou) if iou.size else iou
    confident = (student_score[student_ids] >= config.correction_score) & (
        student_agreement[student_ids] >= config.correction_agreement
    )

    replace_teacher = np.zeros(len(teacher_ids), dtype=bool)
    paint_student = np.zeros(len(student_ids), dtype=bool)
    remove_teacher = np.zeros(len(teacher_ids), dtype=bool)
    if iou.size and config.use_correction:
        # Splits first: one teacher object holding several confident student nuclei.
        for t in range(len(teacher_ids)):
            parts = np.nonzero(confident & (intersection[:, t] >= 0.5 * a_s[:, 0]))[0]
            if len(parts) >= 2:
                replace_teacher[t] = True
                paint_student[parts] = True
                stats.split += 1
        # Merges: one confident student nucleus covering several teacher fragments.
        for s in np.nonzero(confident & ~paint_student)[0]:
            covered = np.nonzero((intersection[s] >= 0.5 * a_t[0]) & ~replace_teacher)[0]
            if len(covered) >= 2:
                replace_teacher[covered] = paint_student[s] = True
                stats.merged += 1
        # Outlines: the same nucleus (IoU >= 0.5, one-to-one), drawn better by the student.
        for s in np.nonzero(confident & ~paint_student)[0]:
            t = int(iou[s].argmax())
            if 0.5 <= iou[s, t] < 0.8 and not replace_teacher[t]:
                replace_teacher[t] = paint_student[s] = True
                stats.outline_fixed += 1
    if config.use_correction and len(teacher_ids):
        support = (iou >= 0.3) & (student_score[student_ids][:, None] >= config.removal_score) if iou.size else None
        supported = support.any(axis=0) if support is not None else np.zeros(len(teacher_ids), bool)
        unsure_teacher = teacher_confidence[teacher_ids] < config.removal_max_teacher_confidence
        remove_teacher = ~supported & ~replace_teacher & unsure_teacher
        stats.removed = int(remove_teacher.sum())
    if config.use_expansion and len(student_ids):
        overlap_t = intersection.sum(axis=1) / np.maximum(a_s[:, 0], 1) if iou.size else np.zeros(len(student_ids))
        new = (student_score[student_ids] >= config.expansion_score) & (overlap_t < 0.2) & (
            student_agreement[student_ids] >= config.correction_agreement
        )
        new &= ~paint_student
        paint_student |= new
        stats.added = int(new.sum())
    stats.kept = int(len(teacher_ids) - replace_teacher.sum() - remove_teacher.sum())
    if len(teacher_ids) or len(student_ids):
        from nuclei_app.evaluate import score_instances

        stats.teacher_student_f1 = float(score_instances(student, teacher)["f1_50"])

    # Compose the new label image: surviving teacher objects, then the student's replacements/additions.
    drop_ids = np.zeros(len(teacher_confidence), dtype=bool)
    drop_ids[teacher_ids[replace_teacher | remove_teacher]] = True
    labels = np.where(drop_ids[teacher], 0, teacher).astype(np.uint32)
    confidence = list(teacher_confidence)
    next_id = len(teacher_confidence)
    labels_out = labels.copy()
    for s in np.nonzero(paint_student)[0]:
        mask = student == student_ids[s]
        free = mask & ((labels_out == 0) | drop_ids[teacher])
        labels_out[free] = next_id
        confidence.append(float(student_score[student_ids[s]]))
        next_id += 1
    ignore = np.zeros(teacher.shape, dtype=bool)
    removed_ids = np.zeros(len(teacher_confidence), dtype=bool)
    removed_ids[teacher_ids[remove_teacher]] = True
    ignore |= removed_ids[teacher]
    unsure = np.zeros(len(student_score), dtype=bool)
    unsure[student_ids[~paint_student]] = True
    ignore |= unsure[student] & (labels_out == 0)
    relabelled, new_confidence = _relabel(labels_out, np.asarray(confidence, np.float32))
    return relabelled, new_confidence, ignore, stats


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainingResult:
    model_dir: Path
    model: MultiHeadMaskRCNN
    card: dict
    report: dict


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    # Tiny optimizer-state values turn denormal on CPU and make AdamW several times slower.
    torch.set_flush_denormal(True)


def _learning_rate(step: int, total: int, base: float) -> float:
    warmup = min(50, max(total // 10, 1))
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


#: Steps timed before ``fill_budget`` first fits the step count (and so the schedule) to the deadline.
CALIBRATION_STEPS = 10


def _train_steps(model, images, config, steps, rng, device, deadline, on_step) -> tuple[list[float], int, int, bool]:
    """Losses, steps done, steps planned (fitted to the deadline with ``fill_budget``), timed out."""
    preset = config.model_preset
    optimizer = torch.optim.AdamW(model.parameters(), lr=preset.learning_rate, weight_decay=1e-4)
    losses, done, timed_out = [], 0, False
    model.train()
    started = time.monotonic()
    step = 0
    while step < steps:
        if time.monotonic() > deadline:
            timed_out = True
            break
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, steps, preset.learning_rate)
        batch, targets = sample_batch(images, config, rng)
        batch = batch.to(device)
        targets = [[{k: v.to(device) for k, v in t.items()} for t in head] for head in targets]
        loss_terms = model.training_losses(batch, targets)
        loss = sum(loss_terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        done += 1
        on_step(step, steps, losses[-1])
        step += 1
        if config.fill_budget and step >= CALIBRATION_STEPS:
            steps = _steps_that_fit(step, time.monotonic() - started, deadline - time.monotonic())
    return losses, done, steps, timed_out


def _steps_that_fit(steps_done: int, seconds_spent: float, seconds_left: float) -> int:
    """The step count at which the schedule ends before the deadline, at the mean speed so far.

    Refitted after every step (not once after calibration) because steps slow down when the
    machine gets busy or crops hold more nuclei: a count fitted once was cut short by the
    deadline a few steps before the schedule's end. 3% is kept back for the same reason.
    """
    seconds_per_step = seconds_spent / steps_done
    return steps_done + max(int(0.97 * seconds_left / seconds_per_step), 0)


def _foreground_coverage(item: TrainingImage) -> float:
    from skimage.filters import threshold_otsu

    composite = item.image.mean(0)
    if composite.max() <= composite.min():
        return 0.0
    foreground = composite > threshold_otsu(composite)
    return float((item.labels[foreground] > 0).mean()) if foreground.any() else 0.0


def train_model(
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    config: TrainingConfig = TrainingConfig(),
    nuclear_channels: str | Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
    evaluation: Callable[[MultiHeadMaskRCNN, int, list[TrainingImage]], dict] | None = None,
    human_labels: Sequence[str | Path] | None = None,
) -> TrainingResult:
    """Train a student de novo from weak labels alone and write it to ``output_dir``.

    Parameters
    ----------
    inputs : image files (OME-TIFF, OME-Zarr, TIFF) and/or BIDS folders.
    output_dir : model folder; receives ``weights.pt``, ``model_card.json``, ``training_report.json``.
    config : the `TrainingConfig` (preset, heads, rounds, time budget, seed...).
    nuclear_channels : channel names to use (default: every recognised nuclear stain).
    progress : called with one line per notable event (for the CLI's log/progress bar).
    evaluation : optional hook (model, round, training images) -> metrics, used by benchmarks
        with ground truth; its result is stored in that round's report entry, and its time
        is not charged to ``config.max_minutes``.
    human_labels : for supervised upper bounds only (benchmarks): one label image per input
        image file, used instead of the weak labels (needs ``config.rounds == 0``); the model
        card then says ``human_labels_used: true``.
    """
    from nuclei_app.atomic import atomic_directory, atomic_write_json
    from nuclei_app.schemas import validate_instance

    say = progress or (lambda line: log.info(line))
    started = time.time()
    output_dir = Path(output_dir)
    _check_writable_output(output_dir)
    from nuclei_app.segment import resolve_device

    device = resolve_device(config.device)
    _seed_everything(config.seed)
    rng = np.random.default_rng(config.seed)
    preset = config.model_preset

    if human_labels is not None and (config.rounds or len(human_labels) != len(inputs)):
        raise UsageError("training on human masks needs one mask file per input image and rounds=0 "
                         "(self-training would overwrite the masks)")
    images, channel_names, provenance = load_training_images(inputs, config, nuclear_channels)
    say(f"training on {len(images)} image(s) from {len(provenance)} input(s); channels {channel_names}")
    if human_labels is None:
        weak_pseudo_labels(images, config)
    else:
        human_pseudo_labels(images, {str(Path(i).resolve()): Path(m) for i, m in zip(inputs, human_labels)}, config)
    n_teacher = sum(int(item.labels.max()) for item in images)
    if n_teacher < MIN_NUCLEI_TO_TRAIN:
        raise BadDataError(
            f"the {'human masks hold' if human_labels is not None else 'weak labeler found'} {n_teacher} "
            "nuclei in the training images; nothing to learn from "
            "(empty or flat images?). Check the nuclear channels (--nuclear-channels) and the input",
            str(inputs[0]) if inputs else None,
        )
    say(f"round 0 pseudo-labels: {n_teacher} nuclei from "
        + ("human masks" if human_labels is not None else f"weak labelers {list(config.weak_methods)}"))

    model = build_model(len(channel_names), preset, heads=config.heads, use_eca=config.use_eca).to(device)
    deadline = time.monotonic() + config.max_minutes * 60
    default_steps = config.steps_per_round or preset.default_steps_per_round
    rounds_report = []
    timed_out = False
    prediction_pass_seconds = 0.0
    for round_index in range(config.rounds + 1):
        round_started = time.time()
        stats = RefinementStats()
        if round_index > 0:
            pass_started = time.monotonic()
            stats = _self_label(model, images, config, device)
            prediction_pass_seconds = time.monotonic() - pass_started
            say(
                f"round {round_index}: corrected {stats.corrected} (split {stats.split}, merged {stats.merged}, "
                f"outlines {stats.outline_fixed}), added {stats.added}, removed {stats.removed}"
            )
        steps = default_steps if round_index == 0 else max(default_steps // 2, 1)
        # Later rounds fine-tune; the round's remaining share of the time budget caps it.
        round_deadline = min(deadline, time.monotonic() + _round_share(round_index, config) * config.max_minutes * 60)
        if round_index == config.rounds:
            # The last round leaves time for choosing the score threshold (one more prediction pass).
            round_deadline -= prediction_pass_seconds

        recent: list[float] = []

        def on_step(step: int, total: int, loss: float, _round=round_index, _recent=recent) -> None:
            _recent.append(loss)
            if (step + 1) % 50 == 0 or step == total - 1:
                say(f"round {_round} step {step + 1}/{total} mean loss {np.mean(_recent[-50:]):.3f}")

        losses, done, steps, round_timed_out = _train_steps(model, images, config, steps, rng, device, round_deadline,
                                                     on_step)
        timed_out |= round_timed_out
        entry = {
            "round": round_index,
            "steps": done,
            "steps_planned": steps,
            "seconds": round(time.time() - round_started, 2),
            "loss_first": losses[0] if losses else None,
            "loss_last": float(np.mean(losses[-20:])) if losses else None,
            "pseudo_labels": {
                "objects": int(sum(int(item.labels.max()) for item in images)),
                "kept": stats.kept if round_index else int(sum(int(item.labels.max()) for item in images)),
                "corrected": stats.corrected,
                "split": stats.split,
                "merged": stats.merged,
                "outline_fixed": stats.outline_fixed,
                "added": stats.added,
                "removed": stats.removed,
                "changed_fraction": round(stats.changed_fraction, 4),
                "foreground_coverage": round(float(np.mean([_foreground_coverage(i) for i in images])), 4),
            },
            "teacher_student_f1": round(stats.teacher_student_f1, 4) if round_index else None,
            "head_agreement": None if stats.head_agreement is None else round(stats.head_agreement, 4),
            "timed_out": round_timed_out,
        }
        if evaluation is not None:
            hook_started = time.monotonic()
            entry["evaluation"] = evaluation(model, round_index, images)
            deadline += time.monotonic() - hook_started  # scoring is not training: not charged to the budget
        rounds_report.append(entry)
        if round_index > 0 and stats.changed_fraction < config.convergence_fraction:
            say(f"pseudo-labels changed by {stats.changed_fraction:.1%} < {config.convergence_fraction:.1%}: converged")
            break
        if time.monotonic() > deadline:
            say("time budget spent; stopping after this round")
            break

    threshold_choice = choose_score_threshold(model, images, device)
    say(f"score threshold {threshold_choice['score_threshold']:.2f} "
        f"(F1 {max(threshold_choice['f1_vs_pseudo_labels']):.3f} against the pseudo-labels)")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    weights_hash = hashlib.sha256()
    for key in sorted(state):
        weights_hash.update(key.encode())
        weights_hash.update(state[key].numpy().tobytes())
    model_id = f"nuclei-{preset.name}-{weights_hash.hexdigest()[:12]}"
    diameters = [item.source["diameter_px"] for item in images]
    physical = [
        item.source["diameter_px"] * float(np.mean(item.source["pixel_size_um"]))
        for item in images
        if item.source["pixel_size_um"]
    ]
    card = {
        "model_id": model_id,
        "tool": "nuclei-app",
        "version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "architecture": {
            "name": "multi-head Mask R-CNN with efficient channel attention",
            "preset": preset.name,
            "preset_parameters": _jsonable(preset.__dict__),
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
            "seconds": round(time.time() - started, 2),
            "timed_out": timed_out,
            "data": provenance,
            "human_labels_used": human_labels is not None,
        },
        "inference": threshold_choice,
        "weights": {"file": WEIGHTS_FILE, "sha256": weights_hash.hexdigest()},
        "software": software_versions(),
    }
    report = {
        "model_id": model_id,
        "rounds": rounds_report,
        "total_seconds": round(time.time() - started, 2),
        "timed_out": timed_out,
        "converged": len(rounds_report) < config.rounds + 1 and not timed_out,
    }
    validate_instance(card, "model_card")
    validate_instance(report, "training_report")
    with atomic_directory(output_dir) as staging:
        torch.save(state, staging / WEIGHTS_FILE)
        atomic_write_json(staging / MODEL_CARD_FILE, card)
        atomic_write_json(staging / TRAINING_REPORT_FILE, report)
    say(f"model {model_id} written to {output_dir}")
    return TrainingResult(output_dir, model, card, report)


def _check_writable_output(output_dir: Path) -> None:
    """Fail before training, not after minutes of it, when the model folder cannot be written."""
    import os

    if output_dir.exists() and not output_dir.is_dir():
        raise CannotCreateOutputError("exists and is not a folder; choose a model folder path", output_dir)
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CannotCreateOutputError(f"cannot create the parent folder ({error.strerror}); choose a writable path",
                                      output_dir) from None
    if not os.access(output_dir.parent, os.W_OK):
        raise CannotCreateOutputError("the parent folder is not writable; choose a writable path", output_dir)


def _round_share(round_index: int, config: TrainingConfig) -> float:
    """Share of the time budget a round may use: half for round 0, the rest split evenly."""
    if config.rounds == 0:
        return 1.0
    return 0.5 if round_index == 0 else 0.5 / config.rounds


def _self_label(model, images: list[TrainingImage], config: TrainingConfig, device: str) -> RefinementStats:
    """Predict every training image with heads + flips and refine its pseudo-labels in place."""
    total = RefinementStats()
    agreements = []
    for image_index, item in enumerate(images):
        student, score, agreement = predict_label_image(model, item.image, device=device)
        agreements.extend(agreement[1:].tolist())
        labels, confidence, extra_ignore, stats = refine_pseudo_labels(
            item.labels, item.confidence, student, score, agreement, config
        )
        item.labels, item.confidence = labels, confidence
        item.ignore = (item.ignore & (labels == 0)) | extra_ignore
        item.views = [
            _bootstrap_view(labels, confidence, item.ignore, config, seed=(config.seed, image_index, k, 7))
            for k in range(config.heads)
        ]
        for name in ("kept", "outline_fixed", "split", "merged", "added", "removed", "teacher_objects",
                     "student_objects"):
            setattr(total, name, getattr(total, name) + getattr(stats, name))
        total.teacher_student_f1 += stats.teacher_student_f1 / len(images)
    total.head_agreement = float(np.mean(agreements)) if agreements else None
    return total


# ----------------------------------------------------------------------------- score threshold

#: Consensus-score cut-offs `choose_score_threshold` tries (0.10, 0.15, ..., 0.90).
SCORE_THRESHOLD_CANDIDATES: tuple[float, ...] = tuple(round(0.10 + 0.05 * i, 2) for i in range(17))
#: Below this best F1 against its pseudo-labels a student keeps the default cut-off.
MIN_F1_TO_CHOOSE_THRESHOLD = 0.2


def threshold_agreement(student: np.ndarray, student_score: np.ndarray, teacher: np.ndarray, ignore: np.ndarray,
                        candidates: Sequence[float] = SCORE_THRESHOLD_CANDIDATES) -> np.ndarray:
    """How well the student's objects above each score cut-off reproduce the teacher's.

    Parameters
    ----------
    student, teacher : uint32 (H, W) label images.
    student_score : float32 (n+1,), consensus score of student label id i at index i.
    ignore : bool (H, W), where the teacher does not know; unmatched student objects lying
        mostly there count neither way (they may be nuclei the teacher missed).
    candidates : the cut-offs.

    Returns
    -------
    int64 (len(candidates), 3): true positives, false positives, false negatives at IoU > 0.5.
    """
    from nuclei_app.evaluate import iou_matrix

    iou, student_ids, teacher_ids = iou_matrix(student, teacher)
    # Pairs with IoU > 0.5 are one-to-one, so no assignment is needed.
    matched = iou.max(axis=1) > 0.5 if iou.size else np.zeros(len(student_ids), dtype=bool)
    areas = np.bincount(student.ravel(), minlength=len(student_score))
    in_ignore = np.bincount(student[ignore].ravel(), minlength=len(student_score))
    ignored = in_ignore[student_ids] >= 0.5 * areas[student_ids]
    scores = student_score[student_ids]
    tallies = np.zeros((len(candidates), 3), dtype=np.int64)
    for row, cut in enumerate(candidates):
        above = scores >= cut
        true_positives = int((above & matched).sum())
        tallies[row] = (true_positives, int((above & ~matched & ~ignored).sum()), len(teacher_ids) - true_positives)
    return tallies


def choose_score_threshold(model: MultiHeadMaskRCNN, images: list[TrainingImage], device: str = "cpu",
                           candidates: Sequence[float] = SCORE_THRESHOLD_CANDIDATES) -> dict:
    """The consensus-score cut-off at which the student best reproduces its own pseudo-labels.

    No human labels are used: the student labels its training images once at the lowest
    cut-off, and each candidate is scored by F1 (IoU > 0.5) against the final pseudo-labels
    (`threshold_agreement`). A fixed 0.5 suits no data set in particular: on sparse, bright
    nuclei the heads are sure, on dim or crowded ones their scores run lower.

    Returns
    -------
    dict with ``score_threshold`` (float) and, per candidate, ``candidates`` and
    ``f1_vs_pseudo_labels`` (recorded in the model card).
    """
    tallies = np.zeros((len(candidates), 3), dtype=np.int64)
    for item in images:
        student, score, _ = predict_label_image(model, item.image, device=device, flips=("none",),
                                                score_threshold=min(candidates))
        tallies += threshold_agreement(student, score, item.labels, item.ignore, candidates)
    true_positives, false_positives, false_negatives = tallies.T
    f1 = 2 * true_positives / np.maximum(2 * true_positives + false_positives + false_negatives, 1)
    if f1.max() < MIN_F1_TO_CHOOSE_THRESHOLD:
        # A student this far from its own pseudo-labels (a few steps of training) gives no
        # basis for a choice, and a low cut-off would flood slides with its noise.
        threshold = DEFAULT_SCORE_THRESHOLD
        method = (f"default {DEFAULT_SCORE_THRESHOLD}: the student matched its pseudo-labels with F1 "
                  f"{f1.max():.3f} < {MIN_F1_TO_CHOOSE_THRESHOLD} at every cut-off")
    else:
        best = len(f1) - 1 - int(np.argmax(f1[::-1]))  # ties go to the stricter cut-off
        threshold = float(candidates[best])
        method = "best F1 at IoU > 0.5 against the final pseudo-labels on the training images (ignore regions excluded)"
    return {
        "score_threshold": threshold,
        "method": method,
        "candidates": [float(c) for c in candidates],
        "f1_vs_pseudo_labels": [round(float(v), 4) for v in f1],
    }


def _jsonable(values: dict) -> dict:
    return {k: (list(map(list, v)) if k == "anchor_sizes" else list(v) if isinstance(v, tuple) else v)
            for k, v in values.items()}


def predict_native_labels(model: MultiHeadMaskRCNN, image: np.ndarray, scale: float, device: str = "cpu",
                          flips: tuple[str, ...] = ("none", "h"), score_threshold: float = 0.5,
                          outline_contrast_fraction: float | None = OUTLINE_CONTRAST_FRACTION) -> np.ndarray:
    """Label a normalised image (C, H, W) at its own resolution: resize by ``scale``, predict, paste
    the masks at native resolution, trim outlines to the stain (`trim_to_local_contrast`;
    ``outline_contrast_fraction=None``: untrimmed, for ablations).

    Returns uint32 (H, W). For scoring whole images against ground truth (benchmarks, tests);
    slides go through `nuclei_app.segment`, which tiles, stitches and streams.
    """
    labels, _, _ = predict_label_image(model, rescale_image(image, scale), flips=flips, device=device,
                                       score_threshold=score_threshold, output_shape=image.shape[1:])
    if outline_contrast_fraction is None:
        return labels
    # Outlines trimmed at native resolution as `NucleiPredictor` trims them in slides.
    instances = trim_to_local_contrast(Instances.from_label_image(labels), image.mean(axis=0),
                                       model.preset.canonical_diameter / scale, outline_contrast_fraction)
    return instances.select(instances.areas() > 0).to_label_image()
