"""Transform IV: branches concatenated along channels."""

import pytest
import torch
from torch import nn

import reparam
from reparam import Reason
from reparam.blocks import InceptionBlock, conv_bn, randomize_batchnorm
from tests.helpers import assert_same_function, batchnorms, convs


def test_inception_block_is_one_5x5_when_asked_and_refused_by_default():
    model = randomize_batchnorm(InceptionBlock(6, (2, 3, 4))).double().eval()
    fused, report = reparam.fuse_with_report(model, allow_costlier=True)
    assert (convs(fused), batchnorms(fused)) == (1, 0)
    conv = fused.get_submodule("conv")
    assert (conv.kernel_size, conv.out_channels) == ((5, 5), 9)
    assert "concat" in report.fusions[0].rules
    assert_same_function(model, fused, torch.randn(2, 6, 7, 9, dtype=torch.float64))

    kept, report = reparam.fuse_with_report(model)
    assert (convs(kept), batchnorms(kept)) == (3, 0)
    [refusal] = report.refused(Reason.WOULD_COST_MORE)
    assert len(refusal.nodes) == 6
    assert_same_function(model, kept, torch.randn(2, 6, 7, 9, dtype=torch.float64))


class Cat(nn.Module):
    def __init__(self, dim: int, identity: bool) -> None:
        super().__init__()
        self.dim, self.identity = dim, identity
        self.a = conv_bn(4, 4, 3, padding=1)
        self.b = conv_bn(4, 4, (1, 3), padding=(0, 1))

    def forward(self, x):
        branches = [self.a(x), self.b(x)] + ([x] if self.identity else [])
        return torch.cat(branches, self.dim)


@pytest.mark.parametrize("dim", [1, -3])
@pytest.mark.parametrize("identity", [False, True])
def test_concat_of_mixed_branches(dim, identity):
    model = randomize_batchnorm(Cat(dim, identity)).double().eval()
    fused = reparam.fuse(model, allow_costlier=True)
    assert (convs(fused), batchnorms(fused)) == (1, 0)
    assert fused.get_submodule("conv").out_channels == 12 if identity else 8
    assert_same_function(model, fused, torch.randn(2, 4, 5, 6, dtype=torch.float64))


@pytest.mark.parametrize("dim", [2, -1, 0])
def test_concat_along_other_dims_is_not_a_match(dim):
    model = randomize_batchnorm(Cat(dim, False)).double().eval()
    fused, report = reparam.fuse_with_report(model, allow_costlier=True)
    assert convs(fused) == 2 and not any("concat" in f.rules for f in report.fusions)
    assert_same_function(model, fused, torch.randn(2, 4, 5, 5, dtype=torch.float64))


def test_concat_with_different_strides_is_refused():
    class Strided(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 3, 1, stride=2), nn.Conv2d(3, 3, 3)

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x)], 1)

    model = Strided().double().eval()
    fused, report = reparam.fuse_with_report(model, allow_costlier=True)
    assert [r.rule for r in report.refused(Reason.STRIDE)] == ["concat"]
    assert_same_function(model, fused, torch.randn(1, 3, 4, 4, dtype=torch.float64), rtol=0)
