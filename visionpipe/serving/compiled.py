"""The compiled CPU runtime: a bundle member exported to ONNX, served with ONNX Runtime (issue 17).

One file per ensemble member, ``compiled/member-<i>.onnx``, described in bundle.json next to the member's weights::

    "members": [{"architecture": {...}, "weights": "weights/member-0.safetensors",
                 "compiled": {"format": "onnx", "file": "compiled/member-0.onnx", "opset": 18,
                              "input": "input", "output": "logits", "exporter": "torch.onnx dynamo (torch 2.14.1)"}}]

The file is listed in ``files`` with its sha256 like every other file, so the bundle signature covers it. It is
written by bundle_validation when it assembles the bundle (``compiled_runtime=onnx``) and checked there against the
torch model (decisions identical on val_calib and val_test), so the file validated is the file served; export
publishes it unchanged.

The graph takes exactly the torch model's input, preprocessed rows (R, C, S, S) float32 with a dynamic first axis,
and returns its logits (R, K): TTA variants and multi-view tiles stay one batched call, as in torch.

Why ONNX Runtime and not OpenVINO (both read this .onnx): measured, `.venv/bin/python bench/compiled.py` (2
threads, images/s, on the shared 2-core machine at load average 9-10, so absolute figures are low and noisy; the
ratios are what decided): ONNX Runtime was the fastest in every row, 1.9-6.8x torch on digits-cnn and 3.7-6.7x on
efficientnet-lite0 at 224 px, where OpenVINO gave 0.7-1.2x and 1.7-5.1x (digits-cnn batch 1: torch 391, ORT 2668,
OpenVINO 285; effnet-lite0 batch 32: torch 3, ORT 19, OpenVINO 15). ONNX Runtime is also already a runtime
dependency (one wheel, thread-safe `run`), OpenVINO only a dev dependency for the bench.

Loading (`load_onnx`) fails closed like the safetensors path: the bytes are read once and their sha256 checked
against the signed manifest by the caller (visionpipe/serving/bundle.py), the protobuf is parsed with `onnx` and
refused when it references external data (a bundle's graph never reads files outside itself), has other than one
float input (batch, C, S, S) and one float output (batch, K), or does not run on a blank input with finite logits.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

if TYPE_CHECKING:
    import onnx

COMPILED_RUNTIMES = ("none", "onnx")  # bundle_validation's `compiled_runtime`: what the bundle ships
RUNTIMES = ("torch", "onnx")  # what `BundleModel` runs forward with
COMPILED_FORMATS = ("onnx",)
ONNX_INPUT = "input"
ONNX_OUTPUT = "logits"
EXPORT_TOLERANCE = 1e-4  # max |logit difference| ORT vs torch on the export's own round trip (relative to 1 + |z|)

FloatArray = npt.NDArray[np.float32]


class CompiledError(ValueError):
    """The compiled model cannot be exported or loaded; the message says why and what to do."""


@dataclass(frozen=True)
class CompiledExport:
    """What `export_onnx` wrote: the file and the manifest entry (without ``file``, which the bundle places)."""

    path: Path
    opset: int
    exporter: str
    round_trip_max_diff: float

    def manifest_entry(self, rel: str) -> dict[str, object]:
        return {
            "format": "onnx",
            "file": rel,
            "opset": self.opset,
            "input": ONNX_INPUT,
            "output": ONNX_OUTPUT,
            "exporter": self.exporter,
        }


# ------------------------------------------------------------------------------------------------- export


def export_onnx(model: nn.Module, channels: int, size: int, num_classes: int, path: Path) -> CompiledExport:
    """Export `model` (eval mode, input (R, channels, size, size), logits (R, num_classes)) to ONNX at `path`.

    torch.onnx's dynamo exporter (torch.export, then onnxscript), first axis dynamic, one self-contained file. The
    export is checked at once: ONNX Runtime must answer the torch logits within `EXPORT_TOLERANCE` on 1 and 5 rows.
    Any failure raises `CompiledError` naming the architecture and the exporter's message; nothing is left at
    `path`."""
    name = getattr(getattr(model, "spec", None), "name", type(model).__name__)
    model.eval()
    sample = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1)
    chatter = io.StringIO()  # the exporter prints progress lines: kept out of the task log
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (sample,),
                dynamo=True,
                dynamic_shapes=({0: batch},),
                input_names=[ONNX_INPUT],
                output_names=[ONNX_OUTPUT],
                optimize=True,
                verbose=False,
            )
            if program is None:  # pragma: no cover - the dynamo exporter always returns its program
                raise CompiledError("torch.onnx.export returned no program")
            path.parent.mkdir(parents=True, exist_ok=True)
            program.save(str(path), external_data=False)
    except Exception as exc:  # the exporter raises many types (torch._dynamo, onnxscript); all mean "no export"
        path.unlink(missing_ok=True)
        root: BaseException = exc
        while root.__cause__ is not None:  # torch.onnx wraps the tracer's error: report the original one
            root = root.__cause__
        raise CompiledError(
            f"architecture {name!r} does not export to ONNX (step: {type(exc).__name__}; cause: "
            f"{type(root).__name__}: {_plain(str(root))[:400]}); build the bundle with compiled_runtime=none and "
            "serve it with --runtime torch"
        ) from exc
    data = path.read_bytes()
    try:
        member = load_onnx(data, channels, size, num_classes, where=path.name)
        worst = 0.0
        for rows in (1, 5):
            x = torch.randn(rows, channels, size, size, generator=torch.Generator().manual_seed(rows))
            with torch.no_grad():
                want = model(x).double().numpy()
            got = member.logits(x.numpy()).astype(np.float64)
            worst = max(worst, float(np.max(np.abs(got - want) / (1.0 + np.abs(want)))))
        if worst > EXPORT_TOLERANCE:
            raise CompiledError(
                f"architecture {name!r}: the ONNX export answers logits up to {worst:.2e} (relative) away from "
                f"torch's, above the tolerance {EXPORT_TOLERANCE:g}"
            )
    except CompiledError:
        path.unlink(missing_ok=True)
        raise
    opset = _default_opset(data)
    return CompiledExport(path, opset, f"torch.onnx dynamo (torch {torch.__version__})", worst)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _plain(text: str) -> str:
    """One line without terminal colours (the exporter's messages carry ANSI codes and newlines)."""
    return " ".join(_ANSI.sub("", text).split())


def _default_opset(data: bytes) -> int:
    import onnx

    proto = onnx.load_model_from_string(data)
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


# ------------------------------------------------------------------------------------------------ runtime


class _Session(Protocol):
    """The part of onnxruntime.InferenceSession used here (onnxruntime ships no type information)."""

    def run(self, output_names: list[str], input_feed: dict[str, FloatArray]) -> Sequence[object]: ...


class OnnxMember:
    """One member's ONNX Runtime session: float32 rows (R, C, S, S) in, float32 logits (R, K) out.

    `run` on an InferenceSession is thread-safe (onnxruntime docs, "Thread safety"), so the predictor's worker
    threads share one session per member, as they share the torch module."""

    def __init__(self, session: _Session, input_name: str, output_name: str, num_classes: int) -> None:
        self._session = session
        self.input_name = input_name
        self.output_name = output_name
        self.num_classes = num_classes

    def logits(self, x: npt.NDArray[np.floating]) -> FloatArray:
        rows = np.ascontiguousarray(x, dtype=np.float32)
        out = self._session.run([self.output_name], {self.input_name: rows})
        return np.asarray(out[0], dtype=np.float32)


def session_options(threads: int | None = None) -> object:
    """ONNX Runtime options: intra-op threads as torch's (`torch.get_num_threads()`, which the server sets from the
    CPU budget before loading: visionpipe/serving/runtime.py `configure_torch_threads`), one inter-op thread,
    sequential execution, all graph optimisations, no spinning of idle threads (the worker pool runs several
    sessions at once on a shared CPU budget; spinning threads would steal it from each other)."""
    import onnxruntime as ort  # type: ignore[import-untyped]  # onnxruntime ships no type information

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads if threads is not None else int(torch.get_num_threads()))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    # onnxruntime/core/session/onnxruntime_session_options_config_keys.h kOrtSessionOptionsConfigAllowIntraOpSpinning
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def load_onnx(
    data: bytes, channels: int, size: int, num_classes: int, *, where: str = "model.onnx", threads: int | None = None
) -> OnnxMember:
    """A checked ONNX Runtime session for ONNX bytes (already checksummed by the caller); `CompiledError` names
    what is wrong: not ONNX, external data, the wrong input / output signature, a failing or non-finite forward."""
    import onnx
    import onnxruntime as ort  # untyped: see session_options

    try:
        proto = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX model
        raise CompiledError(f"{where}: not an ONNX model ({type(exc).__name__}: {str(exc)[:200]})") from exc
    external = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise CompiledError(f"{where}: tensors {external[:3]} live in external files; a bundle's graph is one file")
    graph_inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    if len(graph_inputs) != 1 or len(proto.graph.output) != 1:
        raise CompiledError(
            f"{where}: the graph has {len(graph_inputs)} input(s) and {len(proto.graph.output)} output(s); a "
            "compiled member takes one input (batch, C, S, S) and answers one output (batch, K)"
        )
    want_in = [None, channels, size, size]
    _check_value_info(graph_inputs[0], want_in, where, "input")
    _check_value_info(proto.graph.output[0], [None, num_classes], where, "output")
    try:
        session = ort.InferenceSession(data, sess_options=session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / NotImplemented types
        raise CompiledError(f"{where}: ONNX Runtime cannot load it ({type(exc).__name__}: {str(exc)[:300]})") from exc
    member = OnnxMember(session, graph_inputs[0].name, proto.graph.output[0].name, num_classes)
    try:
        out = member.logits(np.zeros((1, channels, size, size), dtype=np.float32))
    except Exception as exc:
        raise CompiledError(f"{where}: a forward pass on a blank input failed ({type(exc).__name__}: {exc})") from exc
    if out.shape != (1, num_classes):
        raise CompiledError(f"{where}: answers {out.shape} for one blank row, not (1, {num_classes})")
    if not np.isfinite(out).all():
        raise CompiledError(f"{where}: a forward pass on a blank input gives non-finite logits {out.tolist()}")
    return member


def _check_value_info(info: onnx.ValueInfoProto, want: list[int | None], where: str, role: str) -> None:
    """A graph input / output must be float32 with the wanted dims (None: a dynamic batch axis)."""
    from onnx import TensorProto

    tensor = info.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    name = info.name
    if tensor.elem_type != TensorProto.FLOAT:
        raise CompiledError(f"{where}: {role} {name!r} is not float32 (ONNX elem_type {tensor.elem_type})")
    shown = ["batch" if w is None else w for w in want]
    if len(dims) != len(want) or any(w is not None and d != w for d, w in zip(dims, want, strict=True)):
        raise CompiledError(f"{where}: {role} {name!r} has shape {dims}; the bundle needs {shown}")
    if dims[0] is not None:
        raise CompiledError(f"{where}: {role} {name!r} has a fixed batch of {dims[0]}; the batch axis must be dynamic")
