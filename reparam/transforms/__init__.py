"""The built-in rules, one file per transform, numbered as in the Diverse Branch Block paper."""

from .branch_sum import SUM
from .conv_bn import BATCHNORM
from .multiscale import CONV

BUILTIN_RULES = (CONV, BATCHNORM, SUM)

__all__ = ["BUILTIN_RULES", "BATCHNORM", "CONV", "SUM"]
