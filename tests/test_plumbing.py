"""Ops between layers that compute nothing: no-ops dropped, the others reported where they keep two layers apart."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reparam
from reparam import Reason
from reparam.blocks import randomize_batchnorm

from .helpers import assert_same_function, batchnorms


class Between(nn.Module):
    """A conv, then `op` of its output, then a BN."""

    def __init__(self, op, channels: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.op = op

    def forward(self, x):
        return self.bn(self.op(self.conv(x)))


@pytest.mark.parametrize(
    "op",
    [lambda y: y.contiguous(), lambda y: y.double(), lambda y: y.to(torch.float64)],
    ids=["contiguous", "double", "to"],
)
def test_an_op_that_returns_its_input_itself_is_dropped_and_the_bn_folds(op):
    model = randomize_batchnorm(Between(op)).double().eval()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    fused, report = reparam.fuse_with_report(model, example_inputs=(x,))
    assert batchnorms(fused) == 0 and len(report.fusions) == 1
    assert_same_function(model, fused, x)


def test_a_cast_that_changes_the_dtype_is_kept():
    model = randomize_batchnorm(Between(lambda y: y.double())).eval()
    model.bn.double()
    x = torch.randn(2, 8, 5, 5)
    fused, report = reparam.fuse_with_report(model, example_inputs=(x,))
    assert batchnorms(fused) == 1 and report.refused(Reason.UNSUPPORTED_OP)
    with torch.no_grad():
        assert fused(x).dtype == torch.float64


@pytest.mark.parametrize(
    ("op", "channels", "name"),
    [
        (lambda y: y.permute(0, 1, 3, 2), 8, "permute"),
        (lambda y: y.clone(), 8, "clone"),
        (lambda y: y[:, :4], 4, "getitem"),
        (lambda y: torch.roll(y, 1, dims=2), 8, "roll"),
    ],
    ids=["permute", "clone", "channel slice", "roll"],
)
def test_a_layer_read_through_an_op_no_rule_composes_is_reported(op, channels, name):
    model = randomize_batchnorm(Between(op, channels)).double().eval()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    fused, report = reparam.fuse_with_report(model, example_inputs=(x,))
    [refusal] = report.refused(Reason.UNSUPPORTED_OP)
    assert refusal.nodes == ("conv", "bn") and f"`{name}`" in refusal.message
    assert "nothing to fuse" not in str(report)
    assert_same_function(model, fused, x)


class ChannelsLastMlp(nn.Module):
    """UniRepLKNet's style: dw conv + BN, channels moved last, Linear, GELU, Linear, moved back, BN.

    Neither Linear has a permute on both sides, so neither is a 1x1 conv. The BN after the permute
    back folds into the second (`channels_first.py`); the first reads the fused dw conv + BN through
    a permute no rule composes.
    """

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.dwconv, self.norm = nn.Conv2d(channels, channels, 3, padding=1, groups=channels), nn.BatchNorm2d(channels)
        self.pwconv1, self.act, self.pwconv2 = nn.Linear(channels, 8), nn.GELU(), nn.Linear(8, channels)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)).permute(0, 2, 3, 1))))
        return self.bn(y.permute(0, 3, 1, 2)) + x


def test_a_layer_kept_as_written_and_one_fused_away_are_reported_when_a_move_keeps_them_apart():
    """The dw conv + BN is fused (its nodes replaced), and the Linears stay: both pairs are still named."""
    model = randomize_batchnorm(ChannelsLastMlp()).double().eval()
    fused, report = reparam.fuse_with_report(model)
    pairs = {r.nodes for r in report.refused(Reason.UNSUPPORTED_OP)}
    assert pairs == {("norm", "pwconv1")} and batchnorms(fused) == 0
    assert_same_function(model, fused, torch.randn(2, 4, 5, 6, dtype=torch.float64))
