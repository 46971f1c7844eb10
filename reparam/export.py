"""Fusing programs that were already exported with `torch.export`.

    ep = torch.export.export(model.eval(), (x,))
    fused_ep = reparam.fuse_exported(ep)            # an ExportedProgram with one conv per block

An `ExportedProgram` is a graph of aten operators (`aten.conv2d`, `aten.batch_norm`, or after
`run_decompositions()` `aten.convolution` and `aten._native_batch_norm_legit_no_training`) with
the model's parameters and buffers as inputs. `ep.module()` turns it back into a
`torch.fx.GraphModule` whose weights are attributes, which the engine fuses with the same
rules as any traced model (the aten spellings are in `reparam/transforms/aten.py`). The fused
module is exported again with the program's example inputs, keeping its dynamic dimensions.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

from .arguments import check_example_inputs, check_flags
from .canonical import as_torch_fx_spellings
from .engine import Engine, free_path
from .errors import InvalidArgumentError, ReparamError, StrictModeError, TrainingModeError
from .mutation import out_of_place_where_unseen
from .registry import RuleSet, resolve
from .report import FuseReport
from .rules import Rule
from .verify import compare

aten = torch.ops.aten

__all__ = ["fuse_exported", "fuse_exported_in_steps", "fuse_exported_with_report", "unexported"]


def fuse_exported(
    ep: torch.export.ExportedProgram,
    *,
    example_args: tuple[Any, ...] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
    rules: str | RuleSet | Iterable[Rule] = "default",
    allow_costlier: bool = False,
    verify: bool = False,
    strict: bool = False,
) -> torch.export.ExportedProgram:
    """An `ExportedProgram` computing the same function as `ep`, its linear regions fused into convs.

    Example (two RepVGG blocks, exported, become two convs)::

        >>> import torch, reparam
        >>> from reparam.blocks import RepVGGBlock
        >>> model = torch.nn.Sequential(RepVGGBlock(4, 4), RepVGGBlock(4, 8, stride=2)).eval()
        >>> ep = torch.export.export(model, (torch.randn(2, 4, 16, 16),))
        >>> fused = reparam.fuse_exported(ep)
        >>> sum(n.target == torch.ops.aten.conv2d.default for n in fused.graph.nodes)
        2

    Args:
        example_args, example_kwargs: inputs to export the fused module with; default: the
            program's own `ep.example_inputs` (kept by `torch.export.export` and `save`/`load`).
        dynamic_shapes: as for `torch.export.export`; default: every dimension that is
            dynamic in `ep` stays dynamic, in the same range (dims equal in `ep` stay equal).
        rules, allow_costlier, strict: as for `reparam.fuse`.
        verify: run `ep` and the result on the example inputs and raise `VerificationError`
            if they differ beyond the dtype's tolerance.
    """
    return fuse_exported_with_report(
        ep,
        example_args=example_args,
        example_kwargs=example_kwargs,
        dynamic_shapes=dynamic_shapes,
        rules=rules,
        allow_costlier=allow_costlier,
        verify=verify,
        strict=strict,
    )[0]


def fuse_exported_with_report(
    ep: torch.export.ExportedProgram,
    *,
    example_args: tuple[Any, ...] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
    rules: str | RuleSet | Iterable[Rule] = "default",
    allow_costlier: bool = False,
    verify: bool = False,
    strict: bool = False,
) -> tuple[torch.export.ExportedProgram, FuseReport]:
    """`fuse_exported`, also returning the `FuseReport` (layers named by their module paths)."""
    options = {"rules": rules, "allow_costlier": allow_costlier, "verify": verify, "strict": strict}
    fused, report, _ = fuse_exported_in_steps(ep, example_args, example_kwargs, dynamic_shapes, **options)
    return fused, report


def fuse_exported_in_steps(
    ep: torch.export.ExportedProgram,
    example_args: tuple[Any, ...] | None,
    example_kwargs: dict[str, Any] | None,
    dynamic_shapes: Any,
    *,
    rules: str | RuleSet | Iterable[Rule],
    allow_costlier: bool,
    verify: bool,
    strict: bool,
) -> tuple[torch.export.ExportedProgram, FuseReport, GraphModule]:
    """`fuse_exported_with_report`, also returning the fused GraphModule it exported (for drawing it)."""
    if not isinstance(ep, torch.export.ExportedProgram):
        hint = ": use reparam.fuse(model) for an nn.Module" if isinstance(ep, nn.Module) else ""
        raise InvalidArgumentError(f"fuse_exported takes a torch.export.ExportedProgram, got {type(ep).__name__}{hint}")
    check_flags(allow_costlier=allow_costlier, verify=verify, strict=strict)
    check_example_inputs(example_args, "example_args")
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise InvalidArgumentError(f"example_kwargs must be a dict, got {type(example_kwargs).__name__}")
    _check_eval(ep)
    args, kwargs = _example_inputs(ep, example_args, example_kwargs)
    if dynamic_shapes is None and example_args is None and example_kwargs is None:
        shapes = [_dynamic_shapes(ep, exact=True), _dynamic_shapes(ep, exact=False)]  # ep's own dims
    else:
        shapes = [dynamic_shapes]
    gm, report = _fuse_module(ep, rules, allow_costlier)
    if verify:  # name the first differing rewrite, if any
        original = unexported(ep)
        if kwargs:
            compare(_Bound(original, kwargs), _Bound(gm, kwargs), args, None)
        else:
            compare(original, gm, args, original)
    if strict and (report.refusals or report.untraced):
        raise StrictModeError(f"strict=True and the program was not fully fused:\n{report}")
    try:
        fused = _exported(gm, args, kwargs, shapes)
    except Exception as error:
        raise ReparamError(
            f"the fused module could not be exported again ({type(error).__name__}: {str(error).splitlines()[0]}); "
            "pass example_args=(...) (and dynamic_shapes=...) that torch.export.export accepts"
        ) from error
    if verify:
        compare(_Bound(ep.module(), kwargs), _Bound(fused.module(), kwargs), args, None)
    return fused, report, gm


def _exported(
    gm: GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any], shapes: list[Any]
) -> torch.export.ExportedProgram:
    """`gm` exported with the first of `shapes` (dynamic_shapes specs) that torch.export accepts.

    The source program's exact dims come first; torch.export refuses named dims it can prove
    narrower, and then `Dim.AUTO` lets it narrow them.
    """
    for spec in shapes[:-1]:
        with contextlib.suppress(Exception):
            return torch.export.export(gm, args, kwargs, dynamic_shapes=spec)
    return torch.export.export(gm, args, kwargs, dynamic_shapes=shapes[-1])


class _Bound(nn.Module):
    """`module` with keyword inputs fixed, so that it takes positional inputs only."""

    def __init__(self, module: nn.Module, kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.module, self.kwargs = module, kwargs

    def forward(self, *args: Any) -> Any:
        return self.module(*args, **self.kwargs)


def unexported(ep: torch.export.ExportedProgram) -> GraphModule:
    """`ep.module()` made ready to fuse: weights as attributes, eval-mode no-ops (dropout, clone) removed."""
    return without_noops(ep.module())


def without_noops(gm: GraphModule) -> GraphModule:
    """`gm`, an unlifted aten program, with its eval-mode no-ops (dropout, clone) removed, and in-place
    arithmetic that nothing else sees written out of place (`out += branch(x)` exports as `aten.add_`)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if _is_noop(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    out_of_place_where_unseen(graph, dict(gm.named_modules()))
    as_torch_fx_spellings(gm)
    graph.lint()
    gm.recompile()
    return gm


def _is_noop(node: Node) -> bool:
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], Node):
        return False
    if node.target is aten.dropout.default:  # dropout(x, p, train): a no-op when not training
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        return train is False
    if node.target is aten.clone.default:  # decompositions write an eval dropout as clone(x)
        source, value = node.args[0], node.args[0].meta.get("val")
        contiguous = isinstance(value, torch.Tensor) and value.is_contiguous()  # else a view after it needs it
        keeps_format = node.kwargs.get("memory_format") in (None, torch.contiguous_format)
        return source.op == "call_function" and keeps_format and contiguous
    return False


def _fuse_module(
    ep: torch.export.ExportedProgram, rules: str | RuleSet | Iterable[Rule], allow_costlier: bool
) -> tuple[GraphModule, FuseReport]:
    gm = unexported(ep)
    return gm, fuse_aten_module(gm, Engine(resolve(rules), allow_costlier).run)


def fuse_aten_module(gm: GraphModule, run: Callable[..., FuseReport]) -> FuseReport:
    """Fuse `gm`, an unlifted aten program without no-ops, in place with `run` (an `Engine.run`).

    The report names layers by the module paths torch.export recorded.
    """
    paths = _module_paths(gm)
    report = run(gm, flatten=False)
    _erase_unread_attributes(gm)
    return _named_by_modules(gm, report, paths)


_TRAINING_BN = ("_native_batch_norm_legit_functional", "_native_batch_norm_legit", "native_batch_norm")


def _check_eval(ep: torch.export.ExportedProgram) -> None:
    """Raise `TrainingModeError` if the program was exported from a model in training mode."""
    for node in ep.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        name = node.target.overloadpacket.__name__
        # a BN keeping no running statistics normalizes with the batch's in eval too: refused by the rules alone
        keeps_statistics = node.target is not aten._native_batch_norm_legit.no_stats and (
            name != "batch_norm" or node.args[3] is not None
        )
        training = name == "batch_norm" and len(node.args) > 5 and node.args[5] is True
        if keeps_statistics and (training or name in _TRAINING_BN):
            raise TrainingModeError(
                f"the program was exported from a model in training mode ({node.name} is {node.target}: BatchNorm "
                "normalizes with batch statistics and no fusion is exact); export model.eval() instead"
            )


def _erase_unread_attributes(gm: GraphModule) -> None:
    """Drop tensors nothing reads (a fused BN's `num_batches_tracked`), so the new program has no dead state."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
            owner, _, name = str(node.target).rpartition(".")
            if not any(n.op == "get_attr" and n.target == node.target for n in gm.graph.nodes):
                delattr(gm.get_submodule(owner), name)
    gm.delete_all_unused_submodules()
    gm.recompile()


def _example_inputs(
    ep: torch.export.ExportedProgram, args: tuple[Any, ...] | None, kwargs: dict[str, Any] | None
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args is None and kwargs is None:
        stored = getattr(ep, "example_inputs", None)
        if stored is None:
            raise InvalidArgumentError(
                "this ExportedProgram keeps no example inputs; pass example_args=(tensor, ...) to re-export it"
            )
        args, kwargs = stored
    return tuple(args or ()), dict(kwargs or {})


def _dynamic_shapes(ep: torch.export.ExportedProgram, exact: bool = True) -> Any:
    """The dynamic dimensions of `ep`'s positional tensor inputs, in the same ranges.

    `exact`: one named `Dim` per symbol of `ep`, with its bounds (so dims equal in `ep` stay equal,
    and a batch of min 1 keeps min 1); otherwise `Dim.AUTO` specs, which torch.export may narrow
    (`Dim.AUTO` starts at 2) but accepts where named dims are refused.
    """
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    user = set(ep.graph_signature.user_inputs)
    specs: list[Any] = []
    named: dict[Any, Any] = {}
    dynamic = False
    for node in placeholders:
        if node.name not in user:
            continue
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            specs.append(None)
            continue
        spec = {}
        for index, size in enumerate(value.shape):
            if isinstance(size, int):
                continue
            dynamic = True
            expr = size.node.expr
            bounds = ep.range_constraints.get(expr)
            low, high = (finite(bounds.lower), finite(bounds.upper)) if bounds is not None else (None, None)
            if exact and expr.is_Symbol:
                spec[index] = named.setdefault(expr, torch.export.Dim(f"dim{len(named)}", min=low, max=high))
            else:
                spec[index] = torch.export.Dim.AUTO(min=low if low and low > 1 else None, max=high)
        specs.append(spec or None)
    if not dynamic:
        return None
    args_spec, kwargs_spec = torch.utils._pytree.tree_unflatten(specs, ep.call_spec.in_spec)
    if kwargs_spec:
        raise InvalidArgumentError(
            "the program has dynamic keyword inputs; pass dynamic_shapes=... to fuse_exported to re-export it"
        )
    return tuple(args_spec)


def finite(bound: Any) -> int | None:
    """A range bound as an int, None where it is infinite (sympy's and torch's infinities)."""
    try:
        return int(bound)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


def _module_paths(gm: GraphModule) -> dict[str, str]:
    """Node name -> the path of the module that ran it (from torch.export's `nn_module_stack`)."""
    paths = {}
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            path = list(stack.values())[-1][0]
            if path:
                paths[node.name] = path
    return paths


def _named_by_modules(gm: GraphModule, report: FuseReport, paths: dict[str, str]) -> FuseReport:
    """The report with aten node names replaced by module paths, and each new conv named after its layers."""

    def names(values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(paths.get(v, v) for v in values))

    renamed: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and "reparam" in node.meta and node.target not in renamed:
            sources = names(tuple(node.meta["reparam"].get("sources", ())))
            if sources and all(s in paths.values() for s in sources):
                old, rules = str(node.target), node.meta["reparam"].get("rules", ())
                renamed[old] = _rename(gm, node, _preferred_name(sources, rules))
    gm.recompile()
    return FuseReport(
        [
            dataclasses.replace(f, module=renamed.get(f.module, f.module), sources=names(f.sources))
            for f in report.fusions
        ],
        [dataclasses.replace(r, nodes=names(r.nodes)) for r in report.refusals],
        [dataclasses.replace(r, sources=names(r.sources)) for r in report.replacements],
        list(report.untraced),
        [dataclasses.replace(t, sources=names(t.sources)) for t in report.timings],
        list(report.exported),
        [dataclasses.replace(u, layer=names((u.layer,))[0]) for u in report.unfused],
    )


def _preferred_name(sources: tuple[str, ...], rules: Iterable[str]) -> str:
    """A chain is named after its first layer; branches `<their common parent>.conv` (as `reparam.fuse` does)."""
    if len(sources) == 1 or not any(r.endswith(("branch_sum", "concat")) for r in rules):
        return sources[0]
    split = [s.split(".") for s in sources]
    common: list[str] = []
    for parts in zip(*split):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return ".".join(common[: min(len(p) for p in split) - 1] + ["conv"])


def _rename(gm: GraphModule, node: Node, preferred: str) -> str:
    old = str(node.target)
    candidates = [preferred, f"{preferred}_fused"] + [f"{preferred}_fused_{i}" for i in range(1, 1000)]
    new = next(c for c in candidates if c == old or free_path(gm, c))
    if new == old:
        return old
    module = gm.get_submodule(old)
    parent, _, leaf = old.rpartition(".")
    delattr(gm.get_submodule(parent), leaf)
    gm.add_submodule(new, module)
    for user in gm.graph.nodes:
        if user.op == "call_module" and user.target == old:
            user.target = new
    return new
