"""Fused models through every deployment path, and fusing programs that were already exported.

* export round-trips of fused models: `torch.export`, ONNX (checked, run in onnxruntime, no
  BatchNormalization node), TorchScript (script and trace), `torch.compile`;
* `reparam.fuse_exported`: an ExportedProgram of an unfused model becomes one with one conv per
  block, in both IRs torch.export produces (`aten.conv2d` + `aten.batch_norm`, and after
  `run_decompositions()` `aten.convolution` + `_native_batch_norm_legit_no_training`).
"""

from __future__ import annotations

import io
import os
import shutil
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import reparam
from reparam.blocks import ACBlock, RepVGG, RepVGGBlock, conv_bn, randomize_batchnorm
from reparam.export import unexported
from reparam.mutation import is_view, mutated_input
from tests.models.test_authors_style import LeViTStyle, UniRepLKNetBlock, ViTMlpBlock

aten = torch.ops.aten
CONV_OPS = {aten.conv2d.default, aten.convolution.default, aten.conv1d.default, aten.conv3d.default}
BN_OPS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.detach().double()
    return ((got.detach().double() - want).abs().max() / want.abs().max()).item()


def ops(ep: torch.export.ExportedProgram) -> Counter:
    return Counter(n.target for n in ep.graph.nodes if n.op == "call_function")


def conv_count(ep: torch.export.ExportedProgram) -> int:
    return sum(count for op, count in ops(ep).items() if op in CONV_OPS)


def bn_count(ep: torch.export.ExportedProgram) -> int:
    return sum(count for op, count in ops(ep).items() if op in BN_OPS)


def small_repvgg() -> nn.Module:
    """Three RepVGG blocks (one with an identity branch, one strided): 3 convs once fused."""
    blocks = nn.Sequential(RepVGGBlock(3, 8), RepVGGBlock(8, 8), RepVGGBlock(8, 16, stride=2))
    return randomize_batchnorm(blocks).eval()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return small_repvgg()


@pytest.fixture(scope="module")
def fused(model: nn.Module) -> nn.Module:
    return reparam.fuse(model)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- round-trips of fused models


def test_torch_export_of_a_fused_model_runs_and_matches(model, fused, x) -> None:
    ep = torch.export.export(fused, (x,))
    assert conv_count(ep) == 3 and bn_count(ep) == 0
    assert not any(op in (aten.add.Tensor,) for op in ops(ep))
    with torch.no_grad():
        assert relative_error(ep.module()(x), model(x)) < 1e-5
    buffer = io.BytesIO()
    torch.export.save(ep, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    with torch.no_grad():
        assert relative_error(loaded.module()(x), model(x)) < 1e-5


def _onnx_export(module: nn.Module, example: tuple, path) -> None:
    torch.onnx.export(module, example, str(path), dynamo=True, external_data=False, verbose=False)


def test_fused_repvgg_a0_exports_to_onnx_without_batchnorm(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = randomize_batchnorm(RepVGG.a0()).eval()
    fused = reparam.fuse(model)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "a0.onnx"
    _onnx_export(fused, (x,), path)

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    counts = Counter(node.op_type for node in proto.graph.node)
    assert counts["BatchNormalization"] == 0
    assert counts["Conv"] == 22  # one per RepVGG block
    assert counts["Add"] == 0  # no branch sum is left

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    [output] = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = model(x)
    assert relative_error(torch.from_numpy(output), want) <= 1e-5


def test_onnx_of_the_unfused_model_keeps_its_branches(model, fused, x, tmp_path) -> None:
    """The ONNX exporter's own optimizer folds conv+BN pairs, but not the branches: fusing first matters."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    counts = {}
    for name, module in (("unfused", model), ("fused", fused)):
        _onnx_export(module, (x,), tmp_path / f"{name}.onnx")
        counts[name] = Counter(n.op_type for n in onnx.load(str(tmp_path / f"{name}.onnx")).graph.node)
    assert counts["unfused"]["Conv"] == 6 and counts["unfused"]["Add"] >= 3
    assert counts["unfused"]["BatchNormalization"] >= 1  # the identity branch's BN has no conv to fold into
    assert counts["fused"]["Conv"] == 3 and counts["fused"]["Add"] == 0
    assert counts["fused"]["BatchNormalization"] == 0


def test_torchscript_script_and_trace_of_the_fused_graph_module(model, fused, x) -> None:
    assert isinstance(fused, torch.fx.GraphModule)
    with torch.no_grad():
        want = model(x)
        for scripted in (torch.jit.script(fused), torch.jit.trace(fused, (x,))):
            assert relative_error(scripted(x), want) < 1e-5
            buffer = io.BytesIO()
            torch.jit.save(scripted, buffer)
            buffer.seek(0)
            loaded = torch.jit.load(buffer)
            assert relative_error(loaded(x), want) < 1e-5
            assert "batch_norm" not in loaded.code
        other = torch.randn(1, 3, 20, 12)  # scripting keeps shapes free
        assert relative_error(torch.jit.script(fused)(other), model(other)) < 1e-5


def test_torch_compile_of_the_fused_model(model, fused, x) -> None:
    """Dynamo capture and AOTAutograd (no C++ compiler needed); the inductor test below compiles kernels."""
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert relative_error(compiled(x), model(x)) < 1e-5


@pytest.mark.skipif(
    not os.environ.get("REPARAM_TEST_INDUCTOR"),
    reason="inductor compiles C++ kernels with gcc: about 40 s cold on 2 cores; set REPARAM_TEST_INDUCTOR=1",
)
def test_torch_compile_inductor_of_the_fused_model(model, fused, x) -> None:
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile's inductor backend needs a C++ compiler on CPU")
    compiled = torch.compile(fused)
    with torch.no_grad():
        assert relative_error(compiled(x), model(x)) < 1e-5


# --------------------------------------------------------------------------- fuse_exported


@pytest.mark.parametrize("decomposed", [False, True], ids=["training-ir", "decomposed"])
def test_fuse_exported_gives_one_conv_per_block(model, x, decomposed) -> None:
    ep = torch.export.export(model, (x,))
    if decomposed:
        ep = ep.run_decompositions()
    assert conv_count(ep) == 6 and bn_count(ep) == 7
    fused, report = reparam.fuse_exported_with_report(ep, verify=True)
    assert isinstance(fused, torch.export.ExportedProgram)
    assert conv_count(fused) == 3  # one per block
    assert bn_count(fused) == 0 and aten.add.Tensor not in ops(fused)
    assert len(report.fusions) == 3 and not report.refusals
    # the report and the new program name layers by module path, as reparam.fuse does
    assert [f.module for f in report.fusions] == ["0.conv", "1.conv", "2.conv"]
    assert report.fusions[0].sources[0] == "0.dense.conv"
    assert {k.rpartition(".")[0] for k in fused.state_dict} == {"0.conv", "1.conv", "2.conv"}
    with torch.no_grad():
        assert relative_error(fused.module()(x), model(x)) < 1e-5
    # the input program is unchanged
    assert conv_count(ep) == 6


@pytest.mark.parametrize(
    "parametrize",
    [torch.nn.utils.parametrizations.weight_norm, torch.nn.utils.parametrizations.spectral_norm],
    ids=["weight_norm", "spectral_norm"],
)
def test_fuse_exported_folds_a_parametrized_weight_as_fuse_does(parametrize) -> None:
    model = randomize_batchnorm(nn.Sequential(parametrize(nn.Conv2d(4, 4, 3)), nn.BatchNorm2d(4))).eval()
    x = torch.randn(2, 4, 9, 8)
    fused = reparam.fuse_exported(torch.export.export(model, (x,)), verify=True)
    assert (conv_count(fused), bn_count(fused)) == (1, 0)
    through_fx = reparam.fuse(model)  # the fx front end folds it as far
    assert [type(m) for m in through_fx.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))] == [nn.Conv2d]
    with torch.no_grad():
        assert relative_error(fused.module()(x), model(x)) < 1e-5


class PooledInput(nn.Module):
    """YOLOv6's QARepVGGBlockV2: `bn(conv3x3(x) + conv1x1(x) + x + avg(x))`, the pool of the block's input."""

    def __init__(self) -> None:
        super().__init__()
        self.dense, self.pointwise = conv_bn(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1, bias=False)
        self.pool, self.bn = nn.AvgPool2d(3, 1, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.dense(x) + self.pointwise(x) + x + self.pool(x)))


def test_fuse_exported_folds_a_pool_of_the_input_as_fuse_does() -> None:
    model = randomize_batchnorm(PooledInput()).double().eval()
    x = torch.randn(2, 4, 7, 5, dtype=torch.float64)
    fused = reparam.fuse_exported(torch.export.export(model, (x,)), verify=True)
    assert (conv_count(fused), bn_count(fused)) == (1, 0) and aten.avg_pool2d.default not in ops(fused)
    through_fx = reparam.fuse(model)
    assert [type(m) for m in through_fx.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))] == [nn.Conv2d]
    with torch.no_grad():
        assert relative_error(fused.module()(x), model(x)) < 1e-12


def test_fuse_exported_keeps_dynamic_dimensions(model) -> None:
    x = torch.randn(2, 3, 16, 16)
    dims = {0: torch.export.Dim.AUTO(max=64), 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    ep = torch.export.export(model, (x,), dynamic_shapes=(dims,))
    fused = reparam.fuse_exported(ep)
    assert conv_count(fused) == 3
    other = torch.randn(5, 3, 21, 13)  # another batch size and an odd spatial size
    with torch.no_grad():
        assert relative_error(fused.module()(other), model(other)) < 1e-5
    assert "64" in {str(r.upper) for r in fused.range_constraints.values()}  # the batch's bound survives


def test_fuse_exported_keeps_the_names_of_untouched_weights_and_the_exact_dim_ranges() -> None:
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    model = randomize_batchnorm(nn.Sequential(RepVGGBlock(3, 8), head)).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(model, (torch.randn(2, 3, 8, 8),), dynamic_shapes=({0: batch},))
    fused = reparam.fuse_exported(ep)
    assert {"1.2.weight", "1.2.bias"} <= set(fused.state_dict)  # not 1_2_weight
    assert [(r.lower, r.upper) for r in fused.range_constraints.values()] == [(1, 64)]  # not Dim.AUTO's 2..64
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(fused.module()(x), model(x))


def test_fuse_exported_acnet_blocks_and_arithmetic() -> None:
    """ACNet's 3x3 + 1x3 + 3x1 branches, a subtracted branch, scales, shifts and dropout all fold."""

    class Arith(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ac = ACBlock(4, 8)
            self.point = conv_bn(4, 8, 1)
            self.drop = nn.Dropout(0.3)
            self.gamma = nn.Parameter(torch.rand(8, 1, 1) + 0.5)

        def forward(self, x):
            y = (self.ac(x) - 0.5 * self.point(x)) * 0.5 / 2 + 1
            return torch.relu(self.gamma * self.drop(y) - 0.25)

    model = randomize_batchnorm(Arith()).eval()
    x = torch.randn(2, 4, 10, 10)
    for ep in (torch.export.export(model, (x,)), torch.export.export(model, (x,)).run_decompositions()):
        fused, report = reparam.fuse_exported_with_report(ep, verify=True)
        assert conv_count(fused) == 1 and bn_count(fused) == 0
        assert set(ops(fused)) == {aten.conv2d.default, aten.relu.default}
        # the aten arithmetic, rewritten as torch.fx spells it, folds by the same rules
        assert {"scale", "shift", "branch_sum"} <= set(report.fusions[0].rules)
        with torch.no_grad():
            assert relative_error(fused.module()(x), model(x)) < 1e-5


def test_fuse_exported_concat_pool_linear_and_transposed() -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = conv_bn(3, 4, 1), conv_bn(3, 4, 3, padding=1)
            self.pool_conv = nn.Conv2d(8, 8, 1, bias=False)
            self.pool = nn.AvgPool2d(2)
            self.up = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1)
            self.up_bn = nn.BatchNorm2d(6)
            self.fc, self.fc_bn = nn.Linear(6, 5), nn.BatchNorm1d(5)

        def forward(self, x):
            y = torch.cat([self.a(x), self.b(x)], 1)
            y = self.up_bn(self.up(torch.relu(self.pool(self.pool_conv(torch.relu(y))))))
            return self.fc_bn(self.fc(torch.flatten(torch.relu(y).mean((2, 3), keepdim=True), 1)))

    model = randomize_batchnorm(Mixed()).eval()
    x = torch.randn(2, 3, 8, 8)
    fused, report = reparam.fuse_exported_with_report(
        torch.export.export(model, (x,)), allow_costlier=True, verify=True
    )
    rules = {rule for f in report.fusions for rule in f.rules}
    assert {"concat", "aten_avg_pool", "aten_transposed_conv", "linear"} <= rules  # cat and linear as fx spells
    remaining = ops(fused)
    assert remaining[aten.conv2d.default] == 2 and remaining[aten.conv_transpose2d.input] == 1
    assert aten.avg_pool2d.default not in remaining and aten.cat.default not in remaining
    assert bn_count(fused) == 0 and remaining[aten.linear.default] == 1
    with torch.no_grad():
        assert relative_error(fused.module()(x), model(x)) < 1e-5


def test_aten_rules_do_not_care_about_the_front_end() -> None:
    """A model calling aten operators itself, traced by torch.fx, fuses with the same rules."""

    class AtenSpelled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w3, self.w1 = nn.Parameter(torch.randn(8, 4, 3, 3)), nn.Parameter(torch.randn(8, 4, 1, 1))
            self.bn = randomize_batchnorm(nn.BatchNorm2d(8))

        def forward(self, x):
            a = aten.conv2d.default(x, self.w3, None, [1, 1], [1, 1])
            b = aten.convolution.default(x, self.w1, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)
            bn = self.bn
            s = aten.add.Tensor(a, b)
            return aten.batch_norm.default(
                s, bn.weight, bn.bias, bn.running_mean, bn.running_var, False, 0.1, 1e-5, False
            )

    model = AtenSpelled().eval()
    fused, report = reparam.fuse_with_report(model)
    assert [type(m).__name__ for m in fused.modules()][1:] == ["Conv2d"]
    assert {"aten_conv", "aten_convolution", "aten_branch_sum", "aten_batch_norm"} <= set(report.fusions[0].rules)
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        assert relative_error(fused(x), model(x)) < 1e-5


def test_fuse_exported_refusals_are_reported_and_exact() -> None:
    """A pool padding a biased region's output is not a conv at the border: refused, left as written."""
    model = nn.Sequential(conv_bn(3, 4, 1), nn.AvgPool2d(3, 1, 1))
    model = randomize_batchnorm(model).eval()
    x = torch.randn(2, 3, 8, 8)
    fused, report = reparam.fuse_exported_with_report(torch.export.export(model, (x,)), verify=True)
    [refusal] = report.refusals
    assert refusal.reason is reparam.Reason.BORDER_NOT_EXACT and refusal.rule == "aten_avg_pool"
    assert aten.avg_pool2d.default in ops(fused) and conv_count(fused) == 1 and bn_count(fused) == 0
    with pytest.raises(reparam.StrictModeError, match="not fully fused"):
        reparam.fuse_exported(torch.export.export(model, (x,)), strict=True)


def test_fuse_exported_errors() -> None:
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(reparam.TrainingModeError, match="training mode"):
        reparam.fuse_exported(torch.export.export(small_repvgg().train(), (x,)))
    with pytest.raises(TypeError, match="ExportedProgram"):
        reparam.fuse_exported(small_repvgg())
    ep = torch.export.export(small_repvgg(), (x,))
    ep._example_inputs = None  # as a program built without them
    with pytest.raises(reparam.ReparamError, match="example_args"):
        reparam.fuse_exported(ep)
    assert conv_count(reparam.fuse_exported(ep, example_args=(x,))) == 3


def test_a_bn_without_running_statistics_is_refused_alone_as_fuse_refuses_it() -> None:
    """It normalizes with the batch's statistics in eval too (`training=True` in the program), but the
    program is in eval mode: the other layers still fuse."""
    model = nn.Sequential(conv_bn(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    model = randomize_batchnorm(model).eval()
    x = torch.randn(2, 3, 8, 8)
    fused, report = reparam.fuse_exported_with_report(torch.export.export(model, (x,)), verify=True)
    [refusal] = report.refusals
    assert refusal.reason is reparam.Reason.NO_RUNNING_STATS and conv_count(fused) == 2 and bn_count(fused) == 1
    for decomposed in (False, True):
        program = torch.export.export(model, (x,))
        program = program.run_decompositions() if decomposed else program
        torch.testing.assert_close(reparam.fuse_exported(program).module()(x), model(x))


def test_unexported_drops_eval_noops() -> None:
    """An eval-mode dropout is `aten.dropout(x, p, False)`, and `clone(x)` once decomposed: both dropped."""
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Dropout(0.5), nn.BatchNorm2d(4))).eval()
    x = torch.randn(1, 3, 4, 4)
    training_ir = torch.export.export(model, (x,))
    decomposed = training_ir.run_decompositions()
    assert aten.dropout.default in ops(training_ir) and aten.clone.default in ops(decomposed)
    for ep in (training_ir, decomposed):
        gm = unexported(ep)
        assert not any(n.target in (aten.dropout.default, aten.clone.default) for n in gm.graph.nodes)
        fused = reparam.fuse_exported(ep)
        assert conv_count(fused) == 1 and bn_count(fused) == 0
        with torch.no_grad():
            assert relative_error(fused.module()(x), model(x)) < 1e-5


class HalvedNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(x) / 2


@pytest.mark.parametrize("shape", [(4, 4, 7), (3, 4), (2, 4, 5)])
def test_fuse_exported_writes_a_per_channel_map_of_unknown_rank_as_one_batchnorm(shape) -> None:
    model = randomize_batchnorm(HalvedNorm()).eval()
    x = torch.randn(*shape)  # (N, C, L) with N == C was once an aten.conv2d, which reads it as unbatched
    fused = reparam.fuse_exported(torch.export.export(model, (x,)))
    assert conv_count(fused) == 0 and bn_count(fused) == 1
    assert torch.allclose(fused.module()(x), model(x), atol=1e-6)


class SummedInPlace(nn.Module):
    """MobileOne's and FastViT's style: `out = bn(x); out += branch(x)` in a loop, which exports as `aten.add_`."""

    def __init__(self) -> None:
        super().__init__()
        self.skip = nn.BatchNorm2d(4)
        self.branches = nn.ModuleList(conv_bn(4, 4, 3, padding=1) for _ in range(2))

    def forward(self, x):
        out = self.skip(x)
        for branch in self.branches:
            out += branch(x)
        return out


class ReadAfterInPlace(nn.Module):
    """`z += t` where the old `y` is read afterwards: the write is seen, so the add stays in place."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = conv_bn(4, 4, 3, padding=1), conv_bn(4, 4, 1)

    def forward(self, x):
        y = self.first(x)
        z = y.add_(self.second(x))
        return y * 2 + z


def test_fuse_exported_sums_branches_added_in_place_as_fuse_does() -> None:
    model = randomize_batchnorm(SummedInPlace()).double().eval()
    x = torch.randn(2, 4, 7, 5, dtype=torch.float64)
    ep = torch.export.export(model, (x,))
    assert aten.add_.Tensor in ops(ep)
    fused, report = reparam.fuse_exported_with_report(ep)
    assert (conv_count(fused), bn_count(fused), report.refusals) == (1, 0, [])
    assert sum(isinstance(m, nn.Conv2d) for m in reparam.fuse(model).modules()) == 1
    with torch.no_grad():
        assert relative_error(fused.module()(x), model(x)) < 1e-12


def test_fuse_exported_keeps_an_in_place_add_whose_write_is_read() -> None:
    model = randomize_batchnorm(ReadAfterInPlace()).double().eval()
    x = torch.randn(2, 4, 7, 5, dtype=torch.float64)
    fused = reparam.fuse_exported(torch.export.export(model, (x,)))
    assert bn_count(fused) == 0  # each conv + BN folds; the sum does not
    with torch.no_grad():
        assert relative_error(fused.module()(x), model(x)) < 1e-12


def test_aten_in_place_ops_and_views_are_read_from_their_schemas() -> None:
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    viewed = graph.call_function(aten.permute.default, (x, [0, 2, 3, 1]))
    relu = graph.call_function(aten.relu_.default, (viewed,))
    added = graph.call_function(aten.add.Tensor, (x, x))
    assert is_view(viewed) and not is_view(added) and not is_view(relu)
    assert mutated_input(relu, {}) is viewed and mutated_input(added, {}) is None


_LINEAR_OPS = {  # what each linear op is, in either program form
    **dict.fromkeys((aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default), "conv"),
    **dict.fromkeys((aten.linear.default, aten.addmm.default, aten.mm.default, aten.bmm.default), "matmul"),
    **dict.fromkeys((aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default), "batch_norm"),
    **{op: str(op) for op in (aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor)},
    **{op: str(op) for op in (aten.cat.default, aten.permute.default)},
}


def _linear_ops(ep: torch.export.ExportedProgram) -> Counter:
    return Counter(_LINEAR_OPS[n.target] for n in ep.graph.nodes if n.target in _LINEAR_OPS)


def _authors_blocks() -> list:
    from tests.models.test_authors_style import (
        ConvNeXtBlock,
        FacebookConvNeXtBlock,
        LeViTMlp,
        RepMixer,
        UniRepLKNetBlock,
        ViTMlpBlock,
    )
    from tests.transforms.test_concat import MixedConv, TimmMixedConv
    from tests.transforms.test_padding import CroppedACB, DBBPadBySubtraction

    return [
        pytest.param(lambda: UniRepLKNetBlock(8), (2, 8, 7, 5), id="UniRepLKNet: BN after the Linear and permute back"),
        pytest.param(lambda: ConvNeXtBlock(8), (2, 8, 7, 5), id="timm ConvNeXt: layer scale after the permute back"),
        pytest.param(lambda: FacebookConvNeXtBlock(8), (2, 8, 7, 5), id="ConvNeXt authors: gamma * linear(x)"),
        pytest.param(lambda: ViTMlpBlock(8), (2, 5, 8), id="ViT LayerScale on tokens"),
        pytest.param(lambda: LeViTMlp(8), (2, 5, 8), id="LeViT Linear + BatchNorm1d on tokens"),
        pytest.param(LeViTStyle, (2, 3, 8, 8), id="LeViT: its tokens flattened for the BatchNorm1d, and back"),
        pytest.param(lambda: RepMixer(8), (2, 8, 7, 5), id="FastViT RepMixer, summed in place"),
        pytest.param(MixedConv, (2, 12, 7, 5), id="MixNet: BN after a concatenation"),
        pytest.param(TimmMixedConv, (2, 12, 7, 5), id="timm MixNet: functional BN after a concatenation"),
        pytest.param(lambda: DBBPadBySubtraction(2, 5, 2, 4), (2, 4, 9, 8), id="DBB padded as F.pad(y - v) + v"),
        pytest.param(lambda: CroppedACB(3, 2), (2, 4, 9, 8), id="ACNet's crops before its 1x3 and 3x1"),
    ]


@pytest.mark.parametrize("decomposed", [False, True], ids=["training IR", "decomposed"])
@pytest.mark.parametrize(("build", "shape"), _authors_blocks())
def test_fuse_exported_leaves_no_more_linear_ops_than_fuse(build, shape, decomposed) -> None:
    """Parity of the front ends: fuse_exported(export(m)) against export(fuse(m)), op by op."""
    model = randomize_batchnorm(build()).double().eval()
    x = torch.randn(*shape, dtype=torch.float64)
    through_fx = torch.export.export(reparam.fuse(model), (x,))
    program = torch.export.export(model, (x,))
    if decomposed:
        program, through_fx = program.run_decompositions(), through_fx.run_decompositions()
    fused = reparam.fuse_exported(program)
    assert _linear_ops(fused) <= _linear_ops(through_fx), (_linear_ops(fused), _linear_ops(through_fx))
    with torch.no_grad():
        assert relative_error(fused.module()(x), model(x)) < 1e-12


@pytest.mark.parametrize(
    ("build", "shape"),
    [
        pytest.param(lambda: nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4)), (3, 8), id="addmm: Linear + BN1d"),
        pytest.param(lambda: ViTMlpBlock(8), (2, 5, 8), id="view, addmm, view: a Linear on tokens and its layer scale"),
    ],
)
def test_a_decomposed_linear_folds_as_the_linear_it_was(build, shape) -> None:
    model = randomize_batchnorm(build()).double().eval()
    x = torch.randn(*shape, dtype=torch.float64)
    program = torch.export.export(model, (x,))
    decomposed = program.run_decompositions()
    assert aten.addmm.default in ops(decomposed) and aten.linear.default not in ops(decomposed)
    fused = reparam.fuse_exported(decomposed)
    assert _linear_ops(fused) == _linear_ops(reparam.fuse_exported(program))
    with torch.no_grad():
        assert relative_error(fused.module()(x), model(x)) < 1e-12


class TokenRowsRegrouped(nn.Module):
    """A BatchNorm1d on a Linear's token rows, viewed back to another shape than the Linear's output."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.bn = nn.Linear(8, 8), nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(self.linear(x).flatten(0, 1)).view(x.shape[1], x.shape[0], -1)


@pytest.mark.parametrize(
    ("build", "batch_norms"),
    [
        pytest.param(LeViTStyle, 0, id="viewed back to the tokens: LeViT's LinearNorm, folded"),
        pytest.param(TokenRowsRegrouped, 1, id="viewed to another shape: kept"),
    ],
)
def test_a_decomposed_batch_norm_on_token_rows_folds_only_when_viewed_back_to_the_tokens(build, batch_norms) -> None:
    model = randomize_batchnorm(build()).double().eval()
    x = torch.randn(*((2, 5, 8) if build is TokenRowsRegrouped else (2, 3, 8, 8)), dtype=torch.float64)
    decomposed = torch.export.export(model, (x,)).run_decompositions()
    fused = reparam.fuse_exported(decomposed)
    assert _linear_ops(fused)["batch_norm"] == batch_norms
    with torch.no_grad():
        assert relative_error(fused.module()(x), model(x)) < 1e-12


class RowsNormalized(nn.Module):
    """LeViT's LinearNorm for any number of leading dims: a BatchNorm1d on the rows of a Linear's output."""

    def __init__(self, features: int, out_features: int) -> None:
        super().__init__()
        self.linear, self.bn = nn.Linear(features, out_features), nn.BatchNorm1d(out_features)

    def forward(self, x):
        y = self.linear(x)
        return self.bn(y.flatten(0, -2)).reshape_as(y)


@settings(max_examples=max(8, settings().max_examples // 6), deadline=None)  # each example exports: the slow part
@given(
    lead=st.lists(st.integers(1, 5), min_size=2, max_size=3),
    features=st.integers(1, 6),
    out_features=st.integers(1, 6),
    decomposed=st.booleans(),
)
def test_a_batch_norm_on_a_linears_rows_folds_in_either_program_form(lead, features, out_features, decomposed):
    """Property: for any leading dims (odd sizes and 1s included), float64, the BN folds into the Linear, exactly."""
    model = randomize_batchnorm(RowsNormalized(features, out_features)).double().eval()
    x = torch.randn(*lead, features, dtype=torch.float64)
    program = torch.export.export(model, (x,))
    fused = reparam.fuse_exported(program.run_decompositions() if decomposed else program)
    assert _linear_ops(fused)["batch_norm"] == 0
    with torch.no_grad():
        assert relative_error(fused.module()(x), model(x)) < 1e-12


def test_a_decomposed_batch_norm_on_token_rows_folds_with_a_dynamic_batch() -> None:
    """The views' sizes are then expressions of the batch; flatten and reshape_as hold for every batch."""
    model = randomize_batchnorm(LeViTStyle()).double().eval()
    batch = torch.export.Dim("batch", min=2, max=64)
    program = torch.export.export(model, (torch.randn(2, 3, 8, 8, dtype=torch.float64),), dynamic_shapes=({0: batch},))
    fused = reparam.fuse_exported(program.run_decompositions())
    assert _linear_ops(fused)["batch_norm"] == 0
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(fused.module()(x), model(x)) < 1e-12


def test_a_clone_that_makes_a_permuted_tensor_contiguous_for_a_view_is_kept() -> None:
    """Decomposed, a Linear on a rank-4 channels-last tensor is `clone(expand(permute(x)))` then `view`:
    the clone is no eval no-op there (it once was dropped, and the fused program failed to export)."""
    model = randomize_batchnorm(UniRepLKNetBlock(8)).double().eval()
    x = torch.randn(2, 8, 7, 5, dtype=torch.float64)
    decomposed = torch.export.export(model, (x,)).run_decompositions()
    assert aten.clone.default in ops(decomposed)
    fused = reparam.fuse_exported(decomposed)
    assert aten.clone.default in ops(fused)
    with torch.no_grad():
        assert relative_error(fused.module()(x), model(x)) < 1e-12


class MatrixPlusProduct(nn.Module):
    """`addmm(M, x, w.t())` with a matrix M: a product and a sum, but no Linear (its bias would be a matrix)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight, self.offset = nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return torch.addmm(self.offset, x, self.weight.t()) * 2


def test_an_addmm_with_a_matrix_is_no_linear_and_stays_as_written() -> None:
    model = MatrixPlusProduct().double().eval()
    x = torch.randn(3, 8, dtype=torch.float64)
    fused = reparam.fuse_exported(torch.export.export(model, (x,)).run_decompositions())
    assert aten.addmm.default in ops(fused) and aten.linear.default not in ops(fused)
    with torch.no_grad():
        assert relative_error(fused.module()(x), model(x)) < 1e-12
