"""IV. Branches of the same input, concatenated along channels: one conv.

For kernels applied to the same input x, with outputs stacked along the channel dimension,

    cat([K1(x), ..., Kn(x)], dim=1) = K(x),   W = cat([W1, ..., Wn], dim=0),  b = cat([b1, ..., bn]),

once every branch is embedded into the common geometry (VI). Branches may be any linear region
of x, or x itself. Recognised as `torch.cat` / `torch.concat` / `torch.concatenate` along
dim 1 (or the equivalent negative dim).

Exact condition: as for a sum, the branches share a stride and their outputs align pixel for
pixel. The stacked conv has one group, and mixing kernel sizes pads small kernels with zeros,
so it often costs more than the branches (an Inception block's 1x1 branch becomes 5x5); the
engine then keeps the branches and reports `would cost more`, unless asked to fuse anyway
(`fuse(..., allow_costlier=True)`).

Paper: X. Ding et al., "Diverse Branch Block: Building a Convolution as an Inception-like
Unit", CVPR 2021 (transform IV).
"""

from ..kernel import Kernel, concatenated
from ..patterns import Cat, Linear, Match, Var
from ..rules import PatternRule

x = Var("x")


def concat(m: Match) -> Kernel:
    return concatenated(m.kernels("branches"))


CONCAT = PatternRule("concat", Cat(Linear(x, "branches")), concat)
