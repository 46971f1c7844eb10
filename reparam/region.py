"""Linear regions: subgraphs that compute one kernel of an earlier tensor, and how to emit them.

The engine annotates each linear node with a `Region`: an expression tree (`Leaf`, `Chain`,
`Branches`, `Identity`) over the graph's nodes, rooted at the tensor it is a function of, with
its exact fused `Kernel` computed as it grows. A region is only ever built when its kernel is
exact, so the remaining question is cost: `plan` decides, bottom up, which parts become one
conv and which stay as written, so that the result never costs more than the original.

Costs are multiply-accumulates per position of the region's input tensor (a stage after a
stride-2 conv runs on a quarter of the positions) and parameter counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

from torch.fx import Node

from .errors import FusionRefused
from .kernel import Kernel, concatenated


@dataclass(frozen=True)
class Cost:
    """MACs per input position and parameters of some computation."""

    macs: Fraction
    params: int

    @classmethod
    def of(cls, kernel: Kernel) -> Cost:
        """The cost of running `kernel` as one conv."""
        return cls(Fraction(kernel.macs, math.prod(kernel.stride)), kernel.params)

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.macs + other.macs, self.params + other.params)

    def at_density(self, density: Fraction) -> Cost:
        """This cost for an input that has `density` positions per position of the region's input."""
        return Cost(self.macs * density, self.params)

    def no_more_than(self, other: Cost) -> bool:
        return self.macs <= other.macs and self.params <= other.params

    @property
    def key(self) -> tuple[Fraction, int]:
        return (self.macs, self.params)


FREE = Cost(Fraction(0), 0)


@dataclass(frozen=True, eq=False)
class Region:
    """A subgraph computing `kernel(root)`. `nodes` are the graph nodes it replaces."""

    root: Node
    kernel: Kernel
    nodes: frozenset[Node]
    rules: frozenset[str]

    def leaves(self) -> Iterator[Leaf]:
        yield from ()


@dataclass(frozen=True, eq=False)
class Leaf(Region):
    """One linear node of the original graph, applied to `root` (its input)."""

    node: Node
    cost: Cost

    def leaves(self) -> Iterator[Leaf]:
        yield self


@dataclass(frozen=True, eq=False)
class Identity(Region):
    """The root itself, as a branch of a sum (the `x` in `x + f(x)`)."""


@dataclass(frozen=True, eq=False)
class Chain(Region):
    """Parts applied one after another: `parts[-1](...parts[0](root))`."""

    parts: tuple[Region, ...]

    def leaves(self) -> Iterator[Leaf]:
        for part in self.parts:
            yield from part.leaves()


@dataclass(frozen=True, eq=False)
class Branches(Region):
    """Parts applied to the same root and summed."""

    parts: tuple[Region, ...]

    def leaves(self) -> Iterator[Leaf]:
        for part in self.parts:
            yield from part.leaves()


@dataclass(frozen=True, eq=False)
class Stacked(Region):
    """Parts applied to the same root, their outputs concatenated along channels."""

    parts: tuple[Region, ...]

    def leaves(self) -> Iterator[Leaf]:
        for part in self.parts:
            yield from part.leaves()


# ------------------------------------------------------------------------ building


def leaf(node: Node, root: Node, kernel: Kernel, rule: str, cost: Cost | None = None) -> Leaf:
    """A linear node computing `kernel(root)`; its cost as written defaults to that of the kernel as a conv."""
    return Leaf(root, kernel, frozenset({node}), frozenset({rule}), node, Cost.of(kernel) if cost is None else cost)


def identity(root: Node, like: Kernel) -> Identity:
    """The root as a sum branch, with the channels and dims of the branch `like`."""
    kernel = Kernel.identity(like.in_channels, like.spatial_dims, dtype=like.dtype, device=like.weight.device)
    return Identity(root, kernel, frozenset(), frozenset())


def chain(first: Region, second: Region) -> Chain:
    """`second` applied to the output of `first`. Raises `FusionRefused` if that is not one exact kernel."""
    kernel = first.kernel.then(second.kernel)
    parts = _flatten(Chain, [first, second])
    rules = first.rules | second.rules | (set() if second.kernel.is_channelwise else {"sequential"})
    return Chain(first.root, kernel, first.nodes | second.nodes, frozenset(rules), parts)


def branches(parts: list[Region], sum_nodes: list[Node], rule: str) -> Branches:
    """The sum of `parts`, all rooted at the same tensor, computed by `sum_nodes`. May raise `FusionRefused`."""
    kernel = parts[0].kernel
    for part in parts[1:]:
        kernel = kernel + part.kernel
    nodes = frozenset(sum_nodes).union(*(p.nodes for p in parts))
    rules = frozenset({rule}).union(*(p.rules for p in parts))
    return Branches(parts[0].root, kernel, nodes, rules, _flatten(Branches, parts))


def stacked(parts: list[Region], cat_node: Node, rule: str) -> Stacked:
    """The channel concatenation of `parts`, all rooted at the same tensor. May raise `FusionRefused`."""
    kernel = concatenated([p.kernel for p in parts])
    nodes = frozenset({cat_node}).union(*(p.nodes for p in parts))
    rules = frozenset({rule}).union(*(p.rules for p in parts))
    return Stacked(parts[0].root, kernel, nodes, rules, _flatten(Stacked, parts))


def _flatten(kind: type, parts: list[Region]) -> tuple[Region, ...]:
    flat: list[Region] = []
    for part in parts:
        flat.extend(part.parts if isinstance(part, kind) else [part])
    return tuple(flat)


# ------------------------------------------------------------------------ planning


@dataclass(frozen=True)
class Keep:
    """Re-apply an original linear node to the emitted input."""

    leaf: Leaf


@dataclass(frozen=True)
class Fuse:
    """Replace a region by one conv computing its kernel."""

    region: Region


@dataclass(frozen=True)
class Steps:
    """Apply plans one after another."""

    steps: tuple[Plan, ...]


@dataclass(frozen=True)
class Add:
    """Apply plans to the same input and sum them."""

    terms: tuple[Plan, ...]


@dataclass(frozen=True)
class Concat:
    """Apply plans to the same input and concatenate their outputs along channels."""

    terms: tuple[Plan, ...]


@dataclass(frozen=True)
class PassThrough:
    """The input itself."""


Plan = Keep | Fuse | Steps | Add | Concat | PassThrough


def original_cost(region: Region) -> Cost:
    """What the region costs as written."""
    return _plan(region, allow_fusion=False)[1]


def plan(region: Region, allow_costlier: bool = False) -> tuple[Plan, Cost]:
    """The cheapest way to emit `region`, never costing more than the region as written.

    A part becomes one conv only when that conv costs no more (MACs and parameters) than the
    best way to compute its pieces; chains are split where that is cheapest (dynamic
    programming over their segments), so a depthwise conv followed by a pointwise one keeps
    both convs but still absorbs each one's BatchNorm. With `allow_costlier`, a region of more
    than one layer is always one conv.
    """
    if allow_costlier and not isinstance(region, Leaf):
        return Fuse(region), Cost.of(region.kernel)
    return _plan(region, allow_fusion=True)


def _plan(region: Region, allow_fusion: bool) -> tuple[Plan, Cost]:
    if isinstance(region, Leaf):
        return Keep(region), region.cost
    if isinstance(region, Identity):
        return PassThrough(), FREE
    if isinstance(region, Chain):
        return _plan_chain(region, allow_fusion)
    if isinstance(region, Branches):
        terms = [_plan(part, allow_fusion) for part in region.parts]
        adds = Cost(Fraction(region.kernel.out_channels * (len(terms) - 1), math.prod(region.kernel.stride)), 0)
        written = sum((cost for _, cost in terms), adds)
        fused = Cost.of(region.kernel)
        if allow_fusion and fused.no_more_than(written):
            return Fuse(region), fused
        return Add(tuple(p for p, _ in terms)), written
    if isinstance(region, Stacked):
        terms = [_plan(part, allow_fusion) for part in region.parts]
        written = sum((cost for _, cost in terms), FREE)
        fused = Cost.of(region.kernel)
        if allow_fusion and fused.no_more_than(written):
            return Fuse(region), fused
        return Concat(tuple(p for p, _ in terms)), written
    raise TypeError(f"unknown region type {type(region).__name__}")


def _plan_chain(region: Chain, allow_fusion: bool) -> tuple[Plan, Cost]:
    parts = region.parts
    densities = [Fraction(1)]
    for part in parts:
        densities.append(densities[-1] / math.prod(part.kernel.stride))
    singles = [_plan(p, allow_fusion) for p in parts]
    single_costs = [cost.at_density(d) for (_, cost), d in zip(singles, densities)]
    # best[i]: cheapest (cost, plans) computing parts[:i]
    best: list[tuple[Cost, tuple[Plan, ...]]] = [(FREE, ())]
    segment_kernels: dict[tuple[int, int], Kernel] = {}
    if allow_fusion:
        for start in range(len(parts)):
            kernel = parts[start].kernel
            for end in range(start + 2, len(parts) + 1):
                try:
                    kernel = region.kernel if (start, end) == (0, len(parts)) else kernel.then(parts[end - 1].kernel)
                except FusionRefused:
                    break
                segment_kernels[start, end] = kernel
    for end in range(1, len(parts) + 1):
        options = []  # fused segments first: on a tie in cost, fewer ops win
        for start in range(end - 1):
            kernel = segment_kernels.get((start, end))
            if kernel is None:
                continue
            fused = Cost.of(kernel).at_density(densities[start])
            if not fused.no_more_than(sum(single_costs[start:end], FREE)):
                continue
            segment = region if (start, end) == (0, len(parts)) else _sub_chain(parts[start:end], kernel)
            options.append((best[start][0] + fused, best[start][1] + (Fuse(segment),)))
        options.append((best[end - 1][0] + single_costs[end - 1], best[end - 1][1] + (singles[end - 1][0],)))
        best.append(min(options, key=lambda option: option[0].key))
    cost, steps = best[-1]
    return (steps[0] if len(steps) == 1 else Steps(steps)), cost


def _sub_chain(parts: tuple[Region, ...], kernel: Kernel) -> Chain:
    nodes = frozenset().union(*(p.nodes for p in parts))
    rules = frozenset().union(*(p.rules for p in parts))
    return Chain(parts[0].root, kernel, nodes, rules, parts)


def fuses_anything(p: Plan) -> bool:
    if isinstance(p, Fuse):
        return True
    if isinstance(p, Steps):
        return any(fuses_anything(s) for s in p.steps)
    if isinstance(p, Add | Concat):
        return any(fuses_anything(t) for t in p.terms)
    return False
