"""Rules: how reparam learns what a layer or a subgraph computes.

Two kinds, both public, and the built-in transforms are written with them:

* `LinearLayer`: a module type or function computing a fixed kernel of its input. Every
  combinator then applies to it: it folds into the region feeding it and can be a branch.
* `PatternRule`: a pattern (see `reparam.patterns`) and a function from the `Match` to the
  `Kernel` the matched subgraph computes; `ReplacementRule`: to a module replacing it.

A rule is anchored on fx nodes by `(op, target)`: `("call_module", nn.Conv2d)`,
`("call_function", operator.add)`, `("call_method", "add")`. The engine looks rules up by the
anchor of each node, so matching stays linear in the size of the graph. Rules never touch the
graph; the engine owns all surgery. A rule refuses a match by raising `FusionRefused`.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from torch import nn
from torch.fx import Node

from .errors import FusionRefused, InvalidPatternError, Reason
from .kernel import Kernel
from .patterns import AnyOf, Linear, Match, Pattern, State, Var, walk
from .cost import FREE
from .region import Region, chain, leaf, matched

if TYPE_CHECKING:
    from .context import Context

Anchor = tuple[str, Any]


class Rule(Protocol):
    """A named graph rule: the anchors it is tried on and how it annotates a node."""

    name: str

    @property
    def anchors(self) -> tuple[Anchor, ...]: ...

    def annotate(self, node: Node, ctx: Context) -> Region | None: ...


@dataclass(frozen=True)
class LinearLayer:
    """Module types or functions computing a fixed kernel of their first argument.

    For a module type, `kernel(module)` returns its `Kernel`; for a function,
    `kernel(*args, **kwargs)` gets the call's other arguments (tensor attributes of the model
    resolved to tensors). It raises `FusionRefused` when, for this call, the layer is not a
    fixed kernel. Module types are matched exactly, not by subclass: a subclass may override
    `forward`. Functions are kept as single nodes when tracing (`torch.fx` autowrap).

    `features_last` marks layers that act on the last dimension (`nn.Linear`): they are a kernel
    over channels only on `(batch, features)` inputs, which the engine must see to be true.
    """

    name: str
    targets: tuple[type[nn.Module] | Callable[..., Any], ...]
    kernel: Callable[..., Kernel]
    features_last: bool = False

    @property
    def anchors(self) -> tuple[Anchor, ...]:
        return tuple((_op_of(t), t) for t in self.targets)

    def kernel_of(self, node: Node, ctx: Context) -> Kernel:
        """The kernel `node` (a call of one of the targets) computes."""
        if node.op == "call_module":
            return self.kernel(ctx.module(node))
        args = [ctx.constant(a) for a in node.args[1:]]
        kwargs = {k: ctx.constant(v) for k, v in node.kwargs.items()}
        return self.kernel(*args, **kwargs)

    def annotate(self, node: Node, ctx: Context) -> Region | None:
        if not node.args or not isinstance(node.args[0], Node):
            return None
        if node.op == "call_module" and (len(node.args) != 1 or node.kwargs):
            return None
        try:
            ctx.check_foldable(node)
            if self.features_last and ctx.rank(node.args[0]) != 2:
                raise FusionRefused(
                    Reason.GEOMETRY,
                    f"{self.name} maps the last dim, which is the channel dim only on (batch, features) inputs; "
                    "this input's rank is unknown (flatten before it, or pass example_inputs)",
                )
        except FusionRefused as refusal:
            ctx.barrier(node, self.name, refusal)
            return None
        kernel = self.kernel_of(node, ctx)
        return extend(node, node.args[0], kernel, self.name, ctx, ctx.absorb(node.args[0], node))


def _op_of(target: Any) -> str:
    return "call_module" if isinstance(target, type) and issubclass(target, nn.Module) else "call_function"


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


def _check_pattern(pattern: Pattern, function: Callable, kind: str) -> list[str]:
    """The pattern's variable names, after checking that the rule is well formed."""
    if not isinstance(pattern, Pattern):
        raise InvalidPatternError(f"a {kind} needs a pattern built from reparam.patterns pieces, got {pattern!r}")
    if not pattern.anchors:
        raise InvalidPatternError(
            f"{pattern!r} cannot anchor a rule: the outermost piece must be a call (Conv, BN, Module, Call, Add, "
            "Mul, Cat)"
        )
    if not callable(function):
        raise InvalidPatternError(f"a {kind} needs a function of the match, got {function!r}")
    _capture_names(pattern)
    return list(dict.fromkeys(p.name for p in walk(pattern) if isinstance(p, Var)))


def _capture_names(pattern: Pattern) -> set[str]:
    """The names a match of `pattern` captures; raises if one name would capture two things."""
    own = {pattern.name} if pattern.name is not None and not isinstance(pattern, Var) else set()
    if isinstance(pattern, AnyOf):  # alternatives are separate scopes: only one of them matches
        return own | set().union(*(_capture_names(a) for a in pattern.children()))
    names = own
    for child in pattern.children():
        child_names = _capture_names(child)
        if names & child_names:
            raise InvalidPatternError(f"capture names must be unique; {sorted(names & child_names)} appear twice")
        names |= child_names
    return names


class PatternRule:
    """A subgraph rule: when `pattern` matches, `function(match)` returns the `Kernel` it computes.

    The pattern must have exactly one `Var`: the tensor the matched subgraph is a function of.
    """

    def __init__(self, name: str, pattern: Pattern, function: Callable[[Match], Kernel]) -> None:
        variables = _check_pattern(pattern, function, "pattern rule")
        if len(variables) != 1:
            raise InvalidPatternError(
                f"rule {name!r}: a kernel rule's pattern needs exactly one Var (the input), found {variables}"
            )
        self.name, self.pattern, self.function = name, pattern, function

    @property
    def anchors(self) -> tuple[Anchor, ...]:
        return self.pattern.anchors

    def annotate(self, node: Node, ctx: Context) -> Region | None:
        for state in self.pattern.matches(node, State(), ctx, None):
            if state.parts and all(p.region is None for p in state.parts):
                continue  # only identities: nothing linear is known about this value
            for inner in state.interior:
                ctx.check_foldable(inner)
            try:
                kernel = self.function(Match(state, ctx))
            except FusionRefused as refusal:
                refusal.nodes = (*dict.fromkeys(p.node for p in state.parts), *reversed(state.interior))
                raise
            if not isinstance(kernel, Kernel):
                raise TypeError(f"returned {type(kernel).__name__}, not a Kernel")
            [root] = state.vars.values()
            interior = state.interior
            own_cost = sum((ctx.cost_as_written(n, kernel) for n in interior), FREE)
            parts = tuple(dict.fromkeys((p.node, p.region) for p in state.parts))
            # the interior layers with weights of their own count as sources (not an add or a cat)
            modules = tuple(
                n
                for n in reversed(interior)
                if n.op == "call_module" or any(a.op == "get_attr" for a in n.all_input_nodes)
            )
            return matched(root, kernel, self.name, interior, parts, own_cost, modules)
        return None


class ReplacementRule:
    """A subgraph rule whose result is not a conv: `function(match)` returns a module to call instead.

    The module is called on the pattern's variables, in the order they first appear; an
    `nn.Sequential` on one variable is inlined layer by layer. Returning None declines the match;
    raising `FusionRefused` declines it with a reason, which the report lists.
    `Linear` pieces are not allowed: replacements run before linear regions are known.
    """

    def __init__(self, name: str, pattern: Pattern, function: Callable[[Match], nn.Module]) -> None:
        self.variables = _check_pattern(pattern, function, "replacement rule")
        if not self.variables:
            raise InvalidPatternError(f"rule {name!r}: a replacement's pattern needs at least one Var")
        if any(isinstance(p, Linear) for p in walk(pattern)):
            raise InvalidPatternError(f"rule {name!r}: Linear(...) cannot appear in a replacement's pattern")
        self.name, self.pattern, self.function = name, pattern, function

    @property
    def anchors(self) -> tuple[Anchor, ...]:
        return self.pattern.anchors

    def annotate(self, node: Node, ctx: Context) -> Region | None:
        return None

    def replacement(self, node: Node, ctx: Context) -> tuple[nn.Module, list[Node], tuple[Node, ...]] | None:
        """The module to call, its arguments and the nodes it replaces, if `node` anchors a match."""
        for state in self.pattern.matches(node, State(), ctx, None):
            module = self.function(Match(state, ctx))
            if module is None:  # the function declined this match
                continue
            if not isinstance(module, nn.Module):
                raise TypeError(f"returned {type(module).__name__}, not an nn.Module")
            return module, [state.vars[v] for v in self.variables], state.interior
        return None


def plain_functions(rules: list[Rule]) -> tuple[types.FunctionType, ...]:
    """The Python functions layer rules anchor on: the tracer keeps their calls as single nodes."""
    return tuple(t for r in rules if isinstance(r, LinearLayer) for t in r.targets if isinstance(t, types.FunctionType))
