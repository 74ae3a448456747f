"""The monthly retrain pipeline: the new month's data + labelled hard examples, warm-started from the champion,
gated against the champion on a common val_test, exported as a new version, optionally canaried on KServe.

Scheduled as a recurring run (`visionpipe schedule --cron "0 0 3 1 * *"`, 6-field cron, seconds first).
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Markdown

from visionpipe.kfp.components.check_run_form import check_monthly_run_form
from visionpipe.kfp.components.monthly import champion_warm_start, fetch_month, start_canary
from visionpipe.kfp.components.supervised_train import supervised_train
from visionpipe.kfp.decision import decide_and_publish
from visionpipe.kfp.platform import training_resources, use_s3_secret

PIPELINE_NAME = "visionpipe-monthly-retrain"


class MonthlyOutputs(NamedTuple):
    dataset: Dataset
    data_summary: Markdown
    bundle_uri: str


@dsl.pipeline(name=PIPELINE_NAME, description="Monthly retrain from the champion; export only if it holds its ground.")
def monthly_retrain_pipeline(
    data_prefix: str,
    champion_uri: str,
    data_month: str = "",
    hard_examples_prefix: str = "",
    positive_class: str = "",
    image_size: int = 0,
    seed: int = 0,
    recipe: str = "digits-cnn",
    recipe_overrides_json: str = "{}",
    checkpoint_uri: str = "",
    objective: str = "mcc",
    target_selective_accuracy: float = 0.99,
    bootstrap: int = 1000,
    calibration_method: str = "auto",
    alpha: float = 0.1,
    conformal_score: str = "aps",
    scrc_selection_rate: float = 0.9,
    scrc_delta: float = 0.1,
    active_policy: str = "threshold",
    model_name: str = "digits",
    submitter: str = "monthly-retrain",
    min_accuracy: float = -1.0,
    min_mcc: float = -2.0,
    max_ece: float = -1.0,
    champion_margin: float = 0.0,
    destination: str = "bundles",
    start_canary_enabled: bool = False,
    isvc_name: str = "digits",
    namespace: str = "kubeflow-user",
    canary_percent: int = 10,
) -> MonthlyOutputs:
    """Retrain on the new month from the champion; export only if it holds its ground.

    Args:
        data_prefix: Folder or s3://bucket/prefix holding the monthly data as <YYYY-MM>/<class>/<image> (.png,
            .jpg, .jpeg); on a cluster an s3:// prefix. Required.
        champion_uri: The bundle in production (a folder or s3://bucket/.../<name>/<version>, a single model,
            not an ensemble): its backbone is the warm start, it is the parent in the provenance, and the
            challenger must not be worse than it by more than champion_margin on the new val_test. Required.
        data_month: Month to train on, as YYYY-MM (e.g. 2026-10); empty = the previous calendar month (UTC),
            resolved when the run starts.
        hard_examples_prefix: Where serving logs hard examples (VISIONPIPE_HARD_EXAMPLES); the labelled ones of
            the month, <hard_examples_prefix>/<YYYY-MM>/labelled/<class>/<image>, are added to the data;
            empty = none.
        positive_class: For a two-class task, the class folder name that is "positive": the threshold sweep
            decides for it, the min_mcc gate and the MCC champion comparison apply. Must be one of the class
            names; empty = none (multi-class tasks).
        image_size: Resize every image to image_size x image_size pixels (bilinear), 1..4096; 0 = keep the
            native size (every image must then have the same size).
        seed: Integer seed of the splits (0.7 / 0.1 / 0.1 / 0.1, stratified), of the bootstrap and of the
            calibration folds (the training seed is the recipe's own `seed`).
        recipe: Training recipe: a shipped name (digits-cnn, digits-cnn-mnist, digits-resnet18,
            roadwork-vit-dora, roadwork-dinov2-lora) or the path of a recipe YAML file inside the image; its
            architecture must match the champion's backbone (the warm start).
        recipe_overrides_json: JSON object overriding recipe fields, nested or with dotted keys, e.g.
            {"epochs": 3, "optimizer.lr": 0.01}; {} = the recipe as shipped.
        checkpoint_uri: s3://bucket/prefix (or an absolute folder every attempt sees) to which each epoch's
            training checkpoint is mirrored, so a retried training pod on an empty disk resumes; empty = the
            checkpoint stays in the pod only.
        objective: Two-class threshold objective maximised on val_calib: mcc, f1, youden,
            recall_at_precision>=P or precision_at_recall>=R (P, R in [0, 1], e.g. recall_at_precision>=0.9).
            Ignored for multi-class tasks.
        target_selective_accuracy: Multi-class tasks: the abstain threshold is the one with the largest coverage
            whose selective accuracy on val_calib is at least this value, in (0, 1]. Ignored for two-class tasks.
        bootstrap: Number of bootstrap resamples (>= 1) for the 95% confidence interval of the objective at the
            chosen threshold.
        calibration_method: Probability calibrator fitted on val_calib: auto (lowest cross-fitted NLL among the
            candidates), identity, temperature, platt, beta or isotonic; platt, beta and isotonic only for
            two-class tasks.
        alpha: Miscoverage level in (0, 1) of the conformal prediction sets (they hold the true class with
            probability >= 1 - alpha) and the risk target of SCRC.
        conformal_score: Conformal score of the prediction sets: lac, aps or raps.
        scrc_selection_rate: Share of the images, in (0, 1], that SCRC selects (the rest abstain).
        scrc_delta: SCRC confidence level in (0, 1): with probability >= 1 - delta the risk on the selected
            images is <= alpha.
        active_policy: Decision policy the served bundle applies: threshold (the sweep's threshold) or scrc;
            the other one is kept as the fallback.
        model_name: Name of the bundle (and of its KServe InferenceService, `digits` by project convention);
            the bundle is published at <destination>/<model_name>/<version>/.
        submitter: Who submitted the run, recorded in the model card.
        min_accuracy: Quality gate: val_test accuracy must be >= this value (at most 1); negative = gate off.
        min_mcc: Quality gate for two-class tasks with positive_class set: val_test MCC must be >= this value,
            in [-1, 1]; below -1 = gate off.
        max_ece: Quality gate: val_test expected calibration error (15 equal-width bins, calibrated
            probabilities) must be <= this value (at most 1); negative = gate off.
        champion_margin: How much worse than the champion the challenger may be on the new val_test (>= 0, in
            units of the compared metric: MCC for two-class tasks with positive_class, else accuracy).
        destination: Where the bundle is published, at <destination>/<model_name>/<version>/ (never
            overwritten). On a cluster it must be an s3://bucket/prefix URI (a pod's folders vanish with the
            pod, and KServe reads the bundle from there); a local folder only with kfp.local.
        start_canary_enabled: true = after export, patch InferenceService isvc_name in namespace so that
            canary_percent% of the traffic goes to the new bundle (needs manifests/pipeline-rbac); false = only
            publish.
        isvc_name: Name of the KServe InferenceService to canary (the project's is `digits`); used only when
            start_canary_enabled is true.
        namespace: Kubernetes namespace of that InferenceService (the Kubeflow profile namespace).
        canary_percent: Share of the traffic, in percent (1..100), sent to the new bundle when the canary
            starts.
    """
    check = check_monthly_run_form(
        data_prefix=data_prefix,
        champion_uri=champion_uri,
        data_month=data_month,
        hard_examples_prefix=hard_examples_prefix,
        positive_class=positive_class,
        image_size=image_size,
        seed=seed,
        recipe=recipe,
        recipe_overrides_json=recipe_overrides_json,
        checkpoint_uri=checkpoint_uri,
        objective=objective,
        target_selective_accuracy=target_selective_accuracy,
        bootstrap=bootstrap,
        calibration_method=calibration_method,
        alpha=alpha,
        conformal_score=conformal_score,
        scrc_selection_rate=scrc_selection_rate,
        scrc_delta=scrc_delta,
        active_policy=active_policy,
        model_name=model_name,
        submitter=submitter,
        min_accuracy=min_accuracy,
        min_mcc=min_mcc,
        max_ece=max_ece,
        champion_margin=champion_margin,
        destination=destination,
        start_canary_enabled=start_canary_enabled,
        isvc_name=isvc_name,
        namespace=namespace,
        canary_percent=canary_percent,
    ).set_display_name("check_run_form")
    month = fetch_month(
        data_prefix=data_prefix,
        data_month=data_month,
        hard_examples_prefix=hard_examples_prefix,
        seed=seed,
        positive_class=positive_class,
        image_size=image_size,
    ).set_display_name("fetch_month")
    warm = champion_warm_start(champion_uri=champion_uri).set_display_name("champion_warm_start")
    for task in (month, warm):  # nothing runs on a run form that check_run_form refused
        task.after(check)
        use_s3_secret(task)  # data_prefix, hard_examples_prefix and champion_uri may be s3://
    train = supervised_train(
        dataset=month.outputs["dataset"],
        recipe=recipe,
        recipe_overrides_json=recipe_overrides_json,
        backbone=warm.outputs["backbone"],
        checkpoint_uri=checkpoint_uri,
    ).set_display_name("supervised_train")
    training_resources(train)
    decision = decide_and_publish(
        dataset=month.outputs["dataset"],
        model=train.outputs["model"],
        logits=train.outputs["logits"],
        objective=objective,
        target_selective_accuracy=target_selective_accuracy,
        bootstrap=bootstrap,
        calibration_method=calibration_method,
        alpha=alpha,
        conformal_score=conformal_score,
        scrc_selection_rate=scrc_selection_rate,
        scrc_delta=scrc_delta,
        active_policy=active_policy,
        seed=seed,
        model_name=model_name,
        description="",
        submitter=submitter,
        parent_bundle=champion_uri,
        min_accuracy=min_accuracy,
        min_mcc=min_mcc,
        max_ece=max_ece,
        champion_uri=champion_uri,
        champion_margin=champion_margin,
        threshold_at_half=False,
        destination=destination,
    ).set_display_name("decide_and_publish")
    with dsl.If(start_canary_enabled == True, name="canary"):  # noqa: E712 (KFP condition syntax)
        start_canary(
            bundle_uri=decision.outputs["bundle_uri"],
            isvc_name=isvc_name,
            namespace=namespace,
            canary_percent=canary_percent,
        ).set_display_name("start_canary")
    return MonthlyOutputs(
        dataset=month.outputs["dataset"],
        data_summary=month.outputs["summary"],
        bundle_uri=decision.outputs["bundle_uri"],
    )
