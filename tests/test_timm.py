"""timm as the zoo: a model of each family, fused exactly, and no further from deploy than timm's own.

Needs timm (and the torchvision it imports), an optional test dependency: skipped without it.
PyPI's torchvision does not import beside the pinned CPU torch 2.13, so CI skips these; they
run wherever timm imports (`pip install timm` with a matching torch and torchvision).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import reparam
from reparam.blocks import randomize_batchnorm
from reparam.exported_parts import linear_ops

timm = pytest.importorskip("timm", reason="timm (and torchvision) do not import here")

# (model, input size, whether timm has deploy code for it)
FAMILIES = [
    ("resnet18", 64, False),
    ("gernet_s", 64, False),
    ("efficientnet_b0", 64, False),
    ("mobilenetv2_050", 64, False),
    ("mobilenetv3_small_050", 64, False),
    ("mobilenetv4_conv_small", 64, False),
    ("mixnet_s", 64, False),
    ("regnetx_002", 64, False),
    ("cspresnet50", 64, False),
    ("darknet17", 64, False),
    ("densenet121", 64, False),
    ("inception_v3", 96, False),
    ("dpn68", 64, False),
    ("ese_vovnet19b_dw", 64, False),
    ("rexnet_100", 64, False),
    ("tresnet_m", 64, False),
    ("mobilevit_xxs", 64, False),
    ("convnext_atto", 64, False),
    ("deit3_small_patch16_224", 224, False),
    ("repvgg_a0", 64, True),
    ("mobileone_s0", 64, True),
    ("fastvit_t8", 64, True),
    ("repghostnet_050", 64, True),
    ("repvit_m1", 64, True),
    ("levit_128s", 224, True),
    ("tiny_vit_5m_224", 224, True),
    ("shvit_s1", 224, True),
]


def _model(name: str) -> nn.Module:
    return randomize_batchnorm(timm.create_model(name, pretrained=False)).double().eval()


def _batchnorms_left(fused: nn.Module, x: torch.Tensor) -> int:
    """BatchNorms one forward of `fused` runs, whatever spelling (modules, or F.batch_norm inside timm's norm-act)."""
    calls = 0
    original = torch.nn.functional.batch_norm

    def counting(*args, **kwargs):
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    torch.nn.functional.batch_norm = counting
    try:
        with torch.no_grad():
            fused(x)
    finally:
        torch.nn.functional.batch_norm = original
    return calls


@pytest.mark.parametrize("name, size, has_deploy", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_timm_family_fuses_exactly_and_as_far_as_timm(name, size, has_deploy):
    model = _model(name)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    fused, report = reparam.fuse_with_report(model)
    with torch.no_grad():
        expected, got = model(x), fused(x)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())
    left = _batchnorms_left(fused, x)
    assert left <= len(report.unfused) + len(report.refusals), f"{left} BatchNorms left, none named: {report}"
    if has_deploy:
        deployed = timm.utils.reparameterize_model(copy.deepcopy(model).float())  # timm's code builds float32
        assert linear_ops(fused, (x,)) <= linear_ops(deployed, (x.float(),))


def test_timm_tf_port_folds_the_bn_after_its_same_padded_conv_given_example_inputs():
    model = _model("tf_efficientnet_b0")
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    fused, report = reparam.fuse_with_report(model, example_inputs=(x,))
    assert not report.untraced and len(report.exported) == 5 and not report.unfused
    for shape in [(1, 3, 64, 64), (2, 3, 49, 71)]:  # the "same" padding differs with the size
        y = torch.randn(shape, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(fused(y), model(y), rtol=1e-9, atol=1e-9)
