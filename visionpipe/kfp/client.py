"""One run, or a recurring run, of a compiled pipeline on a Kubeflow Pipelines endpoint (what `visionpipe submit`
and `visionpipe schedule` send; their arguments are parsed in visionpipe/cli/).

The requests read a compiled pipeline (``visionpipe/kfp/compiled/<name>.yaml``, or any package), `probe` checks
the endpoint (``GET {host}/apis/v2beta1/healthz``, short timeout, no proxy), and only then `submit` / `schedule`
talk to it through `kfp.Client`.

Schedules use KFP's cron format, six fields with seconds first (visionpipe/kfp/cron.py).

Authentication: an optional bearer token from ``--token``, or the environment (``KF_PIPELINES_TOKEN``, then
``KFP_TOKEN``). It is sent as ``Authorization: Bearer ...`` and never printed.

Refused before anything is contacted: a ``destination`` (``-p destination=...``, or the package's default) that
is not an ``s3://`` URI (on the cluster the export step would write into its pod's disk, deleted with the pod).

Namespace (multi-user Kubeflow): ``--namespace``, else the namespace of the current kube context
(``$KUBECONFIG`` or ``~/.kube/config``). A single-user KFP ignores it. When the endpoint's healthz says
``multi_user: true`` and no namespace is known, the request is refused with how to set one.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kfp import Client

from visionpipe.kfp.cron import DEFAULT_CRON as DEFAULT_CRON  # re-exported with the requests that use them
from visionpipe.kfp.cron import CronError as CronError
from visionpipe.kfp.cron import validate_cron as validate_cron
from visionpipe.phases.pod import DESTINATION_ADVICE
from visionpipe.specs.params import PYTHON_TYPES, Kind, Value

COMPILED_DIR = Path(__file__).parent / "compiled"
PIPELINE_NAMES = ("training", "monthly-retrain")
HEALTHZ_PATH = "/apis/v2beta1/healthz"
TOKEN_ENV_VARS = ("KF_PIPELINES_TOKEN", "KFP_TOKEN")
HOST_ENV_VAR = "KF_PIPELINES_ENDPOINT"
PACKAGE_SUFFIXES = (".yaml", ".yml", ".json", ".zip", ".tar.gz", ".tgz")
MAX_CONCURRENCY_RANGE = (1, 10)  # what the KFP API server accepts
KUBECONFIG_ENV = "KUBECONFIG"
DEFAULT_KUBECONFIG = "~/.kube/config"

ParamValue = Value
KINDS: dict[str, Kind] = {kind: kind for kind in PYTHON_TYPES}  # a package type string -> Kind


class KfpError(RuntimeError):
    """A Kubeflow Pipelines request failed; the message names the host and what to check."""


class KfpConnectionError(KfpError):
    """The endpoint cannot be reached, or it answers but is not a Kubeflow Pipelines API."""


class KfpAuthError(KfpError):
    """The endpoint refused the request's credentials (HTTP 401 / 403)."""


class KfpApiError(KfpError):
    """The KFP API answered with an error to a request."""


class KfpNamespaceRequired(KfpError):
    """The KFP API runs in multi-user mode and no namespace (profile) is known for the request."""


class RequestError(ValueError):
    """Invalid submit / schedule arguments (the message names the argument, the value and what is allowed)."""


# --------------------------------------------------------------------------------------------- packages
def package_for(pipeline: str, compiled_dir: Path = COMPILED_DIR) -> Path:
    """The compiled package of a named pipeline; a clear error when it is unknown or not compiled yet."""
    if pipeline not in PIPELINE_NAMES:
        raise RequestError(f"pipeline={pipeline!r} is not one of {', '.join(PIPELINE_NAMES)}")
    path = compiled_dir / f"{pipeline}.yaml"
    if not path.is_file():
        raise RequestError(
            f"pipeline={pipeline!r}: {path} does not exist; run `visionpipe compile` first "
            f"(or pass --package PATH to a compiled pipeline)"
        )
    return path


def check_package(path: Path) -> Path:
    if not str(path).endswith(PACKAGE_SUFFIXES):
        raise RequestError(f"package={str(path)!r} must end with one of {', '.join(PACKAGE_SUFFIXES)}")
    if not path.is_file():
        raise RequestError(f"package={str(path)!r} does not exist")
    return path


def package_parameters(path: Path) -> dict[str, dict[str, object]]:
    """The root input parameters of a compiled YAML package: name -> {parameterType, defaultValue, ...}."""
    if not str(path).endswith((".yaml", ".yml", ".json")):
        return {}
    import yaml

    documents = list(yaml.safe_load_all(path.read_text()))
    spec = documents[0] if documents else None
    if not isinstance(spec, dict):
        raise RequestError(f"package={str(path)!r} is not a compiled pipeline (no YAML mapping)")
    spec = spec.get("pipeline_spec", spec)
    root = spec.get("root", {}) if isinstance(spec, dict) else {}
    inputs = root.get("inputDefinitions", {}) if isinstance(root, dict) else {}
    params = inputs.get("parameters", {}) if isinstance(inputs, dict) else {}
    return {str(k): dict(v) for k, v in params.items()} if isinstance(params, dict) else {}


def package_kinds(path: Path) -> dict[str, Kind]:
    """Name -> KFP parameter type of a compiled package's run form (what the `-p` parser coerces to)."""
    kinds: dict[str, Kind] = {}
    for name, spec in package_parameters(path).items():
        kind = str(spec.get("parameterType", "STRING"))
        kinds[name] = KINDS.get(kind, "STRING")
    return kinds


def package_pipeline(path: Path) -> str | None:
    """Which of our pipelines (PIPELINE_NAMES) a compiled YAML package is, from its pipelineInfo.name; else None."""
    if not str(path).endswith((".yaml", ".yml", ".json")):
        return None
    import yaml

    documents = list(yaml.safe_load_all(path.read_text()))
    spec = documents[0] if documents else None
    spec = spec.get("pipeline_spec", spec) if isinstance(spec, dict) else None
    info = spec.get("pipelineInfo", {}) if isinstance(spec, dict) else {}
    name = info.get("name") if isinstance(info, dict) else None
    for pipeline in PIPELINE_NAMES:
        if name == f"visionpipe-{pipeline}":
            return pipeline
    return None


def check_destination(path: Path, params: Mapping[str, ParamValue]) -> None:
    """Refuse a run whose `destination` (given, or the package's default) is not an s3:// URI.

    On a cluster the export step runs in a pod whose disk is deleted with it: a local destination publishes
    nothing (and the step itself refuses it, see `visionpipe.phases.pod.refuse_local_destination_in_pod`)."""
    declared = package_parameters(path)
    value: object
    if "destination" in params:
        value, where = params["destination"], "-p destination"
    elif "destination" in declared:
        value, where = declared["destination"].get("defaultValue", ""), f"the default of {path.name}"
    else:
        return
    if not (isinstance(value, str) and value.startswith("s3://") and len(value) > len("s3://")):
        raise RequestError(
            f"destination={value!r} ({where}) is not an s3:// URI: on the cluster the export step would write the "
            f"bundle into its pod's disk, which is deleted with the pod, so nothing would be published; "
            f"{DESTINATION_ADVICE}"
        )


def kube_context_namespace(environ: Mapping[str, str] | None = None) -> tuple[str | None, str]:
    """(namespace of the current kube context, where it came from); (None, reason) when there is none.

    Reads ``$KUBECONFIG`` (a ``:``-separated list, merged) or ``~/.kube/config`` with the `kubernetes` package's
    own loader. The file path is passed explicitly: the package reads ``$KUBECONFIG`` once, at import time
    (kubernetes/config/kube_config.py, ``KUBE_CONFIG_DEFAULT_LOCATION``)."""
    import yaml
    from kubernetes.config import list_kube_config_contexts
    from kubernetes.config.config_exception import ConfigException

    env = os.environ if environ is None else environ
    path = env.get(KUBECONFIG_ENV) or DEFAULT_KUBECONFIG
    try:
        _contexts, active = list_kube_config_contexts(config_file=path)
    except (ConfigException, yaml.YAMLError, OSError, TypeError, KeyError) as exc:
        return None, f"no usable kubeconfig at {path} ({type(exc).__name__})"
    context = active.get("context") if isinstance(active, dict) else None
    namespace = context.get("namespace") if isinstance(context, dict) else None
    name = active.get("name") if isinstance(active, dict) else None
    if not isinstance(namespace, str) or not namespace:
        return None, f"kube context {name!r} in {path} has no namespace"
    return namespace, f"kube context {name!r} in {path}"


def resolve_namespace(explicit: str | None, environ: Mapping[str, str] | None = None) -> tuple[str | None, str]:
    """(namespace, where it came from): ``--namespace``, else the current kube context's namespace."""
    if explicit:
        return explicit, "--namespace"
    return kube_context_namespace(environ)


def require_namespace(host: str, health: Mapping[str, object], namespace: str | None, source: str = "") -> None:
    """Refuse when the endpoint reports multi-user mode and no namespace is known.

    KFP reports the mode in the healthz answer's ``multi_user`` field (GET /apis/v2beta1/healthz,
    backend/api/v2beta1/healthz.proto; `kfp.Client.__init__` reads it the same way, kfp/client/client.py:
    ``self.get_kfp_healthz().multi_user is True``, and then only tries the in-cluster service-account file)."""
    if health.get("multi_user") is True and not namespace:
        known = f" ({source})" if source else ""
        raise KfpNamespaceRequired(
            f"{host} runs Kubeflow Pipelines in multi-user mode (healthz multi_user=true) and no namespace is "
            f"known{known}: runs and experiments live in a profile namespace. Pass --namespace <your profile "
            f"namespace> (e.g. kubeflow-user-example-com), or set it on your kube context: "
            f"kubectl config set-context --current --namespace=<profile namespace>"
        )


# --------------------------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class RunRequest:
    """One run of a compiled pipeline: the arguments of `kfp.Client.create_run_from_pipeline_package`."""

    experiment: str
    run_name: str
    package_path: Path
    params: Mapping[str, ParamValue] = field(default_factory=dict)
    namespace: str | None = None
    service_account: str | None = None
    namespace_source: str = ""

    def __post_init__(self) -> None:
        _check_name("experiment", self.experiment)
        _check_name("run_name", self.run_name)
        check_package(self.package_path)

    def create_kwargs(self) -> dict[str, object]:
        """Exactly the keyword arguments for `kfp.Client.create_run_from_pipeline_package(...)`."""
        return {
            "pipeline_file": str(self.package_path),
            "arguments": dict(self.params),
            "run_name": self.run_name,
            "experiment_name": self.experiment,
            "namespace": self.namespace,
            "service_account": self.service_account,
        }

    def describe(self) -> dict[str, object]:
        return {"action": "submit", **self.create_kwargs()}


@dataclass(frozen=True)
class RecurringRunRequest:
    """A recurring run: the arguments of `kfp.Client.create_recurring_run` (plus the experiment's name).

    KFP's API takes an experiment id; `schedule` creates (or finds) the experiment by name first and passes
    its id to `create_kwargs`."""

    experiment: str
    job_name: str
    package_path: Path
    cron: str
    params: Mapping[str, ParamValue] = field(default_factory=dict)
    max_concurrency: int = 1
    no_catchup: bool = True
    enabled: bool = True
    description: str | None = None
    namespace: str | None = None
    service_account: str | None = None
    namespace_source: str = ""

    def __post_init__(self) -> None:
        _check_name("experiment", self.experiment)
        _check_name("job_name", self.job_name)
        check_package(self.package_path)
        object.__setattr__(self, "cron", validate_cron(self.cron))
        low, high = MAX_CONCURRENCY_RANGE
        if isinstance(self.max_concurrency, bool) or not isinstance(self.max_concurrency, int):
            raise RequestError(f"max_concurrency={self.max_concurrency!r} must be an integer from {low} to {high}")
        if not low <= self.max_concurrency <= high:
            raise RequestError(f"max_concurrency={self.max_concurrency!r} must be an integer from {low} to {high}")
        for flag in ("no_catchup", "enabled"):
            if not isinstance(getattr(self, flag), bool):
                raise RequestError(f"{flag}={getattr(self, flag)!r} must be True or False")

    def create_kwargs(self, experiment_id: str) -> dict[str, object]:
        """Exactly the keyword arguments for `kfp.Client.create_recurring_run(...)` (kfp 2.x)."""
        if not experiment_id:
            raise RequestError("experiment_id='' is empty; create or look up the experiment first")
        return {
            "experiment_id": experiment_id,
            "job_name": self.job_name,
            "description": self.description,
            "cron_expression": self.cron,
            "max_concurrency": self.max_concurrency,
            "no_catchup": self.no_catchup,
            "params": dict(self.params),
            "pipeline_package_path": str(self.package_path),
            "enabled": self.enabled,
            "service_account": self.service_account,
        }

    def describe(self) -> dict[str, object]:
        kwargs = self.create_kwargs("<id of experiment " + repr(self.experiment) + ">")
        return {"action": "schedule", "experiment_name": self.experiment, "namespace": self.namespace, **kwargs}


def _check_name(field_name: str, value: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"{field_name}={value!r} must be a non-empty name")


# --------------------------------------------------------------------------------------------- endpoint
def normalise_host(host: str) -> str:
    """``http(s)://host[:port][/prefix]`` without a trailing slash; refuses anything else."""
    value = (host or "").strip().rstrip("/")
    if not value:
        raise RequestError(f"host={host!r} is empty; pass --host URL or set {HOST_ENV_VAR}")
    if not value.startswith(("http://", "https://")):
        raise RequestError(
            f"host={host!r} needs a scheme: http://... or https://... (e.g. http://localhost:8080 after "
            f"`kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80`)"
        )
    return value


def resolve_token(explicit: str | None, environ: Mapping[str, str] | None = None) -> tuple[str | None, str]:
    """(token, where it came from) — the source is safe to print, the token is not."""
    if explicit:
        return explicit, "--token"
    env = os.environ if environ is None else environ
    for name in TOKEN_ENV_VARS:
        if env.get(name):
            return env[name], name
    return None, "none"


def probe(host: str, token: str | None = None, timeout: float = 5.0) -> dict[str, object]:
    """``GET {host}/apis/v2beta1/healthz``; returns its JSON. Raises `KfpConnectionError` / `KfpAuthError`."""
    url = normalise_host(host) + HEALTHZ_PATH
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy: loopback and port-forwards
    check = (
        "Check the URL (scheme, host, port, path prefix), that the KFP API is running and reachable from here "
        "(e.g. `kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80`, then --host http://localhost:8080)"
    )
    try:
        with opener.open(request, timeout=timeout) as response:
            body = response.read(65536)
            final_url = response.geturl()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise KfpAuthError(
                f"{host}: the KFP API refused the request (HTTP {exc.code}) at {HEALTHZ_PATH}; pass a valid "
                f"bearer token with --token or {' / '.join(TOKEN_ENV_VARS)}"
            ) from None
        meaning = {
            404: "there is no KFP API at this URL (wrong host, port or path prefix?)",
            502: "a proxy in front of it could not reach the KFP API server",
            503: "the server is up but the KFP API is not ready (starting, or its backend is down)",
            504: "a proxy in front of it timed out waiting for the KFP API server",
        }.get(exc.code, "this is not a healthy Kubeflow Pipelines API")
        raise KfpConnectionError(
            f"{host} is reachable but answered HTTP {exc.code} to GET {HEALTHZ_PATH}: {meaning}. {check}."
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = _network_reason(exc)
        raise KfpConnectionError(f"cannot reach the Kubeflow Pipelines endpoint {host}: {reason}. {check}.") from None
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        redirected = f" (redirected to {final_url.split('?')[0]})" if final_url.rstrip("/") != url else ""
        raise KfpConnectionError(
            f"{host} answered GET {HEALTHZ_PATH}{redirected} with something other than KFP's healthz JSON: a "
            f"login page or another service? Behind Dex / oauth2-proxy, pass a bearer token with --token or "
            f"{' / '.join(TOKEN_ENV_VARS)}. {check}."
        )
    return payload


def _network_reason(exc: BaseException) -> str:
    cause = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(cause, socket.gaierror):
        return "DNS lookup failed (unknown host name)"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused (nothing listens on that port)"
    if isinstance(cause, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(cause, ConnectionResetError):
        return "connection reset (TLS on a plain-HTTP port, or the reverse?)"
    text = str(cause)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "TLS certificate verification failed"
    if "WRONG_VERSION_NUMBER" in text or "wrong version number" in text:
        return "TLS handshake failed (https:// against a plain-HTTP port?)"
    return text[:200] or type(cause).__name__


def make_client(host: str, token: str | None, namespace: str | None) -> Client:
    """A `kfp.Client` for `host` (no kubeconfig lookup since the host is explicit)."""
    import kfp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return kfp.Client(host=normalise_host(host), existing_token=token, namespace=namespace or "kubeflow")


def submit(
    host: str,
    request: RunRequest,
    token: str | None = None,
    timeout: float = 5.0,
) -> str:
    """Probe `host` (refusing multi-user mode without a namespace), then start one run; returns the run id."""
    require_namespace(host, probe(host, token, timeout), request.namespace, request.namespace_source)
    client = make_client(host, token, request.namespace)
    with _api_errors(host):
        result = client.create_run_from_pipeline_package(**request.create_kwargs())
    return str(result.run_id)


def schedule(
    host: str,
    request: RecurringRunRequest,
    token: str | None = None,
    timeout: float = 5.0,
) -> str:
    """Probe `host` (refusing multi-user mode without a namespace), create (or find) the experiment, then create
    the recurring run; returns its id."""
    require_namespace(host, probe(host, token, timeout), request.namespace, request.namespace_source)
    client = make_client(host, token, request.namespace)
    with _api_errors(host):
        experiment = client.create_experiment(name=request.experiment, namespace=request.namespace)
        recurring = client.create_recurring_run(**request.create_kwargs(str(experiment.experiment_id)))
    return str(recurring.recurring_run_id)


@contextmanager
def _api_errors(host: str) -> Iterator[None]:
    """Map errors from kfp / kfp_server_api / urllib3 to `KfpError`s naming the host."""
    import urllib3.exceptions
    from kfp_server_api.exceptions import ApiException  # type: ignore[import-untyped]  # ships no types

    try:
        yield
    except ApiException as exc:
        status = int(exc.status or 0)
        detail = _api_message(exc.body) or str(exc.reason or "")
        if status in (401, 403):
            raise KfpAuthError(
                f"{host}: the KFP API refused the request (HTTP {status}: {detail}); check the token "
                f"(--token / {' / '.join(TOKEN_ENV_VARS)}) and your access to the namespace"
            ) from None
        raise KfpApiError(f"{host}: the KFP API answered HTTP {status}: {detail}") from None
    except (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as exc:
        raise KfpConnectionError(
            f"lost the connection to the Kubeflow Pipelines endpoint {host}: {_network_reason(exc)}"
        ) from None


def _api_message(body: object) -> str:
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body or "")
    try:
        payload = json.loads(text)
    except ValueError:
        return text[:300]
    if isinstance(payload, dict):
        return str(payload.get("message") or payload.get("error") or text)[:300]
    return text[:300]
