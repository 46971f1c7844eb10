"""MobileOne: the over-parameterized block and an S0-style classifier (P. K. A. Vasu et al., CVPR 2023)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .common import conv_bn


class MobileOneBlock(nn.Module):
    """MobileOne's training-time block: `relu(sum_i bn(convKxK_i(x)) + bn(conv1x1(x)) + bn(x))`.

    * `num_branches` over-parameterized KxK conv + BN branches;
    * a 1x1 conv + BN "scale" branch, when `kernel_size > 1`;
    * a BN-only identity branch, when the block keeps its shape (same channels, stride 1).

    `groups` applies to every conv (MobileOne's depthwise blocks use `groups=channels`).
    Deployed, it is one KxK conv followed by the ReLU.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        num_branches: int = 1,
    ) -> None:
        super().__init__()
        if num_branches < 1:
            raise ValueError(f"num_branches must be at least 1, got {num_branches}")
        pad = kernel_size // 2
        self.branches = nn.ModuleList(
            conv_bn(in_channels, out_channels, kernel_size, stride, pad, groups) for _ in range(num_branches)
        )
        self.scale = conv_bn(in_channels, out_channels, 1, stride, 0, groups) if kernel_size > 1 else None
        keeps_shape = in_channels == out_channels and stride == 1
        self.identity = nn.BatchNorm2d(in_channels) if keeps_shape else None
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        if self.scale is not None:
            out = out + self.scale(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.act(out)


class MobileOne(nn.Module):
    """A MobileOne classifier: a stem block, then stages of depthwise 3x3 + pointwise 1x1 blocks.

    Each stage's first depthwise block has stride 2. `MobileOne.s0()` (also `MobileOneS0()`) is
    the paper's S0: stages of (2, 8, 10, 1) blocks, width multipliers (0.75, 1.0, 1.0, 2.0), k = 4.
    """

    def __init__(
        self,
        blocks: tuple[int, ...] = (2, 8, 10, 1),
        widths: tuple[int, ...] = (48, 128, 256, 1024),
        stem_width: int = 48,
        num_branches: int = 4,
        num_classes: int = 1000,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.stem = MobileOneBlock(in_channels, stem_width, 3, 2, num_branches=num_branches)
        stages, channels = [], stem_width
        for count, width in zip(blocks, widths):
            layers: list[nn.Module] = []
            for index in range(count):
                stride = 2 if index == 0 else 1
                layers.append(MobileOneBlock(channels, channels, 3, stride, groups=channels, num_branches=num_branches))
                layers.append(MobileOneBlock(channels, width, 1, 1, num_branches=num_branches))
                channels = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)

    @classmethod
    def s0(cls, num_classes: int = 1000) -> MobileOne:
        multipliers = (0.75, 1.0, 1.0, 2.0)
        widths = tuple(int(base * m) for base, m in zip((64, 128, 256, 512), multipliers))
        return cls((2, 8, 10, 1), widths, min(64, int(64 * multipliers[0])), num_branches=4, num_classes=num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


def MobileOneS0(num_classes: int = 1000) -> MobileOne:
    """MobileOne-S0: 1 + 2 * 21 = 43 MobileOneBlocks with 4 KxK branches each; deployed, 43 convs."""
    return MobileOne.s0(num_classes)
