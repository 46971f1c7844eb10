"""The public entry points: guarantees on the caller's model, errors, the report, provenance."""

import copy
import gc
import re

import pytest
import torch
from torch import nn

import reparam
from reparam import LinearLayer
from reparam.blocks import RepVGGBlock, randomize_batchnorm
from reparam.module_copy import copy_module
from tests.helpers import assert_same_function, convs


def block() -> nn.Module:
    return randomize_batchnorm(nn.Sequential(RepVGGBlock(4, 4), RepVGGBlock(4, 8, stride=2))).eval()


def test_the_callers_model_is_untouched():
    model = block()
    state = copy.deepcopy(model.state_dict())
    structure = [(name, type(m)) for name, m in model.named_modules()]
    fused = reparam.fuse(model)
    assert convs(fused) == 2
    assert [(name, type(m)) for name, m in model.named_modules()] == structure
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(p is q for p in model.parameters() for q in fused.parameters())


class KeepsSomeLayers(nn.Module):
    """A fused pair, a conv called at two places (kept, its weight tied) and a ReLU: what fuse keeps is copied."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.shared = nn.Conv2d(4, 4, 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.shared(self.relu(self.shared(self.bn(self.conv(x)))))


def test_what_the_fused_model_keeps_of_the_callers_layers_is_a_copy():
    model = randomize_batchnorm(KeepsSomeLayers()).double().eval()
    fused = reparam.fuse(model)
    assert convs(fused) == 2  # the fused conv and the shared one
    theirs = {id(m) for m in model.modules()}
    assert not any(id(m) in theirs for m in fused.modules())
    storage = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    assert not any(t.untyped_storage().data_ptr() in storage for t in [*fused.parameters(), *fused.buffers()])
    [called_twice] = [n for n in fused.graph.nodes if n.op == "call_module" and "shared" in str(n.target)][:1]
    assert len([n for n in fused.graph.nodes if n.target == called_twice.target]) == 2  # one copy, still tied
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    assert_same_function(model, fused, x)
    with torch.no_grad():
        fused.get_submodule(str(called_twice.target)).weight.zero_()
    assert model.shared.weight.abs().sum() > 0


class ConvWithAHook(nn.Conv2d):
    """A layer whose state is not plain (a hook): copied by copy.deepcopy."""


@pytest.mark.parametrize(
    "layer",
    [nn.ReLU(inplace=True), nn.Conv2d(2, 4, 3, padding=(1, 2), padding_mode="reflect"), nn.Hardtanh(-2.0, 3.0)],
    ids=["relu", "conv", "hardtanh"],
)
def test_a_layers_copy_is_what_deepcopy_makes_and_shares_no_container(layer):
    hooked = ConvWithAHook(2, 2, 1)
    hooked.register_forward_hook(lambda module, args, out: out * 2)
    for original in (layer, hooked):
        duplicate, reference = copy_module(original), copy.deepcopy(original)
        assert type(duplicate) is type(original)
        assert duplicate.__dict__.keys() == reference.__dict__.keys()
        for name, value in original.__dict__.items():
            mine = duplicate.__dict__[name]
            assert type(mine) is type(value)
            if isinstance(value, (dict, list, set)):
                assert mine is not value, name  # a hook added to the copy must not reach the original
            if not any(isinstance(v, torch.Tensor) or callable(v) for v in getattr(value, "values", list)()):
                assert mine == reference.__dict__[name], name
    assert len(copy_module(hooked)._forward_hooks) == 1
    memo: dict = {}
    assert copy_module(layer, memo) is copy_module(layer, memo)  # one memo: one copy


class ReadsALayersWeight(nn.Module):
    """`other` is both called and read as `other.weight`: after fusion neither is left, and its tensors go."""

    def __init__(self) -> None:
        super().__init__()
        self.other, self.bn1, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn1(self.other(x)) + self.bn2(nn.functional.conv2d(x, self.other.weight, self.other.bias))


def test_deleting_a_tensor_fusion_left_unread_never_deletes_it_from_the_callers_layer():
    model = randomize_batchnorm(ReadsALayersWeight()).double().eval()
    state = copy.deepcopy(model.state_dict())
    fused = reparam.fuse(model)
    assert convs(fused) == 1 and sorted(fused.state_dict()) == ["conv.bias", "conv.weight"]
    assert sorted(model.state_dict()) == sorted(state)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert_same_function(model, fused, torch.randn(1, 4, 5, 5, dtype=torch.float64))


def test_training_mode_is_an_error_that_says_to_call_eval():
    with pytest.raises(reparam.TrainingModeError, match=r"model\.eval\(\)"):
        reparam.fuse(block().train())


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = block()

    def forward(self, x):
        return self.blocks(x) if x.sum() > 0 else -x


def test_an_untraceable_forward_is_reported_and_its_children_fused():
    model = Untraceable().eval()
    fused, report = reparam.fuse_with_report(model)
    assert convs(fused) == 2 and isinstance(fused, Untraceable)
    [untraced] = report.untraced
    assert (untraced.module, untraced.type_name) == ("<model>", "Untraceable")
    assert "control flow" in untraced.reason
    assert [f.module for f in report.fusions] == ["blocks.0_conv", "blocks.1_conv"]
    x = torch.randn(1, 4, 6, 6).abs()
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), atol=1e-5)
    with pytest.raises(reparam.StrictModeError, match="Untraceable"):
        reparam.fuse(model, strict=True)


def test_fusing_a_fused_model_changes_nothing():
    fused = reparam.fuse(block())
    again, report = reparam.fuse_with_report(fused)
    assert report.fusions == [] and report.refusals == [] and not report.changed
    assert str(report).startswith("nothing to fuse")
    assert again.code == fused.code


def test_dtype_is_kept():
    model = block().double()
    fused = reparam.fuse(model)
    assert {p.dtype for p in fused.parameters()} == {torch.float64}
    assert_same_function(model, fused, torch.randn(1, 4, 6, 6, dtype=torch.float64))


def test_new_nodes_carry_provenance_and_names_follow_the_blocks():
    fused, report = reparam.fuse_with_report(block())
    new = [n for n in fused.graph.nodes if "reparam" in n.meta]
    assert [n.target for n in new] == ["0_conv", "1_conv"] == [f.module for f in report.fusions]
    assert new[0].meta["reparam"]["sources"] == [
        "0.dense.conv",
        "0.dense.bn",
        "0.pointwise.conv",
        "0.pointwise.bn",
        "0.identity",
    ]
    assert set(new[0].meta["reparam"]["rules"]) == {"multiscale", "conv_bn", "branch_sum"}
    assert "0_conv" in str(report) and "0.identity" in str(report)


def test_state_dict_of_fused_model_is_plain():
    fused = reparam.fuse(block())
    assert sorted(fused.state_dict()) == ["0_conv.bias", "0_conv.weight", "1_conv.bias", "1_conv.weight"]


class Nested(nn.Module):
    """Layers two levels down, a tensor read by `get_attr`, and two paths that flatten alike."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.ModuleDict({"b_c": nn.Conv2d(4, 4, 1), "b": nn.Module()})
        self.a_b = nn.Module()
        self.a_b.c = nn.ReLU()
        self.a["b"].c = nn.ReLU()
        self.stages = nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()))
        self.stages[0].register_buffer("offset", torch.randn(4, 1, 1))

    def forward(self, x):
        x = self.a_b.c(self.a["b"].c(self.a["b_c"](x)))
        return self.stages(x) * self.stages[0].offset + self.a["b_c"].bias.view(4, 1, 1)


def test_layers_become_direct_children_so_the_forward_looks_each_up_once():
    model = Nested().eval()
    fused = reparam.fuse(model)
    targets = [str(n.target) for n in fused.graph.nodes if n.op == "call_module"]
    assert sorted(targets) == ["a_b_c", "a_b_c_1", "a_b_c_2", "stages_0_0", "stages_0_1"]
    assert "getattr(" not in fused.code and "self.stages_0_offset" in fused.code and "self.a_b_c.bias" in fused.code
    assert sorted(fused.state_dict()) == [
        "a_b_c.bias", "a_b_c.weight", "stages_0_0.bias", "stages_0_0.weight", "stages_0_offset"
    ]
    assert_same_function(model, fused, torch.randn(2, 4, 6, 6))


def test_a_rule_that_raises_is_reported_by_name():
    def broken(module):
        raise ValueError("boom")

    rule = LinearLayer("broken_bn", (nn.BatchNorm2d,), broken)
    with pytest.raises(reparam.RuleError, match="'broken_bn' raised ValueError on node _0_dense_bn: boom"):
        reparam.fuse(block(), rules=(rule,))


def test_rules_can_be_chosen():
    model = block()
    fused = reparam.fuse(model, rules=(reparam.transforms.CONV, reparam.transforms.BATCHNORM))
    # without the sum rule, each branch's conv and BN fold but the branches stay apart
    assert convs(fused) == 4
    assert_same_function(
        model.double(),
        reparam.fuse(model.double(), rules=reparam.BUILTIN_RULES[:2]),
        torch.randn(1, 4, 5, 5, dtype=torch.float64),
    )


def test_the_garbage_collector_is_left_as_it_was_found():
    reparam.fuse(block())
    assert gc.isenabled()
    with pytest.raises(reparam.TrainingModeError):
        reparam.fuse(block().train())
    assert gc.isenabled(), "resumed after an error too"
    gc.disable()
    try:
        reparam.fuse(block())
        assert not gc.isenabled(), "a caller's choice to keep it off is kept"
    finally:
        gc.enable()


@pytest.mark.parametrize(
    ("call", "says"),
    [
        (lambda m: reparam.fuse(None), "takes an nn.Module, got NoneType"),
        (lambda m: reparam.fuse("model.pt"), "load the model first"),
        (lambda m: reparam.fuse(torch.export.export(m, (torch.randn(1, 4, 6, 6),))), "reparam.fuse_exported"),
        (lambda m: reparam.fuse(torch.jit.script(m)), "before scripting it"),
        (lambda m: reparam.fuse(m, rules=[1, 2]), "rules must hold Rule objects"),
        (lambda m: reparam.fuse(m, rules=3), "rules must be a rule set's name"),
        (lambda m: reparam.fuse(m, rules="defualt"), "did you mean 'default'?"),
        (lambda m: reparam.fuse(m, example_inputs=torch.randn(2, 4, 6, 6)), "pass example_inputs=(x,)"),
        (lambda m: reparam.fuse(m, input_shape=(1, -4, 6, 6)), "positive sizes"),
        (lambda m: reparam.fuse(m, input_shape="1,4,6,6"), "positive sizes"),
        (lambda m: reparam.fuse(m, allow_costlier="no"), "allow_costlier must be True or False"),
        (lambda m: reparam.fuse(m, strict=1), "strict must be True or False"),
        (lambda m: reparam.fuse(m, leaf_modules=nn.ReLU), "tuple of module classes"),
        (lambda m: reparam.fuse(m, leaf_modules=(nn.ReLU(),)), "not MyBlock()"),
        (lambda m: reparam.fuse(m, input_shape=(1, 5, 6, 6)), "example inputs do not run"),
        (lambda m: reparam.fuse(m, verify=True), "verify=True needs example_inputs"),
        (lambda m: reparam.fuse_exported(m), "use reparam.fuse(model)"),
    ],
)
def test_a_wrong_argument_is_one_specific_error_before_any_work(call, says, capfd):
    model = block()
    with pytest.raises(reparam.InvalidArgumentError, match=re.escape(says)):
        call(model)
    assert "Traceback" not in capfd.readouterr().err  # torch.fx's ShapeProp prints one before raising
    assert not model.training


def test_an_invalid_argument_is_also_a_type_or_value_error():
    assert issubclass(reparam.InvalidArgumentError, TypeError) and issubclass(reparam.InvalidArgumentError, ValueError)
    with pytest.raises(TypeError):
        reparam.fuse(None)


class OptionalSkip(nn.Module):
    """`if skip is not None`: torch.fx records one of the two cases, and says nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.body = RepVGGBlock(4, 4)  # keeps the shape, so skip can be x

    def forward(self, x, skip=None):
        y = self.body(x)
        if skip is not None:
            y = y + skip
        return y


class AlwaysSkip(OptionalSkip):
    def forward(self, x, skip=None):
        return self.body(x) + skip  # the same ops whatever skip is: one graph is what forward does


class CallsBothWays(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = OptionalSkip()

    def forward(self, x):
        return self.inner(x, x) if x.sum() > 0 else self.inner(x)  # untraceable: inner is fused standalone


def test_a_forward_that_branches_on_an_optional_argument_is_kept_and_works_both_ways():
    model = randomize_batchnorm(OptionalSkip()).double().eval()
    fused, report = reparam.fuse_with_report(model)
    [untraced] = report.untraced
    assert untraced.module == "<model>" and "optional argument(s) skip" in untraced.reason
    assert convs(fused) == 1  # the block inside still fuses
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    assert_same_function(model, fused, x)
    with torch.no_grad():
        torch.testing.assert_close(fused(x, x), model(x, x))


def test_an_optional_argument_read_the_same_way_either_way_still_traces():
    model = randomize_batchnorm(AlwaysSkip()).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert not report.untraced and isinstance(fused, torch.fx.GraphModule)
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x, x), model(x, x))


def test_a_child_called_with_and_without_its_optional_argument_works_both_ways():
    model = randomize_batchnorm(CallsBothWays()).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert [u.module for u in report.untraced] == ["<model>", "inner"]
    for x in [torch.rand(1, 4, 5, 5).double(), -torch.rand(1, 4, 5, 5).double()]:
        assert_same_function(model, fused, x)
