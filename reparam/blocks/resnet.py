"""ResNet-18 with a pluggable conv+BN unit, to build DBB-, ACNet- and plain ResNets."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .common import ConvBNFactory, conv_bn, plain_conv_bn


class BasicBlock(nn.Module):
    """ResNet's basic block, with each 3x3 conv + BN built by `unit` (plain, ACBlock, DBB, ...)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, unit: ConvBNFactory) -> None:
        super().__init__()
        self.unit1 = unit(in_channels, out_channels, 3, stride)
        self.unit2 = unit(out_channels, out_channels, 3, 1)
        changes_shape = stride != 1 or in_channels != out_channels
        self.shortcut = conv_bn(in_channels, out_channels, 1, stride) if changes_shape else None
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.act(self.unit2(self.act(self.unit1(x))) + skip)


class ResNet18(nn.Module):
    """A ResNet-18 whose 7x7 stem and 3x3 convs (each with its BN) are built by `unit`.

    `ResNet18(DiverseBranchBlock)` is DBB-ResNet-18, `ResNet18(ACBlock)` ACNet-ResNet-18,
    `ResNet18(plain_conv_bn)` the plain net they deploy to. `width` scales the channels.
    """

    def __init__(self, unit: ConvBNFactory = plain_conv_bn, num_classes: int = 1000, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(unit(3, width, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        layers, channels = [], width
        for stage, out in enumerate([width, 2 * width, 4 * width, 8 * width]):
            stride = 1 if stage == 0 else 2
            layers.append(nn.Sequential(BasicBlock(channels, out, stride, unit), BasicBlock(out, out, 1, unit)))
            channels = out
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.flatten(self.pool(self.layers(self.stem(x))), 1))
