"""Reference training-time blocks, written as plain modules with no deploy code of their own.

reparam is what deploys them: `reparam.fuse(model)` turns each block into one conv.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    stride: int = 1,
    padding: int | tuple[int, int] = 0,
    groups: int = 1,
) -> nn.Sequential:
    """A bias-free conv followed by BatchNorm, as `Sequential(conv=..., bn=...)`."""
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
            bn=nn.BatchNorm2d(out_channels),
        )
    )


class RepVGGBlock(nn.Module):
    """RepVGG's training-time block: `relu(bn(conv3x3(x)) + bn(conv1x1(x)) + bn(x))`.

    The BN-only identity branch exists when the block keeps its shape (same channels, stride 1).
    Deployed, it is one 3x3 conv followed by the ReLU.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.dense = conv_bn(in_channels, out_channels, 3, stride, 1, groups)
        self.pointwise = conv_bn(in_channels, out_channels, 1, stride, 0, groups)
        keeps_shape = in_channels == out_channels and stride == 1
        self.identity = nn.BatchNorm2d(in_channels) if keeps_shape else None
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.act(out)


class ACBlock(nn.Module):
    """ACNet's asymmetric convolution block: `bn(convKxK(x)) + bn(conv1xK(x)) + bn(convKx1(x))`.

    It replaces a KxK conv (no activation of its own); deployed, it is one KxK conv.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.square = conv_bn(in_channels, out_channels, kernel_size, stride, pad, groups)
        self.hor = conv_bn(in_channels, out_channels, (1, kernel_size), stride, (0, pad), groups)
        self.ver = conv_bn(in_channels, out_channels, (kernel_size, 1), stride, (pad, 0), groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.square(x) + self.hor(x) + self.ver(x)


class RepVGG(nn.Module):
    """A RepVGG classifier: five stages of `RepVGGBlock`s, the first block of each with stride 2.

    `RepVGG.a0()` is the paper's A0: blocks [1, 2, 4, 14, 1], width multipliers a=0.75, b=2.5.
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

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.flatten(self.pool(self.stages(x)), 1))


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random running statistics and affine parameters, as after training.

    Default statistics (mean 0, variance 1, weight 1, bias 0) make BN nearly the identity and
    hide folding bugs; tests and the demo randomize them. Returns `model`, changed in place.
    """
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            shape = module.num_features
            with torch.no_grad():
                if module.running_mean is not None:
                    module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.5)
                    module.running_var.copy_(torch.rand(shape, generator=generator) * 1.5 + 0.5)
                if module.affine:
                    module.weight.copy_(torch.rand(shape, generator=generator) * 0.5 + 0.5)
                    module.bias.copy_(torch.randn(shape, generator=generator) * 0.2)
    return model
