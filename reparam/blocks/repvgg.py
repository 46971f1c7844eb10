"""RepVGG: the block and the classifier (X. Ding et al., CVPR 2021)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .common import BATCHNORM, conv_bn


class RepVGGBlock(nn.Module):
    """RepVGG's training-time block: `relu(bn(conv3x3(x)) + bn(conv1x1(x)) + bn(x))`.

    The BN-only identity branch exists when the block keeps its shape (same channels, stride 1).
    Deployed, it is one 3x3 conv followed by the ReLU. `spatial_dims` 1 or 3 gives the audio and
    video versions.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1, spatial_dims: int = 2
    ) -> None:
        super().__init__()
        dims = {"groups": groups, "spatial_dims": spatial_dims}
        self.dense = conv_bn(in_channels, out_channels, 3, stride, 1, **dims)
        self.pointwise = conv_bn(in_channels, out_channels, 1, stride, 0, **dims)
        keeps_shape = in_channels == out_channels and stride == 1
        self.identity = BATCHNORM[spatial_dims](in_channels) if keeps_shape else None
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.act(out)


class RepVGG(nn.Module):
    """A RepVGG classifier: five stages of `RepVGGBlock`s, the first block of each with stride 2.

    `RepVGG.a0()` is the paper's A0: blocks [1, 2, 4, 14, 1], width multipliers a=0.75, b=2.5.
    `RepVGG.b0()` is the paper's B0: blocks [1, 4, 6, 16, 1], width multipliers a=1, b=2.5.
    """

    def __init__(
        self, blocks: tuple[int, ...], widths: tuple[int, ...], num_classes: int = 1000, in_channels: int = 3
    ) -> None:
        super().__init__()
        stages = []
        for count, width in zip(blocks, widths):
            stage = [RepVGGBlock(in_channels, width, stride=2)]
            stage += [RepVGGBlock(width, width) for _ in range(count - 1)]
            stages.append(nn.Sequential(*stage))
            in_channels = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(in_channels, num_classes)

    @classmethod
    def a0(cls, num_classes: int = 1000) -> RepVGG:
        a, b = 0.75, 2.5
        widths = (min(64, int(64 * a)), int(64 * a), int(128 * a), int(256 * a), int(512 * b))
        return cls((1, 2, 4, 14, 1), widths, num_classes)

    @classmethod
    def b0(cls, num_classes: int = 1000) -> RepVGG:
        a, b = 1.0, 2.5
        widths = (min(64, int(64 * a)), int(64 * a), int(128 * a), int(256 * a), int(512 * b))
        return cls((1, 4, 6, 16, 1), widths, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.flatten(self.pool(self.stages(x)), 1))
