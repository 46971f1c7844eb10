"""Fusing a submodule that torch.fx cannot trace, through torch.export, on the inputs it is called with.

A forward that iterates a tensor (`list(x.chunk(2, 1))`), takes `len(x)` or branches on a size
in Python stops torch.fx. torch.export (non-strict) runs that Python on example inputs and
records the ops it reached. So where `fuse` is given example inputs and a model's forward does
not trace, one example forward records how each child is called (`record_calls`), and a child
that torch.fx cannot trace either is exported on those inputs (`exported_part`) and its aten
program fused with the same rules (`reparam/transforms/aten.py`).

Where the Python read a size, the program holds only for sizes that take the same path. Every
dim of every input is exported as dynamic (`Dim.AUTO`, sizes 0 and 1 included), torch.export
fixes or bounds the dims the Python read, and the part checks them on every call: an input
outside them raises (`_assert_scalar`), it is never computed wrong. The report lists them.

The part replaces the module only where it runs fewer linear layers (convs, BatchNorms,
matmuls, pools) on the example inputs than the module with its children fused one by one
(`linear_ops`): otherwise nothing is gained for the narrower domain.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor, nn
from torch.fx import Graph, GraphModule, Node
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from .errors import InvalidArgumentError, first_line
from .export import finite, without_noops
from .sharing import attributes_undone, writes_undone
from .verify import cloned

Calls = dict[int, tuple[Any, ...]]  # id(module) -> the positional inputs of its calls in an example forward

_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


def called_children(module: nn.Module) -> list[nn.Module]:
    """The children of `module` its forward may call: its children, through ModuleLists and ModuleDicts."""
    found = []
    for child in module.children():
        if not isinstance(child, _CONTAINERS):
            found.append(child)
        if isinstance(child, (*_CONTAINERS, nn.Sequential)):
            found += called_children(child)
    return found


def record_calls(module: nn.Module, inputs: tuple[Any, ...], children: Iterable[nn.Module]) -> Calls:
    """The positional inputs each of `children` gets in one `module(*inputs)` (a copy of each tensor).

    A child called with keyword arguments, or called again with inputs of other shapes, dtypes
    or values, is left out: no one example stands for its calls.
    """
    seen: dict[int, tuple[Any, ...] | None] = {}

    def record(child: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if kwargs:
            seen[id(child)] = None
        elif id(child) not in seen:
            seen[id(child)] = cloned(args)  # the run is under no_grad: the copies need no detaching
        elif seen[id(child)] is not None and _signature(seen[id(child)]) != _signature(args):
            seen[id(child)] = None

    handles = [child.register_forward_pre_hook(record, with_kwargs=True) for child in children]
    try:
        _run_once(module, inputs)
    except Exception as error:
        raise InvalidArgumentError(
            f"the example inputs do not run through the original model ({type(error).__name__}: "
            f"{first_line(error)}); pass example_inputs=(...) or input_shape=(...) that its forward accepts"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    return {key: args for key, args in seen.items() if args is not None}


def _run_once(module: nn.Module, args: tuple[Any, ...]) -> None:
    """`module(*args)` on copies of the inputs, without autograd, its tensors and attributes restored after."""
    with torch.no_grad(), writes_undone(module), attributes_undone(module):
        module(*cloned(args))


def _signature(args: tuple[Any, ...]) -> list[Any]:
    leaves, spec = tree_flatten(args)
    return [spec, *((tuple(v.shape), v.dtype) if isinstance(v, Tensor) else (type(v), repr(v)) for v in leaves)]


def exported_part(module: nn.Module, args: tuple[Any, ...]) -> tuple[GraphModule, tuple[str, ...]]:
    """`module` exported on `args` as a plain GraphModule of aten ops that checks its inputs.

    Returns it with the conditions on input sizes it checks. Raises whatever torch.export
    raises where it cannot export the module.
    """
    dims = tree_map(lambda v: dict.fromkeys(range(v.ndim), torch.export.Dim.AUTO) if isinstance(v, Tensor) else None,
                    args)  # fmt: skip
    # sizes 0 and 1 stay dynamic, not specialised; Python state forward writes (a cache of the last
    # input's shape) is put back, or it would keep torch.export's symbols
    with fx_config.patch(backed_size_oblivious=True), attributes_undone(module):
        program = torch.export.export(
            module, args, dynamic_shapes=dims, strict=False, prefer_deferred_runtime_asserts_over_guards=True
        )
    unlifted = program.module(check_guards=False)
    part = GraphModule(unlifted, unlifted.graph, type(module).__name__)  # without the unpicklable hooks
    part._tracer_cls = None  # pickling re-traces the code with plain torch.fx
    conditions = _check_inputs(part, program.range_constraints, type(module).__name__)
    return without_noops(part), conditions


_Check = tuple[Node, int, Callable[[Any, Any], Any], Any, str]  # input, dim, comparison, bound, as text


def _check_inputs(part: GraphModule, ranges: dict[Any, Any], name: str) -> tuple[str, ...]:
    """Assert in `part`'s graph each fixed size, range and equality torch.export assumed of its inputs.

    torch.export checks these in a forward pre-hook that does not pickle; as graph nodes they
    travel with the module. Its own deferred assertions are renamed from symbols to inputs.
    Returns the conditions, readable (`x.shape[0] == 1`).
    """
    placeholders = [n for n in part.graph.nodes if n.op == "placeholder"]
    checks, dims = _size_checks(placeholders, ranges)
    _insert_checks(part.graph, placeholders, checks, name)
    deferred = _renamed_deferred_asserts(part.graph, dims, name)
    part.recompile()
    return tuple(dict.fromkeys((*(text for *_, text in checks), *deferred)))  # each condition once


def _size_checks(placeholders: list[Node], ranges: dict[Any, Any]) -> tuple[list[_Check], dict[Any, str]]:
    """What each input dim must satisfy, and where each symbol first appears (`x.shape[0]`)."""
    dims: dict[Any, str] = {}
    checks: list[_Check] = []
    for node in placeholders:
        value = node.meta.get("val")
        for index, size in enumerate(value.shape if isinstance(value, Tensor) else ()):
            where = f"{node.name}.shape[{index}]"
            if isinstance(size, int):
                checks.append((node, index, operator.eq, size, f"{where} == {size}"))
                continue
            expr = size.node.expr
            if not expr.is_Symbol:
                raise NotImplementedError(f"{where} is exported as {expr}, a function of other sizes")
            if expr in dims:
                checks.append((node, index, operator.eq, dims[expr], f"{where} == {dims[expr]}"))
                continue
            dims[expr] = where
            bounds = ranges.get(expr)
            low, high = (finite(bounds.lower), finite(bounds.upper)) if bounds is not None else (None, None)
            if low is not None and low == high:
                checks.append((node, index, operator.eq, low, f"{where} == {low}"))
                continue
            if low:
                checks.append((node, index, operator.ge, low, f"{where} >= {low}"))
            if high is not None:
                checks.append((node, index, operator.le, high, f"{where} <= {high}"))
    return checks, dims


def _insert_checks(graph: Graph, placeholders: list[Node], checks: list[_Check], name: str) -> None:
    """Each check as `sym_size` and `_assert_scalar` nodes right after the inputs (one size node per dim)."""
    sizes: dict[tuple[Node, int], Node] = {}

    def size_of(node: Node, index: int) -> Node:
        return sizes.setdefault((node, index), graph.call_function(torch.ops.aten.sym_size.int, (node, index)))

    with graph.inserting_before(placeholders[-1].next):
        for node, index, compare, bound, text in checks:
            if isinstance(bound, str):  # another input's size, named like `where`
                bound = size_of(*_parse_dim(bound, placeholders))
            holds = graph.call_function(compare, (size_of(node, index), bound))
            graph.call_function(torch.ops.aten._assert_scalar.default, (holds, _message(name, text)))


def _renamed_deferred_asserts(graph: Graph, dims: dict[Any, str], name: str) -> tuple[str, ...]:
    """torch.export's own runtime assertions, their symbols written as input dims; their conditions."""
    conditions = []
    for node in graph.nodes:
        if node.target is torch.ops.aten._assert_scalar.default and node.args[1].startswith("Runtime assertion"):
            condition = _renamed(re.sub(r".*for expression (.*) on node.*", r"\1", node.args[1]), dims)
            condition = re.sub(r"^Eq\((.*), (.*)\)$", r"\1 == \2", condition)  # as the checks above write it
            node.args = (node.args[0], _message(name, condition))
            conditions.append(condition)
    return tuple(conditions)


def _parse_dim(where: str, placeholders: list[Node]) -> tuple[Node, int]:
    name, index = re.fullmatch(r"(.*)\.shape\[(\d+)\]", where).groups()
    return next(n for n in placeholders if n.name == name), int(index)


def _renamed(expression: str, dims: dict[Any, str]) -> str:
    for symbol, where in sorted(dims.items(), key=lambda item: -len(str(item[0]))):
        expression = re.sub(rf"\b{symbol}\b", where, expression)
    return expression


def _message(name: str, condition: str) -> str:
    return (
        f"{name} was fused by reparam through torch.export for inputs where {condition}: its Python depends on "
        "it. Fuse the model with example_inputs of this size, or keep the module as written"
    )


class _LinearOpCounter(TorchDispatchMode):
    """Counts the aten ops of linear layers that run under it."""

    NAMES = frozenset({
        "convolution", "native_batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
        "cudnn_batch_norm", "miopen_batch_norm", "mm", "addmm", "bmm", "baddbmm",
        "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool2d",
    })  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func.overloadpacket.__name__ in self.NAMES:
            self.count += 1
        return func(*args, **(kwargs or {}))


def linear_ops(module: nn.Module, args: tuple[Any, ...]) -> int:
    """How many linear-layer ops `module(*args)` dispatches."""
    counter = _LinearOpCounter()
    with counter:
        _run_once(module, args)
    return counter.count


_COMBINING = frozenset({"add", "sub", "mul", "div", "cat", "neg", "rsub"})  # linear in a layer's output


class _CrossingFinder(TorchDispatchMode):
    """Finds a linear op that reads a linear layer's output made elsewhere: in another child, or one
    in the module's own code (outside every child) that reads one at all. A sum or concatenation
    counts only where two of its operands come from one tensor through linear layers (branches a
    rule could merge); outputs of unrelated branches (a detection head's box and class convs) do not."""

    def __init__(self) -> None:
        super().__init__()
        self.running: list[int] = []  # the children whose forward is running, outermost first
        self.made_by: dict[int, int | None] = {}  # id(tensor) -> the child whose layer made it
        self.source: dict[int, int | None] = {}  # id(tensor) -> id of the tensor its linear layers read first
        self.alive: list[Tensor] = []  # keeps ids unique for the run
        self.found = False

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        current = self.running[0] if self.running else None
        name = func.overloadpacket.__name__
        tensors = [v for v in tree_flatten((args, kwargs))[0] if isinstance(v, Tensor)]
        inputs = [v for v in tensors if id(v) in self.made_by]
        makers = {self.made_by[id(v)] for v in inputs}
        layer = name in _LinearOpCounter.NAMES
        crossing = makers and (current is None or makers != {current})
        if crossing and (layer or (name in _COMBINING and self._share_a_source(tensors))):
            self.found = True
        if layer or (makers and (name in _COMBINING or func.is_view)):
            sources = {self.source.get(id(v), id(v)) for v in (inputs if not layer else tensors[:1])}
            for value in tree_flatten(out)[0]:
                if isinstance(value, Tensor):
                    self.made_by[id(value)] = current
                    self.source[id(value)] = sources.pop() if len(sources) == 1 else None
                    self.alive.append(value)
            self.alive.extend(tensors[:1])
        return out

    def _share_a_source(self, operands: list[Tensor]) -> bool:
        """Whether two operands come from one tensor (one of them may be that tensor)."""
        sources = [self.source.get(id(v), id(v)) for v in operands]
        known = [s for s in sources if s is not None]
        return len(set(known)) < len(known)


def crosses_children(module: nn.Module, args: tuple[Any, ...]) -> bool:
    """Whether a linear op of `module(*args)` reads a linear layer's output made in another child, or
    runs in the module's own code on one: only then can its export fuse what its children cannot."""
    finder = _CrossingFinder()

    def enter(child: nn.Module, _args: Any) -> None:
        finder.running.append(id(child))

    def leave(_child: nn.Module, _args: Any, _out: Any) -> None:
        finder.running.pop()

    children = called_children(module)
    handles = [c.register_forward_pre_hook(enter) for c in children]
    handles += [c.register_forward_hook(leave) for c in children]
    try:
        with finder:
            _run_once(module, args)
    finally:
        for handle in handles:
            handle.remove()
    return finder.found
