"""Small helpers shared by the graph and model tests."""

from __future__ import annotations

import torch
from torch import nn

from reparam.stats import BATCHNORM_TYPES, CONV_TYPES, count


def convs(model: nn.Module) -> int:
    return count(model, CONV_TYPES)


def batchnorms(model: nn.Module) -> int:
    return count(model, BATCHNORM_TYPES)


def assert_same_function(original: nn.Module, fused: nn.Module, *inputs: torch.Tensor, rtol: float = 1e-10) -> None:
    """Outputs agree to `rtol` relative to their magnitude (float64 models: to rounding)."""
    with torch.no_grad():
        expected, actual = original(*inputs), fused(*inputs)
    scale = expected.abs().max().clamp_min(1e-30)
    error = ((actual - expected).abs().max() / scale).item()
    assert error <= rtol, f"relative error {error:.3e} > {rtol:.1e}"
