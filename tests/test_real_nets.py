"""Arbitrary nets: partial tracing, functional forms, sharing, dtypes, devices, guarantees, verification."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reparam
from reparam import Reason
from reparam.blocks import RepVGGBlock, conv_bn, randomize_batchnorm
from tests.helpers import assert_same_function, batchnorms, convs


class DataDependent(nn.Module):
    """Control flow on values: torch.fx cannot trace the top level, but its blocks trace."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = RepVGGBlock(4, 4), RepVGGBlock(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.a(x)
        return self.b(x)


def test_untraceable_top_level_keeps_control_flow_and_fuses_inside():
    model = randomize_batchnorm(DataDependent()).eval()
    fused, report = reparam.fuse_with_report(model)
    assert convs(fused) == 2 and batchnorms(fused) == 0
    assert [u.module for u in report.untraced] == ["<model>"] and "TraceError" in report.untraced[0].reason
    for sign in (1, -1):
        x = sign * torch.randn(2, 4, 5, 5).abs()
        with torch.no_grad():
            assert torch.allclose(fused(x), model(x), atol=1e-5)


class Opaque(nn.Module):
    def forward(self, x):
        return x.clamp(min=0) if x.mean() > 0 else x


class WithOpaque(nn.Module):
    def __init__(self, flag: bool = True) -> None:
        super().__init__()
        self.block, self.opaque = RepVGGBlock(4, 4), Opaque()

    def forward(self, x, scale: bool = False):
        y = self.opaque(self.block(x))
        return y * 2 if scale else y


def test_leaf_modules_and_concrete_args_let_the_whole_model_trace():
    model = randomize_batchnorm(WithOpaque()).eval()
    partly, report = reparam.fuse_with_report(model)
    assert [u.module for u in report.untraced] == ["<model>"] and convs(partly) == 1
    fused, report = reparam.fuse_with_report(model, leaf_modules=(Opaque,), concrete_args={"scale": True})
    assert report.untraced == [] and isinstance(fused, torch.fx.GraphModule) and convs(fused) == 1
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        assert torch.allclose(fused(x, True), model(x, scale=True), atol=1e-5)  # fx renames the argument


class Functional(nn.Module):
    """conv and BN written with F.*, parameters reached through attributes, summed with sum()."""

    def __init__(self, computed_weight: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4, 3, 3))
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)
        self.gamma, self.beta = nn.Parameter(torch.rand(4) + 0.5), nn.Parameter(torch.randn(4))
        self.point = nn.Conv2d(4, 4, 1)
        self.computed_weight = computed_weight

    def forward(self, x):
        weight = self.weight / self.weight.norm() if self.computed_weight else self.weight
        y = F.batch_norm(F.conv2d(x, weight, padding=1), self.mean, self.var, self.gamma, self.beta)
        return torch.relu(sum([y, self.point(x), x]))


def test_functional_forms_fuse():
    model = Functional().double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert convs(fused) == 1 and "batch_norm" not in fused.code
    assert {"functional_conv", "functional_batch_norm", "branch_sum"} <= set(report.fusions[0].rules)
    assert sorted(fused.state_dict()) == ["conv.bias", "conv.weight"], "the folded tensors are gone"
    assert_same_function(model, fused, torch.randn(2, 4, 6, 7, dtype=torch.float64))


def test_a_weight_computed_in_forward_from_parameters_is_folded_as_a_constant():
    model = Functional(computed_weight=True).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert convs(fused) == 1 and "norm" not in fused.code and not report.refusals
    assert_same_function(model, fused, torch.randn(2, 4, 6, 7, dtype=torch.float64))


class ComputedKernels(nn.Module):
    """Kernels authors compute in forward: weight standardization, `weight + identity`, LoRA's `B @ A * s`."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 6, 3, 3))
        self.register_buffer("identity", torch.zeros(6, 6, 3, 3))
        self.identity[torch.arange(6), torch.arange(6), 1, 1] = 1.0
        self.lora_a, self.lora_b = nn.Parameter(torch.randn(2, 6 * 9)), nn.Parameter(torch.randn(6, 2))
        self.bn = nn.BatchNorm2d(6)
        self.spelling = spelling

    def kernel(self):
        if self.spelling == "standardized":
            mean = self.weight.mean(dim=(1, 2, 3), keepdim=True)
            var = self.weight.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
            return (self.weight - mean) / torch.sqrt(var + 1e-5)
        if self.spelling == "identity":
            return self.weight + self.identity
        return self.weight + (self.lora_b @ self.lora_a).view(6, 6, 3, 3) * 0.5

    def forward(self, x):
        return self.bn(F.conv2d(x, self.kernel(), padding=1)) + x


@pytest.mark.parametrize("spelling", ["standardized", "identity", "lora"])
def test_kernels_computed_in_forward_fold_with_the_layers_around_them(spelling):
    model = randomize_batchnorm(ComputedKernels(spelling)).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert (convs(fused), batchnorms(fused), len(report.fusions)) == (1, 0, 1)
    assert_same_function(model, fused, torch.randn(2, 6, 5, 7, dtype=torch.float64))


def test_a_computed_kernel_of_a_float32_model_is_folded_in_float64():
    model = randomize_batchnorm(ComputedKernels("standardized")).eval()
    reference = copy.deepcopy(model).double()
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    fused = reparam.fuse(model)
    with torch.no_grad():
        want = reference(x)
        error_fused = (fused(x.float()).double() - want).abs().max()
        error_original = (model(x.float()).double() - want).abs().max()
    assert error_fused <= 2 * error_original + 1e-6


def test_a_size_computed_from_a_weight_stays_a_number_and_the_kernel_still_folds():
    """timm's HaloNet style: a padding computed in forward from a parameter's shape (an int, not a tensor)."""

    class SizedFromWeight(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4, 3, 3))
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(F.conv2d(x, self.weight * 0.5, padding=self.weight.shape[-1] // 2))

    model = randomize_batchnorm(SizedFromWeight()).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert (convs(fused), batchnorms(fused), len(report.fusions)) == (1, 0, 1)
    assert_same_function(model, fused, torch.randn(1, 4, 6, 5, dtype=torch.float64))


def test_a_random_op_on_parameters_is_not_folded():
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4, 1, 1))

        def forward(self, x):
            return F.conv2d(x, self.weight + torch.randn_like(self.weight))

    fused, report = reparam.fuse_with_report(Noisy().eval())
    assert "randn_like" in fused.code and report.refused(Reason.NOT_CONSTANT)


class SharedConv(nn.Module):
    """One conv called twice, each call followed by its own BN; and two convs with tied weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.tied, self.bn3 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.tied.weight = self.conv.weight

    def forward(self, x):
        return self.bn1(self.conv(x)) + self.bn2(self.conv(torch.relu(x))) + self.bn3(self.tied(x))


def test_shared_and_tied_modules_are_never_folded():
    model = randomize_batchnorm(SharedConv()).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert (convs(fused), batchnorms(fused)) == (2, 3)
    messages = sorted(r.message for r in report.refused(Reason.SHARED_MODULE))
    assert messages == ["conv and tied share a weight tensor", "conv is called at 2 places"]
    assert fused.get_submodule("tied").weight is fused.get_submodule("conv").weight
    assert_same_function(model, fused, torch.randn(2, 4, 5, 5, dtype=torch.float64), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_is_kept_and_folding_loses_no_precision(dtype):
    torch.manual_seed(0)
    model = randomize_batchnorm(nn.Sequential(RepVGGBlock(8, 8), RepVGGBlock(8, 8))).eval()
    reference = model.double()
    low = reparam.fuse(reference).to(dtype) if dtype != torch.float64 else None
    model = randomize_batchnorm(nn.Sequential(RepVGGBlock(8, 8), RepVGGBlock(8, 8))).eval()
    original = model.to(dtype)
    fused = reparam.fuse(original)
    assert {p.dtype for p in fused.parameters()} == {dtype}
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        truth = reparam.fuse(original.double())(x) if dtype != torch.float64 else original(x)
        err_fused = ((fused(x.to(dtype)).double() - truth).abs().max() / truth.abs().max()).item()
    tolerance = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-12}[dtype]
    assert err_fused <= tolerance
    assert low is None or {p.dtype for p in low.parameters()} == {dtype}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_stays_on_its_device():
    model = randomize_batchnorm(RepVGGBlock(8, 8)).eval().cuda()
    fused = reparam.fuse(model, verify=True, input_shape=(2, 8, 16, 16))
    assert {p.device.type for p in fused.parameters()} == {"cuda"}


def test_inplace_skips_the_copy():
    model = randomize_batchnorm(DataDependent()).eval()
    fused = reparam.fuse(model, inplace=True)
    assert fused is model and isinstance(model.a, torch.fx.GraphModule)
    untouched = randomize_batchnorm(DataDependent()).eval()
    reparam.fuse(untouched)
    assert isinstance(untouched.a, RepVGGBlock)


class Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = conv_bn(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)
        self.register_buffer("steps", torch.tensor(7))

    def forward(self, x):
        return torch.relu(self.head(self.body(x).mean((2, 3)))) + self.steps  # the head stays as written


def test_requires_grad_buffers_state_dict_and_pickling_survive():
    model = randomize_batchnorm(Frozen()).eval()
    model.head.weight.requires_grad_(False)
    model.body.requires_grad_(False)
    fused = reparam.fuse(model)
    assert not fused.get_submodule("head").weight.requires_grad and fused.get_submodule("head").bias.requires_grad
    assert not any(p.requires_grad for p in fused.get_submodule("body_conv").parameters()), "frozen stays frozen"
    assert torch.equal(fused.steps, torch.tensor(7))
    fused.load_state_dict(fused.state_dict())
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert torch.equal(loaded(x), fused(x))


def test_verify_accepts_exact_fusions_and_needs_inputs():
    model = randomize_batchnorm(RepVGGBlock(4, 4)).eval()
    reparam.fuse(model, verify=True, example_inputs=(torch.randn(1, 4, 6, 6),))
    reparam.fuse(model, verify=True, input_shape=(1, 4, 6, 6))
    with pytest.raises(reparam.ReparamError, match="example_inputs"):
        reparam.fuse(model, verify=True)
    with pytest.raises(reparam.ReparamError, match="do not run through the original model"):
        reparam.fuse(model, verify=True, input_shape=(1, 3, 6, 6))


def test_verify_names_a_wrong_rewrite():
    wrong = reparam.rule_set("verify-test")
    x = reparam.Var("x")

    @reparam.register(reparam.Add(reparam.Linear(x, "a"), reparam.Linear(x, "b")), rule_set="verify-test")
    def forgets_a_branch(m):
        return m.kernel("a")

    model = randomize_batchnorm(RepVGGBlock(4, 4)).eval()
    with pytest.raises(reparam.VerificationError, match="first at conv, the rewrite of dense.conv.*forgets_a_branch"):
        reparam.fuse(model, rules=wrong, verify=True, input_shape=(1, 4, 6, 6))


def test_strict_turns_refusals_into_errors():
    model = randomize_batchnorm(SharedConv()).eval()
    with pytest.raises(reparam.StrictModeError, match="shared module"):
        reparam.fuse(model, strict=True)


class ReadsAWeightOfACalledConv(nn.Module):
    """`F.conv2d(y, self.conv.weight)` beside calls of `self.conv`: folding the functional conv keeps the weight."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(F.conv2d(y, self.conv.weight, padding=1)) + self.bn2(self.conv(y))


def test_a_tensor_of_a_still_called_module_is_not_deleted():
    model = randomize_batchnorm(ReadsAWeightOfACalledConv()).double().eval()
    fused, report = reparam.fuse_with_report(model)
    assert len(report.fusions) == 1 and report.refused(Reason.SHARED_MODULE)
    assert_same_function(model, fused, torch.randn(1, 4, 5, 5, dtype=torch.float64))
