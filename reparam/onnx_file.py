"""Writing a fused model as an ONNX file: dynamic batch and spatial dims, the opset asked for, or a clear error.

`torch.onnx.export(..., dynamo=True)` fixes every dimension to the example input's unless told
otherwise, writes opset 18 when asked for an older one it cannot convert to (and only logs
why), and names dynamic dims after internal symbols (`s31`). `write_onnx` asks for the batch and
spatial dims to be dynamic (`Dim.AUTO`: those the model fixes stay fixed), names them `batch`,
`height`, `width` (`length`, `depth`), checks the opset it got, and keeps the exporter's own
console output off stdout.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.export import Dim

from .errors import ReparamError, first_line

_SPATIAL_NAMES = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}


class OnnxExportError(ReparamError):
    """The ONNX exporter could not write the model as asked; the message says what to change."""


def dynamic_dims(example: tuple[Any, ...]) -> tuple[dict[int, Any] | None, ...]:
    """Every dim but the channels (dim 1) of each tensor input, as `Dim.AUTO` (fixed where the model needs it)."""
    return tuple({d: Dim.AUTO for d in range(x.dim()) if d != 1} if isinstance(x, Tensor) else None for x in example)


def write_onnx(
    model: torch.nn.Module | torch.export.ExportedProgram,
    example: tuple[Any, ...],
    path: Path,
    *,
    dynamic: bool,
    opset: int | None,
    external_data: bool,
) -> Any:
    """Export `model` to `path` and return the checked `onnx.ModelProto`.

    A module gets dynamic batch and spatial dims when `dynamic`; an ExportedProgram keeps its
    own. Raises `OnnxExportError` if the exporter fails or writes another opset than `opset`.
    """
    import onnx

    shapes = dynamic_dims(example) if dynamic and isinstance(model, torch.nn.Module) else None
    options: dict[str, Any] = {"dynamo": True, "external_data": external_data, "dynamic_shapes": shapes}
    if opset is not None:
        options["opset_version"] = opset
    with _quiet_exporter() as console:
        try:
            torch.onnx.export(model, example, str(path), **options)
        except Exception as error:
            hint = "" if shapes is None else "; with dynamic dims failing, try --static"
            raise OnnxExportError(f"torch.onnx.export failed ({type(error).__name__}: {first_line(error)}){hint}")
    proto = onnx.load(str(path))
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and written != opset:
        failure = _conversion_failure(console.getvalue())
        raise OnnxExportError(
            f"asked for ONNX opset {opset}, but torch {torch.__version__}'s exporter wrote opset {written}"
            f"{f' ({failure})' if failure else ''}: it writes opset 18 and converts down only where every op "
            f"converts; use --opset {written} or newer, or convert the file with onnx.version_converter"
        )
    if shapes is not None:
        _name_dims(proto, example)
        onnx.save(proto, str(path), save_as_external_data=external_data)
    onnx.checker.check_model(str(path) if external_data else proto)
    return proto


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[io.StringIO]:
    """The exporter's prints and log lines, captured (its progress and warnings are not the command's)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    console = io.StringIO()
    try:
        with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
            yield console
    finally:
        logger.setLevel(level)


def _conversion_failure(console: str) -> str:
    lines = [line.strip() for line in console.splitlines() if "Assertion" in line or "failed" in line.lower()]
    return lines[0][-160:] if lines else ""


def _name_dims(proto: Any, example: tuple[Any, ...]) -> None:
    """Rename the symbols of the first input's dynamic dims to `batch` and the spatial names, graph-wide."""
    inputs = [i for i in proto.graph.input if i.type.HasField("tensor_type")]
    if not inputs or not isinstance(example[0], Tensor):
        return
    dims = inputs[0].type.tensor_type.shape.dim
    names = ("batch", "channels", *_SPATIAL_NAMES.get(len(dims) - 2, ()))
    renamed = {d.dim_param: name for d, name in zip(dims, names) if d.dim_param}
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        if value.type.HasField("tensor_type"):
            for d in value.type.tensor_type.shape.dim:
                if d.dim_param in renamed:
                    d.dim_param = renamed[d.dim_param]
