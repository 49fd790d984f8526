"""Backbones with efficient channel attention (ECA) and a feature pyramid."""
from __future__ import annotations

import math
from collections import OrderedDict
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.resnet import BasicBlock
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork
from nuclei_app.config import ModelPreset


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

