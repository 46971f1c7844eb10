"""Padding as algebra: a pad is folded into the conv after it or the pointwise kernel before it.

A pad before a conv is that conv's padding, and a crop before an unpadded one (ACNet's crop
path, `x[:, :, c:-c, :]`) a negative padding that a larger kernel it is summed into absorbs
(else the fused conv is written after the same crop, `Kernel.split_crop`),

    conv(pad_p(x); padding q) = conv(x; padding p + q)              (zero pads)
    conv(pad_p,mode(x); padding 0) = conv(x; padding p, padding_mode=mode)

and a pad after a pointwise kernel K (1x1, stride 1: a conv, a BN, a chain of them) moves
before it, because K maps each position on its own:

    pad_p,mode(K(x)) = K(pad_p,mode(x))                              (reflect, replicate, circular)
    pad_p,c(K(x))    = K(zero_pad_p(x))   when K(0) = bias(K) = c    (a constant pad)

The second is DBB's BN-and-pad layer: `F.pad(bn(y) - v, p) + v` with `v = beta - mean * s`, the
BN's response to zero, is a zero-padded chain, so the unpadded KxK after it folds (III).

Recognised spellings: `F.pad(x, pad, mode, value)`, DBB's in-place border assignment after a
zero pad (`y[:, :, :p, :] = v` on every side: `pad_with_border`, see reparam/borders.py),
`nn.ZeroPad1d/2d/3d`,
`nn.ConstantPad1d/2d/3d`, `nn.ReflectionPad1d/2d/3d`, `nn.ReplicationPad1d/2d/3d`,
`nn.CircularPad1d/2d/3d`.

Exact condition: the pad is the same on both sides of every dim and not negative (else
`geometry`: an asymmetric pad shifts the output grid), the pads compose into one padding
(`padding mode`), and for a pad after a kernel, the kernel is pointwise and maps zero to the pad
value (`border not exact`).

Paper: X. Ding et al., "Diverse Branch Block", CVPR 2021 (transform III and its BN-and-pad).
"""

import operator
from collections.abc import Iterator
from typing import Any

import torch.nn.functional as F
from torch import nn
from torch.fx import Node

from ..borders import pad_with_border
from ..errors import FusionRefused, Reason
from ..kernel import Kernel
from ..context import Context
from ..patterns import AnyOf, Call, Const, Linear, Match, Module, State, Var
from ..rules import PatternRule
from .scale import per_channel

_ZERO_PADS = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d)
_CONSTANT_PADS = (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)
_MODE_PADS = {
    **dict.fromkeys((nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d), "reflect"),
    **dict.fromkeys((nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d), "replicate"),
    **dict.fromkeys((nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d), "circular"),
}
PAD_MODULES = (*_ZERO_PADS, *_CONSTANT_PADS, *_MODE_PADS)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def pad_of(m: Match, spatial_dims: int) -> tuple[tuple[int, ...], str, float]:
    """The captured pad as (padding per spatial dim, first to last; mode; value)."""
    node = m.node("pad")
    if node.op == "call_module":
        module = m.module("pad")
        pads, value = module.padding, float(getattr(module, "value", 0.0))
        mode = _MODE_PADS.get(type(module), "constant")
    else:
        arguments = dict(zip(("pad", "mode", "value"), node.args[1:]), **node.kwargs)
        pads, mode = arguments["pad"], arguments.get("mode", "constant")
        if not isinstance(pads, tuple | list) or not all(isinstance(p, int) for p in pads):
            raise FusionRefused(Reason.NOT_CONSTANT, f"the pad {pads!r} is not a list of numbers")
        value = float(arguments.get("value") or 0.0)
    pads = tuple(pads) if isinstance(pads, tuple | list) else (pads,) * (2 * spatial_dims)
    if len(pads) % 2 or len(pads) // 2 > spatial_dims:
        raise FusionRefused(Reason.GEOMETRY, f"a pad of {list(pads)} does not fit {spatial_dims} spatial dims")
    lows, highs = pads[0::2], pads[1::2]
    if lows != highs or any(p < 0 for p in pads):
        raise FusionRefused(
            Reason.GEOMETRY, f"the pad {list(pads)} is not the same on both sides of each dim, or crops"
        )
    per_dim = (0,) * (spatial_dims - len(lows)) + tuple(reversed(lows))
    return per_dim, mode, value


def padded_conv(m: Match) -> Kernel:
    kernel = m.kernel("conv")
    padding, mode, value = pad_of(m, kernel.spatial_dims)
    if mode == "constant" and value != 0:
        raise FusionRefused(Reason.PADDING_MODE, f"a conv pads with zeros only, not with {value:g}")
    return kernel.after_pad(padding, mode)


def crop_of(index: object, spatial_dims: int | None = None) -> tuple[int, ...] | None:
    """The crop per spatial dim of an index `[:, :, c:-c, ...]` (also `[..., c:-c, c:-c]`), or None.

    With `spatial_dims`, the index must cover exactly that many (a shorter one is padded with
    whole slices).
    """
    parts = list(index) if isinstance(index, tuple) else [index]
    if parts and parts[0] is Ellipsis:
        if spatial_dims is None:
            return _spatial_crop(parts[1:])
        parts = [slice(None)] * (3 + spatial_dims - len(parts)) + parts[1:]
    if spatial_dims is not None:
        parts += [slice(None)] * (2 + spatial_dims - len(parts))
        if len(parts) != 2 + spatial_dims:
            return None
    if len(parts) < 3 or not all(isinstance(p, slice) and p == slice(None) for p in parts[:2]):
        return None
    return _spatial_crop(parts[2:])


def _spatial_crop(parts: list[object]) -> tuple[int, ...] | None:
    crop = []
    for part in parts:
        if not isinstance(part, slice) or part.step not in (None, 1):
            return None
        start, stop = part.start or 0, part.stop
        if not (isinstance(start, int) and start >= 0 and ((stop is None and start == 0) or stop == -start)):
            return None
        crop.append(start)
    return tuple(crop) if any(crop) else None


class _CropIndex(Const):
    """An index that crops the same amount from both sides of spatial dims (`crop_of`)."""

    def matches(self, value: Any, state: State, ctx: Context, consumer: Node | None) -> Iterator[State]:
        if crop_of(value) is not None:
            yield from super().matches(value, state, ctx, consumer)


def cropped_conv(m: Match) -> Kernel:
    kernel = m.kernel("conv")
    crop = crop_of(m.value("index"), kernel.spatial_dims)
    if crop is None:
        raise FusionRefused(Reason.GEOMETRY, f"the index {m.value('index')!r} does not fit a {kernel.spatial_dims}-d conv")
    return kernel.after_crop(crop)


def padded_region(m: Match) -> Kernel:
    kernel = m.kernel("a")
    padding, mode, value = pad_of(m, kernel.spatial_dims)
    return kernel.then_pad(padding, mode, value)


def bordered_region(m: Match) -> Kernel:
    """`pad_with_border(K(x), pad, v)`: DBB's in-place border assignment, lowered (see reparam/borders.py)."""
    kernel = m.kernel("a")
    pads = m.value("pads")
    symmetric = isinstance(pads, list | tuple) and tuple(pads[0::2]) == tuple(pads[1::2])
    if not symmetric or len(pads) != 2 * kernel.spatial_dims:
        raise FusionRefused(Reason.GEOMETRY, f"a border of {pads!r} is not the same on every side of every dim")
    return kernel.then_pad(tuple(reversed(pads[0::2])), "zeros", per_channel(m.value("border"), kernel))


def _pad(input: Var | Linear) -> AnyOf:
    return AnyOf(Call(F.pad, input, name="pad"), Module(PAD_MODULES, input, name="pad"))


x = Var("x")

PADDED_CONV = PatternRule("padded_conv", Module(_CONVS, _pad(Var("x", plain=True)), name="conv"), padded_conv)
CROPPED_CONV = PatternRule(
    "cropped_conv",
    Module(_CONVS, Call(operator.getitem, Var("x", plain=True), _CropIndex("index")), name="conv"),
    cropped_conv,
)
PADDED_REGION = PatternRule("padded_region", _pad(Linear(x, "a", identity=False)), padded_region)
BORDERED_REGION = PatternRule(
    "bordered_region",
    Call(pad_with_border, Linear(x, "a", identity=False), Const("pads"), Const("border"), name="pad"),
    bordered_region,
)
