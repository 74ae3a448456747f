"""Conformal prediction sets and Selective Conformal Risk Control, fitted on val_calib probabilities.

- Split conformal (LAC / APS / APS-conservative / RAPS scores from
  ``visionpipe.serving.policies.conformal_score_matrix``): qhat is the ceil((n + 1)(1 - alpha))-th smallest
  calibration score, so for exchangeable data 1 - alpha <= P(y in set) <= 1 - alpha + 1 / (n + 1) (the upper
  bound when scores have no ties and the set is {score <= qhat}). ``aps`` is Romano et al.'s randomized APS,
  with u derived from each image's probabilities (``policies.aps_u``), the same rule here and when serving;
  ``aps-conservative`` has the same fit but a set that does not depend on u (non-randomized, it contains the
  ``aps`` set): only the lower bound holds, it over-covers.
- SCRC (Xu, Guo & Wei, arXiv 2512.12844), calibration-only variant SCRC-I as implemented here:
  val_calib is split at random (seeded) into a selection part and a risk part;
  1. selection: an image is selected iff its top probability >= lambda_1, lambda_1 being the empirical
     (1 - target_selection_rate) quantile of the top probabilities of the selection part;
  2. risk control on the selected images of the risk part (independent of lambda_1, so they are an i.i.d.
     sample of the selected population): sets C(x) = {y : 1 - p_y <= lambda_2}, loss
     1{y not in C(x)}; lambda_2 is the smallest value whose Clopper-Pearson (1 - delta) upper confidence
     bound on the selected miscoverage is <= alpha (PAC: with probability >= 1 - delta over val_calib the
     selected-set risk is <= alpha). When even zero misses cannot certify alpha at this n, lambda_2 = 1
     (every class in every set: all selected images abstain) and the fit says so.
  A selected image whose set is a singleton is decided; any other image abstains ({0}, {1} or abstain).

  Empty sets (rule ``empty_set="top1"``, the default of new fits). {y : 1 - p_y <= lambda_2} is empty when
  p_top < 1 - lambda_2; counting those as abstentions made the decision rate FALL as alpha rose (a larger alpha
  gives a smaller lambda_2, so more empty sets). The served set is instead C(x) = {argmax p} union
  {y : 1 - p_y <= lambda_2}: a selected image always holds its top-1 class, so an empty set becomes the top-1
  decision. The bound stays exact because lambda_2 is calibrated on the loss of that very set:
  1{y not in C(x)} = 1{s(x, y) > lambda_2} with s = 0 when y is the top-1 class and 1 - p_y otherwise, a
  non-increasing step function of lambda_2 (the sets are nested in lambda_2), so the Clopper-Pearson argument
  above applies to s unchanged. Since s <= 1 - p_y, lambda_2 can only fall compared with the ``abstain`` rule,
  and with it the share of non-singleton sets: for fixed val_calib the decision rate is non-decreasing in alpha
  (lambda_1 does not depend on alpha, the certified miss count grows with alpha, the sets shrink).
  ``empty_set="abstain"`` is the previous rule (s = 1 - p_y, empty sets abstain), kept for old bundles.
"""

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.stats import beta as beta_dist

from visionpipe.serving.metrics import FloatArray, IntArray
from visionpipe.serving.policies import (
    CONFORMAL_METHODS,
    SCRC_EMPTY_SET_RULES,
    ConformalConfig,
    ScrcPolicy,
    apply_policy,
    conformal_score_matrix,
    conformal_sets,
)


class ConformalError(ValueError):
    """Raised when a conformal quantity cannot be computed (alpha too small for n, bad parameter)."""


@dataclass(frozen=True)
class ScrcFit:
    policy: ScrcPolicy
    n_selection: int  # val_calib images that set the selection threshold
    n_risk: int  # val_calib images used for risk control
    n_selected: int  # of those, the selected ones
    max_misses: int  # largest selected-miss count the bound certifies; -1 when none
    empirical_risk: float
    feasible: bool

    def to_dict(self) -> dict[str, object]:
        return {
            "n_selection": self.n_selection,
            "n_risk": self.n_risk,
            "n_selected": self.n_selected,
            "max_misses": self.max_misses,
            "empirical_selected_risk": self.empirical_risk,
            "feasible": self.feasible,
        }


def conformal_quantile(scores: npt.ArrayLike, alpha: float) -> float:
    """The finite-sample split-conformal quantile: the ceil((n + 1)(1 - alpha))-th smallest score."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    _check_level("alpha", alpha)
    k = math.ceil((len(s) + 1) * (1 - alpha) - 1e-12)
    if k > len(s):
        raise ConformalError(
            f"alpha={alpha} is too small for n={len(s)} calibration images: need n >= {math.ceil(1 / alpha) - 1}"
        )
    return float(s[k - 1])


def fit_conformal(
    probs: npt.ArrayLike,
    labels: npt.ArrayLike,
    alpha: float,
    method: str = "aps",
    lam: float = 0.01,
    k_reg: int = 1,
    space: str = "calibrated",
) -> ConformalConfig:
    """Split-conformal config (qhat) from labelled calibration probabilities.

    ``aps`` scores each image with its own u (``policies.aps_u`` of its probabilities), exactly as serving does.
    """
    if method not in CONFORMAL_METHODS:
        raise ConformalError(f"conformal method={method!r} is not one of {CONFORMAL_METHODS}")
    p, y = _probs_labels(probs, labels)
    lam, k_reg = (lam, k_reg) if method == "raps" else (0.0, 0)
    scores = conformal_score_matrix(p, method, lam, k_reg)[np.arange(len(y)), y]
    return ConformalConfig(
        method=method, qhat=conformal_quantile(scores, alpha), alpha=alpha, space=space, lam=lam, k_reg=k_reg
    )


def set_report(mask: npt.ArrayLike, labels: npt.ArrayLike) -> dict[str, float]:
    """Empirical coverage, mean set size, empty and singleton rates of prediction sets."""
    m = np.asarray(mask, dtype=bool)
    y = np.asarray(labels, dtype=np.int64)
    size = m.sum(axis=1)
    return {
        "coverage": float(np.mean(m[np.arange(len(y)), y])),
        "mean_set_size": float(np.mean(size)),
        "empty_rate": float(np.mean(size == 0)),
        "singleton_rate": float(np.mean(size == 1)),
    }


def evaluate_conformal(config: ConformalConfig, probs: npt.ArrayLike, labels: npt.ArrayLike) -> dict[str, float]:
    return set_report(conformal_sets(probs, config), labels)


def fit_scrc(
    probs: npt.ArrayLike,
    labels: npt.ArrayLike,
    alpha: float,
    delta: float,
    target_selection_rate: float,
    space: str = "calibrated",
    selection_fraction: float = 0.5,
    seed: int = 0,
    empty_set: str = "top1",
) -> ScrcFit:
    """SCRC-I: selection threshold for the target rate on one part of val_calib, then PAC risk control on the
    selected images of the other part (independent of the selection threshold, so the bound is exact).

    ``empty_set`` is the served set rule (module docstring); lambda_2 is calibrated on that rule's own loss."""
    if empty_set not in SCRC_EMPTY_SET_RULES:
        raise ConformalError(f"empty_set={empty_set!r} is not one of {SCRC_EMPTY_SET_RULES}")
    p, y = _probs_labels(probs, labels)
    _check_level("alpha", alpha)
    _check_level("delta", delta)
    _check_level("selection_fraction", selection_fraction)
    if not 0.0 < target_selection_rate <= 1.0:
        raise ConformalError(f"target_selection_rate={target_selection_rate} must lie in (0, 1]")
    perm = np.random.default_rng(seed).permutation(len(y))
    n_first = min(max(round(selection_fraction * len(y)), 1), len(y) - 1) if len(y) > 1 else 1
    first, second = perm[:n_first], perm[n_first:]
    conf_first = np.sort(p[first].max(axis=1))[::-1]
    n_target = math.ceil(target_selection_rate * len(first) - 1e-12)
    selection_threshold = 0.0 if target_selection_rate >= 1.0 else float(conf_first[n_target - 1])
    chosen = second[p[second].max(axis=1) >= selection_threshold]
    losses = 1.0 - p[chosen, y[chosen]]  # miss iff loss > set_threshold
    if empty_set == "top1":  # the top-1 class is always in the set: never a miss (policies.scrc_sets)
        losses[p[chosen].argmax(axis=1) == y[chosen]] = 0.0
    losses = np.sort(losses)
    n_sel = len(losses)
    max_misses = _max_certified_misses(n_sel, alpha, delta)
    feasible = max_misses >= 0
    set_threshold = float(losses[n_sel - max_misses - 1]) if feasible else 1.0
    policy = ScrcPolicy(
        selection_threshold=selection_threshold,
        set_threshold=min(max(set_threshold, 0.0), 1.0),
        alpha=alpha,
        delta=delta,
        target_selection_rate=target_selection_rate,
        space=space,
        empty_set=empty_set,
    )
    risk = float(np.mean(losses > policy.set_threshold)) if n_sel else 0.0
    return ScrcFit(policy, len(first), len(second), n_sel, max_misses, risk, feasible)


def scrc_report(policy: ScrcPolicy, probs: npt.ArrayLike, labels: npt.ArrayLike) -> dict[str, float]:
    """Selection rate, selected-set risk (miscoverage), decision rate and accuracy of decided images."""
    p, y = _probs_labels(probs, labels)
    decisions = apply_policy(policy, p, p)
    selected = p.max(axis=1) >= policy.selection_threshold
    covered = decisions.set_mask[np.arange(len(y)), y]
    decided = decisions.labels >= 0
    return {
        "selection_rate": float(np.mean(selected)),
        "selected_risk": float(np.mean(~covered[selected])) if selected.any() else 0.0,
        "decision_rate": float(np.mean(decided)),
        "decided_accuracy": float(np.mean(decisions.labels[decided] == y[decided])) if decided.any() else 1.0,
        "mean_set_size_selected": float(decisions.set_mask[selected].sum(axis=1).mean()) if selected.any() else 0.0,
    }


def _max_certified_misses(n: int, alpha: float, delta: float) -> int:
    """Largest m with Clopper-Pearson upper bound UCB_{1-delta}(m misses of n) <= alpha; -1 when none."""
    if n == 0:
        return -1
    m = np.arange(n)  # m = n has an upper bound of 1 > alpha
    ucb = beta_dist.ppf(1.0 - delta, m + 1, n - m)
    ok = np.flatnonzero(ucb <= alpha)
    return int(ok[-1]) if ok.size else -1


def _probs_labels(probs: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[FloatArray, IntArray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if p.ndim != 2 or y.shape != (p.shape[0],) or len(y) == 0:
        raise ConformalError(f"probs must be (N>0, K) and labels (N,); got {p.shape}, {y.shape}")
    return p, y


def _check_level(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ConformalError(f"{name}={value} must lie in (0, 1)")
