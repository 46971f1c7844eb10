"""Measured costs: where the estimate is close, time each exact form of a region and keep the fastest.

`fuse(model, cost="measure", example_inputs=...)`. For each region whose candidate forms (one
conv, the static plan, the region as written) are estimated within `CLOSE` of the fastest, every
such form is built as a small module and timed on the region's real input (the value the
example inputs give it), on the model's device, in `ROUNDS` interleaved rounds; the form with
the lowest median wins, except that a form with fewer ops within `TIE` of it is preferred, so
that noise cannot trade a fusion for a few percent. The whole `fuse` call spends at most
`BUDGET` seconds timing; regions met after that keep the static decision (they have no
entry in `report.timings`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Interpreter, Node
from torch.utils.benchmark import Timer

from .report import Form
from .sharing import writes_undone

CLOSE = 1.5  # forms estimated within this factor of the fastest estimate are timed
TIE = 0.05  # a form with fewer ops wins when it is measured within 5% of the fastest
ROUNDS = 5
MIN_RUN_TIME = 0.05  # seconds of calls per form per round
BUDGET = 30.0  # seconds of timing per fuse call
EXAMPLE_INPUTS = "reparam_example_inputs"  # the key of a GraphModule's example inputs in its meta, while it is fused


@dataclass
class Stopwatch:
    """Times the forms of regions on the values the example inputs give their inputs."""

    spent: float = 0.0
    _values: dict[Node, Tensor] = field(default_factory=dict)

    @property
    def exhausted(self) -> bool:
        return self.spent >= BUDGET

    def capture(self, gm: GraphModule, nodes: Iterable[Node]) -> None:
        """Run `gm` on its example inputs once, keeping the values of `nodes` (those that are tensors).

        The example inputs are those the caller gave for the model (`gm.meta[EXAMPLE_INPUTS]`);
        a submodule fused on its own (inside an untraceable parent) has none, and is not timed.
        """
        wanted = set(nodes)
        self._values = {}
        example_inputs = gm.meta.get(EXAMPLE_INPUTS)
        if not wanted or example_inputs is None:
            return
        values = self._values

        class Capture(Interpreter):
            def run_node(self, n: Node) -> Any:
                value = super().run_node(n)
                if n in wanted and isinstance(value, Tensor):
                    values[n] = value
                return value

        with torch.no_grad(), writes_undone(gm):  # a forward that updates a buffer must not change the model
            Capture(gm).run(*(x.clone() if isinstance(x, Tensor) else x for x in example_inputs))

    def value(self, node: Node) -> Tensor | None:
        return self._values.get(node)

    def time(self, modules: dict[str, nn.Module], x: Tensor) -> dict[str, float]:
        """Median seconds per call of each module on `x`, over interleaved rounds."""
        start = time.perf_counter()
        samples: dict[str, list[float]] = {name: [] for name in modules}
        with torch.no_grad():
            for module in modules.values():
                module(x)  # a first call may build kernels or caches
            for round_ in range(ROUNDS):
                names = list(modules)
                for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                    timer = Timer("m(x)", globals={"m": modules[name], "x": x}, num_threads=torch.get_num_threads())
                    samples[name].append(timer.blocked_autorange(min_run_time=MIN_RUN_TIME).median)
        self.spent += time.perf_counter() - start
        return {name: statistics.median(times) for name, times in samples.items()}


def winner(forms: list[Form]) -> Form:
    """The fastest measured form, or one with fewer ops measured within `TIE` of it."""
    timed = [f for f in forms if f.measured is not None]
    fastest = min(timed, key=lambda f: (f.measured, f.ops))
    return min((f for f in timed if f.measured <= fastest.measured * (1 + TIE)), key=lambda f: (f.ops, f.measured))
