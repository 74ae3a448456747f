"""visionpipe/monitoring/answers.py: the one parser of logged predictor answers (collector and drift monitor)."""

from __future__ import annotations

import numpy as np
import pytest

from visionpipe.monitoring.answers import AnswerError, read_answers

CLASSES = ("cat", "dog")


def v2(*tensors: tuple[str, str, list[int], list[object]]) -> dict[str, object]:
    return {"outputs": [{"name": n, "datatype": d, "shape": s, "data": x} for n, d, s, x in tensors]}


@pytest.mark.parametrize(
    ("answer", "labels", "confidence", "probabilities"),
    [
        (  # v1 records: probabilities by class name, read in the order of CLASSES
            {"predictions": [{"label": 1, "confidence": 0.8, "probabilities": {"dog": 0.8, "cat": 0.2}}]},
            [1], [0.8], [[0.2, 0.8]],
        ),
        (  # the policy abstained: the record's decision says so
            {"predictions": [{"label": -1, "confidence": 0.55, "decision": {"abstain": True}}]}, [-1], [0.55], None,
        ),
        (  # v2 tensors; the abstain flag wins over the label; confidence from the probabilities
            v2(("label", "INT64", [2], [0, 1]), ("abstain", "BOOL", [2], [False, True]),
               ("probabilities", "FP32", [2, 2], [0.9, 0.1, 0.45, 0.55])),
            [0, -1], [0.9, 0.55], [[0.9, 0.1], [0.45, 0.55]],
        ),
        (  # v2 with only the JSON records
            v2(("result", "BYTES", [1], ['{"label": 0, "confidence": 0.7}'])), [0], [0.7], None,
        ),
        (b'{"predictions": [{"label": 1}]}', [1], None, None),  # bytes; no confidence logged
    ],
)  # fmt: skip
def test_reads_v1_and_v2_answers(
    answer: object, labels: list[int], confidence: list[float] | None, probabilities: list[list[float]] | None
) -> None:
    read = read_answers(answer, CLASSES)
    assert read.labels.tolist() == labels and len(read) == len(labels)
    if confidence is None:
        assert read.confidence is None
    else:
        assert read.confidence is not None and np.allclose(read.confidence, confidence)
    if probabilities is None:
        assert read.probabilities is None
    else:
        assert read.probabilities is not None and np.allclose(read.probabilities, probabilities)
        assert np.allclose(read.probabilities.sum(axis=1), 1.0)


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (b"not json", "not JSON"),
        ([1], "not a JSON object"),
        ({"result": 1}, "neither"),
        ({"predictions": [3]}, "not an object with a 'label'"),
        ({"predictions": [{"label": 1.5}]}, "not a class index"),
        (v2(("probs", "FP32", [1], [1.0])), "no 'label' output"),
        ({"outputs": [{"name": "label", "datatype": "INT64", "shape": [1]}]}, "binary"),
        (v2(("label", "INT64", [3], [1, 2])), "shape"),
        (v2(("label", "INT64", [1], [0]), ("probabilities", "FP32", [1, 3], [0.2, 0.3, 0.5])), r"expected \[N, 2\]"),
        (v2(("label", "INT64", [1], [0]), ("confidence", "FP32", [1], [float("nan")])), "NaN"),
    ],
)
def test_unreadable_answers_are_refused_by_name(answer: object, match: str) -> None:
    with pytest.raises(AnswerError, match=match):
        read_answers(answer, CLASSES)
