"""Transform I: conv followed by BatchNorm."""

import pytest
import torch
from torch import nn

import reparam
from reparam import Reason
from reparam.blocks import randomize_batchnorm
from tests.helpers import assert_same_function, batchnorms, convs

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class ConvBN(nn.Module):
    def __init__(self, dims: int, bias: bool, affine: bool) -> None:
        super().__init__()
        self.conv = CONV[dims](4, 6, 3, stride=2, padding=1, groups=2, bias=bias)
        self.bn = BN[dims](6, affine=affine)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_conv_bn_becomes_one_conv(dims, bias, affine):
    model = randomize_batchnorm(ConvBN(dims, bias, affine), seed=dims).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert (convs(fused), batchnorms(fused)) == (1, 0)
    assert report.fusions[0].sources == ("conv", "bn")
    assert "conv_bn" in report.fusions[0].rules
    assert_same_function(model, fused, torch.randn(2, 4, *[7] * dims, dtype=torch.float64))


def test_bn_in_training_mode_is_refused():
    model = randomize_batchnorm(ConvBN(2, True, True)).eval()
    model.bn.train()
    fused, report = reparam.fuse_with_report(model)
    assert (convs(fused), batchnorms(fused)) == (1, 1)
    [refusal] = report.refused(Reason.BN_TRAINING)
    assert refusal.nodes == ("bn",) and ".eval()" in refusal.message


def test_bn_without_running_stats_is_refused():
    model = ConvBN(2, True, True).eval()
    model.bn = nn.BatchNorm2d(6, track_running_stats=False)
    model.eval()
    fused, report = reparam.fuse_with_report(model)
    assert batchnorms(fused) == 1
    assert [r.nodes for r in report.refused(Reason.NO_RUNNING_STATS)] == [("bn",)]
    x = torch.randn(3, 4, 8, 8)
    assert_same_function(model, fused, x, rtol=0)


class SharedConv(nn.Module):
    """The conv output feeds the BN and a skip: folding the BN would change the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(self.bn(y)) * y


def test_shared_intermediate_is_refused_and_values_kept():
    model = randomize_batchnorm(SharedConv()).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert (convs(fused), batchnorms(fused)) == (1, 1)
    [refusal] = report.refused(Reason.SHARED_INTERMEDIATE)
    assert refusal.nodes == ("conv", "bn")
    assert_same_function(model, fused, torch.randn(2, 4, 6, 6, dtype=torch.float64), rtol=0)


def test_folding_is_done_in_float64_and_cast_back():
    model = randomize_batchnorm(ConvBN(2, True, True)).eval()
    fused = reparam.fuse(model)
    reference = model.double()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    folded = reparam.fuse(reference)
    assert fused.get_submodule("conv").weight.dtype == torch.float32
    # the float32 weights are the float64 fold, rounded once
    assert torch.equal(fused.get_submodule("conv").weight, folded.get_submodule("conv").weight.float())
    assert_same_function(reference, folded, x)
