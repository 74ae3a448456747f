"""The canary step of a pipeline: one KServe canary action on an InferenceService (core:
visionpipe.rollout.canary, the same code path as `visionpipe canary`).

In a pod the step reaches the API server with its service account (in-cluster config); that account needs the
Role in manifests/pipeline-rbac (get + patch on inferenceservices.serving.kserve.io in the InferenceService's
namespace). Outside a cluster (kfp.local) it falls back to the kubeconfig, like kubectl.
"""

# No `from __future__ import annotations` here: KFP reads the component signature at import time.

from visionpipe.kfp.platform import component


@component
def canary_rollout(action: str, isvc_name: str, namespace: str, bundle_uri: str = "", canary_percent: int = 10) -> str:
    """Run `action` (start / promote / rollback / status) on InferenceService `isvc_name` in `namespace`;
    `bundle_uri`: start's bundle (promote: checked against the running canary; rollback: the stable bundle when
    `start` did not record it). Returns the status afterwards as JSON (visionpipe.rollout.canary.CanaryStatus)."""
    from visionpipe.rollout.canary import Canary, Connection, KubeIsvcApi

    api = KubeIsvcApi.connect(Connection(prefer_in_cluster=True))
    outcome = Canary(api, isvc_name, namespace).run(action, bundle_uri or None, canary_percent)
    print(f"{action}: {'patched ' + str(outcome.patch) if outcome.patch is not None else 'nothing to change'}")
    return outcome.status.to_json()
