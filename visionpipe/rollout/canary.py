"""The kubectl steps of a KServe canary rollout (`visionpipe canary start|promote|rollback|status`).

Each action is a pure function returning the kubectl argv; the CLI (visionpipe/cli/canary.py) prints it
(``--dry-run``) or runs it.
Two deployment modes, because KServe has two canary mechanisms (see docs/rollout.md):

``--mode serverless`` (default; manifests/base, Knative): the predictor's ``canaryTrafficPercent``
- start: point the predictor at the new bundle and give it ``canaryTrafficPercent`` of the traffic; KServe
  keeps the last fully rolled-out revision serving the rest.
- promote: remove ``canaryTrafficPercent``; the new revision gets all the traffic.
- rollback: ``canaryTrafficPercent: 0``; all traffic returns to the previous revision (optionally also
  point ``storageUri`` back at the previous bundle, so the spec matches what is served).

``--mode standard`` (manifests/standard, no Knative): ``spec.canary`` (KServe >= v0.20.0; only the Knative
reconciler reads ``canaryTrafficPercent``, so in Standard mode it would send all traffic to the new bundle)
- start: one ``spec.canary`` entry, predictor ``canary`` serving the new bundle at ``percent`` %; the stable
  predictor keeps its bundle. The canary runs as Deployment / Service ``<name>-canary-predictor``.
- promote: the stable predictor's ``storageUri`` := the canary's bundle (``--bundle-uri``), ``spec.canary``
  removed (the order KServe's own tests use, canary_controller_test.go).
- rollback: ``spec.canary`` removed (optionally also restore the stable ``storageUri``).

- status: the InferenceService's bundle, canary percentage / entries, readiness and traffic split.

Merge patches are used throughout (RFC 7386: a JSON ``null`` removes a field and does not fail when it is
absent; a list such as ``spec.canary`` is replaced whole).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

ACTIONS = ("start", "promote", "rollback", "status")
MODES = ("serverless", "standard")
DEFAULT_NAME = "digits"  # the InferenceService in manifests/ (a test keeps them equal)
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
STATUS_COLUMNS = (
    "NAME:.metadata.name",
    'READY:.status.conditions[?(@.type=="Ready")].status',
    "BUNDLE:.spec.predictor.model.storageUri",
    "CANARY%:.spec.predictor.canaryTrafficPercent",
    "CANARY_BUNDLE:.spec.canary[*].predictor.model.storageUri",
    "CANARY_PERCENT:.spec.canary[*].trafficPercent",
    "CANARY_READY:.status.canaryStatuses[*].ready",
    "TRAFFIC:.status.components.predictor.traffic[*].percent",
    "REVISIONS:.status.components.predictor.traffic[*].revisionName",
)


class CanaryError(ValueError):
    """Invalid canary arguments (the message names the argument, the bad value and what is allowed)."""


@dataclass(frozen=True)
class Target:
    """The InferenceService a rollout acts on, and how to reach the cluster."""

    name: str
    namespace: str | None = None
    context: str | None = None
    kubectl: str = "kubectl"
    mode: str = "serverless"  # the InferenceService's deployment mode: serverless (Knative) or standard

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise CanaryError(f"mode={self.mode!r} must be one of {', '.join(MODES)}")
        checks = (("name", ISVC_NAME_PATTERN, "InferenceService"), ("namespace", NAME_PATTERN, "namespace"))
        for field_name, pattern, what in checks:
            value = getattr(self, field_name)
            if value is not None and not pattern.match(value):
                raise CanaryError(
                    f"{field_name}={value!r} is not a valid {what} name (lower-case letters, digits, '-'; an "
                    "InferenceService name starts with a letter)"
                )

    def kubectl_prefix(self) -> list[str]:
        argv = [self.kubectl]
        if self.context:
            argv += ["--context", self.context]
        if self.namespace:
            argv += ["--namespace", self.namespace]
        return argv


# --------------------------------------------------------------------------------------------- argv builders
def start_patch(mode: str, bundle_uri: str, percent: int) -> dict[str, object]:
    """The merge patch that serves `bundle_uri` as a canary taking `percent` % of the traffic."""
    _check_uri(bundle_uri)
    _check_percent(percent, low=1, high=99)
    if mode == "standard":
        model = {"name": CANARY_CONTAINER, "modelFormat": dict(MODEL_FORMAT), "storageUri": bundle_uri}
        entry = {"trafficPercent": percent, "predictor": {"name": CANARY_PREDICTOR, "model": model}}
        return {"spec": {"canary": [entry]}}
    return {"spec": {"predictor": {"canaryTrafficPercent": percent, "model": {"storageUri": bundle_uri}}}}


def promote_patch(mode: str, bundle_uri: str | None = None) -> dict[str, object]:
    """The merge patch that sends all traffic to the canary's bundle (standard mode: `bundle_uri` is it)."""
    if mode == "standard":
        if bundle_uri is None:
            raise CanaryError(
                "promote in standard mode needs --bundle-uri (the canary's bundle becomes the stable one)"
            )
        _check_uri(bundle_uri)
        return {"spec": {"canary": None, "predictor": {"model": {"storageUri": bundle_uri}}}}
    if bundle_uri is not None:
        raise CanaryError("bundle uri: serverless promote takes none (the canary's bundle already is the predictor's)")
    return {"spec": {"predictor": {"canaryTrafficPercent": None}}}


def rollback_patch(mode: str, previous_uri: str | None = None) -> dict[str, object]:
    """The merge patch that sends all traffic back to the stable bundle; optionally restores its URI."""
    spec: dict[str, object]
    if mode == "standard":
        spec = {"canary": None}
        if previous_uri is not None:
            _check_uri(previous_uri)
            spec["predictor"] = {"model": {"storageUri": previous_uri}}
        return {"spec": spec}
    predictor: dict[str, object] = {"canaryTrafficPercent": 0}
    if previous_uri is not None:
        _check_uri(previous_uri)
        predictor["model"] = {"storageUri": previous_uri}
    return {"spec": {"predictor": predictor}}


def start_argv(target: Target, bundle_uri: str, percent: int) -> list[str]:
    """Serve `bundle_uri` as a canary taking `percent` % of the traffic."""
    return _merge_patch(target, start_patch(target.mode, bundle_uri, percent))


def promote_argv(target: Target, bundle_uri: str | None = None) -> list[str]:
    """Send all traffic to the canary's bundle (serverless: the latest revision)."""
    return _merge_patch(target, promote_patch(target.mode, bundle_uri))


def rollback_argv(target: Target, previous_uri: str | None = None) -> list[str]:
    """Send all traffic back to the stable bundle (serverless: the last fully rolled-out revision); optionally
    restore its bundle URI."""
    return _merge_patch(target, rollback_patch(target.mode, previous_uri))


def status_argv(target: Target) -> list[str]:
    return [
        *target.kubectl_prefix(),
        "get",
        "inferenceservice",
        target.name,
        "-o",
        "custom-columns=" + ",".join(STATUS_COLUMNS),
    ]


def _merge_patch(target: Target, patch: Mapping[str, object]) -> list[str]:
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


def _check_percent(percent: int, low: int, high: int) -> None:
    if isinstance(percent, bool) or not isinstance(percent, int) or not low <= percent <= high:
        raise CanaryError(f"percent={percent!r} must be an integer from {low} to {high}")


def _check_uri(uri: str) -> None:
    if not uri.startswith(URI_SCHEMES) or len(uri) <= len(uri.split("://")[0]) + 3:
        raise CanaryError(f"bundle uri={uri!r} must start with one of {', '.join(URI_SCHEMES)}")
