"""Blocks as third-party repositories write them, each beside its authors' deploy form.

Written for the benchmarks only (the tests have their own), in the authors' idioms: MobileOne's
and FastViT's `rbr_skip` BatchNorm branch and layer scale, FastViT's RepMixer difference
`x + gamma * (mixer(x) - norm(x))`, UniRepLKNet's dilated large-kernel branches with a layer
scale, ACNet's 1x1 + 1x3 + 3x1 branches, an Inception concat. The deploy form is the
architecture the authors' `reparameterize()` / `switch_to_deploy()` leaves: only its latency is
compared, so its weights are random.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


def conv_bn(channels: int, out: int, kernel_size: int | tuple[int, int], groups: int = 1, dilation: int = 1):
    size = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    padding = tuple((k - 1) * dilation // 2 for k in size)
    conv = nn.Conv2d(channels, out, size, padding=padding, groups=groups, dilation=dilation, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out))


class SkipOnly(nn.Module):
    """MobileOne / FastViT with only the BN skip branch: `out = 0; out += self.rbr_skip(x)`, then a layer scale."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.rbr_skip = nn.BatchNorm2d(channels)
        self.layer_scale = nn.Parameter(torch.rand(channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        out = 0
        out += self.rbr_skip(x)
        return self.layer_scale * out


class SkipOnlyDeploy(nn.Module):
    """What the authors' reparameterize() makes of it: a depthwise 3x3 conv (the skip as a kernel)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reparam_conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.reparam_conv(x)


class RepMixer(nn.Module):
    """FastViT's token mixer: `x + layer_scale * (mixer(x) - norm(x))`, mixer a MobileOne depthwise block."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm_skip = nn.BatchNorm2d(channels)
        self.mixer_conv = conv_bn(channels, channels, 3, groups=channels)
        self.mixer_scale = conv_bn(channels, channels, 1, groups=channels)
        self.mixer_skip = nn.BatchNorm2d(channels)
        self.layer_scale = nn.Parameter(1e-5 * torch.ones(channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        mixed = self.mixer_conv(x) + self.mixer_scale(x) + self.mixer_skip(x)
        return x + self.layer_scale * (mixed - self.norm_skip(x))


class DepthwiseDeploy(nn.Module):
    """One depthwise KxK conv with bias (RepMixer's and UniRepLKNet's large-kernel deploy form)."""

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.reparam_conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.reparam_conv(x)


class DilatedReparam(nn.Module):
    """UniRepLKNet's dilated reparam block: a depthwise 13x13 and dilated small kernels, each with a BN, summed."""

    BRANCHES = ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5))  # (kernel size, dilation)

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.lk_origin = conv_bn(channels, channels, 13, groups=channels)
        for k, r in self.BRANCHES:
            self.add_module(f"dil_conv_k{k}_{r}", conv_bn(channels, channels, k, groups=channels, dilation=r))
        self.norm = nn.BatchNorm2d(channels)
        self.gamma = nn.Parameter(torch.rand(channels))

    def forward(self, x: Tensor) -> Tensor:
        out = self.lk_origin(x)
        for k, r in self.BRANCHES:
            out = out + getattr(self, f"dil_conv_k{k}_{r}")(x)
        return self.gamma.view(1, -1, 1, 1) * self.norm(out)


class ACB(nn.Module):
    """ACNet's asymmetric block: square 3x3, 1x3 and 3x1 conv+BN branches, summed."""

    def __init__(self, channels: int, square: int = 3) -> None:
        super().__init__()
        self.square = conv_bn(channels, channels, square)
        self.hor = conv_bn(channels, channels, (1, 3))
        self.ver = conv_bn(channels, channels, (3, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.square(x) + self.hor(x) + self.ver(x)


class ConvDeploy(nn.Module):
    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Inception(nn.Module):
    """1x1, 3x3 and 5x5 conv+BN branches of one input, concatenated."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.b1, self.b3, self.b5 = (conv_bn(channels, channels // 2, k) for k in (1, 3, 5))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b5(x)], dim=1)


class InceptionDeploy(nn.Module):
    """Its deploy form: each branch one biased conv, still concatenated (one 5x5 would be slower)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.b1, self.b3, self.b5 = (nn.Conv2d(channels, channels // 2, k, padding=k // 2) for k in (1, 3, 5))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b5(x)], dim=1)


@dataclass(frozen=True)
class BlockSpec:
    name: str
    training: Callable[[], nn.Module]
    deploy: Callable[[], nn.Module]
    input_shape: tuple[int, ...]


def block_specs(quick: bool = False) -> list[BlockSpec]:
    size = 16 if quick else 56
    specs = [
        BlockSpec("MobileOne/FastViT skip-only + layer scale, C=64", lambda: SkipOnly(64), lambda: SkipOnlyDeploy(64),
                  (1, 64, size, size)),
        BlockSpec("FastViT RepMixer, C=64", lambda: RepMixer(64), lambda: DepthwiseDeploy(64), (1, 64, size, size)),
        BlockSpec("UniRepLKNet dilated reparam + norm + gamma, C=64", lambda: DilatedReparam(64),
                  lambda: DepthwiseDeploy(64, 13), (1, 64, size, size)),
        BlockSpec("Inception 1x1/3x3/5x5 concat, C=64", lambda: Inception(64), lambda: InceptionDeploy(64),
                  (1, 64, size, size)),
    ]
    for channels, side in ((16, 56), (32, 56), (64, 56), (64, 28), (128, 28), (256, 14)):
        side = min(side, size)
        specs.append(BlockSpec(f"ACNet 3x3 + 1x3 + 3x1, C={channels}", lambda c=channels: ACB(c),
                               lambda c=channels: ConvDeploy(c), (1, channels, side, side)))
        specs.append(BlockSpec(f"1x1 + 1x3 + 3x1 (no square), C={channels}", lambda c=channels: ACB(c, square=1),
                               lambda c=channels: ConvDeploy(c), (1, channels, side, side)))
    return specs
