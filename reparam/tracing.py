"""The torch.fx front end: trace a model, keeping every layer a rule knows as one node.

`trace` traces one module or raises `NotTraceableError`, also when its forward writes to a
parameter or buffer in place (torch.fx runs such a write at trace time and drops it from the
graph; the trace's write is undone for buffers). `fuse_tree` is what `fuse` runs: it
fuses the whole model if its forward traces, and otherwise descends into its children, so the
largest traceable submodules are fused and the untraceable parts stay as written (and are
reported with the tracer's reason).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.fx import GraphModule
from torch.fx.passes.shape_prop import ShapeProp

from .errors import NotTraceableError, ReparamError
from .report import FuseReport, Untraced
from .rules import Rule, plain_functions


class _LeafTracer(torch.fx.Tracer):
    """torch.fx's tracer, with the module types rules anchor on (and the user's) kept as leaves."""

    def __init__(self, leaf_types: frozenset[type] = frozenset(), functions: tuple[Callable, ...] = ()) -> None:
        # defaults: unpickling a GraphModule re-traces its code with `tracer_cls()`
        super().__init__(autowrap_functions=functions)
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m) in self.leaf_types or super().is_leaf_module(m, module_qualified_name)


def trace(
    model: nn.Module,
    rules: Sequence[Rule],
    leaf_modules: Sequence[type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
) -> GraphModule:
    """A GraphModule of `model` (sharing its submodules); layers rules anchor on stay single nodes."""
    leaf_types = frozenset(target for rule in rules for op, target in rule.anchors if op == "call_module")
    tracer = _LeafTracer(leaf_types | frozenset(leaf_modules), plain_functions(rules))
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    versions = {name: t._version for name, t in _tensors(model)}
    try:
        graph = tracer.trace(model, concrete_args)
    except Exception as error:
        raise NotTraceableError(
            f"torch.fx could not trace {type(model).__name__}.forward: {type(error).__name__}: {error}. "
            "Pass the offending submodule types as leaf_modules=..., fixed arguments as concrete_args=..., "
            "or let fuse descend into the traceable submodules"
        ) from error
    written = [name for name, t in _tensors(model) if t._version != versions[name]]
    if written:
        _restore(model, buffers)
        raise NotTraceableError(
            f"{type(model).__name__}.forward writes in place to {', '.join(written)}: torch.fx runs such a write "
            "once while tracing and leaves it out of the graph, so the traced graph would not compute what forward "
            "does"
        )
    for node in graph.nodes:  # annotations kept as strings (`from __future__ import annotations`) do not pickle
        if isinstance(node.type, str):
            node.type = None
    return GraphModule(tracer.root, graph, type(model).__name__)


def _tensors(model: nn.Module) -> list[tuple[str, Tensor]]:
    return [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]


def _restore(model: nn.Module, buffers: dict[str, Tensor]) -> None:
    """Put back the buffer values a trace wrote to."""
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name in buffers:
                buffer.copy_(buffers[name])


def fuse_tree(
    module: nn.Module,
    run: Callable[[GraphModule], FuseReport],
    rules: Sequence[Rule],
    leaf_modules: Sequence[type[nn.Module]],
    concrete_args: dict[str, Any] | None,
    path: str = "",
    example_inputs: tuple[Any, ...] | None = None,
) -> tuple[nn.Module, FuseReport]:
    """`module` fused by `run` where it traces: whole, or else child by child (in place).

    With `example_inputs`, shapes are propagated first (on copies: a forward may write to its
    input), so rules that need an input's rank (a Linear on `(batch, features)`) can see it.
    """
    try:
        gm = trace(module, rules, leaf_modules, concrete_args)
    except NotTraceableError as error:
        cause = error.__cause__
        reason = f"{type(cause).__name__}: {str(cause).splitlines()[0][:160]}" if cause else str(error)
        report = FuseReport(untraced=[Untraced(path or "<model>", type(module).__name__, reason)])
        for name, child in list(module.named_children()):
            if next(child.children(), None) is None and type(child) not in leaf_modules:
                continue  # a single layer: nothing inside it to fuse
            fused, child_report = fuse_tree(child, run, rules, leaf_modules, None, f"{path}{name}.")
            setattr(module, name, fused)
            report.extend(child_report)
        return module, report
    if example_inputs is not None:
        try:
            ShapeProp(gm).propagate(*(i.clone() if isinstance(i, Tensor) else i for i in example_inputs))
        except Exception as error:
            cause = error.__cause__ or error
            raise ReparamError(
                f"the example inputs do not run through the original model ({type(cause).__name__}: "
                f"{str(cause).splitlines()[0]}); pass example_inputs=(...) or input_shape=(...) that its "
                "forward accepts"
            ) from error
    report = run(gm)
    return gm, report.prefixed(path)
