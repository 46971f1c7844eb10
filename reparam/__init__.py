"""reparam: fuse training-time multi-branch networks into plain convolutions, exactly.

fused = reparam.fuse(model.eval())
fused, report = reparam.fuse_with_report(model.eval())
"""

from . import blocks
from .api import fuse, fuse_with_report
from .errors import FusionRefused, NotTraceableError, Reason, ReparamError, RuleError, TrainingModeError
from .kernel import Kernel
from .report import FuseReport, Fusion, Refusal
from .rules import LinearLayer, Rule
from .transforms import BUILTIN_RULES

__all__ = [
    "BUILTIN_RULES",
    "FuseReport",
    "Fusion",
    "FusionRefused",
    "Kernel",
    "LinearLayer",
    "NotTraceableError",
    "Reason",
    "Refusal",
    "ReparamError",
    "Rule",
    "RuleError",
    "TrainingModeError",
    "blocks",
    "fuse",
    "fuse_with_report",
]
