"""II. Branches of the same input, summed: one conv.

Convolution is linear, so for kernels applied to the same input x

    K1(x) + K2(x) = (K1 + K2)(x),

the weights and biases adding once embedded into a common geometry (VI). A branch may be any
linear region of x: conv, conv+BN, BN alone, a chain, another sum (so chained sums of any
length fold), or x itself (`x + f(x)`: the identity kernel, written with any number of groups).
Recognised in every spelling: `a + b`, `operator.add`, `torch.add` (without `alpha`), `Tensor.add`,
`a += b` (an add where nothing else sees the write, see tracing.py), and `sum([...])` (with the shift rule for its
leading `0 + ...`, see scale.py). A difference is a sum with the second branch negated,

    K1(x) - K2(x) = (K1 + (-K2))(x),

in every spelling too (`a - b`, `torch.sub`, `Tensor.sub`): FastViT's RepMixer
`x + s * (mixer(x) - norm(x))` is one depthwise conv. With `alpha` (`torch.add(a, b, alpha=k)`,
`a.sub(b, alpha=k)`), the second branch is scaled first: `K1 + k K2`, `K1 - k K2`.

Exact condition: the branches share a stride, their outputs align pixel for pixel and their
padding modes agree (VI), otherwise `strides differ`, `outputs not aligned`, `padding mode`.
An operand computed from another tensor, or also used outside the sum, is not a branch.

Paper: X. Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021; X. Ding et
al., "Diverse Branch Block", CVPR 2021 (transform II).
"""

from typing import Any

import torch
from torch.fx import Node

from ..kernel import Kernel
from ..patterns import Add, Call, Linear, Match, Sub, Var
from ..rules import PatternRule
from .scale import alpha_factor, times

x = Var("x")


def branch_sum(m: Match) -> Kernel:
    return m.kernel("a") + m.kernel("b")


SUM = PatternRule("branch_sum", Add(Linear(x, "a"), Linear(x, "b")), branch_sum)


def branch_difference(m: Match) -> Kernel:
    return m.kernel("a") - m.kernel("b")


DIFFERENCE = PatternRule("branch_difference", Sub(Linear(x, "a"), Linear(x, "b")), branch_difference)


class _WithAlpha(Call):
    """`torch.add` / `torch.sub` (function or method) of two operands with an `alpha` other than 1."""

    def accepts(self, node: Node, ctx: Any) -> bool:
        alpha = node.kwargs.get("alpha", 1)
        return super().accepts(node, ctx) and len(node.args) == 2 and set(node.kwargs) == {"alpha"} and alpha != 1


def branch_sum_with_alpha(m: Match) -> Kernel:
    node = m.node("op")
    return m.kernel("a") + times(m.kernel("b"), alpha_factor(node, subtracts=node.target in (torch.sub, "sub")))


SUM_WITH_ALPHA = PatternRule(
    "branch_sum_with_alpha",
    _WithAlpha((torch.add, torch.sub, "add", "sub"), Linear(x, "a"), Linear(x, "b"), name="op"),
    branch_sum_with_alpha,
)
