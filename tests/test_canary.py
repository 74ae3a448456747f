"""visionpipe/rollout/canary.py, `visionpipe canary` and the pipeline's canary step, against a fake Kubernetes API on
loopback (tests/fake_k8s.py) that validates every object it stores against the upstream CRD and KServe's webhook
rules; the starting objects are manifests/base (Knative) and manifests/standard rendered by `kubectl kustomize`."""

from __future__ import annotations

import json
import shlex
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fake_k8s import FakeKube
from k8s_schema import PLATFORM, merge_patch, render, validate
from kserve_rules import admit

from visionpipe.cli import main
from visionpipe.harness import free_port
from visionpipe.kfp.components.canary import canary_rollout
from visionpipe.rollout import canary as C
from visionpipe.rollout.canary import (
    Canary,
    CanaryError,
    Connection,
    KubeIsvcApi,
    Target,
    promote_argv,
    rollback_argv,
    start_argv,
    status_argv,
)

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"
RUNTIME = yaml.safe_load((MANIFESTS / "common" / "serving-runtime.yaml").read_text())
CANDIDATE = "s3://visionpipe/bundles/digits/20270105-093000-cd34ef56/"
OTHER = "s3://visionpipe/bundles/digits/20270201-093000-ee56ff78/"
NAMESPACE = "ml"
MODES = {"serverless": "base", "standard": "standard"}
TARGET = Target(name="digits", namespace="ml")
STANDARD = Target(name="digits", namespace="ml", mode="standard")


def patch_of(argv: list[str]) -> dict[str, object]:
    assert argv[argv.index("--type") + 1] == "merge"
    loaded = json.loads(argv[argv.index("--patch") + 1])
    assert isinstance(loaded, dict)
    return loaded


# --------------------------------------------------------------------------------------------- pure patches
def test_serverless_patches() -> None:
    assert patch_of(start_argv(TARGET, "s3://b/v7", 20, stable_uri="s3://b/v6")) == {
        "metadata": {"annotations": {C.STABLE_URI_ANNOTATION: "s3://b/v6"}},
        "spec": {"predictor": {"canaryTrafficPercent": 20, "model": {"storageUri": "s3://b/v7"}}},
    }
    assert patch_of(promote_argv(TARGET)) == {"spec": {"predictor": {"canaryTrafficPercent": None}}}
    assert patch_of(rollback_argv(TARGET, "s3://b/v6")) == {
        "spec": {"predictor": {"canaryTrafficPercent": 0, "model": {"storageUri": "s3://b/v6"}}}
    }
    # the legacy mode names fold (kserve constants.go ParseDeploymentMode)
    assert C.start_patch("Serverless", "s3://b/v7", 5) == C.start_patch("Knative", "s3://b/v7", 5)
    assert C.start_patch("RawDeployment", "s3://b/v7", 5) == C.start_patch("standard", "s3://b/v7", 5)


def test_standard_patches() -> None:
    assert patch_of(start_argv(STANDARD, CANDIDATE, 20)) == {
        "spec": {
            "canary": [
                {
                    "trafficPercent": 20,
                    "predictor": {
                        "name": "canary",
                        "model": {
                            "name": "kserve-container",
                            "modelFormat": {"name": "visionpipe", "version": "1"},
                            "storageUri": CANDIDATE,
                        },
                    },
                }
            ]
        }
    }
    assert patch_of(promote_argv(STANDARD, CANDIDATE)) == {
        "spec": {"canary": None, "predictor": {"model": {"storageUri": CANDIDATE}}}
    }
    assert patch_of(rollback_argv(STANDARD)) == {"spec": {"canary": None}}


def test_status_argv_reads_the_isvc() -> None:
    argv = status_argv(Target(name="digits", context="prod"))
    assert argv[:5] == ["kubectl", "--context", "prod", "get", "inferenceservice"]
    assert argv[5] == "digits" and argv[6] == "-o" and argv[7].startswith("custom-columns=")
    assert ".spec.predictor.canaryTrafficPercent" in argv[7] and "visionpipe\\.io/stable-storage-uri" in argv[7]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: start_argv(TARGET, "s3://b/x", 0), "percent=0 must be an integer from 1 to 100"),
        (lambda: start_argv(TARGET, "s3://b/x", 101), "percent=101"),
        (lambda: start_argv(TARGET, "s3://b/x", True), "percent=True"),
        (lambda: start_argv(TARGET, "s3://b/x", 100), "at most 99 in Knative"),
        (lambda: start_argv(TARGET, "/local/path", 10), "bundle uri='/local/path' must start with one of s3://"),
        (lambda: start_argv(TARGET, "s3://", 10), "uri"),
        (lambda: rollback_argv(TARGET, "ftp://x/y"), "previous uri"),
        (lambda: rollback_argv(TARGET), "--previous-uri"),
        (lambda: promote_argv(STANDARD), "--bundle-uri"),
        (lambda: promote_argv(TARGET, CANDIDATE), "serverless promote takes none"),
        (lambda: Target(name="Digits_1"), "name"),
        (lambda: Target(name="1digits"), "starts with a letter"),
        (lambda: Target(name="digits", namespace="a b"), "namespace"),
        (lambda: Target(name="digits", mode="raw"), "mode='raw' must be one of"),
        (lambda: C.start_patch("ModelMesh", "s3://b/x", 10), "ModelMesh has no canary"),
    ],
)
def test_invalid_arguments(build: object, message: str) -> None:
    with pytest.raises(CanaryError, match=message.replace("?", r"\?")):
        build()  # type: ignore[operator]


def test_deployment_mode_of_a_live_service() -> None:
    """status.deploymentMode (recorded by the controller) wins over the annotation; legacy names fold."""
    isvc = yaml.safe_load((MANIFESTS / "standard" / "inference-service.yaml").read_text())
    assert C.deployment_mode(isvc) == "Standard"
    assert C.deployment_mode({**isvc, "status": {"deploymentMode": "Serverless"}}) == "Knative"
    with pytest.raises(C.ModeError, match=r"no status\.deploymentMode and no serving\.kserve\.io/deploymentMode"):
        C.deployment_mode({"metadata": {"name": "digits"}})
    assert C.deployment_mode({"metadata": {"name": "digits"}}, "standard") == "Standard"  # --mode decides then
    with pytest.raises(C.ModeError, match=r"--mode serverless disagrees .* Standard mode"):
        C.deployment_mode(isvc, "serverless")
    with pytest.raises(C.ModeError, match="ModelMesh"):
        C.deployment_mode({**isvc, "status": {"deploymentMode": "ModelMesh"}})


@pytest.mark.parametrize(
    ("cli", "expected"),
    [
        (["start", "--bundle-uri", "s3://b/v7", "--percent", "25"], start_argv(TARGET, "s3://b/v7", 25)),
        (["promote"], promote_argv(TARGET)),
        (["rollback", "--previous-uri", "s3://b/v6"], rollback_argv(TARGET, "s3://b/v6")),
        (["status"], status_argv(TARGET)),
        (["promote", "--mode", "standard", "--bundle-uri", CANDIDATE], promote_argv(STANDARD, CANDIDATE)),
    ],
)
def test_offline_dry_run_prints_the_command(
    cli: list[str], expected: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--dry-run --mode` contacts nothing (no kubeconfig here at all) and prints the kubectl command."""
    monkeypatch.setenv("KUBECONFIG", "/nonexistent")
    mode = [] if "--mode" in cli or cli[0] == "status" else ["--mode", "serverless"]
    assert main(["canary", *cli, "-n", "ml", *mode, "--dry-run"]) == 0
    assert shlex.split(capsys.readouterr().out.strip()) == expected


def test_bad_cli_values_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["canary", "start", "--bundle-uri", "s3://b/v7", "--percent", "150", "--dry-run"]) == 2
    assert "percent=150" in capsys.readouterr().err
    assert main(["canary", "promote", "-n", "ml", "--mode", "standard", "--dry-run"]) == 2
    assert "--bundle-uri" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- the fake cluster
@pytest.fixture(scope="module")
def bases() -> dict[str, dict[str, object]]:
    """The rendered InferenceService `digits` of each base: serverless (manifests/base), standard."""
    kubectl = shutil.which("kubectl")
    if kubectl is None or not PLATFORM.is_dir():
        pytest.skip("kubectl or the platform CRDs are missing")
    found = {}
    for mode, folder in MODES.items():
        (isvc,) = [d for d in render(MANIFESTS / folder, kubectl) if d["kind"] == "InferenceService"]
        found[mode] = isvc
    return found


@pytest.fixture(scope="module")
def rbac() -> dict[str, dict[str, object]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    return {str(d["kind"]): d for d in render(MANIFESTS / "pipeline-rbac", kubectl)}


@pytest.fixture(scope="module")
def server() -> Iterator[FakeKube]:
    with FakeKube(runtimes=[RUNTIME]).running() as kube:
        yield kube


@pytest.fixture(params=list(MODES))
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def kube(
    server: FakeKube, bases: dict[str, dict[str, object]], mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeKube]:
    """The fake API with `digits` of `mode` in namespace ml, a kubeconfig whose context defaults to ml in
    $KUBECONFIG, and no in-cluster service account. Afterwards: nothing but InferenceService calls, and every
    stored object valid (schema + webhook on write; status against the CRD; no controller refusal)."""
    server.reset()
    server.allowed_verbs = None
    server.seed(bases[mode], NAMESPACE)
    config = tmp_path / "kubeconfig"
    config.write_text(yaml.safe_dump(server.kubeconfig(NAMESPACE)))
    monkeypatch.setenv("KUBECONFIG", str(config))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    yield server
    assert server.unexpected == [], "the client called something besides the InferenceService"
    assert server.controller_issues == [] and server.status_issues == []
    for stored in server.history:
        assert validate({k: v for k, v in stored.items() if k != "status"}).ok


def cli(*argv: str) -> int:
    return main(["canary", *argv])


def status_json(capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    capsys.readouterr()
    assert cli("status", "--json") == 0
    loaded = json.loads(capsys.readouterr().out)
    assert isinstance(loaded, dict)
    return loaded


def split(status: dict[str, object]) -> list[tuple[int, str | None]]:
    traffic = status["traffic"]
    assert isinstance(traffic, list)
    return sorted(((t["percent"], t["bundle"]) for t in traffic), key=lambda t: -t[0])


def stored_uri(kube: FakeKube) -> str:
    """The stored object's spec.predictor.model.storageUri."""
    uri = C._model_uri(C._predictor(kube.get(NAMESPACE, "digits")))
    assert uri is not None
    return uri


def stable_uri(bases: dict[str, dict[str, object]], mode: str) -> str:
    uri = bases[mode]["spec"]["predictor"]["model"]["storageUri"]  # type: ignore[index]
    assert isinstance(uri, str)
    return uri


def test_cli_start_status_promote_status(
    kube: FakeKube, mode: str, bases: dict[str, dict[str, object]], capsys: pytest.CaptureFixture[str]
) -> None:
    stable = stable_uri(bases, mode)
    before = status_json(capsys)
    assert before["canary_running"] is False and before["bundle"] == stable and split(before) == [(100, stable)]

    assert cli("start", "--bundle-uri", CANDIDATE, "--percent", "20") == 0  # namespace from the context
    printed = capsys.readouterr()
    assert "canary" in printed.out  # the status table
    assert printed.err.startswith("+ kubectl --namespace ml patch inferenceservice digits --type merge --patch ")
    running = status_json(capsys)
    assert running["mode"] == ("Knative" if mode == "serverless" else "Standard")
    assert running["canary_running"] is True and running["ready"] == "True" and running["canary_ready"] is True
    assert running["canary_bundle"] == CANDIDATE and running["canary_percent"] == 20
    assert running["stable_bundle"] == stable
    assert split(running) == [(80, stable), (20, CANDIDATE)]
    live = kube.get(NAMESPACE, "digits")
    if mode == "serverless":
        assert live["metadata"]["annotations"][C.STABLE_URI_ANNOTATION] == stable  # type: ignore[index]
        assert [t.get("tag") for t in live["status"]["components"]["predictor"]["traffic"]] == [None, "prev"]  # type: ignore[index]
    else:
        assert live["spec"]["predictor"]["model"]["storageUri"] == stable, "the stable predictor keeps its bundle"  # type: ignore[index]

    assert cli("promote") == 0
    promoted = status_json(capsys)
    assert promoted["canary_running"] is False and promoted["bundle"] == CANDIDATE
    assert promoted["stable_bundle"] == CANDIDATE and split(promoted) == [(100, CANDIDATE)]
    spec = kube.get(NAMESPACE, "digits")["spec"]
    assert isinstance(spec, dict) and "canary" not in spec and "canaryTrafficPercent" not in spec["predictor"]
    assert kube.refusals == []
    capsys.readouterr()
    assert cli("status") == 0  # the table
    table = capsys.readouterr().out
    assert "stable bundle" in table and CANDIDATE in table and "traffic (from status):" in table


def test_cli_start_rollback(
    kube: FakeKube, mode: str, bases: dict[str, dict[str, object]], capsys: pytest.CaptureFixture[str]
) -> None:
    stable = stable_uri(bases, mode)
    assert cli("start", "--bundle-uri", CANDIDATE, "-n", NAMESPACE) == 0
    assert cli("rollback", "-n", NAMESPACE) == 0
    back = status_json(capsys)
    assert back["canary_running"] is False and back["bundle"] == stable and back["stable_bundle"] == stable
    live = kube.get(NAMESPACE, "digits")
    predictor = live["spec"]["predictor"]  # type: ignore[index]
    assert predictor["model"]["storageUri"] == stable
    if mode == "serverless":  # all traffic stays on the rolled-out revision; the spec names its bundle again
        assert predictor["canaryTrafficPercent"] == 0
        assert split(back) == [(100, stable), (0, stable)]
    else:
        assert "canary" not in live["spec"] and split(back) == [(100, stable)]  # type: ignore[operator]
    # a second canary after a rollback starts from the stable bundle again
    assert cli("start", "--bundle-uri", OTHER, "--percent", "30") == 0
    again = status_json(capsys)
    assert again["stable_bundle"] == stable and split(again) == [(70, stable), (30, OTHER)]
    assert kube.refusals == []


def test_invalid_transitions_are_refused(kube: FakeKube, mode: str, capsys: pytest.CaptureFixture[str]) -> None:
    def refused(code: int, *argv: str) -> str:
        patches = sum(r.method == "PATCH" for r in kube.requests)
        capsys.readouterr()
        assert cli(*argv) == code
        assert sum(r.method == "PATCH" for r in kube.requests) == patches, "a refused action writes nothing"
        return capsys.readouterr().err

    assert "NoCanary" in refused(1, "promote") and "nothing to promote" in refused(1, "promote")
    assert "NoCanary" in refused(1, "rollback")
    assert "SameBundle" in refused(1, "start", "--bundle-uri", stored_uri(kube))
    assert "must start with one of" in refused(2, "start", "--bundle-uri", "ftp://b/v7")
    assert "percent=0" in refused(2, "start", "--bundle-uri", CANDIDATE, "--percent", "0")
    other = "standard" if mode == "serverless" else "serverless"
    message = refused(2, "start", "--bundle-uri", CANDIDATE, "--mode", other)
    assert f"--mode {other} disagrees" in message and ("Knative" if mode == "serverless" else "Standard") in message
    message = refused(1, "status", "--name", "nosuch")
    assert "InferenceService 'nosuch' in namespace 'ml' does not exist" in message

    assert cli("start", "--bundle-uri", CANDIDATE, "--percent", "10") == 0
    version = kube.get(NAMESPACE, "digits")["metadata"]["resourceVersion"]  # type: ignore[index]
    message = refused(1, "start", "--bundle-uri", OTHER)
    assert "CanaryRunning" in message and CANDIDATE in message and "promote or roll it back" in message
    assert cli("start", "--bundle-uri", CANDIDATE, "--percent", "10") == 0  # the same canary again: idempotent
    assert kube.get(NAMESPACE, "digits")["metadata"]["resourceVersion"] == version  # type: ignore[index]
    assert cli("start", "--bundle-uri", CANDIDATE, "--percent", "50") == 0  # the same bundle: a new percentage
    assert split(status_json(capsys))[0][0] == 50
    assert "not of --bundle-uri" in refused(1, "promote", "--bundle-uri", OTHER)
    if mode == "serverless":  # 100 % would make the canary the rolled-out revision: refused
        assert "at most 99" in refused(2, "start", "--bundle-uri", CANDIDATE, "--percent", "100")
    else:  # Standard: all traffic to the canary, still one rollback away from the stable predictor
        assert cli("start", "--bundle-uri", CANDIDATE, "--percent", "100") == 0
        assert split(status_json(capsys)) == [
            (100, CANDIDATE),
            (0, stored_uri(kube)),
        ]
    assert kube.refusals == [(404, 'inferenceservices.serving.kserve.io "nosuch" not found')]


def test_dry_run_reads_the_live_object_and_prints_a_patch_that_applies(
    kube: FakeKube, mode: str, bases: dict[str, dict[str, object]], capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert cli("start", "--bundle-uri", CANDIDATE, "--dry-run") == 0
    argv = shlex.split(capsys.readouterr().out.strip())
    assert argv[:3] == ["kubectl", "--namespace", NAMESPACE] and all(r.method == "GET" for r in kube.requests)
    patch = patch_of(argv)
    if mode == "serverless":  # read live: the stable bundle is recorded, unlike --dry-run --mode
        assert patch["metadata"] == {"annotations": {C.STABLE_URI_ANNOTATION: stable_uri(bases, mode)}}
    api = KubeIsvcApi.connect(Connection(host=kube.url, token=kube.token))
    api.merge_patch(NAMESPACE, "digits", patch)  # what `kubectl patch` would send: accepted
    assert C.status_of(api.get(NAMESPACE, "digits")).canary_bundle == CANDIDATE
    assert cli("promote", "--dry-run") == 0
    promote = patch_of(shlex.split(capsys.readouterr().out.strip()))
    assert promote == C.promote_patch(mode, CANDIDATE if mode == "standard" else None)
    assert kube.refusals == []


def test_the_api_refusals_are_named(kube: FakeKube, mode: str) -> None:
    """Validation is live: a schema violation is a 422 with the server's causes, a KServe rule a webhook denial,
    a stale resourceVersion a 409, a strategic-merge patch a 415; RBAC refusals name the Role."""
    api = KubeIsvcApi.connect(Connection(host=kube.url, token=kube.token))
    with pytest.raises(C.Refused, match=r"invalid: spec\.predictor\.canaryTrafficPercent: .*") as invalid:
        api.merge_patch(NAMESPACE, "digits", {"spec": {"predictor": {"canaryTrafficPercent": "ten"}}})
    assert invalid.value.status == 422 and invalid.value.causes[0].startswith("spec.predictor.canaryTrafficPercent")
    wrong_mode = C.start_patch("serverless" if mode == "standard" else "standard", CANDIDATE, 10)
    if mode == "serverless":  # spec.canary on a Knative service: KServe's webhook refuses it
        with pytest.raises(C.Refused, match=r"admission webhook .* only supported in Standard") as denied:
            api.merge_patch(NAMESPACE, "digits", wrong_mode)
        assert denied.value.status == 403
    with pytest.raises(C.Conflict, match="changed while"):
        api.merge_patch(
            NAMESPACE, "digits", {"metadata": {"resourceVersion": "1"}, **C.start_patch(mode, CANDIDATE, 10)}
        )
    request = urllib.request.Request(
        f"{kube.url}/apis/serving.kserve.io/v1beta1/namespaces/ml/inferenceservices/digits",
        data=b"{}",
        method="PATCH",
        headers={"Content-Type": "application/strategic-merge-patch+json", "Authorization": f"Bearer {kube.token}"},
    )
    with pytest.raises(urllib.error.HTTPError) as unsupported:
        urllib.request.urlopen(request, timeout=10)
    assert unsupported.value.code == 415
    assert [code for code, _ in kube.refusals] == [422, *([403] if mode == "serverless" else []), 409, 415]
    kube.allowed_verbs = {"get"}
    with pytest.raises(
        C.Forbidden, match=r"cannot patch resource .* Role 'visionpipe-canary' .*manifests/pipeline-rbac"
    ):
        Canary(api, "digits", NAMESPACE).start(CANDIDATE, 10)
    assert C.status_of(api.get(NAMESPACE, "digits")).canary_running is False, "nothing was written"


def test_the_pipeline_step_runs_the_same_transitions_with_the_rbac_role(
    kube: FakeKube, mode: str, bases: dict[str, dict[str, object]], rbac: dict[str, dict[str, object]]
) -> None:
    """canary_rollout's function (kfp.local-free): start -> status -> promote, start -> rollback, with the fake
    enforcing exactly the verbs of manifests/pipeline-rbac's Role; those are exactly the verbs the step uses."""
    rules = rbac["Role"]["rules"]
    assert isinstance(rules, list) and all(isinstance(r, dict) for r in rules)
    # the same Role also holds the trainjobs rule of visionpipe/kfp/trainjob.py (tests/test_trainjob.py checks it)
    (rule,) = [r for r in rules if r["apiGroups"] == ["serving.kserve.io"]]
    assert rule["apiGroups"] == ["serving.kserve.io"] and rule["resources"] == ["inferenceservices"]
    assert set(rule["verbs"]) == set(C.VERBS_USED)
    assert rbac["RoleBinding"]["roleRef"]["name"] == rbac["Role"]["metadata"]["name"] == C.RBAC_ROLE  # type: ignore[index]
    kube.allowed_verbs = set(rule["verbs"])
    step = canary_rollout.python_func

    started = json.loads(
        step(action="start", isvc_name="digits", namespace=NAMESPACE, bundle_uri=CANDIDATE, canary_percent=10)
    )
    assert started["canary_running"] is True and started["canary_percent"] == 10
    status = json.loads(step(action="status", isvc_name="digits", namespace=NAMESPACE))
    assert status == started
    promoted = json.loads(step(action="promote", isvc_name="digits", namespace=NAMESPACE))
    assert promoted["bundle"] == CANDIDATE and promoted["canary_running"] is False
    json.loads(step(action="start", isvc_name="digits", namespace=NAMESPACE, bundle_uri=OTHER, canary_percent=25))
    back = json.loads(step(action="rollback", isvc_name="digits", namespace=NAMESPACE))
    assert back["bundle"] == CANDIDATE and back["canary_running"] is False
    with pytest.raises(C.NoCanary):
        step(action="promote", isvc_name="digits", namespace=NAMESPACE)
    with pytest.raises(CanaryError, match="action='restart' must be one of"):
        step(action="restart", isvc_name="digits", namespace=NAMESPACE)
    assert {r.verb for r in kube.requests} == set(C.VERBS_USED) and kube.refusals == []
    assert list(canary_rollout.component_spec.inputs) == [
        "action",
        "isvc_name",
        "namespace",
        "bundle_uri",
        "canary_percent",
    ]


def test_a_canary_started_with_kubectl_rolls_back(
    kube: FakeKube, mode: str, bases: dict[str, dict[str, object]], capsys: pytest.CaptureFixture[str]
) -> None:
    """The overlays (manifests/overlays/canary, raw-canary) are canaries `visionpipe canary` can roll back; a
    Knative canary without the recorded stable bundle needs --previous-uri."""
    overlay = {"serverless": "overlays/canary", "standard": "overlays/raw-canary"}[mode]
    (applied,) = [d for d in render(MANIFESTS / overlay) if d["kind"] == "InferenceService"]
    kube.reset()
    kube.seed(bases[mode], NAMESPACE)
    live = kube.get(NAMESPACE, "digits")
    spec = {k: v for k, v in applied.items() if k != "status"}
    code, _ = kube.write(NAMESPACE, "digits", spec, patch=True)  # `kubectl apply` of the overlay
    assert code == 200
    stable = stable_uri(bases, mode)
    assert C.status_of(kube.get(NAMESPACE, "digits")).stable_bundle == stable
    if mode == "serverless":
        code, _ = kube.write(
            NAMESPACE, "digits", {"metadata": {"annotations": {C.STABLE_URI_ANNOTATION: None}}}, patch=True
        )
        assert code == 200
        capsys.readouterr()
        assert cli("rollback") == 1 and "StableUnknown" in capsys.readouterr().err
        assert cli("rollback", "--previous-uri", stable) == 0
    else:
        assert cli("rollback") == 0
    assert stored_uri(kube) == stable
    after = C._predictor(kube.get(NAMESPACE, "digits"))
    assert C._predictor(live) == {k: v for k, v in after.items() if k != "canaryTrafficPercent"}
    assert kube.refusals == []


def test_unreachable_api_is_named() -> None:
    api = KubeIsvcApi.connect(Connection(host=f"http://127.0.0.1:{free_port()}", timeout_s=5))
    with pytest.raises(C.Unreachable, match=r"cannot reach the Kubernetes API at http://127\.0\.0\.1"):
        Canary(api, "digits", NAMESPACE).status()


# --------------------------------------------------------------------------------------------- platform rules
def test_the_wrong_mode_is_caught(bases: dict[str, dict[str, object]]) -> None:
    """A Serverless patch on a Standard service would silently move all traffic; a Standard patch on a Knative
    service is refused by the webhook. The state machine refuses both before writing (mode from the object)."""
    on_standard = merge_patch(bases["standard"], C.start_patch("serverless", CANDIDATE, 10))
    errors = admit(on_standard, bases["standard"], objects=[RUNTIME]).result.errors  # type: ignore[arg-type]
    assert [e.path for e in errors] == ["spec.predictor.canaryTrafficPercent"]
    on_knative = merge_patch(bases["serverless"], C.start_patch("standard", CANDIDATE, 10))
    errors = admit(on_knative, bases["serverless"], objects=[RUNTIME]).result.errors  # type: ignore[arg-type]
    assert [e.message for e in errors] == [
        "canary is only supported in Standard deployment mode (this InferenceService is Knative)"
    ]
    for mode, other in (("serverless", "standard"), ("standard", "serverless")):
        with pytest.raises(C.ModeError, match="disagrees"):
            C.plan_start(bases[mode], CANDIDATE, 10, other)
