"""The engine: annotate linear regions on a torch.fx graph, then materialize them as convs.

Each pass:

1. *Replace.* Replacement rules swap the subgraphs they match for the modules they return.
2. *Annotate.* Nodes are visited in graph order; the rules anchored on each node's
   `(op, target)` turn it into a `Region`: a kernel of some earlier tensor (the root), extended
   from the regions of its inputs when that composition is exact and the inputs have no other
   users.
3. *Materialize.* A region whose value is needed outside itself is planned (`region.plan`) and,
   where that fuses anything, emitted before its output node; its old nodes are erased, unused
   modules deleted, and each new conv named after the layers it replaced.

Passes repeat until one changes nothing, so `fuse` of a fused graph changes nothing. Every new
node carries its provenance in `node.meta["reparam"]`.
"""

from __future__ import annotations

import itertools
import operator
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from .errors import FusionRefused, Reason, ReparamError, RuleError
from .kernel import Kernel
from .region import (
    FREE,
    AsWritten,
    Chain,
    Cost,
    Fuse,
    Keep,
    Leaf,
    Plan,
    Region,
    Steps,
    fuses_anything,
    original_cost,
    plan,
)
from .report import FuseReport, Fusion, Refusal, Replacement
from .rules import Anchor, LinearLayer, ReplacementRule, Rule

_NOOP_TYPES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_MOVES_DATA = (torch.cat, torch.concat, torch.concatenate)
_TEMP_PREFIX = "_reparam_new_"
_MAX_PASSES = 16


class Context:
    """What rules see of the graph while annotating it."""

    def __init__(self, gm: GraphModule, index: dict[Anchor, list[Rule]]) -> None:
        self.regions: dict[Node, Region] = {}
        self.refusals: list[Refusal] = []
        self._gm = gm
        self._index = index
        self._modules = dict(gm.named_modules())
        self._shared_reported: set[Node] = set()
        self._barriers: dict[Node, tuple[str, FusionRefused]] = {}
        self._calls = Counter(n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr"))
        self._owners: dict[int, list[str]] = defaultdict(list)
        for name, module in self._modules.items():
            for tensor in itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False)):
                self._owners[id(tensor)].append(name or type(gm).__name__)

    def module(self, node: Node) -> nn.Module:
        """The module a `call_module` node calls."""
        return self._modules[node.target]

    def anchor(self, node: Node) -> Anchor:
        """The `(op, target)` rules are indexed by: the module's type for `call_module` nodes."""
        if node.op == "call_module":
            return (node.op, type(self.module(node)))
        return (node.op, node.target)

    def constant(self, value: Any) -> Any:
        """A call argument as a constant: tensors stored on the model, possibly reshaped, are fetched.

        Values computed in forward by arithmetic (a standardized weight) are refused: folding
        them would freeze one evaluation of the computation.
        """
        if not isinstance(value, Node):
            return value
        if value.op == "get_attr":
            return _attribute(self._gm, value)
        if _reshapes(value):
            args = [self.constant(a) if isinstance(a, Node) else a for a in value.args]
            if value.op == "call_method":
                return getattr(args[0], value.target)(*args[1:], **value.kwargs)
            return value.target(*args, **value.kwargs)
        raise FusionRefused(
            Reason.NOT_CONSTANT, f"{describe(value)} is computed in forward, so it is not a constant of the model"
        )

    def rank(self, node: Node) -> int | None:
        """The number of dims of `node`'s value, where shapes were propagated or the graph shows it."""
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            return len(meta.shape)
        if node.op == "call_module":
            module = self.module(node)
            if isinstance(module, nn.Flatten):
                return 2 if (module.start_dim, module.end_dim) == (1, -1) else None
            return self.rank(node.args[0]) if isinstance(module, _KEEPS_RANK) and node.args else None
        if node.target in (torch.flatten, "flatten"):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return 2 if (start, end) == (1, -1) else None
        if node.target in (torch.relu, F.relu, F.gelu, F.silu, operator.add, operator.mul) and node.args:
            ranks = {self.rank(a) for a in node.args if isinstance(a, Node)}
            return ranks.pop() if len(ranks) == 1 else None
        return None

    def check_not_shared(self, node: Node) -> None:
        """Refuse (`shared module`) a call whose module or weights are also used elsewhere.

        Folding one call of a module called twice, or of weights tied to another module's,
        would untie them and add parameters, so such layers are left as written.
        """
        if node.op == "call_module":
            module = self.module(node)
            tensors = list(itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False)))
            if tensors and self._calls[node.target] > 1:  # a parameterless module (a pool) may be reused
                raise FusionRefused(
                    Reason.SHARED_MODULE, f"{node.target} is called at {self._calls[node.target]} places"
                )
            for tensor in tensors:
                owners = self._owners[id(tensor)]
                if len(owners) > 1:
                    raise FusionRefused(Reason.SHARED_MODULE, f"{' and '.join(owners)} share a weight tensor")
        for target in [a.target for a in node.args if _is_attr(a)]:
            if self._calls[target] > 1:
                raise FusionRefused(Reason.SHARED_MODULE, f"{target} is read at {self._calls[target]} places")

    def barrier(self, node: Node, rule: str, refusal: FusionRefused) -> None:
        """`node` is a layer that must stay as written; its refusal is reported if anything would fold it."""
        self._barriers[node] = (rule, refusal)
        if node.args and node.args[0] in self.regions:
            self.refuse(rule, [node], refusal)

    def absorbable(self, producer: Node, consumer: Node | None) -> Region | None:
        """The region computing `producer`, if `consumer` is its only user."""
        region = self.regions.get(producer)
        if region is None or consumer is None or set(producer.users) != {consumer}:
            return None
        return region

    def absorb(self, producer: Node, consumer: Node) -> Region | None:
        """`absorbable`, recording a `shared intermediate` refusal when other users prevent it."""
        if producer in self._barriers:
            rule, refusal = self._barriers[producer]
            self.refuse(rule, [producer], refusal)
        region = self.absorbable(producer, consumer)
        if region is None and producer in self.regions and producer not in self._shared_reported:
            self._shared_reported.add(producer)
            others = [describe(u) for u in producer.users if u is not consumer]
            self.refusals.append(
                Refusal(
                    "engine",
                    Reason.SHARED_INTERMEDIATE,
                    f"{describe(producer)} is also used by {', '.join(others)}; folding it into "
                    f"{describe(consumer)} would change what they see, so it stays a separate region",
                    (describe(producer), describe(consumer)),
                )
            )
        return region

    def layer_kernel(self, node: Node) -> Kernel:
        """The kernel a layer rule gives `node`, which must be a call of a known linear layer."""
        for rule in self._index.get(self.anchor(node), ()):
            if isinstance(rule, LinearLayer):
                return rule.kernel_of(node, self)
        raise FusionRefused(Reason.GEOMETRY, f"no layer rule says what {describe(node)} computes")

    def cost_as_written(self, node: Node, region_kernel: Kernel) -> Cost:
        """What `node`, inside a region computing `region_kernel`, costs as written."""
        if node.op == "call_function" and node.target in _MOVES_DATA:
            return FREE
        try:
            return Cost.of(self.layer_kernel(node))
        except FusionRefused:
            return Cost.elementwise(region_kernel)

    def refuse(self, rule: str, nodes: Iterable[Node], refusal: FusionRefused) -> None:
        """Record that `rule` matched `nodes` but would not be exact (once, however often it is met)."""
        record = Refusal(rule, refusal.reason, refusal.message, tuple(describe(n) for n in nodes))
        if record not in self.refusals:
            self.refusals.append(record)


_KEEPS_RANK = (nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Dropout, nn.Identity)
_RESHAPES = {"view", "reshape", "unsqueeze", "squeeze", "flatten", operator.getitem, torch.reshape, torch.unsqueeze}


def _reshapes(node: Node) -> bool:
    """Whether `node` only rearranges the values of its first argument (no arithmetic)."""
    return node.op in ("call_method", "call_function") and node.target in _RESHAPES


def _is_attr(value: Any) -> bool:
    return isinstance(value, Node) and value.op == "get_attr"


def describe(node: Node) -> str:
    """A node as users know it: the module path it calls, or its fx name."""
    return str(node.target) if node.op == "call_module" else node.name


@dataclass(frozen=True)
class _NewModule:
    node: Node
    preferred_name: str
    sources: tuple[str, ...]


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
        report = FuseReport()
        for index in range(_MAX_PASSES):
            replaced = self._replace(gm)
            ctx = self._annotate(gm)
            fused = self._materialize(gm, ctx)
            gm.delete_all_unused_submodules()
            for new, region in fused:
                module = _rename(gm, new)
                report.fusions.append(_fusion(module, new, region))
            for new, rule in replaced:
                report.replacements.append(Replacement(_rename(gm, new), new.sources, rule))
            if index == 0:  # later passes restate the same refusals in terms of the new convs
                report.refusals = ctx.refusals
            if not fused and not replaced:
                break
        else:
            raise ReparamError(
                f"rules were still rewriting the graph after {_MAX_PASSES} passes: does a replacement rule match "
                "the module it returns?"
            )
        gm.graph.lint()
        gm.recompile()
        return report

    # ---------------------------------------------------------------- replace

    def _replace(self, gm: GraphModule) -> list[tuple[_NewModule, str]]:
        ctx = Context(gm, self._index)
        done: list[tuple[_NewModule, str]] = []
        erased: set[Node] = set()
        for node in list(gm.graph.nodes):
            if node in erased:
                continue
            for rule in self._index.get(ctx.anchor(node), ()):
                if not isinstance(rule, ReplacementRule):
                    continue
                result = _call_rule(rule, node, lambda: rule.replacement(node, ctx))
                if result is None:
                    continue
                module, args, interior = result
                name = f"{_TEMP_PREFIX}{len(done)}"
                gm.add_submodule(name, module)
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_module(name, tuple(args))
                sources = tuple(describe(n) for n in reversed(interior))
                new.meta["reparam"] = {"rules": [rule.name], "sources": list(sources)}
                node.replace_all_uses_with(new)
                for old in interior:
                    gm.graph.erase_node(old)
                    erased.add(old)
                modules = [describe(n) for n in reversed(interior) if n.op == "call_module"]
                done.append((_NewModule(new, modules[0] if modules else rule.name, sources), rule.name))
                break
        return done

    # ---------------------------------------------------------------- annotate

    def _annotate(self, gm: GraphModule) -> Context:
        ctx = Context(gm, self._index)
        for node in gm.graph.nodes:
            for rule in self._index.get(ctx.anchor(node), ()):
                try:
                    region = _call_rule(rule, node, lambda: rule.annotate(node, ctx))
                except FusionRefused as refusal:  # the rule matched and said no: final for this node
                    ctx.refuse(rule.name, refusal.nodes or [node], refusal)
                    break
                if region is not None:
                    ctx.regions[node] = region
                    break
        return ctx

    # ---------------------------------------------------------------- materialize

    def _materialize(self, gm: GraphModule, ctx: Context) -> list[tuple[_NewModule, Region]]:
        graph = gm.graph
        position = {node: i for i, node in enumerate(graph.nodes)}
        replaced: dict[Node, Node] = {}
        new_convs: list[tuple[_NewModule, Region]] = []
        outputs = [n for n in graph.nodes if n in ctx.regions and _is_output(n, ctx.regions)]
        for out in outputs:
            region = ctx.regions[out]
            chosen, cost = plan(region, self._allow_costlier)
            if not isinstance(chosen, Fuse) and len(region.sources) > 1:
                _refuse_as_dearer(ctx, region, cost)
            if not fuses_anything(chosen):
                continue
            with graph.inserting_before(out):
                new = _Emitter(gm, replaced, new_convs).emit(chosen, replaced.get(region.root, region.root))
            out.replace_all_uses_with(new)
            new.meta.setdefault("reparam", {"rules": sorted(region.rules), "sources": []})["replaces"] = out.name
            replaced[out] = new
            constants: list[Node] = []
            for node in sorted(region.nodes, key=position.__getitem__, reverse=True):
                if not node.users:
                    constants += node.all_input_nodes
                    graph.erase_node(node)
            _erase_unused_constants(gm, constants)
        return new_convs


@dataclass
class _Emitter:
    """Writes a plan into the graph at the current insertion point."""

    gm: GraphModule
    replaced: dict[Node, Node]
    new_convs: list[tuple[_NewModule, Region]]

    def emit(self, p: Plan | None, source: Node) -> Node:
        graph = self.gm.graph
        if p is None:  # the input itself
            return source
        if isinstance(p, Keep):
            old_input = p.leaf.root
            inputs = (old_input, self.replaced.get(old_input))
            return graph.node_copy(p.leaf.node, lambda a: source if any(a is i for i in inputs) else a)
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
                env[node] = graph.node_copy(node, lambda a: env.get(a, self.replaced.get(a, a)))
            return env[p.region.output]
        name = f"{_TEMP_PREFIX}{len(self.new_convs)}"
        conv = p.region.kernel.to_module()
        conv.requires_grad_(any(_trainable(self.gm, n) for n in p.region.sources))
        self.gm.add_submodule(name, conv)
        node = graph.call_module(name, (source,))
        sources = tuple(describe(n) for n in p.region.sources)
        node.meta["reparam"] = {"rules": sorted(p.region.rules), "sources": list(sources)}
        self.new_convs.append((_NewModule(node, _preferred_name(p.region), sources), p.region))
        return node


def _trainable(gm: GraphModule, node: Node) -> bool:
    """Whether a source layer had a parameter that requires grad (a frozen model stays frozen)."""
    if node.op == "call_module":
        return any(p.requires_grad for p in gm.get_submodule(node.target).parameters())
    return any(
        isinstance(a, Node) and a.op == "get_attr" and getattr(_attribute(gm, a), "requires_grad", False)
        for a in node.args
    )


def _attribute(gm: GraphModule, node: Node) -> Any:
    owner: Any = gm
    for part in str(node.target).split("."):
        owner = getattr(owner, part)
    return owner


def _call_rule(rule: Rule, node: Node, call: Any) -> Any:
    """Run a rule; an unexpected exception is re-raised naming the rule and the node."""
    try:
        return call()
    except (FusionRefused, ReparamError):
        raise
    except Exception as error:
        message = f"rule {rule.name!r} raised {type(error).__name__} on node {node.name}: {error}"
        raise RuleError(message) from error


def _is_output(node: Node, regions: dict[Node, Region]) -> bool:
    """True if some user of `node` does not fold it into its own region."""
    return any(user not in regions or node not in regions[user].nodes for user in node.users)


def _erase_unused_constants(gm: GraphModule, candidates: list[Node]) -> None:
    """Erase the constants (tensor attributes, reshaped) left without users, and the tensors no node reads."""
    attributes: set[str] = set()
    erased: set[Node] = set()
    while candidates:
        node = candidates.pop()
        if node in erased or node.users or not (node.op == "get_attr" or _reshapes(node)):
            continue
        erased.add(node)
        if node.op == "get_attr":
            attributes.add(str(node.target))
        candidates += node.all_input_nodes
        gm.graph.erase_node(node)
    still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in attributes - still_read:
        owner_path, _, name = target.rpartition(".")
        owner = gm.get_submodule(owner_path)
        if hasattr(owner, name):
            delattr(owner, name)


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
            tuple(describe(n) for n in region.sources),
        )
    )


def _preferred_name(region: Region) -> str:
    """A chain is named after its first layer; a region of several branches `<their common parent>.conv`."""
    if isinstance(region, Chain):  # after its first conv-like layer (not a BN folded into it)
        return _preferred_name(next((p for p in region.parts if not p.kernel.is_channelwise), region.parts[0]))
    if isinstance(region, Leaf) or len(region.sources) == 1:
        return describe(region.sources[0])
    paths = [describe(n).split(".") for n in region.sources]
    common: list[str] = []
    for parts in zip(*paths):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return ".".join(common[: min(len(p) for p in paths) - 1] + ["conv"])


def _rename(gm: GraphModule, new: _NewModule) -> str:
    """Move a new module from its temporary name to its preferred one (or a free variant of it)."""
    preferred = new.preferred_name
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
    return final


def _fusion(module: str, new: _NewModule, region: Region) -> Fusion:
    before, after = original_cost(region), Cost.of(region.kernel)
    return Fusion(
        module=module,
        sources=new.sources,
        rules=tuple(sorted(region.rules)),
        macs_before=float(before.macs),
        macs_after=float(after.macs),
        params_before=before.params,
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
