"""Shared hypothesis strategies and builders for convolution geometries, BatchNorms and inputs.

Everything numeric is float64 unless asked otherwise, and every random tensor comes from a
seeded `torch.Generator` whose seed hypothesis draws, so a failing example replays exactly.

The pieces, from small to large:

* value strategies: `spatial_dims`, `channels_and_groups`, `kernel_sizes`, `strides`,
  `dilations`, `paddings`, `padding_modes`, `batch_sizes`, `seeds`;
* `ConvGeometry`: the hyper-parameters of one `nn.ConvNd`, with the arithmetic tests need
  (`output_size`, `min_input_size`, `accepts`) and `build(seed, dtype)`;
* `conv_geometries(...)`, `convs(...)`: random geometries / random float64 conv modules;
* `random_conv`, `random_batchnorm`, `batchnorms(...)`: builders with randomized weights and
  randomized BN statistics (default BN statistics are an identity map and hide bugs);
* `inputs(channels, min_sizes)`: random inputs whose spatial sizes start at the minimal size
  for which the layers under test produce at least one output position (odd sizes included);
* `chain_min_input_size`: the smallest input for a sequence of convolutions;
* `parallel_branches(...)`: 2-4 branch geometries (convs and identities) reading the same
  input with the same stride and the same centre, so that their outputs line up pixel for pixel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import nn

CONV_CLASSES: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BATCHNORM_CLASSES: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
PADDING_MODES: tuple[str, ...] = ("zeros", "reflect", "replicate", "circular")
NONZERO_PADDING_MODES: tuple[str, ...] = ("reflect", "replicate", "circular")
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

# Largest kernel size per dimension, by number of spatial dims (3-d kept small for runtime).
MAX_KERNEL = {1: 5, 2: 5, 3: 3}
# How far above the minimal input size a drawn spatial size may go.
MAX_EXTRA_SIZE = {1: 5, 2: 4, 3: 2}


def divisors(n: int) -> list[int]:
    """The positive divisors of n, ascending (so hypothesis shrinks towards 1)."""
    return [d for d in range(1, n + 1) if n % d == 0]


# ----------------------------------------------------------------------------- values


def spatial_dims() -> st.SearchStrategy[int]:
    return st.sampled_from((1, 2, 3))


def seeds() -> st.SearchStrategy[int]:
    return st.integers(0, 2**31 - 1)


def batch_sizes() -> st.SearchStrategy[int]:
    return st.integers(1, 3)


def padding_modes(modes: Sequence[str] = PADDING_MODES) -> st.SearchStrategy[str]:
    return st.sampled_from(tuple(modes))


@st.composite
def channels_and_groups(
    draw: st.DrawFn,
    in_channels: int | None = None,
    out_channels: int | None = None,
    max_groups: int = 4,
    max_per_group: int = 3,
) -> tuple[int, int, int]:
    """`(in_channels, out_channels, groups)` with groups dividing both channel counts.

    Fixed channel counts are respected: groups is then drawn among the common divisors.
    """
    if in_channels is not None and out_channels is not None:
        groups = draw(st.sampled_from(divisors(math.gcd(in_channels, out_channels))))
        return in_channels, out_channels, groups
    if in_channels is not None:
        groups = draw(st.sampled_from(divisors(in_channels)))
        return in_channels, groups * draw(st.integers(1, max_per_group)), groups
    if out_channels is not None:
        groups = draw(st.sampled_from(divisors(out_channels)))
        return groups * draw(st.integers(1, max_per_group)), out_channels, groups
    groups = draw(st.integers(1, max_groups))
    return groups * draw(st.integers(1, max_per_group)), groups * draw(st.integers(1, max_per_group)), groups


def kernel_sizes(dims: int, max_size: int | None = None) -> st.SearchStrategy[tuple[int, ...]]:
    """Per-dimension sizes drawn independently: 1xK, Kx1, even and asymmetric kernels all occur."""
    top = max_size or MAX_KERNEL[dims]
    return st.tuples(*[st.integers(1, top)] * dims)


def strides(dims: int, max_stride: int = 3) -> st.SearchStrategy[tuple[int, ...]]:
    return st.tuples(*[st.integers(1, max_stride)] * dims)


def dilations(dims: int, max_dilation: int = 3) -> st.SearchStrategy[tuple[int, ...]]:
    return st.tuples(*[st.integers(1, max_dilation)] * dims)


def paddings(dims: int, max_padding: int = 3) -> st.SearchStrategy[tuple[int, ...]]:
    return st.tuples(*[st.integers(0, max_padding)] * dims)


# ----------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class ConvGeometry:
    """The hyper-parameters of an `nn.ConvNd` (`padding` may be an int tuple, "same" or "valid")."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int = 1
    padding_mode: str = "zeros"
    bias: bool = True

    @classmethod
    def of(cls, conv: nn.Module) -> ConvGeometry:
        """The geometry of an existing `nn.ConvNd`."""
        return cls(
            conv.in_channels,
            conv.out_channels,
            tuple(conv.kernel_size),
            tuple(conv.stride),
            conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
            tuple(conv.dilation),
            conv.groups,
            conv.padding_mode,
            conv.bias is not None,
        )

    @property
    def dims(self) -> int:
        return len(self.kernel_size)

    @property
    def span(self) -> tuple[int, ...]:
        """`dilation * (kernel_size - 1)` per dimension: the distance between first and last tap."""
        return tuple(d * (k - 1) for k, d in zip(self.kernel_size, self.dilation))

    @property
    def resolved_padding(self) -> tuple[int, ...]:
        if self.padding == "valid":
            return (0,) * self.dims
        if self.padding == "same":
            return tuple(s // 2 for s in self.span)  # only drawn for even spans
        return tuple(self.padding)

    @property
    def is_padded(self) -> bool:
        return any(self.resolved_padding)

    def size_ok(self, dim: int, n: int) -> bool:
        """Whether an input of size n along `dim` is valid: the padding mode accepts it and an output exists."""
        p = self.resolved_padding[dim]
        if n < 1:
            return False
        if p and self.padding_mode == "reflect" and p >= n:
            return False
        if p and self.padding_mode == "circular" and p > n:
            return False
        return n + 2 * p - self.span[dim] >= 1

    def out_size(self, dim: int, n: int) -> int:
        p = self.resolved_padding[dim]
        return (n + 2 * p - self.span[dim] - 1) // self.stride[dim] + 1

    def output_size(self, sizes: Sequence[int]) -> tuple[int, ...]:
        return tuple(self.out_size(dim, n) for dim, n in enumerate(sizes))

    def accepts(self, sizes: Sequence[int]) -> bool:
        return all(self.size_ok(dim, n) for dim, n in enumerate(sizes))

    def min_input_size(self) -> tuple[int, ...]:
        """Per dimension, the smallest input size for which the conv is valid and has one output position."""
        return chain_min_input_size([self])

    def build(self, seed: int, dtype: torch.dtype = torch.float64) -> nn.Module:
        return random_conv(self, seed, dtype)


@dataclass(frozen=True)
class IdentityGeometry:
    """An identity branch `y = x` on `channels` channels, to be written with `groups` groups."""

    channels: int
    dims: int
    groups: int

    @property
    def in_channels(self) -> int:
        return self.channels

    @property
    def out_channels(self) -> int:
        return self.channels

    def min_input_size(self) -> tuple[int, ...]:
        return (1,) * self.dims


def chain_min_input_size(geometries: Sequence[ConvGeometry], limit: int = 512) -> tuple[int, ...]:
    """Per dimension, the smallest input size for which every conv of the chain is valid (each
    feeding the next) and the last one has at least one output position."""
    dims = geometries[0].dims
    result = []
    for dim in range(dims):
        for n in range(1, limit):
            size, ok = n, True
            for geometry in geometries:
                if not geometry.size_ok(dim, size):
                    ok = False
                    break
                size = geometry.out_size(dim, size)
            if ok:
                result.append(n)
                break
        else:  # pragma: no cover - strategies never draw such chains
            raise ValueError(f"no input size up to {limit} fits the chain in dim {dim}")
    return tuple(result)


@st.composite
def conv_geometries(
    draw: st.DrawFn,
    dims: int | None = None,
    in_channels: int | None = None,
    out_channels: int | None = None,
    groups: int | None = None,
    modes: Sequence[str] = PADDING_MODES,
    padded: bool | None = None,
    pointwise: bool = False,
    allow_same: bool = True,
    bias: bool | None = None,
    max_kernel: int | None = None,
    max_stride: int = 3,
    max_dilation: int = 3,
    max_padding: int = 3,
) -> ConvGeometry:
    """A random conv geometry.

    `padded`: None for anything, True for at least one padded dimension, False for no padding.
    `pointwise`: a 1x..x1 kernel with stride 1 and no padding (the dilation is drawn anyway,
    since nn.ConvNd accepts it and it must not matter).
    `modes`: the padding modes to draw from.
    """
    dims = dims or draw(spatial_dims())
    if groups is None:
        in_channels, out_channels, groups = draw(channels_and_groups(in_channels, out_channels))
    else:
        if in_channels is None:
            in_channels = groups * draw(st.integers(1, 3))
        if out_channels is None:
            out_channels = groups * draw(st.integers(1, 3))
    if pointwise:
        size, stride, padding = (1,) * dims, (1,) * dims, (0,) * dims
        dilation = draw(dilations(dims, max_dilation))
    else:
        choices = ["ints"] if padded is True else ["ints", "ints", "valid"] if padded is None else ["valid"]
        if allow_same and padded is not False:
            choices.append("same")
        kind = draw(st.sampled_from(choices))
        size = draw(kernel_sizes(dims, max_kernel))
        stride = draw(strides(dims, max_stride)) if kind != "same" else (1,) * dims
        dilation = draw(dilations(dims, max_dilation))
        if kind == "same":  # nn.ConvNd needs stride 1; Kernel refuses odd spans (tested in test_refusals)
            size = tuple(k + 1 if d % 2 and k % 2 == 0 else k for k, d in zip(size, dilation))
            if padded is True and not any(k > 1 for k in size):
                size = (3,) + size[1:]
            padding = "same"
        elif kind == "ints":
            padding = draw(paddings(dims, max_padding))
            if padded is True and not any(padding):
                dim = draw(st.integers(0, dims - 1))
                padding = tuple(1 if i == dim else 0 for i in range(dims))
        else:
            padding = draw(st.sampled_from(["valid", (0,) * dims]))
    mode = draw(padding_modes(modes))
    has_bias = draw(st.booleans()) if bias is None else bias
    return ConvGeometry(in_channels, out_channels, size, stride, padding, dilation, groups, mode, has_bias)


def random_conv(geometry: ConvGeometry, seed: int, dtype: torch.dtype = torch.float64) -> nn.Module:
    """An `nn.ConvNd` of the given geometry with standard-normal weights and bias, cast to dtype."""
    generator = torch.Generator().manual_seed(seed)
    conv = CONV_CLASSES[geometry.dims](
        geometry.in_channels,
        geometry.out_channels,
        geometry.kernel_size,
        stride=geometry.stride,
        padding=geometry.padding,
        dilation=geometry.dilation,
        groups=geometry.groups,
        bias=geometry.bias,
        padding_mode=geometry.padding_mode,
        dtype=torch.float64,
    )
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator, dtype=torch.float64))
        if conv.bias is not None:
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator, dtype=torch.float64))
    return conv.to(dtype).eval()


@st.composite
def convs(draw: st.DrawFn, dtype: torch.dtype = torch.float64, **geometry_kwargs) -> nn.Module:
    """A random conv module; keyword arguments go to `conv_geometries`. `ConvGeometry.of(conv)` recovers it."""
    return random_conv(draw(conv_geometries(**geometry_kwargs)), draw(seeds()), dtype)


def random_batchnorm(
    num_features: int,
    dims: int,
    seed: int,
    affine: bool = True,
    eps: float = 1e-5,
    dtype: torch.dtype = torch.float64,
) -> nn.Module:
    """An eval-mode BatchNorm{1,2,3}d with random running mean, positive running variance
    (log-normal, roughly 0.05 to 20) and, if affine, random weight and bias."""
    generator = torch.Generator().manual_seed(seed)
    bn = BATCHNORM_CLASSES[dims](num_features, eps=eps, affine=affine, dtype=torch.float64)

    def randn() -> torch.Tensor:
        return torch.randn(num_features, generator=generator, dtype=torch.float64)

    with torch.no_grad():
        bn.running_mean.copy_(randn())
        bn.running_var.copy_(randn().exp())
        if affine:
            bn.weight.copy_(randn())
            bn.bias.copy_(randn())
    return bn.to(dtype).eval()


@st.composite
def batchnorms(
    draw: st.DrawFn, num_features: int, dims: int, affine: bool | None = None, dtype: torch.dtype = torch.float64
) -> nn.Module:
    """A random eval-mode BatchNorm with randomized statistics, affine or not, with a random eps."""
    return random_batchnorm(
        num_features,
        dims,
        draw(seeds()),
        affine=draw(st.booleans()) if affine is None else affine,
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        dtype=dtype,
    )


@st.composite
def spatial_sizes(draw: st.DrawFn, min_sizes: Sequence[int], max_extra: int | None = None) -> tuple[int, ...]:
    """Per dimension, the minimal size plus 0..max_extra (shrinks to the minimal size; odd and even both drawn)."""
    extra = MAX_EXTRA_SIZE[len(min_sizes)] if max_extra is None else max_extra
    return tuple(n + draw(st.integers(0, extra)) for n in min_sizes)


@st.composite
def inputs(
    draw: st.DrawFn,
    channels: int,
    min_sizes: Sequence[int],
    max_extra: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """A standard-normal input `(batch, channels, *sizes)` with batch 1-3 and sizes from `spatial_sizes`."""
    batch = draw(batch_sizes())
    sizes = draw(spatial_sizes(min_sizes, max_extra))
    generator = torch.Generator().manual_seed(draw(seeds()))
    return torch.randn(batch, channels, *sizes, generator=generator, dtype=torch.float64).to(dtype)


# ----------------------------------------------------------------------------- parallel branches


@dataclass(frozen=True)
class ParallelBranches:
    """Branches reading the same `in_channels`-channel input and producing `out_channels` channels
    with the same stride and the same centre. `centre` is twice the centre offset per dimension
    (`-2 * padding + dilation * (kernel_size - 1)`, equal for every branch)."""

    in_channels: int
    out_channels: int
    dims: int
    stride: tuple[int, ...]
    centre: tuple[int, ...]
    padding_mode: str
    branches: tuple[ConvGeometry | IdentityGeometry, ...]

    def min_input_size(self) -> tuple[int, ...]:
        return tuple(max(sizes) for sizes in zip(*(b.min_input_size() for b in self.branches)))

    @property
    def groups(self) -> int:
        """The gcd of the branch groups: what the summed kernel should be written with."""
        return math.gcd(*(b.groups for b in self.branches))


@st.composite
def parallel_branches(
    draw: st.DrawFn,
    dims: int | None = None,
    min_branches: int = 2,
    max_branches: int = 4,
    modes: Sequence[str] = PADDING_MODES,
    identity: bool | None = None,
) -> ParallelBranches:
    """2-4 aligned branches. Per dimension a common stride s, a parity e (0 or 1) and an offset
    c >= 0 are drawn; each branch draws a kernel size k and dilation d with d * (k - 1) of parity
    e and pads by p = (d * (k - 1) - e) / 2 + c, so that every branch has centre e / 2 - c.
    e = 1 gives even kernels; c > 0 gives outputs larger than the input.

    Identity branches (drawn when `identity` is not False and possible: same channels, e = 0,
    c = 0 and stride 1 in every dimension) carry a random number of groups dividing the channels.
    Padded branches share one padding mode; unpadded ones carry any mode (it must not matter).
    """
    dims = dims or draw(spatial_dims())
    count = draw(st.integers(min_branches, max_branches))
    may_identity = draw(st.booleans()) if identity is None else identity
    if may_identity:
        stride, parity, offset = (1,) * dims, (0,) * dims, (0,) * dims
        channels = draw(st.integers(1, 6))
        in_channels = out_channels = channels
    else:
        stride = draw(strides(dims))
        parity = tuple(draw(st.sampled_from([0, 1])) for _ in range(dims))
        offset = tuple(draw(st.integers(0, 2)) for _ in range(dims))
        in_channels, out_channels, _ = draw(channels_and_groups(max_groups=4, max_per_group=2))
    mode = draw(padding_modes(modes))
    top = MAX_KERNEL[dims]
    branches: list[ConvGeometry | IdentityGeometry] = []
    for index in range(count):
        if may_identity and (index == 0 or draw(st.integers(0, 3)) == 0):
            branches.append(IdentityGeometry(in_channels, dims, draw(st.sampled_from(divisors(in_channels)))))
            continue
        size, dilation, padding = [], [], []
        for dim in range(dims):
            if parity[dim]:  # an odd span: even kernel, odd dilation
                k = draw(st.sampled_from([2, 4] if top >= 4 else [2]))
                d = draw(st.sampled_from([1, 3]))
            else:
                k, d = draw(st.integers(1, top)), draw(st.integers(1, 3))
                if k % 2 == 0 and d % 2:  # make the span even
                    k = k - 1 if k == top else k + 1
            span = d * (k - 1)
            size.append(k)
            dilation.append(d)
            padding.append((span - parity[dim]) // 2 + offset[dim])
        groups = draw(st.sampled_from(divisors(math.gcd(in_channels, out_channels))))
        branch_mode = mode if any(padding) else draw(padding_modes(modes))
        branches.append(
            ConvGeometry(
                in_channels,
                out_channels,
                tuple(size),
                stride,
                tuple(padding),
                tuple(dilation),
                groups,
                branch_mode,
                draw(st.booleans()),
            )
        )
    centre = tuple(parity[dim] - 2 * offset[dim] for dim in range(dims))
    return ParallelBranches(in_channels, out_channels, dims, stride, centre, mode, tuple(branches))
