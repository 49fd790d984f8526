"""Pseudo-labels: teachers, cross-check, the student's corrections and expansions."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import numpy as np
import torch
from nuclei_app.config import TrainingConfig
from nuclei_app.errors import BadDataError
from nuclei_app.model.mask_rcnn import MAX_HIDDEN_SHARE, MultiHeadMaskRCNN, paste_mask_crops
from nuclei_app.core.instances import Instances, suppress_hidden
from nuclei_app.seeding import generator
from nuclei_app.model.transform import pad_batch
from nuclei_app.train.data import TrainingImage
from nuclei_app.core.weak import weak_labels
from nuclei_app.core.metrics import as_label_image
from nuclei_app.io.slides import open_slide
from nuclei_app.core.metrics import iou_matrix
from nuclei_app.core.metrics import score_instances
from nuclei_app.core.tiling import tile_cores


# ----------------------------------------------------------------------------- pseudo-labels


def weak_pseudo_labels(images: list[TrainingImage], config: TrainingConfig) -> None:
    """Round 0: every head's view from a weak labeler, with a bootstrap share of objects hidden."""

    diameter = config.model_preset.canonical_diameter
    for image_index, item in enumerate(images):
        per_method = {}
        for method in dict.fromkeys(config.weak_methods):
            # The image is already normalised with whole-slide percentiles: keep that scaling.
            identity = np.tile(np.array([0.0, 1.0], dtype=np.float32), (item.image.shape[0], 1))
            result = weak_labels(item.image, method=method, diameter=diameter, percentiles=identity)
            confidence = np.concatenate([[0.0], result.confidence]).astype(np.float32)
            labels = result.labels.astype(np.uint32)
            per_method[method] = (labels, distrust_clumps(labels, confidence, config), result.ignore.astype(bool))
        if config.teacher_agreement and len(per_method) > 1:
            per_method = {method: cross_checked(view, [v for m, v in per_method.items() if m != method])
                          for method, view in per_method.items()}
        item.labels, item.confidence, item.ignore = per_method[config.weak_methods[0]]
        item.views = [
            _bootstrap_view(*per_method[config.weak_methods[k % len(config.weak_methods)]], config,
                            key=(0, image_index, k))
            for k in range(config.heads)
        ]


#: A pseudo-label this many times the median object's area is probably nuclei the labeler did
#: not split (two equal touching nuclei measure 2x): it is taught as "ignore", not as one nucleus.
CLUMP_AREA_RATIO = 2.0


def distrust_clumps(labels: np.ndarray, confidence: np.ndarray, config: TrainingConfig) -> np.ndarray:
    """Confidence with probable clumps (unsplit touching nuclei) set below the teaching cut-off.

    A teacher's merges are systematic, not random: a student taught them learns to merge.
    Hidden as "ignore", a clump teaches neither one nucleus nor background, so the student
    learns single nuclei from the rest and may split the clump itself (a correction).

    labels : uint32 (H, W); confidence : float32 (n+1,) per label id. Returns a copy.
    """
    confidence = confidence.copy()
    areas = np.bincount(labels.ravel(), minlength=len(confidence))[1:]
    present = areas > 0
    if present.sum() < 5:  # too few objects for a typical size
        return confidence
    clumps = np.flatnonzero(present & (areas > CLUMP_AREA_RATIO * np.median(areas[present]))) + 1
    confidence[clumps] = np.minimum(confidence[clumps], 0.5 * config.min_teacher_confidence)
    return confidence


def untaught(confidence: np.ndarray, min_confidence: float) -> np.ndarray:
    """Which label ids are taught as "ignore" rather than as nuclei: confidence below the cut-off.

    confidence : float32 (n+1,) per label id (index 0, background, is never untaught).
    Returns bool (n+1,). The one rule for the heads' views and for the score cut-off's choice.
    """
    hidden = confidence < min_confidence
    hidden[0] = False
    return hidden


def human_pseudo_labels(images: list[TrainingImage], label_files: dict[str, Path], config: TrainingConfig) -> None:
    """Supervised variant of round 0: every head learns from human masks (upper bounds in benchmarks).

    label_files maps each input's resolved path (``TrainingImage.source["path"]``) to a label
    image of the same height and width. Regions are cut out and resized to canonical scale
    with nearest-neighbour sampling; every object gets confidence 1, nothing is "ignore"
    (beyond the heads' bootstrap subsets, as in weak training).
    """

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
        item.views = [_bootstrap_view(labels, confidence, item.ignore, config, key=(0, image_index, k))
                      for k in range(config.heads)]


def _read_human_labels(path: Path) -> np.ndarray:

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


def _bootstrap_view(labels, confidence, ignore, config: TrainingConfig, key: tuple[int, ...]) -> tuple:
    """A head's view: unconfident objects and a random share of the rest become "ignore".

    ``key`` names the view's own random stream (`nuclei_app.seeding`, ``pseudo_label_views``).
    """
    rng = generator(config.seed, "pseudo_label_views", *key)
    n = len(confidence) - 1
    hidden = untaught(confidence, config.min_teacher_confidence)
    if config.heads > 1 and config.bootstrap_ignore_fraction > 0 and n:
        hidden[1:] |= rng.random(n) < config.bootstrap_ignore_fraction
    if not config.use_ignore:
        # Ablation: hidden objects become background instead of "ignore".
        return np.where(hidden[labels], 0, labels).astype(np.uint32), confidence, np.zeros_like(ignore)
    return np.where(hidden[labels], 0, labels).astype(np.uint32), confidence, ignore | hidden[labels]


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
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predict a canonical-scale image (C, H, W) in overlapping tiles.

    Returns a uint32 label image (H, W; higher score wins where masks overlap) and, per
    label id (index 0 unused), the consensus score and the head agreement. Each tile keeps
    the objects centred in its core; as two tiles' boxes for one nucleus differ slightly, both
    may claim it, so copies mostly hidden under a higher-scoring object are dropped
    (`suppress_hidden`) over the whole image before the labels are painted.

    For self-training only (training images are already at canonical scale); slides and
    benchmarks are labelled by `nuclei_app.segment`, at their native resolution.
    """
    model.eval()
    _, height, width = image.shape
    min_pixels = 4
    boxes, crops, scores, agreements = [], [], [], []
    step = tile - overlap
    ys = list(range(0, max(height - tile, 0) + 1, step)) or [0]
    xs = list(range(0, max(width - tile, 0) + 1, step)) or [0]
    if ys[-1] + tile < height:
        ys.append(height - tile)
    if xs[-1] + tile < width:
        xs.append(width - tile)
    row_cores, col_cores = tile_cores(ys, tile, height), tile_cores(xs, tile, width)
    for y0, (core_y0, core_y1) in zip(ys, row_cores):
        for x0, (core_x0, core_x1) in zip(xs, col_cores):
            window = image[:, y0 : y0 + tile, x0 : x0 + tile]
            result = model.predict(pad_batch([window]).to(device), flips=flips,
                                   score_threshold=score_threshold)[0]
            if len(result.boxes) == 0:
                continue
            centres_y = (result.boxes[:, 1] + result.boxes[:, 3]).cpu().numpy() / 2 + y0
            centres_x = (result.boxes[:, 0] + result.boxes[:, 2]).cpu().numpy() / 2 + x0
            keep = (centres_y >= core_y0) & (centres_y < core_y1) & (centres_x >= core_x0) & (centres_x < core_x1)
            if not keep.any():
                continue
            keep_t = torch.from_numpy(np.nonzero(keep)[0])
            image_boxes = result.boxes[keep_t].cpu() + torch.tensor([x0, y0, x0, y0])
            tile_boxes, tile_crops = paste_mask_crops(result.mask_probs[keep_t], image_boxes)
            tile_instances = Instances.from_crops((height, width), tile_boxes, tile_crops,
                                                  result.scores[keep_t].cpu().numpy(),
                                                  result.head_agreement[keep_t].cpu().numpy())
            boxes.append(tile_instances.boxes)
            crops += tile_instances.crops
            scores.append(tile_instances.scores)
            agreements.append(tile_instances.head_agreement)
    if not crops:
        empty = np.zeros(1, np.float32)
        return np.zeros((height, width), dtype=np.uint32), empty, empty
    instances = suppress_hidden(
        Instances.from_crops((height, width), np.concatenate(boxes), crops, np.concatenate(scores),
                             np.concatenate(agreements)),
        MAX_HIDDEN_SHARE,
    )
    labels = np.zeros((height, width), dtype=np.uint32)
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


def self_label(model, images: list[TrainingImage], config: TrainingConfig, device: str) -> RefinementStats:
    """Predict every training image with heads + flips and refine its pseudo-labels in place."""
    total = RefinementStats()
    agreements = []
    for image_index, item in enumerate(images):
        student, score, agreement = predict_label_image(model, item.image, device=device)
        agreements.extend(agreement[1:].tolist())
        labels, confidence, extra_ignore, stats = refine_pseudo_labels(
            item.labels, item.confidence, student, score, agreement, config
        )
        confidence = distrust_clumps(labels, confidence, config)
        item.labels, item.confidence = labels, confidence
        item.ignore = (item.ignore & (labels == 0)) | extra_ignore
        item.views = [
            _bootstrap_view(labels, confidence, item.ignore, config, key=(1, image_index, k))
            for k in range(config.heads)
        ]
        for name in ("kept", "outline_fixed", "split", "merged", "added", "removed", "teacher_objects",
                     "student_objects"):
            setattr(total, name, getattr(total, name) + getattr(stats, name))
        total.teacher_student_f1 += stats.teacher_student_f1 / len(images)
    total.head_agreement = float(np.mean(agreements)) if agreements else None
    return total
