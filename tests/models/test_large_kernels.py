"""Issue 6's reference blocks: 1d/3d RepVGG, MobileOne, RepLK and dilated re-parameterization."""

import pytest
import torch
from torch import nn

import reparam
from reparam.blocks import DilatedReparamBlock, MobileOneS0, RepLKBlock, RepVGGBlock, randomize_batchnorm
from reparam.stats import relative_error
from tests.helpers import batchnorms, convs


@pytest.mark.parametrize("dims, size", [(1, (37,)), (3, (9, 8, 7))])
def test_1d_and_3d_repvgg_blocks(dims, size):
    model = nn.Sequential(
        RepVGGBlock(4, 8, stride=2, spatial_dims=dims),
        RepVGGBlock(8, 8, spatial_dims=dims),
        RepVGGBlock(8, 8, groups=2, spatial_dims=dims),
    )
    model = randomize_batchnorm(model).eval()
    fused = reparam.fuse(model)
    assert (convs(fused), batchnorms(fused)) == (3, 0)
    x = torch.randn(2, 4, *size)
    with torch.no_grad():
        assert relative_error(fused(x), model(x)) <= 1e-5


@pytest.mark.parametrize(
    "block, kernel",
    [
        (lambda: RepLKBlock(8, 13, 5), 13),
        (lambda: DilatedReparamBlock(8, 7), 7),
        (lambda: DilatedReparamBlock(8, 13), 13),
    ],
    ids=["RepLK 13+5", "dilated 7", "dilated 13"],
)
def test_large_kernel_blocks_become_one_depthwise_conv(block, kernel):
    model = randomize_batchnorm(block()).eval()
    fused = reparam.fuse(model)
    [conv] = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert (conv.kernel_size, conv.groups, conv.dilation) == ((kernel, kernel), 8, (1, 1))
    x = torch.randn(2, 8, 21, 19)
    with torch.no_grad():
        assert relative_error(fused(x), model(x)) <= 1e-5


def test_mobileone_s0_fuses_to_one_conv_per_block():
    model = randomize_batchnorm(MobileOneS0(num_classes=10)).eval()
    blocks = sum(type(m).__name__ == "MobileOneBlock" for m in model.modules())
    fused = reparam.fuse(model)
    assert (convs(fused), batchnorms(fused)) == (blocks, 0)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(fused(x), model(x)) <= 1e-5
