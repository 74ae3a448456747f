"""Thin KFP component of phase data_fetch (core: visionpipe.phases.data_fetch)."""

# No `from __future__ import annotations` here: KFP reads the component signature at import time.

from kfp.dsl import Dataset, Markdown, Output

from visionpipe.kfp.platform import component


@component
def data_fetch(
    dataset: Output[Dataset],
    summary: Output[Markdown],
    source: str = "builtin://sklearn-digits",
    train_ratio: float = 0.7,
    val_select_ratio: float = 0.1,
    val_calib_ratio: float = 0.1,
    val_test_ratio: float = 0.1,
    seed: int = 0,
    positive_class: str = "",
    image_size: int = 0,
    min_per_class_per_split: int = 1,
    max_bad_fraction: float = 0.05,
    recipe: str = "",
    recipe_overrides_json: str = "{}",
) -> None:
    """Read labelled images (builtin://sklearn-digits, or a local / s3:// folder of <class>/<image>),
    split them into train / val_select / val_calib / val_test (stratified, seeded, duplicates kept
    together), and write the Dataset artifact with its splits.json and a class-count summary. With image_size=0,
    images of mixed sizes are stored at `recipe`'s input side (visionpipe.phases.data_fetch `size_plan`)."""
    from visionpipe.phases.pod import require_s3_credentials

    require_s3_credentials(source)  # first thing: no S3 settings -> fail naming the Secret, before any work

    from pathlib import Path

    from visionpipe.phases.data_fetch import run

    result = run(
        source,
        Path(dataset.path),
        ratios=(train_ratio, val_select_ratio, val_calib_ratio, val_test_ratio),
        seed=seed,
        positive_class=positive_class,
        image_size=image_size,
        min_per_class_per_split=min_per_class_per_split,
        max_bad_fraction=max_bad_fraction,
        recipe=recipe,
        recipe_overrides_json=recipe_overrides_json,
    )
    dataset.metadata.update({"num_images": result.num_images, "classes": result.classes})
    Path(summary.path).write_text(result.summary_markdown)
    print(result.summary_markdown)
