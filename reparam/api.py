"""`fuse`: the public entry point."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch.fx
from torch import nn
from torch.fx import GraphModule

from .engine import Engine
from .errors import NotTraceableError, TrainingModeError
from .report import FuseReport
from .rules import Rule
from .transforms import BUILTIN_RULES


def fuse(model: nn.Module, *, rules: Sequence[Rule] = BUILTIN_RULES) -> GraphModule:
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

    See `fuse_with_report` for what was fused and what was refused, and why.
    """
    return fuse_with_report(model, rules=rules)[0]


def fuse_with_report(
    model: nn.Module, *, rules: Sequence[Rule] = BUILTIN_RULES
) -> tuple[GraphModule, FuseReport]:
    """`fuse`, also returning the `FuseReport`: each fusion, and each refusal with its reason."""
    if model.training:
        raise TrainingModeError(
            f"{type(model).__name__} is in training mode, where BatchNorm uses batch statistics and no fusion is "
            "exact; call model.eval() before reparam.fuse(model)"
        )
    working = copy.deepcopy(model)
    try:
        gm = torch.fx.symbolic_trace(working)
    except Exception as error:
        raise NotTraceableError(
            f"torch.fx could not trace {type(model).__name__}.forward: {type(error).__name__}: {error}"
        ) from error
    report = Engine(rules).run(gm)
    return gm, report
