"""Probability calibrators as the server applies them: rebuilt from the bundle's JSON (`calibrator_from_dict`),
applied to logits (`probabilities`, `positive_map`) and written back (`to_dict`). Fitting them on val_calib logits
is training-side code: visionpipe/phases/calibrators_fit.py (the calibration phase).

Methods (``method`` in ``to_dict``):

- ``identity``    raw softmax, any K;
- ``temperature`` softmax(z / T), any K;
- ``platt``       binary only: sigmoid(a * d + b) on the logit margin d = z_pos - z_neg, a >= 0;
- ``beta``        binary only (Kull et al. 2017): sigmoid(a ln s - b ln(1 - s) + c), s = raw P(positive),
  a, b >= 0;
- ``isotonic``    binary only: a non-decreasing piecewise-linear map of s, stored as breakpoints and applied
  with np.interp (no pickled sklearn objects).

Multi-class tasks are restricted to identity and temperature: both keep the argmax, so class decisions and
the raw-space abstain threshold stay meaningful; one-vs-rest isotonic would not.

Binary calibrators act on the positive-class score and return (N, 2) probabilities; each also exposes
``positive_map(s)``, the monotone non-decreasing map raw P(positive) -> calibrated P(positive) used to carry
thresholds between probability spaces.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from visionpipe.serving.metrics import FloatArray, softmax

CALIBRATION_METHODS = ("identity", "temperature", "platt", "beta", "isotonic")
BINARY_ONLY_METHODS = ("platt", "beta", "isotonic")


class CalibratorError(ValueError):
    """Raised for an unknown method, a missing or invalid parameter, or a method used on the wrong task."""


class Calibrator(ABC):
    """A fitted map from logits (N, K) to probabilities (N, K) whose rows sum to 1."""

    method: ClassVar[str]

    def __init__(self, n_classes: int, positive_index: int = 1) -> None:
        if n_classes < 2:
            raise CalibratorError(f"n_classes={n_classes} must be >= 2")
        if self.method in BINARY_ONLY_METHODS and n_classes != 2:
            raise CalibratorError(
                f"method={self.method!r} needs a binary task (n_classes=2); got n_classes={n_classes}; "
                "use one of ('identity', 'temperature')"
            )
        if positive_index not in range(n_classes):
            raise CalibratorError(f"positive_index={positive_index} must lie in [0, {n_classes - 1}]")
        self.n_classes = n_classes
        self.positive_index = positive_index

    @abstractmethod
    def probabilities(self, logits: npt.ArrayLike) -> FloatArray:
        """Calibrated probabilities (N, K)."""

    @abstractmethod
    def params(self) -> dict[str, object]:
        """The fitted parameters (JSON-safe)."""

    def positive_map(self, scores: npt.ArrayLike) -> FloatArray:
        """Binary only: raw P(positive) -> calibrated P(positive), monotone non-decreasing."""
        raise CalibratorError(f"method={self.method!r} has no positive-score map for n_classes={self.n_classes}")

    def to_dict(self) -> dict[str, object]:
        return {
            "method": self.method,
            "n_classes": self.n_classes,
            "positive_index": self.positive_index,
            **self.params(),
        }

    # helpers for binary calibrators -------------------------------------------------------------------
    def _margin(self, logits: npt.ArrayLike) -> FloatArray:
        z = _logits(logits, self.n_classes)
        pos = self.positive_index
        out: FloatArray = z[:, pos] - z[:, 1 - pos]
        return out

    def _binary_probs(self, p_pos: FloatArray) -> FloatArray:
        out = np.empty((len(p_pos), 2), dtype=np.float64)
        out[:, self.positive_index] = p_pos
        out[:, 1 - self.positive_index] = 1.0 - p_pos
        return out


class IdentityCalibrator(Calibrator):
    """Raw softmax; nothing to fit."""

    method = "identity"

    def probabilities(self, logits: npt.ArrayLike) -> FloatArray:
        return softmax(_logits(logits, self.n_classes))

    def params(self) -> dict[str, object]:
        return {}

    def positive_map(self, scores: npt.ArrayLike) -> FloatArray:
        if self.n_classes != 2:
            return super().positive_map(scores)
        out: FloatArray = np.asarray(scores, dtype=np.float64).copy()
        return out


class TemperatureCalibrator(Calibrator):
    """softmax(z / T) with T > 0."""

    method = "temperature"

    def __init__(self, n_classes: int, positive_index: int = 1, temperature: float = 1.0) -> None:
        super().__init__(n_classes, positive_index)
        if not (np.isfinite(temperature) and temperature > 0):
            raise CalibratorError(f"temperature={temperature} must be a finite number > 0")
        self.temperature = float(temperature)

    def probabilities(self, logits: npt.ArrayLike) -> FloatArray:
        return softmax(_logits(logits, self.n_classes) / self.temperature)

    def params(self) -> dict[str, object]:
        return {"temperature": self.temperature}

    def positive_map(self, scores: npt.ArrayLike) -> FloatArray:
        if self.n_classes != 2:
            return super().positive_map(scores)
        return _sigmoid(_logit(np.asarray(scores, dtype=np.float64)) / self.temperature)


class PlattCalibrator(Calibrator):
    """Binary: sigmoid(a * d + b) on the logit margin d, a >= 0 (monotone)."""

    method = "platt"

    def __init__(self, n_classes: int, positive_index: int = 1, a: float = 1.0, b: float = 0.0) -> None:
        super().__init__(n_classes, positive_index)
        if not (np.isfinite(a) and a >= 0 and np.isfinite(b)):
            raise CalibratorError(f"platt parameters a={a}, b={b} must be finite with a >= 0")
        self.a, self.b = float(a), float(b)

    def probabilities(self, logits: npt.ArrayLike) -> FloatArray:
        return self._binary_probs(_sigmoid(self.a * self._margin(logits) + self.b))

    def params(self) -> dict[str, object]:
        return {"a": self.a, "b": self.b}

    def positive_map(self, scores: npt.ArrayLike) -> FloatArray:
        return _sigmoid(self.a * _logit(np.asarray(scores, dtype=np.float64)) + self.b)


class BetaCalibrator(Calibrator):
    """Binary beta calibration: sigmoid(a ln s - b ln(1 - s) + c) with a, b >= 0 (monotone)."""

    method = "beta"

    def __init__(self, n_classes: int, positive_index: int = 1, a: float = 1.0, b: float = 1.0, c: float = 0.0) -> None:
        super().__init__(n_classes, positive_index)
        if not (np.isfinite([a, b, c]).all() and a >= 0 and b >= 0):
            raise CalibratorError(f"beta parameters a={a}, b={b}, c={c} must be finite with a, b >= 0")
        self.a, self.b, self.c = float(a), float(b), float(c)

    def probabilities(self, logits: npt.ArrayLike) -> FloatArray:
        d = self._margin(logits)
        return self._binary_probs(self._apply(d))

    def params(self) -> dict[str, object]:
        return {"a": self.a, "b": self.b, "c": self.c}

    def positive_map(self, scores: npt.ArrayLike) -> FloatArray:
        d = _logit(np.asarray(scores, dtype=np.float64))
        return self._apply(d)

    def _apply(self, d: FloatArray) -> FloatArray:
        return _sigmoid(self.a * _log_sigmoid(d) - self.b * _log_sigmoid(-d) + self.c)


class IsotonicCalibrator(Calibrator):
    """Binary isotonic regression of the label on s = raw P(positive), stored as breakpoints (x, y).

    The fit (visionpipe/phases/calibrators_fit.py) clips outputs to [1 / (n + 2), 1 - 1 / (n + 2)] so the NLL
    stays finite.
    """

    method = "isotonic"

    def __init__(
        self,
        n_classes: int,
        positive_index: int = 1,
        x: list[float] | None = None,
        y: list[float] | None = None,
    ) -> None:
        super().__init__(n_classes, positive_index)
        xs = np.asarray([0.0, 1.0] if x is None else x, dtype=np.float64)
        ys = np.asarray([0.0, 1.0] if y is None else y, dtype=np.float64)
        _check_breakpoints(xs, ys)
        self.x, self.y = xs, ys

    def probabilities(self, logits: npt.ArrayLike) -> FloatArray:
        s = softmax(_logits(logits, self.n_classes))[:, self.positive_index]
        return self._binary_probs(self.positive_map(s))

    def params(self) -> dict[str, object]:
        return {"x": [float(v) for v in self.x], "y": [float(v) for v in self.y]}

    def positive_map(self, scores: npt.ArrayLike) -> FloatArray:
        out: FloatArray = np.interp(np.asarray(scores, dtype=np.float64), self.x, self.y)
        return out


_REGISTRY: dict[str, type[Calibrator]] = {
    cls.method: cls
    for cls in (
        IdentityCalibrator,
        TemperatureCalibrator,
        PlattCalibrator,
        BetaCalibrator,
        IsotonicCalibrator,
    )
}
_PARAMS: dict[str, tuple[str, ...]] = {
    "identity": (),
    "temperature": ("temperature",),
    "platt": ("a", "b"),
    "beta": ("a", "b", "c"),
    "isotonic": ("x", "y"),
}


class ThresholdAtHalfCalibrator(Calibrator):
    """A binary calibrator whose positive probability is remapped so that `threshold` lands on 0.5.

    For consumers that always cut at 0.5 (e.g. validators that round the returned probability): the map is
    piecewise linear and strictly increasing, p -> 0.5 p / t below t and 0.5 + 0.5 (p - t) / (1 - t) above, so
    every decision "p >= t" equals "p' >= 0.5". Built by bundle_validation (`threshold_at_half`) from the fitted
    calibrator, never fitted itself.
    """

    method = "threshold_at_half"

    def __init__(self, n_classes: int, positive_index: int, base: Calibrator, threshold: float) -> None:
        super().__init__(n_classes, positive_index)
        if n_classes != 2:
            raise CalibratorError("threshold_at_half needs a binary task")
        if not 0.0 < threshold < 1.0:
            raise CalibratorError(f"threshold={threshold} must lie in (0, 1) to be remapped to 0.5")
        self.base = base
        self.threshold = float(threshold)

    def remap(self, p_pos: npt.ArrayLike) -> FloatArray:
        p = np.asarray(p_pos, dtype=np.float64)
        t = self.threshold
        out: FloatArray = np.where(p < t, 0.5 * p / t, 0.5 + 0.5 * (p - t) / (1.0 - t))
        return out

    def probabilities(self, logits: npt.ArrayLike) -> FloatArray:
        p_pos = self.base.probabilities(logits)[:, self.positive_index]
        return self._binary_probs(self.remap(p_pos))

    def positive_map(self, scores: npt.ArrayLike) -> FloatArray:
        return self.remap(self.base.positive_map(scores))

    def params(self) -> dict[str, object]:
        return {"base": self.base.to_dict(), "threshold": self.threshold}


def calibrator_from_dict(d: dict[str, object]) -> Calibrator:
    """Rebuild a fitted calibrator from ``Calibrator.to_dict()``; raises CalibratorError when invalid."""
    method = d.get("method")
    if method == ThresholdAtHalfCalibrator.method:
        return _threshold_at_half_from_dict(d)
    if not isinstance(method, str) or method not in _REGISTRY:
        raise CalibratorError(f"calibrator method={method!r} is not one of {CALIBRATION_METHODS}")
    missing = [k for k in ("n_classes", "positive_index", *_PARAMS[method]) if k not in d]
    if missing:
        raise CalibratorError(f"calibrator method={method!r} is missing parameter(s) {missing}")
    n_classes, positive_index = d["n_classes"], d["positive_index"]
    if not isinstance(n_classes, int) or not isinstance(positive_index, int):
        raise CalibratorError(f"n_classes={n_classes!r} and positive_index={positive_index!r} must be ints")
    kwargs: dict[str, float | list[float]] = {}
    for key in _PARAMS[method]:
        value = d[key]
        if isinstance(value, list):
            if not all(isinstance(v, int | float) for v in value):
                raise CalibratorError(f"calibrator parameter {key}={value!r} must be a list of numbers")
            kwargs[key] = [float(v) for v in value]
        elif isinstance(value, int | float) and not isinstance(value, bool):
            kwargs[key] = float(value)
        else:
            raise CalibratorError(f"calibrator parameter {key}={value!r} must be a number")
    return _REGISTRY[method](n_classes, positive_index, **kwargs)


def _threshold_at_half_from_dict(d: dict[str, object]) -> ThresholdAtHalfCalibrator:
    base, threshold = d.get("base"), d.get("threshold")
    n_classes, positive_index = d.get("n_classes"), d.get("positive_index")
    if not isinstance(base, dict) or not isinstance(threshold, int | float):
        raise CalibratorError("threshold_at_half needs a 'base' calibrator object and a numeric 'threshold'")
    if not isinstance(n_classes, int) or not isinstance(positive_index, int):
        raise CalibratorError(f"n_classes={n_classes!r} and positive_index={positive_index!r} must be ints")
    return ThresholdAtHalfCalibrator(n_classes, positive_index, calibrator_from_dict(base), float(threshold))


# ----------------------------------------------------------------------------------------------------------
def _logits(logits: npt.ArrayLike, n_classes: int) -> FloatArray:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] != n_classes:
        raise CalibratorError(f"logits must have shape (N, {n_classes}); got {z.shape}")
    return z


def _sigmoid(x: FloatArray) -> FloatArray:
    out: FloatArray = np.exp(-np.logaddexp(0.0, -x))
    return out


def _log_sigmoid(x: FloatArray) -> FloatArray:
    out: FloatArray = -np.logaddexp(0.0, -x)
    return out


def _logit(p: FloatArray) -> FloatArray:
    with np.errstate(divide="ignore"):
        out: FloatArray = np.log(p) - np.log1p(-p)
    return out


def _check_breakpoints(x: FloatArray, y: FloatArray) -> None:
    if x.ndim != 1 or x.shape != y.shape or len(x) < 1:
        raise CalibratorError(f"isotonic breakpoints x, y must be equal-length 1-D lists; got {x.shape}, {y.shape}")
    if np.any(np.diff(x) < 0) or np.any(np.diff(y) < 0):
        raise CalibratorError("isotonic breakpoints x and y must both be non-decreasing")
    if not (np.all((y >= 0) & (y <= 1)) and np.isfinite(x).all()):
        raise CalibratorError("isotonic breakpoint values y must lie in [0, 1] and x must be finite")
