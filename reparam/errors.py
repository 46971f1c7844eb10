"""Exception types and the closed set of reasons a fusion can be refused for."""

from __future__ import annotations

from enum import Enum


class Reason(str, Enum):
    """Why a structural match was not fused. The value is the short code shown in reports."""

    BN_TRAINING = "BN in training mode"
    NO_RUNNING_STATS = "no running stats"
    SHARED_INTERMEDIATE = "shared intermediate"
    SHARED_MODULE = "shared module"
    STRIDE = "strides differ"
    MISALIGNED = "outputs not aligned"
    GEOMETRY = "geometry"
    PADDING_MODE = "padding mode"
    BORDER_NOT_EXACT = "border not exact"
    WOULD_COST_MORE = "would cost more"
    NOT_CONSTANT = "not constant"
    IN_PLACE_MUTATION = "in-place mutation"
    HOOKED_MODULE = "hooked module"
    PATCHED_FORWARD = "patched forward"
    UNSUPPORTED_OP = "unsupported op"


class ReparamError(Exception):
    """Base class of every error raised by reparam."""


class FusionRefused(ReparamError):
    """A kernel operation that would not be exact. Carries a `Reason` and a sentence.

    The engine catches it, leaves the graph as it was and records a refusal in the report;
    calling the kernel algebra directly lets it propagate.
    """

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message
        self.nodes: tuple = ()  # the graph nodes at fault, when a rule knows them


class InvalidArgumentError(ReparamError, TypeError, ValueError):
    """An argument of `fuse` or `fuse_exported` has the wrong type or value; the message says what to pass."""


class TrainingModeError(ReparamError):
    """`fuse` was given a model in training mode."""


class NotTraceableError(ReparamError):
    """torch.fx could not trace the model's forward."""


class VerificationError(ReparamError):
    """`fuse(..., verify=True)` found the fused model computing something else than the original."""


class StrictModeError(ReparamError):
    """`fuse(..., strict=True)` met a refusal."""


class RuleError(ReparamError):
    """A rule raised an unexpected exception; the message names the rule and the node."""


class InvalidPatternError(ReparamError):
    """A pattern or rule was malformed; raised when it is registered, not when it runs."""


class RuleOverwriteWarning(UserWarning):
    """A registration replaced a rule of the same name in the same rule set."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none), for one-line reports."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
