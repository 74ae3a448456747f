"""Thin KFP component of phase threshold_sweep (core: visionpipe.phases.threshold_sweep)."""

# No `from __future__ import annotations` here: KFP reads the component signature at import time.

from kfp.dsl import HTML, Artifact, ClassificationMetrics, Input, Markdown, Metrics, Output

from visionpipe.kfp.platform import component


@component
def threshold_sweep(
    logits: Input[Artifact],
    decision: Output[Artifact],
    classification_metrics: Output[ClassificationMetrics],
    metrics: Output[Metrics],
    summary: Output[Markdown],
    sweep_plot: Output[HTML],
    objective: str = "mcc",
    target_selective_accuracy: float = 0.99,
    bootstrap: int = 1000,
    seed: int = 0,
) -> None:
    """Choose the decision threshold on val_calib: exact MCC/F1/... sweep (binary) or the abstain threshold
    with the largest coverage meeting a selective-accuracy target (multi-class). sweep_plot: the sweep plot and
    key figures as an HTML page the Kubeflow UI shows."""
    from pathlib import Path

    from visionpipe.phases.threshold_sweep import HTML_FILE, log_classification_metrics, run, summary_markdown

    result = run(
        Path(logits.path),
        Path(decision.path),
        objective=objective,
        target_selective_accuracy=target_selective_accuracy,
        bootstrap=bootstrap,
        seed=seed,
    )
    log_classification_metrics(result, classification_metrics)
    for key in ("threshold", "objective_value", "ci_low", "ci_high"):
        metrics.log_metric(key, float(getattr(result, key)))
    Path(summary.path).write_text(summary_markdown(result))
    Path(sweep_plot.path).write_text((Path(decision.path) / HTML_FILE).read_text())
