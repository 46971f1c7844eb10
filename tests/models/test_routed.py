"""A yaml-routed model in ultralytics' style: partial fusion must keep the parent's forward working.

The top level iterates its `nn.Sequential` of layers and routes on attributes it set on each
(`m.f`, the inputs; `m.i`, the index; `m.type`); a C2f-style block splits with
`list(x.chunk(2, 1))`, which torch.fx cannot trace. Fusion happens inside; every layer the
parent reads stays where it was, with its attributes.
"""

import copy
import pickle

import torch
from torch import nn

import reparam
from reparam.blocks import randomize_batchnorm
from tests.helpers import assert_same_function, batchnorms


class Conv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class C2f(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.c = cout // 2
        self.cv1 = Conv(cin, 2 * self.c)
        self.cv2 = Conv(3 * self.c, cout)
        self.m = nn.ModuleList([Conv(self.c, self.c, 3)])

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class Concat(nn.Module):
    def forward(self, xs):
        return torch.cat(xs, 1)


class RoutedModel(nn.Module):
    """Layers built from a list of (from, module) rows, run by a routing loop."""

    def __init__(self) -> None:
        super().__init__()
        rows = [(-1, Conv(3, 8, 3, 2)), (-1, C2f(8, 8)), (-1, Conv(8, 8, 3)), ([-1, 1], Concat()), (-1, Conv(16, 4))]
        layers = []
        for i, (f, m) in enumerate(rows):
            m.f, m.i, m.type = f, i, type(m).__name__
            layers.append(m)
        self.model = nn.Sequential(*layers)
        self.save = {1}

    def forward(self, x):
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x


def test_a_routed_model_keeps_its_layers_attributes_and_container():
    model = randomize_batchnorm(RoutedModel()).double().eval()
    x = torch.randn(1, 3, 11, 9, dtype=torch.float64)
    fused, report = reparam.fuse_with_report(model, example_inputs=(x,))
    assert isinstance(fused.model, nn.Sequential) and len(fused.model) == 5
    assert [(m.f, m.i, m.type) for m in fused.model] == [(m.f, m.i, m.type) for m in model.model]
    assert batchnorms(fused) == 0
    assert "C2f" in {u.type_name for u in report.untraced}
    assert_same_function(model, fused, x)
    assert_same_function(model, fused, torch.randn(2, 3, 8, 13, dtype=torch.float64))
    copied = copy.deepcopy(fused)  # a fused child keeps them too
    assert [(m.f, m.i, m.type) for m in copied.model] == [(m.f, m.i, m.type) for m in model.model]
    unpickled = pickle.loads(pickle.dumps(fused))  # torch.fx skips names nn.Module has (`type`) when unpickling
    assert [(m.f, m.i) for m in unpickled.model] == [(m.f, m.i) for m in model.model]
    for again in (copied, unpickled):
        assert_same_function(model, again, x)


def test_a_layer_with_a_forward_set_on_the_instance_is_kept():
    model = randomize_batchnorm(nn.Sequential(Conv(3, 4, 3), Conv(4, 4, 3))).double().eval()
    original = model[1].forward
    model[1].forward = lambda x: original(x) * 2
    fused, report = reparam.fuse_with_report(model)
    assert [u.module for u in report.untraced] == ["1"] and "instance" in report.untraced[0].reason
    assert batchnorms(fused) == 1
    assert_same_function(model, fused, torch.randn(1, 3, 6, 6, dtype=torch.float64))


def test_a_block_with_hooks_is_kept_and_its_hooks_run():
    model = randomize_batchnorm(nn.Sequential(Conv(3, 4, 3), Conv(4, 4, 3))).double().eval()
    model[1].register_forward_hook(lambda module, args, output: output + 1)
    fused, report = reparam.fuse_with_report(model)
    assert [u.module for u in report.untraced] == ["1"] and "hooks" in report.untraced[0].reason
    assert_same_function(model, fused, torch.randn(1, 3, 6, 6, dtype=torch.float64))


def test_hooks_on_the_model_itself_are_kept():
    model = randomize_batchnorm(nn.Sequential(Conv(3, 4, 3), Conv(4, 4, 3))).double().eval()
    model.register_forward_hook(lambda module, args, output: output * 3)
    fused, report = reparam.fuse_with_report(model)
    assert report.untraced[0].module == "<model>" and batchnorms(fused) == 0
    assert_same_function(model, fused, torch.randn(1, 3, 6, 6, dtype=torch.float64))


class IteratesItsStem(nn.Module):
    """An untraceable parent that runs a Sequential child layer by layer."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        for layer in self.stem:
            x = layer(x)
        return x if len(x) else -x  # len() of a traced tensor stops torch.fx


def test_a_sequential_fused_whole_stays_a_sequential():
    model = randomize_batchnorm(IteratesItsStem()).double().eval()
    fused = reparam.fuse(model)
    assert isinstance(fused.stem, nn.Sequential) and [type(m) for m in fused.stem] == [nn.Conv2d, nn.ReLU]
    assert_same_function(model, fused, torch.randn(1, 3, 5, 7, dtype=torch.float64))
