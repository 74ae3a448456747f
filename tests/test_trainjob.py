"""visionpipe/kfp/trainjob.py against a fake Kubernetes API on loopback (tests/fake_trainer.py) that validates every
TrainJob against the upstream CRD, runs the Trainer's webhook rules, resolves runtimeRef against the
ClusterTrainingRuntime rendered from manifests/trainer, and walks each job through scripted states. The client
side is the real one: the kubernetes python client, connected with visionpipe.rollout.canary's connection code."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_trainer import FakeTrainer, Step, completes, fails, stuck
from k8s_schema import PLATFORM, render, validate

from visionpipe.kfp import trainjob as T
from visionpipe.rollout.canary import Connection
from visionpipe.serving import storage
from visionpipe.serving.storage import S3_SECRET, S3_SECRET_KEYS

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
KUBECTL = shutil.which("kubectl")
NAMESPACE = "kubeflow-user"
IMAGE = "registry.example.com/ml/visionpipe@sha256:" + "ab" * 32
MODEL_URI = "s3://mlpipeline/v2/artifacts/training/0b5c/supervised-train/7f3e/model"
POLL = 0.01
pytestmark = [
    pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed"),
    pytest.mark.skipif(not PLATFORM.is_dir(), reason=f"platform CRDs not found at {PLATFORM}"),
]

Json = dict[str, object]


@pytest.fixture(scope="module")
def runtimes() -> list[Json]:
    assert KUBECTL is not None
    return render(MANIFESTS / "trainer", KUBECTL)


@pytest.fixture(scope="module")
def server(runtimes: list[Json]) -> Iterator[FakeTrainer]:
    with FakeTrainer(runtimes=runtimes).running() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeTrainer, runtimes: list[Json]) -> Iterator[FakeTrainer]:
    server.reset()
    server.runtimes = runtimes
    yield server
    assert server.unexpected == [], "the client called paths the launcher does not need"
    assert server.status_issues == [], "the scripted controller wrote a status the CRD refuses"
    assert server.unevaluated == [], "a CEL rule of the CRD was not evaluated"


@pytest.fixture
def api(server: FakeTrainer) -> T.KubeTrainJobApi:
    return T.KubeTrainJobApi.connect(Connection(host=server.url, token=server.token, timeout_s=5.0))


def request(staging: T.Staging, **changes: object) -> T.TrainJobRequest:
    fields: dict[str, object] = {
        "namespace": NAMESPACE,
        "image": IMAGE,
        "recipe": "digits-cnn",
        "workers": 2,
        "staging": staging,
        "recipe_overrides": {"epochs": 2},
        "timeout_s": 30.0,
    }
    fields.update(changes)
    return T.TrainJobRequest(**fields)  # type: ignore[arg-type]  # the test's keyword table


def local_staging(tmp_path: Path, key: str = MODEL_URI) -> T.Staging:
    """The layout with a local root: storage.exists reads local paths too (the S3 path has its own test)."""
    root = tmp_path / "staging"
    return T.Staging(
        root=str(root),
        dataset=str(root / "dataset"),
        backbone=str(root / "backbone"),
        out=str(root / "out"),
        checkpoint=str(root / "checkpoint"),
        task_key=key,
    )


def write_outputs(out: str) -> None:
    """What rank 0 of the worker leaves under --out (the marker last)."""
    storage.write_bytes(storage.join(out, "result.json"), b"{}")
    storage.write_bytes(storage.join(out, T.SUCCESS_MARKER), b"")


class Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)


# --------------------------------------------------------------------------------------------- the objects
def test_the_trainjob_passes_the_crd_and_names_the_shipped_runtime(runtimes: list[Json]) -> None:
    staging = T.staging_layout("s3://bucket/checkpoints", MODEL_URI)
    job = T.build_trainjob(request(staging, with_backbone=True, resources={"requests": {"cpu": "2"}}))
    result = validate(job)
    assert result.errors == []
    # the two root rules on metadata.name are the only ones the schema helper leaves to the fake (which runs them)
    assert all("self.metadata.name" in issue.message for issue in result.unevaluated)
    (runtime,) = runtimes
    assert runtime["kind"] == T.RUNTIME_KIND and runtime["metadata"]["name"] == T.RUNTIME_NAME  # type: ignore[index]
    assert job["spec"]["runtimeRef"] == {"name": T.RUNTIME_NAME, "apiGroup": T.GROUP, "kind": T.RUNTIME_KIND}  # type: ignore[index]
    trainer = job["spec"]["trainer"]  # type: ignore[index]
    assert (trainer["numNodes"], trainer["numProcPerNode"], trainer["image"]) == (2, 1, IMAGE)
    assert trainer["command"] == ["torchrun"]
    args = trainer["args"]
    assert args[:2] == ["--module", T.WORKER_MODULE]
    flags = dict(zip(args[2::2], args[3::2], strict=True))
    assert flags == {
        "--dataset": staging.dataset,
        "--out": staging.out,
        "--recipe": "digits-cnn",
        "--recipe-overrides-json": '{"epochs": 2}',
        "--backbone": staging.backbone,
        "--checkpoint-uri": staging.checkpoint,
    }
    env = trainer["env"]
    assert {e["name"] for e in env} == set(S3_SECRET_KEYS.values())
    assert all("value" not in e and e["valueFrom"]["secretKeyRef"]["name"] == S3_SECRET for e in env), env
    assert all(e["valueFrom"]["secretKeyRef"]["optional"] is False for e in env)
    assert not {e["name"] for e in env} & set(T.RESERVED_ENV)
    assert job["metadata"]["name"] == T.trainjob_name(MODEL_URI) == T.trainjob_name(MODEL_URI)  # type: ignore[index]
    assert job["metadata"]["annotations"] == {T.TASK_ANNOTATION: MODEL_URI}  # type: ignore[index]


def mutations() -> list[tuple[str, str]]:
    return [
        ("typo", "spec.trainer.numNode"),
        ("zero-procs", "spec.trainer.numProcPerNode"),
        ("negative-nodes", "spec.trainer.numNodes"),
        ("no-runtime-name", "spec.runtimeRef.name"),
        ("bad-managed-by", "spec.managedBy"),
        ("bad-name", "<root>"),
    ]


@pytest.mark.parametrize(("mutation", "where"), mutations(), ids=[m for m, _ in mutations()])
def test_a_bad_field_is_refused_by_the_validator_and_the_fake(
    fake: FakeTrainer, api: T.KubeTrainJobApi, tmp_path: Path, mutation: str, where: str
) -> None:
    job = T.build_trainjob(request(local_staging(tmp_path)))
    bad: Any = copy.deepcopy(job)  # a JSON tree to poke at
    spec, trainer = bad["spec"], bad["spec"]["trainer"]
    if mutation == "typo":
        trainer["numNode"] = trainer.pop("numNodes")
    elif mutation == "zero-procs":
        trainer["numProcPerNode"] = 0
    elif mutation == "negative-nodes":
        trainer["numNodes"] = -1
    elif mutation == "no-runtime-name":
        spec["runtimeRef"]["name"] = ""
    elif mutation == "bad-managed-by":
        spec["managedBy"] = "someone-else"
    else:
        bad["metadata"]["name"] = "7-starts-with-a-digit"
    if mutation != "bad-name":
        assert validate(bad).errors, "the schema helper must refuse it"
    with pytest.raises(T.TrainJobInvalid, match="refused the create") as caught:
        api.create(NAMESPACE, bad)
    assert caught.value.status == 422 and any(c.startswith(where) for c in caught.value.causes), caught.value.causes
    assert fake.objects == {}
    api.create(NAMESPACE, job)  # the unmodified object is stored
    assert list(fake.objects) == [(NAMESPACE, job["metadata"]["name"])]  # type: ignore[index]


def test_the_controller_runs_the_worker_with_torchrun_env_and_the_s3_secret(
    fake: FakeTrainer, api: T.KubeTrainJobApi, tmp_path: Path
) -> None:
    """runtimeRef resolves to the rendered ClusterTrainingRuntime: its `node` container, non-root, with our image
    and command, the S3 env from the Secret and the torch plugin's PET_* settings for 3 nodes."""
    spec = request(local_staging(tmp_path), workers=3)
    api.create(NAMESPACE, T.build_trainjob(spec))
    resolved = fake.resolved[spec.name]
    container = resolved["container"]
    assert resolved["replicas"] == 3 and resolved["securityContext"]["runAsNonRoot"] is True  # type: ignore[index]
    assert container["image"] == IMAGE and container["command"] == ["torchrun"]  # type: ignore[index]
    env = {e["name"]: e for e in container["env"]}  # type: ignore[index]
    assert env["PET_NNODES"]["value"] == "3" and env["PET_NPROC_PER_NODE"]["value"] == "1"
    assert env["PET_MASTER_ADDR"]["value"] == f"{spec.name}-node-0-0.{spec.name}"
    for name in S3_SECRET_KEYS.values():
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == S3_SECRET
    assert container["securityContext"]["allowPrivilegeEscalation"] is False  # type: ignore[index]


def test_reserved_torchrun_env_and_a_missing_runtime_are_refused_by_the_webhook(
    fake: FakeTrainer, api: T.KubeTrainJobApi, tmp_path: Path
) -> None:
    job = T.build_trainjob(request(local_staging(tmp_path)))
    reserved = copy.deepcopy(job)
    reserved["spec"]["trainer"]["env"].append({"name": "PET_NNODES", "value": "4"})  # type: ignore[index]
    with pytest.raises(T.TrainJobInvalid, match=r"reserved envs.*PET_NNODES"):
        api.create(NAMESPACE, reserved)
    fake.runtimes = []
    with pytest.raises(T.TrainJobInvalid, match=rf"must be created before.*kubectl apply -k {T.TRAINER_MANIFESTS}"):
        T.run_trainjob(api, request(local_staging(tmp_path)), log=Lines(), poll_s=POLL)
    assert fake.objects == {}


# --------------------------------------------------------------------------------------------- the lifecycle
def test_create_watch_succeed_through_s3_with_exactly_the_rbac_verbs(
    fake: FakeTrainer, api: T.KubeTrainJobApi, s3_bucket: str
) -> None:
    """The step's path on a cluster: the S3 layout from checkpoint_uri, create, poll until Complete (one line per
    status change), then the worker's _SUCCESS in real S3 (SeaweedFS); only the verbs of role.yaml are used."""
    staging = T.staging_layout(f"{s3_bucket}/checkpoints", MODEL_URI)
    assert staging.root.startswith(f"{s3_bucket}/checkpoints/") and staging.out == staging.root + "/out"
    fake.allowed_verbs = set(T.TRAINJOB_VERBS)
    fake.plan = lambda job: completes(on_done=lambda _: write_outputs(staging.out))
    lines = Lines()
    outcome = T.run_trainjob(api, request(staging), log=lines, poll_s=POLL)
    assert (outcome.attached, outcome.replaced, outcome.out_uri) == (False, False, staging.out)
    assert outcome.polls == 4 and T.job_state(outcome.status).phase == T.COMPLETE
    assert storage.exists(staging.success_marker)
    text = "\n".join(lines.lines)
    assert "created (2 x 1 workers" in lines.lines[0]
    assert "Pending: node[active=0 ready=0" in text and "Running: node[active=1 ready=1" in text
    assert "Complete: Complete=True(AllJobsCompleted) node[active=0 ready=0 succeeded=1" in text
    assert len(lines.lines) == len(set(lines.lines)), "a line per change, not per poll"
    assert {r.verb for r in fake.requests} == {"create", "get"} and fake.refusals == []


def test_a_failed_job_fails_the_step_with_its_reason(fake: FakeTrainer, api: T.KubeTrainJobApi, tmp_path: Path) -> None:
    fake.plan = lambda job: fails()
    with pytest.raises(T.TrainJobFailed, match="ReachedMaxRestarts: jobset failed due to reaching max") as caught:
        T.run_trainjob(api, request(local_staging(tmp_path)), log=Lines(), poll_s=POLL)
    assert caught.value.reason == "ReachedMaxRestarts"
    assert "kubectl logs" in str(caught.value)
    assert fake.deletes == [], "a failed job is kept for kubectl describe / logs (a retry replaces it)"


def test_a_deadline_failure_from_the_trainer_is_surfaced(
    fake: FakeTrainer, api: T.KubeTrainJobApi, tmp_path: Path
) -> None:
    # trainjob_controller.go reconcileDeadline: Failed, reason DeadlineExceeded (constants.go message)
    fake.plan = lambda job: fails(("Failed", "DeadlineExceeded", "TrainJob exceeded its active deadline"))
    spec = request(local_staging(tmp_path), timeout_s=90.4)
    assert T.build_trainjob(spec)["spec"]["activeDeadlineSeconds"] == 91  # type: ignore[index]
    with pytest.raises(T.TrainJobFailed, match="DeadlineExceeded: TrainJob exceeded its active deadline"):
        T.run_trainjob(api, spec, log=Lines(), poll_s=POLL)


def test_a_stuck_job_times_out_and_is_deleted(fake: FakeTrainer, api: T.KubeTrainJobApi, tmp_path: Path) -> None:
    fake.plan = lambda job: stuck()
    spec = request(local_staging(tmp_path))
    with pytest.raises(T.TrainJobTimeout, match=r"did not finish within .* deleted it") as caught:
        T.run_trainjob(api, spec, log=Lines(), poll_s=0.02, timeout_s=0.3)
    assert "last status: node[active=0 ready=0 succeeded=0 failed=0 suspended=0]" in str(caught.value)
    assert fake.deletes == [(spec.name, "Foreground")]
    assert fake.objects[(NAMESPACE, spec.name)]["metadata"]["deletionTimestamp"]  # type: ignore[index]
    code, _ = fake.get(NAMESPACE, spec.name)  # its JobSet and pods go first
    assert code == 200
    code, _ = fake.get(NAMESPACE, spec.name)
    assert code == 404, "Foreground: gone once its dependents are"


def test_complete_without_the_success_marker_is_an_error(
    fake: FakeTrainer, api: T.KubeTrainJobApi, tmp_path: Path
) -> None:
    spec = request(local_staging(tmp_path))
    with pytest.raises(T.TrainJobOutputMissing, match=r"Complete but .*/out/_SUCCESS is missing"):
        T.run_trainjob(api, spec, log=Lines(), poll_s=POLL)


def test_a_retry_reattaches_to_its_running_job(fake: FakeTrainer, api: T.KubeTrainJobApi, tmp_path: Path) -> None:
    """The first attempt's pod died after creating the job: the retry (same model URI, same name) finds it
    (409), sees it is its own (annotation, spec) and follows it instead of starting a second job."""
    staging = local_staging(tmp_path)
    spec = request(staging)
    fake.seed(T.build_trainjob(spec), NAMESPACE, completes(on_done=lambda _: write_outputs(staging.out)))
    fake.walk(NAMESPACE, spec.name, 2)  # it ran on while nobody watched
    lines = Lines()
    outcome = T.run_trainjob(api, spec, log=lines, poll_s=POLL)
    assert outcome.attached and not outcome.replaced
    assert "re-attached" in lines.lines[0] and "Running" in lines.lines[0]
    assert fake.refusals == [(409, f'{T.RESOURCE} "{spec.name}" already exists')]
    assert len(fake.objects) == 1 and fake.deletes == []


def test_a_retry_replaces_its_failed_job(fake: FakeTrainer, api: T.KubeTrainJobApi, tmp_path: Path) -> None:
    staging = local_staging(tmp_path)
    spec = request(staging)
    fake.seed(T.build_trainjob(spec), NAMESPACE, fails())
    first_uid = fake.walk(NAMESPACE, spec.name, 3)["metadata"]["uid"]  # type: ignore[index]
    fake.plan = lambda job: completes(on_done=lambda _: write_outputs(staging.out))
    lines = Lines()
    outcome = T.run_trainjob(api, spec, log=lines, poll_s=POLL)
    assert outcome.replaced and not outcome.attached
    assert "Failed (ReachedMaxRestarts" in lines.lines[0] and "created again" in "\n".join(lines.lines)
    assert fake.deletes == [(spec.name, "Foreground")]
    assert fake.objects[(NAMESPACE, spec.name)]["metadata"]["uid"] != first_uid  # type: ignore[index]


def test_a_retry_after_a_timeout_waits_for_the_deleted_job_to_go(
    fake: FakeTrainer, api: T.KubeTrainJobApi, tmp_path: Path
) -> None:
    staging = local_staging(tmp_path)
    spec = request(staging)
    fake.seed(T.build_trainjob(spec), NAMESPACE, stuck())
    fake.foreground_polls = 3
    assert fake.delete(NAMESPACE, spec.name, "Foreground")[0] == 200  # the timed-out attempt's delete
    fake.plan = lambda job: completes(on_done=lambda _: write_outputs(staging.out))
    lines = Lines()
    outcome = T.run_trainjob(api, spec, log=lines, poll_s=POLL)
    # three GETs still see it (the 409 check, then two waits), the fourth finds it gone
    assert outcome.replaced and sum("waiting for the deletion" in line for line in lines.lines) == 2
    assert fake.deletes == [(spec.name, "Foreground")], "nothing deleted twice"


def test_a_job_of_another_task_under_our_name_is_refused(
    fake: FakeTrainer, api: T.KubeTrainJobApi, tmp_path: Path
) -> None:
    spec = request(local_staging(tmp_path))
    other = T.build_trainjob(spec)
    other["metadata"]["annotations"] = {T.TASK_ANNOTATION: "s3://elsewhere/model"}  # type: ignore[index]
    fake.seed(other, NAMESPACE)
    with pytest.raises(T.TrainJobNotOurs, match=r"already exists and is not this step's.*kubectl delete trainjob"):
        T.run_trainjob(api, spec, log=Lines(), poll_s=POLL)
    changed = request(local_staging(tmp_path), workers=4)  # same task, another spec: not adopted either
    fake.reset()
    fake.seed(T.build_trainjob(spec), NAMESPACE)
    with pytest.raises(T.TrainJobNotOurs, match=r"spec.trainer differs"):
        T.run_trainjob(api, changed, log=Lines(), poll_s=POLL)
    assert fake.deletes == []


def test_transient_api_errors_while_polling_are_tolerated(
    fake: FakeTrainer, api: T.KubeTrainJobApi, tmp_path: Path
) -> None:
    staging = local_staging(tmp_path)
    fake.plan = lambda job: completes(on_done=lambda _: write_outputs(staging.out))
    fake.fail_next_gets = T.TRANSIENT_TOLERANCE - 1
    lines = Lines()
    T.run_trainjob(api, request(staging), log=lines, poll_s=POLL)
    assert sum("poll failed" in line and "500" in line for line in lines.lines) == T.TRANSIENT_TOLERANCE - 1
    fake.reset()
    fake.fail_next_gets = T.TRANSIENT_TOLERANCE
    with pytest.raises(T.TrainJobApiError, match="HTTP 500"):
        T.run_trainjob(api, request(staging), log=Lines(), poll_s=POLL)


# --------------------------------------------------------------------------------------------- API refusals
def test_rbac_403_names_the_role_and_how_to_grant_it(fake: FakeTrainer, api: T.KubeTrainJobApi, tmp_path: Path) -> None:
    fake.allowed_verbs = {"get", "delete"}
    with pytest.raises(T.TrainJobForbidden) as caught:
        T.run_trainjob(api, request(local_staging(tmp_path)), log=Lines(), poll_s=POLL)
    message = str(caught.value)
    assert 'cannot create resource "trainjobs" in API group "trainer.kubeflow.org"' in message
    assert f"Role {T.RBAC_ROLE!r}" in message and f"kubectl apply -n {NAMESPACE} -k {T.RBAC_MANIFESTS}" in message
    fake.allowed_verbs = {"create"}
    with pytest.raises(T.TrainJobForbidden, match="forbidden to get"):
        T.run_trainjob(api, request(local_staging(tmp_path)), log=Lines(), poll_s=POLL)


def test_a_cluster_without_the_trainer_says_what_to_install(
    fake: FakeTrainer, api: T.KubeTrainJobApi, tmp_path: Path
) -> None:
    fake.installed = False
    with pytest.raises(T.TrainerNotInstalled, match=rf"not installed.*kubectl apply -k {T.TRAINER_MANIFESTS}") as e:
        T.run_trainjob(api, request(local_staging(tmp_path)), log=Lines(), poll_s=POLL)
    assert e.value.status == 404 and "could not find the requested resource" in str(e.value)


def test_an_unreachable_api_server_is_named(tmp_path: Path) -> None:
    from visionpipe.harness import free_port

    dead = T.KubeTrainJobApi.connect(Connection(host=f"http://127.0.0.1:{free_port()}", token="t", timeout_s=2.0))
    with pytest.raises(T.TrainJobUnreachable, match=r"cannot reach the Kubernetes API at http://127\.0\.0\.1"):
        T.run_trainjob(dead, request(local_staging(tmp_path)), log=Lines(), poll_s=POLL)


# --------------------------------------------------------------------------------------------- arguments
def test_the_staging_layout_and_its_refusals() -> None:
    a = T.staging_layout("s3://b/ckpt/", MODEL_URI)
    assert a == T.staging_layout("s3://b/ckpt", MODEL_URI), "stable across retries"
    assert a != T.staging_layout("s3://b/ckpt", MODEL_URI + "-other")
    assert [a.dataset, a.backbone, a.out, a.checkpoint] == [
        f"{a.root}/{p}" for p in ("dataset", "backbone", "out", "checkpoint")
    ]
    assert a.root == f"s3://b/ckpt/{T.task_hash(MODEL_URI)}" and a.success_marker == f"{a.out}/_SUCCESS"
    for bad in ("", "/tmp/ckpt", "gs://b/x", "s3://"):
        with pytest.raises(T.TrainJobRequestError, match="needs an s3:// prefix"):
            T.staging_layout(bad, MODEL_URI)
    with pytest.raises(T.TrainJobRequestError, match="model output URI is required"):
        T.staging_layout("s3://b/c", "")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"workers": 0}, "train_workers=0 must be an integer from 1 to 64"),
        ({"workers": True}, "train_workers=True"),
        ({"procs_per_node": 0}, "procs_per_node=0"),
        ({"recipe": "/work/recipes/mine.yaml"}, "cannot read files of the step's pod"),
        ({"namespace": "Kubeflow_User"}, "namespace='Kubeflow_User'"),
        ({"timeout_s": 0.0}, "timeout_s=0.0"),
        ({"resources": {"request": {"cpu": "1"}}}, "resources key 'request'"),
        ({"image": ""}, "image=''"),
    ],
)
def test_bad_requests_are_refused_before_any_call(tmp_path: Path, change: dict[str, object], message: str) -> None:
    with pytest.raises(T.TrainJobRequestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        T.build_trainjob(request(local_staging(tmp_path), **change))


def test_the_role_grants_exactly_the_verbs_the_launcher_uses() -> None:
    assert KUBECTL is not None
    (role,) = [d for d in render(MANIFESTS / "pipeline-rbac", KUBECTL) if d["kind"] == "Role"]
    rules = [r for r in role["rules"] if r["apiGroups"] == [T.GROUP]]  # type: ignore[attr-defined]
    assert rules == [{"apiGroups": [T.GROUP], "resources": [T.PLURAL], "verbs": list(T.TRAINJOB_VERBS)}]
    assert role["metadata"]["name"] == T.RBAC_ROLE  # type: ignore[index]


def test_the_launcher_module_imports_neither_torch_nor_the_kubernetes_client() -> None:
    import subprocess
    import sys

    code = (
        "import sys, visionpipe.kfp.trainjob; "
        "print(sorted(m for m in ('torch', 'kubernetes', 'kfp', 'kubeflow_trainer_api') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_job_state_reads_the_trainer_conditions() -> None:
    def job(*conditions: tuple[str, str], deleting: bool = False) -> Json:
        status = {"conditions": [{"type": t, "status": s, "reason": "R", "message": "m"} for t, s in conditions]}
        meta: Json = {"deletionTimestamp": "2026-12-02T00:00:00Z"} if deleting else {}
        return {"metadata": meta, "status": status}

    assert T.job_state(job()).phase == "Pending"
    assert T.job_state(job(("Suspended", "True"))).phase == T.SUSPENDED
    assert T.job_state(job(("Suspended", "False"))).phase == "Pending"
    assert T.job_state(job(("Complete", "True"))).phase == T.COMPLETE
    assert T.job_state(job(("Complete", "False"), ("Failed", "True"))).phase == T.FAILED
    assert T.job_state(job(("Complete", "True"), ("Failed", "True"))).phase == T.FAILED
    assert T.job_state(job(("Complete", "True"), deleting=True)).phase == "Deleting"
    assert T.job_state({"status": {"jobsStatus": [{"name": "node", "active": 1}]}}).phase == "Running"
    assert Step().condition is None


def test_the_worker_entry_point_accepts_what_the_trainjob_passes(tmp_path: Path) -> None:
    """The contract with visionpipe/phases/train_worker.py: its parser takes torchrun's script arguments as they
    are, and the marker it writes last is the one the launcher checks."""
    from visionpipe.phases import train_worker

    staging = T.staging_layout("s3://b/ckpt", MODEL_URI)
    args = T.worker_args(request(staging, with_backbone=True))
    assert args[:2] == ["--module", train_worker.__name__]
    parsed = train_worker.parser().parse_args(args[2:])
    assert (parsed.dataset, parsed.out, parsed.recipe) == (staging.dataset, staging.out, "digits-cnn")
    assert (parsed.backbone, parsed.checkpoint_uri) == (staging.backbone, staging.checkpoint)
    assert parsed.recipe_overrides_json == '{"epochs": 2}'
    assert train_worker.SUCCESS_FILE == T.SUCCESS_MARKER
