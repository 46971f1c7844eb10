"""V. Average pooling as a depthwise conv.

An average pool with window k, stride s and padding p that counts padded zeros is the
depthwise conv

    W[c, 0, t] = 1 / divisor  for every tap t,   divisor = prod(k)  (or divisor_override),

so it folds into the linear region feeding it (III) and sums with other branches (II), as in
DBB's 1x1 -> BN-and-pad -> avg-pool -> BN branch. Recognised as `nn.AvgPool1d/2d/3d` and
`F.avg_pool1d/2d/3d`. A pool of a tensor no region computes (the block's input, a ReLU's
output: DBB's depthwise avg branch, YOLOv6's QARepVGGBlockV2 `conv(x) + conv1x1(x) + x +
avg(x)`) is a kernel of that tensor whose channel count is read off the graph (rule
`avg_pool_of_input`): from a layer that reads the tensor or makes it, else from propagated
shapes.

Exact condition: every window divides by the same number. Refused (`border not exact`) with
`count_include_pad=False` and padding (border windows divide by fewer taps), and with
`ceil_mode=True` and a stride above 1 (for some input sizes it adds a partial last window).
A pool of a tensor whose channel count nothing tells is left as written (`geometry`).

Paper: X. Ding et al., "Diverse Branch Block: Building a Convolution as an Inception-like
Unit", CVPR 2021 (transform V).
"""

from typing import Any

import torch.nn.functional as F
from torch import nn
from torch.fx import Node
from torch.fx.node import map_arg

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


def avg_pool_of_input(m: Match) -> Kernel:
    """A pool of a tensor no region computes: its channels, dtype and device read off the graph."""
    dims, options = _options(m)
    check_fixed(options)  # before the channel count, which may be unknown too
    identity = m.identity("x", dims)
    return pool_kernel(identity.in_channels, identity, dims, options)


def _pool_of(m: Match, channels: int, like: Kernel) -> Kernel:
    dims, options = _options(m)
    return pool_kernel(channels, like, dims, options)


def _options(m: Match) -> tuple[int, dict[str, Any]]:
    """The pool's spatial dims, and its arguments by name."""
    node = m.node("pool")
    if node.op == "call_module":
        pool = m.module("pool")
        options = {name: getattr(pool, name, default) for name, default in _DEFAULTS.items()}
        options["kernel_size"] = pool.kernel_size
        return _MODULES[type(pool)], options
    return _FUNCTIONS[node.target], {**_DEFAULTS, **dict(zip(_ORDER[1:], node.args[1:])), **node.kwargs}


def pool_kernel(channels: int, like: Kernel, dims: int, options: dict[str, Any]) -> Kernel:
    """The depthwise kernel of an average pool over `channels` channels, in `like`'s dtype and device."""
    check_fixed(options)
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


def check_fixed(options: dict[str, Any]) -> None:
    """Refuse a pool whose window, stride or padding is computed in forward (`not constant`)."""
    computed = [name for name, value in options.items() if _reads_nodes(value)]
    if computed:
        raise FusionRefused(
            Reason.NOT_CONSTANT,
            f"the pool's {' and '.join(computed)} is computed in forward (as `kernel_size=x.size(3)`), so its "
            "window is not fixed: a kernel of one size would be wrong on other input sizes",
        )


def _reads_nodes(value: Any) -> bool:
    found: list[Node] = []
    map_arg(value, found.append)
    return bool(found)


def _any(value: int | tuple[int, ...] | list[int], above: int = 0) -> bool:
    return any(v > above for v in ([value] if isinstance(value, int) else value))


def _pool(input: Var | Linear) -> AnyOf:
    return AnyOf(Module(tuple(_MODULES), input), Call(tuple(_FUNCTIONS), input), name="pool")


AVG_POOL = PatternRule("avg_pool", _pool(_INPUT), avg_pool)
AVG_POOL_OF_INPUT = PatternRule("avg_pool_of_input", _pool(Var("x", plain=True)), avg_pool_of_input)
