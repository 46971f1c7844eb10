"""A picture of what `fuse` merged: the graph before and after, side by side.

    before = reparam.tracing.trace(model, list(reparam.rule_set()))
    fused = reparam.fuse(model)
    reparam.picture.draw(before, fused, "before_after.svg")

Each panel draws one torch.fx graph top to bottom, one row per step of data flow, its nodes
coloured by kind: convolutions, BatchNorms, adds (the branch sums), everything else. Fused
convs are outlined, and their labels list how many layers each replaced. The format follows
the file's suffix (svg, png, pdf). Needs matplotlib (`pip install 'reparam[plot]'`); networkx
lays the graphs out.
"""

from __future__ import annotations

import operator
from pathlib import Path

import networkx as nx
import torch
from torch import nn
from torch.fx import GraphModule, Node

KINDS = {  # kind: (colour, legend label)
    "conv": ("#4C72B0", "convolution"),
    "bn": ("#DD8452", "BatchNorm"),
    "add": ("#55A868", "add (branch sum)"),
    "other": ("#B8B8B8", "other"),
    "io": ("#FFFFFF", "input / output"),
}

_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV_FUNCTIONS = {"conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d"}
_BN_FUNCTIONS = {"batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit_functional"}
_ADD_FUNCTIONS = {"add", "add_", "iadd"}


def kind(node: Node, gm: GraphModule) -> str:
    """`conv`, `bn`, `add`, `io` or `other`: how `node` is coloured."""
    if node.op in ("placeholder", "output"):
        return "io"
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, _CONV_MODULES):
            return "conv"
        if isinstance(module, _BN_MODULES):
            return "bn"
        return "other"
    name = _function_name(node)
    if name in _CONV_FUNCTIONS:
        return "conv"
    if name in _BN_FUNCTIONS:
        return "bn"
    if (
        node.target is operator.getitem
        and isinstance(node.args[0], Node)
        and _function_name(node.args[0]) in _BN_FUNCTIONS
    ):
        return "bn"
    if name in _ADD_FUNCTIONS:
        return "add"
    return "other"


def _function_name(node: Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    return getattr(target, "__name__", str(target))


def graph_of(gm: GraphModule) -> nx.DiGraph:
    """The data flow of `gm` as a networkx graph, its nodes labelled and kinded.

    Attributes (weights) and export guards are left out, and `getitem(batch_norm, 0)` of a
    multi-output BN is drawn as the BN itself.
    """
    graph = nx.DiGraph()
    alias: dict[Node, str] = {}
    for index, node in enumerate(gm.graph.nodes):
        if node.op == "get_attr" or (node.op == "call_module" and str(node.target) == "_guards_fn"):
            continue
        if node.target is operator.getitem and node.args[0] in alias and kind(node, gm) == "bn":
            alias[node] = alias[node.args[0]]
            continue
        alias[node] = node.name
        node_kind = kind(node, gm)
        graph.add_node(
            node.name, kind=node_kind, label=_label(node, node_kind), fused="reparam" in node.meta, order=index
        )
        for source in node.all_input_nodes:
            if source in alias:
                graph.add_edge(alias[source], node.name)
    return graph


def _label(node: Node, node_kind: str) -> str:
    if node.op == "placeholder":
        return "input" if node.target in ("x", "input") else f"input {node.target}"
    if node.op == "output":
        return "output"
    if node.op == "call_module":
        text = str(node.target)
        sources = node.meta.get("reparam", {}).get("sources")
        return f"{text}\n(from {len(sources)} layers)" if sources else text
    stack = node.meta.get("nn_module_stack")  # torch.export records which module ran each op
    path = list(stack.values())[-1][0] if stack else ""
    name = _function_name(node)
    return path if path and node_kind in ("conv", "bn") else name


def _layout(graph: nx.DiGraph) -> dict[str, tuple[float, float]]:
    """Top to bottom, one row per topological generation, each row centred."""
    positions = {}
    for depth, generation in enumerate(nx.topological_generations(graph)):
        for index, name in enumerate(sorted(generation, key=lambda n: graph.nodes[n]["order"])):
            positions[name] = (1.5 * (index - (len(generation) - 1) / 2), -depth)
    return positions


def draw(before: GraphModule, after: GraphModule, path: str | Path, *, title: str | None = None) -> Path:
    """Draw `before` and `after` side by side into `path` (svg, png or pdf, by suffix) and return the path."""
    try:
        from matplotlib import rc_context
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "drawing graphs needs matplotlib, an optional dependency: pip install 'reparam[plot]'"
        ) from error
    path = Path(path)
    graphs = [graph_of(before), graph_of(after)]
    layouts = [_layout(g) for g in graphs]
    depth = max(1, *(len({y for _, y in layout.values()}) for layout in layouts))
    width = max(1, *(max((x for x, _ in layout.values()), default=0) * 2 + 1 for layout in layouts))
    with rc_context({"svg.fonttype": "none"}):  # text stays text in the SVG: searchable, selectable
        figure = Figure(figsize=(min(6 + 2.2 * width, 40), min(2 + 0.55 * depth, 200)), layout="constrained")
        axes = figure.subplots(1, 2)
        for ax, graph, layout, name in zip(axes, graphs, layouts, ("before", "after"), strict=True):
            counts = _counts(graph)
            ax.set_title(
                f"{name}: {counts['conv']} conv, {counts['bn']} BN, {counts['add']} add, {counts['other']} other",
                fontsize=11,
            )
            ax.set_gid(f"panel_{name}")
            ax.axis("off")
            nx.draw_networkx_edges(graph, layout, ax=ax, arrows=True, arrowsize=8, edge_color="#777777", width=0.8)
            for fused in (False, True):
                names = [n for n, d in graph.nodes(data=True) if d["fused"] is fused]
                nx.draw_networkx_nodes(
                    graph,
                    layout,
                    nodelist=names,
                    ax=ax,
                    node_size=260,
                    node_color=[KINDS[graph.nodes[n]["kind"]][0] for n in names],
                    edgecolors="#C03030" if fused else "#333333",
                    linewidths=2.2 if fused else 0.8,
                )
            labels = {n: d["label"] for n, d in graph.nodes(data=True)}
            nx.draw_networkx_labels(
                graph,
                {n: (x + 0.12, y) for n, (x, y) in layout.items()},
                labels,
                ax=ax,
                font_size=7,
                horizontalalignment="left",
            )
            xs = [x for x, _ in layout.values()] or [0]
            ax.set_xlim(min(xs) - 0.6, max(xs) + 1.6)
            ax.set_ylim(min((y for _, y in layout.values()), default=0) - 0.5, 0.5)
        handles = [
            Line2D(
                [],
                [],
                marker="o",
                linestyle="",
                markersize=8,
                markerfacecolor=colour,
                markeredgecolor="#333333",
                label=label,
            )
            for colour, label in KINDS.values()
        ]
        handles.append(
            Line2D(
                [],
                [],
                marker="o",
                linestyle="",
                markersize=8,
                markerfacecolor="#FFFFFF",
                markeredgecolor="#C03030",
                markeredgewidth=2.2,
                label="new fused conv",
            )
        )
        figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
        if title:
            figure.suptitle(title)
        figure.savefig(path)
    return path


def count_kinds(gm: GraphModule) -> dict[str, int]:
    """How many nodes of each kind `gm` has (what the panel titles show)."""
    return _counts(graph_of(gm))


def _counts(graph: nx.DiGraph) -> dict[str, int]:
    return {k: sum(1 for _, d in graph.nodes(data=True) if d["kind"] == k) for k in KINDS}
