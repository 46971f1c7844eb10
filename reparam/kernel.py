"""The kernel algebra: convolutions with a bias as values, composed exactly in float64.

A `Kernel` is the affine, translation-equivariant map

    y[o, p] = bias[o] + sum_{c, t} weight[o, c, t] * x[c, stride * p - padding + dilation * t]

(per spatial dimension; channels split into `groups`). Everything structural
re-parameterization removes is such a map: a convolution, an eval-mode BatchNorm, an identity.
Because convolution is linear, two algebraic operations are enough:

* `a.then(b)`: b applied to the output of a is one kernel (sequential composition);
* `a + b`: the sum of two kernels applied to the same input is one kernel (parallel sum),
  after embedding both into a common geometry (1x1, 1xK, Kx1 and dilated kernels into KxK).

Each operation is exact for every input size, borders included, or raises `FusionRefused`
with a `Reason`. Weights are held in float64; `to_module` casts back to the original dtype.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import product
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import FusionRefused, Reason
from .layers import AnyRankBatchNorm
from .module_copy import copy_module

_CONV_CLASSES: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_TRANSPOSED_CLASSES: dict[int, type[nn.Module]] = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BATCHNORM_CLASSES: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@dataclass(frozen=True, eq=False)
class Kernel:
    """An N-d convolution with bias (N = 1, 2 or 3; N = 0 is a linear layer), stored in float64.

    `weight` has shape `(out_channels, in_channels // groups, *kernel_size)`, or for a transposed
    convolution `(in_channels, out_channels // groups, *kernel_size)`; `dtype` is the dtype to
    cast back to. A layer's weight is kept as the layer holds it and converted to float64 the
    first time its values are read (`weight`), and a composed weight (`then`) is computed then:
    most kernels of a graph are never written, and their geometry alone decides that. Build
    kernels with the constructors (`conv`, `from_conv`, `from_batchnorm`, `affine`,
    `identity`); they normalise the geometry so that equal maps have equal geometry (a size-1
    dimension has dilation 1, an unpadded kernel has padding mode "zeros").
    """

    stored_weight: Tensor  # the weight as given (any floating dtype); `weight` is it in float64
    bias: Tensor
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str
    dtype: torch.dtype
    transposed: bool = False
    output_padding: tuple[int, ...] = ()
    dims_known: bool = True  # False for a per-channel map whose input rank is unknown (BatchNorm1d, F.batch_norm)

    # ----------------------------------------------------------------- constructors

    @classmethod
    def conv(
        cls,
        weight: Tensor,
        bias: Tensor | None = None,
        stride: int | tuple[int, ...] = 1,
        padding: int | str | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
    ) -> Kernel:
        """The kernel of `F.convNd(x, weight, bias, stride, padding, dilation, groups)`."""
        dims = weight.dim() - 2
        if dims not in (0, *_CONV_CLASSES):
            raise FusionRefused(Reason.GEOMETRY, f"a {dims}-d convolution is not supported (1d, 2d and 3d are)")
        size = tuple(weight.shape[2:])
        dilation = tuple(d if k > 1 else 1 for d, k in zip(_expand(dilation, dims), size))
        padding = _resolve_padding(padding, size, dilation)
        if bias is None:
            bias = weight.new_zeros(weight.shape[0])
        return cls(
            stored_weight=weight.detach(),
            bias=bias.detach().to(device=weight.device, dtype=torch.float64),
            stride=_expand(stride, dims),
            padding=padding,
            dilation=dilation,
            groups=groups,
            padding_mode=padding_mode if any(padding) else "zeros",
            dtype=weight.dtype,
        )

    @classmethod
    def from_conv(cls, conv: nn.Module) -> Kernel:
        """The kernel of an `nn.Conv1d/2d/3d` or an `nn.ConvTranspose1d/2d/3d`."""
        if isinstance(conv, nn.modules.conv._ConvTransposeNd):
            dims = conv.weight.dim() - 2
            kernel = cls.conv(conv.weight, None, conv.stride, conv.padding, conv.dilation, 1)
            bias = conv.bias if conv.bias is not None else conv.weight.new_zeros(conv.out_channels)
            return replace(
                kernel,
                bias=bias.detach().to(torch.float64),
                groups=conv.groups,
                transposed=True,
                output_padding=_expand(conv.output_padding, dims),
            )
        return cls.conv(
            conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, spatial_dims: int = 0) -> Kernel:
        """The kernel of an `nn.Linear` applied to the channels of `(batch, features, *spatial)`.

        With no spatial dims that is the Linear on `(batch, features)`, a convolution with no
        spatial dims; with some, the 1x..x1 convolution mapping each position's channels.
        """
        return cls.conv(linear.weight.reshape(*linear.weight.shape, *[1] * spatial_dims), linear.bias)

    @classmethod
    def affine(cls, scale: Tensor, shift: Tensor, spatial_dims: int) -> Kernel:
        """The per-channel map `y[c] = scale[c] * x[c] + shift[c]`, as a depthwise 1x..x1 kernel."""
        return cls._per_channel(scale.detach(), shift.detach().to(torch.float64), spatial_dims, scale.dtype, True)

    @classmethod
    def _per_channel(
        cls, scale: Tensor, shift: Tensor, spatial_dims: int, dtype: torch.dtype, dims_known: bool
    ) -> Kernel:
        """`affine` built directly (a BN's kernel is made for every BN of a graph): `shift` is in float64."""
        unit = (1,) * spatial_dims
        return cls(
            stored_weight=scale.reshape(scale.shape[0], 1, *unit),
            bias=shift,
            stride=unit,
            padding=(0,) * spatial_dims,
            dilation=unit,
            groups=scale.shape[0],
            padding_mode="zeros",
            dtype=dtype,
            dims_known=dims_known,
        )

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm, spatial_dims: int | None) -> Kernel:
        """The kernel of an eval-mode BatchNorm: `scale = gamma / sqrt(var + eps)`, `shift = beta - mean * scale`.

        Refused when the BN is in training mode or keeps no running statistics, because then it
        normalizes with the statistics of each batch and is not a fixed affine map.
        """
        if bn.training:
            raise FusionRefused(
                Reason.BN_TRAINING, "this BatchNorm is in training mode; call .eval() on it (or the whole model) first"
            )
        if bn.running_mean is None or bn.running_var is None:
            raise FusionRefused(
                Reason.NO_RUNNING_STATS,
                "this BatchNorm has track_running_stats=False: it normalizes with batch statistics even in eval mode",
            )
        scale = torch.rsqrt(bn.running_var.detach().to(torch.float64) + bn.eps)  # float64 from here on
        if bn.weight is not None:
            scale = scale * bn.weight.detach()
        shift = -bn.running_mean.detach() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.detach()
        return cls._per_channel(scale, shift, spatial_dims or 1, bn.running_var.dtype, spatial_dims is not None)

    @classmethod
    def identity(
        cls,
        channels: int,
        spatial_dims: int,
        *,
        groups: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Kernel:
        """`y = x` on `channels` channels, written with `groups` groups (default: depthwise)."""
        ones = torch.ones(channels, dtype=torch.float64, device=device)
        kernel = replace(cls.affine(ones, torch.zeros_like(ones), spatial_dims), dtype=dtype)
        return kernel.regrouped(groups or channels)

    @classmethod
    def avg_pool(
        cls,
        channels: int,
        spatial_dims: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] | None = None,
        padding: int | tuple[int, ...] = 0,
        divisor: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Kernel:
        """Average pooling that counts padded zeros (`count_include_pad=True`): weights `1 / divisor`.

        The divisor defaults to the window size, as in `nn.AvgPoolNd`; the stride to the window.
        """
        size = _expand(kernel_size, spatial_dims)
        weight = torch.full(
            (channels, 1, *size), 1.0 / (divisor or math.prod(size)), dtype=torch.float64, device=device
        )
        kernel = cls.conv(weight, None, size if stride is None else stride, padding, groups=channels)
        return replace(kernel, dtype=dtype)

    # ------------------------------------------------------------------- properties

    @property
    def weight(self) -> Tensor:
        """The weight in float64 (converted, or composed, once: on first read)."""
        if self.stored_weight.is_meta:
            object.__setattr__(self, "stored_weight", getattr(self.stored_weight, _COMPUTE)())
        if self.stored_weight.dtype != torch.float64:
            object.__setattr__(self, "stored_weight", self.stored_weight.to(torch.float64))
        return self.stored_weight

    @property
    def device(self) -> torch.device:
        return self.bias.device  # the weight's, which may not be computed yet

    @property
    def spatial_dims(self) -> int:
        return self.stored_weight.dim() - 2

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.stored_weight.shape[2:])

    @property
    def out_channels(self) -> int:
        shape = self.stored_weight.shape
        return shape[1] * self.groups if self.transposed else shape[0]

    @property
    def in_channels(self) -> int:
        shape = self.stored_weight.shape
        return shape[0] if self.transposed else shape[1] * self.groups

    @property
    def is_pointwise(self) -> bool:
        """True for a 1x..x1 kernel with stride 1 and no padding: it maps each position on its own."""
        size, stride = self.kernel_size, self.stride
        return (
            not self.transposed and all(k == 1 for k in size) and all(s == 1 for s in stride) and not any(self.padding)
        )

    @property
    def is_channelwise(self) -> bool:
        """True for a per-channel affine map `y[c] = s[c] x[c] + t[c]` (a pointwise depthwise kernel)."""
        return self.is_pointwise and self.is_depthwise

    @property
    def is_depthwise(self) -> bool:
        """True when output channel c reads input channel c only (`groups == in_channels == out_channels`)."""
        return not self.transposed and self.groups == self.in_channels == self.out_channels

    @property
    def output_density(self) -> float:
        """Output positions per input position: 1/stride, or stride for a transposed convolution."""
        positions = math.prod(self.stride)
        return float(positions) if self.transposed else 1.0 / positions

    @property
    def macs_per_input(self) -> float:
        """Multiply-accumulates per input position."""
        return self.stored_weight.numel() * (1 if self.transposed else self.output_density)

    @property
    def params(self) -> int:
        return self.stored_weight.numel() + self.bias.numel()

    # ------------------------------------------------------------------- algebra

    def then(self, after: Kernel) -> Kernel:
        """The single kernel computing `after(self(x))`.

        Taps compose as offsets add: tap `t` of self and tap `u` of after meet at input offset
        `self.dilation * t + self.stride * after.dilation * u`, so the composed kernel has stride
        `self.stride * after.stride` and bias `after.bias + sum(after.weight) @ self.bias`.

        Exact when `after` adds no padding (it only reads outputs self really computed), or when
        self is pointwise and commutes with the padding: always for reflect/replicate/circular
        padding, and for zero padding only if self maps zero to zero (no bias). Otherwise
        `after` would read zeros where the composed kernel reads self's bias: `border not exact`.
        """
        self, after = _same_dims(self, after)
        if self.transposed or after.transposed:
            if self.transposed and after.is_channelwise and self.out_channels == after.in_channels:
                return self._scaled(after)
            raise FusionRefused(
                Reason.GEOMETRY, "a transposed convolution composes only with a per-channel map after it (a BN)"
            )
        if self.out_channels != after.in_channels:
            raise FusionRefused(
                Reason.GEOMETRY, f"{self.out_channels} channels feed a kernel expecting {after.in_channels}"
            )
        if not any(after.padding):
            padding, padding_mode = self.padding, self.padding_mode
        elif self.is_pointwise and (after.padding_mode != "zeros" or not self.bias.any()):
            padding, padding_mode = after.padding, after.padding_mode
        else:
            raise FusionRefused(
                Reason.BORDER_NOT_EXACT,
                f"the second kernel pads its input with {after.padding_mode} by {after.padding}, but the first "
                "kernel's output there would not be what that padding assumes (pad explicitly before the second "
                "kernel with the first one's border value, or fuse only unpadded chains)",
            )
        if after.is_channelwise:
            return self._scaled(after)
        groups, equation, w1, w2 = self._tap_product(after)
        size, dilation, starts, steps = [], [], [], []
        for k1, s1, d1, k2, d2 in zip(self.kernel_size, self.stride, self.dilation, after.kernel_size, after.dilation):
            lattice = math.gcd(d1 if k1 > 1 else 0, s1 * d2 if k2 > 1 else 0) or 1
            size.append((d1 * (k1 - 1) + s1 * d2 * (k2 - 1)) // lattice + 1)
            dilation.append(lattice)
            starts.append(s1 * d2 // lattice)
            steps.append(d1 // lattice if k1 > 1 else 1)  # a single tap needs no spacing
        taps_of_after = after.kernel_size

        def composed() -> Tensor:
            weight = w1.new_zeros(groups, after.out_channels // groups, self.in_channels // groups, *size)
            for taps in product(*(range(k) for k in taps_of_after)):
                window = tuple(
                    slice(start * u, start * u + step * (k1 - 1) + 1, step)
                    for start, step, u, k1 in zip(starts, steps, taps, self.kernel_size)
                )
                weight[(..., *window)] += torch.einsum(equation, w2[(..., *taps)], w1)
            return weight.reshape(after.out_channels, -1, *size)

        grouped = after.weight.view(after.groups, -1, *after.weight.shape[1:])
        bias = after.bias + torch.einsum("gom...,gm->go", grouped, self.bias.view(after.groups, -1)).reshape(-1)
        return Kernel(
            dims_known=self.dims_known or after.dims_known,
            stored_weight=_deferred((after.out_channels, self.in_channels // groups, *size), composed),
            bias=bias,
            stride=tuple(s1 * s2 for s1, s2 in zip(self.stride, after.stride)),
            padding=padding,
            dilation=tuple(dilation),
            groups=groups,
            padding_mode=padding_mode,
            dtype=self.dtype,
        )

    def _tap_product(self, after: Kernel) -> tuple[int, str, Tensor, Tensor]:
        """The groups of `self.then(after)` and how one tap u of after meets all of self's taps.

        With both weights viewed per group g, the product is `P_u[g,o,i] = sum_m W2[g,o,m,u] W1[g,m,i]`
        on `gcd(self.groups, after.groups)` groups. When either side is depthwise, m is tied to o
        or to i and the sum has one term: the product is per channel, without the dense C x C
        weight that regrouping the depthwise side would build (its other terms are exact zeros).
        """
        if after.is_depthwise:  # m is o: P_u[g,o,i] = w2[g,o,u] W1[g,o,i]
            groups, equation, first, second = self.groups, "go,goi...->goi...", self.weight, after.weight.squeeze(1)
        elif self.is_depthwise:  # m is i: P_u[g,o,i] = W2[g,o,i,u] w1[g,i]
            groups, equation, first, second = after.groups, "goi,gi...->goi...", self.weight.squeeze(1), after.weight
        else:
            groups, equation = math.gcd(self.groups, after.groups), "gom,gmi...->goi..."
            first, second = self.regrouped(groups).weight, after.regrouped(groups).weight
        return groups, equation, first.view(groups, -1, *first.shape[1:]), second.view(groups, -1, *second.shape[1:])

    def _scaled(self, after: Kernel) -> Kernel:
        """`self` followed by a per-channel scale s and shift t (a BatchNorm): W' = s W, b' = s b + t."""
        scale = after.weight.reshape(-1)

        def scaled() -> Tensor:
            stored = self.stored_weight
            weight = self.weight.clone() if stored.is_meta else stored.to(torch.float64, copy=True)
            if self.transposed:  # output channels run along dim 1, within each group
                groups, size = self.groups, [1] * self.spatial_dims
                grouped = weight.view(groups, -1, self.out_channels // groups, *self.kernel_size)
                grouped.mul_(scale.view(groups, 1, -1, *size))
            else:
                weight.mul_(scale.view(-1, *[1] * (weight.dim() - 1)))
            return weight

        lazy = self.stored_weight.is_meta  # composed, not computed yet: scale it when it is
        weight = _deferred(tuple(self.stored_weight.shape), scaled) if lazy else scaled()  # one new tensor
        return replace(
            self, stored_weight=weight, bias=self.bias * scale + after.bias, dims_known=self.dims_known or after.dims_known
        )

    def __add__(self, other: Kernel) -> Kernel:
        """The single kernel computing `self(x) + other(x)`: both embedded into a common geometry, then summed.

        Exact when both read the same input with the same stride and their outputs line up pixel
        for pixel (the same centre in every dimension, so 1x1, 1xK, Kx1 and dilated kernels sit
        inside the covering KxK), and their padding modes agree wherever they pad at all.
        """
        if self.out_channels != other.out_channels:
            raise FusionRefused(
                Reason.GEOMETRY, f"branches with {self.out_channels} and {other.out_channels} output channels"
            )
        (a, b), geometry = _common_geometry([self, other])
        if a.transposed and a.groups != b.groups:
            raise FusionRefused(Reason.GEOMETRY, f"transposed branches with {a.groups} and {b.groups} groups")
        groups = math.gcd(a.groups, b.groups)
        padding, size, dilation, padding_mode = geometry
        # one buffer in the common geometry and groups; each branch adds its taps where they fall
        weight = a.weight.new_zeros(a.weight.shape[0], a.weight.shape[1] * a.groups // groups, *size)
        for kernel in (a, b):
            kernel._add_to(weight, groups, padding, dilation)
        return replace(
            a,
            stored_weight=weight,
            bias=a.bias + b.bias,
            padding=padding,
            dilation=dilation,
            groups=groups,
            padding_mode=padding_mode,
            dims_known=a.dims_known or b.dims_known,
        )

    def _add_to(self, weight: Tensor, groups: int, padding: tuple[int, ...], dilation: tuple[int, ...]) -> None:
        """Add this kernel's taps into `weight`, a kernel of the same map's shape in a larger geometry.

        `weight` has `groups` groups (a divisor of self.groups): self's groups fall on the
        diagonal blocks of each of its groups, as in `regrouped`, and its taps where `embedded`
        puts them.
        """
        ratio = self.groups // groups
        if ratio == 1:  # the same groups: the taps fall into the window as they are
            weight[(slice(None),) * 2 + self._window(padding, dilation)] += self.weight
            return
        out_per_group, in_per_group = self.weight.shape[0] // self.groups, self.weight.shape[1]
        blocks = weight.view(groups, ratio, out_per_group, ratio, in_per_group, *weight.shape[2:])
        diagonal = torch.diagonal(blocks, dim1=1, dim2=3)  # (groups, out, in, *taps, ratio)
        window = (slice(None),) * 3 + self._window(padding, dilation)
        grouped = self.weight.view(groups, ratio, out_per_group, in_per_group, *self.kernel_size)
        diagonal[window] += grouped.movedim(1, -1)

    def __neg__(self) -> Kernel:
        """The kernel computing `-self(x)` (exact: negation rounds nothing)."""
        return replace(self, stored_weight=-self.weight, bias=-self.bias)

    def __sub__(self, other: Kernel) -> Kernel:
        """The single kernel computing `self(x) - other(x)`: `self + (-other)`, exact when `+` is."""
        return self + (-other)

    def after_pad(self, padding: tuple[int, ...], mode: str) -> Kernel:
        """The kernel computing `self(pad(x))`, `pad` adding `padding[d]` on both sides of dim d in `mode`.

        Exact when the pads compose into one: zeros around zeros (`padding + self.padding`),
        or any mode before an unpadded kernel. A reflect pad before a zero-padded conv, or a
        zero pad before a reflect-padded one, is two different borders (`padding mode`).
        """
        mode = _CONV_MODE.get(mode, mode)
        if not any(padding):
            return self
        if self.transposed:
            raise FusionRefused(Reason.GEOMETRY, "a pad before a transposed convolution is a crop of its output")
        if any(self.padding) and (mode != "zeros" or self.padding_mode != "zeros"):
            raise FusionRefused(
                Reason.PADDING_MODE,
                f"a {mode} pad before a conv that pads with {self.padding_mode} is not one padding",
            )
        total = tuple(p + q for p, q in zip(padding, self.padding))
        return replace(self, padding=total, padding_mode=mode)

    def after_crop(self, crop: tuple[int, ...]) -> Kernel:
        """The kernel computing `self(x[..., c:-c, ...])`, `crop[d]` positions cut from both sides of dim d.

        Output i then reads `x[stride * i + dilation * t - padding + c]`: a padding of `padding - c`.
        Exact when self does not pad a cropped dim (else it would read zeros where the crop cut
        real values: `border not exact`). The padding it leaves is negative, which no layer can
        be written with; a larger kernel it is summed into absorbs it (`aligned`), as ACNet's
        1x3 and 3x1 branches after their crop become part of one unpadded 3x3.
        """
        if not any(crop):
            return self
        if self.transposed:
            raise FusionRefused(Reason.GEOMETRY, "a crop before a transposed convolution")
        if any(c and p for c, p in zip(crop, self.padding)):
            raise FusionRefused(
                Reason.BORDER_NOT_EXACT,
                f"a crop by {crop} before a conv that pads by {self.padding}: the conv would read its zero "
                "padding where the crop cut real values",
            )
        return replace(self, padding=tuple(p - c for p, c in zip(self.padding, crop)))

    def split_crop(self) -> tuple[tuple[int, ...], Kernel]:
        """`(crop, k)` with `self(x) = k(x[..., c:-c, ...])`, `crop[d]` cut from both sides of dim d.

        A negative padding (`after_crop`) reads `x` from offset `c` on: the crop it stands for,
        then `k`, whose padding is what remains (>= 0), which one layer can be written with.
        """
        crop = tuple(max(0, -p) for p in self.padding)
        padding = tuple(max(0, p) for p in self.padding)
        return crop, replace(self, padding=padding, padding_mode=self.padding_mode if any(padding) else "zeros")

    def then_pad(self, padding: tuple[int, ...], mode: str, value: float | Tensor = 0.0) -> Kernel:
        """The kernel computing `pad(self(x))`: exact when self is pointwise and commutes with the pad.

        A pointwise kernel maps each position on its own, so reflecting, replicating or wrapping
        its output is the same as doing so to its input. A constant pad by `value` (a number,
        or one per output channel) equals a zero pad of the input when self maps zero to
        `value`: its bias is `value` in every channel
        (DBB's BN-and-pad layer pads with its BN's response to zero). Bias and value are
        compared to the rounding of the model's dtype (8 eps of their magnitude, at least
        1e-12): the value is the same number computed in forward by another formula and
        stored in that dtype, and the fused conv's border, the float64 bias, is no further
        from the exact one.
        """
        mode = _CONV_MODE.get(mode, mode)
        if not any(padding):
            return self
        if not self.is_pointwise or not self.dims_known:
            raise FusionRefused(
                Reason.BORDER_NOT_EXACT,
                "only a pointwise kernel (1x1, stride 1, unpadded) commutes with a pad of its output",
            )
        if mode == "zeros":
            value = torch.as_tensor(value, dtype=torch.float64, device=self.bias.device)
            scale = max(1.0, float(value.abs().max()), float(self.bias.abs().max()) if self.bias.numel() else 0.0)
            rounding = max(1e-12, 8 * torch.finfo(self.dtype).eps) if self.dtype.is_floating_point else 1e-12
            if (self.bias - value).abs().max() > rounding * scale:
                raise FusionRefused(
                    Reason.BORDER_NOT_EXACT,
                    f"the pad writes {float(value.min()):g} to {float(value.max()):g} at the border, but the "
                    "kernel before it outputs its bias there "
                    f"(from {float(self.bias.min()):g} to {float(self.bias.max()):g}); pad with the bias "
                    "(DBB's BN-and-pad) or pad before the kernel",
                )
        return replace(self, padding=padding, padding_mode=mode)

    def shifted(self, constant: float) -> Kernel:
        """The kernel computing `self(x) + constant`."""
        return replace(self, bias=self.bias + constant)

    def on_channels(self, start: int, stop: int) -> Kernel:
        """This per-channel map (`is_channelwise`) on channels `start:stop` alone.

        `a(y)[:, start:stop] = a'(y[:, start:stop])`.
        """
        if not self.is_channelwise:
            raise ValueError("on_channels needs a per-channel kernel (pointwise and depthwise)")
        part = Kernel.affine(self.weight.reshape(-1)[start:stop], self.bias[start:stop], self.spatial_dims)
        return replace(part, dtype=self.dtype, dims_known=self.dims_known)

    def regrouped(self, groups: int) -> Kernel:
        """The same map written with `groups` groups (a divisor of self.groups): each new group is block diagonal."""
        if groups == self.groups:
            return self
        if self.groups % groups:
            raise ValueError(f"cannot regroup a kernel with {self.groups} groups into {groups}")
        ratio = self.groups // groups
        out_per_group, in_per_group = self.out_channels // self.groups, self.weight.shape[1]
        grouped = self.weight.view(groups, ratio, out_per_group, in_per_group, *self.kernel_size)
        dense = grouped.new_zeros(groups, ratio, out_per_group, ratio, in_per_group, *self.kernel_size)
        torch.diagonal(dense, dim1=1, dim2=3).copy_(grouped.movedim(1, -1))
        weight = dense.reshape(self.out_channels, ratio * in_per_group, *self.kernel_size)
        return replace(self, stored_weight=weight, groups=groups)

    def embedded(self, padding: tuple[int, ...], kernel_size: tuple[int, ...], dilation: tuple[int, ...]) -> Kernel:
        """The same map on a larger grid of taps: zeros everywhere but where self's taps fall.

        Tap `t` of self reads input offset `dilation * t - padding`; in the new geometry that
        offset is tap `(self.dilation * t - self.padding + padding) / dilation`.
        """
        if (padding, kernel_size, dilation) == (self.padding, self.kernel_size, self.dilation):
            return self
        weight = self.weight.new_zeros(*self.weight.shape[:2], *kernel_size)
        weight[(..., *self._window(padding, dilation))] = self.weight
        return replace(self, stored_weight=weight, padding=padding, dilation=dilation)

    def _window(self, padding: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[slice, ...]:
        """Where self's taps fall in a geometry with `padding` and `dilation` that holds them (see `embedded`)."""
        window = []
        for k, p, d, new_p, new_d in zip(self.kernel_size, self.padding, self.dilation, padding, dilation):
            start, step = (new_p - p) // new_d, d // new_d if k > 1 else 1  # a single tap needs no spacing
            window.append(slice(start, start + step * (k - 1) + 1, step))
        return tuple(window)

    # ------------------------------------------------------------------- use

    def __call__(self, x: Tensor) -> Tensor:
        """Apply the kernel to `x` in float64 (a reference for tests; deployment uses `to_module`)."""
        x = x.to(torch.float64)
        if self.spatial_dims == 0:
            return F.linear(x, self.weight, self.bias)
        if self.transposed:
            transposed = getattr(F, f"conv_transpose{self.spatial_dims}d")
            return transposed(
                x, self.weight, self.bias, self.stride, self.padding, self.output_padding, self.groups, self.dilation
            )
        conv = getattr(F, f"conv{self.spatial_dims}d")
        if any(p < 0 for p in self.padding):  # a crop: cut first, then pad what is left to pad
            cut = tuple(slice(-p, x.shape[2 + d] + p) if p < 0 else slice(None) for d, p in enumerate(self.padding))
            return replace(self, padding=tuple(max(p, 0) for p in self.padding))(x[(..., *cut)])
        padding: tuple[int, ...] | int = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, [p for p in reversed(self.padding) for _ in range(2)], mode=self.padding_mode)
            padding = 0
        return conv(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)

    def to_module(self) -> nn.Module:
        """An `nn.ConvNd` (`nn.ConvTransposeNd`, `nn.Linear`) computing this kernel, in the original dtype."""
        if any(p < 0 for p in self.padding):
            raise ValueError(f"no layer has the negative padding {self.padding} (a crop); see `split_crop`")
        if self.spatial_dims == 0:
            conv = _new_layer(nn.Linear, self.in_channels, self.out_channels)
        elif self.transposed:
            # PyTorch wants output_padding < max(stride, dilation); a size-1 dim's dilation is free to satisfy it
            dilation = tuple(
                d if k > 1 or op < max(s, d) else op + 1
                for k, d, s, op in zip(self.kernel_size, self.dilation, self.stride, self.output_padding)
            )
            conv = _new_layer(
                _TRANSPOSED_CLASSES[self.spatial_dims],
                self.in_channels,
                self.out_channels,
                self.kernel_size,
                stride=self.stride,
                padding=self.padding,
                output_padding=self.output_padding,
                groups=self.groups,
                dilation=dilation,
            )
        else:
            conv = _new_layer(
                _CONV_CLASSES[self.spatial_dims],
                self.in_channels,
                self.out_channels,
                self.kernel_size,
                stride=self.stride,
                padding=self.padding,
                dilation=self.dilation,
                groups=self.groups,
                padding_mode=self.padding_mode,
            )
        weight = self.regrouped(1).weight if self.spatial_dims == 0 else self.weight  # a Linear is dense
        conv.weight = nn.Parameter(self._fresh(weight))
        conv.bias = nn.Parameter(self._fresh(self.bias))
        return conv

    def to_batchnorm(self) -> nn.Module:
        """An eval-mode `nn.BatchNormNd` computing this per-channel kernel (`is_channelwise`), in the original dtype.

        Where the input's rank is unknown (`dims_known` false), an `AnyRankBatchNorm`, which
        takes any rank, as the layers it replaces did.

        `y = (x - 0) / sqrt(1 + 0) * s + t`: weight `s`, bias `t`, running mean 0, variance 1, eps 0.
        One BatchNorm is a single fused kernel in eager, Inductor and ONNX runtimes, and they fold
        it into a neighbouring conv; a depthwise 1x1 conv of the same map is several times slower.
        """
        if not self.is_channelwise:
            raise ValueError("to_batchnorm needs a per-channel kernel (pointwise and depthwise)")
        kind = _BATCHNORM_CLASSES[max(self.spatial_dims, 1)] if self.dims_known else AnyRankBatchNorm
        bn = kind(self.out_channels, eps=0.0, device="meta")
        bn.weight = nn.Parameter(self._fresh(self.weight.reshape(self.out_channels)))
        bn.bias = nn.Parameter(self._fresh(self.bias))
        bn.register_buffer("running_mean", torch.zeros(self.out_channels, dtype=self.dtype, device=self.device))
        bn.register_buffer("running_var", torch.ones(self.out_channels, dtype=self.dtype, device=self.device))
        bn.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long, device=self.device))
        return bn.eval()

    def _fresh(self, values: Tensor) -> Tensor:
        """A new contiguous tensor of `values` in the original dtype (never a view of a layer's own tensor)."""
        return values.to(self.device, self.dtype, copy=True, memory_format=torch.contiguous_format)


_CONV_MODE = {"constant": "zeros"}  # F.pad's name for zero padding, and nn.Conv's


def _new_layer(cls: type[nn.Module], *args: Any, **kwargs: Any) -> nn.Module:
    """A new `cls(*args, **kwargs)` without its `weight` and `bias`, for them to be set: a copy of one made
    before with the same arguments (a constructor initialises its weights, which takes longer even on meta)."""
    return copy_module(_prototype(cls, *args, **kwargs))


@functools.lru_cache(maxsize=256)
def _prototype(cls: type[nn.Module], *args: Any, **kwargs: Any) -> nn.Module:
    layer = cls(*args, device="meta", **kwargs)
    layer.weight = layer.bias = None  # plain values only: copied without deepcopy's memo walk
    return layer


def concatenated(kernels: list[Kernel]) -> Kernel:
    """The single kernel computing `torch.cat([k(x) for k in kernels], dim=1)`: output channels stacked.

    Exact under the same condition as a sum (same input, stride and centre, see `aligned`).
    The stacked kernel has one group: the branches' groups do not interleave.
    """
    if any(k.transposed for k in kernels):
        raise FusionRefused(Reason.GEOMETRY, "concatenated transposed convolutions are not fused")
    parts = [k.regrouped(1) for k in aligned(kernels)]
    return replace(
        parts[0],
        stored_weight=torch.cat([k.weight for k in parts]),
        bias=torch.cat([k.bias for k in parts]),
        dims_known=any(k.dims_known for k in parts),
    )


def aligned(kernels: list[Kernel]) -> list[Kernel]:
    """The kernels embedded into the smallest common geometry that holds all their taps.

    Kernel i reads offsets `-padding_i + dilation_i * t` for t < size_i, so its first and last
    offsets `lo_i, hi_i` fix its output grid. Outputs align pixel for pixel iff strides match and
    `lo_i + hi_i` (twice the centre) is the same for all; the common kernel then spans
    `min lo_i .. max hi_i` on the coarsest lattice holding every tap.
    """
    kernels, (padding, size, dilation, padding_mode) = _common_geometry(kernels)
    return [replace(k.embedded(padding, size, dilation), padding_mode=padding_mode) for k in kernels]


Geometry = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], str]  # padding, size, dilation, padding mode


def _common_geometry(kernels: list[Kernel]) -> tuple[list[Kernel], Geometry]:
    """The kernels with a common number of dims, and the geometry of `aligned`; refused if their outputs do not align."""
    kernels = [_same_dims(kernels[0], k)[1] for k in kernels]
    kernels = [_same_dims(kernels[-1], k)[1] for k in kernels]
    first = kernels[0]
    for other in kernels[1:]:
        if (other.transposed, other.output_padding) != (first.transposed, first.output_padding):
            raise FusionRefused(Reason.GEOMETRY, "a transposed and a plain branch, or different output paddings")
        if other.in_channels != first.in_channels:
            raise FusionRefused(
                Reason.GEOMETRY, f"branches read {first.in_channels} and {other.in_channels} input channels"
            )
        if other.stride != first.stride:
            raise FusionRefused(Reason.STRIDE, f"branches have strides {first.stride} and {other.stride}")
    modes = {k.padding_mode for k in kernels if any(k.padding)}
    if len(modes) > 1:
        raise FusionRefused(Reason.PADDING_MODE, f"branches pad with different modes: {sorted(modes)}")
    padding_mode = modes.pop() if modes else "zeros"
    padding, size, dilation = [], [], []
    for dim in range(first.spatial_dims):
        offsets = [[-k.padding[dim] + k.dilation[dim] * t for t in range(k.kernel_size[dim])] for k in kernels]
        centres = {o[0] + o[-1] for o in offsets}
        if len(centres) > 1:
            raise FusionRefused(
                Reason.MISALIGNED,
                f"in spatial dim {dim} the branches are centred at different offsets "
                f"({sorted(c / 2 for c in centres)}), so their outputs do not line up pixel for pixel",
            )
        low, high = min(o[0] for o in offsets), max(o[-1] for o in offsets)
        lattice = math.gcd(*(t - low for o in offsets for t in o)) or 1
        padding.append(-low)
        size.append((high - low) // lattice + 1)
        dilation.append(lattice)
    return kernels, (tuple(padding), tuple(size), tuple(dilation), padding_mode)


def _same_dims(a: Kernel, b: Kernel) -> tuple[Kernel, Kernel]:
    """`a` and `b` with the same number of spatial dims: a per-channel map fits any number."""
    if a.spatial_dims == b.spatial_dims:
        return a, b
    if b.is_channelwise:
        return a, replace(Kernel.affine(b.weight.reshape(-1), b.bias, a.spatial_dims), dtype=b.dtype, dims_known=False)
    if a.is_channelwise:
        return replace(Kernel.affine(a.weight.reshape(-1), a.bias, b.spatial_dims), dtype=a.dtype, dims_known=False), b
    raise FusionRefused(Reason.GEOMETRY, f"a {a.spatial_dims}-d kernel cannot combine with a {b.spatial_dims}-d kernel")


def _expand(value: int | tuple[int, ...] | list[int], dims: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dims
    return tuple(value) if len(value) == dims else tuple(value) * dims


def _resolve_padding(
    padding: int | str | tuple[int, ...], size: tuple[int, ...], dilation: tuple[int, ...]
) -> tuple[int, ...]:
    if padding == "valid":
        return (0,) * len(size)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(size, dilation)]
        if any(t % 2 for t in total):
            raise FusionRefused(
                Reason.GEOMETRY,
                f"padding='same' with kernel {size} pads asymmetrically, which nn.ConvNd cannot express",
            )
        return tuple(t // 2 for t in total)
    return _expand(padding, len(size))


_COMPUTE = "_reparam_compute"


def _deferred(shape: tuple[int, ...], compute: Callable[[], Tensor]) -> Tensor:
    """A weight of `shape` computed by `compute()` when a `Kernel` first reads its values.

    Composing a chain builds the kernel of every prefix while annotating, and most are never
    written: the planner keeps a depthwise 7x7 and the 1x1 after it apart, priced from their
    shapes alone, where the composed dense 7x7 (1152 x 384 x 7 x 7 in FastViT) took a second to
    build. A meta tensor has the shape without the values; `compute` rides on it.
    """
    weight = torch.empty(shape, dtype=torch.float64, device="meta")
    setattr(weight, _COMPUTE, compute)
    return weight
