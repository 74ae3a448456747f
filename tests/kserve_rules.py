"""KServe's admission rules (no schema shows them) as explicit checks, plus what the controller refuses later.

Read from kserve/kserve at aaac4e294dae (2026-08-21, newest tag v0.20.0), the commit of the CRDs in
`../shared/platform/kserve/`. Every check names its upstream file in `Issue.source`. Upstream webhooks stop at
the first failure; these checks report every failure, so one test run shows all of them.

Order on a real API server: mutating webhook (defaults) -> CRD schema (k8s_schema) -> validating webhook.
`admit(obj, old)` runs them in that order, as a create (`old=None`) or an update of `old`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from k8s_schema import Issue, Result, child, validate

ISVC_VALIDATION: Final = "kserve: pkg/apis/serving/v1beta1/inference_service_validation.go"
COMPONENT: Final = "kserve: pkg/apis/serving/v1beta1/component.go"
PREDICTOR: Final = "kserve: pkg/apis/serving/v1beta1/predictor.go"
DEFAULTS: Final = "kserve: pkg/apis/serving/v1beta1/inference_service_defaults.go"
ENV_POLICY: Final = "kserve: pkg/validation/env_policy.go"
RUNTIME_WEBHOOK: Final = "kserve: pkg/webhook/admission/servingruntime/servingruntime_webhook.go"
CONTROLLER_PREDICTOR: Final = "kserve controller: pkg/controller/v1beta1/inferenceservice/components/predictor.go"
CONTROLLER_UTILS: Final = "kserve controller: pkg/controller/v1beta1/inferenceservice/utils/utils.go"
CONSTANTS: Final = "kserve: pkg/constants/constants.go"
PROJECT: Final = "visionpipe rule"

DEPLOYMENT_MODE: Final = "serving.kserve.io/deploymentMode"  # constants.DeploymentMode
AUTOSCALER_CLASS: Final = "serving.kserve.io/autoscalerClass"  # constants.AutoscalerClass
KNATIVE_CLASS: Final = "autoscaling.knative.dev/class"  # knative autoscaling.ClassAnnotationKey
KNATIVE_HPA: Final = "hpa.autoscaling.knative.dev"  # knative autoscaling.HPA
# constants.go: DeploymentModeType and ParseDeploymentMode (legacy names fold to the new ones)
STANDARD, KNATIVE, MODELMESH = "Standard", "Knative", "ModelMesh"
LEGACY_MODES: Final = {"RawDeployment": STANDARD, "Serverless": KNATIVE}
AUTOSCALER_CLASSES: Final = ("hpa", "external", "keda", "none")  # constants.AutoscalerAllowedClassList
HPA_METRICS: Final = ("cpu", "memory")  # constants.AutoscalerAllowedHPAMetricsList
KPA_METRICS: Final = ("concurrency", "rps")  # constants.AutoscalerAllowedKPAMetricsList
LOGGER_MODES: Final = ("all", "request", "response")  # inference_service.go LoggerType
BLOCKED_ENV_VARS: Final = ("PYTHONPATH",)  # env_policy.go DefaultBlockedEnvVars
ISVC_NAME: Final = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # inference_service_validation.go IsvcNameFmt
INFERENCE_SERVICE_CONTAINER: Final = "kserve-container"  # constants.InferenceServiceContainerName
TRANSFORMER_CONTAINER: Final = "transformer-container"  # constants.TransformerContainerName
# utils.go SupportedStorageURIPrefixList (checked by the controller, ValidateStorageURI)
STORAGE_URI_PREFIXES: Final = (
    "gs://",
    "s3://",
    "pvc://",
    "file://",
    "https://",
    "http://",
    "hdfs://",
    "webhdfs://",
    "oci://",
    "oci+native://",
    "oci+fetch://",
    "hf://",
)
# predictor.go GetImplementations: the framework specs, then a custom container
PREDICTOR_FRAMEWORKS: Final = (
    "xgboost",
    "pytorch",
    "triton",
    "sklearn",
    "tensorflow",
    "onnx",
    "pmml",
    "lightgbm",
    "paddle",
    "huggingface",
    "model",
)


def normalize_mode(mode: str) -> str:
    """constants.ParseDeploymentMode: '' -> the default (Standard); RawDeployment -> Standard; Serverless ->
    Knative."""
    if not mode:
        return STANDARD
    return LEGACY_MODES.get(mode, mode)


def _dict(value: object) -> dict[str, object]:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list[object]:
    return value if isinstance(value, list) else []


def annotations_of(obj: Mapping[str, object]) -> dict[str, object]:
    return _dict(_dict(obj.get("metadata")).get("annotations"))


# --------------------------------------------------------------------------------------------- defaulting
def default_isvc(obj: Mapping[str, object], cluster_default_mode: str = STANDARD) -> dict[str, object]:
    """The mutating webhook's deployment-mode defaulting (inference_service_defaults.go,
    DefaultInferenceService): a legacy annotation value is rewritten (Serverless -> Knative, RawDeployment ->
    Standard); a missing annotation is set only when the cluster default (inferenceservice-config `deploy`) is
    Standard or ModelMesh."""
    out = copy.deepcopy(dict(obj))
    meta = out.setdefault("metadata", {})
    assert isinstance(meta, dict)
    annotations = meta.get("annotations")
    mode = annotations.get(DEPLOYMENT_MODE) if isinstance(annotations, dict) else None
    if isinstance(mode, str):
        assert isinstance(annotations, dict)
        annotations[DEPLOYMENT_MODE] = LEGACY_MODES.get(mode, mode)
    elif cluster_default_mode in (STANDARD, MODELMESH):
        meta["annotations"] = {
            **(annotations if isinstance(annotations, dict) else {}),
            DEPLOYMENT_MODE: cluster_default_mode,
        }
    return out


def live_mode(obj: Mapping[str, object], cluster_default_mode: str = STANDARD) -> str:
    """The mode an existing InferenceService runs in: `status.deploymentMode` when recorded, else the mode the
    controller picks and records on its first reconcile (utils.go GetDeploymentMode: a valid annotation, else the
    cluster default), normalised (ParseDeploymentMode)."""
    recorded = _dict(obj.get("status")).get("deploymentMode")
    if isinstance(recorded, str) and recorded:
        return normalize_mode(recorded)
    mode = annotations_of(obj).get(DEPLOYMENT_MODE)
    if isinstance(mode, str) and normalize_mode(mode) in (STANDARD, KNATIVE, MODELMESH):
        return normalize_mode(mode)
    return normalize_mode(cluster_default_mode)


# --------------------------------------------------------------------------------------------- helpers
def predictor_implementations(predictor: Mapping[str, object]) -> list[str]:
    """predictor.go GetImplementations: the framework specs set, then a custom predictor for a container named
    kserve-container (or for the first container when no framework spec is set)."""
    found = [name for name in PREDICTOR_FRAMEWORKS if predictor.get(name) is not None]
    containers = [_dict(c) for c in _list(predictor.get("containers"))]
    if containers:
        found += ["containers" for c in containers if c.get("name") == INFERENCE_SERVICE_CONTAINER]
        if not found:
            found.append("containers")
    return found


def component_implementations(kind: str, spec: Mapping[str, object]) -> list[str]:
    if kind == "predictor":
        return predictor_implementations(spec)
    found = ["art"] if kind == "explainer" and spec.get("art") is not None else []  # explainer.go
    if _list(spec.get("containers")):  # transformer.go / explainer.go: a custom container
        found.append("containers")
    return found


def stable_storage_uri(predictor: Mapping[str, object]) -> str | None:
    """The stable predictor's storageUri (the implementation's GetStorageUri)."""
    for name in predictor_implementations(predictor):
        if name != "containers":
            uri = _dict(predictor.get(name)).get("storageUri")
            return uri if isinstance(uri, str) else None
    return None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --------------------------------------------------------------------------------------------- InferenceService
def validate_isvc(obj: Mapping[str, object]) -> list[Issue]:
    """validateInferenceService (ValidateCreate, and the tail of ValidateUpdate) on a defaulted object."""
    issues: list[Issue] = []
    meta = _dict(obj.get("metadata"))
    annotations = annotations_of(obj)
    spec = _dict(obj.get("spec"))
    predictor = _dict(spec.get("predictor"))
    name = meta.get("name")

    # validateInferenceServiceName
    if not isinstance(name, str) or not ISVC_NAME.match(name):
        issues.append(
            Issue("metadata.name", f"{name!r} must match {ISVC_NAME.pattern} (start with a letter)", ISVC_VALIDATION)
        )
    # validateInferenceServiceAutoscaler
    autoscaler = annotations.get(AUTOSCALER_CLASS)
    if autoscaler is not None and autoscaler not in AUTOSCALER_CLASSES:
        issues.append(
            Issue(
                child("metadata.annotations", AUTOSCALER_CLASS),
                f"[{autoscaler}] is not a supported autoscaler class type (allowed: {', '.join(AUTOSCALER_CLASSES)})",
                ISVC_VALIDATION,
            )
        )
    # validateBlockedEnvVars (env_policy.go)
    issues += _blocked_env(spec)
    # validateCollocationStorageURI
    for i, container in enumerate(_list(predictor.get("containers"))):
        container = _dict(container)
        if container.get("name") == TRANSFORMER_CONTAINER and any(
            _dict(e).get("name") == "STORAGE_URI" for e in _list(container.get("env"))
        ):
            issues.append(
                Issue(
                    f"spec.predictor.containers[{i}].env",
                    "storage uri should not be specified in transformer container",
                    ISVC_VALIDATION,
                )
            )
    # validatePredictor: no `name` in the stable predictor's framework / model spec
    for framework in PREDICTOR_FRAMEWORKS:
        impl = predictor.get(framework)
        if isinstance(impl, dict) and impl.get("name"):
            issues.append(
                Issue(
                    f"spec.predictor.{framework}.name",
                    "the 'name' field is not allowed in standard predictor",
                    ISVC_VALIDATION,
                )
            )
    # validateMultipleStorageURIs
    for kind in ("predictor", "transformer", "explainer"):
        component = _dict(spec.get(kind))
        uris = component.get("storageUris")
        impls = component_implementations(kind, component) if component else []
        has_uri = bool(impls) and impls[0] != "containers" and _dict(component.get(impls[0])).get("storageUri")
        if uris is not None and has_uri:
            issues.append(
                Issue(
                    f"spec.{kind}.storageUris",
                    "Setting both StorageURI and StorageURIs is not supported.",
                    ISVC_VALIDATION,
                )
            )
        for j, entry in enumerate(_list(uris)):
            mount = _dict(entry).get("mountPath", "")
            here = f"spec.{kind}.storageUris[{j}]"
            if not _dict(entry).get("uri"):
                issues.append(Issue(here + ".uri", "storage URI cannot be empty", ISVC_VALIDATION))
            if not isinstance(mount, str) or not mount.startswith("/") or mount == "/" or ".." in mount:
                issues.append(
                    Issue(
                        here + ".mountPath", f"{mount!r} must be an absolute path below / without '..'", ISVC_VALIDATION
                    )
                )
    # per component: exactly one implementation, ComponentExtensionSpec.Validate, autoscaling by mode
    for kind in ("predictor", "transformer", "explainer"):
        if kind not in spec:
            continue
        component = _dict(spec.get(kind))
        issues += _exactly_one(kind, component, f"spec.{kind}")
        issues += _extension_checks(component, f"spec.{kind}")
        issues += _autoscaling_checks(annotations, component, f"spec.{kind}")
    # validateCanarySpecs
    issues += _canary_checks(obj)
    return issues


def _blocked_env(spec: Mapping[str, object]) -> list[Issue]:
    issues: list[Issue] = []
    for kind in ("predictor", "transformer", "explainer"):
        component = _dict(spec.get(kind))
        groups: list[tuple[str, list[object]]] = [
            (f"spec.{kind}.containers", _list(component.get("containers"))),
            (f"spec.{kind}.initContainers", _list(component.get("initContainers"))),
        ]
        if kind == "predictor":
            for framework in PREDICTOR_FRAMEWORKS:
                if isinstance(component.get(framework), dict):
                    groups.append((f"spec.predictor.{framework}", [component[framework]]))
                    break
            worker = _dict(component.get("workerSpec"))
            groups.append(("spec.predictor.workerSpec.containers", _list(worker.get("containers"))))
        for base, containers in groups:
            for i, container in enumerate(containers):
                for j, env in enumerate(_list(_dict(container).get("env"))):
                    if _dict(env).get("name") in BLOCKED_ENV_VARS:
                        where = base if base.endswith(tuple(PREDICTOR_FRAMEWORKS)) else f"{base}[{i}]"
                        issues.append(
                            Issue(
                                f"{where}.env[{j}]",
                                f"setting {_dict(env)['name']} is not allowed for security reasons",
                                ENV_POLICY,
                            )
                        )
    return issues


def _exactly_one(kind: str, component: Mapping[str, object], path: str) -> list[Issue]:
    """component.go validateExactlyOneImplementation."""
    found = component_implementations(kind, component)
    if len(found) == 1:
        return []
    return [
        Issue(path, f"exactly one implementation must be specified in the {kind}, found {found or 'none'}", COMPONENT)
    ]


def _extension_checks(component: Mapping[str, object], path: str) -> list[Issue]:
    """component.go ComponentExtensionSpec.Validate: containerConcurrency, replicas, logger."""
    issues: list[Issue] = []
    concurrency = _int(component.get("containerConcurrency"))
    if concurrency is not None and concurrency < 0:
        issues.append(Issue(f"{path}.containerConcurrency", "parallelism cannot be less than 0", COMPONENT))
    low = _int(component.get("minReplicas"))
    low = 1 if low is None else low  # constants.DefaultMinReplicas
    high = _int(component.get("maxReplicas")) or 0
    if low < 0:
        issues.append(Issue(f"{path}.minReplicas", "'MinReplicas' cannot be less than 0", COMPONENT))
    if high < 0:
        issues.append(Issue(f"{path}.maxReplicas", "'MaxReplicas' cannot be less than 0", COMPONENT))
    if high != 0 and low > high:
        issues.append(Issue(f"{path}.minReplicas", "'MinReplicas' cannot be greater than MaxReplicas", COMPONENT))
    logger = component.get("logger")
    if isinstance(logger, dict):
        if logger.get("mode", "") not in LOGGER_MODES:  # an absent mode is "" in Go: refused
            issues.append(Issue(f"{path}.logger.mode", "invalid logger type", COMPONENT))
        storage = logger.get("storage")
        if isinstance(storage, dict) and not all(storage.get(k) is not None for k in ("path", "parameters", "key")):
            issues.append(Issue(f"{path}.logger.storage", "invalid logger storage configuration", COMPONENT))
    return issues


def _autoscaling_checks(annotations: Mapping[str, object], component: Mapping[str, object], path: str) -> list[Issue]:
    """inference_service_validation.go validateAutoScalingCompExtension (HPA / KEDA in Standard mode; KPA, or
    Knative's HPA class, otherwise)."""
    mode = annotations.get(DEPLOYMENT_MODE)
    metric = component.get("scaleMetric")
    target = _int(component.get("scaleTarget"))
    issues: list[Issue] = []
    if mode == STANDARD:
        autoscaler = annotations.get(AUTOSCALER_CLASS)
        if autoscaler == "hpa":
            issues += _hpa_checks(metric, target, path)
        elif autoscaler == "keda" and metric is not None:
            issues.append(Issue(f"{path}.scaleMetric", "ScaleMetric is not supported for KEDA", ISVC_VALIDATION))
        return issues
    if annotations.get(KNATIVE_CLASS) == KNATIVE_HPA:
        return _hpa_checks(metric, target, path)
    if component.get("deploymentStrategy") is not None:
        issues.append(
            Issue(
                f"{path}.deploymentStrategy",
                "customizing deploymentStrategy is only supported for raw deployment mode",
                ISVC_VALIDATION,
            )
        )
    chosen = metric if metric is not None else "concurrency"
    if chosen not in KPA_METRICS:
        issues.append(Issue(f"{path}.scaleMetric", f"[{chosen}] is not a supported metric", ISVC_VALIDATION))
    if chosen == "rps" and target is not None and target < 1:
        issues.append(Issue(f"{path}.scaleTarget", "the target for rps should be greater than 1", ISVC_VALIDATION))
    return issues


def _hpa_checks(metric: object, target: int | None, path: str) -> list[Issue]:
    chosen = metric if metric is not None else "cpu"
    issues: list[Issue] = []
    if chosen not in HPA_METRICS:
        issues.append(Issue(f"{path}.scaleMetric", f"[{chosen}] is not a supported metric", ISVC_VALIDATION))
    if target is not None and ((chosen == "cpu" and target < 1) or target > 100):
        issues.append(
            Issue(
                f"{path}.scaleTarget", "the target utilization percentage should be a [1-100] integer", ISVC_VALIDATION
            )
        )
    if target is not None and chosen == "memory" and target < 1:
        issues.append(Issue(f"{path}.scaleTarget", "the target memory should be greater than 1 MiB", ISVC_VALIDATION))
    return issues


def _canary_checks(obj: Mapping[str, object]) -> list[Issue]:
    """inference_service_validation.go validateCanarySpecs (Standard-mode canaries, KServe >= v0.20.0)."""
    spec = _dict(obj.get("spec"))
    canaries = _list(spec.get("canary"))
    if not canaries:
        return []
    issues: list[Issue] = []
    stable = _dict(spec.get("predictor"))
    mode = annotations_of(obj).get(DEPLOYMENT_MODE)
    if mode != STANDARD:
        issues.append(
            Issue(
                "spec.canary",
                f"canary is only supported in Standard deployment mode (this InferenceService is {mode or 'unset'})",
                ISVC_VALIDATION,
            )
        )
    if stable_storage_uri(stable) is None and stable.get("model") is None:
        issues.append(
            Issue(
                "spec.predictor",
                "canary requires a stable predictor with a model (multi-model serving is not supported with canary)",
                ISVC_VALIDATION,
            )
        )
    names: set[str] = set()
    total = 0
    stable_min = _int(stable.get("minReplicas"))
    stable_min = 1 if stable_min is None else stable_min
    for i, entry in enumerate(canaries):
        entry = _dict(entry)
        path = f"spec.canary[{i}]"
        predictor = _dict(entry.get("predictor"))
        name = predictor.get("name") or ""
        if not name:
            issues.append(Issue(f"{path}.predictor.name", f"canary[{i}] predictor.name is required", ISVC_VALIDATION))
        elif name in names:
            issues.append(
                Issue(f"{path}.predictor.name", f"canary predictor.name {name!r} is duplicated", ISVC_VALIDATION)
            )
        elif name == (stable.get("name") or ""):
            issues.append(
                Issue(
                    f"{path}.predictor.name",
                    f"canary predictor.name {name!r} conflicts with stable predictor name",
                    ISVC_VALIDATION,
                )
            )
        if isinstance(name, str) and name:
            names.add(name)
        percent = _int(entry.get("trafficPercent")) or 0
        if not 0 <= percent <= 100:
            issues.append(
                Issue(
                    f"{path}.trafficPercent",
                    f"trafficPercent must be between 0 and 100, got {percent}",
                    ISVC_VALIDATION,
                )
            )
        total += percent
        issues += _exactly_one("predictor", predictor, f"{path}.predictor")
        issues += _extension_checks(predictor, f"{path}.predictor")
        for key, why in (
            ("workerSpec", "multi-node is not yet supported for canary"),
            ("maxReplicas", "canary uses fixed replicas"),
            ("scaleTarget", "canary uses fixed replicas"),
            ("scaleMetric", "canary uses fixed replicas"),
            ("autoScaling", "canary uses fixed replicas"),
        ):
            value = predictor.get(key)
            if value is not None and not (key == "maxReplicas" and (_int(value) or 0) <= 0):
                issues.append(Issue(f"{path}.predictor.{key}", f"canary must not set {key} ({why})", ISVC_VALIDATION))
        low = _int(predictor.get("minReplicas"))
        if low is not None and low > stable_min:
            issues.append(
                Issue(
                    f"{path}.predictor.minReplicas",
                    f"canary minReplicas ({low}) must not exceed stable predictor minReplicas ({stable_min})",
                    ISVC_VALIDATION,
                )
            )
    if total > 100:
        issues.append(
            Issue("spec.canary", f"sum of canary trafficPercent values ({total}) must be <= 100", ISVC_VALIDATION)
        )
    return issues


def validate_isvc_update(
    old: Mapping[str, object], new: Mapping[str, object], cluster_default_mode: str = STANDARD
) -> list[Issue]:
    """ValidateUpdate of `new` (already defaulted) over the existing `old` (as applied earlier, or with the status
    the controller recorded): validateDeploymentMode, validatePredictorNameChange, then validateInferenceService."""
    issues: list[Issue] = []
    old_mode = live_mode(old, cluster_default_mode)
    new_mode = annotations_of(new).get(DEPLOYMENT_MODE)
    if isinstance(new_mode, str) and new_mode != old_mode:
        issues.append(
            Issue(
                child("metadata.annotations", DEPLOYMENT_MODE),
                f"update rejected: deploymentMode cannot be changed from '{old_mode}' to '{new_mode}'",
                ISVC_VALIDATION,
            )
        )
    old_predictor = _dict(_dict(old.get("spec")).get("predictor"))
    new_predictor = _dict(_dict(new.get("spec")).get("predictor"))
    if (old_predictor.get("name") or "") != (new_predictor.get("name") or "") and stable_storage_uri(
        old_predictor
    ) == stable_storage_uri(new_predictor):
        issues.append(
            Issue(
                "spec.predictor.name",
                "predictor.name change requires a model change (e.g. storageUri)",
                ISVC_VALIDATION,
            )
        )
    return issues + validate_isvc(new)


# --------------------------------------------------------------------------------------------- runtimes
def validate_runtime(obj: Mapping[str, object], others: Sequence[Mapping[str, object]] = ()) -> list[Issue]:
    """servingruntime_webhook.go: one priority per auto-selected model format, no clash of priority with another
    runtime of the same scope for the same format and protocol, no blocked env vars, multi-node rules."""
    spec = _dict(obj.get("spec"))
    name = _dict(obj.get("metadata")).get("name")
    if spec.get("disabled") is True:
        return []
    issues: list[Issue] = []
    priorities: dict[str, object] = {}
    for i, fmt in enumerate(_list(spec.get("supportedModelFormats"))):
        fmt = _dict(fmt)
        if fmt.get("autoSelect") is not True:
            continue
        key = str(fmt.get("name"))
        if (
            key in priorities
            and None not in (priorities[key], fmt.get("priority"))
            and priorities[key] != fmt.get("priority")
        ):
            issues.append(
                Issue(
                    f"spec.supportedModelFormats[{i}].priority",
                    f"different priorities assigned for the model format {key}",
                    RUNTIME_WEBHOOK,
                )
            )
        priorities.setdefault(key, fmt.get("priority"))
    for other in others:
        other_spec = _dict(other.get("spec"))
        other_name = _dict(other.get("metadata")).get("name")
        if other_name == name or other.get("kind") != obj.get("kind") or other_spec.get("disabled") is True:
            continue
        if bool(spec.get("multiModel")) != bool(other_spec.get("multiModel")):
            continue
        if not set(map(str, _list(spec.get("protocolVersions")))) & set(
            map(str, _list(other_spec.get("protocolVersions")))
        ):
            continue
        for fmt in map(_dict, _list(spec.get("supportedModelFormats"))):
            for theirs in map(_dict, _list(other_spec.get("supportedModelFormats"))):
                same_format = str(fmt.get("name")).lower() == str(theirs.get("name")).lower()
                same_format = same_format and fmt.get("version") == theirs.get("version")
                both_auto = fmt.get("autoSelect") is True and theirs.get("autoSelect") is True
                priority = fmt.get("priority")
                if same_format and both_auto and priority is not None and priority == theirs.get("priority"):
                    issues.append(
                        Issue(
                            "spec.supportedModelFormats",
                            f"same priority assigned for the model format {fmt.get('name')} as in {other_name}",
                            RUNTIME_WEBHOOK,
                        )
                    )
    for i, container in enumerate(_list(spec.get("containers"))):
        for j, env in enumerate(_list(_dict(container).get("env"))):
            if _dict(env).get("name") in BLOCKED_ENV_VARS:
                issues.append(
                    Issue(
                        f"spec.containers[{i}].env[{j}]",
                        "blocked env var (security)",
                        RUNTIME_WEBHOOK + ", " + ENV_POLICY,
                    )
                )
    worker = spec.get("workerSpec")
    if isinstance(worker, dict) and len(_list(worker.get("containers"))) > 1:
        issues.append(
            Issue(
                "spec.workerSpec.containers",
                "setting multiple containers in workerSpec is not allowed",
                RUNTIME_WEBHOOK,
            )
        )
    return issues


# --------------------------------------------------------------------------------------------- controller
def controller_checks(isvc: Mapping[str, object], runtimes: Sequence[Mapping[str, object]]) -> list[Issue]:
    """What the controller refuses after admission (the InferenceService never becomes Ready): the storageUri
    scheme (utils.go ValidateStorageURI) and the explicit runtime's model format and protocol
    (components/predictor.go, predictor_model.go RuntimeSupportsModel, servingruntime_types.go
    IsProtocolVersionSupported), for the stable predictor and each canary (merged over the stable one,
    components/predictor.go buildCanaryPredictor). `runtimes`: the (Cluster)ServingRuntimes the cluster has."""
    spec = _dict(isvc.get("spec"))
    stable = _dict(spec.get("predictor"))
    variants: list[tuple[str, dict[str, object]]] = [("spec.predictor", stable)]
    for i, entry in enumerate(_list(spec.get("canary"))):
        merged = copy.deepcopy(stable)
        canary_predictor = _dict(_dict(entry).get("predictor"))
        for key, value in canary_predictor.items():  # mergo.Merge(..., WithOverride): non-zero canary fields win
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**_dict(merged[key]), **{k: v for k, v in value.items() if v not in (None, "")}}
            elif value not in (None, ""):
                merged[key] = value
        variants.append((f"spec.canary[{i}].predictor", merged))
    issues: list[Issue] = []
    for path, predictor in variants:
        model = predictor.get("model")
        if not isinstance(model, dict):
            continue
        uri = model.get("storageUri")
        if isinstance(uri, str) and re.match(r"\w+?://", uri) and not uri.startswith(STORAGE_URI_PREFIXES):
            issues.append(
                Issue(f"{path}.model.storageUri", f"storageUri {uri!r} has an unsupported scheme", CONTROLLER_UTILS)
            )
        runtime_name = model.get("runtime")
        if not isinstance(runtime_name, str):
            continue
        runtime = next((r for r in runtimes if _dict(r.get("metadata")).get("name") == runtime_name), None)
        if runtime is None:
            issues.append(Issue(f"{path}.model.runtime", f"no ServingRuntime {runtime_name!r}", CONTROLLER_PREDICTOR))
            continue
        rspec = _dict(runtime.get("spec"))
        if rspec.get("disabled") is True:
            issues.append(Issue(f"{path}.model.runtime", f"runtime {runtime_name!r} is disabled", CONTROLLER_PREDICTOR))
        protocol = model.get("protocolVersion")
        protocols = _list(rspec.get("protocolVersions"))
        if isinstance(protocol, str) and protocol and protocols and protocol not in protocols:
            issues.append(
                Issue(
                    f"{path}.model.protocolVersion",
                    f"runtime {runtime_name} does not support protocol version {protocol}",
                    CONTROLLER_PREDICTOR,
                )
            )
        fmt = _dict(model.get("modelFormat"))
        wanted = "mt:" + str(fmt.get("name")) + (f":{fmt['version']}" if fmt.get("version") is not None else "")
        offered: set[str] = set()
        for supported in map(_dict, _list(rspec.get("supportedModelFormats"))):
            offered.add(f"mt:{supported.get('name')}")
            if supported.get("version") is not None:
                offered.add(f"mt:{supported.get('name')}:{supported.get('version')}")
        if wanted not in offered:
            issues.append(
                Issue(
                    f"{path}.model.modelFormat",
                    f"runtime {runtime_name} does not support framework/version {wanted[3:]}",
                    CONTROLLER_PREDICTOR,
                )
            )
    return issues


def project_checks(isvc: Mapping[str, object]) -> list[Issue]:
    """Rules of this project that keep a rollout honest (not KServe refusals, but silent no-ops there)."""
    issues: list[Issue] = []
    mode = annotations_of(isvc).get(DEPLOYMENT_MODE)
    predictor = _dict(_dict(isvc.get("spec")).get("predictor"))
    if "canaryTrafficPercent" in predictor and mode != KNATIVE:
        # Only the Knative reconciler reads it (pkg/controller/v1beta1/inferenceservice/reconcilers/knative/
        # ksvc_reconciler.go); in Standard mode the new storageUri would take 100 % of the traffic at once.
        issues.append(
            Issue(
                "spec.predictor.canaryTrafficPercent",
                f"has no effect in {mode} mode (Knative only): the new bundle would get all the traffic",
                PROJECT,
            )
        )
    name = _dict(isvc.get("metadata")).get("name")
    if isinstance(name, str):
        # constants.go PredictorServiceName: {isvc}[-{predictor.name}]-predictor must be a Service name (RFC 1035
        # label, <= 63 characters), or the controller cannot create it.
        variants = [str(predictor.get("name") or "")] + [
            str(_dict(_dict(c).get("predictor")).get("name") or "")
            for c in _list(_dict(isvc.get("spec")).get("canary"))
        ]
        for variant in variants:
            service = f"{name}-{variant}-predictor" if variant else f"{name}-predictor"
            if len(service) > 63:
                issues.append(Issue("metadata.name", f"Service name {service!r} exceeds 63 characters", CONSTANTS))
    return issues


# --------------------------------------------------------------------------------------------- all together
@dataclass
class Admission:
    """What happens to one object on `kubectl apply`: the defaulted object and every refusal."""

    obj: dict[str, object]
    result: Result = field(default_factory=Result)

    @property
    def ok(self) -> bool:
        return self.result.ok


def is_isvc(obj: Mapping[str, object]) -> bool:
    return obj.get("kind") == "InferenceService" and str(obj.get("apiVersion", "")).startswith("serving.kserve.io/")


def admit(
    obj: Mapping[str, object],
    old: Mapping[str, object] | None = None,
    *,
    objects: Sequence[Mapping[str, object]] = (),
    cluster_default_mode: str = STANDARD,
) -> Admission:
    """Create (`old=None`) or update `obj` the way a cluster with KServe does: mutating webhook, CRD schema,
    validating webhook; then the controller's and this project's checks. `objects`: the rest of what is applied
    together (to find ServingRuntimes)."""
    result = Result()
    if is_isvc(obj):
        defaulted = default_isvc(obj, cluster_default_mode)
        result.extend(validate(defaulted, old))
        if old is None:
            result.errors += validate_isvc(defaulted)
        else:
            result.errors += validate_isvc_update(old, defaulted, cluster_default_mode)
        runtimes = [o for o in objects if o.get("kind") in ("ClusterServingRuntime", "ServingRuntime")]
        result.errors += controller_checks(defaulted, runtimes)
        result.errors += project_checks(defaulted)
        return Admission(defaulted, result)
    result.extend(validate(obj, old))
    if obj.get("kind") in ("ClusterServingRuntime", "ServingRuntime"):
        result.errors += validate_runtime(obj, [o for o in objects if o is not obj])
    return Admission(dict(obj), result)
