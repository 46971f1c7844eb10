"""What `fuse` did to a model: each fusion, each refusal and why."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from .errors import Reason


@dataclass(frozen=True)
class Fusion:
    """One new conv and the layers it replaced.

    Costs are multiply-accumulates per position of the region's input tensor, parameters, and
    the cost model's estimate of one call's time in seconds (`reparam.cost`).
    """

    module: str
    sources: tuple[str, ...]
    rules: tuple[str, ...]
    macs_before: float
    macs_after: float
    params_before: int
    params_after: int
    seconds_before: float
    seconds_after: float


@dataclass(frozen=True)
class Replacement:
    """A subgraph a replacement rule swapped for a module."""

    module: str
    sources: tuple[str, ...]
    rule: str


@dataclass(frozen=True)
class Untraced:
    """A module whose forward torch.fx could not trace: it was kept as written, the layers inside it fused."""

    module: str
    type_name: str
    reason: str


@dataclass(frozen=True)
class Exported:
    """A module torch.fx could not trace, fused through torch.export on the inputs it was called with.

    `conditions` are what its Python read of those inputs' sizes (`x.shape[0] == 1`): the fused
    part checks them on every call and raises where they do not hold.
    """

    module: str
    type_name: str
    reason: str
    conditions: tuple[str, ...]


@dataclass(frozen=True)
class Unfused:
    """A per-channel layer (a BatchNorm, a scale) left in the fused model that no refusal names, and why.

    Such a layer is usually folded; it stays where no rule folds it into a layer beside it (it reads
    a ReLU's output or a concatenation and feeds a ReLU, as in pre-activation nets).
    """

    layer: str
    type_name: str
    reason: str


@dataclass(frozen=True)
class Refusal:
    """A structural match that was left as written, with the reason and the nodes at fault."""

    rule: str
    reason: Reason
    message: str
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class Form:
    """One exact way to compute a region, as `cost="measure"` judged it."""

    name: str  # "one conv", "as planned" (the static plan, partly fused), "as written"
    ops: int
    estimated: float  # seconds per call, from the cost model
    measured: float | None = None  # median seconds per call on the example inputs, where timed


@dataclass(frozen=True)
class Timing:
    """A region whose forms were timed: each form with its estimate and measured time, and the one kept."""

    sources: tuple[str, ...]
    forms: tuple[Form, ...]
    chosen: str


@dataclass
class FuseReport:
    """The record of one `fuse` call. `str(report)` is a readable table."""

    fusions: list[Fusion] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    replacements: list[Replacement] = field(default_factory=list)
    untraced: list[Untraced] = field(default_factory=list)
    timings: list[Timing] = field(default_factory=list)
    exported: list[Exported] = field(default_factory=list)
    unfused: list[Unfused] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """Whether `fuse` rewrote anything."""
        return bool(self.fusions or self.replacements)

    def refused(self, reason: Reason) -> list[Refusal]:
        """The refusals with this reason."""
        return [r for r in self.refusals if r.reason is reason]

    def extend(self, other: FuseReport) -> None:
        """Add another report's entries to this one."""
        self.fusions += other.fusions
        self.refusals += other.refusals
        self.replacements += other.replacements
        self.untraced += other.untraced
        self.timings += other.timings
        self.exported += other.exported
        self.unfused += other.unfused

    def prefixed(self, path: str) -> FuseReport:
        """This report with module and node names taken relative to the submodule at `path`."""
        if not path:
            return self

        def names(values: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(path + v for v in values)

        return FuseReport(
            [replace(f, module=path + f.module, sources=names(f.sources)) for f in self.fusions],
            [replace(r, nodes=names(r.nodes)) for r in self.refusals],
            [replace(r, module=path + r.module, sources=names(r.sources)) for r in self.replacements],
            [replace(u, module=path + u.module) for u in self.untraced],
            [replace(t, sources=names(t.sources)) for t in self.timings],
            [replace(e, module=path + e.module) for e in self.exported],
            [replace(u, layer=path + u.layer) for u in self.unfused],
        )

    def __str__(self) -> str:
        if not (self.changed or self.refusals or self.untraced or self.exported or self.unfused):
            return "nothing to fuse: no exact, cheaper rewrite applies (an already fused model reads so)"
        lines = [
            f"{len(self.fusions)} fusion(s), {len(self.replacements)} replacement(s), "
            f"{len(self.refusals)} refusal(s), {len(self.untraced)} untraced module(s)"
        ]
        for f in self.fusions:
            lines.append(
                f"  fused   {f.module:<28} <- {', '.join(f.sources)}  [{', '.join(f.rules)}]"
                f"  MACs/pos {f.macs_before:g} -> {f.macs_after:g}, params {f.params_before} -> {f.params_after}, "
                f"estimated {f.seconds_before * 1e6:.0f} -> {f.seconds_after * 1e6:.0f} us"
            )
        for r in self.replacements:
            lines.append(f"  replaced {', '.join(r.sources)} by {r.module} [{r.rule}]")
        for r in self.refusals:
            lines.append(f"  refused {', '.join(r.nodes):<28} [{r.rule}] {r.reason.value}: {r.message}")
        for u in self.untraced:
            lines.append(f"  untraced {u.module} ({u.type_name}), kept as written (layers inside fused): {u.reason}")
        for k in self.unfused:
            lines.append(f"  kept    {k.layer:<28} ({k.type_name}) {k.reason}")
        for e in self.exported:
            where = f", valid where {_readable(e.conditions)} (checked on each call)" if e.conditions else ""
            lines.append(f"  exported {e.module} ({e.type_name}), fused through torch.export{where}: {e.reason}")
        for t in self.timings:
            forms = ", ".join(
                f"{f.name} {f.measured * 1e6:.0f} us (estimated {f.estimated * 1e6:.0f})"
                for f in t.forms
                if f.measured is not None
            )
            lines.append(f"  timed   {', '.join(t.sources):<28} {forms}: kept {t.chosen}")
        return "\n".join(lines)


_SIZE = r"[\w.\[\]]+"
_SIMPLE = re.compile(rf"{_SIZE} (==|>=|<=|<|>) {_SIZE}|(Eq|Ne)\({_SIZE}, {_SIZE}\)")


def _readable(conditions: tuple[str, ...]) -> str:
    """The conditions that compare one size with a number or another size; the others counted."""
    simple = [c for c in conditions if _SIMPLE.fullmatch(c)]
    more = len(conditions) - len(simple)
    return ", ".join(simple) + (f" and {more} more (arithmetic of those sizes)" if more else "")
