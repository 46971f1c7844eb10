"""The torch.fx front end: trace a model, keeping every layer a rule knows as one node.

`trace` traces one module or raises `NotTraceableError`, also when its forward writes to a
parameter or buffer in place (torch.fx runs such a write at trace time and drops it from the
graph; the trace's write is undone for buffers). `fuse_tree` is what `fuse` runs: it
fuses the whole model if its forward traces, and otherwise descends into its children, so the
largest traceable submodules are fused and the untraceable parts stay as written (and are
reported with the tracer's reason).
"""

from __future__ import annotations

import functools
import inspect
import io
import operator
from collections.abc import Callable, Sequence
from contextlib import redirect_stderr, suppress
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.fx._symbolic_trace import _assert_is_none
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._pytree import tree_flatten

from .borders import pad_with_border
from .context import layer_class, runs_more_than_its_class
from .errors import InvalidArgumentError, NotTraceableError, ReparamError, first_line
from .export import fuse_aten_module
from .exported_parts import Calls, called_children, crosses_children, exported_part, linear_ops, record_calls
from .inlined import inline_untraceable_layers, name_the_fix
from .measured import EXAMPLE_INPUTS
from .mutation import out_of_place_where_unseen
from .report import Exported, FuseReport, Untraced
from .rules import Rule, plain_functions
from .sharing import attributes_undone, deep_copy, share, unshare, writes_undone
from .verify import cloned, compare


class _LeafTracer(torch.fx.Tracer):
    """torch.fx's tracer, with the module types rules anchor on (and the user's) kept as leaves.

    A module with hooks or with a `forward` set on the instance is a leaf too: tracing into it
    would record its class's forward and drop the hooks. So is a module of a class in
    `untraceable` (class -> why its forward does not trace). `kept` lists those that no rule
    knows (they are reported as not traced).
    """

    def __init__(
        self,
        leaf_types: frozenset[type] = frozenset(),
        functions: tuple[Callable, ...] = (),
        untraceable: dict[type, str] | None = None,
    ) -> None:
        # defaults: unpickling a GraphModule re-traces its code with `tracer_cls()`
        super().__init__(autowrap_functions=(*functions, pad_with_border))
        self.leaf_types = leaf_types
        self.untraceable = untraceable or {}
        self.kept: dict[str, tuple[str, str]] = {}

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _AssignableProxy(node, self)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if layer_class(m) in self.leaf_types:
            return True
        if type(m) in self.untraceable:
            self.kept[module_qualified_name] = (type(m).__name__, self.untraceable[type(m)])
            return True
        refusal = runs_more_than_its_class(m)
        if refusal is not None:
            self.kept[module_qualified_name] = (type(m).__name__, f"{refusal.message}; kept as written so it runs")
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, torch.fx.Proxy]) -> Any:
        """torch.fx's `getattr`: a parameter or buffer read in forward becomes a `get_attr` of its path.

        Its path is looked up by identity in a dict built once, where torch.fx scans every parameter
        and buffer of the model at each read: quadratic in a model whose forwards read their own
        tensors, as timm's norm-act layers (`F.batch_norm(x, self.running_mean, ...)`) do.
        """
        parameters, buffers = self._tensor_paths
        path = parameters.get(id(attr_val)) if isinstance(attr_val, nn.Parameter) else None
        if path is None and self.proxy_buffer_attributes and isinstance(attr_val, torch.Tensor):
            path = buffers.get(id(attr_val))
        if path is None:
            return attr_val
        if path not in parameter_proxy_cache:
            node = self.create_proxy("get_attr", path, (), {}).node
            parameter_proxy_cache[path] = _StoredTensorProxy(node, self, attr_val)
        return parameter_proxy_cache[path]

    def create_arg(self, a: Any) -> Any:
        """torch.fx's `create_arg`, a parameter or buffer passed as an argument found by its id (as in `getattr`).

        A Proxy and a plain number or string are what torch.fx would return them as, without first
        asking whether their type is a registered opaque type (a weak-dict lookup per argument).
        """
        if isinstance(a, torch.fx.Proxy):
            return a.node
        if a is None or type(a) in (int, float, bool, str):
            return a
        if isinstance(a, torch.Tensor):
            parameters, buffers = self._tensor_paths
            path = parameters.get(id(a)) if isinstance(a, nn.Parameter) else buffers.get(id(a))
            if path is not None:
                return self.create_node("get_attr", path, (), {})
        return super().create_arg(a)

    @functools.cached_property
    def _tensor_paths(self) -> tuple[dict[int, str], dict[int, str]]:
        """The first path of each parameter and of each buffer of the traced model, by id (as torch.fx finds them)."""
        parameters: dict[int, str] = {}
        buffers: dict[int, str] = {}
        for name, tensor in self.root.named_parameters():
            parameters.setdefault(id(tensor), name)
        for name, tensor in self.root.named_buffers():
            buffers.setdefault(id(tensor), name)
        return parameters, buffers

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict[str, Any]) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as error:
            if not hasattr(error, _FAILED_IN):  # the innermost module whose forward raised
                with suppress(AttributeError):
                    setattr(error, _FAILED_IN, m)
            raise


def _augmented(op: Callable[[Any, Any], Any]) -> Callable[[torch.fx.Proxy, Any], torch.fx.Proxy]:
    def assign(self: torch.fx.Proxy, other: Any) -> torch.fx.Proxy:
        self.node = self.tracer.create_proxy("call_function", op, (self, other), {}).node
        return self  # every name bound to this tensor now reads the updated value, as in eager

    return assign


class _AssignableProxy(torch.fx.Proxy):
    """A Proxy that records item assignment (`y[:, :, :p] = v`) as an `operator.setitem` node, and
    augmented assignment (`y += t`) as the in-place op it is on a tensor.

    torch.fx's own Proxy turns `z += t` into `z = z + t`: a new value bound to `z` alone, so after
    `z = y; z += t`, `y` keeps the old value where eager PyTorch changed `y` too. Here the one
    Proxy object that every alias holds moves to the `operator.iadd` node instead;
    `mutation.out_of_place_where_unseen` then writes it as `z + t` wherever nothing else can see
    the difference.
    """

    def __setitem__(self, key: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    __iadd__ = _augmented(operator.iadd)
    __isub__ = _augmented(operator.isub)
    __imul__ = _augmented(operator.imul)
    __itruediv__ = _augmented(operator.itruediv)


class _StoredTensorProxy(_AssignableProxy):
    """A parameter or buffer read in forward, whose shape reads are the numbers they are.

    A stored tensor's shape is a constant of the model (loading a state dict cannot change it),
    so `t, i, h, w = self.weight.size()` and `int(t / groups)` (OREPA's kernel generation) trace
    as the Python arithmetic they are, as torch.fx's own `param_shapes_constant` does for
    parameters. Its dtype and device are not read this way: `.to()` may change them later.
    """

    def __init__(self, node: Node, tracer: torch.fx.Tracer, tensor: torch.Tensor) -> None:
        super().__init__(node, tracer)
        self.tensor = tensor

    @property
    def shape(self) -> torch.Size:
        return self.tensor.shape

    @property
    def ndim(self) -> int:
        return self.tensor.ndim

    def size(self, *dim: int) -> Any:
        return self.tensor.size(*dim)

    def dim(self) -> int:
        return self.tensor.dim()

    def numel(self) -> int:
        return self.tensor.numel()

    def nelement(self) -> int:
        return self.tensor.nelement()

    def __len__(self) -> int:
        return len(self.tensor)


_FAILED_IN = "_reparam_failed_in"


def trace(
    model: nn.Module,
    rules: Sequence[Rule],
    leaf_modules: Sequence[type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
) -> GraphModule:
    """A GraphModule of `model` (sharing its submodules); layers rules anchor on stay single nodes.

    A layer without submodules whose forward does not trace (padding computed from `x.size()`
    in Python, as timm's `Conv2dSame`) is kept as one call and the trace retried, class by
    class, so that the rest of its parent is still traced: there is nothing inside it to fuse.
    Any other failure is `NotTraceableError`, and the caller fuses inside the model's children
    instead, keeping the structure its forward may rely on (a routing loop over a Sequential).
    """
    leaf_types = frozenset(target for rule in rules for op, target in rule.anchors if op == "call_module")
    if (refusal := runs_more_than_its_class(model)) is not None:
        raise NotTraceableError(f"{type(model).__name__} is not traced: {refusal.message}; kept as written so it runs")
    untraceable: dict[type, str] = {}
    while True:
        tracer = _LeafTracer(leaf_types | frozenset(leaf_modules), plain_functions(rules), untraceable)
        with writes_undone(model) as written, attributes_undone(model):
            try:
                graph = tracer.trace(model, concrete_args)
                break
            except Exception as error:
                failed = getattr(error, _FAILED_IN, None)
                layer = failed is not None and failed is not model and next(failed.children(), None) is None
                if not layer or type(failed) in untraceable:
                    raise NotTraceableError(
                        f"torch.fx could not trace {type(model).__name__}.forward: {type(error).__name__}: {error}. "
                        "Pass the offending submodule types as leaf_modules=..., fixed arguments as "
                        "concrete_args=..., or let fuse descend into the traceable submodules"
                    ) from error
                reason = f"{type(error).__name__}: {first_line(error)[:160]}"
                untraceable[type(failed)] = f"its forward does not trace ({reason})"
    if written:
        raise NotTraceableError(
            f"{type(model).__name__}.forward writes in place to {', '.join(written)}: torch.fx runs such a write "
            "once while tracing and leaves it out of the graph, so the traced graph would not compute what forward "
            "does"
        )
    optional = _optional_arguments_read(model, graph, concrete_args)
    if optional and _branches_on_none(model, graph, rules, leaf_modules, concrete_args, optional):
        raise NotTraceableError(
            f"{type(model).__name__}.forward reads its optional argument(s) {', '.join(optional)} and also runs "
            "without them: a trace keeps only one of the two cases (`if skip is not None` is not recorded), so "
            "the graph would not compute what forward does when they are left out"
        )
    out_of_place_where_unseen(graph, dict(tracer.root.named_modules()))
    for node in graph.nodes:  # annotations kept as strings (`from __future__ import annotations`) do not pickle
        if isinstance(node.type, str):
            node.type = None
    gm = _LazyGraphModule(tracer.root, graph, type(model).__name__)  # its code is generated when first run
    gm.meta["reparam_kept"] = tracer.kept
    return gm


def _compiled(gm: GraphModule) -> GraphModule:
    """The fused `gm` as a plain GraphModule, as `symbolic_trace` makes (TorchScript takes no lazy one).

    A trace is a `_LazyGraphModule` (torch.fx's own, made for graphs that are rewritten before they
    run) so that the code of the unfused graph is never generated and compiled: that was a
    second of fusing a 5,000-block net. Its state moves to a GraphModule that compiles once.
    """
    if not isinstance(gm, _LazyGraphModule):
        return gm
    plain = GraphModule(nn.Module(), Graph(), type(gm).__name__)
    plain.__dict__.update((key, value) for key, value in vars(gm).items() if key != "_graph")
    plain.graph = gm.graph
    return plain


def _optional_arguments_read(
    model: nn.Module, graph: torch.fx.Graph, concrete_args: dict[str, Any] | None
) -> list[str]:
    """The arguments of `model.forward` that default to None and that the traced graph reads."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return []
    optional = {n for n, p in parameters.items() if p.default is None and n not in (concrete_args or {})}
    return [str(n.target) for n in graph.nodes if n.op == "placeholder" and str(n.target) in optional and n.users]


def _branches_on_none(
    model: nn.Module,
    graph: torch.fx.Graph,
    rules: Sequence[Rule],
    leaf_modules: Sequence[type[nn.Module]],
    concrete_args: dict[str, Any] | None,
    optional: list[str],
) -> bool:
    """Whether `model`'s forward, traced with the `optional` arguments left as None, runs other ops than `graph`.

    Then forward decides on them in Python (`if skip is not None`), which no one graph records.
    Where it runs the same ops (`y + skip` whatever skip is), the graph is what forward does.
    """
    try:
        without = trace(model, rules, leaf_modules, {**(concrete_args or {}), **dict.fromkeys(optional)})
    except NotTraceableError:
        return False
    return _ops(without.graph) != _ops(graph)


def _ops(graph: torch.fx.Graph) -> list[tuple[str, Any]]:
    skipped = ("placeholder", "output")
    return [(n.op, n.target) for n in graph.nodes if n.op not in skipped and n.target is not _assert_is_none]


def _fuse_children(
    module: nn.Module,
    run: Callable[..., FuseReport],
    rules: Sequence[Rule],
    leaf_modules: Sequence[type[nn.Module]],
    path: str,
    calls: Calls,
) -> FuseReport:
    """Fuse inside each child of a module whose own forward is kept, so that it sees what it saw.

    Its forward may iterate or index a container child (`for m in self.model`), so a container
    stays a container: a Sequential fused whole becomes a Sequential of its fused layers when
    it is still a chain, and otherwise, like a ModuleList or ModuleDict, has its elements fused
    one by one. Another child replaced by its fused GraphModule keeps the plain attributes the
    parent may read (ultralytics routes on `m.f`). `calls` has the inputs each child got in an
    example forward, where one was run.
    """
    report = FuseReport()
    for name, child in list(module.named_children()):
        if next(child.children(), None) is None and type(child) not in leaf_modules:
            continue  # a single layer: nothing inside it to fuse
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            report.extend(_fuse_children(child, run, rules, leaf_modules, f"{path}{name}.", calls))
            continue
        fused, child_report = fuse_tree(
            child, run, rules, leaf_modules, None, f"{path}{name}.", calls.get(id(child)), calls
        )
        if isinstance(child, nn.Sequential) and fused is not child:
            fused = _as_sequential(fused)
            if fused is None:  # not a chain of layers any more: fuse inside each element instead
                report.extend(_fuse_children(child, run, rules, leaf_modules, f"{path}{name}.", calls))
                continue
        elif fused is not child:
            _copy_plain_attributes(child, fused)
        setattr(module, name, fused)
        report.extend(child_report)
    return report


def _as_sequential(gm: nn.Module) -> nn.Sequential | None:
    """A fused Sequential as an `nn.Sequential` again (iterable, indexable), if its graph is a chain of layers."""
    if not isinstance(gm, GraphModule):
        return None
    nodes = list(gm.graph.nodes)
    if len(nodes) < 2 or nodes[0].op != "placeholder" or nodes[-1].op != "output":
        return None
    layers, previous = [], nodes[0]
    for node in nodes[1:-1]:
        if node.op != "call_module" or node.args != (previous,) or node.kwargs or len(previous.users) != 1:
            return None
        layers.append(gm.get_submodule(str(node.target)))
        previous = node
    return nn.Sequential(*layers) if nodes[-1].args == (previous,) else None


def _copy_plain_attributes(original: nn.Module, fused: nn.Module) -> None:
    """The plain attributes of `original` (not its submodules, parameters, buffers or nn.Module's state) on `fused`.

    On a GraphModule they are also listed where torch.fx keeps attributes through `copy.deepcopy`
    (`meta["_user_preserved_attributes"]`), which otherwise rebuilds it with only what its graph reads.
    """
    for key, value in vars(original).items():
        own = key in vars(fused) or key in fused._modules or key in fused._parameters or key in fused._buffers
        if key.startswith("_") or key in ("training", "forward") or own:
            continue  # instance attributes shadow class ones (ultralytics sets `m.type`), as on the original
        setattr(fused, key, value)
        if isinstance(fused, GraphModule):
            fused.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})[key] = value


def fuse_tree(
    module: nn.Module,
    run: Callable[..., FuseReport],
    rules: Sequence[Rule],
    leaf_modules: Sequence[type[nn.Module]],
    concrete_args: dict[str, Any] | None,
    path: str = "",
    example_inputs: tuple[Any, ...] | None = None,
    calls: Calls | None = None,
) -> tuple[nn.Module, FuseReport]:
    """`module` fused by `run` where it traces: whole, or else child by child (in place).

    With `example_inputs`, shapes are propagated first (on copies: a forward may write to its
    input), so rules that need an input's rank (a Linear on `(batch, features)`) can see it.
    `calls`: the inputs its submodules got in an example forward of a parent (a container
    that the parent iterates is never called itself).
    """
    try:
        gm = trace(module, rules, leaf_modules, concrete_args)
    except NotTraceableError as error:
        return _kept_as_written(module, error, run, rules, leaf_modules, path, example_inputs, calls or {})
    return _fuse_traced(gm, run, example_inputs, path)


def _kept_as_written(
    module: nn.Module,
    error: NotTraceableError,
    run: Callable[..., FuseReport],
    rules: Sequence[Rule],
    leaf_modules: Sequence[type[nn.Module]],
    path: str,
    example_inputs: tuple[Any, ...] | None,
    calls: Calls,
) -> tuple[nn.Module, FuseReport]:
    """`module`, whose forward did not trace (`error`), reported so, with the layers inside it fused in place.

    Given the inputs it was called with, a submodule is also exported with torch.export and its
    program fused (`reparam.exported_parts`); that program replaces it where it runs fewer
    linear layers. The model itself is kept as written (its class, its methods), fused inside.
    """
    cause = error.__cause__
    reason = f"{type(cause).__name__}: {first_line(cause)[:160]}" if cause else str(error)
    name, type_name = path.rstrip(".") or "<model>", type(module).__name__
    part = part_report = None
    if example_inputs is not None and path and not isinstance(module, nn.Sequential):
        part, part_report, why_not = _exported(module, example_inputs, run, name, reason)
        reason += f"; {why_not}" if why_not else ""
    if example_inputs is not None:
        calls = {**calls, **record_calls(module, example_inputs, called_children(module))}
    report = FuseReport()
    report.extend(_fuse_children(module, run, rules, leaf_modules, path, calls))
    if part is not None and linear_ops(part, example_inputs) < linear_ops(module, example_inputs):
        return part, part_report
    if part is not None:
        reason += "; torch.export of it runs no fewer linear layers than its children fused one by one"
    report.untraced.insert(0, Untraced(name, type_name, reason))
    return module, report


def _exported(
    module: nn.Module, example_inputs: tuple[Any, ...], run: Callable[..., FuseReport], name: str, reason: str
) -> tuple[GraphModule | None, FuseReport | None, str]:
    """`module` exported and fused with its report, or (None, None, why not)."""
    if runs_more_than_its_class(module) is not None:
        return None, None, ""  # its hooks or patched forward are reported already
    hooked = [n for n, m in module.named_modules() if n and runs_more_than_its_class(m) is not None]
    if hooked:  # torch.export would run their hooks once, while exporting, and never again
        return None, None, f"not exported: {', '.join(hooked)} inside it have hooks or a patched forward"
    if not crosses_children(module, example_inputs):
        return None, None, "torch.export would fuse nothing more: no linear op reads a layer's output across children"
    try:
        part, conditions = exported_part(module, example_inputs)
    except Exception as error:  # torch.export's own errors name no common type
        cause = f"{type(error).__name__}: {first_line(error)[:120]}"
        return None, None, f"torch.export could not export it either ({cause})"
    part.meta[EXAMPLE_INPUTS] = tuple(tree_flatten(example_inputs)[0])  # its inputs, as its graph takes them
    report = fuse_aten_module(part, run)
    part.meta.pop(EXAMPLE_INPUTS)
    if not report.changed:
        return None, None, "exported with torch.export, it has nothing to fuse"
    try:
        compare(module, part, example_inputs, None)
    except ReparamError as error:
        return None, None, f"its torch.export program was not kept: {first_line(error)[:160]}"
    report.exported.append(Exported(name, type(module).__name__, reason, conditions))
    return part, report, ""


def fuse_copy(
    model: nn.Module,
    run: Callable[..., FuseReport],
    rules: Sequence[Rule],
    leaf_modules: Sequence[type[nn.Module]],
    concrete_args: dict[str, Any] | None,
    example_inputs: tuple[Any, ...] | None = None,
) -> tuple[nn.Module, FuseReport]:
    """`fuse_tree` of a copy of `model`, which is left as it was.

    A model whose forward traces is fused on its trace, which shares its layers until fusion is
    done; then only what the fused model keeps of them is copied (`sharing`). One that does not
    trace has its children fused in place, so it is copied whole first (and not traced again).
    """
    try:
        gm = trace(model, rules, leaf_modules, concrete_args)
    except NotTraceableError as error:
        return _kept_as_written(deep_copy(model), error, run, rules, leaf_modules, "", example_inputs, {})
    share(gm, model)
    fused, report = _fuse_traced(gm, run, example_inputs, "")
    unshare(fused)
    return fused, report


def _fuse_traced(
    gm: GraphModule, run: Callable[..., FuseReport], example_inputs: tuple[Any, ...] | None, path: str
) -> tuple[GraphModule, FuseReport]:
    if example_inputs is not None:
        try:
            # a layer's forward may update its buffers; ShapeProp prints a traceback before raising
            with writes_undone(gm), redirect_stderr(io.StringIO()):
                ShapeProp(gm).propagate(*cloned(example_inputs))
        except Exception as error:
            cause = error.__cause__ or error
            raise InvalidArgumentError(
                f"the example inputs do not run through the original model ({type(cause).__name__}: "
                f"{first_line(cause)}); pass example_inputs=(...) or input_shape=(...) that its "
                "forward accepts"
            ) from error
        gm.meta[EXAMPLE_INPUTS] = example_inputs  # for cost="measure"
    kept = gm.meta.get("reparam_kept", {})
    if example_inputs is None:
        name_the_fix(gm, kept)
        inlined = []
    else:
        inlined = inline_untraceable_layers(gm, kept)
    report = run(gm)
    gm.meta.pop(EXAMPLE_INPUTS, None)
    report.exported += inlined
    report.untraced += [Untraced(name, type_name, reason) for name, (type_name, reason) in kept.items()]
    return _compiled(gm), report.prefixed(path)
