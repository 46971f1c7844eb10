"""Functional forms: `F.conv1d/2d/3d` and `F.batch_norm` with weights stored on the model.

They compute the same kernels as their modules (transforms I and VI): a call whose tensors are
parameters or buffers reached through attributes is a linear layer like `nn.Conv2d` or
`nn.BatchNorm2d`. A weight computed in `forward` (weight standardization, a reparameterized
weight...) is refused as `not constant`: folding it would freeze one evaluation of it.
"""

import dataclasses

import torch
import torch.nn.functional as F

from ..errors import FusionRefused, Reason
from ..kernel import Kernel
from ..rules import LinearLayer


def conv_kernel(weight: torch.Tensor, bias=None, stride=1, padding=0, dilation=1, groups=1) -> Kernel:
    return Kernel.conv(weight, bias, stride, padding, dilation, groups)


def batch_norm_kernel(
    running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
) -> Kernel:
    if running_mean is None or running_var is None:
        raise FusionRefused(Reason.NO_RUNNING_STATS, "F.batch_norm is called without running statistics")
    if training:
        raise FusionRefused(Reason.BN_TRAINING, "F.batch_norm is called with training=True")
    inv_std = torch.rsqrt(running_var.detach().to(torch.float64) + eps)
    scale = inv_std if weight is None else weight.detach().to(torch.float64) * inv_std
    shift = -running_mean.detach().to(torch.float64) * scale
    if bias is not None:
        shift = shift + bias.detach().to(torch.float64)
    # a per-channel map on an input of unknown rank: its spatial dims adapt to the kernels it combines with
    kernel = Kernel.affine(scale, shift, spatial_dims=2)
    return dataclasses.replace(kernel, dtype=running_var.dtype, dims_known=False)


CONV = LinearLayer("functional_conv", (F.conv1d, F.conv2d, F.conv3d), conv_kernel)
BATCH_NORM = LinearLayer("functional_batch_norm", (F.batch_norm,), batch_norm_kernel)
