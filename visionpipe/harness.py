"""Start and stop server processes on loopback, for the demo, the benches and the tests (not serving runtime).

    from visionpipe.harness import free_port, running_server
    port = free_port()
    with running_server([sys.executable, "-m", "visionpipe.serving.server", f"--http_port={port}", ...], port) as
    server:
        httpx.post(f"{server.base_url}/v1/models/digits:predict", json=...)

Every process is stopped by its own PID (SIGTERM, then SIGKILL after a timeout).
"""

from __future__ import annotations

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
from typing import IO

from visionpipe.serving.server_util import LOOPBACK, READY_PATH, ServerStartError


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


def answers_ok(url: str, timeout_s: float = 1.0) -> bool:
    """One probe: does `url` answer HTTP 200 within `timeout_s`? (Refused, reset, timed out or any other status:
    False.) The readiness loops here and in tests/containers.py poll with it."""
    with (
        contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError, OSError),
        urllib.request.urlopen(url, timeout=timeout_s) as answer,
    ):
        return bool(answer.status == 200)
    return False


def wait_until_ready(server: ServerProcess, ready_path: str, timeout_s: float) -> None:
    url = f"{server.base_url}{ready_path}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ServerStartError(
                f"server {list(server.argv)} exited with {server.process.returncode} before "
                f"{url} was ready; log tail:\n{server.log_tail()}"
            )
        if answers_ok(url):
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
