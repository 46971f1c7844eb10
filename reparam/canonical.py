"""aten operators written as the ops the torch.fx rules know, so that one rule serves both front ends.

A program from `torch.export` spells a model in aten operators. Where an operator is exactly
a torch.fx spelling the rules already match, the node is rewritten to that spelling before
fusion (its metadata, the propagated shapes included, kept):

    aten.add.Tensor(a, b)      -> a + b        (alpha 1; also .Scalar)
    aten.sub.Tensor(a, b)      -> a - b        (alpha 1; also .Scalar)
    aten.mul.Tensor(a, b)      -> a * b        (also .Scalar)
    aten.div.Tensor(a, b)      -> a / b        (no rounding mode; also .Scalar)
    aten.permute.default(x, d) -> torch.permute(x, d)
    aten.cat.default(xs, dim)  -> torch.cat(xs, dim)
    aten.flatten.using_ints(x, a, b) -> torch.flatten(x, a, b)
    aten.split.Tensor(x, n, dim), aten.split_with_sizes.default(x, ns, dim) -> torch.split(x, n or ns, dim)
    aten.reshape_as.default(x, y), aten.view_as.default(x, y) -> x.reshape_as(y), x.view_as(y)
    aten.view.default(layer(aten.view.default(y, [n, c])), y's shape), the layer a module call
                               -> layer(torch.flatten(y, 0, -2)).reshape_as(y)   (n the product of
                                  y's leading dims: LeViT's BatchNorm1d on a token tensor's rows)
    aten.pad.default(x, p, mode, value), aten.constant_pad_nd.default(x, p, value)
                               -> F.pad(x, p, mode, value)
    aten.slice.Tensor(x, d, a, b) (consecutive ones merged)
                               -> x[:, ..., a:b]                     (d whole slices first)
    aten.copy_.default(x[i], v), aten.fill_.Scalar(x[i], v), x[i] read by nothing else
                               -> x[i] = v          (an expand of v to x[i]'s shape left out)
    aten.addmm.default(b, x, permute(w, [1, 0])), aten.mm.default(x, permute(w, [1, 0])),
    aten.bmm.default(x, view(expand(permute(w, [1, 0]))))
                               -> aten.linear.default(x, w, b)       (decomposed; with the views
                                  around it of a rank > 2 input: the linear of that input)
    aten.linear.default(x, w, b), w and b the tensors of one layer read nowhere else
                               -> that layer as an `nn.Linear` holding w and b, called on x
    aten.batch_norm.default(x, w, b, mean, var, False, ...), likewise (and the decomposed
    _native_batch_norm_legit_no_training(x, w, b, mean, var, ...)[0])
                               -> that layer as an eval `nn.BatchNorm1d/2d/3d` (x's rank)

Then every rule written over those spellings applies to exported programs too: the constants
after a Linear of any rank (`linear_constants`), a Linear between permutes (`channels_last`),
a Linear before a permute back to channels-first (`channels_first`), a per-channel layer after
a concatenation (`distribute`), a pad folded into a conv and DBB's border assignment
(`borders`), ACNet's crops (`padding`). The fused module is exported again, which writes them as aten
operators. Each rewrite is the same function: these are the operators the torch.fx spellings
dispatch to.
"""

from __future__ import annotations

import math
import operator
import re
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from .context import attribute, free_name
from .layers import AnyRankBatchNorm
from .mutation import is_view

aten = torch.ops.aten

_ARITHMETIC: dict[Any, Any] = {
    **{getattr(aten.add, overload): operator.add for overload in ("Tensor", "Scalar")},
    **{getattr(aten.sub, overload): operator.sub for overload in ("Tensor", "Scalar")},
    **{getattr(aten.mul, overload): operator.mul for overload in ("Tensor", "Scalar")},
    **{getattr(aten.div, overload): operator.truediv for overload in ("Tensor", "Scalar")},
}
_RENAMED: dict[Any, Any] = {
    aten.permute.default: torch.permute,
    aten.cat.default: torch.cat,
    aten.flatten.using_ints: torch.flatten,
    aten.split.Tensor: torch.split,
    aten.split_with_sizes.default: torch.split,
}
_METHODS = {aten.reshape_as.default: "reshape_as", aten.view_as.default: "view_as"}
_MATMULS = (aten.addmm.default, aten.mm.default)  # a decomposed linear


def as_torch_fx_spellings(gm: GraphModule) -> None:
    """Rewrite, in place, each aten operator of `gm` (an unlifted program) that is exactly a torch.fx spelling."""
    reads = Counter(n.target for n in gm.graph.nodes if n.op == "get_attr")
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _ARITHMETIC and len(node.args) == 2 and set(node.kwargs) <= {"alpha"}:
            if node.kwargs.get("alpha", 1) == 1:
                node.target, node.kwargs = _ARITHMETIC[node.target], {}
        elif node.target in _RENAMED:
            node.target = _RENAMED[node.target]
        elif node.target in _METHODS:
            node.op, node.target = "call_method", _METHODS[node.target]
        elif node.target in (aten.pad.default, aten.constant_pad_nd.default):
            _as_pad(node)
        elif node.target is aten.slice.Tensor:
            _as_getitem(gm, node)
        elif node.target in (aten.copy_.default, aten.fill_.Scalar):
            _as_setitem(gm, node)
        elif node.target is aten.slice_scatter.default:
            _scatter_as_setitem(gm, node)
        elif (
            node.target is aten.linear.default
            or (node.target in _MATMULS and _as_linear(gm, node))
            or (node.target is aten.bmm.default and _batched_as_linear(gm, node))
        ):
            _as_linear_layer(gm, node, reads)
        elif node.target is aten.batch_norm.default or _is_native_batch_norm_output(node):
            _as_batch_norm_layer(gm, node, reads)
        elif node.target is aten.view.default and not _linear_of_any_rank(gm, node):
            _token_rows_restored(gm, node)


def _as_linear(gm: GraphModule, node: Node) -> bool:
    """`addmm(b, x, permute(w, [1, 0]))` and `mm(x, permute(w, [1, 0]))`, a decomposed `linear(x, w, b)`,
    as that `aten.linear` (True), where w is a tensor of the model the permute alone reads."""
    bias, x, transposed = node.args if node.target is aten.addmm.default else (None, *node.args)
    if node.kwargs or not isinstance(transposed, Node) or transposed.target not in (torch.permute, aten.t.default):
        return False
    weight = transposed.args[0]
    dims = transposed.args[1:] if transposed.target is torch.permute else [[1, 0]]
    if list(dims) != [[1, 0]] or not isinstance(weight, Node) or weight.op != "get_attr" or len(transposed.users) != 1:
        return False
    if bias is not None and not (isinstance(bias, Node) and bias.op == "get_attr" and attribute(gm, bias).dim() == 1):
        return False  # addmm adds any matrix; a linear's bias is one vector
    node.target, node.args = aten.linear.default, (x, weight, bias)
    gm.graph.erase_node(transposed)
    return True


def _batched_as_linear(gm: GraphModule, node: Node) -> bool:
    """`bmm(a, view(expand(permute(w, [1, 0]), [n, c, o]), [n, c, o]))`, how decomposition writes a linear of
    a batch of matrices (a Linear on a rank-4 or non-contiguous input), as the `aten.linear(a, w)` it is
    (True): every matrix of the batch times the same w^T. The views around it are then read by
    `_linear_of_any_rank`."""
    a, b = node.args
    expand = b.args[0] if isinstance(b, Node) and b.target is aten.view.default else b
    if not isinstance(expand, Node) or expand.target is not aten.expand.default or not _same_shape(expand, b):
        return False
    transposed = expand.args[0]
    if not isinstance(transposed, Node) or transposed.target is not torch.permute or transposed.args[1:] != ([1, 0],):
        return False
    weight = transposed.args[0]
    if (
        not isinstance(weight, Node)
        or weight.op != "get_attr"
        or any(len(n.users) != 1 for n in (b, expand, transposed))
    ):
        return False
    node.target, node.args = aten.linear.default, (a, weight)
    _erase_if_unread(gm, b)
    return True


def _linear_of_any_rank(gm: GraphModule, node: Node) -> bool:
    """`view(linear(view(x, [n, c])), [*lead, o])`, a decomposed `linear` of a rank > 2 input (lead its
    leading dims, n their product), as the `linear(x)` it was (True)."""
    linear = node.args[0]
    if not isinstance(linear, Node) or len(linear.users) != 1 or not _is_linear_call(gm, linear):
        return False
    flattened = linear.args[0]
    if not isinstance(flattened, Node) or flattened.target is not aten.view.default or len(flattened.users) != 1:
        return False
    x = _without_copies(flattened.args[0])
    shapes = _shapes(x, flattened, linear, node)
    if shapes is None:
        return False
    x_shape, flat, out, unflat = shapes
    if flat[-1] != x_shape[-1] or unflat[:-1] != x_shape[:-1] or unflat[-1] != out[-1]:
        return False  # the views must only merge, then split back, the dims before the features
    linear.args = (x, *linear.args[1:])
    linear.meta["val"] = node.meta["val"]
    linear.meta.pop("tensor_meta", None)
    node.replace_all_uses_with(linear)
    gm.graph.erase_node(node)
    _erase_if_unread(gm, flattened)
    return True


def _token_rows_restored(gm: GraphModule, node: Node) -> None:
    """`view(layer(view(y, [n, c])), y's shape)`, a layer on the rows of a token tensor y (LeViT's
    `bn(y.flatten(0, 1)).reshape_as(y)`, decomposed), as `layer(y.flatten(0, -2)).reshape_as(y)`: each
    view reads the same values as the spelling it becomes, whatever the layer."""
    layer = node.args[0]
    if not isinstance(layer, Node) or layer.op != "call_module" or len(layer.users) != 1 or len(layer.args) != 1:
        return
    rows = layer.args[0]
    if not isinstance(rows, Node) or rows.target is not aten.view.default or len(rows.users) != 1:
        return
    y = rows.args[0]
    shapes = _shapes(y, rows, node)
    if shapes is None:
        return
    y_shape, flat, restored = shapes
    if len(y_shape) < 3 or flat != (math.prod(y_shape[:-1]), y_shape[-1]) or restored != y_shape:
        return
    rows.target, rows.args = torch.flatten, (y, 0, -2)
    node.op, node.target, node.args = "call_method", "reshape_as", (layer, y)


def _without_copies(value: Any) -> Any:
    """`value` without the copies decomposition makes before a view (`clone(expand(x, x's shape))`: x's values)."""
    while isinstance(value, Node) and len(value.users) == 1:
        if value.target is aten.clone.default or (
            value.target is aten.expand.default and _same_shape(value, value.args[0])
        ):
            value = value.args[0]
        else:
            break
    return value


def _is_linear_call(gm: GraphModule, node: Node) -> bool:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))) is nn.Linear
    return node.target is aten.linear.default


def _as_pad(node: Node) -> None:
    """`aten.pad(x, p, mode="constant", value=None)` and `aten.constant_pad_nd(x, p, value=0)` as `F.pad`."""
    if node.target is aten.constant_pad_nd.default:
        value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
        node.args, node.kwargs = (*node.args[:2], "constant", value), {}
    node.target = F.pad


_WHOLE = slice(None)
_OPEN_END = 2**63 - 1  # aten's end of a slice to the end


def _slice_index(node: Node, first: int) -> tuple[slice, ...] | None:
    """The index `[:, ..., start:end:step]` of `aten.slice(x, dim, start, end, step)` (arguments from
    `first` on; `aten.slice_scatter` has one more before them); None where a negative dim has no rank."""
    dim, start, end, step = (*node.args[first:], *[None] * 4)[:4]
    dim = node.kwargs.get("dim", 0 if dim is None else dim)
    start, end = node.kwargs.get("start", start), node.kwargs.get("end", end)
    step = node.kwargs.get("step", 1 if step is None else step)
    if dim < 0:
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            return None
        dim += value.dim()
    cut = slice(start, None if end is not None and end >= _OPEN_END else end, None if step == 1 else step)
    return (_WHOLE,) * dim + (cut,)


def _as_getitem(gm: GraphModule, node: Node) -> None:
    """`aten.slice(x, dim, start, end, step)` as `x[:, ..., start:end:step]`, merged into the slice it
    reads (`x[:, :, a:b][:, :, :, c:d]` is `x[:, :, a:b, c:d]`) where nothing else reads that one."""
    x, index = node.args[0], _slice_index(node, 1)
    if index is None:
        return
    if _is_slicing(x) and len(x.users) == 1:
        merged = _merged(x.args[1], index)
        if merged is not None:
            x, index = x.args[0], merged
    node.target, node.args, node.kwargs = operator.getitem, (x, index), {}
    if isinstance(node.args[0], Node):
        _erase_if_unread(gm, node.args[0])


def _is_slicing(node: Any) -> bool:
    """Whether `node` is `x[index]` with an index of slices only (a view of x of the same rank)."""
    return (
        isinstance(node, Node)
        and node.target is operator.getitem
        and isinstance(node.args[1], tuple)
        and all(isinstance(k, slice) for k in node.args[1])
    )


def _merged(first: tuple[slice, ...], second: tuple[slice, ...]) -> tuple[slice, ...] | None:
    """The one index of `x[first][second]`, both slicing, where they cut different dims; else None."""
    length = max(len(first), len(second))
    first, second = first + (_WHOLE,) * (length - len(first)), second + (_WHOLE,) * (length - len(second))
    if any(a != _WHOLE and b != _WHOLE for a, b in zip(first, second)):
        return None
    return tuple(b if a == _WHOLE else a for a, b in zip(first, second))


def _as_setitem(gm: GraphModule, node: Node) -> None:
    """`copy_(x[index], v)` / `fill_(x[index], v)` as `x[index] = v`: the item assignment it was written as."""
    target, value = node.args
    if node.kwargs or node.users or not _is_slicing(target) or len(target.users) != 1:
        return
    node.target, node.args = operator.setitem, (target.args[0], target.args[1], _assigned(value, target))
    for key in ("val", "tensor_meta"):  # an assignment returns nothing
        node.meta.pop(key, None)
    gm.graph.erase_node(target)
    _erase_if_unread(gm, value)


def _scatter_as_setitem(gm: GraphModule, node: Node) -> None:
    """`slice_scatter(x, copy(x[index], v), index)`, the functional form of `x[index] = v` that
    `run_decompositions` writes, as that assignment, where nothing else reads x but earlier assignments:
    then the readers of the result read x, written in place, as in the torch.fx trace of the same code."""
    base, source, index = node.args[0], node.args[1], _slice_index(node, 2)
    if not isinstance(source, Node) or source.target is not aten.copy.default or len(source.users) != 1:
        return
    target = source.args[0]
    if index is None or not _is_slicing(target) or target.args != (base, index) or len(target.users) != 1:
        return
    writes = [u for u in base.users if u.target is operator.setitem and u.args[0] is base]
    if set(base.users) != {target, node, *writes} or source.kwargs or node.kwargs:
        return
    if base.op not in ("call_function", "call_method", "call_module") or is_view(base):
        return  # an input, a stored tensor or a view of one: writing it in place would change it for its owner
    with gm.graph.inserting_before(node):
        gm.graph.call_function(operator.setitem, (base, index, _assigned(source.args[1], target)))
    node.replace_all_uses_with(base)
    value = source.args[1]
    for dead in (node, source, target):
        gm.graph.erase_node(dead)
    _erase_if_unread(gm, value)


def _assigned(value: Any, target: Node) -> Any:
    """The value to assign to `target` for `copy_(target, value)`: `value` without an expand to target's
    shape, or a view dropping leading 1s, which assignment's broadcasting does anyway."""
    if isinstance(value, Node) and value.target is aten.expand.default and _same_shape(value, target):
        value = value.args[0]
    if isinstance(value, Node) and value.target is aten.view.default and _drops_leading_ones(value):
        value = value.args[0]
    return value


def _drops_leading_ones(view: Node) -> bool:
    """Whether `view` only drops leading size-1 dims of its input ((1, C, 1, 1) to (C, 1, 1))."""
    shapes = _shapes(view.args[0], view)
    if shapes is None:
        return False
    shape, result = shapes
    extra = len(shape) - len(result)
    return extra >= 0 and shape == (1,) * extra + result


def _same_shape(a: Any, b: Any) -> bool:
    shapes = _shapes(a, b)
    return shapes is not None and shapes[0] == shapes[1]


def _shapes(*values: Any) -> tuple[tuple[Any, ...], ...] | None:
    """The shapes the program propagated to `values` (nodes), or None where one is not known."""
    tensors = [v.meta.get("val") if isinstance(v, Node) else None for v in values]
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return None
    return tuple(tuple(t.shape) for t in tensors)


def _as_linear_layer(gm: GraphModule, node: Node, reads: Counter) -> None:
    """`aten.linear(x, w, b)` as a call of an `nn.Linear` holding w and b, where nothing else reads them."""
    x, weight, bias = (*node.args, None)[:3]
    tensors = {"weight": weight, **({"bias": bias} if bias is not None else {})}
    values = _stored(gm, node, tensors, reads)
    if values is None or values["weight"].dim() != 2 or not all(isinstance(v, nn.Parameter) for v in values.values()):
        return
    w = values["weight"]
    if bias is not None and tuple(values["bias"].shape) != (w.shape[0],):
        return  # a bias that broadcasts: no nn.Linear holds it
    linear = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    linear.weight, linear.bias = w, values.get("bias")
    _call_instead(gm, node, x, tensors, linear)


_BATCH_NORMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _as_batch_norm_layer(gm: GraphModule, node: Node, reads: Counter) -> None:
    """`aten.batch_norm(x, w, b, mean, var, training=False, momentum, eps, ...)`, and the decomposed
    `_native_batch_norm_legit_no_training(x, w, b, mean, var, momentum, eps)[0]`, as a call of the eval-mode
    BatchNorm holding those tensors (of x's rank: `BatchNorm1d/2d/3d`, else `AnyRankBatchNorm`), where
    nothing else reads them. A BN with batch statistics is left to its rule, which says why it stays."""
    if node.target is operator.getitem:  # output 0 of a decomposed BN that nothing else reads
        native = node.args[0]
        if node.args[1] != 0 or native.kwargs or set(native.users) != {node}:
            return
        x, weight, bias, mean, var, momentum, eps = native.args
        training = False
    else:
        native = node
        x, weight, bias, mean, var, training, momentum, eps = (*node.args, *[None] * 8)[:8]
    if native.kwargs or training is not False or mean is None or var is None:
        return
    tensors = {"running_mean": mean, "running_var": var}
    tensors |= {name: t for name, t in (("weight", weight), ("bias", bias)) if t is not None}
    values = _stored(gm, native, tensors, reads)
    if values is None or (weight is None) != (bias is None):
        return
    value = x.meta.get("val") if isinstance(x, Node) else None
    kind = _BATCH_NORMS.get(value.dim(), AnyRankBatchNorm) if isinstance(value, torch.Tensor) else AnyRankBatchNorm
    bn = kind(values["running_mean"].shape[0], eps=eps, momentum=momentum, affine=weight is not None, device="meta")
    for name, tensor in values.items():
        setattr(bn, name, tensor)
    bn.num_batches_tracked = torch.zeros((), dtype=torch.long, device=values["running_mean"].device)
    _call_instead(gm, node, x, tensors, bn.eval(), unread=("num_batches_tracked",), reader=native)


def _is_native_batch_norm_output(node: Node) -> bool:
    source = node.args[0] if node.target is operator.getitem and node.args else None
    return isinstance(source, Node) and source.target is aten._native_batch_norm_legit_no_training.default


def _stored(gm: GraphModule, node: Node, tensors: dict[str, Node], reads: Counter) -> dict[str, Any] | None:
    """The model's tensors `tensors` stand for, where each is a `get_attr` that `node` alone reads."""
    if not all(_read_only_by(t, node, reads) for t in tensors.values()):
        return None
    return {name: attribute(gm, t) for name, t in tensors.items()}


def _call_instead(
    gm: GraphModule,
    node: Node,
    x: Any,
    tensors: dict[str, Node],
    layer: nn.Module,
    unread: tuple[str, ...] = (),
    reader: Node | None = None,
) -> None:
    """Call `layer`, which holds the tensors `tensors` read (by the names they have in it), on x in place of
    `node`, and of `reader`, the node reading them where that is another (a decomposed BN under its getitem).

    Where those tensors are all a module holds (an unlifted program keeps each layer's tensors in a
    module of its path), besides state the graph never reads (`unread`, taken over), the layer
    takes that module's place; else it is added, named after the first tensor, which move into it.
    """
    paths = {name: str(t.target).rpartition(".") for name, t in tensors.items()}
    owners = {owner for owner, _, _ in paths.values()}
    path = next(iter(owners))
    owner = gm.get_submodule(path)
    state = set(owner._parameters) | set(owner._buffers) | set(owner._modules)
    own_names = all(name == leaf for name, (_, _, leaf) in paths.items())
    if path and len(owners) == 1 and own_names and state - set(unread) == set(tensors) and "forward" not in vars(owner):
        for name in set(unread) & state:
            setattr(layer, name, getattr(owner, name))
        parent, _, name = path.rpartition(".")
        setattr(gm.get_submodule(parent), name, layer)  # the layer's own module, now the layer
    else:
        for owner_path, _, name in paths.values():
            delattr(gm.get_submodule(owner_path), name)
        first = str(next(iter(tensors.values())).target)
        base = re.sub(r"[._]?(weight|running_mean)$", "", first).replace(".", "_")
        path = free_name(gm, base or type(layer).__name__.lower())
        gm.add_submodule(path, layer)
    with gm.graph.inserting_before(node):
        call = gm.graph.call_module(path, (x,))
    call.meta = node.meta
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)
    if reader is not None and reader is not node:
        gm.graph.erase_node(reader)
    for tensor in tensors.values():
        gm.graph.erase_node(tensor)


def _read_only_by(tensor: Any, node: Node, reads: Counter) -> bool:
    """Whether `tensor` is a `get_attr` read by `node` alone, and no other node reads its attribute."""
    return (
        isinstance(tensor, Node)
        and tensor.op == "get_attr"
        and set(tensor.users) == {node}
        and reads[tensor.target] == 1
    )


def _erase_if_unread(gm: GraphModule, value: Any) -> None:
    """Erase `value` if nothing reads it, then so the nodes only it read (an expand of a view left out)."""
    if isinstance(value, Node) and not value.users and value.op == "call_function":
        inputs = value.all_input_nodes
        gm.graph.erase_node(value)
        for node in inputs:
            _erase_if_unread(gm, node)
