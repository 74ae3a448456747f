"""The training pipeline: the graph users upload in the Kubeflow UI (compiled to pipelines/compiled/).

Every parameter below appears in the UI's run form with its default.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Markdown

from components.data_fetch import data_fetch

PIPELINE_NAME = "visionpipe-training"


class TrainingOutputs(NamedTuple):
    dataset: Dataset
    data_summary: Markdown


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Fetch labelled images and split them leakage-free.",
)
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
) -> TrainingOutputs:
    """source: builtin://sklearn-digits, or an image folder <class>/<file> on a local path or s3://bucket/prefix.
    positive_class: the class scored as positive in binary tasks (empty for multi-class).
    image_size: resize every image to this square side (0 keeps the native size, which must be uniform).
    *_ratio: split shares (each > 0, summing to 1). seed: split and training seed.
    max_bad_fraction: the share of unreadable files tolerated before the run fails."""
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
    )
    fetch.set_display_name("data_fetch")
    return TrainingOutputs(dataset=fetch.outputs["dataset"], data_summary=fetch.outputs["summary"])
