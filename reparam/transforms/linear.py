"""Linear layers and transposed convolutions: the same algebra on other layouts.

* `nn.Linear` on `(batch, features)` is a convolution with no spatial dims, so BatchNorm1d after
  it (I), BatchNorm1d before it, and parallel Linear branches (II) fold exactly as for convs:
  `W' = s W`, `b' = s b + t`; `W = W2 W1`, `b = W2 b1 + b2`; `W = W1 + W2`. Exact condition: the
  input really is `(batch, features)` (a Linear maps the last dim, which is the channel dim
  only then): known from a `flatten(x, 1)` upstream or from propagated shapes
  (`fuse(..., example_inputs=...)`); otherwise the Linear is left as written (`geometry`).
* `nn.ConvTranspose1d/2d/3d` followed by BN folds along the output-channel axis, which is
  weight dim 1 (within each group) instead of dim 0; parallel transposed branches with the same
  stride, groups and output padding sum after embedding (centres must coincide, as for VI).
  Transposed convs compose with nothing else (`geometry`).

Paper: X. Ding et al., "Diverse Branch Block", CVPR 2021 (I, II on other layers); X. Ding et
al., "UniRepLKNet", CVPR 2024 (transposed and linear re-parameterization).
"""

from torch import nn

from ..kernel import Kernel
from ..rules import LinearLayer

LINEAR = LinearLayer("linear", (nn.Linear,), Kernel.from_linear, features_last=True)
TRANSPOSED_CONV = LinearLayer(
    "transposed_conv", (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), Kernel.from_conv
)
