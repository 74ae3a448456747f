"""The monthly retrain pipeline: the new month's data + labelled hard examples, warm-started from the champion,
gated against the champion on a common val_test, exported as a new version, optionally canaried on KServe.

Scheduled as a recurring run (`visionpipe schedule --cron "0 0 3 1 * *"`, 6-field cron, seconds first).
"""

from typing import NamedTuple

from kfp import dsl, kubernetes
from kfp.dsl import Dataset, Markdown

from components.monthly import champion_warm_start, fetch_month, start_canary
from components.supervised_train import supervised_train
from pipelines.training import S3_SECRET, S3_SECRET_KEYS, decide_validate_export, training_resources

PIPELINE_NAME = "visionpipe-monthly-retrain"


class MonthlyOutputs(NamedTuple):
    dataset: Dataset
    data_summary: Markdown


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
    model_name: str = "visionpipe-digits",
    submitter: str = "monthly-retrain",
    min_accuracy: float = -1.0,
    min_mcc: float = -2.0,
    max_ece: float = -1.0,
    champion_margin: float = 0.0,
    destination: str = "bundles",
    start_canary_enabled: bool = False,
    isvc_name: str = "visionpipe-digits",
    namespace: str = "kubeflow-user",
    canary_percent: int = 10,
) -> MonthlyOutputs:
    """data_prefix: folder or s3:// prefix holding <YYYY-MM>/<class>/<image>; data_month: YYYY-MM (empty = the
    previous calendar month, resolved when the run starts); hard_examples_prefix: where serving logs hard examples
    (<YYYY-MM>/labelled/<class>/<image> are taken in). champion_uri: the bundle in production: its backbone is the
    warm start, it is the parent in the provenance, and the challenger must not be worse than it by more than
    champion_margin on the new val_test. start_canary_enabled: patch InferenceService isvc_name in namespace to
    send canary_percent% of the traffic to the new bundle. checkpoint_uri: s3:// prefix the training checkpoint is
    mirrored to each epoch, so a retried training pod resumes (empty = local only)."""
    month = fetch_month(
        data_prefix=data_prefix,
        data_month=data_month,
        hard_examples_prefix=hard_examples_prefix,
        seed=seed,
        positive_class=positive_class,
        image_size=image_size,
    ).set_display_name("fetch_month")
    warm = champion_warm_start(champion_uri=champion_uri).set_display_name("champion_warm_start")
    train = supervised_train(
        dataset=month.outputs["dataset"],
        recipe=recipe,
        recipe_overrides_json=recipe_overrides_json,
        backbone=warm.outputs["backbone"],
        checkpoint_uri=checkpoint_uri,
    ).set_display_name("supervised_train")
    training_resources(train)
    decisions: dict[str, object] = {
        "objective": objective,
        "target_selective_accuracy": target_selective_accuracy,
        "bootstrap": bootstrap,
        "method": calibration_method,
        "alpha": alpha,
        "conformal_score": conformal_score,
        "scrc_selection_rate": scrc_selection_rate,
        "scrc_delta": scrc_delta,
        "active_policy": active_policy,
        "seed": seed,
    }
    release: dict[str, object] = {
        "model_name": model_name,
        "description": "",
        "submitter": submitter,
        "parent_bundle": champion_uri,
        "min_accuracy": min_accuracy,
        "min_mcc": min_mcc,
        "max_ece": max_ece,
        "champion_uri": champion_uri,
        "champion_margin": champion_margin,
    }
    published = decide_validate_export(month.outputs["dataset"], train, decisions, release, destination)
    with dsl.If(start_canary_enabled == True, name="canary"):  # noqa: E712 (KFP condition syntax)
        start_canary(
            bundle_uri=published.outputs["Output"],
            isvc_name=isvc_name,
            namespace=namespace,
            canary_percent=canary_percent,
        ).set_display_name("start_canary")
    for task in (month, warm):
        kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env=S3_SECRET_KEYS, optional=True)
    return MonthlyOutputs(dataset=month.outputs["dataset"], data_summary=month.outputs["summary"])
