"""`python -m benchmarks.fuse_time`: how long `reparam.fuse` takes, against the floor and against timm.

Four tables, written as markdown to `benchmarks/FUSE_TIME.md` (or `--out`):

- reference nets: `fuse` against a deepcopy plus `torch.fx.symbolic_trace` of the same model (the
  cost of merely tracing a copy, which any tracing fuser pays), interleaved medians;
- timm's reparameterizable families: `fuse` against `timm.utils.reparameterize_model` in the same
  process and thread count, when timm imports (an optional bench dependency; the reason is printed
  when it does not);
- a long linear chain (1x1 conv, BN, 1x1 conv, BN, ...: one region of N layers) and
- N RepVGG blocks of 8 channels, each fused in a fresh process so its peak memory is its own;
  both with t(2N)/t(N), which is 2 for linear growth.

Measurements only: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import multiprocessing
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.fx
from torch import nn

import reparam
from reparam.blocks import randomize_batchnorm

from .measure import synthetic_net
from .nets import full_nets, quick_nets

TIMM_MODELS = ("repvgg_a0", "mobileone_s0", "fastvit_t8", "repghostnet_050", "repvit_m1", "levit_128s")


def linear_chain(layers: int, channels: int = 8) -> nn.Module:
    """`layers` alternating 1x1 convs and BNs with nothing between them: one linear region."""
    parts = [nn.Conv2d(channels, channels, 1) if i % 2 == 0 else nn.BatchNorm2d(channels) for i in range(layers)]
    return randomize_batchnorm(nn.Sequential(*parts)).eval()


def traced_copy(model: nn.Module) -> None:
    """The floor: what tracing a copy of `model` costs before any fusion work."""
    torch.fx.symbolic_trace(copy.deepcopy(model))


def interleaved(first: Callable[[], object], second: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall seconds of `first()` and of `second()`, called alternately (so drift hits both alike).

    The garbage of the previous call (a traced graph's reference cycles) is collected before each
    call, untimed: left to the cyclic collector, it made one call in three of either side up to 3x
    slower, whichever call the collection fell in.
    """
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for function, record in zip((first, second), times):
            gc.collect()
            start = time.perf_counter()
            function()
            record.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def once(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def peak_memory_mib() -> float:
    """This process's peak resident memory: Linux's VmHWM (reset by exec, unlike `ru_maxrss`), else `ru_maxrss`."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


class SyntheticFuse(NamedTuple):
    """One fuse of `synthetic_net(blocks)`: wall seconds, the process's user and system CPU seconds
    during it, and its peak memory before and after."""

    seconds: float
    user_seconds: float
    system_seconds: float
    peak_before_mib: float
    peak_after_mib: float


def fuse_synthetic_in_this_process(blocks: int) -> SyntheticFuse:
    torch.set_num_threads(1)
    reparam.fuse(synthetic_net(2))  # first calls pay for imports and caches
    net = synthetic_net(blocks)
    before = peak_memory_mib()
    start = resource.getrusage(resource.RUSAGE_SELF)
    seconds = once(lambda: reparam.fuse(net))
    end = resource.getrusage(resource.RUSAGE_SELF)
    return SyntheticFuse(
        seconds, end.ru_utime - start.ru_utime, end.ru_stime - start.ru_stime, before, peak_memory_mib()
    )


def fuse_synthetic(blocks: int) -> SyntheticFuse:
    """`fuse_synthetic_in_this_process` run in a fresh interpreter, so that the peak is its own."""
    code = f"from benchmarks.fuse_time import fuse_synthetic_in_this_process as f; print(list(f({blocks})))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True, check=True
    )
    return SyntheticFuse(*json.loads(done.stdout.strip().splitlines()[-1]))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def _doublings(times: dict[int, float]) -> list[list[str]]:
    return [[f"{n} → {2 * n}", f"{times[2 * n] / times[n]:.2f}"] for n in times if 2 * n in times]


def reference_nets(quick: bool, repeats: int, log: Callable[[str], None]) -> list[str]:
    rows = []
    for spec in quick_nets() if quick else full_nets():
        model = randomize_batchnorm(spec.training()).eval()
        reparam.fuse(model)  # warm
        fuse_s, floor_s = interleaved(lambda: reparam.fuse(model), lambda: traced_copy(model), repeats)
        log(f"{spec.name}: fuse {fuse_s:.3f} s, floor {floor_s:.3f} s")
        rows.append([spec.name, f"{fuse_s:.3f}", f"{floor_s:.3f}", f"**{fuse_s / floor_s:.2f}**"])
    return [
        "## Reference nets: fuse against the tracing floor",
        "",
        f"Medians of {repeats} interleaved calls. Floor: `torch.fx.symbolic_trace(copy.deepcopy(model))`.",
        "",
        *_table(["net", "fuse s", "deepcopy + symbolic_trace s", "fuse / floor"], rows),
    ]


def timm_models(repeats: int, log: Callable[[str], None]) -> list[str]:
    lines = ["## timm's reparameterizable models: fuse against `timm.utils.reparameterize_model`", ""]
    try:
        import timm
        from timm.utils.model import reparameterize_model
    except Exception as error:  # timm needs torchvision, whose wheel may not match the pinned torch
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        log(f"timm not measured: {reason}")
        return lines + [f"Not measured here: timm does not import ({reason}).", ""]
    rows = []
    for name in TIMM_MODELS:
        model = randomize_batchnorm(timm.create_model(name, pretrained=False)).eval()
        reparam.fuse(model)
        fuse_s, timm_s = interleaved(lambda: reparam.fuse(model), lambda: reparameterize_model(model), repeats)
        log(f"{name}: fuse {fuse_s:.3f} s, timm {timm_s:.3f} s")
        rows.append([name, f"{fuse_s:.3f}", f"{timm_s:.3f}", f"**{fuse_s / timm_s:.2f}**"])
    return lines + [
        f"timm {timm.__version__}, pretrained=False; medians of {repeats} interleaved calls, both on a copy.",
        "",
        *_table(["model", "fuse s", "reparameterize_model s", "fuse / timm"], rows),
    ]


def chain_growth(sizes: Sequence[int], log: Callable[[str], None]) -> list[str]:
    times = {}
    for layers in sizes:
        model = linear_chain(layers)
        times[layers] = min(once(lambda: reparam.fuse(model)) for _ in range(2))
        log(f"chain of {layers} layers: {times[layers]:.3f} s")
    rows = [[str(n), f"{t:.3f}", f"{t / n * 1e3:.2f}"] for n, t in times.items()]
    return [
        "## A long linear chain",
        "",
        "`nn.Sequential` of N alternating `Conv2d(8, 8, 1)` and `BatchNorm2d(8)`, no activation: one region "
        "that fuses to a single conv. Best of 2 calls.",
        "",
        *_table(["layers N", "fuse s", "ms per layer"], rows),
        *_table(["N → 2N", "t(2N) / t(N)"], _doublings(times)),
    ]


def block_growth(sizes: Sequence[int], log: Callable[[str], None]) -> list[str]:
    times, rows = {}, []
    for blocks in sizes:
        run = fuse_synthetic(blocks)
        times[blocks] = run.seconds
        log(
            f"{blocks} RepVGG blocks: {run.seconds:.2f} s (system {run.system_seconds:.2f} s), "
            f"peak RSS {run.peak_after_mib:.0f} MiB"
        )
        rows.append(
            [
                str(blocks),
                f"{run.seconds:.2f}",
                f"{run.user_seconds:.2f}",
                f"{run.system_seconds:.2f}",
                f"{run.seconds / blocks * 1e3:.2f}",
                f"{run.peak_before_mib:.0f}",
                f"{run.peak_after_mib:.0f}",
            ]
        )
    header = [
        "blocks N",
        "fuse s",
        "user CPU s",
        "system CPU s",
        "ms per block",
        "peak RSS before MiB",
        "peak RSS after MiB",
    ]
    return [
        "## RepVGG blocks",
        "",
        "`nn.Sequential` of N `RepVGGBlock(8, 8)` (3x3, 1x1 and identity branches), each size fused once in a "
        "fresh interpreter, with the user and system CPU time of that process during `fuse` (on a virtual "
        "machine, system time swings with what ran before: 0.3 to 1.6 s at 5,000 blocks here). Peak RSS of "
        "that process before and after `fuse` (the model and torch included).",
        "",
        *_table(header, rows),
        *_table(["N → 2N", "t(2N) / t(N)"], _doublings(times)),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fuse_time", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run on small sizes")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("FUSE_TIME.md"), help="markdown file")
    args = parser.parse_args(argv)
    log = (lambda line: None) if args.quick else (lambda line: print(line, file=sys.stderr, flush=True))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        repeats = 1 if args.quick else 7
        lines = [
            "# Fuse time",
            "",
            f"`python -m benchmarks.fuse_time{' --quick' if args.quick else ''}`; torch {torch.__version__}, "
            f"Python {platform.python_version()}, {platform.machine()}, 1 intra-op thread, "
            f"{multiprocessing.cpu_count()} CPUs.",
            "",
        ]
        # the block processes run first: started after this one has built and fused the reference
        # nets and chains, a 5,000-block process spent 1.4 s in the kernel instead of 0.3 s (same faults)
        blocks = block_growth((2, 4) if args.quick else (250, 500, 1000, 2000, 5000), log)
        lines += [
            *reference_nets(args.quick, repeats, log),
            *timm_models(repeats, log),
            *chain_growth((25, 50, 100) if args.quick else (125, 250, 500, 1000, 2000), log),
            *blocks,
        ]
    finally:
        torch.set_num_threads(threads)
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
