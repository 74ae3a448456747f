"""The platform checks themselves: the CRD-schema validator (tests/k8s_schema.py) and KServe's webhook rules
(tests/kserve_rules.py) catch what a real cluster refuses or silently drops, with the JSON path of each problem.
The manifests and the code's patches are checked with them in test_manifests.py, test_canary.py and
test_monthly.py."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from k8s_schema import PLATFORM, Issue, evaluate_cel, evaluate_cel_full, merge_patch, render, validate
from kserve_rules import (
    COMPONENT,
    DEPLOYMENT_MODE,
    ENV_POLICY,
    ISVC_VALIDATION,
    PROJECT,
    RUNTIME_WEBHOOK,
    admit,
    default_isvc,
    live_mode,
    validate_runtime,
)

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed")
pytestmark = pytest.mark.skipif(not PLATFORM.is_dir(), reason=f"platform CRDs not found at {PLATFORM}")

Json = dict[str, object]
Mutation = Callable[[Json], None]

# manifests/overlays/raw-canary/kustomization.yaml as it was before the platform checks existed, kept verbatim:
# a real API server refuses it for three reasons (see test_the_old_raw_canary_overlay_is_refused_for_three_reasons).
RAW_CANARY_BEFORE = """\
# Canary without Knative: Standard (formerly "RawDeployment") mode, where canaryTrafficPercent is not
# supported. KServe 0.21's v1beta1 API has spec.canary (a list of {trafficPercent, predictor}) for this;
# check that your cluster's CRD has it first: `kubectl explain inferenceservice.spec.canary`.
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../../base
patches:
  - target:
      group: serving.kserve.io
      version: v1beta1
      kind: InferenceService
      name: digits
    patch: |-
      apiVersion: serving.kserve.io/v1beta1
      kind: InferenceService
      metadata:
        name: digits
        annotations:
          serving.kserve.io/deploymentMode: Standard
      spec:
        canary:
          - trafficPercent: 10
            predictor:
              serviceAccountName: visionpipe-serving
              model:
                modelFormat:
                  name: visionpipe
                  version: "1"
                runtime: visionpipe-runtime
                protocolVersion: v1
                storageUri: s3://visionpipe/bundles/digits/candidate
"""


def base_isvc() -> Json:
    loaded = yaml.safe_load((MANIFESTS / "base" / "inference-service.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def standard_isvc() -> Json:
    loaded = yaml.safe_load((MANIFESTS / "standard" / "inference-service.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def runtime() -> Json:
    loaded = yaml.safe_load((MANIFESTS / "common" / "serving-runtime.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def node(obj: Json, dotted: str) -> Json:
    """The object at a dotted path (list indices as numbers)."""
    here: object = obj
    for key in dotted.split("."):
        here = here[int(key)] if isinstance(here, list) else here[key]  # type: ignore[index]
    assert isinstance(here, dict), dotted
    return here


def paths(issues: list[Issue]) -> list[str]:
    return [issue.path for issue in issues]


# --------------------------------------------------------------------------------------------- the schema
def test_the_shipped_objects_pass() -> None:
    for obj in (base_isvc(), standard_isvc(), runtime()):
        result = validate(obj)
        assert result.ok, result.describe()


@pytest.mark.parametrize(
    ("mutate", "path", "message"),
    [
        pytest.param(
            lambda o: node(o, "spec.predictor.model").__setitem__("storageURI", "s3://b/x"),
            "spec.predictor.model.storageURI",
            "prunes",
            id="pruned-unknown-field",
        ),
        pytest.param(
            lambda o: node(o, "spec").__setitem__(
                "logger", {"mode": "all", "url": "http://visionpipe-shadow-collector/"}
            ),
            "spec.logger",
            "prunes",
            id="logger-misplaced-under-spec",
        ),
        pytest.param(
            lambda o: node(o, "spec.predictor").__setitem__("canaryTrafficPercentage", 10),
            "spec.predictor.canaryTrafficPercentage",
            "prunes",
            id="misspelt-field",
        ),
        pytest.param(
            lambda o: node(o, "spec").pop("predictor"),
            "spec.predictor",
            "required field is missing",
            id="missing-required-field",
        ),
        pytest.param(
            lambda o: node(o, "spec.predictor.model.modelFormat").pop("name"),
            "spec.predictor.model.modelFormat.name",
            "required field is missing",
            id="missing-nested-required-field",
        ),
        pytest.param(
            lambda o: node(o, "spec.predictor").__setitem__("minReplicas", "1"),
            "spec.predictor.minReplicas",
            "must be of type integer",
            id="wrong-type",
        ),
        pytest.param(
            lambda o: node(o, "spec.predictor").__setitem__("logger", {"mode": "everything"}),
            "spec.predictor.logger.mode",
            "must be one of",
            id="bad-enum-value",
        ),
        pytest.param(
            lambda o: node(o, "spec.predictor.model.resources.limits").__setitem__("cpu", {"cores": 2}),
            "spec.predictor.model.resources.limits.cpu",
            "integer or a string",
            id="int-or-string",
        ),
        pytest.param(
            lambda o: node(o, "spec.predictor").__setitem__("name", "Canary_1"),
            "spec.predictor.name",
            "does not match pattern",
            id="pattern",
        ),
        pytest.param(
            lambda o: node(o, "spec").__setitem__(
                "canary",
                [
                    {
                        "trafficPercent": 101,
                        "predictor": {"name": "c", "model": {"name": "x", "modelFormat": {"name": "visionpipe"}}},
                    }
                ],
            ),
            "spec.canary[0].trafficPercent",
            "above the maximum 100",
            id="maximum",
        ),
        pytest.param(
            lambda o: node(o, "spec.predictor").__setitem__("minReplicas", None),
            "spec.predictor.minReplicas",
            "null is not allowed",
            id="null-for-non-nullable",
        ),
        pytest.param(
            lambda o: node(o, "spec.predictor").__setitem__("minReplicas", 2**40),
            "spec.predictor.minReplicas",
            "out of range for int32",
            id="format-int32",
        ),
        pytest.param(
            lambda o: node(o, "spec.predictor").__setitem__("tolerations", [{"key": "a", "operator": "Exists"}, 3]),
            "spec.predictor.tolerations[1]",
            "must be of type object",
            id="array-item-type",
        ),
        pytest.param(
            lambda o: node(o, "metadata").__setitem__("name", "Digits"),
            "metadata.name",
            "RFC 1123 subdomain",
            id="metadata-name",
        ),
        pytest.param(
            lambda o: node(o, "metadata").pop("name"),
            "metadata.name",
            "name or generateName is required",
            id="metadata-name-missing",
        ),
        pytest.param(
            lambda o: node(o, "metadata").__setitem__("labels", {"app": "a b"}),
            "metadata.labels.app",
            "label value",
            id="label-value",
        ),
        pytest.param(
            lambda o: node(o, "metadata.annotations").__setitem__("serving.kserve.io/min", 1),
            'metadata.annotations["serving.kserve.io/min"]',
            "must be a string",
            id="annotation-not-a-string",
        ),
        pytest.param(
            lambda o: node(o, "metadata").__setitem__("label", {"a": "b"}),
            "metadata.label",
            "unknown ObjectMeta field",
            id="metadata-unknown-field",
        ),
    ],
)
def test_the_validator_catches(mutate: Mutation, path: str, message: str) -> None:
    isvc = base_isvc()
    mutate(isvc)
    errors = validate(isvc).errors
    assert any(e.path == path and message in e.message for e in errors), "\n".join(map(str, errors))


def test_a_cluster_scoped_kind_takes_no_namespace_and_an_unserved_version_is_refused() -> None:
    crs = runtime()
    node(crs, "metadata")["namespace"] = "ml"
    assert paths(validate(crs).errors) == ["metadata.namespace"]
    crs = runtime()
    crs["apiVersion"] = "serving.kserve.io/v1beta1"  # ClusterServingRuntime is only v1alpha1
    (error,) = validate(crs).errors
    assert error.path == "apiVersion" and "no CRD" in error.message and "v1alpha1" in error.message


def test_defaults_are_applied_before_validation_and_list_maps_must_be_unique() -> None:
    crs = runtime()
    ports = node(crs, "spec.containers.0")["ports"]
    assert isinstance(ports, list)
    ports.append({"containerPort": 8080, "name": "again"})  # protocol defaults to TCP: the same key twice
    errors = validate(crs).errors
    assert [e.path for e in errors] == ["spec.containers[0].ports[1]"] and "duplicate" in errors[0].message


def httproute(weight: int, port: int | None = 80) -> Json:
    backend: Json = {"name": "digits-predictor", "weight": weight}
    if port is not None:
        backend["port"] = port
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "digits"},
        "spec": {"parentRefs": [{"name": "kserve-ingress-gateway"}], "rules": [{"backendRefs": [backend]}]},
    }


def test_gateway_api_schema_and_its_simple_cel_rules() -> None:
    assert validate(httproute(90)).ok, validate(httproute(90)).describe()
    too_heavy = validate(httproute(1_000_001)).errors
    assert paths(too_heavy) == ["spec.rules[0].backendRefs[0].weight"]
    no_port = validate(httproute(10, port=None)).errors  # a Service backend needs a port (CEL rule)
    assert paths(no_port) == ["spec.rules[0].backendRefs[0]"] and "x-kubernetes-validations" in no_port[0].message


def test_cel_rules_outside_the_subset_are_run_by_a_cel_interpreter_or_reported() -> None:
    assert evaluate_cel("self == oldSelf", "a", "b") is False
    assert evaluate_cel("self == oldSelf", "a") is True  # a create: transition rules do not apply
    assert evaluate_cel("self >= 1", 0) is False
    assert evaluate_cel("duration(self) >= duration('1ms')", "5s") is None  # not one of the simple shapes...
    assert evaluate_cel_full("duration(self) >= duration('1ms')", "5s") is True  # ...so cel-python runs it
    assert (
        evaluate_cel_full("self.all(x, x > 1)", [2, 3]) is True
        and evaluate_cel_full("self.all(x, x > 1)", [1]) is False
    )
    assert evaluate_cel_full("isURL(self)", "https://a") is None  # Kubernetes' own CEL library: not evaluated
    route = httproute(10)
    node(route, "spec.rules.0")["timeouts"] = {"request": "10s"}
    result = validate(route)
    assert result.ok and result.unevaluated == [], result.describe()
    node(route, "spec.rules.0")["timeouts"]["backendRequest"] = "20s"  # longer than the whole request: refused
    refused = validate(route).errors
    assert paths(refused) == ["spec.rules[0].timeouts"] and "x-kubernetes-validations" in refused[0].message


def test_core_kinds_go_through_the_kubernetes_models() -> None:
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "a"}, "secrets": [{"nam": "x"}]}
    assert paths(validate(account).errors) == ["secrets[0].nam"]
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "b"},
        "subjects": [{"kind": "ServiceAccount", "name": "x"}],
    }
    assert paths(validate(binding).errors) == ["roleRef"]
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "1svc"}, "spec": {"ports": [{"port": 0}]}}
    assert sorted(paths(validate(service).errors)) == ["metadata.name", "spec.ports[0].port"]


def test_merge_patch_follows_rfc_7386() -> None:
    # RFC 7386 section 3's example, and the appendix's edge cases
    target = {"title": "Goodbye!", "author": {"givenName": "John", "familyName": "Doe"}, "tags": ["example", "sample"]}
    patch = {"title": "Hello!", "phoneNumber": "+01-123-456-7890", "author": {"familyName": None}, "tags": ["example"]}
    assert merge_patch(target, patch) == {
        "title": "Hello!",
        "author": {"givenName": "John"},
        "tags": ["example"],
        "phoneNumber": "+01-123-456-7890",
    }
    assert merge_patch({"a": "b"}, {"a": None}) == {}
    assert merge_patch({"a": [{"b": "c"}]}, {"a": [1]}) == {"a": [1]}
    assert merge_patch({"e": None}, {"a": 1}) == {"e": None, "a": 1}
    assert merge_patch({"a": "foo"}, None) is None
    assert merge_patch({}, {"a": {"bb": {"ccc": None}}}) == {"a": {"bb": {}}}
    assert target["author"] == {"givenName": "John", "familyName": "Doe"}, "the target is not modified"


# --------------------------------------------------------------------------------------------- webhook rules
def add_canary(isvc: Json, **predictor: object) -> None:
    entry_predictor: Json = {
        "name": "canary",
        "model": {"name": "kserve-container", "modelFormat": {"name": "visionpipe"}, "storageUri": "s3://b/d/v2"},
    }
    entry_predictor.update(predictor)
    node(isvc, "spec")["canary"] = [{"trafficPercent": 10, "predictor": entry_predictor}]


def set_at(dotted: str, key: str, value: object) -> Mutation:
    return lambda obj: node(obj, dotted).__setitem__(key, value)


CONTROLLER_UTILS = "kserve controller: pkg/controller/v1beta1/inferenceservice/utils/utils.go"
CONTROLLER_PREDICTOR = "kserve controller: pkg/controller/v1beta1/inferenceservice/components/predictor.go"
WEBHOOK_CASES = [
    # (start from, mutation, path, upstream source, message)
    ("base", set_at("metadata", "name", "1digits"), "metadata.name", ISVC_VALIDATION, "start with a letter"),
    (
        "base",
        set_at("metadata.annotations", "serving.kserve.io/autoscalerClass", "kpa"),
        'metadata.annotations["serving.kserve.io/autoscalerClass"]',
        ISVC_VALIDATION,
        "not a supported autoscaler class",
    ),
    (
        "base",
        set_at("spec.predictor.model", "env", [{"name": "PYTHONPATH", "value": "/x"}]),
        "spec.predictor.model.env[0]",
        ENV_POLICY,
        "PYTHONPATH",
    ),
    (
        "base",
        set_at("spec.predictor.model", "name", "kserve-container"),
        "spec.predictor.model.name",
        ISVC_VALIDATION,
        "'name' field is not allowed in standard predictor",
    ),
    (
        "base",
        set_at("spec.predictor", "sklearn", {"storageUri": "s3://b/m"}),
        "spec.predictor",
        COMPONENT,
        "exactly one implementation",
    ),
    (
        "base",
        set_at("spec.predictor", "storageUris", [{"uri": "s3://b/x", "mountPath": "/mnt/x"}]),
        "spec.predictor.storageUris",
        ISVC_VALIDATION,
        "both StorageURI and StorageURIs",
    ),
    ("base", set_at("spec.predictor", "minReplicas", 5), "spec.predictor.minReplicas", COMPONENT, "greater than Max"),
    ("base", set_at("spec.predictor", "logger", {"url": "http://x/"}), "spec.predictor.logger.mode", COMPONENT, "type"),
    ("base", set_at("spec.predictor", "scaleMetric", "cpu"), "spec.predictor.scaleMetric", ISVC_VALIDATION, "[cpu]"),
    (
        "base",
        set_at("spec.predictor", "deploymentStrategy", {"type": "Recreate"}),
        "spec.predictor.deploymentStrategy",
        ISVC_VALIDATION,
        "only supported for raw deployment mode",
    ),
    ("base", add_canary, "spec.canary", ISVC_VALIDATION, "only supported in Standard deployment mode"),
    (
        "standard",
        lambda o: add_canary(o, name=""),
        "spec.canary[0].predictor.name",
        ISVC_VALIDATION,
        "predictor.name is required",
    ),
    (
        "standard",
        lambda o: add_canary(o, maxReplicas=2),
        "spec.canary[0].predictor.maxReplicas",
        ISVC_VALIDATION,
        "canary uses fixed replicas",
    ),
    (
        "standard",
        lambda o: add_canary(o, minReplicas=2),
        "spec.canary[0].predictor.minReplicas",
        ISVC_VALIDATION,
        "must not exceed stable predictor minReplicas (1)",
    ),
    (
        "standard",
        lambda o: add_canary(o, sklearn={"storageUri": "s3://b/m"}),
        "spec.canary[0].predictor",
        COMPONENT,
        "exactly one implementation",
    ),
    (
        "base",
        set_at("spec.predictor.model", "storageUri", "ftp://b/x"),
        "spec.predictor.model.storageUri",
        CONTROLLER_UTILS,
        "unsupported scheme",
    ),
    (
        "base",
        set_at("spec.predictor.model.modelFormat", "name", "onnx"),
        "spec.predictor.model.modelFormat",
        CONTROLLER_PREDICTOR,
        "does not support framework/version onnx",
    ),
    (
        "base",
        set_at("spec.predictor.model", "protocolVersion", "grpc-v2"),
        "spec.predictor.model.protocolVersion",
        CONTROLLER_PREDICTOR,
        "does not support protocol version",
    ),
    (
        "standard",
        set_at("spec.predictor", "canaryTrafficPercent", 10),
        "spec.predictor.canaryTrafficPercent",
        PROJECT,
        "has no effect in Standard mode",
    ),
    (
        "base",
        set_at("metadata", "name", "d" * 60),
        "metadata.name",
        "kserve: pkg/constants/constants.go",
        "exceeds 63 characters",
    ),
]


@pytest.mark.parametrize(
    ("start", "mutate", "path", "source", "message"), WEBHOOK_CASES, ids=[c[2] + ":" + c[4] for c in WEBHOOK_CASES]
)
def test_the_webhook_rules_catch(start: str, mutate: Mutation, path: str, source: str, message: str) -> None:
    isvc = base_isvc() if start == "base" else standard_isvc()
    assert admit(isvc, objects=[runtime()]).ok
    mutate(isvc)
    errors = admit(isvc, objects=[runtime()]).result.errors
    assert any(e.path == path and e.source == source and message in e.message for e in errors), "\n".join(
        map(str, errors)
    )


def test_a_valid_standard_canary_passes_even_at_100_percent() -> None:
    isvc = standard_isvc()
    add_canary(isvc)
    assert admit(isvc, objects=[runtime()]).ok, admit(isvc, objects=[runtime()]).result.describe()
    node(isvc, "spec.canary.0")["trafficPercent"] = 100
    assert admit(isvc, objects=[runtime()]).ok
    entries = node(isvc, "spec")["canary"]
    assert isinstance(entries, list)
    entries.append(copy.deepcopy(entries[0]))
    errors = admit(isvc, objects=[runtime()]).result.errors
    assert {e.message for e in errors} >= {
        "canary predictor.name 'canary' is duplicated",
        "sum of canary trafficPercent values (200) must be <= 100",
    }


def test_deployment_mode_defaulting_and_immutability() -> None:
    serverless = base_isvc()
    assert default_isvc(serverless)["metadata"]["annotations"][DEPLOYMENT_MODE] == "Knative"  # type: ignore[index]
    assert live_mode(serverless) == "Knative"
    bare = base_isvc()
    node(bare, "metadata").pop("annotations")
    assert live_mode(bare) == "Standard" and live_mode(bare, cluster_default_mode="Serverless") == "Knative"
    assert DEPLOYMENT_MODE not in (default_isvc(bare, "Serverless")["metadata"].get("annotations") or {})  # type: ignore[attr-defined]

    # the same mode under its new name is no change; Standard over Serverless is refused
    renamed = base_isvc()
    node(renamed, "metadata.annotations")[DEPLOYMENT_MODE] = "Knative"
    assert admit(renamed, serverless, objects=[runtime()]).ok
    refused = admit(standard_isvc(), serverless, objects=[runtime()]).result.errors
    assert [(e.path, e.message) for e in refused] == [
        (
            'metadata.annotations["serving.kserve.io/deploymentMode"]',
            "update rejected: deploymentMode cannot be changed from 'Knative' to 'Standard'",
        )
    ]
    # the recorded status wins over the old annotation (validateDeploymentMode reads oldIsvc.Status)
    recorded = base_isvc()
    recorded["status"] = {"deploymentMode": "RawDeployment"}
    assert admit(standard_isvc(), recorded, objects=[runtime()]).ok
    # dropping the annotation: the defaulter sets the cluster default (Standard), which is a change too
    assert not admit(bare, serverless, objects=[runtime()]).ok
    assert admit(bare, serverless, objects=[runtime()], cluster_default_mode="Serverless").ok


def test_a_predictor_rename_needs_a_new_model() -> None:
    old = standard_isvc()
    renamed = standard_isvc()
    node(renamed, "spec.predictor")["name"] = "blue"
    errors = admit(renamed, old, objects=[runtime()]).result.errors
    assert [e.message for e in errors] == ["predictor.name change requires a model change (e.g. storageUri)"]
    node(renamed, "spec.predictor.model")["storageUri"] = "s3://visionpipe/bundles/digits/20270105-093000-cd34ef56"
    assert admit(renamed, old, objects=[runtime()]).ok


def test_serving_runtime_webhook_rules() -> None:
    ours = runtime()
    assert validate_runtime(ours) == []
    twin = copy.deepcopy(ours)
    node(twin, "metadata")["name"] = "twin"
    (clash,) = validate_runtime(twin, [ours])
    assert clash.source == RUNTIME_WEBHOOK and "same priority assigned for the model format visionpipe" in clash.message
    formats = node(twin, "spec")["supportedModelFormats"]
    assert isinstance(formats, list)
    formats.append({"name": "visionpipe", "autoSelect": True, "priority": 2})
    assert any("different priorities" in i.message for i in validate_runtime(twin))
    node(twin, "spec.containers.0")["env"] = [{"name": "PYTHONPATH", "value": "/x"}]
    assert any(i.path == "spec.containers[0].env[0]" for i in validate_runtime(twin))


# --------------------------------------------------------------------------------------------- the old overlay
@needs_kubectl
def test_the_old_raw_canary_overlay_is_refused_for_three_reasons(tmp_path: Path) -> None:
    """Today's (pre-fix) raw-canary overlay, applied over the Serverless base: the CRD wants
    spec.canary[].predictor.model.name, the webhook wants spec.canary[].predictor.name, and the webhook refuses to
    flip `digits` from Serverless to Standard."""
    tree = tmp_path / "manifests"
    shutil.copytree(MANIFESTS, tree)
    old_overlay = tree / "overlays" / "raw-canary-before"
    old_overlay.mkdir()
    (old_overlay / "kustomization.yaml").write_text(RAW_CANARY_BEFORE)
    assert KUBECTL is not None
    base = {o["kind"]: o for o in render(tree / "base", KUBECTL)}
    docs = render(old_overlay, KUBECTL)
    (isvc,) = [d for d in docs if d["kind"] == "InferenceService"]
    errors = admit(isvc, base["InferenceService"], objects=docs).result.errors
    found = {(e.path, e.source) for e in errors}
    assert found == {
        ("spec.canary[0].predictor.model.name", "schema"),
        ("spec.canary[0].predictor.name", ISVC_VALIDATION),
        ('metadata.annotations["serving.kserve.io/deploymentMode"]', ISVC_VALIDATION),
    }, "\n".join(map(str, errors))
    messages = " | ".join(e.message for e in errors)
    assert "required field is missing" in messages
    assert "canary[0] predictor.name is required" in messages
    assert "deploymentMode cannot be changed from 'Knative' to 'Standard'" in messages
    # as a create (no existing `digits`) only the two field errors remain
    assert {e.path for e in admit(isvc, objects=docs).result.errors} == {
        "spec.canary[0].predictor.model.name",
        "spec.canary[0].predictor.name",
    }


def test_embedded_resources_and_preserved_unknown_fields() -> None:
    """Neither marker occurs in our CRDs' paths yet; a synthetic schema shows both behave as on the server."""
    from k8s_schema import SchemaWalker

    schema: Json = {
        "type": "object",
        "properties": {
            "template": {
                "type": "object",
                "x-kubernetes-embedded-resource": True,
                "properties": {"spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
            },
            "extra": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }

    def errors(value: Json) -> list[str]:
        walker = SchemaWalker()
        walker.walk(value, schema, "")
        return [str(issue) for issue in walker.result.errors]

    good: Json = {
        "template": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"anything": [1]}},
        "extra": {"a": "b"},
    }
    assert errors(good) == []
    bad = copy.deepcopy(good)
    node(bad, "template").pop("kind")
    node(bad, "template.metadata")["labels"] = {"k": 1}
    node(bad, "template")["status"] = {}
    node(bad, "extra")["n"] = 2
    assert sorted(e.split(":")[0] for e in errors(bad)) == [
        "extra.n",
        "template.kind",
        "template.metadata.labels.k",
        "template.status",
    ]
