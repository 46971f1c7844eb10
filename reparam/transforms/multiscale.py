"""VI. Multi-scale kernels: a 1x1, 1xK, Kx1, KxK or dilated conv is one kernel on a common grid.

Every `nn.Conv1d/2d/3d`, whatever its shape, is a linear layer here. A conv with kernel size k,
padding p and dilation d reads input offsets `-p + d*t` (t < k) around `stride * position`.
When such branches are summed (II), each is embedded into the smallest kernel covering all
their offsets, zeros elsewhere:

    embed(W)[o, c, (d*t - p + P) / D] = W[o, c, t]     so   W_KxK + embed(W_1xK) + embed(W_Kx1) = one KxK

Exact condition: the branches share a stride and their centres `-p + d*(k-1)/2` coincide in
every dimension (equivalently: their outputs have the same size for every input size and line
up pixel for pixel); zero padding added by the embedding is only ever read where the original
branch read padding too. Otherwise the sum is refused (`strides differ`, `outputs not
aligned`). The embedding itself is `Kernel.embedded`; the common geometry is `kernel.aligned`.

Paper: X. Ding et al., "ACNet: Strengthening the Kernel Skeletons for Powerful CNN via
Asymmetric Convolution Blocks", ICCV 2019; X. Ding et al., "Diverse Branch Block", CVPR 2021 (VI).
"""

from torch import nn

from ..kernel import Kernel
from ..rules import LinearLayer

CONV = LinearLayer("multiscale", (nn.Conv1d, nn.Conv2d, nn.Conv3d), Kernel.from_conv)
