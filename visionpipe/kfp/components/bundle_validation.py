"""Thin KFP component of phase bundle_validation (core: visionpipe.phases.bundle_validation)."""

# No `from __future__ import annotations` here: KFP reads the component signature at import time.

from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from visionpipe.kfp.platform import component


@component
def bundle_validation(
    dataset: Input[Dataset],
    model: Input[Model],
    logits: Input[Artifact],
    threshold: Input[Artifact],
    calibration: Input[Artifact],
    bundle: Output[Model],
    report: Output[Markdown],
    metrics: Output[Metrics],
    model_name: str = "visionpipe-model",
    description: str = "",
    submitter: str = "",
    parent_bundle: str = "",
    min_accuracy: float = -1.0,
    min_mcc: float = -2.0,
    max_ece: float = -1.0,
    champion_uri: str = "",
    champion_margin: float = 0.0,
    threshold_at_half: bool = False,
    compiled_runtime: str = "none",
) -> None:
    """Assemble the candidate bundle and check it: schema, checksums, preprocessing signature, policy, split
    contract, parity with training, quality gates (negative = off) and the optional champion. Fails the step,
    naming every failed check, when any check fails. threshold_at_half: assemble a binary bundle whose calibrated
    probability is remapped so the chosen threshold sits at 0.5 (same decisions); it is that bundle which is checked,
    signed and then published by export unchanged. compiled_runtime=onnx: also ship the model exported to ONNX
    (compiled/member-<i>.onnx, checksummed and signed), refused unless its decisions equal the torch model's on
    val_calib and val_test."""
    from visionpipe.phases.pod import require_s3_credentials, require_signing_key_in_pod

    require_s3_credentials(champion_uri)  # first thing: no S3 settings -> fail naming the Secret, before any work
    require_signing_key_in_pod()  # on a cluster the bundle must be signed with the key serving trusts

    import json
    from pathlib import Path

    from visionpipe.phases.bundle_validation import Gates, ValidationFailed, run

    try:
        result = run(
            Path(dataset.path),
            Path(model.path),
            Path(logits.path),
            Path(calibration.path),
            Path(bundle.path),
            threshold_dir=Path(threshold.path),
            gates=Gates(min_accuracy, min_mcc, max_ece, champion_uri, champion_margin),
            name=model_name,
            description=description,
            submitter=submitter,
            parent_bundle=parent_bundle,
            threshold_at_half=threshold_at_half,
            compiled_runtime=compiled_runtime,
        )
    except ValidationFailed as exc:
        Path(report.path).write_text(str(exc).split("\n\n", 1)[-1])
        raise
    Path(report.path).write_text(result.report_markdown)
    for split, values in result.metrics.items():
        for key in ("accuracy", "mcc", "ece", "nll", "coverage"):
            if key in values:
                metrics.log_metric(f"{split}_{key}", round(float(values[key]), 6))
    bundle.metadata.update({"version": json.loads((Path(bundle.path) / "bundle.json").read_text())["version"]})
    print(result.report_markdown)
