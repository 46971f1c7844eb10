"""Blocks written the way their authors write them (never our `reparam.blocks` style).

Each class here follows a published code base's idiom, rewritten for the test: timm's norm-act
layers (a BatchNorm subclass whose forward asserts the input's rank and calls F.batch_norm),
MobileOne's branch loop (`out = 0`, `out += branch(x)` over an nn.ModuleList), FastViT's
RepMixer (`x + layer_scale * (mixer(x) - norm(x))`), RepLKNet's SyncBatchNorm, timm's
`Conv2dSame` (TF "same" padding computed from the input size in forward), YOLOv6's
QARepVGGBlockV2 (an avg-pool branch of the block's input, `0` for a missing identity),
super-gradients' one-element `alpha` on the 1x1 branch, and OREPA's kernels generated in
forward from the weights' sizes (`t, ig, h, w = w.size()`).
"""

import math
import operator
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reparam
from reparam import Reason
from reparam.blocks import randomize_batchnorm
from tests.helpers import assert_same_function, batchnorms, convs


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's style: BN then an activation in one layer; forward asserts the rank first."""

    def __init__(self, channels: int, act: bool = True, check: str = "ndim") -> None:
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = nn.ReLU() if act else nn.Identity()
        self.check = check

    def forward(self, x):
        if self.check == "ndim":
            torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        elif self.check == "dim()":
            torch._assert(x.dim() == 4, "expected a 4D input")
        elif self.check == "shape":
            torch._assert(x.shape[1] == self.num_features, "wrong channel count")
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
        )
        return self.act(self.drop(x))


class ConvNormAct(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, act: bool = True, check: str = "ndim") -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.bn = BatchNormAct2d(cout, act, check)

    def forward(self, x):
        return self.bn(self.conv(x))


@pytest.mark.parametrize("check", ["ndim", "dim()"])
def test_timm_norm_act_folds_into_the_conv_and_keeps_its_assert(check):
    model = randomize_batchnorm(nn.Sequential(ConvNormAct(3, 8, 3, check=check), ConvNormAct(8, 8, 3, check=check)))
    model = model.double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert (convs(fused), batchnorms(fused), len(report.fusions)) == (2, 0, 2)
    assert not report.refused(Reason.SHARED_INTERMEDIATE)
    assert sum(n.target is torch._assert for n in fused.graph.nodes) == 2  # the checks are still there
    assert_same_function(model, fused, torch.randn(2, 3, 7, 9, dtype=torch.float64))
    unbatched = torch.randn(3, 7, 9, dtype=torch.float64)  # a conv accepts it, the assert does not
    for net in (model, fused):
        with pytest.raises(AssertionError):
            net(unbatched)


def test_a_shape_read_of_a_conv_output_keeps_the_bn_apart_and_says_why():
    model = randomize_batchnorm(ConvNormAct(3, 8, 3, check="shape")).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert batchnorms(fused) + sum(n.target is F.batch_norm for n in fused.graph.nodes) == 1
    [refusal] = report.refused(Reason.SHARED_INTERMEDIATE)
    assert "getattr" in refusal.message
    assert_same_function(model, fused, torch.randn(1, 3, 6, 5, dtype=torch.float64))


class ConvBN(nn.Sequential):
    def __init__(self, channels: int, k: int) -> None:
        super().__init__()
        self.add_module("conv", nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels, bias=False))
        self.add_module("bn", nn.BatchNorm2d(channels))


class MobileOneBlock(nn.Module):
    """MobileOne's style: an optional BN skip, an optional 1x1 scale branch, a loop over KxK branches."""

    def __init__(self, channels: int, k: int, branches: int = 1) -> None:
        super().__init__()
        self.rbr_skip = nn.BatchNorm2d(channels)
        self.rbr_scale = ConvBN(channels, 1) if k > 1 else None
        self.rbr_conv = nn.ModuleList([ConvBN(channels, k) for _ in range(branches)])
        self.num_conv_branches = branches

    def forward(self, x):
        identity_out = 0
        if self.rbr_skip is not None:
            identity_out = self.rbr_skip(x)
        scale_out = 0
        if self.rbr_scale is not None:
            scale_out = self.rbr_scale(x)
        out = scale_out + identity_out
        for ix in range(self.num_conv_branches):
            out += self.rbr_conv[ix](x)
        return out


class RepMixer(nn.Module):
    """FastViT's style: `x + layer_scale * (mixer(x) - norm(x))`."""

    def __init__(self, channels: int, k: int = 3) -> None:
        super().__init__()
        self.norm = MobileOneBlock(channels, 1)
        self.mixer = MobileOneBlock(channels, k, branches=2)
        self.layer_scale = nn.Parameter(1e-1 * torch.randn(channels, 1, 1))

    def forward(self, x):
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))


def test_fastvit_repmixer_is_one_depthwise_conv():
    model = randomize_batchnorm(RepMixer(8)).double().eval()
    fused, report = reparam.fuse_with_report(model)
    [conv] = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert (conv.groups, conv.kernel_size, batchnorms(fused)) == (8, (3, 3), 0)
    assert "branch_difference" in report.fusions[0].rules
    assert_same_function(model, fused, torch.randn(2, 8, 7, 5, dtype=torch.float64))


class RepMixerBlock(nn.Module):
    """FastViT's block: the RepMixer's output feeds the MLP's depthwise conv + norm-act and the residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.token_mixer = RepMixer(channels)
        self.conv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels, bias=False)
        self.norm = BatchNormAct2d(channels, act=False)
        self.fc1, self.act = nn.Conv2d(channels, 2 * channels, 1), nn.GELU()
        self.fc2 = nn.Conv2d(2 * channels, channels, 1)

    def forward(self, x):
        x = self.token_mixer(x)
        return x + self.fc2(self.act(self.fc1(self.norm(self.conv(x)))))


def test_fastvit_block_folds_the_norm_act_whose_rank_check_reads_the_conv_output():
    """The assert's `x.ndim` moves to the mixer's output, which the residual reads anyway: nothing is held apart."""
    model = randomize_batchnorm(RepMixerBlock(8)).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert (convs(fused), batchnorms(fused)) == (4, 0)  # mixer, the MLP's depthwise conv (with its BN), fc1, fc2
    assert sum(n.target is F.batch_norm for n in fused.graph.nodes) == 0
    assert [r.nodes[0] for r in report.refused(Reason.SHARED_INTERMEDIATE)] == ["add_2"]  # the residual only
    assert sum(n.target is torch._assert for n in fused.graph.nodes) == 1
    assert_same_function(model, fused, torch.randn(2, 8, 7, 5, dtype=torch.float64))


class SqueezeExcite(nn.Module):
    """timm's style: the block's values scaled by a gate computed from them (`x * gate(x)`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_reduce, self.act, self.conv_expand = nn.Conv2d(channels, 2, 1), nn.ReLU(), nn.Conv2d(2, channels, 1)

    def forward(self, x):
        return x * self.conv_expand(self.act(self.conv_reduce(x.mean((2, 3), keepdim=True)))).sigmoid()


class EfficientNetBlock(nn.Module):
    """timm's EfficientNet block (its DepthwiseSeparableConv): dw conv, norm-act, squeeze-excite, pw conv,
    norm; each norm asserts the rank of its input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn1, self.se = BatchNormAct2d(channels), SqueezeExcite(channels)
        self.conv_pw, self.bn2 = nn.Conv2d(channels, channels, 1, bias=False), BatchNormAct2d(channels, act=False)

    def forward(self, x):
        return x + self.bn2(self.conv_pw(self.se(self.bn1(self.conv_dw(x)))))


def test_efficientnet_block_folds_the_bn_after_the_squeeze_excite_product():
    """The pw conv's input is the SE product, which a scale rule anchors on: its rank read moves there anyway."""
    model = randomize_batchnorm(EfficientNetBlock(8)).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert batchnorms(fused) + sum(n.target is F.batch_norm for n in fused.graph.nodes) == 0
    assert convs(fused) == 4 and not report.refused(Reason.SHARED_INTERMEDIATE)
    assert sum(n.target is torch._assert for n in fused.graph.nodes) == 2
    assert_same_function(model, fused, torch.randn(2, 8, 7, 5, dtype=torch.float64))


class Differences(nn.Module):
    """`a - b`, `-a` and `t - a` in each spelling."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.a, self.b = ConvBN(4, 3), ConvBN(4, 1)
        self.t = nn.Parameter(torch.randn(1, 4, 1, 1))
        self.spelling = spelling

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        if self.spelling == "-":
            return self.t - (-(a - b) - 2.0)
        if self.spelling == "torch":
            return torch.sub(self.t, torch.neg(torch.sub(a, b)))
        return a.sub(b).neg().sub(self.t)


@pytest.mark.parametrize("spelling", ["-", "torch", "method"])
def test_differences_and_negations_fold_in_every_spelling(spelling):
    model = randomize_batchnorm(Differences(spelling)).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert (convs(fused), batchnorms(fused), len(report.fusions)) == (1, 0, 1)
    assert_same_function(model, fused, torch.randn(2, 4, 6, 5, dtype=torch.float64))


@pytest.mark.parametrize(
    "spelling",
    [
        lambda a, b: torch.sub(a, b, alpha=2),
        lambda a, b: a.sub(b, alpha=0.5),
        lambda a, b: torch.add(a, b, alpha=-3),
        lambda a, b: a.add(b, alpha=2),
    ],
    ids=["torch.sub", "Tensor.sub", "torch.add", "Tensor.add"],
)
def test_add_and_sub_with_alpha_scale_the_second_branch(spelling):
    class Alpha(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = ConvBN(4, 3), ConvBN(4, 1)

        def forward(self, x):
            return spelling(self.a(x), self.b(x))

    model = randomize_batchnorm(Alpha()).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert (convs(fused), batchnorms(fused)) == (1, 0) and "branch_sum_with_alpha" in report.fusions[0].rules
    assert_same_function(model, fused, torch.randn(1, 4, 5, 5, dtype=torch.float64))


def test_sync_batchnorm_folds_like_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SyncBatchNorm(8), nn.ReLU(), nn.Conv2d(8, 8, 1))
    model = randomize_batchnorm(nn.Sequential(*model, nn.SyncBatchNorm(8))).double().eval()
    fused = reparam.fuse(model)
    assert (convs(fused), batchnorms(fused)) == (2, 0)
    assert_same_function(model, fused, torch.randn(2, 3, 6, 7, dtype=torch.float64))


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> int:
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


class Conv2dSame(nn.Conv2d):
    """timm's style of TF "same" padding: computed from the input's size, in Python, in forward."""

    def forward(self, x):
        ih, iw = x.size()[-2:]
        ph = same_padding(ih, self.kernel_size[0], self.stride[0], self.dilation[0])
        pw = same_padding(iw, self.kernel_size[1], self.stride[1], self.dilation[1])
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class DepthwiseSeparable(nn.Module):
    """An EfficientNet-style block of a tf_* port: a "same"-padded depthwise conv, then a pointwise one."""

    def __init__(self, channels: int, out: int, stride: int) -> None:
        super().__init__()
        self.conv_dw = Conv2dSame(channels, channels, 3, stride, groups=channels, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()
        self.conv_pw = nn.Conv2d(channels, out, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)

    def forward(self, x):
        return self.bn2(self.conv_pw(self.act(self.bn1(self.conv_dw(x)))))


def test_a_layer_that_does_not_trace_is_kept_and_the_rest_of_its_block_fuses():
    stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
    model = randomize_batchnorm(nn.Sequential(stem, DepthwiseSeparable(8, 16, 2), DepthwiseSeparable(16, 8, 1)))
    model = model.double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert [f.sources for f in report.fusions] == [("0.0", "0.1"), ("1.conv_pw", "1.bn2"), ("2.conv_pw", "2.bn2")]
    kept = [(u.module, u.type_name) for u in report.untraced]
    assert kept == [("1.conv_dw", "Conv2dSame"), ("2.conv_dw", "Conv2dSame")]
    assert "does not trace" in report.untraced[0].reason
    assert batchnorms(fused) == 2  # the BNs after the kept convs: nothing they follow can take them
    for shape in [(1, 3, 17, 15), (2, 3, 8, 8)]:  # odd and even sizes: the padding differs
        assert_same_function(model, fused, torch.randn(shape, dtype=torch.float64))


class LinearNorm(nn.Module):
    """LeViT's style: a Linear on tokens, its BatchNorm1d applied with the tokens flattened into rows."""

    def __init__(self, features: int, out: int, flatten_end: int = 1) -> None:
        super().__init__()
        self.linear = nn.Linear(features, out, bias=False)
        self.bn = nn.BatchNorm1d(out)
        self.flatten_end = flatten_end

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, self.flatten_end)).reshape_as(x)


class LeViTMlp(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.ln1 = LinearNorm(features, 2 * features)
        self.act = nn.Hardswish()
        self.ln2 = LinearNorm(2 * features, features)

    def forward(self, x):
        return x + self.ln2(self.act(self.ln1(x)))


def test_levit_linear_norm_on_tokens_folds_into_the_linear_when_the_rank_is_known():
    model = randomize_batchnorm(nn.Sequential(LeViTMlp(8), LeViTMlp(8))).double().eval()
    tokens = torch.randn(2, 5, 8, dtype=torch.float64)
    fused, report = reparam.fuse_with_report(model, example_inputs=(tokens,))
    assert batchnorms(fused) == 0 and len(report.replacements) == 4 and not report.refusals
    assert sum(isinstance(m, nn.Linear) for m in fused.modules()) == 4
    for shape in [(2, 5, 8), (3, 1, 8), (1, 7, 8)]:  # other batch sizes and token counts
        assert_same_function(model, fused, torch.randn(shape, dtype=torch.float64))


def test_levit_linear_norm_is_refused_with_the_reason_when_the_rank_is_unknown_or_other():
    model = randomize_batchnorm(LinearNorm(8, 8)).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert batchnorms(fused) == 1 and "rank is unknown" in report.refusals[0].message
    assert report.refusals[0].reason is Reason.GEOMETRY and report.refusals[0].nodes == ("linear", "bn")
    grid = torch.randn(2, 3, 8, 8, dtype=torch.float64)  # (batch, rows, cols, features): flatten(0, 1) is not all
    model = randomize_batchnorm(LinearNorm(8, 8)).double().eval()
    fused, report = reparam.fuse_with_report(model, example_inputs=(grid,))
    assert batchnorms(fused) == 1 and "rank-4" in report.refusals[0].message
    assert_same_function(model, fused, grid)
    model = randomize_batchnorm(LinearNorm(8, 8, flatten_end=2)).double().eval()  # flatten(0, 2): all but features
    fused = reparam.fuse(model, example_inputs=(grid,))
    assert batchnorms(fused) == 0
    assert_same_function(model, fused, grid)


class LeViTStyle(nn.Module):
    """LeViT's layout: a conv stem made tokens (`flatten(2).transpose(1, 2)`), its MLP, a BatchNorm1d head."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 3, 2, 1), nn.BatchNorm2d(dim))
        self.mlp = LeViTMlp(dim)
        self.head = nn.Sequential(nn.BatchNorm1d(dim), nn.Linear(dim, 4))

    def forward(self, x):
        return self.head(self.mlp(self.stem(x).flatten(2).transpose(1, 2)).mean(1))


def test_levit_folds_without_example_inputs_its_graph_saying_the_ranks():
    model = randomize_batchnorm(LeViTStyle()).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert batchnorms(fused) == 0 and not report.refusals, report
    assert sum(isinstance(m, nn.Linear) for m in fused.modules()) == 3
    for shape in [(3, 3, 8, 8), (1, 3, 5, 7)]:
        assert_same_function(model, fused, torch.randn(shape, dtype=torch.float64))


class ReadsItsTensors(nn.Module):
    """Forward reads its own parameters and buffers (one tied under two names), and passes one as an argument."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.alias = self.conv  # the same layer, and its weight, under a second name
        self.register_buffer("shift", torch.randn(1, 4, 1, 1))

    def forward(self, x):
        y = F.conv2d(x, self.alias.weight, self.conv.bias, padding=1)
        return torch.add(y, self._buffers["shift"]) * self.conv.weight.mean()  # a real tensor, not a read


def test_the_tracer_names_each_tensor_read_in_forward_as_torch_fx_does():
    """reparam's tracer finds the path of a tensor read in forward by its id; torch.fx scans for it."""
    from reparam.registry import resolve
    from reparam.tracing import trace

    model = ReadsItsTensors().eval()
    ours = [(n.op, n.target) for n in trace(model, resolve("default")).graph.nodes if n.op == "get_attr"]
    theirs = [(n.op, n.target) for n in torch.fx.symbolic_trace(model).graph.nodes if n.op == "get_attr"]
    assert ours == theirs and ("get_attr", "conv.weight") in ours and ("get_attr", "shift") in ours


class CachedBias(nn.Module):
    """LeViT's style: in eval, a tensor computed from parameters is cached in a dict keyed by the device."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.biases = nn.Parameter(torch.randn(4, 3))
        self.register_buffer("index", torch.tensor([0, 2, 1, 0]), persistent=False)
        self.bias_cache: dict[str, torch.Tensor] = {}

    def bias(self, device):
        if self.training:
            return self.biases[torch.arange(4), self.index]
        key = str(device)
        if key not in self.bias_cache:
            self.bias_cache[key] = self.biases[torch.arange(4), self.index]
        return self.bias_cache[key]

    def forward(self, x):
        return self.bn(self.conv(x)) + self.bias(x.device).view(1, -1, 1, 1)


def test_python_state_a_trace_writes_is_put_back_and_a_second_fuse_works():
    """The trace ran `bias_cache[key] = <Proxy>`: the caller's model kept it, and the next trace read it."""
    model = randomize_batchnorm(CachedBias()).double().eval()
    x = torch.randn(1, 3, 5, 6, dtype=torch.float64)
    model(x)
    cache = model.bias_cache
    before = dict(cache)
    for _ in range(2):
        fused = reparam.fuse(model)
        assert model.bias_cache is cache and cache.keys() == before.keys()
        assert convs(fused) == 1 and batchnorms(fused) == 0
        assert_same_function(model, fused, x)


class PreActivation(nn.Module):
    """DPN's and DenseNet's style: BN -> ReLU -> conv, after a concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.bn, self.act, self.conv = nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        return self.conv(self.act(self.bn(y)))


def test_a_bn_no_layer_can_take_is_listed_with_why():
    model = randomize_batchnorm(PreActivation()).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert batchnorms(fused) == 1 and report.refusals == []
    [kept] = report.unfused
    assert (kept.layer, kept.type_name) == ("bn", "BatchNorm2d")
    assert "reads cat" in kept.reason and "feeds act (ReLU)" in kept.reason
    assert "kept    bn" in str(report) and not str(report).startswith("nothing to fuse")
    assert_same_function(model, fused, torch.randn(1, 3, 5, 6, dtype=torch.float64))


class QARepVGGBlockV2(nn.Module):
    """YOLOv6's style: 3x3+BN, a bias-free 1x1, the identity and an avg-pool of the input, then one BN."""

    def __init__(self, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.rbr_dense = nn.Sequential()
        self.rbr_dense.add_module("conv", nn.Conv2d(channels, channels, 3, stride, 1, bias=False))
        self.rbr_dense.add_module("bn", nn.BatchNorm2d(channels))
        self.rbr_1x1 = nn.Conv2d(channels, channels, 1, stride, 0, bias=False)
        self.rbr_identity = nn.Identity() if stride == 1 else None
        self.rbr_avg = nn.AvgPool2d(3, stride, 1)
        self.bn = nn.BatchNorm2d(channels)
        self.nonlinearity = nn.ReLU()

    def forward(self, inputs):
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        avg_out = self.rbr_avg(inputs)
        return self.nonlinearity(self.bn(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out + avg_out))


@pytest.mark.parametrize("stride", [1, 2])
def test_yolov6_qarepvgg_v2_with_its_pooled_input_is_one_conv_per_block(stride):
    model = nn.Sequential(QARepVGGBlockV2(8, stride), QARepVGGBlockV2(8))  # the second pools a ReLU's output
    model = randomize_batchnorm(model).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert (convs(fused), batchnorms(fused), len(report.refusals), len(report.unfused)) == (2, 0, 0, 0)
    assert "avg_pool_of_input" in report.fusions[0].rules
    for size in [(7, 9), (1, 2)]:
        assert_same_function(model, fused, torch.randn(2, 8, *size, dtype=torch.float64))


class AlphaRepVGG(nn.Module):
    """super-gradients' style: a learnable `alpha` of shape (1,) scales the 1x1 branch before a post-BN."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.branch_3x3 = nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels))
        self.branch_1x1 = nn.Conv2d(channels, channels, 1, bias=True)
        self.alpha = nn.Parameter(torch.tensor([0.7]))
        self.identity = nn.Identity()
        self.post_bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return F.relu(self.post_bn(self.branch_3x3(x) + self.alpha * self.branch_1x1(x) + self.identity(x)))


def test_a_one_element_alpha_scales_its_branch_like_a_number():
    model = randomize_batchnorm(AlphaRepVGG(6)).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert (convs(fused), batchnorms(fused), len(report.refusals)) == (1, 0, 0)
    assert_same_function(model, fused, torch.randn(2, 6, 5, 7, dtype=torch.float64))


class GeneratedKernel(nn.Module):
    """OREPA's style: the conv's kernel is built in forward from parameters, using their sizes in Python."""

    def __init__(self, cin: int, cout: int, k: int = 3, expand: int = 2) -> None:
        super().__init__()
        self.k, self.expand = k, expand
        self.weight_origin = nn.Parameter(0.1 * torch.randn(cout, cin, k, k))
        self.weight_1x1 = nn.Parameter(0.1 * torch.randn(cout, cin, 1, 1))
        self.weight_dw = nn.Parameter(0.1 * torch.randn(cin * expand, 1, k, k))
        self.weight_pw = nn.Parameter(0.1 * torch.randn(cout, cin * expand, 1, 1))
        self.vector = nn.Parameter(torch.rand(3, cout))
        self.bn = nn.BatchNorm2d(cout)

    def separable_to_full(self, dw, pw):
        t, _, h, w = dw.size()
        o, cin = pw.size(0), int(t / self.expand)
        return torch.einsum("cehw,oce->ochw", dw.view(cin, self.expand, h, w), pw.view(o, cin, self.expand))

    def weight_gen(self):
        w = torch.einsum("oihw,o->oihw", self.weight_origin, self.vector[0])
        w = w + torch.einsum("oihw,o->oihw", F.pad(self.weight_1x1, [self.k // 2] * 4), self.vector[1])
        return w + torch.einsum("oihw,o->oihw", self.separable_to_full(self.weight_dw, self.weight_pw), self.vector[2])

    def forward(self, x):
        return F.relu(self.bn(F.conv2d(x, self.weight_gen(), None, 1, self.k // 2)))


def test_a_kernel_generated_from_the_weights_sizes_is_folded_with_its_bn():
    """`t, _, h, w = dw.size()` and `int(t / expand)` read stored tensors' sizes: constants of the model."""
    model = randomize_batchnorm(GeneratedKernel(4, 6)).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert not report.untraced
    assert (convs(fused), batchnorms(fused), len(report.fusions)) == (1, 0, 1)
    assert_same_function(model, fused, torch.randn(2, 4, 7, 5, dtype=torch.float64))


class NCHWtoNHWC(nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1)


class NHWCtoNCHW(nn.Module):
    def forward(self, x):
        return x.permute(0, 3, 1, 2)


class UniRepLKNetBlock(nn.Module):
    """UniRepLKNet's block: depthwise conv + SyncBN, then Linears on channels-last pixels, the second one
    followed by the permute back and a SyncBN (`pwconv2`), then `gamma.view(1, -1, 1, 1) * y`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 5, padding=2, groups=dim, bias=False)
        self.norm = nn.SyncBatchNorm(dim)
        self.pwconv1 = nn.Sequential(NCHWtoNHWC(), nn.Linear(dim, 4 * dim))
        self.act = nn.GELU()
        self.pwconv2 = nn.Sequential(nn.Linear(4 * dim, dim, bias=False), NHWCtoNCHW(), nn.SyncBatchNorm(dim))
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, inputs):
        y = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(inputs)))))
        return self.gamma.view(1, -1, 1, 1) * y + inputs


class ConvNeXtBlock(nn.Module):
    """timm's ConvNeXt block, channels-last MLP: the layer-scale is applied after the permute back."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        shortcut = x
        x = self.fc2(self.act(self.fc1(self.norm(self.conv_dw(x).permute(0, 2, 3, 1)))))
        return x.permute(0, 3, 1, 2).mul(self.gamma.reshape(1, -1, 1, 1)) + shortcut


@pytest.mark.parametrize("block", [UniRepLKNetBlock, ConvNeXtBlock])
def test_the_bn_and_layer_scale_after_a_channels_last_linear_fold_into_it_as_the_authors_deploy(block):
    model = randomize_batchnorm(nn.Sequential(block(8), block(8))).double().eval()
    fused = reparam.fuse(model)
    assert batchnorms(fused) == 0
    linears = [m for m in fused.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 4 and convs(fused) == 2  # the deploy form: Linear, permute; no 1x1 conv
    assert not [n for n in fused.graph.nodes if n.target in (operator.mul, "mul")]  # gamma folded too
    for shape in [(2, 8, 9, 7), (1, 8, 1, 1)]:
        assert_same_function(model, fused, torch.randn(shape, dtype=torch.float64))


class LinearThenPermute(nn.Module):
    def __init__(self, reader: str) -> None:
        super().__init__()
        self.fc, self.bn, self.reader = nn.Linear(4, 6), nn.BatchNorm2d(6), reader

    def forward(self, x):
        y = self.fc(x).permute(0, 3, 1, 2)
        if self.reader == "relu":
            return torch.relu(y)
        if self.reader == "bn and relu":
            return self.bn(y) + torch.relu(y)
        return y / x.mean()


@pytest.mark.parametrize("reader", ["relu", "bn and relu", "division by a computed value"])
def test_a_linear_before_a_permute_stays_as_written_where_nothing_after_it_folds(reader):
    model = randomize_batchnorm(LinearThenPermute(reader)).double().eval()
    fused = reparam.fuse(model)
    assert isinstance(fused.get_submodule("fc"), nn.Linear) and convs(fused) == 0
    assert torch.equal(fused.get_submodule("fc").weight, model.fc.weight)
    assert_same_function(model, fused, torch.randn(2, 3, 5, 4, dtype=torch.float64))


class LayerScale(nn.Module):
    """timm's LayerScale: `x * gamma`, gamma of shape (dim,)."""

    def __init__(self, dim: int, shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(shape or (dim,)) + 0.5)

    def forward(self, x):
        return x * self.gamma


class ViTMlpBlock(nn.Module):
    """timm's ViT block, MLP half: `x + drop_path(ls(mlp(norm(x))))`, the Mlp ending fc2 -> dropout."""

    def __init__(self, dim: int, gamma_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.act = nn.Linear(dim, 2 * dim), nn.GELU()
        self.fc2, self.drop = nn.Linear(2 * dim, dim), nn.Dropout(0.1)
        self.ls = LayerScale(dim, gamma_shape)

    def forward(self, x):
        return x + self.ls(self.drop(self.fc2(self.act(self.fc1(self.norm(x))))))


class FacebookConvNeXtBlock(ConvNeXtBlock):
    """The ConvNeXt authors' block: the layer-scale multiplies the channels-last tensor, before the permute."""

    def forward(self, x):
        shortcut = x
        x = self.fc2(self.act(self.fc1(self.norm(self.conv_dw(x).permute(0, 2, 3, 1)))))
        return shortcut + (self.gamma * x).permute(0, 3, 1, 2)


@pytest.mark.parametrize("block, shape", [(ViTMlpBlock, (2, 5, 8)), (FacebookConvNeXtBlock, (2, 8, 6, 5))])
def test_a_layer_scale_after_a_linear_of_any_rank_folds_into_it(block, shape):
    model = nn.Sequential(block(8), block(8)).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert [r.rule for r in report.replacements] == ["linear_scaled"] * 2
    assert not [n for n in fused.graph.nodes if n.target in (operator.mul, "mul")]
    assert all(isinstance(b.ls.gamma if hasattr(b, "ls") else b.gamma, nn.Parameter) for b in model)  # untouched
    assert not [name for name, _ in fused.named_parameters() if "gamma" in name]
    for size in [shape, (1, *shape[1:-1], shape[-1])]:
        assert_same_function(model, fused, torch.randn(size, dtype=torch.float64))


def test_a_constant_that_could_broadcast_a_linear_output_to_more_dims_stays_as_written():
    model = ViTMlpBlock(8, gamma_shape=(1, 1, 8)).double().eval()  # on (batch, features) inputs, a rank-3 result
    fused, report = reparam.fuse_with_report(model)
    assert not report.replacements and [n for n in fused.graph.nodes if n.target is operator.mul]
    for shape in [(2, 5, 8), (3, 8)]:
        assert_same_function(model, fused, torch.randn(shape, dtype=torch.float64))


def test_a_layer_that_does_not_trace_is_exported_into_the_graph_given_example_inputs():
    """timm's Conv2dSame: with example inputs its ops replace the call, its padding still computed per input,
    and the BN after it folds into its conv."""
    stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
    model = randomize_batchnorm(nn.Sequential(stem, DepthwiseSeparable(8, 16, 2), DepthwiseSeparable(16, 8, 1)))
    model = model.double().eval()
    fused, report = reparam.fuse_with_report(model, example_inputs=(torch.randn(2, 3, 8, 8, dtype=torch.float64),))
    assert batchnorms(fused) == 0 and convs(fused) == 5 and not report.untraced
    exported = [(e.module, e.type_name) for e in report.exported]
    assert exported == [("1.conv_dw", "Conv2dSame"), ("2.conv_dw", "Conv2dSame")]
    assert ("_1_conv_dw_conv2d", "1.bn1") in [f.sources for f in report.fusions]
    for shape in [(1, 3, 17, 15), (2, 3, 8, 8), (1, 3, 1, 2)]:  # the padding differs with the size
        assert_same_function(model, fused, torch.randn(shape, dtype=torch.float64))
    empty = torch.randn(0, 3, 4, 4, dtype=torch.float64)
    assert fused(empty).shape == model(empty).shape
    loaded = pickle.loads(pickle.dumps(fused))
    x = torch.randn(1, 3, 9, 6, dtype=torch.float64)
    assert torch.equal(loaded(x), fused(x))


class FlippedTokens(nn.Module):
    """A layer with its own Linear weights whose forward decides on a size in Python (no torch.fx trace)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(dim, dim)), nn.Parameter(torch.randn(dim))

    def forward(self, x):
        if x.shape[1] > 1:
            x = x.flip(1)
        return F.linear(x, self.weight, self.bias)


def test_a_linear_inside_a_layer_that_does_not_trace_is_inlined_and_its_layer_scale_folds():
    model = nn.Sequential(FlippedTokens(8), LayerScale(8)).double().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    fused, report = reparam.fuse_with_report(model, example_inputs=(x,))
    assert [e.module for e in report.exported] == ["0"] and not report.untraced
    assert sum(isinstance(m, nn.Linear) for m in fused.modules()) == 1 and "mul" not in fused.code
    for shape in [(2, 5, 8), (1, 3, 8)]:  # sizes where the exported branch holds (x.shape[1] >= 2)
        assert_same_function(model, fused, torch.randn(shape, dtype=torch.float64))


def test_a_hooked_layer_that_does_not_trace_stays_a_call_given_example_inputs():
    model = randomize_batchnorm(DepthwiseSeparable(8, 16, 2)).double().eval()
    model.conv_dw.register_forward_hook(lambda module, args, out: out * 2)
    fused, report = reparam.fuse_with_report(model, example_inputs=(torch.randn(2, 8, 8, 8, dtype=torch.float64),))
    assert not report.exported and [u.module for u in report.untraced] == ["conv_dw"]
    assert_same_function(model, fused, torch.randn(1, 8, 7, 5, dtype=torch.float64))


class GatheredAttentionBias(nn.Module):
    """TinyViT's style: an attention-bias table gathered by a stored index, read by scaled_dot_product_attention."""

    def __init__(self, heads: int = 2, tokens: int = 4) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 3 * 8)
        self.attention_biases = nn.Parameter(torch.randn(heads, 3))
        self.register_buffer("attention_bias_idxs", torch.randint(0, 3, (tokens, tokens)), persistent=False)
        self.heads = heads

    def forward(self, x):
        bias = self.attention_biases[:, self.attention_bias_idxs]
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3 * self.heads, -1).transpose(1, 2).chunk(3, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def test_a_gathered_constant_is_stored_once_not_gathered_on_every_call():
    model = GatheredAttentionBias().double().eval()
    fused = reparam.fuse(model)
    gathers = [n for n in fused.graph.nodes if n.target is operator.getitem and isinstance(n.args[0], torch.fx.Node)
               and n.args[0].op == "get_attr"]  # fmt: skip
    assert not gathers, fused.code
    assert_same_function(model, fused, torch.randn(2, 4, 8, dtype=torch.float64))
