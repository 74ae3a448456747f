"""Decision policies: JSON-serialisable rules that turn probabilities into served decisions.

Kinds:

- ``threshold`` binary (task="binary"): predict the positive class iff p_pos >= threshold, never abstains;
  multi-class (task="multiclass"): predict argmax, abstain when the top probability < threshold.
- ``scrc`` selective conformal risk control: an image is *selected* iff its top probability >=
  selection_threshold; a selected image gets the set {y : 1 - p_y <= set_threshold}; the prediction is the
  set's single class when the set is a singleton, otherwise the image is an abstention.
- ``hybrid`` named sub-policies with ``active`` (decides) and ``fallback`` (decides the images where the
  active policy cannot be evaluated, e.g. non-finite probabilities in its space). Holding both lets an
  operator switch the active policy without retraining.

Every threshold states its probability space: ``raw`` (softmax of the logits) or ``calibrated``.
An optional conformal set config (``lac`` | ``aps`` | ``raps`` with its qhat) attaches prediction sets to
abstentions. ``apply_policy`` is the one function the server and bundle validation call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from visionpipe.serving.metrics import FloatArray, IntArray

SPACES = ("raw", "calibrated")
TASKS = ("binary", "multiclass")
CONFORMAL_METHODS = ("lac", "aps", "raps")
POLICY_KINDS = ("threshold", "scrc", "hybrid")
ABSTAIN = -1

BoolArray = npt.NDArray[np.bool_]


class PolicyError(ValueError):
    """Raised when a policy is invalid (unknown kind, bad field value, dangling sub-policy name...)."""


# ---------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class ConformalConfig:
    """Split-conformal set rule: class y is in the set iff score(x, y) <= qhat."""

    method: str
    qhat: float
    alpha: float
    space: str = "calibrated"
    lam: float = 0.0
    k_reg: int = 0

    def __post_init__(self) -> None:
        _one_of("conformal.method", self.method, CONFORMAL_METHODS)
        _one_of("conformal.space", self.space, SPACES)
        _finite("conformal.qhat", self.qhat)
        _in_open_unit("conformal.alpha", self.alpha)
        if not (np.isfinite(self.lam) and self.lam >= 0):
            raise PolicyError(f"conformal.lam={self.lam} must be a finite number >= 0")
        if self.k_reg < 0:
            raise PolicyError(f"conformal.k_reg={self.k_reg} must be >= 0")

    def to_dict(self) -> dict[str, object]:
        return {
            "method": self.method,
            "qhat": self.qhat,
            "alpha": self.alpha,
            "space": self.space,
            "lam": self.lam,
            "k_reg": self.k_reg,
        }


@dataclass(frozen=True)
class ThresholdPolicy:
    threshold: float
    space: str
    task: str
    positive_index: int = 1
    conformal: ConformalConfig | None = None
    kind: Literal["threshold"] = field(default="threshold", init=False)

    def __post_init__(self) -> None:
        _unit("threshold", self.threshold)
        _one_of("space", self.space, SPACES)
        _one_of("task", self.task, TASKS)
        if self.task == "binary" and self.positive_index not in (0, 1):
            raise PolicyError(f"positive_index={self.positive_index} must be 0 or 1 for a binary task")

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "threshold": self.threshold,
            "space": self.space,
            "task": self.task,
            "positive_index": self.positive_index,
            "conformal": None if self.conformal is None else self.conformal.to_dict(),
        }


@dataclass(frozen=True)
class ScrcPolicy:
    selection_threshold: float
    set_threshold: float
    alpha: float
    delta: float
    target_selection_rate: float
    space: str = "calibrated"
    conformal: ConformalConfig | None = None
    kind: Literal["scrc"] = field(default="scrc", init=False)

    def __post_init__(self) -> None:
        _unit("selection_threshold", self.selection_threshold)
        _unit("set_threshold", self.set_threshold)
        _in_open_unit("alpha", self.alpha)
        _in_open_unit("delta", self.delta)
        _unit("target_selection_rate", self.target_selection_rate)
        _one_of("space", self.space, SPACES)

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "selection_threshold": self.selection_threshold,
            "set_threshold": self.set_threshold,
            "alpha": self.alpha,
            "delta": self.delta,
            "target_selection_rate": self.target_selection_rate,
            "space": self.space,
            "conformal": None if self.conformal is None else self.conformal.to_dict(),
        }


LeafPolicy = ThresholdPolicy | ScrcPolicy


@dataclass(frozen=True)
class HybridPolicy:
    policies: dict[str, LeafPolicy]
    active: str
    fallback: str
    conformal: ConformalConfig | None = None
    kind: Literal["hybrid"] = field(default="hybrid", init=False)

    def __post_init__(self) -> None:
        names = sorted(self.policies)
        for role, name in (("active", self.active), ("fallback", self.fallback)):
            if name not in self.policies:
                raise PolicyError(f"hybrid {role}={name!r} names no sub-policy; allowed: {names}")
        if self.active == self.fallback:
            raise PolicyError(f"hybrid fallback={self.fallback!r} must differ from active={self.active!r}")
        for name, sub in self.policies.items():
            if not isinstance(sub, ThresholdPolicy | ScrcPolicy):
                raise PolicyError(f"hybrid sub-policy {name!r} must be threshold or scrc; got {type(sub)}")

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "policies": {name: sub.to_dict() for name, sub in sorted(self.policies.items())},
            "active": self.active,
            "fallback": self.fallback,
            "conformal": None if self.conformal is None else self.conformal.to_dict(),
        }


DecisionPolicy = ThresholdPolicy | ScrcPolicy | HybridPolicy


@dataclass(frozen=True, eq=False)
class Decisions:
    """Per-image decisions: label index or -1 (abstain), the policy name used, the prediction set."""

    labels: IntArray
    policy_names: list[str]
    set_mask: BoolArray

    @property
    def prediction_sets(self) -> list[list[int]]:
        return [np.flatnonzero(row).tolist() for row in self.set_mask]

    @property
    def abstained(self) -> BoolArray:
        out: BoolArray = self.labels == ABSTAIN
        return out


# --------------------------------------------------------------------------------------------- applying
def apply_policy(policy: DecisionPolicy, calibrated_probs: npt.ArrayLike, raw_probs: npt.ArrayLike) -> Decisions:
    """Decide every image. Both probability arrays are (N, K); each rule reads the space it states."""
    cal = np.asarray(calibrated_probs, dtype=np.float64)
    raw = np.asarray(raw_probs, dtype=np.float64)
    if cal.shape != raw.shape or cal.ndim != 2 or cal.shape[1] < 2:
        raise PolicyError(f"calibrated and raw probs must both be (N, K>=2); got {cal.shape} and {raw.shape}")
    if isinstance(policy, HybridPolicy):
        return _apply_hybrid(policy, cal, raw)
    labels, mask, usable = _apply_leaf(policy, cal, raw, policy.conformal)
    labels[~usable] = ABSTAIN
    mask[~usable] = False
    return Decisions(labels, [policy.kind] * len(labels), mask)


def conformal_score_matrix(probs: npt.ArrayLike, method: str, lam: float = 0.0, k_reg: int = 0) -> FloatArray:
    """Non-conformity score of every class (N, K); the calibration score is the true class's entry.

    lac: 1 - p_y. aps: total mass of the classes ranked at or above y (deterministic, non-randomised).
    raps: aps + lam * max(0, rank(y) - k_reg), rank 1-based. Ties in p are ranked by class index.
    """
    p = np.asarray(probs, dtype=np.float64)
    _one_of("method", method, CONFORMAL_METHODS)
    if method == "lac":
        out: FloatArray = 1.0 - p
        return out
    order = np.argsort(-p, axis=1, kind="stable")
    cum_sorted = np.cumsum(np.take_along_axis(p, order, axis=1), axis=1)
    scores = np.empty_like(p)
    np.put_along_axis(scores, order, cum_sorted, axis=1)
    if method == "raps":
        ranks = np.empty_like(order)
        np.put_along_axis(ranks, order, np.arange(1, p.shape[1] + 1)[None, :].repeat(len(p), 0), axis=1)
        scores = scores + lam * np.maximum(0, ranks - k_reg)
    return scores


def conformal_sets(probs: npt.ArrayLike, config: ConformalConfig) -> BoolArray:
    """Prediction-set mask (N, K): score(x, y) <= qhat."""
    out: BoolArray = conformal_score_matrix(probs, config.method, config.lam, config.k_reg) <= config.qhat
    return out


def scrc_sets(probs: npt.ArrayLike, selection_threshold: float, set_threshold: float) -> tuple[BoolArray, BoolArray]:
    """(selected (N,), set mask (N, K)) of the SCRC rule; unselected rows have an empty set.

    Class y is in the set iff 1 - p_y <= set_threshold (written exactly as the calibration computes it).
    """
    p = np.asarray(probs, dtype=np.float64)
    selected: BoolArray = p.max(axis=1) >= selection_threshold
    mask: BoolArray = ((1.0 - p) <= set_threshold) & selected[:, None]
    return selected, mask


# -------------------------------------------------------------------------------------------- from dict
def policy_from_dict(d: dict[str, object]) -> DecisionPolicy:
    """Validate and rebuild a policy from its ``to_dict()``; raises PolicyError naming the problem."""
    if not isinstance(d, dict):
        raise PolicyError(f"a policy must be a JSON object; got {type(d).__name__}")
    kind = d.get("kind")
    if kind == "hybrid":
        _keys(d, "hybrid", {"kind", "policies", "active", "fallback"}, {"conformal"})
        subs = d["policies"]
        if not isinstance(subs, dict) or not subs:
            raise PolicyError(f"hybrid policies={subs!r} must be a non-empty object of named sub-policies")
        leaves: dict[str, LeafPolicy] = {}
        for name, sub in subs.items():
            leaf = policy_from_dict(sub)
            if isinstance(leaf, HybridPolicy):
                raise PolicyError(f"hybrid sub-policy {name!r} must be threshold or scrc, not hybrid")
            leaves[str(name)] = leaf
        return HybridPolicy(leaves, _str(d, "active"), _str(d, "fallback"), _conformal_from(d.get("conformal")))
    if kind == "threshold":
        _keys(d, "threshold", {"kind", "threshold", "space", "task"}, {"positive_index", "conformal"})
        return ThresholdPolicy(
            threshold=_num(d, "threshold"),
            space=_str(d, "space"),
            task=_str(d, "task"),
            positive_index=_int(d, "positive_index", 1),
            conformal=_conformal_from(d.get("conformal")),
        )
    if kind == "scrc":
        required = {"kind", "selection_threshold", "set_threshold", "alpha", "delta", "target_selection_rate"}
        _keys(d, "scrc", required, {"space", "conformal"})
        return ScrcPolicy(
            selection_threshold=_num(d, "selection_threshold"),
            set_threshold=_num(d, "set_threshold"),
            alpha=_num(d, "alpha"),
            delta=_num(d, "delta"),
            target_selection_rate=_num(d, "target_selection_rate"),
            space=_str(d, "space", "calibrated"),
            conformal=_conformal_from(d.get("conformal")),
        )
    raise PolicyError(f"policy kind={kind!r} is not one of {POLICY_KINDS}")


# ------------------------------------------------------------------------------------------- internals
def _apply_hybrid(policy: HybridPolicy, cal: FloatArray, raw: FloatArray) -> Decisions:
    active = policy.policies[policy.active]
    fallback = policy.policies[policy.fallback]
    labels, mask, usable = _apply_leaf(active, cal, raw, policy.conformal or active.conformal)
    fb_labels, fb_mask, fb_usable = _apply_leaf(fallback, cal, raw, policy.conformal or fallback.conformal)
    use_fb = ~usable
    labels[use_fb] = np.where(fb_usable[use_fb], fb_labels[use_fb], ABSTAIN)
    mask[use_fb] = fb_mask[use_fb] & fb_usable[use_fb, None]
    names = np.where(use_fb, policy.fallback, policy.active).tolist()
    return Decisions(labels, names, mask)


def _apply_leaf(
    policy: LeafPolicy, cal: FloatArray, raw: FloatArray, conformal: ConformalConfig | None
) -> tuple[IntArray, BoolArray, BoolArray]:
    """(labels, set mask, usable) where usable marks rows whose probabilities are finite in its space."""
    probs = raw if policy.space == "raw" else cal
    usable: BoolArray = np.asarray(np.isfinite(probs).all(axis=1), dtype=bool)
    safe = np.where(usable[:, None], probs, 0.0)
    n, k = safe.shape
    if isinstance(policy, ThresholdPolicy):
        if policy.task == "binary":
            if k != 2:
                raise PolicyError(f"a binary threshold policy needs (N, 2) probabilities; got K={k}")
            pos = policy.positive_index
            labels = np.where(safe[:, pos] >= policy.threshold, pos, 1 - pos).astype(np.int64)
        else:
            labels = safe.argmax(axis=1).astype(np.int64)
            labels[safe.max(axis=1) < policy.threshold] = ABSTAIN
        mask = np.zeros((n, k), dtype=bool)
        decided = labels != ABSTAIN
        mask[np.flatnonzero(decided), labels[decided]] = True
    else:
        selected, mask = scrc_sets(safe, policy.selection_threshold, policy.set_threshold)
        singleton = selected & (mask.sum(axis=1) == 1)
        labels = np.where(singleton, mask.argmax(axis=1), ABSTAIN).astype(np.int64)
        decided = selected  # selected rows keep their SCRC set, singleton or not
    if conformal is not None:
        conf_probs = raw if conformal.space == "raw" else cal
        conf_ok = np.isfinite(conf_probs).all(axis=1)
        attach = ~decided & conf_ok
        mask[attach] = conformal_sets(conf_probs[attach], conformal)
    return labels, mask, usable


def _keys(d: dict[str, object], kind: str, required: set[str], optional: set[str]) -> None:
    missing = sorted(required - d.keys())
    unknown = sorted(d.keys() - required - optional)
    if missing:
        raise PolicyError(f"{kind} policy is missing field(s) {missing}")
    if unknown:
        raise PolicyError(f"{kind} policy has unknown field(s) {unknown}; allowed: {sorted(required | optional)}")


def _num(d: dict[str, object], key: str) -> float:
    value = d[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PolicyError(f"{key}={value!r} must be a number")
    return float(value)


def _int(d: dict[str, object], key: str, default: int) -> int:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(f"{key}={value!r} must be an integer")
    return value


def _str(d: dict[str, object], key: str, default: str | None = None) -> str:
    value = d.get(key, default)
    if not isinstance(value, str):
        raise PolicyError(f"{key}={value!r} must be a string")
    return value


def _conformal_from(d: object) -> ConformalConfig | None:
    if d is None:
        return None
    if not isinstance(d, dict):
        raise PolicyError(f"conformal={d!r} must be an object or null")
    _keys(d, "conformal", {"method", "qhat", "alpha"}, {"space", "lam", "k_reg"})
    return ConformalConfig(
        method=_str(d, "method"),
        qhat=_num(d, "qhat"),
        alpha=_num(d, "alpha"),
        space=_str(d, "space", "calibrated"),
        lam=_num(d, "lam") if "lam" in d else 0.0,
        k_reg=_int(d, "k_reg", 0),
    )


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise PolicyError(f"{name}={value!r} is not one of {allowed}")


def _finite(name: str, value: float) -> None:
    if not np.isfinite(value):
        raise PolicyError(f"{name}={value} must be finite")


def _unit(name: str, value: float) -> None:
    if not (np.isfinite(value) and 0.0 <= value <= 1.0):
        raise PolicyError(f"{name}={value} must lie in [0, 1]")


def _in_open_unit(name: str, value: float) -> None:
    if not (np.isfinite(value) and 0.0 < value < 1.0):
        raise PolicyError(f"{name}={value} must lie in (0, 1)")
