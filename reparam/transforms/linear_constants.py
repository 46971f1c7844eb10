"""A Linear's output times, over, plus or minus a per-feature constant: one Linear, at any rank.

`nn.Linear` maps the last dim. A constant of shape `(C,)` (or a single value: a number, shape
`()` or `(1,)`) broadcasts along the last dim of the Linear's output whatever its rank, so with
`linear(x) = x A^T + b`:

    linear(x) * s = x (diag(s) A)^T + s b          linear(x) / s = the same with 1 / s
    linear(x) + t = x A^T + (b + t)                linear(x) - t, t - linear(x) likewise

exactly, and without knowing the rank of `x`: timm's LayerScale (`x * gamma` after the last
Linear of each layer-scaled ViT block), ConvNeXt's `gamma * x` before its permute back. Each
match is replaced by one Linear (float64 fold, cast back); a chain of them folds pass by pass.

Exact condition: the constant is stored on the model (or a number) and has shape `()`, `(1,)`
or `(C,)` with C the Linear's output features. Any other shape (`(1, 1, C)` would add dims to a
lower-rank output) is no match, and the layers stay as written; so does a Linear called
elsewhere or hooked.
"""

import operator

import torch
from torch import nn

from ..kernel import Kernel
from ..patterns import Add, Call, Const, Match, Module, Mul, Sub, Var
from ..rules import ReplacementRule

_LINEAR = Module(nn.Linear, Var("x"), name="linear")


def scaled(m: Match) -> nn.Module | None:
    """`linear(x) * s`."""
    s = _per_feature(m)
    return None if s is None else _folded(m, s, torch.zeros_like(s))


def divided(m: Match) -> nn.Module | None:
    """`linear(x) / s`."""
    s = _per_feature(m)
    return None if s is None or m.node("op").kwargs else _folded(m, 1 / s, torch.zeros_like(s))


def shifted(m: Match) -> nn.Module | None:
    """`linear(x) + t`."""
    t = _per_feature(m)
    return None if t is None else _folded(m, torch.ones_like(t), t)


def shifted_down(m: Match) -> nn.Module | None:
    """`linear(x) - t`."""
    t = _per_feature(m)
    return None if t is None else _folded(m, torch.ones_like(t), -t)


def subtracted_from(m: Match) -> nn.Module | None:
    """`t - linear(x)`."""
    t = _per_feature(m)
    return None if t is None else _folded(m, -torch.ones_like(t), t)


def _per_feature(m: Match) -> torch.Tensor | None:
    """The constant as a float64 vector over the Linear's output features, if it broadcasts along them alone."""
    constant, linear = m.value("c"), m.module("linear")
    if not m.foldable("linear") or isinstance(constant, bool) or not isinstance(constant, int | float | torch.Tensor):
        return None
    value = torch.as_tensor(constant).detach().to(linear.weight.device, torch.float64)
    if value.dim() > 1 or value.numel() not in (1, linear.out_features):
        return None
    return value.reshape(-1).expand(linear.out_features)


def _folded(m: Match, scale: torch.Tensor, shift: torch.Tensor) -> nn.Module:
    linear = m.module("linear")
    kernel = Kernel.from_linear(linear).then(Kernel.affine(scale, shift, spatial_dims=0))
    return kernel.to_module().requires_grad_(linear.weight.requires_grad)


_DIVIDE = (operator.truediv, torch.div, "div")

LINEAR_SCALED = ReplacementRule("linear_scaled", Mul(_LINEAR, Const("c")), scaled)
LINEAR_DIVIDED = ReplacementRule("linear_divided", Call(_DIVIDE, _LINEAR, Const("c"), name="op"), divided)
LINEAR_SHIFTED = ReplacementRule("linear_shifted", Add(_LINEAR, Const("c")), shifted)
LINEAR_SHIFTED_DOWN = ReplacementRule("linear_shifted_down", Sub(_LINEAR, Const("c")), shifted_down)
LINEAR_SUBTRACTED_FROM = ReplacementRule("linear_subtracted_from", Sub(Const("c"), _LINEAR), subtracted_from)
