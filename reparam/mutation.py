"""In-place ops are ordering barriers: no region reads a tensor across a mutation of it.

A fused region is emitted where its output was, so it reads its input then. That is only the
value the original layers read if nothing wrote to that tensor (or to a view of it) between
the region's first layer and its output: `a = conv1(x); x.relu_(); b = conv2(x); a + b` reads
`x` before and after the ReLU, and no single kernel of `x` computes it. Likewise a tensor stored
on the model and updated in forward (`self.buf.add_(1)`) is no constant a kernel can fold.

`Mutations` finds the in-place ops of a graph, in every spelling torch.fx records:

* methods and functions ending in `_` (`x.add_(c)`, `x.relu_()`, `torch.relu_(x)`, `x.copy_(y)`);
* calls with `inplace=True` (`F.relu(x, inplace=True)`, positional or keyword);
* modules with `inplace=True` (`nn.ReLU(inplace=True)`, `nn.Hardswish(inplace=True)`);
* `operator.setitem` (`x[..., :p] = v`) and augmented assignment on a tensor seen by other
  names (`z = y; z += t`, recorded as `operator.iadd` by reparam's tracer);

and treats a write to a view (`view`, `reshape`, slicing, `transpose`, `chunk`...) as a write to
every tensor it aliases. `crossed(region, end)` names the first mutation the region would read
across; the engine then refuses the region (`in-place mutation`) and its parts fuse on their own.
A mutation of a region's output after the region, the usual `conv -> BN -> ReLU(inplace=True)`,
crosses nothing.
"""

from __future__ import annotations

import bisect
import functools
import inspect
import operator
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

_VIEWS = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze", "transpose",
    "permute", "t", "narrow", "select", "expand", "expand_as", "chunk", "split", "unbind", "contiguous",
    "detach", "to", "type_as", "as_strided", "movedim", "swapaxes", "unfold", "diagonal",
    operator.getitem, torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.transpose,
    torch.permute, torch.narrow, torch.select, torch.chunk, torch.split, torch.unbind, torch.movedim,
    torch.detach, torch.t,
}  # fmt: skip


_AUGMENTED = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def is_view(node: Node) -> bool:
    """Whether `node` returns a view of its first argument (so writing to it writes to that too).

    An aten operator says so in its schema: its result aliases an argument it does not write.
    """
    if isinstance(node.target, torch._ops.OpOverload):
        returns = node.target._schema.returns
        return bool(returns) and returns[0].alias_info is not None and not returns[0].alias_info.is_write
    return node.target in _VIEWS


def _aten_written_argument(target: torch._ops.OpOverload) -> int | None:
    """The position of the argument an aten operator writes to (`aten.add_.Tensor`: 0), from its schema."""
    for position, argument in enumerate(target._schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            return position
    return None


def mutated_input(node: Node, modules: dict[str, nn.Module]) -> Node | None:
    """The tensor `node` writes to in place, or None if it writes nothing."""
    if not node.args or not isinstance(node.args[0], Node):
        return None
    target = node.target
    if node.op == "call_module":
        return node.args[0] if getattr(modules.get(str(target)), "inplace", False) is True else None
    if node.op == "call_method":
        name = str(target)
        return node.args[0] if name.endswith("_") and not name.startswith("__") else None
    if node.op != "call_function":
        return None
    if target is operator.setitem or target in _AUGMENTED:
        return node.args[0]
    if isinstance(target, torch._ops.OpOverload):
        position = _aten_written_argument(target)
        written = node.args[position] if position is not None and position < len(node.args) else None
        return written if isinstance(written, Node) else None
    name = getattr(target, "__name__", "")
    if name.endswith("_") and not name.startswith("__"):
        return node.args[0]
    return node.args[0] if _inplace_argument(target, node.args, node.kwargs) else None


def _inplace_argument(target: Any, args: tuple, kwargs: dict) -> bool:
    if kwargs.get("inplace") is True:
        return True
    position = _inplace_position(target)
    return position is not None and len(args) > position and args[position] is True


@functools.cache
def _inplace_position(target: Any) -> int | None:
    """Where `target` takes an `inplace` argument positionally, or None if it takes none."""
    try:
        parameters = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):  # a builtin without a signature
        return None
    return parameters.index("inplace") if "inplace" in parameters else None


class Mutations:
    """The in-place ops of a graph, by position, and the tensors each one writes to."""

    def __init__(self, gm: GraphModule, modules: dict[str, nn.Module]) -> None:
        self._position = {node: i for i, node in enumerate(gm.graph.nodes)}
        self._alias: dict[Node, Node] = {}
        written_by = {node: mutated_input(node, modules) for node in gm.graph.nodes}
        for node, written in written_by.items():
            base = node.args[0] if node.args and isinstance(node.args[0], Node) else None
            if base is not None and (is_view(node) or written is base):
                self._alias[node] = self._base(base)  # a view, or an in-place op's result (its input)
        self._writes: list[tuple[int, Node, Node]] = []  # (position, op, written base)
        self.mutated_attributes: set[str] = set()
        for node, written in written_by.items():
            if written is None:
                continue
            base = self._base(written)
            self._writes.append((self._position[node], node, base))
            if base.op == "get_attr":
                self.mutated_attributes.add(str(base.target))
        self._write_positions = [p for p, _, _ in self._writes]

    def _base(self, node: Node) -> Node:
        while node in self._alias:
            node = self._alias[node]
        return node

    def crossed(self, nodes: Iterable[Node], end: Node) -> Node | None:
        """The first in-place op that writes, before `end`, to a tensor `nodes` read after it is written.

        `nodes` are a region's nodes; they read their inputs at their positions, the fused
        region reads them all at `end`. A constant the region reads that forward updates
        anywhere is crossed too.
        """
        before_end = bisect.bisect_left(self._write_positions, self._position[end])
        if not before_end and not self.mutated_attributes:
            return None
        nodes = list(nodes)
        reads = {self._base(i) for n in nodes for i in n.all_input_nodes} | {self._base(n) for n in nodes}
        for _, op, base in self._writes:  # torch.fx reads an attribute anew at each access: compare targets
            if base.op == "get_attr" and any(r.op == "get_attr" and r.target == base.target for r in reads):
                return op
        start = min(self._position[n] for n in nodes)
        for position, op, base in self._writes[:before_end]:
            if position > start and base in reads:
                return op
        return None


_OUT_OF_PLACE: dict[Any, Any] = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
    **{getattr(getattr(torch.ops.aten, f"{name}_"), overload): getattr(getattr(torch.ops.aten, name), overload)
       for name in ("add", "sub", "mul", "div") for overload in ("Tensor", "Scalar")},
}  # fmt: skip


def out_of_place_where_unseen(graph: torch.fx.Graph, modules: dict[str, nn.Module]) -> None:
    """`a += b` (`operator.iadd`, `aten.add_`; also `-=`, `*=`, `/=`) as `a + b` where the write cannot be
    seen: `a` is an intermediate value (not an input, a stored tensor or a view of another tensor) that
    no node reads after it, under any of its names (`b = a.add_(1)` makes b another name of a). Then the
    sum is a branch sum like any other (`out += branch(x)` in a loop). `modules`: the graph's, by path."""
    position = {node: i for i, node in enumerate(graph.nodes)}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _OUT_OF_PLACE or not isinstance(node.args[0], Node):
            continue
        names = _names_of(node.args[0], modules)
        intermediate = names[-1].op in ("call_module", "call_function", "call_method")
        other_names = any(  # a view or an in-place result besides this chain: that name may be read later
            user is not node and user not in names and (is_view(user) or mutated_input(user, modules) is name)
            for name in names
            for user in name.users
        )
        read_after = any(position[user] > position[node] for name in names for user in name.users)
        if intermediate and not any(map(is_view, names)) and not other_names and not read_after:
            node.target = _OUT_OF_PLACE[node.target]


def _names_of(tensor: Node, modules: dict[str, nn.Module]) -> list[Node]:
    """`tensor` and the nodes it is another name of: the tensor an in-place op wrote (and returned), the
    base of a view (whose storage it shares), and so on back to the first."""
    names = [tensor]
    while True:
        base = tensor.args[0] if is_view(tensor) and tensor.args else mutated_input(tensor, modules)
        if not isinstance(base, Node):
            return names
        names.append(base)
        tensor = base
