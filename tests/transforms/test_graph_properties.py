"""Hypothesis properties of the graph transforms: fuse(model) computes model, in float64, exactly.

Each property builds a small random model for one transform (random dims, channels, groups,
kernel sizes, strides, dilations, paddings, input sizes), fuses it, and checks the fused model
against the original on a random input and the number of layers left.
"""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import reparam
from reparam.blocks import BNAndPad, randomize_batchnorm
from tests.helpers import assert_same_function, batchnorms, convs

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


# each example fuses and runs a model: fewer examples than the pure algebra properties
few = settings(max_examples=12)


def fused_exactly(model: nn.Module, x: torch.Tensor, **options) -> nn.Module:
    model = randomize_batchnorm(model, seed=int(x.abs().sum() * 1000) % 1000).double().eval()
    fused = reparam.fuse(model, **options)
    assert_same_function(model, fused, x)
    return fused


@st.composite
def geometry(draw):
    dims = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2]))
    channels = groups * draw(st.integers(1, 3))
    return dims, groups, channels, draw(st.integers(0, 2**16))


def sample(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@few
@given(geometry(), st.integers(1, 3), st.integers(1, 3), st.integers(1, 2), st.data())
def test_transposed_conv_then_bn(geo, kernel, stride, dilation, data):
    dims, groups, channels, seed = geo
    padding = data.draw(st.integers(0, dilation * (kernel - 1)))
    output_padding = data.draw(st.integers(0, max(stride, dilation) - 1))
    conv = TRANSPOSED[dims](channels, 2 * channels, kernel, stride, padding, output_padding, groups, True, dilation)
    shrink = 2 * padding - dilation * (kernel - 1) - output_padding  # output = (size - 1) * stride + 1 - shrink
    size = max(1, -(-shrink // stride) + 1) + data.draw(st.integers(0, 3))
    fused = fused_exactly(nn.Sequential(conv, BN[dims](2 * channels)), sample(seed, 2, channels, *[size] * dims))
    assert batchnorms(fused) == 0


@few
@given(geometry(), st.sampled_from([1, 3, 5]), st.sampled_from([1, 3]), st.integers(1, 2), st.data())
def test_sequential_chain_with_unpadded_second_conv(geo, k1, k2, stride, data):
    dims, groups, channels, seed = geo
    p1 = data.draw(st.integers(0, k1 // 2))
    first = CONV[dims](channels, 2 * channels, k1, stride, p1, groups=groups)
    second = CONV[dims](
        2 * channels, channels, k2, data.draw(st.integers(1, 2)), groups=data.draw(st.sampled_from([1, groups]))
    )
    size = k1 + stride * (k2 - 1) + data.draw(st.integers(0, 4))
    model = nn.Sequential(first, BN[dims](2 * channels), second, BN[dims](channels))
    fused = fused_exactly(model, sample(seed, 1, channels, *[size] * dims), allow_costlier=True)
    # one layer: a conv, or a BatchNorm where the chain is a per-channel map (1 channel, 1x1 taps)
    assert convs(fused) + batchnorms(fused) == 1


@few
@given(geometry(), st.sampled_from([2, 3]), st.integers(1, 3), st.data())
def test_dbb_avg_branch(geo, window, stride, data):
    dims, groups, channels, seed = geo
    pad = data.draw(st.integers(0, window // 2))
    pooled = nn.Sequential(
        CONV[dims](channels, channels, 1, groups=groups, bias=False),
        BNAndPad(channels, pad, spatial_dims=dims),
        POOL[dims](window, stride),
        BN[dims](channels),
    )
    size = max(window - 2 * pad, 1) + data.draw(st.integers(0, 4))
    fused = fused_exactly(pooled, sample(seed, 2, channels, *[size] * dims), allow_costlier=True)
    assert (convs(fused), batchnorms(fused)) == (1, 0)


class Stack(nn.Module):
    def __init__(self, branches: list[nn.Module]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        return torch.cat([b(x) for b in self.branches] + [x], dim=1)


@few
@given(
    geometry(), st.lists(st.sampled_from([(1, 1), (3, 1), (5, 1), (3, 2)]), min_size=1, max_size=3), st.integers(0, 1)
)
def test_concat_of_centred_branches_and_the_input(geo, shapes, extra):
    dims, groups, channels, seed = geo
    branches = [
        nn.Sequential(CONV[dims](channels, channels, k, 1, d * (k - 1) // 2 + extra, d, groups), BN[dims](channels))
        for k, d in shapes
    ]
    if extra:  # the input itself is centred too only without the extra padding
        branches = [nn.Sequential(CONV[dims](channels, channels, 1, 1, 0, 1, groups))] + branches[:0]
    fused = fused_exactly(Stack(branches), sample(seed, 1, channels, *[5] * dims), allow_costlier=True)
    assert convs(fused) == 1


class Scaled(nn.Module):
    def __init__(self, dims: int, channels: int, seed: int) -> None:
        super().__init__()
        self.conv = CONV[dims](channels, channels, 3, padding=1)
        shape = (1, channels) + (1,) * dims
        self.gamma = nn.Parameter(sample(seed, *shape))
        self.beta = nn.Parameter(sample(seed + 1, channels).view(channels, *[1] * dims))

    def forward(self, x):
        return torch.relu(self.conv(x) * self.gamma / 3.0 + self.beta - 1.0)


@few
@given(geometry())
def test_scale_and_shift_constants(geo):
    dims, _, channels, seed = geo
    fused = fused_exactly(Scaled(dims, channels, seed), sample(seed, 2, channels, *[4] * dims))
    assert convs(fused) == 1 and "gamma" not in fused.code


class Dilated(nn.Module):
    def __init__(self, dims: int, channels: int, branches) -> None:
        super().__init__()
        self.main = CONV[dims](channels, channels, 7, padding=3, groups=channels)
        self.others = nn.ModuleList(
            CONV[dims](channels, channels, k, padding=d * (k - 1) // 2, dilation=d, groups=channels)
            for k, d in branches
        )

    def forward(self, x):
        out = self.main(x)
        for other in self.others:
            out = out + other(x)
        return out


@few
@given(geometry(), st.lists(st.sampled_from([(5, 1), (3, 2), (3, 3), (1, 1)]), min_size=1, max_size=3))
def test_dilated_branches_merge_into_the_large_kernel(geo, branches):
    dims, _, channels, seed = geo
    fused = fused_exactly(Dilated(dims, channels, branches), sample(seed, 1, channels, *[8] * dims))
    [conv] = [m for m in fused.modules() if isinstance(m, CONV[dims])]
    assert conv.kernel_size == (7,) * dims and conv.groups == channels


class AlphaSum(nn.Module):
    """`torch.add` / `torch.sub` (function or method) of two conv+BN branches, with `alpha`."""

    def __init__(self, a: nn.Module, b: nn.Module, op: str, method: bool, alpha: float) -> None:
        super().__init__()
        self.a, self.b, self.op, self.method, self.alpha = a, b, op, method, alpha

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        if self.method:
            return getattr(a, self.op)(b, alpha=self.alpha)
        return getattr(torch, self.op)(a, b, alpha=self.alpha)


@few
@given(geometry(), st.sampled_from(["add", "sub"]), st.booleans(), st.sampled_from([-3.0, -1.0, 0.5, 2.0, 0.0]))
def test_add_and_sub_with_alpha(geo, op, method, alpha):
    dims, groups, channels, seed = geo
    branches = [nn.Sequential(CONV[dims](channels, 2, k, padding=k // 2, groups=1), BN[dims](2)) for k in (3, 1)]
    model = AlphaSum(*branches, op, method, alpha)
    fused = fused_exactly(model, sample(seed, 2, channels, *[5] * dims))
    assert (convs(fused), batchnorms(fused)) == (1, 0)


class TokenLinearNorm(nn.Module):
    """LeViT's Linear + BatchNorm1d on tokens: the BN sees the tokens flattened into rows."""

    def __init__(self, features: int, out: int, bias: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(features, out, bias=bias)
        self.bn = nn.BatchNorm1d(out)

    def forward(self, x):
        y = self.linear(x)
        return self.bn(y.flatten(0, -2)).reshape_as(y)


@few
@given(st.integers(1, 4), st.integers(1, 4), st.booleans(), st.integers(1, 3), st.integers(0, 2**16), st.data())
def test_linear_then_batchnorm_on_tokens(features, out, bias, rank, seed, data):
    """Any number of leading dims (batch, tokens, ...) before the features, shapes known from an example."""
    model = randomize_batchnorm(TokenLinearNorm(features, out, bias), seed=seed).double().eval()
    shape = [data.draw(st.integers(1, 3)) for _ in range(rank)] + [features]
    x = sample(seed, *shape)
    fused = reparam.fuse(model, example_inputs=(x,))
    assert batchnorms(fused) == 0
    other = [n + 1 for n in shape[:-1]] + [features]  # other batch sizes and token counts
    for inputs in (x, sample(seed + 1, *other)):
        assert_same_function(model, fused, inputs)


class PooledBranches(nn.Module):
    """YOLOv6's QARepVGGBlockV2 spelling: `bn(conv(x) + conv1x1(x) + x + avg(x))`, x maybe a ReLU output."""

    def __init__(self, dims: int, channels: int, kernel: int, window: int, stride: int, after_relu: bool) -> None:
        super().__init__()
        self.pre = nn.Sequential(CONV[dims](channels, channels, 1), nn.ReLU()) if after_relu else nn.Identity()
        self.dense = CONV[dims](channels, channels, kernel, stride, kernel // 2, bias=False)
        self.pointwise = CONV[dims](channels, channels, 1, stride, bias=False)
        self.pool = POOL[dims](window, stride, window // 2)
        self.identity = stride == 1
        self.bn = BN[dims](channels)

    def forward(self, x):
        x = self.pre(x)
        y = self.dense(x) + self.pointwise(x) + self.pool(x)
        return self.bn(y + x if self.identity else y)


@few
@given(geometry(), st.sampled_from([1, 3, 5]), st.sampled_from([3, 5]), st.integers(1, 2), st.booleans(), st.data())
def test_a_pool_of_a_tensor_no_region_computes_sums_with_the_branches_beside_it(
    geo, kernel, window, stride, after_relu, data
):
    dims, _, channels, seed = geo
    size = data.draw(st.integers(window, 8))  # torch's 3-d pool needs the window inside the unpadded input
    model = PooledBranches(dims, channels, kernel, window, stride, after_relu)
    fused = fused_exactly(model, sample(seed, 2, channels, *[size] * dims), allow_costlier=True)
    assert (convs(fused), batchnorms(fused)) == (1 + after_relu, 0)


class OneValueScale(nn.Module):
    """super-gradients' spelling: a learnable one-element `alpha` scales the 1x1 branch."""

    def __init__(self, dims: int, channels: int, rank: int) -> None:
        super().__init__()
        self.dense = CONV[dims](channels, channels, 3, padding=1)
        self.pointwise = CONV[dims](channels, channels, 1)
        self.alpha = nn.Parameter(torch.rand((1,) * rank, dtype=torch.float64) + 0.5)
        self.bn = BN[dims](channels)

    def forward(self, x):
        return self.bn(self.dense(x) + self.alpha * self.pointwise(x) + x)


@few
@given(geometry(), st.data())
def test_a_one_element_constant_of_any_rank_up_to_the_outputs_scales_like_a_number(geo, data):
    dims, _, channels, seed = geo
    rank = data.draw(st.integers(0, dims + 2))
    size = data.draw(st.integers(1, 6))
    fused = fused_exactly(OneValueScale(dims, channels, rank), sample(seed, 2, channels, *[size] * dims))
    assert (convs(fused), batchnorms(fused)) == (1, 0)


class SplitConvs(nn.Module):
    """MixNet's MixedConv: a conv per channel split (dense or depthwise, its own size), concatenated, then a BN."""

    def __init__(self, dims: int, parts: list[tuple[int, int, bool]]) -> None:
        super().__init__()
        self.splits = [c for c, _, _ in parts]
        self.convs = nn.ModuleList(
            CONV[dims](c, c, k, padding=k // 2, groups=c if depthwise else 1, bias=False) for c, k, depthwise in parts
        )
        self.bn = BN[dims](sum(self.splits))

    def forward(self, x):
        parts = torch.split(x, self.splits, 1)
        return self.bn(torch.cat([conv(parts[i]) for i, conv in enumerate(self.convs)], 1))


@few
@given(
    st.sampled_from([1, 2, 3]),
    st.lists(st.tuples(st.integers(1, 3), st.sampled_from([1, 3, 5]), st.booleans()), min_size=2, max_size=3),
    st.integers(1, 6),
    st.integers(0, 2**16),
)
def test_a_bn_after_a_concatenation_folds_into_every_part(dims, parts, size, seed):
    model = SplitConvs(dims, parts)
    fused = fused_exactly(model, sample(seed, 2, len(model.bn.weight), *[size] * dims))
    assert convs(fused) + batchnorms(fused) == len(parts)  # a 1-channel 1x1 part is written as a BN


class ChannelsLastLinear(nn.Module):
    """A Linear over the channels moved last and back (`permute` or `torch.permute`), then a BN."""

    def __init__(self, dims: int, channels: int, out: int, bias: bool, method: bool) -> None:
        super().__init__()
        self.into = (0, *range(2, dims + 2), 1)
        self.back = (0, dims + 1, *range(1, dims + 1))
        self.linear, self.bn, self.method = nn.Linear(channels, out, bias=bias), BN[dims](out), method

    def forward(self, x):
        y = self.linear(x.permute(*self.into) if self.method else torch.permute(x, self.into))
        return self.bn(y.permute(self.back) if self.method else torch.permute(y, self.back))


@few
@given(geometry(), st.integers(1, 4), st.booleans(), st.booleans(), st.integers(1, 5))
def test_a_channels_last_linear_is_a_1x1_conv_and_takes_the_bn_after_it(geo, out, bias, method, size):
    dims, _, channels, seed = geo
    model = ChannelsLastLinear(dims, channels, out, bias, method)
    fused = fused_exactly(model, sample(seed, 2, channels, *[size] * dims))
    assert convs(fused) + batchnorms(fused) == 1  # one layer: a 1x1 conv, or a BN for a 1-channel map
    assert not any(isinstance(m, nn.Linear) for m in fused.modules())


class LinearThenChannelsFirst(nn.Module):
    """A Linear on a channels-last tensor of any rank, moved back to channels-first, then per-channel layers."""

    def __init__(self, dims: int, channels: int, out: int, bias: bool, tail: list[str]) -> None:
        super().__init__()
        self.back = (0, dims + 1, *range(1, dims + 1))
        self.linear = nn.Linear(channels, out, bias=bias)
        self.bns = nn.ModuleList(BN[dims](out) for _ in tail)
        self.gamma = nn.Parameter(torch.rand(out, *[1] * dims, dtype=torch.float64) + 0.5)
        self.tail = tail

    def forward(self, z):
        y = self.linear(z).permute(*self.back)
        for op, bn in zip(self.tail, self.bns):
            y = bn(y) if op == "bn" else self.gamma * y if op == "scale" else y - 0.5
        return y


@few
@given(
    geometry(),
    st.integers(1, 4),
    st.booleans(),
    st.lists(st.sampled_from(["bn", "scale", "shift"]), min_size=1, max_size=3),
    st.integers(1, 5),
)
def test_per_channel_layers_after_a_linear_moved_to_channels_first_fold_into_it(geo, out, bias, tail, size):
    dims, _, channels, seed = geo
    model = LinearThenChannelsFirst(dims, channels, out, bias, tail)
    fused = fused_exactly(model, sample(seed, 2, *[size] * dims, channels))
    linears = sum(isinstance(m, nn.Linear) for m in fused.modules())
    assert convs(fused) == 0 and linears + batchnorms(fused) == 1  # the Linear took them (a BN for 1 -> 1 channel)


class LinearThenConstants(nn.Module):
    """A Linear on inputs of any rank, then per-feature constants in the spellings layer-scales use."""

    def __init__(self, features: int, out: int, bias: bool, ops: list[tuple[str, str]]) -> None:
        super().__init__()
        self.linear = nn.Linear(features, out, bias=bias)
        self.gammas = nn.ParameterList(nn.Parameter(torch.rand(out, dtype=torch.float64) + 0.5) for _ in ops)
        self.ops = ops

    def forward(self, x):
        y = self.linear(x)
        for (op, shape), gamma in zip(self.ops, self.gammas):
            c = gamma if shape == "vector" else gamma[:1] if shape == "one" else 1.5
            y = {"mul": lambda: c * y, "div": lambda: y / c, "add": lambda: y + c, "sub": lambda: c - y}[op]()
        return y


@few
@given(
    st.integers(1, 4),
    st.integers(1, 4),
    st.booleans(),
    st.lists(
        st.tuples(st.sampled_from(["mul", "div", "add", "sub"]), st.sampled_from(["vector", "one", "number"])),
        min_size=1,
        max_size=3,
    ),
    st.lists(st.integers(1, 3), max_size=3),
    st.integers(0, 2**16),
)
def test_per_feature_constants_after_a_linear_of_any_rank_fold_into_it(features, out, bias, ops, leading, seed):
    model = LinearThenConstants(features, out, bias, ops)
    fused = fused_exactly(model, sample(seed, *leading, features))
    assert sum(isinstance(m, nn.Linear) for m in fused.modules()) == 1
    assert not [n for n in fused.graph.nodes if n.op == "call_function"]  # no arithmetic left
