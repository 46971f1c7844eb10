"""Linear regions: subgraphs that compute one kernel of an earlier tensor, and how to emit them.

The engine annotates each linear node with a `Region`: an expression tree over the graph's
nodes, rooted at the tensor it is a function of, with its exact fused `Kernel` computed as it
grows. `Leaf` is one layer, `Chain` layers applied one after another, `Matched` what a pattern
rule matched (a sum of branches, a concatenation, a pool over a region...). A region is only
ever built when its kernel is exact, so the remaining question is cost: `plan` decides, bottom
up, which parts become one conv and which stay as written, so that the result never costs
more than the original.

Costs are estimated times (`cost.py`): per position of the region's input tensor (a stage
after a stride-2 conv runs on a quarter of the positions), priced for the `Workload` one call sees.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import Node

from .cost import FREE, NOMINAL, Cost, Workload
from .errors import FusionRefused
from .kernel import Kernel


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
    parts = (first.parts if isinstance(first, Chain) else (first,)) + (
        second.parts if isinstance(second, Chain) else (second,)
    )
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


def as_written(region: Region, load: Workload = NOMINAL) -> tuple[Plan, Cost]:
    """The region re-emitted as written, and what that costs."""
    return _plan(region, load, allow_fusion=False)


def ops(p: Plan | None) -> int:
    """How many graph nodes a plan emits."""
    if isinstance(p, Steps):
        return sum(ops(s) for s in p.steps)
    if isinstance(p, AsWritten):
        return len(p.region.interior) + sum(ops(part) for _, part in p.parts)
    if isinstance(p, Fuse):
        return _fused_ops(p.region.kernel)
    return 0 if p is None else 1


def _fused_ops(kernel: Kernel) -> int:
    """One layer, after the crop its negative padding stands for if it has one."""
    return 2 if any(p < 0 for p in kernel.padding) else 1


def plan(region: Region, load: Workload = NOMINAL, allow_costlier: bool = False) -> tuple[Plan, Cost]:
    """The fastest way to emit `region` on `load`, never estimated slower than the region as written.

    A part becomes one conv only when that conv's estimated time (`Cost.seconds`) is no more
    than that of the best way to compute its pieces; chains are split where that is fastest
    (dynamic programming over their segments), so a depthwise conv followed by a pointwise one
    keeps both convs but still absorbs each one's BatchNorm. On a tie the fused form wins (fewer
    ops). With `allow_costlier`, a region of more than one layer is always one conv.
    """
    if allow_costlier and not isinstance(region, Leaf) and writable(region.kernel):
        return Fuse(region), Cost.of(region.kernel)
    return _plan(region, load, allow_fusion=True)


def _no_slower(fused: Cost, written: Cost, load: Workload) -> bool:
    return fused.seconds(load) <= written.seconds(load) * (1 + 1e-9)  # rounding must not break a tie


def writable(kernel: Kernel) -> bool:
    """One layer can be written for `kernel`: a conv of known rank, or a per-channel map of any rank.

    A kernel of unknown rank that mixes channels or positions (BatchNorm1d composed with a conv
    whose rank reparam cannot see) has no one layer that is exact on every input. A negative
    padding (a crop before a conv) is written as that crop, then the conv (`Kernel.split_crop`).
    """
    return kernel.dims_known or kernel.is_channelwise


def _can_fuse(kernel: Kernel, allow_fusion: bool) -> bool:
    return allow_fusion and writable(kernel)


def _plan(region: Region, load: Workload, allow_fusion: bool) -> tuple[Plan, Cost]:
    if isinstance(region, Leaf):
        return Keep(region), region.cost
    if isinstance(region, Chain):
        return _plan_chain(region, load, allow_fusion)
    if isinstance(region, Matched):
        parts = [(node, None if r is None else _plan(r, load, allow_fusion)) for node, r in region.parts]
        written = sum((p[1] for _, p in parts if p is not None), region.own_cost)
        fused = Cost.of(region.kernel)
        if _can_fuse(region.kernel, allow_fusion) and _no_slower(fused, written, load):
            return Fuse(region), fused
        return AsWritten(region, tuple((node, None if p is None else p[0]) for node, p in parts)), written
    raise TypeError(f"unknown region type {type(region).__name__}")


_WINDOW = 4  # how many parts back a fused segment may start, besides extending the last fused segment


def _plan_chain(region: Chain, load: Workload, allow_fusion: bool) -> tuple[Plan, Cost]:
    """Split a chain where that is fastest: dynamic programming over its segments, in linear time.

    `best[end]` is the cheapest way to compute `parts[:end]`: the cheapest way to compute
    `parts[:start]` followed by either the part `parts[end - 1]` as planned alone, or one conv
    for the segment `parts[start:end]`. Candidate segments end at `end` and start at most
    `_WINDOW` parts back, or extend the fused segment that ends `best[end - 1]`, so a chain of
    n parts composes at most `(_WINDOW + 1) * n` kernels (a chain of up to `_WINDOW + 1`
    parts is searched exhaustively) and a long run of 1x1 convs still becomes one conv.
    Every candidate is checked against the parts it replaces, so the plan never costs more
    than the chain as written.
    """
    parts = region.parts
    densities = [1.0]
    for part in parts:
        densities.append(densities[-1] * part.kernel.output_density)
    singles = [_plan(p, load, allow_fusion) for p in parts]
    single_costs = [cost.at_density(density) for (_, cost), density in zip(singles, densities)]
    written = [FREE]  # written[i]: the cost of parts[:i], each planned alone
    for cost in single_costs:
        written.append(written[-1] + cost)
    if not allow_fusion:
        return Steps(tuple(p for p, _ in singles)), written[-1]
    # best[end]: the cheapest (cost, start, kernel) computing parts[:end], ending with one conv for
    # parts[start:end] (kernel), or with parts[end - 1] planned alone (start = end - 1, kernel None)
    best: list[tuple[Cost, int, Kernel | None]] = [(FREE, 0, None)]
    segments: dict[int, Kernel] = {}  # start -> kernel of parts[start:end - 1], for starts still extendable
    for end in range(1, len(parts) + 1):
        starts = set(range(max(0, end - 1 - _WINDOW), end - 1)) if allow_fusion else set()
        if best[end - 1][2] is not None:
            starts.add(best[end - 1][1])
        if allow_fusion and (end == len(parts) or end - 2 < len(region.prefixes)):
            starts.add(0)  # the prefix's kernel is known: the whole chain so far is always a candidate
        segments = _extended(region, segments, sorted(starts), end)
        options = []  # fused segments first: on a tie in cost, fewer ops win
        for start, kernel in segments.items():
            fused = Cost.of(kernel).at_density(densities[start])
            if writable(kernel) and _no_slower(fused, written[end] - written[start], load):
                options.append((best[start][0] + fused, start, kernel))
        options.append((best[end - 1][0] + single_costs[end - 1], end - 1, None))
        best.append(min(options, key=lambda option: option[0].seconds(load)))
    steps: list[Plan] = []
    end = len(parts)
    while end:
        _, start, kernel = best[end]
        if kernel is None:
            steps.append(singles[start][0])
        else:
            steps.append(Fuse(region if (start, end) == (0, len(parts)) else _sub_chain(parts[start:end], kernel)))
        end = start
    steps.reverse()
    return (steps[0] if len(steps) == 1 else Steps(tuple(steps))), best[-1][0]


def _extended(region: Chain, segments: dict[int, Kernel], starts: list[int], end: int) -> dict[int, Kernel]:
    """The kernels of `region.parts[start:end]` for each start whose composition is exact.

    `segments` holds the kernels of `parts[start:end - 1]`; a start missing from it was
    refused there, and a longer segment from it is refused too.
    """
    parts, extended = region.parts, {}
    for start in starts:
        if start == end - 1:
            continue
        if start == 0 and end == len(parts):
            extended[start] = region.kernel
        elif start == 0 and end - 2 < len(region.prefixes):
            extended[start] = region.prefixes[end - 2]
        elif start == end - 2 or start in segments:
            first = parts[start].kernel if start == end - 2 else segments[start]
            try:
                extended[start] = first.then(parts[end - 1].kernel)
            except FusionRefused:
                continue
    return extended


def _sub_chain(parts: tuple[Region, ...], kernel: Kernel) -> Chain:
    nodes = frozenset().union(*(p.nodes for p in parts))
    rules = frozenset().union(*(p.rules for p in parts))
    return Chain(parts[0].root, kernel, nodes, rules, tuple(n for p in parts for n in p.sources), parts, ())


def fuses_anything(p: Plan | None) -> bool:
    if isinstance(p, Fuse):  # a crop and its conv, re-emitted as the same two ops, fuse nothing
        return len(p.region.nodes) > _fused_ops(p.region.kernel)
    if isinstance(p, Steps):
        return any(fuses_anything(s) for s in p.steps)
    if isinstance(p, AsWritten):
        return any(fuses_anything(part) for _, part in p.parts)
    return False
