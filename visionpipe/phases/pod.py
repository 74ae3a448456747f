"""Storage for the pipeline phases: local paths and ``s3://`` URIs (MinIO), with retries and named errors.

The implementation lives in `visionpipe.serving.storage` (the predictor reads bundles from S3 too, and serving imports
nothing from components/); this module is the components-side name for it, plus the guard against publishing
to a pod's own disk on a cluster (`refuse_local_destination_in_pod`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from visionpipe.serving.storage import (
    REQUIRED_S3_SETTINGS,
    S3_SECRET,
    S3_SECRET_KEYS,
    ObjectNotFound,
    S3AuthError,
    S3BucketMissing,
    S3ConnectionError,
    S3CredentialsMissing,
    S3EndpointError,
    StorageError,
    delete,
    download_file,
    download_prefix,
    ensure_bucket,
    exists,
    is_s3,
    join,
    list_uris,
    missing_s3_settings,
    read_bytes,
    require_s3_credentials,
    sha256_of,
    split_s3,
    upload_file,
    write_bytes,
)

# The KFP v2 backend gives every executor pod (the container that runs a component's code) these two variables
# through the downward API: `commonEnvs` in backend/src/v2/compiler/argocompiler/common.go (metadata.name /
# metadata.uid), set as the executor's `Env` in argocompiler/container.go; the launcher reads them
# (backend/src/v2/component/constants.go: EnvPodName, EnvPodUID). kfp.local (SubprocessRunner) sets neither: it
# runs the component in a subprocess with the caller's environment. KUBERNETES_SERVICE_HOST (set by the kubelet in
# every pod) is required too, so a stray variable on a laptop is not enough.
KFP_POD_ENV = ("KFP_POD_NAME", "KFP_POD_UID")
# The image a step runs, for the pods it starts itself (supervised_train's TrainJob workers,
# visionpipe/kfp/scale_out.py): the pipeline sets it on that task, `visionpipe compile --image` writes the
# reference into it (visionpipe/kfp/compile.py), as it does into every executor's `image`.
IMAGE_ENV = "VISIONPIPE_IMAGE"
KUBERNETES_ENV = "KUBERNETES_SERVICE_HOST"
DESTINATION_ADVICE = "pass -p destination=s3://<bucket>/bundles"


class LocalDestinationOnCluster(StorageError):
    """A step in a Kubeflow pod was asked to publish to a local path: the pod's disk vanishes with the pod."""


def in_kfp_pod(environ: Mapping[str, str] | None = None) -> bool:
    """True inside a Kubeflow Pipelines executor pod on a cluster; False under kfp.local and on a workstation."""
    env = os.environ if environ is None else environ
    return bool(env.get(KUBERNETES_ENV)) and all(env.get(name) for name in KFP_POD_ENV)


def refuse_local_destination_in_pod(destination: str, environ: Mapping[str, str] | None = None) -> None:
    """In a KFP pod, refuse a destination that is not s3:// (it would be written to the pod's disk and lost)."""
    if in_kfp_pod(environ) and not is_s3(destination):
        env = os.environ if environ is None else environ
        raise LocalDestinationOnCluster(
            f"destination={destination!r} is not an s3:// URI, and this step runs in the Kubeflow pod "
            f"{env.get('KFP_POD_NAME')!r}: the bundle would land on the pod's own disk and be deleted with it, "
            f"so nothing would be published. Publish to object storage: {DESTINATION_ADVICE} (credentials from "
            f"the Kubernetes Secret '{S3_SECRET}')."
        )


SIGNING_SECRET = "visionpipe-signing-key"  # Kubernetes Secret with the bundle signing key (docs/rollout.md)
SIGNING_SECRET_KEYS = {"signing-key": "VISIONPIPE_SIGNING_KEY"}


class SigningKeyMissing(StorageError):
    """A step in a Kubeflow pod would sign a bundle with a throwaway key that no server trusts."""


def require_signing_key_in_pod(environ: Mapping[str, str] | None = None) -> None:
    """In a KFP pod, refuse to sign without VISIONPIPE_SIGNING_KEY: a key generated in the pod dies with it, and
    every server would then refuse the bundle as `untrusted_key`. Locally, the user's own key is used."""
    from visionpipe.serving.signing import SIGNING_KEY_ENV

    env = os.environ if environ is None else environ
    if in_kfp_pod(env) and not env.get(SIGNING_KEY_ENV):
        raise SigningKeyMissing(
            f"{SIGNING_KEY_ENV} is not set in this Kubeflow pod, so the bundle cannot be signed with a key that "
            f"serving trusts. Create the Secret '{SIGNING_SECRET}' with the key 'signing-key' "
            "(python -m visionpipe.serving.signing keygen --out key; kubectl create secret generic "
            f"{SIGNING_SECRET} --from-file=signing-key=key) in the run's namespace."
        )


__all__ = [
    "DESTINATION_ADVICE",
    "IMAGE_ENV",
    "KFP_POD_ENV",
    "KUBERNETES_ENV",
    "REQUIRED_S3_SETTINGS",
    "S3_SECRET",
    "S3_SECRET_KEYS",
    "SIGNING_SECRET",
    "SIGNING_SECRET_KEYS",
    "LocalDestinationOnCluster",
    "ObjectNotFound",
    "S3AuthError",
    "S3BucketMissing",
    "S3ConnectionError",
    "S3CredentialsMissing",
    "S3EndpointError",
    "SigningKeyMissing",
    "StorageError",
    "delete",
    "download_file",
    "download_prefix",
    "ensure_bucket",
    "exists",
    "in_kfp_pod",
    "is_s3",
    "join",
    "list_uris",
    "missing_s3_settings",
    "read_bytes",
    "refuse_local_destination_in_pod",
    "require_s3_credentials",
    "require_signing_key_in_pod",
    "sha256_of",
    "split_s3",
    "upload_file",
    "write_bytes",
]
