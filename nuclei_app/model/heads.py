"""Ignore-aware region proposal network and RoI heads."""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import MultiScaleRoIAlign
from nuclei_app.config import ModelPreset


# RPN objectness below this is never a proposal at test time. It, not the top-k budgets, must
# decide what is proposed: a top-k over a tile depends on what else the tile holds, so a tile
# and a whole-image pass would propose (and detect) different nuclei. The presets' test budgets
# are therefore only safety caps, far above what a tile of densely packed nuclei needs.
OBJECTNESS_THRESHOLD = 0.4


def integral_image(mask: Tensor) -> Tensor:
    """Summed-area table of a (H, W) mask, shape (H+1, W+1), for O(1) box sums."""
    table = F.pad(mask.to(torch.float32), (1, 0, 1, 0))
    return table.cumsum(0).cumsum(1)


def ignored_fraction(boxes: Tensor, integral: Tensor) -> Tensor:
    """Share of each box (N, 4; x0, y0, x1, y1) covered by the ignore mask behind ``integral``."""
    height, width = integral.shape[0] - 1, integral.shape[1] - 1
    x0 = boxes[:, 0].floor().clamp(0, width).long()
    y0 = boxes[:, 1].floor().clamp(0, height).long()
    x1 = boxes[:, 2].ceil().clamp(0, width).long()
    y1 = boxes[:, 3].ceil().clamp(0, height).long()
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = ((x1 - x0) * (y1 - y0)).clamp(min=1).to(torch.float32)
    return inside / area


MASK_SIZE = 28  # side of the mask head's output grid

IGNORE_OVERLAP = 0.4  # a would-be negative anchor/proposal this much inside "ignore" teaches nothing


class IgnoreAwareRPN(RegionProposalNetwork):
    """RPN whose background anchors inside ignore regions are dropped from the loss.

    At test time, with ``local_maxima_only``, an anchor is proposed only where its objectness
    is the largest among the same anchor shape in the 3 x 3 neighbouring cells: a nucleus
    lights up a blob of anchors, and sending the whole blob through NMS (quadratic) and the
    box heads costs most of inference while adding only near-copies of one box.
    """

    local_maxima_only = False
    _level_shapes: list[tuple[int, int]] = []

    def forward(self, images, features, targets=None):
        self._level_shapes = [tuple(feature.shape[-2:]) for feature in features.values()]
        return super().forward(images, features, targets)

    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):
        if self.local_maxima_only and not self.training:
            objectness = _suppress_non_maxima(objectness.detach().reshape(proposals.shape[0], -1),
                                              self._level_shapes, num_anchors_per_level)
        return super().filter_proposals(proposals, objectness, image_shapes, num_anchors_per_level)

    def assign_targets_to_anchors(self, anchors, targets):
        labels, matched_gt_boxes = super().assign_targets_to_anchors(anchors, targets)
        for anchors_per_image, labels_per_image, target in zip(anchors, labels, targets):
            if "ignore_integral" in target:
                background = labels_per_image == 0
                inside = ignored_fraction(anchors_per_image, target["ignore_integral"]) > IGNORE_OVERLAP
                labels_per_image[background & inside] = -1.0
        return labels, matched_gt_boxes


class IgnoreAwareRoIHeads(RoIHeads):
    """RoI heads whose background proposals inside ignore regions are not sampled."""

    _ignore_integrals: list[Tensor | None] | None = None

    def select_training_samples(self, proposals, targets):
        self._ignore_integrals = [target.get("ignore_integral") for target in targets]
        try:
            return super().select_training_samples(proposals, targets)
        finally:
            self._ignore_integrals = None

    def assign_targets_to_proposals(self, proposals, gt_boxes, gt_labels):
        matched_idxs, labels = super().assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
        if self._ignore_integrals is not None:
            for proposals_in_image, labels_in_image, integral in zip(proposals, labels, self._ignore_integrals):
                if integral is not None:
                    background = labels_in_image == 0
                    inside = ignored_fraction(proposals_in_image, integral) > IGNORE_OVERLAP
                    labels_in_image[background & inside] = -1
        return matched_idxs, labels


def _suppress_non_maxima(objectness: Tensor, level_shapes: list[tuple[int, int]],
                         anchors_per_level: list[int]) -> Tensor:
    """Objectness logits (B, sum of H*W*A) with every anchor that is not a 3 x 3 spatial maximum
    of its own anchor shape set to -inf (torchvision lays each level out as H, W, A)."""
    pieces, start = [], 0
    for (height, width), count in zip(level_shapes, anchors_per_level):
        level = objectness[:, start : start + count].reshape(-1, height, width, count // (height * width))
        grid = level.permute(0, 3, 1, 2)
        peaks = grid >= F.max_pool2d(grid, 3, stride=1, padding=1)
        pieces.append(torch.where(peaks, grid, torch.full_like(grid, -math.inf)).permute(0, 2, 3, 1).reshape(
            objectness.shape[0], -1))
        start += count
    return torch.cat(pieces, dim=1)


def build_roi_heads(preset: ModelPreset, feature_names: list[str], channels: int) -> IgnoreAwareRoIHeads:
    # Nuclei are small at canonical scale: pool from the finest level for the slim nets.
    pooled_levels = feature_names if preset.backbone == "resnet50" else feature_names[:1]
    box_pool = MultiScaleRoIAlign(featmap_names=pooled_levels, output_size=7, sampling_ratio=2)
    mask_pool = MultiScaleRoIAlign(featmap_names=pooled_levels, output_size=MASK_SIZE // 2, sampling_ratio=2)
    return IgnoreAwareRoIHeads(
        box_roi_pool=box_pool,
        box_head=TwoMLPHead(channels * 7 * 7, preset.box_head_width),
        box_predictor=FastRCNNPredictor(preset.box_head_width, 2),
        fg_iou_thresh=0.5,
        bg_iou_thresh=0.4,
        batch_size_per_image=preset.roi_batch_per_image,
        positive_fraction=preset.roi_positive_fraction,
        bbox_reg_weights=None,
        score_thresh=0.05,
        nms_thresh=0.4,
        detections_per_img=preset.detections_per_image,
        mask_roi_pool=mask_pool,
        mask_head=MaskRCNNHeads(channels, list(preset.mask_head_layers), 1),
        mask_predictor=MaskRCNNPredictor(preset.mask_head_layers[-1], preset.mask_head_layers[-1], 2),
    )

