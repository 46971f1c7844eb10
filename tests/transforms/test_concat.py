"""Transform IV: branches concatenated along channels."""

import pytest
import torch
import torch.nn.functional as F
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


class MixedConv(nn.Module):
    """timm's MixNet style: split the channels, a depthwise conv of its own size on each, concatenate, one BN."""

    def __init__(self, splits=(4, 3, 5), also_return: int | None = None) -> None:
        super().__init__()
        self.splits, self.also_return = list(splits), also_return
        self.convs = nn.ModuleList(
            nn.Conv2d(c, c, 2 * i + 3, 1, i + 1, groups=c, bias=False) for i, c in enumerate(splits)
        )
        self.bn = nn.BatchNorm2d(sum(splits))

    def forward(self, x):
        parts = torch.split(x, self.splits, 1)
        outs = [conv(parts[i]) for i, conv in enumerate(self.convs)]
        y = torch.relu(self.bn(torch.cat(outs, 1)))
        return y if self.also_return is None else (y, outs[self.also_return])


def test_a_bn_after_a_concatenation_folds_a_slice_into_each_part():
    model = randomize_batchnorm(MixedConv()).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert (convs(fused), batchnorms(fused), len(report.fusions)) == (3, 0, 3)
    assert "bn_channels_4_7" in report.fusions[1].sources  # the BN's channels 4..6 went into the second conv
    for size in [(7, 9), (1, 2)]:
        assert_same_function(model, fused, torch.randn(2, 12, *size, dtype=torch.float64))


def test_a_bn_after_a_concatenation_stays_whole_when_a_part_is_also_read_elsewhere():
    model = randomize_batchnorm(MixedConv(also_return=1)).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert (convs(fused), batchnorms(fused)) == (3, 1)
    assert [u.layer for u in report.unfused] == ["bn"]
    x = torch.randn(2, 12, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        for expected, actual in zip(model(x), fused(x)):
            torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


class InputBeside(nn.Module):
    """`bn(cat([conv(x), x]))`: the input part has no layer to take its slice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(torch.cat([self.conv(x), x], 1))


def test_a_bn_after_a_concatenation_with_a_part_no_layer_makes_stays_one_layer():
    model = randomize_batchnorm(InputBeside()).double().eval()
    fused = reparam.fuse(model)
    assert batchnorms(fused) <= 1 and not any("channels_" in name for name, _ in fused.named_modules())
    assert_same_function(model, fused, torch.randn(2, 4, 5, 6, dtype=torch.float64))


class MixedConvThenConv(nn.Module):
    """MixedConv with `dim=1` as a keyword, then a 1x1 conv module reading the (distributed) BN's output."""

    def __init__(self) -> None:
        super().__init__()
        self.relu, self.first, self.second = nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.bn, self.tail = nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.tail(self.bn(torch.cat([self.first(self.relu(x)), self.second(x)], dim=1)))


def test_a_layer_reading_the_slices_concatenation_is_fused_too():
    model = randomize_batchnorm(MixedConvThenConv()).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert batchnorms(fused) == 0 and any("bn_channels_0_4" in f.sources for f in report.fusions)
    assert_same_function(model, fused, torch.randn(2, 4, 5, 6, dtype=torch.float64))


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's norm-act layer: its forward calls F.batch_norm on its own tensors, then the activation."""

    def forward(self, x):
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)
        return torch.relu(y)


class TimmMixedConv(MixedConv):
    """timm's MixNet block as timm writes it: the BN after the concatenation is a BatchNormAct2d."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = BatchNormAct2d(sum(self.splits))

    def forward(self, x):
        parts = torch.split(x, self.splits, 1)
        return self.bn(torch.cat([conv(parts[i]) for i, conv in enumerate(self.convs)], 1))


def test_a_functional_bn_after_a_concatenation_folds_a_slice_into_each_part_and_leaves_no_tensor():
    model = randomize_batchnorm(TimmMixedConv()).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert len(report.fusions) == 3 and not report.unfused
    assert not [n for n in fused.graph.nodes if n.op == "get_attr"]  # the BN's statistics went with it
    assert sum(p.numel() for p in fused.parameters()) == sum(c.weight.numel() + c.out_channels for c in model.convs)
    for size in (1, 6):
        assert_same_function(model, fused, torch.randn(2, 12, size, size, dtype=torch.float64))


def test_a_fused_model_fuses_again_its_any_rank_batchnorm_included():
    """A per-channel map of unknown rank is written as an AnyRankBatchNorm; a conv before it later takes it."""
    model = randomize_batchnorm(nn.Sequential(nn.Conv1d(4, 4, 3), nn.Sequential(nn.BatchNorm1d(4)))).double().eval()
    bn = reparam.fuse(nn.Sequential(nn.BatchNorm1d(4), Halve()).double().eval().requires_grad_(False))
    model[1] = bn
    fused = reparam.fuse(model)
    assert convs(fused) == 1 and batchnorms(fused) == 0
    assert_same_function(model, fused, torch.randn(2, 4, 9, dtype=torch.float64))


class Halve(nn.Module):
    def forward(self, x):
        return x / 2


class AssertingBatchNormAct2d(BatchNormAct2d):
    """timm's norm-act layer with its rank assert, which reads the concatenation's `ndim`."""

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        return super().forward(x)


def test_a_rank_assert_on_the_concatenation_does_not_keep_the_bn_whole():
    model = TimmMixedConv()
    model.bn = AssertingBatchNormAct2d(sum(model.splits))
    model = randomize_batchnorm(model).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert len(report.fusions) == 3 and not report.unfused
    assert [n for n in fused.graph.nodes if n.target is torch._assert]  # the assert still checks
    assert_same_function(model, fused, torch.randn(2, 12, 5, 5, dtype=torch.float64))


class InceptionDepthwise(nn.Module):
    """timm's InceptionNeXt token mixer: the channels split, one part kept as is and the others each a
    depthwise conv (square, 1xK, Kx1), concatenated, then a BN and the MLP's 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.hw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.w, self.h = (
            nn.Conv2d(4, 4, (1, 5), padding=(0, 2), groups=4),
            nn.Conv2d(4, 4, (5, 1), padding=(2, 0), groups=4),
        )
        self.norm, self.fc = nn.BatchNorm2d(16), nn.Conv2d(16, 8, 1)

    def forward(self, x):
        x_id, x_hw, x_w, x_h = torch.split(x, [4, 4, 4, 4], dim=1)
        return self.fc(self.norm(torch.cat((x_id, self.hw(x_hw), self.w(x_w), self.h(x_h)), dim=1)))


def test_a_bn_after_a_concatenation_with_a_part_no_layer_made_folds_into_the_conv_after_it():
    """The kept part is a split's output: no layer there takes a slice of the BN, so it is not distributed,
    also where shapes are known (they give the part's channels), and folds whole into the 1x1 conv."""
    model = randomize_batchnorm(InceptionDepthwise()).double().eval()
    x = torch.randn(2, 16, 7, 6, dtype=torch.float64)
    for fused in (reparam.fuse(model), reparam.fuse(model, example_inputs=(x,))):
        assert (convs(fused), batchnorms(fused)) == (4, 0)
        assert_same_function(model, fused, x)
    exported = reparam.fuse_exported(torch.export.export(model, (x,)))
    names = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert names.count("aten.conv2d.default") == 4 and not any("batch_norm" in name for name in names)
