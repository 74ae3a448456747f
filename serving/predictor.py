"""The KServe predictor: serves one bundle (or an ensemble of bundles) over v1 and v2 (REST and gRPC).

Hooks follow KServe's `kserve.Model`: `load` verifies every bundle and sets `ready` only then;
`preprocess` decodes the request into uint8 images; `predict` runs the shared preprocessing, the models
(with optional test-time augmentation), the calibrator and the decision policy; `postprocess` shapes the
v1 or v2 answer. Bad inputs raise `kserve.errors.InvalidInput` with a named code (HTTP 400), so the server
keeps serving.

Requests:
  v1  ``{"instances": [ {"b64": "<base64 image>"} | "<base64 image>" | [[pixel rows]] (H,W) or (H,W,C) ]}``
  v2  one input: BYTES ``shape [N]`` of encoded images (base64 strings over REST, raw bytes over gRPC), or
      FP32 / UINT8 ``shape [N,H,W]`` or ``[N,H,W,C]`` of pixel intensities 0..255.
Each answer holds the label (-1 when the policy abstains), the class name, the calibrated probabilities, the
confidence, the decision (class, or abstain with the prediction set), the policy used and the bundle version.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import kserve
import numpy as np
import numpy.typing as npt
import torch
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferInput, InferOutput, InferRequest, InferResponse
from PIL import Image, ImageOps

from serving.bundle import BundleError, BundleModel, read_bundle
from serving.hard_examples import HardExampleLogger
from serving.policies import ABSTAIN, apply_policy
from serving.preprocessing import PreprocessSpec, to_model_input
from serving.tta import TTA_MODES, average_tta, tta_batch
from serving.upload import InputError, InputLimits, composite_alpha, decode_image

Protocol = Literal["v1", "v2"]
UInt8Image = npt.NDArray[np.uint8]
FloatArray = npt.NDArray[np.float64]


class EnsembleError(BundleError):
    reason = "ensemble_mismatch"


@dataclass(frozen=True)
class ServeConfig:
    """Serving options: TTA mode, input limits, batch size."""

    tta: str = "off"
    limits: InputLimits = field(default_factory=InputLimits)
    max_batch: int = 64

    def __post_init__(self) -> None:
        if self.tta not in TTA_MODES:
            raise ValueError(f"tta={self.tta!r} is not one of {', '.join(TTA_MODES)}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch={self.max_batch} must be >= 1")


@dataclass(frozen=True)
class Batch:
    """A decoded request: images (uint8 HxWxC, sizes may differ) and how to answer."""

    images: list[UInt8Image]
    protocol: Protocol
    request_id: str | None = None
    binary: bool = False  # v2 over gRPC: answer with raw tensor contents


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
    ) -> None:
        super().__init__(name)
        self.hard_examples = hard_examples
        if not bundle_uris:
            raise ValueError("at least one bundle URI is needed")
        self.bundle_uris = list(bundle_uris)
        self.config = config or ServeConfig()
        self.runtimes: list[BundleModel] = []
        self.ready = False

    # ----------------------------------------------------------------------------------------- load
    def load(self) -> bool:
        """Verify every bundle (fail closed) and build its models; `ready` only once all verified."""
        runtimes = [BundleModel(read_bundle(uri)) for uri in self.bundle_uris]
        check_ensemble(runtimes)
        self.runtimes = runtimes
        self.ready = True
        return self.ready

    @property
    def primary(self) -> BundleModel:
        return self.runtimes[0]

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        return self.primary.bundle.preprocess

    # ------------------------------------------------------------------------------------ KServe hooks
    async def preprocess(
        self, payload: dict[str, object] | InferRequest, headers: dict[str, str] | None = None
    ) -> Batch:
        try:
            if isinstance(payload, InferRequest):
                images = self._decode_v2(payload)
                batch = Batch(images, "v2", payload.id, binary=bool(payload.from_grpc))
            elif isinstance(payload, dict):
                batch = Batch(self._decode_v1(payload), "v1")
            else:
                raise InvalidInput(f"bad_request: unsupported payload type {type(payload).__name__}")
        except InputError as exc:
            raise InvalidInput(f"{exc.code}: {exc}") from exc
        if not batch.images:
            raise InvalidInput("empty_batch: the request holds no images")
        if len(batch.images) > self.config.max_batch:
            raise InvalidInput(f"batch_too_large: {len(batch.images)} images; the limit is {self.config.max_batch}")
        return batch

    def predict(self, payload: Batch, headers: dict[str, str] | None = None) -> Answers:
        x = torch.cat([to_model_input(img[None], self.preprocess_spec) for img in payload.images])
        raw, calibrated = self.probabilities(x)
        decisions = apply_policy(self.primary.bundle.policy, calibrated, raw)
        return Answers(payload, raw, calibrated, decisions.labels, decisions.policy_names, decisions.prediction_sets)

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
    def probabilities(self, x: torch.Tensor) -> tuple[FloatArray, FloatArray]:
        """(raw, calibrated) probabilities: members' softmax averaged over TTA variants and bundles."""
        raws, cals = [], []
        for runtime in self.runtimes:
            raw, calibrated = runtime.probabilities(self._log_probs_tta(runtime, x))
            raws.append(raw)
            cals.append(calibrated)
        return np.mean(raws, axis=0), np.mean(cals, axis=0)

    def _log_probs_tta(self, runtime: BundleModel, x: torch.Tensor) -> FloatArray:
        mode = self.config.tta
        if mode == "off":
            return runtime.log_probs(x)
        fill = float((0.0 - self.preprocess_spec.mean[0]) / self.preprocess_spec.std[0])
        variants = tta_batch(x, mode, fill)
        probs = torch.from_numpy(np.exp(runtime.log_probs(variants)))
        averaged = average_tta(probs, len(x), mode)
        return np.asarray(torch.log(averaged.clamp_min(1e-300)).numpy(), dtype=np.float64)

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
    def _decode_v1(self, payload: dict[str, object]) -> list[UInt8Image]:
        instances = payload.get("instances")
        if not isinstance(instances, list):
            raise InvalidInput('bad_request: v1 requests need "instances": a list of images')
        out = []
        for i, item in enumerate(instances):
            if isinstance(item, dict) and "b64" in item:
                out.append(self._from_bytes(_b64(item["b64"], i)))
            elif isinstance(item, str):
                out.append(self._from_bytes(_b64(item, i)))
            elif isinstance(item, list):
                out.append(self._from_pixels(np.asarray(item, dtype=object), i))
            else:
                raise InvalidInput(f"bad_instance: instance {i} is neither a base64 image nor a pixel array")
        return out

    def _decode_v2(self, request: InferRequest) -> list[UInt8Image]:
        if len(request.inputs) != 1:
            raise InvalidInput(f"bad_request: expected one input, got {len(request.inputs)}")
        inp: InferInput = request.inputs[0]
        raw = inp.as_numpy() if inp._raw_data is not None else None  # binary tensor extension / gRPC raw
        if inp.datatype == "BYTES":
            items = _flat(raw if raw is not None else inp.data)
            return [self._from_bytes(_as_bytes(item, i)) for i, item in enumerate(items)]
        if inp.datatype in ("FP32", "FP64", "UINT8"):
            shape = [int(s) for s in inp.shape]
            if len(shape) not in (3, 4):
                raise InvalidInput(f"wrong_shape: tensor shape {shape}; expected [N,H,W] or [N,H,W,C]")
            data = raw if raw is not None else np.asarray(_flat(inp.data), dtype=np.float64)
            try:
                array = np.asarray(data, dtype=np.float64).reshape(shape)
            except ValueError as exc:
                raise InvalidInput(f"wrong_shape: {exc}") from exc
            return [self._from_pixels(img, i) for i, img in enumerate(array)]
        raise InvalidInput(f"wrong_dtype: datatype {inp.datatype}; use BYTES (encoded images) or FP32 pixels")

    def _from_bytes(self, data: bytes) -> UInt8Image:
        return image_to_array(decode_image(data, self.config.limits), self.preprocess_spec)

    def _from_pixels(self, pixels: npt.NDArray[np.generic], index: int) -> UInt8Image:
        try:
            array = np.asarray(pixels, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"bad_pixels: instance {index} holds non-numeric values") from exc
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3 or array.shape[2] not in (1, 3) or min(array.shape[:2]) < 1:
            raise InvalidInput(
                f"wrong_shape: instance {index} has shape {list(array.shape)}; expected (H,W) or (H,W,C)"
            )
        if max(array.shape[:2]) > self.config.limits.max_side:
            raise InvalidInput(f"image_too_large: instance {index} is {array.shape[1]}x{array.shape[0]} pixels")
        if not np.isfinite(array).all():
            raise InvalidInput(f"non_finite: instance {index} holds NaN or infinite values")
        if array.min() < 0 or array.max() > 255:
            raise InvalidInput(f"out_of_range: instance {index} has pixels outside 0..255")
        return np.rint(array).astype(np.uint8)

    def _v2_response(self, result: Answers, records: list[dict[str, object]]) -> InferResponse:
        tensors: list[tuple[str, npt.NDArray[np.generic]]] = [
            ("label", result.labels.astype(np.int64)),
            ("probabilities", result.calibrated.astype(np.float32)),
            ("confidence", result.calibrated.max(axis=1).astype(np.float32)),
            ("abstain", result.labels == ABSTAIN),
            ("result", np.array([json.dumps(r, sort_keys=True).encode() for r in records], dtype=np.object_)),
        ]
        outputs = []
        for name, array in tensors:
            output = InferOutput(name, list(array.shape), _V2_DTYPES[array.dtype.kind])
            output.set_data_from_numpy(array, binary_data=result.batch.binary)
            outputs.append(output)
        return InferResponse(
            response_id=result.batch.request_id or "",
            model_name=self.name,
            infer_outputs=outputs,
            parameters={"bundle_version": str(records[0]["bundle_version"])} if records else None,
        )


_V2_DTYPES = {"i": "INT64", "f": "FP32", "b": "BOOL", "O": "BYTES"}


def image_to_array(image: Image.Image, spec: PreprocessSpec) -> UInt8Image:
    """A decoded upload -> the uint8 HxWxC array the shared preprocessing takes (orientation, alpha, colour)."""
    upright = ImageOps.exif_transpose(image)
    if spec.kind == "digit-upload":
        upright = composite_alpha(upright)  # strokes kept visible, as the photo normalisation expects
    elif upright.mode in ("RGBA", "LA", "P", "PA"):
        upright = Image.alpha_composite(Image.new("RGBA", upright.size, (0, 0, 0, 255)), upright.convert("RGBA"))
    array = np.asarray(upright.convert("L" if spec.channels == 1 else "RGB"), dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


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
    if not isinstance(value, str):
        raise InvalidInput(f"bad_base64: instance {index} is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"bad_base64: instance {index} is not valid base64") from exc


def _as_bytes(item: object, index: int) -> bytes:
    if isinstance(item, bytes):
        return item
    return _b64(item, index)


def _flat(data: object) -> list[object]:
    if isinstance(data, np.ndarray):
        return list(data.ravel())
    if isinstance(data, list):
        out: list[object] = []
        for item in data:
            out.extend(_flat(item) if isinstance(item, list) else [item])
        return out
    return [data]
