"""Linear layers and transposed convolutions: the same algebra on other layouts.

* `nn.Linear` on `(batch, features)` is a convolution with no spatial dims, so BatchNorm1d after
  it (I), BatchNorm1d before it, and parallel Linear branches (II) fold exactly as for convs:
  `W' = s W`, `b' = s b + t`; `W = W2 W1`, `b = W2 b1 + b2`; `W = W1 + W2`. Exact condition: the
  input really is `(batch, features)` (a Linear maps the last dim, which is the channel dim
  only then): read off the graph (`reparam/ranks.py`: a `flatten(x, 1)`, `view(n, -1)` or
  `mean((2, 3))` upstream) or from propagated shapes (`fuse(..., example_inputs=...)`);
  otherwise the Linear is left as written (`geometry`).
* A conv on a globally pooled (1x1) map, then `flatten(., 1)`, is `flatten` then a Linear whose
  weight is the conv's tap that reads the pixel (the others read padding): replaced so that the
  Linear can fold with what follows. Declined for grouped convs (denser), non-zero padding
  modes, or when the pooling is not known to give 1x1.
* LeViT's BatchNorm1d after a Linear on tokens, `bn(linear(x).flatten(0, 1)).reshape_as(.)`:
  the leading dims merged so that BatchNorm1d sees `(rows, features)`, then restored. That is the
  per-feature affine map of the Linear's output, so `W' = s W`, `b' = s b + t` for any number of
  leading dims. Exact condition: the flatten merges every dim but the last (the rank must be
  known: from the graph, as after LeViT's conv stem, or from `example_inputs`), the result
  takes the Linear output's own shape back, and the BN is an eval BatchNorm1d over the
  Linear's features; otherwise the Linear is left as written (`geometry`, in the report).
* `nn.ConvTranspose1d/2d/3d` followed by BN folds along the output-channel axis, which is
  weight dim 1 (within each group) instead of dim 0; parallel transposed branches with the same
  stride, groups and output padding sum after embedding (centres must coincide, as for VI).
  Transposed convs compose with nothing else (`geometry`).

Paper: X. Ding et al., "Diverse Branch Block", CVPR 2021 (I, II on other layers); X. Ding et
al., "UniRepLKNet", CVPR 2024 (transposed and linear re-parameterization).
"""

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..errors import FusionRefused, Reason
from ..kernel import Kernel
from ..patterns import BN, Call, Conv, Match, Module, Var
from ..rules import LinearLayer, ReplacementRule

LINEAR = LinearLayer("linear", (nn.Linear,), Kernel.from_linear, features_last=True)
TRANSPOSED_CONV = LinearLayer(
    "transposed_conv", (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), Kernel.from_conv
)


def flattened_conv(m: Match) -> nn.Module | None:
    """`flatten(conv(x), 1)` on a globally pooled x (1x1 map): `linear(flatten(x, 1))`, W = the tap reading x."""
    pooled, flat = m["x"], m.node("flat")
    if tuple(flat.args[1:]) not in ((1,), (1, -1)) or flat.kwargs or not _is_global_pool(pooled, m):
        return None
    kernel = Kernel.from_conv(m.module("conv"))
    if kernel.groups != 1 or kernel.padding_mode != "zeros" or kernel.spatial_dims == 0:
        return None  # a grouped conv would become a denser Linear
    taps = []
    for k, p, d, s in zip(kernel.kernel_size, kernel.padding, kernel.dilation, kernel.stride):
        if (2 * p - d * (k - 1)) // s != 0 or p % d or p // d >= k:
            return None  # the output is not 1x1, or no tap reads the pixel
        taps.append(p // d)
    linear = nn.utils.skip_init(
        nn.Linear, kernel.in_channels, kernel.out_channels, device=kernel.device, dtype=kernel.dtype
    )
    with torch.no_grad():
        linear.weight.copy_(kernel.weight[(..., *taps)])
        linear.bias.copy_(kernel.bias)
    return nn.Sequential(nn.Flatten(1), linear)


def _is_global_pool(node: torch.fx.Node, m: Match) -> bool:
    if node.op == "call_module" and isinstance(m.module_of(node), nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d):
        return m.module_of(node).output_size in (1, (1, 1))
    if node.op == "call_function" and node.target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
        return node.args[1:2] in ((1,), ((1, 1),))
    return False


# a conv on a 1x1 map, then flattened (a classifier head written with a 1x1 conv), becomes a Linear
FLATTENED_CONV = ReplacementRule(
    "flattened_conv", Call((torch.flatten, "flatten"), Conv(Var("x"), "conv"), name="flat"), flattened_conv
)


def token_linear_bn(m: Match) -> nn.Module | None:
    """`bn(linear(x).flatten(0, -2)).reshape_as(linear(x))`: one Linear, `W' = s W`, `b' = s b + t`."""
    out, flat, linear = m.node("out"), m.node("flat"), m.node("linear")
    rank, bn = m.rank("linear"), m.module("bn")
    if out.args[1:] != (linear,) or out.kwargs or not m.foldable("linear", "bn"):
        return None
    if not isinstance(bn, nn.BatchNorm1d):
        return None
    if rank is None:
        _refuse(m, "and this Linear output's rank is unknown: pass example_inputs=(...) (or input_shape=...)")
    start = flat.args[1] if len(flat.args) > 1 else flat.kwargs.get("start_dim", 0)
    end = flat.args[2] if len(flat.args) > 2 else flat.kwargs.get("end_dim", -1)
    if (start % rank, end % rank) != (0, rank - 2):
        _refuse(m, f"and this one flattens dims {start}..{end} of a rank-{rank} output: BatchNorm1d normalizes dim 1")
    try:
        kernel = Kernel.from_linear(m.module("linear")).then(Kernel.from_batchnorm(bn, 0))
    except FusionRefused:
        return None  # a BN in training mode, say: the BN rule reports it where the BN is annotated
    return kernel.to_module()


def _refuse(m: Match, why: str) -> None:
    rule = "a BatchNorm1d over a Linear's tokens folds only if the flatten merges every dim but the features"
    refusal = FusionRefused(Reason.GEOMETRY, f"{rule}, {why}")
    refusal.nodes = (m.node("linear"), m.node("bn"))
    raise refusal


# LeViT's `LinearNorm`: a BatchNorm1d over a Linear's features, the tokens flattened into rows for it
TOKEN_LINEAR_BN = ReplacementRule(
    "token_linear_bn",
    Call(
        ("reshape_as", "view_as"),
        BN(Call((torch.flatten, "flatten"), Module(nn.Linear, Var("x"), name="linear"), name="flat"), name="bn"),
        name="out",
    ),
    token_linear_bn,
)
