"""`copy.deepcopy` of a module, made without deepcopy's machinery where the module holds plain values only.

A fused model holds a copy of every layer of the caller's it keeps (a ReLU per block) and a new
conv per fusion; `copy.deepcopy` of such a layer walks its dozen empty hook dicts through its
memo, at 40-60 µs a layer: half a second of a 5,000-block net's fuse. deepcopy makes a module
as `cls.__new__(cls)` and hands `__setstate__` a deep copy of `__getstate__()`. Where that state
holds plain values only (None, numbers, strings, and dicts, lists, sets and tuples of them: no
tensor, no submodule, no hook), its deep copy is each container rebuilt, made here directly
(12-18 µs). Any other module, or a class that copies itself another way, goes through
`copy.deepcopy`.
"""

from __future__ import annotations

import copy
import copyreg
from collections import OrderedDict
from typing import Any

from torch import nn

_ATOMS = (type(None), bool, int, float, str)
_CONTAINERS = (dict, OrderedDict, list, set, tuple)


def copy_module(module: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """`copy.deepcopy(module, memo)`: a module copied twice with one memo is one copy."""
    memo = {} if memo is None else memo
    done = memo.get(id(module))
    if done is not None:
        return done
    cls = type(module)
    state = module.__getstate__() if _reduced_to_its_state(cls) else None
    if not isinstance(state, dict) or not all(map(_plain, state.values())):
        return copy.deepcopy(module, memo)
    duplicate = cls.__new__(cls)
    memo[id(module)] = duplicate
    duplicate.__setstate__({k: type(v)(v) if type(v) in _CONTAINERS else v for k, v in state.items()})
    return duplicate


def _plain(value: Any) -> bool:
    kind = type(value)
    if kind in _ATOMS:
        return True
    if kind in (dict, OrderedDict):
        return all(type(k) in _ATOMS and type(v) in _ATOMS for k, v in value.items())
    return kind in _CONTAINERS and all(type(v) in _ATOMS for v in value)


def _reduced_to_its_state(cls: type) -> bool:
    """Whether deepcopy makes an instance of `cls` as `cls.__new__(cls)` given a deep copy of its `__getstate__()`."""
    return (
        cls not in copyreg.dispatch_table
        and getattr(cls, "__deepcopy__", None) is None
        and cls.__reduce_ex__ is object.__reduce_ex__
        and cls.__reduce__ is object.__reduce__
        and not hasattr(cls, "__getnewargs_ex__")
        and not hasattr(cls, "__getnewargs__")
    )
