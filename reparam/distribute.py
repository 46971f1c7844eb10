"""A per-channel layer after a channel concatenation, applied to each part instead.

A per-channel affine map commutes with concatenation along channels:

    a(cat([y1, ..., yn], dim=1)) = cat([a1(y1), ..., an(yn)], dim=1),   a_i = a on y_i's channels,

exactly, for every input. MixNet's MixedConv, `bn(cat([conv_k(x_k) for each split x_k]))`,
has no one layer to fold its BN into; applied to each part, each slice folds into the conv that
made that part (I). `distribute_over_concat` rewrites a per-channel layer (a BN of any kind, module
or `F.batch_norm` as timm's norm-act layers call it, any layer whose rule gives a per-channel
kernel) after a cat only where every part is made by a
node some rule folds a layer into and read by nothing but the cat, so that each slice is
absorbed and n layers never stand where one stood.
"""

from __future__ import annotations

import operator

from torch.fx import GraphModule, Node

from .constants import erase_unused_constants
from .context import CONCATENATIONS, Context, describe, free_name, substitute, trainable
from .errors import FusionRefused
from .kernel import Kernel
from .patterns import State
from .ranks import propagated
from .rules import PatternRule


def distribute_over_concat(gm: GraphModule, ctx: Context) -> int:
    """Apply each per-channel layer after a cat to the cat's parts; return how many were distributed.

    The slices are added to `ctx.modules` too, so that the pass's later steps see them.
    """
    done = 0
    for node in list(gm.graph.nodes):
        found = _distributable(node, ctx)
        if found is None:
            continue
        kernel, parts, counts = found
        cat = node.args[0]
        slices, start = [], 0
        with gm.graph.inserting_before(cat):
            for part, count in zip(parts, counts):
                name = free_name(gm, f"{describe(node).replace('.', '_')}_channels_{start}_{start + count}")
                layer = kernel.on_channels(start, start + count).to_batchnorm()
                layer.requires_grad_(trainable(gm, node))
                gm.add_submodule(name, layer)
                ctx.modules[name] = layer
                slices.append(gm.graph.call_module(name, (part,)))
                start += count
            stacked = gm.graph.call_function(cat.target, (slices, 1))
        tensors = [a for a in node.all_input_nodes if a is not cat]  # a functional BN's statistics
        substitute(gm, node, stacked, cat)
        erase_unused_constants(gm, tensors)
        done += 1
    return done


def _distributable(node: Node, ctx: Context) -> tuple[Kernel, list[Node], list[int]] | None:
    """The per-channel kernel of `node`, the cat's parts and their channel counts, if `node` may be distributed."""
    if node.op not in ("call_module", "call_function") or not node.args or not _is_channel_cat(node.args[0], ctx):
        return None
    if node.op == "call_module" and (len(node.args) != 1 or node.kwargs):
        return None  # a functional layer's other arguments are its tensors, which layer_kernel reads
    cat = node.args[0]
    parts = list(cat.args[0])
    if len(cat.users) != 1 or not all(isinstance(p, Node) and _absorbs(p, cat, ctx) for p in parts):
        return None
    try:
        ctx.check_foldable(node)
        kernel = ctx.layer_kernel(node, over_channels=True)
    except FusionRefused:
        return None
    counts = [_channels(p, ctx) for p in parts]
    if not kernel.is_channelwise or None in counts or sum(counts) != kernel.out_channels:
        return None
    return kernel, parts, counts


def _is_channel_cat(node: object, ctx: Context) -> bool:
    """Whether `node` concatenates two or more tensors along the channel dim (`dim=1`, or `1 - rank`)."""
    if not isinstance(node, Node) or node.op != "call_function" or node.target not in CONCATENATIONS:
        return False
    if not node.args or not isinstance(node.args[0], list | tuple) or len(node.args[0]) < 2:
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    rank = ctx.rank(node)
    return dim == 1 or (rank is not None and dim == 1 - rank)


def _absorbs(part: Node, cat: Node, ctx: Context) -> bool:
    """Whether a layer applied to `part` folds into the node making it: a node rules anchor on, that may be
    folded (no hooks, not shared), read by the cat alone."""
    if set(part.users) != {cat} or list(cat.args[0]).count(part) != 1 or not _makes_a_layer(part, ctx):
        return False
    try:
        ctx.check_foldable(part)
    except FusionRefused:
        return False
    return True


def _makes_a_layer(node: Node, ctx: Context) -> bool:
    """Whether a rule anchored on `node` reads a layer there. A selection (`parts[i]`: a part of a split, or
    the output of a decomposed BN) is one only where a rule's pattern matches it as it stands: a rule
    anchored on every `getitem` says nothing of a split's part, which no layer made."""
    rules = ctx.rules_of(node)
    if node.target is not operator.getitem:
        return bool(rules)
    return any(
        isinstance(rule, PatternRule) and next(iter(rule.pattern.matches(node, State(), ctx, None)), None) is not None
        for rule in rules
    )


def _channels(node: Node, ctx: Context) -> int | None:
    """How many channels `node` has: from its layer, else from propagated shapes."""
    try:
        return ctx.layer_kernel(node, over_channels=True).out_channels
    except FusionRefused:
        pass
    meta = propagated(node)
    return meta.shape[1] if meta is not None and len(meta.shape) > 1 else None
