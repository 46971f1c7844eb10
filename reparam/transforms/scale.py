"""Scale and shift layers: `f(x) * s` and `f(x) + t`, per channel, folded into the conv before.

A multiply or an add by a constant that is the same at every position is the per-channel
affine map `y[c] = s[c] * z[c] + t[c]`, so after a linear region f it composes like a BN (I):

    (f(x) * s)  = (s f)(x),     W' = s[o] W[o, ...],  b' = s b
    (f(x) + t)  = (f + t)(x),   b' = b + t

This covers `x * const`, `x * param` (a layer-scale gamma), `x / const`, `x + const`,
`x - const`, `const - x` (the scale -1, then the shift), `-x`, and `sum([...])` (which starts
from `0 + ...`). The constant may be a Python number or a tensor
stored on the model that broadcasts per channel: one value (shape `()`, `(1,)`, `(1, 1)`, ...,
up to the output's rank), or shape `(C, 1, ..., 1)` / `(1, C, 1, ..., 1)` (for a linear
layer's `(batch, features)` output, `(C,)` or `(1, C)`).

Exact condition: the constant is one (stored on the model, possibly reshaped; a value computed
in forward does not match and is left as written) and it varies at most along channels
(`geometry` otherwise: a per-position constant is not a convolution).

Paper: the layer-scale of ConvNeXt / UniRepLKNet, and MobileOne's scale branches
(P. K. A. Vasu et al., "MobileOne: An Improved One millisecond Mobile Backbone", CVPR 2023).
"""

import operator
from dataclasses import replace

import torch
from torch.fx import Node

from ..errors import FusionRefused, Reason
from ..kernel import Kernel
from ..patterns import Add, Call, Const, Linear, Match, Mul, Neg, Sub, Var
from ..rules import PatternRule

x = Var("x")


def per_channel(constant: object, like: Kernel) -> torch.Tensor:
    """`constant` as a float64 vector over `like`'s output channels, if it broadcasts per channel."""
    channels, dims = like.out_channels, like.spatial_dims
    if isinstance(constant, bool) or not isinstance(constant, int | float | torch.Tensor):
        raise FusionRefused(Reason.GEOMETRY, f"a {type(constant).__name__} is not a numeric constant")
    value = torch.as_tensor(constant, dtype=torch.float64).detach().to(like.device, torch.float64)
    highest = dims + 2 if like.dims_known else 2  # a higher rank would broadcast the output to more dims
    scalars = {(1,) * rank for rank in range(highest + 1)}  # `(1,)` broadcasts like a number: super-gradients' alpha
    shapes = scalars | {(channels,) + (1,) * dims, (1, channels) + (1,) * dims}
    if tuple(value.shape) not in shapes:
        raise FusionRefused(
            Reason.GEOMETRY, f"a constant of shape {tuple(value.shape)} does not act per channel on {channels} channels"
        )
    return value.reshape(-1).expand(channels) if value.numel() == 1 else value.reshape(-1)


def scale(m: Match) -> Kernel:
    kernel = m.kernel("a")
    s = per_channel(m.value("s"), kernel)
    return kernel.then(affine_like(s, torch.zeros_like(s), kernel))


def divide(m: Match) -> Kernel:
    if m.node("op").kwargs or len(m.node("op").args) != 2:
        raise FusionRefused(Reason.GEOMETRY, "a division with a rounding mode is not linear")
    kernel = m.kernel("a")
    s = per_channel(m.value("s"), kernel)
    return kernel.then(affine_like(1 / s, torch.zeros_like(s), kernel))


def shift(m: Match) -> Kernel:
    kernel = m.kernel("a")
    t = per_channel(m.value("t"), kernel)
    return kernel.then(affine_like(torch.ones_like(t), t, kernel))


def shift_down(m: Match) -> Kernel:
    """`f(x) - t`."""
    kernel = m.kernel("a")
    t = per_channel(m.value("t"), kernel)
    return kernel.then(affine_like(torch.ones_like(t), -t, kernel))


def subtracted_from(m: Match) -> Kernel:
    """`t - f(x)`."""
    kernel = -m.kernel("a")
    t = per_channel(m.value("t"), kernel)
    return kernel.then(affine_like(torch.ones_like(t), t, kernel))


def negation(m: Match) -> Kernel:
    return -m.kernel("a")


def alpha_factor(node: Node, subtracts: bool) -> float:
    """The factor of the second operand: `add(a, b, alpha=k)` is `a + k b`, `sub(a, b, alpha=k)` is `a - k b`."""
    alpha = node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise FusionRefused(Reason.NOT_CONSTANT, f"alpha={alpha!r} is not a number")
    return -alpha if subtracts else alpha


def times(kernel: Kernel, factor: float) -> Kernel:
    """`factor * kernel(x)`, for a number `factor`."""
    if factor == 1:
        return kernel
    scale = torch.full((kernel.out_channels,), float(factor), dtype=torch.float64, device=kernel.device)
    return kernel.then(affine_like(scale, torch.zeros_like(scale), kernel))


def affine_like(scale: torch.Tensor, shift: torch.Tensor, like: Kernel) -> Kernel:
    """The per-channel map, shaped like `like` (and as sure of its rank)."""
    return replace(Kernel.affine(scale, shift, like.spatial_dims), dtype=like.dtype, dims_known=like.dims_known)


_REGION = Linear(x, "a", identity=False)

SCALE = PatternRule("scale", Mul(_REGION, Const("s")), scale)
DIVIDE = PatternRule("divide", Call((operator.truediv, torch.div, "div"), _REGION, Const("s"), name="op"), divide)
SHIFT = PatternRule("shift", Add(_REGION, Const("t")), shift)
SHIFT_DOWN = PatternRule("shift_down", Sub(_REGION, Const("t")), shift_down)
SUBTRACTED_FROM = PatternRule("subtracted_from", Sub(Const("t"), _REGION), subtracted_from)
NEGATION = PatternRule("negation", Neg(_REGION), negation)
