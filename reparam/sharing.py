"""Fusing a traced model without copying it first, and copying what the fused model keeps of it.

A GraphModule traced from the caller's model holds the caller's own layers and tensors. Copying
the whole model before tracing cost as much as the trace itself (a Python-level deepcopy of every
module), while fusion replaces most layers by new ones. So the engine works on the shared
GraphModule, which it only ever changes by adding, moving and deleting its own attributes, and
`unshare` then copies just the caller's layers and tensors that the fused model still holds
(one memo, so weights tied in the caller's model stay tied in the copy). `owned` is the one
place the engine writes inside a layer (deleting a tensor nothing reads): it copies that layer
first.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors
from torch.fx import GraphModule

from .context import own_tensors
from .module_copy import copy_module

_KEY = "reparam_shared"


class _Shared:
    """The caller's modules and tensors (by id), and the memo their copies are made with."""

    def __init__(self, model: nn.Module) -> None:
        self.ids: set[int] = set()
        plain: list[Tensor] = []  # tensors kept as plain attributes
        for module in model.modules():
            self.ids.add(id(module))
            self.ids.update(map(id, module._parameters.values()))
            self.ids.update(map(id, module._buffers.values()))
            plain += [v for v in module.__dict__.values() if isinstance(v, Tensor)]
        self.ids.update(map(id, plain))
        self.ids.discard(id(None))
        self.memo: dict[int, Any] = _detached(plain)

    def copied(self, value: Any) -> Any:
        if id(value) not in self.ids:
            return value
        return copy_module(value, self.memo) if isinstance(value, nn.Module) else copy.deepcopy(value, self.memo)


def deep_copy(value: Any) -> Any:
    """`copy.deepcopy`, also of a module that keeps a tensor computed from its parameters as a plain
    attribute (`torch.nn.utils.weight_norm` sets `weight` so): deepcopy refuses such a tensor, which is
    copied detached (its hook computes it again at the next call)."""
    if not isinstance(value, nn.Module):
        return copy.deepcopy(value)
    plain = [v for module in value.modules() for v in vars(module).values() if isinstance(v, Tensor)]
    return copy.deepcopy(value, _detached(plain))


def _detached(plain: list[Tensor]) -> dict[int, Any]:
    """A deepcopy memo with a detached copy of each of the plain tensor attributes `plain` that has a grad_fn."""
    return {id(value): value.detach().clone() for value in plain if value.grad_fn is not None}


def share(gm: GraphModule, model: nn.Module) -> None:
    """Record that `gm` holds `model`'s layers and tensors, which must not be changed."""
    gm.meta[_KEY] = _Shared(model)


def owned(gm: GraphModule, path: str) -> nn.Module:
    """The module at `path` in `gm`, first replaced by a copy if it is (or lies in) the caller's."""
    shared: _Shared | None = gm.meta.get(_KEY)
    module: nn.Module = gm
    for name in path.split(".") if path else []:
        child = module._modules[name]
        if shared is not None and id(child) in shared.ids:
            child = module._modules[name] = shared.copied(child)
        module = child
    return module


def unshare(gm: GraphModule) -> None:
    """Replace each of the caller's modules and tensors still in `gm` by a copy; `gm` no longer shares any."""
    shared: _Shared | None = gm.meta.pop(_KEY, None)
    if shared is not None:
        _unshare(gm, shared)


def _unshare(module: nn.Module, shared: _Shared) -> None:
    for name, child in module._modules.items():
        if child is not None and id(child) in shared.ids:
            module._modules[name] = shared.copied(child)
        elif child is not None:
            _unshare(child, shared)
    for tensors in (module._parameters, module._buffers):
        for name, tensor in tensors.items():
            tensors[name] = shared.copied(tensor)
    for name, value in vars(module).items():
        if isinstance(value, Tensor) and id(value) in shared.ids:
            setattr(module, name, shared.copied(value))


@contextmanager
def writes_undone(module: nn.Module) -> Iterator[list[str]]:
    """Run the block, then put back the parameters and buffers of `module` it wrote to; their names fill the list."""
    tensors = list(dict.fromkeys(t for m in module.modules() for t in own_tensors(m)))  # each once
    versions = [t._version for t in tensors]
    snapshot = _Snapshot(tensors)
    written: list[str] = []
    try:
        yield written
    finally:
        changed = [i for i, tensor in enumerate(tensors) if tensor._version != versions[i]]
        if changed:
            names = {id(t): name for name, t in (*module.named_parameters(), *module.named_buffers())}
            for i in changed:
                written.append(names[id(tensors[i])])
                snapshot.restore(i)


class _Snapshot:
    """The values of many tensors, copied with one call per dtype and device (a copy each cost more)."""

    def __init__(self, tensors: list[Tensor]) -> None:
        self._tensors = tensors
        groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i, tensor in enumerate(tensors):
            groups.setdefault((tensor.dtype, tensor.device), []).append(i)
        self._where: dict[int, tuple[Tensor, int]] = {}  # tensor i: its group's copy, and its offset there
        with torch.no_grad():
            for indices in groups.values():
                flat = _flatten_dense_tensors([tensors[i] for i in indices])
                offset = 0
                for i in indices:
                    self._where[i] = (flat, offset)
                    offset += tensors[i].numel()

    def restore(self, i: int) -> None:
        """Write tensor `i`'s saved value back into it."""
        flat, offset = self._where[i]
        tensor = self._tensors[i]
        with torch.no_grad():
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))


@contextmanager
def attributes_undone(module: nn.Module) -> Iterator[None]:
    """Run the block, then put back the attributes of `module` and its submodules as they were.

    Tracing runs forward's Python on Proxies, and Python state it writes keeps them: LeViT caches
    its attention biases in a dict (`self.attention_bias_cache[str(device)] = ...`), which a trace
    filled with a Proxy of its graph, for the caller's model to hold and the next trace to read
    as if it were a value. Every attribute is rebound as it was; plain dicts, lists and sets (not
    nn.Module's own, named with a `_`) are restored in place too (whoever holds one sees its old
    contents); plain attributes the block added are removed.
    """
    saved = []
    for owner in module.modules():
        values = owner.__dict__.copy()
        contents = {k: copy.copy(v) for k, v in values.items() if k[0] != "_" and isinstance(v, _CONTAINERS)}
        saved.append((owner.__dict__, values, contents))
    try:
        yield
    finally:
        for attributes, values, contents in saved:
            for name in attributes.keys() - values.keys():
                if name[0] != "_":  # torch.fx's own (`_tensor_constant0`) the trace reads
                    del attributes[name]
            attributes.update(values)
            for name, content in contents.items():
                container = values[name]
                container.clear()
                if isinstance(container, list):
                    container.extend(content)
                else:
                    container.update(content)


_CONTAINERS = (dict, list, set)  # nn.Module's own ones (`_modules`, hooks, ...) are named with a `_`
