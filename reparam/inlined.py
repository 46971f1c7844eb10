"""Layers whose forward does not trace, written into the graph op by op through torch.export.

A layer with no submodules whose forward torch.fx cannot trace (timm's `Conv2dSame` computes
its "same" padding from `x.size()` with `math.ceil`) is kept as one call (`tracing.trace`), so
nothing around it folds into the convolution inside it: the BN after every TF-ported stride-2
conv stays. Given example inputs, the shapes propagated to the layer are known: it is exported
with torch.export on inputs of those shapes, every dim dynamic (`exported_part`), and its aten
ops replace the call in the traced graph (the padding stays computed from the input's size on
every call). The aten rules then see its convolution, and the BN after it folds.

The exported ops hold for every input size torch.export left dynamic; where its Python read a
size, the program checks what it assumed on every call and raises outside it (as exported
parts do), and `report.exported` lists the layer with those conditions. A layer with hooks or
a patched forward, one without tensors of its own, and one whose export fails or differs from
it on the example are left as written, as before.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from .context import attribute, free_name, runs_more_than_its_class
from .errors import first_line
from .exported_parts import exported_part
from .ranks import propagated
from .report import Exported
from .verify import compare


def inline_untraceable_layers(gm: GraphModule, kept: dict[str, tuple[str, str]]) -> list[Exported]:
    """Replace each call of a kept layer (`kept`: path -> (type name, why it was kept)) by its exported ops.

    Needs shapes propagated on `gm` (`ShapeProp`). Returns the layers inlined; they are taken
    out of `kept`.
    """
    inlined = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node.target not in kept:
            continue
        layer = gm.get_submodule(node.target)
        inputs = _example_inputs(node, layer)
        if inputs is None:
            continue
        type_name, reason = kept[node.target]
        try:
            part, conditions = exported_part(layer, inputs)
            compare(layer, part, inputs, None)
        except Exception as error:  # noqa: BLE001 - torch.export's own errors name no common type
            kept[node.target] = (type_name, f"{reason}; torch.export of it failed too ({first_line(error)[:120]})")
            continue
        if _write_in_place_of(gm, node, part):
            del kept[node.target]
            inlined.append(Exported(node.target, type_name, f"{reason}; its exported ops replace the call", conditions))
    return inlined


def name_the_fix(gm: GraphModule, kept: dict[str, tuple[str, str]]) -> None:
    """Without example inputs: say, in the reason of each kept layer that could be inlined, how."""
    for path, (type_name, reason) in kept.items():
        if _exportable(gm.get_submodule(path)):
            kept[path] = (type_name, f"{reason}; given example_inputs=(...), its exported ops would replace it")


def _exportable(layer: nn.Module) -> bool:
    """A layer with tensors of its own (a conv, not a reshuffle), no submodules, no hooks or patched forward."""
    own = [t for t in (*layer._parameters.values(), *layer._buffers.values()) if t is not None]
    return bool(own) and runs_more_than_its_class(layer) is None and next(layer.children(), None) is None


def _example_inputs(node: Node, layer: nn.Module) -> tuple[torch.Tensor, ...] | None:
    """Random tensors of the shapes propagated to `node`'s inputs, if it is a layer worth exporting."""
    if not _exportable(layer) or node.kwargs:
        return None
    if not all(isinstance(a, Node) and propagated(a) is not None for a in node.args):
        return None
    device = next(layer.parameters(), next(layer.buffers(), torch.empty(0))).device
    return tuple(torch.randn(propagated(a).shape, dtype=propagated(a).dtype, device=device) for a in node.args)


def _write_in_place_of(gm: GraphModule, node: Node, part: GraphModule) -> bool:
    """Copy `part`'s ops into `gm` before `node`, its inputs being `node`'s; then let them replace `node`."""
    placeholders = [n for n in part.graph.nodes if n.op == "placeholder"]
    [output] = [n for n in part.graph.nodes if n.op == "output"]
    results = output.args[0] if isinstance(output.args[0], list | tuple) else [output.args[0]]
    if len(placeholders) != len(node.args) or len(results) != 1:
        return False
    copies: dict[Node, Any] = dict(zip(placeholders, node.args))
    with gm.graph.inserting_before(node):
        for op in part.graph.nodes:
            if op.op == "get_attr":
                copies[op] = gm.graph.get_attr(_stored(gm, node.target, str(op.target), attribute(part, op)))
            elif op.op in ("call_function", "call_method", "call_module"):  # named after the layer, as reported
                target = op.target
                if op.op == "call_module":  # a Linear the program's `aten.linear` became (canonical.py)
                    target = _stored(gm, node.target, str(op.target), part.get_submodule(str(op.target)))
                args, kwargs = map_arg((op.args, op.kwargs), copies.__getitem__)
                copies[op] = gm.graph.create_node(op.op, target, args, kwargs, f"{node.name}_{op.name}")
                copies[op].meta = dict(op.meta)
    node.replace_all_uses_with(map_arg(results[0], copies.__getitem__))
    gm.graph.erase_node(node)
    return True


def _stored(gm: GraphModule, layer: str, name: str, value: Any) -> str:
    """Store a tensor (or layer) of the exported layer on `gm` under a free name built from the layer's path."""
    path = free_name(gm, f"{layer}_{name}".replace(".", "_"))
    if isinstance(value, nn.Module):
        gm.add_submodule(path, value)
    elif isinstance(value, nn.Parameter):
        gm.register_parameter(path, value)
    elif isinstance(value, torch.Tensor):
        gm.register_buffer(path, value)
    else:
        setattr(gm, path, value)
    return path
