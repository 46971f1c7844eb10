"""What `fuse` did to a model: each fusion, each refusal and why."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import Reason


@dataclass(frozen=True)
class Fusion:
    """One new conv and the layers it replaced.

    Costs are multiply-accumulates per position of the region's input tensor, and parameters.
    """

    module: str
    sources: tuple[str, ...]
    rules: tuple[str, ...]
    macs_before: float
    macs_after: float
    params_before: int
    params_after: int


@dataclass(frozen=True)
class Replacement:
    """A subgraph a replacement rule swapped for a module."""

    module: str
    sources: tuple[str, ...]
    rule: str


@dataclass(frozen=True)
class Refusal:
    """A structural match that was left as written, with the reason and the nodes at fault."""

    rule: str
    reason: Reason
    message: str
    nodes: tuple[str, ...]


@dataclass
class FuseReport:
    """The record of one `fuse` call. `str(report)` is a readable table."""

    fusions: list[Fusion] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    replacements: list[Replacement] = field(default_factory=list)

    def refused(self, reason: Reason) -> list[Refusal]:
        """The refusals with this reason."""
        return [r for r in self.refusals if r.reason is reason]

    def __str__(self) -> str:
        lines = [f"{len(self.fusions)} fusion(s), {len(self.refusals)} refusal(s)"]
        for f in self.fusions:
            lines.append(
                f"  fused   {f.module:<28} <- {', '.join(f.sources)}  [{', '.join(f.rules)}]"
                f"  MACs/pos {f.macs_before:g} -> {f.macs_after:g}, params {f.params_before} -> {f.params_after}"
            )
        for r in self.replacements:
            lines.append(f"  replaced {', '.join(r.sources)} by {r.module} [{r.rule}]")
        for r in self.refusals:
            lines.append(f"  refused {', '.join(r.nodes):<28} [{r.rule}] {r.reason.value}: {r.message}")
        return "\n".join(lines)
