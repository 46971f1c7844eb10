"""Linear layers, BN before conv, transposed convs, padding modes."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reparam
from reparam.layers import AnyRankBatchNorm
from reparam import Reason
from reparam.blocks import randomize_batchnorm
from tests.helpers import assert_same_function, batchnorms


def linears(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in model.modules())


def test_linear_then_bn1d_and_bn1d_then_linear_fold():
    head = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.BatchNorm1d(8),
        nn.Linear(8, 6),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.Linear(6, 4),
        nn.BatchNorm1d(4),
    )
    model = randomize_batchnorm(head).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert (linears(fused), batchnorms(fused)) == (2, 0)
    assert all("linear" in f.rules for f in report.fusions)
    assert_same_function(model, fused, torch.randn(3, 3, 6, 6, dtype=torch.float64))


class ParallelLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = nn.Linear(5, 4), nn.Linear(5, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        x = torch.flatten(x, 1)
        return self.bn(self.a(x) + self.b(x))


def test_parallel_linear_branches_sum():
    model = randomize_batchnorm(ParallelLinears()).double().eval()
    fused = reparam.fuse(model)
    assert (linears(fused), batchnorms(fused)) == (1, 0)
    assert_same_function(model, fused, torch.randn(3, 5, 1, 1, dtype=torch.float64))


class TokensThenBN(nn.Module):
    """A Linear over the last dim of (batch, tokens, features): its BN1d normalizes tokens, not features."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.linear(x))


def test_linear_on_an_input_of_unknown_rank_is_not_folded():
    model = randomize_batchnorm(TokensThenBN()).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert (linears(fused), batchnorms(fused)) == (1, 1)
    assert report.refused(Reason.GEOMETRY)[0].rule == "linear"
    assert_same_function(model, fused, torch.randn(2, 4, 4, dtype=torch.float64), rtol=0)


@pytest.mark.parametrize("padding", [0, 1])
def test_bn_before_a_conv_folds_only_without_padding(padding):
    model = randomize_batchnorm(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=padding))).double().eval()
    fused, report = reparam.fuse_with_report(model)
    if padding:
        assert batchnorms(fused) == 1 and report.refused(Reason.BORDER_NOT_EXACT)
    else:
        assert batchnorms(fused) == 0 and report.refusals == []
    assert_same_function(model, fused, torch.randn(2, 3, 6, 5, dtype=torch.float64))


class TransposedBranches(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.ConvTranspose2d(4, 6, 4, 2, 1, groups=groups), nn.BatchNorm2d(6))
        self.b = nn.Sequential(nn.ConvTranspose2d(4, 6, 2, 2, 0, groups=groups), nn.BatchNorm2d(6))

    def forward(self, x):
        return torch.relu(self.a(x) + self.b(x))


@pytest.mark.parametrize("groups", [1, 2])
def test_transposed_convs_fold_their_bn_and_sum(groups):
    model = randomize_batchnorm(TransposedBranches(groups)).double().eval()
    fused, report = reparam.fuse_with_report(model)
    transposed = [m for m in fused.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(transposed) == 1 and transposed[0].kernel_size == (4, 4) and batchnorms(fused) == 0
    assert "transposed_conv" in report.fusions[0].rules
    assert_same_function(model, fused, torch.randn(2, 4, 5, 3, dtype=torch.float64))


def test_a_conv_after_a_transposed_conv_is_refused():
    model = nn.Sequential(nn.ConvTranspose2d(3, 3, 2, 2), nn.Conv2d(3, 3, 1)).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert report.refused(Reason.GEOMETRY)[0].nodes == ("0", "1")
    assert_same_function(model, fused, torch.randn(1, 3, 4, 4, dtype=torch.float64), rtol=0)


class Padded(nn.Module):
    def __init__(self, modes) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 3, 5, padding=2, padding_mode=modes[0])
        self.b = nn.Conv2d(3, 3, 3, padding=1, padding_mode=modes[1])
        self.c = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.a(x) + self.b(x) + self.c(x)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_branches_padding_alike_merge_whatever_their_padding(mode):
    model = Padded((mode, mode)).double().eval()
    fused = reparam.fuse(model)
    [conv] = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert (conv.kernel_size, conv.padding_mode) == ((5, 5), mode)
    assert_same_function(model, fused, torch.randn(2, 3, 6, 7, dtype=torch.float64))


def test_branches_padding_differently_are_refused():
    model = Padded(("reflect", "zeros")).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert report.refused(Reason.PADDING_MODE)
    assert_same_function(model, fused, torch.randn(2, 3, 6, 7, dtype=torch.float64))


class ConvHead(nn.Module):
    """A classifier head written with a 1x1 conv on the pooled map, then BN1d and a Linear."""

    def __init__(self, pool: nn.Module, groups: int = 1, features: int = 4) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = pool
        self.fc = nn.Conv2d(8, 4, 1, groups=groups)
        self.bn, self.out = nn.BatchNorm1d(features), nn.Linear(features, 2)

    def forward(self, x):
        return self.out(self.bn(torch.flatten(self.fc(self.pool(torch.relu(self.body(x)))), 1)))


def test_a_conv_on_a_pooled_map_becomes_a_linear_that_folds_with_the_head():
    model = randomize_batchnorm(ConvHead(nn.AdaptiveAvgPool2d(1))).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert (linears(fused), batchnorms(fused)) == (1, 0)
    assert [r.rule for r in report.replacements] == ["flattened_conv", "flattened_conv"]
    assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == 1
    assert_same_function(model, fused, torch.randn(3, 3, 7, 5, dtype=torch.float64))


@pytest.mark.parametrize(
    "pool, groups", [(nn.AdaptiveAvgPool2d(2), 1), (nn.AdaptiveAvgPool2d(1), 2)], ids=["2x2 map", "grouped"]
)
def test_a_conv_on_a_map_not_known_to_be_1x1_or_grouped_stays(pool, groups):
    model = randomize_batchnorm(ConvHead(pool, groups, features=16 if groups == 1 else 4)).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert report.replacements == [] and sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == 2
    assert_same_function(model, fused, torch.randn(3, 3, 6, 6, dtype=torch.float64))


class BatchNorm1dOnly(nn.Module):
    """A region made only of per-channel maps of unknown rank: no conv can be written for it."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(x) * 2.0 + x


class FunctionalBatchNormCat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)

    def forward(self, x):  # on a 5d input, dim -3 is depth, not channels
        return torch.cat([F.batch_norm(x, self.mean, self.var), F.batch_norm(x, self.mean, self.var)], dim=-3)


@pytest.mark.parametrize(
    "model, shape",
    [(BatchNorm1dOnly, (4, 4)), (BatchNorm1dOnly, (4, 4, 3)), (FunctionalBatchNormCat, (2, 4, 3, 5, 5))],
    ids=["(N, C) with N == C", "(N, C, L)", "cat on depth"],
)
def test_per_channel_maps_of_unknown_rank_are_never_written_as_a_conv(model, shape):
    model = randomize_batchnorm(model()).double().eval()
    fused = reparam.fuse(model)
    assert not any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) for m in fused.modules())
    if model.__class__ is BatchNorm1dOnly:  # one BatchNorm that takes any rank, as the BatchNorm1d did
        assert [type(m) for m in fused.modules()][1:] == [AnyRankBatchNorm]
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-12, atol=1e-12)


def test_example_inputs_reveal_a_linear_inputs_rank():
    model = randomize_batchnorm(TokensThenBN()).double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)  # (batch, features) this time
    fused = reparam.fuse(model, example_inputs=(x,))
    assert (linears(fused), batchnorms(fused)) == (1, 0)
    assert_same_function(model, fused, x)
    tokens = reparam.fuse(model, example_inputs=(torch.randn(2, 4, 4, dtype=torch.float64),))
    assert batchnorms(tokens) == 1


class Permuted(nn.Module):
    """A conv + BN, then a Linear over the channels moved last, moved back with `back`, then a BN."""

    def __init__(self, back: tuple[int, ...]) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4)
        self.fc, self.back = nn.Linear(4, 4), back
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.fc(self.norm(self.conv(x)).permute(0, 2, 3, 1))
        return self.bn(y.permute(*self.back))


def test_a_channels_last_linear_folds_the_bns_on_both_sides():
    model = randomize_batchnorm(Permuted((0, 3, 1, 2))).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert [r.rule for r in report.replacements] == ["channels_last_linear"]
    assert (linears(fused), batchnorms(fused)) == (0, 0)  # the BN before the 1x1 folds into it too (III)
    assert_same_function(model, fused, torch.randn(2, 4, 5, 7, dtype=torch.float64))


def test_a_linear_moved_back_along_another_permutation_is_kept():
    model = randomize_batchnorm(Permuted((0, 3, 2, 1))).double().eval()  # (N, C, W, H): not the input's layout
    fused, report = reparam.fuse_with_report(model)
    assert not report.replacements and any(isinstance(m, nn.Linear) for m in fused.modules())
    assert_same_function(model, fused, torch.randn(2, 4, 5, 5, dtype=torch.float64))
