"""manifests/: every kustomization (found by a glob) renders with `kubectl kustomize`, and every object passes what
a real cluster checks: the upstream CRD schemas in ../shared/platform (a field the server would prune is an
error), KServe's admission webhooks and the controller's refusals (tests/k8s_schema.py, tests/kserve_rules.py).
An overlay applied over the kustomization it builds upon is checked as an UPDATE of the objects the two share,
so a change KServe refuses on an existing object (the deployment mode) fails here. Plus the project's
conventions: one InferenceService name, storageUris in the export layout, one settable image."""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from k8s_schema import (
    PLATFORM,
    identity,
    kustomization_kind,
    kustomizations,
    parent_kustomizations,
    render,
)
from kserve_rules import DEPLOYMENT_MODE, admit

from visionpipe.cli import canary as canary_cli
from visionpipe.rollout import canary

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
KUBECTL = shutil.which("kubectl")
pytestmark = [
    pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed"),
    pytest.mark.skipif(not PLATFORM.is_dir(), reason=f"platform CRDs not found at {PLATFORM}"),
]

Json = dict[str, object]
ALL = [str(p.relative_to(MANIFESTS)) for p in kustomizations(MANIFESTS)]
PAIRS = [
    (str(k.relative_to(MANIFESTS)), str(p.relative_to(MANIFESTS)))
    for k in kustomizations(MANIFESTS)
    for p in parent_kustomizations(k)
]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Json]]:
    assert KUBECTL is not None
    return {name: render(MANIFESTS / name, KUBECTL) for name in ALL}


def of_kind(docs: list[Json], kind: str, name: str | None = None) -> list[Json]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]  # type: ignore[index]


def problems(docs: list[Json], existing: list[Json] | None = None) -> list[str]:
    """Every refusal for applying `docs` together: as creates, or as updates of `existing` objects with the same
    kind and name."""
    old = {identity(o): o for o in existing or []}
    found: list[str] = []
    for doc in docs:
        admission = admit(doc, old.get(identity(doc)), objects=docs)
        found += [f"{doc['kind']}/{doc['metadata']['name']}: {issue}" for issue in admission.result.errors]  # type: ignore[index]
        found += [f"{doc['kind']}/{doc['metadata']['name']}: {issue}" for issue in admission.result.unevaluated]  # type: ignore[index]
    return found


def walk(value: object) -> Iterator[tuple[str, object]]:
    """(key, value) of every mapping entry anywhere in `value`."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield str(key), item
            yield from walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from walk(item)


# --------------------------------------------------------------------------------------------- the platform
def test_the_glob_finds_every_kustomization() -> None:
    assert {"base", "standard", "common", "overlays/canary", "overlays/raw-canary", "overlays/shadow"} <= set(ALL)
    assert kustomization_kind(MANIFESTS / "common") == "Component"
    assert ("overlays/raw-canary", "standard") in PAIRS and ("overlays/canary", "base") in PAIRS


@pytest.mark.parametrize("kustomization", ALL)
def test_every_rendered_object_passes_the_platform(rendered: dict[str, list[Json]], kustomization: str) -> None:
    """CRD schema + webhooks + controller checks, as a create; CEL rules this helper cannot evaluate would be
    listed too (none of our objects hits one)."""
    docs = rendered[kustomization]
    assert docs, f"{kustomization} renders nothing"
    assert problems(docs) == []


@pytest.mark.parametrize(("kustomization", "parent"), PAIRS, ids=[f"{k}-over-{p}" for k, p in PAIRS])
def test_every_overlay_applies_as_an_update_of_what_it_builds_on(
    rendered: dict[str, list[Json]], kustomization: str, parent: str
) -> None:
    docs, before = rendered[kustomization], rendered[parent]
    shared = {identity(d) for d in docs} & {identity(d) for d in before}
    assert any(kind == "InferenceService" for _, kind, _ in shared), "the overlay changes an existing InferenceService"
    assert problems(docs, before) == []


@pytest.mark.parametrize(("new", "old"), [("standard", "base"), ("base", "standard")])
def test_switching_between_the_two_bases_is_refused(rendered: dict[str, list[Json]], new: str, old: str) -> None:
    """The two bases are alternatives, not layers: KServe refuses to change an existing InferenceService's mode."""
    found = problems(rendered[new], rendered[old])
    assert len(found) == 1 and "deploymentMode cannot be changed" in found[0], found


# --------------------------------------------------------------------------------------------- contents
def test_base_is_serverless_on_s3_with_the_project_runtime(rendered: dict[str, list[Json]]) -> None:
    docs = rendered["base"]
    (isvc,) = of_kind(docs, "InferenceService")
    assert isvc["metadata"]["annotations"][DEPLOYMENT_MODE] == "Serverless"  # type: ignore[index]
    predictor = isvc["spec"]["predictor"]  # type: ignore[index]
    assert predictor["serviceAccountName"] == "visionpipe-serving"
    assert predictor["model"]["runtime"] == "visionpipe-runtime"
    (runtime,) = of_kind(docs, "ClusterServingRuntime", "visionpipe-runtime")
    (container,) = runtime["spec"]["containers"]  # type: ignore[index]
    assert container["name"] == canary.CANARY_CONTAINER
    assert container["args"][:2] == ["-m", "visionpipe.serving.server"]
    assert "--model_dir=/mnt/models" in container["args"]
    formats = runtime["spec"]["supportedModelFormats"]  # type: ignore[index]
    assert {
        "name": predictor["model"]["modelFormat"]["name"],
        "version": predictor["model"]["modelFormat"]["version"],
    } in [{"name": f["name"], "version": f.get("version")} for f in formats]
    assert {"name": canary.MODEL_FORMAT["name"], "version": canary.MODEL_FORMAT["version"]} in [
        {"name": f["name"], "version": f.get("version")} for f in formats
    ], "the canary entries that `visionpipe canary --mode standard` writes name the runtime's model format"


def test_the_standard_base_is_the_base_in_standard_mode(rendered: dict[str, list[Json]]) -> None:
    (serverless,) = of_kind(rendered["base"], "InferenceService")
    (standard,) = of_kind(rendered["standard"], "InferenceService")
    assert standard["spec"] == serverless["spec"]
    assert standard["metadata"]["annotations"] == {DEPLOYMENT_MODE: "Standard"}  # type: ignore[index]
    others = [d for d in rendered["base"] if d["kind"] != "InferenceService"]
    assert others == [d for d in rendered["standard"] if d["kind"] != "InferenceService"]


def test_s3_secret_and_service_account(rendered: dict[str, list[Json]]) -> None:
    docs = rendered["base"]
    (secret,) = of_kind(docs, "Secret")
    annotations = secret["metadata"]["annotations"]  # type: ignore[index]
    assert {"serving.kserve.io/s3-endpoint", "serving.kserve.io/s3-usehttps"} <= set(annotations)
    # The pipeline steps mount every key of S3_SECRET_KEYS with optional: false, so the Secret must hold them all.
    from visionpipe.serving.storage import S3_SECRET, S3_SECRET_KEYS

    assert secret["metadata"]["name"] == S3_SECRET  # type: ignore[index]
    assert set(secret["data"]) == set(S3_SECRET_KEYS)  # type: ignore[call-overload]
    env_file = (MANIFESTS / "common" / "s3-credentials.env").read_text()
    pairs = dict(line.split("=", 1) for line in env_file.splitlines() if "=" in line and not line.startswith("#"))
    credentials = {k: v for k, v in pairs.items() if k.startswith("AWS_")}
    assert credentials and all(v == "REPLACE_ME" for v in credentials.values()), "only placeholders may be committed"
    (account,) = of_kind(docs, "ServiceAccount", "visionpipe-serving")
    assert {"name": secret["metadata"]["name"]} in account["secrets"]  # type: ignore[index,operator]


def test_canary_overlay(rendered: dict[str, list[Json]]) -> None:
    (isvc,) = of_kind(rendered["overlays/canary"], "InferenceService")
    (stable,) = of_kind(rendered["base"], "InferenceService")
    predictor = isvc["spec"]["predictor"]  # type: ignore[index]
    assert predictor["canaryTrafficPercent"] == 10
    assert predictor["model"]["storageUri"] != stable["spec"]["predictor"]["model"]["storageUri"]  # type: ignore[index]
    assert predictor["serviceAccountName"] == "visionpipe-serving", "the base fields survive the patch"


def test_raw_canary_overlay_is_a_native_standard_mode_canary(rendered: dict[str, list[Json]]) -> None:
    (isvc,) = of_kind(rendered["overlays/raw-canary"], "InferenceService")
    (stable,) = of_kind(rendered["standard"], "InferenceService")
    assert isvc["metadata"]["annotations"][DEPLOYMENT_MODE] == "Standard"  # type: ignore[index]
    assert isvc["spec"]["predictor"] == stable["spec"]["predictor"], "the stable predictor is untouched"  # type: ignore[index]
    (entry,) = isvc["spec"]["canary"]  # type: ignore[index]
    assert entry["trafficPercent"] == 10
    assert entry["predictor"]["name"] == canary.CANARY_PREDICTOR
    model = entry["predictor"]["model"]
    assert model["name"] == canary.CANARY_CONTAINER and model["modelFormat"] == canary.MODEL_FORMAT
    assert model["storageUri"] != stable["spec"]["predictor"]["model"]["storageUri"]  # type: ignore[index]
    assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]  # type: ignore[index]
    assert entry == canary.start_patch("standard", model["storageUri"], 10)["spec"]["canary"][0]  # type: ignore[index]


SHADOW = {"overlays/shadow": "Serverless", "overlays/shadow-standard": "Standard"}


@pytest.mark.parametrize(("overlay", "mode"), SHADOW.items())
def test_shadow_overlays_log_both_sides_to_one_collector(
    rendered: dict[str, list[Json]], overlay: str, mode: str
) -> None:
    """Both InferenceServices log request and response (mode all) to the collector, with X-Request-Id (the join
    key) in the events' metadata; the candidate serves under the primary's model name (a mirror keeps the path)."""
    assert overlay in ALL
    docs = rendered[overlay]
    (primary,) = of_kind(docs, "InferenceService", canary.DEFAULT_NAME)
    (candidate,) = of_kind(docs, "InferenceService", "digits-candidate")
    (service,) = of_kind(docs, "Service", "visionpipe-shadow-collector")
    (deployment,) = of_kind(docs, "Deployment", "visionpipe-shadow-collector")
    for isvc in (primary, candidate):
        assert isvc["metadata"]["annotations"][DEPLOYMENT_MODE] == mode  # type: ignore[index]
        logger = isvc["spec"]["predictor"]["logger"]  # type: ignore[index]
        assert logger == {
            "mode": "all",
            "url": f"http://{service['metadata']['name']}/",
            "metadataHeaders": ["X-Request-Id"],
        }  # type: ignore[index]
    assert candidate["spec"]["predictor"]["model"]["args"] == [f"--model_name={canary.DEFAULT_NAME}"]  # type: ignore[index]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]  # type: ignore[index]
    args = container["args"]
    assert args[:2] == ["-m", "visionpipe.monitoring.collector"] and "--host=0.0.0.0" in args
    assert f"--primary={primary['metadata']['name']}" in args  # type: ignore[index]
    assert f"--candidate={candidate['metadata']['name']}" in args  # type: ignore[index]
    drift = next(a.split("=", 1)[1] for a in args if a.startswith("--drift-reference="))
    assert drift == primary["spec"]["predictor"]["model"]["storageUri"], "drift is measured against the primary"  # type: ignore[index]
    port = next(
        p["containerPort"] for p in container["ports"] if p["name"] == service["spec"]["ports"][0]["targetPort"]
    )  # type: ignore[index]
    assert f"--port={port}" in args
    collector_files = [(MANIFESTS / o / "collector.yaml").read_text() for o in SHADOW]
    assert collector_files[0] == collector_files[1], "keep the two overlays' collector.yaml identical"


def test_serverless_shadow_mirrors_to_the_candidates_pods(rendered: dict[str, list[Json]]) -> None:
    """Istio mirror + mirrorPercentage on a host of our own, both legs Services that select the predictor pods on
    Knative's queue-proxy port (no Host-based routing on the way: see manifests/overlays/shadow/mirror.yaml)."""
    docs = rendered["overlays/shadow"]
    (vs,) = of_kind(docs, "VirtualService", "digits-shadow")
    (route,) = vs["spec"]["http"]  # type: ignore[index]
    (leg,) = route["route"]
    assert route["mirrorPercentage"]["value"] == 100.0
    services = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}  # type: ignore[index]
    for host, isvc in ((leg["destination"]["host"], "digits"), (route["mirror"]["host"], "digits-candidate")):
        service = services[host]
        assert service["spec"]["selector"] == {"serving.kserve.io/inferenceservice": isvc, "component": "predictor"}  # type: ignore[index]
        (port,) = service["spec"]["ports"]  # type: ignore[index]
        assert port["targetPort"] == "queue-port"
    assert vs["spec"]["hosts"] == [leg["destination"]["host"]]  # type: ignore[index]
    kserve_owned = {
        canary.DEFAULT_NAME,
        f"{canary.DEFAULT_NAME}-predictor",
        "digits-candidate",
        "digits-candidate-predictor",
    }
    assert not kserve_owned & set(vs["spec"]["hosts"]), "KServe and Knative reconcile those hosts' routes"  # type: ignore[index]


def test_standard_shadow_mirrors_with_a_gateway_api_route(rendered: dict[str, list[Json]]) -> None:
    docs = rendered["overlays/shadow-standard"]
    (route,) = of_kind(docs, "HTTPRoute", "digits-shadow")
    (parent,) = route["spec"]["parentRefs"]  # type: ignore[index]
    assert (parent["kind"], parent["name"], parent["port"]) == ("Service", "digits-predictor", 80)
    (rule,) = route["spec"]["rules"]  # type: ignore[index]
    assert rule["backendRefs"] == [{"name": "digits-predictor", "port": 80}]
    (mirror,) = rule["filters"]
    assert mirror["type"] == "RequestMirror"
    assert mirror["requestMirror"] == {"backendRef": {"name": "digits-candidate-predictor", "port": 80}, "percent": 100}


# --------------------------------------------------------------------------------------------- conventions
def export_layout() -> re.Pattern[str]:
    """The storageUri of a published bundle, derived from the code that names it: export writes
    <destination>/<model_name>/<version>/ (visionpipe/phases/export.py) and the version is
    created.strftime(FORMAT) + "-" + recipe_hash[:N] (visionpipe/phases/bundle_validation.py)."""
    source = (ROOT / "visionpipe" / "phases" / "bundle_validation.py").read_text()
    found = re.search(r'strftime\("([^"]+)"\)\s*\+\s*"-"\s*\+\s*recipe_hash\[:(\d+)\]', source)
    assert found, "bundle_validation.py no longer builds the version as strftime(...) + '-' + recipe_hash[:n]"
    widths = {"Y": 4, "m": 2, "d": 2, "H": 2, "M": 2, "S": 2}
    version = "".join(
        rf"\d{{{widths[part[1]]}}}" if part.startswith("%") else re.escape(part)
        for part in re.split(r"(%[YmdHMS])", found[1])
        if part
    )
    version += rf"-[0-9a-f]{{{found[2]}}}"  # recipe_hash: a sha256 hex digest (visionpipe/training/recipes.py)
    return re.compile(rf"^s3://[^/]+/(?:.+/)?{re.escape(canary.DEFAULT_NAME)}/{version}/?$")


def test_the_layout_pattern_matches_what_the_code_names() -> None:
    from visionpipe.training.recipes import load_recipe, recipe_hash

    layout = export_layout()
    version = (
        dt.datetime(2026, 12, 1, 10, 15).strftime("%Y%m%d-%H%M%S") + "-" + recipe_hash(load_recipe("digits-cnn"))[:8]
    )
    assert layout.match(f"s3://visionpipe/bundles/digits/{version}")
    expected = re.compile(r"^s3://[^/]+/(?:.+/)?digits/\d{8}-\d{6}-[0-9a-f]{8}/?$")  # the documented layout
    samples = [
        f"s3://visionpipe/bundles/digits/{version}/",
        "s3://b/digits/20261201-101500-ab12cd34",
        "s3://b/p/digits/2026120-101500-ab12cd34",
        "s3://b/p/digits/20261201-101500-AB12CD34",
        "s3://b/p/digits/20261201-101500-ab12cd3",
        "s3://b/p/visionpipe-digits/20261201-101500-ab12cd34",
    ]
    assert [bool(layout.match(u)) for u in samples] == [bool(expected.match(u)) for u in samples]
    for wrong in ("s3://visionpipe/bundles/digits/current", "s3://visionpipe/bundles/digits/candidate", "s3://b/x"):
        assert not layout.match(wrong), wrong


@pytest.mark.parametrize("kustomization", ALL)
def test_every_storage_uri_is_a_published_bundle(rendered: dict[str, list[Json]], kustomization: str) -> None:
    layout = export_layout()
    uris = [v for d in rendered[kustomization] for k, v in walk(d) if k in ("storageUri", "uri")]
    assert all(isinstance(u, str) and layout.match(u) for u in uris), uris


def test_one_inference_service_name_everywhere(rendered: dict[str, list[Json]]) -> None:
    for base in ("base", "standard"):
        (isvc,) = of_kind(rendered[base], "InferenceService")
        assert isvc["metadata"]["name"] == canary.DEFAULT_NAME  # type: ignore[index]
    parser = argparse.ArgumentParser()
    canary_cli.register(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["canary", "status"]).name == canary.DEFAULT_NAME

    from visionpipe.kfp.monthly import monthly_retrain_pipeline
    from visionpipe.kfp.training import training_pipeline

    for pipeline in (training_pipeline, monthly_retrain_pipeline):
        model_name = inspect.signature(getattr(pipeline, "pipeline_func", pipeline)).parameters["model_name"].default
        assert model_name == canary.DEFAULT_NAME, (
            f"model_name defaults to {model_name!r}: export would publish under <destination>/{model_name}/, not the "
            f"<destination>/{canary.DEFAULT_NAME}/ that manifests/ serve"
        )

    signature = inspect.signature(getattr(monthly_retrain_pipeline, "pipeline_func", monthly_retrain_pipeline))
    default = signature.parameters["isvc_name"].default
    assert default == canary.DEFAULT_NAME, (
        f"visionpipe/kfp/monthly.py: isvc_name defaults to {default!r}, but the InferenceService in manifests/ "
        f"is {canary.DEFAULT_NAME!r} (the project decision: the pipeline helper changes this default to 'digits')"
    )


def test_the_image_is_settable_with_kustomize_edit_set_image(tmp_path: Path, rendered: dict[str, list[Json]]) -> None:
    """`kustomize edit set image visionpipe=<ref>@sha256:<d>` rewrites the `images:` entry named visionpipe
    (newName + digest); emulated on a copy, both the runtime and the shadow collector then run <ref>@sha256:<d>."""
    entries = {}
    for name in ("common", "overlays/shadow", "overlays/shadow-standard"):
        data = yaml.safe_load((MANIFESTS / name / "kustomization.yaml").read_text())
        (entry,) = [e for e in data["images"] if e["name"] == "visionpipe"]
        entries[name] = entry
    assert entries["common"] == entries["overlays/shadow"] == entries["overlays/shadow-standard"], (
        "keep the three images: entries equal"
    )
    images = [v for docs in rendered.values() for d in docs for k, v in walk(d) if k == "image"]
    assert images and all(i == f"{entries['common']['newName']}:{entries['common']['newTag']}" for i in images)

    tree = tmp_path / "manifests"
    shutil.copytree(MANIFESTS, tree)
    digest = "sha256:" + "ab" * 32
    for name in ("common", "overlays/shadow", "overlays/shadow-standard"):
        path = tree / name / "kustomization.yaml"
        data = yaml.safe_load(path.read_text())
        data["images"] = [{"name": "visionpipe", "newName": "registry.example.com/ml/visionpipe", "digest": digest}]
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert KUBECTL is not None
    for overlay in ("shadow", "shadow-standard"):  # the runtime and the collector
        pinned = [v for d in render(tree / "overlays" / overlay, KUBECTL) for k, v in walk(d) if k == "image"]
        assert len(pinned) == 2 and set(pinned) == {f"registry.example.com/ml/visionpipe@{digest}"}


# --------------------------------------------------------------------------------------------- manifests/trainer
def test_the_trainer_runtime_is_torch_distributed_in_the_project_image(rendered: dict[str, list[Json]]) -> None:
    """The ClusterTrainingRuntime that visionpipe/kfp/trainjob.py's TrainJobs name: the torch ML policy, one
    replicated job `node` (the Trainer's trainer step), torchrun of the worker module, non-root, S3 settings from
    the Secret only, and no torchrun setting of its own (the torch plugin injects PET_*)."""
    from visionpipe.kfp import trainjob
    from visionpipe.serving.storage import S3_SECRET, S3_SECRET_KEYS

    (runtime,) = of_kind(rendered["trainer"], trainjob.RUNTIME_KIND, trainjob.RUNTIME_NAME)
    assert rendered["trainer"] == [runtime], "cluster-scoped runtime only: namespaced objects go elsewhere"
    assert runtime["metadata"]["labels"]["trainer.kubeflow.org/framework"] == "torch"  # type: ignore[index]
    spec = runtime["spec"]
    assert "torch" in spec["mlPolicy"]  # type: ignore[index]
    (node,) = spec["template"]["spec"]["replicatedJobs"]  # type: ignore[index]
    assert node["name"] == "node"
    assert node["template"]["metadata"]["labels"] == {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
    pod = node["template"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["name"] == "node" and container["command"] == ["torchrun"]
    assert container["args"] == ["--module", trainjob.WORKER_MODULE]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    env = {e["name"]: e for e in container["env"]}
    secret_env = {n: e for n, e in env.items() if "valueFrom" in e}
    assert set(secret_env) == set(S3_SECRET_KEYS.values())
    assert all(
        e["valueFrom"]["secretKeyRef"] == {"name": S3_SECRET, "key": n, "optional": False}
        for n, e in secret_env.items()
    )
    assert not set(env) & set(trainjob.RESERVED_ENV)
    assert not any(k.startswith("AWS_") and "value" in e for k, e in env.items()), "no credential values"


def test_the_trainer_image_entry_matches_the_serving_one() -> None:
    entries = {}
    for name in ("common", "trainer"):
        data = yaml.safe_load((MANIFESTS / name / "kustomization.yaml").read_text())
        (entry,) = [e for e in data["images"] if e["name"] == "visionpipe"]
        entries[name] = entry
    assert entries["trainer"] == entries["common"], "keep the images: entries equal (one project image)"
