"""Decision policies: JSON-serialisable rules that turn probabilities into served decisions.

Kinds:

- ``threshold`` binary (task="binary"): predict the positive class iff p_pos >= threshold, never abstains;
  multi-class (task="multiclass"): predict argmax, abstain when the top probability < threshold.
- ``scrc`` selective conformal risk control: an image is *selected* iff its top probability >=
  selection_threshold; a selected image gets the set {y : 1 - p_y <= set_threshold}, completed by the rule
  ``empty_set`` (``top1``: the top-1 class is always in the set, so a selected image never gets an empty set;
  ``abstain``: the set is left as it is, an empty set is an abstention; bundles written before the field
  existed mean ``abstain``); the prediction is the set's single class when the set is a singleton, otherwise
  the image is an abstention.
- ``hybrid`` named sub-policies with ``active`` (decides) and ``fallback`` (decides the images where the
  active policy cannot be evaluated, e.g. non-finite probabilities in its space). Holding both lets an
  operator switch the active policy without retraining.

Every threshold states its probability space: ``raw`` (softmax of the logits) or ``calibrated``.
An optional conformal set config (``lac`` | ``aps`` | ``aps-conservative`` | ``raps`` with its qhat) attaches
prediction sets to abstentions; see `conformal_score_matrix` for the scores. ``apply_policy`` is the one function
the server and bundle validation call.

APS variants and old bundles. ``aps`` is the randomized APS of Romano, Sesia & Candes (2020); ``aps-conservative``
serves its non-randomized set (it over-covers, never empty). Both configs record ``randomization``, the rule that
derives u (`APS_RANDOMIZATION`; ``aps`` applies it when serving, both when fitting). Bundles written before
randomized APS existed store ``"method": "aps"`` with no ``randomization`` key and meant the non-randomized
inclusive-mass rule; `policy_from_dict` reads them as ``aps-legacy``, which computes exactly that old rule, so an
old bundle's sets never change. ``aps-legacy`` cannot be fitted or chosen in the run form (`CONFORMAL_METHODS`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from visionpipe.serving.metrics import FloatArray, IntArray

SPACES = ("raw", "calibrated")
TASKS = ("binary", "multiclass")
CONFORMAL_METHODS = ("lac", "aps", "aps-conservative", "raps")  # what can be fitted (the run form's choices)
LEGACY_CONFORMAL_METHODS = ("aps-legacy",)  # read from bundles written before randomized APS, never fitted
RANDOMIZED_FITS = ("aps", "aps-conservative")  # fitted on the randomized APS score (their configs record the rule)
# The rule that derives APS's u from an image's probabilities (see `aps_u`); recorded in every `aps` config.
APS_RANDOMIZATION = "blake2b-top3-logp64-v1"
APS_U_TOP = 3  # classes hashed
APS_U_GRID = 64  # log-probability grid: 1/64 nat
SCRC_EMPTY_SET_RULES = ("top1", "abstain")
POLICY_KINDS = ("threshold", "scrc", "hybrid")
ABSTAIN = -1

BoolArray = npt.NDArray[np.bool_]


class PolicyError(ValueError):
    """Raised when a policy is invalid (unknown kind, bad field value, dangling sub-policy name...)."""


# ---------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class ConformalConfig:
    """Split-conformal set rule (see `conformal_sets`); ``randomization`` names the u rule of the APS fit.

    ``randomization`` defaults to `APS_RANDOMIZATION` for ``aps`` / ``aps-conservative`` and must be None for
    every other method.
    """

    method: str
    qhat: float
    alpha: float
    space: str = "calibrated"
    lam: float = 0.0
    k_reg: int = 0
    randomization: str | None = None

    def __post_init__(self) -> None:
        _one_of("conformal.method", self.method, CONFORMAL_METHODS + LEGACY_CONFORMAL_METHODS)
        _one_of("conformal.space", self.space, SPACES)
        if self.method in RANDOMIZED_FITS:
            if self.randomization is None:
                object.__setattr__(self, "randomization", APS_RANDOMIZATION)
            elif self.randomization != APS_RANDOMIZATION:
                raise PolicyError(
                    f"conformal.randomization={self.randomization!r} is not a known APS u rule; "
                    f"allowed: {APS_RANDOMIZATION!r} (a bundle from a newer runtime? upgrade this one)"
                )
        elif self.randomization is not None:
            raise PolicyError(
                f"conformal.randomization={self.randomization!r} applies to methods {RANDOMIZED_FITS} only; "
                f"method={self.method!r} takes null"
            )
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
            "randomization": self.randomization,
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
    empty_set: str = "top1"  # see scrc_sets; a dict without the field (an older bundle) means "abstain"
    kind: Literal["scrc"] = field(default="scrc", init=False)

    def __post_init__(self) -> None:
        _unit("selection_threshold", self.selection_threshold)
        _unit("set_threshold", self.set_threshold)
        _in_open_unit("alpha", self.alpha)
        _in_open_unit("delta", self.delta)
        _unit("target_selection_rate", self.target_selection_rate)
        _one_of("space", self.space, SPACES)
        _one_of("empty_set", self.empty_set, SCRC_EMPTY_SET_RULES)

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "selection_threshold": self.selection_threshold,
            "set_threshold": self.set_threshold,
            "alpha": self.alpha,
            "delta": self.delta,
            "target_selection_rate": self.target_selection_rate,
            "space": self.space,
            "empty_set": self.empty_set,
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
    """Calibration non-conformity score of every class (N, K); `fit_conformal` takes the true class's entry.

    Classes are ranked by decreasing probability, ties by class index (a stable sort); ``above(y)`` is the total
    probability of the classes ranked strictly above y (a cumulative sum, exclusive).

    - ``lac``: 1 - p_y.
    - ``aps`` (randomized, Romano, Sesia & Candes 2020, "Classification with valid and adaptive coverage",
      NeurIPS; their generalized inverse quantile score E): above(y) + u * p_y, one u in (0, 1)
      per image from `aps_u`. Romano's code (msesia/arc arc/classification.py ``calibrate_scores``: 1 - alpha_max
      = Z - epsilon * p) and MAPIE (mapie/conformity_scores/sets/aps.py ``get_conformity_scores``: cumsum - u * p_y)
      write above(y) + (1 - u) * p_y, the same score for u ~ U(0, 1); Angelopoulos et al. write ours
      (aangelopoulos/conformal_classification conformal.py ``get_tau``: U * ordered + cumsum of those above).
    - ``aps-conservative``: the same randomized score (it is fitted like ``aps``; only its set differs).
    - ``aps-legacy`` (non-randomized, u = 1): above(y) + p_y, the mass at and above y.
    - ``raps``: the inclusive mass + lam * max(0, rank(y) - k_reg), rank 1-based (non-randomized).
    """
    p = np.asarray(probs, dtype=np.float64)
    _one_of("method", method, CONFORMAL_METHODS + LEGACY_CONFORMAL_METHODS)
    if method == "lac":
        out: FloatArray = 1.0 - p
        return out
    if method in RANDOMIZED_FITS:
        return _mass_above(p) + aps_u(p)[:, None] * p
    scores = _mass_above(p) + p
    if method == "raps":
        scores = scores + lam * np.maximum(0, _ranks(p) - k_reg)
    return scores


def conformal_sets(probs: npt.ArrayLike, config: ConformalConfig) -> BoolArray:
    """Prediction-set mask (N, K).

    Every method but one: {y : score(x, y) <= qhat} with the calibration score of `conformal_score_matrix`
    (split conformal: coverage >= 1 - alpha for exchangeable data). For ``aps`` this is Romano's randomized set:
    a prefix of the ranking (the score grows along it); it is empty when u * p_top > qhat, which the rule allows
    (as Romano's ``allow_empty=True``, MAPIE's ``include_last_label="randomized"`` and Angelopoulos's
    ``allow_zero_sets=True``); without that, coverage would exceed 1 - alpha.

    ``aps-conservative``: {y : above(y) <= qhat} = {y : E(x, y, u=0) <= qhat} with the ``aps`` qhat: the classes
    up to and including the first whose inclusive mass exceeds qhat, whatever u. It contains the randomized set
    (E grows with u), so coverage >= 1 - alpha still holds and is exceeded (it over-covers), and it is never
    empty (the top class has above = 0). This is MAPIE's ``include_last_label=True`` (mapie aps.py: the fit's
    ``get_conformity_scores`` always subtracts u * p_y; ``get_prediction_sets`` keeps the last label), and
    Romano's ``allow_empty`` idea taken to every last label. Not chosen: the fully non-randomized variant
    (Angelopoulos et al. conformal.py ``gcq`` / ``get_tau`` with ``randomized=False``: qhat on the inclusive mass,
    then the crossing class added), which on confident models gives sets several times larger
    (bench/conformal.py).
    """
    p = np.asarray(probs, dtype=np.float64)
    if config.method == "aps-conservative":
        out: BoolArray = _mass_above(p) <= config.qhat
        return out
    mask: BoolArray = conformal_score_matrix(p, config.method, config.lam, config.k_reg) <= config.qhat
    return mask


def aps_u(probs: npt.ArrayLike) -> FloatArray:
    """APS's u in (0, 1) per image (N,): a hash of the image's own probabilities (rule `APS_RANDOMIZATION`).

    Served sets must be deterministic (the same image gets the same set, served = validated), so u cannot be
    drawn at request time. It is derived from what both the fit on val_calib and serving see, the probabilities
    in the config's space, never from the label:
    the APS_U_TOP most probable classes (stable order, then sorted by class index, so a near-tie between them
    cannot reorder the key), each as (class index, round(APS_U_GRID * ln p)), 8-byte little-endian integers,
    hashed with BLAKE2b (8-byte digest, personalised); u = (digest as an unsigned integer + 0.5) / 2**64.
    Why this is still valid: split conformal covers with probability >= 1 - alpha for ANY score that is a fixed
    function of (x, y), since exchangeable images give exchangeable scores; the randomization is only needed for
    the upper bound (no ties) and for Romano's oracle property, which asks u to be independent of y given x: u is a
    fixed function of x. The hash spreads u like U(0, 1) over distinct images (tests/test_policies.py: a KS test;
    tests/test_conformal_aps.py: coverage, tightness and MAPIE's set sizes). Images with identical rounded
    probabilities share u (e.g. behind a piecewise-constant calibrator): coverage stays valid, the upper bound
    loosens. Rounding ln p on a 1/64-nat grid, for the top classes only, keeps u stable under float noise between
    two code paths: u changes only when a top-class ln p crosses a grid midpoint (on Dirichlet K = 10 rows,
    relative noise 1e-6 changed u for 0.01 % of rows, absolute noise 1e-6 for 0.1 %, absolute 1e-4 for 9 %).
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise PolicyError(f"probs must be (N, K); got {p.shape}")
    top = min(APS_U_TOP, p.shape[1])
    idx = np.sort(np.argsort(-p, axis=1, kind="stable")[:, :top], axis=1)
    logp = np.log(np.clip(np.take_along_axis(p, idx, axis=1), 1e-300, 1.0))
    keys = np.concatenate([idx, np.rint(APS_U_GRID * logp)], axis=1).astype("<i8")
    out = np.empty(len(p), dtype=np.float64)
    for i, row in enumerate(keys):
        digest = hashlib.blake2b(row.tobytes(), digest_size=8, person=b"visionpipe-aps-u").digest()
        out[i] = (int.from_bytes(digest, "little") + 0.5) / 2.0**64
    return out


def scrc_sets(
    probs: npt.ArrayLike, selection_threshold: float, set_threshold: float, empty_set: str = "top1"
) -> tuple[BoolArray, BoolArray]:
    """(selected (N,), set mask (N, K)) of the SCRC rule; unselected rows have an empty set.

    Class y is in the set iff 1 - p_y <= set_threshold (written exactly as the calibration computes it), plus,
    with ``empty_set="top1"``, the top-1 class (argmax, lowest index on ties) of every selected image: the set is
    {argmax} union {y : 1 - p_y <= set_threshold}, never empty. With ``"abstain"`` the set is left as it is.
    """
    _one_of("empty_set", empty_set, SCRC_EMPTY_SET_RULES)
    p = np.asarray(probs, dtype=np.float64)
    selected: BoolArray = p.max(axis=1) >= selection_threshold
    mask: BoolArray = (1.0 - p) <= set_threshold
    if empty_set == "top1":
        mask[np.arange(len(p)), p.argmax(axis=1)] = True
    mask &= selected[:, None]
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
        _keys(d, "scrc", required, {"space", "conformal", "empty_set"})
        return ScrcPolicy(
            selection_threshold=_num(d, "selection_threshold"),
            set_threshold=_num(d, "set_threshold"),
            alpha=_num(d, "alpha"),
            delta=_num(d, "delta"),
            target_selection_rate=_num(d, "target_selection_rate"),
            space=_str(d, "space", "calibrated"),
            conformal=_conformal_from(d.get("conformal")),
            # a policy written before the field existed left empty sets as abstentions: keep that meaning
            empty_set=_str(d, "empty_set", "abstain"),
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
        selected, mask = scrc_sets(safe, policy.selection_threshold, policy.set_threshold, policy.empty_set)
        singleton = selected & (mask.sum(axis=1) == 1)
        labels = np.where(singleton, mask.argmax(axis=1), ABSTAIN).astype(np.int64)
        decided = selected  # selected rows keep their SCRC set, singleton or not
    if conformal is not None:
        conf_probs = raw if conformal.space == "raw" else cal
        conf_ok = np.isfinite(conf_probs).all(axis=1)
        attach = ~decided & conf_ok
        mask[attach] = conformal_sets(conf_probs[attach], conformal)
    return labels, mask, usable


def _mass_above(p: FloatArray) -> FloatArray:
    """Total probability of the classes ranked strictly above each class (N, K); ties ranked by class index."""
    order = np.argsort(-p, axis=1, kind="stable")
    sorted_p = np.take_along_axis(p, order, axis=1)
    above_sorted = np.zeros_like(sorted_p)
    np.cumsum(sorted_p[:, :-1], axis=1, out=above_sorted[:, 1:])
    out = np.empty_like(p)
    np.put_along_axis(out, order, above_sorted, axis=1)
    return out


def _ranks(p: FloatArray) -> IntArray:
    """1-based rank of each class (N, K) by decreasing probability, ties by class index."""
    order = np.argsort(-p, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(1, p.shape[1] + 1), order.shape), axis=1)
    return ranks


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
    _keys(d, "conformal", {"method", "qhat", "alpha"}, {"space", "lam", "k_reg", "randomization"})
    method = _str(d, "method")
    randomization = d.get("randomization")
    if randomization is not None and not isinstance(randomization, str):
        raise PolicyError(f"conformal.randomization={randomization!r} must be a string or null")
    if method == "aps" and "randomization" not in d:
        # Written before randomized APS: "aps" then meant the non-randomized inclusive-mass rule. Keep it.
        method = "aps-legacy"
    elif method in RANDOMIZED_FITS and randomization is None:
        raise PolicyError(f"conformal.method={method!r} needs randomization={APS_RANDOMIZATION!r}; got null")
    return ConformalConfig(
        method=method,
        qhat=_num(d, "qhat"),
        alpha=_num(d, "alpha"),
        space=_str(d, "space", "calibrated"),
        lam=_num(d, "lam") if "lam" in d else 0.0,
        k_reg=_int(d, "k_reg", 0),
        randomization=randomization,
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
