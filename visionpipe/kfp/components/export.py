"""Thin KFP component of phase export (core: visionpipe.phases.export)."""

# No `from __future__ import annotations` here: KFP reads the component signature at import time.

from kfp.dsl import Artifact, Input, Markdown, Model, Output

from visionpipe.kfp.platform import component


@component
def export(
    bundle: Input[Model],
    published: Output[Artifact],
    summary: Output[Markdown],
    destination: str = "bundles",
) -> str:
    """Publish the validated bundle to <destination>/<name>/<version>/ (a local folder or s3://bucket/prefix,
    credentials from the environment), checksums verified after upload, bundle.json last, then re-verified.
    The bundle is published exactly as bundle_validation checked and signed it (threshold_at_half included).
    Returns the KServe storageUri of the published bundle (for s3://, the folder URI with a trailing /).
    On a cluster (in a Kubeflow pod) destination must be s3://; without S3 settings the step fails at once."""
    from visionpipe.phases.pod import (
        refuse_local_destination_in_pod,
        require_s3_credentials,
        require_signing_key_in_pod,
    )

    refuse_local_destination_in_pod(destination)  # first thing: fail before any work, naming the fix
    require_s3_credentials(destination)
    require_signing_key_in_pod()  # the re-verification after upload trusts the public half of the signing key

    import json
    from pathlib import Path

    from visionpipe.phases.export import run

    result = run(Path(bundle.path), destination)
    published.metadata.update({"bundle_uri": result.uri, "storage_uri": result.storage_uri, "version": result.version})
    Path(published.path).parent.mkdir(parents=True, exist_ok=True)
    Path(published.path).write_text(json.dumps({"uri": result.uri, "version": result.version}) + "\n")
    Path(summary.path).write_text(
        f"## Export\n\nPublished `{result.uri}` ({result.files} files); KServe storageUri `{result.storage_uri}`.\n"
    )
    return result.storage_uri
