"""The logits artifact: what supervised_train writes and the decision phases read.

A folder holding ``meta.json`` (``classes``, ``positive_class``) and one ``<split>.npz`` per split of
`LOGIT_SPLITS` (arrays ``logits`` float (N, K) and ``labels`` int64 (N,)), from the best checkpoint.

Without multi-view inference ``logits`` are the model's raw logits. With ``preprocess.views``
(visionpipe/serving/views.py) they are the views' aggregated log-probabilities, a normalised logit vector per image:
softmax gives the aggregated probabilities, so the decision phases read them exactly as logits, and they are what
the bundle serves (`BundleModel.predict_images`, the served predictor). For binary tasks the aggregation pools the
positive class's log-odds; the positive class is `LogitsMeta.positive_index`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visionpipe.serving.metrics import FloatArray, IntArray

LOGIT_SPLITS = ("val_calib", "val_test")


class LogitsError(ValueError):
    """A logits artifact that is missing, malformed or inconsistent (the message names the file)."""


@dataclass(frozen=True)
class LogitsMeta:
    classes: tuple[str, ...]
    positive_class: str | None

    def __post_init__(self) -> None:
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise LogitsError(f"meta classes={list(self.classes)} must hold >= 2 distinct names")
        if self.positive_class is not None and self.positive_class not in self.classes:
            raise LogitsError(f"meta positive_class={self.positive_class!r} is not one of {list(self.classes)}")

    @property
    def task(self) -> str:
        return "binary" if len(self.classes) == 2 else "multiclass"

    @property
    def positive_index(self) -> int:
        """Binary: index of the positive class (classes[1] when positive_class is null)."""
        return 1 if self.positive_class is None else self.classes.index(self.positive_class)


def load_meta(logits_dir: Path) -> LogitsMeta:
    """Read ``meta.json`` of a logits artifact directory."""
    path = Path(logits_dir) / "meta.json"
    if not path.is_file():
        raise LogitsError(f"{path} is missing; a logits artifact holds meta.json, val_calib.npz, val_test.npz")
    raw = json.loads(path.read_text())
    classes = raw.get("classes")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise LogitsError(f"{path}: classes={classes!r} must be a list of class names")
    positive = raw.get("positive_class")
    if positive is not None and not isinstance(positive, str):
        raise LogitsError(f"{path}: positive_class={positive!r} must be a class name or null")
    return LogitsMeta(tuple(classes), positive)


def load_logits(logits_dir: Path, split: str) -> tuple[FloatArray, IntArray]:
    """(logits float64 (N, K), labels int64 (N,)) of one split; only val_calib and val_test exist here."""
    if split not in LOGIT_SPLITS:
        raise LogitsError(f"split={split!r} is not one of {LOGIT_SPLITS}")
    path = Path(logits_dir) / f"{split}.npz"
    if not path.is_file():
        raise LogitsError(f"{path} is missing")
    with np.load(path, allow_pickle=False) as data:
        if "logits" not in data or "labels" not in data:
            raise LogitsError(f"{path} must hold arrays 'logits' and 'labels'; has {sorted(data.files)}")
        logits = np.asarray(data["logits"], dtype=np.float64)
        labels = np.asarray(data["labels"], dtype=np.int64)
    if logits.ndim != 2 or logits.shape[1] < 2 or labels.shape != (logits.shape[0],):
        raise LogitsError(f"{path}: logits must be (N, K>=2) and labels (N,); got {logits.shape}, {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise LogitsError(f"{path}: labels must lie in [0, {logits.shape[1] - 1}]")
    if not np.isfinite(logits).all():
        raise LogitsError(f"{path}: logits contain non-finite values")
    return logits, labels
