"""Every way a command can fail, run as a user runs it: one `reparam: error:` line, the right exit status, no file lost.

Each case runs `python -m reparam.cli` in a fresh process and checks its stderr: exactly one
error line naming the cause and the fix, no traceback, and exit status 2 for a usage error, 1 for
a model that cannot be read or fused. Files given as input are checked byte for byte afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from reparam import cli
from reparam.blocks import RepVGGBlock, randomize_batchnorm

ROOT = Path(__file__).resolve().parent.parent


def command(*args: object) -> list[str]:
    return [sys.executable, "-m", "reparam.cli", *map(str, args)]


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def fails(*args: object, status: int, says: tuple[str, ...]) -> str:
    """Run the command; assert it exits with `status` and one error line containing each of `says`."""
    result = subprocess.run(command(*args), capture_output=True, text=True, env=environment(), timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("reparam: error:")]
    assert result.returncode == status, result.stderr
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    for text in says:
        assert text in errors[0], errors[0]
    return errors[0]


def model() -> nn.Module:
    return randomize_batchnorm(nn.Sequential(RepVGGBlock(3, 8), RepVGGBlock(8, 8))).eval()


class ReturnsADict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = model()

    def forward(self, x):
        y = self.body(x)
        return {"features": y, "pooled": y.mean((2, 3))}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    paths = {name: folder / name for name in ("model.pt", "model.pt2", "dict.pt2")}
    torch.save(model(), paths["model.pt"])
    torch.export.save(torch.export.export(model(), (torch.randn(2, 3, 8, 8),)), paths["model.pt2"])
    torch.export.save(torch.export.export(ReturnsADict().eval(), (torch.randn(2, 3, 8, 8),)), paths["dict.pt2"])
    whole_pt, whole_pt2 = paths["model.pt"].read_bytes(), paths["model.pt2"].read_bytes()
    damaged = {
        "empty.pt": b"",
        "truncated.pt": whole_pt[: len(whole_pt) // 2],
        "truncated.pt2": whole_pt2[: len(whole_pt2) // 2],
        "text.pt": b"name,value\nconv,1\n",
        "random.pt": bytes(range(37, 256)) * 4,
    }
    for name, content in damaged.items():
        paths[name] = folder / name
        paths[name].write_bytes(content)
    return paths


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("empty.pt", ("empty", "save or copy it again")),
        ("truncated.pt", ("truncated or damaged zip archive",)),
        ("truncated.pt2", ("truncated or damaged zip archive",)),
        ("text.pt", ("neither a zip archive nor a pickle", "torch.save(model, path)")),
        ("random.pt", ("neither a zip archive nor a pickle",)),
    ],
)
def test_a_damaged_file_is_named_as_damaged_not_as_untrusted(files, tmp_path, name, says) -> None:
    line = fails("fuse", files[name], "-o", tmp_path / "out.pt", status=1, says=(str(files[name]), *says))
    assert "--trust-pickle" not in line
    assert not list(tmp_path.iterdir())


def test_a_folder_or_a_missing_file_is_a_usage_error(tmp_path) -> None:
    fails("inspect", tmp_path, status=2, says=("is a folder",))
    fails("inspect", tmp_path / "missing.pt", status=2, says=("no such file",))


def test_writing_over_the_input_is_refused_without_force(files, tmp_path) -> None:
    copy = tmp_path / "model.pt"
    copy.write_bytes(files["model.pt"].read_bytes())
    fails("fuse", copy, "-o", copy, "--trust-pickle", status=2, says=("is the input model", "--force"))
    fails("fuse", copy, "-o", tmp_path / "." / "model.pt", "--trust-pickle", status=2, says=("--force",))
    assert copy.read_bytes() == files["model.pt"].read_bytes()
    subprocess.run(command("fuse", copy, "-o", copy, "--trust-pickle", "--force", "-q"), env=environment(), check=True)
    assert isinstance(torch.load(copy, weights_only=False), torch.fx.GraphModule)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left behind


def test_outputs_that_cannot_be_written_are_refused_before_any_work(files, tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    fails("fuse", files["model.pt2"], "-o", blocker / "out.pt2", status=2, says=("is a file, not a folder",))
    fails("fuse", files["model.pt2"], "-o", tmp_path, status=2, says=("is a folder",))
    out = tmp_path / "same.onnx"
    fails("fuse", files["model.pt2"], "-o", out, "--onnx", out, status=2, says=("own path",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_example_inputs_the_model_rejects_are_one_line(files, tmp_path) -> None:
    fails(
        "fuse",
        files["model.pt"],
        "-o",
        tmp_path / "o.pt",
        "--trust-pickle",
        "--input-shape",
        "1,5,8,8",
        status=1,
        says=("example inputs do not run", "5 channels"),
    )


def test_verify_compares_every_tensor_of_a_dict_output(files, tmp_path) -> None:
    result = subprocess.run(
        command("fuse", files["dict.pt2"], "-o", tmp_path / "o.pt2", "--verify", "-q"),
        capture_output=True,
        text=True,
        env=environment(),
        check=True,
    )
    assert "verified on a 2x3x8x8 input: max rel. error" in result.stdout


def test_an_interrupted_write_leaves_the_previous_file(files, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "fused.pt"
    out.write_bytes(b"previous")

    def interrupted_save(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half a fil")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    assert cli.main(["fuse", str(files["model.pt"]), "-o", str(out), "--trust-pickle", "-q"]) == cli.EXIT_INTERRUPTED
    assert "reparam: error: interrupted" in capsys.readouterr().err
    assert out.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["fused.pt"]


@pytest.mark.parametrize("delay", [2.5, 3.0, 3.5])
def test_sigint_at_any_moment_leaves_a_whole_file(files, tmp_path, delay) -> None:
    """SIGINT during the run (when exactly varies with the machine): the output is the old file or a whole new one.

    (A SIGINT that lands while Python is still importing torch prints Python's own traceback:
    no code of reparam's runs yet, and nothing has been written.)
    """
    out = tmp_path / "model.pt"
    out.write_bytes(files["model.pt"].read_bytes())
    process = subprocess.Popen(
        command("fuse", out, "-o", out, "--force", "--trust-pickle", "-q"),
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=300)
    if out.read_bytes() != files["model.pt"].read_bytes():
        assert isinstance(torch.load(out, weights_only=False), torch.fx.GraphModule)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


onnx_deps = pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(m) is None for m in ("onnx", "onnxscript", "onnxruntime")),
    reason="needs onnx, onnxscript and onnxruntime (pip install -e '.[export]')",
)


@onnx_deps
def test_onnx_is_dynamic_by_default_and_static_on_request(files, tmp_path) -> None:
    import onnxruntime

    for extra, dims in [((), ["batch", 3, "height", "width"]), (("--static",), [1, 3, 8, 8])]:
        path = tmp_path / f"model{len(extra)}.onnx"
        args = ("fuse", files["model.pt"], "-o", tmp_path / "o.pt", "--trust-pickle", "--onnx", path)
        subprocess.run(command(*args, "--input-shape", "1,3,8,8", "-q", *extra), env=environment(), check=True)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        shape = session.get_inputs()[0].shape
        assert shape == dims
        if not extra:
            (result,) = session.run(None, {session.get_inputs()[0].name: torch.randn(8, 3, 12, 10).numpy()})
            assert result.shape == (8, 8, 12, 10)


@onnx_deps
def test_an_opset_the_exporter_cannot_write_is_an_error_not_a_surprise(files, tmp_path) -> None:
    out = tmp_path / "m.onnx"
    args = ("fuse", files["model.pt"], "-o", tmp_path / "o.pt", "--trust-pickle", "--input-shape", "1,3,8,8")
    result = subprocess.run(
        command(*args, "--onnx", out, "--opset", "13", "-q"), capture_output=True, text=True, env=environment()
    )
    if result.returncode == 0:  # a newer exporter converted it: then the file must be opset 13
        import onnx

        assert next(o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")) == 13
    else:
        errors = [line for line in result.stderr.splitlines() if line.startswith("reparam: error:")]
        assert result.returncode == 1 and len(errors) == 1 and "opset 13" in errors[0] and "--opset" in errors[0]
        assert not out.exists()
