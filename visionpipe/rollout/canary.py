"""A KServe canary of one InferenceService: `start`, `promote`, `rollback`, `status`, one code path for the CLI
(`visionpipe canary`, visionpipe/cli/canary.py) and the pipeline step (visionpipe/kfp/components/canary.py).

The deployment mode is read from the live object (``status.deploymentMode`` as the controller recorded it, else
the ``serving.kserve.io/deploymentMode`` annotation; the legacy names Serverless / RawDeployment fold to Knative /
Standard, kserve pkg/constants/constants.go ParseDeploymentMode), so nobody has to say ``--mode``; a ``--mode``
that disagrees with the live object is refused. KServe has one canary mechanism per mode:

Knative (Serverless; manifests/base): the predictor's ``canaryTrafficPercent``. The Knative reconciler sends that
percentage to the latest revision and the rest to the last fully rolled-out one (kserve pkg/controller/v1beta1/
inferenceservice/reconcilers/knative/ksvc_reconciler.go).
- start: the stable ``storageUri`` is recorded in the annotation ``visionpipe.io/stable-storage-uri``, then the
  predictor points at the new bundle with ``canaryTrafficPercent: <percent>`` (one patch).
- promote: ``canaryTrafficPercent`` removed: the latest revision (the new bundle) takes all the traffic. The
  annotation is left as it is (any change of the InferenceService's annotations reaches the revision template
  and would roll out one more revision); with no ``canaryTrafficPercent`` it is not read.
- rollback: ``canaryTrafficPercent: 0`` and ``storageUri`` := the recorded stable bundle: all traffic stays on the
  previous revision while the spec names the bundle it serves again.

Standard (RawDeployment; manifests/standard): a ``spec.canary`` entry (KServe >= v0.20 CanarySpec; only the Knative
reconciler reads ``canaryTrafficPercent``, so in Standard mode a new ``storageUri`` would take all the traffic).
The controller runs the canary as Deployment / Service ``<name>-canary-predictor`` (the stable predictor merged
with the entry, components/predictor.go buildCanaryPredictor) and weights the InferenceService's Gateway API
HTTPRoute: each READY canary gets its trafficPercent, the stable predictor the rest; a canary that is not ready
gets nothing (reconcilers/ingress/httproute_reconciler.go applyCanaryWeights).
- start: ``spec.canary: [{trafficPercent, predictor: {name: canary, model: {...}}}]``; the stable predictor keeps
  its bundle.
- promote: the stable ``storageUri`` := the canary's, ``spec.canary`` removed (one patch; the order of KServe's
  own tests, canary_controller_test.go).
- rollback: ``spec.canary`` removed.

Refused, with a named error: start while another canary runs (the same bundle again only sets the percentage:
idempotent), promote / rollback with no canary, a bundle URI with a bad scheme, a percentage out of range
(1..100; Knative 1..99, see KNATIVE_MAX_PERCENT), a missing InferenceService (404), an object the API server or
KServe's webhook refuses (422 / admission denial, with the server's causes), no RBAC permission (403: the Role in
manifests/pipeline-rbac).

Writes are RFC 7386 merge patches (``kubectl patch --type merge``: a JSON ``null`` removes a field; a list such as
``spec.canary`` is replaced whole) carrying the ``metadata.resourceVersion`` that was read, so a change made in
between is refused (409) instead of overwritten.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from visionpipe import k8s_api
from visionpipe.k8s_api import JsonObj as JsonObj  # re-exported: visionpipe.cli.canary reads it from here
from visionpipe.k8s_api import KubeApiError
from visionpipe.k8s_api import json_dict as _dict
from visionpipe.k8s_api import json_list as _list
from visionpipe.k8s_api import json_str as _str

ACTIONS = ("start", "promote", "rollback", "status")
DEFAULT_NAME = "digits"  # the InferenceService in manifests/ (a test keeps them equal)
ISVC_GROUP, ISVC_VERSION, ISVC_PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
ISVC_RESOURCE = f"{ISVC_PLURAL}.{ISVC_GROUP}"
# kserve pkg/constants/constants.go: DeploymentMode annotation, DeploymentModeType (+ the legacy names)
DEPLOYMENT_MODE_ANNOTATION = "serving.kserve.io/deploymentMode"
KNATIVE, STANDARD = "Knative", "Standard"
LEGACY_MODES = {"Serverless": KNATIVE, "RawDeployment": STANDARD}
MODES = ("serverless", "standard")  # the CLI's --mode names
MODE_NAMES = {"serverless": KNATIVE, "standard": STANDARD, KNATIVE: KNATIVE, STANDARD: STANDARD, **LEGACY_MODES}
STABLE_URI_ANNOTATION = "visionpipe.io/stable-storage-uri"  # written by a Knative start, read by rollback / status
CANARY_PREDICTOR = "canary"  # spec.canary[].predictor.name -> Deployment / Service <name>-canary-predictor
# A spec.canary entry's model needs `name` and `modelFormat` (the CRD requires both there); the name is the
# runtime's container, kserve-container (kserve pkg/constants/constants.go InferenceServiceContainerName), and the
# format is the one manifests/common/serving-runtime.yaml serves (a test keeps them equal).
CANARY_CONTAINER = "kserve-container"
MODEL_FORMAT: dict[str, object] = {"name": "visionpipe", "version": "1"}
URI_SCHEMES = ("s3://", "gs://", "pvc://", "https://", "http://", "hdfs://", "oci://")
NAME_PATTERN = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # a namespace: RFC 1123 label
# an InferenceService name: KServe's webhook demands a leading letter (inference_service_validation.go IsvcNameFmt)
ISVC_NAME_PATTERN = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
# The RBAC the API calls here need (manifests/pipeline-rbac/role.yaml grants exactly these; a test checks).
RBAC_ROLE = "visionpipe-canary"
RBAC_MANIFESTS = "manifests/pipeline-rbac"
VERBS_USED = ("get", "patch")
# Where a pod finds its service account (kubernetes/config/incluster_config.py SERVICE_TOKEN_FILENAME).
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# 1..100 (the run form's canary_percent interval, visionpipe/specs/params.py); 0 % is what a Knative rollback
# writes. Standard: 100 % sends all traffic to the canary while `rollback` (drop spec.canary) still restores the
# stable predictor. Knative: at most 99 %, because a revision that gets 100 % becomes the "rolled out" one
# (kserve pkg/apis/serving/v1beta1/inference_service_status.go PropagateStatus) and a later rollback's
# canaryTrafficPercent 0 would keep the traffic on it.
START_PERCENT = (1, 100)
KNATIVE_MAX_PERCENT = 99


# --------------------------------------------------------------------------------------------- errors
class RolloutError(Exception):
    """Every refusal of this module; the message says what was wrong and how to go on."""


class CanaryError(RolloutError, ValueError):
    """A bad argument (the message names the argument, the bad value and what is allowed)."""


class ModeError(CanaryError):
    """The deployment mode is unknown, has no canary, or disagrees with ``--mode``."""


class TransitionError(RolloutError):
    """The action does not fit the InferenceService's canary state."""


class CanaryRunning(TransitionError):
    """start while another canary runs."""


class NoCanary(TransitionError):
    """promote / rollback with no canary running."""


class SameBundle(TransitionError):
    """start with the bundle the InferenceService already serves."""


class StableUnknown(TransitionError):
    """rollback of a Knative canary whose stable bundle was never recorded."""


class ApiError(RolloutError, KubeApiError):
    """The Kubernetes API refused a call or could not be reached (`status`, `causes`: visionpipe/k8s_api.py)."""


class NotFound(ApiError):
    """404: no such InferenceService."""


class Forbidden(ApiError):
    """403 from RBAC: the caller may not get / patch InferenceServices there."""


class Refused(ApiError):
    """422 (the CRD's schema) or an admission webhook's denial (KServe's rules): the object was not stored."""


class Conflict(ApiError):
    """409: the InferenceService changed between our read and our write."""


class Unreachable(ApiError):
    """No answer from the API server (or no configuration to find one)."""


# --------------------------------------------------------------------------------------------- JSON helpers
def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _annotations(isvc: Mapping[str, object]) -> JsonObj:
    return _dict(_dict(isvc.get("metadata")).get("annotations"))


def _predictor(isvc: Mapping[str, object]) -> JsonObj:
    return _dict(_dict(isvc.get("spec")).get("predictor"))


def _model_uri(predictor: Mapping[str, object]) -> str | None:
    return _str(_dict(predictor.get("model")).get("storageUri"))


# --------------------------------------------------------------------------------------------- checks
def check_uri(uri: str, what: str = "bundle uri") -> str:
    if not isinstance(uri, str) or not uri.startswith(URI_SCHEMES) or len(uri) <= len(uri.split("://")[0]) + 3:
        raise CanaryError(f"{what}={uri!r} must start with one of {', '.join(URI_SCHEMES)} and name a bundle")
    return uri


def check_percent(percent: int, low: int = START_PERCENT[0], high: int = START_PERCENT[1]) -> int:
    if isinstance(percent, bool) or not isinstance(percent, int) or not low <= percent <= high:
        raise CanaryError(
            f"percent={percent!r} must be an integer from {low} to {high} (to send no traffic to it: `rollback`)"
        )
    return percent


def check_names(name: str, namespace: str | None) -> None:
    checks = (
        ("name", name, ISVC_NAME_PATTERN, "InferenceService"),
        ("namespace", namespace, NAME_PATTERN, "namespace"),
    )
    for field_name, value, pattern, what in checks:
        if value is not None and (not isinstance(value, str) or not pattern.match(value)):
            raise CanaryError(
                f"{field_name}={value!r} is not a valid {what} name (lower-case letters, digits, '-', at most 63; an "
                "InferenceService name starts with a letter)"
            )


def kserve_mode(mode: str) -> str:
    """Knative or Standard for a CLI name (serverless / standard) or a KServe name (legacy names folded)."""
    folded = MODE_NAMES.get(mode)
    if folded is None:
        allowed = ", ".join([*MODES, KNATIVE, STANDARD, *LEGACY_MODES])
        hint = " (ModelMesh has no canary)" if mode == "ModelMesh" else ""
        raise ModeError(f"mode={mode!r} must be one of {allowed}{hint}")
    return folded


def deployment_mode(isvc: Mapping[str, object], expected: str | None = None) -> str:
    """The mode a live InferenceService runs in (Knative / Standard): `status.deploymentMode`, recorded by the
    controller, else the annotation (kserve utils.go GetDeploymentMode), legacy names folded. `expected` (a --mode)
    must agree; it decides only for an object that says nothing."""
    recorded = _str(_dict(isvc.get("status")).get("deploymentMode"))
    annotated = _str(_annotations(isvc).get(DEPLOYMENT_MODE_ANNOTATION))
    name = _dict(isvc.get("metadata")).get("name")
    found = recorded or annotated
    if found is None:
        if expected is None:
            raise ModeError(
                f"cannot tell the deployment mode of InferenceService {name!r}: no status.deploymentMode and no "
                f"{DEPLOYMENT_MODE_ANNOTATION} annotation (set the annotation, as manifests/ do, or pass --mode)"
            )
        return kserve_mode(expected)
    source = "status.deploymentMode" if recorded else f"annotation {DEPLOYMENT_MODE_ANNOTATION}"
    live = MODE_NAMES.get(found)
    if live not in (KNATIVE, STANDARD):
        raise ModeError(f"InferenceService {name!r} runs in mode {found!r} ({source}), which has no canary")
    if expected is not None and kserve_mode(expected) != live:
        raise ModeError(
            f"--mode {expected} disagrees with InferenceService {name!r}: it runs in {live} mode ({source}={found!r}); "
            "drop --mode (it is read from the live object) or target the right InferenceService"
        )
    return live


# --------------------------------------------------------------------------------------------- patches
def start_patch(mode: str, bundle_uri: str, percent: int, stable_uri: str | None = None) -> JsonObj:
    """The merge patch that serves `bundle_uri` as a canary taking `percent` % of the traffic; Knative: records
    `stable_uri` (the bundle served until now) for rollback."""
    check_uri(bundle_uri)
    check_percent(percent)
    if kserve_mode(mode) == STANDARD:
        model = {"name": CANARY_CONTAINER, "modelFormat": dict(MODEL_FORMAT), "storageUri": bundle_uri}
        entry = {"trafficPercent": percent, "predictor": {"name": CANARY_PREDICTOR, "model": model}}
        return {"spec": {"canary": [entry]}}
    _check_knative_percent(percent)
    patch: JsonObj = {"spec": {"predictor": {"canaryTrafficPercent": percent, "model": {"storageUri": bundle_uri}}}}
    if stable_uri is not None:
        patch["metadata"] = {"annotations": {STABLE_URI_ANNOTATION: check_uri(stable_uri, "stable uri")}}
    return patch


def _check_knative_percent(percent: int) -> None:
    if percent > KNATIVE_MAX_PERCENT:
        raise CanaryError(
            f"percent={percent} must be at most {KNATIVE_MAX_PERCENT} in Knative (serverless) mode: a revision with "
            "100 % becomes the rolled-out one and could not be rolled back; use `promote` to send it all traffic"
        )


def promote_patch(mode: str, bundle_uri: str | None = None) -> JsonObj:
    """The merge patch that sends all traffic to the canary's bundle (Standard: `bundle_uri` is that bundle)."""
    if kserve_mode(mode) == STANDARD:
        if bundle_uri is None:
            raise CanaryError(
                "promote in standard mode needs --bundle-uri (the canary's bundle becomes the stable one) when the "
                "live object is not read"
            )
        check_uri(bundle_uri)
        return {"spec": {"canary": None, "predictor": {"model": {"storageUri": bundle_uri}}}}
    if bundle_uri is not None:
        raise CanaryError("bundle uri: serverless promote takes none (the canary's bundle already is the predictor's)")
    return {"spec": {"predictor": {"canaryTrafficPercent": None}}}


def rollback_patch(mode: str, previous_uri: str | None = None) -> JsonObj:
    """The merge patch that sends all traffic back to the stable bundle (Knative: `previous_uri`, required)."""
    if kserve_mode(mode) == STANDARD:
        if previous_uri is not None:
            raise CanaryError(
                "previous uri: standard rollback takes none (the stable predictor kept its bundle; spec.canary is "
                "removed)"
            )
        return {"spec": {"canary": None}}
    if previous_uri is None:
        raise CanaryError(
            "rollback in serverless mode needs the stable bundle: --previous-uri, or read the live object (drop "
            f"--mode), which keeps it in the {STABLE_URI_ANNOTATION} annotation"
        )
    check_uri(previous_uri, "previous uri")
    return {"spec": {"predictor": {"canaryTrafficPercent": 0, "model": {"storageUri": previous_uri}}}}


# --------------------------------------------------------------------------------------------- state
@dataclass(frozen=True)
class TrafficTarget:
    """One backend of the traffic split, as the status reports it."""

    target: str  # Knative: the revision; Standard: "stable" or the canary predictor's name
    percent: int
    bundle: str | None = None
    ready: bool | None = None
    tag: str | None = None


@dataclass(frozen=True)
class CanaryStatus:
    """What `status` shows: the spec's bundles and percentage, and what the controller reports."""

    name: str
    namespace: str
    mode: str  # Knative / Standard
    canary_running: bool
    bundle: str | None  # spec.predictor.model.storageUri (Knative, while a canary runs: the canary's bundle)
    stable_bundle: str | None  # the bundle the rest of the traffic goes to (rollback's target)
    canary_bundle: str | None
    canary_percent: int | None  # as configured in the spec
    ready: str | None  # the Ready condition: True / False / Unknown
    canary_ready: bool | None
    traffic: tuple[TrafficTarget, ...] = ()
    url: str | None = None
    resource_version: str | None = None
    messages: tuple[str, ...] = ()  # conditions that are not True, with their reason

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


@dataclass(frozen=True)
class _Knative:
    percent: int | None
    bundle: str | None
    recorded_stable: str | None

    @property
    def running(self) -> bool:
        # a percentage set on a bundle other than the recorded stable one (an unrecorded stable: running)
        return self.percent is not None and not (
            self.recorded_stable is not None and self.bundle == self.recorded_stable
        )


def _knative(isvc: Mapping[str, object]) -> _Knative:
    predictor = _predictor(isvc)
    return _Knative(
        percent=_int(predictor.get("canaryTrafficPercent")),
        bundle=_model_uri(predictor),
        recorded_stable=_str(_annotations(isvc).get(STABLE_URI_ANNOTATION)),
    )


def _canaries(isvc: Mapping[str, object]) -> list[JsonObj]:
    return [_dict(c) for c in _list(_dict(isvc.get("spec")).get("canary"))]


def _entry_name(entry: Mapping[str, object]) -> str:
    return _str(_dict(entry.get("predictor")).get("name")) or "?"


def _entry_uri(entry: Mapping[str, object]) -> str | None:
    return _model_uri(_dict(entry.get("predictor")))


def status_of(isvc: Mapping[str, object], expected_mode: str | None = None) -> CanaryStatus:
    meta = _dict(isvc.get("metadata"))
    status = _dict(isvc.get("status"))
    mode = deployment_mode(isvc, expected_mode)
    conditions = [_dict(c) for c in _list(status.get("conditions"))]
    ready = next((_str(c.get("status")) for c in conditions if c.get("type") == "Ready"), None)
    messages = tuple(
        f"{c.get('type')}={c.get('status')}: {c.get('reason') or ''} {c.get('message') or ''}".strip()
        for c in conditions
        if c.get("status") != "True"
    )
    bundle = _model_uri(_predictor(isvc))
    traffic: list[TrafficTarget] = []
    if mode == KNATIVE:
        state = _knative(isvc)
        running = state.running
        stable = state.recorded_stable if running else bundle
        canary_bundle = bundle if running else None
        percent = state.percent if running else None
        component = _dict(_dict(status.get("components")).get("predictor"))
        latest_created = _str(component.get("latestCreatedRevision"))
        latest_ready = _str(component.get("latestReadyRevision"))
        canary_ready = None if latest_created is None else latest_created == latest_ready
        for entry in map(_dict, _list(component.get("traffic"))):
            latest = entry.get("latestRevision") is True
            traffic.append(
                TrafficTarget(
                    target=_str(entry.get("revisionName")) or ("latest" if latest else "?"),
                    percent=_int(entry.get("percent")) or 0,
                    bundle=bundle if latest else (stable if entry.get("tag") == "prev" else None),
                    ready=True if latest else None,
                    tag=_str(entry.get("tag")),
                )
            )
    else:
        entries = _canaries(isvc)
        running = bool(entries)
        stable = bundle
        canary_bundle = ", ".join(u for u in map(_entry_uri, entries) if u) or None
        percent = sum(_int(e.get("trafficPercent")) or 0 for e in entries) if entries else None
        reported = {_str(s.get("name")): s for s in map(_dict, _list(status.get("canaryStatuses")))}
        readiness = [reported.get(_entry_name(e), {}).get("ready") is True for e in entries]
        canary_ready = all(readiness) if entries else None
        # httproute_reconciler.go applyCanaryWeights: ready canaries get their trafficPercent, the stable the rest
        ready_total = sum(_int(e.get("trafficPercent")) or 0 for e, ok in zip(entries, readiness, strict=True) if ok)
        if status:
            traffic.append(TrafficTarget("stable", 100 - ready_total, bundle, ready == "True"))
            for entry, ok in zip(entries, readiness, strict=True):
                share = _int(entry.get("trafficPercent")) or 0
                traffic.append(TrafficTarget(_entry_name(entry), share if ok else 0, _entry_uri(entry), ok))
    return CanaryStatus(
        name=str(meta.get("name")),
        namespace=str(meta.get("namespace") or ""),
        mode=mode,
        canary_running=running,
        bundle=bundle,
        stable_bundle=stable,
        canary_bundle=canary_bundle,
        canary_percent=percent,
        ready=ready,
        canary_ready=canary_ready,
        traffic=tuple(traffic),
        url=_str(status.get("url")),
        resource_version=_str(meta.get("resourceVersion")),
        messages=messages,
    )


def _where(isvc: Mapping[str, object]) -> str:
    meta = _dict(isvc.get("metadata"))
    namespace = meta.get("namespace")
    return f"InferenceService {meta.get('name')!r}" + (f" in namespace {namespace!r}" if namespace else "")


# --------------------------------------------------------------------------------------------- plans
def plan_start(isvc: Mapping[str, object], bundle_uri: str, percent: int, mode: str | None = None) -> JsonObj | None:
    """The patch `start` sends to this live object, or None when it already runs this canary at `percent`."""
    check_uri(bundle_uri)
    check_percent(percent)
    live = deployment_mode(isvc, mode)
    where = _where(isvc)
    if live == KNATIVE:
        state = _knative(isvc)
        if state.running:
            if state.bundle == bundle_uri:
                _check_knative_percent(percent)
                same = state.percent == percent
                return None if same else {"spec": {"predictor": {"canaryTrafficPercent": percent}}}
            raise CanaryRunning(
                f"{where} already runs a canary of {state.bundle} at {state.percent}%: promote or roll it back "
                f"before starting {bundle_uri}"
            )
        if state.bundle is None:
            raise TransitionError(f"{where} has no spec.predictor.model.storageUri to keep as the stable bundle")
        if state.bundle == bundle_uri:
            raise SameBundle(f"{where} already serves {bundle_uri} as its stable bundle: nothing to try")
        return start_patch(KNATIVE, bundle_uri, percent, stable_uri=state.bundle)
    entries = _canaries(isvc)
    if entries:
        (entry, *others) = entries
        if not others and _entry_name(entry) == CANARY_PREDICTOR and _entry_uri(entry) == bundle_uri:
            if _int(entry.get("trafficPercent")) == percent:
                return None
            return {"spec": {"canary": [{**copy.deepcopy(entry), "trafficPercent": percent}]}}
        running = ", ".join(f"{_entry_name(e)} ({_entry_uri(e)} at {e.get('trafficPercent')}%)" for e in entries)
        raise CanaryRunning(
            f"{where} already runs spec.canary {running}: promote or roll it back before starting {bundle_uri}"
        )
    if _model_uri(_predictor(isvc)) == bundle_uri:
        raise SameBundle(f"{where} already serves {bundle_uri} as its stable bundle: nothing to try")
    return start_patch(STANDARD, bundle_uri, percent)


def plan_promote(isvc: Mapping[str, object], bundle_uri: str | None = None, mode: str | None = None) -> JsonObj:
    """The patch `promote` sends; `bundle_uri`, when given, must be the running canary's bundle."""
    live = deployment_mode(isvc, mode)
    where = _where(isvc)
    if live == KNATIVE:
        state = _knative(isvc)
        if not state.running:
            raise NoCanary(f"{where} runs no canary (no spec.predictor.canaryTrafficPercent): nothing to promote")
        canary_uri = state.bundle
        patch = promote_patch(KNATIVE)
    else:
        entries = _canaries(isvc)
        if not entries:
            raise NoCanary(f"{where} runs no canary (no spec.canary): nothing to promote")
        if len(entries) > 1:
            names = ", ".join(map(_entry_name, entries))
            raise TransitionError(f"{where} runs {len(entries)} canaries ({names}): promote one of them with kubectl")
        canary_uri = _entry_uri(entries[0])
        if canary_uri is None:
            raise TransitionError(f"{where}: canary {_entry_name(entries[0])!r} names no model.storageUri to promote")
        patch = promote_patch(STANDARD, canary_uri)
    if bundle_uri is not None and bundle_uri != canary_uri:
        raise TransitionError(f"{where} runs a canary of {canary_uri}, not of --bundle-uri {bundle_uri}")
    return patch


def plan_rollback(isvc: Mapping[str, object], previous_uri: str | None = None, mode: str | None = None) -> JsonObj:
    """The patch `rollback` sends. Knative: the stable bundle is the recorded one (or `previous_uri` when none
    was recorded, e.g. a canary started with kubectl)."""
    live = deployment_mode(isvc, mode)
    where = _where(isvc)
    if live == STANDARD:
        if not _canaries(isvc):
            raise NoCanary(f"{where} runs no canary (no spec.canary): nothing to roll back")
        return rollback_patch(STANDARD, previous_uri)
    state = _knative(isvc)
    if not state.running:
        raise NoCanary(f"{where} runs no canary (no spec.predictor.canaryTrafficPercent): nothing to roll back")
    stable = state.recorded_stable
    if previous_uri is not None:
        check_uri(previous_uri, "previous uri")
        if stable is not None and previous_uri != stable:
            raise TransitionError(
                f"{where} recorded {stable} as its stable bundle ({STABLE_URI_ANNOTATION}), not --previous-uri "
                f"{previous_uri}: drop --previous-uri, or fix the annotation"
            )
        stable = previous_uri
    if stable is None:
        raise StableUnknown(
            f"{where} runs a canary of {state.bundle} but its stable bundle was never recorded (no "
            f"{STABLE_URI_ANNOTATION} annotation: started outside `visionpipe canary start`): pass --previous-uri"
        )
    patch = rollback_patch(KNATIVE, stable)
    if state.recorded_stable is None:
        patch["metadata"] = {"annotations": {STABLE_URI_ANNOTATION: stable}}
    return patch


# --------------------------------------------------------------------------------------------- the API
class IsvcApi(Protocol):
    """Get and merge-patch one namespaced InferenceService (serving.kserve.io/v1beta1)."""

    def get(self, namespace: str, name: str) -> JsonObj: ...

    def merge_patch(self, namespace: str, name: str, patch: Mapping[str, object]) -> JsonObj: ...


@dataclass(frozen=True)
class Connection:
    """How to reach the API server, like kubectl: a kubeconfig (``--kubeconfig``, else $KUBECONFIG, else
    ~/.kube/config) and its ``--context``, or the pod's service account (in-cluster); `host` (+ `token`) names
    the server directly. `prefer_in_cluster`: try the service account first (the pipeline step)."""

    kubeconfig: str | None = None
    context: str | None = None
    host: str | None = None
    token: str | None = None
    prefer_in_cluster: bool = False
    timeout_s: float = 30.0


def _in_cluster_available() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and (SERVICE_ACCOUNT_DIR / "token").is_file()


def _kubeconfig_path(explicit: str | None) -> str | None:
    if explicit:
        if not Path(explicit).expanduser().is_file():
            raise CanaryError(f"--kubeconfig {explicit!r}: no such file")
        return str(Path(explicit).expanduser())
    from_env = os.environ.get("KUBECONFIG")
    if from_env:
        return from_env  # may list several files (the client merges them, as kubectl does)
    default = Path("~/.kube/config").expanduser()
    return str(default) if default.is_file() else None


@dataclass(frozen=True)
class ConnectedClient:
    """A kubernetes ApiClient configured from a `Connection`, with its request timeout and the namespace its
    source names (the kubeconfig context's, the pod's service account's; None for a bare host)."""

    api_client: object
    timeout_s: float
    namespace: str | None


def connect_client(connection: Connection | None = None) -> ConnectedClient:
    """Configure a client like kubectl (`Connection`): a bare host (+ token); else the kubeconfig and its context
    and / or the pod's service account, in the order `prefer_in_cluster` says. Raises CanaryError for a bad
    kubeconfig / context and Unreachable when there is no configuration at all. Every client of the Kubernetes
    API here connects through it (KubeIsvcApi, visionpipe/kfp/trainjob.py's KubeTrainJobApi)."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    connection = connection or Connection()
    configuration = client.Configuration()
    configuration.retries = 1  # an unreachable server fails fast; the caller sees Unreachable
    namespace: str | None = None
    if connection.host:
        configuration.host = connection.host
        if connection.token:
            configuration.api_key["authorization"] = f"Bearer {connection.token}"
        return ConnectedClient(client.ApiClient(configuration), connection.timeout_s, namespace)
    explicit = connection.kubeconfig is not None or connection.context is not None
    kubeconfig = _kubeconfig_path(connection.kubeconfig)
    order = ["kubeconfig"] if explicit else ["kubeconfig", "in-cluster"]
    if connection.prefer_in_cluster and not explicit:
        order.reverse()
    for source in order:
        try:
            if source == "in-cluster" and _in_cluster_available():
                config.incluster_config.InClusterConfigLoader(
                    token_filename=str(SERVICE_ACCOUNT_DIR / "token"),
                    cert_filename=str(SERVICE_ACCOUNT_DIR / "ca.crt"),
                ).load_and_set(configuration)
                ns_file = SERVICE_ACCOUNT_DIR / "namespace"
                namespace = ns_file.read_text().strip() if ns_file.is_file() else None
            elif source == "kubeconfig" and kubeconfig is not None:
                config.load_kube_config(
                    config_file=kubeconfig,
                    context=connection.context,
                    client_configuration=configuration,
                    persist_config=False,
                )
                contexts, active = config.list_kube_config_contexts(kubeconfig)
                chosen = next((c for c in contexts if c.get("name") == connection.context), active)
                namespace = _str(_dict(_dict(chosen).get("context")).get("namespace"))
            else:
                continue
        except ConfigException as exc:
            raise CanaryError(f"Kubernetes configuration ({source}, {kubeconfig or 'no kubeconfig'}): {exc}") from exc
        configuration.retries = 1
        return ConnectedClient(client.ApiClient(configuration), connection.timeout_s, namespace)
    raise Unreachable(
        "no Kubernetes configuration: no kubeconfig (--kubeconfig, $KUBECONFIG, ~/.kube/config) and no pod "
        "service account; or print the kubectl command with --dry-run --mode"
    )


class KubeIsvcApi(k8s_api.CustomObjectsClient):
    """`IsvcApi` over the kubernetes python client's CustomObjectsApi. It sends a dict body of a PATCH to a
    custom object as ``application/merge-patch+json`` (kubernetes/client/api/custom_objects_api.py
    patch_namespaced_custom_object), i.e. RFC 7386, and calls nothing but GET / PATCH on the object's path."""

    @classmethod
    def connect(cls, connection: Connection | None = None) -> KubeIsvcApi:
        connected = connect_client(connection)
        return cls(connected.api_client, connected.timeout_s, connected.namespace)

    def get(self, namespace: str, name: str) -> JsonObj:
        return self._call("get", namespace, name, None)

    def merge_patch(self, namespace: str, name: str, patch: Mapping[str, object]) -> JsonObj:
        return self._call("patch", namespace, name, patch)

    def _call(self, verb: str, namespace: str, name: str, patch: Mapping[str, object] | None) -> JsonObj:
        args = (ISVC_GROUP, ISVC_VERSION, namespace, ISVC_PLURAL, name)

        def request() -> object:
            if patch is None:
                return self._api.get_namespaced_custom_object(*args, _request_timeout=self.timeout_s)
            return self._api.patch_namespaced_custom_object(*args, dict(patch), _request_timeout=self.timeout_s)

        result = k8s_api.call(
            request,
            self._api.api_client.configuration.host,
            lambda status, reason, body: api_error(verb, namespace, name, status, reason, body),
            Unreachable,
        )
        if not isinstance(result, dict):
            raise ApiError(f"{verb} {ISVC_RESOURCE} {name!r}: the API answered {type(result).__name__}, not an object")
        return result


def api_error(verb: str, namespace: str, name: str, status: int, reason: str, body: object) -> ApiError:
    """The named error for an API answer (`body`: the Status object the server sends, JSON;
    visionpipe/k8s_api.py `parse_answer`)."""
    answer = k8s_api.parse_answer(status, reason, body)
    message, causes = answer.message, answer.causes
    what = f"InferenceService {name!r} in namespace {namespace!r}"
    if status == 404:
        return NotFound(
            f"{what} does not exist (server: {message}); check --name / --namespace (or the context)", status
        )
    if answer.webhook_denied:  # KServe's validating webhook (k8s_api.ErrorAnswer.webhook_denied)
        return Refused(f"KServe refused the {verb} of {what}: {message}", status, causes)
    if status == 403:
        return Forbidden(
            f"forbidden to {verb} {what}: {message}. The caller needs the Role {RBAC_ROLE!r} "
            f"({RBAC_MANIFESTS}: verbs {', '.join(VERBS_USED)} on {ISVC_RESOURCE}) in that namespace, bound to "
            f"its ServiceAccount: kubectl apply -n {namespace} -k {RBAC_MANIFESTS} (edit the subject in "
            "role-binding.yaml)",
            status,
        )
    if status == 422:
        return Refused(f"the API server refused the {verb} of {what} as invalid: {answer.detail}", status, causes)
    if status == 409:
        return Conflict(f"{what} changed while the canary was being updated ({message}); run the command again", status)
    if status == 401:
        return Forbidden(f"the API server did not accept the credentials for {what}: {message}", status)
    return ApiError(f"{verb} {what}: HTTP {status} {message}", status, causes)


# --------------------------------------------------------------------------------------------- the state machine
@dataclass(frozen=True)
class Outcome:
    """What an action did: the patch it sent (None: nothing to do), and the status afterwards."""

    action: str
    patch: JsonObj | None
    status: CanaryStatus
    changed: bool = field(default=False)


@dataclass
class Canary:
    """The canary of InferenceService `name` in `namespace`, through `api`. `mode` (optional): the mode the
    caller expects; refused when the live object disagrees."""

    api: IsvcApi
    name: str
    namespace: str
    mode: str | None = None

    def __post_init__(self) -> None:
        check_names(self.name, self.namespace)
        if self.mode is not None:
            kserve_mode(self.mode)

    def read(self) -> JsonObj:
        return self.api.get(self.namespace, self.name)

    def status(self) -> CanaryStatus:
        return status_of(self.read(), self.mode)

    def start(self, bundle_uri: str, percent: int = 10) -> Outcome:
        check_uri(bundle_uri)
        check_percent(percent)
        live = self.read()
        return self._apply("start", live, plan_start(live, bundle_uri, percent, self.mode))

    def promote(self, bundle_uri: str | None = None) -> Outcome:
        live = self.read()
        return self._apply("promote", live, plan_promote(live, bundle_uri, self.mode))

    def rollback(self, previous_uri: str | None = None) -> Outcome:
        live = self.read()
        return self._apply("rollback", live, plan_rollback(live, previous_uri, self.mode))

    def run(self, action: str, bundle_uri: str | None = None, percent: int = 10) -> Outcome:
        """One of ACTIONS by name (the pipeline step); `bundle_uri`: start's bundle, promote's check, rollback's
        previous bundle."""
        if action == "start":
            if not bundle_uri:
                raise CanaryError("start needs a bundle uri (the bundle to try)")
            return self.start(bundle_uri, percent)
        if action == "promote":
            return self.promote(bundle_uri or None)
        if action == "rollback":
            return self.rollback(bundle_uri or None)
        if action == "status":
            return Outcome("status", None, self.status())
        raise CanaryError(f"action={action!r} must be one of {', '.join(ACTIONS)}")

    def _apply(self, action: str, live: JsonObj, patch: JsonObj | None) -> Outcome:
        if patch is None:
            return Outcome(action, None, status_of(live, self.mode))
        sent = copy.deepcopy(patch)
        version = _str(_dict(live.get("metadata")).get("resourceVersion"))
        if version is not None:  # optimistic concurrency: 409 if the object changed since we read it
            metadata = _dict(sent.setdefault("metadata", {}))
            metadata["resourceVersion"] = version
        updated = self.api.merge_patch(self.namespace, self.name, sent)
        return Outcome(action, patch, status_of(updated, self.mode), changed=True)


# --------------------------------------------------------------------------------------------- kubectl argv
@dataclass(frozen=True)
class Target:
    """How the printed kubectl command addresses the InferenceService (``--dry-run``)."""

    name: str = DEFAULT_NAME
    namespace: str | None = None
    context: str | None = None
    kubectl: str = "kubectl"
    mode: str = "serverless"
    kubeconfig: str | None = None

    def __post_init__(self) -> None:
        kserve_mode(self.mode)
        check_names(self.name, self.namespace)

    def kubectl_prefix(self) -> list[str]:
        argv = [self.kubectl]
        if self.kubeconfig:
            argv += ["--kubeconfig", self.kubeconfig]
        if self.context:
            argv += ["--context", self.context]
        if self.namespace:
            argv += ["--namespace", self.namespace]
        return argv


_STABLE_JSONPATH = STABLE_URI_ANNOTATION.replace(".", "\\.")  # kubectl JSONPath escapes the dots of a key
STATUS_COLUMNS = (
    "NAME:.metadata.name",
    'READY:.status.conditions[?(@.type=="Ready")].status',
    "BUNDLE:.spec.predictor.model.storageUri",
    f"STABLE:.metadata.annotations.{_STABLE_JSONPATH}",
    "CANARY%:.spec.predictor.canaryTrafficPercent",
    "CANARY_BUNDLE:.spec.canary[*].predictor.model.storageUri",
    "CANARY_PERCENT:.spec.canary[*].trafficPercent",
    "CANARY_READY:.status.canaryStatuses[*].ready",
    "TRAFFIC:.status.components.predictor.traffic[*].percent",
    "REVISIONS:.status.components.predictor.traffic[*].revisionName",
)


def patch_argv(target: Target, patch: Mapping[str, object]) -> list[str]:
    """`kubectl patch inferenceservice <name> --type merge --patch <json>` (the patch, compact and sorted)."""
    return [
        *target.kubectl_prefix(),
        "patch",
        "inferenceservice",
        target.name,
        "--type",
        "merge",
        "--patch",
        json.dumps(patch, separators=(",", ":"), sort_keys=True),
    ]


def start_argv(target: Target, bundle_uri: str, percent: int, stable_uri: str | None = None) -> list[str]:
    return patch_argv(target, start_patch(target.mode, bundle_uri, percent, stable_uri))


def promote_argv(target: Target, bundle_uri: str | None = None) -> list[str]:
    return patch_argv(target, promote_patch(target.mode, bundle_uri))


def rollback_argv(target: Target, previous_uri: str | None = None) -> list[str]:
    return patch_argv(target, rollback_patch(target.mode, previous_uri))


def status_argv(target: Target) -> list[str]:
    return [
        *target.kubectl_prefix(),
        "get",
        "inferenceservice",
        target.name,
        "-o",
        "custom-columns=" + ",".join(STATUS_COLUMNS),
    ]
