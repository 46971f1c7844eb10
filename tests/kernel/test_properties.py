"""Hypothesis properties of the kernel algebra (`reparam.kernel`): every kernel, composition and
sum computes, in float64 and to rounding, exactly what the modules it stands for compute when
applied one by one with torch.nn / torch.nn.functional.
"""

from __future__ import annotations

import math
import operator
from functools import reduce
from unittest import mock

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn

from reparam.cost import Cost
from reparam.kernel import Kernel, aligned
from tests.strategies import (
    CONV_CLASSES,
    FLOAT_DTYPES,
    NONZERO_PADDING_MODES,
    ConvGeometry,
    IdentityGeometry,
    ParallelBranches,
    batchnorms,
    chain_min_input_size,
    conv_geometries,
    convs,
    divisors,
    inputs,
    parallel_branches,
    random_batchnorm,
    random_conv,
    seeds,
    spatial_dims,
)

RTOL = 1e-10


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The tensors here are tiny: torch's intra-op thread pool only adds overhead, and on a busy
    2-core machine it made this module ~10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    """Same shape and dtype, and max |actual - expected| <= rtol * max(1, max |expected|).

    Inputs and weights are O(1), so rounding in float64 stays many orders below this; the floor
    of 1 keeps an output that cancels to ~0 (e.g. a BN whose mean equals the input) from
    turning rounding noise into a relative error of 1."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    scale = expected.abs().max().clamp_min(1.0)
    error = ((actual - expected).abs().max() / scale).item()
    assert error <= rtol, f"relative error {error:.3e} > {rtol:.1e}"


def assert_computes(kernel: Kernel, x: torch.Tensor, expected: torch.Tensor) -> None:
    """The kernel, applied directly and through `to_module`, gives `expected` on x."""
    assert_close(kernel(x), expected)
    module = kernel.to_module()
    assert type(module) is CONV_CLASSES[kernel.spatial_dims]
    assert_close(module(x), expected)


# ----------------------------------------------------------------------------- single convs


@st.composite
def conv_with_input(draw, **geometry_kwargs):
    geometry = draw(conv_geometries(**geometry_kwargs))
    conv = random_conv(geometry, draw(seeds()))
    x = draw(inputs(geometry.in_channels, geometry.min_input_size()))
    return conv, x


@given(conv_with_input())
def test_from_conv_computes_the_conv(case):
    conv, x = case
    kernel = Kernel.from_conv(conv)
    assert kernel.weight.dtype == kernel.bias.dtype == torch.float64
    assert (kernel.in_channels, kernel.out_channels, kernel.groups) == (
        conv.in_channels,
        conv.out_channels,
        conv.groups,
    )
    assert kernel.kernel_size == tuple(conv.kernel_size)
    assert kernel.stride == tuple(conv.stride)
    assert kernel.padding == ConvGeometry.of(conv).resolved_padding
    # normalised geometry: equal maps have equal geometry
    assert kernel.dilation == tuple(d if k > 1 else 1 for d, k in zip(conv.dilation, conv.kernel_size))
    assert kernel.padding_mode == (conv.padding_mode if any(kernel.padding) else "zeros")
    with torch.no_grad():
        assert_computes(kernel, x, conv(x))


@given(conv_geometries(), seeds())
def test_min_input_size_is_minimal(geometry, seed):
    """Guard the shared strategies: `min_input_size` is the smallest input torch accepts with at
    least one output position, so the properties really run on the smallest borders."""
    conv = random_conv(geometry, seed)
    minimum = geometry.min_input_size()
    with torch.no_grad():
        y = conv(torch.zeros(1, geometry.in_channels, *minimum, dtype=torch.float64))
    assert y.shape[2:] == geometry.output_size(minimum) and min(y.shape[2:]) >= 1
    for dim, n in enumerate(minimum):
        if n > 1:
            smaller = list(minimum)
            smaller[dim] -= 1
            with pytest.raises(RuntimeError), torch.no_grad():
                conv(torch.zeros(1, geometry.in_channels, *smaller, dtype=torch.float64))


@given(conv_with_input(), st.data())
def test_conv_then_batchnorm_computes_bn_of_conv(case, data):
    conv, x = case
    dims = x.dim() - 2
    bn = data.draw(batchnorms(conv.out_channels, dims), label="bn")
    fused = Kernel.from_conv(conv).then(Kernel.from_batchnorm(bn, dims))
    # folding a BN never changes the conv's geometry
    assert (fused.kernel_size, fused.stride, fused.padding, fused.groups) == (
        tuple(conv.kernel_size),
        tuple(conv.stride),
        ConvGeometry.of(conv).resolved_padding,
        conv.groups,
    )
    with torch.no_grad():
        assert_computes(fused, x, bn(conv(x)))


@given(spatial_dims(), st.integers(1, 6), st.data())
def test_batchnorm_kernel_computes_the_batchnorm(dims, channels, data):
    bn = data.draw(batchnorms(channels, dims), label="bn")
    x = data.draw(inputs(channels, (1,) * dims), label="x")
    kernel = Kernel.from_batchnorm(bn, dims)
    assert kernel.is_channelwise
    with torch.no_grad():
        assert_computes(kernel, x, bn(x))


# ----------------------------------------------------------------------------- a.then(b)


def _chain_input(data, first: nn.Module, second: nn.Module) -> torch.Tensor:
    minimum = chain_min_input_size([ConvGeometry.of(first), ConvGeometry.of(second)])
    return data.draw(inputs(first.in_channels, minimum), label="x")


def _check_then(first_module: nn.Module, first: Kernel, second_module: nn.Module, x: torch.Tensor) -> Kernel:
    second = Kernel.from_conv(second_module)
    fused = first.then(second)
    assert fused.stride == tuple(s1 * s2 for s1, s2 in zip(first.stride, second.stride))
    assert fused.groups == math.gcd(first.groups, second.groups)
    assert (fused.in_channels, fused.out_channels) == (first.in_channels, second.out_channels)
    for dim in range(fused.spatial_dims):
        k1, s1, d1 = first.kernel_size[dim], first.stride[dim], first.dilation[dim]
        k2, d2 = second.kernel_size[dim], second.dilation[dim]
        # the receptive field is the sum of both (in input units), on the coarsest lattice of tap
        # offsets d1 * t + s1 * d2 * u (anything finer only adds all-zero taps, i.e. MACs)
        span = d1 * (k1 - 1) + s1 * d2 * (k2 - 1)
        lattice = math.gcd(d1 if k1 > 1 else 0, s1 * d2 if k2 > 1 else 0) or 1
        assert fused.dilation[dim] * (fused.kernel_size[dim] - 1) == span
        assert fused.dilation[dim] == lattice
    with torch.no_grad():
        assert_computes(fused, x, second_module(first_module(x)))
    return fused


@given(st.data())
def test_then_into_unpadded_kernel(data):
    """b reads only positions a really computed: exact for any a (padded in any mode, strided,
    dilated, grouped, or an eval BatchNorm)."""
    if data.draw(st.booleans(), label="a is a BatchNorm"):
        dims = data.draw(spatial_dims(), label="dims")
        first_module = data.draw(batchnorms(data.draw(st.integers(1, 6), label="channels"), dims), label="a")
        first = Kernel.from_batchnorm(first_module, dims)
        minimum = None
    else:
        first_module = data.draw(convs(), label="a")
        first = Kernel.from_conv(first_module)
        dims = first.spatial_dims
    pointwise = data.draw(st.integers(0, 3), label="b pointwise") == 0  # a 1x1 after: a rare draw otherwise
    second = data.draw(convs(dims=dims, in_channels=first.out_channels, padded=False, pointwise=pointwise), label="b")
    if isinstance(first_module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        minimum = chain_min_input_size([ConvGeometry.of(first_module), ConvGeometry.of(second)])
    else:
        minimum = ConvGeometry.of(second).min_input_size()
    x = data.draw(inputs(first.in_channels, minimum), label="x")
    fused = _check_then(first_module, first, second, x)
    assert fused.padding == first.padding
    assert fused.padding_mode == first.padding_mode


@given(st.data())
def test_then_is_associative_on_chains_of_three(data):
    """a.then(b).then(c) == a.then(b.then(c)) == c(b(a(x))) with b and c unpadded: the composed
    kernels carry non-trivial tap lattices (dilation from strides) into the next composition."""
    a = data.draw(convs(max_kernel=3), label="a")
    dims = a.weight.dim() - 2
    b = data.draw(convs(dims=dims, in_channels=a.out_channels, padded=False, max_kernel=3), label="b")
    c = data.draw(convs(dims=dims, in_channels=b.out_channels, padded=False, max_kernel=3), label="c")
    ka, kb, kc = (Kernel.from_conv(m) for m in (a, b, c))
    left, right = ka.then(kb).then(kc), ka.then(kb.then(kc))
    minimum = chain_min_input_size([ConvGeometry.of(m) for m in (a, b, c)])
    x = data.draw(inputs(a.in_channels, minimum, max_extra=2), label="x")
    assert (left.stride, left.padding, left.groups) == (right.stride, right.padding, right.groups)
    with torch.no_grad():
        expected = c(b(a(x)))
        assert_computes(left, x, expected)
        assert_computes(right, x, expected)


@given(st.data())
def test_then_bias_free_pointwise_into_zero_padded_kernel(data):
    """A bias-free pointwise a maps zero to zero, so it commutes with b's zero padding."""
    dims = data.draw(spatial_dims(), label="dims")
    first = data.draw(convs(dims=dims, pointwise=True, bias=False), label="a")
    second = data.draw(convs(dims=dims, in_channels=first.out_channels, padded=True, modes=("zeros",)), label="b")
    x = _chain_input(data, first, second)
    fused = _check_then(first, Kernel.from_conv(first), second, x)
    assert fused.padding == ConvGeometry.of(second).resolved_padding
    assert fused.padding_mode == "zeros"


@given(st.data())
def test_then_biased_pointwise_into_reflect_replicate_circular_padded_kernel(data):
    """A pointwise a (a biased 1x..x1 conv or an eval BatchNorm) commutes with copying padding."""
    dims = data.draw(spatial_dims(), label="dims")
    if data.draw(st.booleans(), label="a is a BatchNorm"):
        channels = data.draw(st.integers(1, 6), label="channels")
        first_module = data.draw(batchnorms(channels, dims), label="a")
        first = Kernel.from_batchnorm(first_module, dims)
        in_channels = out_channels = channels
    else:
        first_module = data.draw(convs(dims=dims, pointwise=True, bias=True), label="a")
        first = Kernel.from_conv(first_module)
        in_channels, out_channels = first_module.in_channels, first_module.out_channels
    second = data.draw(convs(dims=dims, in_channels=out_channels, padded=True, modes=NONZERO_PADDING_MODES), label="b")
    x = data.draw(inputs(in_channels, ConvGeometry.of(second).min_input_size()), label="x")
    fused = _check_then(first_module, first, second, x)
    assert fused.padding_mode == second.padding_mode


@given(st.data())
def test_then_with_a_depthwise_side_is_per_channel(data):
    """A depthwise side (groups == in == out channels, e.g. an average pool or a BN) composes per
    channel: no regrouping into a dense C x C weight, and the same weights, bit for bit, as the
    dense composition of both sides regrouped to one group (its extra terms are exact zeros).
    The other side is dense or grouped, strided, dilated; b is unpadded unless a is pointwise."""
    dims = data.draw(spatial_dims(), label="dims")
    channels = data.draw(st.integers(1, 6), label="channels")
    depthwise = {"in_channels": channels, "out_channels": channels, "groups": channels}
    side = data.draw(st.sampled_from(["a", "b", "both"]), label="depthwise side")
    pointwise = data.draw(st.booleans(), label="a pointwise, b padded")
    b_kwargs = depthwise if side != "a" else {"in_channels": channels}
    second = data.draw(convs(dims=dims, padded=None if pointwise else False, max_kernel=3, **b_kwargs), label="b")
    zero_padded = ConvGeometry.of(second).is_padded and second.padding_mode == "zeros"
    a_kwargs = depthwise if side != "b" else {"out_channels": channels}
    bias = False if zero_padded else None
    first = data.draw(convs(dims=dims, pointwise=pointwise, bias=bias, max_kernel=3, **a_kwargs), label="a")
    x = _chain_input(data, first, second)
    a, b = Kernel.from_conv(first), Kernel.from_conv(second)
    with mock.patch.object(Kernel, "regrouped", autospec=True, side_effect=Kernel.regrouped) as regrouped:
        fused = _check_then(first, a, second, x)
    regrouped.assert_not_called()
    dense = a.regrouped(1).then(b.regrouped(1))
    assert torch.equal(fused.regrouped(1).weight, dense.weight)
    assert_close(fused.bias, dense.bias)


@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_then_average_pool(stride):
    """The Diverse Branch Block's avg-pool branch: a dense 1x1 (with bias), then an unpadded average pool."""
    first = random_conv(ConvGeometry(4, 6, (1, 1), (1, 1), (0, 0), (1, 1)), 0)
    pool = Kernel.avg_pool(6, 2, 3, stride, dtype=torch.float64)
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    fused = Kernel.from_conv(first).then(pool)
    assert (fused.kernel_size, fused.stride, fused.groups) == ((3, 3), (stride, stride), 1)
    with torch.no_grad():
        assert_computes(fused, x, nn.functional.avg_pool2d(first(x), 3, stride))


# ----------------------------------------------------------------------------- parallel sums


def _branch_kernels(data, branches: ParallelBranches) -> tuple[list[Kernel], list]:
    """Kernels for the branches and the modules computing each branch's reference output.

    A conv branch may be preceded by a pointwise conv (Diverse-Branch-Block style 1x1 -> KxK;
    bias-free where the KxK zero-pads) and any branch may be followed by a random BN."""
    kernels, references = [], []
    for index, branch in enumerate(branches.branches):
        if isinstance(branch, IdentityGeometry):
            kernel = Kernel.identity(branch.channels, branch.dims, groups=branch.groups, dtype=torch.float64)
            module: nn.Module = nn.Identity()
        else:
            module = random_conv(branch, data.draw(seeds(), label=f"branch {index} seed"))
            kernel = Kernel.from_conv(module)
            if data.draw(st.booleans(), label=f"branch {index} has a 1x1 before it"):
                zero_padded = branch.is_padded and branch.padding_mode == "zeros"
                prefix = data.draw(
                    convs(
                        dims=branches.dims,
                        in_channels=branches.in_channels,
                        out_channels=branches.in_channels,
                        pointwise=True,
                        bias=False if zero_padded else None,
                    ),
                    label=f"branch {index} 1x1",
                )
                first = Kernel.from_conv(prefix)
                kernel = first.then(kernel)
                module = nn.Sequential(prefix, module)
        if data.draw(st.booleans(), label=f"branch {index} has a BN after it"):
            bn = data.draw(batchnorms(branches.out_channels, branches.dims), label=f"branch {index} bn")
            kernel = kernel.then(Kernel.from_batchnorm(bn, branches.dims))
            module = nn.Sequential(module, bn)
        kernels.append(kernel)
        references.append(module)
    return kernels, references


@given(parallel_branches(), st.data())
def test_sum_of_aligned_branches_computes_the_sum_of_their_outputs(branches, data):
    kernels, references = _branch_kernels(data, branches)
    x = data.draw(inputs(branches.in_channels, branches.min_input_size()), label="x")
    total = reduce(operator.add, kernels)
    assert total.groups == math.gcd(*(k.groups for k in kernels))
    assert total.stride == branches.stride
    assert total.padding == tuple(max(k.padding[dim] for k in kernels) for dim in range(branches.dims))
    padded = any(any(k.padding) for k in kernels)
    assert total.padding_mode == (branches.padding_mode if padded else "zeros")
    with torch.no_grad():
        expected = sum(module(x) for module in references)
        assert_computes(total, x, expected)


@given(parallel_branches(min_branches=2, max_branches=2), st.data())
def test_difference_and_negation_compute_the_difference_and_negation_of_outputs(branches, data):
    (a, b), (module_a, module_b) = _branch_kernels(data, branches)
    x = data.draw(inputs(branches.in_channels, branches.min_input_size()), label="x")
    with torch.no_grad():
        assert_computes(a - b, x, module_a(x) - module_b(x))
        assert_computes(-a, x, -module_a(x))


@given(parallel_branches(), st.data())
def test_aligned_kernels_share_one_geometry_and_keep_their_maps(branches, data):
    kernels, references = _branch_kernels(data, branches)
    x = data.draw(inputs(branches.in_channels, branches.min_input_size()), label="x")
    common = aligned(kernels)
    assert len(common) == len(kernels)
    geometry = {(k.kernel_size, k.stride, k.padding, k.dilation, k.padding_mode) for k in common}
    assert len(geometry) == 1, geometry
    for kernel, original, module in zip(common, kernels, references):
        assert kernel.groups == original.groups
        with torch.no_grad():
            assert_computes(kernel, x, module(x))


@given(parallel_branches(identity=False, min_branches=3, max_branches=3), st.data())
def test_sum_is_associative_and_commutative(branches, data):
    kernels, _ = _branch_kernels(data, branches)
    x = data.draw(inputs(branches.in_channels, branches.min_input_size()), label="x")
    a, b, c = kernels
    left, right, swapped = (a + b) + c, a + (b + c), c + (b + a)
    for other in (right, swapped):
        assert (other.kernel_size, other.padding, other.dilation, other.groups) == (
            left.kernel_size,
            left.padding,
            left.dilation,
            left.groups,
        )
        assert_close(other.weight, left.weight)
        assert_close(other.bias, left.bias)
    assert_close(left(x), a(x) + b(x) + c(x))


# ----------------------------------------------------------------------------- identity, regroup, embed


@given(spatial_dims(), st.integers(1, 8), st.data())
def test_identity_is_the_identity(dims, channels, data):
    groups = data.draw(st.sampled_from(divisors(channels)), label="groups")
    x = data.draw(inputs(channels, (1,) * dims), label="x")
    kernel = Kernel.identity(channels, dims, groups=groups)
    assert (kernel.in_channels, kernel.out_channels, kernel.groups) == (channels, channels, groups)
    assert kernel.kernel_size == (1,) * dims and kernel.is_pointwise
    assert kernel.is_channelwise == (groups == channels)
    assert torch.equal(kernel(x), x)
    module = kernel.to_module()
    assert module.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(module(x.float()), x.float())


@st.composite
def grouped_conv_with_input(draw):
    groups = draw(st.sampled_from([2, 3, 4, 6]))
    geometry = draw(
        conv_geometries(
            in_channels=groups * draw(st.integers(1, 2)), out_channels=groups * draw(st.integers(1, 2)), groups=groups
        )
    )
    conv = random_conv(geometry, draw(seeds()))
    return conv, draw(inputs(geometry.in_channels, geometry.min_input_size()))


@given(grouped_conv_with_input(), st.data())
def test_regrouped_computes_the_same_map(case, data):
    conv, x = case
    kernel = Kernel.from_conv(conv)
    groups = data.draw(st.sampled_from(divisors(conv.groups)), label="new groups")
    regrouped = kernel.regrouped(groups)
    assert regrouped.groups == groups
    assert tuple(regrouped.weight.shape) == (conv.out_channels, conv.in_channels // groups, *conv.kernel_size)
    if groups == conv.groups:
        assert regrouped is kernel
    else:  # block diagonal: the new zeros are exact zeros, the old weights are all there
        assert torch.count_nonzero(regrouped.weight) == torch.count_nonzero(kernel.weight)
    with torch.no_grad():
        assert_computes(regrouped, x, conv(x))


@given(conv_with_input(), st.data())
def test_embedded_into_a_larger_aligned_geometry_computes_the_same_map(case, data):
    conv, x = case
    kernel = Kernel.from_conv(conv)
    padding, size, dilation = [], [], []
    for dim in range(kernel.spatial_dims):
        k, p, d = kernel.kernel_size[dim], kernel.padding[dim], kernel.dilation[dim]
        new_d = data.draw(st.sampled_from(divisors(d)), label=f"dilation {dim}")  # d == 1 when k == 1
        grow = data.draw(st.integers(0, 2), label=f"grow {dim}")
        padding.append(p + new_d * grow)
        size.append((d // new_d) * (k - 1) + 2 * grow + 1)
        dilation.append(new_d)
    embedded = kernel.embedded(tuple(padding), tuple(size), tuple(dilation))
    assert (embedded.padding, embedded.kernel_size, embedded.dilation) == (tuple(padding), tuple(size), tuple(dilation))
    assert torch.count_nonzero(embedded.weight) == torch.count_nonzero(kernel.weight)
    # the larger padding must still be valid for the input in the kernel's padding mode
    geometry = ConvGeometry(
        kernel.in_channels,
        kernel.out_channels,
        embedded.kernel_size,
        embedded.stride,
        embedded.padding,
        embedded.dilation,
        embedded.groups,
        embedded.padding_mode,
    )
    assume(geometry.accepts(x.shape[2:]))
    with torch.no_grad():
        assert_computes(embedded, x, conv(x))


# ----------------------------------------------------------------------------- dtypes


@given(st.data())
def test_dtype_survives_the_round_trip(data):
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), label="dtype")
    geometry = data.draw(conv_geometries(), label="geometry")
    conv = random_conv(geometry, data.draw(seeds(), label="seed"), dtype)
    kernel = Kernel.from_conv(conv)
    assert kernel.weight.dtype == kernel.bias.dtype == torch.float64
    assert kernel.dtype == dtype
    module = kernel.to_module()
    assert type(module) is type(conv)
    assert module.weight.dtype == module.bias.dtype == dtype
    assert torch.equal(module.weight, conv.weight)
    assert torch.equal(module.bias, conv.bias if conv.bias is not None else torch.zeros_like(module.bias))
    if dtype in (torch.float32, torch.float64):
        x = data.draw(inputs(geometry.in_channels, geometry.min_input_size(), dtype=dtype), label="x")
        with torch.no_grad():
            expected = conv(x)
            actual = module(x)
        assert actual.dtype == dtype
        torch.testing.assert_close(actual, expected)


@given(st.data())
def test_dtype_of_compositions_is_the_upstream_dtype(data):
    """A conv followed by a BN deploys in the conv's dtype (e.g. a bfloat16 conv with a float32 BN
    stays bfloat16); a sum deploys in one of its branches' dtypes, the common one when they agree."""
    conv_dtype = data.draw(st.sampled_from(FLOAT_DTYPES), label="conv dtype")
    bn_dtype = data.draw(st.sampled_from(FLOAT_DTYPES), label="bn dtype")
    dims = data.draw(spatial_dims(), label="dims")
    geometry = data.draw(conv_geometries(dims=dims), label="geometry")
    conv = random_conv(geometry, data.draw(seeds(), label="seed"), conv_dtype)
    bn = random_batchnorm(geometry.out_channels, dims, data.draw(seeds(), label="bn seed"), dtype=bn_dtype)
    assert Kernel.from_batchnorm(bn, dims).dtype == bn_dtype
    fused = Kernel.from_conv(conv).then(Kernel.from_batchnorm(bn, dims))
    assert fused.weight.dtype == torch.float64
    assert fused.dtype == conv_dtype
    module = fused.to_module()
    assert module.weight.dtype == module.bias.dtype == conv_dtype
    # sums: a branch of the same geometry in another (or the same) dtype
    other_dtype = data.draw(st.sampled_from(FLOAT_DTYPES), label="other branch dtype")
    other = Kernel.from_conv(random_conv(geometry, 0, other_dtype))
    for summed in (fused + other, other + fused):
        assert summed.weight.dtype == torch.float64
        assert summed.dtype in (conv_dtype, other_dtype)
        assert summed.to_module().weight.dtype == summed.dtype
    if other_dtype == conv_dtype:
        assert (fused + other).dtype == conv_dtype


# ----------------------------------------------------------------------------- regressions
# A single-tap dimension placed on a coarser tap lattice used to get a slice step of 0
# ("ValueError: slice step cannot be zero") in Kernel.then and Kernel.embedded (so also in `+`
# and `aligned`). The properties above cover these cases at random; these are the minimal ones.


def _compare(first: nn.Module, second: nn.Module, combine: str, x: torch.Tensor) -> None:
    a, b = Kernel.from_conv(first), Kernel.from_conv(second)
    with torch.no_grad():
        if combine == "then":
            assert_computes(a.then(b), x, second(first(x)))
        else:
            assert_computes(a + b, x, first(x) + second(x))


def test_sum_of_pointwise_and_dilated_kernel():
    """RepLKNet/UniRepLKNet-style: a 1x1 beside a dilated 3x3 with the same centre."""
    first = random_conv(ConvGeometry(2, 2, (1, 1), (1, 1), (0, 0), (1, 1)), 0)
    second = random_conv(ConvGeometry(2, 2, (3, 3), (1, 1), (2, 2), (2, 2)), 1)
    _compare(first, second, "sum", torch.randn(1, 2, 6, 6, dtype=torch.float64))


def test_identity_plus_dilated_kernel():
    second = random_conv(ConvGeometry(2, 2, (3,), (1,), (2,), (2,)), 1)
    x = torch.randn(1, 2, 7, dtype=torch.float64)
    total = Kernel.identity(2, 1, dtype=torch.float64) + Kernel.from_conv(second)
    assert total.dilation == (2,) and total.kernel_size == (3,)
    with torch.no_grad():
        assert_computes(total, x, x + second(x))


def test_strided_pointwise_then_unpadded_kernel():
    first = random_conv(ConvGeometry(2, 2, (1, 1), (2, 2), (0, 0), (1, 1)), 0)
    second = random_conv(ConvGeometry(2, 2, (3, 3), (1, 1), (0, 0), (1, 1)), 1)
    _compare(first, second, "then", torch.randn(1, 2, 9, 9, dtype=torch.float64))


def test_pointwise_then_dilated_kernel():
    first = random_conv(ConvGeometry(2, 2, (1, 1), (1, 1), (0, 0), (1, 1), bias=False), 0)
    second = random_conv(ConvGeometry(2, 2, (3, 3), (1, 1), (2, 2), (2, 2)), 1)
    _compare(first, second, "then", torch.randn(1, 2, 9, 9, dtype=torch.float64))


# ----------------------------------------------------------------------------- pads


@given(
    dims=spatial_dims(),
    channels=st.integers(1, 4),
    pad=st.integers(1, 2),
    mode=st.sampled_from(["constant", "reflect", "replicate", "circular"]),
    size=st.integers(3, 6),
    seed=seeds(),
)
def test_a_pad_after_a_pointwise_kernel_is_that_kernel_padded(dims, channels, pad, mode, size, seed):
    """pad(K(x)) = K(pad(x)) for pointwise K; a constant pad by K's bias is a zero pad of x."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(channels, channels, *[1] * dims, generator=generator, dtype=torch.float64)
    bias = torch.randn(channels, generator=generator, dtype=torch.float64)
    kernel = Kernel.conv(weight, bias)
    x = torch.randn(2, channels, *[size] * dims, generator=generator, dtype=torch.float64)
    pads = [pad] * (2 * dims)
    if mode == "constant":  # the border is K's response to zero, channel by channel
        padded = kernel.then_pad((pad,) * dims, mode, bias)
        border = F.pad(torch.zeros_like(x[:, :1]), pads, value=1.0)  # 1 at the border, 0 inside
        expected = F.pad(kernel(x), pads) + border * bias.view(1, -1, *[1] * dims)
    else:
        padded = kernel.then_pad((pad,) * dims, mode)
        expected = F.pad(kernel(x), pads, mode=mode)
    assert_computes(padded, x, expected)


@given(
    geometry=conv_geometries(),
    pad=st.integers(1, 2),
    mode=st.sampled_from(["constant", "reflect", "replicate", "circular"]),
    data=st.data(),
)
def test_a_pad_before_a_conv_is_its_padding(geometry, pad, mode, data):
    conv = random_conv(geometry, data.draw(seeds()))
    kernel = Kernel.from_conv(conv)
    assume(not kernel.transposed and (mode == "constant" and kernel.padding_mode == "zeros" or not any(kernel.padding)))
    sizes = [max(s, pad + 1) for s in geometry.min_input_size()]  # a reflect pad needs more than pad
    x = data.draw(inputs(geometry.in_channels, sizes), label="x")
    with torch.no_grad():
        expected = conv(F.pad(x, [pad] * (2 * geometry.dims), mode=mode))
        assert_computes(kernel.after_pad((pad,) * geometry.dims, mode), x, expected)


@given(
    st.integers(0, 3),
    st.integers(1, 6),
    st.sampled_from([torch.float32, torch.float64]),
    st.integers(0, 2**16),
)
def test_a_per_channel_kernel_as_a_batchnorm_computes_the_same_map(spatial_dims, channels, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    scale = torch.randn(channels, generator=generator).to(dtype).double()  # values the dtype holds exactly
    shift = torch.randn(channels, generator=generator).to(dtype).double()
    kernel = Kernel.affine(scale.to(dtype), shift.to(dtype), spatial_dims)
    bn = kernel.to_batchnorm()
    assert not bn.training and bn.weight.dtype == dtype and isinstance(bn, nn.modules.batchnorm._BatchNorm)
    x = torch.randn(2, channels, *[3] * spatial_dims, generator=generator, dtype=torch.float64)
    expected = x * scale.view(channels, *[1] * spatial_dims) + shift.view(channels, *[1] * spatial_dims)
    with torch.no_grad():
        got = bn.double()(x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_to_batchnorm_refuses_a_kernel_that_mixes_channels_or_positions():
    with pytest.raises(ValueError, match="per-channel"):
        Kernel.conv(torch.randn(4, 4, 1, 1), torch.zeros(4)).to_batchnorm()
    with pytest.raises(ValueError, match="per-channel"):
        Kernel.conv(torch.randn(4, 1, 3, 3), torch.zeros(4), groups=4).to_batchnorm()


@given(
    st.integers(1, 3),
    st.lists(st.integers(0, 2), min_size=2, max_size=2),
    st.sampled_from([1, 2]),
    st.sampled_from([1, 2]),
    st.sampled_from([1, 2]),
    st.integers(0, 2**16),
)
def test_a_crop_before_an_unpadded_conv_is_a_negative_padding_a_larger_kernel_absorbs(
    k, crop, stride, dilation, groups, seed
):
    """conv(x[c:-c]) == after_crop(conv)(x); summed with a kernel large enough, it is one writable conv;
    alone, it is written as the crop, then the conv (`split_crop`)."""
    torch.manual_seed(seed)
    small = Kernel.from_conv(nn.Conv2d(2, 4, (k, k), stride, dilation=dilation, groups=groups).double())
    cropped = small.after_crop(tuple(crop))
    span = dilation * (k - 1) + 1
    x = torch.randn(1, 2, 2 * max(crop) + span + 3, 2 * max(crop) + span + 4, dtype=torch.float64)
    cut = x[:, :, crop[0] : x.shape[2] - crop[0], crop[1] : x.shape[3] - crop[1]]
    torch.testing.assert_close(cropped(x), small(cut), rtol=1e-12, atol=1e-12)
    big = Kernel.from_conv(nn.Conv2d(2, 4, tuple(span + 2 * c for c in crop), stride).double())
    total = big + cropped
    assert min(total.padding) >= 0
    torch.testing.assert_close(total(x), big(x) + small(cut), rtol=1e-12, atol=1e-12)
    total.to_module()  # writable
    if any(crop):
        with pytest.raises(ValueError, match="negative padding"):
            cropped.to_module()
    cut_off, rest = cropped.split_crop()
    assert cut_off == tuple(crop) and rest.padding == (0, 0)
    recut = x[:, :, cut_off[0] : x.shape[2] - cut_off[0], cut_off[1] : x.shape[3] - cut_off[1]]
    torch.testing.assert_close(rest.to_module()(recut), small(cut), rtol=1e-12, atol=1e-12)


def test_a_composed_weight_is_computed_when_first_read_and_its_cost_needs_none_of_it():
    """A depthwise 7x7, a BN and a 1x1 compose to a dense 7x7 that the planner prices from its shape alone."""
    torch.manual_seed(0)
    dw = Kernel.from_conv(nn.Conv2d(6, 6, 7, padding=3, groups=6).double())
    bn = Kernel.affine(torch.rand(12, dtype=torch.float64) + 0.5, torch.randn(12, dtype=torch.float64), 2)
    pw = Kernel.from_conv(nn.Conv2d(6, 12, 1).double())
    composed = dw.then(pw).then(bn)
    assert composed.stored_weight.is_meta and composed.kernel_size == (7, 7) and composed.groups == 1
    assert Cost.of(composed).params == 12 * 6 * 49 + 12 and composed.stored_weight.is_meta
    x = torch.randn(2, 6, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(composed(x), bn(pw(dw(x))), rtol=1e-12, atol=1e-12)
    assert not composed.stored_weight.is_meta
