"""Reads of a tensor's metadata are not uses of its values.

Real code checks what it is given: timm's norm-act layers begin with `_assert(x.ndim == 4)`,
others read `x.shape` or `x.size()` to route. torch.fx records each read as a node that uses
`x`, so a conv output whose BN also asserts its rank looks used twice, and the conv and BN
could not be folded (`shared intermediate`) although nothing reads the conv's values but the BN.

`hoist_metadata_reads` moves each such read to an earlier tensor whose metadata is provably
the same, so the assert stays in the graph and still checks what it checked, but no longer
holds the intermediate alive. A read of `y = layer(x)` moves to `x` when `layer` is a linear
layer (one a rule gives a kernel) that keeps what is read:

* rank (`ndim`, `dim()`) and device: every kernel layer keeps them, and a concatenation has its
  parts' (the read moves to the first part);
* shape (`shape`, `size()`, `numel()`) and dtype: only per-channel affine layers (BatchNorm, a
  scale), which map each element on its own (under autocast a conv may change the dtype).

Moves repeat up the chain (conv -> BN -> read: the read moves to the conv's input), to the
first tensor that no kernel layer computes. A read of the rank or device always moves there:
it is what timm's norm-act layers assert, on every conv output, and the tensor at the top of
a chain (a block's input: a ReLU's output, a residual sum, a squeeze-excite product) is rarely
absorbed into the region below it anyway. A read of the shape or dtype, which code also
routes on, moves only when that costs no fold: when no rule folds the tensor away, or two
nodes already read it (a residual sum that also feeds the next block). A read the rules
cannot prove equal stays where it is, and the tensor it reads stays the output of a separate
region (`shared intermediate`).
"""

from __future__ import annotations

import builtins
from enum import Enum

from torch.fx import GraphModule, Node

from .context import CONCATENATIONS, Context
from .errors import FusionRefused


class _Kept(Enum):
    """What a kernel layer must keep for a read to move across it."""

    RANK_AND_DEVICE = "rank and device"
    ELEMENTS = "shape and dtype"


_ATTRIBUTES = {
    "ndim": _Kept.RANK_AND_DEVICE,
    "dtype": _Kept.ELEMENTS,
    "device": _Kept.RANK_AND_DEVICE,
    "is_cuda": _Kept.RANK_AND_DEVICE,
    "layout": _Kept.RANK_AND_DEVICE,
    "shape": _Kept.ELEMENTS,
}
_METHODS = {
    "dim": _Kept.RANK_AND_DEVICE,
    "ndimension": _Kept.RANK_AND_DEVICE,
    "get_device": _Kept.RANK_AND_DEVICE,
    "size": _Kept.ELEMENTS,
    "numel": _Kept.ELEMENTS,
}


def metadata_read(node: Node) -> _Kept | None:
    """What `node` reads of its first argument's metadata, or None if it reads values (or is no read)."""
    if not node.args or not isinstance(node.args[0], Node):
        return None
    if node.op == "call_function" and node.target is builtins.getattr and len(node.args) == 2:
        return _ATTRIBUTES.get(node.args[1]) if isinstance(node.args[1], str) else None
    if node.op == "call_method" and not node.kwargs:
        return _METHODS.get(str(node.target))
    return None


def hoist_metadata_reads(gm: GraphModule, ctx: Context) -> int:
    """Move every metadata read to the earliest tensor with the same metadata; return how many moved."""
    moved = 0
    for node in list(gm.graph.nodes):
        kept = metadata_read(node)
        if kept is None:
            continue
        source = node.args[0]
        while (earlier := _same_metadata_input(source, kept, ctx)) is not None:
            source = earlier
        if source is not node.args[0] and (kept is _Kept.RANK_AND_DEVICE or _free(source, ctx)):
            node.replace_input_with(node.args[0], source)
            moved += 1
    return moved


def _free(node: Node, ctx: Context) -> bool:
    """Whether one more read of `node` costs no fold: no rule folds it away, or two nodes besides metadata
    reads use its values, so that no region absorbs it anyway (FastViT's `x + mixer(x)` feeds both the
    MLP's conv and the residual add)."""
    return not ctx.has_rules(node) or sum(metadata_read(user) is None for user in node.users) >= 2


def _same_metadata_input(node: Node, kept: _Kept, ctx: Context) -> Node | None:
    """The input of `node` if `node` is a kernel layer keeping `kept` of it, else None; for a concatenation,
    whose rank and device are its parts', its first part (MixNet's BN-act asserts the rank of its cat)."""
    if kept is _Kept.RANK_AND_DEVICE and node.op == "call_function" and node.target in CONCATENATIONS and node.args:
        parts = node.args[0]
        return parts[0] if isinstance(parts, list | tuple) and parts and isinstance(parts[0], Node) else None
    if node.op not in ("call_module", "call_function") or not node.args or not isinstance(node.args[0], Node):
        return None
    try:
        kernel = ctx.layer_kernel(node)
    except FusionRefused:
        return None
    if kept is _Kept.ELEMENTS and not kernel.is_channelwise:
        return None
    return node.args[0]
