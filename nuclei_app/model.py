"""The student: a multi-head Mask R-CNN with efficient channel attention, built from torchvision parts.

Composition follows torchvision's detection package: a backbone with an FPN, a region
proposal network, and RoI heads (box + mask) -- here K RoI heads that share one backbone
and one RPN, each taught a different view of the pseudo-labels. At inference the heads
vote: boxes and scores are averaged over heads (and test-time flips), masks are the mean
of every head's mask, and the heads' disagreement is kept per object as an uncertainty.

Training crops may carry an "ignore" mask: anchors and proposals that fall mostly inside
it are neither positives nor negatives, so nuclei the teacher did not label are not
taught as background (without that, the student could never find more than its teacher).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.resnet import BasicBlock
from torchvision.ops import MultiScaleRoIAlign, batched_nms, clip_boxes_to_image, remove_small_boxes
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

from nuclei_app.config import ModelPreset

MASK_SIZE = 28  # side of the mask head's output grid
SCALE_GRID = 8  # resize factors are multiples of 1/8 (see load_predictor)
PROPOSAL_BUDGET_AREA = 256 * 256  # canonical pixels the presets' test-time proposal/detection budgets are for
# RPN objectness below this is never a proposal at test time. It, not the top-k budgets, must
# decide what is proposed: a top-k over a tile depends on what else the tile holds, so a tile
# and a whole-image pass would propose (and detect) different nuclei. The presets' test budgets
# are therefore only safety caps, far above what a tile of densely packed nuclei needs.
OBJECTNESS_THRESHOLD = 0.4
# A detection whose mask lies more than this share under higher-scoring masks is a duplicate or
# a fragment of one nucleus, not an overlapping neighbour (see `instances.suppress_hidden`).
MAX_HIDDEN_SHARE = 0.5


class EfficientChannelAttention(nn.Module):
    """ECA (Wang et al., CVPR 2020): average pooling, 1-D convolution across channels, sigmoid gate.

    The kernel size adapts to the channel count: k = |(log2(C) + b) / gamma|, made odd.
    With ``window`` (odd, in feature cells) the pooling is a local average instead of a
    global one: a whole slide is segmented tile by tile, and a gate computed from each
    tile's global mean would make the same nucleus look different in different tiles.
    """

    def __init__(self, channels: int, gamma: float = 2.0, b: float = 1.0, window: int | None = None) -> None:
        super().__init__()
        t = int(abs((math.log2(max(channels, 1)) + b) / gamma))
        kernel = max(t if t % 2 else t + 1, 1)
        self.conv = nn.Conv1d(1, 1, kernel_size=kernel, padding=kernel // 2, bias=False)
        self.window = None if window is None else max(1, window | 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.window is None:
            pooled = x.mean(dim=(2, 3), keepdim=True)
        else:
            # A box average is separable (and so is count_include_pad=False's divisor): two 1-D
            # passes cost 2k per pixel instead of k^2 -- at full resolution, k is 65.
            pooled = _box_mean(_box_mean(x, self.window, dim=2), self.window, dim=3)
        # The 1-D convolution across channels, at every position at once: channels become the
        # height of a one-channel image and the kernel is (k, 1) (same weights as the Conv1d).
        batch, channels, height, width = pooled.shape
        kernel = self.conv.weight.unsqueeze(-1)  # (1, 1, k, 1)
        stacked = pooled.reshape(batch, 1, channels, height * width)
        gates = torch.sigmoid(F.conv2d(stacked, kernel, padding=(kernel.shape[2] // 2, 0)))
        return x * gates.reshape(batch, channels, height, width)


def _box_mean(x: Tensor, window: int, dim: int) -> Tensor:
    """Mean over a centred window of odd size along ``dim``, the window clipped at the borders.

    Equals ``avg_pool`` with stride 1, padding ``window // 2`` and ``count_include_pad=False``,
    at a cost independent of the window (a running sum; the window is 65 at full resolution).
    """
    size, half = x.shape[dim], window // 2
    moved = x.movedim(dim, -1)
    running = moved.cumsum(-1)
    # Pad the running sum with zeros before and its total after: window sums are then one
    # subtraction of two shifted views, including the clipped windows at both ends.
    padded = torch.cat([torch.zeros_like(running[..., :1]).expand(*running.shape[:-1], half + 1), running,
                        running[..., -1:].expand(*running.shape[:-1], half)], dim=-1)
    sums = padded[..., 2 * half + 1 :] - padded[..., :size]
    index = torch.arange(size, device=x.device)
    counts = (index + half + 1).clamp(max=size) - (index - half).clamp(min=0)
    return (sums / counts.to(x.dtype)).movedim(-1, dim)


ECA_WINDOW_PX = 64  # canonical pixels (about four nuclei) the channel attention pools over


def _eca(channels: int, stride: int, use_eca: bool) -> nn.Module:
    """ECA pooling over ~ECA_WINDOW_PX canonical pixels at a feature map of the given stride."""
    return EfficientChannelAttention(channels, window=max(1, ECA_WINDOW_PX // stride)) if use_eca else nn.Identity()


class SlimBackbone(nn.Module):
    """A shallow residual network for nuclei at canonical scale, with an FPN and ECA on every level.

    Stem (stride 1 or 2) then one torchvision `BasicBlock` per stage, each halving resolution.
    The last ``n_levels`` stages feed a `FeaturePyramidNetwork`.
    """

    def __init__(self, in_channels: int, preset: ModelPreset, use_eca: bool) -> None:
        super().__init__()
        self.input_attention = _eca(in_channels, 1, use_eca)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, preset.stem_channels, 3, stride=preset.stem_stride, padding=1, bias=False),
            nn.BatchNorm2d(preset.stem_channels),
            nn.ReLU(inplace=True),
        )
        stages = []
        previous = preset.stem_channels
        for width in preset.stage_channels:
            downsample = nn.Sequential(nn.Conv2d(previous, width, 1, stride=2, bias=False), nn.BatchNorm2d(width))
            stages.append(BasicBlock(previous, width, stride=2, downsample=downsample))
            previous = width
        self.stages = nn.ModuleList(stages)
        self.n_levels = len(preset.anchor_sizes)
        feature_widths = list(preset.stage_channels[-self.n_levels :])
        self.fpn = FeaturePyramidNetwork(feature_widths, preset.fpn_channels)
        first_stride = preset.stem_stride * 2 ** (len(preset.stage_channels) - self.n_levels + 1)
        self.level_attention = nn.ModuleList(
            _eca(preset.fpn_channels, first_stride * 2**level, use_eca) for level in range(len(feature_widths))
        )
        self.out_channels = preset.fpn_channels

    def forward(self, images: Tensor) -> "OrderedDict[str, Tensor]":
        x = self.stem(self.input_attention(images))
        stage_outputs = []
        for stage in self.stages:
            x = stage(x)
            stage_outputs.append(x)
        selected = stage_outputs[-self.n_levels :]
        pyramid = self.fpn(OrderedDict((str(i), feature) for i, feature in enumerate(selected)))
        return OrderedDict(
            (name, attention(feature)) for (name, feature), attention in zip(pyramid.items(), self.level_attention)
        )


class ResNetFPNWithECA(nn.Module):
    """The paper-sized backbone: torchvision ResNet-50-FPN, randomly initialised, with ECA on input and levels."""

    def __init__(self, in_channels: int, preset: ModelPreset, use_eca: bool) -> None:
        super().__init__()
        # weights=None: trained from scratch, nothing is ever downloaded.
        self.body = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=5)
        if in_channels != 3:
            self.body.body.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.input_attention = _eca(in_channels, 1, use_eca)
        self.level_attention = nn.ModuleList(
            _eca(preset.fpn_channels, 4 * 2**level, use_eca) for level in range(len(preset.anchor_sizes))
        )
        self.out_channels = preset.fpn_channels

    def forward(self, images: Tensor) -> "OrderedDict[str, Tensor]":
        pyramid = self.body(self.input_attention(images))
        return OrderedDict(
            (name, attention(feature)) for (name, feature), attention in zip(pyramid.items(), self.level_attention)
        )


def _integral(mask: Tensor) -> Tensor:
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


def _build_roi_heads(preset: ModelPreset, feature_names: list[str], channels: int) -> IgnoreAwareRoIHeads:
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


@dataclass
class HeadConsensus:
    """Detections of one image at canonical scale, after the heads (and flips) voted.

    boxes (N, 4) float32 x0,y0,x1,y1; scores (N,) mean foreground probability over heads;
    mask_probs (N, 28, 28) mean mask probability over heads; head_agreement (N,) mean
    pairwise IoU of the heads' binarised masks; head_scores (K, N).
    """

    boxes: Tensor
    scores: Tensor
    mask_probs: Tensor
    head_agreement: Tensor
    head_scores: Tensor


FLIPS = {"none": (), "h": (3,), "v": (2,), "hv": (2, 3)}


def _flip_boxes(boxes: Tensor, dims: tuple[int, ...], height: int, width: int) -> Tensor:
    boxes = boxes.clone()
    if 3 in dims:
        boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
    if 2 in dims:
        boxes[:, [1, 3]] = height - boxes[:, [3, 1]]
    return boxes


def _flip_masks(masks: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Flip (N, M, M) mask grids the way the image was flipped (image dims 2, 3 -> mask dims 1, 2)."""
    return masks.flip([d - 1 for d in dims]) if dims else masks


class MultiHeadMaskRCNN(nn.Module):
    """Mask R-CNN with one backbone + RPN and K RoI heads (box + mask)."""

    def __init__(self, in_channels: int, preset: ModelPreset, heads: int = 3, use_eca: bool = True) -> None:
        super().__init__()
        self.preset = preset
        self.in_channels = in_channels
        if preset.backbone == "resnet50":
            self.backbone: nn.Module = ResNetFPNWithECA(in_channels, preset, use_eca)
            feature_names = ["0", "1", "2", "3", "pool"]
        else:
            self.backbone = SlimBackbone(in_channels, preset, use_eca)
            feature_names = [str(i) for i in range(len(preset.anchor_sizes))]
        channels = self.backbone.out_channels
        anchor_generator = AnchorGenerator(
            sizes=preset.anchor_sizes, aspect_ratios=(preset.aspect_ratios,) * len(preset.anchor_sizes)
        )
        self.rpn = IgnoreAwareRPN(
            anchor_generator,
            RPNHead(channels, anchor_generator.num_anchors_per_location()[0]),
            fg_iou_thresh=0.6,
            bg_iou_thresh=0.3,
            batch_size_per_image=preset.rpn_batch_per_image,
            positive_fraction=0.5,
            pre_nms_top_n={"training": preset.rpn_pre_nms_train, "testing": preset.rpn_pre_nms_test},
            post_nms_top_n={"training": preset.rpn_post_nms_train, "testing": preset.rpn_post_nms_test},
            nms_thresh=0.7,
        )
        self.roi_heads = nn.ModuleList(_build_roi_heads(preset, feature_names, channels) for _ in range(heads))

    @property
    def feature_stride(self) -> int:
        """Stride, in canonical pixels, of the coarsest feature map (its grid phase matters)."""
        if self.preset.backbone == "resnet50":
            return 64  # C5 at 32, and the FPN's extra max-pooled level at 64
        return self.preset.stem_stride * 2 ** len(self.preset.stage_channels)

    @property
    def n_heads(self) -> int:
        return len(self.roi_heads)

    def training_losses(self, images: Tensor, head_targets: list[list[dict[str, Tensor]]]) -> dict[str, Tensor]:
        """Losses for a batch (B, C, H, W); ``head_targets[k][b]`` is head k's view of image b.

        Each target holds ``boxes`` (n, 4) float x0y0x1y1, ``labels`` (n,) int64 ones, ``masks``
        (n, H, W) uint8 and optionally ``ignore_integral`` (see `_integral`). The RPN learns from
        the union of all views; head losses are averaged so K does not scale the learning rate.
        """
        sizes = [tuple(images.shape[-2:])] * images.shape[0]
        features = self.backbone(images)
        image_list = ImageList(images, sizes)
        rpn_targets = []
        for b in range(images.shape[0]):
            views = [head_targets[k][b] for k in range(self.n_heads)]
            union = {"boxes": torch.cat([v["boxes"] for v in views]), "labels": torch.cat([v["labels"] for v in views])}
            if "ignore_integral" in views[0]:
                union["ignore_integral"] = views[0]["ignore_integral"]
            rpn_targets.append(union)
        proposals, losses = self.rpn(image_list, features, rpn_targets)
        for k, head in enumerate(self.roi_heads):
            _, head_losses = head(features, [p.detach() for p in proposals], sizes, head_targets[k])
            for name, value in head_losses.items():
                losses[f"head{k}_{name}"] = value / self.n_heads
        return losses

    @torch.no_grad()
    def predict(
        self,
        images: Tensor,
        flips: tuple[str, ...] = ("none",),
        score_threshold: float = 0.5,
        nms_threshold: float = 0.35,
        min_size: float = 2.0,
        objectness_threshold: float = OBJECTNESS_THRESHOLD,
    ) -> list[HeadConsensus]:
        """Consensus detections for a batch (B, C, H, W) at canonical scale.

        Anchors whose RPN objectness is below ``objectness_threshold``, or is not a local
        maximum (`IgnoreAwareRPN`), are dropped before the RPN's NMS (quadratic in the anchors
        kept): that is most of them, and they would only add near-copies of kept proposals.
        On a dense 2k x 2k slide this made inference 1.6x faster at the same F1.
        """
        batch, _, height, width = images.shape
        # Proposal and detection budgets are densities (per PROPOSAL_BUDGET_AREA): a whole image
        # and its tiles then get the same proposals per nucleus, and give the same nuclei.
        area_factor = max(0.25, height * width / PROPOSAL_BUDGET_AREA)
        base_pre, base_post = self.rpn._pre_nms_top_n["testing"], self.rpn._post_nms_top_n["testing"]
        base_threshold = self.rpn.score_thresh
        self.rpn._pre_nms_top_n["testing"] = int(base_pre * area_factor)
        self.rpn._post_nms_top_n["testing"] = int(base_post * area_factor)
        self.rpn.score_thresh = objectness_threshold
        self.rpn.local_maxima_only = True
        try:
            return self._predict(images, flips, score_threshold, nms_threshold, min_size,
                                 int(self.preset.detections_per_image * area_factor))
        finally:
            self.rpn._pre_nms_top_n["testing"], self.rpn._post_nms_top_n["testing"] = base_pre, base_post
            self.rpn.score_thresh = base_threshold
            self.rpn.local_maxima_only = False

    def _predict(self, images, flips, score_threshold, nms_threshold, min_size, max_detections):
        batch, _, height, width = images.shape
        sizes = [(height, width)] * batch
        # Pass 1: for every flip, score and box every proposal with every head.
        candidates: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in range(batch)]
        flip_features = {}
        for flip in flips:
            dims = FLIPS[flip]
            flipped = images.flip(list(dims)) if dims else images
            features = self.backbone(flipped)
            flip_features[flip] = features
            proposals, _ = self.rpn(ImageList(flipped, sizes), features)
            per_head_scores, per_head_boxes = [], []
            # Every head pools the same proposals from the same features: pool once.
            pooled_features = self.roi_heads[0].box_roi_pool(features, proposals, sizes)
            for head in self.roi_heads:
                pooled = head.box_head(pooled_features)
                logits, regression = head.box_predictor(pooled)
                decoded = head.box_coder.decode(regression, proposals)[:, 1].reshape(-1, 4)  # (0, 4) when none
                per_head_scores.append(F.softmax(logits, -1)[:, 1])
                per_head_boxes.append(decoded)
            scores_all = torch.stack(per_head_scores)  # (K, sumN)
            boxes_mean = torch.stack(per_head_boxes).mean(0)
            offset = 0
            for b, proposals_in_image in enumerate(proposals):
                n = len(proposals_in_image)
                boxes_b = _flip_boxes(boxes_mean[offset : offset + n], dims, height, width)
                candidates[b].append((boxes_b, scores_all[:, offset : offset + n].mean(0), scores_all[:, offset : offset + n]))
                offset += n
        # Pass 2: NMS over the pooled candidates, then every head's mask for the kept boxes.
        results = []
        for b in range(batch):
            boxes = clip_boxes_to_image(torch.cat([c[0] for c in candidates[b]]), (height, width))
            scores = torch.cat([c[1] for c in candidates[b]])
            head_scores = torch.cat([c[2] for c in candidates[b]], dim=1)
            keep = torch.where(scores >= score_threshold)[0]
            keep = keep[remove_small_boxes(boxes[keep], min_size)]
            keep = keep[batched_nms(boxes[keep], scores[keep], torch.zeros_like(keep), nms_threshold)]
            keep = keep[:max_detections]
            boxes, scores, head_scores = boxes[keep], scores[keep], head_scores[:, keep]
            if len(boxes) == 0:
                empty = torch.zeros((0, MASK_SIZE, MASK_SIZE))
                results.append(HeadConsensus(boxes, scores, empty, scores.clone(), head_scores))
                continue
            head_masks = []  # (K * n_flips, N, M, M)
            for flip in flips:
                dims = FLIPS[flip]
                flipped_boxes = _flip_boxes(boxes, dims, height, width)
                features_b = OrderedDict((k, v[b : b + 1]) for k, v in flip_features[flip].items())
                pooled_features = self.roi_heads[0].mask_roi_pool(features_b, [flipped_boxes], [(height, width)])
                for head in self.roi_heads:
                    pooled = head.mask_head(pooled_features)
                    probs = torch.sigmoid(head.mask_predictor(pooled)[:, 1])
                    head_masks.append(_flip_masks(probs, dims))
            stacked = torch.stack(head_masks)
            results.append(
                HeadConsensus(boxes, scores, stacked.mean(0), _pairwise_mask_agreement(stacked > 0.5), head_scores)
            )
        return results


def _pairwise_mask_agreement(binary: Tensor) -> Tensor:
    """Mean pairwise IoU between K binary mask grids (K, N, M, M) -> (N,); 1.0 when K == 1."""
    k = binary.shape[0]
    if k < 2:
        return torch.ones(binary.shape[1])
    flat = binary.flatten(2).float()  # (K, N, M*M)
    total, pairs = torch.zeros(binary.shape[1]), 0
    for i in range(k):
        for j in range(i + 1, k):
            intersection = (flat[i] * flat[j]).sum(-1)
            union = ((flat[i] + flat[j]) > 0).float().sum(-1)
            total += torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))
            pairs += 1
    return total / pairs


def paste_mask_crops(mask_probs: Tensor, boxes: Tensor, threshold: float = 0.5) -> tuple[np.ndarray, list[np.ndarray]]:
    """Binarise each detection's mask grid inside its own box, the way Mask R-CNN pastes masks.

    Same geometry as torchvision's ``paste_masks_in_image`` (grid padded by one cell, box
    grown to match, bilinear resize to the integer box) but each mask stays a crop of its
    box instead of a full-image canvas: the cost follows the nuclei, not N x H x W.

    Parameters
    ----------
    mask_probs : Tensor, float, shape (N, M, M)
        Mask probabilities on the head's grid.
    boxes : Tensor, float, shape (N, 4)
        ``(x0, y0, x1, y1)`` in the pixels of the image the masks go to.

    Returns
    -------
    boxes : ndarray of int64, shape (N, 4)
        ``(y0, x0, y1, x1)`` half-open; may reach outside the image (`Instances.from_crops` clips).
    crops : list of N ndarrays of bool
        Each mask over its box.
    """
    if len(boxes) == 0:
        return np.zeros((0, 4), np.int64), []
    padded, factor = expand_masks(mask_probs[:, None].float().cpu(), padding=1)
    grown = expand_boxes(boxes.float().cpu(), factor).to(torch.int64).tolist()
    out_boxes, crops = [], []
    for grid, (x0, y0, x1, y1) in zip(padded, grown):
        height, width = max(y1 - y0 + 1, 1), max(x1 - x0 + 1, 1)
        resized = F.interpolate(grid[None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
        out_boxes.append((y0, x0, y0 + height, x0 + width))
        crops.append((resized > threshold).numpy())
    return np.asarray(out_boxes, np.int64), crops


def build_model(in_channels: int, preset: ModelPreset, heads: int = 3, use_eca: bool = True) -> MultiHeadMaskRCNN:
    """A randomly initialised student (never pretrained)."""
    return MultiHeadMaskRCNN(in_channels, preset, heads=heads, use_eca=use_eca)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- saved models and inference

WEIGHTS_FILE = "weights.pt"
#: Score cut-off of models whose card predates per-model thresholds (`model_score_threshold`).
DEFAULT_SCORE_THRESHOLD = 0.5
MODEL_CARD_FILE = "model_card.json"
TRAINING_REPORT_FILE = "training_report.json"


def load_model(model_dir, device: str = "cpu") -> tuple[MultiHeadMaskRCNN, dict]:
    """Load a trained student and its card; weights go through ``torch.load(weights_only=True)``."""
    import json
    from pathlib import Path

    from nuclei_app.config import get_preset
    from nuclei_app.errors import BadDataError, MissingInputError
    from nuclei_app.schemas import validate_instance

    model_dir = Path(model_dir)
    card_path = model_dir / MODEL_CARD_FILE
    if not card_path.is_file() or not (model_dir / WEIGHTS_FILE).is_file():
        raise MissingInputError(
            f"not a model folder (needs {MODEL_CARD_FILE} and {WEIGHTS_FILE}); train one with `nuclei-app train`",
            model_dir,
        )
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as error:
        raise BadDataError(f"unreadable model card ({error}); retrain the model", card_path) from None
    validate_instance(card, "model_card", card_path)
    architecture = card["architecture"]
    model = build_model(
        architecture["in_channels"], get_preset(architecture["preset"]), heads=architecture["heads"],
        use_eca=architecture["eca"],
    )
    try:
        state = torch.load(model_dir / WEIGHTS_FILE, map_location=device, weights_only=True)
        model.load_state_dict(state)
    except Exception as error:  # corrupt or foreign weights: the user must retrain, not debug
        raise BadDataError(
            f"cannot load weights ({type(error).__name__}); retrain the model", model_dir / WEIGHTS_FILE
        ) from None
    return model.to(device).eval(), card


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
    def max_object_px(self) -> float:
        """Largest nucleus the model can output, in tile pixels (for choosing the tile overlap)."""
        largest_anchor = max(max(sizes) for sizes in self.model.preset.anchor_sizes)
        return 2.0 * largest_anchor / self.scale

    @property
    def tile_origin_quantum_px(self) -> int:
        """Tile origins that are multiples of this many tile pixels land on the model's coarsest
        feature grid after resizing, so a nucleus is seen with the same feature-grid phase in
        every tile (and in a whole-image pass): tiling then does not change what is detected."""
        steps = round(self.scale * SCALE_GRID)  # scale = steps / SCALE_GRID (see load_predictor)
        period = SCALE_GRID * self.model.feature_stride
        return period // math.gcd(steps, period)

    @torch.no_grad()
    def predict_batch(self, tiles: list) -> list:
        """Predict tiles, each float32 (C, H, W) normalised by slide percentiles -> list of `Instances`."""
        from nuclei_app.instances import Instances, suppress_hidden, trim_to_local_contrast

        if not tiles:
            return []
        shapes = [tile.shape[1:] for tile in tiles]
        resized = [
            F.interpolate(torch.from_numpy(np.ascontiguousarray(t, dtype=np.float32))[None], scale_factor=self.scale,
                          mode="bilinear", antialias=self.scale < 1, align_corners=False, recompute_scale_factor=False)[0]
            if abs(self.scale - 1) > 1e-3 else torch.from_numpy(np.ascontiguousarray(t, dtype=np.float32))
            for t in tiles
        ]
        height = max(round_up_to_multiple(r.shape[1]) for r in resized)
        width = max(round_up_to_multiple(r.shape[2]) for r in resized)
        batch = torch.zeros((len(tiles), tiles[0].shape[0], height, width))
        for index, tile in enumerate(resized):
            batch[index, :, : tile.shape[1], : tile.shape[2]] = tile
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


def round_up_to_multiple(n: int, multiple: int = 32) -> int:
    """Smallest multiple of ``multiple`` >= n (feature strides need divisible sizes)."""
    return int(math.ceil(n / multiple) * multiple)


def model_score_threshold(card: dict) -> float:
    """The score cut-off a model card records (chosen at training), or 0.5 for older cards."""
    return float(card.get("inference", {}).get("score_threshold", DEFAULT_SCORE_THRESHOLD))


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
