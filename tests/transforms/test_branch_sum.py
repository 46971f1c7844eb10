"""Transform II: branches of the same input, summed (identity and BN-only branches included)."""

import operator

import pytest
import torch
from torch import nn

import reparam
from reparam import Reason
from reparam.blocks import conv_bn, randomize_batchnorm
from tests.helpers import assert_same_function, batchnorms, convs

ADDS = {
    "plus": lambda a, b: a + b,
    "operator.add": operator.add,
    "torch.add": torch.add,
    "Tensor.add": lambda a, b: a.add(b),
    "torch.add(other=)": lambda a, b: torch.add(a, other=b),
}


class TwoBranches(nn.Module):
    def __init__(self, add) -> None:
        super().__init__()
        self.add = add
        self.a = conv_bn(4, 4, 3, padding=1)
        self.b = conv_bn(4, 4, 1)

    def forward(self, x):
        return self.add(self.a(x), self.b(x))


@pytest.mark.parametrize("spelling", list(ADDS))
def test_every_spelling_of_a_sum_fuses(spelling):
    model = randomize_batchnorm(TwoBranches(ADDS[spelling])).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert (convs(fused), batchnorms(fused)) == (1, 0)
    assert "branch_sum" in report.fusions[0].rules
    assert_same_function(model, fused, torch.randn(2, 4, 7, 5, dtype=torch.float64))


class Chained(nn.Module):
    """Four branches summed in a chain, with an identity and a BN-only branch."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.a = conv_bn(6, 6, 3, padding=1, groups=groups)
        self.b = conv_bn(6, 6, 1, groups=groups)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return torch.relu(((self.a(x) + x) + self.b(x)) + self.bn(x))


@pytest.mark.parametrize("groups", [1, 2, 3, 6])
def test_chained_sums_with_identity_and_bn_branches(groups):
    model = randomize_batchnorm(Chained(groups)).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert (convs(fused), batchnorms(fused)) == (1, 0)
    assert fused.get_submodule("conv").groups == groups
    assert len(report.fusions[0].sources) == 5
    assert_same_function(model, fused, torch.randn(1, 6, 5, 9, dtype=torch.float64))


class Residual(nn.Module):
    def __init__(self, identity_first: bool) -> None:
        super().__init__()
        self.identity_first = identity_first
        self.branch = conv_bn(4, 4, 3, padding=1)

    def forward(self, x):
        return x + self.branch(x) if self.identity_first else self.branch(x) + x


@pytest.mark.parametrize("identity_first", [True, False])
def test_identity_branch(identity_first):
    model = randomize_batchnorm(Residual(identity_first)).double().eval()
    fused = reparam.fuse(model)
    assert (convs(fused), batchnorms(fused)) == (1, 0)
    assert_same_function(model, fused, torch.randn(2, 4, 6, 6, dtype=torch.float64))


class Pair(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return self.a(x) + self.b(x)


def refusal_of(model: nn.Module, x: torch.Tensor, reason: Reason) -> reparam.Refusal:
    model = model.double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert convs(fused) == 2, "a refused sum keeps both branches"
    assert_same_function(model, fused, x.double(), rtol=0)
    [refusal] = report.refused(reason)
    assert refusal.rule == "branch_sum"
    return refusal


def test_different_strides_are_refused():
    # both give 2x2 outputs on a 4x4 input, but on different grids
    model = Pair(nn.Conv2d(3, 3, 1, stride=2), nn.Conv2d(3, 3, 3))
    refusal = refusal_of(model, torch.randn(1, 3, 4, 4), Reason.STRIDE)
    assert "(2, 2)" in refusal.message and "(1, 1)" in refusal.message


def test_misaligned_outputs_are_refused():
    # same stride and output size on even inputs, but the 2x2 kernel is centred half a pixel off
    model = Pair(nn.Conv2d(3, 3, 1, stride=2), nn.Conv2d(3, 3, 2, stride=2))
    refusal_of(model, torch.randn(1, 3, 6, 6), Reason.MISALIGNED)


def test_different_padding_modes_are_refused():
    model = Pair(nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"))
    refusal_of(model, torch.randn(1, 3, 5, 5), Reason.PADDING_MODE)


def test_same_nonzero_padding_mode_fuses():
    model = (
        Pair(nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular"), nn.Conv2d(3, 3, 1, padding_mode="circular"))
        .double()
        .eval()
    )
    fused = reparam.fuse(model)
    assert convs(fused) == 1 and fused.get_submodule("conv").padding_mode == "circular"
    assert_same_function(model, fused, torch.randn(1, 3, 5, 6, dtype=torch.float64))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, y):
        return self.a(x) + self.b(y)


def test_branches_of_different_inputs_are_not_a_match():
    model = TwoInputs().eval()
    fused, report = reparam.fuse_with_report(model)
    assert convs(fused) == 2 and report.fusions == [] and report.refusals == []


class ScaledSum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return torch.add(self.a(x), self.b(x), alpha=2)


def test_add_with_alpha_scales_the_second_branch():
    model = ScaledSum().double().eval()
    fused = reparam.fuse(model)
    assert convs(fused) == 1
    assert_same_function(model, fused, torch.randn(1, 3, 4, 4, dtype=torch.float64))


class TensorAlpha(ScaledSum):
    def forward(self, x):
        return torch.add(self.a(x), self.b(x), alpha=torch.tensor(2.0))  # not a number: left as written


def test_an_alpha_that_is_not_a_number_is_left_as_written():
    model = TensorAlpha().double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert convs(fused) == 2 and [r.reason for r in report.refusals] == [reparam.Reason.NOT_CONSTANT]
