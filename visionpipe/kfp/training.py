"""The training pipeline: the seven phases, as users upload it in the Kubeflow UI (visionpipe/kfp/compiled/).

Every parameter below appears in the UI's run form with its default and the description from the pipeline
function's Google-style ``Args:`` section: KFP parses the docstring with `docstring_parser` and copies each entry to
``root.inputDefinitions.parameters.<name>.description`` (``extract_component_interface`` in
kfp/dsl/component_factory.py). Locally, `visionpipe run` / `make demo` run the same graph with kfp.local.
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
from visionpipe.kfp.platform import training_resources, use_s3_secret
from visionpipe.serving.storage import S3_SECRET, S3_SECRET_KEYS  # noqa: F401 (re-exported: the Secret and its keys)

PIPELINE_NAME = "visionpipe-training"


class TrainingOutputs(NamedTuple):
    dataset: Dataset
    data_summary: Markdown
    bundle_uri: str


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
) -> TrainingOutputs:
    """Train, threshold, calibrate, validate and publish an image classifier.

    Args:
        source: Where the labelled images come from: builtin://sklearn-digits (scikit-learn's 1,797 8x8 grey
            digits, no download), or an image folder laid out as <class>/<image> (.png, .jpg, .jpeg) under
            s3://bucket/prefix or a local path (a local path only where the step can read it, e.g. kfp.local).
            Class names are the folder names, sorted.
        positive_class: For a two-class task, the class folder name that is "positive": the threshold sweep
            decides for it, the min_mcc gate and the MCC champion comparison apply, threshold_at_half is
            allowed. Must be one of the class names; empty = none (multi-class tasks).
        image_size: Resize every image to image_size x image_size pixels (bilinear), 1..4096; 0 = keep the
            native size (every image must then have the same size).
        train_ratio: Share of the images in the train split (fits the model). Each ratio > 0; the four split
            ratios must sum to 1. Splits are stratified and identical images never straddle two splits.
        val_select_ratio: Share of the images in val_select (picks the best epoch). > 0; the four ratios sum to 1.
        val_calib_ratio: Share of the images in val_calib (fits the threshold, the calibrator and the conformal /
            SCRC parameters). > 0; the four ratios sum to 1.
        val_test_ratio: Share of the images in val_test (reported on and gated on, never fitted on). > 0; the
            four ratios sum to 1.
        seed: Integer seed of the splits, of domain_pretrain, of the bootstrap and of the calibration folds (the
            training seed is the recipe's own `seed`).
        max_bad_fraction: Largest share of unreadable or non-image files in the source, in [0, 1); such files
            are left out and listed in the data summary, above this share the run fails.
        recipe: Training recipe: a shipped name (digits-cnn, digits-cnn-mnist, digits-resnet18,
            roadwork-vit-dora, roadwork-dinov2-lora) or the path of a recipe YAML file inside the image.
        recipe_overrides_json: JSON object overriding recipe fields, nested or with dotted keys, e.g.
            {"epochs": 3, "optimizer.lr": 0.01}; {} = the recipe as shipped.
        checkpoint_uri: s3://bucket/prefix (or an absolute folder every attempt sees) to which each epoch's
            training checkpoint is mirrored, so a retried training pod on an empty disk resumes; empty = the
            checkpoint stays in the pod only.
        domain_pretrain_enabled: true = first adapt the backbone with self-supervised domain_pretrain
            (ExPLoRA-style DINO on the train images, labels unused), then train from it; false = train directly.
        pretrain_epochs: Epochs of domain_pretrain (>= 1); used only when domain_pretrain_enabled is true.
        pretrain_max_steps: Cap on domain_pretrain's optimizer steps (>= 0); 0 = no cap, the epochs decide.
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
        description: Free-text description in the model card; empty = "<model_name>: <K>-class image
            classifier".
        submitter: Who submitted the run, recorded in the model card; empty = not recorded.
        parent_bundle: URI of the bundle this one derives from, recorded in the provenance; empty = none.
        min_accuracy: Quality gate: val_test accuracy must be >= this value (at most 1); negative = gate off.
        min_mcc: Quality gate for two-class tasks with positive_class set: val_test MCC must be >= this value,
            in [-1, 1]; below -1 = gate off.
        max_ece: Quality gate: val_test expected calibration error (15 equal-width bins, calibrated
            probabilities) must be <= this value (at most 1); negative = gate off.
        champion_uri: Bundle to compare with (a folder or s3://bucket/.../<name>/<version>): the run fails when
            the candidate's val_test MCC (two-class with positive_class) or accuracy is below the champion's
            minus champion_margin; empty = no champion check.
        champion_margin: How much worse than the champion the candidate may be (>= 0, in units of the compared
            metric: MCC or accuracy).
        destination: Where the bundle is published, at <destination>/<model_name>/<version>/ (never
            overwritten). On a cluster it must be an s3://bucket/prefix URI (a pod's folders vanish with the
            pod); a local folder only with kfp.local (`visionpipe run` defaults it to ./bundles).
        threshold_at_half: true = publish a two-class bundle (positive_class set) whose calibrated probability is
            remapped so that the decision threshold sits at 0.5 (same decisions); false = publish as validated.
    """
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
    ).set_display_name("data_fetch")
    fetch.after(check)  # nothing runs on a run form that check_run_form refused
    use_s3_secret(fetch)
    dataset = fetch.outputs["dataset"]
    spec = resolve_model_spec(
        dataset=dataset, recipe=recipe, recipe_overrides_json=recipe_overrides_json
    ).set_display_name("resolve_model_spec")
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
    ).set_display_name("supervised_train")
    training_resources(train)
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
        destination=destination,
    ).set_display_name("decide_and_publish")
    return TrainingOutputs(
        dataset=dataset, data_summary=fetch.outputs["summary"], bundle_uri=decision.outputs["bundle_uri"]
    )
