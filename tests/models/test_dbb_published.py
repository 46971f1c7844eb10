"""The Diverse Branch Block written the way its authors publish it (rewritten for this test).

Its BN-and-pad layer pads the BN output with zeros, then overwrites each border band in place
with the BN's response to zero, computed in forward from the BN's tensors; its identity-based
1x1 conv adds a fixed identity tensor to its weight in forward. Both must fuse as they are.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reparam
from reparam import Reason
from reparam.blocks import randomize_batchnorm
from tests.helpers import assert_same_function, batchnorms, convs


class BNAndPadLayer(nn.Module):
    def __init__(self, pad_pixels: int, num_features: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features)
        self.pad_pixels = pad_pixels

    def forward(self, input):
        output = self.bn(input)
        if self.pad_pixels > 0:
            bn = self.bn
            pad_values = bn.bias.detach() - bn.running_mean * bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
            output = F.pad(output, [self.pad_pixels] * 4)
            pad_values = pad_values.view(1, -1, 1, 1)
            p = self.pad_pixels
            output[:, :, 0:p, :] = pad_values
            output[:, :, -p:, :] = pad_values
            output[:, :, :, 0:p] = pad_values
            output[:, :, :, -p:] = pad_values
        return output


class IdentityBasedConv1x1(nn.Conv2d):
    def __init__(self, channels: int, groups: int = 1) -> None:
        super().__init__(channels, channels, 1, groups=groups, bias=False)
        per_group = channels // groups
        identity = torch.zeros(channels, per_group, 1, 1)
        for i in range(channels):
            identity[i, i % per_group, 0, 0] = 1
        self.id_tensor = identity
        nn.init.zeros_(self.weight)

    def forward(self, input):
        kernel = self.weight + self.id_tensor.to(self.weight.device).type_as(self.weight)
        return F.conv2d(input, kernel, None, stride=1, padding=0, dilation=self.dilation, groups=self.groups)


def conv_bn(cin, cout, k, stride=1, padding=0, groups=1):
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(cout))
    return seq


class DiverseBranchBlock(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        padding = k // 2
        self.dbb_origin = conv_bn(cin, cout, k, stride, padding, groups)
        self.dbb_avg = nn.Sequential()
        if groups < cout:
            self.dbb_avg.add_module("conv", nn.Conv2d(cin, cout, 1, groups=groups, bias=False))
            self.dbb_avg.add_module("bn", BNAndPadLayer(padding, cout))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(k, stride, 0))
            self.dbb_1x1 = conv_bn(cin, cout, 1, stride, 0, groups)
        else:
            self.dbb_avg.add_module("avg", nn.AvgPool2d(k, stride, padding))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(cout))
        internal = cin if groups < cout else 2 * cin
        self.dbb_1x1_kxk = nn.Sequential()
        if internal == cin:
            self.dbb_1x1_kxk.add_module("idconv1", IdentityBasedConv1x1(cin, groups))
        else:
            self.dbb_1x1_kxk.add_module("conv1", nn.Conv2d(cin, internal, 1, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn1", BNAndPadLayer(padding, internal))
        self.dbb_1x1_kxk.add_module("conv2", nn.Conv2d(internal, cout, k, stride, 0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(cout))
        self.nonlinear = nn.ReLU()

    def forward(self, inputs):
        out = self.dbb_origin(inputs)
        if hasattr(self, "dbb_1x1"):
            out += self.dbb_1x1(inputs)
        out += self.dbb_avg(inputs)
        out += self.dbb_1x1_kxk(inputs)
        return self.nonlinear(out)


def randomized(model: nn.Module) -> nn.Module:
    model = randomize_batchnorm(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, IdentityBasedConv1x1):
                m.weight.normal_(0, 0.1)
    return model.double().eval()


@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("groups", [1, 4, 8], ids=["dense", "groups 4", "depthwise"])
def test_published_dbb_is_one_conv(k, stride, groups):
    model = randomized(DiverseBranchBlock(8, 8, k, stride, groups))
    fused, report = reparam.fuse_with_report(model)
    assert (convs(fused), batchnorms(fused), len(report.fusions)) == (1, 0, 1), report
    [conv] = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert (conv.kernel_size, conv.groups, conv.stride) == ((k, k), groups, (stride, stride))
    for size in (k, 9, 12):
        assert_same_function(model, fused, torch.randn(2, 8, size, size + 1, dtype=torch.float64))


def test_a_published_dbb_resnet_stage_fuses_to_plain_convs():
    model = randomized(nn.Sequential(DiverseBranchBlock(3, 8, 3, 2), DiverseBranchBlock(8, 8, 3), nn.Flatten()))
    fused = reparam.fuse(model)
    assert (convs(fused), batchnorms(fused)) == (2, 0)
    assert_same_function(model, fused, torch.randn(1, 3, 15, 13, dtype=torch.float64))


class PartlyWritten(nn.Module):
    """Only two of the four border bands overwritten: no pad with one value, so nothing folds across it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        y = F.pad(self.bn(self.conv1(x)), [1, 1, 1, 1])
        y[:, :, 0:1, :] = 1.0
        y[:, :, -1:, :] = 1.0
        return self.conv2(y)


def test_partial_border_writes_are_kept_and_computed_as_written():
    model = randomize_batchnorm(PartlyWritten()).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert convs(fused) == 2 and report.refused(Reason.BORDER_NOT_EXACT)
    assert_same_function(model, fused, torch.randn(1, 3, 6, 5, dtype=torch.float64))


def _exported_ops(program: torch.export.ExportedProgram) -> list[str]:
    return [str(n.target) for n in program.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("k, stride, groups", [(3, 1, 1), (5, 2, 4), (7, 1, 8)])
@pytest.mark.parametrize("decomposed", [False, True], ids=["training IR", "decomposed"])
def test_published_dbb_exported_is_one_conv(k, stride, groups, decomposed):
    """The border writes export as `copy_` into slices (training IR) or `slice_scatter` (decomposed): both fuse."""
    model = randomized(DiverseBranchBlock(8, 8, k, stride, groups))
    x = torch.randn(2, 8, 11, 10, dtype=torch.float64)
    program = torch.export.export(model, (x,))
    program = program.run_decompositions() if decomposed else program
    assert any(op in _exported_ops(program) for op in ("aten.copy_.default", "aten.slice_scatter.default"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no node of the graph is erased twice
        fused, report = reparam.fuse_exported_with_report(program)
    ops = _exported_ops(fused)
    assert [op for op in ops if "conv" in op] == ["aten.conv2d.default"] and len(report.fusions) == 1, report
    assert not any(word in op for op in ops for word in ("batch_norm", "pad", "slice", "copy", "avg_pool"))
    with torch.no_grad():
        assert (fused.module()(x) - model(x)).abs().max() <= 1e-12 * model(x).abs().max()


def test_partial_border_writes_exported_are_kept_and_computed_as_written():
    model = randomize_batchnorm(PartlyWritten()).double().eval()
    x = torch.randn(1, 3, 6, 5, dtype=torch.float64)
    fused, report = reparam.fuse_exported_with_report(torch.export.export(model, (x,)))
    assert sum("conv" in op for op in _exported_ops(fused)) == 2 and report.refused(Reason.BORDER_NOT_EXACT)
    with torch.no_grad():
        assert torch.allclose(fused.module()(x), model(x), rtol=0, atol=1e-12)
