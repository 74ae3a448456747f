"""`visionpipe submit` and `visionpipe schedule`: one run, or a recurring run, on a Kubeflow Pipelines endpoint.

Both read a compiled pipeline (``visionpipe/kfp/compiled/<name>.yaml``, or any package given with ``--package``),
check ``-p NAME=VALUE`` arguments against the pipeline's own parameter types, probe the endpoint
(``GET {host}/apis/v2beta1/healthz``, short timeout, no proxy) and only then talk to it through
`kfp.Client`. ``--dry-run`` prints the request as JSON and contacts nothing.

Schedules use KFP's cron format (robfig/cron v1, evaluated in UTC): six fields, **seconds first**::

    seconds  minutes  hours  day-of-month  month  day-of-week
    0-59     0-59     0-23   1-31 or ?     1-12 or JAN-DEC   0-6 or SUN-SAT, or ?

Each field is ``*``, a value, a range ``a-b``, a step ``*/n`` / ``a-b/n`` / ``a/n``, or a comma list of those.
A five-field (Unix) expression is refused: KFP would silently read it as seconds..month, so
``0 3 1 * *`` would run every day at 01:03:00 rather than monthly. The monthly retrain default,
``0 0 3 1 * *``, is 03:00:00 UTC on the first of every month. Descriptors (``@monthly``, ``@every 24h``) are
accepted as KFP accepts them.

Authentication: an optional bearer token from ``--token``, or the environment (``KF_PIPELINES_TOKEN``, then
``KFP_TOKEN``). It is sent as ``Authorization: Bearer ...`` and never printed.

Refused before anything is contacted: a ``destination`` (``-p destination=...``, or the package's default) that
is not an ``s3://`` URI (on the cluster the export step would write into its pod's disk, deleted with the pod).

Namespace (multi-user Kubeflow): ``--namespace``, else the namespace of the current kube context
(``$KUBECONFIG`` or ``~/.kube/config``). A single-user KFP ignores it. When the endpoint's healthz says
``multi_user: true`` and no namespace is known, the request is refused with how to set one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kfp import Client

from visionpipe.phases.pod import DESTINATION_ADVICE

COMPILED_DIR = Path(__file__).parent / "compiled"
PIPELINE_NAMES = ("training", "monthly-retrain")
HEALTHZ_PATH = "/apis/v2beta1/healthz"
TOKEN_ENV_VARS = ("KF_PIPELINES_TOKEN", "KFP_TOKEN")
HOST_ENV_VAR = "KF_PIPELINES_ENDPOINT"
PACKAGE_SUFFIXES = (".yaml", ".yml", ".json", ".zip", ".tar.gz", ".tgz")
MAX_CONCURRENCY_RANGE = (1, 10)  # what the KFP API server accepts
DEFAULT_CRON = "0 0 3 1 * *"
KUBECONFIG_ENV = "KUBECONFIG"
DEFAULT_KUBECONFIG = "~/.kube/config"

ParamValue = str | int | float | bool | list[object] | dict[str, object]


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


class CronError(ValueError):
    """A cron expression KFP would refuse or misread; the message names the field and what is allowed."""


class RequestError(ValueError):
    """Invalid submit / schedule arguments (the message names the argument, the value and what is allowed)."""


# --------------------------------------------------------------------------------------------- cron
@dataclass(frozen=True)
class CronField:
    name: str
    low: int
    high: int
    names: Mapping[str, int] = field(default_factory=dict)
    question_mark: bool = False

    def allowed(self) -> str:
        parts = [f"{self.low}-{self.high}"]
        if self.names:
            keys = list(self.names)
            parts.append(f"{keys[0]}-{keys[-1]}")
        parts.append("*")
        if self.question_mark:
            parts.append("?")
        return " or ".join(parts) + ", ranges a-b, steps */n or a-b/n, lists a,b"


_MONTHS = {
    m: i + 1 for i, m in enumerate(("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"))
}
_DAYS = {d: i for i, d in enumerate(("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"))}
CRON_FIELDS = (
    CronField("seconds", 0, 59),
    CronField("minutes", 0, 59),
    CronField("hours", 0, 23),
    CronField("day-of-month", 1, 31, question_mark=True),
    CronField("month", 1, 12, _MONTHS),
    CronField("day-of-week", 0, 6, _DAYS, question_mark=True),
)
CRON_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")
_NUMBER = re.compile(r"^\d+$")


def validate_cron(expr: str) -> str:
    """Check a KFP cron expression; returns it with single spaces. Raises `CronError` naming the bad field."""
    if not isinstance(expr, str) or not expr.strip():
        raise CronError(f"cron={expr!r} is empty; expected 6 fields: {_layout()}, e.g. {DEFAULT_CRON!r}")
    text = " ".join(expr.split())
    if text.startswith("@"):
        return _validate_descriptor(text)
    parts = text.split(" ")
    if len(parts) == 5:
        raise CronError(
            f"cron={text!r} has 5 fields; KFP cron needs 6 with the seconds field first ({_layout()}). "
            f"KFP would read these 5 as seconds..month; for this schedule write {'0 ' + text!r}"
        )
    if len(parts) != 6:
        raise CronError(f"cron={text!r} has {len(parts)} fields; expected 6: {_layout()}, e.g. {DEFAULT_CRON!r}")
    for value, spec in zip(parts, CRON_FIELDS, strict=True):
        _check_cron_field(text, value, spec)
    return text


def _layout() -> str:
    return " ".join(f.name for f in CRON_FIELDS)


def _validate_descriptor(text: str) -> str:
    if text.lower() in CRON_DESCRIPTORS:
        return text
    head, _, rest = text.partition(" ")
    if head.lower() == "@every" and _DURATION.match(rest.strip()):
        return text
    raise CronError(
        f"cron={text!r} is not a known descriptor; allowed: {', '.join(CRON_DESCRIPTORS)}, "
        f"'@every <duration>' (e.g. @every 24h), or 6 fields: {_layout()}"
    )


def _check_cron_field(expr: str, value: str, spec: CronField) -> None:
    def bad(reason: str) -> CronError:
        return CronError(f"cron={expr!r}: {spec.name} field {value!r} {reason}; allowed: {spec.allowed()}")

    for item in value.split(","):
        if not item:
            raise bad("has an empty list item")
        range_part, slash, step_part = item.partition("/")
        if slash and (not _NUMBER.match(step_part) or int(step_part) == 0):
            raise bad(f"has step {step_part!r}, which must be a whole number >= 1")
        if range_part in ("*", "?"):
            if range_part == "?" and not spec.question_mark:
                raise bad("uses '?', which only day-of-month and day-of-week accept")
            continue
        bounds = range_part.split("-")
        if len(bounds) > 2 or not all(bounds):
            raise bad(f"has a malformed range {range_part!r}")
        numbers = [_cron_value(b, spec, bad) for b in bounds]
        if len(numbers) == 2 and numbers[0] > numbers[1]:
            raise bad(f"has a range {range_part!r} whose start is after its end")


def _cron_value(token: str, spec: CronField, bad: Callable[[str], CronError]) -> int:
    upper = token.upper()
    if upper in spec.names:
        return spec.names[upper]
    if not _NUMBER.match(token):
        what = f"names {', '.join(spec.names)}" if spec.names else "no names"
        raise bad(f"has {token!r}, which is not a number or a name ({spec.name} takes {what})")
    number = int(token)
    if not spec.low <= number <= spec.high:
        raise bad(f"has {number}, outside {spec.low}-{spec.high}")
    return number


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


def parse_params(path: Path, pairs: Sequence[str]) -> dict[str, ParamValue]:
    """``NAME=VALUE`` strings -> arguments typed by the package's parameter types (unknown names refused)."""
    declared = package_parameters(path)
    out: dict[str, ParamValue] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise RequestError(f"-p {pair!r}: expected NAME=VALUE")
        if declared and name not in declared:
            raise RequestError(
                f"-p {pair!r}: {path.name} has no parameter {name!r}; parameters: {', '.join(sorted(declared))}"
            )
        kind = str(declared.get(name, {}).get("parameterType", "STRING"))
        out[name] = _coerce(name, raw, kind)
    return out


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


def _coerce(name: str, raw: str, kind: str) -> ParamValue:
    try:
        if kind == "NUMBER_INTEGER":
            return int(raw)
        if kind == "NUMBER_DOUBLE":
            return float(raw)
        if kind == "BOOLEAN":
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError("expected true or false")
            return raw.lower() in ("true", "1")
        if kind in ("LIST", "STRUCT"):
            value = json.loads(raw)
            expected = list if kind == "LIST" else dict
            if not isinstance(value, expected):
                raise ValueError(f"expected a JSON {expected.__name__}")
            return value
    except ValueError as exc:
        raise RequestError(f"-p {name}={raw!r}: {exc} (parameter type {kind})") from exc
    return raw


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


# --------------------------------------------------------------------------------------------- CLI
def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``submit`` and ``schedule``; sets ``func`` (args -> exit code) on the parsed namespace."""
    run = sub.add_parser(
        "submit",
        help="start one run of a compiled pipeline on a Kubeflow Pipelines endpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common_arguments(run, default_pipeline="training")
    run.add_argument("--run-name", default=None, help="run name shown in the UI (default: <pipeline> <UTC time>)")
    run.set_defaults(func=run_submit)

    rec = sub.add_parser(
        "schedule",
        help="create a recurring run (6-field cron, seconds first) on a Kubeflow Pipelines endpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common_arguments(rec, default_pipeline="monthly-retrain")
    rec.add_argument("--cron", default=DEFAULT_CRON, help=f"6-field cron, seconds first (default {DEFAULT_CRON!r})")
    rec.add_argument("--job-name", default=None, help="recurring run name (default visionpipe-<pipeline>)")
    rec.add_argument("--description", default=None)
    rec.add_argument("--max-concurrency", type=int, default=1, help="runs allowed at once (default 1)")
    rec.add_argument("--catchup", action="store_true", help="backfill missed intervals (default: no catch-up)")
    rec.add_argument("--disabled", action="store_true", help="create the recurring run paused")
    rec.set_defaults(func=run_schedule)


def _common_arguments(parser: argparse.ArgumentParser, default_pipeline: str) -> None:
    parser.add_argument(
        "--host",
        default=os.environ.get(HOST_ENV_VAR),
        help=f"KFP endpoint URL, e.g. http://localhost:8080 (default ${HOST_ENV_VAR})",
    )
    parser.add_argument(
        "--pipeline",
        choices=PIPELINE_NAMES,
        default=default_pipeline,
        help=f"compiled pipeline from visionpipe/kfp/compiled/<name>.yaml (default {default_pipeline})",
    )
    parser.add_argument("--package", type=Path, default=None, help="a compiled pipeline file (overrides --pipeline)")
    parser.add_argument(
        "-p", "--param", action="append", default=[], metavar="NAME=VALUE", help="pipeline argument (repeatable)"
    )
    parser.add_argument("--experiment", default="visionpipe", help="experiment name (created if missing)")
    parser.add_argument(
        "--namespace",
        "-n",
        default=None,
        help="profile namespace (multi-user Kubeflow; default: the current kube context's namespace)",
    )
    parser.add_argument("--service-account", default=None, help="Kubernetes service account for the run")
    parser.add_argument(
        "--token", default=None, help=f"bearer token (default ${TOKEN_ENV_VARS[0]} or ${TOKEN_ENV_VARS[1]})"
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds for the endpoint probe (default 5)")
    parser.add_argument("--dry-run", action="store_true", help="print the request as JSON; contact nothing")


def build_request(args: argparse.Namespace) -> RunRequest | RecurringRunRequest:
    """The request for parsed `visionpipe submit|schedule` arguments (raises RequestError / CronError)."""
    package = check_package(args.package) if args.package else package_for(args.pipeline)
    params = parse_params(package, args.param)
    check_destination(package, params)
    namespace, namespace_source = resolve_namespace(args.namespace)
    if args.command == "submit":
        from datetime import UTC, datetime

        run_name = args.run_name or f"{args.pipeline} {datetime.now(UTC):%Y-%m-%d %H:%M:%S}"
        return RunRequest(
            experiment=args.experiment,
            run_name=run_name,
            package_path=package,
            params=params,
            namespace=namespace,
            service_account=args.service_account,
            namespace_source=namespace_source,
        )
    return RecurringRunRequest(
        experiment=args.experiment,
        job_name=args.job_name or f"visionpipe-{args.pipeline}",
        package_path=package,
        cron=args.cron,
        params=params,
        max_concurrency=args.max_concurrency,
        no_catchup=not args.catchup,
        enabled=not args.disabled,
        description=args.description,
        namespace=namespace,
        service_account=args.service_account,
        namespace_source=namespace_source,
    )


def run_submit(args: argparse.Namespace) -> int:
    return _run(args)


def run_schedule(args: argparse.Namespace) -> int:
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    prog = f"visionpipe {args.command}"
    try:
        request = build_request(args)
        host = normalise_host(args.host) if (args.host or not args.dry_run) else None
    except (RequestError, CronError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    token, token_source = resolve_token(args.token)
    if args.dry_run:
        described = {
            "host": host,
            "token": token_source,
            "namespace_source": request.namespace_source,
            **request.describe(),
        }
        print(json.dumps(described, indent=2, sort_keys=True, default=str))
        return 0
    assert host is not None
    try:
        if isinstance(request, RunRequest):
            run_id = submit(host, request, token, args.timeout)
            print(f"run id: {run_id}")
        else:
            job_id = schedule(host, request, token, args.timeout)
            print(f"recurring run id: {job_id} (cron {request.cron!r}, UTC)")
    except KfpError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="visionpipe")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
