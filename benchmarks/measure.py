"""What is measured, and how: latency, peak memory, fidelity, fusion time."""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import statistics
import sys
import timeit
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils import benchmark

from reparam.blocks import RepVGGBlock, randomize_batchnorm
from reparam.stats import relative_error


@dataclass(frozen=True)
class Latency:
    """Seconds per forward: the median and quartiles of all timed blocks, over all rounds."""

    median: float
    q1: float
    q3: float
    samples: int
    per_round: tuple[float, ...] = ()  # the median of each round, in round order

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.q3 - self.q1) / self.median


def paired_ratio(a: Latency, b: Latency) -> float:
    """The median over rounds of a's time / b's time in the same round.

    Within a round the two were timed moments apart, so a burst of load from elsewhere on the
    machine slows both; the per-round ratio cancels it where the ratio of overall medians does not.
    """
    ratios = [x / y for x, y in zip(a.per_round, b.per_round)]
    return statistics.median(ratios) if ratios else a.median / b.median


def _quartiles(times: list[float]) -> tuple[float, float, float]:
    if len(times) == 1:
        return times[0], times[0], times[0]
    q1, q2, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return q1, q2, q3


def latencies(
    models: dict[str, nn.Module], example: Tensor, *, rounds: int, min_run_time: float, threads: int
) -> dict[str, Latency]:
    """Median latency of each model on `example`, measured with `torch.utils.benchmark.Timer`.

    The models are measured in `rounds` interleaved rounds (the order rotating each round) so
    that slow drifts of the machine (frequency, other load) hit every model alike; the median is
    taken over the per-run times of every block of every round. Each model's per-round medians
    are kept too, for `paired_ratio`. In each round a model is timed by
    `blocked_autorange(min_run_time)`, or, when one forward alone takes longer than
    `min_run_time`, by one `timeit(number=1)` (one forward, no calibration run). CUDA work is
    synchronized by the Timer. Runs under `torch.no_grad()` with `threads` intra-op threads.
    """
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    per_round: dict[str, list[float]] = {name: [] for name in names}
    slow: dict[str, bool] = {}
    with torch.no_grad():
        for name, model in models.items():  # warm up: oneDNN/cuDNN pick and cache their kernels on first calls
            model(example)
            timer = benchmark.Timer(stmt="model(x)", globals={"model": model, "x": example}, num_threads=threads)
            slow[name] = timer.timeit(number=1).median >= min_run_time
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                timer = benchmark.Timer(
                    stmt="model(x)", globals={"model": models[name], "x": example}, num_threads=threads, label=name
                )
                measurement = (
                    timer.timeit(number=1) if slow[name] else timer.blocked_autorange(min_run_time=min_run_time)
                )
                times[name] += measurement.times
                per_round[name].append(measurement.median)
    result = {}
    for name, samples in times.items():
        q1, median, q3 = _quartiles(samples)
        result[name] = Latency(median, q1, q3, len(samples), tuple(per_round[name]))
    return result


def peak_memory(model: nn.Module, example: Tensor) -> float | None:
    """Bytes allocated at the peak of one forward, above what was allocated before it; None if not measurable.

    CUDA: `torch.cuda.max_memory_allocated`. CPU: the PyTorch CPU allocator's allocation and free
    events, recorded by `torch.profiler` (`profile_memory=True`), summed in time order. This counts
    activations and workspaces the allocator hands out (not the weights or the input, which exist
    before the forward, and not memory that oneDNN allocates on its own).
    """
    with torch.no_grad():
        if example.is_cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            model(example)
            torch.cuda.synchronize()
            return float(torch.cuda.max_memory_allocated() - base)
        try:
            from torch.profiler import ProfilerActivity, profile

            with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                model(example)
            events = [
                (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
            ]
        except Exception:  # noqa: BLE001 (a private profiler API: report n/a rather than fail)
            return None
    if not events:
        return None
    current = peak = 0
    for _, nbytes in sorted(events):
        current += nbytes
        peak = max(peak, current)
    return float(peak)


@dataclass(frozen=True)
class Calls:
    """What one forward dispatches, counted exactly (no timing involved)."""

    torch_ops: dict[str, int]  # torch-level function calls (conv2d, relu, add, ...) by name
    python_calls: int  # Python function calls (module __call__ machinery, forward methods, fx glue)

    @property
    def total_torch_ops(self) -> int:
        return sum(self.torch_ops.values())


class _CountTorchCalls(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def calls(model: nn.Module, example: Tensor) -> Calls:
    """Count the torch functions (`torch.overrides.TorchFunctionMode`) and the Python calls (`sys.setprofile`)
    of one forward: a fused net with no overhead dispatches exactly what its hand-written twin does."""
    python_calls = 0

    def profiler(_frame, event, _arg) -> None:
        nonlocal python_calls
        if event == "call":
            python_calls += 1

    with torch.no_grad():
        model(example)  # first-call work (lazy init, caches) is not part of a steady-state forward
        sys.setprofile(profiler)
        try:
            model(example)
        finally:
            sys.setprofile(None)
        with _CountTorchCalls() as mode:
            model(example)
    return Calls(dict(sorted(mode.counts.items())), python_calls)


_HOLLOWED = (nn.Conv2d, nn.Linear, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.BatchNorm2d)


def hollow(model: nn.Module) -> nn.Module:
    """A copy of `model` whose layers (convs, linears, ReLUs, pools, BNs) are `nn.Identity`.

    What is left of a forward is the glue around the layers: module calls, the GraphModule's
    generated code or the hand-written `forward`s, attribute lookups, residual adds on tiny
    tensors. Timing a hollowed fused net against its hollowed hand-written twin measures the
    difference in glue alone, without the noise of the convolutions. (A GraphModule looks its
    submodules up by name at each call, so replacing them takes effect.)
    """
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, _HOLLOWED) and name:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, nn.Identity())
    return model


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's native start/stop log lines) for the duration."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@dataclass(frozen=True)
class Fidelity:
    """Relative errors against a float64 run of the original net."""

    original: float  # max relative error of the original net in float32
    fused: float  # max relative error of the fused net in float32
    original_rms: float  # ||y - y64|| / ||y64||, original net in float32
    fused_rms: float  # the same for the fused net
    fused_vs_original: float  # max relative error of the fused float32 net against the original float32 net
    folding: float  # max relative error of the fused net's float32 weights run in float64 arithmetic


def _rms_error(output: Tensor, reference: Tensor) -> float:
    reference = reference.to(torch.float64)
    return (torch.linalg.vector_norm(output.to(torch.float64) - reference) / torch.linalg.vector_norm(reference)).item()


def fidelity(original: nn.Module, fused: nn.Module, example: Tensor) -> Fidelity:
    with torch.no_grad():
        reference = copy.deepcopy(original).double()(example.double())
        fused64 = copy.deepcopy(fused).double()(example.double())
        out_original, out_fused = original(example), fused(example)
    return Fidelity(
        relative_error(out_original, reference),
        relative_error(out_fused, reference),
        _rms_error(out_original, reference),
        _rms_error(out_fused, reference),
        relative_error(out_fused, out_original),
        relative_error(fused64, reference),
    )


def synthetic_net(blocks: int, channels: int = 8) -> nn.Module:
    """`nn.Sequential` of `blocks` shape-keeping RepVGGBlocks (3x3, 1x1 and identity branches)."""
    return randomize_batchnorm(nn.Sequential(*[RepVGGBlock(channels, channels) for _ in range(blocks)])).eval()


def wall_time(function: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of `function()` over `repeats` calls, timed by `timeit`.

    `timeit` switches the cyclic garbage collector off by default; it is switched back on, as in a
    user's call (where `fuse` pauses it itself).
    """
    gc.collect()
    timer = timeit.Timer(function, setup="gc.enable()", globals={"gc": gc})
    try:
        return statistics.median(timer.repeat(repeat=repeats, number=1))
    finally:
        gc.enable()
