"""Choose the model's score cut-off without labels."""
from __future__ import annotations

from typing import Sequence
import numpy as np
from nuclei_app.model.mask_rcnn import MultiHeadMaskRCNN
from nuclei_app.model.checkpoint import DEFAULT_SCORE_THRESHOLD
from nuclei_app.train.data import TrainingImage
from nuclei_app.train.pseudo_labels import predict_label_image, untaught
from nuclei_app.core.metrics import iou_matrix


# ----------------------------------------------------------------------------- score threshold

#: Consensus-score cut-offs `choose_score_threshold` tries (0.10, 0.15, ..., 0.90).
MIN_F1_TO_CHOOSE_THRESHOLD = 0.2

SCORE_THRESHOLD_CANDIDATES: tuple[float, ...] = tuple(round(0.10 + 0.05 * i, 2) for i in range(17))


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
                           candidates: Sequence[float] = SCORE_THRESHOLD_CANDIDATES,
                           min_confidence: float = 0.0) -> dict:
    """The consensus-score cut-off at which the student best reproduces its own pseudo-labels.

    No human labels are used: the student labels its training images once at the lowest
    cut-off, and each candidate is scored by F1 (IoU > 0.5) against the final pseudo-labels
    (`threshold_agreement`). A fixed 0.5 suits no data set in particular: on sparse, bright
    nuclei the heads are sure, on dim or crowded ones their scores run lower.

    Pseudo-labels below ``min_confidence`` (the teaching cut-off,
    ``TrainingConfig.min_teacher_confidence``: unsure objects and probable clumps, see
    `nuclei_app.train.pseudo_labels.distrust_clumps`) were taught as "ignore", so they count
    as ignore here too: a student that splits a clump is not charged for it.

    Returns
    -------
    dict with ``score_threshold`` (float) and, per candidate, ``candidates`` and
    ``f1_vs_pseudo_labels`` (recorded in the model card).
    """
    tallies = np.zeros((len(candidates), 3), dtype=np.int64)
    for item in images:
        student, score, _ = predict_label_image(model, item.image, device=device, flips=("none",),
                                                score_threshold=min(candidates))
        # Pseudo-labels below the teaching cut-off were taught as "ignore": they judge nothing here.
        hidden = untaught(item.confidence, min_confidence)[item.labels]
        teacher = np.where(hidden, 0, item.labels)
        tallies += threshold_agreement(student, score, teacher, item.ignore | hidden, candidates)
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
        method = ("best F1 at IoU > 0.5 against the final pseudo-labels on the training images (ignore regions "
                  "and untaught pseudo-labels excluded)")
    return {
        "score_threshold": threshold,
        "method": method,
        "candidates": [float(c) for c in candidates],
        "f1_vs_pseudo_labels": [round(float(v), 4) for v in f1],
    }


def jsonable(values: dict) -> dict:
    return {k: (list(map(list, v)) if k == "anchor_sizes" else list(v) if isinstance(v, tuple) else v)
            for k, v in values.items()}

