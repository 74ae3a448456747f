"""Peer servers for bench/serve.py's side-by-side rows: the same bundle served by MLServer, PyTriton and BentoML.

The peers cannot share visionpipe's lock (``mlserver>=1.6`` needs starlette < 0.40, kserve 0.21 needs >= 1.3.1:
`uv lock` finds no solution), so each has its own small uv project, ``bench/peers/<name>/pyproject.toml`` +
``uv.lock``, synced into ``bench/peers/<name>/.venv`` (gitignored) by `ensure`. Each pins visionpipe's torch,
numpy, pillow, scipy, safetensors and cryptography (PyTriton: numpy < 2, its own requirement), and the peer
process imports visionpipe from this repository (``PYTHONPATH``) for the bundle, the preprocessing, the model
forward, the calibrator and the policy (bench/peers/peer_side/vp_peer_model.py): only the serving differs.

    from bench import peers            # or `import peers` from a script in bench/
    peers.available()                  # {"mlserver": None, "pytriton": None, "bentoml": "why not"}
    peers.ensure("mlserver")           # uv sync --frozen of its lock (bounded time, progress lines)
    proc, url = peers.start("mlserver", bundle_dir, port, max_batch_size=32, max_wait_ms=2.0)
    body = peers.request_body("mlserver", png_b64)           # bytes to POST to url + peers.infer_path(...)
    labels = peers.parse_labels("mlserver", answer_bytes)     # and parse_probabilities(...)
    peers.cpu_seconds(proc)            # CPU seconds of the peer's whole process tree (several processes)
    peers.stop(proc)                   # SIGTERM by PID, then SIGKILL of it and its own descendants, by PID
    with peers.running("pytriton", bundle_dir, port, 32, 2.0) as (proc, url): ...   # start + stop

Each peer runs the model with `torch_threads` intra-op threads (default 2, OMP_NUM_THREADS too) and one model
instance; bench/peers/smoke.py checks by hand that every peer's labels and probabilities equal our server's.

Requests (every peer gets the same PNG, base64, one image per request; TTA off):

- ``mlserver``: v2 REST, POST /v2/models/<model>/infer, one BYTES input of shape [1] (the body our server
  takes); answer: outputs ``probabilities`` FP32 [1, C], ``label`` INT64 [1].
- ``pytriton``: the same, but shape [1, 1]: a batching Triton model has a batch dimension plus at least one
  per-sample dimension (Triton answers shape [1] with 400 "unexpected shape for input 'image' for model
  'digits'. Expected [-1,1], got [1]"); answer ``label`` INT64 [1, 1].
- ``bentoml``: the v2 body our server takes, byte for byte, at POST /v2/models/<model>/infer: its batchable API
  takes the ``inputs`` list (one v2 tensor per request) and answers a JSON list with one
  ``{"probabilities": [[...]], "label": [...]}`` per tensor.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PEER_SIDE = HERE / "peer_side"
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Peer:
    name: str
    distribution: str  # the peer's own distribution, pinned in its uv.lock
    version: str
    batching: str  # how it batches, for the bench's table notes
    # Ready = the MODEL is ready: PyTriton's Triton answers /v2/health/ready before `bind` has loaded the model
    # (explicit model control), so the v2 peers are polled at /v2/models/<model>/ready; BentoML at /readyz.
    ready_path: str = "/v2/models/{model}/ready"


PEERS: dict[str, Peer] = {
    "mlserver": Peer(
        "mlserver",
        "mlserver",
        "1.7.1",
        "adaptive batching: model-settings max_batch_size, max_batch_time = max_wait_ms / 1000 s",
    ),
    "pytriton": Peer(
        "pytriton",
        "nvidia-pytriton",
        "0.7.0",
        "Triton dynamic batcher: max_batch_size, DynamicBatcher(max_queue_delay_microseconds = max_wait_ms * 1000)",
    ),
    "bentoml": Peer(
        "bentoml",
        "bentoml",
        "1.4.40",
        "adaptive batching: @bentoml.api(batchable=True, max_batch_size, max_latency_ms); its dispatcher picks "
        "the wait itself (max_wait_ms is not a BentoML setting)",
        ready_path="/readyz",
    ),
}


class PeerError(RuntimeError):
    """A peer could not be installed, started or asked; the message says which and why."""


def _check_name(name: str) -> Peer:
    if name not in PEERS:
        raise PeerError(f"unknown peer {name!r}; the peers are {sorted(PEERS)}")
    return PEERS[name]


def project_dir(name: str) -> Path:
    return HERE / _check_name(name).name


def venv_python(name: str) -> Path:
    return project_dir(name) / ".venv" / "bin" / "python"


def _site_packages(name: str) -> Path:
    return (
        project_dir(name)
        / ".venv"
        / "lib"
        / f"python{sys.version_info.major}.{sys.version_info.minor}"
        / ("site-packages")
    )


def _platform_problem(name: str) -> str | None:
    if name != "pytriton":
        return None
    machine = platform.machine()
    libc, version = platform.libc_ver()
    if machine != "x86_64" and machine != "aarch64":
        return f"nvidia-pytriton 0.7.0 ships wheels for x86_64 / aarch64 Linux only; this machine is {machine}"
    parts = tuple(int(p) for p in version.split(".")[:2]) if version else (0, 0)
    if libc != "glibc" or parts < (2, 35):
        return f"nvidia-pytriton 0.7.0's wheels are manylinux_2_35 (glibc >= 2.35); this machine has {libc} {version}"
    return None


def available() -> dict[str, str | None]:
    """Each peer -> None when it can be started now, else why not (no lock, not synced, wrong platform)."""
    out: dict[str, str | None] = {}
    for name, peer in PEERS.items():
        problem = _platform_problem(name)
        if problem is None and not (project_dir(name) / "uv.lock").is_file():
            problem = f"{project_dir(name)}/uv.lock is missing"
        if problem is None and not venv_python(name).exists():
            problem = f"its venv is not synced: call bench.peers.ensure({name!r})"
        dist = peer.distribution.replace("-", "_")
        if problem is None and not (_site_packages(name) / f"{dist}-{peer.version}.dist-info").is_dir():
            problem = f"{peer.distribution} {peer.version} is not installed in its venv: call ensure({name!r})"
        out[name] = problem
    return out


def _uv() -> str:
    local = REPO / ".venv" / "bin" / "uv"
    found = str(local) if local.exists() else shutil.which("uv")
    if found is None:
        raise PeerError("uv is not installed (expected .venv/bin/uv, from visionpipe's dev extra, or uv on PATH)")
    return found


def ensure(name: str, timeout_s: float = 900.0, log: Callable[[str], None] = print) -> None:
    """Sync the peer's venv from its lock (``uv sync --frozen``), printing uv's progress; bounded by `timeout_s`.

    torch comes from uv's cache when visionpipe's venv was synced on this machine (a hardlink, seconds)."""
    problem = _platform_problem(name)
    if problem is not None:
        raise PeerError(f"{name}: {problem}")
    directory = project_dir(name)
    argv = [_uv(), "sync", "--frozen", "--no-install-project", "--project", str(directory)]
    log(f"{name}: {' '.join(argv[1:])}")
    t0 = time.monotonic()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=directory, text=True)
    lines: list[str] = []
    timer = threading.Timer(timeout_s, process.kill)
    timer.start()
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip())
            log(f"{name}: {line.rstrip()}")
        code = process.wait()
    finally:
        timer.cancel()
    if code != 0:
        why = f"timed out after {timeout_s:.0f} s" if time.monotonic() - t0 >= timeout_s else f"exit code {code}"
        raise PeerError(f"{name}: uv sync --frozen failed ({why}); last lines:\n" + "\n".join(lines[-20:]))
    missing = available()[name]
    if missing is not None:
        raise PeerError(f"{name}: synced, yet not available: {missing}")
    log(f"{name}: venv ready in {time.monotonic() - t0:.1f} s")


# ------------------------------------------------------------------------------------------- processes
@dataclass
class _Started:
    name: str
    log_path: Path
    log_file: object
    workdir: Path | None


_STARTED: dict[int, _Started] = {}


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def _env(name: str, torch_threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(PEER_SIDE)])
    env["OMP_NUM_THREADS"] = str(torch_threads)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench/serve.py sets for our server
    if name == "pytriton":
        # The bundled triton_python_backend_stub links libpython3.11.so.1.0 and takes the first one the loader
        # finds; it must be the venv interpreter's own (a system libpython of another 3.11 patch release fails in
        # multiprocessing: "'_thread.RLock' object has no attribute '_recursion_count'").
        libdir = subprocess.run(
            [str(venv_python(name)), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    if name == "bentoml":
        env["BENTOML_DO_NOT_TRACK"] = "True"  # no usage telemetry (nothing leaves loopback)
    return env


def start(
    name: str,
    bundle_dir: str | Path,
    port: int,
    max_batch_size: int,
    max_wait_ms: float,
    *,
    model_name: str = "digits",
    torch_threads: int = 2,
    workers: int = 1,
    max_latency_ms: float = 60_000.0,
    timeout_s: float = 180.0,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start peer `name` serving `bundle_dir` on 127.0.0.1:`port` with its batching on; wait until it is ready.

    Returns (process, base URL). `max_wait_ms`: MLServer's ``max_batch_time`` (seconds = ms / 1000), Triton's
    ``max_queue_delay_microseconds`` (ms * 1000); BentoML has no such setting (its dispatcher picks the wait)
    and takes `max_latency_ms` instead, an SLO past which it refuses a queued call with 503 (default: its own
    default, 60 s, so nothing is refused). `workers`: MLServer's ``parallel_workers`` (its default, 1: inference
    in one worker process beside the HTTP process; 0: in the HTTP process); ignored by the others (one model
    instance each). Every other port a peer opens (gRPC, metrics) is a free loopback port too. On failure the
    process is stopped and `PeerError` carries its log tail."""
    _check_name(name)
    problem = available()[name]
    if problem is not None:
        raise PeerError(f"{name} is not available: {problem}")
    if max_batch_size < 1 or max_wait_ms < 0 or torch_threads < 1:
        raise PeerError(
            f"{name}: max_batch_size={max_batch_size} (>= 1), max_wait_ms={max_wait_ms} (>= 0) and "
            f"torch_threads={torch_threads} (>= 1) are out of range"
        )
    bundle = Path(bundle_dir).resolve()
    if not (bundle / "bundle.json").is_file():
        raise PeerError(
            f"{bundle}: no bundle.json; pass a bundle folder (bench/serve.py builds bench/out/serve-bundle)"
        )
    workdir = Path(tempfile.mkdtemp(prefix=f"peer-{name}-"))
    env_extra: dict[str, str] = {}
    python = str(venv_python(name))
    cwd: Path = workdir
    if name == "mlserver":
        (workdir / "settings.json").write_text(
            json.dumps(
                {
                    "host": LOOPBACK,
                    "http_port": port,
                    "grpc_port": _free_port(),
                    "metrics_port": _free_port(),
                    "parallel_workers": workers,
                    "debug": False,
                    "metrics_dir": str(workdir / ".metrics"),
                }
            )
        )
        (workdir / "model").mkdir()
        (workdir / "model" / "model-settings.json").write_text(
            json.dumps(
                {
                    "name": model_name,
                    "implementation": "vp_mlserver.VisionpipeRuntime",
                    "max_batch_size": max_batch_size,
                    "max_batch_time": max_wait_ms / 1000.0,
                    "parameters": {"uri": str(bundle), "extra": {"torch_threads": torch_threads}},
                }
            )
        )
        argv = [str(Path(python).parent / "mlserver"), "start", str(workdir)]
    elif name == "pytriton":
        argv = [
            python,
            str(PEER_SIDE / "vp_pytriton.py"),
            f"--bundle={bundle}",
            f"--http-port={port}",
            f"--grpc-port={_free_port()}",
            f"--metrics-port={_free_port()}",
            f"--model-name={model_name}",
            f"--max-batch-size={max_batch_size}",
            f"--max-wait-ms={max_wait_ms}",
            f"--torch-threads={torch_threads}",
        ]
    else:
        env_extra = {
            "VP_PEER_BUNDLE": str(bundle),
            "VP_PEER_MODEL_NAME": model_name,
            "VP_PEER_MAX_BATCH_SIZE": str(max_batch_size),
            "VP_PEER_MAX_LATENCY_MS": str(int(max_latency_ms)),
            "VP_PEER_TORCH_THREADS": str(torch_threads),
            "BENTOML_HOME": str(workdir / "bentoml-home"),
        }
        argv = [
            str(Path(python).parent / "bentoml"),
            "serve",
            "vp_bentoml:VisionpipeService",
            "--host",
            LOOPBACK,
            "--port",
            str(port),
            "--working-dir",
            str(PEER_SIDE),
        ]
        cwd = PEER_SIDE
    log_path = workdir / "server.log"
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        argv, stdout=log_file, stderr=subprocess.STDOUT, env={**_env(name, torch_threads), **env_extra}, cwd=cwd
    )
    _STARTED[process.pid] = _Started(name, log_path, log_file, workdir)
    url = f"http://{LOOPBACK}:{port}"
    try:
        _wait_ready(process, url + PEERS[name].ready_path.format(model=model_name), timeout_s, log_path)
    except PeerError:
        stop(process)
        raise
    return process, url


@contextlib.contextmanager
def running(
    name: str,
    bundle_dir: str | Path,
    port: int,
    max_batch_size: int,
    max_wait_ms: float,
    *,
    model_name: str = "digits",
    torch_threads: int = 2,
    workers: int = 1,
    max_latency_ms: float = 60_000.0,
    timeout_s: float = 180.0,
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`start` as a context manager: (process, base URL), stopped by PID on exit whatever happens."""
    process, url = start(
        name,
        bundle_dir,
        port,
        max_batch_size,
        max_wait_ms,
        model_name=model_name,
        torch_threads=torch_threads,
        workers=workers,
        max_latency_ms=max_latency_ms,
        timeout_s=timeout_s,
    )
    try:
        yield process, url
    finally:
        stop(process)


def log_tail(process: subprocess.Popen[bytes], chars: int = 4000) -> str:
    started = _STARTED.get(process.pid)
    if started is None:
        return ""
    try:
        return started.log_path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _wait_ready(process: subprocess.Popen[bytes], url: str, timeout_s: float, log_path: Path) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PeerError(
                f"{process.args!r} exited with {process.returncode} before {url} was ready; log tail:\n"
                + log_path.read_text(errors="replace")[-4000:]
            )
        with (
            contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError, OSError),
            urllib.request.urlopen(url, timeout=1.0) as answer,
        ):
            if answer.status == 200:
                return
        time.sleep(0.2)
    raise PeerError(
        f"{url} not ready after {timeout_s:.0f} s; log tail:\n" + log_path.read_text(errors="replace")[-4000:]
    )


def _children(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of every descendant, so a PID reused after exit is never signalled."""
    found: list[tuple[int, str]] = []
    todo = [pid]
    while todo:
        for child in _children(todo.pop()):
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{child}/stat").read_text()
                found.append((child, stat[stat.rindex(")") + 2 :].split()[19]))
                todo.append(child)
    return found


def stop(process: subprocess.Popen[bytes], timeout_s: float = 40.0) -> int:
    """Stop a peer started by `start`: SIGTERM to its PID (each peer shuts its own children down), SIGKILL after
    `timeout_s`; then any of its descendants still alive (recorded before, PID + start time) get SIGKILL by PID.
    Returns the exit code."""
    descendants = _descendants(process.pid) if process.poll() is None else []
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)
    deadline = time.monotonic() + 10.0
    for pid, started_at in descendants:
        while time.monotonic() < deadline and _alive(pid, started_at):
            time.sleep(0.1)
        if _alive(pid, started_at):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    started = _STARTED.pop(process.pid, None)
    if started is not None:
        close = getattr(started.log_file, "close", None)
        if callable(close):
            close()
        if started.workdir is not None:
            shutil.rmtree(started.workdir, ignore_errors=True)
    return int(process.returncode)


def _alive(pid: int, started_at: str) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[19] == started_at and fields[0] != "Z"


def cpu_seconds(process: subprocess.Popen[bytes]) -> float:
    """User + system CPU seconds of the peer's whole live process tree (a peer spreads its work over several
    processes: MLServer's inference worker, tritonserver and the Python backend stub, BentoML's workers), from
    /proc/<pid>/stat; bench/serve.py's CPU ms / request for a peer row is the difference over a level."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in [process.pid, *(p for p, _ in _descendants(process.pid))]:
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (proc(5) fields 14, 15)
    return total / ticks


# ----------------------------------------------------------------------------------------------- requests
def infer_path(name: str, model_name: str = "digits") -> str:
    _check_name(name)
    return f"/v2/models/{model_name}/infer"


def request_body(name: str, png_b64: str | list[str]) -> bytes:
    """The POST body for one request of base64 PNG(s) (module docstring: the shape differs for pytriton only)."""
    _check_name(name)
    images = [png_b64] if isinstance(png_b64, str) else list(png_b64)
    shape = [len(images), 1] if name == "pytriton" else [len(images)]
    return json.dumps({"inputs": [{"name": "image", "shape": shape, "datatype": "BYTES", "data": images}]}).encode()


def _outputs(name: str, answer: bytes) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    decoded = json.loads(answer)
    if name == "bentoml":
        if not isinstance(decoded, list):
            raise PeerError(f"bentoml: expected a JSON list of answers, got {str(decoded)[:200]}")
        rows = [row for item in decoded for row in item["probabilities"]]
        labels = [label for item in decoded for label in item["label"]]
        return np.asarray(rows, np.float32), np.asarray(labels, np.int64)
    outputs = {o["name"]: o for o in decoded["outputs"]}
    p = outputs["probabilities"]
    probs: npt.NDArray[np.float32] = np.asarray(p["data"], np.float32).reshape(p["shape"])
    return probs, np.asarray(outputs["label"]["data"], np.int64).reshape(-1)


def parse_labels(name: str, answer: bytes) -> list[int]:
    """The labels (-1 = abstain) of an answer body, one per image."""
    return [int(v) for v in _outputs(_check_name(name).name, answer)[1]]


def parse_probabilities(name: str, answer: bytes) -> npt.NDArray[np.float32]:
    """The calibrated probabilities [N, C] of an answer body."""
    return _outputs(_check_name(name).name, answer)[0]


def infer(
    name: str, url: str, pngs: list[bytes], model_name: str = "digits", timeout_s: float = 60.0
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """One request with these encoded images (raw PNG bytes); (probabilities, labels). For smoke checks."""
    import urllib.request

    body = request_body(name, [base64.b64encode(p).decode("ascii") for p in pngs])
    request = urllib.request.Request(
        url + infer_path(name, model_name), body, {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as answer:
        return _outputs(name, answer.read())
