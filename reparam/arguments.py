"""Checks at the door of `fuse` and `fuse_exported`: each wrong argument is one `InvalidArgumentError`.

The message names the argument, what was passed and what to pass instead, before any work is
done (a wrong type found deep in tracing would surface as some unrelated AttributeError).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from os import PathLike
from typing import Any

import torch
from torch import nn

from .errors import InvalidArgumentError


def check_model(model: Any) -> None:
    """`model` is an `nn.Module` that `fuse` can trace."""
    if isinstance(model, torch.export.ExportedProgram):
        raise InvalidArgumentError(
            "reparam.fuse takes an nn.Module, got a torch.export.ExportedProgram: use reparam.fuse_exported(ep) "
            "for exported programs"
        )
    if isinstance(model, str | PathLike):
        raise InvalidArgumentError(
            f"reparam.fuse takes an nn.Module, got the path {str(model)!r}: load the model first "
            "(torch.load(path, weights_only=False) or torch.export.load(path) for a .pt2 file, then "
            "reparam.fuse_exported), or run `reparam fuse PATH -o OUT` from a shell"
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise InvalidArgumentError(
            "reparam.fuse cannot fuse a TorchScript module: torch.fx does not trace ScriptModules. Fuse the "
            "Python model before scripting it: torch.jit.script(reparam.fuse(model.eval()))"
        )
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"reparam.fuse takes an nn.Module, got {_described(model)}")


def check_flags(**flags: Any) -> None:
    """Each of `flags` is a bool (a string such as 'no' would otherwise count as True)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise InvalidArgumentError(f"{name} must be True or False, got {_described(value)}")


def check_example_inputs(example_inputs: Any, name: str = "example_inputs") -> None:
    """`example_inputs` is None or a tuple (or list) of the forward's positional arguments."""
    if example_inputs is None:
        return
    if isinstance(example_inputs, torch.Tensor):
        raise InvalidArgumentError(
            f"{name} must be a tuple of the forward's arguments, got a single tensor (which would be unpacked "
            f"along its first dimension): pass {name}=(x,)"
        )
    if not isinstance(example_inputs, tuple | list):
        raise InvalidArgumentError(
            f"{name} must be a tuple of the forward's arguments, got {_described(example_inputs)}"
        )


def check_input_shape(input_shape: Any) -> None:
    """`input_shape` is None or a sequence of positive ints."""
    if input_shape is None:
        return
    sizes = list(input_shape) if isinstance(input_shape, Sequence) and not isinstance(input_shape, str) else None
    if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise InvalidArgumentError(
            f"input_shape must be a tuple of positive sizes, like (1, 3, 224, 224), got {input_shape!r}"
        )


def check_leaf_modules(leaf_modules: Any) -> None:
    """`leaf_modules` is a sequence of nn.Module subclasses."""
    if isinstance(leaf_modules, type) or not isinstance(leaf_modules, Iterable):
        raise InvalidArgumentError(f"leaf_modules must be a tuple of module classes, got {_described(leaf_modules)}")
    for item in leaf_modules:
        if not (isinstance(item, type) and issubclass(item, nn.Module)):
            raise InvalidArgumentError(
                f"leaf_modules must hold nn.Module subclasses (like MyBlock, not MyBlock()), got {_described(item)}"
            )


def _described(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def check_cost(cost: Any, has_inputs: bool) -> None:
    """`cost` is "estimate", or "measure" with inputs to measure on."""
    if cost not in ("estimate", "measure"):
        raise InvalidArgumentError(f'cost must be "estimate" or "measure", got {cost!r}')
    if cost == "measure" and not has_inputs:
        raise InvalidArgumentError(
            'cost="measure" times forms of each region on real inputs: pass example_inputs=(tensor, ...) or '
            "input_shape=(batch, channels, ...)"
        )
