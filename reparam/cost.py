"""What running a computation costs: an estimate of its time, from constants measured on a CPU.

A kernel's time is its fixed per-call cost, plus its multiply-accumulates at the rate a conv of
its shape reaches, plus the bytes it reads and writes at memory bandwidth:

    seconds = call + positions * (macs / (MAC_RATE * efficiency) + elements * itemsize / BANDWIDTH)
              + params * itemsize / BANDWIDTH

`efficiency` is what fraction of the full MAC rate a conv of its shape reaches: convs with
few input channels per group (depthwise, grouped) and thin kernels (1x3) do much less work per
cycle than a dense 3x3, and grouped convs pay a larger fixed cost per call, so a depthwise
conv is not priced by its MACs alone. MACs alone decided
before, and were wrong both ways: a 1x1 + 1x3 + 3x1 sum at 32 channels was refused as dearer
than one 3x3, which is faster (fewer calls and passes over memory), while a per-channel scale
was emitted as a depthwise 1x1 conv, 6-50x slower than the BatchNorm it replaced.

Costs are per position of a region's input and add up; `Workload` says how many positions one
call sees (from the example inputs' shapes when the caller gave them, else a 56x56 map) and how
wide an element is. The constants and the measurements behind them are in docs/performance.md
("The cost model"); `python -m benchmarks.cost_model` measures them again on any machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .kernel import Kernel

MAC_RATE = 30e9  # multiply-accumulates per second of a dense conv at full efficiency (1 CPU thread)
BANDWIDTH = 45e9  # bytes per second read or written by elementwise kernels
CONV_CALL = 20e-6  # seconds per dense conv call, whatever its size
GROUPED_CONV_CALL = 150e-6  # seconds per grouped or depthwise conv call, whatever its size
BATCHNORM_CALL = 30e-6  # seconds per eval BatchNorm call
ELEMENTWISE_CALL = 3e-6  # seconds per add, multiply or other elementwise op
_HALF_RATE_LENGTH = 75  # the dot-product length (taps x input channels per group) at half the full rate


@dataclass(frozen=True)
class Workload:
    """How many positions of a region's input one call sees, and the bytes of one element."""

    positions: int
    itemsize: int = 4


NOMINAL = Workload(56 * 56)  # without example inputs: a 56x56 map at batch 1, in float32


@dataclass(frozen=True)
class Cost:
    """The cost of some computation, per position of its input, and what it costs per call."""

    macs: float  # multiply-accumulates per input position, as reported
    params: int
    work: float  # macs / efficiency: MACs at a dense conv's rate
    elements: float  # tensor elements read and written per input position
    calls: float  # seconds of fixed cost per call

    @classmethod
    def of(cls, kernel: Kernel) -> Cost:
        """The cost of running `kernel` as one layer: a BatchNorm if it is per-channel, else a conv."""
        density = kernel.output_density
        elements = kernel.in_channels + kernel.out_channels * density
        if kernel.is_channelwise:
            return cls(float(kernel.out_channels), kernel.params, 0.0, elements, BATCHNORM_CALL)
        macs = kernel.macs_per_input
        call = CONV_CALL if kernel.groups == 1 else GROUPED_CONV_CALL
        return cls(macs, kernel.params, macs / efficiency(kernel), elements, call)

    @classmethod
    def elementwise(cls, kernel: Kernel) -> Cost:
        """One elementwise op of two operands over `kernel`'s output (an add, a multiply)."""
        outputs = kernel.out_channels * kernel.output_density
        return cls(outputs, 0, 0.0, 3 * outputs, ELEMENTWISE_CALL)

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.macs + other.macs,
            self.params + other.params,
            self.work + other.work,
            self.elements + other.elements,
            self.calls + other.calls,
        )

    def __sub__(self, other: Cost) -> Cost:
        return self + Cost(-other.macs, -other.params, -other.work, -other.elements, -other.calls)

    def at_density(self, density: float) -> Cost:
        """This cost for an input that has `density` positions per position of the region's input."""
        return Cost(self.macs * density, self.params, self.work * density, self.elements * density, self.calls)

    def seconds(self, load: Workload) -> float:
        """The estimated time of one call on `load`."""
        per_position = self.work / MAC_RATE + self.elements * load.itemsize / BANDWIDTH
        return self.calls + load.positions * per_position + self.params * load.itemsize / BANDWIDTH


FREE = Cost(0.0, 0, 0.0, 0.0, 0.0)


def efficiency(kernel: Kernel) -> float:
    """The fraction of the full MAC rate that a conv of `kernel`'s shape reaches (0 to 1).

    A 1x1 conv is a matrix product and runs at the full rate. Any other conv computes each
    output as a dot product of `taps x input channels per group` terms, and short ones waste
    most of each vector operation: a depthwise 3x3 (9 terms) reaches about a tenth of the rate
    of a dense 3x3 at 64 channels (576 terms), a 1x3 at 8 channels (24 terms) a quarter.
    """
    taps = math.prod(kernel.kernel_size)
    if taps == 1:
        return 1.0
    length = taps * kernel.in_channels // kernel.groups
    return length / (length + _HALF_RATE_LENGTH)
