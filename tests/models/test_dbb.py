"""Diverse Branch Blocks, alone and in a ResNet."""

import copy
from unittest import mock

import pytest
import torch
from torch import nn

import reparam
from reparam import Kernel
from reparam.blocks import ACBlock, DiverseBranchBlock, ResNet18, plain_conv_bn, randomize_batchnorm
from reparam.stats import relative_error
from tests.helpers import assert_same_function, batchnorms, convs


@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("groups", [1, 2])
def test_dbb_is_one_kxk_conv(kernel_size, stride, groups):
    model = randomize_batchnorm(DiverseBranchBlock(4, 8, kernel_size, stride, groups), seed=kernel_size).eval()
    fused, report = reparam.fuse_with_report(model)
    assert (convs(fused), batchnorms(fused)) == (1, 0)
    conv = fused.get_submodule("conv")
    assert (conv.kernel_size, conv.stride, conv.groups) == ((kernel_size,) * 2, (stride,) * 2, groups)
    assert {"sequential", "avg_pool", "branch_sum"} <= set(report.fusions[0].rules)
    assert report.refusals == []
    for size in [(13, 11), (kernel_size, kernel_size)]:
        x = torch.randn(2, 4, *size)
        with torch.no_grad():
            assert relative_error(fused(x), model(x)) <= 1e-5
    double = copy.deepcopy(model).double()
    assert_same_function(double, reparam.fuse(double), torch.randn(1, 4, 9, 8, dtype=torch.float64))


def test_no_kernel_composition_is_computed_twice():
    """The planner reuses the kernels the chains were grown with (a DBB block's dense 1x1 -> KxK is its costliest)."""
    model = randomize_batchnorm(DiverseBranchBlock(4, 8, 3)).eval()
    calls = []
    then = Kernel.then

    def recorded(first, second):
        calls.append((first, second))
        return then(first, second)

    with mock.patch.object(Kernel, "then", recorded):
        reparam.fuse(model)
    pairs = [(id(a), id(b)) for a, b in calls]
    assert len(calls) >= 4 and len(set(pairs)) == len(pairs)


@pytest.mark.parametrize("unit", [DiverseBranchBlock, ACBlock], ids=["DBB", "ACNet"])
def test_resnet18_of_training_blocks_fuses_to_the_plain_resnet18(unit):
    model = randomize_batchnorm(ResNet18(unit, num_classes=10, width=8)).eval()
    plain = ResNet18(plain_conv_bn, num_classes=10, width=8)
    fused = reparam.fuse(model)
    assert convs(fused) == convs(plain) == 20 and batchnorms(fused) == 0
    x = torch.randn(2, 3, 67, 61)
    with torch.no_grad():
        assert relative_error(fused(x), model(x)) <= 1e-5
    shapes = sorted(tuple(m.weight.shape) for m in fused.modules() if isinstance(m, nn.Conv2d))
    assert shapes == sorted(tuple(m.weight.shape) for m in plain.modules() if isinstance(m, nn.Conv2d))
