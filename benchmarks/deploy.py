"""Hand-written deploy-time nets: what one would write by hand for inference, plain convs with bias.

Each mirrors the shape of a fused training-time net (same convs, same ReLUs, same pooling, same
head, in the same order of operations) so that `fused / hand-deployed` latency measures only what
the fused `GraphModule` adds or removes. `copy_weights` loads a fused model's weights into one.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor, nn

from reparam.stats import forward_with_hooks


def _conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=True)


class PlainRepVGG(nn.Module):
    """RepVGG at inference: stages of 3x3 conv + ReLU, the first of each with stride 2."""

    def __init__(
        self, blocks: tuple[int, ...], widths: tuple[int, ...], num_classes: int = 1000, in_channels: int = 3
    ) -> None:
        super().__init__()
        stages = []
        for count, width in zip(blocks, widths):
            layers: list[nn.Module] = []
            for index in range(count):
                layers += [_conv(in_channels, width, 3, 2 if index == 0 else 1), nn.ReLU()]
                in_channels = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.flatten(self.pool(self.stages(x)), 1))


class PlainBasicBlock(nn.Module):
    """ResNet's basic block at inference: BN folded into biased convs, the shortcut a biased 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv(in_channels, out_channels, 3, stride)
        self.conv2 = _conv(out_channels, out_channels, 3)
        changes_shape = stride != 1 or in_channels != out_channels
        self.shortcut = _conv(in_channels, out_channels, 1, stride) if changes_shape else None
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.act(self.conv2(self.act(self.conv1(x))) + skip)


class PlainResNet18(nn.Module):
    """ResNet-18 at inference (what DBB- and ACNet-ResNet-18 deploy to)."""

    def __init__(self, num_classes: int = 1000, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv(3, width, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        layers, channels = [], width
        for stage, out in enumerate([width, 2 * width, 4 * width, 8 * width]):
            stride = 1 if stage == 0 else 2
            layers.append(nn.Sequential(PlainBasicBlock(channels, out, stride), PlainBasicBlock(out, out, 1)))
            channels = out
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class PlainMobileOne(nn.Module):
    """MobileOne at inference: a 3x3 stem, then depthwise 3x3 + ReLU, pointwise 1x1 + ReLU pairs."""

    def __init__(
        self,
        blocks: tuple[int, ...],
        widths: tuple[int, ...],
        stem_width: int,
        num_classes: int = 1000,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv(in_channels, stem_width, 3, 2), nn.ReLU())
        stages, channels = [], stem_width
        for count, width in zip(blocks, widths):
            layers: list[nn.Module] = []
            for index in range(count):
                stride = 2 if index == 0 else 1
                layers += [_conv(channels, channels, 3, stride, groups=channels), nn.ReLU()]
                layers += [_conv(channels, width, 1), nn.ReLU()]
                channels = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


_WEIGHTED = (nn.Conv2d, nn.Linear)


def _signature(module: nn.Module) -> tuple:
    if isinstance(module, nn.Conv2d):
        return ("conv", tuple(module.weight.shape), module.stride, module.padding, module.dilation, module.groups)
    return ("linear", tuple(module.weight.shape))


def _call_order(model: nn.Module, example: Tensor) -> list[nn.Module]:
    """The conv and linear modules of `model` in the order one forward calls them."""
    order: list[nn.Module] = []
    forward_with_hooks(model, example, {_WEIGHTED: lambda module, _i, _o: order.append(module)})
    return order


def copy_weights(source: nn.Module, target: nn.Module, example: Tensor) -> nn.Module:
    """Copy the conv and linear weights of `source` (a fused net) into `target` (its hand-written twin).

    Layers are matched by call order among layers of the same geometry, so the match does not
    depend on module names, nor on the order in which independent branches (a ResNet's shortcut
    and its main path) happen to run. Raises `ValueError` if the two nets' layers do not match
    one to one. Returns `target`.
    """
    by_kind: dict[tuple, list[nn.Module]] = defaultdict(list)
    for module in _call_order(target, example):
        by_kind[_signature(module)].append(module)
    source_order = _call_order(source, example)
    if len(source_order) != sum(len(v) for v in by_kind.values()):
        raise ValueError(f"{len(source_order)} layers in the fused net, {sum(map(len, by_kind.values()))} by hand")
    taken: dict[tuple, int] = defaultdict(int)
    with torch.no_grad():
        for module in source_order:
            key = _signature(module)
            if taken[key] >= len(by_kind[key]):
                raise ValueError(f"no hand-written layer left for {key}")
            twin = by_kind[key][taken[key]]
            taken[key] += 1
            twin.weight.copy_(module.weight)
            if (module.bias is None) != (twin.bias is None):
                raise ValueError(f"bias mismatch for {key}")
            if module.bias is not None:
                twin.bias.copy_(module.bias)
    return target
