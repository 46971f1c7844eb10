"""Constant folding: what forward computes from the model's own tensors is a constant of the model.

Authors compute kernels in forward: DBB's pad value `beta - mean * gamma / sqrt(var + eps)`,
weight standardization, OREPA-style kernels generated from parameters, `weight + identity`,
LoRA's `B @ A * scale`. In an eval-mode model such a subgraph depends only on parameters and
buffers, so it has one value: `fold_constants` evaluates it once, in float64, casts the result
to the dtype forward would have produced, and stores it on the GraphModule as a buffer read by
one `get_attr` node; a number (a padding computed from a weight's shape, as timm's HaloNet
does) is written into the nodes that read it. Rules then see a constant like any other.

A subgraph is folded when:

* every op in it is a function or method call (not a module call) whose inputs are all
  constants, with at least one tensor of the model among them;
* no op is random (`rand*`, `dropout`, `bernoulli`, ...) or writes in place, and no tensor it
  reads is written in place anywhere in forward;
* its value feeds a node some rule anchors on (a conv weight, a BN statistic, a shift): other
  constants are left as written, since folding them gains nothing. A view of a tensor of the
  model (`w.t()`, `w[0]`) is not folded; a gather (`biases[:, idxs]`, indexed by a tensor, as
  LeViT's and TinyViT's attention biases) always is, whatever reads it: forward would compute
  it on every call (timm caches it the same way after the first one).
"""

from __future__ import annotations

import itertools
import operator
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_aggregate, map_arg

from .context import Context, attribute, reshapes
from .mutation import Mutations, mutated_input
from .sharing import owned

_RANDOM = ("rand", "dropout", "bernoulli", "multinomial", "normal", "uniform", "poisson", "exponential", "cauchy")
_PREFIX = "_reparam_constant_"


def fold_constants(gm: GraphModule, ctx: Context) -> int:
    """Replace each foldable computed constant of `gm` by a stored tensor; return how many were stored."""
    modules = ctx.modules
    mutated: set[str] | None = None  # the tensors forward writes to, found when the first tensor is read
    constant: set[Node] = set()
    computed: set[Node] = set()  # constants that are more than a tensor of the model, reshaped
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            if mutated is None:
                mutated = Mutations(gm, modules).mutated_attributes
            if str(node.target) not in mutated:
                constant.add(node)
            continue
        inputs = node.all_input_nodes
        if node.op not in ("call_function", "call_method") or not inputs or not all(i in constant for i in inputs):
            continue
        if _is_random(node) or mutated_input(node, modules) is not None:
            continue
        constant.add(node)
        if not reshapes(node) or _gathers(node) or any(i in computed for i in inputs):
            computed.add(node)
    frontier = [n for n in computed if any(u not in constant and (ctx.has_rules(u) or _gathers(n)) for u in n.users)]
    if not frontier:
        return 0
    values = _evaluate(gm, _ancestors(frontier), frontier)
    for node in [n for n in frontier if _is_number(values[n])]:  # a size read of a weight: written as the number
        for user in list(node.users):
            user.args = map_arg(user.args, lambda a, node=node: values[node] if a is node else a)
            user.kwargs = map_arg(user.kwargs, lambda a, node=node: values[node] if a is node else a)
    frontier = [n for n in frontier if isinstance(values[n], torch.Tensor)]
    names = (f"{_PREFIX}{i}" for i in itertools.count() if not hasattr(gm, f"{_PREFIX}{i}"))
    for node in frontier:
        name = next(names)
        gm.register_buffer(name, values[node])
        with gm.graph.inserting_before(node):
            stored = gm.graph.get_attr(name)
        stored.meta["reparam"] = {"rules": ["constant_folding"], "sources": [node.name]}
        node.replace_all_uses_with(stored)
    for node in reversed(list(gm.graph.nodes)):
        if node in constant and not node.users:
            gm.graph.erase_node(node)
    return len(frontier)


def _gathers(node: Node) -> bool:
    """Whether `node` indexes with a tensor (`biases[:, idxs]`): a gather, which forward would compute on
    every call, not a view."""
    if node.target is not operator.getitem or len(node.args) < 2:
        return False
    found: list[Node] = []
    map_arg(node.args[1], found.append)
    return bool(found)


def _is_number(value: Any) -> bool:
    """A Python number, or a tuple of them (`weight.shape[2:]`): a literal a graph can hold."""
    if isinstance(value, tuple):
        return all(_is_number(v) for v in value)
    return isinstance(value, (int, float))


def _ancestors(nodes: list[Node]) -> set[Node]:
    """`nodes` and every node they are computed from."""
    found: set[Node] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node not in found:
            found.add(node)
            stack += node.all_input_nodes
    return found


def _is_random(node: Node) -> bool:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return any(word in name.lower() for word in _RANDOM)


def _evaluate(gm: GraphModule, needed: set[Node], wanted: list[Node]) -> dict[Node, torch.Tensor]:
    """The values of `wanted`: computed in float64, cast to the dtype the model's own dtypes give."""
    native: dict[Node, Any] = {}
    wide: dict[Node, Any] = {}
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node not in needed:
                continue
            if node.op == "get_attr":
                value = attribute(gm, node)
                native[node], wide[node] = value, _widened(value)
                continue
            for env in (native, wide):
                args = map_aggregate(node.args, lambda a: env[a] if isinstance(a, Node) else a)
                kwargs = map_aggregate(node.kwargs, lambda a: env[a] if isinstance(a, Node) else a)
                if node.op == "call_method":
                    env[node] = getattr(args[0], str(node.target))(*args[1:], **kwargs)
                else:
                    env[node] = node.target(*args, **kwargs)
    return {n: _cast_like(wide[n], native[n]) for n in wanted}


def _widened(value: Any) -> Any:
    return value.detach().double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _cast_like(value: Any, like: Any) -> Any:
    if isinstance(value, torch.Tensor) and isinstance(like, torch.Tensor):
        return value.to(like.dtype).detach().clone()
    return like


def erase_unused_constants(gm: GraphModule, candidates: list[Node]) -> set[Node]:
    """Erase the constants (tensor attributes, reshaped) left without users, and the tensors nothing reads.

    A tensor of a module the graph still calls is kept: the module's forward reads it. Returns the
    nodes erased.
    """
    attributes: set[str] = set()
    erased: set[Node] = set()
    while candidates:
        node = candidates.pop()
        if node in erased or node.users or not (node.op == "get_attr" or reshapes(node)):
            continue
        erased.add(node)
        if node.op == "get_attr":
            attributes.add(str(node.target))
        candidates += node.all_input_nodes
        gm.graph.erase_node(node)
    still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"} if attributes else set()
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"} if attributes else set()
    for target in attributes - still_read:
        owner_path, _, name = target.rpartition(".")
        path = owner_path.split(".") if owner_path else []
        if any(".".join(path[:i]) in called for i in range(1, len(path) + 1)):
            continue  # a tensor of a module that is still called (or of a part of one) stays
        owner = owned(gm, owner_path)
        if hasattr(owner, name):
            delattr(owner, name)
    return erased
