"""V. Average pooling as a depthwise conv.

An average pool with window k, stride s and padding p that counts padded zeros is the
depthwise conv

    W[c, 0, t] = 1 / divisor  for every tap t,   divisor = prod(k)  (or divisor_override),

so it folds into the linear region feeding it (III) and sums with other branches (II), as in
DBB's 1x1 -> BN-and-pad -> avg-pool -> BN branch. Recognised as `nn.AvgPool1d/2d/3d` and
`F.avg_pool1d/2d/3d`. A pool of a tensor no region computes (the block's input: DBB's
depthwise avg branch, YOLOv6's QARepVGGBlockV2) takes its channel count from the conv or BN
that reads it (rule `avg_pool_of_input`).

Exact condition: every window divides by the same number. Refused (`border not exact`) with
`count_include_pad=False` and padding (border windows divide by fewer taps), and with
`ceil_mode=True` and a stride above 1 (for some input sizes it adds a partial last window).
The pool needs a region upstream to know its channel count; a pool of the raw input is left
as written.

Paper: X. Ding et al., "Diverse Branch Block: Building a Convolution as an Inception-like
Unit", CVPR 2021 (transform V).
"""

from typing import Any

import torch.nn.functional as F
from torch import nn

from ..errors import FusionRefused, Reason
from ..kernel import Kernel
from ..patterns import AnyOf, Call, Linear, Match, Module, Var
from ..rules import PatternRule

_MODULES = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_FUNCTIONS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}
_DEFAULTS = {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True, "divisor_override": None}
_ORDER = ["input", "kernel_size", *_DEFAULTS]

x = Var("x")
_INPUT = Linear(x, "input", identity=False)


def avg_pool(m: Match) -> Kernel:
    upstream = m.kernel("input")
    return upstream.then(_pool_of(m, upstream.out_channels, upstream))


def pooled_layer(m: Match) -> Kernel:
    """A pool of a tensor no region computes (the block's input), read by a layer that knows its channels."""
    layer = m.kernel("layer")
    return _pool_of(m, layer.in_channels, layer).then(layer)


def _pool_of(m: Match, channels: int, like: Kernel) -> Kernel:
    node = m.node("pool")
    if node.op == "call_module":
        pool = m.module("pool")
        options = {name: getattr(pool, name, default) for name, default in _DEFAULTS.items()}
        options["kernel_size"], dims = pool.kernel_size, _MODULES[type(pool)]
    else:
        options = {**_DEFAULTS, **dict(zip(_ORDER, node.args)), **node.kwargs}
        dims = _FUNCTIONS[node.target]
    return pool_kernel(channels, like, dims, options)


def pool_kernel(channels: int, like: Kernel, dims: int, options: dict[str, Any]) -> Kernel:
    """The depthwise kernel of an average pool over `channels` channels, in `like`'s dtype and device."""
    padding, stride = options["padding"], options["stride"] or options["kernel_size"]
    if options["divisor_override"] is None and not options["count_include_pad"] and _any(padding):
        raise FusionRefused(
            Reason.BORDER_NOT_EXACT,
            "count_include_pad=False divides border windows by fewer taps, so the pool is not a convolution",
        )
    if options["ceil_mode"] and _any(stride, above=1):
        raise FusionRefused(
            Reason.BORDER_NOT_EXACT, "ceil_mode=True with stride > 1 adds a partial last window for some input sizes"
        )
    return Kernel.avg_pool(
        channels,
        dims,
        options["kernel_size"],
        stride,
        padding,
        options["divisor_override"],
        dtype=like.dtype,
        device=like.device,
    )


def _any(value: int | tuple[int, ...] | list[int], above: int = 0) -> bool:
    return any(v > above for v in ([value] if isinstance(value, int) else value))


def _pool(input: Var | Linear) -> AnyOf:
    return AnyOf(Module(tuple(_MODULES), input), Call(tuple(_FUNCTIONS), input), name="pool")


AVG_POOL = PatternRule("avg_pool", _pool(_INPUT), avg_pool)

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

POOLED_LAYER = PatternRule(
    "avg_pool_of_input", Module(_LAYERS, _pool(Var("x", plain=True)), name="layer"), pooled_layer
)
