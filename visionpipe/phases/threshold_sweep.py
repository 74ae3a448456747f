"""Phase `threshold_sweep`: choose the decision threshold on val_calib logits.

Binary tasks (K = 2): an exact sweep over every distinct score s = raw P(positive) (sort once, cumulative
TP/FP counts), so the chosen threshold is optimal among all thresholds, not just among a grid. The objective
is ``mcc`` (default), ``f1``, ``youden``, ``recall_at_precision>=P`` or ``precision_at_recall>=R``.

Multi-class tasks: a selective-classification abstain threshold on the top-class probability: the exact
risk-coverage curve, and the threshold with the largest coverage whose selective accuracy meets a target.

Thresholds are stored in the raw probability space ("positive iff p >= t" / "abstain iff top < t"); each
chosen threshold sits midway between two adjacent distinct scores, so small numeric differences downstream do
not flip decisions. ``run`` writes threshold.json, curve.csv, sweep.png, summary.md and sweep.html (the plot
inlined with the key figures: the page the component publishes as its HTML output for the Kubeflow UI).
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from visionpipe.data.logits import LogitsMeta, load_logits, load_meta
from visionpipe.phases.report import html_page
from visionpipe.serving.metrics import FloatArray, IntArray, binary_metrics_from_counts, softmax
from visionpipe.serving.policies import ThresholdPolicy, apply_policy

if TYPE_CHECKING:  # the phase core imports nothing from kfp at run time (visionpipe/kfp/components/ does)
    from kfp.dsl import ClassificationMetrics

SIMPLE_OBJECTIVES = ("mcc", "f1", "youden")
CONSTRAINED_OBJECTIVES = ("recall_at_precision", "precision_at_recall")
ROC_POINTS = 200
PLOT_FILE = "sweep.png"
HTML_FILE = "sweep.html"
_CONSTRAINED = re.compile(r"^(recall_at_precision|precision_at_recall)>=([0-9]*\.?[0-9]+)$")


class SweepError(ValueError):
    """Raised when the inputs cannot support a threshold (bad files, one class only, bad parameter)."""


class ObjectiveInfeasibleError(SweepError):
    """Raised when no threshold satisfies the objective's constraint."""


# -------------------------------------------------------------------------------------------- objective
@dataclass(frozen=True)
class Objective:
    """A parsed objective; ``bound`` is the constraint of the constrained objectives."""

    name: str
    bound: float | None = None

    def __post_init__(self) -> None:
        if self.name in SIMPLE_OBJECTIVES and self.bound is None:
            return
        if self.name in CONSTRAINED_OBJECTIVES and self.bound is not None and 0.0 <= self.bound <= 1.0:
            return
        raise SweepError(
            f"objective={self.name!r} bound={self.bound} is invalid; allowed: {SIMPLE_OBJECTIVES} or "
            f"'recall_at_precision>=P' / 'precision_at_recall>=R' with P, R in [0, 1]"
        )

    @property
    def metric(self) -> str:
        """The metric that is maximised (and bootstrapped)."""
        return {"recall_at_precision": "recall", "precision_at_recall": "precision"}.get(self.name, self.name)

    def __str__(self) -> str:
        return self.name if self.bound is None else f"{self.name}>={self.bound:g}"


def parse_objective(text: str) -> Objective:
    """'mcc' | 'f1' | 'youden' | 'recall_at_precision>=0.9' | 'precision_at_recall>=0.95'."""
    text = text.strip()
    match = _CONSTRAINED.match(text.replace(" ", ""))
    if match:
        return Objective(match.group(1), float(match.group(2)))
    if text not in SIMPLE_OBJECTIVES:
        raise SweepError(
            f"objective={text!r} is not one of {SIMPLE_OBJECTIVES}, 'recall_at_precision>=P', 'precision_at_recall>=R'"
        )
    return Objective(text)


def objective_values(metrics: dict[str, FloatArray], objective: Objective) -> FloatArray:
    """Objective per candidate; -inf where a constraint is not met."""
    values = metrics[objective.metric]
    if objective.bound is not None:
        constraint = "precision" if objective.name == "recall_at_precision" else "recall"
        values = np.where(metrics[constraint] >= objective.bound, values, -np.inf)
    out: FloatArray = np.asarray(values, dtype=np.float64)
    return out


# ------------------------------------------------------------------------------------------ binary sweep
@dataclass(frozen=True, eq=False)
class BinaryCurve:
    """One row per candidate rule 'positive iff s >= score', highest score first.

    ``threshold`` is the stored operational threshold of each row (strictly above the next lower score);
    the last row may be 'nothing positive' (score = inf) when a threshold above every score fits in [0, 1].
    """

    score: FloatArray
    threshold: FloatArray
    tp: FloatArray
    fp: FloatArray
    tn: FloatArray
    fn: FloatArray
    metrics: dict[str, FloatArray]


def exact_sweep(scores: npt.ArrayLike, positives: npt.ArrayLike) -> BinaryCurve:
    """Confusion counts and metrics at every distinct score (vectorised, O(N log N))."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positives).astype(bool)
    if s.ndim != 1 or s.shape != y.shape or s.size == 0:
        raise SweepError(f"scores and labels must be equal-length non-empty 1-D arrays; got {s.shape}, {y.shape}")
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    last_of_group = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    distinct = s_sorted[last_of_group]
    tp = np.cumsum(y_sorted)[last_of_group].astype(np.float64)
    fp = (last_of_group + 1) - tp
    lower = np.r_[distinct[1:], -np.inf]
    thresholds = _midpoints(distinct, lower)
    if distinct[0] < 1.0:  # the 'nothing positive' rule fits in [0, 1]
        top = distinct[0] + (1.0 - distinct[0]) / 2
        distinct = np.r_[np.inf, distinct]
        thresholds = np.r_[top if top > distinct[1] else 1.0, thresholds]
        tp, fp = np.r_[0.0, tp], np.r_[0.0, fp]
    n_pos = float(y.sum())
    n_neg = float(y.size - n_pos)
    tn, fn = n_neg - fp, n_pos - tp
    return BinaryCurve(distinct, thresholds, tp, fp, tn, fn, binary_metrics_from_counts(tp, fp, tn, fn))


def choose_binary(curve: BinaryCurve, objective: Objective) -> int:
    """Index of the best row; ties go to the highest threshold."""
    values = objective_values(curve.metrics, objective)
    if not np.isfinite(values).any():
        constraint = "precision" if objective.name == "recall_at_precision" else "recall"
        best = float(curve.metrics[constraint].max())
        raise ObjectiveInfeasibleError(
            f"objective={objective} is infeasible on val_calib: the best {constraint} of any threshold is {best:.4f}"
        )
    return int(np.argmax(values))


def bootstrap_binary(
    counts: tuple[float, float, float, float], objective: Objective, n_boot: int, seed: int
) -> tuple[float, float]:
    """95% percentile interval of the objective's metric at a fixed threshold.

    Resampling images with replacement at a fixed threshold only changes the confusion counts, which are
    then exactly multinomial: drawn directly, vectorised.
    """
    draws = _multinomial(counts, n_boot, seed)
    values = binary_metrics_from_counts(draws[:, 0], draws[:, 1], draws[:, 2], draws[:, 3])[objective.metric]
    return _percentile_interval(values)


# ------------------------------------------------------------------------------------- multi-class sweep
@dataclass(frozen=True, eq=False)
class RiskCoverageCurve:
    """One row per candidate rule 'accept iff top probability >= score', highest score first."""

    score: FloatArray
    threshold: FloatArray
    accepted: FloatArray
    correct: FloatArray
    coverage: FloatArray
    selective_accuracy: FloatArray

    @property
    def risk(self) -> FloatArray:
        out: FloatArray = 1.0 - self.selective_accuracy
        return out


def risk_coverage(probs: npt.ArrayLike, labels: npt.ArrayLike) -> RiskCoverageCurve:
    """Exact risk-coverage curve of the top-class probability (selective classification)."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    conf = p.max(axis=1)
    correct = p.argmax(axis=1) == y
    order = np.argsort(-conf, kind="stable")
    c_sorted = conf[order]
    last_of_group = np.flatnonzero(np.r_[c_sorted[1:] != c_sorted[:-1], True])
    distinct = c_sorted[last_of_group]
    accepted = (last_of_group + 1).astype(np.float64)
    n_correct = np.cumsum(correct[order])[last_of_group].astype(np.float64)
    thresholds = _midpoints(distinct, np.r_[distinct[1:], -np.inf])
    return RiskCoverageCurve(distinct, thresholds, accepted, n_correct, accepted / len(y), n_correct / accepted)


def choose_abstain(curve: RiskCoverageCurve, target: float) -> int:
    """Index of the largest-coverage row whose selective accuracy >= target."""
    ok = np.flatnonzero(curve.selective_accuracy >= target)
    if ok.size == 0:
        raise ObjectiveInfeasibleError(
            f"target_selective_accuracy={target} is infeasible on val_calib: even the most confident group "
            f"has selective accuracy {curve.selective_accuracy[0]:.4f}"
        )
    return int(ok[-1])


def bootstrap_selective(curve: RiskCoverageCurve, index: int, n: int, n_boot: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the selective accuracy at a fixed threshold (multinomial resampling)."""
    acc, cor = float(curve.accepted[index]), float(curve.correct[index])
    draws = _multinomial((cor, acc - cor, n - acc, 0.0), n_boot, seed)
    sel = np.divide(draws[:, 0], draws[:, 0] + draws[:, 1], out=np.ones(n_boot), where=draws[:, :2].sum(1) > 0)
    return _percentile_interval(sel)


# ------------------------------------------------------------------------------------------------ result
@dataclass(frozen=True, eq=False)
class SweepResult:
    task: str
    classes: tuple[str, ...]
    positive_index: int | None
    objective: str
    threshold: float
    space: str
    objective_value: float
    ci_low: float
    ci_high: float
    bootstrap: int
    seed: int
    metrics: dict[str, float]
    metrics_val_test: dict[str, float]
    policy: ThresholdPolicy
    decisions: IntArray  # the sweep's own decision per val_calib image (-1 = abstain)
    confusion: list[list[int]]
    roc: dict[str, list[float]] | None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_json_dict(self) -> dict[str, object]:
        return {
            "task": self.task,
            "classes": list(self.classes),
            "positive_index": self.positive_index,
            "objective": self.objective,
            "threshold": self.threshold,
            "space": self.space,
            "objective_value": self.objective_value,
            "ci": {"low": self.ci_low, "high": self.ci_high, "level": 0.95, "bootstrap": self.bootstrap},
            "seed": self.seed,
            "split": "val_calib",
            "metrics": self.metrics,
            "metrics_val_test": self.metrics_val_test,
            "policy": self.policy.to_dict(),
            "confusion_matrix": self.confusion,
            "notes": list(self.notes),
        }


def run(
    logits_dir: Path,
    out_dir: Path,
    objective: str = "mcc",
    target_selective_accuracy: float = 0.99,
    bootstrap: int = 1000,
    seed: int = 0,
) -> SweepResult:
    """Choose the threshold on val_calib, report it on val_test, write the four output files."""
    if bootstrap < 1:
        raise SweepError(f"bootstrap={bootstrap} must be >= 1")
    if not 0.0 < target_selective_accuracy <= 1.0:
        raise SweepError(f"target_selective_accuracy={target_selective_accuracy} must lie in (0, 1]")
    meta = load_meta(logits_dir)
    logits, labels = load_logits(logits_dir, "val_calib")
    _check_width(meta, logits)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if meta.task == "binary":
        result, table = _sweep_binary(meta, logits, labels, parse_objective(objective), bootstrap, seed)
    else:
        result, table = _sweep_multiclass(meta, logits, labels, target_selective_accuracy, bootstrap, seed)
    test_logits, test_labels = load_logits(logits_dir, "val_test")
    result = _with_test_metrics(result, test_logits, test_labels)
    write_outputs(result, table, out_dir)
    return result


def write_outputs(result: SweepResult, table: dict[str, FloatArray], out_dir: Path) -> None:
    (out_dir / "threshold.json").write_text(json.dumps(result.to_json_dict(), indent=2, sort_keys=True) + "\n")
    _write_csv(out_dir / "curve.csv", table)
    _plot(result, table, out_dir / PLOT_FILE)
    (out_dir / "summary.md").write_text(summary_markdown(result))
    (out_dir / HTML_FILE).write_text(sweep_html(result, out_dir / PLOT_FILE))


def summary_markdown(result: SweepResult) -> str:
    lines = [
        f"# Threshold sweep ({result.task})",
        "",
        f"- objective: `{result.objective}` = **{result.objective_value:.4f}** "
        f"(95% bootstrap CI [{result.ci_low:.4f}, {result.ci_high:.4f}], {result.bootstrap} resamples, "
        "threshold held fixed)",
        f"- threshold: **{result.threshold:.6g}** in the `{result.space}` probability space",
        "",
        "| metric | val_calib | val_test |",
        "|---|---|---|",
    ]
    for key in sorted(result.metrics):
        test = result.metrics_val_test.get(key)
        lines.append(f"| {key} | {result.metrics[key]:.4g} | {'' if test is None else f'{test:.4g}'} |")
    lines += [f"- note: {note}" for note in result.notes]
    return "\n".join(lines) + "\n"


def sweep_html(result: SweepResult, png_path: Path) -> str:
    """The sweep plot (inlined) with the chosen threshold, the objective and the metrics, as one HTML page."""
    ci = f"[{result.ci_low:.4f}, {result.ci_high:.4f}]"
    key_figures = (
        ("figure", "value"),
        [
            ("threshold", f"{result.threshold:.6g} ({result.space} probability space)"),
            ("objective", result.objective),
            ("objective value (val_calib)", f"{result.objective_value:.4f}"),
            (f"95% bootstrap CI ({result.bootstrap} resamples)", ci),
        ],
    )
    rows = [
        (
            key,
            f"{result.metrics[key]:.4g}",
            "" if key not in result.metrics_val_test else f"{result.metrics_val_test[key]:.4g}",
        )
        for key in sorted(result.metrics)
    ]
    title = f"Threshold sweep ({result.task}): threshold {result.threshold:.4g}"
    return html_page(title, png_path, [key_figures, (("metric", "val_calib", "val_test"), rows)], result.notes)


def log_classification_metrics(result: SweepResult, artifact: "ClassificationMetrics") -> None:
    """Log the confusion matrix (and the ROC curve, binary) on a KFP ClassificationMetrics artifact."""
    artifact.log_confusion_matrix(list(result.classes), result.confusion)
    if result.roc is not None:
        artifact.log_roc_curve(result.roc["fpr"], result.roc["tpr"], result.roc["threshold"])


# ------------------------------------------------------------------------------------------- internals
def _sweep_binary(
    meta: LogitsMeta, logits: FloatArray, labels: IntArray, objective: Objective, n_boot: int, seed: int
) -> tuple[SweepResult, dict[str, FloatArray]]:
    pos = meta.positive_index
    present = np.unique(labels)
    if present.size < 2:
        only = meta.classes[int(present[0])] if present.size else "<none>"
        raise SweepError(
            f"val_calib holds only class {only!r} ({labels.size} images); a binary threshold needs both classes"
        )
    scores = softmax(logits)[:, pos]
    curve = exact_sweep(scores, labels == pos)
    best = choose_binary(curve, objective)
    counts = (curve.tp[best], curve.fp[best], curve.tn[best], curve.fn[best])
    ci = bootstrap_binary(counts, objective, n_boot, seed)
    notes = []
    if np.unique(scores).size == 1:
        notes.append("all val_calib scores are equal: the threshold cannot separate the classes")
    threshold = float(curve.threshold[best])
    decisions = np.where(scores >= curve.score[best], pos, 1 - pos).astype(np.int64)
    metrics = {"threshold": threshold, "n": float(labels.size)}
    metrics |= {k: float(v[best]) for k, v in curve.metrics.items()}
    metrics |= {
        "tp": float(counts[0]),
        "fp": float(counts[1]),
        "tn": float(counts[2]),
        "fn": float(counts[3]),
    }
    table = {"threshold": curve.threshold, "score": curve.score, "tp": curve.tp, "fp": curve.fp}
    table |= {"tn": curve.tn, "fn": curve.fn, **curve.metrics}
    table["objective"] = objective_values(curve.metrics, objective)
    result = SweepResult(
        task="binary",
        classes=meta.classes,
        positive_index=pos,
        objective=str(objective),
        threshold=threshold,
        space="raw",
        objective_value=float(table["objective"][best]),
        ci_low=ci[0],
        ci_high=ci[1],
        bootstrap=n_boot,
        seed=seed,
        metrics=metrics,
        metrics_val_test={},
        policy=ThresholdPolicy(threshold=threshold, space="raw", task="binary", positive_index=pos),
        decisions=decisions,
        confusion=_confusion(labels, decisions, 2),
        roc=_roc_points(curve, best),
        notes=tuple(notes),
    )
    return result, table


def _sweep_multiclass(
    meta: LogitsMeta, logits: FloatArray, labels: IntArray, target: float, n_boot: int, seed: int
) -> tuple[SweepResult, dict[str, FloatArray]]:
    probs = softmax(logits)
    curve = risk_coverage(probs, labels)
    best = choose_abstain(curve, target)
    ci = bootstrap_selective(curve, best, labels.size, n_boot, seed)
    threshold = float(curve.threshold[best])
    decisions = probs.argmax(axis=1).astype(np.int64)
    decisions[probs.max(axis=1) < curve.score[best]] = -1
    metrics = {
        "threshold": threshold,
        "n": float(labels.size),
        "accuracy": float(np.mean(probs.argmax(axis=1) == labels)),
        "coverage": float(curve.coverage[best]),
        "selective_accuracy": float(curve.selective_accuracy[best]),
        "selective_risk": float(curve.risk[best]),
        "abstained": float(np.sum(decisions == -1)),
    }
    table = {
        "threshold": curve.threshold,
        "score": curve.score,
        "accepted": curve.accepted,
        "coverage": curve.coverage,
        "selective_accuracy": curve.selective_accuracy,
        "risk": curve.risk,
    }
    result = SweepResult(
        task="multiclass",
        classes=meta.classes,
        positive_index=None,
        objective=f"selective_accuracy>={target:g}",
        threshold=threshold,
        space="raw",
        objective_value=float(curve.coverage[best]),
        ci_low=ci[0],
        ci_high=ci[1],
        bootstrap=n_boot,
        seed=seed,
        metrics=metrics,
        metrics_val_test={},
        policy=ThresholdPolicy(threshold=threshold, space="raw", task="multiclass"),
        decisions=decisions,
        confusion=_confusion(labels, probs.argmax(axis=1), len(meta.classes)),
        roc=None,
        notes=("objective_value is the coverage; the CI is that of the selective accuracy",),
    )
    return result, table


def _with_test_metrics(result: SweepResult, logits: FloatArray, labels: IntArray) -> SweepResult:
    """Report the chosen policy on val_test (reporting only; nothing is fitted here)."""
    probs = softmax(logits)
    decided = apply_policy(result.policy, probs, probs).labels
    if result.task == "binary":
        pos = result.positive_index if result.positive_index is not None else 1
        t, p = labels == pos, decided == pos
        counts = [float(np.sum(t & p)), float(np.sum(~t & p)), float(np.sum(~t & ~p)), float(np.sum(t & ~p))]
        test = {k: float(v) for k, v in binary_metrics_from_counts(*counts).items()}
        test |= dict(zip(("tp", "fp", "tn", "fn"), counts, strict=True))
    else:
        accepted = decided != -1
        test = {
            "accuracy": float(np.mean(probs.argmax(axis=1) == labels)),
            "coverage": float(np.mean(accepted)),
            "selective_accuracy": float(np.mean(decided[accepted] == labels[accepted])) if accepted.any() else 1.0,
            "abstained": float(np.sum(~accepted)),
        }
        test["selective_risk"] = 1.0 - test["selective_accuracy"]
    test["n"] = float(labels.size)
    return SweepResult(**{**result.__dict__, "metrics_val_test": test})


def _midpoints(upper: FloatArray, lower: FloatArray) -> FloatArray:
    """A value t with lower < t <= upper per pair (midpoint; upper when the midpoint rounds onto lower).

    For the lowest score (lower = -inf) it is upper / 2 (or 0 when upper <= 0): accept everything scored.
    """
    finite = np.isfinite(lower)
    mid = np.where(finite, lower + (upper - np.where(finite, lower, 0.0)) / 2, np.maximum(upper, 0.0) / 2)
    out: FloatArray = np.where(finite & ~(mid > lower), upper, mid)
    out = np.minimum(out, upper)
    return out


def _check_width(meta: LogitsMeta, logits: FloatArray) -> None:
    if logits.shape[1] != len(meta.classes):
        raise SweepError(f"logits have K={logits.shape[1]} columns but meta lists {len(meta.classes)} classes")


def _multinomial(counts: tuple[float, ...], n_boot: int, seed: int) -> FloatArray:
    c = np.asarray(counts, dtype=np.float64)
    n = round(float(c.sum()))
    out: FloatArray = np.random.default_rng(seed).multinomial(n, c / c.sum(), size=n_boot).astype(np.float64)
    return out


def _percentile_interval(values: FloatArray) -> tuple[float, float]:
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def _confusion(labels: IntArray, predicted: IntArray, k: int) -> list[list[int]]:
    keep = predicted >= 0
    matrix = np.zeros((k, k), dtype=np.int64)
    np.add.at(matrix, (labels[keep], predicted[keep]), 1)
    return matrix.tolist()


def _roc_points(curve: BinaryCurve, best: int) -> dict[str, list[float]]:
    """At most ROC_POINTS rows of (fpr, tpr, threshold), evenly spaced by rank, keeping the chosen row."""
    n = len(curve.threshold)
    idx = np.unique(np.r_[np.linspace(0, n - 1, min(n, ROC_POINTS)).round().astype(np.int64), best])
    return {
        "fpr": curve.metrics["fpr"][idx].tolist(),
        "tpr": curve.metrics["recall"][idx].tolist(),
        "threshold": curve.threshold[idx].tolist(),
    }


def _write_csv(path: Path, table: dict[str, FloatArray]) -> None:
    names = list(table)
    data = np.column_stack([table[k] for k in names])
    np.savetxt(path, data, delimiter=",", header=",".join(names), comments="", fmt="%.10g")


def _plot(result: SweepResult, table: dict[str, FloatArray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    if result.task == "binary":
        finite = np.isfinite(table["objective"])
        left.plot(table["threshold"][finite], table["objective"][finite], lw=1.2)
        left.set_xlabel("threshold on raw P(positive)")
        left.set_ylabel(result.objective)
        right.plot(table["fpr"], table["recall"], lw=1.2)
        right.plot([0, 1], [0, 1], ls=":", c="grey")
        right.scatter([result.metrics["fpr"]], [result.metrics["recall"]], c="red", zorder=3, label="chosen")
        right.set_xlabel("false positive rate")
        right.set_ylabel("true positive rate")
        right.set_title("ROC (val_calib)")
        right.legend(loc="lower right")
    else:
        left.plot(table["threshold"], table["selective_accuracy"], lw=1.2)
        left.set_xlabel("abstain threshold on top raw probability")
        left.set_ylabel("selective accuracy")
        right.plot(table["coverage"], table["risk"], lw=1.2)
        right.scatter([result.metrics["coverage"]], [result.metrics["selective_risk"]], c="red", zorder=3)
        right.set_xlabel("coverage")
        right.set_ylabel("selective risk")
        right.set_title("risk-coverage (val_calib)")
    left.axvline(result.threshold, c="red", ls="--", lw=1)
    left.set_title(f"threshold = {result.threshold:.4g}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
