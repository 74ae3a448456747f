"""`visionpipe submit` / `schedule`: cron validation, the requests built for the KFP API, and endpoint errors.

Endpoint tests use real sockets on loopback: a closed port, a port that never answers, small HTTP servers
that answer healthz with 404 / 503 / 401 / a login page, and a stand-in for the KFP v2beta1 REST API that
records what `kfp.Client` sends (so the recurring-run body is checked as it goes over the wire).
"""

import inspect
import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from visionpipe.cli import main as cli_main
from visionpipe.cli import schedule as schedule_verb
from visionpipe.cli import submit as submit_verb
from visionpipe.kfp import client as kc
from visionpipe.kfp.client import (
    CronError,
    KfpApiError,
    KfpAuthError,
    KfpConnectionError,
    RecurringRunRequest,
    RequestError,
    RunRequest,
    validate_cron,
)
from visionpipe.specs.params import ParameterError, parse_assignments

SECRET = "tok-7f3a-not-for-logs"


def _compile_tiny_pipeline(path: Path) -> Path:
    """A small compiled package with one parameter of each type (independent of the project's pipelines).

    (This module does not use ``from __future__ import annotations``: KFP reads the component's annotations.)"""
    from kfp import compiler, dsl

    @dsl.component(base_image="python:3.11-slim")  # type: ignore[untyped-decorator]  # kfp is untyped
    def echo(text: str) -> str:
        return text

    @dsl.pipeline(name="visionpipe-tiny")  # type: ignore[untyped-decorator]  # kfp is untyped
    def tiny(
        seed: int = 0,
        train_ratio: float = 0.7,
        source: str = "builtin://sklearn-digits",
        positive_class: str = "",
        shuffle: bool = True,
        classes: list[str] = [],  # noqa: B006  # a KFP LIST parameter default
        recipe: dict[str, int] = {},  # noqa: B006  # a KFP STRUCT parameter default
    ) -> None:
        echo(text=source)

    compiler.Compiler().compile(tiny, package_path=str(path))
    return path


PACKAGE = "<package>"  # stands for the compiled tiny package in parametrized argv


@pytest.fixture(autouse=True)
def no_kube_context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts without a kube context (the developer's ~/.kube/config must not leak in)."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _compile_tiny_pipeline(tmp_path_factory.mktemp("kfp") / "tiny.yaml")


# --------------------------------------------------------------------------------------------- cron
@pytest.mark.parametrize(
    ("expr", "normalised"),
    [
        ("0 0 3 1 * *", "0 0 3 1 * *"),  # monthly retrain: 03:00:00 UTC on the 1st
        ("  0  0 3   1 * * ", "0 0 3 1 * *"),
        ("0 0 9 ? * 2-6", "0 0 9 ? * 2-6"),  # kfp's own docstring example
        ("0 0/10 * * * ?", "0 0/10 * * * ?"),
        ("*/15 0 0 ? * mon", "*/15 0 0 ? * mon"),
        ("0 30 2 1,15 JAN-MAR,OCT MON-FRI", "0 30 2 1,15 JAN-MAR,OCT MON-FRI"),
        ("59 59 23 31 12 6", "59 59 23 31 12 6"),
        ("0 0 0 1-31/2 */3 SUN", "0 0 0 1-31/2 */3 SUN"),
        ("@monthly", "@monthly"),
        ("@every 720h", "@every 720h"),
    ],
)
def test_valid_cron(expr: str, normalised: str) -> None:
    assert validate_cron(expr) == normalised


@pytest.mark.parametrize(
    ("expr", "fragments"),
    [
        ("0 3 1 * *", ["5 fields", "seconds field first", "'0 0 3 1 * *'"]),
        ("0 0 3 1 *", ["5 fields", "seconds"]),
        ("0 0 0 3 1 * *", ["7 fields", "expected 6"]),
        ("", ["empty", "6 fields"]),
        ("60 0 3 1 * *", ["seconds field", "60", "outside 0-59"]),
        ("0 60 3 1 * *", ["minutes field", "outside 0-59"]),
        ("0 0 24 1 * *", ["hours field", "outside 0-23"]),
        ("0 0 3 0 * *", ["day-of-month field", "outside 1-31", "?"]),
        ("0 0 3 32 * *", ["day-of-month field", "32"]),
        ("0 0 3 1 13 *", ["month field", "outside 1-12", "JAN-DEC"]),
        ("0 0 3 1 FOO *", ["month field", "'FOO'", "not a number or a name"]),
        ("0 0 3 1 * 7", ["day-of-week field", "outside 0-6", "SUN-SAT"]),
        ("0 0 3 1 * MONDAY", ["day-of-week field", "'MONDAY'"]),
        ("0 0 3 1 MON *", ["month field", "'MON'"]),
        ("0 */0 3 1 * *", ["minutes field", "step '0'", ">= 1"]),
        ("0 */x 3 1 * *", ["minutes field", "step 'x'"]),
        ("0 5-1 3 1 * *", ["minutes field", "start is after its end"]),
        ("0 1-2-3 3 1 * *", ["minutes field", "malformed range"]),
        ("? 0 3 1 * *", ["seconds field", "only day-of-month and day-of-week"]),
        ("0 1,,2 3 1 * *", ["minutes field", "empty list item"]),
        ("0 -1 3 1 * *", ["minutes field", "malformed range"]),
        ("@sometimes", ["not a known descriptor", "@monthly"]),
        ("@every soon", ["not a known descriptor", "@every <duration>"]),
    ],
)
def test_invalid_cron_names_the_field(expr: str, fragments: list[str]) -> None:
    with pytest.raises(CronError) as err:
        validate_cron(expr)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


# --------------------------------------------------------------------------------------------- requests
def test_recurring_run_kwargs_match_kfp_signature(package: Path) -> None:
    import kfp

    request = RecurringRunRequest(
        experiment="visionpipe",
        job_name="visionpipe-monthly",
        package_path=package,
        cron="0 0 3 1 * *",
        params={"seed": 3, "source": "s3://data/digits"},
    )
    kwargs = request.create_kwargs("exp-123")
    assert kwargs == {
        "experiment_id": "exp-123",
        "job_name": "visionpipe-monthly",
        "description": None,
        "cron_expression": "0 0 3 1 * *",
        "max_concurrency": 1,
        "no_catchup": True,
        "params": {"seed": 3, "source": "s3://data/digits"},
        "pipeline_package_path": str(package),
        "enabled": True,
        "service_account": None,
    }
    signature = inspect.signature(kfp.Client.create_recurring_run)
    signature.bind(None, **kwargs)  # every key is a parameter of kfp 2.x's create_recurring_run


def test_run_kwargs_match_kfp_signature(package: Path) -> None:
    import kfp

    request = RunRequest("visionpipe", "one run", package, {"seed": 1}, namespace="team-a")
    kwargs = request.create_kwargs()
    assert kwargs["pipeline_file"] == str(package) and kwargs["arguments"] == {"seed": 1}
    assert kwargs["experiment_name"] == "visionpipe" and kwargs["namespace"] == "team-a"
    inspect.signature(kfp.Client.create_run_from_pipeline_package).bind(None, **kwargs)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"cron": "0 3 1 * *"}, "5 fields"),
        ({"max_concurrency": 0}, "max_concurrency=0 must be an integer from 1 to 10"),
        ({"max_concurrency": 11}, "max_concurrency=11"),
        ({"max_concurrency": True}, "max_concurrency=True"),
        ({"job_name": " "}, "job_name=' ' must be a non-empty name"),
        ({"experiment": ""}, "experiment='' must be a non-empty name"),
        ({"package_path": Path("missing.yaml")}, "does not exist"),
        ({"package_path": Path("tiny.txt")}, "must end with one of .yaml"),
        ({"no_catchup": "yes"}, "no_catchup='yes' must be True or False"),
    ],
)
def test_recurring_run_request_rejects(changes: dict[str, object], fragment: str, package: Path) -> None:
    base: dict[str, object] = {
        "experiment": "e",
        "job_name": "j",
        "package_path": package,
        "cron": "0 0 3 1 * *",
    }
    with pytest.raises((RequestError, CronError)) as err:
        RecurringRunRequest(**{**base, **changes})  # type: ignore[arg-type]
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        (
            ["seed=3", "train_ratio=0.6", "source=s3://b/digits"],
            {"seed": 3, "train_ratio": 0.6, "source": "s3://b/digits"},
        ),
        (["positive_class=a=b"], {"positive_class": "a=b"}),
        (
            ["shuffle=false", 'classes=["0", "1"]', 'recipe={"epochs": 2}'],
            {"shuffle": False, "classes": ["0", "1"], "recipe": {"epochs": 2}},
        ),
        ([], {}),
    ],
)
def test_params_are_typed_from_the_package(pairs: list[str], expected: dict[str, object], package: Path) -> None:
    assert parse_assignments(pairs, kc.package_kinds(package), package.name) == expected


@pytest.mark.parametrize(
    ("pairs", "fragment"),
    [
        (["nope=1"], "tiny.yaml has no parameter 'nope'; parameters: classes, positive_class, recipe, seed"),
        (["shuffle=maybe"], "expected true or false (parameter type BOOLEAN)"),
        (["classes={}"], "expected a JSON list"),
        (["recipe=[1"], "parameter type STRUCT"),
        (["seed=three"], "-p seed='three'"),
        (["seed"], "expected NAME=VALUE"),
    ],
)
def test_bad_params_are_refused(pairs: list[str], fragment: str, package: Path) -> None:
    with pytest.raises(ParameterError) as err:
        parse_assignments(pairs, kc.package_kinds(package), package.name)
    assert fragment in str(err.value)


def test_missing_compiled_pipeline_says_how_to_make_it(tmp_path: Path) -> None:
    with pytest.raises(RequestError) as err:
        kc.package_for("monthly-retrain", compiled_dir=tmp_path)
    assert "monthly-retrain.yaml does not exist" in str(err.value) and "visionpipe compile" in str(err.value)
    with pytest.raises(RequestError, match="not one of training, monthly-retrain"):
        kc.package_for("nightly", compiled_dir=tmp_path)


# --------------------------------------------------------------------------------------------- dry run
def test_schedule_dry_run_prints_the_request_without_the_token(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, package: Path
) -> None:
    monkeypatch.setenv("KF_PIPELINES_TOKEN", SECRET)
    code = cli_main(
        [
            "schedule",
            "--dry-run",
            "--host",
            "http://127.0.0.1:9/",
            "--package",
            str(package),
            "-p",
            "seed=4",
            "--cron",
            "0 0 3 1 * *",
            "--experiment",
            "retrain",
        ]
    )
    out, _ = capsys.readouterr()
    assert code == 0
    assert SECRET not in out
    printed = json.loads(out)
    assert printed["host"] == "http://127.0.0.1:9"
    assert printed["token"] == "KF_PIPELINES_TOKEN"  # where it came from, never its value
    assert printed["cron_expression"] == "0 0 3 1 * *"
    assert printed["max_concurrency"] == 1 and printed["no_catchup"] is True and printed["enabled"] is True
    assert printed["params"] == {"seed": 4}
    assert printed["experiment_name"] == "retrain"


def test_named_pipeline_resolves_to_its_compiled_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["submit", "--dry-run", "--pipeline", "training", "--run-name", "r", "-p", "destination=s3://m/bundles"]
    assert cli_main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["pipeline_file"] == str(kc.COMPILED_DIR / "training.yaml")
    assert (
        printed["action"] == "submit"
        and printed["run_name"] == "r"
        and printed["token"] in ("none", "KFP_TOKEN", "KF_PIPELINES_TOKEN")
    )


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["schedule", "--dry-run", "--package", PACKAGE, "--cron", "0 3 1 * *"], "5 fields"),
        (["submit", "--dry-run", "--package", PACKAGE, "-p", "seed=x"], "-p seed='x'"),
        (["submit", "--package", PACKAGE], "host=None is empty"),
        (["submit", "--host", "kfp.example.com", "--package", PACKAGE], "needs a scheme"),
    ],
)
def test_cli_argument_errors_exit_2(
    argv: list[str],
    fragment: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    package: Path,
) -> None:
    monkeypatch.delenv(kc.HOST_ENV_VAR, raising=False)
    assert cli_main([str(package) if a == PACKAGE else a for a in argv]) == 2
    assert fragment in capsys.readouterr().err


def test_cli_registers_into_the_visionpipe_parser() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="visionpipe")
    sub = parser.add_subparsers(dest="command", required=True)
    submit_verb.register(sub)
    schedule_verb.register(sub)
    args = parser.parse_args(["schedule", "--host", "http://h", "--cron", "0 0 3 1 * *"])
    assert args.pipeline == "monthly-retrain" and args.func is schedule_verb.run_schedule
    assert args.max_concurrency == 1 and not args.catchup and not args.disabled


# --------------------------------------------------------------------------------------------- endpoints
@dataclass
class Recorded:
    method: str
    path: str
    authorization: str | None
    body: dict[str, object] = field(default_factory=dict)


Responder = Callable[[str, str, dict[str, object]], tuple[int, str, bytes]]


@pytest.fixture
def http_server() -> Iterator[Callable[[Responder], tuple[str, list[Recorded]]]]:
    """Start a real HTTP server on 127.0.0.1 with a given responder; returns (base URL, recorded requests)."""
    servers: list[ThreadingHTTPServer] = []

    def start(responder: Responder) -> tuple[str, list[Recorded]]:
        recorded: list[Recorded] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                return

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else {}
                recorded.append(Recorded(method, self.path, self.headers.get("Authorization"), body))
                status, content_type, payload = responder(method, self.path, body)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", recorded

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _json(status: int, payload: object) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(payload).encode()


def kfp_api(fail: dict[str, tuple[int, str]] | None = None, multi_user: bool = False) -> Responder:
    """A stand-in for the KFP v2beta1 REST API: healthz, experiments, runs, recurring runs."""
    failures = fail or {}

    def respond(method: str, path: str, body: dict[str, object]) -> tuple[int, str, bytes]:
        route = path.split("?")[0]
        if (method, route) in {(m, r) for m, r in [tuple(k.split(" ", 1)) for k in failures]}:
            status, message = failures[f"{method} {route}"]
            return _json(status, {"error": message, "code": 3, "message": message})
        if route == "/apis/v2beta1/healthz":
            return _json(200, {"multi_user": multi_user, "commit_sha": "test"})
        if method == "GET" and route == "/apis/v2beta1/experiments":
            return _json(200, {})  # none yet: the client creates it
        if method == "POST" and route == "/apis/v2beta1/experiments":
            return _json(200, {"experiment_id": "exp-1", "display_name": body.get("display_name")})
        if method == "POST" and route == "/apis/v2beta1/runs":
            return _json(200, {"run_id": "run-42", "display_name": body.get("display_name")})
        if method == "POST" and route == "/apis/v2beta1/recurringruns":
            return _json(200, {"recurring_run_id": "rr-7", "display_name": body.get("display_name")})
        return _json(404, {"error": "not found"})

    return respond


def test_schedule_sends_the_recurring_run_over_the_wire(
    http_server: Callable[[Responder], tuple[str, list[Recorded]]],
    capsys: pytest.CaptureFixture[str],
    package: Path,
) -> None:
    host, recorded = http_server(kfp_api())
    request = RecurringRunRequest(
        experiment="visionpipe",
        job_name="visionpipe-monthly",
        package_path=package,
        cron="0 0 3 1 * *",
        params={"seed": 3},
    )
    assert kc.schedule(host, request, token=SECRET) == "rr-7"
    posted = [r for r in recorded if r.method == "POST" and r.path == "/apis/v2beta1/recurringruns"]
    assert len(posted) == 1
    body = posted[0].body
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 1 * *"}}
    assert body["max_concurrency"] == 1 and body["no_catchup"] is True and body["mode"] == "ENABLE"
    assert body["experiment_id"] == "exp-1" and body["display_name"] == "visionpipe-monthly"
    assert body["runtime_config"] == {"parameters": {"seed": 3}}
    spec = body["pipeline_spec"]
    assert isinstance(spec, dict) and spec["pipelineInfo"]["name"] == "visionpipe-tiny"
    assert all(r.authorization == f"Bearer {SECRET}" for r in recorded if r.path != "/apis/v2beta1/healthz")
    assert SECRET not in capsys.readouterr().out


def test_submit_cli_starts_one_run(
    http_server: Callable[[Responder], tuple[str, list[Recorded]]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    package: Path,
) -> None:
    host, recorded = http_server(kfp_api())
    monkeypatch.setenv("KFP_TOKEN", SECRET)
    code = cli_main(["submit", "--host", host, "--package", str(package), "-p", "seed=5", "--run-name", "r1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "run id: run-42" in out and SECRET not in out + err
    runs = [r for r in recorded if r.path == "/apis/v2beta1/runs"]
    assert runs[0].body["display_name"] == "r1"
    assert runs[0].body["runtime_config"] == {"parameters": {"seed": 5}}
    assert runs[0].authorization == f"Bearer {SECRET}"


@pytest.mark.parametrize(
    ("fail", "error", "fragment"),
    [
        ({"POST /apis/v2beta1/recurringruns": (400, "invalid cron")}, KfpApiError, "HTTP 400: invalid cron"),
        ({"POST /apis/v2beta1/experiments": (403, "no access to namespace")}, KfpAuthError, "HTTP 403"),
    ],
)
def test_api_errors_are_named(
    http_server: Callable[[Responder], tuple[str, list[Recorded]]],
    fail: dict[str, tuple[int, str]],
    error: type[Exception],
    fragment: str,
    package: Path,
) -> None:
    host, _ = http_server(kfp_api(fail))
    request = RecurringRunRequest("visionpipe", "job", package, "0 0 3 1 * *")
    with pytest.raises(error) as err:
        kc.schedule(host, request)
    assert fragment in str(err.value) and host in str(err.value)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_closed_port_is_a_connection_error(capsys: pytest.CaptureFixture[str], package: Path) -> None:
    host = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(KfpConnectionError) as err:
        kc.probe(host, timeout=1.0)
    message = str(err.value)
    assert host in message and "connection refused" in message and "port-forward" in message
    code = cli_main(["submit", "--host", host, "--package", str(package), "--token", SECRET])
    captured = capsys.readouterr()
    assert code == 1 and "cannot reach the Kubeflow Pipelines endpoint" in captured.err
    assert SECRET not in captured.out + captured.err


def test_silent_port_times_out() -> None:
    with socket.socket() as listener:  # accepts connections (kernel backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        host = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(KfpConnectionError, match="timed out"):
            kc.probe(host, timeout=0.3)


def test_dns_failure_reason() -> None:
    assert "DNS lookup failed" in kc._network_reason(socket.gaierror(-2, "Name or service not known"))


@pytest.mark.parametrize(
    ("response", "error", "fragments"),
    [
        ((404, "text/plain", b"404 page not found"), KfpConnectionError, ["HTTP 404", "no KFP API at this URL"]),
        ((503, "text/plain", b"upstream down"), KfpConnectionError, ["HTTP 503", "not ready"]),
        ((401, "text/plain", b"unauthorized"), KfpAuthError, ["HTTP 401", "--token", "KF_PIPELINES_TOKEN"]),
        ((200, "text/html", b"<html>Log in</html>"), KfpConnectionError, ["login page", "--token"]),
    ],
)
def test_reachable_but_not_kfp(
    http_server: Callable[[Responder], tuple[str, list[Recorded]]],
    response: tuple[int, str, bytes],
    error: type[Exception],
    fragments: list[str],
) -> None:
    host, recorded = http_server(lambda _m, _p, _b: response)
    with pytest.raises(error) as err:
        kc.probe(host, token=SECRET, timeout=2.0)
    message = str(err.value)
    assert host in message and SECRET not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert recorded[0].path == kc.HEALTHZ_PATH and recorded[0].authorization == f"Bearer {SECRET}"


# --------------------------------------------------------------------------------------------- destination
@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        (["submit", "--pipeline", "training"], "destination='bundles' (the default of training.yaml)"),
        (["schedule", "--pipeline", "monthly-retrain"], "(the default of monthly-retrain.yaml)"),
        (["submit", "--pipeline", "training", "-p", "destination=/tmp/out"], "destination='/tmp/out' (-p destination)"),
        (["submit", "--pipeline", "training", "-p", "destination=s3://"], "destination='s3://'"),
        (["submit", "--pipeline", "training", "--dry-run"], "destination='bundles'"),
    ],
)
def test_local_destination_is_refused_before_contacting_the_server(
    http_server: Callable[[Responder], tuple[str, list[Recorded]]],
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    shown: str,
) -> None:
    host, recorded = http_server(kfp_api())
    assert cli_main([*argv, "--host", host]) == 2
    err = capsys.readouterr().err
    assert shown in err and "is not an s3:// URI" in err
    assert "pass -p destination=s3://<bucket>/bundles" in err
    assert recorded == []  # refused before any request, the healthz probe included


def test_s3_destination_is_accepted(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["schedule", "--dry-run", "--pipeline", "monthly-retrain", "-p", "destination=s3://models/bundles"]
    assert cli_main(argv) == 0
    assert json.loads(capsys.readouterr().out)["params"]["destination"] == "s3://models/bundles"


def test_package_without_destination_parameter_is_not_checked(package: Path) -> None:
    kc.check_destination(package, {"seed": 1})  # the tiny package publishes nothing: no destination to check


# --------------------------------------------------------------------------------------------- namespace
def _kubeconfig(path: Path, namespace: str | None) -> Path:
    context = {"cluster": "c", "user": "u", **({"namespace": namespace} if namespace else {})}
    path.write_text(
        json.dumps(  # JSON is YAML
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "team",
                "contexts": [{"name": "team", "context": context}, {"name": "other", "context": {"cluster": "c"}}],
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}],
                "users": [{"name": "u", "user": {"token": SECRET}}],
            }
        )
    )
    return path


def test_namespace_comes_from_the_kube_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], package: Path
) -> None:
    config = _kubeconfig(tmp_path / "config", "kubeflow-user-example-com")
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'absent'}:{config}")  # a list, as kubectl takes it
    assert cli_main(["submit", "--dry-run", "--package", str(package)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["namespace"] == "kubeflow-user-example-com"
    assert "kube context 'team'" in printed["namespace_source"] and SECRET not in json.dumps(printed)
    assert cli_main(["submit", "--dry-run", "--package", str(package), "-n", "team-b"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["namespace"] == "team-b" and printed["namespace_source"] == "--namespace"


@pytest.mark.parametrize("content", [None, "no namespace", "not: [yaml"])
def test_no_kube_namespace(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "config"
    if content == "no namespace":
        _kubeconfig(path, None)
    elif content is not None:
        path.write_text(content)
    namespace, source = kc.kube_context_namespace({"KUBECONFIG": str(path)})
    assert namespace is None and str(path) in source


def test_multi_user_without_namespace_is_refused(
    http_server: Callable[[Responder], tuple[str, list[Recorded]]],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    package: Path,
) -> None:
    host, recorded = http_server(kfp_api(multi_user=True))
    monkeypatch.setenv("KUBECONFIG", str(_kubeconfig(tmp_path / "config", None)))
    for command in (["submit"], ["schedule", "--cron", "0 0 3 1 * *"]):
        assert cli_main([*command, "--host", host, "--package", str(package)]) == 1
        err = capsys.readouterr().err
        assert "multi-user mode" in err and "no namespace" in err and "has no namespace" in err
        assert "--namespace" in err and "kubectl config set-context --current --namespace=" in err
    assert [r.path for r in recorded] == [kc.HEALTHZ_PATH, kc.HEALTHZ_PATH]  # nothing created


def test_multi_user_run_goes_to_the_kube_context_namespace(
    http_server: Callable[[Responder], tuple[str, list[Recorded]]],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    package: Path,
) -> None:
    host, recorded = http_server(kfp_api(multi_user=True))
    monkeypatch.setenv("KUBECONFIG", str(_kubeconfig(tmp_path / "config", "kubeflow-user-example-com")))
    assert cli_main(["submit", "--host", host, "--package", str(package), "--run-name", "r"]) == 0, capsys.readouterr()
    created = [r for r in recorded if r.method == "POST" and r.path == "/apis/v2beta1/experiments"]
    assert created and created[0].body["namespace"] == "kubeflow-user-example-com"
    listed = [r for r in recorded if r.method == "GET" and r.path.startswith("/apis/v2beta1/experiments")]
    assert listed and "namespace=kubeflow-user-example-com" in listed[0].path
    assert any(r.path == "/apis/v2beta1/runs" for r in recorded)


def test_single_user_needs_no_namespace(
    http_server: Callable[[Responder], tuple[str, list[Recorded]]], package: Path
) -> None:
    host, _ = http_server(kfp_api(multi_user=False))
    request = RunRequest("visionpipe", "r", package)
    assert request.namespace is None
    assert kc.submit(host, request) == "run-42"
