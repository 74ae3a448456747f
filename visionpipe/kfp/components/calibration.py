"""Thin KFP component of phase calibration (core: visionpipe.phases.calibration)."""

# No `from __future__ import annotations` here: KFP reads the component signature at import time.

from kfp.dsl import HTML, Artifact, Input, Markdown, Metrics, Output

from visionpipe.kfp.platform import component


@component
def calibrate(
    logits: Input[Artifact],
    decision: Input[Artifact],
    calibration: Output[Artifact],
    metrics: Output[Metrics],
    summary: Output[Markdown],
    reliability_diagram: Output[HTML],
    calibration_method: str = "auto",
    alpha: float = 0.1,
    conformal_score: str = "aps",
    scrc_selection_rate: float = 0.9,
    scrc_delta: float = 0.1,
    active_policy: str = "threshold",
    seed: int = 0,
) -> None:
    """Fit the calibrator (calibration_method; auto = chosen by cross-fitted NLL), conformal sets and the SCRC
    policy on val_calib; carry the sweep threshold into the calibrated space; report ECE/Brier/NLL before and after.
    reliability_diagram: the diagram and key figures as an HTML page the Kubeflow UI shows."""
    from pathlib import Path

    from visionpipe.phases.calibration import HTML_FILE, run, summary_markdown

    result = run(
        Path(logits.path),
        Path(decision.path),
        Path(calibration.path),
        calibration_method=calibration_method,
        alpha=alpha,
        conformal_score=conformal_score,
        scrc_selection_rate=scrc_selection_rate,
        scrc_delta=scrc_delta,
        active_policy=active_policy,
        seed=seed,
    )
    for split, stages in result.metrics.items():
        for stage, values in stages.items():
            for key in ("ece", "nll", "brier"):
                metrics.log_metric(f"{split}_{stage}_{key}", values[key])
    Path(summary.path).write_text(summary_markdown(result))
    Path(reliability_diagram.path).write_text((Path(calibration.path) / HTML_FILE).read_text())
