"""reparam's benchmarks: `python -m benchmarks` (see docs/performance.md).

Latency of unfused / fused / hand-deployed nets, fusion-time scaling and numerical fidelity,
written to `benchmarks/RESULTS.md` with a plot. Measurements only: nothing here asserts a time.
"""
