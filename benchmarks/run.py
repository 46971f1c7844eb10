"""`python -m benchmarks`: fused vs hand-deployed vs unfused latency, fusion-time scaling, fidelity.

Writes a markdown report (default `benchmarks/RESULTS.md`) and a bar plot of the latencies
(`latency.png` beside it). Nothing here asserts a time: these are measurements, not tests.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import reparam
from reparam.blocks import randomize_batchnorm
from reparam.stats import BATCHNORM_TYPES, CONV_TYPES, count, parameters, relative_error

from . import measure
from .deploy import copy_weights
from .nets import NetSpec, full_nets, quick_nets

HERE = Path(__file__).resolve().parent
VARIANTS = ("unfused", "fused", "hand-deployed")
# A second, independent copy of the hand-deployed net, timed alongside: its ratio to the first
# (ideally 1.00) is the noise floor of the fused / hand-deployed ratio on this machine, this run.
CONTROL = "hand-deployed, 2nd copy"


@dataclass(frozen=True)
class Settings:
    quick: bool
    image_size: int
    batches: tuple[int, ...]
    rounds: dict[int, int]  # batch -> interleaved timing rounds
    min_run_time: dict[int, float]  # batch -> seconds per blocked_autorange call
    fuse_sizes: tuple[int, ...]  # synthetic net sizes for the fusion-time scaling
    fuse_repeats: dict[int, int]  # size -> repeats
    fidelity_batch: int
    memory_batches: tuple[int, ...]  # batches at which peak memory is measured (each costs a profiled forward)
    glue_rounds: int  # interleaved rounds timing the hollowed nets (`measure.hollow`)
    glue_min_run_time: float


FULL = Settings(
    quick=False,
    image_size=224,
    batches=(1, 32),
    rounds={1: 40, 32: 15},
    min_run_time={1: 0.05, 32: 1.0},
    fuse_sizes=(10, 20, 100, 200, 1000, 2000, 2500, 5000),
    fuse_repeats={10: 5, 20: 5, 100: 5, 200: 3, 1000: 2, 2000: 1, 2500: 1, 5000: 1},
    fidelity_batch=2,
    memory_batches=(1, 32),
    glue_rounds=30,
    glue_min_run_time=0.05,
)
QUICK = Settings(
    quick=True,
    image_size=32,
    batches=(1, 2),
    rounds={1: 1, 2: 1},
    min_run_time={1: 0.005, 2: 0.005},
    fuse_sizes=(2, 4, 8, 16),
    fuse_repeats={},
    fidelity_batch=1,
    memory_batches=(1,),
    glue_rounds=1,
    glue_min_run_time=0.005,
)


@dataclass
class NetResult:
    spec: NetSpec
    convs_before: int = 0
    convs_after: int = 0
    batchnorms_after: int = 0
    params_before: int = 0
    params_after: int = 0
    fusions: int = 0
    refusals: int = 0
    fuse_seconds: float = 0.0
    deploy_error: str | None = None  # why the hand-deployed twin could not be loaded, if it could not
    fused_equals_deployed: bool | None = None
    fused_vs_deployed_max_abs: float | None = None
    fidelity: measure.Fidelity | None = None
    # (config, batch) -> variant -> latency / peak bytes
    latency: dict[tuple[str, int], dict[str, measure.Latency]] = field(default_factory=dict)
    memory: dict[tuple[str, int], dict[str, float | None]] = field(default_factory=dict)
    errors: dict[str, dict[str, float]] = field(default_factory=dict)  # config -> variant -> rel. error vs fp64
    calls: dict[str, dict[str, measure.Calls]] = field(default_factory=dict)  # config -> variant -> op counts
    glue: dict[str, dict[str, measure.Latency]] = field(default_factory=dict)  # config -> variant -> hollowed


@dataclass
class Results:
    settings: Settings
    device: str
    threads: int
    environment: dict[str, str]
    configs: list[str]
    nets: list[NetResult]
    scaling: list[tuple[int, float]]  # (blocks, seconds)
    gpu_note: str | None
    seconds: float = 0.0


def environment(device: str, threads: int) -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "machine": f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} logical CPUs",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "intra-op threads": str(threads),
        "oneDNN (mkldnn)": "available" if torch.backends.mkldnn.is_available() else "not available",
        "reparam": _revision(),
        "load average (1 min) at start": _load(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["GPU"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
        info["cuDNN"] = str(torch.backends.cudnn.version())
    return info


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def _revision() -> str:
    package = Path(reparam.__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=package, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "."], cwd=package, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"{reparam.__version__ if hasattr(reparam, '__version__') else 'unknown'} (not a git checkout)"
    return f"git {sha}" + (" with uncommitted changes under reparam/" if dirty else "")


def prepare(spec: NetSpec, settings: Settings, log) -> tuple[NetResult, dict[str, nn.Module]]:
    """Build the training-time net (random BN statistics), fuse it, and load its hand-written twin."""
    torch.manual_seed(0)
    model = randomize_batchnorm(spec.training()).eval()
    result = NetResult(spec)
    start = time.perf_counter()
    fused, report = reparam.fuse_with_report(model)
    result.fuse_seconds = time.perf_counter() - start
    result.convs_before, result.convs_after = count(model, CONV_TYPES), count(fused, CONV_TYPES)
    result.batchnorms_after = count(fused, BATCHNORM_TYPES)
    result.params_before, result.params_after = parameters(model), parameters(fused)
    result.fusions, result.refusals = len(report.fusions), len(report.refusals)
    log(
        f"  {spec.name}: fused in {result.fuse_seconds:.2f} s, convs {result.convs_before} -> {result.convs_after}, "
        f"{result.fusions} fusions, {result.refusals} refusals"
    )
    models: dict[str, nn.Module] = {"unfused": model, "fused": fused}
    probe = torch.randn(1, 3, settings.image_size, settings.image_size)
    try:
        deployed = copy_weights(fused, spec.deploy().eval(), probe)
    except ValueError as error:
        result.deploy_error = str(error)
        log(f"  {spec.name}: no hand-deployed twin: {error}")
    else:
        models["hand-deployed"] = deployed
        models[CONTROL] = copy.deepcopy(deployed)
        with torch.no_grad():
            a, b = fused(probe), deployed(probe)
        result.fused_equals_deployed = torch.equal(a, b)
        result.fused_vs_deployed_max_abs = (a - b).abs().max().item()
    return result, models


def _configs(device: str) -> list[str]:
    if device == "cpu":
        return ["cpu fp32"]
    return ["cuda fp32 (TF32 off)", "cuda fp16", "cuda fp32 channels_last (TF32 off)"]


def _placed(models: dict[str, nn.Module], example: torch.Tensor, config: str):
    """The models and example moved to `config`'s device, dtype and memory format."""
    if config == "cpu fp32":
        return models, example
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dtype = torch.float16 if "fp16" in config else torch.float32
    memory_format = torch.channels_last if "channels_last" in config else torch.contiguous_format
    placed = {
        name: copy.deepcopy(m).to(device="cuda", dtype=dtype, memory_format=memory_format) for name, m in models.items()
    }
    return placed, example.to(device="cuda", dtype=dtype).contiguous(memory_format=memory_format)


def run(settings: Settings, device: str, threads: int, log=print) -> Results:
    begin = time.perf_counter()
    torch.set_num_threads(threads)
    gpu_note = None
    if device == "cuda" and not torch.cuda.is_available():
        gpu_note = "`--device cuda` was asked for, but CUDA is not available here; the CPU suite ran instead."
        log(gpu_note)
        device = "cpu"
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    configs = _configs(device)
    env = environment(device, threads)
    specs = quick_nets() if settings.quick else full_nets()
    nets = []
    log(f"fusing {len(specs)} nets")
    for spec in specs:
        result, models = prepare(spec, settings, log)
        nets.append(result)
        size = settings.image_size
        fidelity_input = torch.randn(settings.fidelity_batch, 3, size, size, generator=torch.Generator().manual_seed(1))
        result.fidelity = measure.fidelity(models["unfused"], models["fused"], fidelity_input)
        for config in configs:
            for batch in settings.batches:
                example = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))
                placed, x = _placed(models, example, config)
                if config != "cpu fp32" and batch == settings.batches[0]:  # GPU: error of each precision vs fp64
                    with torch.no_grad():
                        reference = copy.deepcopy(models["unfused"]).double()(example.double())
                        result.errors[config] = {n: _rel(placed[n](x), reference) for n in VARIANTS if n in placed}
                if batch in settings.memory_batches:
                    result.memory[config, batch] = {
                        n: measure.peak_memory(placed[n], x) for n in VARIANTS if n in placed
                    }
                result.latency[config, batch] = measure.latencies(
                    placed, x, rounds=settings.rounds[batch], min_run_time=settings.min_run_time[batch], threads=threads
                )
                log(f"  {spec.name} {config} batch {batch}: " + _latency_line(result.latency[config, batch]))
                del placed, x
            # the glue around the layers: exact op and call counts, and the timing of hollowed nets
            twins = {k: v for k, v in models.items() if k != "unfused"}
            placed, x = _placed(twins, torch.randn(1, 3, 8, 8), config)
            result.calls[config] = {name: measure.calls(m, x) for name, m in placed.items() if name in VARIANTS}
            hollowed = {name: measure.hollow(m) for name, m in placed.items()}
            result.glue[config] = measure.latencies(
                hollowed, x, rounds=settings.glue_rounds, min_run_time=settings.glue_min_run_time, threads=threads
            )
            log(f"  {spec.name} {config} glue: " + _latency_line(result.glue[config], 1e6, "us"))
            del placed, x, hollowed
        del models
    log(f"fusion time on synthetic nets of {', '.join(map(str, settings.fuse_sizes))} RepVGG blocks")
    reparam.fuse(measure.synthetic_net(3))  # warm up: first calls pay for imports and caches
    scaling = []
    for blocks in settings.fuse_sizes:
        net = measure.synthetic_net(blocks)
        repeats = settings.fuse_repeats.get(blocks, 1)
        seconds = measure.wall_time(lambda net=net: reparam.fuse(net), repeats)
        scaling.append((blocks, seconds))
        log(f"  {blocks} blocks: {seconds:.3f} s ({seconds / blocks * 1e3:.2f} ms/block)")
        del net
    env["load average (1 min) at end"] = _load()
    return Results(
        settings,
        device,
        threads,
        env,
        configs,
        nets,
        scaling,
        gpu_note,
        time.perf_counter() - begin,
    )


def _rel(output: torch.Tensor, reference: torch.Tensor) -> float:
    return relative_error(output.detach().cpu(), reference)


def _latency_line(latency: dict[str, measure.Latency], scale: float = 1e3, unit: str = "ms") -> str:
    return ", ".join(f"{name} {value.median * scale:.2f} {unit}" for name, value in latency.items())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark reparam.fuse: latency of unfused / fused / hand-deployed nets, fusion-time "
        "scaling, numerical fidelity. Writes a markdown report and a PNG plot.",
    )
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run on small nets (for CI)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to measure latency")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md", help="the markdown report to write")
    parser.add_argument(
        "--plot", type=Path, default=None, help="the PNG plot to write (default: latency.png beside --out)"
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the plot (no matplotlib needed)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help=f"intra-op threads (default: torch's default, {torch.get_num_threads()} here; 1 with --quick)",
    )
    args = parser.parse_args(argv)

    from .report import plot, render

    settings = QUICK if args.quick else FULL
    log = (lambda *a: None) if args.quick else (lambda *a: print(*a, file=sys.stderr, flush=True))
    threads = args.threads or (1 if args.quick else torch.get_num_threads())
    results = run(settings, args.device, threads, log)
    plot_path = None
    if not args.no_plot:
        plot_path = args.plot or args.out.with_name("latency.png")
        if not plot(results, plot_path):
            plot_path = None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(results, plot_path, args.out), encoding="utf-8")
    print(f"wrote {args.out}" + (f" and {plot_path}" if plot_path else ""))
    return 0
