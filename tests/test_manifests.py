"""manifests/: every kustomize overlay renders, and every object survives a round trip through the typed
models of the kserve SDK (and the kubernetes client for core kinds) with no field dropped, so a misplaced or
misspelt field (say `logger` under `spec` instead of `spec.predictor`) fails here rather than being silently
pruned by the API server."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
from pathlib import Path

import kserve
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
KUSTOMIZATIONS = ["base", "overlays/canary", "overlays/raw-canary", "overlays/shadow"]
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed")

MODEL_FOR_KIND = {
    "InferenceService": "V1beta1InferenceService",
    "ClusterServingRuntime": "V1alpha1ClusterServingRuntime",
    "ServingRuntime": "V1alpha1ServingRuntime",
    "ServiceAccount": "V1ServiceAccount",
    "Secret": "V1Secret",
    "Deployment": "V1Deployment",
    "Service": "V1Service",
}
KUBERNETES_MODELS = importlib.import_module("kubernetes.client")  # ships no type stubs
NATIVE = {"str": str, "int": int, "float": float, "bool": bool}


# --------------------------------------------------------------------------------------------- round trip
def model_class(name: str) -> type:
    for module in (kserve.models, KUBERNETES_MODELS):
        if hasattr(module, name):
            return getattr(module, name)  # type: ignore[no-any-return]
    raise KeyError(f"no SDK model named {name}")


def build(data: object, type_name: str) -> object:
    """Typed SDK object from plain data, the way a generated OpenAPI client does it: unknown keys are lost."""
    if data is None:
        return None
    if type_name.startswith("list["):
        inner = type_name[5:-1]
        assert isinstance(data, list), (type_name, data)
        return [build(item, inner) for item in data]
    if type_name.startswith("dict("):
        inner = re.match(r"dict\(([^,]*), (.*)\)", type_name).group(2)  # type: ignore[union-attr]
        assert isinstance(data, dict), (type_name, data)
        return {key: build(value, inner) for key, value in data.items()}
    if type_name in NATIVE:
        return NATIVE[type_name](data)
    if type_name in ("object", "datetime", "date"):
        return data
    klass = model_class(type_name)
    assert isinstance(data, dict), (type_name, data)
    kwargs = {
        attr: build(data[key], klass.openapi_types[attr])  # type: ignore[attr-defined]
        for attr, key in klass.attribute_map.items()  # type: ignore[attr-defined]
        if key in data
    }
    return klass(**kwargs)


def roundtrip(document: dict[str, object]) -> object:
    typed = build(document, MODEL_FOR_KIND[str(document["kind"])])
    return kserve.ApiClient().sanitize_for_serialization(typed)


def lost_fields(original: object, again: object, path: str = "") -> list[str]:
    """Paths present in `original` that are missing or changed in `again`."""
    if isinstance(original, dict):
        if not isinstance(again, dict):
            return [path or "."]
        lost: list[str] = []
        for key, value in original.items():
            here = f"{path}.{key}" if path else str(key)
            lost += lost_fields(value, again[key], here) if key in again else [here]
        return lost
    if isinstance(original, list):
        if not isinstance(again, list) or len(again) != len(original):
            return [path]
        return [
            p for i, (a, b) in enumerate(zip(original, again, strict=True)) for p in lost_fields(a, b, f"{path}[{i}]")
        ]
    return [] if original == again else [path]


def render(kustomization: str) -> list[dict[str, object]]:
    assert KUBECTL is not None
    out = subprocess.run(
        [KUBECTL, "kustomize", str(MANIFESTS / kustomization)], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, object]]]:
    if KUBECTL is None:
        pytest.skip("kubectl not installed")
    return {name: render(name) for name in KUSTOMIZATIONS}


def of_kind(docs: list[dict[str, object]], kind: str, name: str | None = None) -> list[dict[str, object]]:
    return [
        d
        for d in docs
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)  # type: ignore[index]
    ]


# --------------------------------------------------------------------------------------------- tests
@needs_kubectl
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_object_roundtrips_without_losing_fields(
    rendered: dict[str, list[dict[str, object]]], kustomization: str
) -> None:
    docs = rendered[kustomization]
    assert of_kind(docs, "InferenceService"), "each kustomization renders an InferenceService"
    for doc in docs:
        assert doc["kind"] in MODEL_FOR_KIND, f"no round-trip model for kind {doc['kind']}"
        assert lost_fields(doc, roundtrip(doc)) == [], f"{doc['kind']} {doc['metadata']}"


@pytest.mark.parametrize(
    ("misplace", "expected"),
    [
        ("spec.logger", "spec.logger"),  # logger belongs to spec.predictor
        ("spec.predictor.model.logger", "spec.predictor.model.logger"),
        ("spec.predictor.canaryTrafficPercentage", "spec.predictor.canaryTrafficPercentage"),  # typo
        ("spec.predictor.model.storageURI", "spec.predictor.model.storageURI"),  # wrong case
    ],
)
def test_roundtrip_catches_misplaced_fields(misplace: str, expected: str) -> None:
    isvc = yaml.safe_load((MANIFESTS / "base" / "inference-service.yaml").read_text())
    assert lost_fields(isvc, roundtrip(isvc)) == []
    node = isvc
    *parents, leaf = misplace.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = {"mode": "all", "url": "http://visionpipe-shadow/"} if leaf == "logger" else 10
    assert lost_fields(isvc, roundtrip(isvc)) == [expected]


@needs_kubectl
def test_base_is_serverless_on_s3_with_the_project_runtime(rendered: dict[str, list[dict[str, object]]]) -> None:
    docs = rendered["base"]
    (isvc,) = of_kind(docs, "InferenceService")
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"  # type: ignore[index]
    predictor = isvc["spec"]["predictor"]  # type: ignore[index]
    assert predictor["serviceAccountName"] == "visionpipe-serving"
    assert predictor["model"]["storageUri"].startswith("s3://")
    assert predictor["model"]["runtime"] == "visionpipe-runtime"
    (runtime,) = of_kind(docs, "ClusterServingRuntime", "visionpipe-runtime")
    (container,) = runtime["spec"]["containers"]  # type: ignore[index]
    assert container["args"][:2] == ["-m", "serving.server"]
    assert "--model_dir=/mnt/models" in container["args"]
    formats = [f["name"] for f in runtime["spec"]["supportedModelFormats"]]  # type: ignore[index]
    assert predictor["model"]["modelFormat"]["name"] in formats


@needs_kubectl
def test_s3_secret_and_service_account(rendered: dict[str, list[dict[str, object]]]) -> None:
    docs = rendered["base"]
    (secret,) = of_kind(docs, "Secret")
    annotations = secret["metadata"]["annotations"]  # type: ignore[index]
    assert {"serving.kserve.io/s3-endpoint", "serving.kserve.io/s3-usehttps"} <= set(annotations)
    assert set(secret["data"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}  # type: ignore[call-overload]
    env_file = (MANIFESTS / "base" / "s3-credentials.env").read_text()
    values = [line.split("=", 1)[1] for line in env_file.splitlines() if "=" in line and not line.startswith("#")]
    assert values and all(v == "REPLACE_ME" for v in values), "only placeholders may be committed"
    (account,) = of_kind(docs, "ServiceAccount", "visionpipe-serving")
    assert {"name": secret["metadata"]["name"]} in account["secrets"]  # type: ignore[index,operator]


@needs_kubectl
def test_canary_overlay(rendered: dict[str, list[dict[str, object]]]) -> None:
    (isvc,) = of_kind(rendered["overlays/canary"], "InferenceService")
    predictor = isvc["spec"]["predictor"]  # type: ignore[index]
    assert predictor["canaryTrafficPercent"] == 10
    assert predictor["model"]["storageUri"].endswith("/candidate")
    assert predictor["serviceAccountName"] == "visionpipe-serving", "the base fields survive the patch"


@needs_kubectl
def test_raw_canary_overlay(rendered: dict[str, list[dict[str, object]]]) -> None:
    (isvc,) = of_kind(rendered["overlays/raw-canary"], "InferenceService")
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"  # type: ignore[index]
    (canary,) = isvc["spec"]["canary"]  # type: ignore[index]
    assert canary["trafficPercent"] == 10
    assert canary["predictor"]["model"]["storageUri"].endswith("/candidate")
    assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]  # type: ignore[index]


@needs_kubectl
def test_shadow_overlay_wires_logger_replayer_and_candidate(rendered: dict[str, list[dict[str, object]]]) -> None:
    docs = rendered["overlays/shadow"]
    (primary,) = of_kind(docs, "InferenceService", "digits")
    (candidate,) = of_kind(docs, "InferenceService", "digits-candidate")
    logger = primary["spec"]["predictor"]["logger"]  # type: ignore[index]
    assert logger["mode"] == "all"
    (service,) = of_kind(docs, "Service", "visionpipe-shadow")
    assert logger["url"].startswith(f"http://{service['metadata']['name']}")  # type: ignore[index]
    (deployment,) = of_kind(docs, "Deployment", "visionpipe-shadow")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]  # type: ignore[index]
    assert container["args"][:2] == ["-m", "serving.shadow"]
    candidate_url = next(a.split("=", 1)[1] for a in container["args"] if a.startswith("--candidate-url="))
    name = candidate["metadata"]["name"]  # type: ignore[index]
    assert candidate_url.startswith(f"http://{name}-predictor/") and f"/v1/models/{name}:predict" in candidate_url
    assert "--host=0.0.0.0" in container["args"]
    assert "logger" not in candidate["spec"]["predictor"]  # type: ignore[index]
