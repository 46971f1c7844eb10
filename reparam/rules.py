"""What a rule is, and the simplest kind of rule: a layer that computes a fixed kernel of its input.

A rule is anchored on fx nodes by `(op, target)`: `("call_module", nn.Conv2d)`,
`("call_function", operator.add)`, `("call_method", "add")`. The engine looks rules up by the
anchor of each node, so matching is linear in the size of the graph, and asks the first rule
that answers to annotate the node with a `Region` (or `None`: not a match). Rules never touch
the graph; the engine owns all surgery.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from torch import nn
from torch.fx import Node

from .errors import FusionRefused
from .kernel import Kernel
from .region import Region, chain, identity, leaf

if TYPE_CHECKING:
    from .engine import Context

Anchor = tuple[str, Any]


class Rule(Protocol):
    """A named graph rule: the anchors it is tried on and how it annotates a node."""

    name: str

    @property
    def anchors(self) -> tuple[Anchor, ...]: ...

    def annotate(self, node: Node, ctx: Context) -> Region | None: ...


@dataclass(frozen=True)
class LinearLayer:
    """A module type whose forward is a fixed kernel of its single input.

    `kernel(module)` returns that `Kernel` or raises `FusionRefused` when, for this instance,
    it is not one (a BatchNorm in training mode, say). Every combinator then applies to the
    layer: it is folded into the linear region feeding it (if the composition is exact) and
    can be a branch of sums. Module types are matched exactly, not by subclass: a subclass may
    override `forward`.
    """

    name: str
    module_types: tuple[type[nn.Module], ...]
    kernel: Callable[[nn.Module], Kernel]

    @property
    def anchors(self) -> tuple[Anchor, ...]:
        return tuple(("call_module", t) for t in self.module_types)

    def annotate(self, node: Node, ctx: Context) -> Region | None:
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], Node):
            return None
        try:
            kernel = self.kernel(ctx.module(node))
        except FusionRefused as refusal:
            ctx.refuse(self.name, [node], refusal)
            return None
        return extend(node, node.args[0], kernel, self.name, ctx, ctx.absorb(node.args[0], node))


def extend(node: Node, source: Node, kernel: Kernel, rule: str, ctx: Context, upstream: Region | None) -> Region:
    """`node` computes `kernel(source)`: fold it into the region computing `source` when that is exact."""
    this = leaf(node, source, kernel, rule)
    if upstream is None:
        return this
    try:
        return chain(upstream, this)
    except FusionRefused as refusal:
        ctx.refuse(rule, [source, node], refusal)
        return this


def same_input_branches(node: Node, operands: list[Node], ctx: Context) -> list[Region] | None:
    """The operands of `node` as regions of one common tensor, or None if they have none.

    An operand is either absorbed (the region computing it, if `node` is its only user) or the
    common tensor itself, which becomes an identity branch shaped like the other branches.
    """
    upstream = [ctx.absorb(op, node) for op in operands]
    for root in dict.fromkeys(r.root for r in upstream if r is not None):
        parts = [r if r is not None and r.root is root else None for r in upstream]
        if any(p is None and op is not root for p, op in zip(parts, operands)):
            continue
        like = next(p.kernel for p in parts if p is not None)
        return [p or identity(root, like) for p in parts]
    return None
