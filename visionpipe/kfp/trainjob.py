"""Distributed training on a cluster: one Kubeflow Trainer v2 ``TrainJob`` (trainer.kubeflow.org/v1alpha1) per
training step, created, followed and checked from the step's pod (``supervised_train`` with ``train_workers > 1``).

A pure core: no KFP decorators, no torch. The step calls `staging_layout` (where the workers read and write in
S3), uploads the dataset (and backbone) there, calls `run_trainjob`, then downloads ``<out>/`` into its outputs.

What the Trainer does (kubeflow/trainer at 8c0f5059bd51, the commit of ../shared/platform/kubeflow-trainer):

- ``spec.runtimeRef {name}`` resolves to a ClusterTrainingRuntime: ``apiGroup`` defaults to trainer.kubeflow.org,
  ``kind`` to ClusterTrainingRuntime (pkg/apis/trainer/v1alpha1/trainjob_types.go RuntimeRef); the validating
  webhook refuses a TrainJob whose runtime does not exist (pkg/runtime/core/clustertrainingruntime.go
  ValidateObjects). We ship the runtime: manifests/trainer (``visionpipe-torch-distributed``).
- ``spec.trainer`` overrides the runtime's ``node`` container (image, command, args; env merged by name) and
  ``trainer.numNodes`` becomes the replica count of the ``node`` job; the torch plugin then injects torchrun's
  PET_NNODES / PET_NPROC_PER_NODE (``numProcPerNode``, default "auto") / PET_NODE_RANK / PET_MASTER_ADDR /
  PET_MASTER_PORT, and refuses a TrainJob that sets them itself (pkg/runtime/framework/plugins/torch/torch.go
  EnforceMLPolicy, Validate; pkg/constants/constants.go). torchrun takes every PET_<OPTION> as the default of
  --<option> (torch/distributed/argparse_util.py ``env``). World size = numNodes x numProcPerNode.
- Conditions (trainjob_types.go): ``Suspended`` (reasons Suspended / Resumed), ``Complete`` and ``Failed``, the
  last two copied from the JobSet's Completed / Failed conditions with the JobSet's reason and message
  (pkg/runtime/framework/plugins/jobset/jobset.go Status; JobSet reasons AllJobsCompleted, FailedJobs,
  ReachedMaxRestarts, kubernetes-sigs/jobset pkg/constants/constants.go), plus ``Failed`` with reason
  TrainingRuntimeNotSupported or DeadlineExceeded set by the TrainJob controller itself
  (pkg/controller/trainjob_controller.go). A finished job is Complete=True or Failed=True
  (pkg/util/trainjob/trainjob.go IsTrainJobFinished). ``status.jobsStatus[]`` counts the child Jobs per
  replicated job (active / ready / succeeded / failed / suspended). "Created" and "Running" are not conditions:
  the SDK derives them (kubeflow/trainer/backends/kubernetes/backend.py ``__get_trainjob_from_cr``).
- Delete: the JobSet carries an ownerReference to the TrainJob with controller and blockOwnerDeletion
  (jobset.go Build ... WithOwnerReferences), so Kubernetes' garbage collector removes the JobSet, its Jobs and
  pods with the TrainJob; with ``propagationPolicy: Foreground`` the TrainJob itself stays (with a
  deletionTimestamp) until they are gone. Suspend (``spec.suspend: true``) suspends the JobSet, which deletes the
  running pods but keeps the objects for a resume (trainjob_controller.go setSuspendedCondition, jobset.go).

Choices:

- **Name**: ``vp-train-<sha256(task_key)[:16]>``, task_key = the step's model output URI (KFP keeps an output URI
  across the retries of one task, the same key the single-pod checkpoint mirror uses). A retried step therefore
  finds its own TrainJob (409 AlreadyExists) and re-attaches to it instead of starting a second one; the full
  key is in the annotation ``visionpipe.io/task-key``, and a job of that name with another key (or another
  trainer spec) is refused with `TrainJobNotOurs` rather than adopted.
- **A Failed job found on retry** is deleted (Foreground, its pods go first), then created again under the same
  name: the retry trains again and resumes from the checkpoint mirrored under ``<staging>/checkpoint``. A Complete
  one is adopted as it is (its outputs are checked).
- **Timeout**: the job is deleted (Foreground), not suspended, so it stops holding nodes / GPUs at once; the
  retried step starts a fresh job that resumes from the checkpoint. ``activeDeadlineSeconds`` is set to the same
  budget, so the Trainer fails the job by itself (DeadlineExceeded) even when the step pod is gone.
- **Polling** GET (no watch): a bounded loop with ``poll_s`` sleeps, one log line whenever the status changes; a
  few consecutive transient API errors (5xx, connection) are tolerated and logged. RBAC: create / get / delete on
  trainjobs (manifests/pipeline-rbac/role.yaml; TRAINJOB_VERBS).
- **The object**: built with the official SDK's typed models (kubeflow_trainer_api ``TrainerV1alpha1TrainJob``)
  and sent with the kubernetes client, not with ``TrainerClient.train``: that names jobs at random unless
  options say otherwise, loads the runtime first (get on clustertrainingruntimes), reads a ConfigMap in
  kubeflow-system (verify_backend), wraps every API error into a RuntimeError (so 409 / 403 / 404 / 422 cannot be
  told apart), and its ``CustomTrainerContainer.env`` takes plain values only (``dict[str, str]``, turned into
  ``EnvVar(name, value)`` by backends/kubernetes/utils.py ``get_trainer_cr_from_custom_trainer``), where the
  workers need the S3 settings as ``valueFrom.secretKeyRef`` (kubeflow/trainer/backends/kubernetes/backend.py
  KubernetesBackend.__init__ / train, kubeflow/trainer/types/types.py CustomTrainerContainer).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from visionpipe import k8s_api
from visionpipe.k8s_api import JsonObj, KubeApiError
from visionpipe.k8s_api import json_dict as _dict
from visionpipe.k8s_api import json_list as _list
from visionpipe.k8s_api import json_str as _str
from visionpipe.rollout.canary import Connection, RolloutError, Unreachable, connect_client

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
API_VERSION = f"{GROUP}/{VERSION}"
RESOURCE = f"{PLURAL}.{GROUP}"
RUNTIME_NAME = "visionpipe-torch-distributed"  # manifests/trainer/torch-distributed.yaml (a test keeps them equal)
RUNTIME_KIND = "ClusterTrainingRuntime"
TRAINER_MANIFESTS = "manifests/trainer"
RBAC_ROLE = "visionpipe-canary"  # the pipeline's Role (manifests/pipeline-rbac), which also holds the trainjobs rule
RBAC_MANIFESTS = "manifests/pipeline-rbac"
TRAINJOB_VERBS = ("create", "get", "delete")  # what this module calls (role.yaml grants exactly these)
WORKER_MODULE = "visionpipe.phases.train_worker"
NAME_PREFIX = "vp-train-"
TASK_ANNOTATION = "visionpipe.io/task-key"
TASK_LABEL = "visionpipe.io/task-hash"
MANAGED_BY = {"app.kubernetes.io/part-of": "visionpipe", "app.kubernetes.io/component": "training"}
SUCCESS_MARKER = "_SUCCESS"  # rank 0 writes it under --out after everything else
COMPLETE, FAILED, SUSPENDED = "Complete", "Failed", "Suspended"  # trainjob_types.go condition types
# torchrun's settings, injected by the torch plugin; a TrainJob that sets one is refused (torch.go Validate)
RESERVED_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
NAMESPACE_PATTERN = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
RECIPE_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_WORKERS = 64
TRANSIENT_TOLERANCE = 3  # consecutive failed polls (5xx / unreachable) before giving up
DELETE_WAIT_S = 120.0  # how long a retry waits for its Failed predecessor to be gone

Log = Callable[[str], None]
R = TypeVar("R")


# --------------------------------------------------------------------------------------------- errors
class TrainJobError(Exception):
    """Every refusal of this module; the message says what was wrong and how to go on."""


class TrainJobRequestError(TrainJobError, ValueError):
    """A bad argument (the message names it, the bad value and what is allowed)."""


class TrainJobApiError(TrainJobError, KubeApiError):
    """The Kubernetes API refused a call or could not be reached (`status`, `causes`: visionpipe/k8s_api.py)."""


class TrainerNotInstalled(TrainJobApiError):
    """404 on the trainjobs collection: the Trainer's CRDs are not installed (or the namespace does not exist)."""


class TrainJobForbidden(TrainJobApiError):
    """403 from RBAC (or 401): the step's ServiceAccount may not create / get / delete trainjobs."""


class TrainJobInvalid(TrainJobApiError):
    """422 (the CRD schema) or the Trainer's validating webhook (e.g. the runtime is missing)."""


class TrainJobUnreachable(TrainJobApiError):
    """No answer from the API server (or no configuration to find one)."""


class TrainJobVanished(TrainJobApiError):
    """The TrainJob was deleted by someone else while the step followed it."""


class TrainJobNotOurs(TrainJobError):
    """A TrainJob with our name exists but belongs to another task (or runs another spec)."""


class TrainJobFailed(TrainJobError):
    """The job's condition Failed=True; `reason` and `message` are the controller's."""

    def __init__(self, message: str, reason: str, detail: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.detail = detail


class TrainJobTimeout(TrainJobError):
    """The job did not finish within the step's budget; it was deleted."""


class TrainJobOutputMissing(TrainJobError):
    """Complete, but rank 0's ``_SUCCESS`` marker is not under the out URI."""


# --------------------------------------------------------------------------------------------- the S3 layout
@dataclass(frozen=True)
class Staging:
    """Where one task's TrainJob reads and writes, all under ``<checkpoint_uri>/<sha256(model_uri)[:16]>/``:
    ``dataset/`` and ``backbone/`` (uploaded by the step before the job starts), ``out/`` (rank 0 writes
    model/, logits/, curve.png, result.json and last _SUCCESS) and ``checkpoint/`` (the workers' checkpoint
    mirror, which a restarted or retried job resumes from). `task_key` (the model URI) names the TrainJob."""

    root: str
    dataset: str
    backbone: str
    out: str
    checkpoint: str
    task_key: str

    @property
    def success_marker(self) -> str:
        return f"{self.out}/{SUCCESS_MARKER}"


def task_hash(task_key: str) -> str:
    return hashlib.sha256(task_key.encode()).hexdigest()[:16]


def trainjob_name(task_key: str) -> str:
    """``vp-train-<16 hex>``: an RFC 1035 label (the CRD's rule on metadata.name) short enough for the JobSet's
    pod and Service names (``<name>-node-0-0.<name>``)."""
    return NAME_PREFIX + task_hash(task_key)


def staging_layout(checkpoint_uri: str, model_uri: str) -> Staging:
    """The S3 staging of the task whose model output URI is `model_uri` (stable across the task's retries)."""
    if not isinstance(checkpoint_uri, str) or not re.match(r"^s3://[^/]+", checkpoint_uri or ""):
        raise TrainJobRequestError(
            f"checkpoint_uri={checkpoint_uri!r}: distributed training (train_workers > 1) needs an s3:// prefix "
            "(checkpoint_uri=s3://<bucket>/<prefix>): the workers run in their own pods and exchange the dataset, "
            "checkpoints and outputs with the step through it"
        )
    if not isinstance(model_uri, str) or not model_uri:
        raise TrainJobRequestError(f"model_uri={model_uri!r}: the step's model output URI is required")
    root = checkpoint_uri.rstrip("/") + "/" + task_hash(model_uri)
    return Staging(
        root=root,
        dataset=f"{root}/dataset",
        backbone=f"{root}/backbone",
        out=f"{root}/out",
        checkpoint=f"{root}/checkpoint",
        task_key=model_uri,
    )


# --------------------------------------------------------------------------------------------- the request
@dataclass(frozen=True)
class TrainJobRequest:
    """One distributed training run. `workers`: trainer.numNodes (the pipeline's train_workers); `procs_per_node`:
    trainer.numProcPerNode (1 on CPU nodes; the GPUs per node otherwise). `resources`: resourcesPerNode
    (``{"requests": {...}, "limits": {...}}``, None: the runtime's). `timeout_s` also becomes the job's
    activeDeadlineSeconds. `image`: the image the step runs (so workers and step run the same code)."""

    namespace: str
    image: str
    recipe: str
    workers: int
    staging: Staging
    recipe_overrides: Mapping[str, object] = field(default_factory=dict)
    with_backbone: bool = False
    procs_per_node: int = 1
    resources: Mapping[str, Mapping[str, str]] | None = None
    timeout_s: float = 6 * 3600.0
    runtime: str = RUNTIME_NAME

    @property
    def name(self) -> str:
        return trainjob_name(self.staging.task_key)


def check_request(spec: TrainJobRequest) -> None:
    if not isinstance(spec.namespace, str) or not NAMESPACE_PATTERN.match(spec.namespace):
        raise TrainJobRequestError(f"namespace={spec.namespace!r} must be an RFC 1123 label (lower case, -, <= 63)")
    if not spec.image or not isinstance(spec.image, str):
        raise TrainJobRequestError(f"image={spec.image!r}: the project image reference is required")
    if isinstance(spec.workers, bool) or not isinstance(spec.workers, int) or not 1 <= spec.workers <= MAX_WORKERS:
        raise TrainJobRequestError(f"train_workers={spec.workers!r} must be an integer from 1 to {MAX_WORKERS}")
    procs = spec.procs_per_node
    if isinstance(procs, bool) or not isinstance(procs, int) or not 1 <= procs <= 16:
        raise TrainJobRequestError(f"procs_per_node={procs!r} must be an integer from 1 to 16 (numProcPerNode)")
    if (
        not isinstance(spec.recipe, str)
        or not RECIPE_NAME_PATTERN.match(spec.recipe)
        or spec.recipe.endswith((".yaml", ".yml"))
    ):
        raise TrainJobRequestError(
            f"recipe={spec.recipe!r}: a TrainJob's workers cannot read files of the step's pod; name a shipped "
            "recipe (recipes/<name>.yaml, e.g. digits-cnn) and change it with recipe_overrides_json"
        )
    if not math.isfinite(spec.timeout_s) or spec.timeout_s <= 0:
        raise TrainJobRequestError(f"timeout_s={spec.timeout_s!r} must be a positive number of seconds")
    for key in spec.resources or {}:
        if key not in ("requests", "limits"):
            raise TrainJobRequestError(f"resources key {key!r}: allowed are 'requests' and 'limits'")


def worker_args(spec: TrainJobRequest) -> list[str]:
    """torchrun's arguments: the worker module and its flags (visionpipe/phases/train_worker.py)."""
    staging = spec.staging
    args = ["--module", WORKER_MODULE, "--dataset", staging.dataset, "--out", staging.out, "--recipe", spec.recipe]
    if spec.recipe_overrides:
        args += ["--recipe-overrides-json", json.dumps(dict(spec.recipe_overrides), sort_keys=True)]
    if spec.with_backbone:
        args += ["--backbone", staging.backbone]
    args += ["--checkpoint-uri", staging.checkpoint]
    return args


def secret_env() -> list[JsonObj]:
    """The S3 settings as env from the Kubernetes Secret (valueFrom.secretKeyRef, optional: false: a missing
    Secret or key stops the pod at CreateContainerConfigError), never values in the object."""
    from visionpipe.serving.storage import S3_SECRET, S3_SECRET_KEYS

    # S3_SECRET_KEYS maps Secret key -> env var the way kfp's use_secret_as_env(secret_key_to_env=...) reads it
    return [
        {"name": env, "valueFrom": {"secretKeyRef": {"name": S3_SECRET, "key": key, "optional": False}}}
        for key, env in S3_SECRET_KEYS.items()
    ]


def build_trainjob(spec: TrainJobRequest) -> JsonObj:
    """The TrainJob object, built with the SDK's typed models (kubeflow_trainer_api, the pydantic models the
    Kubeflow SDK itself sends) and serialised the way the SDK sends it (``to_dict()``: aliases, no nulls)."""
    check_request(spec)
    from kubeflow_trainer_api import models  # untyped (no py.typed): ignore_missing_imports in pyproject.toml

    env = [models.IoK8sApiCoreV1EnvVar.from_dict(e) for e in secret_env()]
    resources = (
        models.IoK8sApiCoreV1ResourceRequirements.from_dict({k: dict(v) for k, v in spec.resources.items()})
        if spec.resources
        else None
    )
    job = models.TrainerV1alpha1TrainJob(
        apiVersion=API_VERSION,
        kind=KIND,
        metadata=models.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
            name=spec.name,
            namespace=spec.namespace,
            labels={**MANAGED_BY, TASK_LABEL: task_hash(spec.staging.task_key)},
            annotations={TASK_ANNOTATION: spec.staging.task_key},
        ),
        spec=models.TrainerV1alpha1TrainJobSpec(
            runtimeRef=models.TrainerV1alpha1RuntimeRef(name=spec.runtime, apiGroup=GROUP, kind=RUNTIME_KIND),
            trainer=models.TrainerV1alpha1Trainer(
                image=spec.image,
                command=["torchrun"],
                args=worker_args(spec),
                env=env,
                numNodes=spec.workers,
                numProcPerNode=spec.procs_per_node,
                resourcesPerNode=resources,
            ),
            activeDeadlineSeconds=max(1, math.ceil(spec.timeout_s)),
        ),
    )
    body = job.to_dict()
    if not isinstance(body, dict):  # the SDK's models are untyped (no py.typed)
        raise TrainJobError(f"kubeflow_trainer_api built {type(body).__name__}, not an object")
    return {str(k): v for k, v in body.items()}


# --------------------------------------------------------------------------------------------- status
@dataclass(frozen=True)
class JobState:
    """What a poll saw: the phase (Pending / Running / Suspended / Complete / Failed / Deleting) and a one-line
    summary of conditions and child jobs (logged when it changes)."""

    phase: str
    reason: str
    message: str
    summary: str


def conditions(job: Mapping[str, object]) -> dict[str, JsonObj]:
    return {
        str(c.get("type")): c for c in map(_dict, _list(_dict(job.get("status")).get("conditions"))) if c.get("type")
    }


def job_state(job: Mapping[str, object]) -> JobState:
    found = conditions(job)
    parts = []
    for kind in sorted(found):
        reason = _str(found[kind].get("reason"))
        parts.append(f"{kind}={found[kind].get('status')}" + (f"({reason})" if reason else ""))
    for child in map(_dict, _list(_dict(job.get("status")).get("jobsStatus"))):
        counts = " ".join(f"{k}={child.get(k, 0)}" for k in ("active", "ready", "succeeded", "failed", "suspended"))
        parts.append(f"{child.get('name')}[{counts}]")
    progress = _dict(_dict(job.get("status")).get("trainerStatus")).get("progressPercentage")
    if isinstance(progress, int):
        parts.append(f"progress={progress}%")
    summary = " ".join(parts) or "no status yet"

    def true(kind: str) -> JsonObj | None:
        cond = found.get(kind)
        return cond if cond is not None and cond.get("status") == "True" else None

    if _dict(job.get("metadata")).get("deletionTimestamp"):
        return JobState("Deleting", "", "", summary + " (being deleted)")
    for kind in (FAILED, COMPLETE):  # Failed first: a DeadlineExceeded failure is kept over a late Complete
        done = true(kind)
        if done is not None:
            return JobState(kind, _str(done.get("reason")) or "", _str(done.get("message")) or "", summary)
    if true(SUSPENDED) is not None:
        return JobState(SUSPENDED, "", "", summary)
    running = any(
        _dict(c).get("active") or _dict(c).get("ready") for c in _list(_dict(job.get("status")).get("jobsStatus"))
    )
    return JobState("Running" if running else "Pending", "", "", summary)


# --------------------------------------------------------------------------------------------- the API
class TrainJobApi(Protocol):
    """Create, get and delete namespaced TrainJobs (trainer.kubeflow.org/v1alpha1)."""

    def create(self, namespace: str, body: Mapping[str, object]) -> JsonObj: ...

    def get(self, namespace: str, name: str) -> JsonObj: ...

    def delete(self, namespace: str, name: str) -> None: ...


class KubeTrainJobApi(k8s_api.CustomObjectsClient):
    """`TrainJobApi` over the kubernetes python client's CustomObjectsApi (create / get / delete on the
    trainjobs path; a delete is ``propagationPolicy: Foreground``)."""

    @classmethod
    def connect(cls, connection: Connection | None = None) -> KubeTrainJobApi:
        """Like kubectl (kubeconfig / context / in-cluster service account / host + token), through the
        connection code of visionpipe/rollout/canary.py (`Connection`, `connect_client`); in a pod the service
        account comes first."""
        try:
            connected = connect_client(connection or Connection(prefer_in_cluster=True))
        except Unreachable as exc:
            raise TrainJobUnreachable(str(exc)) from exc
        except RolloutError as exc:  # a bad kubeconfig / context (canary's CanaryError)
            raise TrainJobRequestError(str(exc)) from exc
        return cls(connected.api_client, connected.timeout_s, connected.namespace)

    def create(self, namespace: str, body: Mapping[str, object]) -> JsonObj:
        name = str(_dict(body.get("metadata")).get("name") or "")
        return self._call(
            "create",
            namespace,
            name,
            lambda: self._api.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, dict(body), _request_timeout=self.timeout_s
            ),
        )

    def get(self, namespace: str, name: str) -> JsonObj:
        return self._call(
            "get",
            namespace,
            name,
            lambda: self._api.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _request_timeout=self.timeout_s
            ),
        )

    def delete(self, namespace: str, name: str) -> None:
        self._call(
            "delete",
            namespace,
            name,
            lambda: self._api.delete_namespaced_custom_object(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                propagation_policy="Foreground",
                _request_timeout=self.timeout_s,
            ),
        )

    def _call(self, verb: str, namespace: str, name: str, call: Callable[[], object]) -> JsonObj:
        result = k8s_api.call(
            call,
            self._api.api_client.configuration.host,
            lambda status, reason, body: api_error(verb, namespace, name, status, reason, body),
            TrainJobUnreachable,
        )
        return _dict(result)


def api_error(verb: str, namespace: str, name: str, status: int, reason: str, body: object) -> TrainJobApiError:
    """The named error for an API answer (`body`: the metav1.Status the server sends, JSON;
    visionpipe/k8s_api.py `parse_answer`)."""
    answer = k8s_api.parse_answer(status, reason, body)
    message, details, causes = answer.message, answer.details, answer.causes
    what = f"TrainJob {name!r} in namespace {namespace!r}" if name else f"TrainJobs in namespace {namespace!r}"
    if status == 404 and verb == "create":
        if details.get("kind") == "namespaces":
            return TrainerNotInstalled(f"namespace {namespace!r} does not exist (server: {message})", status)
        return TrainerNotInstalled(
            f"the API server does not serve {RESOURCE} ({API_VERSION}) (server: {message}): Kubeflow Trainer v2 is "
            "not installed on this cluster. Install it (its CRDs, controller and webhook, with JobSet), then the "
            f"project's runtime: kubectl apply -k {TRAINER_MANIFESTS}; or run with train_workers=1",
            status,
        )
    if status == 404:
        return TrainJobVanished(f"{what} does not exist (server: {message})", status)
    if answer.webhook_denied:  # the Trainer's validating webhook (k8s_api.ErrorAnswer.webhook_denied)
        hint = ""
        if "must be created before" in message or "unsupported runtime" in message:
            hint = f". The runtime {RUNTIME_NAME!r} is missing: kubectl apply -k {TRAINER_MANIFESTS}"
        return TrainJobInvalid(f"the Trainer's webhook refused the {verb} of {what}: {message}{hint}", status, causes)
    if status in (401, 403):
        return TrainJobForbidden(
            f"forbidden to {verb} {what}: {message}. The step's ServiceAccount needs the Role {RBAC_ROLE!r} "
            f"({RBAC_MANIFESTS}/role.yaml: verbs {', '.join(TRAINJOB_VERBS)} on {RESOURCE}) in that namespace: "
            f"kubectl apply -n {namespace} -k {RBAC_MANIFESTS} (edit the subject in role-binding.yaml)",
            status,
        )
    if status == 422:
        return TrainJobInvalid(
            f"the API server refused the {verb} of {what} as invalid: {answer.detail}", status, causes
        )
    return TrainJobApiError(f"{verb} {what}: HTTP {status} {message}", status, causes)


def _transient(exc: TrainJobApiError) -> bool:
    return isinstance(exc, TrainJobUnreachable) or exc.status >= 500 or exc.status == 429


# --------------------------------------------------------------------------------------------- the launcher
@dataclass(frozen=True)
class TrainJobOutcome:
    """A Complete TrainJob whose outputs are in place: `attached` (a retry found it running or done),
    `replaced` (a retry found it Failed and started it again), the polls and seconds spent, the final status."""

    name: str
    namespace: str
    out_uri: str
    attached: bool
    replaced: bool
    polls: int
    seconds: float
    status: JsonObj


def _ours(existing: Mapping[str, object], wanted: Mapping[str, object]) -> str | None:
    """Why `existing` is not the job `wanted` describes (None: it is ours)."""
    key = _dict(_dict(existing.get("metadata")).get("annotations")).get(TASK_ANNOTATION)
    ours = _dict(_dict(wanted.get("metadata")).get("annotations")).get(TASK_ANNOTATION)
    if key != ours:
        return f"its annotation {TASK_ANNOTATION} is {key!r}, this task's is {ours!r}"
    for part in ("trainer", "runtimeRef"):
        have, want = _dict(_dict(existing.get("spec")).get(part)), _dict(_dict(wanted.get("spec")).get(part))
        if any(have.get(k) != v for k, v in want.items()):
            return f"its spec.{part} differs from this step's ({json.dumps(have, sort_keys=True)[:300]})"
    return None


def run_trainjob(
    api: TrainJobApi,
    spec: TrainJobRequest,
    log: Log = print,
    poll_s: float = 10.0,
    timeout_s: float | None = None,
    *,
    output_exists: Callable[[str], bool] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> TrainJobOutcome:
    """Create (or re-attach to) this task's TrainJob, follow it until Complete, check ``<out>/_SUCCESS``.
    `timeout_s` (default: spec.timeout_s) bounds the whole wait; `output_exists` (default
    visionpipe.serving.storage.exists) checks the marker."""
    budget = spec.timeout_s if timeout_s is None else timeout_s
    if not math.isfinite(budget) or budget <= 0:
        raise TrainJobRequestError(f"timeout_s={timeout_s!r} must be a positive number of seconds")
    if not math.isfinite(poll_s) or poll_s <= 0:
        raise TrainJobRequestError(f"poll_s={poll_s!r} must be a positive number of seconds")
    body = build_trainjob(spec)
    namespace, name = spec.namespace, spec.name
    start = clock()
    deadline = start + budget
    attached = replaced = False
    watch = _Watch(api, namespace, name, log, poll_s, sleep, clock)
    where = watch.where
    try:
        api.create(namespace, body)
        log(
            f"{where}: created ({spec.workers} x {spec.procs_per_node} workers, runtime {spec.runtime}, "
            f"image {spec.image})"
        )
    except TrainJobApiError as exc:
        if exc.status != 409:
            raise
        existing = api.get(namespace, name)
        why = _ours(existing, body)
        if why is not None:
            raise TrainJobNotOurs(
                f"{where} already exists and is not this step's: {why}. Delete it (kubectl delete trainjob -n "
                f"{namespace} {name}) if it is stale, or use another checkpoint_uri / run"
            ) from exc
        state = job_state(existing)
        if state.phase in (FAILED, "Deleting"):
            if state.phase == FAILED:
                log(
                    f"{where}: found from an earlier attempt, Failed ({state.reason}: {state.message}); deleting it "
                    "and starting again (the workers resume from the checkpoint)"
                )
                api.delete(namespace, name)
            watch.wait_gone(min(deadline, clock() + DELETE_WAIT_S))
            api.create(namespace, body)
            replaced = True
            log(f"{where}: created again")
        else:
            attached = True
            log(f"{where}: re-attached (an earlier attempt of this step created it; now {state.phase})")
    final, polls = watch.follow(deadline)
    exists = output_exists
    if exists is None:
        from visionpipe.serving.storage import exists as storage_exists

        exists = storage_exists
    marker = spec.staging.success_marker
    if not exists(marker):
        raise TrainJobOutputMissing(
            f"{where} is Complete but {marker} is missing: rank 0 of {WORKER_MODULE} writes it last, after model/, "
            f"logits/, curve.png and result.json under {spec.staging.out}; see the logs of its pods "
            f"(kubectl logs -n {namespace} -l jobset.sigs.k8s.io/jobset-name={name})"
        )
    log(f"{where}: Complete, outputs under {spec.staging.out}")
    return TrainJobOutcome(name, namespace, spec.staging.out, attached, replaced, polls, clock() - start, final)


@dataclass(frozen=True)
class _Watch:
    """How `run_trainjob` polls its TrainJob: the API, the job, the log, the interval and the clock. `poll` is
    the one polling loop (deadline, sleep, get, judge); `follow` and `wait_gone` only judge."""

    api: TrainJobApi
    namespace: str
    name: str
    log: Log
    poll_s: float
    sleep: Callable[[float], None]
    clock: Callable[[], float]

    @property
    def where(self) -> str:
        return f"TrainJob {self.namespace}/{self.name}"

    def poll(
        self, attempt: Callable[[], R | None], deadline: float, before_sleep: Callable[[], None] | None = None
    ) -> tuple[R | None, int]:
        """Call `attempt` until it returns a value, at least once, and again after sleeping ``min(poll_s, time
        left)`` (after `before_sleep`) while `deadline` (on `clock`) has not passed. Returns (that value, or None
        when the deadline passed first; the number of calls); what `attempt` raises goes up."""
        calls = 0
        while True:
            calls += 1
            result = attempt()
            if result is not None:
                return result, calls
            remaining = deadline - self.clock()
            if remaining <= 0:
                return None, calls
            if before_sleep is not None:
                before_sleep()
            self.sleep(min(self.poll_s, remaining))

    def follow(self, deadline: float) -> tuple[JsonObj, int]:
        """Poll the job until Complete (returned, with the polls); raise TrainJobFailed on Failed, TrainJobVanished
        when it is gone or being deleted, TrainJobTimeout (after deleting it) at the deadline."""
        where, namespace, name = self.where, self.namespace, self.name
        last = ""
        errors = 0

        def judge() -> JsonObj | None:
            """One poll: the job when Complete; None while it runs (or after a tolerated transient error)."""
            nonlocal last, errors
            try:
                job = self.api.get(namespace, name)
                errors = 0
            except TrainJobVanished as exc:
                raise TrainJobVanished(
                    f"{where} disappeared while the step was waiting for it (deleted by someone else?): {exc}",
                    exc.status,
                ) from exc
            except TrainJobApiError as exc:
                errors += 1
                if not _transient(exc) or errors >= TRANSIENT_TOLERANCE:
                    raise
                self.log(f"{where}: poll failed ({exc}); retrying")
                return None
            state = job_state(job)
            if state.summary != last:
                self.log(f"{where}: {state.phase}: {state.summary}")
                last = state.summary
            if state.phase == COMPLETE:
                return job
            if state.phase == FAILED:
                raise TrainJobFailed(
                    f"{where} failed: {state.reason}: {state.message} (kubectl describe trainjob -n {namespace} "
                    f"{name}; kubectl logs -n {namespace} -l jobset.sigs.k8s.io/jobset-name={name})",
                    state.reason,
                    state.message,
                )
            if state.phase == "Deleting":
                raise TrainJobVanished(f"{where} is being deleted by someone else; the step stops following it")
            return None

        final, polls = self.poll(judge, deadline)
        if final is not None:
            return final, polls
        try:
            self.api.delete(namespace, name)
            action = "deleted it (its pods go first; a retry starts it again from the last checkpoint)"
        except TrainJobApiError as exc:
            action = f"could not delete it ({exc}); the Trainer stops it at its activeDeadlineSeconds"
        raise TrainJobTimeout(
            f"{where} did not finish within the step's budget ({polls} polls; last status: {last or 'none'}); {action}"
        )

    def wait_gone(self, deadline: float) -> None:
        """Poll until the (deleted) job is gone; TrainJobTimeout if it is still there at the deadline."""

        def gone() -> bool | None:
            try:
                self.api.get(self.namespace, self.name)
            except TrainJobVanished:
                return True
            return None

        def waiting() -> None:
            self.log(f"{self.where}: waiting for the deletion to finish")

        done, _ = self.poll(gone, deadline, before_sleep=waiting)
        if done is None:
            raise TrainJobTimeout(
                f"{self.where} (Failed, deleted) is still being removed; its pods may be stuck terminating "
                f"(kubectl get pods -n {self.namespace} -l jobset.sigs.k8s.io/jobset-name={self.name})"
            )
