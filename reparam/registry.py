"""Rule sets: named, ordered collections of rules, and the functions that register into them.

`fuse(model)` runs the rule set named "default": the built-in transforms plus whatever was
registered into it. Registering is one call:

    reparam.register_layer(Scale, lambda m: Kernel.affine(m.weight, torch.zeros_like(m.weight), 2))

    @reparam.register(Mul(Conv(x, "conv"), Const("k")))
    def conv_times_constant(m): ...

Rules registered by users default to priority 1, ahead of the built-ins (priority 0), so a
specific rule is tried before a general one on the same anchor. A registration that replaces
a rule of the same name warns (`RuleOverwriteWarning`).
"""

from __future__ import annotations

import difflib
import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch import nn

from .errors import InvalidArgumentError, RuleOverwriteWarning
from .kernel import Kernel
from .patterns import Match, Pattern
from .rules import LinearLayer, PatternRule, ReplacementRule, Rule
from .transforms import BUILTIN_RULES

USER_PRIORITY = 1


class RuleSet:
    """An ordered, named set of rules. Iterating yields higher priority first, then registration order."""

    def __init__(self, name: str, rules: Iterable[Rule] = ()) -> None:
        self.name = name
        self._order = itertools.count()
        self._rules: dict[str, tuple[int, int, Rule]] = {}
        for rule in rules:
            self.add(rule, priority=0)

    def add(self, rule: Rule, *, priority: int = USER_PRIORITY) -> Rule:
        """Add `rule`; warns if it replaces a rule of the same name."""
        if rule.name in self._rules:
            warnings.warn(
                f"rule {rule.name!r} in rule set {self.name!r} was replaced by a new registration",
                RuleOverwriteWarning,
                stacklevel=3,
            )
        self._rules[rule.name] = (priority, next(self._order), rule)
        return rule

    def remove(self, name: str) -> Rule:
        """Take the rule called `name` out of this set."""
        self._check(name)
        return self._rules.pop(name)[2]

    def without(self, *names: str) -> RuleSet:
        """A copy of this set without the named rules (to disable a built-in for one call)."""
        copy = self.copy()
        for name in names:
            copy.remove(name)
        return copy

    def copy(self, name: str | None = None) -> RuleSet:
        copy = RuleSet(name or self.name)
        copy._rules = dict(self._rules)
        copy._order = itertools.count(max((o for _, o, _ in self._rules.values()), default=-1) + 1)
        return copy

    @property
    def names(self) -> list[str]:
        return [rule.name for rule in self]

    def __iter__(self) -> Iterator[Rule]:
        return iter(rule for _, _, rule in sorted(self._rules.values(), key=lambda e: (-e[0], e[1])))

    def __contains__(self, name: object) -> bool:
        return name in self._rules

    def __len__(self) -> int:
        return len(self._rules)

    def __repr__(self) -> str:
        return f"RuleSet({self.name!r}, {self.names})"

    def _check(self, name: str) -> None:
        if name not in self._rules:
            raise KeyError(f"rule set {self.name!r} has no rule {name!r}; it has {self.names}")


_RULE_SETS: dict[str, RuleSet] = {}


def rule_set(name: str = "default") -> RuleSet:
    """The rule set called `name`, created with the built-in rules if it does not exist yet."""
    return _named(name)


def _named(name: str) -> RuleSet:  # the registration functions' `rule_set` argument shadows `rule_set`
    if name not in _RULE_SETS:
        _RULE_SETS[name] = RuleSet(name, BUILTIN_RULES)
    return _RULE_SETS[name]


def resolve(rules: str | RuleSet | Iterable[Rule]) -> list[Rule]:
    """The rules `fuse(..., rules=...)` runs: a rule set's name, a `RuleSet`, or rules in order.

    A name must be "default" or a set something was registered into: a misspelt name is an
    `InvalidArgumentError` (with the closest known name), not a new, empty-handed set.
    """
    if isinstance(rules, str):
        if rules != "default" and rules not in _RULE_SETS:
            known = sorted({"default", *_RULE_SETS})
            close = difflib.get_close_matches(rules, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise InvalidArgumentError(
                f"no rule set named {rules!r}; {hint}known rule sets: {', '.join(map(repr, known))} "
                "(a set is created by registering into it: register_layer(..., rule_set=name))"
            )
        return list(rule_set(rules))
    if not isinstance(rules, Iterable):
        raise InvalidArgumentError(
            f"rules must be a rule set's name, a RuleSet or a sequence of rules, got {type(rules).__name__}"
        )
    chosen = list(rules)
    for rule in chosen:
        named = isinstance(getattr(rule, "name", None), str)
        if not (named and hasattr(rule, "anchors") and hasattr(rule, "annotate")):
            raise InvalidArgumentError(
                f"rules must hold Rule objects (from register_layer, register, or reparam.BUILTIN_RULES), got "
                f"{type(rule).__name__} {rule!r:.60}"
            )
    return chosen


def register_layer(
    targets: type[nn.Module] | Callable[..., Any] | tuple,
    kernel: Callable[..., Kernel] | None = None,
    *,
    name: str | None = None,
    rule_set: str = "default",
    priority: int = USER_PRIORITY,
) -> Any:
    """Teach reparam a linear layer: a module type (or function) and the `Kernel` it computes.

    Call it directly, `register_layer(Scale, scale_kernel)`, or as a decorator on the kernel
    function, `@register_layer(Scale)`. See `LinearLayer` for what `kernel` receives.
    """
    targets = targets if isinstance(targets, tuple) else (targets,)

    def add(function: Callable[..., Kernel]) -> LinearLayer:
        rule = LinearLayer(name or getattr(targets[0], "__name__", str(targets[0])), targets, function)
        _named(rule_set).add(rule, priority=priority)
        return rule

    return add if kernel is None else add(kernel)


def register(
    pattern: Pattern, *, name: str | None = None, rule_set: str = "default", priority: int = USER_PRIORITY
) -> Callable[[Callable[[Match], Kernel]], PatternRule]:
    """Decorator: when `pattern` matches, the function returns the `Kernel` the subgraph computes."""

    def add(function: Callable[[Match], Kernel]) -> PatternRule:
        rule = PatternRule(name or function.__name__, pattern, function)
        _named(rule_set).add(rule, priority=priority)
        return rule

    return add


def register_replacement(
    pattern: Pattern, *, name: str | None = None, rule_set: str = "default", priority: int = USER_PRIORITY
) -> Callable[[Callable[[Match], nn.Module]], ReplacementRule]:
    """Decorator: when `pattern` matches, the function returns a module to call instead of the subgraph."""

    def add(function: Callable[[Match], nn.Module]) -> ReplacementRule:
        rule = ReplacementRule(name or function.__name__, pattern, function)
        _named(rule_set).add(rule, priority=priority)
        return rule

    return add
