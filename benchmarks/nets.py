"""The benchmarked nets: each a training-time net from `reparam.blocks` and its hand-written deploy twin."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from reparam.blocks import ACBlock, DiverseBranchBlock, MobileOne, RepVGG, ResNet18

from .deploy import PlainMobileOne, PlainRepVGG, PlainResNet18


@dataclass(frozen=True)
class NetSpec:
    name: str
    description: str
    training: Callable[[], nn.Module]  # the training-time net (multi-branch blocks)
    deploy: Callable[[], nn.Module]  # the hand-written plain net it deploys to
    blocks: int  # re-parameterizable blocks, each of which must become one conv


def _repvgg(name: str, blocks: tuple[int, ...], widths: tuple[int, ...], classes: int, description: str) -> NetSpec:
    return NetSpec(
        name,
        description,
        lambda: RepVGG(blocks, widths, classes),
        lambda: PlainRepVGG(blocks, widths, classes),
        sum(blocks),
    )


def _resnet(name: str, unit: Callable, width: int, classes: int, description: str) -> NetSpec:
    return NetSpec(
        name,
        description,
        lambda: ResNet18(unit, num_classes=classes, width=width),
        lambda: PlainResNet18(num_classes=classes, width=width),
        17,  # the 7x7 stem and 16 3x3 units
    )


def _mobileone(
    name: str, blocks: tuple[int, ...], widths: tuple[int, ...], stem: int, k: int, classes: int, description: str
) -> NetSpec:
    return NetSpec(
        name,
        description,
        lambda: MobileOne(blocks, widths, stem, num_branches=k, num_classes=classes),
        lambda: PlainMobileOne(blocks, widths, stem, classes),
        1 + 2 * sum(blocks),
    )


def full_nets() -> list[NetSpec]:
    """The nets of the paper-sized benchmark, ImageNet-shaped (1000 classes)."""
    a0, b0 = RepVGG.a0(), RepVGG.b0()
    s0 = MobileOne.s0()
    s0_widths = tuple(stage[-1].branches[0].conv.out_channels for stage in s0.stages)
    return [
        _repvgg(
            "RepVGG-A0", (1, 2, 4, 14, 1), _repvgg_widths(a0), 1000, "`RepVGG.a0()`: blocks 1-2-4-14-1, a=0.75, b=2.5"
        ),
        _repvgg(
            "RepVGG-B0", (1, 4, 6, 16, 1), _repvgg_widths(b0), 1000, "`RepVGG.b0()`: blocks 1-4-6-16-1, a=1, b=2.5"
        ),
        _resnet("DBB-ResNet-18", DiverseBranchBlock, 64, 1000, "`ResNet18(DiverseBranchBlock)`"),
        _resnet("ACNet-ResNet-18", ACBlock, 64, 1000, "`ResNet18(ACBlock)`"),
        _mobileone(
            "MobileOne-S0",
            (2, 8, 10, 1),
            s0_widths,
            s0.stem.branches[0].conv.out_channels,
            4,
            1000,
            "`MobileOneS0()`: stages 2-8-10-1, widths 48-128-256-1024, k=4",
        ),
    ]


def quick_nets() -> list[NetSpec]:
    """Narrow, shallow versions of the same nets (same block types), for a seconds-long smoke run."""
    return [
        _repvgg("RepVGG-A0", (1, 2, 2, 2, 1), (8, 8, 16, 16, 32), 10, "quick: RepVGG blocks 1-2-2-2-1, narrow"),
        _repvgg("RepVGG-B0", (1, 2, 3, 2, 1), (8, 8, 16, 16, 40), 10, "quick: RepVGG blocks 1-2-3-2-1, narrow"),
        _resnet("DBB-ResNet-18", DiverseBranchBlock, 4, 10, "quick: `ResNet18(DiverseBranchBlock, width=4)`"),
        _resnet("ACNet-ResNet-18", ACBlock, 4, 10, "quick: `ResNet18(ACBlock, width=4)`"),
        _mobileone("MobileOne-S0", (1, 1, 1, 1), (8, 8, 16, 16), 8, 4, 10, "quick: MobileOne stages 1-1-1-1, k=4"),
    ]


def _repvgg_widths(model: RepVGG) -> tuple[int, ...]:
    return tuple(stage[0].dense.conv.out_channels for stage in model.stages)
