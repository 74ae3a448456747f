"""Fitting the probability calibrators on val_calib logits (the calibration phase's side of
visionpipe/serving/calibrators.py, which only rebuilds, applies and serialises them).

Each fitter returns the serving class with its fitted parameters, so what is fitted is exactly what the server
applies: temperature by L-BFGS-B on log T (analytic gradient), platt and beta by a bounded logistic fit on the
logit margin (a, b >= 0 keeps them monotone), isotonic by scikit-learn's isotonic regression stored as
breakpoints (no pickled sklearn objects).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize

# The same helpers the server applies, so the fitted map and the served map cannot drift apart.
from visionpipe.serving.calibrators import (
    CALIBRATION_METHODS,
    BetaCalibrator,
    Calibrator,
    CalibratorError,
    IdentityCalibrator,
    IsotonicCalibrator,
    PlattCalibrator,
    TemperatureCalibrator,
    _check_breakpoints,
    _log_sigmoid,
    _logits,
    _sigmoid,
)
from visionpipe.serving.metrics import FloatArray, IntArray, log_softmax, softmax

_LOG_T_BOUNDS = (-6.0, 6.0)


def fit_calibrator(
    calibration_method: str, n_classes: int, logits: npt.ArrayLike, labels: npt.ArrayLike, positive_index: int = 1
) -> Calibrator:
    """A calibrator of `calibration_method` fitted on labelled logits (val_calib only)."""
    if calibration_method not in CALIBRATION_METHODS:
        raise CalibratorError(f"method={calibration_method!r} is not one of {CALIBRATION_METHODS}")
    if calibration_method == "identity":
        return IdentityCalibrator(n_classes, positive_index)
    if calibration_method == "temperature":
        return fit_temperature(n_classes, logits, labels, positive_index)
    if calibration_method == "platt":
        return fit_platt(n_classes, logits, labels, positive_index)
    if calibration_method == "beta":
        return fit_beta(n_classes, logits, labels, positive_index)
    return fit_isotonic(n_classes, logits, labels, positive_index)


def fit_temperature(
    n_classes: int, logits: npt.ArrayLike, labels: npt.ArrayLike, positive_index: int = 1
) -> TemperatureCalibrator:
    """softmax(z / T) with T > 0 minimising the NLL (L-BFGS-B on log T, analytic gradient)."""
    TemperatureCalibrator(n_classes, positive_index)  # refuse a wrong task before fitting
    z = _logits(logits, n_classes)
    y = _labels(labels, len(z), n_classes)
    z_true = z[np.arange(len(y)), y]

    def loss_and_grad(x: FloatArray) -> tuple[float, FloatArray]:
        t = float(np.exp(x[0]))
        logp = log_softmax(z / t)
        loss = -float(np.mean(logp[np.arange(len(y)), y]))
        expected_z = np.sum(np.exp(logp) * z, axis=1)
        grad = float(np.mean(z_true - expected_z)) / t  # d loss / d log T
        return loss, np.array([grad])

    res = minimize(loss_and_grad, np.array([0.0]), jac=True, method="L-BFGS-B", bounds=[_LOG_T_BOUNDS])
    return TemperatureCalibrator(n_classes, positive_index, float(np.exp(res.x[0])))


def fit_platt(n_classes: int, logits: npt.ArrayLike, labels: npt.ArrayLike, positive_index: int = 1) -> PlattCalibrator:
    """Binary: sigmoid(a * d + b) on the logit margin d, a >= 0."""
    unfitted = PlattCalibrator(n_classes, positive_index)
    d = _margin(unfitted, logits)
    t = _binary_targets(unfitted, labels)
    a, b = _fit_logistic(np.stack([d, np.ones_like(d)], axis=1), t, [(0.0, None), (None, None)])
    return PlattCalibrator(n_classes, positive_index, a, b)


def fit_beta(n_classes: int, logits: npt.ArrayLike, labels: npt.ArrayLike, positive_index: int = 1) -> BetaCalibrator:
    """Binary beta calibration (Kull et al. 2017): sigmoid(a ln s - b ln(1 - s) + c), a, b >= 0."""
    unfitted = BetaCalibrator(n_classes, positive_index)
    d = _margin(unfitted, logits)
    features = np.stack([_log_sigmoid(d), -_log_sigmoid(-d), np.ones_like(d)], axis=1)
    t = _binary_targets(unfitted, labels)
    a, b, c = _fit_logistic(features, t, [(0.0, None), (0.0, None), (None, None)])
    return BetaCalibrator(n_classes, positive_index, a, b, c)


def fit_isotonic(
    n_classes: int, logits: npt.ArrayLike, labels: npt.ArrayLike, positive_index: int = 1
) -> IsotonicCalibrator:
    """Binary isotonic regression of the label on s = raw P(positive), outputs clipped to
    [1 / (n + 2), 1 - 1 / (n + 2)] so the NLL stays finite; stored as breakpoints."""
    from sklearn.isotonic import IsotonicRegression

    unfitted = IsotonicCalibrator(n_classes, positive_index)
    s = softmax(_logits(logits, n_classes))[:, positive_index]
    t = _binary_targets(unfitted, labels)
    eps = 1.0 / (len(t) + 2)
    iso = IsotonicRegression(y_min=eps, y_max=1 - eps, out_of_bounds="clip").fit(s, t)
    x = np.asarray(iso.X_thresholds_, dtype=np.float64)
    y = np.asarray(iso.y_thresholds_, dtype=np.float64)
    _check_breakpoints(x, y)
    return IsotonicCalibrator(n_classes, positive_index, [float(v) for v in x], [float(v) for v in y])


# ----------------------------------------------------------------------------------------------------------
def _margin(calibrator: Calibrator, logits: npt.ArrayLike) -> FloatArray:
    z = _logits(logits, calibrator.n_classes)
    pos = calibrator.positive_index
    out: FloatArray = z[:, pos] - z[:, 1 - pos]
    return out


def _binary_targets(calibrator: Calibrator, labels: npt.ArrayLike) -> FloatArray:
    y = np.asarray(labels, dtype=np.int64)
    out: FloatArray = (y == calibrator.positive_index).astype(np.float64)
    return out


def _labels(labels: npt.ArrayLike, n: int, n_classes: int) -> IntArray:
    y = np.asarray(labels, dtype=np.int64)
    if y.shape != (n,) or (n and (y.min() < 0 or y.max() >= n_classes)):
        raise CalibratorError(f"labels must be (N,)={n} ints in [0, {n_classes - 1}]; got shape {y.shape}")
    return y


def _fit_logistic(
    features: FloatArray, targets: FloatArray, bounds: list[tuple[float | None, float | None]]
) -> tuple[float, ...]:
    """Weights w minimising the logistic NLL of sigmoid(features @ w), within bounds (L-BFGS-B)."""

    def loss_and_grad(w: FloatArray) -> tuple[float, FloatArray]:
        logits = features @ w
        loss = float(np.mean(np.logaddexp(0.0, logits) - targets * logits))
        grad = features.T @ (_sigmoid(logits) - targets) / len(targets)
        return loss, grad

    w0 = np.zeros(features.shape[1])
    w0[0] = 1.0
    res = minimize(loss_and_grad, w0, jac=True, method="L-BFGS-B", bounds=bounds)
    return tuple(float(v) for v in res.x)
