"""Run KServe's ModelServer on a chosen interface, and start/stop server processes for tests.

KServe 0.21's `ModelServer` hard-codes ``host="0.0.0.0"`` for REST and ``[::]`` for gRPC. `run_model_server`
serves the same FastAPI app (the v1/v2 protocol endpoints, /metrics, health) but binds the host you give:
``127.0.0.1`` (the default) for local use and tests, ``0.0.0.0`` inside a container.

Use in a ``python -m`` entry point::

    from serving.server_util import run_model_server
    model = MyPredictor(name=args.model_name, ...)   # a kserve.Model; load() it first so model.ready is True
    run_model_server([model], host=args.host, http_port=args.http_port, grpc_port=None)   # blocks

Use in a test (the server runs in a subprocess on a free loopback port and is stopped by its PID)::

    from serving.server_util import free_port, running_server
    port = free_port()
    with running_server([sys.executable, "-m", "serving.server", f"--http_port={port}", ...], port) as server:
        httpx.post(f"{server.base_url}/v1/models/digits:predict", json=...)

This module imports kserve lazily in `run_model_server`, so the process helpers stay cheap to import.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import kserve

LOOPBACK = "127.0.0.1"
READY_PATH = "/v2/health/ready"


class ServerStartError(RuntimeError):
    """A server process exited or did not become ready in time; the message carries its log tail."""


# ----------------------------------------------------------------------------------------- serving in-process
def run_model_server(
    models: Sequence[kserve.Model],
    *,
    host: str = LOOPBACK,
    http_port: int = 8080,
    grpc_port: int | None = None,
    grace_period_s: int = 10,
) -> None:
    """Serve `models` with KServe's REST app on ``host:http_port`` (and gRPC on ``host:grpc_port`` if given).

    Blocks until SIGTERM/SIGINT. At least one model must be ready (KServe raises NoModelReady otherwise).
    """
    server = _host_bound_model_server(
        host=host, http_port=http_port, grpc_port=grpc_port, grace_period_s=grace_period_s
    )
    server.start(list(models))


def _host_bound_model_server(
    *, host: str, http_port: int, grpc_port: int | None, grace_period_s: int
) -> kserve.ModelServer:
    from kserve import ModelServer
    from kserve.protocol.grpc.server import GRPCServer
    from kserve.protocol.rest.server import RESTServer

    class HostBoundModelServer(ModelServer):  # type: ignore[misc]
        """ModelServer whose REST (and gRPC) listeners bind `host` instead of all interfaces."""

        def start(self, models: list[kserve.Model]) -> None:
            self._register_and_check_atleast_one_model_is_ready(models)
            self._rest_server = RESTServer(
                "kserve.model_server:app",
                self.dataplane,
                self.model_repository_extension,
                self.http_port,
                access_log_format=self.access_log_format,
                workers=1,
                grace_period=self.grace_period,
                event_loop=self.event_loop,
                timeout_keep_alive=self.timeout_keep_alive,
            )
            # uvicorn.Server keeps a reference to this Config object, so the host is read at serve() time.
            self._rest_server.config.host = host
            self.servers.append(self._rest_server.start())
            if grpc_port is not None:
                self._grpc_server = GRPCServer(
                    grpc_port,
                    self.dataplane,
                    self.model_repository_extension,
                    kwargs={},
                    grace_period=self.grace_period,
                )
                self.servers.append(_grpc_on_host(self._grpc_server, host, grpc_port, self.max_threads))
            self.setup_event_loop()
            self.register_signal_handler()
            asyncio.run(self._serve())

    return HostBoundModelServer(
        http_port=http_port,
        grpc_port=grpc_port or 0,
        workers=1,
        enable_grpc=grpc_port is not None,
        grace_period=grace_period_s,
    )


async def _grpc_on_host(grpc_server: object, host: str, port: int, max_threads: int) -> None:
    """KServe's GRPCServer.start with the listen address bound to `host` instead of ``[::]``."""
    import importlib
    from concurrent import futures

    aio = importlib.import_module("grpc.aio")  # no type stubs for grpc in the project's dependencies
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
    from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
    from kserve.protocol.grpc.servicer import InferenceServicer

    servicer = InferenceServicer(
        grpc_server._data_plane,  # type: ignore[attr-defined]
        grpc_server._model_repository_extension,  # type: ignore[attr-defined]
    )
    server = aio.server(
        futures.ThreadPoolExecutor(max_workers=max_threads),
        interceptors=(LoggingInterceptor(), ExceptionToStatusInterceptor()),
    )
    grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"{host}:{port}")
    grpc_server._server = server  # type: ignore[attr-defined]  # so ModelServer.stop() stops it
    await server.start()
    await server.wait_for_termination()


# ----------------------------------------------------------------------------------------- server processes
def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free on `host` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


@dataclass
class ServerProcess:
    """A server started by `start_server`; stop it with `stop()` (SIGTERM, then SIGKILL after a timeout)."""

    process: subprocess.Popen[bytes]
    port: int
    argv: tuple[str, ...] = ()
    host: str = LOOPBACK
    log_path: Path = field(default_factory=lambda: Path(os.devnull))
    _log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 10.0) -> int:
        """Terminate by PID, kill if it has not exited after `timeout_s`; returns the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)
        if self._log is not None:
            self._log.close()
            self._log = None
        return int(self.process.returncode)


def start_server(
    argv: Sequence[str],
    port: int,
    *,
    host: str = LOOPBACK,
    ready_path: str = READY_PATH,
    timeout_s: float = 30.0,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
) -> ServerProcess:
    """Start `argv` (it must make the server listen on ``host:port``); wait until `ready_path` answers 200.

    Output goes to a temporary log file (never a pipe, which could fill up and block the server). On failure
    the process is stopped and `ServerStartError` carries the log tail.
    """
    log_file = tempfile.NamedTemporaryFile(prefix="server-", suffix=".log", delete=False)  # noqa: SIM115
    process = subprocess.Popen(
        list(argv), stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=False
    )
    server = ServerProcess(
        process=process, port=port, argv=tuple(argv), host=host, log_path=Path(log_file.name), _log=log_file
    )
    try:
        wait_until_ready(server, ready_path, timeout_s)
    except ServerStartError:
        server.stop()
        raise
    return server


def wait_until_ready(server: ServerProcess, ready_path: str, timeout_s: float) -> None:
    url = f"{server.base_url}{ready_path}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ServerStartError(
                f"server {list(server.argv)} exited with {server.process.returncode} before "
                f"{url} was ready; log tail:\n{server.log_tail()}"
            )
        with (
            contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError, OSError),
            urllib.request.urlopen(url, timeout=1.0) as answer,
        ):
            if answer.status == 200:
                return
        time.sleep(0.1)
    raise ServerStartError(f"{url} not ready after {timeout_s:.0f} s; log tail:\n{server.log_tail()}")


@contextlib.contextmanager
def running_server(
    argv: Sequence[str],
    port: int,
    *,
    host: str = LOOPBACK,
    ready_path: str = READY_PATH,
    timeout_s: float = 30.0,
    env: dict[str, str] | None = None,
) -> Iterator[ServerProcess]:
    """`start_server` as a context manager: the process is stopped by PID on exit, whatever happens."""
    server = start_server(argv, port, host=host, ready_path=ready_path, timeout_s=timeout_s, env=env)
    try:
        yield server
    finally:
        server.stop()
        with contextlib.suppress(OSError):
            server.log_path.unlink()
