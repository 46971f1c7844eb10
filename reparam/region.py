"""Linear regions: subgraphs that compute one kernel of an earlier tensor, and how to emit them.

The engine annotates each linear node with a `Region`: an expression tree over the graph's
nodes, rooted at the tensor it is a function of, with its exact fused `Kernel` computed as it
grows. `Leaf` is one layer, `Chain` layers applied one after another, `Matched` what a pattern
rule matched (a sum of branches, a concatenation, a pool over a region...). A region is only
ever built when its kernel is exact, so the remaining question is cost: `plan` decides, bottom
up, which parts become one conv and which stay as written, so that the result never costs
more than the original.

Costs are multiply-accumulates per position of the region's input tensor (a stage after a
stride-2 conv runs on a quarter of the positions) and parameter counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from torch.fx import Node

from .errors import FusionRefused
from .kernel import Kernel


@dataclass(frozen=True)
class Cost:
    """MACs per input position and parameters of some computation."""

    macs: Fraction
    params: int

    @classmethod
    def of(cls, kernel: Kernel) -> Cost:
        """The cost of running `kernel` as one conv."""
        return cls(kernel.macs_per_input, kernel.params)

    @classmethod
    def elementwise(cls, kernel: Kernel) -> Cost:
        """One operation per element of `kernel`'s output (an add, a multiply)."""
        return cls(kernel.out_channels * kernel.output_density, 0)

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
    """A subgraph computing `kernel(root)`.

    `nodes` are the graph nodes it replaces; `sources` the layers it is made of, in order.
    """

    root: Node
    kernel: Kernel
    nodes: frozenset[Node]
    rules: frozenset[str]
    sources: tuple[Node, ...]


@dataclass(frozen=True, eq=False)
class Leaf(Region):
    """One linear node of the original graph, applied to `root` (its input)."""

    node: Node
    cost: Cost


@dataclass(frozen=True, eq=False)
class Chain(Region):
    """Parts applied one after another: `parts[-1](...parts[0](root))`.

    `prefixes[i]` is the kernel of `parts[: i + 2]`, as the chain was grown (the planner reuses
    them); shorter than `len(parts) - 1` where a chain was appended whole.
    """

    parts: tuple[Region, ...]
    prefixes: tuple[Kernel, ...]


@dataclass(frozen=True, eq=False)
class Matched(Region):
    """A subgraph a pattern rule matched: `interior` nodes over linear `parts` of the root.

    `parts` maps each captured value to its region (None where the value is the root itself);
    `own_cost` is what the interior nodes cost as written; `output` is the anchor node.
    """

    output: Node
    interior: tuple[Node, ...]
    parts: tuple[tuple[Node, Region | None], ...]
    own_cost: Cost


# ------------------------------------------------------------------------ building


def leaf(node: Node, root: Node, kernel: Kernel, rule: str, cost: Cost | None = None) -> Leaf:
    """A linear node computing `kernel(root)`; its cost as written defaults to that of the kernel as a conv."""
    cost = Cost.of(kernel) if cost is None else cost
    return Leaf(root, kernel, frozenset({node}), frozenset({rule}), (node,), node, cost)


def chain(first: Region, second: Region) -> Chain:
    """`second` applied to the output of `first`. Raises `FusionRefused` if that is not one exact kernel."""
    kernel = first.kernel.then(second.kernel)
    parts = tuple(p for r in (first, second) for p in (r.parts if isinstance(r, Chain) else (r,)))
    rules = first.rules | second.rules | (set() if second.kernel.is_channelwise else {"sequential"})
    known = first.prefixes if isinstance(first, Chain) else ()
    grown_by_one = len(known) == len(parts) - 2  # every prefix of first known, second one part
    prefixes = known + (kernel,) if grown_by_one else known
    return Chain(
        first.root, kernel, first.nodes | second.nodes, frozenset(rules), first.sources + second.sources, parts, prefixes
    )


def matched(
    root: Node,
    kernel: Kernel,
    rule: str,
    interior: tuple[Node, ...],
    parts: tuple[tuple[Node, Region | None], ...],
    own_cost: Cost,
    modules: tuple[Node, ...],
) -> Matched:
    """The region of a pattern match; `modules` are the interior layers that count as sources."""
    regions = [r for _, r in parts if r is not None]
    nodes = frozenset(interior).union(*(r.nodes for r in regions))
    rules = frozenset({rule}).union(*(r.rules for r in regions))
    sources = tuple(n for r in regions for n in r.sources) + modules
    return Matched(root, kernel, nodes, rules, sources, interior[0], tuple(reversed(interior)), parts, own_cost)


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
class AsWritten:
    """Re-emit a matched subgraph's interior nodes over the plans of its parts (None: the input)."""

    region: Matched
    parts: tuple[tuple[Node, Plan | None], ...]


Plan = Keep | Fuse | Steps | AsWritten


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
    if allow_costlier and not isinstance(region, Leaf) and region.kernel.dims_known:
        return Fuse(region), Cost.of(region.kernel)
    return _plan(region, allow_fusion=True)


def _can_fuse(kernel: Kernel, allow_fusion: bool) -> bool:
    """A conv can be written for `kernel` (a per-channel map of unknown rank, BatchNorm1d-only, cannot)."""
    return allow_fusion and kernel.dims_known


def _plan(region: Region, allow_fusion: bool) -> tuple[Plan, Cost]:
    if isinstance(region, Leaf):
        return Keep(region), region.cost
    if isinstance(region, Chain):
        return _plan_chain(region, allow_fusion)
    if isinstance(region, Matched):
        parts = [(node, None if r is None else _plan(r, allow_fusion)) for node, r in region.parts]
        written = sum((p[1] for _, p in parts if p is not None), region.own_cost)
        fused = Cost.of(region.kernel)
        if _can_fuse(region.kernel, allow_fusion) and fused.no_more_than(written):
            return Fuse(region), fused
        return AsWritten(region, tuple((node, None if p is None else p[0]) for node, p in parts)), written
    raise TypeError(f"unknown region type {type(region).__name__}")


def _plan_chain(region: Chain, allow_fusion: bool) -> tuple[Plan, Cost]:
    parts = region.parts
    densities = [Fraction(1)]
    for part in parts:
        densities.append(densities[-1] * part.kernel.output_density)
    singles = [_plan(p, allow_fusion) for p in parts]
    single_costs = [cost.at_density(d) for (_, cost), d in zip(singles, densities)]
    segment_kernels: dict[tuple[int, int], Kernel] = {}
    if allow_fusion:
        for start in range(len(parts)):
            kernel = parts[start].kernel
            for end in range(start + 2, len(parts) + 1):
                try:
                    kernel = _segment_kernel(region, start, end) or kernel.then(parts[end - 1].kernel)
                except FusionRefused:
                    break
                segment_kernels[start, end] = kernel
    # best[i]: cheapest (cost, plans) computing parts[:i]
    best: list[tuple[Cost, tuple[Plan, ...]]] = [(FREE, ())]
    for end in range(1, len(parts) + 1):
        options = []  # fused segments first: on a tie in cost, fewer ops win
        for start in range(end - 1):
            kernel = segment_kernels.get((start, end))
            if kernel is None or not kernel.dims_known:
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


def _segment_kernel(region: Chain, start: int, end: int) -> Kernel | None:
    """The kernel of `region.parts[start:end]` if it is already known (the whole, or a prefix)."""
    if end == len(region.parts) and start == 0:
        return region.kernel
    return region.prefixes[end - 2] if start == 0 and end - 2 < len(region.prefixes) else None


def _sub_chain(parts: tuple[Region, ...], kernel: Kernel) -> Chain:
    nodes = frozenset().union(*(p.nodes for p in parts))
    rules = frozenset().union(*(p.rules for p in parts))
    return Chain(parts[0].root, kernel, nodes, rules, tuple(n for p in parts for n in p.sources), parts, ())


def fuses_anything(p: Plan | None) -> bool:
    if isinstance(p, Fuse):
        return True
    if isinstance(p, Steps):
        return any(fuses_anything(s) for s in p.steps)
    if isinstance(p, AsWritten):
        return any(fuses_anything(part) for _, part in p.parts)
    return False
