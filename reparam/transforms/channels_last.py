"""A Linear applied channels-last, between a permute there and back, is a 1x1 conv.

Some blocks move the channels last, apply `nn.Linear` over them, and move them back:

    permute(linear(permute(x, (0, 2, ..., n-1, 1))), (0, n-1, 1, ..., n-2)) = conv1x1(x),
    W[o, c, 1, ..., 1] = A[o, c],   b = the Linear's bias,

for every input: the Linear maps the last dim, which the first permute made the channels. The
three ops are replaced by that conv, which then folds like any conv: with the BN or the
layer-scale after it (I) and the linear region before it (III). Recognised as `x.permute(...)`
(dims as arguments or one tuple) and `torch.permute(x, dims)`; the permutations give the rank,
so no shapes are needed.

Exact condition: the two permutes are exactly channels-last and back (another permutation is
no match, and the Linear stays as written).

Paper: X. Ding et al., "UniRepLKNet", CVPR 2024 (its re-parameterization folds the BN after a
channels-last Linear into it).
"""

from torch import nn

from ..channels_first import PERMUTES, permutation, to_channels_first
from ..kernel import Kernel
from ..patterns import Call, Match, Module, Var
from ..rules import ReplacementRule


def channels_last_linear(m: Match) -> nn.Module | None:
    """The 1x1 conv computing `permute(linear(permute(x)))`, if the permutes go channels-last and back."""
    into, back = permutation(m.node("into")), permutation(m.node("back"))
    if into is None or back is None or len(into) < 3 or len(into) != len(back) or not m.foldable("linear"):
        return None
    rank = len(into)
    if into != (0, *range(2, rank), 1) or back != to_channels_first(rank):
        return None
    linear = m.module("linear")
    return Kernel.from_linear(linear, rank - 2).to_module().requires_grad_(linear.weight.requires_grad)


_INTO = Call(PERMUTES, Var("x"), name="into")
CHANNELS_LAST_LINEAR = ReplacementRule(
    "channels_last_linear", Call(PERMUTES, Module(nn.Linear, _INTO, name="linear"), name="back"), channels_last_linear
)
