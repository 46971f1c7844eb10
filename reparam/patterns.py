"""Small composable patterns over torch.fx graphs, and what a match gives a rule.

A pattern describes a subgraph ending at one node (the anchor). Pieces:

* `Var("x")` binds any graph value; the same name must bind the same value everywhere.
* `Const("k")` matches a constant: a Python number or a tensor attribute of the model.
* `Linear(x, "a")` matches a linear region of `x` the engine already knows (a conv, a BN, a sum
  of branches, a chain...), or `x` itself as the identity (`identity=False` to exclude that).
* `Module(types, input)`, `Conv(input)`, `BN(input)`: a call of a module of one of these exact
  types. `Call(target, *args)`: a call of a function or method; unlisted arguments are free.
* `Add(a, b)`, `Mul(a, b)`: commutative, in any spelling (`a + b`, `torch.add`, `a.add(b)`).
* `Sub(a, b)`, `Neg(a)`: `a - b` and `-a`, in any spelling (`torch.sub`, `a.sub(b)`, `torch.neg`).
* `Cat(element)`: a channel concatenation of two or more values, each matching `element`.
* `AnyOf(p, q, ...)`: the first alternative that matches.

Any piece takes `name=` to capture what it matched; a rule reads captures from its `Match`.
Nodes inside a match (other than the anchor) must have no user outside it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.fx import Node

from .errors import FusionRefused, InvalidPatternError, Reason
from .kernel import Kernel
from .region import Region

if TYPE_CHECKING:
    from .context import Context

Anchor = tuple[str, Any]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class LinearCapture:
    """A value captured by `Linear`: its region, or None when it is the input itself (identity)."""

    node: Node
    region: Region | None


@dataclass(frozen=True)
class State:
    """Bindings so far: variables, captures, the nodes the match covers and its linear parts."""

    vars: dict[str, Node] = field(default_factory=dict)
    captures: dict[str, Any] = field(default_factory=dict)
    repeated: frozenset[str] = frozenset()
    interior: tuple[Node, ...] = ()
    parts: tuple[LinearCapture, ...] = ()

    # written out, not `dataclasses.replace`: a match builds a State per step, for every node a rule anchors on

    def bind(self, name: str, node: Node) -> State:
        return State({**self.vars, name: node}, self.captures, self.repeated, self.interior, self.parts)

    def capture(self, name: str | None, value: Any) -> State:
        if name is None:
            return self
        captured = [*self.captures.get(name, []), value] if name in self.repeated else value
        return State(self.vars, {**self.captures, name: captured}, self.repeated, self.interior, self.parts)

    def inside(self, node: Node) -> State:
        return State(self.vars, self.captures, self.repeated, (*self.interior, node), self.parts)

    def with_part(self, part: LinearCapture) -> State:
        return State(self.vars, self.captures, self.repeated, self.interior, (*self.parts, part))


class Pattern:
    """Base class of pattern pieces."""

    name: str | None = None

    @property
    def anchors(self) -> tuple[Anchor, ...]:
        """The `(op, target)` pairs a node matching this pattern can have (empty: it cannot anchor a rule)."""
        return ()

    def children(self) -> tuple[Pattern, ...]:
        return ()

    def matches(self, value: Any, state: State, ctx: Context, consumer: Node | None) -> Iterator[State]:
        """Every way `value` (used by `consumer`, None at the anchor) matches, extending `state`."""
        raise NotImplementedError


def walk(pattern: Pattern) -> Iterator[Pattern]:
    """The pattern and all its pieces, depth first."""
    yield pattern
    for child in pattern.children():
        yield from walk(child)


class Var(Pattern):
    """Any graph value, bound to `name`.

    `plain=True` matches only a value no region the consumer may absorb computes, leaving those
    to the rules that extend regions (a pad of a region is folded into it; a pad of a plain
    tensor, or of a region other layers read too, into the conv after it).
    """

    def __init__(self, name: str, plain: bool = False) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidPatternError("Var needs a name, e.g. Var('x')")
        self.name, self.plain = name, plain

    def matches(self, value: Any, state: State, ctx: Context, consumer: Node | None) -> Iterator[State]:
        if not isinstance(value, Node) or (self.plain and ctx.absorbable(value, consumer) is not None):
            return
        bound = state.vars.get(self.name)
        if bound is None:
            yield state.bind(self.name, value)
        elif bound is value:
            yield state

    def __repr__(self) -> str:
        return f"Var({self.name!r})"


class Const(Pattern):
    """A constant argument: a Python number, or a tensor stored on the model (maybe reshaped)."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name

    def matches(self, value: Any, state: State, ctx: Context, consumer: Node | None) -> Iterator[State]:
        if isinstance(value, Node):
            try:
                value = ctx.constant(value)
            except FusionRefused:
                return
        yield state.capture(self.name, value)


class Linear(Pattern):
    """A linear region of the variable `input` (or, if `identity`, the variable itself)."""

    def __init__(self, input: Var, name: str | None = None, *, identity: bool = True) -> None:
        if not isinstance(input, Var):
            raise InvalidPatternError(f"Linear(...) takes the Var it is a function of, not {input!r}")
        self.input, self.name, self.identity = input, name, identity

    def children(self) -> tuple[Pattern, ...]:
        return (self.input,)

    def matches(self, value: Any, state: State, ctx: Context, consumer: Node | None) -> Iterator[State]:
        if not isinstance(value, Node):
            return
        region = ctx.absorbable(value, consumer)
        if region is not None:
            for bound in self.input.matches(region.root, state, ctx, consumer):
                part = LinearCapture(value, region)
                yield bound.with_part(part).capture(self.name, part)
        if self.identity:
            for bound in self.input.matches(value, state, ctx, consumer):
                part = LinearCapture(value, None)
                yield bound.with_part(part).capture(self.name, part)


class _Call(Pattern):
    """A node calling something, with patterns for some of its arguments."""

    def __init__(self, args: Sequence[Pattern], name: str | None) -> None:
        for arg in args:
            if not isinstance(arg, Pattern):
                raise InvalidPatternError(f"expected a pattern piece (Var, Conv, Add, ...), got {arg!r}")
        self.args, self.name = tuple(args), name

    def children(self) -> tuple[Pattern, ...]:
        return self.args

    def accepts(self, node: Node, ctx: Context) -> bool:
        raise NotImplementedError

    def operands(self, node: Node) -> list[list[Any]]:
        """The ways to line the node's arguments up with `self.args` (the first ones; the rest are free)."""
        return [list(node.args[: len(self.args)])] if len(node.args) >= len(self.args) else []

    def matches(self, value: Any, state: State, ctx: Context, consumer: Node | None) -> Iterator[State]:
        if not isinstance(value, Node) or not self.accepts(value, ctx):
            return
        if consumer is not None and (_used_outside(value, consumer, state) or value in state.interior):
            return
        state = state.inside(value).capture(self.name, value)
        for operands in self.operands(value):
            yield from _match_all(self.args, operands, state, ctx, value)


def _used_outside(node: Node, consumer: Node, state: State) -> bool:
    """Whether a user of an inner `node` lies outside the match (`reshape_as(f(y), y)` reads y twice, inside)."""
    return any(user is not consumer and user not in state.interior for user in node.users)


def _match_all(patterns: Sequence[Pattern], values: Sequence[Any], state: State, ctx: Context, consumer: Node):
    if len(patterns) != len(values):
        return
    if not patterns:
        yield state
        return
    for first in patterns[0].matches(values[0], state, ctx, consumer):
        yield from _match_all(patterns[1:], values[1:], first, ctx, consumer)


class Module(_Call):
    """A call of a module whose type is exactly one of `types` (a subclass may change `forward`)."""

    def __init__(self, types: type | tuple[type, ...], input: Pattern, name: str | None = None) -> None:
        self.types = types if isinstance(types, tuple) else (types,)
        if not all(isinstance(t, type) and issubclass(t, nn.Module) for t in self.types):
            raise InvalidPatternError(f"Module(...) takes nn.Module subclasses, got {self.types!r}")
        super().__init__([input], name)

    @property
    def anchors(self) -> tuple[Anchor, ...]:
        return tuple(("call_module", t) for t in self.types)

    def accepts(self, node: Node, ctx: Context) -> bool:
        return (
            node.op == "call_module"
            and ctx.anchor(node)[1] in self.types
            and len(node.args) == 1
            and not node.kwargs
        )


def Conv(input: Pattern, name: str | None = None) -> Module:
    """A call of an `nn.Conv1d`, `nn.Conv2d` or `nn.Conv3d`."""
    return Module(_CONV_TYPES, input, name)


def BN(input: Pattern, name: str | None = None) -> Module:
    """A call of an `nn.BatchNorm1d`, `nn.BatchNorm2d` or `nn.BatchNorm3d`."""
    return Module(_BN_TYPES, input, name)


class Call(_Call):
    """A call of a function (`torch.flatten`, `F.avg_pool2d`) or a method (by name, `"mul"`).

    The first arguments are matched by `args`; further arguments are free (read them from
    `match.node(name)`).
    """

    def __init__(self, target: Callable | str | tuple, *args: Pattern, name: str | None = None) -> None:
        self.targets = target if isinstance(target, tuple) else (target,)
        super().__init__(args, name)

    @property
    def anchors(self) -> tuple[Anchor, ...]:
        return tuple(("call_method" if isinstance(t, str) else "call_function", t) for t in self.targets)

    def accepts(self, node: Node, ctx: Context) -> bool:
        return node.op in ("call_function", "call_method") and node.target in self.targets


class _Commutative(Call):
    """A binary elementwise op whose operands may come in either order."""

    targets_of_op: tuple = ()

    def __init__(self, a: Pattern, b: Pattern, name: str | None = None) -> None:
        super().__init__(self.targets_of_op, a, b, name=name)

    def operands(self, node: Node) -> list[list[Any]]:
        args = _binary_operands(node)
        return [args, args[::-1]] if args else []


def _binary_operands(node: Node) -> list[Any]:
    """The two operands of `a op b` / `torch.op(a, b)` / `a.op(other=b)`; none with an `alpha` other than 1."""
    args = list(node.args)
    if "other" in node.kwargs:
        args.append(node.kwargs["other"])
    if len(args) != 2 or node.kwargs.get("alpha", 1) != 1 or set(node.kwargs) - {"other", "alpha"}:
        return []
    return args


class Add(_Commutative):
    """`a + b` in any spelling (`+`, `operator.add`, `torch.add`, `Tensor.add`; no `alpha`)."""

    targets_of_op = (operator.add, torch.add, "add")


class Sub(Call):
    """`a - b` in any spelling (`-`, `operator.sub`, `torch.sub`, `Tensor.sub`; no `alpha`)."""

    def __init__(self, a: Pattern, b: Pattern, name: str | None = None) -> None:
        super().__init__((operator.sub, torch.sub, "sub"), a, b, name=name)

    def operands(self, node: Node) -> list[list[Any]]:
        args = _binary_operands(node)
        return [args] if args else []


class Neg(Call):
    """`-a` in any spelling (unary `-`, `operator.neg`, `torch.neg`, `Tensor.neg`)."""

    def __init__(self, a: Pattern, name: str | None = None) -> None:
        super().__init__((operator.neg, torch.neg, "neg"), a, name=name)

    def operands(self, node: Node) -> list[list[Any]]:
        return [list(node.args)] if len(node.args) == 1 and not node.kwargs else []


class Mul(_Commutative):
    """`a * b` in any spelling (`*`, `operator.mul`, `torch.mul`, `Tensor.mul`)."""

    targets_of_op = (operator.mul, torch.mul, "mul")


class Cat(_Call):
    """`torch.cat([...], dim=1)` of two or more values, each matching `element`.

    Captures inside `element` collect one entry per concatenated value (`match.kernels(name)`).
    Negative dims are accepted when they mean the channel dim of the captured regions.
    """

    def __init__(self, element: Pattern, name: str | None = None) -> None:
        super().__init__([element], name)
        self.element = element

    @property
    def anchors(self) -> tuple[Anchor, ...]:
        return tuple(("call_function", f) for f in (torch.cat, torch.concat, torch.concatenate))

    def accepts(self, node: Node, ctx: Context) -> bool:
        return node.op == "call_function" and node.target in (torch.cat, torch.concat, torch.concatenate)

    def matches(self, value: Any, state: State, ctx: Context, consumer: Node | None) -> Iterator[State]:
        if not isinstance(value, Node) or not self.accepts(value, ctx):
            return
        if consumer is not None and (len(value.users) != 1 or value in state.interior):
            return
        tensors = value.args[0] if value.args else value.kwargs.get("tensors")
        dim = value.args[1] if len(value.args) > 1 else value.kwargs.get("dim", value.kwargs.get("axis", 0))
        if not isinstance(tensors, list | tuple) or len(tensors) < 2 or not isinstance(dim, int):
            return
        names = frozenset(p.name for p in walk(self.element) if p.name is not None and not isinstance(p, Var))
        state = replace(state.inside(value).capture(self.name, value), repeated=state.repeated | names)
        for matched in _match_all([self.element] * len(tensors), list(tensors), state, ctx, value):
            regions = [p.region for p in matched.parts if p.region is not None and p.region.kernel.dims_known]
            channel_dims = {1} | {-(r.kernel.spatial_dims + 1) for r in regions[:1]}
            if dim in channel_dims:
                yield replace(matched, repeated=state.repeated - names)


class AnyOf(Pattern):
    """The first of several alternatives that matches."""

    def __init__(self, *alternatives: Pattern, name: str | None = None) -> None:
        if not alternatives or not all(isinstance(a, Pattern) for a in alternatives):
            raise InvalidPatternError("AnyOf(...) takes one or more pattern pieces")
        self.alternatives, self.name = alternatives, name

    @property
    def anchors(self) -> tuple[Anchor, ...]:
        return tuple(a for alt in self.alternatives for a in alt.anchors)

    def children(self) -> tuple[Pattern, ...]:
        return self.alternatives

    def matches(self, value: Any, state: State, ctx: Context, consumer: Node | None) -> Iterator[State]:
        for alternative in self.alternatives:
            for matched in alternative.matches(value, state, ctx, consumer):
                yield matched.capture(self.name, value)


class Match:
    """What a rule's function receives: the captures of one match, by name."""

    def __init__(self, state: State, ctx: Context) -> None:
        self._state, self._ctx = state, ctx

    def __getitem__(self, name: str) -> Node:
        """The graph value bound to `Var(name)`."""
        return self._state.vars[name]

    def node(self, name: str) -> Node:
        """The node captured as `name`."""
        return self._get(name).node if isinstance(self._get(name), LinearCapture) else self._get(name)

    def module(self, name: str) -> nn.Module:
        """The module called by the node captured as `name`."""
        return self._ctx.module(self.node(name))

    def module_of(self, node: Node) -> nn.Module:
        """The module a `call_module` node (a bound variable, say) calls."""
        return self._ctx.module(node)

    def rank(self, name: str) -> int | None:
        """The number of dims of the value of the node captured as `name`, where known.

        Known from propagated shapes (`fuse(..., example_inputs=...)`) or from the graph
        (a `flatten(x, 1)` upstream); None otherwise.
        """
        return self._ctx.rank(self.node(name))

    def identity(self, name: str, spatial_dims: int) -> Kernel:
        """The identity kernel of the value bound to `Var(name)`, a tensor no region computes.

        Its channel count is read off a layer that reads or makes it, else off propagated shapes;
        raises `FusionRefused` (`geometry`) when neither tells.
        """
        return self._ctx.identity(self[name], spatial_dims)

    def foldable(self, *names: str) -> bool:
        """Whether the layers captured as `names` may be replaced: no hooks or patched forward, not called elsewhere."""
        try:
            for name in names:
                self._ctx.check_foldable(self.node(name))
        except FusionRefused:
            return False
        return True

    def value(self, name: str) -> Any:
        """The constant captured by `Const(name=...)`."""
        return self._get(name)

    def kernel(self, name: str) -> Kernel:
        """The kernel of what `name` captured: a linear region, the identity, or a known layer."""
        return self._kernel_of(self._get(name))

    def kernels(self, name: str) -> list[Kernel]:
        """The kernels of a capture repeated by `Cat`, in order."""
        return [self._kernel_of(c) for c in self._get(name)]

    def _get(self, name: str) -> Any:
        if name not in self._state.captures:
            raise KeyError(f"the pattern captures no {name!r}; it captures {sorted(self._state.captures)}")
        return self._state.captures[name]

    def _kernel_of(self, capture: Any) -> Kernel:
        if isinstance(capture, LinearCapture):
            if capture.region is not None:
                return capture.region.kernel
            like = next((p.region.kernel for p in self._state.parts if p.region is not None), None)
            if like is None:
                raise FusionRefused(Reason.GEOMETRY, "an identity branch's channel count is unknown")
            identity = Kernel.identity(like.in_channels, like.spatial_dims, dtype=like.dtype, device=like.device)
            return replace(identity, dims_known=like.dims_known)
        return self._ctx.layer_kernel(capture)
