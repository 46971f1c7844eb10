"""The public entry points: guarantees on the caller's model, errors, the report, provenance."""

import copy

import pytest
import torch
from torch import nn

import reparam
from reparam import LinearLayer
from reparam.blocks import RepVGGBlock, randomize_batchnorm
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
    assert [f.module for f in report.fusions] == ["blocks.0.conv", "blocks.1.conv"]
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
    assert [n.target for n in new] == ["0.conv", "1.conv"] == [f.module for f in report.fusions]
    assert new[0].meta["reparam"]["sources"] == [
        "0.dense.conv",
        "0.dense.bn",
        "0.pointwise.conv",
        "0.pointwise.bn",
        "0.identity",
    ]
    assert set(new[0].meta["reparam"]["rules"]) == {"multiscale", "conv_bn", "branch_sum"}
    assert "0.conv" in str(report) and "0.identity" in str(report)


def test_state_dict_of_fused_model_is_plain():
    fused = reparam.fuse(block())
    assert sorted(fused.state_dict()) == ["0.conv.bias", "0.conv.weight", "1.conv.bias", "1.conv.weight"]


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
