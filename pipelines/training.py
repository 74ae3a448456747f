"""The training pipeline: the seven phases, as users upload it in the Kubeflow UI (pipelines/compiled/).

Every parameter below appears in the UI's run form with its default. Locally, `visionpipe run` / `make demo`
run the same graph with kfp.local.
"""

from typing import NamedTuple

from kfp import dsl, kubernetes
from kfp.dsl import Dataset, Markdown

from components.bundle_validation import bundle_validation
from components.calibration import calibrate
from components.data_fetch import data_fetch
from components.domain_pretrain import domain_pretrain
from components.export import export
from components.model_spec import resolve_model_spec
from components.supervised_train import supervised_train
from components.threshold_sweep import threshold_sweep

PIPELINE_NAME = "visionpipe-training"
S3_SECRET = "visionpipe-s3"  # Kubernetes Secret with the S3 settings (manifests/base), mounted as env vars
S3_SECRET_KEYS = {
    "S3_ENDPOINT": "S3_ENDPOINT",
    "S3_USE_HTTPS": "S3_USE_HTTPS",
    "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
}


class TrainingOutputs(NamedTuple):
    dataset: Dataset
    data_summary: Markdown


def training_resources(task: dsl.PipelineTask) -> None:
    """Cluster resources for the training steps (ignored by kfp.local); retries resume from the checkpoint (kept
    in the pod, and mirrored to checkpoint_uri with the S3 credentials of the secret when that is set)."""
    task.set_cpu_request("2").set_memory_request("4G").set_memory_limit("16G")
    task.set_retry(num_retries=2, backoff_duration="30s", backoff_factor=2.0)
    kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env=S3_SECRET_KEYS, optional=True)


def decide_validate_export(
    dataset: object,
    train: dsl.PipelineTask,
    decisions: dict[str, object],
    release: dict[str, object],
    destination: object,
    threshold_at_half: object = False,
) -> dsl.PipelineTask:
    """threshold_sweep -> calibration -> bundle_validation -> export, on one training task's outputs."""
    logits = train.outputs["logits"]
    sweep_keys = ("objective", "target_selective_accuracy", "bootstrap", "seed")
    sweep = threshold_sweep(logits=logits, **{k: decisions[k] for k in sweep_keys}).set_display_name("threshold_sweep")
    calibration = calibrate(
        logits=logits,
        decision=sweep.outputs["decision"],
        **{k: v for k, v in decisions.items() if k not in sweep_keys[:3]},
    ).set_display_name("calibration")
    validation = bundle_validation(
        dataset=dataset,
        model=train.outputs["model"],
        logits=logits,
        threshold=sweep.outputs["decision"],
        calibration=calibration.outputs["calibration"],
        **release,
    ).set_display_name("bundle_validation")
    published = export(
        bundle=validation.outputs["bundle"], destination=destination, threshold_at_half=threshold_at_half
    )
    published.set_display_name("export").set_caching_options(False)
    for task in (validation, published):
        kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env=S3_SECRET_KEYS, optional=True)
    return published


@dsl.pipeline(name=PIPELINE_NAME, description="Train, threshold, calibrate, validate and publish an image classifier.")
def training_pipeline(
    source: str = "builtin://sklearn-digits",
    positive_class: str = "",
    image_size: int = 0,
    train_ratio: float = 0.7,
    val_select_ratio: float = 0.1,
    val_calib_ratio: float = 0.1,
    val_test_ratio: float = 0.1,
    seed: int = 0,
    max_bad_fraction: float = 0.05,
    recipe: str = "digits-cnn",
    recipe_overrides_json: str = "{}",
    checkpoint_uri: str = "",
    domain_pretrain_enabled: bool = False,
    pretrain_epochs: int = 5,
    pretrain_max_steps: int = 0,
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
    description: str = "",
    submitter: str = "",
    parent_bundle: str = "",
    min_accuracy: float = -1.0,
    min_mcc: float = -2.0,
    max_ece: float = -1.0,
    champion_uri: str = "",
    champion_margin: float = 0.0,
    destination: str = "bundles",
    threshold_at_half: bool = False,
) -> TrainingOutputs:
    """Data: source (builtin://sklearn-digits, or a folder <class>/<image> on a local path or s3://bucket/prefix),
    positive_class (binary tasks), image_size (0 = native), the four split ratios, seed, max_bad_fraction.
    Training: recipe (digits-cnn, digits-resnet18, roadwork-vit-dora, roadwork-dinov2-lora, or a YAML path) with
    JSON overrides; checkpoint_uri (s3://bucket/prefix, empty = local only) mirrors the per-epoch checkpoint so a
    retried pod resumes; optional self-supervised domain_pretrain first. Decisions: the threshold objective (mcc, f1,
    youden, recall_at_precision>=p, precision_at_recall>=r), the abstain target for multi-class, calibration
    method (auto picks by cross-fitted NLL), conformal alpha and score, SCRC selection rate and delta, the active
    policy. Validation: quality gates on val_test (negative = off) and an optional champion bundle URI with a
    margin. Export: destination folder or s3://bucket/prefix (the bundle lands at <destination>/<name>/<version>/);
    threshold_at_half publishes a binary bundle whose probability is remapped so the threshold sits at 0.5."""
    fetch = data_fetch(
        source=source,
        positive_class=positive_class,
        image_size=image_size,
        train_ratio=train_ratio,
        val_select_ratio=val_select_ratio,
        val_calib_ratio=val_calib_ratio,
        val_test_ratio=val_test_ratio,
        seed=seed,
        max_bad_fraction=max_bad_fraction,
    ).set_display_name("data_fetch")
    dataset = fetch.outputs["dataset"]

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
        "description": description,
        "submitter": submitter,
        "parent_bundle": parent_bundle,
        "min_accuracy": min_accuracy,
        "min_mcc": min_mcc,
        "max_ece": max_ece,
        "champion_uri": champion_uri,
        "champion_margin": champion_margin,
    }
    # kfp.local cannot resolve dsl.OneOf yet, so each branch carries its own copy of the downstream phases.
    with dsl.If(domain_pretrain_enabled == True, name="domain-pretrain-on"):  # noqa: E712 (KFP condition syntax)
        spec = resolve_model_spec(
            dataset=dataset, recipe=recipe, recipe_overrides_json=recipe_overrides_json
        ).set_display_name("resolve_model_spec")
        pretrain = domain_pretrain(
            dataset=dataset,
            arch_json=spec.outputs["arch_json"],
            preprocess_json=spec.outputs["preprocess_json"],
            epochs=pretrain_epochs,
            max_steps=pretrain_max_steps,
            seed=seed,
        ).set_display_name("domain_pretrain")
        training_resources(pretrain)
        adapted = supervised_train(
            dataset=dataset,
            recipe=recipe,
            recipe_overrides_json=recipe_overrides_json,
            backbone=pretrain.outputs["backbone"],
            checkpoint_uri=checkpoint_uri,
        ).set_display_name("supervised_train")
        training_resources(adapted)
        decide_validate_export(dataset, adapted, decisions, release, destination, threshold_at_half)
    with dsl.Else(name="domain-pretrain-off"):
        scratch = supervised_train(
            dataset=dataset, recipe=recipe, recipe_overrides_json=recipe_overrides_json, checkpoint_uri=checkpoint_uri
        ).set_display_name("supervised_train")
        training_resources(scratch)
        decide_validate_export(dataset, scratch, decisions, release, destination, threshold_at_half)
    kubernetes.use_secret_as_env(fetch, secret_name=S3_SECRET, secret_key_to_env=S3_SECRET_KEYS, optional=True)
    return TrainingOutputs(dataset=dataset, data_summary=fetch.outputs["summary"])
