"""The aten spellings of transforms I, II, IV and V: graphs from `torch.export`.

`torch.export.export(model)` records a model as calls of aten operators, with parameters and
buffers as attributes (`ep.module()`), so the same algebra applies once the rules know the
operators' argument orders:

* I/VI  `aten.conv1d/conv2d/conv3d.default(x, weight, bias, stride, padding, dilation, groups)`,
  `aten.conv_transpose2d.input(x, weight, bias, stride, padding, output_padding, groups,
  dilation)` and `aten.convolution.default(x, weight, bias, stride, padding, dilation,
  transposed, output_padding, groups)` are (transposed) convolutions, `aten.linear.default`
  one with no spatial dims (on `(batch, features)` inputs only, as `nn.Linear`);
* I     `aten.batch_norm.default(x, weight, bias, running_mean, running_var, training, ...)` and,
  after `ep.run_decompositions()`, `getitem(aten._native_batch_norm_legit_no_training.default(x,
  weight, bias, running_mean, running_var, momentum, eps), 0)` are eval-mode BatchNorms;
* II    `aten.add.Tensor(a, b)` / `aten.sub.Tensor(a, b)` sum two branches (`alpha` scales the
  second); with a constant (a number or a per-channel tensor) they shift a region, and
  `aten.mul` / `aten.div` by one scale it (see scale.py);
* IV    `aten.cat.default([...], 1)` concatenates branches;
* V     `aten.avg_pool1d/2d/3d.default` are depthwise convs, of a region or of a tensor no region computes.

These rules are written with the public rule API (`LinearLayer`, `PatternRule`, and `Cat`
subclassed for aten's target) and do not depend on where the graph came from: a torch.fx trace of a model calling
`torch.ops.aten.conv2d.default` directly fuses the same way. The exactness conditions are
those of the transforms they spell.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
from torch.fx import Node

from ..errors import FusionRefused, Reason
from ..kernel import Kernel
from ..patterns import AnyOf, Call, Cat, Const, Linear, Match, Var
from ..rules import LinearLayer, PatternRule
from .avg_pool import check_fixed, pool_kernel
from .concat import concat
from .functional import batch_norm_kernel
from .scale import affine_like, alpha_factor, per_channel, times

aten = torch.ops.aten
x = Var("x")


# ---------------------------------------------------------------- I / VI: convolutions


def conv_kernel(weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> Kernel:
    """`aten.conv{1,2,3}d.default` (and the `.padding` overload, whose padding is a string)."""
    return Kernel.conv(weight, bias, stride, padding, dilation, groups)


def convolution_kernel(
    weight, bias, stride, padding, dilation, transposed=False, output_padding=(0,), groups=1
) -> Kernel:
    """`aten.convolution.default`, the decomposed form every conv (transposed or not) lowers to."""
    if transposed:
        return transposed_kernel(weight, bias, stride, padding, output_padding, groups, dilation)
    return Kernel.conv(weight, bias, stride, padding, dilation, groups)


def transposed_kernel(weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1) -> Kernel:
    """`aten.conv_transpose{1,2,3}d.input`: built as `Kernel.from_conv` builds an `nn.ConvTransposeNd`'s."""
    dims = weight.dim() - 2
    if isinstance(padding, str):
        raise FusionRefused(Reason.GEOMETRY, f"a transposed convolution with padding={padding!r}")
    kernel = Kernel.conv(weight, None, stride, padding, dilation, 1)
    bias = bias if bias is not None else weight.new_zeros(weight.shape[1] * groups)
    return dataclasses.replace(
        kernel,
        bias=bias.detach().to(torch.float64),
        groups=groups,
        transposed=True,
        output_padding=_per_dim(output_padding, dims),
    )


def _per_dim(value: int | list[int] | tuple[int, ...], dims: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dims
    return tuple(value) * dims if len(value) == 1 else tuple(value)


def linear_kernel(weight, bias=None) -> Kernel:
    """`aten.linear.default` on `(batch, features)`: a convolution with no spatial dims."""
    return Kernel.conv(weight, bias)


_CONV_OPS = tuple(
    getattr(op, overload)
    for op in (aten.conv1d, aten.conv2d, aten.conv3d)
    for overload in ("default", "padding")
    if hasattr(op, overload)
)
CONV = LinearLayer("aten_conv", _CONV_OPS, conv_kernel)
CONVOLUTION = LinearLayer("aten_convolution", (aten.convolution.default,), convolution_kernel)
TRANSPOSED_CONV = LinearLayer(
    "aten_transposed_conv",
    (aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input),
    transposed_kernel,
)
# like nn.Linear, exact only where the input is (batch, features); the engine checks the rank
LINEAR = LinearLayer("aten_linear", (aten.linear.default,), linear_kernel, features_last=True)


# ---------------------------------------------------------------- I: BatchNorm


def aten_batch_norm_kernel(
    weight, bias, running_mean, running_var, training=False, momentum=0.1, eps=1e-5, cudnn_enabled=True
) -> Kernel:
    """`aten.batch_norm.default`: weight and bias come before the running statistics."""
    return batch_norm_kernel(running_mean, running_var, weight, bias, training, momentum, eps)


BATCH_NORM = LinearLayer("aten_batch_norm", (aten.batch_norm.default,), aten_batch_norm_kernel)

_NATIVE_BN = aten._native_batch_norm_legit_no_training.default


def native_batch_norm(m: Match) -> Kernel:
    """`getitem(_native_batch_norm_legit_no_training(x, w, b, mean, var, momentum, eps), 0)` of a region of x."""
    return m.kernel("input").then(_native_bn_kernel(m))


def native_batch_norm_of_input(m: Match) -> Kernel:
    """The same BatchNorm applied to x itself (a BN-only branch)."""
    return _native_bn_kernel(m)


def _native_bn_kernel(m: Match) -> Kernel:
    if m.value("index") != 0:
        raise FusionRefused(Reason.GEOMETRY, "only output 0 of a batch norm (the normalized tensor) is linear")
    eps = m.node("bn").args[6] if len(m.node("bn").args) > 6 else m.node("bn").kwargs.get("eps", 1e-5)
    return batch_norm_kernel(m.value("mean"), m.value("var"), m.value("weight"), m.value("bias"), False, 0.1, eps)


def _native_bn(input_pattern) -> Call:
    statistics = (Const("weight"), Const("bias"), Const("mean"), Const("var"))
    return Call(operator.getitem, Call(_NATIVE_BN, input_pattern, *statistics, name="bn"), Const("index"))


# tried in this order on every getitem: a BN folding into the region feeding it, else a BN of x itself
NATIVE_BATCH_NORM = PatternRule(
    "aten_native_batch_norm", _native_bn(Linear(x, "input", identity=False)), native_batch_norm
)
NATIVE_BATCH_NORM_OF_INPUT = PatternRule("aten_native_batch_norm_of_input", _native_bn(x), native_batch_norm_of_input)


# ---------------------------------------------------------------- II: sums; scales and shifts

_ADD = (aten.add.Tensor, aten.add.Scalar)
_SUB = (aten.sub.Tensor, aten.sub.Scalar)


def _alpha(node: Node) -> float:
    return alpha_factor(node, subtracts=node.target in _SUB)


def branch_sum(m: Match) -> Kernel:
    """`aten.add.Tensor(a, b, alpha=1)`: `a + alpha * b` (and `aten.sub.Tensor`: `a - alpha * b`)."""
    return m.kernel("a") + times(m.kernel("b"), _alpha(m.node("op")))


SUM = PatternRule(
    "aten_branch_sum", Call((aten.add.Tensor, aten.sub.Tensor), Linear(x, "a"), Linear(x, "b"), name="op"), branch_sum
)

_REGION = Linear(x, "a", identity=False)


def shift(m: Match) -> Kernel:
    """`add(f(x), t)`, `add(t, f(x))`, `sub(f(x), t)`: t (a number or a per-channel tensor) shifts the bias."""
    node, kernel = m.node("op"), m.kernel("a")
    first = node.args[0] is m.node("a")
    t = per_channel(m.value("t"), kernel) * (_alpha(node) if first else 1)
    if not first:  # t + alpha * f(x)
        kernel = times(kernel, _alpha(node))
    return kernel.then(affine_like(torch.ones_like(t), t, kernel))


def scale(m: Match) -> Kernel:
    """`mul(f(x), s)`, `mul(s, f(x))`, `div(f(x), s)`: s (a number or a per-channel tensor) scales the kernel."""
    kernel = m.kernel("a")
    s = per_channel(m.value("s"), kernel)
    if m.node("op").target in _DIV:
        s = 1 / s
    return kernel.then(affine_like(s, torch.zeros_like(s), kernel))


_MUL = (aten.mul.Tensor, aten.mul.Scalar)
_DIV = (aten.div.Tensor, aten.div.Scalar)

SHIFT = PatternRule(
    "aten_shift",
    AnyOf(
        Call(_ADD + _SUB, _REGION, Const("t"), name="op"),
        Call(_ADD, Const("t"), _REGION, name="op"),
    ),
    shift,
)
SCALE = PatternRule(
    "aten_scale",
    AnyOf(
        Call(_MUL + _DIV, _REGION, Const("s"), name="op"),
        Call(_MUL, Const("s"), _REGION, name="op"),
    ),
    scale,
)


# ---------------------------------------------------------------- IV: concatenation


class AtenCat(Cat):
    """`aten.cat.default([...], dim)` of values each matching `element` (see `reparam.patterns.Cat`)."""

    @property
    def anchors(self) -> tuple[tuple[str, Any], ...]:
        return (("call_function", aten.cat.default),)

    def accepts(self, node: Node, ctx: Any) -> bool:
        return node.op == "call_function" and node.target is aten.cat.default


CONCAT = PatternRule("aten_concat", AtenCat(Linear(x, "branches")), concat)


# ---------------------------------------------------------------- V: average pooling

_POOLS = {aten.avg_pool1d.default: 1, aten.avg_pool2d.default: 2, aten.avg_pool3d.default: 3}
_POOL_ARGS = ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"]
_POOL_DEFAULTS = {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True, "divisor_override": None}


def avg_pool(m: Match) -> Kernel:
    """`aten.avg_poolNd.default(x, kernel_size, stride=[], padding=0, ceil_mode, count_include_pad, divisor)`."""
    upstream = m.kernel("input")
    return upstream.then(pool_kernel(upstream.out_channels, upstream, *_pool_options(m)))


def avg_pool_of_input(m: Match) -> Kernel:
    """A pool of a tensor no region computes: its channels read off the graph, as in `avg_pool.avg_pool_of_input`."""
    dims, options = _pool_options(m)
    check_fixed(options)
    identity = m.identity("x", dims)
    return pool_kernel(identity.in_channels, identity, dims, options)


def _pool_options(m: Match) -> tuple[int, dict[str, Any]]:
    node = m.node("pool")
    return _POOLS[node.target], {**_POOL_DEFAULTS, **dict(zip(_POOL_ARGS, node.args[1:])), **node.kwargs}


AVG_POOL = PatternRule("aten_avg_pool", Call(tuple(_POOLS), Linear(x, "input", identity=False), name="pool"), avg_pool)
AVG_POOL_OF_INPUT = PatternRule(
    "aten_avg_pool_of_input", Call(tuple(_POOLS), Var("x", plain=True), name="pool"), avg_pool_of_input
)

ATEN_RULES = (
    CONV,
    CONVOLUTION,
    TRANSPOSED_CONV,
    LINEAR,
    BATCH_NORM,
    NATIVE_BATCH_NORM,
    NATIVE_BATCH_NORM_OF_INPUT,
    AVG_POOL,
    AVG_POOL_OF_INPUT,
    SUM,
    SCALE,
    SHIFT,
    CONCAT,
)
