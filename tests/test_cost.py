"""The cost model (`reparam.cost`) and the measured decisions (`cost="measure"`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reparam
from reparam import Reason
from reparam.cost import NOMINAL, Cost, Workload, efficiency
from reparam.errors import InvalidArgumentError
from reparam.kernel import Kernel
from reparam.measured import TIE, winner
from reparam.report import Form

from .helpers import convs as count_convs


def conv_kernel(channels: int, kernel_size: tuple[int, int], groups: int = 1) -> Kernel:
    padding = tuple(k // 2 for k in kernel_size)
    return Kernel.from_conv(nn.Conv2d(channels, channels, kernel_size, padding=padding, groups=groups))


class ACBlock(nn.Module):
    """ACNet's training-time block as its authors sum it: 1x1, 1x3 and 3x1 branches of one input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.square = nn.Conv2d(channels, channels, 1)
        self.hor = nn.Conv2d(channels, channels, (1, 3), padding=(0, 1))
        self.ver = nn.Conv2d(channels, channels, (3, 1), padding=(1, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.square(x) + self.hor(x) + self.ver(x)


def test_a_1x1_runs_at_the_full_rate_and_short_dot_products_below_it():
    assert efficiency(conv_kernel(8, (1, 1))) == 1.0
    depthwise, dense = efficiency(conv_kernel(64, (3, 3), groups=64)), efficiency(conv_kernel(64, (3, 3)))
    assert depthwise < 0.2 < 0.8 < dense < 1.0
    assert efficiency(conv_kernel(8, (1, 3))) < efficiency(conv_kernel(8, (3, 3))) < efficiency(conv_kernel(8, (5, 5)))


def test_a_depthwise_conv_is_priced_above_its_macs_and_a_per_channel_map_as_a_batchnorm():
    depthwise, dense = Cost.of(conv_kernel(64, (3, 3), groups=64)), Cost.of(conv_kernel(64, (3, 3)))
    assert depthwise.macs * 64 == dense.macs
    assert depthwise.seconds(NOMINAL) > 5 * dense.seconds(NOMINAL) / 64  # 1/64 of the MACs, far more of the time
    channelwise = Kernel.affine(torch.rand(64), torch.rand(64), 2)
    assert Cost.of(channelwise).work == 0 and Cost.of(channelwise).seconds(NOMINAL) < depthwise.seconds(NOMINAL)


def test_costs_add_and_scale_with_positions_and_element_size():
    a, b = Cost.of(conv_kernel(16, (3, 3))), Cost.of(conv_kernel(16, (1, 1)))
    assert (a + b).seconds(NOMINAL) == pytest.approx(a.seconds(NOMINAL) + b.seconds(NOMINAL))
    assert (a + b - b).seconds(NOMINAL) == pytest.approx(a.seconds(NOMINAL))
    small, large = Workload(16), Workload(16 * 1024)
    per_call = a.seconds(Workload(0))
    assert a.seconds(large) - per_call == pytest.approx(1024 * (a.seconds(small) - per_call))
    assert a.seconds(Workload(4096, itemsize=8)) > a.seconds(Workload(4096, itemsize=2))


def test_the_decision_follows_the_input_size_the_example_inputs_give():
    """Three small convs cost three calls: on a tiny map one 3x3 wins; on a large map of wide channels it does not."""
    small = ACBlock(64).eval()
    fused, report = reparam.fuse_with_report(small, example_inputs=(torch.randn(1, 64, 4, 4),))
    assert count_convs(fused) == 1 and report.refusals == []
    wide = ACBlock(256).eval()
    fused, report = reparam.fuse_with_report(wide, example_inputs=(torch.randn(1, 256, 14, 14),))
    [refusal] = report.refused(Reason.WOULD_COST_MORE)
    assert "196 positions" in refusal.message and count_convs(fused) == 2


def test_each_fusion_reports_its_estimated_time_before_and_after():
    block = reparam.blocks.RepVGGBlock(16, 16).eval()
    _, report = reparam.fuse_with_report(block, example_inputs=(torch.randn(1, 16, 32, 32),))
    [fusion] = report.fusions
    assert 0 < fusion.seconds_after < fusion.seconds_before
    assert "estimated" in str(report)


def test_ties_in_measured_time_go_to_fewer_ops():
    one = Form("one conv", 1, 1e-3, measured=1.00e-3)
    planned = Form("as planned", 2, 1e-3, measured=1.00e-3 / (1 + TIE / 2))  # faster, but within the tie
    written = Form("as written", 5, 1e-3, measured=0.5e-3)
    assert winner([one, planned]) is one
    assert winner([one, planned, written]) is written
    assert winner([one, Form("as written", 3, 1e-3)]) is one  # an untimed form never wins


def test_measure_times_the_close_forms_and_keeps_the_fastest():
    torch.manual_seed(0)
    block = ACBlock(32).eval()
    x = torch.randn(1, 32, 28, 28)
    fused, report = reparam.fuse_with_report(block, cost="measure", example_inputs=(x,), verify=True)
    [timing] = report.timings[:1]
    assert timing.sources == ("square", "hor", "ver")
    names = [form.name for form in timing.forms]
    assert names[0] == "one conv" and "as written" in names
    assert all(form.measured is not None and form.measured > 0 for form in timing.forms)
    kept = next(form for form in timing.forms if form.name == timing.chosen)
    assert kept is winner(list(timing.forms))
    assert (count_convs(fused) == 1) == (timing.chosen == "one conv")
    assert "timed" in str(report)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), block(x), rtol=1e-4, atol=1e-5)


def test_measure_leaves_clear_decisions_to_the_estimate():
    """A conv and its BN: one conv is estimated far faster than the two ops, so nothing is timed."""
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)).eval()
    fused, report = reparam.fuse_with_report(model, cost="measure", input_shape=(1, 8, 16, 16))
    assert report.timings == [] and count_convs(fused) == 1


def test_measure_needs_inputs_and_cost_takes_two_values():
    block = ACBlock(8).eval()
    with pytest.raises(InvalidArgumentError, match="example_inputs"):
        reparam.fuse(block, cost="measure")
    with pytest.raises(InvalidArgumentError, match='"estimate" or "measure"'):
        reparam.fuse(block, cost="fast", example_inputs=(torch.randn(1, 8, 8, 8),))


def test_measuring_leaves_the_callers_model_as_it_was():
    block = reparam.blocks.randomize_batchnorm(ACBlock(16)).eval()
    before = {name: t.clone() for name, t in block.state_dict().items()}
    reparam.fuse(block, cost="measure", example_inputs=(torch.randn(1, 16, 12, 12),))
    after = block.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
