"""`fuse`: the public entry point."""

from __future__ import annotations

import copy
from collections.abc import Iterable

from torch import nn
from torch.fx import GraphModule

from .engine import Engine
from .errors import TrainingModeError
from .registry import RuleSet, resolve
from .report import FuseReport
from .rules import Rule
from .tracing import trace


def fuse(
    model: nn.Module, *, rules: str | RuleSet | Iterable[Rule] = "default", allow_costlier: bool = False
) -> GraphModule:
    """Return a copy of `model` whose re-parameterizable subgraphs are single convolutions.

    The model must be in eval mode. It is traced with torch.fx; every linear region (conv,
    BatchNorm, summed branches, identity branches, multi-scale kernels) is replaced by one conv
    where that is exact for every input size and costs no more than the region. The result
    computes the same function, keeps the model's dtype and device, and leaves `model` as it was.

    Example (a RepVGG block: 3x3+BN, 1x1+BN and BN-only branches become one 3x3 conv)::

        >>> import reparam, torch
        >>> block = reparam.blocks.RepVGGBlock(8, 8).eval()
        >>> fused = reparam.fuse(block)
        >>> [type(m).__name__ for m in fused.modules()][1:]
        ['Module', 'Conv2d', 'ReLU']

    `rules` chooses the rules that run: a rule set's name (default: "default", the built-in
    transforms and everything registered into it), a `RuleSet`, or rules in order. `allow_costlier`
    fuses every exact region into one conv even where that costs more MACs or parameters than
    the region as written (an Inception-style concat of 1x1/3x3/5x5 branches becomes one 5x5
    conv, which is slower); by default such regions keep their cheaper form and the report
    says `would cost more`.

    See `fuse_with_report` for what was fused and what was refused, and why.
    """
    return fuse_with_report(model, rules=rules, allow_costlier=allow_costlier)[0]


def fuse_with_report(
    model: nn.Module, *, rules: str | RuleSet | Iterable[Rule] = "default", allow_costlier: bool = False
) -> tuple[GraphModule, FuseReport]:
    """`fuse`, also returning the `FuseReport`: each fusion, and each refusal with its reason."""
    if model.training:
        raise TrainingModeError(
            f"{type(model).__name__} is in training mode, where BatchNorm uses batch statistics and no fusion is "
            "exact; call model.eval() before reparam.fuse(model)"
        )
    chosen = resolve(rules)
    gm = trace(copy.deepcopy(model), chosen)
    report = Engine(chosen, allow_costlier).run(gm)
    return gm, report
