"""The built-in rules, one file per transform, numbered as in the Diverse Branch Block paper.

I `conv_bn`, II `branch_sum`, III `sequential`, IV `concat`, V `avg_pool`, VI `multiscale`.
"""

from .avg_pool import AVG_POOL
from .branch_sum import SUM
from .concat import CONCAT
from .conv_bn import BATCHNORM
from .multiscale import CONV
from .sequential import BN_AND_PAD

BUILTIN_RULES = (CONV, BATCHNORM, BN_AND_PAD, AVG_POOL, SUM, CONCAT)

__all__ = ["AVG_POOL", "BATCHNORM", "BN_AND_PAD", "BUILTIN_RULES", "CONCAT", "CONV", "SUM"]
