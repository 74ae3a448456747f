"""Phase `calibration`: fit a calibrator, conformal sets and an SCRC policy on val_calib; report on val_test.

1. Method: ``auto`` picks, by cross-fitted NLL inside val_calib (stratified folds), among identity,
   temperature, platt, beta and isotonic (binary) or identity and temperature (multi-class); or it is fixed.
   Binary (BINARY_RULE): 10 repeats of stratified 5-fold cross-fitting, then the simplest method in
   SIMPLICITY_ORDER (identity < temperature < platt < beta < isotonic) whose mean per-image NLL excess over the
   lowest-NLL method is within one paired standard error: a more complex map must be significantly better.
   The rule was chosen by regret on held-out data (bench/calibration_choice.py). Multi-class (MULTICLASS_RULE):
   the lowest NLL of one 5-fold cross-fitting, unchanged. `selection` in calibration.json (the bundle's
   decision.calibration_selection) records the rule, every candidate's mean / std of fold NLL and its paired
   excess over the best, and why the winner won. The chosen method is then refitted on all of val_calib.
2. Metrics: ECE (15 equal-width and equal-mass bins), MCE, Brier, NLL, accuracy before and after, on val_calib
   (after = cross-fitted) and val_test; a reliability diagram (reliability.png, and reliability.html with the
   diagram inlined and the key figures: the page the component publishes as its HTML output for the Kubeflow UI).
3. Conformal sets (LAC / APS / RAPS) and SCRC-I on the calibrated val_calib probabilities
   (see visionpipe/phases/conformal.py). Note: the calibrator was fitted on the same images; with 1-3 parameters
   (temperature, platt, beta) the effect on coverage is negligible, isotonic is more flexible.
4. Policy: the sweep's threshold is carried into the calibrated space through the calibrator's monotone
   positive-score map when that map is strictly increasing and the decisions on val_calib stay identical;
   otherwise it stays in the raw space (every threshold states its space). Multi-class abstain thresholds stay
   raw: the top calibrated probability is not a monotone function of the top raw probability when K > 2.
   The bundle policy is ``hybrid`` holding ``threshold`` and ``scrc`` (active chosen by a parameter, the other
   is the fallback) with the conformal config attached to abstentions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visionpipe.data.logits import LogitsMeta, load_logits, load_meta
from visionpipe.phases.calibrators_fit import fit_calibrator
from visionpipe.phases.conformal import ScrcFit, evaluate_conformal, fit_conformal, fit_scrc, scrc_report
from visionpipe.phases.report import Table, html_page
from visionpipe.serving.calibrators import CALIBRATION_METHODS, Calibrator
from visionpipe.serving.metrics import FloatArray, IntArray, calibration_bins, calibration_report, softmax
from visionpipe.serving.policies import (
    CONFORMAL_METHODS,
    ConformalConfig,
    HybridPolicy,
    ThresholdPolicy,
    apply_policy,
    policy_from_dict,
)

METHOD_CHOICES = ("auto", *CALIBRATION_METHODS)
MULTICLASS_METHODS = ("identity", "temperature")
STRICTLY_MONOTONE = ("identity", "temperature", "platt", "beta")
ACTIVE_CHOICES = ("threshold", "scrc")
CV_FOLDS = 5
PLOT_FILE = "reliability.png"
HTML_FILE = "reliability.html"


class CalibrationPhaseError(ValueError):
    """Raised for invalid parameters or inputs of the calibration phase."""


@dataclass(frozen=True)
class CalibrationParams:
    calibration_method: str = "auto"
    alpha: float = 0.1
    conformal_score: str = "aps"
    scrc_selection_rate: float = 0.9
    scrc_delta: float = 0.1
    active_policy: str = "threshold"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.calibration_method not in METHOD_CHOICES:
            raise CalibrationPhaseError(
                f"calibration_method={self.calibration_method!r} is not one of {METHOD_CHOICES}"
            )
        if self.conformal_score not in CONFORMAL_METHODS:
            raise CalibrationPhaseError(f"conformal_score={self.conformal_score!r} is not one of {CONFORMAL_METHODS}")
        if self.active_policy not in ACTIVE_CHOICES:
            raise CalibrationPhaseError(f"active_policy={self.active_policy!r} is not one of {ACTIVE_CHOICES}")
        for name in ("alpha", "scrc_delta"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise CalibrationPhaseError(f"{name}={getattr(self, name)} must lie in (0, 1)")
        if not 0.0 < self.scrc_selection_rate <= 1.0:
            raise CalibrationPhaseError(f"scrc_selection_rate={self.scrc_selection_rate} must lie in (0, 1]")


@dataclass(frozen=True, eq=False)
class CalibrationResult:
    calibrator: Calibrator
    policy: HybridPolicy
    metrics: dict[str, dict[str, dict[str, float]]]  # split -> before/after -> metric
    conformal_config: ConformalConfig
    conformal_val_test: dict[str, dict[str, float]]  # score -> coverage, set sizes
    scrc: ScrcFit
    scrc_reports: dict[str, dict[str, float]]  # split -> report
    selection: Selection
    notes: tuple[str, ...]

    @property
    def method(self) -> str:
        return self.selection.method

    @property
    def requested_method(self) -> str:
        return self.selection.requested

    @property
    def cv_nll(self) -> dict[str, float]:
        return self.selection.cv.mean_nll()

    def to_json_dict(self) -> dict[str, object]:
        return {
            "calibrator": self.calibrator.to_dict(),
            "policy": self.policy.to_dict(),
            "metrics": self.metrics,
            "conformal": {
                "config": self.conformal_config.to_dict(),
                "val_test": self.conformal_val_test,
                "scrc": {"fit": self.scrc.to_dict(), **self.scrc_reports},
            },
            "selection": self.selection.to_dict(),
            "notes": list(self.notes),
        }


def run(
    logits_dir: Path,
    threshold_dir: Path,
    out_dir: Path,
    calibration_method: str = "auto",
    alpha: float = 0.1,
    conformal_score: str = "aps",
    scrc_selection_rate: float = 0.9,
    scrc_delta: float = 0.1,
    active_policy: str = "threshold",
    seed: int = 0,
) -> CalibrationResult:
    """Fit on val_calib, report on val_test; write calibration.json, reliability.png and summary.md."""
    params = CalibrationParams(
        calibration_method, alpha, conformal_score, scrc_selection_rate, scrc_delta, active_policy, seed
    )
    meta = load_meta(logits_dir)
    calib_logits, calib_labels = load_logits(logits_dir, "val_calib")
    test_logits, test_labels = load_logits(logits_dir, "val_test")
    sweep_policy = load_threshold_policy(threshold_dir)

    selection = select_method(meta, calib_logits, calib_labels, params)
    chosen = selection.method
    calibrator = fit_calibrator(chosen, len(meta.classes), calib_logits, calib_labels, meta.positive_index)
    cross_fitted = cross_fit_probabilities(chosen, meta, calib_logits, calib_labels, seed)

    raw_calib, cal_calib = softmax(calib_logits), calibrator.probabilities(calib_logits)
    raw_test, cal_test = softmax(test_logits), calibrator.probabilities(test_logits)
    metrics = {
        "val_calib": {
            "before": calibration_report(raw_calib, calib_labels),
            "after": calibration_report(cross_fitted, calib_labels),
        },
        "val_test": {
            "before": calibration_report(raw_test, test_labels),
            "after": calibration_report(cal_test, test_labels),
        },
    }
    conformal_cfg = fit_conformal(cal_calib, calib_labels, alpha, conformal_score)
    scrc = fit_scrc(cal_calib, calib_labels, alpha, scrc_delta, scrc_selection_rate, seed=seed)
    threshold_policy, carry_note = carry_threshold(sweep_policy, calibrator, raw_calib, cal_calib)
    others = [m for m in ACTIVE_CHOICES if m != active_policy]
    policy = HybridPolicy({"threshold": threshold_policy, "scrc": scrc.policy}, active_policy, others[0], conformal_cfg)
    result = CalibrationResult(
        calibrator=calibrator,
        policy=policy,
        metrics=metrics,
        conformal_config=conformal_cfg,
        conformal_val_test={
            score: evaluate_conformal(fit_conformal(cal_calib, calib_labels, alpha, score), cal_test, test_labels)
            for score in CONFORMAL_METHODS
        },
        scrc=scrc,
        scrc_reports={
            "val_calib": scrc_report(scrc.policy, cal_calib, calib_labels),
            "val_test": scrc_report(scrc.policy, cal_test, test_labels),
        },
        selection=selection,
        notes=(carry_note,) + (() if scrc.feasible else ("scrc infeasible at this n: every image abstains",)),
    )
    write_outputs(result, (raw_calib, cross_fitted, calib_labels), (raw_test, cal_test, test_labels), out_dir)
    return result


def load_threshold_policy(threshold_dir: Path) -> ThresholdPolicy:
    """The sweep's policy from threshold.json (raw space)."""
    path = Path(threshold_dir) / "threshold.json"
    if not path.is_file():
        raise CalibrationPhaseError(f"{path} is missing; run the threshold_sweep phase first")
    policy = policy_from_dict(json.loads(path.read_text())["policy"])
    if not isinstance(policy, ThresholdPolicy):
        raise CalibrationPhaseError(f"{path}: policy kind={policy.kind!r} must be 'threshold'")
    return policy


def candidate_methods(n_classes: int) -> tuple[str, ...]:
    return CALIBRATION_METHODS if n_classes == 2 else MULTICLASS_METHODS


def select_method(meta: LogitsMeta, logits: FloatArray, labels: IntArray, params: CalibrationParams) -> Selection:
    """The method to fit and how it was chosen: `auto` applies BINARY_RULE (K = 2) or MULTICLASS_RULE to the
    cross-fitted losses of the task's candidates; a fixed method is validated and scored alone."""
    n_classes = len(meta.classes)
    candidates = candidate_methods(n_classes)
    if params.calibration_method != "auto":
        if params.calibration_method not in candidates:
            raise CalibrationPhaseError(
                f"calibration_method={params.calibration_method!r} is not available for K={n_classes}; "
                f"allowed: {candidates}"
            )
        rule = FIXED_RULE
        candidates = (params.calibration_method,)
    else:
        rule = BINARY_RULE if n_classes == 2 else MULTICLASS_RULE
    # Hundreds of fits of 1-3 parameters: scipy's L-BFGS-B calls BLAS on tiny arrays, where BLAS threads only
    # contend (one bench/calibration_choice.py split, n=200: 3.6 s with the default threads, 0.6 s with one, on
    # 2 cores at load 3.8). threadpoolctl is scikit-learn's own dependency.
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]  # threadpoolctl ships no types

    with threadpool_limits(1):
        cv = cross_fit_losses(
            candidates, n_classes, meta.positive_index, logits, labels, params.seed, rule.n_folds, rule.repeats
        )
    method, reason = (candidates[0], "requested") if rule is FIXED_RULE else rule.choose(cv)
    return Selection(method, params.calibration_method, rule, cv, reason, params.seed)


def cross_fit_probabilities(
    method: str, meta: LogitsMeta, logits: FloatArray, labels: IntArray, seed: int
) -> FloatArray:
    """Out-of-fold calibrated probabilities: each fold is predicted by a calibrator fitted on the others."""
    return _cross_fit(method, len(meta.classes), meta.positive_index, logits, labels, _folds(labels, seed))


def _cross_fit(
    method: str,
    n_classes: int,
    positive_index: int,
    logits: FloatArray,
    labels: IntArray,
    splits: list[tuple[IntArray, IntArray]],
) -> FloatArray:
    out = np.empty(logits.shape, dtype=np.float64)
    for train_idx, test_idx in splits:
        cal = fit_calibrator(method, n_classes, logits[train_idx], labels[train_idx], positive_index)
        out[test_idx] = cal.probabilities(logits[test_idx])
    return out


# ------------------------------------------------------------------------------------ method selection
# The order of simplicity the rules prefer, simplest first, by nesting and number of fitted parameters:
# identity (0) is temperature at T = 1; temperature (1, softmax(z / T)) is platt at a = 1 / T, b = 0; platt
# (2, sigmoid(a d + b)) is beta at a = b (ln s - ln(1 - s) = d); beta has 3; isotonic (a free non-decreasing
# step map, up to one step per image) comes last. Multi-class tasks have identity < temperature only.
SIMPLICITY_ORDER = CALIBRATION_METHODS
_NLL_EPS = 1e-12  # the clip of visionpipe.serving.metrics.nll


@dataclass(frozen=True, eq=False)
class CvLosses:
    """Out-of-fold NLL of each image under each candidate over `repeats` stratified k-fold splits (repeat r
    draws its folds with seed + r): sample_nll[r, j, i] is image i's NLL under methods[j] fitted without i's fold."""

    methods: tuple[str, ...]
    sample_nll: FloatArray  # (repeats, methods, n)
    folds: IntArray  # (repeats, n): the fold of each image in each repeat
    n_folds: int

    def fold_nll(self) -> FloatArray:
        """(methods, repeats * n_folds): the mean NLL on each held-out fold."""
        repeats = self.sample_nll.shape[0]
        out = np.empty((len(self.methods), repeats * self.n_folds), dtype=np.float64)
        for r in range(repeats):
            for f in range(self.n_folds):
                out[:, r * self.n_folds + f] = self.sample_nll[r][:, self.folds[r] == f].mean(axis=1)
        return out

    def mean_nll(self) -> dict[str, float]:
        """The cross-fitted NLL of each method, averaged over images and repeats."""
        return {m: float(v) for m, v in zip(self.methods, self.sample_nll.mean(axis=(0, 2)), strict=True)}

    def lowest(self) -> str:
        """The method with the lowest cross-fitted NLL (ties: the simpler in SIMPLICITY_ORDER)."""
        means = self.mean_nll()
        return min(self.methods, key=lambda m: (means[m], SIMPLICITY_ORDER.index(m)))

    def paired(self, method: str, reference: str) -> tuple[float, float]:
        """Mean and standard error of NLL(method) - NLL(reference) per image, each image's losses first averaged
        over the repeats (n paired differences on the same images and folds)."""
        i, j = self.methods.index(method), self.methods.index(reference)
        d = (self.sample_nll[:, i, :] - self.sample_nll[:, j, :]).mean(axis=0)
        se = float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("inf")
        return float(np.mean(d)), se


def cross_fit_losses(
    methods: tuple[str, ...],
    n_classes: int,
    positive_index: int,
    logits: FloatArray,
    labels: IntArray,
    seed: int,
    n_folds: int = CV_FOLDS,
    repeats: int = 1,
) -> CvLosses:
    """Per-image out-of-fold NLL of each method over `repeats` stratified `n_folds`-fold splits."""
    n = len(labels)
    sample = np.empty((repeats, len(methods), n), dtype=np.float64)
    folds = np.empty((repeats, n), dtype=np.int64)
    rows = np.arange(n)
    used_folds = n_folds
    for r in range(repeats):
        splits = _folds(labels, seed + r, n_folds)
        used_folds = len(splits)
        for f, (_, test_idx) in enumerate(splits):
            folds[r, test_idx] = f
        for j, method in enumerate(methods):
            probs = _cross_fit(method, n_classes, positive_index, logits, labels, splits)
            sample[r, j] = -np.log(np.clip(probs[rows, labels], _NLL_EPS, 1.0))
    return CvLosses(methods, sample, folds, used_folds)


RULE_KINDS = ("fixed", "min", "one_se", "paired", "forward")


@dataclass(frozen=True)
class SelectionRule:
    """How `auto` turns cross-fitted losses into a method. kind: `min`, the lowest mean NLL; `one_se`, the
    simplest method whose mean NLL is within z standard errors of the best method's fold NLLs (Hastie et al.,
    ESL 7.10); `paired`, the simplest method whose mean per-image NLL excess over the best is within z paired
    standard errors, i.e. a more complex map must be significantly better to be chosen."""

    name: str
    kind: str
    n_folds: int = CV_FOLDS
    repeats: int = 1
    z: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in RULE_KINDS:
            raise CalibrationPhaseError(f"rule kind={self.kind!r} is not one of {RULE_KINDS}")
        if self.n_folds < 2 or self.repeats < 1 or self.z < 0:
            raise CalibrationPhaseError(
                f"rule {self.name!r}: n_folds={self.n_folds} must be >= 2, repeats={self.repeats} >= 1, z={self.z} >= 0"
            )

    def describe(self) -> str:
        cv = f"{self.repeats} x stratified {self.n_folds}-fold cross-fitting on val_calib"
        if self.kind == "fixed":
            return f"the requested method, scored by {cv}"
        if self.kind == "min":
            return f"{cv}; the lowest mean out-of-fold NLL wins (ties: the simpler)"
        if self.kind == "one_se":
            return f"{cv}; the simplest method within {self.z:g} SE of the best method's fold NLLs wins"
        if self.kind == "forward":
            return (
                f"{cv}; starting from the simplest, step to the next more complex method whenever it beats the "
                f"current one by more than {self.z:g} paired SE of the per-image NLL"
            )
        return (
            f"{cv}; the simplest method whose per-image NLL excess over the lowest-NLL method is within "
            f"{self.z:g} paired SE wins (a more complex map must be significantly better)"
        )

    def choose(self, cv: CvLosses) -> tuple[str, str]:
        """(winner, why it won), preferring the simpler method in SIMPLICITY_ORDER."""
        order = [m for m in SIMPLICITY_ORDER if m in cv.methods]
        if self.kind == "forward":
            return self._forward(cv, order)
        means = cv.mean_nll()
        best = cv.lowest()
        lowest = f"{best} has the lowest cross-fitted NLL ({means[best]:.5f})"
        simpler = order[: order.index(best)]
        if self.kind in ("min", "fixed"):
            return best, lowest
        if not simpler:
            return best, lowest + " and is the simplest candidate"
        if self.kind == "one_se":
            fold = cv.fold_nll()[cv.methods.index(best)]
            margin = self.z * float(np.std(fold, ddof=1) / np.sqrt(len(fold)))
            winner = next(m for m in order if means[m] <= means[best] + margin)
            if winner == best:
                return best, f"{lowest}; no simpler method is within {self.z:g} SE ({margin:.5f})"
            return winner, (
                f"{winner} ({means[winner]:.5f}) is simpler than {best} ({means[best]:.5f}, the lowest) and within "
                f"{self.z:g} SE ({margin:.5f}) of it"
            )
        for m in simpler:
            excess, se = cv.paired(m, best)
            if excess <= self.z * se:
                return m, (
                    f"{m} is simpler than {best} (the lowest cross-fitted NLL) and only {excess:.5f} nats/image "
                    f"worse, within {self.z:g} paired SE ({se:.5f})"
                )
        gains = ", ".join(f"{m} by {_excess_in_se(cv, m, best)}" for m in simpler)
        return best, f"{lowest}, significantly better than every simpler method: {gains}"

    def _forward(self, cv: CvLosses, order: list[str]) -> tuple[str, str]:
        current, steps = order[0], []
        for m in order[1:]:
            gain, se = cv.paired(current, m)
            if gain > self.z * se:
                steps.append(f"{m} beats {current} by {_excess_in_se(cv, current, m)}")
                current = m
        if not steps:
            return current, f"no more complex method beats {current} by more than {self.z:g} paired SE"
        return current, "; ".join(steps)


def _excess_in_se(cv: CvLosses, method: str, best: str) -> str:
    excess, se = cv.paired(method, best)
    return f"{excess:.5f} nats/image ({excess / se:.1f} paired SE)" if se > 0 else f"{excess:.5f} nats/image"


FIXED_RULE = SelectionRule("fixed", "fixed")
# The rules bench/calibration_choice.py compares (the names its table shows); "cv5_min" is the rule before
# issue 16 and stays the multi-class rule.
CANDIDATE_RULES = (
    SelectionRule("cv5_min", "min"),
    SelectionRule("cv10_min", "min", n_folds=10),
    SelectionRule("cv5x10_min", "min", repeats=10),
    SelectionRule("cv5x10_one_se", "one_se", repeats=10, z=1.0),
    SelectionRule("cv5_paired0.5", "paired", z=0.5),
    SelectionRule("cv5_paired1", "paired", z=1.0),
    SelectionRule("cv5x10_paired0.5", "paired", repeats=10, z=0.5),
    SelectionRule("cv5x10_paired1", "paired", repeats=10, z=1.0),
    SelectionRule("cv5x10_paired2", "paired", repeats=10, z=2.0),
    SelectionRule("cv5_forward1", "forward", z=1.0),
)
RULES = {rule.name: rule for rule in CANDIDATE_RULES}
MULTICLASS_RULE = RULES["cv5_min"]
BINARY_RULE = RULES["cv5x10_paired1"]  # chosen by bench/calibration_choice.py (README: calibrator choice)


@dataclass(frozen=True, eq=False)
class Selection:
    """What `select_method` did, recorded as calibration.json `selection` (bundle: decision.calibration_selection)."""

    method: str
    requested: str
    rule: SelectionRule
    cv: CvLosses
    reason: str
    seed: int

    def to_dict(self) -> dict[str, object]:
        fold = self.cv.fold_nll()
        means = self.cv.mean_nll()
        best = self.cv.lowest()
        per_method: dict[str, dict[str, float]] = {}
        for j, m in enumerate(self.cv.methods):
            excess, se = self.cv.paired(m, best)
            per_method[m] = {
                "cv_nll": means[m],
                "fold_nll_mean": float(fold[j].mean()),
                "fold_nll_std": float(fold[j].std(ddof=1)) if fold.shape[1] > 1 else 0.0,
                "excess_over_best": excess,
                "excess_se": se if np.isfinite(se) else 0.0,
            }
        return {
            "method": self.method,
            "requested": self.requested,
            "rule": self.rule.name,
            "rule_description": self.rule.describe(),
            "reason": self.reason,
            "simplicity_order": [m for m in SIMPLICITY_ORDER if m in self.cv.methods],
            "candidates": per_method,
            "cv_nll": means,
            "folds": self.cv.n_folds,
            "repeats": int(self.cv.sample_nll.shape[0]),
            "n_images": int(self.cv.sample_nll.shape[2]),
            "seed": self.seed,
        }


def carry_threshold(
    policy: ThresholdPolicy, calibrator: Calibrator, raw: FloatArray, calibrated: FloatArray
) -> tuple[ThresholdPolicy, str]:
    """The sweep threshold in the calibrated space when that reproduces val_calib exactly, else unchanged."""
    if policy.task != "binary":
        return policy, "multi-class abstain threshold kept in the raw space (top-prob map is not monotone)"
    if calibrator.method not in STRICTLY_MONOTONE:
        return policy, f"threshold kept in the raw space: the {calibrator.method} map has flat steps"
    carried_t = float(calibrator.positive_map(np.array([policy.threshold]))[0])
    if not 0.0 <= carried_t <= 1.0:
        return policy, f"threshold kept in the raw space: carried value {carried_t} is outside [0, 1]"
    carried = ThresholdPolicy(carried_t, "calibrated", "binary", policy.positive_index)
    same = np.array_equal(apply_policy(carried, calibrated, raw).labels, apply_policy(policy, calibrated, raw).labels)
    if not same:
        return policy, "threshold kept in the raw space: the carried threshold changed a val_calib decision"
    return carried, f"threshold {policy.threshold:.6g} (raw) carried to {carried_t:.6g} (calibrated)"


def write_outputs(
    result: CalibrationResult,
    calib: tuple[FloatArray, FloatArray, IntArray],
    test: tuple[FloatArray, FloatArray, IntArray],
    out_dir: Path,
) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result.to_json_dict(), indent=2, sort_keys=True) + "\n"
    (out_dir / "calibration.json").write_text(text)
    _reliability_plot(calib, test, out_dir / PLOT_FILE)
    (out_dir / "summary.md").write_text(summary_markdown(result))
    (out_dir / HTML_FILE).write_text(reliability_html(result, out_dir / PLOT_FILE))


def summary_markdown(result: CalibrationResult) -> str:
    lines = [
        f"# Calibration: `{result.method}` (requested `{result.requested_method}`)",
        "",
        "cross-fitted NLL on val_calib: " + ", ".join(f"{m} {v:.4f}" for m, v in sorted(result.cv_nll.items())),
        "",
        f"rule `{result.selection.rule.name}` ({result.selection.rule.describe()}): {result.selection.reason}",
        "",
        "| split | stage | ECE | ECE (mass) | MCE | Brier | NLL | accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for split, stages in result.metrics.items():
        for stage, m in stages.items():
            lines.append(
                f"| {split} | {stage} | {m['ece']:.4f} | {m['ece_mass']:.4f} | {m['mce']:.4f} | "
                f"{m['brier']:.4f} | {m['nll']:.4f} | {m['accuracy']:.4f} |"
            )
    lines += ["", "| conformal score (val_test) | coverage | mean set size |", "|---|---|---|"]
    lines[-2] = f"| conformal score (val_test, alpha={result.conformal_config.alpha:g}) | coverage | mean set size |"
    for score, rep in result.conformal_val_test.items():
        lines.append(f"| {score} | {rep['coverage']:.4f} | {rep['mean_set_size']:.3f} |")
    scrc = result.scrc_reports["val_test"]
    lines += [
        "",
        f"SCRC (val_test): selection rate {scrc['selection_rate']:.3f}, "
        f"selected risk {scrc['selected_risk']:.4f}, "
        f"decision rate {scrc['decision_rate']:.3f}",
        f"Policy: hybrid, active `{result.policy.active}`, fallback `{result.policy.fallback}`",
    ]
    lines += [f"- note: {note}" for note in result.notes]
    return "\n".join(lines) + "\n"


def reliability_html(result: CalibrationResult, png_path: Path) -> str:
    """The reliability diagram (inlined) with ECE / Brier / NLL before and after and the conformal coverage."""
    keys = ("ece", "brier", "nll", "accuracy")
    calibration_rows = [
        (split, stage, *(f"{m[k]:.4f}" for k in keys))
        for split, stages in result.metrics.items()
        for stage, m in stages.items()
    ]
    alpha = result.conformal_config.alpha
    conformal_rows = [
        (score, f"{rep['coverage']:.4f}", f"{1 - alpha:.4f}", f"{rep['mean_set_size']:.3f}")
        for score, rep in result.conformal_val_test.items()
    ]
    title = f"Calibration: {result.method} (requested {result.requested_method})"
    tables: list[Table] = [
        (("split", "stage", "ECE (15 bins)", "Brier", "NLL", "accuracy"), calibration_rows),
        (("conformal score (val_test)", "coverage", "target", "mean set size"), conformal_rows),
        (
            ("policy", "value"),
            [("active", result.policy.active), ("fallback", result.policy.fallback)],
        ),
    ]
    return html_page(title, png_path, tables, result.notes)


def _folds(labels: IntArray, seed: int, n_folds: int = CV_FOLDS) -> list[tuple[IntArray, IntArray]]:
    from sklearn.model_selection import KFold, StratifiedKFold

    counts = np.bincount(labels)
    smallest = int(counts[counts > 0].min())
    if smallest >= n_folds:
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(len(labels)), labels))
    if len(labels) < 2:
        raise CalibrationPhaseError(f"val_calib has {len(labels)} image(s); cross-fitting needs >= 2")
    kfold = KFold(n_splits=min(n_folds, len(labels)), shuffle=True, random_state=seed)
    return list(kfold.split(np.zeros(len(labels))))


def _reliability_plot(
    calib: tuple[FloatArray, FloatArray, IntArray], test: tuple[FloatArray, FloatArray, IntArray], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax, (title, (before, after, labels)) in zip(
        axes, (("val_calib (after = cross-fitted)", calib), ("val_test", test)), strict=True
    ):
        for name, probs in (("before", before), ("after", after)):
            conf, acc, count = calibration_bins(probs, labels, 15, "width")
            keep = count > 0
            ax.plot(conf[keep], acc[keep], marker="o", ms=3, label=name)
        ax.plot([0, 1], [0, 1], ls=":", c="grey")
        ax.set_xlabel("confidence (top-class probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(title)
        ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
