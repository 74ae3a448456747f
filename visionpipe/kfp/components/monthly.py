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
) -> str:
    """Gather the month's images (<data_prefix>/<YYYY-MM>/<class>/<image>) and the month's labelled hard
    examples, then split them like data_fetch. Returns the resolved month (empty data_month = previous month)."""
    import tempfile
    from pathlib import Path

    from visionpipe.phases.data_fetch import run
    from visionpipe.phases.monthly import gather_month
    from visionpipe.phases.pod import require_s3_credentials

    require_s3_credentials(data_prefix, hard_examples_prefix)  # fail at the start, naming the Secret
    with tempfile.TemporaryDirectory() as tmp:
        month = gather_month(data_prefix, data_month, hard_examples_prefix, Path(tmp) / "images")
        result = run(
            str(month.folder), Path(dataset.path), seed=seed, positive_class=positive_class, image_size=image_size
        )
    header = (
        f"## Month {month.month}\n\nNew images per class: {month.new_images}; "
        f"labelled hard examples per class: {month.hard_examples}.\n\n"
    )
    dataset.metadata.update({"month": month.month, "num_images": result.num_images})
    Path(summary.path).write_text(header + result.summary_markdown)
    print(header + result.summary_markdown)
    return month.month


@component
def champion_warm_start(backbone: Output[Model], champion_uri: str) -> None:
    """Verify the champion bundle and hand its backbone to supervised_train as the warm start."""
    from pathlib import Path

    from visionpipe.phases.monthly import champion_backbone
    from visionpipe.phases.pod import require_s3_credentials

    require_s3_credentials(champion_uri)  # fail at the start, naming the Secret
    backbone.metadata.update(champion_backbone(champion_uri, Path(backbone.path)))


@component
def start_canary(bundle_uri: str, isvc_name: str, namespace: str = "kubeflow-user", canary_percent: int = 10) -> str:
    """Start a KServe canary with the new bundle: patch the InferenceService (needs the RBAC in
    manifests/pipeline-rbac)."""
    import json

    from visionpipe.phases.monthly import start_canary_patch

    result = start_canary_patch(isvc_name, namespace, bundle_uri, canary_percent)
    return json.dumps(result.get("metadata", {}), sort_keys=True)
