"""`fuse` and `fuse_with_report`: the public entry points."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

from torch import nn

from .arguments import check_cost, check_example_inputs, check_flags, check_input_shape, check_leaf_modules, check_model
from .engine import Engine
from .errors import InvalidArgumentError, ReparamError, StrictModeError, TrainingModeError
from .measured import Stopwatch
from .registry import RuleSet, resolve
from .report import FuseReport
from .rules import Rule
from .sharing import deep_copy
from .tracing import fuse_copy, fuse_tree, trace
from .verify import compare, example_inputs_for


def fuse(
    model: nn.Module,
    *,
    rules: str | RuleSet | Iterable[Rule] = "default",
    allow_costlier: bool = False,
    cost: Literal["estimate", "measure"] = "estimate",
    inplace: bool = False,
    leaf_modules: Sequence[type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
    verify: bool = False,
    example_inputs: tuple[Any, ...] | None = None,
    input_shape: tuple[int, ...] | None = None,
    strict: bool = False,
) -> nn.Module:
    """Return `model` with its re-parameterizable subgraphs replaced by single convolutions.

    The model must be in eval mode. It is traced with torch.fx; every linear region (conv,
    BatchNorm, summed or concatenated branches, identity branches, chains, avg-pools, multi-scale
    kernels) becomes one conv where that is exact for every input size and is no slower than
    the region. The result computes the same function, in the model's dtype and on its device.
    It is a `torch.fx.GraphModule` when the whole forward traces; otherwise a copy of the model
    whose largest traceable submodules are fused (the report lists what could not be traced).

    Example (a RepVGG block: 3x3+BN, 1x1+BN and BN-only branches become one 3x3 conv)::

        >>> import reparam
        >>> block = reparam.blocks.RepVGGBlock(8, 8).eval()
        >>> fused = reparam.fuse(block)
        >>> [type(m).__name__ for m in fused.modules()][1:]
        ['ReLU', 'Conv2d']

    Args:
        rules: the rules to run: a rule set's name (default: "default", the built-in transforms
            and everything registered into it), a `RuleSet`, or rules in order.
        allow_costlier: fuse every exact region into one conv even where that is slower (an
            Inception-style 1x1/3x3/5x5 concat becomes one, slower, 5x5 conv). By default such
            regions keep their faster form and the report says `would cost more`.
        cost: how "slower" is decided. "estimate" (the default): the cost model of
            `reparam.cost`, which prices calls, MACs by conv shape and memory traffic, on the
            shapes the example inputs give (a 56x56 map without them). "measure": where the
            estimates of a region's forms are close, time each form on the example inputs, on
            the model's device, and keep the fastest (ties within 5% go to fewer ops; at most
            30 s of timing per call; the report lists each timing). Needs example_inputs or
            input_shape.
        inplace: work on `model` itself instead of a copy: untraceable containers get their
            fused children in place, and the result shares the layers it did not change.
        leaf_modules: module types the tracer must not trace into (kept as single calls).
        concrete_args: arguments of `model.forward` to fix while tracing (see torch.fx).
        example_inputs, input_shape: inputs for the model (or the shape of a random one): their
            shapes are propagated through the graph, so that rules needing a rank (a Linear on
            `(batch, features)`) can see it; `verify` runs them.
        verify: run the original and the fused model on the example inputs and raise
            `VerificationError`, naming the first differing rewrite, if they differ beyond the
            dtype's tolerance.
        strict: raise `StrictModeError` if anything was refused or could not be traced.
    """
    return fuse_with_report(
        model,
        rules=rules,
        allow_costlier=allow_costlier,
        cost=cost,
        inplace=inplace,
        leaf_modules=leaf_modules,
        concrete_args=concrete_args,
        verify=verify,
        example_inputs=example_inputs,
        input_shape=input_shape,
        strict=strict,
    )[0]


@contextlib.contextmanager
def _garbage_collection_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for the duration (resumed as it was found).

    Fusing allocates many small objects (fx nodes, kernels), and each full collection walks every
    object alive, the model's included: on a 5,000-block net that was a third of `fuse`'s time.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@_garbage_collection_paused()
def fuse_with_report(
    model: nn.Module,
    *,
    rules: str | RuleSet | Iterable[Rule] = "default",
    allow_costlier: bool = False,
    cost: Literal["estimate", "measure"] = "estimate",
    inplace: bool = False,
    leaf_modules: Sequence[type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
    verify: bool = False,
    example_inputs: tuple[Any, ...] | None = None,
    input_shape: tuple[int, ...] | None = None,
    strict: bool = False,
) -> tuple[nn.Module, FuseReport]:
    """`fuse`, also returning the `FuseReport`: each fusion, each refusal with its reason, what was not traced."""
    check_model(model)
    check_flags(allow_costlier=allow_costlier, inplace=inplace, verify=verify, strict=strict)
    check_leaf_modules(leaf_modules)
    check_example_inputs(example_inputs)
    check_input_shape(input_shape)
    check_cost(cost, example_inputs is not None or input_shape is not None)
    if concrete_args is not None and not isinstance(concrete_args, dict):
        raise InvalidArgumentError(f"concrete_args must be a dict of argument names to values, got {concrete_args!r}")
    if model.training:
        raise TrainingModeError(
            f"{type(model).__name__} is in training mode, where BatchNorm uses batch statistics and no fusion is "
            "exact; call model.eval() before reparam.fuse(model)"
        )
    if verify and example_inputs is None and input_shape is None:
        raise InvalidArgumentError(
            "verify=True needs example_inputs=(tensor, ...) or input_shape=(batch, channels, ...)"
        )
    chosen = resolve(rules)
    traced_original = None
    if example_inputs is None and input_shape is not None:
        example_inputs = example_inputs_for(model, input_shape)
    if verify:
        try:
            traced_original = deep_copy(trace(model, chosen, leaf_modules, concrete_args))
        except ReparamError:
            traced_original = None
        reference = deep_copy(model) if inplace else model
    engine = Engine(chosen, allow_costlier, Stopwatch() if cost == "measure" else None)
    if inplace:
        fused, report = fuse_tree(model, engine.run, chosen, leaf_modules, concrete_args, "", example_inputs)
    else:
        fused, report = fuse_copy(model, engine.run, chosen, leaf_modules, concrete_args, example_inputs)
    if verify:
        compare(reference, fused, example_inputs, traced_original)
    if strict and (report.refusals or report.untraced):
        raise StrictModeError(f"strict=True and the model was not fully fused:\n{report}")
    return fused, report
