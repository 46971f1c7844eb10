"""The `reparam` command.

    reparam demo                                   fuse RepVGG-A0 and print a before/after table
    reparam fuse MODEL -o OUT [options]            fuse a saved model and write it
    reparam inspect MODEL [options]                what would be fused and what is refused; writes nothing

MODEL is a file written by `torch.export.save` (an ExportedProgram, `.pt2`) or by
`torch.save(model)` (a whole pickled module). Unpickling a module imports and runs code named
in the file, so pickled modules are loaded only with `--trust-pickle`; a `.pt2` program needs
it only if it holds pickled parts. TorchScript files cannot be fused (torch.fx does not trace
them). Progress goes to stderr, results to stdout (`--json`: only the JSON document).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import importlib.util
import io
import json
import os
import pickle
import pickletools
import re
import shutil
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import demo, stats
from .api import fuse_with_report
from .errors import ReparamError, first_line
from .report import FuseReport
from .verify import TOLERANCE

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CliError(Exception):
    """A failure the command explains in its message (no traceback): exit status 1."""


class UsageError(CliError):
    """The command line asks for something it cannot do as given: exit status 2, as argparse's errors."""


# --------------------------------------------------------------------------- arguments


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in re.split(r"[,x ]+", text.strip()) if part)
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(f"expected positive sizes separated by commas, like 1,3,224,224; got {text!r}")
    return shape


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reparam",
        description="Fuse re-parameterizable networks (RepVGG, ACNet, DBB, ...) into plain convs, exactly.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{demo,fuse,inspect}")
    commands.add_parser("demo", help="fuse a RepVGG-A0-style net and print a before/after table")

    def model_options(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "model", type=Path, help="a .pt2 file (torch.export.save) or a pickled module (torch.save)"
        )
        command.add_argument(
            "--input-shape",
            type=_shape,
            metavar="N,C,H,W",
            help="shape of a random example input (default for .pt2 files: the program's own example inputs)",
        )
        command.add_argument(
            "--trust-pickle",
            action="store_true",
            help="load a pickled module even though unpickling runs code from the file (only for files you trust)",
        )
        command.add_argument(
            "--allow-costlier", action="store_true", help="fuse regions even where one conv costs more"
        )
        command.add_argument(
            "--measure",
            action="store_true",
            help="where the cost model's call is close, time each form on the --input-shape input and keep the "
            "fastest (pickled modules)",
        )
        command.add_argument("--json", action="store_true", help="print a machine-readable JSON report on stdout")
        command.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")

    fuse = commands.add_parser(
        "fuse",
        help="fuse a saved model and write the result",
        description="Fuse a saved model and write it. The output format follows OUT's suffix: .pt2 writes an "
        "ExportedProgram (torch.export.save), .ts/.torchscript a TorchScript module, anything else the fused "
        "torch.fx GraphModule pickled with torch.save (loading it needs weights_only=False).",
    )
    model_options(fuse)
    fuse.add_argument("-o", "--output", type=Path, required=True, metavar="OUT", help="where to write the fused model")
    fuse.add_argument(
        "--force", action="store_true", help="allow an output path to be the input model's (it is replaced atomically)"
    )
    fuse.add_argument(
        "--verify", action="store_true", help="run the original and the fused model on an example input and compare"
    )
    fuse.add_argument("--onnx", type=Path, metavar="OUT.onnx", help="also export the fused model to ONNX")
    fuse.add_argument(
        "--static",
        action="store_true",
        help="ONNX with the example input's fixed shape (default: batch and spatial dims dynamic)",
    )
    fuse.add_argument(
        "--opset", type=int, metavar="N", help="the ONNX opset to write (default: the exporter's); refused if it cannot"
    )
    fuse.add_argument("--report", action="store_true", help="print every fusion and refusal as a table")
    fuse.add_argument("--graph", type=Path, metavar="PICTURE.svg", help="draw the graph before and after fusion")
    fuse.add_argument("--strict", action="store_true", help="fail if anything was refused or could not be traced")

    inspect = commands.add_parser(
        "inspect", help="list what would be fused and what is refused, without writing anything"
    )
    model_options(inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; every failure is one `reparam: error:` line on stderr and a nonzero exit status.

    Exit status: 0 done, 1 the model could not be loaded, fused or written, 2 a usage error,
    130 interrupted (outputs are written atomically, so an interrupted run leaves each output
    file as it was).
    """
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        print(demo.run())
        return EXIT_OK
    progress = _Progress(quiet=args.quiet)
    try:
        return _fuse(args, progress) if args.command == "fuse" else _inspect(args, progress)
    except UsageError as error:
        return _error(str(error), EXIT_USAGE)
    except (CliError, ReparamError) as error:
        return _error(str(error), EXIT_ERROR)
    except KeyboardInterrupt:
        return _error("interrupted; every output file was left as it was", EXIT_INTERRUPTED)
    except Exception as error:  # a bug: still one line, with what a report needs
        return _error(
            f"unexpected {type(error).__name__} ({first_line(error)}); this is a bug in reparam: please report "
            "it with the command line and the model's source",
            EXIT_ERROR,
        )


def _error(message: str, status: int) -> int:
    print(f"reparam: error: {message}", file=sys.stderr)
    return status


class _Progress:
    """Stage messages with elapsed times, on stderr; on a terminal, a long stage shows its time as it runs."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.start = quiet, time.perf_counter()

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.start:6.1f} s] {message}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def stage(self, message: str) -> Iterator[None]:
        """`message`, then (on a terminal, with tqdm installed) a line counting the stage's seconds until it ends."""
        self(message)
        if self.quiet or not sys.stderr.isatty() or importlib.util.find_spec("tqdm") is None:
            yield
            return
        from tqdm import tqdm

        with tqdm(desc="  working", bar_format="{desc}: {elapsed}", file=sys.stderr, leave=False) as bar:
            stop = threading.Event()

            def tick() -> None:
                while not stop.wait(0.5):
                    bar.refresh()

            ticker = threading.Thread(target=tick, daemon=True)
            ticker.start()
            try:
                yield
            finally:
                stop.set()
                ticker.join()


# --------------------------------------------------------------------------- loading

TORCHSCRIPT_MESSAGE = (
    "{path} is a TorchScript archive. TorchScript modules cannot be fused: reparam rewrites torch.fx "
    "graphs, and torch.fx cannot trace a ScriptModule. Fuse the Python model before scripting it "
    "(torch.jit.script(reparam.fuse(model.eval()))), or export it with torch.export and save it as .pt2: "
    "torch.export.save(torch.export.export(model.eval(), (x,)), 'model.pt2')."
)
PICKLE_MESSAGE = (
    "{path} holds a pickled Python object{what}, not just tensors. Loading it imports and runs code named "
    "in the file, so reparam refuses to load it by default (torch.load(..., weights_only=True) failed). "
    "If you trust the file, run the command again with --trust-pickle. To avoid pickles altogether, save "
    "the model as an ExportedProgram, which stores its graph as data: "
    "torch.export.save(torch.export.export(model.eval(), (x,)), 'model.pt2')."
)

PICKLED_PROGRAM_MESSAGE = (
    "{path} is an ExportedProgram with pickled parts ({parts}). torch.export.load unpickles them with "
    "weights_only=False, which can run code from the file, so reparam refuses to load it by default. If you "
    "trust the file, run the command again with --trust-pickle."
)


def _archive_format(path: Path) -> str:
    """`program` (torch.export.save), `torchscript`, or `pickle` (torch.save, or anything else)."""
    if not zipfile.is_zipfile(path):
        return "pickle"
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if any(n.endswith("archive_format") for n in names):
        return "program"
    if any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names):
        return "torchscript"
    return "pickle"


def _pickled_parts(path: Path) -> list[str]:
    """The parts of a .pt2 archive that `torch.export.load` would unpickle with weights_only=False."""
    parts = []
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if name.endswith("_config.json"):
                config = json.loads(archive.read(name)).get("config", {})
                for fqn, payload in config.items():
                    if payload.get("use_pickle") or not str(payload.get("path_name", "")).startswith(
                        ("weight_", "tensor_")
                    ):
                        parts.append(fqn)
            elif "/sample_inputs/" in name:
                try:
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError):
                    parts.append("example inputs")
    return parts


_CUT_SHORT = "The file was probably cut short while being written or copied: save or copy it again"
_NOT_A_MODEL = "Give a file written by torch.export.save(program, path) or torch.save(model, path)"


def _damage(path: Path) -> tuple[str, str] | None:
    """Why `path` cannot be a saved model at all (empty, a broken archive, not a pickle) and the fix, or None.

    Read only once loading has failed, so that a corrupt file is not mistaken for an untrusted one.
    """
    with path.open("rb") as file:
        head = file.read(4)
    if not head:
        return "it is empty (0 bytes)", _CUT_SHORT
    if head.startswith(b"PK"):
        if not zipfile.is_zipfile(path):
            return "it is a truncated or damaged zip archive (torch.save's and torch.export.save's format)", _CUT_SHORT
        try:
            with zipfile.ZipFile(path) as archive:
                broken = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            return f"its zip archive cannot be read ({first_line(error)})", _CUT_SHORT
        return (f"its zip archive is damaged ({broken} fails its checksum)", _CUT_SHORT) if broken else None
    if not head.startswith(b"\x80"):  # every pickle protocol torch.save writes starts with PROTO
        return f"it is neither a zip archive nor a pickle (it starts with {head!r})", _NOT_A_MODEL
    try:
        for _ in pickletools.genops(path.read_bytes()):
            pass
    except (ValueError, EOFError, IndexError) as error:
        return f"it is a truncated or damaged pickle ({first_line(error)})", _CUT_SHORT
    return None


def _unreadable(path: Path, error: BaseException) -> CliError:
    damage = _damage(path)
    if damage:
        return CliError(f"{path} cannot be read as a model: {damage[0]}. {damage[1]}")
    return CliError(f"{path} is not a file torch.load can read ({type(error).__name__}: {first_line(error)})")


def load(path: Path, trust_pickle: bool) -> nn.Module | torch.export.ExportedProgram:
    """The model saved at `path`: an ExportedProgram or an nn.Module. Raises `CliError` saying why not."""
    if path.is_dir():
        raise UsageError(f"{path} is a folder; give the path of a model file (.pt2, or a torch.save file)")
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    kind = _archive_format(path)
    if kind == "torchscript":
        raise CliError(TORCHSCRIPT_MESSAGE.format(path=path))
    if kind == "program":
        try:
            pickled = _pickled_parts(path)
        except (zipfile.BadZipFile, KeyError, ValueError, OSError) as error:
            raise _unreadable(path, error) from error
        if pickled and not trust_pickle:
            raise CliError(PICKLED_PROGRAM_MESSAGE.format(path=path, parts=", ".join(pickled[:3])))
        try:
            return torch.export.load(path)
        except Exception as error:  # torch raises many types for damaged archives
            raise _unreadable(path, error) from error
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except RuntimeError as error:
        if "TorchScript" in str(error):
            raise CliError(TORCHSCRIPT_MESSAGE.format(path=path)) from error
        raise _unreadable(path, error) from error
    except pickle.UnpicklingError as error:
        damage = _damage(path)
        if damage:
            raise _unreadable(path, error) from error
        if not trust_pickle:
            found = re.search(r"GLOBAL ([\w.]+)", str(error))
            what = f" (it names {found.group(1)})" if found else ""
            raise CliError(PICKLE_MESSAGE.format(path=path, what=what)) from error
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=False)
        except (ImportError, AttributeError) as import_error:
            raise CliError(
                f"{path} refers to code that cannot be imported here ({import_error}); run reparam where the "
                "model's classes are importable (for example with PYTHONPATH set to your project)"
            ) from import_error
    except Exception as error:  # EOFError, KeyError, OSError, ...: torch.load's ways of meeting a bad file
        raise _unreadable(path, error) from error
    if isinstance(loaded, torch.jit.ScriptModule):
        raise CliError(TORCHSCRIPT_MESSAGE.format(path=path))
    if isinstance(loaded, torch.export.ExportedProgram | nn.Module):
        return loaded
    raise CliError(
        f"{path} holds {_a(type(loaded).__name__)}, not a model: a state_dict has the weights but not the "
        "architecture. Save the model itself (torch.save(model)) or, better, an ExportedProgram "
        "(torch.export.save(torch.export.export(model.eval(), (x,)), 'model.pt2'))."
    )


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1].lower() in "aeiou" else f"a {noun}"


# --------------------------------------------------------------------------- fusing


@dataclasses.dataclass
class _Result:
    """What one run found: the models before and after, the report, and what was checked or written."""

    kind: str  # "module" or "program"
    original: Any
    fused: Any
    report: FuseReport
    example: tuple[Any, ...] | None
    before_graph: Any = None
    after_graph: Any = None
    verified: dict[str, Any] | None = None
    onnx: dict[str, Any] | None = None
    written: str | None = None


def _run(args: argparse.Namespace, progress: _Progress, *, verify: bool, strict: bool, drawing: bool) -> _Result:
    progress(f"loading {args.model}")
    model = load(args.model, args.trust_pickle)
    if isinstance(model, torch.export.ExportedProgram):
        return _run_program(args, model, progress, verify=verify, strict=strict)
    if model.training:
        progress(f"{type(model).__name__} was saved in training mode; fusing its eval() form")
        model.eval()
    example = None
    if args.input_shape:
        from .verify import example_inputs_for

        example = example_inputs_for(model, args.input_shape)
    elif verify or args.measure:
        option = "--verify" if verify else "--measure"
        raise UsageError(f"{option} needs --input-shape N,C,H,W (the shape of an input the model accepts)")
    with progress.stage(f"fusing {type(model).__name__} ({stats.count(model, stats.CONV_TYPES)} convs)"):
        fused, report = fuse_with_report(
            model,
            allow_costlier=args.allow_costlier,
            cost="measure" if args.measure else "estimate",
            verify=verify,
            example_inputs=example,
            strict=strict,
        )
    progress(f"fused: {len(report.fusions)} fusions, {len(report.refusals)} refusals")
    result = _Result("module", model, fused, report, example)
    if drawing:
        from . import registry
        from .tracing import trace

        try:
            result.before_graph = trace(model, registry.resolve("default"))
        except ReparamError as error:
            raise CliError(f"--graph draws whole graphs, but {error}") from error
        if not isinstance(fused, torch.fx.GraphModule):
            raise CliError("--graph draws whole graphs, but the model's forward did not trace as a whole")
        result.after_graph = fused
    if verify:
        result.verified = _compare(model, fused, example)
    return result


def _run_program(
    args: argparse.Namespace, ep: torch.export.ExportedProgram, progress: _Progress, *, verify: bool, strict: bool
) -> _Result:
    from .export import _dynamic_shapes, fuse_exported_in_steps, unexported

    if args.measure:
        raise UsageError("--measure times pickled modules; for a .pt2 program, leave it out (the cost model decides)")
    example_args = None
    if args.input_shape:
        dtype = next((v.dtype for v in ep.state_dict.values() if v.is_floating_point()), torch.float32)
        generator = torch.Generator().manual_seed(0)
        example_args = (torch.randn(args.input_shape, generator=generator, dtype=dtype),)
        try:
            with torch.no_grad():
                ep.module()(*example_args)
        except Exception as error:  # torch raises several types for inputs a program does not accept
            raise CliError(
                f"the program in {args.model} does not accept a {'x'.join(map(str, args.input_shape))} input "
                f"({type(error).__name__}: {str(error).splitlines()[0]}); it was exported for other (or static) "
                "shapes: leave out --input-shape to use the program's own example inputs"
            ) from error
    elif getattr(ep, "example_inputs", None) is None:
        raise CliError(f"{args.model} keeps no example inputs; pass --input-shape N,C,H,W to re-export it")
    convs = sum(1 for n in ep.graph.nodes if _node_kind(n) == "conv")
    with progress.stage(f"fusing the exported program ({convs} convs)"):
        fused, report, gm = fuse_exported_in_steps(
            ep,
            example_args,
            None,
            _dynamic_shapes(ep, exact=False) if example_args is not None else None,
            rules="default",
            allow_costlier=args.allow_costlier,
            verify=verify,
            strict=strict,
        )
    progress(f"fused and re-exported: {len(report.fusions)} fusions, {len(report.refusals)} refusals")
    example = example_args if example_args is not None else tuple(ep.example_inputs[0])
    result = _Result("program", ep, fused, report, example)
    if getattr(args, "graph", None):
        result.before_graph, result.after_graph = unexported(ep), gm
    if verify:
        result.verified = _compare(ep.module(), fused.module(), example)
    return result


def _tensors(output: Any) -> list[torch.Tensor]:
    """The tensors in a model's output (a tensor, or tuples, lists and dicts of them), in order."""
    return [leaf for leaf in torch.utils._pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]


def _max_relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """The largest relative error over the floating-point outputs; other outputs must be equal (else inf)."""
    errors = [
        stats.relative_error(g, w) if w.is_floating_point() else (0.0 if torch.equal(g, w) else float("inf"))
        for g, w in zip(got, want)
        if w.numel()
    ]
    return max(errors, default=0.0)


def _compare(original: Any, fused: Any, example: tuple[Any, ...]) -> dict[str, Any]:
    with torch.no_grad():
        want, got = _tensors(original(*example)), _tensors(fused(*example))
    if not want or len(want) != len(got) or any(w.shape != g.shape for w, g in zip(want, got)):
        raise CliError(
            f"--verify: the fused model returns {len(got)} tensor(s) where the original returns {len(want)} "
            "(or their shapes differ); this is a bug in reparam: please report it"
        )
    return {
        "input_shape": list(example[0].shape),
        "max_rel_error": _max_relative_error(got, want),
        "tolerance": TOLERANCE.get(want[0].dtype, 1e-4),
    }


def _fuse(args: argparse.Namespace, progress: _Progress) -> int:
    _check_outputs(args)
    if args.graph and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--graph draws with matplotlib, which is not installed: pip install 'reparam[plot]'")
    result = _run(args, progress, verify=args.verify, strict=args.strict, drawing=bool(args.graph))
    if args.onnx and result.example is None:
        raise UsageError("--onnx needs --input-shape N,C,H,W (ONNX export runs the model on an example input)")
    progress(f"writing {args.output}")
    with _written_atomically(args.output) as staged:
        result.written = _write(result, staged)
    if args.onnx:
        with progress.stage(f"exporting {args.onnx}"), _written_atomically(args.onnx) as staged:
            result.onnx = _write_onnx(result, staged, args, check_runtime=args.verify)
        result.onnx["path"] = str(args.onnx)
    if args.graph:
        from .picture import draw

        progress(f"drawing {args.graph}")
        with _written_atomically(args.graph) as staged:
            draw(result.before_graph, result.after_graph, staged, title=f"{args.model.name}: before and after fusion")
    progress("done")
    if args.json:
        print(json.dumps(_document("fuse", args, result), indent=2))
    else:
        print(_summary(args, result, show_report=args.report))
    return EXIT_OK


def _inspect(args: argparse.Namespace, progress: _Progress) -> int:
    result = _run(args, progress, verify=False, strict=False, drawing=False)
    if args.json:
        print(json.dumps(_document("inspect", args, result), indent=2))
    else:
        print(_summary(args, result, show_report=True))
    return EXIT_OK


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse, before any work, outputs that would overwrite the input, each other, or cannot be written."""
    outputs = {"-o": args.output, "--onnx": args.onnx, "--graph": args.graph}
    seen: dict[Path, str] = {}
    for option, path in outputs.items():
        if path is None:
            continue
        if _same_file(path, args.model) and not args.force:
            raise UsageError(
                f"{option} {path} is the input model: a failed write would lose it. Write to another path, or pass "
                "--force to replace the input (the new file replaces it only once completely written)"
            )
        resolved = path.resolve()
        if resolved in seen:
            raise UsageError(f"{seen[resolved]} and {option} are both {path}: give each output its own path")
        seen[resolved] = option
        if path.is_dir():
            raise UsageError(f"{option} {path} is a folder; give a file path, such as {path / 'fused.pt2'}")
        blocking = next((a for a in path.parents if a.exists() and not a.is_dir()), None)
        if blocking is not None:
            raise UsageError(f"cannot write {option} {path}: {blocking} is a file, not a folder")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


@contextlib.contextmanager
def _written_atomically(target: Path) -> Iterator[Path]:
    """A path to write `target` at, in a fresh folder beside it; what is written there replaces `target` only
    once the block completes (`os.replace`, atomic on one file system), files written beside it (ONNX external
    data) first. An exception or Ctrl-C in the block leaves `target` as it was.
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    except OSError as error:
        raise CliError(f"cannot write {target}: {error.strerror or error}") from error
    try:
        yield staging / target.name
        for written in sorted(staging.iterdir(), key=lambda p: p.name == target.name):
            os.replace(written, target.parent / written.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write(result: _Result, out: Path) -> str:
    if result.kind == "program":
        if out.suffix != ".pt2":
            raise UsageError(f"an ExportedProgram is written by torch.export.save, to a .pt2 file; got {out.name}")
        torch.export.save(result.fused, out)
        return "ExportedProgram (load with torch.export.load)"
    if out.suffix == ".pt2":
        if result.example is None:
            raise UsageError("writing a .pt2 ExportedProgram needs --input-shape N,C,H,W (torch.export runs the model)")
        try:
            program = torch.export.export(result.fused, result.example)
        except Exception as error:
            raise CliError(
                f"torch.export failed on the fused model ({type(error).__name__}: {first_line(error)}); write a "
                ".pt file instead (a pickled GraphModule)"
            ) from error
        torch.export.save(program, out)
        return "ExportedProgram (load with torch.export.load)"
    if out.suffix in (".ts", ".torchscript"):
        try:
            torch.jit.script(result.fused).save(str(out))
        except Exception as error:
            raise CliError(f"torch.jit.script failed on the fused model: {str(error).splitlines()[0]}") from error
        return "TorchScript (load with torch.jit.load)"
    torch.save(result.fused, out)
    return "pickled GraphModule (load with torch.load(path, weights_only=False), with reparam installed)"


def _write_onnx(result: _Result, path: Path, args: argparse.Namespace, check_runtime: bool) -> dict[str, Any]:
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)

        from .onnx_file import write_onnx
    except ImportError as error:
        raise CliError(f"--onnx needs onnx and onnxscript ({error}): pip install 'reparam[export]'") from error
    weights = result.fused.state_dict() if result.kind == "module" else result.fused.state_dict
    size = sum(t.numel() * t.element_size() for t in weights.values())
    proto = write_onnx(
        result.fused, result.example, path, dynamic=not args.static, opset=args.opset, external_data=size > 1.5e9
    )
    ops = Counter(node.op_type for node in proto.graph.node)
    info: dict[str, Any] = {
        "path": str(path),
        "conv_nodes": ops.get("Conv", 0),
        "batchnorm_nodes": ops.get("BatchNormalization", 0),
        "nodes": sum(ops.values()),
        "input_dims": [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim],
    }
    if check_runtime:
        try:
            import onnxruntime
        except ImportError:
            return info
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), result.example, strict=False)}
        got = [torch.from_numpy(array) for array in session.run(None, feed)]
        with torch.no_grad():
            reference = result.original if result.kind == "module" else result.original.module()
            want = _tensors(reference(*result.example))
        if len(got) != len(want):
            raise CliError(f"the ONNX file returns {len(got)} outputs where the model returns {len(want)} tensors")
        info["onnxruntime_max_rel_error"] = _max_relative_error(got, want)
    return info


# --------------------------------------------------------------------------- output


def _node_kind(node: torch.fx.Node) -> str:
    from .picture import kind

    return "other" if node.op == "call_module" else kind(node, None)  # type: ignore[arg-type]


def _census(model: Any) -> dict[str, int]:
    """Convs, BatchNorms and parameters of a module or an ExportedProgram."""
    if isinstance(model, torch.export.ExportedProgram):
        kinds = Counter(_node_kind(n) for n in model.graph.nodes)
        parameters = sum(model.state_dict[name].numel() for name in model.graph_signature.parameters)
        return {"convs": kinds["conv"], "batchnorms": kinds["bn"], "parameters": parameters}
    convs, bns = stats.count(model, stats.CONV_TYPES), stats.count(model, stats.BATCHNORM_TYPES)
    graphs = [m.graph for m in model.modules() if isinstance(m, torch.fx.GraphModule)]
    kinds = Counter(_node_kind(n) for graph in graphs for n in graph.nodes if n.op == "call_function")
    convs, bns = convs + kinds["conv"], bns + kinds["bn"]  # functional convs and BNs in graphs count too
    return {"convs": convs, "batchnorms": bns, "parameters": stats.parameters(model)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _document(command: str, args: argparse.Namespace, result: _Result) -> dict[str, Any]:
    report = result.report
    return {
        "command": command,
        "model": str(args.model),
        "format": "exported_program" if result.kind == "program" else "pickled_module",
        "output": str(args.output) if command == "fuse" else None,
        "before": _census(result.original),
        "after": _census(result.fused),
        "verified": result.verified,
        "onnx": result.onnx,
        "graph": str(args.graph) if getattr(args, "graph", None) else None,
        "fusions": [_jsonable(dataclasses.asdict(f)) for f in report.fusions],
        "refusals": [_jsonable(dataclasses.asdict(r)) for r in report.refusals],
        "replacements": [_jsonable(dataclasses.asdict(r)) for r in report.replacements],
        "untraced": [_jsonable(dataclasses.asdict(u)) for u in report.untraced],
        "timings": [_jsonable(dataclasses.asdict(t)) for t in report.timings],
        "exported": [_jsonable(dataclasses.asdict(e)) for e in report.exported],
        "unfused": [_jsonable(dataclasses.asdict(u)) for u in report.unfused],
    }


def _dims(dims: list[int | str]) -> str:
    return "x".join(map(str, dims))


def _summary(args: argparse.Namespace, result: _Result, show_report: bool) -> str:
    before, after = _census(result.original), _census(result.fused)
    rows = [
        ("convs", before["convs"], after["convs"]),
        ("BatchNorms", before["batchnorms"], after["batchnorms"]),
        ("parameters", f"{before['parameters']:,}", f"{after['parameters']:,}"),
    ]
    report = result.report
    title = f"{args.model}" + (f" -> {args.output}" if getattr(args, "output", None) else " (inspect: nothing written)")
    lines = [
        title,
        f"{len(report.fusions)} fusion(s), {len(report.refusals)} refusal(s), "
        f"{len(report.untraced)} untraced module(s)",
        "",
        f"{'':<12}  {'before':>14}  {'after':>14}",
        *(f"{name:<12}  {b!s:>14}  {a!s:>14}" for name, b, a in rows),
    ]
    if result.verified:
        v = result.verified
        lines.append(
            f"\nverified on a {'x'.join(map(str, v['input_shape']))} input: max rel. error {v['max_rel_error']:.2e} "
            f"(tolerance {v['tolerance']:.0e})"
        )
    if result.written:
        lines.append(f"\nwrote {args.output}: {result.written}")
    if result.onnx:
        o = result.onnx
        line = f"wrote {o['path']}: {o['nodes']} ONNX nodes, {o['conv_nodes']} Conv"
        line += f", {o['batchnorm_nodes']} BatchNormalization; input {_dims(o['input_dims'])}"
        if "onnxruntime_max_rel_error" in o:
            line += f"; onnxruntime max rel. error {o['onnxruntime_max_rel_error']:.2e}"
        lines.append(line)
    if getattr(args, "graph", None):
        lines.append(f"wrote {args.graph}: the graph before and after fusion")
    if show_report:
        lines += ["", str(report)]
    elif report.refusals:
        lines.append("(--report lists each fusion and refusal)")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
