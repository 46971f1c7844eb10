"""What rules see of the graph while annotating it: modules, constants, regions, ranks, sharing."""

from __future__ import annotations

import functools
import itertools
import operator
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.weight_norm import WeightNorm
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from .errors import FusionRefused, Reason
from .kernel import Kernel
from .cost import FREE, Cost
from .ranks import propagated, rank_of, stored_rank
from .region import Region
from .report import Refusal
from .rules import Anchor, LinearLayer, Rule

CONCATENATIONS = (torch.cat, torch.concat, torch.concatenate)
_MOVES_DATA = (*CONCATENATIONS, operator.getitem)  # priced as free: copies or views


class Context:
    """What rules see of the graph while annotating it."""

    def __init__(
        self, gm: GraphModule, index: dict[Anchor, list[Rule]], modules: dict[str, nn.Module] | None = None
    ) -> None:
        """`modules`: `dict(gm.named_modules())`, where the caller has it (one walk serves a whole pass)."""
        self.regions: dict[Node, Region] = {}
        self.refusals: list[Refusal] = []
        self._gm = gm
        self._index = index
        self._modules = dict(gm.named_modules()) if modules is None else modules
        self._shared_reported: set[Node] = set()
        self._barriers: dict[Node, tuple[str, FusionRefused]] = {}
        self._calls = Counter(n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr"))
        self._ranks: dict[Node, int | None] = {}

    @functools.cached_property
    def _owners(self) -> dict[int, list[str]]:
        """The modules holding each tensor (by id), built when a layer is first checked for tied weights."""
        owners: dict[int, list[str]] = defaultdict(list)
        for name, module in self._modules.items():
            for tensor in own_tensors(module):
                owners[id(tensor)].append(name or type(self._gm).__name__)
        return owners

    @property
    def modules(self) -> dict[str, nn.Module]:
        """The graph's modules by qualified name."""
        return self._modules

    def module(self, node: Node) -> nn.Module:
        """The module a `call_module` node calls."""
        return self._modules[node.target]

    def anchor(self, node: Node) -> Anchor:
        """The `(op, target)` rules are indexed by: the module's type for `call_module` nodes."""
        if node.op == "call_module":
            return (node.op, layer_class(self.module(node)))
        return (node.op, node.target)

    def has_rules(self, node: Node) -> bool:
        """Whether some rule anchors on `node` (so that it may be folded into a region)."""
        return bool(self._index.get(self.anchor(node)))

    def rules_of(self, node: Node) -> tuple[Rule, ...]:
        """The rules anchored on `node`, in the order they are tried."""
        return tuple(self._index.get(self.anchor(node), ()))

    def constant(self, value: Any) -> Any:
        """A call argument as a constant: tensors stored on the model, possibly reshaped, are fetched.

        Values computed in forward by arithmetic (a standardized weight) are refused: folding
        them would freeze one evaluation of the computation.
        """
        if not isinstance(value, Node):
            return value
        if value.op == "get_attr":
            return attribute(self._gm, value)
        if reshapes(value):  # its arguments too, inside tuples (an index `w[:, idx]`)
            args, kwargs = map_arg(value.args, self.constant), map_arg(value.kwargs, self.constant)
            if value.op == "call_method":
                return getattr(args[0], value.target)(*args[1:], **kwargs)
            return value.target(*args, **kwargs)
        raise FusionRefused(
            Reason.NOT_CONSTANT, f"{describe(value)} is computed in forward, so it is not a constant of the model"
        )

    def rank(self, node: Node) -> int | None:
        """The number of dims of `node`'s value, where propagated shapes or the graph itself say (`ranks.py`)."""
        if not self._ranks:  # all at once, in graph order: each node's arguments come first
            for other in self._gm.graph.nodes:
                self._ranks[other] = self._infer_rank(other)
        if node not in self._ranks:  # added since
            self._ranks[node] = self._infer_rank(node)
        return self._ranks[node]

    def _infer_rank(self, node: Node) -> int | None:
        if node.op == "get_attr":
            return stored_rank(attribute(self._gm, node))
        return rank_of(node, self._rank_of_argument, self.module)

    def _rank_of_argument(self, value: Any) -> int | None:
        if isinstance(value, Node):
            return self.rank(value)
        return None if isinstance(value, bool) else stored_rank(value)

    def identity(self, node: Node, spatial_dims: int) -> Kernel:
        """The identity kernel of `node`'s value, a tensor no region computes (a block's input).

        Its channel count, dtype and device come from a layer that reads it or makes it (through
        activations), else from propagated shapes; `FusionRefused` (`geometry`) if none says.
        """
        like = self._neighbouring_layer(node, spatial_dims)
        if like is not None:
            return Kernel.identity(like.in_channels, spatial_dims, dtype=like.dtype, device=like.device)
        meta = propagated(node)
        if meta is not None and len(meta.shape) in (spatial_dims + 1, spatial_dims + 2):
            device = next(itertools.chain(self._gm.parameters(), self._gm.buffers()), torch.empty(0)).device
            return Kernel.identity(meta.shape[-spatial_dims - 1], spatial_dims, dtype=meta.dtype, device=device)
        raise FusionRefused(
            Reason.GEOMETRY,
            f"the channel count of {describe(node)} is unknown: no layer reads or makes it "
            "(pass example_inputs so that shapes are propagated)",
        )

    def _neighbouring_layer(self, node: Node, spatial_dims: int) -> Kernel | None:
        """The kernel of a layer reading `node`, or, as seen from its input, of the one making it."""
        readers = [u for u in node.users if u.args and u.args[0] is node]
        producer = node
        while producer.op == "call_module" and isinstance(self.module(producer), _ELEMENTWISE) and producer.args:
            producer = producer.args[0]
        for candidate, seen_from_input in [*((u, True) for u in readers), (producer, False)]:
            try:
                kernel = self.layer_kernel(candidate, over_channels=True)
            except FusionRefused:
                continue
            if kernel.dims_known and kernel.spatial_dims == spatial_dims and not kernel.transposed:
                return kernel if seen_from_input else Kernel.identity(
                    kernel.out_channels, spatial_dims, dtype=kernel.dtype, device=kernel.device
                )
        return None

    def check_foldable(self, node: Node) -> None:
        """Refuse a call whose module has hooks (`hooked module`), a `forward` set on the instance
        (`patched forward`), or is also used elsewhere (`shared module`).

        A forward hook or pre-hook runs only while its module is called, and may change what it
        returns; folding the module would drop it. Folding one call of a module called twice, or
        of weights tied to another module's, would untie them and add parameters. Such layers
        are left as written.
        """
        if node.op == "call_module":
            module = self.module(node)
            refusal = runs_more_than_its_class(module)
            if refusal is not None:
                raise FusionRefused(refusal.reason, f"{node.target}: {refusal.message}; it is kept as written")
            tensors = own_tensors(module)
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

    @property
    def barriers(self) -> list[Node]:
        """The linear layers that stay as written (a Linear whose input rank is unknown), in graph order."""
        return list(self._barriers)

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

    def layer_kernel(self, node: Node, over_channels: bool = False) -> Kernel:
        """The kernel a layer rule gives `node`, which must be a call of a known linear layer.

        `over_channels`: only a layer that maps dim 1 (not `nn.Linear`, which maps the last dim).
        """
        for rule in self._index.get(self.anchor(node), ()):
            if isinstance(rule, LinearLayer) and not (over_channels and rule.features_last):
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


_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU, nn.Sigmoid, nn.Mish, nn.Identity)
_RESHAPES = {"view", "reshape", "unsqueeze", "squeeze", "flatten", operator.getitem, torch.reshape, torch.unsqueeze}


def layer_class(module: nn.Module) -> type[nn.Module]:
    """The class whose forward `module` runs, which rules know it by.

    A module with parametrized tensors (`torch.nn.utils.parametrize`: weight norm, spectral norm,
    orthogonal) has a class torch.nn derives from its own, adding only the properties that
    compute those tensors from their originals: it is a layer of the class it derives from, with
    the weight its parametrization gives (read once, at fuse time, as a constant of the model).
    """
    parametrized = isinstance(module._modules.get("parametrizations"), nn.ModuleDict)  # is_parametrized, cheaply first
    return type(module).__bases__[0] if parametrized and parametrize.is_parametrized(module) else type(module)


def runs_more_than_its_class(module: nn.Module) -> FusionRefused | None:
    """Why calling `module` does more than its class's forward (`patched forward`, `hooked module`), or None."""
    if "forward" in vars(module):
        message = "its forward was replaced on the instance, so it may not compute what its class does"
        return FusionRefused(Reason.PATCHED_FORWARD, message)
    hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
    if any(isinstance(h, WeightNorm) for h in hooks):
        message = (
            "torch.nn.utils.weight_norm's hook computes its weight from weight_g and weight_v at every call; "
            "use torch.nn.utils.parametrizations.weight_norm instead (reparam folds it), or call "
            "torch.nn.utils.remove_weight_norm on the layer before fusing"
        )
        return FusionRefused(Reason.HOOKED_MODULE, message)
    if hooks:
        names = ", ".join(getattr(h, "__name__", type(h).__name__) for h in hooks)
        return FusionRefused(Reason.HOOKED_MODULE, f"it has forward hooks ({names}) that run only while it is called")
    return None


def reshapes(node: Node) -> bool:
    """Whether `node` only rearranges the values of its first argument (no arithmetic)."""
    return node.op in ("call_method", "call_function") and node.target in _RESHAPES


def _is_attr(value: Any) -> bool:
    return isinstance(value, Node) and value.op == "get_attr"


def describe(node: Node) -> str:
    """A node as users know it: the module path it calls, or its fx name."""
    return str(node.target) if node.op == "call_module" else node.name


def free_name(gm: GraphModule, base: str) -> str:
    """`base`, or the first of `base_1`, `base_2`, ... that names nothing on `gm` yet."""
    return next(c for c in itertools.chain([base], (f"{base}_{i}" for i in itertools.count(1))) if not hasattr(gm, c))


def substitute(gm: GraphModule, old: Node, new: Node, *read_only_by_old: Node) -> None:
    """Let `new`, which computes the same value, stand for `old`: its users and propagated shapes move
    over, then `old` and the nodes only it read are erased."""
    for key in ("tensor_meta", "val"):
        if key in old.meta:
            new.meta[key] = old.meta[key]
    old.replace_all_uses_with(new)
    for node in (old, *read_only_by_old):
        gm.graph.erase_node(node)


def trainable(gm: GraphModule, node: Node) -> bool:
    """Whether a layer had a parameter that requires grad (a frozen model stays frozen): its module's, or a
    tensor of the model it reads (a functional layer)."""
    if node.op == "call_module":
        return any(p.requires_grad for p in gm.get_submodule(node.target).parameters())
    return any(
        isinstance(a, Node) and a.op == "get_attr" and getattr(attribute(gm, a), "requires_grad", False)
        for a in node.args
    )


def attribute(gm: GraphModule, node: Node) -> Any:
    owner: Any = gm
    for part in str(node.target).split("."):
        owner = getattr(owner, part)
    return owner


def own_tensors(module: nn.Module) -> list[torch.Tensor]:
    """`module`'s parameters and buffers, not its children's (`parameters(recurse=False)` without
    its generator machinery, which costs more than the lookup: this runs for every layer, every pass)."""
    return [t for t in itertools.chain(module._parameters.values(), module._buffers.values()) if t is not None]
