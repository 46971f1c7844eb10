"""IV. Branches of the same input, concatenated along channels: one conv.

For kernels applied to the same input x, with outputs stacked along the channel dimension,

    cat([K1(x), ..., Kn(x)], dim=1) = K(x),   W = cat([W1, ..., Wn], dim=0),  b = cat([b1, ..., bn]),

once every branch is embedded into the common geometry (VI). Branches may be conv, conv+BN,
chains, sums, or the input itself. Recognised as `torch.cat` / `torch.concat` /
`torch.concatenate` along dim 1 (or the equivalent negative dim).

Exact condition: as for a sum, the branches share a stride and their outputs align pixel for
pixel. The stacked conv has one group, and mixing kernel sizes pads small kernels with zeros,
so it often costs more than the branches (an Inception block's 1x1 branch becomes 5x5); the
engine then keeps the branches and reports `would cost more`.

Paper: X. Ding et al., "Diverse Branch Block: Building a Convolution as an Inception-like
Unit", CVPR 2021 (transform IV).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.fx import Node

from ..errors import FusionRefused
from ..region import Region, stacked
from ..rules import same_input_branches

if TYPE_CHECKING:
    from ..engine import Context


class Concat:
    """The channel-concatenation rule."""

    name = "concat"
    anchors = tuple(("call_function", f) for f in (torch.cat, torch.concat, torch.concatenate))

    def annotate(self, node: Node, ctx: Context) -> Region | None:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis", 0))
        if not isinstance(tensors, list | tuple) or len(tensors) < 2 or not isinstance(dim, int) or dim == 0:
            return None
        if not all(isinstance(t, Node) for t in tensors):
            return None
        parts = same_input_branches(node, list(tensors), ctx)
        if parts is None or dim not in (1, -(parts[0].kernel.spatial_dims + 1)):
            return None
        try:
            return stacked(parts, node, self.name)
        except FusionRefused as refusal:
            ctx.refuse(self.name, [node], refusal)
            return None


CONCAT = Concat()
