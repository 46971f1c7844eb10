"""Border assignment lowered to one op: `y = F.pad(z, p); y[..., :p, :] = v; ...` is `pad_with_border(z, p, v)`.

DBB's published BN-and-pad layer pads its BN output with zeros, then overwrites each border
band in place with the BN's response to zero: one slice assignment per side of each spatial
dim. torch.fx records each as an `operator.setitem` on the padded tensor (the tracer supports
item assignment for this), which no rule could read as a kernel. `lower_border_writes` finds a
pad whose borders are all overwritten with one value before anything else reads it, and
replaces the pad and the writes by one call of `pad_with_border`, which computes the same
tensor: the padding rule then folds it like any pad (transforms/padding.py).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx import GraphModule, Node


def pad_with_border(x: Tensor, pad: list[int], value: Tensor | float) -> Tensor:
    """`x` padded by `pad` (as in `F.pad`) with `value` (a number or per-channel tensor) at the border.

    Interior: `x + 0 * value`, exactly x; border: `0 + 1 * value`, exactly value.
    """
    border = F.pad(torch.zeros_like(x), pad, value=1.0)  # 1 at the border, 0 inside
    return F.pad(x, pad) + border * value


def lower_border_writes(gm: GraphModule) -> int:
    """Replace each fully border-assigned pad by `pad_with_border`; return how many were lowered."""
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    lowered = 0
    for pad in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.pad]:
        writes = [u for u in pad.users if u.op == "call_function" and u.target is operator.setitem]
        border = _border(pad, writes)
        if border is None:
            continue
        last = max(writes, key=position.__getitem__)
        readers = [u for u in pad.users if u not in writes]
        if any(position[r] < position[last] for r in readers):
            continue  # something reads the pad before its borders are written
        with gm.graph.inserting_after(last):
            bordered = gm.graph.call_function(pad_with_border, (pad.args[0], *border))
        for reader in readers:
            reader.replace_input_with(pad, bordered)
        for write in writes:
            gm.graph.erase_node(write)
        gm.graph.erase_node(pad)
        lowered += 1
    return lowered


def _border(pad: Node, writes: list[Node]) -> tuple[list[int], Any] | None:
    """`pad`'s pads and the one value written over every border band of its output; None if the writes are not that."""
    pads = pad.args[1] if len(pad.args) > 1 else pad.kwargs.get("pad")
    mode = pad.args[2] if len(pad.args) > 2 else pad.kwargs.get("mode", "constant")
    if mode != "constant" or not isinstance(pads, tuple | list) or not writes:
        return None
    if not all(isinstance(p, int) and p > 0 for p in pads) or len(set(pads)) != 1:
        return None
    width, dims = pads[0], len(pads) // 2
    value = writes[0].args[2]
    if any(w.args[2] is not value for w in writes):
        return None
    bands = set()
    for write in writes:
        band = _band(write.args[1], dims, width)
        if band is None:
            return None
        bands.add(band)
    wanted = {(d, side) for d in range(dims) for side in ("low", "high")}
    return (list(pads), value) if bands == wanted else None


def _band(key: Any, dims: int, width: int) -> tuple[int, str] | None:
    """Which border band `tensor[key]` is, for a (batch, channel, *spatial) tensor: (spatial dim, side)."""
    key = key if isinstance(key, tuple) else (key,)
    if len(key) > 2 + dims or any(k is Ellipsis for k in key):
        return None
    key = key + (slice(None),) * (2 + dims - len(key))
    full = slice(None, None, None)
    partial = [(i, k) for i, k in enumerate(key) if k != full]
    if len(partial) != 1 or partial[0][0] < 2 or not isinstance(partial[0][1], slice):
        return None
    index, band = partial[0]
    if band.step not in (None, 1):
        return None
    if band.start in (None, 0) and band.stop == width:
        return (index - 2, "low")
    if band.start == -width and band.stop is None:
        return (index - 2, "high")
    return None
