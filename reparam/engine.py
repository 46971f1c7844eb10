"""The engine: annotate linear regions on a torch.fx graph, then materialize them as convs.

Each pass:

1. *Replace.* Replacement rules swap the subgraphs they match for the modules they return;
   border writes after a pad become one op (`borders.py`); what forward computes from the
   model's tensors alone is evaluated once and stored (`constants.py`); reads of a
   tensor's metadata (`x.ndim`, `x.shape`) move to an earlier tensor with the same metadata
   (`metadata.py`), so that an assert does not keep a conv output alive; and a per-channel
   layer after a concatenation is applied to each part, where each part's layer absorbs it
   (`distribute.py`); a Linear before a permute to channels-first whose readers fold per
   channel becomes a 1x1 conv after the permute (`channels_first.py`, written back as a Linear
   once fusion is done).
2. *Annotate.* Nodes are visited in graph order; the rules anchored on each node's
   `(op, target)` turn it into a `Region`: a kernel of some earlier tensor (the root), extended
   from the regions of its inputs when that composition is exact and the inputs have no other
   users, and when no in-place op writes to what it reads before its output (`mutation.py`).
3. *Materialize.* A region whose value is needed outside itself is planned (`region.plan`) and,
   where that fuses anything, emitted before its output node; its old nodes are erased, unused
   modules deleted, and each new conv named after the layers it replaced.

Cost, for a graph of n nodes: each pass is O(n) Python work plus the tensor arithmetic of what it
fuses. Replace visits each node's anchor once; annotate extends each region from its inputs'
regions in O(1) kernel operations, and converts a tensor to float64 only when a rule reads its
values (`Kernel` converts lazily, once per tensor; a composed weight is computed only when it is
written or composed further); the plan of a chain of m parts tries segments
starting at most four parts back or extending the last fused one, with costs as prefix sums,
so O(m); materialize erases in one scan and names each new conv after its layers, trying
variants of the name one at a time (usually the first is free). Passes are at most
`_MAX_PASSES` (two or three in practice: one that fuses, one that finds nothing left).
Measured in `benchmarks/fuse_time.py`.

Passes repeat until one changes nothing, so `fuse` of a fused graph changes nothing. Every new
node carries its provenance in `node.meta["reparam"]`. Last, every layer the graph calls becomes a
direct child of the GraphModule (`stages.0.conv` -> `stages_0_conv`), so that the generated
`forward` looks each one up once, as a hand-written forward would, not through a chain of
`nn.Module.__getattr__` calls.
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import chain, count
from typing import Any

from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.fx.experimental.symbolic_shapes import optimization_hint

from .borders import lower_border_writes
from .constants import erase_unused_constants, fold_constants
from .context import Context, attribute, describe, free_name, trainable
from .cost import NOMINAL, Cost, Workload
from .channels_first import lower_convs, raise_linears
from .distribute import distribute_over_concat
from .ranks import propagated
from .errors import FusionRefused, Reason, ReparamError, RuleError
from .metadata import hoist_metadata_reads
from .mutation import Mutations
from .plumbing import drop_noops, unread_plumbing
from .region import (
    AsWritten,
    Chain,
    Fuse,
    Keep,
    Matched,
    Plan,
    Region,
    Steps,
    as_written,
    fuses_anything,
    ops,
    plan,
    writable,
)
from .measured import CLOSE, Stopwatch, winner
from .report import Form, FuseReport, Fusion, Refusal, Replacement, Timing, Unfused
from .rules import Anchor, ReplacementRule, Rule

_TEMP_PREFIX = "_reparam_new_"
_MAX_PASSES = 16


@dataclass(frozen=True)
class _NewModule:
    node: Node
    preferred_name: str
    sources: tuple[str, ...]


class Engine:
    """Runs a sequence of rules over GraphModules. Earlier rules win when several share an anchor."""

    def __init__(self, rules: Sequence[Rule], allow_costlier: bool = False, stopwatch: Stopwatch | None = None) -> None:
        """`stopwatch`: time the close candidate forms of each region on its example inputs (`cost="measure"`)."""
        self._allow_costlier = allow_costlier
        self._stopwatch = stopwatch
        self._index: dict[Anchor, list[Rule]] = defaultdict(list)
        for rule in rules:
            for anchor in rule.anchors:
                self._index[anchor].append(rule)

    def run(self, gm: GraphModule, flatten: bool = True) -> FuseReport:
        """Fuse `gm` in place to a fixpoint and return what was done.

        `flatten`: make each layer the graph calls a direct child of `gm` (for a module's forward;
        an exported program keeps the paths of what fusion left untouched, as its state_dict keys).
        """
        drop_noops(gm)
        _delete_unused_submodules(gm)  # a layer whose call was replaced (inlined.py) must not tie its tensors
        report = FuseReport()
        raised: set[str] = set()
        for index in range(_MAX_PASSES):
            modules = dict(gm.named_modules())
            replaced, replace_refusals = self._replace(gm, modules)
            if replaced:  # the modules it replaced are called no more
                _delete_unused_submodules(gm)
                for new, rule in replaced:
                    report.replacements.append(Replacement(_rename(gm, new), new.sources, rule))
                modules = dict(gm.named_modules())
            lower_border_writes(gm)
            rewrites = Context(gm, self._index, modules)
            fold_constants(gm, rewrites)  # adds tensors, not modules
            hoist_metadata_reads(gm, rewrites)
            distributed = distribute_over_concat(gm, rewrites)  # adds its layers to `modules`, which the Context holds
            raised_now = raise_linears(gm, rewrites)  # as does this
            raised.update(raised_now)
            ctx = self._annotate(gm, modules)
            # read off the graph as annotated: materializing replaces the nodes the regions name
            plumbing = unread_plumbing(ctx.regions, ctx.barriers, ctx.refusals) if index == 0 else []
            fused = self._materialize(gm, ctx, report.timings)
            if fused or distributed or raised_now:  # each leaves layers no node calls
                _delete_unused_submodules(gm)
            for new, region in fused:
                module = _rename(gm, new)
                report.fusions.append(_fusion(module, new, region))
            if index == 0:  # later passes restate the same refusals in terms of the new convs
                report.refusals = replace_refusals + ctx.refusals + plumbing
            if not fused and not replaced:
                break
        else:
            raise ReparamError(
                f"rules were still rewriting the graph after {_MAX_PASSES} passes: does a replacement rule match "
                "the module it returns?"
            )
        # the last pass changed nothing: its context is that of the graph as returned
        report.unfused = _unfused(gm, ctx, report.refusals + ctx.refusals)
        lower_convs(gm, raised)
        moved = _flatten_paths(gm) if flatten else {}
        report.fusions = [replace(f, module=moved.get(f.module, f.module)) for f in report.fusions]
        report.replacements = [replace(r, module=moved.get(r.module, r.module)) for r in report.replacements]
        gm.graph.lint()
        gm.recompile()
        return report

    # ---------------------------------------------------------------- replace

    def _replace(
        self, gm: GraphModule, modules: dict[str, nn.Module]
    ) -> tuple[list[tuple[_NewModule, str]], list[Refusal]]:
        ctx = Context(gm, self._index, modules)
        made: dict[Node, tuple[_NewModule, str]] = {}  # the layers added, by the node calling them
        added = 0
        erased: set[Node] = set()
        for node in list(gm.graph.nodes):
            if node in erased:
                continue
            for rule in self._index.get(ctx.anchor(node), ()):
                if not isinstance(rule, ReplacementRule):
                    continue
                try:
                    result = _call_rule(rule, node, lambda: rule.replacement(node, ctx))
                except FusionRefused as refusal:  # declined, with the reason the report gives
                    ctx.refuse(rule.name, refusal.nodes or [node], refusal)
                    continue
                if result is None:
                    continue
                module, args, interior = result
                sources, called = _replaced_names(interior, made)
                base = called[0] if called else rule.name
                # an nn.Sequential is inlined, one node per layer, so that later rules see its layers
                layers = list(module) if type(module) is nn.Sequential and len(args) == 1 else [module]
                value: Any = tuple(args)
                for layer in layers:
                    name = f"{_TEMP_PREFIX}replaced_{added}"
                    added += 1
                    gm.add_submodule(name, layer)
                    modules[name] = layer  # the Context's: a later match in this pass may read it
                    with gm.graph.inserting_before(node):
                        value = gm.graph.call_module(name, value if isinstance(value, tuple) else (value,))
                    value.meta["reparam"] = {"rules": [rule.name], "sources": list(sources)}
                    weighted = next(layer.parameters(), None) is not None
                    preferred = base if weighted or len(layers) == 1 else f"{base}_{type(layer).__name__.lower()}"
                    made[value] = (_NewModule(value, preferred, sources), rule.name)
                node.replace_all_uses_with(value)
                constants = [a for old in interior for a in old.all_input_nodes if a not in interior]
                for old in interior:
                    gm.graph.erase_node(old)
                    erased.add(old)
                erased |= erase_unused_constants(gm, constants)  # a folded layer-scale's gamma
                break
        return list(made.values()), ctx.refusals

    # ---------------------------------------------------------------- annotate

    def _annotate(self, gm: GraphModule, modules: dict[str, nn.Module]) -> Context:
        ctx = Context(gm, self._index, modules)
        mutations = Mutations(gm, modules)
        for node in gm.graph.nodes:
            for rule in self._index.get(ctx.anchor(node), ()):
                try:
                    region = _call_rule(rule, node, lambda: rule.annotate(node, ctx))
                except FusionRefused as refusal:  # the rule matched and said no: final for this node
                    ctx.refuse(rule.name, refusal.nodes or [node], refusal)
                    break
                if region is None:
                    continue
                crossing = mutations.crossed(region.nodes, node)
                if crossing is None:
                    ctx.regions[node] = region
                else:
                    ctx.refuse(rule.name, region.sources, _mutation_refusal(crossing, node))
                break
        return ctx

    # ---------------------------------------------------------------- materialize

    def _materialize(self, gm: GraphModule, ctx: Context, timings: list[Timing]) -> list[tuple[_NewModule, Region]]:
        graph = gm.graph
        position = {node: i for i, node in enumerate(graph.nodes)}
        replaced: dict[Node, Node] = {}
        new_convs: list[tuple[_NewModule, Region]] = []
        constants: list[Node] = []  # inputs of erased nodes, erased in turn where nothing else reads them
        erased: set[Node] = set()
        inside = _interiors(ctx.regions)
        outputs = [n for n in graph.nodes if n in ctx.regions and _is_output(n, ctx.regions, inside)]
        plans = {out: plan(ctx.regions[out], workload(ctx.regions[out]), self._allow_costlier) for out in outputs}
        measured = self._measure(gm, ctx, plans, timings) if self._stopwatch is not None else {}
        for out in outputs:
            region = ctx.regions[out]
            chosen, cost = plans[out]
            if not isinstance(chosen, Fuse) and len(region.sources) > 1:
                _refuse_as_dearer(ctx, region, cost, workload(region), measured.get(out))
            if not fuses_anything(chosen):
                continue
            with graph.inserting_before(out):
                new = _Emitter(gm, replaced, new_convs).emit(chosen, replaced.get(region.root, region.root))
            out.replace_all_uses_with(new)
            for key in ("tensor_meta", "val"):  # the shape later passes price the new conv's users with
                if key in out.meta:
                    new.meta[key] = out.meta[key]
            new.meta.setdefault("reparam", {"rules": sorted(region.rules), "sources": []})["replaces"] = out.name
            replaced[out] = new
            for node in sorted(region.nodes, key=position.__getitem__, reverse=True):
                if not node.users:
                    constants += [c for c in node.all_input_nodes if c not in region.nodes]
                    graph.erase_node(node)
                    erased.add(node)
        # once, as it scans the graph for the tensors still read
        erase_unused_constants(gm, [c for c in constants if c not in erased])
        return new_convs

    def _measure(
        self, gm: GraphModule, ctx: Context, plans: dict[Node, tuple[Plan, Cost]], timings: list[Timing]
    ) -> dict[Node, Timing]:
        """Time the forms of each region whose estimates are close; put the winners into `plans`."""
        assert self._stopwatch is not None
        candidates: dict[Node, tuple[list[tuple[Form, Plan]], list[tuple[Form, Plan]]]] = {}  # all forms, close ones
        for out, (chosen, cost) in plans.items():
            region = ctx.regions[out]
            if len(region.sources) > 1 and writable(region.kernel):
                forms = _forms(region, chosen, cost, workload(region))
                fastest = min(form.estimated for form, _ in forms)
                close = [(form, p) for form, p in forms if form.estimated <= fastest * CLOSE]
                if len(close) > 1:
                    candidates[out] = forms, close
        if not candidates or self._stopwatch.exhausted:
            return {}
        self._stopwatch.capture(gm, {ctx.regions[out].root for out in candidates})
        measured = {}
        for out, (forms, close) in candidates.items():
            region, x = ctx.regions[out], self._stopwatch.value(ctx.regions[out].root)
            if x is None or self._stopwatch.exhausted:
                continue
            try:
                modules = {form.name: _standalone(gm, p) for form, p in close}
            except _NotStandalone:
                continue
            seconds = self._stopwatch.time(modules, x)
            judged = [(replace(form, measured=seconds.get(form.name)), p) for form, p in forms]
            best = winner([form for form, _ in judged])
            plans[out] = next((p, plans[out][1]) for form, p in judged if form is best)
            sources = tuple(describe(n) for n in region.sources)
            measured[out] = Timing(sources, tuple(form for form, _ in judged), best.name)
            timings.append(measured[out])
        return measured


def _forms(region: Region, chosen: Plan, cost: Cost, load: Workload) -> list[tuple[Form, Plan]]:
    """The distinct exact forms of `region`: one conv, the static plan where it differs, as written."""
    one_conv = Fuse(region)
    written, written_cost = as_written(region, load)
    forms = [(Form("one conv", 1, Cost.of(region.kernel).seconds(load)), one_conv)]
    if not isinstance(chosen, Fuse) and fuses_anything(chosen):
        forms.append((Form("as planned", ops(chosen), cost.seconds(load)), chosen))
    forms.append((Form("as written", ops(written), written_cost.seconds(load)), written))
    return forms


class _NotStandalone(Exception):
    """A form reads a graph value besides its input and the model's tensors: it cannot be timed alone."""


def _standalone(gm: GraphModule, p: Plan) -> GraphModule:
    """`p` as a module of its input alone, sharing `gm`'s layers (to be timed)."""
    graph = Graph()
    x = graph.placeholder("x")
    new_layers: dict[str, nn.Module] = {}
    emitter = _Emitter(gm, {}, [], graph=graph, new_layers=new_layers)
    graph.output(emitter.emit(p, x) if p is not None else x)
    layers: dict[str, Any] = dict(new_layers)
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in layers:
            layers[str(node.target)] = attribute(gm, node)
    return GraphModule(layers, graph)


@dataclass
class _Emitter:
    """Writes a plan into `gm`'s graph at the current insertion point, or into a standalone `graph`.

    Standalone, new layers are collected in `new_layers` and the tensors the plan reads are
    read afresh in `graph`; a plan that reads any other value of `gm`'s graph raises `_NotStandalone`.
    """

    gm: GraphModule
    replaced: dict[Node, Node]
    new_convs: list[tuple[_NewModule, Region]]
    graph: Graph | None = None
    new_layers: dict[str, nn.Module] | None = None

    def _outside(self, node: Any) -> Any:
        """How the written graph refers to `node`, a value outside the plan."""
        if self.graph is None or not isinstance(node, Node):
            return node
        if node.op == "get_attr":
            return self.graph.get_attr(node.target)
        raise _NotStandalone(node.name)

    def emit(self, p: Plan | None, source: Node) -> Node:
        graph = self.gm.graph if self.graph is None else self.graph
        if p is None:  # the input itself
            return source
        if isinstance(p, Keep):
            old_input = p.leaf.root
            inputs = (old_input, self.replaced.get(old_input))
            return graph.node_copy(p.leaf.node, lambda a: source if any(a is i for i in inputs) else self._outside(a))
        if isinstance(p, Steps):
            for step in p.steps:
                source = self.emit(step, source)
            return source
        if isinstance(p, AsWritten):
            root = p.region.root
            env = {root: source, self.replaced.get(root, root): source}
            for node, part in p.parts:
                env[node] = self.emit(part, source)
            for node in p.region.interior:
                copied = graph.node_copy(node, lambda a: env[a] if a in env else self._outside(self.replaced.get(a, a)))
                env[node] = copied
            return env[p.region.output]
        name = f"{_TEMP_PREFIX}{len(self.new_convs)}"
        crop, kernel = p.region.kernel.split_crop()
        if any(crop):
            source = graph.call_function(operator.getitem, (source, _crop_index(crop)))
        conv = kernel.to_batchnorm() if kernel.is_channelwise else kernel.to_module()  # a BN runs faster
        conv.requires_grad_(any(trainable(self.gm, n) for n in p.region.sources))
        if self.new_layers is None:
            self.gm.add_submodule(name, conv)
        else:
            self.new_layers[name] = conv
        node = graph.call_module(name, (source,))
        sources = tuple(describe(n) for n in p.region.sources)
        node.meta["reparam"] = {"rules": sorted(p.region.rules), "sources": list(sources)}
        self.new_convs.append((_NewModule(node, _preferred_name(self.gm, p.region), sources), p.region))
        return node


def _crop_index(crop: tuple[int, ...]) -> tuple[Any, ...]:
    """`x[..., c:-c, ...]`: `crop[d]` cut from both sides of spatial dim d (the last dims, batched or not)."""
    return (Ellipsis, *(slice(c, -c) if c else slice(None) for c in crop))


def _replaced_names(
    interior: tuple[Node, ...], made: dict[Node, tuple[_NewModule, str]]
) -> tuple[tuple[str, ...], list[str]]:
    """The layers a replacement of `interior` stands for, and the paths of the modules it calls, in graph
    order. A layer added earlier in the pass and replaced again stands for what it replaced (and is
    taken out of `made`)."""
    sources: list[str] = []
    called: list[str] = []
    for node in reversed(interior):
        earlier = made.pop(node, None)
        sources += earlier[0].sources if earlier else [describe(node)]
        if node.op == "call_module":
            called.append(earlier[0].preferred_name if earlier else describe(node))
    return tuple(sources), called


def _call_rule(rule: Rule, node: Node, call: Any) -> Any:
    """Run a rule; an unexpected exception is re-raised naming the rule and the node."""
    try:
        return call()
    except (FusionRefused, ReparamError):
        raise
    except Exception as error:
        message = f"rule {rule.name!r} raised {type(error).__name__} on node {node.name}: {error}"
        raise RuleError(message) from error


def _interiors(regions: dict[Node, Region]) -> dict[Node, Region]:
    """The region each interior node of a pattern match belongs to, where no region is anchored on it (the
    `_native_batch_norm_legit_no_training` under its `getitem`)."""
    return {
        node: region
        for region in regions.values()
        if isinstance(region, Matched)
        for node in region.interior
        if node not in regions
    }


def _is_output(node: Node, regions: dict[Node, Region], interiors: dict[Node, Region]) -> bool:
    """True if some user of `node` does not fold it into its own region (or the match it is inside of)."""
    for user in node.users:
        region = regions.get(user) or interiors.get(user)
        if region is None or node not in region.nodes:
            return True
    return False


def _delete_unused_submodules(gm: GraphModule) -> bool:
    """`GraphModule.delete_all_unused_submodules`, in linear time (torch's lists each called module's
    submodules, for every call); whether it deleted any. A module stays when the graph calls it or
    reads a tensor of it, or when it lies inside a called module or around one that stays."""
    called: set[str] = set()
    enclosing: set[str] = set()  # the paths of what the graph calls or reads, and of their parents
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            path = str(node.target).split(".")
            enclosing.update(".".join(path[:i]) for i in range(1, len(path) + 1))
            if node.op == "call_module":
                called.add(str(node.target))
    deleted = False

    def visit(module: nn.Module, prefix: str) -> None:
        nonlocal deleted
        for name, child in list(module._modules.items()):
            path = prefix + name
            if child is None or path in called:
                continue  # a called module stays with all it holds
            if path not in enclosing:
                delattr(module, name)
                deleted = True
            else:
                visit(child, path + ".")

    visit(gm, "")
    return deleted


def _flatten_paths(gm: GraphModule) -> dict[str, str]:
    """Make each module and tensor the graph reads a direct attribute of `gm`; return the moves.

    A call to `stages.0.conv` compiles to `getattr(self.stages, "0").conv(x)`: three Python-level
    `nn.Module.__getattr__` calls per layer per forward, where `self.stages_0_conv(x)` makes one
    (measured: the glue of a fused MobileOne-S0, 43 layers, falls from 4x to under 2x a
    hand-written net's). A tensor of a called module stays on it (`stages_0_conv.weight`);
    others move up, parameters and buffers keeping their kind, buffers their persistence.
    """
    moved: dict[str, str] = {}

    def move(path: str) -> str:
        if path not in moved:
            flat = path.replace(".", "_")
            moved[path] = free_name(gm, flat)
            owner_path, _, name = path.rpartition(".")
            owner = gm.get_submodule(owner_path)
            if name in owner._buffers:
                persistent = name not in owner._non_persistent_buffers_set
                gm.register_buffer(moved[path], owner._buffers[name], persistent=persistent)
            else:
                setattr(gm, moved[path], getattr(owner, name))
        return moved[path]

    nodes = [n for n in gm.graph.nodes if n.op in ("call_module", "get_attr") and "." in str(n.target)]
    for node in nodes:
        if node.op == "call_module":
            node.target = move(str(node.target))
    for node in nodes:
        if node.op == "get_attr":
            owner, _, name = str(node.target).rpartition(".")
            node.target = f"{moved[owner]}.{name}" if owner in moved else move(str(node.target))
    _delete_unused_submodules(gm)
    return moved


def _unfused(gm: GraphModule, ctx: Context, refusals: list[Refusal]) -> list[Unfused]:
    """The per-channel layers of the original graph still in it that no refusal names, each with why it stays."""
    named = {name for refusal in refusals for name in refusal.nodes}
    unfused = []
    for node in gm.graph.nodes:
        if "reparam" in node.meta or describe(node) in named:
            continue
        try:
            if not ctx.layer_kernel(node).is_channelwise:
                continue
        except FusionRefused:  # no layer rule knows it
            continue
        source = node.args[0] if node.args and isinstance(node.args[0], Node) else None
        before = f"reads {_called(ctx, source)}" if source is not None else "reads no tensor of the graph"
        after = ", ".join(_called(ctx, u) for u in node.users) or "nothing"
        reason = f"{before} and feeds {after}: no rule folds it into a layer beside it"
        unfused.append(Unfused(describe(node), _kind(ctx, node), reason))
    return unfused


def _called(ctx: Context, node: Node) -> str:
    """`node` as users know it, with what it calls: `stem.act (ReLU)`, `add (add)`."""
    return f"{describe(node)} ({_kind(ctx, node)})"


def _kind(ctx: Context, node: Node) -> str:
    if node.op == "call_module":
        return type(ctx.module(node)).__name__
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.op)


def _mutation_refusal(op: Node, end: Node) -> FusionRefused:
    return FusionRefused(
        Reason.IN_PLACE_MUTATION,
        f"{describe(op)} writes in place to a tensor this region reads, before {describe(end)}: one kernel "
        "applied at the region's output would read the written value, so the layers stay as written",
    )


def workload(region: Region) -> Workload:
    """What one call of `region` sees: its input's positions and element size, where shapes were propagated."""
    value = propagated(region.root)
    if value is None or not value.dtype.is_floating_point:
        return NOMINAL
    elements = math.prod(optimization_hint(size, fallback=1) for size in value.shape)  # exported sizes: symbols
    return Workload(max(1, elements // region.kernel.in_channels), value.dtype.itemsize)


def _refuse_as_dearer(ctx: Context, region: Region, kept: Cost, load: Workload, timing: Timing | None) -> None:
    fused = Cost.of(region.kernel)
    times = {form.name: form.measured for form in timing.forms} if timing is not None else {}
    if timing is not None and times["one conv"] is not None:
        message = (
            f"one conv for this region measured {times['one conv'] * 1e6:.0f} us on the example inputs, against "
            f"{times[timing.chosen] * 1e6:.0f} us {timing.chosen}"
        )
    else:
        where = "" if load is NOMINAL else f" (on its input of {load.positions} positions)"
        message = (
            f"one conv for this region would take an estimated {fused.seconds(load) * 1e6:.0f} us, against "
            f"{kept.seconds(load) * 1e6:.0f} us as emitted{where} ({float(fused.macs):g} against "
            f"{float(kept.macs):g} MACs per position, {fused.params} against {kept.params} parameters)"
        )
    ctx.refusals.append(
        Refusal("engine", Reason.WOULD_COST_MORE, message, tuple(describe(n) for n in region.sources))
    )


def _preferred_name(gm: GraphModule, region: Region) -> str:
    """A new conv's name: that of the conv it grew from, or `<common parent>.conv` for several branches."""
    if isinstance(region, Chain):  # after its first conv-like layer (not a BN folded into it, not a pool)
        named = [p for p in region.parts if p.sources]
        return _preferred_name(gm, next((p for p in named if not p.kernel.is_channelwise), named[0]))
    branches = [r for _, r in region.parts if r is not None] if isinstance(region, Matched) else []
    if len(branches) == 1:  # a pool, scale or shift over one region
        return _preferred_name(gm, branches[0])
    if len(branches) < 2:  # a layer, or a match of layers: the first with weights (a conv, not its pad)
        weighted = [n for n in region.sources if _has_tensors(gm, n)]
        return describe((weighted or list(region.sources))[0])
    paths = [describe(n).split(".") for n in region.sources]
    common: list[str] = []
    for parts in zip(*paths):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return ".".join(common[: min(len(p) for p in paths) - 1] + ["conv"])


def _has_tensors(gm: GraphModule, node: Node) -> bool:
    if node.op == "call_module":
        return next(gm.get_submodule(node.target).parameters(), None) is not None
    return any(isinstance(a, Node) and a.op == "get_attr" for a in node.args)


def _rename(gm: GraphModule, new: _NewModule) -> str:
    """Move a new module from its temporary name to its preferred one (or a free variant of it)."""
    preferred = new.preferred_name
    candidates = chain([preferred, f"{preferred}_fused"], (f"{preferred}_fused_{i}" for i in count(1)))
    final = next(c for c in candidates if free_path(gm, c))
    module = gm.get_submodule(new.node.target)
    delattr(gm, new.node.target)
    gm.add_submodule(final, module)
    with gm.graph.inserting_before(new.node):
        renamed = gm.graph.call_module(final, new.node.args)
    renamed.meta = new.node.meta
    new.node.replace_all_uses_with(renamed)
    gm.graph.erase_node(new.node)
    return final


def _fusion(module: str, new: _NewModule, region: Region) -> Fusion:
    load = workload(region)
    before, after = as_written(region, load)[1], Cost.of(region.kernel)
    return Fusion(
        module=module,
        sources=new.sources,
        rules=tuple(sorted(region.rules)),
        macs_before=float(before.macs),
        macs_after=float(after.macs),
        params_before=before.params,
        params_after=after.params,
        seconds_before=before.seconds(load),
        seconds_after=after.seconds(load),
    )


def free_path(gm: GraphModule, path: str) -> bool:
    """Whether nothing lives at `path` in `gm` yet (a new submodule may be added there)."""
    owner: object = gm
    for part in path.split("."):
        if not hasattr(owner, part):
            return True
        owner = getattr(owner, part)
        if not isinstance(owner, nn.Module):
            return False
    return False
