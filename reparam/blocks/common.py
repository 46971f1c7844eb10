"""Building pieces shared by the reference blocks."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BATCHNORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, ...],
    stride: int = 1,
    padding: int | tuple[int, ...] = 0,
    groups: int = 1,
    dilation: int = 1,
    spatial_dims: int = 2,
) -> nn.Sequential:
    """A bias-free conv followed by BatchNorm, as `Sequential(conv=..., bn=...)` (1d, 2d or 3d)."""
    conv = CONV[spatial_dims](in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False)
    return nn.Sequential(OrderedDict(conv=conv, bn=BATCHNORM[spatial_dims](out_channels)))


ConvBNFactory = Callable[[int, int, int, int], nn.Module]


def plain_conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.Module:
    """The deploy-time unit every training-time block here replaces: a 'same'-padded conv + BN."""
    return conv_bn(in_channels, out_channels, kernel_size, stride, kernel_size // 2)


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random running statistics and affine parameters, as after training.

    Default statistics (mean 0, variance 1, weight 1, bias 0) make BN nearly the identity and
    hide folding bugs; tests and the demo randomize them. Returns `model`, changed in place.
    """
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            shape = module.num_features
            with torch.no_grad():
                if module.running_mean is not None:
                    module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.5)
                    module.running_var.copy_(torch.rand(shape, generator=generator) * 1.5 + 0.5)
                if module.affine:
                    module.weight.copy_(torch.rand(shape, generator=generator) * 0.5 + 0.5)
                    module.bias.copy_(torch.randn(shape, generator=generator) * 0.2)
    return model
