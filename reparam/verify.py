"""`fuse(..., verify=True)`: run the original and the fused model on the same inputs and compare."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.fx import GraphModule
from torch.utils._pytree import tree_map

from .errors import InvalidArgumentError, VerificationError

# relative to the output's largest magnitude: well above rounding, far below a wrong fold
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def example_inputs_for(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[Tensor, ...]:
    """A random input of `input_shape` in the model's dtype, on its device."""
    reference = next(iter(model.parameters()), torch.empty(0))
    generator = torch.Generator(device=reference.device).manual_seed(0)
    return (torch.randn(input_shape, generator=generator, dtype=reference.dtype, device=reference.device),)


def compare(
    original: nn.Module, fused: nn.Module, inputs: tuple[Any, ...], traced_original: GraphModule | None
) -> None:
    """Raise `VerificationError` if `fused` differs from `original` on `inputs` beyond the dtype's tolerance.

    When both are whole graphs, the error names the first rewrite whose output differs. Each
    model runs on its own copy of `inputs`, so a model that writes to its input in place does
    not hand the other a changed one.
    """
    try:
        with torch.no_grad():
            expected = original(*cloned(inputs))
    except Exception as error:
        raise InvalidArgumentError(
            f"the example inputs do not run through the original model ({type(error).__name__}: {error}); "
            "pass example_inputs=(...) or input_shape=(...) that its forward accepts"
        ) from error
    with torch.no_grad():
        actual = fused(*cloned(inputs))
    for want, got in zip(_tensors(expected), _tensors(actual), strict=True):
        error, tolerance = _relative_error(got, want), TOLERANCE.get(want.dtype, 1e-4)
        if error > tolerance:
            culprit = _first_differing_rewrite(traced_original, fused, inputs)
            raise VerificationError(
                f"the fused model differs from the original by {error:.2e} (relative; tolerance {tolerance:.0e} "
                f"for {want.dtype}){culprit}. Please report this with the model: it is a bug in a rule."
            )


def cloned(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """`inputs` with each tensor copied, in lists and dicts too: a forward may write to its input in place."""
    return tree_map(lambda value: value.clone() if isinstance(value, Tensor) else value, inputs)


def _first_differing_rewrite(traced: GraphModule | None, fused: nn.Module, inputs: tuple[Any, ...]) -> str:
    if traced is None or not isinstance(fused, GraphModule):
        return ""
    before, after = _Recorder(traced), _Recorder(fused)
    with torch.no_grad():
        before.run(*cloned(inputs))
        after.run(*cloned(inputs))
    for node in fused.graph.nodes:
        meta = node.meta.get("reparam")
        if not meta or meta.get("replaces") not in before.values:
            continue
        want, got = before.values[meta["replaces"]], after.values[node.name]
        if _relative_error(got, want) > TOLERANCE.get(want.dtype, 1e-4):
            return f"; first at {node.target}, the rewrite of {', '.join(meta['sources'])} by {meta['rules']}"
    return ""


class _Recorder(torch.fx.Interpreter):
    """Runs a GraphModule, keeping every node's value by name."""

    def __init__(self, gm: GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        self.values[n.name] = result = super().run_node(n)
        return result


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []


def _relative_error(got: Tensor, want: Tensor) -> float:
    want64 = want.detach().to(torch.float64)
    scale = want64.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return ((got.detach().to(torch.float64) - want64).abs().max() / scale).item()
