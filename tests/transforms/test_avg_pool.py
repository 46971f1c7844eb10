"""Transform V: average pooling as a depthwise conv."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reparam
from reparam import Reason
from reparam.blocks import BNAndPad, randomize_batchnorm
from tests.helpers import assert_same_function, batchnorms, convs


class ConvPool(nn.Module):
    """1x1 conv, BN-and-pad (when the pool does not pad itself), pool, BN: DBB's avg branch."""

    def __init__(self, pool, bn_and_pad: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1, bias=False)
        self.bn = BNAndPad(4, 1) if bn_and_pad else nn.Identity()
        self.pool = pool
        self.out_bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.out_bn(self.pool(self.bn(self.conv(x))))


POOLS = {
    "module": nn.AvgPool2d(3, 2),
    "functional": lambda x: F.avg_pool2d(x, 3, stride=2),
    "stride defaults to window": nn.AvgPool2d(2),
    "ceil_mode, stride 1": nn.AvgPool2d(3, 1, ceil_mode=True),
}
# a pool that pads itself zero-pads the bias-free 1x1's output: exact without BN-and-pad
PADDED_POOLS = {
    "padded, count_include_pad": nn.AvgPool2d(3, 1, padding=1),
    "divisor_override": nn.AvgPool2d(3, 2, padding=1, count_include_pad=False, divisor_override=5),
}


@pytest.mark.parametrize("name", list(POOLS) + list(PADDED_POOLS))
def test_pool_folds_into_the_branch(name):
    model = ConvPool(POOLS[name]) if name in POOLS else ConvPool(PADDED_POOLS[name], bn_and_pad=False)
    model = randomize_batchnorm(model).double().eval()
    fused, report = reparam.fuse_with_report(model, allow_costlier=True)
    assert (convs(fused), batchnorms(fused)) == (1, 0)
    assert "avg_pool" in report.fusions[0].rules
    for size in [(9, 9), (10, 7)]:
        assert_same_function(model, fused, torch.randn(2, 3, *size, dtype=torch.float64))


@pytest.mark.parametrize(
    "pool",
    [
        pytest.param(nn.AvgPool2d(3, 1, padding=1, count_include_pad=False), id="count_include_pad=False"),
        pytest.param(nn.AvgPool2d(3, 2, ceil_mode=True), id="ceil_mode with stride 2"),
    ],
)
def test_inexact_pools_are_refused(pool):
    model = randomize_batchnorm(ConvPool(pool, bn_and_pad=False)).double().eval()
    fused, report = reparam.fuse_with_report(model, allow_costlier=True)
    [refusal] = report.refused(Reason.BORDER_NOT_EXACT)
    assert refusal.rule == "avg_pool" and refusal.nodes == ("conv", "pool")
    assert any(isinstance(m, nn.AvgPool2d) for m in fused.modules())
    for size in [(8, 8), (9, 7)]:
        assert_same_function(model, fused, torch.randn(1, 3, *size, dtype=torch.float64))


def test_padded_pool_after_bn_and_pad_is_refused():
    # BN-and-pad already padded with the BN's border value; padding again with zeros is not exact
    model = randomize_batchnorm(ConvPool(nn.AvgPool2d(3, 1, padding=1))).double().eval()
    fused, report = reparam.fuse_with_report(model, allow_costlier=True)
    # BNAndPad's forward is traced through: the node at fault is its pad
    assert [r.nodes for r in report.refused(Reason.BORDER_NOT_EXACT)] == [("pad_with_border", "pool")]
    assert_same_function(model, fused, torch.randn(1, 3, 6, 6, dtype=torch.float64))


def test_pool_alone_is_dearer_and_kept():
    # conv1x1 -> pool alone would become a dense 3x3: more MACs than the pair, so it is refused
    model = randomize_batchnorm(ConvPool(nn.AvgPool2d(3, 1))).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert report.refused(Reason.WOULD_COST_MORE)
    assert_same_function(model, fused, torch.randn(1, 3, 6, 6, dtype=torch.float64))


class PoolAndInput(nn.Module):
    """`avg(x) + x` of the model's input: no layer reads x, so only its shape tells its channels."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(3, 1, 1)

    def forward(self, x):
        return self.pool(x) + x


def test_a_pool_of_a_tensor_whose_channels_nothing_tells_is_refused_with_the_fix():
    model = PoolAndInput().double().eval()
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    fused, report = reparam.fuse_with_report(model)
    [refusal] = report.refused(Reason.GEOMETRY)
    assert refusal.rule == "avg_pool_of_input" and "example_inputs" in refusal.message
    assert_same_function(model, fused, x, rtol=0)
    fused, report = reparam.fuse_with_report(model, example_inputs=(x,), allow_costlier=True)
    assert not report.refusals and convs(fused) == 1  # 1/9 on each tap, plus 1 at the centre: one depthwise 3x3
    assert_same_function(model, fused, x)


class SqueezeExcite(nn.Module):
    """RepVGGplus' SE block: a global pool written as `avg_pool2d(x, kernel_size=x.size(3))`."""

    def __init__(self, channels: int, of_a_bn: bool) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.down, self.up = nn.Conv2d(channels, 2, 1), nn.Conv2d(2, channels, 1)
        self.of_a_bn = of_a_bn

    def forward(self, x):
        y = self.bn(self.conv(x))
        y = y if self.of_a_bn else F.relu(y)
        pooled = F.avg_pool2d(y, kernel_size=y.size(3))
        return y * torch.sigmoid(self.up(F.relu(self.down(pooled))))


@pytest.mark.parametrize("of_a_bn", [True, False], ids=["of a conv+BN", "of an activation"])
def test_a_pool_whose_window_is_computed_in_forward_is_left_as_written(of_a_bn):
    """It follows the input size: not one kernel. (Of the shared conv + BN, no rule takes it at all.)"""
    model = randomize_batchnorm(SqueezeExcite(4, of_a_bn)).double().eval()
    fused, report = reparam.fuse_with_report(model)
    if not of_a_bn:
        [refusal] = report.refused(Reason.NOT_CONSTANT)
        assert refusal.rule == "avg_pool_of_input" and "kernel_size" in refusal.message
    assert batchnorms(fused) == 0  # the conv + BN before it still fold
    for size in (5, 7):
        assert_same_function(model, fused, torch.randn(2, 4, size, size, dtype=torch.float64))


def test_a_pool_of_an_activation_composes_with_the_conv_reading_it_in_both_front_ends():
    """torch.export fixes `x.size(3)` to the example's 5: the pool is then one kernel, and composes with
    the 1x1 conv after it (naming that conv, whose only source with weights is the conv, crashed)."""
    model = randomize_batchnorm(SqueezeExcite(4, of_a_bn=False)).double().eval()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    fused, report = reparam.fuse_exported_with_report(torch.export.export(model, (x,)))
    assert [f.sources for f in report.fusions] == [("conv", "bn"), ("down",)] and batchnorms(fused.module()) == 0
    torch.testing.assert_close(fused.module()(x), model(x))
    fused, report = reparam.fuse_with_report(model, example_inputs=(x,))
    assert [f.sources for f in report.fusions] == [("conv", "bn")] and report.refused(Reason.NOT_CONSTANT)
    assert_same_function(model, fused, x)
