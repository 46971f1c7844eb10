"""Large-kernel blocks: RepLKNet's large + small kernel pair and UniRepLKNet's dilated branches."""

from __future__ import annotations

from torch import Tensor, nn

from .common import conv_bn


class RepLKBlock(nn.Module):
    """RepLKNet's depthwise large kernel with a parallel small kernel: `bn(dw13x13(x)) + bn(dw5x5(x))`.

    Deployed, it is one depthwise 13x13 conv (X. Ding et al., "Scaling Up Your Kernels to 31x31", CVPR 2022).
    """

    def __init__(self, channels: int, kernel_size: int = 13, small_kernel: int = 5) -> None:
        super().__init__()
        self.large = conv_bn(channels, channels, kernel_size, 1, kernel_size // 2, channels)
        self.small = conv_bn(channels, channels, small_kernel, 1, small_kernel // 2, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.large(x) + self.small(x)


# UniRepLKNet's branches for each large kernel size: (kernel sizes, dilations)
_DILATED_BRANCHES = {
    5: ((3,), (2,)),
    7: ((5, 3, 3), (1, 2, 3)),
    9: ((5, 5, 3, 3), (1, 2, 3, 4)),
    11: ((5, 5, 3, 3, 3), (1, 2, 3, 4, 5)),
    13: ((5, 7, 3, 3, 3), (1, 2, 3, 4, 5)),
}


class DilatedReparamBlock(nn.Module):
    """UniRepLKNet's dilated re-parameterization: a depthwise KxK plus smaller dilated branches.

    For K=7: 7x7 + 5x5 + 3x3 dilation 2 + 3x3 dilation 3, each with BN, all centred. Deployed,
    it is one dense depthwise KxK conv (X. Ding et al., "UniRepLKNet", CVPR 2024).
    """

    def __init__(self, channels: int, kernel_size: int = 7) -> None:
        super().__init__()
        self.origin = conv_bn(channels, channels, kernel_size, 1, kernel_size // 2, channels)
        sizes, dilations = _DILATED_BRANCHES[kernel_size]
        self.dilated = nn.ModuleList(
            conv_bn(channels, channels, k, 1, d * (k - 1) // 2, channels, dilation=d) for k, d in zip(sizes, dilations)
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.origin(x)
        for branch in self.dilated:
            out = out + branch(x)
        return out
