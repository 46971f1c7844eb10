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
`x + s * (mixer(x) - norm(x))` is one depthwise conv.

Exact condition: the branches share a stride, their outputs align pixel for pixel and their
padding modes agree (VI), otherwise `strides differ`, `outputs not aligned`, `padding mode`.
An operand computed from another tensor, or also used outside the sum, is not a branch.

Paper: X. Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021; X. Ding et
al., "Diverse Branch Block", CVPR 2021 (transform II).
"""

from ..kernel import Kernel
from ..patterns import Add, Linear, Match, Sub, Var
from ..rules import PatternRule

x = Var("x")


def branch_sum(m: Match) -> Kernel:
    return m.kernel("a") + m.kernel("b")


SUM = PatternRule("branch_sum", Add(Linear(x, "a"), Linear(x, "b")), branch_sum)


def branch_difference(m: Match) -> Kernel:
    return m.kernel("a") - m.kernel("b")


DIFFERENCE = PatternRule("branch_difference", Sub(Linear(x, "a"), Linear(x, "b")), branch_difference)
