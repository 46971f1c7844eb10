"""A Linear before a permute back to channels-first: a 1x1 conv after it, while fusing.

Channels-last blocks apply `nn.Linear` to the last dim, then permute back to channels-first,
where a BatchNorm or a layer-scale reads the result (UniRepLKNet's `pwconv2`: Linear, then
NHWC to NCHW, then BN; timm's ConvNeXt, whose `gamma` comes after the permute). With r the
rank and P = (0, r-1, 1, ..., r-2):

    permute(linear(z), P) = conv1x1(permute(z, P)),    W[o, c, 1, ..., 1] = A[o, c],

exactly, for every input: P makes z's last dim the channels, which the 1x1 conv maps as the
Linear mapped them. The Linear's input rank need not be known: P says it.

* `raise_linears` rewrites the left side into the right where every reader of the permute is
  a per-channel layer that folds into a conv (a BN of any kind, a multiply, divide, add or
  subtract by a constant of the model), so that the rules fold them (I).
* `lower_convs`, once fusion is done, writes each 1x1 conv that reparam made and that still
  reads such a permute back as a Linear before it: the authors' deploy form. On the CPU the
  conv of the permuted tensor measured 1.00-1.22x the Linear's time, never less, so the
  Linear is what the fused model keeps.
"""

from __future__ import annotations

import operator

import torch
from torch import nn
from torch.fx import GraphModule, Node

from .context import Context, layer_class, runs_more_than_its_class, substitute
from .errors import FusionRefused
from .kernel import Kernel

RULE = "channels_first_linear"
PERMUTES = ("permute", torch.permute)
_PER_CHANNEL_ARITHMETIC = {
    *(operator.mul, operator.truediv, operator.add, operator.sub, torch.mul, torch.div, torch.add, torch.sub),
    *("mul", "div", "add", "sub"),
}
_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def permutation(node: Node) -> tuple[int, ...] | None:
    """The dims of a permute node, however it was spelled (`x.permute(0, 2, 1)`, `torch.permute(x, (0, 2, 1))`)."""
    if node.op not in ("call_method", "call_function") or node.target not in PERMUTES:
        return None
    dims = node.kwargs.get("dims", node.args[1:])
    if len(dims) == 1 and isinstance(dims[0], tuple | list):
        dims = dims[0]
    return tuple(dims) if all(isinstance(d, int) for d in dims) else None


def to_channels_first(rank: int) -> tuple[int, ...]:
    """The permutation moving the last of `rank` dims to dim 1: `(0, rank-1, 1, ..., rank-2)`."""
    return (0, rank - 1, *range(1, rank - 1))


def raise_linears(gm: GraphModule, ctx: Context) -> list[str]:
    """Rewrite each `permute(linear(z), P)` whose readers fold per channel as `conv1x1(permute(z, P))`.

    The conv takes the Linear's place (its path, in `gm` and in `ctx.modules`), so that the
    report names the layer the model has. Returns those paths.
    """
    raised = []
    for node in list(gm.graph.nodes):
        rank = _channels_first_rank(node)
        linear = node.args[0] if rank is not None else None
        if linear is None or not _raisable(linear, node, ctx):
            continue
        module = ctx.module(linear)
        conv = Kernel.from_linear(module, rank - 2).to_module().requires_grad_(module.weight.requires_grad)
        gm.add_submodule(linear.target, conv)
        ctx.modules[linear.target] = conv
        with gm.graph.inserting_before(node):
            moved = gm.graph.call_method("permute", (linear.args[0], *to_channels_first(rank)))
            raised_conv = gm.graph.call_module(linear.target, (moved,))
        raised_conv.meta["reparam"] = {"rules": [RULE], "sources": [linear.target]}
        substitute(gm, node, raised_conv, linear)
        raised.append(linear.target)
    return raised


def lower_convs(gm: GraphModule, raised: set[str]) -> None:
    """Write each 1x1 conv made from a raised Linear (`raised`: their paths) that still reads a permute to
    channels-first as a Linear before that permute."""
    for node in list(gm.graph.nodes):
        made_of = node.meta.get("reparam", {}).get("sources", ())
        if node.op != "call_module" or not raised.intersection(made_of) or len(node.args) != 1 or node.kwargs:
            continue
        conv, permute = gm.get_submodule(node.target), node.args[0]
        rank = _channels_first_rank(permute) if isinstance(permute, Node) else None
        if rank is None or set(permute.users) != {node} or not _is_plain_pointwise(conv, rank - 2):
            continue
        linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None, device="meta")
        linear.weight = nn.Parameter(conv.weight.detach().reshape(conv.out_channels, -1).clone())
        if conv.bias is not None:
            linear.bias = nn.Parameter(conv.bias.detach().clone())
        linear.requires_grad_(conv.weight.requires_grad)
        gm.add_submodule(node.target, linear)
        with gm.graph.inserting_before(node):
            mapped = gm.graph.call_module(node.target, (permute.args[0],))
            back = gm.graph.call_method("permute", (mapped, *to_channels_first(rank)))
        mapped.meta["reparam"] = node.meta["reparam"]
        substitute(gm, node, back, permute)


def _channels_first_rank(node: Node) -> int | None:
    """r, if `node` permutes a rank-r tensor (r >= 3) from channels-last to channels-first."""
    dims = permutation(node)
    if dims is None or len(dims) < 3 or dims != to_channels_first(len(dims)) or not node.args:
        return None
    return len(dims) if isinstance(node.args[0], Node) else None


def _raisable(linear: Node, permute: Node, ctx: Context) -> bool:
    """Whether `linear` is a foldable `nn.Linear` read by `permute` alone, whose readers all fold per channel."""
    if linear.op != "call_module" or layer_class(ctx.module(linear)) is not nn.Linear:
        return False
    if len(linear.args) != 1 or linear.kwargs or set(linear.users) != {permute} or not permute.users:
        return False
    if any(n.op == "get_attr" and str(n.target).startswith(f"{linear.target}.") for n in linear.graph.nodes):
        return False  # its tensors are read elsewhere: the conv cannot take its place
    try:
        ctx.check_foldable(linear)
    except FusionRefused:
        return False
    return all(_folds_per_channel(reader, permute, ctx) for reader in permute.users)


def _folds_per_channel(reader: Node, value: Node, ctx: Context) -> bool:
    """Whether `reader` is a per-channel layer of `value`: a BN-like layer, or arithmetic with a constant."""
    try:
        if reader.op == "call_module":
            ctx.check_foldable(reader)
            return reader.args == (value,) and ctx.layer_kernel(reader, over_channels=True).is_channelwise
        if reader.target in _PER_CHANNEL_ARITHMETIC and len(reader.args) == 2 and not reader.kwargs:
            others = [a for a in reader.args if a is not value]
            divides = reader.target in (operator.truediv, torch.div, "div")
            if len(others) != 1 or (divides and reader.args[0] is not value):
                return False
            return ctx.constant(others[0]) is not None
    except FusionRefused:
        return False
    return False


def _is_plain_pointwise(conv: nn.Module, spatial_dims: int) -> bool:
    """Whether `conv` is an ungrouped 1x..x1 `nn.ConvNd` with stride 1 and no padding."""
    if type(conv) is not _CONVS.get(spatial_dims) or runs_more_than_its_class(conv) is not None:
        return False
    unpadded = not isinstance(conv.padding, str) and not any(conv.padding)
    return conv.groups == 1 and set(conv.kernel_size) == {1} and set(conv.stride) == {1} and unpadded
