"""Components of the monthly retrain: the month's data (+ labelled hard examples), the champion as warm start,
and the optional canary that patches the InferenceService through the Kubernetes API.

Data layout (documented in docs/monthly.md):

    <data_prefix>/<YYYY-MM>/<class>/<image>                  the month's new labelled images
    <hard_examples_prefix>/<YYYY-MM>/labelled/<class>/<image> hard examples logged by serving, once labelled

An empty `data_month` is resolved inside the component (KFP's schedule-time placeholders crash kfp.local) to
the previous calendar month in UTC: a run scheduled on the 1st retrains on the month that just ended.
"""

import datetime as dt
import shutil
from dataclasses import dataclass
from pathlib import Path

ISVC_GROUP, ISVC_VERSION, ISVC_PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"


class MonthlyError(ValueError):
    """The month's inputs are missing or malformed; the message says what to fix."""


@dataclass(frozen=True)
class MonthData:
    month: str
    folder: Path
    new_images: dict[str, int]
    hard_examples: dict[str, int]


def resolve_month(data_month: str, today: dt.date | None = None) -> str:
    """`YYYY-MM` as given, or the previous calendar month (UTC) when empty."""
    if data_month:
        try:
            dt.datetime.strptime(data_month, "%Y-%m")
        except ValueError as exc:
            raise MonthlyError(f"data_month={data_month!r} must look like 2026-10 (or be empty)") from exc
        return data_month
    first = (today or dt.datetime.now(dt.UTC).date()).replace(day=1)
    return (first - dt.timedelta(days=1)).strftime("%Y-%m")


def gather_month(data_prefix: str, data_month: str, hard_examples_prefix: str, out: Path) -> MonthData:
    """Copy the month's images and its labelled hard examples into one `<class>/<file>` folder."""
    from visionpipe.data.hard_examples import collect_labelled
    from visionpipe.phases.data_fetch import class_files
    from visionpipe.serving import storage

    month = resolve_month(data_month)
    source = storage.join(data_prefix, month)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    try:
        uris = storage.list_uris(source)
    except storage.ObjectNotFound as exc:
        raise MonthlyError(f"no data for {month}: {source} is empty or missing") from exc
    for class_name, rel, uri in class_files(source, lambda _prefix: uris):
        dest = out / class_name / f"{month}-{Path(rel).name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(storage.read_bytes(uri))
        counts[class_name] = counts.get(class_name, 0) + 1
    hard: dict[str, int] = {}
    if hard_examples_prefix:
        staging = out.parent / (out.name + "-hard")
        hard = collect_labelled(hard_examples_prefix, [month], staging)
        for path in sorted(staging.rglob("*")):
            if path.is_file():
                dest = out / path.parent.name / f"hard-{path.name}"
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(path), dest)
        shutil.rmtree(staging, ignore_errors=True)
    if not counts and not hard:
        raise MonthlyError(f"no images for {month} under {source} nor labelled hard examples")
    return MonthData(month, out, counts, hard)


def champion_backbone(champion_uri: str, out_dir: Path) -> dict[str, object]:
    """Verify the champion bundle and write its backbone (supervised_train's warm start) to `out_dir`."""
    from visionpipe.serving.bundle import read_bundle
    from visionpipe.serving.models import save_backbone

    bundle = read_bundle(champion_uri)
    if len(bundle.members) != 1:
        raise MonthlyError(f"champion {champion_uri} is an ensemble of {len(bundle.members)}; warm start needs one")
    model = bundle.load_models()[0]
    info: dict[str, object] = {"parent_bundle": champion_uri, "parent_version": bundle.version}
    save_backbone(model, out_dir, extra=info)
    return info


# The canary step speaks both KServe canary mechanisms (docs/rollout.md): Knative mode (manifests/base) takes the
# predictor's canaryTrafficPercent; Standard mode (manifests/standard) takes a spec.canary entry, because only the
# Knative reconciler reads canaryTrafficPercent (kserve pkg/controller/v1beta1/inferenceservice/reconcilers/knative/
# ksvc_reconciler.go) and in Standard mode the new storageUri would take all the traffic at once. The same
# patches as `visionpipe canary start` (visionpipe/rollout/canary.py; a test keeps them equal).
DEPLOYMENT_MODE_ANNOTATION = "serving.kserve.io/deploymentMode"
LEGACY_MODES = {"Serverless": "Knative", "RawDeployment": "Standard"}  # kserve pkg/constants ParseDeploymentMode
CANARY_PREDICTOR = "canary"  # spec.canary[].predictor.name: Deployment / Service <isvc>-canary-predictor
CANARY_CONTAINER = "kserve-container"  # the CRD requires spec.canary[].predictor.model.name: the runtime container
MODEL_FORMAT = {"name": "visionpipe", "version": "1"}  # manifests/common/serving-runtime.yaml supportedModelFormats


def deployment_mode(isvc: dict[str, object]) -> str:
    """`Knative` or `Standard`: the mode a live InferenceService runs in (`status.deploymentMode`, recorded by the
    controller, else its `serving.kserve.io/deploymentMode` annotation; legacy names folded)."""
    status = isvc.get("status")
    metadata = isvc.get("metadata")
    annotations = metadata.get("annotations") if isinstance(metadata, dict) else None
    recorded = status.get("deploymentMode") if isinstance(status, dict) else None
    annotated = annotations.get(DEPLOYMENT_MODE_ANNOTATION) if isinstance(annotations, dict) else None
    mode = recorded or annotated
    if not isinstance(mode, str) or not mode:
        raise MonthlyError(
            "cannot tell the InferenceService's deployment mode: no status.deploymentMode and no "
            f"{DEPLOYMENT_MODE_ANNOTATION} annotation (set the annotation, as manifests/ do)"
        )
    return LEGACY_MODES.get(mode, mode)


def canary_patch(storage_uri: str, percent: int, mode: str = "Knative") -> dict[str, object]:
    """The merge patch that starts a canary of the bundle `storage_uri` at `percent`% for an InferenceService in
    deployment `mode` (Knative / Serverless: canaryTrafficPercent; Standard / RawDeployment: spec.canary)."""
    if not 0 < percent <= 100:
        raise MonthlyError(f"canary_percent={percent} must be in 1..100")
    mode = LEGACY_MODES.get(mode, mode)
    if mode == "Knative":
        return {"spec": {"predictor": {"canaryTrafficPercent": percent, "model": {"storageUri": storage_uri}}}}
    if mode == "Standard":
        model = {"name": CANARY_CONTAINER, "modelFormat": dict(MODEL_FORMAT), "storageUri": storage_uri}
        return {
            "spec": {"canary": [{"trafficPercent": percent, "predictor": {"name": CANARY_PREDICTOR, "model": model}}]}
        }
    raise MonthlyError(f"deployment mode {mode!r} has no canary: use Knative (Serverless) or Standard")


def start_canary_patch(name: str, namespace: str, storage_uri: str, percent: int) -> dict[str, object]:
    """Patch InferenceService `name` through the Kubernetes API (in-cluster service account, see RBAC): read it to
    learn its deployment mode, then send the matching canary patch. The client sends a dict body to a custom
    object as `application/merge-patch+json` (kubernetes/client/api/custom_objects_api.py), RFC 7386."""
    from kubernetes import client, config

    config.load_incluster_config()
    api = client.CustomObjectsApi()
    live: dict[str, object] = api.get_namespaced_custom_object(ISVC_GROUP, ISVC_VERSION, namespace, ISVC_PLURAL, name)
    patch = canary_patch(storage_uri, percent, deployment_mode(live))
    result: dict[str, object] = api.patch_namespaced_custom_object(
        ISVC_GROUP, ISVC_VERSION, namespace, ISVC_PLURAL, name, patch
    )
    return result
