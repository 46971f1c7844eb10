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
from .region import Region, chain, leaf

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
        source = node.args[0]
        try:
            this = leaf(node, source, self.kernel(ctx.module(node)), self.name)
        except FusionRefused as refusal:
            ctx.refuse(self.name, [node], refusal)
            return None
        upstream = ctx.absorb(source, node)
        if upstream is None:
            return this
        try:
            return chain(upstream, this)
        except FusionRefused as refusal:
            ctx.refuse(self.name, [source, node], refusal)
            return this
