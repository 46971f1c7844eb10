"""Transform III: convs in sequence, through BNs, and the BN-and-pad layer."""

import pytest
import torch
from torch import nn

import reparam
from reparam import Reason
from reparam.blocks import BNAndPad, randomize_batchnorm
from tests.helpers import assert_same_function, batchnorms, convs


class Chain(nn.Module):
    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return torch.relu(self.layers(x))


CHAINS = {
    "1x1 -> KxK": lambda: Chain(nn.Conv2d(4, 6, 1, bias=False), nn.Conv2d(6, 8, 3, stride=2)),
    "KxK -> 1x1": lambda: Chain(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Conv2d(6, 8, 1)),
    "KxK -> KxK dilated": lambda: Chain(nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 3, dilation=2)),
    "grouped": lambda: Chain(nn.Conv2d(4, 8, 3, groups=2), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, groups=4)),
    "1x1 -> BN-and-pad -> KxK": lambda: Chain(
        nn.Conv2d(4, 4, 1, bias=False), BNAndPad(4, 1), nn.Conv2d(4, 8, 3, stride=2), nn.BatchNorm2d(8)
    ),
    "1d": lambda: Chain(nn.Conv1d(4, 4, 1, bias=False), BNAndPad(4, 2, spatial_dims=1), nn.Conv1d(4, 4, 5)),
    "3d": lambda: Chain(nn.Conv3d(4, 4, 3, padding=1), nn.BatchNorm3d(4), nn.Conv3d(4, 4, 1)),
}


@pytest.mark.parametrize("name", list(CHAINS))
def test_chains_become_one_conv(name):
    model = randomize_batchnorm(CHAINS[name]()).double().eval()
    fused, report = reparam.fuse_with_report(model, allow_costlier=True)
    assert (convs(fused), batchnorms(fused)) == (1, 0)
    assert "sequential" in report.fusions[0].rules
    dims = {"1d": 1, "3d": 3}.get(name, 2)
    for size in (9, 12):
        assert_same_function(model, fused, torch.randn(2, 4, *[size] * dims, dtype=torch.float64))


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(lambda: [nn.Conv2d(4, 4, 1, bias=True)], id="biased 1x1"),
        pytest.param(lambda: [nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)], id="BN-shifted 1x1"),
        pytest.param(lambda: [nn.Conv2d(4, 4, 3)], id="3x3"),
    ],
)
def test_zero_padding_after_a_biased_or_wide_kernel_is_refused(first):
    # the naive DBB variant: the KxK zero-pads what the first layer computed
    model = randomize_batchnorm(Chain(*first(), nn.Conv2d(4, 4, 3, padding=1))).double().eval()
    fused, report = reparam.fuse_with_report(model, allow_costlier=True)
    [refusal] = report.refused(Reason.BORDER_NOT_EXACT)
    assert refusal.rule == "multiscale" and refusal.nodes[-1] == "layers.%d" % len(first())
    assert convs(fused) == 2
    assert_same_function(model, fused, torch.randn(1, 4, 7, 7, dtype=torch.float64))


def test_pointwise_with_bias_commutes_with_reflect_padding():
    model = Chain(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")).double().eval()
    fused = reparam.fuse(model, allow_costlier=True)
    assert convs(fused) == 1
    assert_same_function(model, fused, torch.randn(1, 4, 6, 5, dtype=torch.float64))


def test_bn_and_pad_pads_with_the_bn_of_zero():
    layer = randomize_batchnorm(BNAndPad(3, 2)).double().eval()
    out = layer(torch.zeros(1, 3, 1, 1, dtype=torch.float64))
    assert out.shape == (1, 3, 5, 5)
    assert torch.allclose(out, out[:, :, :1, :1].expand_as(out))
    assert torch.allclose(out[0, :, 0, 0], layer.bn(torch.zeros(1, 3, 1, 1, dtype=torch.float64))[0, :, 0, 0])
