"""Read the predictor's answers back from logged JSON: one parser for the shadow collector and the drift monitor.

The answers are what `visionpipe/serving/predictor.py` sends: v1 ``{"predictions": [record, ...]}`` with one
record per instance (``label``, -1 when the policy abstains, ``confidence``, ``probabilities`` by class name,
``decision``), and v2 ``{"outputs": [tensor, ...]}`` with the tensors ``label``, ``probabilities``,
``confidence``, ``abstain`` and ``result`` (the JSON records). Binary v2 outputs (no JSON ``data``) are not read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

ABSTAIN_LABEL = -1  # visionpipe/serving/policies.py ABSTAIN

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


class AnswerError(ValueError):
    """A logged answer from which the decisions cannot be read; the message says what is missing."""


@dataclass(frozen=True)
class Answers:
    """Per instance: the decided label (-1 = abstain), and when the answer carries them the confidence and the
    calibrated probabilities (columns in the order of the `classes` given to `read_answers`)."""

    labels: IntArray
    confidence: FloatArray | None
    probabilities: FloatArray | None

    def __len__(self) -> int:
        return len(self.labels)


def read_answers(answer: object, classes: Sequence[str] | None = None) -> Answers:
    """Every instance's decision in a v1 or v2 answer (bytes, text or parsed JSON). With `classes`, v1 records'
    per-class probabilities are read in that order."""
    if isinstance(answer, (bytes, str)):
        try:
            answer = json.loads(answer)
        except ValueError as exc:
            raise AnswerError(f"the answer is not JSON: {exc}") from exc
    if not isinstance(answer, Mapping):
        raise AnswerError(f"the answer is a {type(answer).__name__}, not a JSON object")
    if "predictions" in answer:
        predictions = answer["predictions"]
        if not isinstance(predictions, list):
            raise AnswerError('v1 answer: "predictions" must be a list of records')
        return _records(predictions, classes, "v1 prediction")
    if "outputs" in answer:
        return _v2(answer["outputs"], classes)
    raise AnswerError(
        f'the answer has neither "predictions" (v1) nor "outputs" (v2); keys: {sorted(map(str, answer))[:8]}'
    )


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _records(records: Sequence[object], classes: Sequence[str] | None, where: str) -> Answers:
    labels: list[int] = []
    confidence: list[float] = []
    rows: list[list[float]] = []
    for i, record in enumerate(records):
        if not isinstance(record, dict) or "label" not in record:
            raise AnswerError(f"{where} {i}: {str(record)[:80]!r} is not an object with a 'label'")
        label = record["label"]
        if not _number(label) or float(label) != int(label):
            raise AnswerError(f"{where} {i}: label {str(label)[:40]!r} is not a class index")
        decision = record.get("decision")
        abstained = isinstance(decision, dict) and decision.get("abstain") is True
        labels.append(ABSTAIN_LABEL if abstained else int(label))
        if _number(record.get("confidence")):
            confidence.append(float(record["confidence"]))
        probabilities = record.get("probabilities")
        if classes is not None and isinstance(probabilities, dict):
            row = [probabilities.get(name) for name in classes]
            if all(_number(p) for p in row):
                rows.append([float(p) for p in row])  # type: ignore[arg-type]  # numbers, checked above
    return Answers(
        np.asarray(labels, dtype=np.int64),
        np.asarray(confidence, dtype=np.float64) if len(confidence) == len(labels) else None,
        np.asarray(rows, dtype=np.float64).reshape(len(rows), -1) if rows and len(rows) == len(labels) else None,
    )


def _v2(outputs: object, classes: Sequence[str] | None) -> Answers:
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise AnswerError('v2 answer: "outputs" must be a list of tensor objects')
    tensors: dict[str, dict[str, object]] = {str(o.get("name")): o for o in outputs}
    for name, tensor in tensors.items():
        if "data" not in tensor:
            raise AnswerError(f"v2 answer: output {name!r} has no JSON 'data' (binary outputs are not read)")
    if "label" not in tensors:
        if "result" in tensors:
            return _records([_json_record(v) for v in _values(tensors["result"], "result")], classes, "v2 result")
        raise AnswerError(f"v2 answer: no 'label' output (nor 'result'); outputs: {sorted(tensors)}")
    labels = _array(tensors["label"], "label").reshape(-1)
    if not np.all(labels == np.round(labels)):
        raise AnswerError("v2 answer: label holds non-integers")
    decided = labels.astype(np.int64)
    if "abstain" in tensors:
        flags = _values(tensors["abstain"], "abstain")
        if len(flags) == len(decided):
            decided = np.where(np.asarray([f is True for f in flags]), ABSTAIN_LABEL, decided).astype(np.int64)
    probabilities = _array(tensors["probabilities"], "probabilities") if "probabilities" in tensors else None
    if probabilities is not None and (
        probabilities.ndim != 2
        or len(probabilities) != len(decided)
        or (classes is not None and probabilities.shape[1] != len(classes))
    ):
        expected = len(classes) if classes is not None else "K"
        raise AnswerError(f"v2 answer: probabilities has shape {probabilities.shape}; expected [N, {expected}]")
    confidence = _array(tensors["confidence"], "confidence").reshape(-1) if "confidence" in tensors else None
    if confidence is None and probabilities is not None:
        confidence = probabilities.max(axis=1)
    if confidence is not None and len(confidence) != len(decided):
        raise AnswerError(f"v2 answer: {len(decided)} labels but {len(confidence)} confidences")
    return Answers(decided, confidence, probabilities)


def _values(tensor: Mapping[str, object], name: str) -> list[object]:
    data = tensor.get("data")
    if not isinstance(data, list):
        raise AnswerError(f"v2 answer: output {name!r} data must be a list")
    return data


def _array(tensor: Mapping[str, object], name: str) -> FloatArray:
    data = _values(tensor, name)
    try:
        array = np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise AnswerError(f"v2 answer: output {name!r} holds non-numbers") from exc
    shape = tensor.get("shape")
    if isinstance(shape, list) and all(isinstance(d, int) for d in shape):
        if math.prod(shape) != array.size:
            raise AnswerError(f"v2 answer: output {name!r} has shape {shape} but {array.size} values")
        array = array.reshape(shape)
    if not np.isfinite(array).all():
        raise AnswerError(f"v2 answer: output {name!r} holds NaN or infinite values")
    return array


def _json_record(value: object) -> object:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        raise AnswerError("v2 answer: result elements must be JSON strings")
    try:
        return json.loads(value)
    except ValueError as exc:
        raise AnswerError(f"v2 answer: a result element is not JSON ({exc})") from exc
