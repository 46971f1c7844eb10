"""Realistic architectures: every conv+BN folds, branches stay where activations separate them."""

import pytest
import torch

import reparam
from reparam.blocks import ResNet18, plain_conv_bn, randomize_batchnorm
from tests.helpers import batchnorms, convs
from tests.models import architectures as nets

CASES = {
    # name: (builder, input size, convs after fusing, refusal reasons expected)
    "ResNet-18": (lambda: ResNet18(plain_conv_bn, num_classes=10, width=8), 64, 20, set()),
    "ResNet-50": (nets.ResNet50Style, 64, 53, set()),
    # the linear bottleneck's projection also feeds the residual: it cannot fold into the next block
    "MobileNetV2": (nets.MobileNetV2Style, 64, 17, {reparam.Reason.SHARED_INTERMEDIATE}),
    "Inception": (nets.InceptionStyle, 32, 13, set()),
    "U-Net": (nets.UNetStyle, 32, 11, set()),
    # 22 RepVGG blocks become one conv each; the FPN head's 7 convs stay
    "RepVGG detector": (nets.Detector, 128, 29, {reparam.Reason.SHARED_INTERMEDIATE}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_architecture_fuses_exactly_with_the_expected_counts(name):
    build, size, expected_convs, reasons = CASES[name]
    model = randomize_batchnorm(build()).eval()
    fused, report = reparam.fuse_with_report(model, verify=True, input_shape=(2, 3, size, size))
    assert (convs(fused), batchnorms(fused)) == (expected_convs, 0)
    assert {r.reason for r in report.refusals} == reasons
    double = model.double()
    odd = name not in ("U-Net", "RepVGG detector")  # those two need sizes their pyramid divides
    x = torch.randn(1, 3, size + odd, size - odd, dtype=torch.float64)
    with torch.no_grad():
        expected, actual = double(x), reparam.fuse(double)(x)
    expected, actual = (expected, actual) if isinstance(expected, list) else ([expected], [actual])
    for want, got in zip(expected, actual, strict=True):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-9 * want.abs().max().item())
