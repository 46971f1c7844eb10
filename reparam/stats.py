"""Counting what a model costs: layers, parameters, MACs, latency, and how far apart two models are."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.utils.benchmark as benchmark
from torch import Tensor, nn

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def count(model: nn.Module, types: tuple[type[nn.Module], ...]) -> int:
    """How many submodules of `model` are instances of `types`."""
    return sum(isinstance(m, types) for m in model.modules())


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def macs(model: nn.Module, example: Tensor) -> int:
    """Multiply-accumulates of one forward on `example`: convs, linears and BatchNorms (one per element)."""
    total = 0

    def conv_hook(module: nn.Module, _inputs: tuple, output: Tensor) -> None:
        nonlocal total
        total += output.numel() * module.weight.shape[1] * math.prod(module.weight.shape[2:])

    def linear_hook(module: nn.Module, _inputs: tuple, output: Tensor) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    def bn_hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
        nonlocal total
        total += output.numel()

    forward_with_hooks(model, example, {CONV_TYPES: conv_hook, (nn.Linear,): linear_hook, BATCHNORM_TYPES: bn_hook})
    return total


def forward_with_hooks(
    model: nn.Module, example: Tensor, hooks: dict[tuple[type[nn.Module], ...], Callable[..., None]]
) -> None:
    """Run one forward of `model` with `hooks[types]` as forward hook on every submodule of those types."""
    handles = [
        m.register_forward_hook(hook) for m in model.modules() for types, hook in hooks.items() if isinstance(m, types)
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()


def relative_error(output: Tensor, reference: Tensor) -> float:
    """max |output - reference| / max |reference|, computed in float64."""
    reference = reference.to(torch.float64)
    return ((output.to(torch.float64) - reference).abs().max() / reference.abs().max()).item()


def median_latency(model: nn.Module, example: Tensor, min_run_time: float = 1.0) -> float:
    """Median seconds per forward, measured by torch.utils.benchmark."""
    with torch.no_grad():
        timer = benchmark.Timer(stmt="model(x)", globals={"model": model, "x": example})
        return timer.blocked_autorange(min_run_time=min_run_time).median
