"""The torch.fx front end: trace a model, keeping every layer a rule knows as one node."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.fx
from torch import nn
from torch.fx import GraphModule

from .errors import NotTraceableError
from .rules import Rule, plain_functions


class _LeafTracer(torch.fx.Tracer):
    """torch.fx's tracer, with the module types rules anchor on kept as leaves (not traced into)."""

    def __init__(self, leaf_types: frozenset[type], functions: tuple[Callable, ...]) -> None:
        super().__init__(autowrap_functions=functions)
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m) in self.leaf_types or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module, rules: Sequence[Rule]) -> GraphModule:
    """A GraphModule of `model` (sharing its submodules) in which every layer a rule anchors on is a leaf."""
    leaf_types = frozenset(target for rule in rules for op, target in rule.anchors if op == "call_module")
    tracer = _LeafTracer(leaf_types, plain_functions(rules))
    try:
        graph = tracer.trace(model)
    except Exception as error:
        raise NotTraceableError(
            f"torch.fx could not trace {type(model).__name__}.forward: {type(error).__name__}: {error}"
        ) from error
    return GraphModule(tracer.root, graph, type(model).__name__)
