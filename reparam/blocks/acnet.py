"""ACNet's asymmetric convolution block (X. Ding et al., ICCV 2019)."""

from __future__ import annotations

from torch import Tensor, nn

from .common import conv_bn


class ACBlock(nn.Module):
    """ACNet's asymmetric convolution block: `bn(convKxK(x)) + bn(conv1xK(x)) + bn(convKx1(x))`.

    It replaces a KxK conv (no activation of its own); deployed, it is one KxK conv.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.square = conv_bn(in_channels, out_channels, kernel_size, stride, pad, groups)
        self.hor = conv_bn(in_channels, out_channels, (1, kernel_size), stride, (0, pad), groups)
        self.ver = conv_bn(in_channels, out_channels, (kernel_size, 1), stride, (pad, 0), groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.square(x) + self.hor(x) + self.ver(x)
