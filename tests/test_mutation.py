"""In-place ops are ordering barriers: a region never reads a tensor across a write to it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reparam
from reparam import Reason
from reparam.blocks import conv_bn, randomize_batchnorm
from tests.helpers import assert_same_function, batchnorms, convs

SPELLINGS = {
    "Tensor.relu_": lambda block, x: x.relu_(),
    "F.relu(inplace=True)": lambda block, x: F.relu(x, inplace=True),
    "F.relu(x, True)": lambda block, x: F.relu(x, True),
    "nn.ReLU(inplace=True)": lambda block, x: block.relu(x),
    "torch.relu_": lambda block, x: torch.relu_(x),
    "Tensor.add_": lambda block, x: x.add_(1.0),
    "Tensor.mul_": lambda block, x: x.mul_(2.0),
    "write to a view": lambda block, x: x.view(-1).mul_(2.0),
    "write to a slice": lambda block, x: x[:, :2].zero_(),
}


class WriteBetweenBranches(nn.Module):
    """Two branches of `y` summed, with `y` written to in place between them."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.a, self.b = conv_bn(4, 4, 3, padding=1), conv_bn(4, 4, 1)
        self.relu = nn.ReLU(inplace=True)
        self.write = SPELLINGS[spelling]

    def forward(self, x):
        y = x * 1.0  # a tensor of the model's own: writing to it does not touch the caller's input
        a = self.a(y)
        self.write(self, y)
        return a + self.b(y)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_a_write_between_two_branches_keeps_them_apart(spelling):
    model = randomize_batchnorm(WriteBetweenBranches(spelling)).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert [r.reason for r in report.refusals] == [Reason.IN_PLACE_MUTATION]
    assert (convs(fused), batchnorms(fused)) == (2, 0)  # each conv still takes its BN
    assert_same_function(model, fused, torch.randn(2, 4, 5, 6, dtype=torch.float64))


class WriteToIntermediate(nn.Module):
    """`z = bn(y); y.add_(1); z + y`: the sum reads y after the write."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        z = self.bn(y)
        y.add_(1)
        return z + y


def test_a_write_to_an_intermediate_is_not_folded_across():
    model = randomize_batchnorm(WriteToIntermediate()).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert Reason.IN_PLACE_MUTATION in {r.reason for r in report.refusals}
    assert_same_function(model, fused, torch.randn(1, 3, 6, 5, dtype=torch.float64))


class ResNetStem(nn.Module):
    """torchvision's spelling: conv, BN, then a ReLU(inplace=True) on the BN's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(identity))
        out += identity
        return self.relu(out)


def test_a_write_after_the_region_does_not_block_it():
    model = randomize_batchnorm(ResNetStem()).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert (convs(fused), batchnorms(fused)) == (2, 1) or (convs(fused), batchnorms(fused)) == (2, 0)
    assert not report.refused(Reason.IN_PLACE_MUTATION)
    assert_same_function(model, fused, torch.randn(2, 3, 7, 5, dtype=torch.float64))


class WriteBeforeTheRegion(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(4, 4, 3, padding=1), conv_bn(4, 4, 1)

    def forward(self, x):
        y = x * 1.0
        y.relu_()
        return self.a(y) + self.b(y)


def test_a_write_before_every_read_lets_the_branches_fuse():
    model = randomize_batchnorm(WriteBeforeTheRegion()).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert (convs(fused), batchnorms(fused)) == (1, 0) and not report.refusals
    assert_same_function(model, fused, torch.randn(2, 4, 5, 6, dtype=torch.float64))


class BufferUpdatedInForward(nn.Module):
    """A weight updated by every forward: no constant to fold, and no graph torch.fx gets right."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weight", torch.randn(4, 3, 3, 3))
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        self.weight.mul_(0.5)
        return self.bn(F.conv2d(x, self.weight, padding=1))


def test_a_buffer_updated_in_forward_is_not_folded():
    model = randomize_batchnorm(BufferUpdatedInForward()).double().eval()
    fused, report = reparam.fuse_with_report(model)
    [untraced] = report.untraced  # torch.fx would run the write once, at trace time, and drop it
    assert untraced.module == "<model>" and "writes in place to weight" in untraced.reason
    assert not report.fusions
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    for _ in range(2):  # each forward halves the weight, in both
        assert_same_function(model, fused, x)


class WritesItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(4, 4, 3, padding=1), conv_bn(4, 4, 1)

    def forward(self, x):
        x.relu_()
        return self.a(x) + self.b(x)


def test_verify_gives_each_model_its_own_copy_of_an_input_it_writes_to():
    model = randomize_batchnorm(WritesItsInput()).double().eval()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    before = x.clone()
    fused = reparam.fuse(model, verify=True, example_inputs=(x,))
    assert torch.equal(x, before)  # neither shape propagation nor verification wrote to the caller's tensor
    assert convs(fused) == 1
    assert_same_function(model, fused, x.clone())


@pytest.mark.parametrize("kind", ["forward hook", "pre-hook"])
def test_a_layer_with_hooks_is_kept_with_its_hooks(kind):
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))).double().eval()
    if kind == "forward hook":
        model[1].register_forward_hook(lambda module, args, output: output * 2)
    else:
        model[1].register_forward_pre_hook(lambda module, args: (args[0] + 1,))
    fused, report = reparam.fuse_with_report(model)
    [refusal] = report.refused(Reason.HOOKED_MODULE)
    assert refusal.nodes == ("1",) and batchnorms(fused) == 1
    assert_same_function(model, fused, torch.randn(1, 3, 5, 5, dtype=torch.float64))


PARAMETRIZATIONS = {
    "weight_norm": torch.nn.utils.parametrizations.weight_norm,
    "spectral_norm": torch.nn.utils.parametrizations.spectral_norm,
    "orthogonal": torch.nn.utils.parametrizations.orthogonal,
}


@pytest.mark.parametrize("name", PARAMETRIZATIONS)
def test_a_parametrized_weight_is_read_as_the_constant_it_is_in_eval(name):
    """torch.nn.utils.parametrize subclasses the layer; its weight, computed from its originals, folds with the BN."""
    conv = PARAMETRIZATIONS[name](nn.Conv2d(4, 4, 3, padding=1))
    model = randomize_batchnorm(nn.Sequential(conv, nn.BatchNorm2d(4))).double().eval()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    fused, report = reparam.fuse_with_report(model)
    assert (convs(fused), batchnorms(fused)) == (1, 0) and report.refusals == []
    assert not torch.nn.utils.parametrize.is_parametrized(next(m for m in fused.modules() if isinstance(m, nn.Conv2d)))
    assert_same_function(model, fused, torch.randn(2, 4, 5, 7, dtype=torch.float64))
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_hook_based_weight_norm_is_kept_with_its_hook_and_the_report_says_how_to_fold_it():
    """torch.nn.utils.weight_norm keeps the weight it computed last as a plain tensor with a grad_fn, which
    deepcopy refuses: the fused model holds a detached copy, and its own hook recomputes it."""
    conv = torch.nn.utils.weight_norm(nn.Conv2d(4, 4, 3, padding=1).double())
    model = randomize_batchnorm(nn.Sequential(conv, nn.BatchNorm2d(4))).double().eval()
    fused, report = reparam.fuse_with_report(model)
    [refusal] = report.refused(Reason.HOOKED_MODULE)
    assert "parametrizations.weight_norm" in refusal.message and "remove_weight_norm" in refusal.message
    x = torch.randn(1, 4, 6, 5, dtype=torch.float64)
    assert_same_function(model, fused, x)
    with torch.no_grad():
        next(m for m in fused.modules() if hasattr(m, "weight_g")).weight_g.mul_(2)  # the copy's, not the caller's
    assert not torch.allclose(fused(x), model(x))
    assert_same_function(model, reparam.fuse(model, inplace=True), x)


class AugmentedThroughAlias(nn.Module):
    """`z = y; z += t; return y`: eager PyTorch changes `y` too (torch.fx alone would return the old `y`)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(4, 4, 3, padding=1), conv_bn(4, 4, 1)

    def forward(self, x):
        y = self.a(x)
        z = y
        z += self.b(x)
        return y


def test_augmented_assignment_through_an_alias_updates_every_name_as_in_eager():
    model = randomize_batchnorm(AugmentedThroughAlias()).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert (convs(fused), batchnorms(fused)) == (1, 0) and "branch_sum" in report.fusions[0].rules
    assert_same_function(model, fused, torch.randn(2, 4, 5, 6, dtype=torch.float64))


class AugmentedView(nn.Module):
    """`v = y[:, :2]; v += 1`: a write to part of y, which the BN then reads."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        v = y[:, :2]
        v += 1.0
        return self.bn(y)


def test_augmented_assignment_to_a_view_is_a_write_the_bn_is_not_folded_across():
    model = randomize_batchnorm(AugmentedView()).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert "iadd" in {str(getattr(n.target, "__name__", n.target)) for n in fused.graph.nodes}  # kept in place
    assert batchnorms(fused) == 1 and report.refusals  # the view's reader keeps conv and BN apart, reported
    assert_same_function(model, fused, torch.randn(2, 3, 5, 6, dtype=torch.float64))


class AugmentedInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        x += 1.0  # writes to the caller's tensor, in eager and in the fused model alike
        return self.bn(self.conv(x))


def test_augmented_assignment_to_the_input_still_writes_to_it():
    model = randomize_batchnorm(AugmentedInput()).double().eval()
    fused = reparam.fuse(model)
    assert (convs(fused), batchnorms(fused)) == (1, 0)
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    mine, theirs = x.clone(), x.clone()
    with torch.no_grad():
        torch.testing.assert_close(fused(mine), model(theirs))
    torch.testing.assert_close(mine, x + 1.0)


class AugmentedThroughInPlaceResult(nn.Module):
    """`b = a.add_(1); b += t; return a`: b is a, so the augmented assignment writes to a too."""

    def __init__(self, sibling: bool) -> None:
        super().__init__()
        self.a, self.b, self.sibling = conv_bn(4, 4, 3, padding=1), conv_bn(4, 4, 1), sibling

    def forward(self, x):
        a = self.a(x)
        c = a.mul_(2) if self.sibling else a  # c is a third name of the same tensor
        b = a.add_(1)
        b += self.b(x)
        return c * 3


@pytest.mark.parametrize("sibling", [False, True], ids=["the written tensor read", "another name of it read"])
def test_augmented_assignment_to_an_in_place_result_writes_to_every_name_of_it(sibling):
    model = randomize_batchnorm(AugmentedThroughInPlaceResult(sibling)).double().eval()
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    fused = reparam.fuse(model)
    assert "iadd" in {str(getattr(n.target, "__name__", n.target)) for n in fused.graph.nodes}  # kept in place
    assert_same_function(model, fused, x)
    exported = reparam.fuse_exported(torch.export.export(model, (x,)))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x))
