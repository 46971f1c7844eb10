"""I. Conv followed by BatchNorm: one conv.

An eval-mode BatchNorm is the per-channel affine map

    BN(y) = gamma * (y - mean) / sqrt(var + eps) + beta = s * y + (beta - s * mean),   s = gamma / sqrt(var + eps)

so after a conv with weight W and bias b it is the conv with

    W' = s[o] * W[o, ...],     b' = s * (b - mean) + beta.

It is registered as a linear layer (a depthwise 1x..x1 kernel) and folded by sequential
composition, `Kernel.then`, into whatever linear region feeds it: a conv, a sum of branches,
or nothing (a BN-only branch of a sum, as in RepVGG's identity branch).

`nn.SyncBatchNorm` (RepLKNet and mmpretrain build with it) is the same map in eval mode: it
synchronizes statistics across processes only while training. So is the `AnyRankBatchNorm`
reparam itself writes for a per-channel map of unknown rank: a fused model fuses again.

Exact condition: the BN is in eval mode and has running statistics; otherwise it normalizes
each batch by that batch's statistics and is no fixed map (`BN in training mode`,
`no running stats`). A conv without bias and a BN without affine parameters are covered.

Paper: X. Ding et al., "Diverse Branch Block: Building a Convolution as an Inception-like
Unit", CVPR 2021 (transform I).
"""

from torch import nn

from ..kernel import Kernel
from ..layers import AnyRankBatchNorm
from ..rules import LinearLayer

# BatchNorm1d normalizes (batch, C) and (batch, C, L) alike, SyncBatchNorm and the AnyRankBatchNorm
# reparam writes any rank from 2 up: their number of spatial dims is not known
_SPATIAL_DIMS = {
    nn.BatchNorm1d: None,
    nn.BatchNorm2d: 2,
    nn.BatchNorm3d: 3,
    nn.SyncBatchNorm: None,
    AnyRankBatchNorm: None,
}

BATCHNORM = LinearLayer("conv_bn", tuple(_SPATIAL_DIMS), lambda bn: Kernel.from_batchnorm(bn, _SPATIAL_DIMS[type(bn)]))
