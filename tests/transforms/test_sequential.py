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


def _pairs(widths: list[int]) -> nn.Module:
    """(1x1 conv, BN) pairs with no activation between them: one linear region of 2 * len(widths) layers."""
    layers = []
    for c_in, c_out in zip(widths, widths[1:] + widths[:1]):
        layers += [nn.Conv2d(c_in, c_out, 1), nn.BatchNorm2d(c_out)]
    return randomize_batchnorm(Chain(*layers)).eval().double()


def _compositions(model: nn.Module, monkeypatch) -> tuple[nn.Module, int]:
    from reparam.kernel import Kernel

    calls = 0
    then = Kernel.then

    def counted(self, after):
        nonlocal calls
        calls += 1
        return then(self, after)

    monkeypatch.setattr(Kernel, "then", counted)
    return reparam.fuse(model), calls


@pytest.mark.parametrize("pairs", [40, 80])
def test_a_long_chain_is_planned_in_linear_time(pairs, monkeypatch):
    model = _pairs([8] * pairs)
    fused, compositions = _compositions(model, monkeypatch)
    assert convs(fused) == 1 and batchnorms(fused) == 0
    assert compositions <= 7 * 2 * pairs  # annotation composes each layer once, the planner at most 6 times
    assert_same_function(model, fused, torch.randn(2, 8, 5, 5, dtype=torch.float64))


def test_a_long_chain_is_cut_at_its_narrowest_point():
    # 32 -> 4 -> 32 -> ... -> 4 -> 32: any single conv from 32 to 32 channels costs 32 x 32 MACs, but
    # 32 -> ... -> 4 fuses into one 32 x 4 conv and the last 4 -> 32 stays: 2 x 128 MACs
    model = _pairs([32, 4] * 20)
    fused = reparam.fuse(model)
    kept = [tuple(m.weight.shape[:2]) for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert kept == [(4, 32), (32, 4)] and batchnorms(fused) == 0
    assert_same_function(model, fused, torch.randn(2, 32, 5, 5, dtype=torch.float64))
