"""Tensor ranks read off the graph, without running it.

Some folds are exact only on inputs of a known rank: `nn.Linear` maps the last dim, which is
the channel dim only on `(batch, features)`; a BatchNorm1d over a Linear's tokens needs the
flatten before it to merge every dim but the features. Shapes propagated from example inputs
give every value's rank. Without them, many ranks still follow from the graph itself:

* a layer that accepts one rank only makes it (`nn.BatchNorm2d`: 4, `nn.BatchNorm3d`: 5);
* an op that names its output's dims says how many (`permute(0, 2, 3, 1)`: 4,
  `view(b, n, c)`: 3, `flatten(x, 2)`: 3, `mean((2, 3))` of a rank-4 value: 2);
* a tensor stored on the model has its own rank, and a Python number (`x.size(0)`) has none;
* layers and ops that keep the rank (activations, convs, norms, dropout, Linear, pads, pools,
  casts, `transpose`) pass it on, and broadcasting ops give the largest of their operands'.

A rank is stated only where it holds for every input the model accepts (`nn.Conv2d` takes 3D
and 4D inputs, so it passes on the rank it is given and states none of its own); elsewhere it
is unknown (None), and the folds that need it are refused with that reason.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

from .layers import AnyRankBatchNorm

RankOf = Callable[[Any], "int | None"]  # the rank of a call's argument: a node, a number, or anything else

_FIXED_RANK: dict[type[nn.Module], int] = {nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}
_KEEPS_RANK_MODULES = (
    *(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear),
    *(nn.BatchNorm1d, nn.SyncBatchNorm, AnyRankBatchNorm, nn.GroupNorm, nn.LayerNorm),
    *(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d),
    *(nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.Sigmoid, nn.Tanh),
    *(nn.Mish, nn.ELU, nn.PReLU, nn.Softmax, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d),
    *(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d),
    *(nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d),
    *(nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d),
    *(nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d),
)
_MAX_POOLS = (
    *(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d),
)

_KEEPS_RANK_FUNCTIONS = {
    *(F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.mish, F.sigmoid),
    *(torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.sqrt, torch.rsqrt, torch.abs, torch.neg),
    *(torch.clamp, torch.softmax, F.softmax, operator.neg, F.dropout, F.layer_norm, F.group_norm),
    *(F.batch_norm, F.instance_norm, F.conv1d, F.conv2d, F.conv3d, F.linear, F.pad, F.interpolate),
    *(F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d),
    *(F.adaptive_avg_pool3d, torch.transpose, torch.flip, torch.roll),
}
_KEEPS_RANK_METHODS = {
    *("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "exp", "sqrt", "rsqrt", "abs", "neg", "clamp", "softmax"),
    *("contiguous", "clone", "detach", "to", "float", "half", "double", "bfloat16", "type_as", "transpose"),
    *("swapaxes", "flip", "roll", "add_", "mul_", "sub_", "div_", "clamp_", "hardswish", "masked_fill"),
}
_BROADCASTS = {
    *(operator.add, operator.sub, operator.mul, operator.truediv, operator.pow, torch.add, torch.sub),
    *(torch.mul, torch.div, torch.maximum, torch.minimum, torch.where),
    *("add", "sub", "mul", "div", "pow", "maximum", "minimum", "__radd__", "__rsub__", "__rmul__", "__rtruediv__"),
}
_REDUCTIONS = {"mean", "sum", torch.mean, torch.sum}
_SPLITS = {"split", "chunk", "tensor_split", torch.split, torch.chunk, torch.tensor_split}
_NUMBERS = {"size", "dim", "numel", len}  # calls that return Python numbers (`size()` a tuple of them)


def stored_rank(value: Any) -> int | None:
    """The rank of a value stored on the model: a tensor's own, 0 for a number."""
    if isinstance(value, torch.Tensor):
        return value.dim()
    return 0 if isinstance(value, int | float) else None


def propagated(node: Node) -> Any | None:
    """What shape propagation recorded of `node`'s value, if it is a tensor: torch.fx's `tensor_meta`
    (`example_inputs`) or torch.export's `val`, both with a `shape` and a `dtype`."""
    for key in ("tensor_meta", "val"):
        meta = node.meta.get(key)
        shape, dtype = getattr(meta, "shape", None), getattr(meta, "dtype", None)
        if isinstance(shape, torch.Size) and isinstance(dtype, torch.dtype):
            return meta
    return None


def rank_of(node: Node, rank: RankOf, module: Callable[[Node], nn.Module]) -> int | None:
    """The rank of `node`'s value, from propagated shapes or from the op and its arguments' ranks."""
    meta = propagated(node)
    if meta is not None:
        return len(meta.shape)
    if node.op == "call_module":
        return _module_rank(module(node), node, rank)
    if node.op in ("call_function", "call_method"):
        return _call_rank(node, rank)
    return None


def _module_rank(layer: nn.Module, node: Node, rank: RankOf) -> int | None:
    kind = type(layer)
    if kind in _FIXED_RANK:
        return _FIXED_RANK[kind]
    if not node.args or len(node.args) != 1 or node.kwargs:
        return None
    given = rank(node.args[0])
    if kind in _KEEPS_RANK_MODULES or (kind in _MAX_POOLS and not layer.return_indices):
        return given
    if kind is nn.Flatten:
        return _flattened(given, layer.start_dim, layer.end_dim)
    if kind is nn.Unflatten:
        return None if given is None else given + len(layer.unflattened_size) - 1
    return None


def _call_rank(node: Node, rank: RankOf) -> int | None:
    target, args = node.target, node.args
    if not args:
        return None
    first = rank(args[0])
    if target in _KEEPS_RANK_FUNCTIONS or target in _KEEPS_RANK_METHODS:
        return first
    if target in _BROADCASTS:
        ranks = [rank(a) for a in [*args, *node.kwargs.values()] if isinstance(a, Node | int | float)]
        return None if None in ranks else max(ranks)
    if _is_sizes(node):
        return None  # a tuple of numbers, not a tensor
    if target in _NUMBERS or (target is getattr and args[1:] == ("ndim",)):
        return 0
    if target in ("flatten", torch.flatten):
        start = _argument(node, 1, "start_dim", 0)
        return _flattened(first, start, _argument(node, 2, "end_dim", -1))
    if target in ("view", "reshape", "expand", "repeat", torch.reshape, "permute", torch.permute):
        return _listed_dims(node, rank)
    if target in ("unsqueeze", torch.unsqueeze):
        return None if first is None else first + 1
    if target is torch.stack:
        parts = [rank(p) for p in args[0]] if isinstance(args[0], list | tuple) else []
        known = next((r for r in parts if r is not None), None)
        return None if known is None else known + 1
    if target in ("reshape_as", "view_as", "expand_as"):
        return rank(args[1]) if len(args) > 1 else None
    if target in (torch.cat, torch.concat, torch.concatenate):
        parts = [rank(p) for p in args[0]] if isinstance(args[0], list | tuple) else []
        return next((r for r in parts if r is not None), None)
    if target in _REDUCTIONS:
        return _reduced(node, first)
    if target in (operator.matmul, torch.matmul, "matmul"):
        second = rank(args[1]) if len(args) > 1 else None
        return max(first, second) if first is not None and second is not None and min(first, second) >= 2 else None
    if target is operator.getitem:
        return _indexed(node, rank)
    return None


def _argument(node: Node, position: int, name: str, default: Any) -> Any:
    return node.args[position] if len(node.args) > position else node.kwargs.get(name, default)


def _flattened(given: int | None, start: Any, end: Any) -> int | None:
    """The rank after flattening dims `start..end`: known from `start` alone when `end` is the last dim."""
    if not isinstance(start, int) or not isinstance(end, int):
        return None
    if given is None:
        return start + 1 if end == -1 and start >= 0 else None
    start, end = start % max(given, 1), end % max(given, 1)
    return given - (end - start)


def _listed_dims(node: Node, rank: RankOf) -> int | None:
    """The rank of `view(a, b, c)`, `view((a, b, c))`, `permute(dims=...)`: how many sizes are listed."""
    listed = node.kwargs.get("dims", node.kwargs.get("shape", node.kwargs.get("size", node.args[1:])))
    if isinstance(listed, Node):
        return None
    if len(listed) == 1 and isinstance(listed[0], list | tuple | torch.Size):
        listed = listed[0]
    if len(listed) == 1 and not isinstance(listed[0], int) and rank(listed[0]) != 0:
        return None  # `view(x.size())`, `view(dtype)`: not one listed size
    return len(listed) if listed else None


def _is_sizes(node: Node) -> bool:
    """Whether `node` is a tensor's sizes (`x.shape`, `x.size()`): a tuple of numbers."""
    if node.target is getattr:
        return node.args[1:] == ("shape",)
    return node.target == "size" and len(node.args) == 1 and not node.kwargs


def _reduced(node: Node, given: int | None) -> int | None:
    """The rank of `mean(x, dims, keepdim)` and the like."""
    dims = _argument(node, 1, "dim", None)
    if _argument(node, 2, "keepdim", False) is True:
        return given
    if dims is None:
        return 0
    dims = (dims,) if isinstance(dims, int) else dims
    if given is None or not dims or not isinstance(dims, list | tuple) or not all(isinstance(d, int) for d in dims):
        return None
    return given - len({d % given for d in dims})


def _indexed(node: Node, rank: RankOf) -> int | None:
    """The rank of `x[index]`: an int drops a dim, None adds one, a slice keeps it; a tuple's part keeps its rank."""
    source, index = node.args
    if isinstance(source, Node) and source.target in _SPLITS:
        return rank(source.args[0]) if source.args and isinstance(index, int) else None
    if isinstance(source, Node) and source.target in ("unbind", torch.unbind) and isinstance(index, int):
        given = rank(source.args[0]) if source.args else None
        return None if given is None else given - 1
    if isinstance(source, Node) and _is_sizes(source):
        return 0 if isinstance(index, int) else None  # one size, or a tuple of them
    given = rank(source)
    parts = index if isinstance(index, tuple) else (index,)
    if given is None or given == 0:
        return None
    dropped = added = 0
    for part in parts:
        if part is None:
            added += 1
        elif (isinstance(part, int) and not isinstance(part, bool)) or (isinstance(part, Node) and rank(part) == 0):
            dropped += 1
        elif not isinstance(part, slice) and part is not Ellipsis:
            return None  # a bool, or a tensor or list index (advanced indexing)
    return given - dropped + added
