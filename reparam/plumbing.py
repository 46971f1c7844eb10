"""The ops between layers that compute nothing: dropped where they are no-ops, reported where they block a fold.

`drop_noops` removes what returns its input itself in eval mode: `nn.Identity` and dropout
modules, and, where shapes were propagated, `x.contiguous()` of a contiguous tensor and a cast
to the dtype the tensor already has (`x.float()` of a float32 tensor, `x.to(torch.float32)`):
torch returns the same tensor object for those, so the graph computes the same with or without
them, aliasing included.

`unread_plumbing` finds the linear layers that read another linear layer's output only through
ops that move or select values (`permute`, `chunk`, `split`, indexing, `clone`, ...), which no
rule composes: those layers stay apart, and each such pair is reported (`unsupported op`), so
that "nothing to fuse" never hides a pair of layers that did not fold.
"""

from __future__ import annotations

import operator

import torch
from torch import nn
from torch.fx import GraphModule, Node

from .context import describe
from .errors import Reason
from .region import Region
from .report import Refusal

_NOOP_TYPES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_CASTS = {"float": torch.float32, "double": torch.float64, "half": torch.float16, "bfloat16": torch.bfloat16}
_MOVES = {
    "permute", "transpose", "chunk", "split", "contiguous", "clone", "float", "double", "half", "to", "type",
    "narrow", "roll", "flip", "repeat", "expand", "unbind", "tensor_split", "movedim",
    operator.getitem, torch.chunk, torch.split, torch.permute, torch.transpose, torch.roll, torch.flip,
    torch.narrow, torch.unbind, torch.tensor_split, torch.movedim, torch.channel_shuffle, torch.pixel_shuffle,
    torch.nn.functional.pixel_shuffle, torch.nn.functional.pixel_unshuffle, torch.clone,
}  # fmt: skip
_MAX_HOPS = 4


def drop_noops(gm: GraphModule) -> None:
    """Remove the eval-mode no-ops from the graph (see the module docstring)."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if _returns_its_input(node, modules):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def _returns_its_input(node: Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        module = modules[node.target]
        return type(module) in _NOOP_TYPES and not module.training
    if node.op != "call_method" or not node.args or not isinstance(node.args[0], Node):
        return False
    meta = node.args[0].meta.get("tensor_meta")
    if not hasattr(meta, "dtype") or node.kwargs:
        return False
    if node.target == "contiguous" and len(node.args) == 1:
        return _is_contiguous(tuple(meta.shape), tuple(meta.stride))
    if node.target in _CASTS and len(node.args) == 1:
        return meta.dtype == _CASTS[node.target]
    if node.target == "to" and len(node.args) == 2 and isinstance(node.args[1], torch.dtype):
        return meta.dtype == node.args[1]
    return False


def _is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """`Tensor.is_contiguous()` from a shape and strides (dims of size 1 have any stride)."""
    expected = 1
    for size, step in reversed(list(zip(shape, stride))):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


def unread_plumbing(regions: dict[Node, Region], kept: list[Node], refused: list[Refusal]) -> list[Refusal]:
    """A refusal for each linear node that reads a linear node only through ops that move values.

    The linear nodes are the regions and the layers `kept` as written (a Linear whose rank is unknown).
    """
    linear = set(regions) | set(kept)
    found = []
    for node in [*regions, *(k for k in kept if k not in regions)]:
        source, hops = node.args[0] if node.args else None, []
        while isinstance(source, Node) and source not in linear and len(hops) < _MAX_HOPS and _moves(source):
            hops.append(source)
            source = source.args[0] if source.args else None
        if not hops or source not in linear or (node in regions and source in regions[node].nodes):
            continue
        names = (describe(source), describe(node))
        if any(set(names) <= set(r.nodes) for r in refused):
            continue
        ops = ", ".join(f"`{_op_name(h)}`" for h in reversed(hops))
        message = (
            f"{names[1]} reads {names[0]} through {ops}, which moves or selects values and which no rule "
            "composes, so the two stay separate layers"
        )
        found.append(Refusal("engine", Reason.UNSUPPORTED_OP, message, names))
    return found


def _moves(node: Node) -> bool:
    return node.op in ("call_method", "call_function") and node.target in _MOVES


def _op_name(node: Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
