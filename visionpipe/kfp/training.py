"""The training pipeline: the seven phases, as users upload it in the Kubeflow UI (visionpipe/kfp/compiled/).

Every parameter below appears in the UI's run form with its default and the description from the pipeline
function's Google-style ``Args:`` section: KFP parses the docstring with `docstring_parser` and copies each entry to
``root.inputDefinitions.parameters.<name>.description`` (``extract_component_interface`` in
kfp/dsl/component_factory.py). Locally, `visionpipe run` / `make demo` run the same graph with kfp.local.

Caching follows the rule of visionpipe/kfp/monthly.py: data_fetch (reads `source`, a folder or s3:// prefix whose
contents change under the same URI), supervised_train (checkpoint mirror under checkpoint_uri) and, in the decision
sub-graph, bundle_validation and export are never served from cache; check_run_form, resolve_model_spec,
domain_pretrain, threshold_sweep and calibration are pure functions of their parameters and input artifacts and
keep KFP's default.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Markdown

from visionpipe.kfp.components.check_run_form import check_training_run_form
from visionpipe.kfp.components.data_fetch import data_fetch
from visionpipe.kfp.components.domain_pretrain import domain_pretrain
from visionpipe.kfp.components.model_spec import resolve_model_spec
from visionpipe.kfp.components.supervised_train import supervised_train
from visionpipe.kfp.decision import decide_and_publish
from visionpipe.kfp.platform import runs_own_image, training_resources, use_s3_secret
from visionpipe.kfp.run_form import run_form_doc
from visionpipe.serving.storage import S3_SECRET, S3_SECRET_KEYS  # noqa: F401 (re-exported: the Secret and its keys)

PIPELINE_NAME = "visionpipe-training"


class TrainingOutputs(NamedTuple):
    dataset: Dataset
    data_summary: Markdown
    bundle_uri: str


@dsl.pipeline(name=PIPELINE_NAME, description="Train, threshold, calibrate, validate and publish an image classifier.")
@run_form_doc("training")
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
    train_workers: int = 1,
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
    model_name: str = "digits",
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
    compiled_runtime: str = "none",
) -> TrainingOutputs:
    """Train, threshold, calibrate, validate and publish an image classifier."""
    check = check_training_run_form(
        source=source,
        positive_class=positive_class,
        image_size=image_size,
        train_ratio=train_ratio,
        val_select_ratio=val_select_ratio,
        val_calib_ratio=val_calib_ratio,
        val_test_ratio=val_test_ratio,
        seed=seed,
        max_bad_fraction=max_bad_fraction,
        recipe=recipe,
        recipe_overrides_json=recipe_overrides_json,
        checkpoint_uri=checkpoint_uri,
        train_workers=train_workers,
        domain_pretrain_enabled=domain_pretrain_enabled,
        pretrain_epochs=pretrain_epochs,
        pretrain_max_steps=pretrain_max_steps,
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
        description=description,
        submitter=submitter,
        parent_bundle=parent_bundle,
        min_accuracy=min_accuracy,
        min_mcc=min_mcc,
        max_ece=max_ece,
        champion_uri=champion_uri,
        champion_margin=champion_margin,
        destination=destination,
        threshold_at_half=threshold_at_half,
        compiled_runtime=compiled_runtime,
    ).set_display_name("check_run_form")
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
        recipe=recipe,  # image_size=0: mixed sizes are stored at the recipe's input side
        recipe_overrides_json=recipe_overrides_json,
    ).set_display_name("data_fetch")
    fetch.after(check)  # nothing runs on a run form that check_run_form refused
    use_s3_secret(fetch)
    fetch.set_caching_options(False)  # the images under `source` change without the parameter changing
    dataset = fetch.outputs["dataset"]
    spec = resolve_model_spec(
        dataset=dataset, recipe=recipe, recipe_overrides_json=recipe_overrides_json
    ).set_display_name("resolve_model_spec")
    # resolve_model_spec and domain_pretrain: cached by default (pure; their input artifact is this run's Dataset).
    # domain_pretrain always runs: with enabled=False it only writes a pass-through backbone, which
    # supervised_train treats as no backbone (kfp.local 2.17.3 cannot resolve an artifact dsl.OneOf of two
    # branches: kfp/local/orchestrator/orchestrator_utils.py `get_dag_output_artifacts`).
    pretrain = domain_pretrain(
        dataset=dataset,
        arch_json=spec.outputs["arch_json"],
        preprocess_json=spec.outputs["preprocess_json"],
        epochs=pretrain_epochs,
        max_steps=pretrain_max_steps,
        seed=seed,
        enabled=domain_pretrain_enabled,
    ).set_display_name("domain_pretrain")
    training_resources(pretrain)
    train = supervised_train(
        dataset=dataset,
        recipe=recipe,
        recipe_overrides_json=recipe_overrides_json,
        backbone=pretrain.outputs["backbone"],
        checkpoint_uri=checkpoint_uri,
        train_workers=train_workers,
    ).set_display_name("supervised_train")
    training_resources(train)
    runs_own_image(train)  # with train_workers > 1 on a cluster it starts a TrainJob in its own image
    train.set_caching_options(False)  # resumes from the checkpoint mirror under checkpoint_uri: outside state
    decision = decide_and_publish(
        dataset=dataset,
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
        destination=destination,
    ).set_display_name("decide_and_publish")
    decision.set_caching_options(False)  # the sub-DAG; its own tasks carry their settings (decision.py)
    return TrainingOutputs(
        dataset=dataset, data_summary=fetch.outputs["summary"], bundle_uri=decision.outputs["bundle_uri"]
    )
