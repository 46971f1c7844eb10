"""Whole networks built from the reference training-time blocks."""

import copy

import pytest
import torch
from torch import nn

import reparam
from reparam import Reason
from reparam.blocks import ACBlock, RepVGG, RepVGGBlock, conv_bn, randomize_batchnorm
from reparam.stats import relative_error
from tests.helpers import assert_same_function, batchnorms, convs


def small_repvgg_a0() -> RepVGG:
    """RepVGG-A0's block layout (1, 2, 4, 14, 1) with narrower stages, for speed."""
    return RepVGG((1, 2, 4, 14, 1), (8, 8, 16, 16, 32), num_classes=10)


def test_repvgg_a0_layout_fuses_to_one_conv_per_block_in_float32():
    torch.manual_seed(0)
    model = randomize_batchnorm(small_repvgg_a0(), seed=1).eval()
    fused, report = reparam.fuse_with_report(model)
    assert (convs(fused), batchnorms(fused)) == (22, 0)
    assert isinstance(fused.get_submodule("head"), nn.Linear)
    assert len(report.fusions) == 22 and report.refusals == []
    x = torch.randn(4, 3, 65, 63)
    with torch.no_grad():
        original, deployed = model(x), fused(x)
        reference = copy.deepcopy(model).double()(x.double())
        folded_weights_in_float64 = copy.deepcopy(fused).double()(x.double())
    assert relative_error(deployed, original) <= 1e-5
    # Folding is done in float64 and rounded once per weight: it loses less than running the
    # original in float32 does.
    assert relative_error(folded_weights_in_float64, reference) <= relative_error(original, reference) / 2
    # End to end, both are float32 arithmetic: one large conv accumulates as many products as
    # the branches it replaces, in a different order. Same order of error, never much worse.
    assert rms_error(deployed, reference) <= 1.5 * rms_error(original, reference)


def rms_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    reference = reference.double()
    return ((output.double() - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()).item()


@pytest.mark.parametrize("groups", [2, 4])
@pytest.mark.parametrize("stride", [1, 2])
def test_grouped_and_strided_repvgg_blocks(groups, stride):
    model = nn.Sequential(RepVGGBlock(8, 16, stride=stride, groups=groups), RepVGGBlock(16, 16, groups=groups))
    model = randomize_batchnorm(model, seed=groups).double().eval()
    fused = reparam.fuse(model)
    assert (convs(fused), batchnorms(fused)) == (2, 0)
    assert {m.groups for m in fused.modules() if isinstance(m, nn.Conv2d)} == {groups}
    for size in [(9, 11), (8, 8), (3, 3)]:
        assert_same_function(model, fused, torch.randn(2, 8, *size, dtype=torch.float64))


class ACNetStyle(nn.Module):
    """An ACNet-style net: ACBlocks with stride 1 and 2 and ReLUs between."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            ACBlock(3, 8), nn.ReLU(), ACBlock(8, 16, stride=2), nn.ReLU(), ACBlock(16, 16, kernel_size=5), nn.ReLU()
        )

    def forward(self, x):
        return self.features(x).mean((2, 3))


def test_acnet_style_net_fuses_exactly_on_odd_sizes():
    model = randomize_batchnorm(ACNetStyle(), seed=3).eval()
    fused = reparam.fuse(model)
    assert (convs(fused), batchnorms(fused)) == (3, 0)
    for size in [(17, 13), (5, 5), (2, 3)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            assert relative_error(fused(x), model(x)) <= 1e-5
    assert_same_function(model.double(), reparam.fuse(model.double()), torch.randn(1, 3, 9, 7, dtype=torch.float64))


class DepthwiseSeparable(nn.Module):
    """MobileNet style, no activation between: depthwise 3x3+BN then pointwise 1x1+BN."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = conv_bn(32, 32, 3, padding=1, groups=32)
        self.pw = conv_bn(32, 64, 1)

    def forward(self, x):
        return torch.relu(self.pw(self.dw(x)))


def test_depthwise_then_pointwise_is_not_densified():
    model = randomize_batchnorm(DepthwiseSeparable()).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert (convs(fused), batchnorms(fused)) == (2, 0), "each BN folds, but the two convs stay apart"
    assert sorted(m.groups for m in fused.modules() if isinstance(m, nn.Conv2d)) == [1, 32]
    [refusal] = report.refused(Reason.WOULD_COST_MORE)
    assert refusal.nodes == ("dw.conv", "dw.bn", "pw.conv", "pw.bn")
    assert_same_function(model, fused, torch.randn(2, 32, 7, 7, dtype=torch.float64))
