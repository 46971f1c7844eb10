"""`reparam demo`: fuse a RepVGG-A0-style network and show what changed."""

from __future__ import annotations

import copy
import time

import torch

from . import stats
from .api import fuse_with_report
from .blocks import RepVGG, randomize_batchnorm


def run(image_size: int = 224, seed: int = 0) -> str:
    """Build RepVGG-A0 with random BatchNorm statistics, fuse it, and return a before/after table."""
    torch.manual_seed(seed)
    model = randomize_batchnorm(RepVGG.a0(), seed).eval()
    example = torch.randn(1, 3, image_size, image_size)

    start = time.perf_counter()
    fused, report = fuse_with_report(model)
    fuse_seconds = time.perf_counter() - start

    with torch.no_grad():
        reference = copy.deepcopy(model).double()(example.double())
        original_out, fused_out = model(example), fused(example)
    rows = [
        ("convs", stats.count(model, stats.CONV_TYPES), stats.count(fused, stats.CONV_TYPES)),
        ("BatchNorms", stats.count(model, stats.BATCHNORM_TYPES), stats.count(fused, stats.BATCHNORM_TYPES)),
        ("parameters", f"{stats.parameters(model):,}", f"{stats.parameters(fused):,}"),
        ("MACs", f"{stats.macs(model, example):,}", f"{stats.macs(fused, example):,}"),
        ("max rel. error vs original", "0", f"{stats.relative_error(fused_out, original_out):.2e}"),
        (
            "max rel. error vs float64",
            f"{stats.relative_error(original_out, reference):.2e}",
            f"{stats.relative_error(fused_out, reference):.2e}",
        ),
        (
            "median CPU latency",
            f"{stats.median_latency(model, example) * 1e3:.1f} ms",
            f"{stats.median_latency(fused, example) * 1e3:.1f} ms",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [
        f"RepVGG-A0 (blocks 1-2-4-14-1), input 1x3x{image_size}x{image_size}, fp32, "
        f"{torch.get_num_threads()} CPU threads",
        f"fused in {fuse_seconds:.2f} s: {len(report.fusions)} fusions, {len(report.refusals)} refusals",
        "",
        f"{'':<{width}}  {'training-time':>16}  {'fused':>16}",
    ]
    lines += [f"{name:<{width}}  {before!s:>16}  {after!s:>16}" for name, before, after in rows]
    return "\n".join(lines)
