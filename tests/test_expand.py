"""`expand`: plain models become training-time blocks that start from the same function and fuse back."""

from __future__ import annotations

import copy
import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reparam
from reparam.blocks import (
    ACBlock,
    DilatedReparamBlock,
    DiverseBranchBlock,
    MobileOneBlock,
    RepVGGBlock,
    ResNet18,
    conv_bn,
    plain_conv_bn,
    randomize_batchnorm,
)
from reparam.expansion import (
    ExpanderOverwriteWarning,
    Ineligible,
    SkipReason,
    expand,
    expand_with_report,
    mobileone_expander,
    register_expander,
    registered_expanders,
    unregister_expander,
)
from reparam.stats import relative_error
from tests.helpers import batchnorms, convs

KINDS = ["acb", "dbb", "repvgg", "mobileone"]
BLOCK_TYPES = {"acb": ACBlock, "dbb": DiverseBranchBlock, "repvgg": RepVGGBlock, "mobileone": MobileOneBlock}
ROOT = Path(__file__).resolve().parent.parent


class VGGish(nn.Module):
    """A VGG-style net with the conv varieties `expand` meets: with and without BN and bias, strided,
    depthwise, grouped 5x5, pointwise."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            # 0: conv + BN
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            # 3: conv with bias, no BN
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            # 6: strided, bias + BN
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            # 9: depthwise
            nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            # 12: grouped 5x5
            nn.Conv2d(16, 16, 5, padding=2, groups=4, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            # 15: pointwise
            nn.Conv2d(16, 24, 1, bias=False),
            nn.BatchNorm2d(24),
            nn.ReLU(),
        )
        self.head = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


# Which of VGGish's six convs each kind replaces (indices into `features`).
VGG_REPLACED = {
    "acb": ["features.0", "features.3", "features.6", "features.9", "features.12"],
    "dbb": ["features.0", "features.3", "features.6", "features.9", "features.12"],
    "repvgg": ["features.0", "features.3", "features.6", "features.9"],
    "mobileone": ["features.0", "features.3", "features.6", "features.9", "features.12", "features.15"],
}


@pytest.fixture(autouse=True)
def one_thread():
    """These layers are tiny: one thread is faster, and much faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def vgg() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(VGGish(), seed=1).eval()


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(ResNet18(plain_conv_bn, width=8, num_classes=10), seed=2).eval()


NETS = {"vgg": (vgg, (2, 3, 19, 17)), "resnet18": (resnet, (2, 3, 37, 33))}


def conv_shapes(model: nn.Module) -> list[tuple[int, ...]]:
    return sorted(tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Conv2d))


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def inserted_blocks(model: nn.Module, kind: str) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, BLOCK_TYPES[kind])]


# --------------------------------------------------------------------------- function-preserving start


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("kind", KINDS)
def test_preserving_init_computes_the_same_function_in_eval_and_train_mode(kind, net):
    build, shape = NETS[net]
    model = build()
    x = torch.randn(*shape)
    expanded, report = expand_with_report(model, kind)
    assert len(report.replaced) > 0 and len(inserted_blocks(expanded, kind)) == len(report.replaced)
    assert relative_error(outputs(expanded.eval(), x), outputs(model, x)) <= 1e-6
    # Train mode too: the main branch is the original conv and BN, the other branches give exact zeros.
    original_train, expanded_train = copy.deepcopy(model).train(), copy.deepcopy(expanded).train()
    assert relative_error(outputs(expanded_train, x), outputs(original_train, x)) <= 1e-6
    # ... and the BN running statistics of the main branches move as the original ones do.
    assert relative_error(outputs(expanded_train.eval(), x), outputs(original_train.eval(), x)) <= 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_preserving_init_in_float64_is_exact_to_rounding(kind):
    model = vgg().double()
    expanded = expand(model, kind).eval()
    assert next(iter(inserted_blocks(expanded, kind)[0].parameters())).dtype == torch.float64
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    assert relative_error(outputs(expanded, x), outputs(model, x)) <= 1e-10


@pytest.mark.parametrize("kind", KINDS)
def test_extra_branches_start_at_zero_through_their_bn_scale(kind):
    model = vgg()
    expanded = expand(model, kind)
    block = inserted_blocks(expanded, kind)[0]
    main = {"acb": "square", "dbb": "origin", "repvgg": "dense", "mobileone": "branches.0"}[kind]
    # the main branch is the original conv and BN
    assert torch.equal(block.get_submodule(main).conv.weight, model.features[0].weight)
    assert torch.equal(block.get_submodule(main).bn.running_var, model.features[1].running_var)
    zero_scaled = [
        m for path, m in block.named_modules() if isinstance(m, nn.BatchNorm2d) and not path.startswith(main)
    ]
    assert zero_scaled and any(
        torch.count_nonzero(m.weight) == 0 and torch.count_nonzero(m.bias) == 0 for m in zero_scaled
    )
    # With init="random" the standard initialization: every BN scale 1, and the function changes.
    randomly = expand(model, kind, init="random")
    block = inserted_blocks(randomly, kind)[0]
    assert all(
        torch.equal(m.weight, torch.ones_like(m.weight)) for m in block.modules() if isinstance(m, nn.BatchNorm2d)
    )
    x = torch.randn(2, 3, 16, 16)
    assert relative_error(outputs(randomly.eval(), x), outputs(model, x)) > 1e-2


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("kind", KINDS)
def test_fuse_of_expand_is_the_original_model(kind, net):
    build, shape = NETS[net]
    model = build()
    x = torch.randn(*shape)
    expanded = expand(model, kind).eval()
    assert convs(expanded) > convs(model)
    fused = reparam.fuse(expanded)
    assert convs(fused) == convs(model) and conv_shapes(fused) == conv_shapes(model)
    assert batchnorms(fused) == batchnorms(reparam.fuse(model)) == 0
    assert relative_error(outputs(fused, x), outputs(model, x)) <= 1e-5
    # With every branch active (as after training), fuse is still exact and the structure the same.
    randomize_batchnorm(expanded, seed=3)
    fused = reparam.fuse(expanded)
    assert convs(fused) == convs(model) and conv_shapes(fused) == conv_shapes(model)
    assert relative_error(outputs(fused, x), outputs(expanded, x)) <= 1e-5
    assert relative_error(outputs(fused, x), outputs(model, x)) > 1e-3  # the branches did change the function


@pytest.mark.parametrize("kind", KINDS)
def test_random_init_fuses_exactly_to_the_original_structure(kind):
    model = vgg()
    expanded = randomize_batchnorm(expand(model, kind, init="random"), seed=4).eval()
    fused = reparam.fuse(expanded)
    assert conv_shapes(fused) == conv_shapes(model)
    x = torch.randn(2, 3, 16, 16)
    assert relative_error(outputs(fused, x), outputs(expanded, x)) <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_which_convs_each_kind_replaces_and_why_it_skips_the_others(kind):
    model = vgg()
    expanded, report = expand_with_report(model, kind)
    assert [e.module for e in report.replaced] == VGG_REPLACED[kind]
    assert all(isinstance(expanded.get_submodule(path), BLOCK_TYPES[kind]) for path in VGG_REPLACED[kind])
    # the BN after each replaced conv was absorbed; the conv without BN (features.3) kept none
    absorbed = {e.module: e.batchnorm for e in report.replaced}
    assert absorbed["features.0"] == "features.1" and absorbed["features.3"] is None
    assert isinstance(expanded.features[1], nn.Identity) and isinstance(expanded.features[7], nn.Identity)
    skipped = {s.module: s.reason for s in report.skipped}
    all_convs = {f"features.{i}" for i in (0, 3, 6, 9, 12, 15)}
    assert set(skipped) == all_convs - set(VGG_REPLACED[kind])
    assert all(reason is SkipReason.KERNEL for reason in skipped.values())
    for path in skipped:
        assert type(expanded.get_submodule(path)) is nn.Conv2d
    assert str(report).count("replaced ") == len(VGG_REPLACED[kind])


# --------------------------------------------------------------------------- gradients and training


def small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        # no BN: its block's main branch has no BN either
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 5),
    )


def nonzero_grads(blocks: list[nn.Module]) -> dict[str, bool]:
    return {
        f"{i}.{name}": p.grad is not None and bool(torch.count_nonzero(p.grad))
        for i, block in enumerate(blocks)
        for name, p in block.named_parameters()
    }


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_branch_and_training_then_fusing_is_exact(kind):
    torch.manual_seed(0)
    model = randomize_batchnorm(small_net(), seed=5)
    expanded = expand(model, kind).train()
    blocks = inserted_blocks(expanded, kind)
    assert len(blocks) == 4
    x, target = torch.randn(8, 3, 12, 12), torch.randn(8, 5)
    optimizer = torch.optim.SGD(expanded.parameters(), lr=0.05)

    F.mse_loss(expanded(x), target).backward()
    assert all(p.grad is not None for block in blocks for p in block.parameters())
    first = nonzero_grads(blocks)
    # At the start only the zero-scaled BNs of the extra branches (and the main branch) learn:
    # every zeroed BN gets a gradient on its scale and shift, while the convs behind it get zero.
    zeroed = [
        f"{i}.{path}.{p}"
        for i, block in enumerate(blocks)
        for path, m in block.named_modules()
        if isinstance(m, nn.BatchNorm2d) and torch.count_nonzero(m.weight) == 0
        for p in ("weight", "bias")
    ]
    assert zeroed and all(first[name] for name in zeroed)
    assert not all(first.values())

    optimizer.step()
    optimizer.zero_grad()
    F.mse_loss(expanded(x), target).backward()
    second = nonzero_grads(blocks)
    assert all(second.values()), [name for name, ok in second.items() if not ok]

    for _ in range(3):
        optimizer.step()
        optimizer.zero_grad()
        F.mse_loss(expanded(x), target).backward()
    fused = reparam.fuse(expanded.eval())
    assert conv_shapes(fused) == conv_shapes(model)
    assert relative_error(outputs(fused, x), outputs(expanded, x)) <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_with_random_init_every_parameter_gets_a_gradient_at_once(kind):
    torch.manual_seed(0)
    expanded = expand(small_net(), kind, init="random").train()
    F.mse_loss(expanded(torch.randn(8, 3, 12, 12)), torch.randn(8, 5)).backward()
    grads = nonzero_grads(inserted_blocks(expanded, kind))
    assert grads and all(grads.values()), [name for name, ok in grads.items() if not ok]


# --------------------------------------------------------------------------- what is skipped, and why


@pytest.mark.parametrize(
    "conv, reason",
    [
        (nn.Conv2d(4, 4, 3, padding=0), SkipReason.PADDING),
        (nn.Conv2d(4, 4, 3, padding=2), SkipReason.PADDING),
        (nn.Conv2d(4, 4, 3, padding=2, dilation=2), SkipReason.DILATION),
        (nn.Conv2d(4, 4, 4, padding=2), SkipReason.KERNEL),
        (nn.Conv2d(4, 4, (1, 3), padding=(0, 1)), SkipReason.KERNEL),
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), SkipReason.PADDING_MODE),
    ],
    ids=["unpadded", "overpadded", "dilated", "even", "1x3", "reflect"],
)
@pytest.mark.parametrize("kind", KINDS)
def test_geometry_no_block_expresses_is_skipped(kind, conv, reason):
    model = randomize_batchnorm(nn.Sequential(conv, nn.BatchNorm2d(4))).eval()
    expanded, report = expand_with_report(model, kind)
    assert report.replaced == []
    [skip] = report.skipped
    assert (skip.module, skip.reason) == ("0", reason)
    assert type(expanded[0]) is nn.Conv2d and type(expanded[1]) is nn.BatchNorm2d
    assert torch.equal(expanded[0].weight, conv.weight)


@pytest.mark.parametrize(
    "kind, kernel, replaced",
    [
        ("acb", 1, False),
        ("dbb", 1, False),
        ("repvgg", 1, False),
        ("repvgg", 5, False),
        ("mobileone", 1, True),
        ("acb", 5, True),
        ("dbb", 7, True),
        ("mobileone", 5, True),
    ],
)
def test_kernel_sizes_per_kind(kind, kernel, replaced):
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(4, 6, kernel, padding=kernel // 2), nn.BatchNorm2d(6))).eval()
    expanded, report = expand_with_report(model, kind)
    assert bool(report.replaced) is replaced
    if not replaced:
        assert [s.reason for s in report.skipped] == [SkipReason.KERNEL]
    x = torch.randn(2, 4, 9, 9)
    assert relative_error(outputs(expanded.eval(), x), outputs(model, x)) <= 1e-6


def test_same_and_valid_padding_strings_are_understood():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding="same"), nn.ReLU(), nn.Conv2d(4, 4, 1, padding="valid"))
    expanded, report = expand_with_report(model, "mobileone")
    assert [e.module for e in report.replaced] == ["0", "2"]
    x = torch.randn(1, 4, 7, 7)
    assert relative_error(outputs(expanded.eval(), x), outputs(model.eval(), x)) <= 1e-6
    assert conv_shapes(reparam.fuse(expanded)) == conv_shapes(model)


class ConvSubclass(nn.Conv2d):
    pass


def test_other_conv_types_are_skipped():
    model = nn.Sequential(nn.Conv1d(4, 4, 3, padding=1), nn.Unflatten(1, (1, 4)), ConvSubclass(1, 4, 3, padding=1))
    expanded, report = expand_with_report(model, "dbb")
    assert report.replaced == [] and [type(m) for m in expanded] == [type(m) for m in model]
    assert [(s.module, s.reason) for s in report.skipped] == [
        ("0", SkipReason.NOT_CONV2D),
        ("2", SkipReason.NOT_CONV2D),
    ]


class TwoCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.other = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.other(self.conv(self.conv(x)))


class Aliased(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.alias = self.conv
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


class ReadsWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.unused = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + F.conv2d(x, self.conv.weight, padding=1)


@pytest.mark.parametrize(
    "model, skips",
    [
        (TwoCalls(), {"conv": SkipReason.SHARED}),
        (Aliased(), {"conv": SkipReason.SHARED}),
        (ReadsWeight(), {"conv": SkipReason.DIRECT_USE, "unused": SkipReason.NOT_CALLED}),
    ],
    ids=["called twice", "two names", "weight read"],
)
def test_uses_a_block_would_change_are_skipped(model, skips):
    model = randomize_batchnorm(model).eval()
    expanded, report = expand_with_report(model, "acb")
    assert {s.module: s.reason for s in report.skipped} == skips
    for path in skips:
        assert type(expanded.get_submodule(path)) is nn.Conv2d
    x = torch.randn(2, 4, 8, 8)
    assert relative_error(outputs(expanded.eval(), x), outputs(model, x)) <= 1e-6
    assert convs(reparam.fuse(expanded)) == convs(reparam.fuse(model))


class SharedOutput(nn.Module):
    """The conv's output feeds its BN and a skip connection: the BN cannot be absorbed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.unit = conv_bn(4, 4, 3, padding=1)
        self.stats_free = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        y = self.conv(x)
        return self.stats_free(self.unit(self.bn(y) + y))


def test_a_bn_is_absorbed_only_when_it_is_the_convs_only_user_and_has_running_stats():
    model = randomize_batchnorm(SharedOutput()).eval()
    expanded, report = expand_with_report(model, "dbb")
    found = {e.module: (e.batchnorm, e.note) for e in report.replaced}
    assert found["conv"][0] is None and "also used" in found["conv"][1]
    assert found["unit.conv"] == ("unit.bn", "")
    assert type(expanded.bn) is nn.BatchNorm2d and isinstance(expanded.unit.bn, nn.Identity)
    x = torch.randn(3, 4, 8, 8)
    assert relative_error(outputs(expanded.eval(), x), outputs(model, x)) <= 1e-6

    lonely = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    expanded, report = expand_with_report(lonely, "acb")
    [expansion] = report.replaced
    assert expansion.batchnorm is None and "running statistics" in expansion.note
    assert type(expanded[1]) is nn.BatchNorm2d


def test_existing_training_blocks_are_left_alone():
    model = nn.Sequential(
        DiverseBranchBlock(4, 4), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), DilatedReparamBlock(4, 7)
    )
    expanded, report = expand_with_report(model, "dbb")
    assert [s.module for s in report.skipped_for(SkipReason.IN_BLOCK)] == ["0", "3"]
    assert [e.module for e in report.replaced] == ["1"]
    assert isinstance(expanded[0].origin.conv, nn.Conv2d)  # not expanded again
    block = ACBlock(4, 4)
    expanded, report = expand_with_report(block, "dbb")
    assert report.replaced == [] and [(s.module, s.reason) for s in report.skipped] == [("", SkipReason.IN_BLOCK)]
    assert "<root>" in str(report) and type(expanded.square.conv) is nn.Conv2d


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = conv_bn(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.body(x)
        return self.head(y) if y.sum() > 0 else -self.head(y)


def test_a_model_fx_cannot_trace_gets_module_replacement_without_bn_absorption():
    model = randomize_batchnorm(Untraceable()).eval()
    expanded, report = expand_with_report(model, "acb")
    assert not report.traced and "TraceError" in report.trace_error
    assert [(e.module, e.batchnorm, e.traced) for e in report.replaced] == [
        ("body.conv", None, False),
        ("head", None, False),
    ]
    assert type(expanded.body.bn) is nn.BatchNorm2d
    x = torch.randn(2, 3, 8, 8)
    assert relative_error(outputs(expanded.eval(), x), outputs(model, x)) <= 1e-6


def test_a_conv_alone_is_expanded_into_a_block():
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1)
    block = expand(conv, "repvgg")
    assert isinstance(block, RepVGGBlock) and block.identity is None
    x = torch.randn(2, 4, 9, 9)
    assert relative_error(outputs(block.eval(), x), outputs(conv, x)) <= 1e-6
    assert conv_shapes(reparam.fuse(block)) == conv_shapes(conv)


# --------------------------------------------------------------------------- registry


def test_builtin_kinds_are_registered_and_unknown_names_list_them():
    assert set(KINDS) <= set(registered_expanders())
    with pytest.raises(ValueError, match="unknown block 'dbbb'.*acb, dbb, mobileone, repvgg"):
        expand(vgg(), "dbbb")
    with pytest.raises(ValueError, match="init must be"):
        expand(vgg(), "dbb", init="zeros")


class ScaledConv(nn.Module):
    """conv(+bn) plus a learnable scalar times a 1x1 conv: a custom expansion starting at 0."""

    def __init__(self, conv: nn.Conv2d, bn: nn.Module | None, init: str) -> None:
        super().__init__()
        self.main = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn) if bn is not None else nn.Identity())
        self.extra = nn.Conv2d(conv.in_channels, conv.out_channels, 1, conv.stride, groups=conv.groups, bias=False)
        if init == "preserve":
            nn.init.zeros_(self.extra.weight)

    def forward(self, x):
        return self.main(x) + self.extra(x)


def scaled(conv, bn, init):
    if conv.kernel_size != (3, 3) or conv.padding != (1, 1):
        raise Ineligible("only 3x3 convs padded by 1")
    return ScaledConv(conv, bn, init)


def test_a_registered_expander_is_used_by_name_and_overwriting_it_warns():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            register_expander("scaled", scaled)  # a new name: no warning
        assert "scaled" in registered_expanders()
        model = vgg()
        expanded, report = expand_with_report(model, "scaled")
        assert [e.module for e in report.replaced] == ["features.0", "features.3", "features.6", "features.9"]
        assert {e.block_type for e in report.replaced} == {"ScaledConv"}
        assert [(s.module, s.reason) for s in report.skipped] == [
            ("features.12", SkipReason.UNSUPPORTED),
            ("features.15", SkipReason.UNSUPPORTED),
        ]
        assert "only 3x3" in report.skipped[0].message
        x = torch.randn(2, 3, 16, 16)
        assert relative_error(outputs(expanded.eval(), x), outputs(model, x)) <= 1e-6
        assert conv_shapes(reparam.fuse(expanded)) == conv_shapes(model)

        with pytest.warns(ExpanderOverwriteWarning, match="'scaled'"):
            register_expander("scaled", mobileone_expander(2))
        expanded = expand(model, "scaled")
        assert len(expanded.features[0].branches) == 2
        with pytest.raises(ValueError, match="scaled"):  # listed among the registered names
            expand(model, "unknown")
    finally:
        if "scaled" in registered_expanders():
            unregister_expander("scaled")
    assert "scaled" not in registered_expanders()


def test_an_expander_function_can_be_passed_directly():
    expanded, report = expand_with_report(vgg(), scaled)
    assert report.block == "scaled" and len(report.replaced) == 4
    assert isinstance(expanded.features[0], ScaledConv)


def test_errors_inside_an_expander_name_the_conv():
    def broken(conv, bn, init):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom") as caught:
        expand(vgg(), broken)
    assert any("features.0" in note for note in caught.value.__notes__)


# --------------------------------------------------------------------------- the caller's model


@pytest.mark.parametrize("kind", KINDS)
def test_the_callers_model_is_untouched(kind):
    model = vgg().train()
    state = copy.deepcopy(model.state_dict())
    structure = [(name, type(m)) for name, m in model.named_modules()]
    expanded = expand(model, kind).train()
    ours = {p.data_ptr() for p in model.parameters()} | {b.data_ptr() for b in model.buffers()}
    assert not ours & ({p.data_ptr() for p in expanded.parameters()} | {b.data_ptr() for b in expanded.buffers()})
    optimizer = torch.optim.SGD(expanded.parameters(), lr=0.1)
    expanded(torch.randn(4, 3, 16, 16)).sum().backward()
    optimizer.step()
    assert [(name, type(m)) for name, m in model.named_modules()] == structure
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert model.training and type(expanded) is VGGish


def test_the_expanded_model_keeps_the_mode_of_each_conv():
    model = vgg()
    model.features[6].train()
    expanded = expand(model, "acb")
    assert expanded.features[6].training and all(m.training for m in expanded.features[6].modules())
    assert not expanded.features[0].training and not any(m.training for m in expanded.features[0].modules())


# --------------------------------------------------------------------------- the example


def test_the_training_example_runs_and_fuses_back(capsys):
    spec = importlib.util.spec_from_file_location("train_expanded", ROOT / "examples" / "train_expanded.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    threads = torch.get_num_threads()
    results = example.main(["--steps", "6", "--block", "acb"])
    assert torch.get_num_threads() == threads
    assert results["fused_vs_expanded_relative_error"] <= 1e-5
    assert results["fused_test_loss"] == pytest.approx(results["expanded_test_loss"], rel=1e-4)
    printed = capsys.readouterr().out
    assert "fused back: 4 convs (plain: 4)" in printed and "held-out loss (eval mode) after 6 steps" in printed
