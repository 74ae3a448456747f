"""The first step of each pipeline: the run form checked against the constraint table (visionpipe.specs.params).

A run started from the Kubeflow UI (or `visionpipe submit`) with a bad value, e.g. calibration_method="bogus",
fails in this step, before data_fetch, instead of after a whole training run. One component per pipeline, as
each takes that pipeline's run form as typed inputs (a dict input holding pipeline channels is not resolved by
kfp.local 2.17.3, so the values cannot travel as one STRUCT); both show as `check_run_form` in the UI.
"""

# No `from __future__ import annotations` here: KFP reads the component signature at import time.

from visionpipe.kfp.platform import component


@component
def check_training_run_form(
    source: str,
    positive_class: str,
    image_size: int,
    train_ratio: float,
    val_select_ratio: float,
    val_calib_ratio: float,
    val_test_ratio: float,
    seed: int,
    max_bad_fraction: float,
    recipe: str,
    recipe_overrides_json: str,
    checkpoint_uri: str,
    train_workers: int,
    domain_pretrain_enabled: bool,
    pretrain_epochs: int,
    pretrain_max_steps: int,
    objective: str,
    target_selective_accuracy: float,
    bootstrap: int,
    calibration_method: str,
    alpha: float,
    conformal_score: str,
    scrc_selection_rate: float,
    scrc_delta: float,
    active_policy: str,
    model_name: str,
    description: str,
    submitter: str,
    parent_bundle: str,
    min_accuracy: float,
    min_mcc: float,
    max_ece: float,
    champion_uri: str,
    champion_margin: float,
    destination: str,
    threshold_at_half: bool,
    compiled_runtime: str,
) -> None:
    """The first step of the training pipeline: check the whole run form (every parameter as the run
    received it) against visionpipe.specs.params, so a bad value fails the run before any work, naming each bad
    field, the value given and the allowed values."""
    values = dict(locals())  # exactly the parameters above

    from visionpipe.specs.params import validate_run_form

    validate_run_form("training", values)
    print(f"check_run_form: the training run form is valid ({len(values)} parameters)")


@component
def check_monthly_run_form(
    data_prefix: str,
    champion_uri: str,
    data_month: str,
    hard_examples_prefix: str,
    positive_class: str,
    image_size: int,
    seed: int,
    recipe: str,
    recipe_overrides_json: str,
    checkpoint_uri: str,
    train_workers: int,
    objective: str,
    target_selective_accuracy: float,
    bootstrap: int,
    calibration_method: str,
    alpha: float,
    conformal_score: str,
    scrc_selection_rate: float,
    scrc_delta: float,
    active_policy: str,
    model_name: str,
    submitter: str,
    min_accuracy: float,
    min_mcc: float,
    max_ece: float,
    champion_margin: float,
    destination: str,
    compiled_runtime: str,
    start_canary_enabled: bool,
    isvc_name: str,
    namespace: str,
    canary_percent: int,
) -> None:
    """The first step of the monthly-retrain pipeline: check the whole run form (every parameter as the run
    received it) against visionpipe.specs.params, so a bad value fails the run before any work, naming each bad
    field, the value given and the allowed values."""
    values = dict(locals())  # exactly the parameters above

    from visionpipe.specs.params import validate_run_form

    validate_run_form("monthly-retrain", values)
    print(f"check_run_form: the monthly-retrain run form is valid ({len(values)} parameters)")
