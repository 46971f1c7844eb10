"""Every refusal of the kernel algebra raises `FusionRefused` with the exact `Reason`.

Each case is given once as a minimal example and, where the refusal depends on geometry, once
as a hypothesis property over random geometries that must all be refused for that reason.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

from reparam.errors import FusionRefused, Reason, ReparamError
from reparam.kernel import Kernel, aligned
from tests.strategies import (
    BATCHNORM_CLASSES,
    CONV_CLASSES,
    PADDING_MODES,
    ConvGeometry,
    batchnorms,
    conv_geometries,
    convs,
    random_batchnorm,
    random_conv,
    seeds,
    spatial_dims,
)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@contextmanager
def refused(reason: Reason):
    with pytest.raises(FusionRefused) as info:
        yield info
    error = info.value
    assert error.reason is reason, f"refused for {error.reason.name} ({error}), expected {reason.name}"
    assert isinstance(error, ReparamError)
    assert str(error).startswith(f"{reason.value}: ") and error.message


def conv(in_channels: int, out_channels: int, kernel_size: tuple[int, ...], **kwargs) -> Kernel:
    """The kernel of a random float64 nn.Conv{1,2,3}d (picked by the length of kernel_size)."""
    module = CONV_CLASSES[len(kernel_size)](in_channels, out_channels, kernel_size, **kwargs, dtype=torch.float64)
    with torch.no_grad():
        module.weight.normal_()
        if module.bias is not None:
            module.bias.normal_()
    return Kernel.from_conv(module)


# ----------------------------------------------------------------------------- BatchNorm


@given(spatial_dims(), st.integers(1, 6), st.booleans(), st.booleans(), seeds())
def test_batchnorm_in_training_mode(dims, channels, affine, track, seed):
    bn = random_batchnorm(channels, dims, seed, affine=affine)
    if not track:
        bn = BATCHNORM_CLASSES[dims](channels, affine=affine, track_running_stats=False)
    bn.train()
    with refused(Reason.BN_TRAINING):
        Kernel.from_batchnorm(bn, dims)


@given(spatial_dims(), st.integers(1, 6), st.booleans())
def test_batchnorm_without_running_stats(dims, channels, affine):
    bn = BATCHNORM_CLASSES[dims](channels, affine=affine, track_running_stats=False).eval()
    with refused(Reason.NO_RUNNING_STATS):
        Kernel.from_batchnorm(bn, dims)


def test_eval_batchnorm_is_accepted():
    """The control for the two refusals above: the same BN in eval mode with statistics fuses."""
    bn = random_batchnorm(3, 2, seed=0)
    assert not bn.training
    kernel = Kernel.from_batchnorm(bn, 2)
    assert kernel.is_channelwise and kernel.out_channels == 3


# ----------------------------------------------------------------------------- sums


def test_sum_with_different_strides():
    with refused(Reason.STRIDE):
        conv(4, 4, (3, 3), stride=2, padding=1) + conv(4, 4, (1, 1), stride=1)
    with refused(Reason.STRIDE):
        aligned([conv(4, 4, (3, 3), stride=(1, 2), padding=1), conv(4, 4, (3, 3), stride=(1, 1), padding=1)])


@given(st.data())
def test_sum_with_different_strides_property(data):
    first = data.draw(conv_geometries(), label="first")
    second = data.draw(
        conv_geometries(dims=first.dims, in_channels=first.in_channels, out_channels=first.out_channels),
        label="second",
    )
    assume(first.stride != second.stride)
    a, b = (Kernel.from_conv(random_conv(g, 0)) for g in (first, second))
    with refused(Reason.STRIDE):
        a + b


def test_sum_whose_centres_differ():
    # 3x3 pad 1 is centred on each input pixel, 3x3 pad 0 one pixel down-right: the outputs have
    # different sizes (n and n - 2) and would be summed shifted by one pixel.
    with refused(Reason.MISALIGNED):
        conv(4, 4, (3, 3), padding=1) + conv(4, 4, (3, 3), padding=0)
    # even kernels: taps at offsets (0, 1) vs (-1, 0) in the last dimension (n - 1 vs n + 1 outputs)
    with refused(Reason.MISALIGNED):
        conv(4, 4, (1, 2), padding=(0, 0)) + conv(4, 4, (1, 2), padding=(0, 1))
    # centres differing in a single dimension of three
    with refused(Reason.MISALIGNED):
        conv(2, 2, (3, 3, 3), padding=1) + conv(2, 2, (1, 1, 3), padding=(0, 1, 0))
    # a 1x1 with padding 1 outputs n + 2 positions; the 3x3 with padding 1 outputs n
    with refused(Reason.MISALIGNED):
        conv(2, 2, (1, 1), padding=1) + conv(2, 2, (3, 3), padding=1)
    # an identity beside an unpadded 3x3
    with refused(Reason.MISALIGNED):
        Kernel.identity(2, 2, dtype=torch.float64) + conv(2, 2, (3, 3))


@given(st.data())
def test_sum_whose_centres_differ_property(data):
    """Same input, same stride, same padding mode, but `-2 * padding + dilation * (k - 1)` differs
    in some dimension: the output grids do not coincide (they differ in size or are shifted)."""
    first = data.draw(conv_geometries(modes=("zeros",), max_stride=1), label="first")
    second = data.draw(
        conv_geometries(
            dims=first.dims,
            in_channels=first.in_channels,
            out_channels=first.out_channels,
            modes=("zeros",),
            max_stride=1,
        ),
        label="second",
    )

    def centre(g: ConvGeometry) -> tuple[int, ...]:
        return tuple(-2 * p + s for p, s in zip(g.resolved_padding, g.span))

    assume(centre(first) != centre(second))
    a, b = (Kernel.from_conv(random_conv(g, 0)) for g in (first, second))
    with refused(Reason.MISALIGNED):
        a + b
    with refused(Reason.MISALIGNED):
        aligned([a, b])


def test_sum_with_different_padding_modes():
    with refused(Reason.PADDING_MODE):
        conv(4, 4, (3, 3), padding=1) + conv(4, 4, (3, 3), padding=1, padding_mode="reflect")
    with refused(Reason.PADDING_MODE):
        conv(4, 4, (3, 1), padding=(1, 0), padding_mode="replicate") + conv(
            4, 4, (1, 3), padding=(0, 1), padding_mode="circular"
        )
    # the mode of an unpadded branch does not matter: this is accepted
    total = conv(4, 4, (3, 3), padding=1, padding_mode="reflect") + conv(4, 4, (1, 1), padding_mode="circular")
    assert total.padding_mode == "reflect"


@given(st.data())
def test_sum_with_different_padding_modes_property(data):
    modes = data.draw(st.lists(st.sampled_from(PADDING_MODES), min_size=2, max_size=2, unique=True), label="modes")
    first = data.draw(conv_geometries(padded=True, modes=modes[:1]), label="first")
    second = data.draw(
        conv_geometries(
            dims=first.dims,
            in_channels=first.in_channels,
            out_channels=first.out_channels,
            padded=True,
            modes=modes[1:],
        ),
        label="second",
    )
    assume(first.stride == second.stride)
    a, b = (Kernel.from_conv(random_conv(g, 0)) for g in (first, second))
    with refused(Reason.PADDING_MODE):
        a + b


def test_sum_with_different_spatial_dims_or_channels():
    with refused(Reason.GEOMETRY):
        conv(4, 4, (3,), padding=1) + conv(4, 4, (3, 3), padding=1)
    with refused(Reason.GEOMETRY):
        conv(4, 4, (3, 3), padding=1) + conv(4, 4, (3, 3, 3), padding=1)
    with refused(Reason.GEOMETRY):  # different input channels
        conv(4, 4, (3, 3), padding=1) + conv(2, 4, (3, 3), padding=1)
    with refused(Reason.GEOMETRY):  # different output channels
        conv(4, 4, (3, 3), padding=1) + conv(4, 8, (3, 3), padding=1)
    with refused(Reason.GEOMETRY):
        Kernel.identity(4, 2) + conv(4, 2, (1, 1))
    with refused(Reason.GEOMETRY):
        aligned([conv(4, 4, (3, 3), padding=1), conv(3, 4, (3, 3), padding=1)])
    with refused(Reason.GEOMETRY):
        aligned([conv(4, 4, (3, 3), padding=1), conv(4, 4, (3, 3, 3), padding=1)])


@given(st.data())
def test_sum_with_different_geometry_property(data):
    first = data.draw(convs(), label="first")
    what = data.draw(st.sampled_from(["dims", "in", "out"]), label="differs in")
    dims = first.weight.dim() - 2
    if what == "dims":
        other_dims = data.draw(st.sampled_from([d for d in (1, 2, 3) if d != dims]), label="other dims")
        second = data.draw(convs(dims=other_dims), label="second")
        # a per-channel map (depthwise 1x..x1, stride 1) is accepted beside any number of dims
        assume(not Kernel.from_conv(first).is_channelwise and not Kernel.from_conv(second).is_channelwise)
    elif what == "in":
        second = data.draw(convs(dims=dims, out_channels=first.out_channels), label="second")
        assume(second.in_channels != first.in_channels)
    else:
        second = data.draw(convs(dims=dims, in_channels=first.in_channels), label="second")
        assume(second.out_channels != first.out_channels)
    with refused(Reason.GEOMETRY):
        Kernel.from_conv(first) + Kernel.from_conv(second)


# ----------------------------------------------------------------------------- then


def test_then_with_different_spatial_dims_or_channels():
    with refused(Reason.GEOMETRY):
        conv(4, 4, (1,)).then(conv(4, 4, (3, 3)))
    with refused(Reason.GEOMETRY):
        conv(4, 4, (3, 3)).then(conv(2, 4, (3, 3)))
    with refused(Reason.GEOMETRY):
        conv(4, 6, (3, 3), groups=2).then(Kernel.from_batchnorm(random_batchnorm(4, 2, seed=0), 2))


def test_biased_pointwise_then_zero_padded_kernel():
    # the 3x3 reads zeros outside its input, but the fused kernel would read the 1x1's bias there
    with refused(Reason.BORDER_NOT_EXACT):
        conv(4, 4, (1, 1), bias=True).then(conv(4, 4, (3, 3), padding=1))
    # the classic case: a BN (a pointwise map with a shift) before a zero-padded conv
    bn = Kernel.from_batchnorm(random_batchnorm(4, 2, seed=0), 2)
    with refused(Reason.BORDER_NOT_EXACT):
        bn.then(conv(4, 4, (3, 3), padding=1))
    # the controls: bias-free, or a copying padding mode, are exact and accepted
    conv(4, 4, (1, 1), bias=False).then(conv(4, 4, (3, 3), padding=1))
    conv(4, 4, (1, 1), bias=True).then(conv(4, 4, (3, 3), padding=1, padding_mode="replicate"))


def test_non_pointwise_then_padded_kernel():
    with refused(Reason.BORDER_NOT_EXACT):  # 3x3 then a padded 3x3, even bias-free
        conv(4, 4, (3, 3), padding=1, bias=False).then(conv(4, 4, (3, 3), padding=1, bias=False))
    with refused(Reason.BORDER_NOT_EXACT):  # strided 1x1: not pointwise
        conv(4, 4, (1, 1), stride=2, bias=False).then(conv(4, 4, (3, 3), padding=1))
    with refused(Reason.BORDER_NOT_EXACT):  # reflect padding does not commute with a 3x3 either
        conv(4, 4, (3, 3), padding=1).then(conv(4, 4, (3, 3), padding=1, padding_mode="reflect"))
    with refused(Reason.BORDER_NOT_EXACT):  # a padded 1x1 is not pointwise
        conv(4, 4, (1, 1), padding=1, bias=False).then(conv(4, 4, (3, 3), padding=1))


@given(st.data())
def test_biased_pointwise_then_zero_padded_kernel_property(data):
    dims = data.draw(spatial_dims(), label="dims")
    first = data.draw(convs(dims=dims, pointwise=True, bias=True), label="a")
    second = data.draw(convs(dims=dims, in_channels=first.out_channels, padded=True, modes=("zeros",)), label="b")
    with refused(Reason.BORDER_NOT_EXACT):
        Kernel.from_conv(first).then(Kernel.from_conv(second))


@given(st.data())
def test_non_pointwise_then_padded_kernel_property(data):
    first = data.draw(convs(), label="a")
    kernel = Kernel.from_conv(first)
    assume(not kernel.is_pointwise)
    second = data.draw(convs(dims=kernel.spatial_dims, in_channels=first.out_channels, padded=True), label="b")
    with refused(Reason.BORDER_NOT_EXACT):
        kernel.then(Kernel.from_conv(second))


# ----------------------------------------------------------------------------- construction


@pytest.mark.parametrize(
    "dims, kernel_size, dilation",
    [
        (2, 4, 1),
        (2, (3, 2), 1),
        (1, 2, 1),
        (1, 2, 3),
        (3, (3, 3, 4), 1),
        (2, (2, 3), (1, 2)),
    ],
)
def test_same_padding_with_an_odd_span(dims, kernel_size, dilation):
    """`padding='same'` with `dilation * (k - 1)` odd pads one side more: no symmetric padding exists."""
    module = CONV_CLASSES[dims](2, 2, kernel_size, padding="same", dilation=dilation)
    with refused(Reason.GEOMETRY):
        Kernel.from_conv(module)
    with refused(Reason.GEOMETRY):
        Kernel.conv(module.weight, module.bias, padding="same", dilation=dilation)


@pytest.mark.parametrize("dims, kernel_size, dilation", [(2, 4, 2), (1, 2, 2), (2, (3, 3), 1)])
def test_same_padding_with_an_even_span_is_accepted(dims, kernel_size, dilation):
    """The control: an even kernel with an even dilation has an even span and a symmetric padding."""
    module = CONV_CLASSES[dims](2, 2, kernel_size, padding="same", dilation=dilation, dtype=torch.float64)
    kernel = Kernel.from_conv(module)
    x = torch.randn(1, 2, *[7] * dims, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(kernel(x), module(x), rtol=1e-12, atol=1e-12)


def test_unsupported_number_of_spatial_dims():
    with refused(Reason.GEOMETRY):
        Kernel.conv(torch.randn(2, 2, 3, 3, 3, 3))
    with refused(Reason.GEOMETRY):
        Kernel.conv(torch.randn(2, 2, 1, 1, 1, 1, 1))


@given(st.data())
def test_regrouping_into_a_non_divisor_is_an_error(data):
    """Not a fusion refusal (regrouped is internal plumbing), but it must not silently mis-group."""
    first = data.draw(convs(groups=data.draw(st.sampled_from([2, 3, 4]), label="groups")), label="conv")
    kernel = Kernel.from_conv(first)
    bad = data.draw(st.integers(2, 12).filter(lambda g: kernel.groups % g), label="new groups")
    with pytest.raises(ValueError):
        kernel.regrouped(bad)


def test_conv_then_training_batchnorm():
    """A conv -> BN chain is refused because of the BN alone."""
    module = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)).double()
    module.train()
    with refused(Reason.BN_TRAINING):
        Kernel.from_conv(module[0]).then(Kernel.from_batchnorm(module[1], 2))


def test_batchnorms_strategy_is_eval_and_randomized():
    """Guard the shared strategy: default BN statistics (mean 0, var 1, weight 1, bias 0) hide bugs."""

    @given(batchnorms(5, 2, affine=True))
    def check(bn):
        assert not bn.training
        assert bn.running_var.min() > 0
        assert not torch.equal(bn.running_mean, torch.zeros(5, dtype=torch.float64))
        assert not torch.equal(bn.running_var, torch.ones(5, dtype=torch.float64))
        assert not torch.equal(bn.weight, torch.ones(5, dtype=torch.float64))

    check()
