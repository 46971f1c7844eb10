"""Custom rules: new linear layers, subgraph patterns, replacements, rule sets and their errors."""

import itertools
import operator
import warnings

import pytest
import torch
from torch import nn

import reparam
from reparam import (
    BUILTIN_RULES,
    Add,
    Call,
    Const,
    Conv,
    InvalidPatternError,
    Kernel,
    Linear,
    LinearLayer,
    Mul,
    PatternRule,
    Reason,
    RuleOverwriteWarning,
    Var,
)
from reparam.blocks import conv_bn, randomize_batchnorm
from tests.helpers import assert_same_function, batchnorms, convs

_names = itertools.count()


def fresh_set() -> str:
    """A new rule set (built-ins only) so that tests do not see each other's registrations."""
    return f"test-{next(_names)}"


class Scale(nn.Module):
    """A learnable per-channel scale: the only layer reparam does not know."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x):
        return x * self.weight.view(1, -1, 1, 1)


class UnseenBlock(nn.Module):
    """A block class the library has never seen: 3x3+BN, 1x1+BN, and a scaled identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dense = conv_bn(channels, channels, 3, padding=1)
        self.point = conv_bn(channels, channels, 1)
        self.scale = Scale(channels)

    def forward(self, x):
        return torch.relu(self.dense(x) + self.point(x) + self.scale(x))


def test_a_registered_layer_joins_every_combinator():
    rules = fresh_set()
    reparam.register_layer(Scale, lambda m: Kernel.affine(m.weight, torch.zeros_like(m.weight), 2), rule_set=rules)
    model = randomize_batchnorm(nn.Sequential(UnseenBlock(4), UnseenBlock(4))).double().eval()
    fused, report = reparam.fuse_with_report(model, rules=rules)
    assert (convs(fused), batchnorms(fused)) == (2, 0), "the hand-deployed form: one conv per block"
    assert not any(isinstance(m, Scale) for m in fused.modules())
    assert "Scale" in report.fusions[0].rules
    assert_same_function(model, fused, torch.randn(2, 4, 7, 6, dtype=torch.float64))
    # without the registration the traced-through scale stays a multiply beside the fused convs
    plain = reparam.fuse(model)
    assert convs(plain) == 2 and plain.code.count(" * ") == 2


def channel_scale(x, gamma):
    return x * gamma.view(1, -1, 1, 1)


class UsesFunction(nn.Module):
    def __init__(self, computed: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(4) + 0.5)
        self.computed = computed

    def forward(self, x):
        gamma = self.gamma
        if self.computed == "input":  # a value of the input: no constant
            gamma = gamma * x.mean()
        elif self.computed:
            gamma = gamma * 2
        return torch.relu(channel_scale(self.conv(x), gamma))


def test_a_registered_function_is_a_layer_and_computed_arguments_are_refused():
    rules = fresh_set()
    reparam.register_layer(channel_scale, lambda g: Kernel.affine(g, torch.zeros_like(g), 2), rule_set=rules)
    model = UsesFunction(computed=False).double().eval()
    fused = reparam.fuse(model, rules=rules)
    assert convs(fused) == 1 and "channel_scale" not in fused.code
    assert_same_function(model, fused, torch.randn(1, 3, 5, 5, dtype=torch.float64))

    model = UsesFunction(computed=True).double().eval()  # gamma * 2 depends on parameters only: folded
    fused = reparam.fuse(model, rules=rules)
    assert convs(fused) == 1 and "channel_scale" not in fused.code
    assert_same_function(model, fused, torch.randn(1, 3, 5, 5, dtype=torch.float64))

    model = UsesFunction(computed="input").double().eval()
    fused, report = reparam.fuse_with_report(model, rules=rules)
    [refusal] = report.refused(Reason.NOT_CONSTANT)
    assert refusal.rule == "channel_scale" and "computed in forward" in refusal.message
    assert_same_function(model, fused, torch.randn(1, 3, 5, 5, dtype=torch.float64), rtol=0)


x = Var("x")


def scaled_by_constant(m):
    conv = m.kernel("conv")
    scale = torch.full((conv.out_channels,), float(m.value("k")), dtype=torch.float64)
    return conv.then(Kernel.affine(scale, torch.zeros_like(scale), conv.spatial_dims))


class ConvTimes(nn.Module):
    def __init__(self, constant_first: bool) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.constant_first = constant_first

    def forward(self, x):
        y = 0.5 * self.conv(x) if self.constant_first else self.conv(x) * 0.5
        return self.bn(y)


@pytest.mark.parametrize("constant_first", [False, True])
def test_a_pattern_rule_folds_a_constant_multiply(constant_first):
    rules = fresh_set()
    reparam.register(Mul(Conv(x, "conv"), Const("k")), rule_set=rules)(scaled_by_constant)
    model = randomize_batchnorm(ConvTimes(constant_first)).double().eval()
    fused, report = reparam.fuse_with_report(model, rules=rules)
    assert (convs(fused), batchnorms(fused)) == (1, 0)
    assert set(report.fusions[0].rules) >= {"scaled_by_constant", "conv_bn"}
    assert_same_function(model, fused, torch.randn(2, 3, 6, 7, dtype=torch.float64))


class SiLUSpelledOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = self.conv(x)
        return torch.sigmoid(y) * y


def test_a_replacement_rule_swaps_a_subgraph_for_a_module():
    rules = fresh_set()

    @reparam.register_replacement(Mul(Call(torch.sigmoid, x), x), rule_set=rules)
    def silu(m):
        return nn.SiLU()

    model = SiLUSpelledOut().eval()
    fused, report = reparam.fuse_with_report(model, rules=rules)
    assert [r.rule for r in report.replacements] == ["silu"]
    assert any(isinstance(m, nn.SiLU) for m in fused.modules()) and "sigmoid" not in fused.code
    assert_same_function(model, fused, torch.randn(2, 3, 4, 4), rtol=1e-6)


class TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(3, 3, 3, padding=1), conv_bn(3, 3, 1)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_rules_can_be_disabled_chosen_and_prioritised():
    model = randomize_batchnorm(TwoBranches()).eval()
    assert convs(reparam.fuse(model)) == 1
    assert convs(reparam.fuse(model, rules=reparam.rule_set().without("branch_sum"))) == 2
    assert convs(reparam.fuse(model, rules=[r for r in BUILTIN_RULES if r.name != "conv_bn"])) == 2

    rules = fresh_set()

    @reparam.register(Add(Linear(x, "a"), Linear(x, "b")), rule_set=rules)
    def no_sums_here(m):
        raise reparam.FusionRefused(Reason.GEOMETRY, "this deployment target wants branches kept")

    assert reparam.rule_set(rules).names[0] == "no_sums_here", "user rules come before built-ins"
    fused, report = reparam.fuse_with_report(model, rules=rules)
    assert convs(fused) == 2
    [refusal] = report.refused(Reason.GEOMETRY)
    assert refusal.rule == "no_sums_here" and refusal.message == "this deployment target wants branches kept"


def test_registering_a_rule_twice_warns():
    rules = fresh_set()
    reparam.register_layer(Scale, lambda m: Kernel.affine(m.weight, torch.zeros_like(m.weight), 2), rule_set=rules)
    with pytest.warns(RuleOverwriteWarning, match="'Scale'"):
        reparam.register_layer(Scale, lambda m: Kernel.affine(m.weight, torch.zeros_like(m.weight), 2), rule_set=rules)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reparam.register_layer(Scale, lambda m: None, name="other_name", rule_set=rules)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: PatternRule("r", x, scaled_by_constant), "cannot anchor"),
        (lambda: PatternRule("r", "conv", scaled_by_constant), "needs a pattern"),
        (lambda: PatternRule("r", Add(Conv(x), Conv(Var("y"))), scaled_by_constant), "exactly one Var"),
        (lambda: PatternRule("r", Add(Conv(x, "a"), Conv(x, "a")), scaled_by_constant), "unique"),
        (lambda: PatternRule("r", Conv(x), "not callable"), "function of the match"),
        (lambda: Add(Conv(x), 3), "expected a pattern piece"),
        (lambda: Linear(Conv(x)), "takes the Var"),
        (lambda: Var(""), "needs a name"),
        (lambda: reparam.ReplacementRule("r", Add(Linear(x), x), lambda m: nn.Identity()), "Linear"),
    ],
)
def test_invalid_patterns_fail_at_registration(build, message):
    with pytest.raises(InvalidPatternError, match=message):
        build()


def test_a_rule_returning_the_wrong_type_is_reported_by_name():
    rules = fresh_set()
    reparam.register(Mul(Conv(x, "conv"), Const("k")), name="wrong", rule_set=rules)(lambda m: "a string")
    with pytest.raises(reparam.RuleError, match="'wrong' raised TypeError.*not a Kernel"):
        reparam.fuse(ConvTimes(False).eval(), rules=rules)


def test_the_built_in_transforms_are_written_with_the_public_api():
    assert {type(r) for r in BUILTIN_RULES} == {LinearLayer, PatternRule, reparam.ReplacementRule}
    sum_rule = next(r for r in BUILTIN_RULES if r.name == "branch_sum")
    assert set(sum_rule.anchors) == {
        ("call_function", operator.add),
        ("call_function", torch.add),
        ("call_method", "add"),
    }


def test_builtin_rule_names_are_unique():
    """A rule set keeps one rule per name: a built-in sharing another's name would silently replace it."""
    names = [rule.name for rule in reparam.BUILTIN_RULES]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
