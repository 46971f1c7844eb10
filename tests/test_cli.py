"""The `reparam` command end to end: saved model files in, fused files, reports and pictures out.

Each test runs the command in a fresh Python process (`python -m reparam.cli`, or the `reparam`
console script), as a user would from a shell. The models are built from classes of an
importable module (`reparam.blocks`), so that unpickling them works in that process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from torch import nn

import reparam
from reparam import cli
from reparam.blocks import RepVGGBlock, conv_bn, randomize_batchnorm

ROOT = Path(__file__).resolve().parent.parent
SVG = "{http://www.w3.org/2000/svg}"


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m reparam.cli ARGS` in a fresh process, from the repository root."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        [sys.executable, "-m", "reparam.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"reparam {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result


def repvgg() -> nn.Module:
    blocks = nn.Sequential(RepVGGBlock(3, 8), RepVGGBlock(8, 8), RepVGGBlock(8, 16, stride=2))
    return randomize_batchnorm(blocks).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The same three-block model saved every way a user might have it."""
    folder = tmp_path_factory.mktemp("models")
    model, x = repvgg(), torch.randn(2, 3, 16, 16)
    paths = {name: folder / name for name in ("model.pt", "model.pt2", "scripted.pt", "weights.pt")}
    torch.save(model, paths["model.pt"])
    torch.export.save(torch.export.export(model, (x,)), paths["model.pt2"])
    torch.jit.save(torch.jit.trace(model, (x,)), paths["scripted.pt"])
    torch.save(model.state_dict(), paths["weights.pt"])
    refused = randomize_batchnorm(nn.Sequential(conv_bn(3, 4, 1), nn.AvgPool2d(3, 1, 1))).eval()
    paths["refused.pt"] = folder / "refused.pt"
    torch.save(refused, paths["refused.pt"])
    return paths


def test_a_pickled_module_is_refused_without_the_opt_in(files, tmp_path) -> None:
    out = tmp_path / "fused.pt"
    result = run("fuse", files["model.pt"], "-o", out, check=False)
    assert result.returncode == 1
    assert not out.exists()
    message = result.stderr
    assert "pickled" in message and "runs code" in message
    assert "--trust-pickle" in message  # how to proceed
    assert "torch.nn.modules.container.Sequential" in message  # what the file names
    assert "Traceback" not in message


def test_fuse_a_pickled_module_with_verify_and_json(files, tmp_path) -> None:
    out, picture = tmp_path / "fused.pt", tmp_path / "before_after.svg"
    args = ["--trust-pickle", "--input-shape", "1,3,32,32", "--verify", "--json", "--graph", picture]
    result = run("fuse", files["model.pt"], "-o", out, *args)
    document = json.loads(result.stdout)  # stdout is only the JSON document
    assert document["format"] == "pickled_module"
    assert document["before"] == {"convs": 6, "batchnorms": 7, "parameters": document["before"]["parameters"]}
    assert document["after"]["convs"] == 3 and document["after"]["batchnorms"] == 0
    assert [f["module"] for f in document["fusions"]] == ["0_conv", "1_conv", "2_conv"]
    assert set(document["fusions"][0]) == {
        "module",
        "sources",
        "rules",
        "macs_before",
        "macs_after",
        "params_before",
        "params_after",
        "seconds_before",
        "seconds_after",
    }
    assert document["refusals"] == [] and document["untraced"] == [] and document["unfused"] == []
    assert document["verified"]["max_rel_error"] < 1e-5
    assert "fusing" in result.stderr  # progress goes to stderr

    fused = torch.load(out, weights_only=False)
    model, x = torch.load(files["model.pt"], weights_only=False), torch.randn(2, 3, 12, 20)
    assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == 3
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), atol=1e-5)
    assert_two_panels(picture, before="before: 6 conv, 7 BN, 4 add", after="after: 3 conv, 0 BN, 0 add")


def assert_two_panels(picture: Path, before: str, after: str) -> None:
    """The SVG is valid XML with a panel before and a panel after fusion, titled with their counts."""
    root = ET.parse(picture).getroot()
    assert root.tag == f"{SVG}svg"
    panels = {g.get("id") for g in root.iter(f"{SVG}g")} & {"panel_before", "panel_after"}
    assert panels == {"panel_before", "panel_after"}
    texts = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert before in texts and after in texts


def test_fuse_an_exported_program_to_pt2_and_onnx(files, tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out, onnx_path = tmp_path / "fused.pt2", tmp_path / "fused.onnx"
    result = run("fuse", files["model.pt2"], "-o", out, "--onnx", onnx_path, "--verify", "--report")
    text = result.stdout
    assert "6" in text and "before" in text and "after" in text
    assert "fused   0.conv" in text and "<- 0.dense.conv" in text  # --report: the per-fusion table
    assert "3 Conv, 0 BatchNormalization" in text
    assert "[torch.onnx]" not in text  # the exporter's chatter stays off stdout

    ep = torch.export.load(out)
    convs = [n for n in ep.graph.nodes if n.target == torch.ops.aten.conv2d.default]
    assert len(convs) == 3
    original = torch.export.load(files["model.pt2"])
    x = original.example_inputs[0][0]
    with torch.no_grad():
        assert torch.allclose(ep.module()(x), original.module()(x), atol=1e-5)
    proto = onnx.load(str(onnx_path))
    onnx.checker.check_model(proto)
    assert sum(n.op_type == "Conv" for n in proto.graph.node) == 3
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)


def test_inspect_lists_fusions_and_refusals_and_writes_nothing(files, capsys) -> None:
    before = sorted(p.name for p in files["refused.pt"].parent.iterdir())
    text = run("inspect", files["refused.pt"], "--trust-pickle").stdout
    assert "nothing written" in text
    assert "fused" in text and "refused" in text and "border not exact" in text
    assert cli.main(["inspect", str(files["refused.pt"]), "--trust-pickle", "--json", "-q"]) == 0
    document = json.loads(capsys.readouterr().out)
    [refusal] = document["refusals"]
    assert refusal["reason"] == "border not exact"  # enum values as strings
    assert refusal["rule"] == "avg_pool" and document["output"] is None
    assert document["after"]["batchnorms"] == 0 and len(document["fusions"]) == 1
    assert sorted(p.name for p in files["refused.pt"].parent.iterdir()) == before


def test_torchscript_and_state_dicts_are_explained(files, tmp_path, capsys) -> None:
    assert cli.main(["fuse", str(files["scripted.pt"]), "-o", str(tmp_path / "x.pt"), "--trust-pickle"]) == 1
    message = capsys.readouterr().err
    assert "TorchScript" in message and "cannot be fused" in message and ".pt2" in message
    assert cli.main(["inspect", str(files["weights.pt"])]) == 1
    assert "state_dict" in capsys.readouterr().err
    assert cli.main(["inspect", str(tmp_path / "nope.pt")]) == 2  # a usage error, as argparse's
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_draw_python_api(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from reparam.picture import count_kinds, draw
    from reparam.tracing import trace

    model = repvgg()
    before, after = trace(model, list(reparam.rule_set())), reparam.fuse(model)
    assert count_kinds(before)["conv"] == 6 and count_kinds(after) == {
        "conv": 3,
        "bn": 0,
        "add": 0,
        "other": 3,
        "io": 2,
    }
    path = draw(before, after, tmp_path / "picture.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # exported programs draw the same way: getitem(batch_norm, 0) is the BN itself
    ep = torch.export.export(model, (torch.randn(2, 3, 8, 8),)).run_decompositions()
    assert count_kinds(reparam.export.unexported(ep))["bn"] == 7


def test_arguments_are_checked() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["fuse", "m.pt", "-o", "o.pt", "--input-shape", "1x3x8x8"]).input_shape == (1, 3, 8, 8)
    with pytest.raises(SystemExit):
        parser.parse_args(["fuse", "m.pt", "-o", "o.pt", "--input-shape", "1,a"])
    with pytest.raises(SystemExit):
        parser.parse_args(["fuse", "m.pt"])  # -o is required


def test_verify_without_an_input_shape_says_what_is_missing(files, tmp_path, capsys) -> None:
    code = cli.main(["fuse", str(files["model.pt"]), "-o", str(tmp_path / "o.pt"), "--trust-pickle", "--verify"])
    assert code == 2
    assert "--verify needs --input-shape" in capsys.readouterr().err


def test_measure_times_on_the_input_shape_and_reports_the_timings(files, tmp_path, capsys) -> None:
    out = tmp_path / "o.pt"
    code = cli.main(["fuse", str(files["model.pt"]), "-o", str(out), "--trust-pickle", "--measure", "-q"])
    assert code == 2 and "--measure needs --input-shape" in capsys.readouterr().err
    args = ["--trust-pickle", "--measure", "--input-shape", "1,3,16,16", "--json", "-q"]
    assert cli.main(["fuse", str(files["model.pt"]), "-o", str(out), *args]) == 0
    document = json.loads(capsys.readouterr().out)
    assert isinstance(document["timings"], list) and document["after"]["batchnorms"] == 0
    code = cli.main(["fuse", str(files["model.pt2"]), "-o", str(tmp_path / "o.pt2"), "--measure", "-q"])
    assert code == 2 and "--measure times pickled modules" in capsys.readouterr().err


def test_demo_stays_the_zero_argument_job(monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli.demo, "run", lambda: "demo table")
    assert cli.main(["demo"]) == 0
    assert capsys.readouterr().out == "demo table\n"


def test_console_script() -> None:
    script = shutil.which("reparam")
    if script is None:
        pytest.skip("the reparam console script is not installed (pip install -e .)")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120, check=True)
    for command in ("demo", "fuse", "inspect"):
        assert command in result.stdout
