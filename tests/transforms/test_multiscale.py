"""Transform VI: 1x1, 1xK, Kx1 and dilated kernels embedded into one KxK."""

import pytest
import torch
from torch import nn

import reparam
from reparam.blocks import ACBlock, randomize_batchnorm
from tests.helpers import assert_same_function, batchnorms, convs


@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("groups", [1, 2])
def test_acnet_block_becomes_one_square_conv(kernel_size, stride, groups):
    model = randomize_batchnorm(ACBlock(4, 6, kernel_size, stride, groups)).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert (convs(fused), batchnorms(fused)) == (1, 0)
    conv = fused.get_submodule("conv")
    assert conv.kernel_size == (kernel_size, kernel_size) and conv.stride == (stride, stride)
    assert "multiscale" in report.fusions[0].rules
    for size in [(7, 9), (kernel_size, kernel_size + 2), (1, 1)]:
        assert_same_function(model, fused, torch.randn(2, 4, *size, dtype=torch.float64))


class Scales(nn.Module):
    """A 5x5, a 3x3 with dilation 2, a 1x3 and a 1x1, all centred: one 5x5."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.big = conv(3, 4, 5, padding=2)
        self.dilated = conv(3, 4, 3, padding=2, dilation=2)
        self.flat = conv(3, 4, (1,) * (dims - 1) + (3,), padding=(0,) * (dims - 1) + (1,))
        self.point = conv(3, 4, 1)

    def forward(self, x):
        return self.big(x) + self.dilated(x) + self.flat(x) + self.point(x)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_kernels_of_every_scale_embed_into_the_largest(dims):
    model = Scales(dims).double().eval()
    fused = reparam.fuse(model)
    assert convs(fused) == 1
    assert fused.get_submodule("conv").kernel_size == (5,) * dims
    assert_same_function(model, fused, torch.randn(2, 3, *[6] * dims, dtype=torch.float64))


class DilatedOnly(nn.Module):
    """Two dilated kernels on a common lattice stay dilated."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 2, 3, padding=4, dilation=4)
        self.b = nn.Conv2d(2, 2, 5, padding=4, dilation=2)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_common_dilation_is_kept():
    model = DilatedOnly().double().eval()
    fused = reparam.fuse(model)
    conv = fused.get_submodule("conv")
    assert (conv.kernel_size, conv.dilation) == ((5, 5), (2, 2))
    assert_same_function(model, fused, torch.randn(1, 2, 11, 10, dtype=torch.float64))
