"""Phase `calibration`: fit a calibrator, conformal sets and an SCRC policy on val_calib; report on val_test.

1. Method: ``auto`` picks, by cross-fitted NLL inside val_calib (stratified folds), among identity,
   temperature, platt, beta and isotonic (binary) or identity and temperature (multi-class); or it is fixed.
   The chosen method is then refitted on all of val_calib.
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

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visionpipe.data.logits import LogitsMeta, load_logits, load_meta
from visionpipe.phases.calibrators_fit import fit_calibrator
from visionpipe.phases.conformal import ScrcFit, evaluate_conformal, fit_conformal, fit_scrc, scrc_report
from visionpipe.phases.report import Table, html_page
from visionpipe.serving.calibrators import CALIBRATION_METHODS, Calibrator
from visionpipe.serving.metrics import FloatArray, IntArray, calibration_bins, calibration_report, nll, softmax
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
    method: str
    requested_method: str
    cv_nll: dict[str, float]
    seed: int
    notes: tuple[str, ...]

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
            "selection": {
                "method": self.method,
                "requested": self.requested_method,
                "cv_nll": self.cv_nll,
                "folds": CV_FOLDS,
                "seed": self.seed,
            },
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

    chosen, cv_nll = select_method(meta, calib_logits, calib_labels, params)
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
        method=chosen,
        requested_method=calibration_method,
        cv_nll=cv_nll,
        seed=seed,
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


def select_method(
    meta: LogitsMeta, logits: FloatArray, labels: IntArray, params: CalibrationParams
) -> tuple[str, dict[str, float]]:
    """(method, cross-fitted NLL per candidate); a fixed method is validated and scored alone."""
    candidates = candidate_methods(len(meta.classes))
    if params.calibration_method != "auto":
        if params.calibration_method not in candidates:
            raise CalibrationPhaseError(
                f"calibration_method={params.calibration_method!r} is not available for K={len(meta.classes)}; "
                f"allowed: {candidates}"
            )
        candidates = (params.calibration_method,)
    scores = {m: nll(cross_fit_probabilities(m, meta, logits, labels, params.seed), labels) for m in candidates}
    return min(candidates, key=lambda m: (scores[m], candidates.index(m))), scores


def cross_fit_probabilities(
    method: str, meta: LogitsMeta, logits: FloatArray, labels: IntArray, seed: int
) -> FloatArray:
    """Out-of-fold calibrated probabilities: each fold is predicted by a calibrator fitted on the others."""
    out = np.empty(logits.shape, dtype=np.float64)
    for train_idx, test_idx in _folds(labels, seed):
        cal = fit_calibrator(method, len(meta.classes), logits[train_idx], labels[train_idx], meta.positive_index)
        out[test_idx] = cal.probabilities(logits[test_idx])
    return out


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


def _folds(labels: IntArray, seed: int) -> list[tuple[IntArray, IntArray]]:
    from sklearn.model_selection import KFold, StratifiedKFold

    counts = np.bincount(labels)
    smallest = int(counts[counts > 0].min())
    if smallest >= CV_FOLDS:
        splitter = StratifiedKFold(n_splits=CV_FOLDS, shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(len(labels)), labels))
    if len(labels) < 2:
        raise CalibrationPhaseError(f"val_calib has {len(labels)} image(s); cross-fitting needs >= 2")
    kfold = KFold(n_splits=min(CV_FOLDS, len(labels)), shuffle=True, random_state=seed)
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
