"""The Diverse Branch Block and an Inception-style concat block (X. Ding et al., CVPR 2021)."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..borders import pad_with_border
from .common import conv_bn


class BNAndPad(nn.Module):
    """BatchNorm, then padding with the value the BN gives a zero input (`beta - mean * gamma / std`).

    Placed between a bias-free 1x1 conv and an unpadded KxK conv (or avg-pool), it makes the
    pair compute exactly what one zero-padded KxK conv computes, so the chain can be folded:
    padding the BN output with zeros instead would not be (see transform III).
    """

    def __init__(self, num_features: int, padding: int, spatial_dims: int = 2) -> None:
        super().__init__()
        self.bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims](num_features)
        self.padding = padding
        self.spatial_dims = spatial_dims

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn(x)
        if self.padding == 0:
            return out
        bn = self.bn
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.affine:
            scale = scale * bn.weight
        border = (-bn.running_mean * scale).view(1, -1, *[1] * self.spatial_dims)
        if bn.affine:
            border = border + bn.bias.view(1, -1, *[1] * self.spatial_dims)
        return pad_with_border(out, [self.padding] * (2 * self.spatial_dims), border)


class DiverseBranchBlock(nn.Module):
    """The Diverse Branch Block: four branches summed, replacing a KxK conv + BN.

    * KxK conv + BN;
    * 1x1 conv + BN (when the block is not depthwise);
    * 1x1 conv, BN-and-pad, KxK avg-pool, BN;
    * 1x1 conv, BN-and-pad, unpadded KxK conv, BN.

    Deployed, it is one KxK conv. No activation of its own.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        internal_channels: int | None = None,
    ) -> None:
        super().__init__()
        pad = kernel_size // 2
        internal = internal_channels or in_channels
        self.origin = conv_bn(in_channels, out_channels, kernel_size, stride, pad, groups)
        self.pointwise = conv_bn(in_channels, out_channels, 1, stride, 0, groups) if groups < out_channels else None
        self.avg = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, 1, groups=groups, bias=False),
                bn=BNAndPad(out_channels, pad),
                pool=nn.AvgPool2d(kernel_size, stride, 0),
                avgbn=nn.BatchNorm2d(out_channels),
            )
        )
        self.kxk = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, internal, 1, groups=groups, bias=False),
                bn1=BNAndPad(internal, pad),
                conv2=nn.Conv2d(internal, out_channels, kernel_size, stride, 0, groups=groups, bias=False),
                bn2=nn.BatchNorm2d(out_channels),
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.origin(x) + self.avg(x) + self.kxk(x)
        if self.pointwise is not None:
            out = out + self.pointwise(x)
        return out


class InceptionBlock(nn.Module):
    """Parallel 1x1, 3x3 and 5x5 conv+BN branches, concatenated along channels.

    Exactly one 5x5 conv; whether that is worth it is a cost question (see transform IV).
    """

    def __init__(self, in_channels: int, branch_channels: tuple[int, int, int] = (8, 8, 8)) -> None:
        super().__init__()
        c1, c3, c5 = branch_channels
        self.b1 = conv_bn(in_channels, c1, 1)
        self.b3 = conv_bn(in_channels, c3, 3, padding=1)
        self.b5 = conv_bn(in_channels, c5, 5, padding=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b5(x)], dim=1)
