"""Scale and shift layers folded into the conv before them."""

import pytest
import torch
from torch import nn

import reparam
from reparam import Reason
from reparam.blocks import conv_bn, randomize_batchnorm
from tests.helpers import assert_same_function, batchnorms, convs


class LayerScale(nn.Module):
    """conv+BN, then a layer-scale gamma, a division, a per-channel shift and a scalar shift."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.body = conv_bn(4, 6, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(6) + 0.5)
        self.shift = nn.Parameter(torch.randn(1, 6, 1, 1))
        self.spelling = spelling

    def forward(self, x):
        y = self.body(x)
        if self.spelling == "view":
            y = y * self.gamma.view(1, -1, 1, 1)
        elif self.spelling == "index":
            y = self.gamma[:, None, None] * y
        else:
            y = torch.mul(y, self.gamma.reshape(6, 1, 1))
        return torch.relu((y / 4.0 + self.shift) - 0.5)


@pytest.mark.parametrize("spelling", ["view", "index", "torch.mul"])
def test_layer_scale_and_shifts_fold_into_the_conv(spelling):
    model = randomize_batchnorm(LayerScale(spelling)).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert (convs(fused), batchnorms(fused)) == (1, 0)
    assert {"scale", "divide", "shift"} <= set(report.fusions[0].rules)
    assert sorted(fused.state_dict()) == ["body_conv.bias", "body_conv.weight"]
    assert_same_function(model, fused, torch.randn(2, 4, 5, 7, dtype=torch.float64))


class PerPosition(nn.Module):
    def __init__(self, shape) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.constant = nn.Parameter(torch.randn(*shape))

    def forward(self, x):
        return self.conv(x) * self.constant


@pytest.mark.parametrize("shape", [(1, 4, 5, 5), (4,), (5, 1)], ids=["per position", "(C,) on NCHW", "wrong axis"])
def test_a_constant_that_is_not_per_channel_is_refused(shape):
    model = PerPosition(shape).double().eval()
    fused, report = reparam.fuse_with_report(model)
    [refusal] = report.refused(Reason.GEOMETRY)
    assert refusal.rule == "scale" and "per channel" in refusal.message
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64) if shape != (4,) else None
    if x is not None:
        assert_same_function(model, fused, x, rtol=0)


class ComputedScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gamma = nn.Parameter(torch.rand(4))

    def forward(self, x):
        return self.conv(x) * self.gamma.exp().view(1, -1, 1, 1)


def test_a_scale_computed_in_forward_from_parameters_is_folded():
    model = ComputedScale().double().eval()
    fused = reparam.fuse(model)
    assert "exp" not in fused.code and convs(fused) == 1
    assert_same_function(model, fused, torch.randn(1, 3, 5, 5, dtype=torch.float64))


def test_scalar_constants_keep_the_dtype():
    model = nn.Sequential(conv_bn(3, 4, 3)).eval()

    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, x):
            return sum([self.body(x), 0.25]) * 2

    fused = reparam.fuse(Shifted().eval())
    assert convs(fused) == 1 and {p.dtype for p in fused.parameters()} == {torch.float32}
    assert_same_function(Shifted().eval(), fused, torch.randn(1, 3, 5, 5), rtol=1e-6)
