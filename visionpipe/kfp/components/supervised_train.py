"""The KFP component of phase 3, supervised_train (thin: its body imports and calls
visionpipe.phases.supervised_train.run)."""

# No `from __future__ import annotations` here: KFP reads the component signature at import time.
from typing import Optional

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from visionpipe.kfp.platform import component


@component
def supervised_train(
    dataset: Input[Dataset],
    model: Output[Model],
    logits: Output[Artifact],
    metrics: Output[Metrics],
    curve: Output[HTML],
    recipe: str = "digits-cnn",
    recipe_overrides_json: str = "{}",
    backbone: Optional[Input[Model]] = None,  # noqa: UP045 (kfp needs Optional[...] for optional artifacts)
    checkpoint_uri: str = "",
    train_workers: int = 1,
) -> None:
    """Train a classifier from a recipe (a shipped name such as digits-cnn, or a YAML path) with optional JSON
    overrides; keep the best epoch on val_select; write the model (safetensors + model.json), logits of
    val_calib / val_test from that best model, metrics and a training curve. A retry resumes from the
    per-epoch checkpoint kept next to the model artifact; with checkpoint_uri (s3://bucket/prefix) it is
    mirrored to <checkpoint_uri>/<hash of this task's model URI>/ as well, which a retried pod on a cluster (same
    output URI, empty disk) resumes from. With train_workers > 1 the same training runs data-parallel: a
    Kubeflow Trainer TrainJob on a cluster (inputs and outputs through S3 under checkpoint_uri), local torchrun
    workers elsewhere (visionpipe/kfp/scale_out.py); the outputs are the same."""
    from visionpipe.phases.pod import require_s3_credentials

    require_s3_credentials(checkpoint_uri)  # first thing (backbone is an artifact: the launcher fetched it already)

    import hashlib
    import os
    from pathlib import Path

    from visionpipe.phases.supervised_train import curve_html, run
    from visionpipe.serving import storage
    from visionpipe.training.checkpoint import STATE_FILE, remove_mirror
    from visionpipe.training.recipes import load_recipe, parse_overrides

    chosen = load_recipe(recipe, parse_overrides(recipe_overrides_json))
    model_dir = Path(model.path)
    checkpoint_dir = model_dir.parent / (model_dir.name + "-checkpoint")
    mirror = ""
    if checkpoint_uri:
        mirror = storage.join(checkpoint_uri, hashlib.sha256(model.uri.encode()).hexdigest()[:16])
    # test hook: crash once after epoch N (only when no checkpoint exists yet), to exercise set_retry resume
    crash = os.environ.get("VISIONPIPE_CRASH_AFTER_EPOCH", "")
    mirrored = bool(mirror) and storage.exists(storage.join(mirror, STATE_FILE))
    has_checkpoint = (checkpoint_dir / STATE_FILE).exists() or mirrored
    stop_after = int(crash) if crash and not has_checkpoint else None
    png = Path(curve.path).with_suffix(".png")
    backbone_dir = Path(backbone.path) if backbone is not None else None
    if train_workers == 1:
        result = run(
            dataset_dir=Path(dataset.path),
            model_dir=model_dir,
            logits_dir=Path(logits.path),
            recipe=chosen,
            checkpoint_dir=checkpoint_dir,
            backbone_dir=backbone_dir,
            curve_path=png,
            stop_after_epoch=stop_after,
            checkpoint_uri=mirror,
        )
    else:
        from visionpipe.kfp.scale_out import Outputs, train_with_workers

        result = train_with_workers(
            dataset_dir=Path(dataset.path),
            outputs=Outputs(model_dir=model_dir, logits_dir=Path(logits.path), curve_png=png),
            recipe=recipe,
            recipe_overrides_json=recipe_overrides_json,
            backbone_dir=backbone_dir,
            checkpoint_dir=checkpoint_dir,
            checkpoint_uri=checkpoint_uri,
            mirror=mirror,
            train_workers=train_workers,
            task_key=model.uri,
        )
    Path(curve.path).write_text(curve_html(png, result))
    png.unlink()
    model.metadata.update(
        {
            "recipe": chosen.name,
            "best_epoch": result.best_epoch,
            "framework": "pytorch",
            "format": "safetensors",
        }
    )
    metrics.log_metric(f"val_select_{result.metric_name}", round(result.best_metric, 6))
    metrics.log_metric("best_epoch", result.best_epoch)
    metrics.log_metric("epochs_run", result.epochs_run)
    metrics.log_metric("train_seconds", round(result.train_seconds, 2))
    metrics.log_metric("train_images_per_second", round(result.images_per_second, 1))
    for split, acc in result.split_accuracy.items():
        metrics.log_metric(f"{split}_accuracy", round(acc, 6))
    if result.views_selection:  # the recipe's views were chosen / fitted on val_select (aggregate auto / learned)
        model.metadata["views"] = str(result.views_selection.get("signature", ""))
        candidates = result.views_selection.get("candidates", {})
        for name, scores in (candidates if isinstance(candidates, dict) else {}).items():
            if isinstance(scores, dict) and "nll" in scores:
                metrics.log_metric(f"val_select_views_nll_{name}", round(float(scores["nll"]), 6))
    if mirror:  # every output is written: the mirror has done its job
        remove_mirror(mirror)
