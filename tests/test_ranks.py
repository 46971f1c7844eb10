"""Ranks read off the graph (`reparam/ranks.py`) agree with the ranks the graph really computes.

A wrong rank would let a Linear fold as if its input were `(batch, features)`: every rank the
graph is said to show is checked against the shapes a forward really gives (torch.fx's
`ShapeProp`), on author-style forwards and on random chains of shape-changing ops.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from reparam.context import Context
from reparam.transforms import BUILTIN_RULES
from reparam.tracing import trace
from tests.strategies import seeds


def _ranks(model: nn.Module, *inputs: torch.Tensor) -> list[tuple[str, int | None, int]]:
    """(node, rank read off the graph, rank a forward gives) for each node that makes a tensor."""
    gm = trace(model, BUILTIN_RULES)
    said = {node.name: Context(gm, {}).rank(node) for node in gm.graph.nodes}
    propagated = copy.deepcopy(gm)
    ShapeProp(propagated).propagate(*inputs)
    rows = []
    for node in propagated.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if hasattr(meta, "shape") and node.op != "output":
            rows.append((node.name, said[node.name], len(meta.shape)))
    return rows


def _assert_agree(rows: list[tuple[str, int | None, int]]) -> None:
    wrong = [row for row in rows if row[1] is not None and row[1] != row[2]]
    assert not wrong, f"(node, read off the graph, real): {wrong}"


class LeViTAttention(nn.Module):
    """LeViT's attention as timm writes it: sizes unpacked from `x.shape`, heads split off by view."""

    def __init__(self, dim: int = 8, heads: int = 2, key_dim: int = 4) -> None:
        super().__init__()
        self.heads, self.key_dim, self.scale = heads, key_dim, key_dim**-0.5
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 3, 2, 1), nn.BatchNorm2d(dim))
        self.qkv = nn.Linear(dim, heads * key_dim * 3)
        self.proj = nn.Linear(heads * key_dim, dim)
        self.norm = nn.BatchNorm1d(dim)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, self.heads, -1).split([self.key_dim] * 3, dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(B, N, self.heads * self.key_dim))
        pooled = x.mean(1)
        return self.norm(pooled), x[:, None, ..., 0], torch.stack([pooled, pooled]), x.unsqueeze(-1)[0, :, 1:]


class ClassifierHeads(nn.Module):
    """Heads flattened the ways people write them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        a = self.fc(y.view(y.size(0), -1)[:, :4])
        b = self.fc(y.mean((2, 3)))
        c = self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))
        d = y.permute(0, 2, 3, 1).reshape(-1, 4)
        return a + b + c, d, y.sum(dim=(-1,), keepdim=True), y.chunk(2, 1)[1] * y.new_ones(1)


@pytest.mark.parametrize(
    "model, shape, needed",
    [
        (LeViTAttention(), (2, 3, 8, 8), {"transpose", "reshape", "mean"}),
        (ClassifierHeads(), (2, 3, 6, 6), {"getitem", "mean", "flatten"}),
    ],
    ids=["levit_attention", "classifier_heads"],
)
def test_ranks_read_off_author_style_graphs_are_the_real_ones(model, shape, needed):
    rows = _ranks(model.eval(), torch.randn(shape))
    _assert_agree(rows)
    known = {name for name, said, _ in rows if said is not None}
    assert needed <= known  # the inputs of the Linears and of the BatchNorm1d
    assert len(known) >= 0.8 * len(rows), sorted(set(name for name, *_ in rows) - known)


def test_a_rank_the_graph_does_not_show_is_unknown():
    class Conv(nn.Module):  # Conv2d takes 3D and 4D inputs: its output's rank is its input's
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(x).flatten(1, 2)

    gm = trace(Conv(), BUILTIN_RULES)
    ctx = Context(gm, {})
    assert [ctx.rank(n) for n in gm.graph.nodes if n.op != "output"] == [None, None, None]


_OPS = st.sampled_from(["permute", "flatten", "view", "mean", "unsqueeze", "index", "transpose", "add", "chunk"])


class RandomChain(nn.Module):
    """A chain of shape-changing ops drawn by hypothesis, after a BatchNorm2d (rank 4).

    Which spelling each step uses is decided when the chain is built, on a real tensor, so that
    forward has no Python logic on shapes and traces.
    """

    def __init__(self, ops: list[tuple[str, int]], x: torch.Tensor) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(2)
        self.register_buffer("row", torch.ones(3))
        self.steps: list[tuple[str, object]] = []
        for op, k in ops:
            if x.dim() == 0:
                break
            step = self._step(op, k, x.dim(), x.shape[-1])
            if step is not None:
                x = self._apply(x, *step)
                self.steps.append(step)

    @staticmethod
    def _step(op: str, k: int, rank: int, last: int) -> tuple[str, object] | None:
        if op in ("flatten", "mean", "index", "transpose", "chunk") and rank < 2:
            return None
        steps = {
            "permute": ("permute", tuple(reversed(range(rank)))),
            "flatten": ("flatten", k % rank) if k % 2 else ("flatten_to", -1 - k % rank),
            "view": ("view", None) if k % 2 else ("reshape", None),
            "mean": ("mean", bool(k % 2)) if k % 3 else ("sum", None),
            "unsqueeze": ("unsqueeze", k % (rank + 1)),
            "index": ("index", k % 2),
            "transpose": ("transpose", None),
            "add": ("add", k % 3) if last == 3 else ("double", None),
            "chunk": ("chunk", None) if last > 1 else None,
        }
        return steps[op]

    def _apply(self, x: torch.Tensor, op: str, arg: object) -> torch.Tensor:
        if op == "permute":
            return x.permute(*arg)
        if op in ("flatten", "flatten_to"):
            return x.flatten(arg) if op == "flatten" else torch.flatten(x, 0, arg)
        if op in ("view", "reshape"):
            return x.view(x.size(0), -1) if op == "view" else x.reshape(-1, x.shape[-1])
        if op in ("mean", "sum"):
            return x.mean(-1, keepdim=arg) if op == "mean" else x.sum((0, -1))
        if op == "unsqueeze":
            return x.unsqueeze(arg)
        if op == "index":
            return x[:, None, ..., 0] if arg else x[0, ..., 1:]
        if op == "transpose":
            return x.transpose(0, -1)
        if op in ("add", "double"):
            return x + self.row[(None,) * arg] if op == "add" else x * 2.0
        return x.chunk(2, -1)[0]

    def forward(self, x):
        x = self.bn(x)
        for step in self.steps:
            x = self._apply(x, *step)
        return x


@settings(max_examples=60)
@given(ops=st.lists(st.tuples(_OPS, st.integers(0, 5)), min_size=1, max_size=8), seed=seeds())
def test_ranks_read_off_random_chains_are_the_real_ones(ops, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2, 3, 3, generator=generator)
    try:
        model = RandomChain(ops, x).eval()
    except (RuntimeError, IndexError):
        return  # a view or an index the drawn sizes do not allow: not a program
    rows = _ranks(model, x)
    _assert_agree(rows)
    unknown = [name for name, said, _ in rows if said is None]
    assert unknown == ["x"]  # from the BatchNorm2d on, every op in the chain says its rank
