"""The benchmark suite runs: `python -m benchmarks --quick` writes every table. Times are never asserted."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks.deploy import PlainMobileOne, copy_weights
from benchmarks.run import main
from reparam import fuse
from reparam.blocks import MobileOne, randomize_batchnorm


def quick_run(benchmark: Callable[[list[str]], int], out: Path) -> str:
    """`benchmark --quick --out out`, which sets the thread count, with the suite's thread count put back."""
    threads = torch.get_num_threads()
    try:
        assert benchmark(["--quick", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> tuple[str, object]:
    out = tmp_path_factory.mktemp("bench") / "RESULTS.md"
    return quick_run(main, out), out


NETS = ["RepVGG-A0", "RepVGG-B0", "DBB-ResNet-18", "ACNet-ResNet-18", "MobileOne-S0"]


def _rows(text: str, heading: str) -> list[list[str]]:
    """The body rows of the first markdown table after `heading`."""
    section = text[text.index(heading) :]
    table = re.search(r"^\|.*\|\n\|[ :|-]+\|\n((?:\|.*\|\n)+)", section, re.MULTILINE)
    assert table, f"no table after {heading!r}"
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table.group(1).splitlines()]


def test_quick_run_writes_every_section(quick_report):
    text, _ = quick_report
    for heading in [
        "## Environment",
        "## Nets",
        "## Latency: cpu fp32",
        "### batch 1 ",
        "### batch 2 ",
        "### overhead",
        "## Fusion time and scaling",
        "## Fidelity",
        "## GPU",
    ]:
        assert heading in text, heading
    assert "Quick smoke run" in text
    assert torch.__version__ in text and "intra-op threads" in text


def test_quick_run_tables_have_a_row_per_net(quick_report):
    text, _ = quick_report
    for heading in ["## Nets", "### batch 1 ", "### batch 2 ", "### overhead", "## Fidelity"]:
        assert [row[0] for row in _rows(text, heading)] == NETS, heading
    for row in _rows(text, "### batch 1 "):
        assert re.fullmatch(r"\*\*\d+\.\d{3}\*\*", row[4]), row  # fused / hand-deployed is measured
    for row in _rows(text, "## Nets"):
        assert row[4] == "0" and row[-1] == "bitwise", row  # no BN left; the hand-written twin matches exactly


def test_quick_run_reports_scaling_and_plot(quick_report):
    text, out = quick_report
    sizes = [int(row[0]) for row in _rows(text, "## Fusion time and scaling")]
    assert sizes == sorted(sizes) and len(sizes) >= 3
    if importlib.util.find_spec("matplotlib") is not None:
        assert "![latency" in text and (out.parent / "latency.png").stat().st_size > 0


def test_copy_weights_rejects_a_twin_of_another_shape():
    model = randomize_batchnorm(MobileOne((1, 1), (8, 16), 8, num_branches=2, num_classes=4)).eval()
    fused = fuse(model)
    x = torch.randn(1, 3, 16, 16)
    twin = copy_weights(fused, PlainMobileOne((1, 1), (8, 16), 8, num_classes=4).eval(), x)
    with torch.no_grad():
        assert torch.equal(twin(x), fused(x))
    with pytest.raises(ValueError):
        copy_weights(fused, nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(4)), x)


def test_fuse_time_quick_run_writes_every_table(tmp_path):
    from benchmarks import fuse_time

    out = tmp_path / "FUSE_TIME.md"
    assert fuse_time.main(["--quick", "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert [row[0] for row in _rows(text, "## Reference nets")] == NETS
    assert all(re.fullmatch(r"\*\*\d+\.\d\d\*\*", row[3]) for row in _rows(text, "## Reference nets"))
    timm = text[text.index("## timm") : text.index("## A long linear chain")]
    assert "fuse / timm" in timm or "Not measured here: timm does not import" in timm
    assert [row[0] for row in _rows(text, "## A long linear chain")] == ["25", "50", "100"]
    assert [row[0] for row in _rows(text, "## RepVGG blocks")] == ["2", "4"]
    for row in _rows(text, "## RepVGG blocks"):
        assert float(row[6]) >= float(row[5]) > 0  # peak RSS only grows
        assert float(row[2]) > 0 and float(row[3]) >= 0  # the fuse's CPU time, user and system


def test_a_linear_chain_fuses_to_one_conv():
    from benchmarks.fuse_time import linear_chain

    model = linear_chain(10)
    fused = fuse(model)
    assert [type(m) for m in fused.modules() if not isinstance(m, torch.fx.GraphModule)] == [nn.Conv2d]
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x))


def test_the_decisions_table_has_a_row_per_block(tmp_path):
    from benchmarks.blocks import block_specs
    from benchmarks.decisions import main as decisions
    from benchmarks.decisions import reference_nets

    rows = _rows(quick_run(decisions, tmp_path / "DECISIONS.md"), "# Decisions")
    assert [row[0] for row in rows] == [spec.name for spec in block_specs(True) + reference_nets(True)]
    assert {row[9] for row in rows} <= {"fused", "refused one conv"}


def test_the_cost_model_fit_reports_each_constant(tmp_path):
    from benchmarks.cost_model import _NAMES
    from benchmarks.cost_model import main as cost_model

    constants = _rows(quick_run(cost_model, tmp_path / "COST_MODEL.md"), "# The cost model")
    assert [row[0].strip("`") for row in constants] == list(_NAMES)
    assert all(float(row[2]) > 0 for row in constants)
