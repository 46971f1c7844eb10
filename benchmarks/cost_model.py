"""`python -m benchmarks.cost_model`: the constants of `reparam.cost`, measured on this machine.

Times single ops (convs of many shapes, eval BatchNorm, add) at 1 thread by default, prints
each time beside the cost model's estimate, and fits the model's constants to the measured
times (least squares on log time), writing all of it as markdown to `benchmarks/COST_MODEL.md`
(or `--out`). The constants in `reparam/cost.py` were set from such a fit on the development
machine, rounded; run this where you deploy to see how far its estimates are from your CPU.

Measurements only: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import math
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.benchmark import Timer

from reparam import cost
from reparam.kernel import Kernel

HERE = Path(__file__).resolve().parent
SHAPES = ((8, 56), (16, 56), (32, 56), (64, 56), (32, 28), (64, 28), (128, 28), (128, 14), (256, 14), (512, 7))
KERNELS = ((1, 1), (3, 3), (1, 3), (3, 1), (5, 5), (7, 7))


@dataclass(frozen=True)
class Op:
    """One measured op: what it is, its cost in the model's terms, and its median time."""

    name: str
    cost: cost.Cost
    load: cost.Workload
    seconds: float
    call: str  # the name of its per-call constant
    shape: tuple[int, int] = (0, 0)  # a conv's input channels per group and taps


def timed(function: Callable[[Tensor], object], x: Tensor, min_run_time: float) -> float:
    with torch.no_grad():
        function(x)
        function(x)
        return Timer("f(x)", globals={"f": function, "x": x}).blocked_autorange(min_run_time=min_run_time).median


def conv_ops(min_run_time: float, shapes: Sequence[tuple[int, int]]) -> list[Op]:
    """Dense, grouped (4 channels per group) and depthwise convs of every kernel shape, where they are affordable."""
    ops = []
    for channels, size in shapes:
        x = torch.randn(1, channels, size, size)
        for kernel_size in KERNELS:
            for groups in sorted({1, max(1, channels // 4), channels}):
                taps = math.prod(kernel_size)
                if channels * channels // groups * taps * size * size > 2e8 or (groups == channels and taps == 1):
                    continue  # too long to time often; a depthwise 1x1 is written as a BatchNorm
                padding = tuple(k // 2 for k in kernel_size)
                conv = nn.Conv2d(channels, channels, kernel_size, padding=padding, groups=groups).eval()
                name = f"conv {kernel_size[0]}x{kernel_size[1]} C={channels} {channels // groups}/group {size}x{size}"
                load, shape = cost.Workload(size * size), (channels // groups, taps)
                measured = timed(conv, x, min_run_time)
                call = "CONV_CALL" if groups == 1 else "GROUPED_CONV_CALL"
                ops.append(Op(name, cost.Cost.of(Kernel.from_conv(conv)), load, measured, call, shape))
    return ops


def elementwise_ops(min_run_time: float, shapes: Sequence[tuple[int, int]]) -> list[Op]:
    ops = []
    for channels, size in ((8, 4), *shapes):
        x, y = torch.randn(2, 1, channels, size, size)
        load = cost.Workload(size * size)
        bn = nn.BatchNorm2d(channels).eval()
        bn_cost = cost.Cost.of(Kernel.from_batchnorm(bn, 2))
        bn_time = timed(bn, x, min_run_time)
        ops.append(Op(f"BatchNorm C={channels} {size}x{size}", bn_cost, load, bn_time, "BATCHNORM_CALL"))
        add_cost = cost.Cost.elementwise(Kernel.identity(channels, 2))
        add_time = timed(y.add, x, min_run_time)
        ops.append(Op(f"add C={channels} {size}x{size}", add_cost, load, add_time, "ELEMENTWISE_CALL"))
    return ops


# ------------------------------------------------------------------------ fitting

_NAMES = ("MAC_RATE", "BANDWIDTH", "CONV_CALL", "GROUPED_CONV_CALL", "BATCHNORM_CALL", "ELEMENTWISE_CALL",
          "_HALF_RATE_LENGTH")


def estimate(op: Op, constants: dict[str, float]) -> float:
    """`Cost.seconds` of `op` under `constants` (differentiable in them when they are tensors)."""
    c, load = op.cost, op.load
    work = 0.0
    if c.work:
        per_group, taps = op.shape
        length = per_group * taps
        efficiency = 1.0 if taps == 1 else length / (length + constants["_HALF_RATE_LENGTH"])
        work = float(c.macs) / efficiency
    per_position = work / constants["MAC_RATE"] + float(c.elements) * load.itemsize / constants["BANDWIDTH"]
    return constants[op.call] + load.positions * per_position + c.params * load.itemsize / constants["BANDWIDTH"]


def fit(ops: list[Op]) -> dict[str, float]:
    """The constants that minimise the squared error of log(estimate) against log(measured time)."""
    logs = {
        name: torch.tensor(math.log(getattr(cost, name)), dtype=torch.float64, requires_grad=True) for name in _NAMES
    }
    optimizer = torch.optim.Adam(logs.values(), lr=0.05)
    for _ in range(1500):
        optimizer.zero_grad()
        constants = {name: value.exp() for name, value in logs.items()}
        loss = sum((torch.log(estimate(op, constants)) - math.log(op.seconds)) ** 2 for op in ops)
        loss.backward()
        optimizer.step()
    return {name: float(value.detach().exp()) for name, value in logs.items()}


def report(ops: list[Op], fitted: dict[str, float], threads: int) -> str:
    current = {name: getattr(cost, name) for name in _NAMES}
    lines = [
        "# The cost model's constants, measured",
        "",
        f"`python -m benchmarks.cost_model --threads {threads}`; {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {threads} thread(s). Medians of `blocked_autorange`.",
        "",
        "| constant | in reparam/cost.py | fitted here |",
        "|---|---:|---:|",
        *(f"| `{name}` | {current[name]:.3g} | {fitted[name]:.3g} |" for name in _NAMES),
        "",
        "| op | measured (us) | estimated (us) | estimated / measured |",
        "|---|---:|---:|---:|",
    ]
    for op in ops:
        estimated = op.cost.seconds(op.load)
        lines.append(f"| {op.name} | {op.seconds * 1e6:.1f} | {estimated * 1e6:.1f} | {estimated / op.seconds:.2f} |")
    ratios = sorted(op.cost.seconds(op.load) / op.seconds for op in ops)
    lines += ["", f"Estimated / measured: median {ratios[len(ratios) // 2]:.2f}, "
              f"10th percentile {ratios[len(ratios) // 10]:.2f}, 90th {ratios[9 * len(ratios) // 10]:.2f}.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cost_model", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "COST_MODEL.md")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="two shapes, short timings (a smoke run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes, min_run_time = (SHAPES[:1], 0.002) if args.quick else (SHAPES, 0.1)
    ops = conv_ops(min_run_time, shapes) + elementwise_ops(min_run_time, shapes)
    args.out.write_text(report(ops, fit(ops), args.threads))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
