"""`python -m benchmarks.decisions`: each emitted form against its alternative and the authors' deploy form.

For every block of `benchmarks/blocks.py` (third-party-style training blocks, at the input shape
given) and every reference net of `benchmarks/nets.py` (batch 1, 224x224) it times, interleaved,
on one thread by default:

- **as written**: the training-time block in eval mode;
- **estimate**: `reparam.fuse(block, example_inputs=...)`, the cost model's decisions;
- **measure**: `reparam.fuse(block, cost="measure", example_inputs=...)`;
- **one conv**: `reparam.fuse(block, allow_costlier=True)`, every exact region as one layer;
- **deploy** and a second copy of it: the authors' deploy architecture (the copy is the A/A control).

The table gives each time as a paired ratio to deploy, the emitted form's ratio to its
alternative (one conv where the estimate refused it, as written where it fused), and the
decisions each mode took. Written as markdown to `benchmarks/DECISIONS.md` (or `--out`); with
`--device cuda`, measured on the GPU (TF32 off), e.g. to `benchmarks/DECISIONS-cuda.md`.

Measurements only: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import platform
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

import reparam
from reparam import Reason
from reparam.blocks import randomize_batchnorm

from . import measure
from .blocks import BlockSpec, block_specs
from .nets import full_nets, quick_nets

HERE = Path(__file__).resolve().parent
VARIANTS = ("as written", "estimate", "measure", "one conv", "deploy", "deploy, 2nd copy")


def decide(spec: BlockSpec, rounds: int, min_run_time: float, threads: int, device: str) -> str:
    """One table row for `spec`, measured on `device`."""
    torch.manual_seed(0)
    block = randomize_batchnorm(spec.training()).eval().to(device)
    x = torch.randn(spec.input_shape, device=device)
    estimate, estimate_report = reparam.fuse_with_report(block, example_inputs=(x,))
    measured, measure_report = reparam.fuse_with_report(block, cost="measure", example_inputs=(x,))
    models = {
        "as written": block,
        "estimate": estimate,
        "measure": measured,
        "one conv": reparam.fuse(block, allow_costlier=True),
        "deploy": spec.deploy().eval().to(device),
        "deploy, 2nd copy": spec.deploy().eval().to(device),
    }
    times = measure.latencies(models, x, rounds=rounds, min_run_time=min_run_time, threads=threads)
    deploy = times["deploy"]
    ratio = {name: measure.paired_ratio(times[name], deploy) for name in models}
    refused = bool(estimate_report.refused(Reason.WOULD_COST_MORE))
    alternative = "one conv" if refused else "as written"
    versus = measure.paired_ratio(times["estimate"], times[alternative])
    ops = {name: measure.calls(model, x).total_torch_ops for name, model in models.items()}
    kept = Counter(t.chosen for t in measure_report.timings)
    chosen = ", ".join(f"{name} x{n}" if n > 1 else name for name, n in kept.items()) or "not timed"
    cells = [
        spec.name,
        "x".join(map(str, spec.input_shape)),
        f"{deploy.median * 1e6:.0f}",
        *(f"{ratio[name]:.2f}" for name in ("as written", "estimate", "measure", "one conv", "deploy, 2nd copy")),
        f"{ops['estimate']} / {ops['deploy']}",
        "refused one conv" if refused else "fused",
        f"{versus:.2f} vs {alternative}",
        chosen,
    ]
    return "| " + " | ".join(cells) + " |"


def _machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def reference_nets(quick: bool) -> list[BlockSpec]:
    """The nets of `benchmarks.nets`, deploy being their hand-written twin, at 224x224 (32x32 when quick)."""
    size = 32 if quick else 224
    nets = quick_nets() if quick else full_nets()
    return [BlockSpec(net.name, net.training, net.deploy, (1, 3, size, size)) for net in nets]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decisions", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "DECISIONS.md")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="small inputs, one short round (a smoke run)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (TF32 off)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_num_threads(args.threads)
    rounds, min_run_time = (1, 0.002) if args.quick else (15, 0.05)
    lines = [
        "# Decisions against measured latency",
        "",
        f"`python -m benchmarks.decisions --threads {args.threads} --device {args.device}`; {_machine(args.device)}, "
        f"torch {torch.__version__}, {args.threads} thread(s), {rounds} interleaved rounds. Times are paired ratios "
        "to the authors' deploy form (1.00 = as fast); `deploy, 2nd copy` is the A/A control, the noise floor.",
        "",
        "| block | input | deploy (us) | as written | estimate | measure | one conv | deploy, 2nd copy "
        "| ops: estimate / deploy | estimate decided | estimate vs alternative | measure kept |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for spec in block_specs(args.quick) + reference_nets(args.quick):
        lines.append(decide(spec, rounds, min_run_time, args.threads, args.device))
        print(lines[-1], flush=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
