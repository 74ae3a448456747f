"""The KServe predictor: serves one bundle (or an ensemble of bundles) over v1 and v2 (REST and gRPC).

Hooks follow KServe's `kserve.Model`: `load` verifies every bundle and sets `ready` only then;
`preprocess` decodes the request into uint8 images and the shared preprocessing (a bundle with multi-view
inference: each image's global view + tiles, cut at the decoded resolution; visionpipe/serving/views.py);
`predict` runs the models (with optional test-time augmentation), aggregates the views, then the calibrator and
the decision policy; `postprocess` shapes the
v1 or v2 answer. Bad inputs raise `kserve.errors.InvalidInput` with a named code (HTTP 400), so the server
keeps serving. Work is bounded before it is done: the image count, every image header (sides, pixels) or
pixel-tensor shape, and the request's total pixels are checked before anything is decoded
(visionpipe/serving/limits.py),
and decoding and inference run on the process's worker pool (visionpipe/serving/runtime.py), off the event loop.
With micro-batching on (`ServeConfig.max_batch_size` > 1, the default; visionpipe/serving/batching.py), `predict`
queues the decoded request and concurrent requests, REST v1 / v2 and gRPC alike, share one forward pass
(`infer_many`); each still gets exactly its own answers and its own errors.

Requests:
  v1  ``{"instances": [ {"b64": "<base64 image>"} | "<base64 image>" | [[pixel rows]] (H,W) or (H,W,C) ]}``
  v2  exactly one input, in one of three forms; model metadata lists each form as its own named tensor
      (`INPUT_IMAGE`, `INPUT_PIXELS`, `INPUT_PIXELS_UINT8`), but the names are advisory: the datatype picks
      the form, and a request carries one of them, never several.
        BYTES ``[N]``: encoded images (PNG, JPEG, ...). Over REST JSON each element is a base64 string; with
          the binary tensor extension (REST) and over gRPC each element is the raw file bytes (base64 text
          is accepted there too).
        FP32 (or FP64) / UINT8 ``[N,H,W,C]`` or ``[N,H,W]``: pixel intensities 0..255; metadata gives the
          bundle's H = W = preprocessing size and C = channels, other sizes are resized like uploads.
  Requested `outputs` are honoured (only those, in the requested order; an unknown name is a 400 /
  INVALID_ARGUMENT naming the available ones) and, over REST, so is each output's `binary_data` parameter
  (default: the request's `binary_data_output` parameter, else JSON). gRPC answers carry raw contents.
Each answer holds the label (-1 when the policy abstains), the class name, the calibrated probabilities, the
confidence, the decision (class, or abstain with the prediction set), the policy used and the bundle version;
v2 carries them as the tensors `label`, `probabilities`, `confidence`, `abstain` and `result` (the JSON record).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import functools
import json
import math
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, TypedDict

import kserve
import numpy as np
import numpy.typing as npt
import torch
from kserve.errors import InvalidInput
from kserve.model import InferenceVerb
from kserve.protocol.infer_type import InferInput, InferOutput, InferRequest, InferResponse, RequestedOutput
from PIL import Image

from visionpipe.serving.batching import (
    BatchingConfig,
    BatchingConfigError,
    MicroBatcher,
    batch_metrics,
    resolve_batching,
)
from visionpipe.serving.bundle import BundleError, BundleModel, read_bundle
from visionpipe.serving.compiled import RUNTIMES
from visionpipe.serving.event_logger import EventLogger
from visionpipe.serving.hard_examples import HardExampleLogger
from visionpipe.serving.limits import DEFAULT_MAX_BATCH, DEFAULT_MAX_REQUEST_PIXELS
from visionpipe.serving.policies import ABSTAIN, apply_policy
from visionpipe.serving.runtime import WorkerPool, default_pool
from visionpipe.serving.tta import TTA_MODES, average_tta, tta_batch
from visionpipe.serving.upload import (
    InputError,
    InputLimits,
    NotAnImageError,
    decode_to_array,
    load_image,
    open_image,
)
from visionpipe.serving.views import model_input, views_per_image
from visionpipe.specs import PreprocessSpec

Protocol = Literal["v1", "v2"]
UInt8Image = npt.NDArray[np.uint8]
FloatArray = npt.NDArray[np.float64]


class EnsembleError(BundleError):
    reason = "ensemble_mismatch"


class BatchingFieldError(BundleError):
    reason = "bad_batching"


class RequestRefused(InvalidInput):  # type: ignore[misc]  # kserve ships no type information
    """A named 400 (gRPC INVALID_ARGUMENT) for one request; its message starts with the code.

    KServe answers InvalidInput with 400 (kserve/errors.py invalid_input_handler, kserve/protocol/grpc/
    interceptors.py); visionpipe/serving/server_util.py logs it as one line with the model and the request id."""

    def __init__(self, reason: str, model: str, request_id: str | None = None) -> None:
        super().__init__(reason)
        self.model = model
        self.request_id = request_id

    @property
    def code(self) -> str:
        return str(self.reason).split(":", 1)[0]


class TensorMetadata(TypedDict):
    """One `$metadata_tensor` of the Open Inference Protocol model metadata: name, datatype, shape (-1 = any)."""

    name: str
    datatype: str
    shape: list[int]


INPUT_IMAGE = "image"  # BYTES [-1]: encoded images
INPUT_PIXELS = "pixels"  # FP32 [-1, H, W, C]: pixel intensities 0..255
INPUT_PIXELS_UINT8 = "pixels_uint8"  # UINT8 [-1, H, W, C]
# Every v2 output tensor, in the default answer order, with its datatype (metadata and answers share this table).
OUTPUT_DATATYPES: dict[str, str] = {
    "label": "INT64",
    "probabilities": "FP32",
    "confidence": "FP32",
    "abstain": "BOOL",
    "result": "BYTES",
}
PIXEL_DTYPES: dict[str, type[np.generic]] = {"FP32": np.float32, "FP64": np.float64, "UINT8": np.uint8}


@dataclass(frozen=True)
class OutputRequest:
    """One output tensor to answer with, and whether it travels as binary data (REST binary tensor extension)."""

    name: str
    binary: bool = False


DEFAULT_OUTPUTS = tuple(OutputRequest(name) for name in OUTPUT_DATATYPES)
# Below this per-image forward cost (ms) micro-batches run one at a time unless a flag says otherwise
# (`_auto_concurrency`): digits measures ~2 ms, roadwork-effnet-lite0 ~30 ms on the bench machine.
AUTO_CONCURRENT_FORWARD_MS = 10.0


@dataclass(frozen=True)
class ServeConfig:
    """Serving options: TTA mode, per-image input limits, images and total pixels per request, micro-batching.

    max_batch_size / max_batch_wait_ms: the micro-batching limits (visionpipe/serving/batching.py); None takes the
    bundle's ``serving.batching`` field, else the measured default; max_batch_size 0 or 1 turns batching off.
    max_concurrent_batches: forward passes running at once (None: chosen at load, `_auto_concurrency`: one at a
    time for a model whose forward pass costs under AUTO_CONCURRENT_FORWARD_MS per image, else one per pool worker).
    runtime: ``torch``, or ``onnx`` to run each member's compiled/member-<i>.onnx with ONNX Runtime (the bundle must
    ship it: bundle_validation's ``compiled_runtime=onnx``, checked there for decision parity)."""

    tta: str = "off"
    limits: InputLimits = field(default_factory=InputLimits)
    max_batch: int = DEFAULT_MAX_BATCH
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS
    allow_unsigned: bool = False  # accept unsigned / untrusted-key bundles (a bad signature is always refused)
    max_batch_size: int | None = None
    max_batch_wait_ms: float | None = None
    max_concurrent_batches: int | None = None
    runtime: str = "torch"

    def __post_init__(self) -> None:
        if self.tta not in TTA_MODES:
            raise ValueError(f"tta={self.tta!r} is not one of {', '.join(TTA_MODES)}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime={self.runtime!r} is not one of {', '.join(RUNTIMES)}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch={self.max_batch} must be >= 1")
        if self.max_request_pixels < 1:
            raise ValueError(f"max_request_pixels={self.max_request_pixels} must be >= 1")
        resolve_batching(self.max_batch_size, self.max_batch_wait_ms, {}, self.max_concurrent_batches)  # checked


@dataclass(frozen=True)
class Batch:
    """A decoded request: the model input and how to answer.

    x: the model input, `views` rows per image (1, or the global view + tiles of a bundle with views).
    images: the decoded uint8 HxWxC images, kept only when hard examples are logged (else empty)."""

    x: torch.Tensor
    protocol: Protocol
    request_id: str | None = None
    binary: bool = False  # v2 over gRPC: answer with raw tensor contents
    outputs: tuple[OutputRequest, ...] = DEFAULT_OUTPUTS  # v2: the tensors to answer with, in this order
    images: list[UInt8Image] = field(default_factory=list)
    views: int = 1

    def __len__(self) -> int:
        """The number of images."""
        return int(self.x.shape[0]) // self.views


@dataclass(frozen=True)
class _Pending:
    """One image of a request: checked (header or shape), not yet decoded."""

    pixels: int
    load: Callable[[], UInt8Image]


class _LazyArray:
    """Checked JSON pixel values, converted to float64 once, when the first of their images is decoded."""

    def __init__(self, values: list[object], shape: list[int], where: str) -> None:
        self.values, self.shape, self.where = values, shape, where
        self._array: FloatArray | None = None

    def get(self) -> FloatArray:
        if self._array is None:
            self._array = _as_float(self.values, self.where).reshape(self.shape)
        return self._array


@dataclass(frozen=True)
class Answers:
    batch: Batch
    raw: FloatArray
    calibrated: FloatArray
    labels: npt.NDArray[np.int64]
    policies: list[str]
    sets: list[list[int]]


class VisionPredictor(kserve.Model):  # type: ignore[misc]  # kserve ships no type information
    """A kserve.Model over one bundle, or an ensemble of bundles with one preprocessing signature."""

    def __init__(
        self,
        name: str,
        bundle_uris: Sequence[str],
        config: ServeConfig | None = None,
        hard_examples: HardExampleLogger | None = None,
        pool: WorkerPool | None = None,
        event_logger: EventLogger | None = None,
    ) -> None:
        super().__init__(name)
        self.hard_examples = hard_examples
        self.event_logger = event_logger  # KServe-format CloudEvents of every call (visionpipe/serving/event_logger.py)
        self.pool = pool or default_pool()  # shared by every model of the process: one CPU budget
        if not bundle_uris:
            raise ValueError("at least one bundle URI is needed")
        self.bundle_uris = list(bundle_uris)
        self.config = config or ServeConfig()
        self.runtimes: list[BundleModel] = []
        self.batching = BatchingConfig(0, source="not loaded")
        self.batcher: MicroBatcher[Batch, Answers] | None = None
        self.ready = False

    # ----------------------------------------------------------------------------------------- load
    def load(self) -> bool:
        """Verify every bundle (fail closed) and build its models; `ready` only once all verified.

        The micro-batching limits: the flags (`ServeConfig`) over the first bundle's ``serving.batching`` over
        the defaults; a bad bundle field is refused (`BatchingFieldError`) before any model is built."""
        config = self.config
        bundles = [read_bundle(uri, allow_unsigned=config.allow_unsigned) for uri in self.bundle_uris]
        first = bundles[0]
        try:
            batching = resolve_batching(
                config.max_batch_size, config.max_batch_wait_ms, first.manifest, config.max_concurrent_batches
            )
        except BatchingConfigError as exc:
            raise BatchingFieldError(f"bundle {first.name} {first.version}: {exc}") from None
        runtimes = [BundleModel(bundle, runtime=config.runtime) for bundle in bundles]
        check_ensemble(runtimes)
        self.runtimes = runtimes
        if batching.enabled and batching.max_concurrent is None:
            batching = self._auto_concurrency(batching)
        self.batching = batching
        self.batcher = (
            MicroBatcher(self.pool, self.infer_many, len, batching, self.name, batch_metrics())
            if batching.enabled
            else None
        )
        self.ready = True
        return self.ready

    def _auto_concurrency(self, batching: BatchingConfig) -> BatchingConfig:
        """No flag set how many forward passes run at once: choose by what one image costs here. A model whose
        forward pass is cheap next to the Python work of a request (digits: ~2 ms against ~4-5 ms of event loop
        and decoding, which hold the GIL) gains nothing from two forwards at once and loses batch size: one batch
        at a time (c32: 373 against 136 req/s). A costly forward pass (roadwork: ~30 ms, which torch runs outside
        the GIL) keeps one per pool worker, so the cores work in parallel (c32: 27 against 13 req/s). Measured by
        bench/serve.py, docs/throughput.md; the median of 3 timed images after one warm-up."""
        spec = self.preprocess_spec
        # a seeded noise image: a blank one has no digit for a digit-upload spec (upload.py refuses it)
        probe = np.random.default_rng(0).integers(0, 256, (1, spec.size, spec.size, spec.channels), dtype=np.uint8)
        times = []
        for i in range(4):
            started = time.perf_counter()
            self.primary.predict_images(probe)
            if i:
                times.append((time.perf_counter() - started) * 1000.0)
        per_image_ms = sorted(times)[1]
        source = f"{batching.source}+auto({per_image_ms:.1f} ms/image)"
        concurrent = None if per_image_ms >= AUTO_CONCURRENT_FORWARD_MS else 1
        return dataclasses.replace(batching, max_concurrent=concurrent, source=source)

    @property
    def primary(self) -> BundleModel:
        return self.runtimes[0]

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        return self.primary.bundle.preprocess

    # ------------------------------------------------------------------------------------ model metadata
    # KServe's DataPlane.model_metadata (kserve/protocol/dataplane.py) answers `GET /v2/models/{name}` and
    # gRPC ModelMetadata (kserve/protocol/grpc/servicer.py) with these two hooks of InferenceModel
    # (kserve/model.py, `get_input_types` / `get_output_types`, `[]` by default).
    def get_input_types(self) -> list[TensorMetadata]:
        """The accepted input forms, one named tensor each (a request sends exactly one of them)."""
        if not self.runtimes:
            return []
        spec = self.preprocess_spec
        pixels = [-1, spec.size, spec.size, spec.channels]
        return [
            TensorMetadata(name=INPUT_IMAGE, datatype="BYTES", shape=[-1]),
            TensorMetadata(name=INPUT_PIXELS, datatype="FP32", shape=pixels),
            TensorMetadata(name=INPUT_PIXELS_UINT8, datatype="UINT8", shape=list(pixels)),
        ]

    def get_output_types(self) -> list[TensorMetadata]:
        """Every output tensor a v2 answer carries (`_v2_response`), -1 being the batch dimension."""
        if not self.runtimes:
            return []
        n_classes = len(self.primary.bundle.classes)
        return [
            TensorMetadata(name=name, datatype=dtype, shape=[-1, n_classes] if name == "probabilities" else [-1])
            for name, dtype in OUTPUT_DATATYPES.items()
        ]

    # ------------------------------------------------------------------------------------ KServe hooks
    # KServe's Model.__call__ (kserve/model.py) awaits preprocess -> predict -> postprocess in the request's
    # task, called by DataPlane.infer (kserve/protocol/dataplane.py) for REST v1, REST v2 and gRPC alike.
    # Here the request is admitted to the worker pool first (or refused with 503 / UNAVAILABLE), and the
    # heavy hooks run on its threads, so the event loop keeps answering health and readiness checks. With an
    # event logger, the call's request and answer are queued as CloudEvents (never blocking, never raising);
    # the time from arrival to answer, admission included, is the response event's server-side latency.
    async def __call__(
        self,
        body: dict[str, object] | InferRequest,
        headers: dict[str, str] | None = None,
        verb: InferenceVerb = InferenceVerb.PREDICT,
    ) -> tuple[object, dict[str, str]]:
        logger = self.event_logger
        grpc = isinstance(body, InferRequest) and bool(body.from_grpc)
        call = logger.start(body, headers) if logger is not None and logger.wants(grpc) else None
        async with self.pool.admit():
            result: tuple[object, dict[str, str]] = await super().__call__(body, headers, verb)
        if call is not None:  # only answered calls log a response, as KServe's agent (pkg/logger/handler.go)
            call.done(result[0])
        return result

    async def preprocess(
        self, payload: dict[str, object] | InferRequest, headers: dict[str, str] | None = None
    ) -> Batch:
        """`decode` on a worker thread."""
        return await self.pool.run(lambda: self.decode(payload, headers))

    async def predict(self, payload: Batch, headers: dict[str, str] | None = None) -> Answers:
        """`infer` on a worker thread; with micro-batching, through the batcher (one forward pass shared with
        concurrent requests, `infer_many`)."""
        if self.batcher is not None:
            return await self.batcher.submit(payload)
        return await self.pool.run(lambda: self.infer(payload))

    async def postprocess(
        self, result: Answers, headers: dict[str, str] | None = None, response_headers: dict[str, str] | None = None
    ) -> dict[str, object] | InferResponse:
        records = self.records(result)
        if self.hard_examples is not None:  # never raises; uploads happen on a background thread
            self.hard_examples.records_to_log(
                records, result.batch.images, when=datetime.now(UTC), request_id=result.batch.request_id
            )
        if result.batch.protocol == "v1":
            return {"predictions": records}
        return self._v2_response(result, records)

    # ------------------------------------------------------------------------------------------- core
    def decode(self, payload: dict[str, object] | InferRequest, headers: dict[str, str] | None = None) -> Batch:
        """A request -> model input, every limit checked before the work it bounds (synchronous).

        First the whole request is checked without decoding anything: the number of images (before looking
        at any of them), each image's header (format, sides, pixels) or each pixel tensor's shape and values,
        and the request's total pixel count. Only then is each image decoded and turned into model input,
        one at a time (the full-size pixels are kept only for hard-example logging). A refusal is a
        `RequestRefused` (HTTP 400 / INVALID_ARGUMENT) whose message starts with its code."""
        request_id: str | None = None  # the v2 request's own id, echoed in the answer
        try:
            if isinstance(payload, InferRequest):
                request_id = payload.id or None
                outputs = self.requested_outputs(payload)  # checked before any image is decoded
                pending = self._plan_v2(payload)
                protocol: Protocol = "v2"
                binary = bool(payload.from_grpc)
            elif isinstance(payload, dict):
                outputs, protocol, binary = DEFAULT_OUTPUTS, "v1", False
                pending = self._plan_v1(payload)
            else:
                raise InvalidInput(f"bad_request: unsupported payload type {type(payload).__name__}")
            total = sum(p.pixels for p in pending)
            if total > self.config.max_request_pixels:
                raise InvalidInput(
                    f"request_too_many_pixels: the request's images hold {total} pixels; the limit is "
                    f"{self.config.max_request_pixels}"
                )
            x, images = self._materialise(pending)
        except RequestRefused:
            raise
        except InvalidInput as exc:
            log_id = request_id or (headers or {}).get("x-request-id")
            raise RequestRefused(str(exc), self.name, log_id) from None
        views = views_per_image(self.preprocess_spec)
        return Batch(x, protocol, request_id, binary=binary, outputs=outputs, images=images, views=views)

    def infer(self, batch: Batch) -> Answers:
        """Model input -> calibrated probabilities and decisions (synchronous)."""
        with torch.inference_mode():
            raw, calibrated = self.probabilities(batch.x)
        decisions = apply_policy(self.primary.bundle.policy, calibrated, raw)
        return Answers(batch, raw, calibrated, decisions.labels, decisions.policy_names, decisions.prediction_sets)

    def infer_many(self, batches: Sequence[Batch]) -> list[Answers]:
        """Several decoded requests -> one forward pass over all their images -> each request's own answers, the
        same as `infer` on each alone (every step after the forward is per image: TTA averaging, view
        aggregation, calibrator, policy). Requests keep their own `Batch` (id, protocol, outputs, images)."""
        if len(batches) == 1:
            return [self.infer(batches[0])]
        merged = Batch(torch.cat([b.x for b in batches]), "v2", views=batches[0].views)
        whole = self.infer(merged)
        out: list[Answers] = []
        start = 0
        for b in batches:
            end = start + len(b)
            rows = slice(start, end)
            out.append(
                Answers(b, whole.raw[rows], whole.calibrated[rows], whole.labels[rows], whole.policies[rows],
                        whole.sets[rows])
            )  # fmt: skip
            start = end
        return out

    def probabilities(self, x: torch.Tensor) -> tuple[FloatArray, FloatArray]:
        """(raw, calibrated) probabilities: members' softmax averaged over TTA variants, views aggregated
        (`BundleModel.aggregate`, the step `BundleModel.predict_images` takes), then averaged over bundles."""
        raws, cals = [], []
        for runtime in self.runtimes:
            raw, calibrated = runtime.probabilities(self._log_probs_tta(runtime, x))
            raws.append(raw)
            cals.append(calibrated)
        return np.mean(raws, axis=0), np.mean(cals, axis=0)

    def _log_probs_tta(self, runtime: BundleModel, x: torch.Tensor) -> FloatArray:
        """One row of log-probabilities per image: per input row (each view) averaged over the TTA variants,
        then the views aggregated (identity without views)."""
        mode = self.config.tta
        if mode == "off":
            return runtime.aggregate(runtime.log_probs(x))
        fill = float((0.0 - self.preprocess_spec.mean[0]) / self.preprocess_spec.std[0])
        variants = tta_batch(x, mode, fill)
        probs = torch.from_numpy(np.exp(runtime.log_probs(variants)))
        averaged = average_tta(probs, len(x), mode)
        return runtime.aggregate(np.asarray(torch.log(averaged.clamp_min(1e-300)).numpy(), dtype=np.float64))

    def records(self, result: Answers) -> list[dict[str, object]]:
        bundle = self.primary.bundle
        names = bundle.classes
        out = []
        for i, label in enumerate(result.labels.tolist()):
            abstain = label == ABSTAIN
            prediction_set = [names[k] for k in result.sets[i]]
            out.append(
                {
                    "label": int(label),
                    "class_name": None if abstain else names[label],
                    "probabilities": {n: round(float(p), 6) for n, p in zip(names, result.calibrated[i], strict=True)},
                    "confidence": round(float(result.calibrated[i].max()), 6),
                    "decision": {
                        "abstain": abstain,
                        "class": None if abstain else names[label],
                        "prediction_set": prediction_set,
                    },
                    "policy": result.policies[i],
                    "bundle_version": bundle.version if len(self.runtimes) == 1 else self.ensemble_version,
                }
            )
        return out

    @property
    def ensemble_version(self) -> str:
        return "+".join(r.bundle.version for r in self.runtimes)

    # ---------------------------------------------------------------------------------------- decoding
    def _check_count(self, count: int) -> None:
        """Refuse an empty or oversized batch before looking at any of its images."""
        if count == 0:
            raise InvalidInput("empty_batch: the request holds no images")
        if count > self.config.max_batch:
            raise InvalidInput(f"batch_too_large: {count} images; the limit is {self.config.max_batch}")

    def _plan_v1(self, payload: dict[str, object]) -> list[_Pending]:
        instances = payload.get("instances")
        if not isinstance(instances, list):
            raise InvalidInput('bad_request: v1 requests need "instances": a list of images')
        self._check_count(len(instances))
        out = []
        for i, item in enumerate(instances):
            with _named(i):
                if isinstance(item, dict) and "b64" in item:
                    out.append(self._plan_encoded(_b64(item["b64"], i)))
                elif isinstance(item, str):
                    out.append(self._plan_encoded(_b64(item, i)))
                elif isinstance(item, list):
                    out.append(self._plan_pixel_list(item, i))
                elif item is None:
                    raise InvalidInput(f"null_value: instance {i} is null")
                else:
                    raise InvalidInput(f"bad_instance: instance {i} is neither a base64 image nor a pixel array")
        return out

    def requested_outputs(self, request: InferRequest) -> tuple[OutputRequest, ...]:
        """The request's `outputs` (names checked, order kept), or every output when it names none.

        Over REST an output travels as binary data when its `parameters.binary_data` says so, else when the
        request's `parameters.binary_data_output` does (the binary tensor extension); gRPC answers always
        use raw contents, which the protocol requires for all outputs or none.
        """
        grpc = bool(request.from_grpc)
        default_binary = grpc or _flag(request.parameters, "binary_data_output", "the request")
        asked: list[RequestedOutput] = list(request.request_outputs or [])
        if not asked:
            return tuple(OutputRequest(name, default_binary) for name in OUTPUT_DATATYPES)
        chosen: list[OutputRequest] = []
        for item in asked:
            name = item.name
            if name not in OUTPUT_DATATYPES:
                raise InvalidInput(
                    f"unknown_output: model {self.name} has no output {name!r}; "
                    f"its outputs are {', '.join(OUTPUT_DATATYPES)}"
                )
            if any(c.name == name for c in chosen):
                raise InvalidInput(f"bad_request: output {name!r} is requested twice")
            binary = grpc or _flag(item.parameters, "binary_data", f"output {name!r}", default_binary)
            chosen.append(OutputRequest(name, binary))
        return tuple(chosen)

    def _plan_v2(self, request: InferRequest) -> list[_Pending]:
        if len(request.inputs) != 1:
            raise InvalidInput(
                f"bad_request: expected one input ({INPUT_IMAGE}, {INPUT_PIXELS} or {INPUT_PIXELS_UINT8}), "
                f"got {len(request.inputs)}"
            )
        inp: InferInput = request.inputs[0]
        shape = _shape(inp.shape)
        # Raw contents: gRPC raw_input_contents, or REST binary tensor extension (visionpipe/serving/server_util.py).
        raw: bytes | None = None if inp._raw_data is None else bytes(inp._raw_data)
        if inp.datatype == "BYTES":
            if raw is not None:
                items: list[object] = list(split_bytes_tensor(raw, self.config.max_batch))
                if math.prod(shape) != len(items):
                    raise InvalidInput(f"wrong_shape: BYTES tensor shape {shape} but {len(items)} elements")
            else:
                items = _tensor_values(inp.data, shape, f"BYTES tensor {inp.name!r}")
            self._check_count(len(items))
            out = []
            for i, item in enumerate(items):
                with _named(i):
                    out.append(self._plan_element(item, i))
            return out
        if inp.datatype in PIXEL_DTYPES:
            return self._plan_pixel_tensor(inp, shape, raw)
        raise InvalidInput(f"wrong_dtype: datatype {inp.datatype}; use BYTES (encoded images) or FP32 / UINT8 pixels")

    def _plan_pixel_tensor(self, inp: InferInput, shape: list[int], raw: bytes | None) -> list[_Pending]:
        """A v2 pixel tensor [N,H,W] or [N,H,W,C]: shape, size and values checked, conversion deferred."""
        if len(shape) not in (3, 4):
            raise InvalidInput(f"wrong_shape: tensor shape {shape}; expected [N,H,W] or [N,H,W,C]")
        self._check_count(shape[0])
        self._check_pixel_shape(shape[1:], f"tensor {inp.name!r}")
        count = math.prod(shape)
        dtype = np.dtype(PIXEL_DTYPES[inp.datatype])
        if raw is not None:
            if len(raw) != count * dtype.itemsize:
                raise InvalidInput(
                    f"wrong_shape: {inp.datatype} tensor shape {shape} needs {count * dtype.itemsize} bytes of "
                    f"binary data, got {len(raw)}"
                )
            array: npt.NDArray[np.generic] | _LazyArray = np.frombuffer(raw, dtype=dtype).reshape(shape)  # no copy
        else:
            values = _tensor_values(inp.data, shape, f"tensor {inp.name!r}")
            _check_pixel_values(values, f"tensor {inp.name!r}", integers=inp.datatype == "UINT8")
            array = _LazyArray(values, shape, f"tensor {inp.name!r}")  # converted when the first image loads
        pixels = shape[1] * shape[2]
        return [_Pending(pixels, functools.partial(self._from_pixels, array, i)) for i in range(shape[0])]

    def _plan_pixel_list(self, item: list[object], index: int) -> _Pending:
        """A v1 pixel array (H,W) or (H,W,C) as nested lists: nesting, size and values checked first."""
        shape = _nested_shape(item)
        if len(shape) not in (2, 3):
            raise InvalidInput(
                f"wrong_shape: instance {index} is nested {len(shape)} deep; expected (H,W) or (H,W,C) pixel rows"
            )
        self._check_pixel_shape(shape, f"instance {index}")
        values = _tensor_values(item, shape, f"instance {index}")
        _check_pixel_values(values, f"instance {index}", integers=False)
        array = _LazyArray(values, [1, *shape], f"instance {index}")
        return _Pending(shape[0] * shape[1], functools.partial(self._from_pixels, array, 0))

    def _check_pixel_shape(self, dims: list[int], where: str) -> None:
        """(H, W) or (H, W, C) of one image: sides >= 1, C 1 or 3, longest side and pixels within limits."""
        height, width = dims[0], dims[1]
        channels = dims[2] if len(dims) == 3 else 1
        if height < 1 or width < 1 or channels not in (1, 3):
            raise InvalidInput(f"wrong_shape: {where} has shape {dims}; expected (H,W) or (H,W,C) with C 1 or 3")
        limits = self.config.limits
        if max(height, width) > limits.max_side or height * width > limits.max_pixels:
            raise InvalidInput(
                f"image_too_large: {where} is {width}x{height} pixels; the longest side may be {limits.max_side} "
                f"and the pixels {limits.max_pixels}"
            )

    def _plan_element(self, item: object, index: int) -> _Pending:
        """One BYTES element: raw image bytes (gRPC, REST binary data), or base64 text (JSON, or as bytes)."""
        if not isinstance(item, bytes):
            return self._plan_encoded(_b64(item, index))
        try:
            return self._plan_encoded(item)
        except NotAnImageError:
            try:
                decoded = base64.b64decode(item, validate=True)
            except (binascii.Error, ValueError):
                decoded = b""
            if not decoded:
                raise
            return self._plan_encoded(decoded)

    def _plan_encoded(self, data: bytes) -> _Pending:
        """An encoded image: header read and checked now (PIL `Image.open` reads only the header), pixels later."""
        image = open_image(data, self.config.limits)
        width, height = image.size
        return _Pending(width * height, functools.partial(self._load_encoded, image))

    def _load_encoded(self, image: Image.Image) -> UInt8Image:
        return image_to_array(load_image(image), self.preprocess_spec)

    def _materialise(self, pending: Sequence[_Pending]) -> tuple[torch.Tensor, list[UInt8Image]]:
        """Decode the checked images one at a time, each straight into model input (with views: its global view
        and tiles, cut from the decoded image at its own resolution; visionpipe/serving/views.py)."""
        rows: list[torch.Tensor] = []
        images: list[UInt8Image] = []
        keep = self.hard_examples is not None
        with torch.inference_mode():
            for i, item in enumerate(pending):
                with _named(i):
                    image = item.load()
                    rows.append(model_input(image[None], self.preprocess_spec))
                if keep:
                    images.append(image)
        return torch.cat(rows), images

    def _from_pixels(self, array: npt.NDArray[np.generic] | _LazyArray, index: int) -> UInt8Image:
        """Image `index` of a checked pixel array (N,H,W) or (N,H,W,C) -> uint8 HxWxC."""
        batch = array.get() if isinstance(array, _LazyArray) else array
        image = np.asarray(batch[index], dtype=np.float64)
        if image.ndim == 2:
            image = image[..., None]
        if not np.isfinite(image).all():
            raise InvalidInput(f"non_finite: image {index} holds NaN or infinite values")
        if image.min() < 0 or image.max() > 255:
            raise InvalidInput(f"out_of_range: image {index} has pixels outside 0..255")
        return np.rint(image).astype(np.uint8)

    def _v2_response(self, result: Answers, records: list[dict[str, object]]) -> InferResponse:
        tensors: dict[str, npt.NDArray[np.generic]] = {
            "label": result.labels.astype(np.int64),
            "probabilities": result.calibrated.astype(np.float32),
            "confidence": result.calibrated.max(axis=1).astype(np.float32),
            "abstain": result.labels == ABSTAIN,
            "result": np.array([json.dumps(r, sort_keys=True).encode() for r in records], dtype=np.object_),
        }
        wanted = result.batch.outputs
        # InferResponse.to_rest (kserve/protocol/infer_type.py) walks `requested_outputs` in order and sends
        # each one as binary data when its `binary_data` parameter is true; to_grpc sends numpy data raw.
        outputs = [
            InferOutput(o.name, list(tensors[o.name].shape), OUTPUT_DATATYPES[o.name], data=tensors[o.name])
            for o in wanted
        ]
        return InferResponse(
            response_id=result.batch.request_id or "",
            model_name=self.name,
            infer_outputs=outputs,
            parameters={"bundle_version": str(records[0]["bundle_version"])} if records else None,
            requested_outputs=[RequestedOutput(o.name, {"binary_data": o.binary}) for o in wanted],
        )


def image_to_array(image: Image.Image, spec: PreprocessSpec) -> UInt8Image:
    """A decoded upload -> the uint8 HxWxC array the shared preprocessing takes (orientation, alpha, colour):
    the one decoding rule data_fetch applies to training images too (visionpipe/serving/upload.py)."""
    return decode_to_array(image, spec.channels, spec.kind)


def check_ensemble(runtimes: Sequence[BundleModel]) -> None:
    """Ensemble members must share the preprocessing signature and the classes; refused otherwise."""
    first = runtimes[0].bundle
    for other in runtimes[1:]:
        b = other.bundle
        if b.signature != first.signature:
            raise EnsembleError(
                f"bundle {b.name} {b.version} has preprocessing {b.signature!r}, but {first.name} {first.version} "
                f"has {first.signature!r}: an ensemble needs one preprocessing"
            )
        if b.classes != first.classes:
            raise EnsembleError(
                f"bundle {b.name} {b.version} has classes {b.classes}, but the first has {first.classes}"
            )


def _b64(value: object, index: int) -> bytes:
    if value is None:
        raise InvalidInput(f"null_value: image {index} is null")
    if not isinstance(value, str):
        raise InvalidInput(f"bad_base64: image {index} is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"bad_base64: image {index} is not valid base64") from exc


@contextlib.contextmanager
def _named(index: int) -> Iterator[None]:
    """An `InputError` of upload.py (not_an_image, image_too_large, ...) -> its named 400, with the image index."""
    try:
        yield
    except InputError as exc:
        raise InvalidInput(f"{exc.code}: image {index}: {exc}") from None


def split_bytes_tensor(raw: bytes, max_elements: int) -> list[bytes]:
    """A BYTES tensor's binary data -> its elements, checked: each element is a 4-byte little-endian length
    followed by that many bytes (Triton's binary tensor data extension, which KServe adopts:
    https://docs.nvidia.com/deeplearning/triton-inference-server/user-guide/docs/protocol/extension_binary_data.html
    and https://kserve.github.io/website/docs/concepts/architecture/data-plane/v2-protocol/binary-tensor-data-extension).

    KServe's own `deserialize_bytes_tensor` raises struct.error (a 500) on a short or lying prefix; this one
    raises a named 400 instead, and stops after `max_elements` + 1 elements.
    """
    out: list[bytes] = []
    offset, size = 0, len(raw)
    while offset < size:  # every pass consumes at least the 4-byte prefix
        if len(out) > max_elements:
            raise InvalidInput(f"batch_too_large: the BYTES tensor holds more than {max_elements} elements")
        if size - offset < 4:
            raise InvalidInput(
                f"bad_binary: BYTES element {len(out)} starts at byte {offset} of {size}: too short for its "
                "4-byte length prefix"
            )
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if length > size - offset:
            raise InvalidInput(
                f"bad_binary: BYTES element {len(out)} declares {length} bytes but only {size - offset} remain"
            )
        out.append(raw[offset : offset + length])
        offset += length
    return out


def _flag(parameters: object, key: str, where: str, default: bool = False) -> bool:
    if not isinstance(parameters, dict) or key not in parameters:
        return default
    value = parameters[key]
    if not isinstance(value, bool):
        raise InvalidInput(f"bad_request: parameter {key} of {where} must be true or false, got {value!r}")
    return value


def _shape(shape: object) -> list[int]:
    dims = list(shape) if isinstance(shape, list | tuple) else None
    if dims is None or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise InvalidInput(f"wrong_shape: shape {shape!r} must be a list of non-negative integers")
    return [int(d) for d in dims]


def _tensor_values(data: object, shape: list[int], where: str) -> list[object]:
    """A JSON tensor's `data` -> its values in row-major order; the data must match `shape` exactly.

    The Open Inference Protocol allows flat data (prod(shape) values) or data nested like the shape; any other
    nesting or count is `wrong_shape`."""
    if isinstance(data, np.ndarray):
        data = data.tolist()
    if not isinstance(data, list):
        raise InvalidInput(f"wrong_shape: {where} has no list of values")
    count = math.prod(shape)
    if list not in set(map(type, data)):
        if len(data) != count:
            raise InvalidInput(
                f"wrong_shape: {where} has shape {shape}, i.e. {count} values, but its data holds {len(data)}"
            )
        return data
    level: list[object] = [data]
    for dim in shape:  # one pass per dimension
        nested: list[object] = []
        for item in level:
            if not isinstance(item, list) or len(item) != dim:
                raise InvalidInput(f"wrong_shape: {where}: nested data does not match shape {shape}")
            nested.extend(item)
        level = nested
    if list in set(map(type, level)):
        raise InvalidInput(f"wrong_shape: {where}: nested data is deeper than shape {shape}")
    return level


def _nested_shape(item: list[object]) -> list[int]:
    """The shape nested lists claim along their first elements (at most 4 levels are looked at)."""
    shape: list[int] = []
    level: object = item
    for _ in range(4):
        if not isinstance(level, list):
            break
        shape.append(len(level))
        if not level:
            break
        level = level[0]
    return shape


def _check_pixel_values(values: Sequence[object], where: str, *, integers: bool) -> None:
    """Pixel values must be JSON numbers: booleans are `wrong_dtype`, null `null_value`, text `bad_pixels`;
    a UINT8 tensor takes integers only."""
    kinds = set(map(type, values))
    if bool in kinds:
        raise InvalidInput(f"wrong_dtype: {where} holds booleans; pixels are numbers 0..255")
    if type(None) in kinds:
        raise InvalidInput(f"null_value: {where} holds null values")
    if not kinds <= {int, float}:
        names = ", ".join(sorted(k.__name__ for k in kinds - {int, float}))
        raise InvalidInput(f"bad_pixels: {where} holds non-numeric values ({names})")
    if integers and float in kinds:
        raise InvalidInput(f"wrong_dtype: {where} is UINT8 but holds non-integer numbers")


def _as_float(values: list[object], where: str) -> FloatArray:
    """Checked numbers -> float64 (an integer too large for a float is out of range)."""
    try:
        return np.asarray(values, dtype=np.float64)
    except OverflowError:
        raise InvalidInput(f"out_of_range: {where} has pixels outside 0..255") from None
