"""Submodules torch.fx cannot trace are fused through torch.export, given example inputs.

The blocks are written as authors write them: MobileOne's and RepVGG's identity branch exists
only when the input allows it, decided in Python on `x.shape`; GhostNet/CSP-style blocks split
channels with `list(x.chunk(2, 1))`. torch.fx stops at both.
"""

import io

import pytest
import torch
from torch import nn

import reparam
from reparam.blocks import randomize_batchnorm
from tests.helpers import assert_same_function, batchnorms, convs


def conv_bn(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout))


class IdentityWhenShapesAllow(nn.Module):
    """A 3x3 + 1x1 + BN-identity block; the identity is added only where the input is wide enough."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.rbr_dense, self.rbr_1x1 = conv_bn(channels, channels, 3), conv_bn(channels, channels, 1)
        self.rbr_identity = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()

    def forward(self, x):
        identity = self.rbr_identity(x) if x.shape[1] == self.channels and x.shape[-1] > 2 else 0
        return self.act(self.rbr_dense(x) + self.rbr_1x1(x) + identity)


class SplitHalves(nn.Module):
    """Half of the channels through a 3x3 + 1x1 pair, the other half passed on."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.k3, self.k1 = conv_bn(channels // 2, channels // 2, 3), conv_bn(channels // 2, channels // 2, 1)

    def forward(self, x):
        kept, passed = list(x.chunk(2, 1))
        return torch.cat([self.k3(kept) + self.k1(kept), passed], 1)


class Net(nn.Module):
    """A net whose own forward does not trace either (`len(y)`), so it is fused child by child."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = block
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.block(self.stem(x))
        return self.head(y) if len(y) else y


def _net(block: nn.Module) -> nn.Module:
    return randomize_batchnorm(Net(block)).double().eval()


def test_an_identity_chosen_in_python_fuses_through_torch_export():
    model = _net(IdentityWhenShapesAllow(8))
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    fused, report = reparam.fuse_with_report(model, example_inputs=(x,))
    assert [(e.module, e.type_name) for e in report.exported] == [("block", "IdentityWhenShapesAllow")]
    assert "x.shape[3] >= 3" in report.exported[0].conditions
    assert convs(fused) == 3 and batchnorms(fused) == 0
    assert [u.module for u in report.untraced] == ["<model>"]
    assert "exported block" in str(report)
    for shape in [(2, 3, 9, 7), (1, 3, 5, 3), (3, 3, 4, 11)]:
        assert_same_function(model, fused, torch.randn(*shape, dtype=torch.float64))
    empty = torch.randn(0, 3, 5, 5, dtype=torch.float64)
    assert fused(empty).shape == model(empty).shape


def test_an_input_outside_what_the_python_read_raises_instead_of_computing_wrong():
    model = _net(IdentityWhenShapesAllow(8))
    fused = reparam.fuse(model, example_inputs=(torch.randn(1, 3, 9, 7, dtype=torch.float64),))
    narrow = torch.randn(1, 3, 6, 2, dtype=torch.float64)  # here the original leaves the identity out
    with pytest.raises(RuntimeError, match=r"IdentityWhenShapesAllow was fused .* x.shape\[3\] >= 3"):
        fused(narrow)


def test_a_list_of_chunks_fuses_through_torch_export():
    model = _net(SplitHalves(8))
    x = torch.randn(1, 3, 7, 6, dtype=torch.float64)
    fused, report = reparam.fuse_with_report(model, example_inputs=(x,))
    assert [e.module for e in report.exported] == ["block"]
    assert convs(fused) == 3 and batchnorms(fused) == 0
    for shape in [(1, 3, 7, 6), (2, 3, 1, 1), (4, 3, 10, 3)]:
        assert_same_function(model, fused, torch.randn(*shape, dtype=torch.float64))


def test_an_exported_part_pickles_and_exports_with_the_model():
    model = _net(SplitHalves(8))
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    fused = reparam.fuse(model, example_inputs=(x,))
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert_same_function(model, loaded, torch.randn(3, 3, 5, 5, dtype=torch.float64))
    program = torch.export.export(fused, (x,))
    assert torch.allclose(program.module()(x), model(x))


def test_without_example_inputs_an_untraceable_block_is_kept_as_written():
    model = _net(IdentityWhenShapesAllow(8))
    fused, report = reparam.fuse_with_report(model)
    assert not report.exported
    assert "block" in {u.module for u in report.untraced}
    assert batchnorms(fused) == 1  # its two conv -> BN chains fold; the identity BN stays
    assert_same_function(model, fused, torch.randn(1, 3, 5, 5, dtype=torch.float64))


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = IdentityWhenShapesAllow(8)

    def forward(self, x):
        y = self.block(self.stem(x))
        small = self.block(y[..., ::2, ::2])  # the same block again, on another size
        return small if len(x) else y


def test_a_block_called_on_two_sizes_is_not_exported_on_one_of_them():
    model = randomize_batchnorm(CalledTwice()).double().eval()
    x = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    fused, report = reparam.fuse_with_report(model, example_inputs=(x,))
    assert not report.exported
    assert_same_function(model, fused, x)


def test_a_block_exporting_to_no_fewer_layers_is_kept_as_written():
    class SplitAfterConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cv1, self.cv2 = conv_bn(8, 8, 1), conv_bn(8, 8, 1)
            self.act = nn.SiLU()

        def forward(self, x):
            y = list(self.act(self.cv1(x)).chunk(2, 1))
            return self.cv2(torch.cat(y, 1))

    model = _net(SplitAfterConv())
    fused, report = reparam.fuse_with_report(model, example_inputs=(torch.randn(1, 3, 5, 5, dtype=torch.float64),))
    assert not report.exported and batchnorms(fused) == 0
    (kept,) = [u for u in report.untraced if u.module == "block"]
    assert "would fuse nothing more" in kept.reason
    assert isinstance(fused.block, SplitAfterConv)


class DetectionHead(nn.Module):
    """ultralytics' Detect style: box and class branches of each level, concatenated in the head's own code."""

    def __init__(self) -> None:
        super().__init__()
        self.box = nn.Sequential(conv_bn(8, 8, 3), nn.SiLU(), nn.Conv2d(8, 4, 1))
        self.cls = nn.Sequential(conv_bn(8, 8, 3), nn.SiLU(), nn.Conv2d(8, 4, 1))
        self.shape = None

    def forward(self, x):
        if self.shape != x.shape:  # no trace: control flow on the input's shape
            self.shape = x.shape
        return torch.cat([self.box(x), self.cls(x)], 1)


class MergedBranches(DetectionHead):
    """The same, with the 1x1 convs reading the head's input: their concatenation is one conv."""

    def __init__(self) -> None:
        super().__init__()
        self.box, self.cls = conv_bn(8, 4, 1), conv_bn(8, 4, 3)


def test_a_concatenation_of_unrelated_branches_is_not_worth_an_export_and_one_of_merging_branches_is():
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    model = _net(DetectionHead())
    fused, report = reparam.fuse_with_report(model, example_inputs=(x,))
    (kept,) = [u for u in report.untraced if u.module == "block"]
    assert not report.exported and "would fuse nothing more" in kept.reason
    assert batchnorms(fused) == 0  # each branch's conv + BN still fold, in their own children
    assert_same_function(model, fused, x)
    model = _net(MergedBranches())
    fused, report = reparam.fuse_with_report(model, example_inputs=(x,))
    assert [e.module for e in report.exported] == ["block"] and convs(fused) == 3
    assert_same_function(model, fused, x)


def test_a_conv_and_its_bn_as_sibling_layers_of_an_untraceable_block_fold():
    class Siblings(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return y if len(y) else -y  # torch.fx stops here; descending cannot fold across two layers

    model = _net(Siblings())
    fused, report = reparam.fuse_with_report(model, example_inputs=(torch.randn(1, 3, 6, 6, dtype=torch.float64),))
    assert [e.module for e in report.exported] == ["block"] and batchnorms(fused) == 0
    assert_same_function(model, fused, torch.randn(1, 3, 5, 4, dtype=torch.float64))
    assert "x.shape[0] == 1" in report.exported[0].conditions  # torch.export fixed the batch `len` read
    assert len(set(report.exported[0].conditions)) == len(report.exported[0].conditions)
    with pytest.raises(RuntimeError, match=r"x.shape\[0\] == 1"):
        fused(torch.randn(2, 3, 5, 4, dtype=torch.float64))


def test_a_block_with_a_hooked_layer_inside_is_not_exported_and_the_hook_still_runs():
    model = _net(IdentityWhenShapesAllow(8))
    seen = []
    model.block.rbr_1x1.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    x = torch.randn(1, 3, 9, 7, dtype=torch.float64)
    fused, report = reparam.fuse_with_report(model, example_inputs=(x,))
    assert not report.exported
    (kept,) = [u for u in report.untraced if u.module == "block"]
    assert "rbr_1x1 inside it have hooks" in kept.reason
    seen.clear()
    assert_same_function(model, fused, x)
    assert len(seen) == 2  # once in the original, once in the fused model


class CachesItsInputShape(nn.Module):
    """ultralytics' Detect style: a grid made for the last input size, kept with that size in Python state,
    here created on the first call."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.first = nn.Conv2d(channels, channels, 3, padding=1)
        self.second = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        y = self.second(self.first(x))  # two padded, biased 3x3s: not one kernel at the borders
        if getattr(self, "shape", None) != y.shape:
            self.grid = torch.arange(y.shape[-1], dtype=y.dtype)
            self.shape = y.shape
        return y + self.grid


def test_python_state_a_torch_export_attempt_writes_is_put_back():
    """torch.export runs forward on symbolic sizes: a cached shape would keep its symbols, and the grid of
    the next input would never be made (ultralytics' YOLO raised on its second forward)."""
    model = _net(CachesItsInputShape(8))
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    fused, report = reparam.fuse_with_report(model, example_inputs=(x,))
    assert not report.exported and any(u.module == "block" for u in report.untraced)  # tried, kept as written
    assert not hasattr(fused.get_submodule("block"), "shape")
    for shape in [(2, 3, 9, 7), (1, 3, 6, 5)]:
        assert_same_function(model, fused, torch.randn(*shape, dtype=torch.float64))
