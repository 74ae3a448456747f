"""The monthly retrain pipeline: the new month's data + labelled hard examples, warm-started from the champion,
gated against the champion on a common val_test, exported as a new version, optionally canaried on KServe.

Scheduled as a recurring run (`visionpipe schedule --cron "0 0 3 1 * *"`, 6-field cron, seconds first). Each run
works on its own month: fetch_month takes the run's schedule and creation times from KFP's placeholders and, unless
`data_month` is set, retrains on the month before the schedule time (visionpipe.phases.monthly.choose_month).

Caching (KFP v2 keys a task by its input parameter values, its input artifacts' MLMD ids, its outputs' spec, image
and command, per pipeline name and namespace: kubeflow/pipelines backend/src/v2/cacheutils/cache.go
`GenerateCacheKey`, backend/src/v2/driver/cache.go `getFingerPrintsAndID`): every task that reads or writes
anything besides its own parameters and artifacts (a prefix, a bundle, a checkpoint mirror, the destination, the
cluster) is never served from cache, since that outside state changes under the same parameters. The pure tasks
(check_run_form, threshold_sweep, calibration) keep KFP's default; they can only hit the cache on the very
artifacts an uncached task produced in this run, i.e. never across runs. tests/test_pipelines.py checks the table.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Markdown

from visionpipe.kfp.components.canary import canary_rollout
from visionpipe.kfp.components.check_run_form import check_monthly_run_form
from visionpipe.kfp.components.monthly import champion_warm_start, fetch_month
from visionpipe.kfp.components.supervised_train import supervised_train
from visionpipe.kfp.decision import decide_and_publish
from visionpipe.kfp.platform import (
    CREATE_TIME,
    SCHEDULE_TIME,
    runs_own_image,
    training_resources,
    use_s3_secret,
)
from visionpipe.kfp.run_form import run_form_doc

PIPELINE_NAME = "visionpipe-monthly-retrain"


class MonthlyOutputs(NamedTuple):
    dataset: Dataset
    data_summary: Markdown
    bundle_uri: str


@dsl.pipeline(name=PIPELINE_NAME, description="Monthly retrain from the champion; export only if it holds its ground.")
@run_form_doc("monthly-retrain")
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
    train_workers: int = 1,
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
    compiled_runtime: str = "none",
    start_canary_enabled: bool = False,
    isvc_name: str = "digits",
    namespace: str = "kubeflow-user",
    canary_percent: int = 10,
) -> MonthlyOutputs:
    """Retrain on the new month from the champion; export only if it holds its ground."""
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
        train_workers=train_workers,
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
        compiled_runtime=compiled_runtime,
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
        recipe=recipe,  # image_size=0: mixed sizes are stored at the recipe's input side
        recipe_overrides_json=recipe_overrides_json,
        schedule_time=SCHEDULE_TIME,  # the recurring run's slot (KFP >= 2.17; see platform.py)
        create_time=CREATE_TIME,  # one-off runs
    ).set_display_name("fetch_month")
    warm = champion_warm_start(champion_uri=champion_uri).set_display_name("champion_warm_start")
    for task in (month, warm):  # nothing runs on a run form that check_run_form refused
        task.after(check)
        use_s3_secret(task)  # data_prefix, hard_examples_prefix and champion_uri may be s3://
        # Never cached: the month's images and hard examples under the prefixes, and the bundle at champion_uri,
        # change without any parameter changing (and on KFP < 2.16 the time inputs stay literal placeholders).
        task.set_caching_options(False)
    train = supervised_train(
        dataset=month.outputs["dataset"],
        recipe=recipe,
        recipe_overrides_json=recipe_overrides_json,
        backbone=warm.outputs["backbone"],
        checkpoint_uri=checkpoint_uri,
        train_workers=train_workers,
    ).set_display_name("supervised_train")
    training_resources(train)
    runs_own_image(train)  # with train_workers > 1 on a cluster it starts a TrainJob in its own image
    train.set_caching_options(False)  # resumes from the checkpoint mirror under checkpoint_uri: outside state
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
        compiled_runtime=compiled_runtime,
        destination=destination,
    ).set_display_name("decide_and_publish")
    decision.set_caching_options(False)  # the sub-DAG; its own tasks carry their settings (decision.py)
    with dsl.If(start_canary_enabled == True, name="canary"):  # noqa: E712 (KFP condition syntax)
        canary_rollout(  # the same code path as `visionpipe canary start` (visionpipe/rollout/canary.py)
            action="start",
            bundle_uri=decision.outputs["bundle_uri"],
            isvc_name=isvc_name,
            namespace=namespace,
            canary_percent=canary_percent,
        ).set_display_name("start_canary").set_caching_options(False)  # patches the live InferenceService
    return MonthlyOutputs(
        dataset=month.outputs["dataset"],
        data_summary=month.outputs["summary"],
        bundle_uri=decision.outputs["bundle_uri"],
    )
