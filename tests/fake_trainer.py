"""A fake Kubernetes API server on loopback for Kubeflow Trainer v2 TrainJobs (a test helper, next to
tests/fake_k8s.py, which serves InferenceServices).

A real HTTP server (``ThreadingHTTPServer`` on 127.0.0.1, in a daemon thread) that serves only

    GET    /apis/trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs[/{name}]
    POST   /apis/trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs
    DELETE /apis/trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs/{name}   (?propagationPolicy=...)

Every other path answers 404 and is recorded in `unexpected`. With ``installed=False`` every trainer.kubeflow.org
path answers what an API server without the CRD answers: 404 "the server could not find the requested resource".

A create goes the way of a cluster with the Trainer (kubeflow/trainer at 8c0f5059bd51):
- the CRD's defaults for what we may leave out (pkg/apis/trainer/v1alpha1/trainjob_types.go: runtimeRef.apiGroup
  trainer.kubeflow.org, runtimeRef.kind ClusterTrainingRuntime, suspend false, managedBy
  trainer.kubeflow.org/trainjob-controller);
- the CRD schema, ../shared/platform/kubeflow-trainer/trainer.kubeflow.org_trainjobs.yaml (k8s_schema.validate),
  -> 422 ``Invalid`` with ``details.causes``; the two root CEL rules on metadata.name (RFC 1035 label, <= 63), which
  k8s_schema cannot evaluate because it validates metadata apart, are evaluated here; any other CEL rule left
  unevaluated is a failure of this fake (`unevaluated`), not silently passed;
- the validating webhook ``validator.trainjob.trainer.kubeflow.org`` (manifests/base/webhook/manifests.yaml) ->
  403 "admission webhook ... denied the request": an unsupported runtime kind (pkg/webhooks/trainjob_webhook.go
  ValidateCreate), a ClusterTrainingRuntime that does not exist (pkg/runtime/core/clustertrainingruntime.go
  ValidateObjects), torchrun's reserved PET_* env in spec.trainer.env (plugins/torch/torch.go Validate);
- 409 ``AlreadyExists`` for a name that is taken.

`resolved[name]` is the ``node`` container the controller would run: the runtime's container with the TrainJob's
image / command / args, its env merged by name, and the torch plugin's PET_* env (torch.go EnforceMLPolicy;
PET_MASTER_ADDR <name>-node-0-0.<name>, port 29500, pkg/constants/constants.go).

A scripted "controller" (`plan`, per job) walks each TrainJob through its states, one step per GET of it: each
step sets ``status.jobsStatus`` (the child Jobs of the replicated job ``node``) and possibly a condition with the
JobSet's reason / message, as the jobset plugin copies them (plugins/jobset/jobset.go Status; reasons from
kubernetes-sigs/jobset pkg/constants/constants.go). The stored object, status included, is validated against the
CRD after every step (`status_issues` must stay empty). A DELETE with propagationPolicy Foreground keeps the
object with a deletionTimestamp for `foreground_polls` GETs (its JobSet and pods go first), then removes it.

RBAC: `allowed_verbs` (None: everything) is checked per request (get / list / create / delete) with the API
server's 403 Forbidden wording (apiserver endpoints/handlers/responsewriters/errors.go).
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler
from typing import Final
from urllib.parse import parse_qs

from fake_k8s import ApiHandler, FakeApiServer, _dict, _list, _now, failure_status
from k8s_schema import find_crd, validate, validate_custom_resource

GROUP: Final = "trainer.kubeflow.org"
VERSION: Final = "v1alpha1"
PLURAL: Final = "trainjobs"
RESOURCE: Final = f"{PLURAL}.{GROUP}"
WEBHOOK: Final = "validator.trainjob.trainer.kubeflow.org"
PATH: Final = re.compile(rf"^/apis/{re.escape(GROUP)}/{VERSION}/namespaces/([^/]+)/{PLURAL}(?:/([^/]+))?$")
GROUP_PATH: Final = f"/apis/{GROUP}/"
RESERVED_ENV: Final = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
MASTER_PORT: Final = 29500
NAME_RULES: Final = (  # the CRD's root x-kubernetes-validations, on metadata.name
    (re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$"), "metadata.name must match RFC 1035 DNS label format"),
)
NAME_MAX: Final = 63
SUPPORTED_KINDS: Final = ("ClusterTrainingRuntime", "TrainingRuntime")

Json = dict[str, object]


# --------------------------------------------------------------------------------------------- the controller
@dataclass(frozen=True)
class Step:
    """One controller pass: the counts of child Jobs of replicated job `node`, and optionally a condition
    (type, reason, message) set to True. `on_enter(job)` runs once when the step is applied (for a step with a
    condition: when that condition is first set), under the fake's lock (e.g. write rank 0's outputs, or start
    and await the workers)."""

    active: int = 0
    ready: int = 0
    succeeded: int = 0
    failed: int = 0
    suspended: int = 0
    condition: tuple[str, str, str] | None = None
    on_enter: Callable[[Json], None] | None = None


# kubernetes-sigs/jobset pkg/constants/constants.go
COMPLETED: Final = ("Complete", "AllJobsCompleted", "jobset completed successfully")
MAX_RESTARTS: Final = ("Failed", "ReachedMaxRestarts", "jobset failed due to reaching max number of restarts")


def completes(on_done: Callable[[Json], None] | None = None) -> list[Step]:
    """Pending -> running -> ready -> Complete (the workers' outputs written on the way in)."""
    return [Step(), Step(active=1), Step(active=1, ready=1), Step(succeeded=1, condition=COMPLETED, on_enter=on_done)]


def fails(condition: tuple[str, str, str] = MAX_RESTARTS) -> list[Step]:
    return [Step(active=1), Step(active=1, ready=1), Step(failed=1, condition=condition)]


def stuck() -> list[Step]:
    """Never scheduled (e.g. no node has the requested GPUs)."""
    return [Step()]


@dataclass
class FakeTrainer(FakeApiServer):
    """The fake API server; `url` once started (use `running()`)."""

    installed: bool = True
    plan: Callable[[Json], list[Step]] = field(default=lambda job: completes())
    foreground_polls: int = 1
    fail_next_gets: int = 0  # answer that many GETs of a TrainJob with 500 (a transient API server error)
    resolved: dict[str, Json] = field(default_factory=dict)
    deletes: list[tuple[str, str | None]] = field(default_factory=list)  # (name, propagationPolicy)
    unevaluated: list[str] = field(default_factory=list)
    _steps: dict[tuple[str, str], list[Step]] = field(default_factory=dict)
    _deleting: dict[tuple[str, str], int] = field(default_factory=dict)

    # ---------------------------------------------------------------------------------------- lifecycle
    def handler(self) -> type[BaseHTTPRequestHandler]:
        return _Handler

    def reset(self) -> None:
        with self._lock:
            self.objects.clear()
            self.resolved.clear()
            self._steps.clear()
            self._deleting.clear()
            for log in (self.requests, self.deletes, self.unexpected, self.refusals, self.status_issues):
                log.clear()
            self.unevaluated.clear()
            self.installed, self.allowed_verbs, self.fail_next_gets, self.foreground_polls = True, None, 0, 1
            self.plan = lambda job: completes()

    # ---------------------------------------------------------------------------------------- operations
    def create(self, namespace: str, body: Json) -> tuple[int, Json]:
        with self._lock:
            meta = _dict(body.get("metadata"))
            name = meta.get("name")
            if not isinstance(name, str):
                return self._refuse(422, _status(422, "Invalid", "metadata.name: Required value", name=""))
            if (namespace, name) in self.objects:
                return self._refuse(
                    409, _status(409, "AlreadyExists", f'{RESOURCE} "{name}" already exists', name=name)
                )
            job = copy.deepcopy(body)
            job.pop("status", None)
            job_meta = _dict(job.setdefault("metadata", {}))
            job_meta["namespace"] = namespace
            _default(job)
            causes = self._schema_causes(job)
            if causes:
                summary = ", ".join(f"{c['field']}: {c['message']}" for c in causes)
                message = f'TrainJob.{GROUP} "{name}" is invalid: [{summary}]'
                return self._refuse(422, _status(422, "Invalid", message, name=name, kind="TrainJob", causes=causes))
            denied = self._webhook(job)
            if denied:
                message = f'admission webhook "{WEBHOOK}" denied the request: {denied}'
                return self._refuse(403, _status(403, "Forbidden", message, name=name))
            self._version += 1
            job_meta.update(
                {
                    "uid": str(uuid.uuid4()),
                    "creationTimestamp": _now(),
                    "generation": 1,
                    "resourceVersion": str(self._version),
                }
            )
            self.objects[(namespace, name)] = job
            self._steps[(namespace, name)] = list(self.plan(job))
            return 201, copy.deepcopy(job)

    def get(self, namespace: str, name: str) -> tuple[int, Json]:
        with self._lock:
            key = (namespace, name)
            if key in self._deleting:
                self._deleting[key] -= 1
                if self._deleting[key] < 0:
                    del self._deleting[key]
                    self.objects.pop(key, None)
                    self.resolved.pop(name, None)
            job = self.objects.get(key)
            if job is None:
                return self._refuse(404, _not_found(name))
            if key not in self._deleting:
                self._advance(key, job)
            return 200, copy.deepcopy(job)

    def delete(self, namespace: str, name: str, policy: str | None) -> tuple[int, Json]:
        with self._lock:
            key = (namespace, name)
            job = self.objects.get(key)
            if job is None:
                return self._refuse(404, _not_found(name))
            self.deletes.append((name, policy))
            if policy == "Foreground":  # the garbage collector removes the dependents (JobSet, pods) first
                meta = _dict(job.get("metadata"))
                meta["deletionTimestamp"] = _now()
                meta["finalizers"] = ["foregroundDeletion"]
                self._deleting[key] = self.foreground_polls
            else:
                self.objects.pop(key)
                self.resolved.pop(name, None)
            return 200, copy.deepcopy(job)

    def seed(self, body: Mapping[str, object], namespace: str, steps: list[Step] | None = None) -> Json:
        """Create `body` as an earlier attempt would have (refused objects raise); `steps`: its own plan."""
        code, answer = self.create(namespace, copy.deepcopy(dict(body)))
        assert code == 201, answer
        if steps is not None:
            with self._lock:
                self._steps[(namespace, str(_dict(answer.get("metadata")).get("name")))] = list(steps)
        return answer

    def walk(self, namespace: str, name: str, polls: int) -> Json:
        """`polls` controller passes on a stored job, without HTTP (what happened while nobody watched)."""
        answer: Json = {}
        for _ in range(polls):
            code, answer = self.get(namespace, name)
            assert code == 200, answer
        return answer

    # ---------------------------------------------------------------------------------------- internals
    def _schema_causes(self, job: Json) -> list[Json]:
        result = validate(job)
        causes: list[Json] = [
            {"reason": "FieldValueInvalid", "message": f"Invalid value: {i.message}", "field": i.path or "<root>"}
            for i in result.errors
        ]
        name = str(_dict(job.get("metadata")).get("name"))
        for pattern, message in NAME_RULES:
            if not pattern.match(name):
                causes.append(
                    {"reason": "FieldValueInvalid", "message": f"Invalid value: {message}", "field": "<root>"}
                )
        if len(name) > NAME_MAX:
            message = f"metadata.name must be no more than {NAME_MAX} characters"
            causes.append({"reason": "FieldValueInvalid", "message": f"Invalid value: {message}", "field": "<root>"})
        for issue in result.unevaluated:
            if "self.metadata.name" not in issue.message:  # the two rules evaluated above
                self.unevaluated.append(str(issue))
        return causes

    def _runtime(self, kind: str, name: str) -> Json | None:
        for runtime in self.runtimes:
            meta = _dict(runtime.get("metadata"))
            if runtime.get("kind") == kind and meta.get("name") == name:
                return copy.deepcopy(dict(runtime))
        return None

    def _webhook(self, job: Json) -> str | None:
        spec = _dict(job.get("spec"))
        ref = _dict(spec.get("runtimeRef"))
        kind, group, runtime_name = str(ref.get("kind")), str(ref.get("apiGroup")), str(ref.get("name"))
        if group != GROUP or kind not in SUPPORTED_KINDS:
            return f"unsupported runtime: {kind}.{group}"  # trainjob_webhook.go ValidateCreate
        runtime = self._runtime(kind, runtime_name)
        if runtime is None:  # clustertrainingruntime.go ValidateObjects (the TrainingRuntime one reads likewise)
            plural = kind.lower() + "s"
            return (
                f"spec.RuntimeRef: Invalid value: {json.dumps(ref, sort_keys=True)}: {plural}.{GROUP} "
                f'"{runtime_name}" not found: specified {kind[0].lower() + kind[1:]} must be created before the '
                "TrainJob is created"
            )
        trainer = _dict(spec.get("trainer"))
        reserved = sorted({str(_dict(e).get("name")) for e in _list(trainer.get("env"))} & set(RESERVED_ENV))
        if reserved and "torch" in _dict(_dict(runtime.get("spec")).get("mlPolicy")):
            return (
                f"spec.trainer.env: Invalid value: {json.dumps(trainer.get('env'))}: must not have reserved envs, "
                f"invalid envs configured: [{' '.join(reserved)}]"
            )
        self.resolved[str(_dict(job.get("metadata")).get("name"))] = _resolve(job, runtime)
        return None

    def _advance(self, key: tuple[str, str], job: Json) -> None:
        steps = self._steps.get(key) or [Step()]
        popped = len(steps) > 1  # the last step stays and repeats
        step = steps.pop(0) if popped else steps[0]
        self._steps[key] = steps
        now = _now()
        status = _dict(job.get("status"))
        status["jobsStatus"] = [
            {
                "name": "node",
                "active": step.active,
                "ready": step.ready,
                "succeeded": step.succeeded,
                "failed": step.failed,
                "suspended": step.suspended,
            }
        ]
        if step.condition is not None:
            kind, reason, message = step.condition
            conditions = [_dict(c) for c in _list(status.get("conditions"))]
            if not any(c.get("type") == kind and c.get("status") == "True" for c in conditions):
                conditions = [c for c in conditions if c.get("type") != kind]
                conditions.append(
                    {"type": kind, "status": "True", "reason": reason, "message": message, "lastTransitionTime": now}
                )
                if step.on_enter is not None:
                    step.on_enter(copy.deepcopy(job))
            status["conditions"] = conditions
        elif popped and step.on_enter is not None:  # a step without a condition: once, when it is applied
            step.on_enter(copy.deepcopy(job))
        job["status"] = status
        crd = find_crd(f"{GROUP}/{VERSION}", "TrainJob")
        assert crd is not None
        full = validate_custom_resource(job, replace(crd, has_status_subresource=False))
        self.status_issues += [str(issue) for issue in full.errors]


def _default(job: Json) -> None:
    """The CRD's defaults (trainjob_types.go +kubebuilder:default markers)."""
    spec = _dict(job.setdefault("spec", {}))
    ref = spec.get("runtimeRef")
    if isinstance(ref, dict):
        ref.setdefault("apiGroup", GROUP)
        ref.setdefault("kind", "ClusterTrainingRuntime")
    spec.setdefault("suspend", False)
    spec.setdefault("managedBy", "trainer.kubeflow.org/trainjob-controller")


def _resolve(job: Json, runtime: Json) -> Json:
    """The `node` container of the JobSet the controller would create (torch.go EnforceMLPolicy)."""
    name = str(_dict(job.get("metadata")).get("name"))
    trainer = _dict(_dict(job.get("spec")).get("trainer"))
    policy = _dict(_dict(runtime.get("spec")).get("mlPolicy"))
    replicated = _list(_dict(_dict(_dict(runtime.get("spec")).get("template")).get("spec")).get("replicatedJobs"))
    node = next(
        (_dict(r) for r in replicated if _dict(r).get("name") == "node"),
        {},
    )
    pod = _dict(_dict(_dict(_dict(node.get("template")).get("spec")).get("template")).get("spec"))
    container = next(
        (copy.deepcopy(_dict(c)) for c in _list(pod.get("containers")) if _dict(c).get("name") == "node"), {}
    )
    for key in ("image", "command", "args"):
        if key in trainer:
            container[key] = copy.deepcopy(trainer[key])
    env = {str(_dict(e).get("name")): _dict(e) for e in _list(container.get("env"))}
    for item in _list(trainer.get("env")):
        env[str(_dict(item).get("name"))] = copy.deepcopy(_dict(item))
    nodes = trainer.get("numNodes", policy.get("numNodes", 1))
    procs = trainer.get("numProcPerNode", "auto")
    pet: dict[str, Json] = {
        "PET_NNODES": {"name": "PET_NNODES", "value": str(nodes)},
        "PET_NPROC_PER_NODE": {"name": "PET_NPROC_PER_NODE", "value": str(procs)},
        "PET_NODE_RANK": {
            "name": "PET_NODE_RANK",
            "valueFrom": {
                "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
            },
        },
        "PET_MASTER_ADDR": {"name": "PET_MASTER_ADDR", "value": f"{name}-node-0-0.{name}"},
        "PET_MASTER_PORT": {"name": "PET_MASTER_PORT", "value": str(MASTER_PORT)},
    }
    env.update(pet)
    container["env"] = list(env.values())
    return {"replicas": nodes, "container": container, "securityContext": pod.get("securityContext")}


class _Handler(ApiHandler):
    kube: FakeTrainer
    path_pattern = PATH

    def _answer(
        self, method: str, path: str, query: str, known: bool, namespace: str, name: str | None, verb: str, raw: bytes
    ) -> tuple[int, Json]:
        kube = self.kube
        if self.headers.get("Authorization") != f"Bearer {kube.token}":
            return kube._refuse(401, _status(401, "Unauthorized", "Unauthorized"))
        if not kube.installed and path.startswith(GROUP_PATH):
            # no CRD: the group is not served at all (apiserver NotFound for an unknown resource path)
            return kube._refuse(
                404, failure_status(404, "NotFound", "the server could not find the requested resource")
            )
        allowed = (method == "GET" and known) or (method == "POST" and known and name is None)
        allowed = allowed or (method == "DELETE" and known and name is not None)
        if not allowed:
            kube.unexpected.append(f"{method} {path}")
            return 404, failure_status(
                404, "NotFound", f"the server could not find the requested resource ({method} {path})"
            )
        if kube.allowed_verbs is not None and verb not in kube.allowed_verbs:
            target = f'{RESOURCE} "{name}"' if name else RESOURCE
            message = (
                f'{target} is forbidden: User "{kube.user}" cannot {verb} resource "{PLURAL}" in API group '
                f'"{GROUP}" in the namespace "{namespace}"'
            )
            return kube._refuse(403, _status(403, "Forbidden", message, name=name or ""))
        if method == "GET" and name is None:
            with kube._lock:
                items = [copy.deepcopy(o) for (ns, _), o in sorted(kube.objects.items()) if ns == namespace]
            return 200, {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainJobList", "items": items, "metadata": {}}
        if method == "GET":
            assert name is not None
            with kube._lock:
                if kube.fail_next_gets > 0:
                    kube.fail_next_gets -= 1
                    return kube._refuse(500, failure_status(500, "InternalError", "etcdserver: request timed out"))
            return kube.get(namespace, name)
        if method == "DELETE":
            assert name is not None
            policies = parse_qs(query).get("propagationPolicy") or []
            policy: str | None = policies[0] if policies else None
            if raw:  # the client may send DeleteOptions in the body instead
                try:
                    options = _dict(json.loads(raw))
                except ValueError:
                    options = {}
                policy = str(options.get("propagationPolicy") or "") or policy
            return kube.delete(namespace, name, policy)
        try:
            body = json.loads(raw or b"null")
        except ValueError as exc:
            return kube._refuse(400, _status(400, "BadRequest", f"the body is not JSON: {exc}"))
        if not isinstance(body, dict):
            return kube._refuse(400, _status(400, "BadRequest", "the body must be a JSON object"))
        return kube.create(namespace, body)


def _status(
    code: int, reason: str, message: str, *, name: str = "", kind: str = PLURAL, causes: Sequence[Json] = ()
) -> Json:
    """A metav1.Status failure as the API server sends it."""
    details: Json = {"name": name, "group": GROUP, "kind": kind}
    if causes:
        details["causes"] = list(causes)
    return {**failure_status(code, reason, message), "details": details}


def _not_found(name: str) -> Json:
    return _status(404, "NotFound", f'{RESOURCE} "{name}" not found', name=name)
