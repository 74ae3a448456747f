"""The decision sub-graph, threshold_sweep -> calibration -> bundle_validation -> export, as one KFP
pipeline-as-component that both pipelines call once (visionpipe/kfp/training.py, visionpipe/kfp/monthly.py).

Every parameter is typed and keeps the name of the run-form parameter it comes from (calibration_method stays
calibration_method down to `visionpipe.phases.calibration.run`); none has a default here: the pipelines pass
each one, so the run form (and `visionpipe.specs.params`) is where a default is written.

The bundle that bundle_validation assembles, checks and signs (threshold_at_half included) is the one export
publishes, unchanged: "served = validated" (DESIGN.md). The sub-graph returns export's storage URI as
`bundle_uri`, which the pipelines return as their own output.

Caching: threshold_sweep and calibration are pure (parameters + this run's logits) and keep KFP's default.
bundle_validation is never cached: it reads the champion bundle at champion_uri (outside state), and it stamps the
bundle version from the clock and signs it; a cached copy would hand an earlier run's version to export, which then
refuses it ("versions are immutable") or republishes it. export writes the destination and is never cached either.

kfp.local (2.17.3) runs a nested pipeline only when it has at least one parameter input: the artifact inputs are
resolved inside ``if task_spec.inputs.parameters`` (kfp/local/orchestrator/task_spec_utils.py,
`build_nested_dag_arguments`); this one has many.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Model

from visionpipe.kfp.components.bundle_validation import bundle_validation
from visionpipe.kfp.components.calibration import calibrate
from visionpipe.kfp.components.export import export
from visionpipe.kfp.components.threshold_sweep import threshold_sweep
from visionpipe.kfp.platform import use_s3_secret, use_signing_secret

# The display names of the decision steps, in graph order (tests count one compiled copy of each).
DECISION_STEPS = ("threshold_sweep", "calibration", "bundle_validation", "export")


class DecisionOutputs(NamedTuple):
    bundle_uri: str
    validation_report: Markdown


@dsl.pipeline(name="decide-and-publish", description="Threshold, calibrate, validate and publish a trained model.")
def decide_and_publish(
    dataset: Input[Dataset],
    model: Input[Model],
    logits: Input[Artifact],
    objective: str,
    target_selective_accuracy: float,
    bootstrap: int,
    calibration_method: str,
    alpha: float,
    conformal_score: str,
    scrc_selection_rate: float,
    scrc_delta: float,
    active_policy: str,
    seed: int,
    model_name: str,
    description: str,
    submitter: str,
    parent_bundle: str,
    min_accuracy: float,
    min_mcc: float,
    max_ece: float,
    champion_uri: str,
    champion_margin: float,
    threshold_at_half: bool,
    compiled_runtime: str,
    destination: str,
) -> DecisionOutputs:
    """threshold_sweep -> calibration -> bundle_validation -> export on one trained model.

    Args:
        dataset: The Dataset the model was trained on (val_calib fits, val_test reports).
        model: supervised_train's model.
        logits: supervised_train's val_calib / val_test logits from the best checkpoint.
        objective: Two-class threshold objective (threshold_sweep).
        target_selective_accuracy: Multi-class abstain target (threshold_sweep).
        bootstrap: Bootstrap resamples of the confidence interval (threshold_sweep).
        calibration_method: Probability calibrator fitted on val_calib (calibration).
        alpha: Miscoverage level of the conformal sets and risk target of SCRC (calibration).
        conformal_score: Conformal score: lac, aps (randomized), aps-conservative or raps (calibration).
        scrc_selection_rate: Share of the images SCRC selects (calibration).
        scrc_delta: SCRC confidence level (calibration).
        active_policy: threshold or scrc (calibration).
        seed: Seed of the bootstrap and of the calibration folds.
        model_name: Name of the bundle (bundle_validation).
        description: Model card description (bundle_validation).
        submitter: Who submitted the run (bundle_validation).
        parent_bundle: Parent in the provenance (bundle_validation).
        min_accuracy: val_test accuracy gate (bundle_validation).
        min_mcc: val_test MCC gate (bundle_validation).
        max_ece: val_test ECE gate (bundle_validation).
        champion_uri: Champion bundle to compare with (bundle_validation).
        champion_margin: Allowed loss against the champion (bundle_validation).
        threshold_at_half: Assemble (and validate) a two-class bundle whose threshold sits at 0.5.
        compiled_runtime: none, or onnx: also ship the ONNX export, checked for decision parity (bundle_validation).
        destination: Where export publishes the validated bundle.
    """
    sweep = threshold_sweep(
        logits=logits,
        objective=objective,
        target_selective_accuracy=target_selective_accuracy,
        bootstrap=bootstrap,
        seed=seed,
    ).set_display_name("threshold_sweep")
    calibration = calibrate(
        logits=logits,
        decision=sweep.outputs["decision"],
        calibration_method=calibration_method,
        alpha=alpha,
        conformal_score=conformal_score,
        scrc_selection_rate=scrc_selection_rate,
        scrc_delta=scrc_delta,
        active_policy=active_policy,
        seed=seed,
    ).set_display_name("calibration")
    validation = bundle_validation(
        dataset=dataset,
        model=model,
        logits=logits,
        threshold=sweep.outputs["decision"],
        calibration=calibration.outputs["calibration"],
        model_name=model_name,
        description=description,
        submitter=submitter,
        parent_bundle=parent_bundle,
        min_accuracy=min_accuracy,
        min_mcc=min_mcc,
        max_ece=max_ece,
        champion_uri=champion_uri,
        champion_margin=champion_margin,
        threshold_at_half=threshold_at_half,
        compiled_runtime=compiled_runtime,
    ).set_display_name("bundle_validation")
    validation.set_caching_options(False)
    published = export(bundle=validation.outputs["bundle"], destination=destination)
    published.set_display_name("export").set_caching_options(False)
    for task in (validation, published):  # champion_uri / destination may be s3://; both sign or verify bundles
        use_s3_secret(task)
        use_signing_secret(task)
    return DecisionOutputs(bundle_uri=published.outputs["Output"], validation_report=validation.outputs["report"])
