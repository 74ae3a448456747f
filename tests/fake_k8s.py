"""A fake Kubernetes API server on loopback for InferenceServices (a test helper).

A real HTTP server (``ThreadingHTTPServer`` on 127.0.0.1, in a daemon thread) that serves only

    GET    /apis/serving.kserve.io/v1beta1/namespaces/{ns}/inferenceservices[/{name}]
    POST   /apis/serving.kserve.io/v1beta1/namespaces/{ns}/inferenceservices
    PUT    /apis/serving.kserve.io/v1beta1/namespaces/{ns}/inferenceservices/{name}
    PATCH  /apis/serving.kserve.io/v1beta1/namespaces/{ns}/inferenceservices/{name}   (application/merge-patch+json)

Every other path answers 404 and is recorded in `unexpected` (a test asserts the client calls nothing else).
Every write goes the way of a cluster with KServe (tests/kserve_rules.py, which cites the upstream files):
RFC 7386 merge (k8s_schema.merge_patch) of the stored object; `status` and the server-owned metadata come from the
stored object (the CRD has a status subresource: the main resource ignores them); the mutating webhook's
defaults; the CRD schema (k8s_schema.validate) -> 422 ``Invalid`` with ``details.causes`` as the API server sends
(k8s.io/apiextensions-apiserver validator + apimachinery errors.NewInvalid); KServe's validating webhook -> 403
"admission webhook ... denied the request" (controller-runtime webhook/admission/validator_custom.go answers a
validator error with Denied = 403; k8s.io/apiserver pkg/admission/plugin/webhook/errors/statuserror.go words it).
Other patch types get 415, as the API server answers an unsupported Content-Type. A ``metadata.resourceVersion``
in a patch / PUT that is not the stored one gets 409 Conflict. A write that changes nothing keeps the
resourceVersion (the API server does not bump it for a no-op); every other write increments it.

RBAC: `allowed_verbs` (None: everything) is checked per request (get / list / create / update / patch) and
refused with the API server's 403 Forbidden wording (apiserver endpoints/handlers/responsewriters/errors.go).

A tiny "controller" fills `status` after each write (deploymentMode; Knative: revisions and the traffic split of
kserve reconcilers/knative/ksvc_reconciler.go + the rolled-out bookkeeping of inference_service_status.go;
Standard: canaryStatuses and the HTTPRoute weights of reconcilers/ingress/httproute_reconciler.go), everything
ready at once. What the real controller would refuse later (kserve_rules.controller_checks / project_checks) is
recorded in `controller_issues` and shown as Ready=False. The stored object, status included, is validated
against the CRD after each controller pass (`status_issues` must stay empty).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Final, Protocol, Self

from k8s_schema import find_crd, merge_patch, validate, validate_custom_resource
from kserve_rules import (
    controller_checks,
    default_isvc,
    live_mode,
    project_checks,
    validate_isvc,
    validate_isvc_update,
)

GROUP: Final = "serving.kserve.io"
VERSION: Final = "v1beta1"
PLURAL: Final = "inferenceservices"
RESOURCE: Final = f"{PLURAL}.{GROUP}"
WEBHOOK: Final = "inferenceservice.kserve-webhook-server.validator"  # inference_service_validation.go marker
PATH: Final = re.compile(rf"^/apis/{re.escape(GROUP)}/{VERSION}/namespaces/([^/]+)/{PLURAL}(?:/([^/]+))?$")
MERGE_PATCH: Final = "application/merge-patch+json"
MAX_BODY: Final = 1 << 20
SERVER_METADATA: Final = ("uid", "resourceVersion", "generation", "creationTimestamp", "namespace", "name")

Json = dict[str, object]


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    content_type: str | None
    verb: str
    code: int


@dataclass
class _Revisions:
    """Knative bookkeeping of one InferenceService's predictor."""

    count: int = 0
    template: str = ""
    latest: str = ""
    rolled_out: str = ""
    previous: str = ""


# ------------------------------------------------------------------------------------ the loopback server
def server_url(server: ThreadingHTTPServer | None) -> str:
    assert server is not None, "not started"
    host, port = server.server_address[:2]
    return f"http://{host!s}:{port}"


@contextmanager
def serve_on_loopback(fake: object, handler: type[BaseHTTPRequestHandler]) -> Iterator[ThreadingHTTPServer]:
    """A ThreadingHTTPServer on 127.0.0.1 (a free port) in a daemon thread, whose handler (a subclass of `handler`)
    reaches `fake` as `self.kube`; shut down and joined on exit. Shared by the fake API servers."""

    class Handler(handler):  # type: ignore[valid-type,misc]  # a subclass per fake, bound to it
        kube = fake

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@dataclass
class FakeApiServer:
    """What the fake API servers share (this one and tests/fake_trainer.py's): the runtimes, the RBAC verbs
    allowed (None: all), the bearer token and user; the stored objects and the logs the tests read (requests,
    unexpected paths, refusals, CRD issues of the written status); the lock, the resourceVersion counter and the
    loopback server `running()` starts, answering through `handler()`."""

    runtimes: Sequence[Mapping[str, object]] = ()
    allowed_verbs: set[str] | None = None
    token: str = "fake-token"
    user: str = "system:serviceaccount:kubeflow-user:default-editor"
    objects: dict[tuple[str, str], Json] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    refusals: list[tuple[int, str]] = field(default_factory=list)
    status_issues: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _version: int = 100
    _server: ThreadingHTTPServer | None = None

    def handler(self) -> type[BaseHTTPRequestHandler]:
        """The request handler class of this fake (an `ApiHandler` subclass)."""
        raise NotImplementedError

    @property
    def url(self) -> str:
        return server_url(self._server)

    @contextmanager
    def running(self) -> Iterator[Self]:
        with serve_on_loopback(self, self.handler()) as server:
            self._server = server
            try:
                yield self
            finally:
                self._server = None

    def _refuse(self, code: int, status: Json) -> tuple[int, Json]:
        self.refusals.append((code, str(status.get("message"))))
        return code, status


def failure_status(code: int, reason: str, message: str) -> Json:
    """A metav1.Status failure as the API server sends it, without details."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


@dataclass
class FakeKube(FakeApiServer):
    """The fake API server; `url` once started (use `running()`)."""

    controller_issues: list[str] = field(default_factory=list)
    history: list[Json] = field(default_factory=list)  # every stored version
    _revisions: dict[tuple[str, str], _Revisions] = field(default_factory=dict)

    # ---------------------------------------------------------------------------------------- lifecycle
    def handler(self) -> type[BaseHTTPRequestHandler]:
        return _Handler

    def kubeconfig(self, namespace: str, context: str = "fake") -> Json:
        """A kubeconfig (as a dict, dump it to YAML) pointing at this server, with `namespace` as its default."""
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": self.token}}],
            "contexts": [{"name": context, "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}],
            "current-context": context,
        }

    # ---------------------------------------------------------------------------------------- state
    def reset(self) -> None:
        with self._lock:
            self.objects.clear()
            self._revisions.clear()
            for log in (self.requests, self.unexpected, self.refusals, self.controller_issues, self.status_issues):
                log.clear()
            self.history.clear()

    def seed(self, obj: Mapping[str, object], namespace: str) -> Json:
        """Create `obj` in `namespace` the way POST does (refused objects raise)."""
        body = copy.deepcopy(dict(obj))
        meta = body.setdefault("metadata", {})
        assert isinstance(meta, dict)
        meta["namespace"] = namespace
        code, answer = self.create(namespace, body)
        assert code == 201, answer
        return answer

    def get(self, namespace: str, name: str) -> Json:
        return copy.deepcopy(self.objects[(namespace, name)])

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
            new = copy.deepcopy(body)
            new.pop("status", None)
            new_meta = _dict(new.setdefault("metadata", {}))
            new_meta["namespace"] = namespace
            return self._store(namespace, name, new, None, code=201)

    def write(self, namespace: str, name: str, body: Json, *, patch: bool) -> tuple[int, Json]:
        with self._lock:
            old = self.objects.get((namespace, name))
            if old is None:
                return self._refuse(404, _not_found(name))
            wanted = _str(_dict(body.get("metadata")).get("resourceVersion"))
            current = _str(_dict(old.get("metadata")).get("resourceVersion"))
            if wanted is not None and wanted != current:
                message = (
                    f'Operation cannot be fulfilled on {RESOURCE} "{name}": the object has been modified; please '
                    "apply your changes to the latest version and try again"
                )
                return self._refuse(409, _status(409, "Conflict", message, name=name))
            base = {k: v for k, v in old.items() if k != "status"}
            new = merge_patch(base, body) if patch else copy.deepcopy(body)
            assert isinstance(new, dict)
            new.pop("status", None)  # the status subresource: ignored on the main resource
            new_meta = _dict(new.setdefault("metadata", {}))
            old_meta = _dict(old.get("metadata"))
            for key in SERVER_METADATA:
                if key in old_meta:
                    new_meta[key] = old_meta[key]
            return self._store(namespace, name, new, old)

    # ---------------------------------------------------------------------------------------- internals
    def _store(self, namespace: str, name: str, new: Json, old: Json | None, code: int = 200) -> tuple[int, Json]:
        defaulted = default_isvc(new)
        schema = validate(defaulted, _strip_status(old) if old is not None else None)
        if schema.errors:
            causes: list[Json] = [
                {"reason": "FieldValueInvalid", "message": f"Invalid value: {issue.message}", "field": issue.path}
                for issue in schema.errors
            ]
            summary = ", ".join(f"{c['field']}: {c['message']}" for c in causes)
            message = f'InferenceService.{GROUP} "{name}" is invalid: [{summary}]'
            return self._refuse(
                422, _status(422, "Invalid", message, name=name, kind="InferenceService", causes=causes)
            )
        webhook = validate_isvc(defaulted) if old is None else validate_isvc_update(old, defaulted)
        if webhook:
            # the webhook stops at its first error (upstream returns on the first failure)
            denied = f'admission webhook "{WEBHOOK}" denied the request: {webhook[0].message}'
            message = f'{RESOURCE} "{name}" is forbidden: {denied}'
            return self._refuse(403, _status(403, message, message, name=name))
        if old is not None and _strip_status(old) == defaulted:
            return 200, copy.deepcopy(old)  # a no-op write: nothing changes, not even the resourceVersion
        meta = _dict(defaulted.setdefault("metadata", {}))
        self._version += 1
        meta["resourceVersion"] = str(self._version)
        if old is None:
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _now()
            meta["generation"] = 1
        elif defaulted.get("spec") != old.get("spec"):
            generation = _dict(old.get("metadata")).get("generation")
            meta["generation"] = (generation if isinstance(generation, int) else 1) + 1
        defaulted["status"] = self._reconcile(namespace, name, defaulted, _dict(old.get("status")) if old else {})
        crd = find_crd(f"{GROUP}/{VERSION}", "InferenceService")
        assert crd is not None
        full = validate_custom_resource(defaulted, replace(crd, has_status_subresource=False))
        self.status_issues += [str(issue) for issue in full.errors]
        self.objects[(namespace, name)] = defaulted
        self.history.append(copy.deepcopy(defaulted))
        return code, copy.deepcopy(defaulted)

    def _reconcile(self, namespace: str, name: str, isvc: Json, old_status: Json) -> Json:
        mode = live_mode({**isvc, "status": old_status})
        issues = controller_checks(isvc, [r for r in self.runtimes if isinstance(r, dict)]) + project_checks(isvc)
        self.controller_issues += [f"{namespace}/{name}: {issue}" for issue in issues]
        now = _now()
        ready = "False" if issues else "True"
        conditions: list[Json] = [
            {"type": "PredictorReady", "status": ready, "lastTransitionTime": now},
            {"type": "Ready", "status": ready, "lastTransitionTime": now},
        ]
        if issues:
            conditions[1]["reason"] = "ReconcileFailed"
            conditions[1]["message"] = "; ".join(issue.message for issue in issues)
        spec = _dict(isvc.get("spec"))
        predictor = _dict(spec.get("predictor"))
        url = f"http://{name}.{namespace}.example.com"
        status: Json = {
            "deploymentMode": mode,
            "url": url,
            "observedGeneration": _dict(isvc.get("metadata")).get("generation"),
        }
        component: Json = {"url": f"http://{name}-predictor.{namespace}.example.com"}
        if mode == "Knative":
            component.update(self._knative(namespace, name, isvc, predictor))
        else:
            canaries = [_dict(c) for c in _list(spec.get("canary"))]
            if canaries:
                status["canaryStatuses"] = [
                    {
                        "name": _dict(c.get("predictor")).get("name"),
                        "ready": not issues,
                        "trafficPercent": c.get("trafficPercent") or 0,
                    }
                    for c in canaries
                ]
                conditions.append({"type": "CanaryPredictorReady", "status": ready, "lastTransitionTime": now})
        status["components"] = {"predictor": component}
        status["conditions"] = sorted(conditions, key=lambda c: str(c["type"]))
        return status

    def _knative(self, namespace: str, name: str, isvc: Json, predictor: Json) -> Json:
        """ksvc_reconciler.go: with canaryTrafficPercent and a rolled-out revision, the latest revision gets the
        percentage and the last rolled-out one (tag prev) the rest; else the latest gets 100 %. A revision is
        rolled out once it has 100 % (inference_service_status.go PropagateStatus)."""
        revisions = self._revisions.setdefault((namespace, name), _Revisions())
        # a new revision when the template changes: the predictor (without the percentage) and the annotations,
        # which KServe copies onto the revision template (components/predictor.go buildPredictorResources)
        template = json.dumps(
            [
                {k: v for k, v in predictor.items() if k != "canaryTrafficPercent"},
                _dict(isvc.get("metadata")).get("annotations"),
            ],
            sort_keys=True,
        )
        if template != revisions.template:
            revisions.count += 1
            revisions.template = template
            revisions.latest = f"{name}-predictor-{revisions.count:05d}"
        percent = predictor.get("canaryTrafficPercent")
        traffic: list[Json]
        if isinstance(percent, int) and revisions.rolled_out:
            traffic = [{"revisionName": revisions.latest, "latestRevision": True, "percent": percent}]
            if percent < 100:
                traffic.append(
                    {
                        "revisionName": revisions.rolled_out,
                        "latestRevision": False,
                        "percent": 100 - percent,
                        "tag": "prev",
                    }
                )
        else:
            traffic = [{"revisionName": revisions.latest, "latestRevision": True, "percent": 100}]
        if (
            any(t["latestRevision"] is True and t["percent"] == 100 for t in traffic)
            and revisions.rolled_out != revisions.latest
        ):
            revisions.previous, revisions.rolled_out = revisions.rolled_out, revisions.latest
        out: Json = {
            "latestCreatedRevision": revisions.latest,
            "latestReadyRevision": revisions.latest,
            "latestRolledoutRevision": revisions.rolled_out,
            "traffic": traffic,
        }
        if revisions.previous:
            out["previousRolledoutRevision"] = revisions.previous
        return out


class RecordsRequests(Protocol):
    requests: list[Request]


class ApiHandler(BaseHTTPRequestHandler):
    """The request plumbing the fake API servers share: read the body (bounded), match `path_pattern`
    (groups: namespace, name), name the verb as RBAC does, let `_answer` decide, record the request and write the
    JSON answer. `kube` is the fake (set by `serve_on_loopback`)."""

    kube: RecordsRequests
    path_pattern: re.Pattern[str]
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        path, _, query = self.path.partition("?")
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(min(length, MAX_BODY)) if length else b""
        match = self.path_pattern.match(path)
        namespace, name = (match.group(1), match.group(2)) if match else ("", None)
        verbs = {"GET": "get" if name else "list", "POST": "create", "PUT": "update", "PATCH": "patch"}
        verb = verbs.get(method, method.lower())
        code, answer = self._answer(method, path, query, match is not None, namespace, name, verb, raw)
        self.kube.requests.append(Request(method, path, self.headers.get("Content-Type"), verb, code))
        data = json.dumps(answer).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _answer(
        self, method: str, path: str, query: str, known: bool, namespace: str, name: str | None, verb: str, raw: bytes
    ) -> tuple[int, Json]:
        raise NotImplementedError


class _Handler(ApiHandler):
    kube: FakeKube
    path_pattern = PATH

    def _answer(
        self, method: str, path: str, query: str, known: bool, namespace: str, name: str | None, verb: str, raw: bytes
    ) -> tuple[int, Json]:
        kube = self.kube
        content_type = self.headers.get("Content-Type")
        if self.headers.get("Authorization") != f"Bearer {kube.token}":
            return kube._refuse(401, _status(401, "Unauthorized", "Unauthorized"))
        allowed = (method == "GET" and known) or (method == "POST" and known and name is None)
        allowed = allowed or (method in ("PUT", "PATCH") and known and name is not None)
        if not allowed:
            kube.unexpected.append(f"{method} {path}")
            return 404, _status(404, "NotFound", f"the server could not find the requested resource ({method} {path})")
        if kube.allowed_verbs is not None and verb not in kube.allowed_verbs:
            target = f'{RESOURCE} "{name}"' if name else RESOURCE
            message = (
                f'{target} is forbidden: User "{kube.user}" cannot {verb} resource "{PLURAL}" in API group '
                f'"{GROUP}" in the namespace "{namespace}"'
            )
            return kube._refuse(403, _status(403, "Forbidden", message, name=name or ""))
        if method == "GET":
            with kube._lock:
                if name is None:
                    items = [copy.deepcopy(o) for (ns, _), o in sorted(kube.objects.items()) if ns == namespace]
                    return 200, {
                        "apiVersion": f"{GROUP}/{VERSION}",
                        "kind": "InferenceServiceList",
                        "items": items,
                        "metadata": {},
                    }
                found = kube.objects.get((namespace, name))
            return (200, copy.deepcopy(found)) if found is not None else kube._refuse(404, _not_found(name))
        media = (content_type or "").split(";", 1)[0].strip().lower()
        if method == "PATCH" and media != MERGE_PATCH:
            message = (
                f"the body of the request was in an unknown format - accepted media types include: {MERGE_PATCH} "
                "(this fake API serves merge patches only)"
            )
            return kube._refuse(415, _status(415, "UnsupportedMediaType", message))
        try:
            body = json.loads(raw or b"null")
        except ValueError as exc:
            return kube._refuse(400, _status(400, "BadRequest", f"the body is not JSON: {exc}"))
        if not isinstance(body, dict):
            return kube._refuse(400, _status(400, "BadRequest", "the body must be a JSON object"))
        if method == "POST":
            return kube.create(namespace, body)
        assert name is not None
        return kube.write(namespace, name, body, patch=method == "PATCH")


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


def _strip_status(obj: Mapping[str, object]) -> Json:
    return {k: copy.deepcopy(v) for k, v in obj.items() if k != "status"}


def _dict(value: object) -> Json:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list[object]:
    return value if isinstance(value, list) else []


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")
