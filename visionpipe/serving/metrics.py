"""Metric helpers shared by the decision phases, bundle validation and the server.

Everything is vectorised numpy in float64. Probabilities are (N, K) arrays whose rows sum to 1; labels are
integer class indices (N,). Binary confusion-matrix metrics accept arrays of counts so that a whole threshold
sweep is evaluated in one call.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

ECE_BINNINGS = ("width", "mass")


class MetricError(ValueError):
    """Raised when a metric receives inputs of the wrong shape or an unknown option."""


def softmax(logits: npt.ArrayLike) -> FloatArray:
    """Row-wise softmax in float64 (the 'raw' probability space of every bundle)."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise MetricError(f"logits must have shape (N, K>=2); got {z.shape}")
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: FloatArray = e / e.sum(axis=1, keepdims=True)
    return out


def log_softmax(logits: npt.ArrayLike) -> FloatArray:
    """Row-wise log-softmax in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    out: FloatArray = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return out


def nll(probs: npt.ArrayLike, labels: npt.ArrayLike, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the true class (probabilities clipped below at eps)."""
    p, y = _check(probs, labels)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], eps, 1.0))))


def brier(probs: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Multi-class Brier score: mean over images of sum_k (p_k - onehot_k)^2 (binary: twice the usual)."""
    p, y = _check(probs, labels)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def accuracy(probs: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Top-1 accuracy of argmax(probs)."""
    p, y = _check(probs, labels)
    return float(np.mean(p.argmax(axis=1) == y))


def calibration_bins(
    probs: npt.ArrayLike, labels: npt.ArrayLike, n_bins: int = 15, binning: str = "width"
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Top-class confidence bins: (mean confidence, accuracy, count) per bin; empty bins have count 0.

    binning="width": n_bins equal-width bins on [0, 1]; binning="mass": bins between the empirical quantiles
    of the confidences (about equal numbers of images; tied confidences share a bin).
    """
    p, y = _check(probs, labels)
    if binning not in ECE_BINNINGS:
        raise MetricError(f"binning={binning!r} is not one of {ECE_BINNINGS}")
    if n_bins < 1:
        raise MetricError(f"n_bins={n_bins} must be >= 1")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    if binning == "width":
        idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    elif conf.size:  # quantile edges: tied confidences always share a bin
        edges = np.quantile(conf, np.linspace(0.0, 1.0, n_bins + 1)[1:-1])
        idx = np.searchsorted(edges, conf, side="left").astype(np.int64)
    else:
        idx = np.zeros(0, dtype=np.int64)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    safe = np.maximum(count, 1.0)
    mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / safe
    acc = np.bincount(idx, weights=correct, minlength=n_bins) / safe
    return mean_conf, acc, count


def ece(probs: npt.ArrayLike, labels: npt.ArrayLike, n_bins: int = 15, binning: str = "width") -> float:
    """Expected calibration error of the top-class confidence (count-weighted mean |acc - conf|)."""
    conf, acc, count = calibration_bins(probs, labels, n_bins, binning)
    return float(np.sum(count * np.abs(acc - conf)) / max(count.sum(), 1.0))


def mce(probs: npt.ArrayLike, labels: npt.ArrayLike, n_bins: int = 15) -> float:
    """Maximum calibration error over non-empty equal-width bins."""
    conf, acc, count = calibration_bins(probs, labels, n_bins, "width")
    gaps = np.abs(acc - conf)[count > 0]
    return float(gaps.max()) if gaps.size else 0.0


def calibration_report(probs: npt.ArrayLike, labels: npt.ArrayLike, n_bins: int = 15) -> dict[str, float]:
    """The standard set: ECE (equal-width and equal-mass), MCE, Brier, NLL, accuracy."""
    return {
        "ece": ece(probs, labels, n_bins, "width"),
        "ece_mass": ece(probs, labels, n_bins, "mass"),
        "mce": mce(probs, labels, n_bins),
        "brier": brier(probs, labels),
        "nll": nll(probs, labels),
        "accuracy": accuracy(probs, labels),
    }


def binary_metrics_from_counts(
    tp: npt.ArrayLike, fp: npt.ArrayLike, tn: npt.ArrayLike, fn: npt.ArrayLike
) -> dict[str, FloatArray]:
    """Vectorised binary metrics from confusion counts; undefined ratios (0/0) are reported as 0.

    Keys: accuracy, precision, recall (TPR), f1, mcc, fpr, fnr, youden (TPR - FPR).
    """
    tp_, fp_, tn_, fn_ = (np.asarray(a, dtype=np.float64) for a in (tp, fp, tn, fn))
    n = tp_ + fp_ + tn_ + fn_
    precision = _ratio(tp_, tp_ + fp_)
    recall = _ratio(tp_, tp_ + fn_)
    fpr = _ratio(fp_, fp_ + tn_)
    denom = np.sqrt((tp_ + fp_) * (tp_ + fn_) * (tn_ + fp_) * (tn_ + fn_))
    return {
        "accuracy": _ratio(tp_ + tn_, n),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * tp_, 2 * tp_ + fp_ + fn_),
        "mcc": _ratio(tp_ * tn_ - fp_ * fn_, denom),
        "fpr": fpr,
        "fnr": _ratio(fn_, fn_ + tp_),
        "youden": recall - fpr,
    }


def mcc(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> float:
    """Matthews correlation coefficient of two binary 0/1 vectors (0 when undefined, like sklearn)."""
    t = np.asarray(y_true).astype(bool)
    p = np.asarray(y_pred).astype(bool)
    tp, fp = np.sum(t & p), np.sum(~t & p)
    tn, fn = np.sum(~t & ~p), np.sum(t & ~p)
    return float(binary_metrics_from_counts(tp, fp, tn, fn)["mcc"])


def _ratio(num: FloatArray, den: FloatArray) -> FloatArray:
    out: FloatArray = np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)
    return out


def _check(probs: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[FloatArray, IntArray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if p.ndim != 2 or y.ndim != 1 or p.shape[0] != y.shape[0]:
        raise MetricError(f"probs must be (N, K) and labels (N,); got {p.shape} and {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise MetricError(f"labels must lie in [0, {p.shape[1] - 1}]; got [{y.min()}, {y.max()}]")
    return p, y
