"""A graph fuzzer: random models of linear ops, in-place ops, hooks, shared layers and branches.

Each example is a random program over a growing list of values (every value has the same
channels and size): convs (dense or depthwise, 1x1 or padded 3x3, with or without bias),
BatchNorms, sums, differences, scalar scales and shifts, concatenations (with or without a BN
over both parts) narrowed by a 1x1, average pools of both `count_include_pad` kinds, ReLUs,
in-place ops on earlier values (`relu_`, `add_`, `mul_`, `nn.ReLU(inplace=True)`), a layer
called twice, and forward hooks that change a layer's output. Operands are the latest value or
any earlier one, so there are chains as well as values with several users. The fused model
must compute what the eager model computes, in float64, on several input sizes down to 1x1,
whatever `fuse` decided; exported with torch.export (either program form), `fuse_exported`'s
program must compute what the exported one does.

Profiles: the suite's "ci" profile runs 60 examples (about a minute), "dev" 40;
`HYPOTHESIS_PROFILE=thorough pytest tests/test_fuzz.py` runs 1,000 (a third of each through
torch.export, which is the slow part).
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import reparam
from reparam.blocks import randomize_batchnorm
from reparam.verify import cloned

CHANNELS = 4
SIZES = (1, 2, 5)  # input sizes: the minimal ones, and one larger than every kernel


class Program(nn.Module):
    """Runs `steps` over `values`, starting from the input; returns the sum of the last two values."""

    def __init__(self, steps: list[tuple], layers: nn.ModuleList) -> None:
        super().__init__()
        self.steps = steps
        self.layers = layers

    def forward(self, x: Tensor) -> Tensor:
        values = [x]
        for op, *args in self.steps:
            if op == "layer":  # a layer of `self.layers` on one value
                index, source = args
                values.append(self.layers[index](values[source]))
            elif op == "add":
                values.append(values[args[0]] + values[args[1]])
            elif op == "sub":
                values.append(values[args[0]] - values[args[1]])
            elif op == "scale":
                values.append(args[1] * values[args[0]] + args[2])
            elif op == "cat":  # concatenated, maybe normalized by the BN args[3], narrowed back by the 1x1 conv args[2]
                joined = torch.cat([values[args[0]], values[args[1]]], dim=1)
                if args[3] is not None:
                    joined = self.layers[args[3]](joined)
                values.append(self.layers[args[2]](joined))
            elif op == "relu_":
                values[args[0]].relu_()
            elif op == "add_":
                values[args[0]].add_(args[1])
            elif op == "mul_":
                values[args[0]].mul_(args[1])
        return values[-1] + values[-2] if len(values) > 1 else values[-1]


def _doubling_hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
    return 2 * output


@st.composite
def layers(draw) -> nn.Module:
    kind = draw(st.sampled_from(["conv", "conv", "bn", "pool", "relu", "relu_inplace"]))
    if kind == "conv":
        kernel = draw(st.sampled_from([1, 3]))
        groups = draw(st.sampled_from([1, CHANNELS]))
        return nn.Conv2d(CHANNELS, CHANNELS, kernel, padding=kernel // 2, groups=groups, bias=draw(st.booleans()))
    if kind == "bn":
        return nn.BatchNorm2d(CHANNELS)
    if kind == "pool":
        return nn.AvgPool2d(3, 1, 1, count_include_pad=draw(st.booleans()))
    return nn.ReLU(inplace=kind == "relu_inplace")


@st.composite
def programs(draw) -> Program:
    modules: list[nn.Module] = []
    shareable: list[int] = []  # the layers of one value (not the 1x1s that narrow a concatenation)
    steps: list[tuple] = []
    values = 1
    for _ in range(draw(st.integers(1, 10))):
        pick = st.one_of(st.just(values - 1), st.integers(0, values - 1))  # chains, and branches
        op = draw(st.sampled_from(["layer", "layer", "layer", "shared", "add", "sub", "scale", "cat", "in-place"]))
        if op == "shared" and shareable:  # a layer already used, called again
            steps.append(("layer", draw(st.sampled_from(shareable)), draw(pick)))
        elif op in ("layer", "shared"):
            modules.append(draw(layers()))
            shareable.append(len(modules) - 1)
            steps.append(("layer", len(modules) - 1, draw(pick)))
        elif op in ("add", "sub"):
            steps.append((op, draw(pick), draw(pick)))
        elif op == "scale":
            steps.append(("scale", draw(pick), draw(st.sampled_from([0.5, -2.0, 3.0])), draw(st.sampled_from([0, 1.5]))))
        elif op == "cat":
            normalized = draw(st.booleans())
            if normalized:
                modules.append(nn.BatchNorm2d(2 * CHANNELS))
            bn = len(modules) - 1 if normalized else None
            modules.append(nn.Conv2d(2 * CHANNELS, CHANNELS, 1))
            steps.append(("cat", draw(pick), draw(pick), len(modules) - 1, bn))
        else:  # an in-place op on an earlier value: no new value
            kind = draw(st.sampled_from(["relu_", "add_", "mul_"]))
            steps.append((kind, draw(pick), *([] if kind == "relu_" else [draw(st.sampled_from([1.0, -0.5]))])))
            continue
        values += 1
    program = Program(steps, nn.ModuleList(modules))
    convs = [m for m in modules if isinstance(m, nn.Conv2d)]
    if convs and draw(st.booleans()):
        convs[draw(st.integers(0, len(convs) - 1))].register_forward_hook(_doubling_hook)
    seed = draw(st.integers(0, 2**16))
    return randomize_batchnorm(program, seed=seed).double().eval()


def inputs(size: int, seed: int) -> Tensor:
    return torch.randn(2, CHANNELS, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@given(programs(), st.integers(0, 2**16), st.booleans())
def test_the_fused_model_computes_what_the_eager_model_computes(model, seed, with_shapes):
    example = (inputs(SIZES[-1], seed),) if with_shapes else None
    fused = reparam.fuse(model, example_inputs=example)
    for size in SIZES:
        x = inputs(size, seed + size)
        with torch.no_grad():
            expected, actual = model(*cloned((x,))), fused(*cloned((x,)))
        scale = expected.abs().max().clamp_min(1e-30)
        assert ((actual - expected).abs().max() / scale).item() <= 1e-9, f"input size {size}"


@settings(max_examples=max(10, settings().max_examples // 3))  # each example exports twice: the slow part
@given(programs(), st.integers(0, 2**16), st.booleans())
def test_the_fused_program_computes_what_the_exported_program_computes(model, seed, decomposed):
    """The same programs through torch.export and `fuse_exported`, in either program form: the aten
    front end reads their in-place ops, aliases and arithmetic as the torch.fx one does."""
    x = inputs(SIZES[-1], seed)
    program = torch.export.export(model, cloned((x,)))
    program = program.run_decompositions() if decomposed else program
    fused = reparam.fuse_exported(program)
    with torch.no_grad():
        expected, actual = program.module()(*cloned((x,))), fused.module()(*cloned((x,)))
    scale = expected.abs().max().clamp_min(1e-30)
    assert ((actual - expected).abs().max() / scale).item() <= 1e-9
