"""reparam: fuse training-time multi-branch networks into plain convolutions, exactly.

fused = reparam.fuse(model.eval())
fused, report = reparam.fuse_with_report(model.eval())
"""

from . import blocks, patterns, transforms
from .api import fuse, fuse_with_report
from .errors import (
    FusionRefused,
    InvalidArgumentError,
    InvalidPatternError,
    NotTraceableError,
    Reason,
    ReparamError,
    RuleError,
    RuleOverwriteWarning,
    StrictModeError,
    TrainingModeError,
    VerificationError,
)
from .expansion import ExpandReport, expand, expand_with_report, register_expander
from .export import fuse_exported, fuse_exported_with_report
from .kernel import Kernel
from .patterns import BN, Add, AnyOf, Call, Cat, Const, Conv, Linear, Match, Module, Mul, Neg, Sub, Var
from .registry import RuleSet, register, register_layer, register_replacement, rule_set
from .report import FuseReport, Fusion, Refusal, Replacement, Unfused, Untraced
from .rules import LinearLayer, PatternRule, ReplacementRule, Rule
from .transforms import BUILTIN_RULES

__all__ = [
    "BN",
    "BUILTIN_RULES",
    "Add",
    "AnyOf",
    "Call",
    "Cat",
    "Const",
    "Conv",
    "ExpandReport",
    "FuseReport",
    "Fusion",
    "FusionRefused",
    "InvalidArgumentError",
    "InvalidPatternError",
    "Kernel",
    "Linear",
    "LinearLayer",
    "Match",
    "Module",
    "Mul",
    "Neg",
    "NotTraceableError",
    "PatternRule",
    "Reason",
    "Refusal",
    "ReparamError",
    "Replacement",
    "ReplacementRule",
    "Rule",
    "RuleError",
    "RuleOverwriteWarning",
    "RuleSet",
    "StrictModeError",
    "Sub",
    "TrainingModeError",
    "Unfused",
    "Untraced",
    "VerificationError",
    "Var",
    "blocks",
    "expand",
    "expand_with_report",
    "fuse",
    "fuse_exported",
    "fuse_exported_with_report",
    "fuse_with_report",
    "patterns",
    "register",
    "register_expander",
    "register_layer",
    "register_replacement",
    "rule_set",
    "transforms",
]
