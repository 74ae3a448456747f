"""Thin KFP components of the monthly retrain (core: visionpipe.phases.monthly)."""

# No `from __future__ import annotations` here: KFP reads the component signature at import time.

from kfp.dsl import Dataset, Markdown, Model, Output

from visionpipe.kfp.platform import component


@component
def fetch_month(
    dataset: Output[Dataset],
    summary: Output[Markdown],
    data_prefix: str,
    data_month: str = "",
    hard_examples_prefix: str = "",
    seed: int = 0,
    positive_class: str = "",
    image_size: int = 0,
    recipe: str = "",
    recipe_overrides_json: str = "{}",
    schedule_time: str = "",
    create_time: str = "",
) -> str:
    """Gather the month's images (<data_prefix>/<YYYY-MM>/<class>/<image>) and the month's labelled hard
    examples, then split them like data_fetch. Returns the resolved month: data_month, else the month before the
    run's schedule_time, else before its create_time (the pipeline passes KFP's placeholders for both), else before
    the clock (visionpipe.phases.monthly.choose_month)."""
    import tempfile
    from pathlib import Path

    from visionpipe.phases.data_fetch import run
    from visionpipe.phases.monthly import gather_month, record_month
    from visionpipe.phases.pod import require_s3_credentials

    require_s3_credentials(data_prefix, hard_examples_prefix)  # fail at the start, naming the Secret
    with tempfile.TemporaryDirectory() as tmp:
        month = gather_month(
            data_prefix, data_month, hard_examples_prefix, Path(tmp) / "images", schedule_time, create_time
        )
        result = run(
            str(month.folder),
            Path(dataset.path),
            seed=seed,
            positive_class=positive_class,
            image_size=image_size,
            recipe=recipe,
            recipe_overrides_json=recipe_overrides_json,
        )
    record_month(Path(dataset.path), month)
    basis = month.choice.describe() if month.choice else ""
    header = (
        f"## Month {month.month}\n\nChosen as {basis}. Data: `{month.source}`.\n\n"
        f"New images per class: {month.new_images}; labelled hard examples per class: {month.hard_examples}.\n\n"
    )
    dataset.metadata.update(
        {
            "month": month.month,
            "month_basis": month.choice.basis if month.choice else "",
            "month_time": month.choice.time if month.choice else "",
            "source": month.source,
            "num_images": result.num_images,
        }
    )
    body = result.summary_markdown.replace(str(month.folder), month.source)  # name the month's prefix, not tmp
    Path(summary.path).write_text(header + body)
    print(header + body)
    return month.month


@component
def champion_warm_start(backbone: Output[Model], champion_uri: str) -> None:
    """Verify the champion bundle and hand its backbone to supervised_train as the warm start."""
    from pathlib import Path

    from visionpipe.phases.monthly import champion_backbone
    from visionpipe.phases.pod import require_s3_credentials

    require_s3_credentials(champion_uri)  # fail at the start, naming the Secret
    backbone.metadata.update(champion_backbone(champion_uri, Path(backbone.path)))
