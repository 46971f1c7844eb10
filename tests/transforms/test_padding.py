"""Padding as algebra: pads fold into the conv after them or the pointwise kernel before them."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import reparam
from reparam import Reason
from reparam.blocks import randomize_batchnorm
from tests.helpers import assert_same_function, batchnorms, convs

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BATCHNORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class DBBPadBySubtraction(nn.Module):
    """DBB's BN-and-pad written with F.pad: `F.pad(bn(y) - v, p) + v`, v computed in forward."""

    def __init__(self, dims: int, k: int, stride: int, groups: int) -> None:
        super().__init__()
        self.dims, self.p = dims, k // 2
        self.idconv = CONVS[dims](4, 4, 1, groups=groups, bias=False)
        self.bn1 = BATCHNORMS[dims](4)
        self.conv = CONVS[dims](4, 4, k, stride, groups=groups, bias=False)
        self.bn2 = BATCHNORMS[dims](4)

    def forward(self, x):
        bn = self.bn1
        v = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
        v = v.view(1, -1, *[1] * self.dims)
        y = F.pad(bn(self.idconv(x)) - v, [self.p] * (2 * self.dims)) + v
        return self.bn2(self.conv(y))


@given(
    dims=st.integers(1, 3),
    k=st.sampled_from([3, 5]),
    stride=st.integers(1, 2),
    groups=st.sampled_from([1, 2, 4]),
    size=st.integers(5, 8),
)
def test_dbb_pad_by_subtraction_is_one_conv(dims, k, stride, groups, size):
    model = randomize_batchnorm(DBBPadBySubtraction(dims, k, stride, groups)).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert (convs(fused), batchnorms(fused), len(report.fusions)) == (1, 0, 1)
    assert_same_function(model, fused, torch.randn(2, 4, *[size] * dims, dtype=torch.float64))


class PadThenConv(nn.Module):
    def __init__(self, pad: nn.Module | None, conv_padding: int = 0, padding_mode: str = "zeros") -> None:
        super().__init__()
        self.pad = pad
        self.conv = nn.Conv2d(3, 4, 3, padding=conv_padding, padding_mode=padding_mode)

    def forward(self, x):
        x = torch.relu(x)  # not a linear region: the pad folds into the conv, not before it
        return self.conv(self.pad(x) if self.pad is not None else F.pad(x, [2, 2, 2, 2]))


@pytest.mark.parametrize(
    "pad, conv_padding, padding_mode",
    [
        (nn.ZeroPad2d(1), 0, "zeros"),
        (nn.ZeroPad2d(1), 1, "zeros"),
        (None, 1, "zeros"),
        (nn.ConstantPad2d(1, 0.0), 0, "zeros"),
        (nn.ReflectionPad2d(1), 0, "zeros"),
        (nn.ReplicationPad2d(2), 0, "zeros"),
        (nn.CircularPad2d(1), 0, "zeros"),
    ],
    ids=["zero", "zero+padded", "F.pad", "constant 0", "reflect", "replicate", "circular"],
)
def test_a_pad_before_a_conv_becomes_its_padding(pad, conv_padding, padding_mode):
    model = PadThenConv(pad, conv_padding, padding_mode).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert len(report.fusions) == 1 and not any(isinstance(m, type(pad)) for m in fused.modules() if pad)
    assert "pad" not in fused.code
    for size in (5, 6):
        assert_same_function(model, fused, torch.randn(1, 3, size, size + 1, dtype=torch.float64))


@pytest.mark.parametrize(
    "pad, conv_padding, padding_mode, reason",
    [
        (nn.ZeroPad2d((1, 0, 1, 0)), 0, "zeros", Reason.GEOMETRY),
        (nn.ReflectionPad2d(1), 1, "zeros", Reason.PADDING_MODE),
        (nn.ZeroPad2d(1), 1, "reflect", Reason.PADDING_MODE),
        (nn.ConstantPad2d(1, 0.5), 0, "zeros", Reason.PADDING_MODE),
    ],
    ids=["asymmetric", "reflect into zero-padded", "zero into reflect-padded", "constant 0.5"],
)
def test_a_pad_that_is_not_the_conv_padding_is_refused(pad, conv_padding, padding_mode, reason):
    model = PadThenConv(pad, conv_padding, padding_mode).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert reason in {r.reason for r in report.refusals}
    assert_same_function(model, fused, torch.randn(1, 3, 6, 7, dtype=torch.float64))


class PadAfterPointwise(nn.Module):
    def __init__(self, mode: str, bias: bool) -> None:
        super().__init__()
        self.point, self.bn = nn.Conv2d(3, 4, 1, bias=bias), nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3)
        self.mode, self.bias = mode, bias

    def forward(self, x):
        y = self.point(x) if self.bias == "no bn" else self.bn(self.point(x))
        return self.conv(F.pad(y, [1, 1, 1, 1], mode=self.mode))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_a_mode_pad_after_a_pointwise_kernel_moves_before_it(mode):
    model = randomize_batchnorm(PadAfterPointwise(mode, True)).double().eval()
    fused = reparam.fuse(model)
    assert convs(fused) == 1 and batchnorms(fused) == 0
    assert_same_function(model, fused, torch.randn(2, 3, 5, 6, dtype=torch.float64))


def test_a_zero_pad_after_a_biased_kernel_is_refused_border_not_exact():
    """The naive DBB: the KxK would read zeros where one conv would read the 1x1's bias."""
    model = randomize_batchnorm(PadAfterPointwise("constant", True)).double().eval()
    fused, report = reparam.fuse_with_report(model)
    [refusal] = report.refused(Reason.BORDER_NOT_EXACT)
    assert refusal.rule == "padded_region" and convs(fused) == 2
    assert_same_function(model, fused, torch.randn(2, 3, 5, 6, dtype=torch.float64))


def test_a_zero_pad_after_an_unbiased_pointwise_conv_folds():
    model = PadAfterPointwise("constant", False)
    model.bias = "no bn"
    model = model.double().eval()
    fused = reparam.fuse(model)
    assert convs(fused) == 1
    assert_same_function(model, fused, torch.randn(2, 3, 5, 6, dtype=torch.float64))


class CropLayer(nn.Module):
    """ACNet's crop path, as its authors write it: cut rows or columns before an asymmetric conv."""

    def __init__(self, rows: int, cols: int) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols

    def forward(self, x):
        if self.rows and not self.cols:
            return x[:, :, self.rows : -self.rows, :]
        if self.cols and not self.rows:
            return x[:, :, :, self.cols : -self.cols]
        return x[:, :, self.rows : -self.rows, self.cols : -self.cols]


class CroppedACB(nn.Module):
    """ACNet's block with padding 0: the 1xK and Kx1 branches read a crop of the input."""

    def __init__(self, k: int, stride: int) -> None:
        super().__init__()
        half = k // 2
        self.square = nn.Sequential(nn.Conv2d(4, 6, k, stride, bias=False), nn.BatchNorm2d(6))
        self.ver_crop, self.hor_crop = CropLayer(0, half), CropLayer(half, 0)
        self.ver = nn.Sequential(nn.Conv2d(4, 6, (k, 1), stride, bias=False), nn.BatchNorm2d(6))
        self.hor = nn.Sequential(nn.Conv2d(4, 6, (1, k), stride, bias=False), nn.BatchNorm2d(6))

    def forward(self, x):
        return self.square(x) + self.ver(self.ver_crop(x)) + self.hor(self.hor_crop(x))


@pytest.mark.parametrize(("k", "stride"), [(3, 1), (3, 2), (5, 1), (5, 2)])
def test_acnet_crop_path_is_one_unpadded_conv(k, stride):
    model = randomize_batchnorm(CroppedACB(k, stride)).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert (convs(fused), batchnorms(fused)) == (1, 0) and report.refusals == []
    [conv] = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert conv.kernel_size == (k, k) and conv.padding == (0, 0)
    for h, w in [(k, k), (k + 1, k + 4), (9, 7)]:
        assert_same_function(model, fused, torch.randn(2, 4, h, w, dtype=torch.float64))


class CropThenConv(nn.Module):
    def __init__(self, padding: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=padding)

    def forward(self, x):
        return self.conv(x[:, :, 1:-1, 1:-1])


def test_a_crop_alone_before_a_conv_stays_as_written_and_before_a_padded_conv_is_refused():
    x = torch.randn(1, 3, 7, 6, dtype=torch.float64)
    model = CropThenConv(0).double().eval()
    fused, report = reparam.fuse_with_report(model)  # the crop and the conv would be written again as they are
    assert report.fusions == [] and report.refusals == []
    assert_same_function(model, fused, x)
    model = CropThenConv(1).double().eval()
    fused, report = reparam.fuse_with_report(model)
    [refusal] = report.refused(Reason.BORDER_NOT_EXACT)
    assert "crop" in refusal.message
    assert_same_function(model, fused, x)


@pytest.mark.parametrize(("rows", "cols"), [(1, 0), (0, 2), (1, 1)])
def test_a_crop_before_a_conv_and_bn_folds_the_bn_and_keeps_the_crop(rows, cols):
    """ACNet's crop layer in front of one conv + BN (no larger kernel to absorb the crop): the BN folds into
    the conv, and the fused model crops as the original did, batched or not."""
    model = randomize_batchnorm(
        nn.Sequential(CropLayer(rows, cols), nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))
    ).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert (convs(fused), batchnorms(fused)) == (1, 0) and report.refusals == []
    [conv] = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert conv.padding == (0, 0)
    for shape in [(2, 3, 2 * rows + 3, 2 * cols + 3), (1, 3, 9, 8)]:
        assert_same_function(model, fused, torch.randn(*shape, dtype=torch.float64))
    again, second = reparam.fuse_with_report(fused)
    assert second.fusions == [] and convs(again) == 1


class PadOfASharedValue(nn.Module):
    """A conv + BN read twice: once as it is, once padded by hand for a second conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.second = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return torch.relu(y) + self.second(F.pad(y, (1, 1, 1, 1)))


def test_a_pad_of_a_value_other_layers_read_becomes_the_padding_of_the_conv_after_it():
    """The conv + BN cannot take the pad (its output is read twice), so the pad goes into the next conv."""
    model = randomize_batchnorm(PadOfASharedValue()).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert [f.rules for f in report.fusions][1] == ("padded_conv",)
    assert not [n for n in fused.graph.nodes if n.target is F.pad] and batchnorms(fused) == 0
    for size in (1, 4, 7):
        assert_same_function(model, fused, torch.randn(2, 4, size, size, dtype=torch.float64))
