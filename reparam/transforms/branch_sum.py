"""II. Branches of the same input, summed: one conv.

Convolution is linear, so for kernels applied to the same input x

    K1(x) + K2(x) + ... + Kn(x) = (K1 + K2 + ... + Kn)(x),

the weights and biases adding once embedded into a common geometry (VI). A branch may be any
linear region: conv, conv+BN, BN alone, or the input itself (`x + f(x)`, the identity kernel,
written with any number of groups). Sums are recognised through `a + b`, `operator.add`,
`torch.add`, `Tensor.add` and chains of them, as long as every operand is a linear function of
one common tensor.

Exact condition: the branches share a stride, their outputs align pixel for pixel and their
padding modes agree (see VI); an operand computed from another tensor, or also used outside
the sum (`shared intermediate`), stays a separate branch.

Paper: X. Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021; X. Ding et
al., "Diverse Branch Block", CVPR 2021 (transform II).
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
from torch.fx import Node

from ..errors import FusionRefused
from ..region import Region, branches
from ..rules import same_input_branches

if TYPE_CHECKING:
    from ..engine import Context


class BranchSum:
    """The sum rule: anchored on every spelling of `a + b`."""

    name = "branch_sum"
    anchors = (("call_function", operator.add), ("call_function", torch.add), ("call_method", "add"))

    def annotate(self, node: Node, ctx: Context) -> Region | None:
        operands = _operands(node)
        parts = None if operands is None else same_input_branches(node, operands, ctx)
        if parts is None:
            return None
        try:
            return branches(parts, [node], self.name)
        except FusionRefused as refusal:
            ctx.refuse(self.name, [node], refusal)
            return None


def _operands(node: Node) -> list[Node] | None:
    """The two tensors `node` adds, or None if it is not a plain sum of two graph values."""
    args = list(node.args)
    if "other" in node.kwargs:
        args.append(node.kwargs["other"])
    if node.kwargs.get("alpha", 1) != 1 or len(args) != 2 or set(node.kwargs) - {"other", "alpha"}:
        return None
    return args if all(isinstance(a, Node) for a in args) else None


SUM = BranchSum()
