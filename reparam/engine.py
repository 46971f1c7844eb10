"""The engine: annotate linear regions on a torch.fx graph, then materialize them as convs.

1. *Annotate.* Nodes are visited in graph order; the rules anchored on each node's
   `(op, target)` turn it into a `Region`: a kernel of some earlier tensor (the root), extended
   from the regions of its inputs when that composition is exact and the inputs have no other
   users.
2. *Materialize.* A region whose value is needed outside itself is planned (`region.plan`) and,
   where that fuses anything, emitted before its output node; its old nodes are erased, unused
   modules deleted, and each new conv named after the layers it replaced.

Passes repeat until one fuses nothing, so `fuse` of a fused graph changes nothing. Every new
node carries its provenance in `node.meta["reparam"]`.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule, Node

from .errors import FusionRefused, Reason, RuleError
from .region import (
    Add,
    Chain,
    Concat,
    Cost,
    Fuse,
    Keep,
    Leaf,
    PassThrough,
    Plan,
    Region,
    Steps,
    fuses_anything,
    original_cost,
    plan,
)
from .report import FuseReport, Fusion, Refusal
from .rules import Anchor, Rule

_NOOP_TYPES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_TEMP_PREFIX = "_reparam_fused_"


class Context:
    """What rules see of the graph while annotating it."""

    def __init__(self, gm: GraphModule) -> None:
        self.regions: dict[Node, Region] = {}
        self.refusals: list[Refusal] = []
        self._modules = dict(gm.named_modules())
        self._shared_reported: set[Node] = set()

    def module(self, node: Node) -> nn.Module:
        """The module a `call_module` node calls."""
        return self._modules[node.target]

    def absorb(self, producer: Node, consumer: Node) -> Region | None:
        """The region computing `producer`, if `consumer` may fold it in (it has no other user)."""
        region = self.regions.get(producer)
        if region is None:
            return None
        if len(producer.users) > 1:
            if producer not in self._shared_reported:
                self._shared_reported.add(producer)
                others = [describe(u) for u in producer.users if u is not consumer]
                self.refusals.append(
                    Refusal(
                        "engine",
                        Reason.SHARED_INTERMEDIATE,
                        f"{describe(producer)} is also used by {', '.join(others)}; folding it into "
                        f"{describe(consumer)} would change what they see, so it is fused on its own",
                        (describe(producer), describe(consumer)),
                    )
                )
            return None
        return region

    def refuse(self, rule: str, nodes: Iterable[Node], refusal: FusionRefused) -> None:
        """Record that `rule` matched `nodes` but would not be exact."""
        self.refusals.append(Refusal(rule, refusal.reason, refusal.message, tuple(describe(n) for n in nodes)))


def describe(node: Node) -> str:
    """A node as users know it: the module path it calls, or its fx name."""
    return str(node.target) if node.op == "call_module" else node.name


@dataclass(frozen=True)
class _NewConv:
    node: Node
    region: Region
    before: Cost


class Engine:
    """Runs a sequence of rules over GraphModules. Earlier rules win when several share an anchor."""

    def __init__(self, rules: Sequence[Rule], allow_costlier: bool = False) -> None:
        self._allow_costlier = allow_costlier
        self._index: dict[Anchor, list[Rule]] = defaultdict(list)
        for rule in rules:
            for anchor in rule.anchors:
                self._index[anchor].append(rule)

    def run(self, gm: GraphModule) -> FuseReport:
        """Fuse `gm` in place to a fixpoint and return what was done."""
        _drop_noops(gm)
        fusions: list[Fusion] = []
        refusals: list[Refusal] | None = None
        while True:
            ctx = self._annotate(gm)
            new_convs = self._materialize(gm, ctx)
            gm.delete_all_unused_submodules()
            fusions += [_name(gm, new) for new in new_convs]
            if refusals is None:  # later passes restate them in terms of the new convs
                refusals = ctx.refusals
            if not new_convs:
                break
        gm.graph.lint()
        gm.recompile()
        return FuseReport(fusions, refusals)

    # ---------------------------------------------------------------- annotate

    def _annotate(self, gm: GraphModule) -> Context:
        ctx = Context(gm)
        for node in gm.graph.nodes:
            for rule in self._index.get(_anchor(node, ctx), ()):
                try:
                    region = rule.annotate(node, ctx)
                except FusionRefused as refusal:
                    ctx.refuse(rule.name, [node], refusal)
                    region = None
                except Exception as error:
                    raise RuleError(
                        f"rule {rule.name!r} raised {type(error).__name__} on node {node.name}: {error}"
                    ) from error
                if region is not None:
                    ctx.regions[node] = region
                    break
        return ctx

    # ---------------------------------------------------------------- materialize

    def _materialize(self, gm: GraphModule, ctx: Context) -> list[_NewConv]:
        graph = gm.graph
        replaced: dict[Node, Node] = {}
        new_convs: list[_NewConv] = []
        position = {node: i for i, node in enumerate(graph.nodes)}
        outputs = [n for n in graph.nodes if n in ctx.regions and _is_output(n, ctx.regions)]
        for out in outputs:
            region = ctx.regions[out]
            chosen, cost = plan(region, self._allow_costlier)
            if not isinstance(chosen, Fuse) and len(list(region.leaves())) > 1:
                _refuse_as_dearer(ctx, region, cost)
            if not fuses_anything(chosen):
                continue
            with graph.inserting_before(out):
                new = self._emit(gm, chosen, replaced.get(region.root, region.root), replaced, new_convs)
            out.replace_all_uses_with(new)
            replaced[out] = new
            for node in sorted(region.nodes, key=position.__getitem__, reverse=True):
                if not node.users:
                    graph.erase_node(node)
        return new_convs

    def _emit(
        self, gm: GraphModule, p: Plan, source: Node, replaced: dict[Node, Node], new_convs: list[_NewConv]
    ) -> Node:
        graph = gm.graph
        if isinstance(p, PassThrough):
            return source
        if isinstance(p, Keep):
            old_input = p.leaf.root
            return graph.node_copy(
                p.leaf.node, lambda a: source if a is old_input or a is replaced.get(old_input) else a
            )
        if isinstance(p, Steps):
            for step in p.steps:
                source = self._emit(gm, step, source, replaced, new_convs)
            return source
        if isinstance(p, Add):
            terms = [self._emit(gm, t, source, replaced, new_convs) for t in p.terms]
            total = terms[0]
            for term in terms[1:]:
                total = graph.call_function(operator.add, (total, term))
            return total
        if isinstance(p, Concat):
            terms = [self._emit(gm, t, source, replaced, new_convs) for t in p.terms]
            return graph.call_function(torch.cat, (terms,), {"dim": 1})
        name = f"{_TEMP_PREFIX}{len(new_convs)}_{id(p)}"
        gm.add_submodule(name, p.region.kernel.to_module())
        node = graph.call_module(name, (source,))
        node.meta["reparam"] = {
            "rules": sorted(p.region.rules),
            "sources": [describe(leaf.node) for leaf in p.region.leaves()],
        }
        new_convs.append(_NewConv(node, p.region, original_cost(p.region)))
        return node


def _anchor(node: Node, ctx: Context) -> Anchor:
    if node.op == "call_module":
        return (node.op, type(ctx.module(node)))
    return (node.op, node.target)


def _is_output(node: Node, regions: dict[Node, Region]) -> bool:
    """True if some user of `node` does not fold it into its own region."""
    return any(user not in regions or node not in regions[user].nodes for user in node.users)


def _drop_noops(gm: GraphModule) -> None:
    """Remove eval-mode no-ops (nn.Identity, dropout) from the graph."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        module = modules[node.target]
        if type(module) in _NOOP_TYPES and not module.training:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def _refuse_as_dearer(ctx: Context, region: Region, kept: Cost) -> None:
    fused = Cost.of(region.kernel)
    ctx.refusals.append(
        Refusal(
            "engine",
            Reason.WOULD_COST_MORE,
            f"one conv for this region would cost {float(fused.macs):g} MACs per position and {fused.params} "
            f"parameters, against {float(kept.macs):g} and {kept.params} as emitted",
            tuple(describe(leaf.node) for leaf in region.leaves()),
        )
    )


def _preferred_name(region: Region) -> str:
    """A chain is named after its first layer; a sum of branches `<their common parent>.conv`."""
    if isinstance(region, Chain):
        return _preferred_name(region.parts[0])
    if isinstance(region, Leaf):
        return describe(region.node)
    paths = [describe(leaf.node).split(".") for leaf in region.leaves()]
    common: list[str] = []
    for parts in zip(*paths):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return ".".join(common[: min(len(p) for p in paths) - 1] + ["conv"])


def _name(gm: GraphModule, new: _NewConv) -> Fusion:
    """Move a new conv from its temporary name to one derived from the layers it replaced."""
    preferred = _preferred_name(new.region)
    candidates = [preferred, f"{preferred}_fused"] + [f"{preferred}_fused_{i}" for i in range(1, 1000)]
    final = next(c for c in candidates if _free(gm, c))
    module = gm.get_submodule(new.node.target)
    delattr(gm, new.node.target)
    gm.add_submodule(final, module)
    with gm.graph.inserting_before(new.node):
        renamed = gm.graph.call_module(final, new.node.args)
    renamed.meta = new.node.meta
    new.node.replace_all_uses_with(renamed)
    gm.graph.erase_node(new.node)
    after = Cost.of(new.region.kernel)
    return Fusion(
        module=final,
        sources=tuple(new.node.meta["reparam"]["sources"]),
        rules=tuple(new.node.meta["reparam"]["rules"]),
        macs_before=float(new.before.macs),
        macs_after=float(after.macs),
        params_before=new.before.params,
        params_after=after.params,
    )


def _free(gm: GraphModule, path: str) -> bool:
    owner: object = gm
    for part in path.split("."):
        if not hasattr(owner, part):
            return True
        owner = getattr(owner, part)
        if not isinstance(owner, nn.Module):
            return False
    return False
