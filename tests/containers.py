"""Test helpers for the project image (tests/test_image.py): find or build it once per session, run containers
with podman, bounded by timeouts, and stop only the containers these helpers started (by container id).

The sandbox quirk: this machine forbids setting another process's rlimits, so podman's default runtime (runc)
fails with ``error setting rlimits``. The helpers run podman with ``CONTAINERS_CONF`` pointing at a
containers.conf rendered from ``containers/containers.conf.in`` whose runtime is ``containers/norlimit-runtime``
(deletes ``process.rlimits`` from the bundle's config.json, then execs runc). Users never need it.

The image: ``$VISIONPIPE_TEST_IMAGE`` (default ``localhost/visionpipe:dev``). Once per session
``containers/build.sh`` (= ``make image``) brings it up to date with the working tree: with buildah's layer cache
a code-only change rebuilds only the project step, and an unchanged tree reuses every layer.
``VISIONPIPE_TEST_IMAGE_BUILD=0`` uses the image as it is (it must exist).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from visionpipe.harness import answers_ok

if TYPE_CHECKING:
    import docker

REPO = Path(__file__).resolve().parents[1]
CONTAINERS_DIR = REPO / "containers"
WRAPPER = CONTAINERS_DIR / "norlimit-runtime"
CONF_TEMPLATE = CONTAINERS_DIR / "containers.conf.in"
BUILD_SCRIPT = CONTAINERS_DIR / "build.sh"
STATE_DIR = Path(os.environ.get("VISIONPIPE_CONTAINERS_DIR", "/var/tmp/visionpipe-containers"))
DEFAULT_IMAGE = "localhost/visionpipe:dev"
TOOLS = ("podman", "buildah", "runc")
INSTALL_HINT = "apt-get install -y buildah podman runc mmdebstrap"
# A cold build downloads about 5.5 GB of wheels and writes a ~10 GB layer; a warm one takes seconds to minutes.
BUILD_TIMEOUT_S = float(os.environ.get("VISIONPIPE_IMAGE_BUILD_TIMEOUT", "5400"))


def image_ref() -> str:
    return os.environ.get("VISIONPIPE_TEST_IMAGE", DEFAULT_IMAGE)


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def containers_conf() -> Path:
    """containers.conf naming the norlimit wrapper by its absolute path (rendered into STATE_DIR)."""
    text = CONF_TEMPLATE.read_text().replace("@NORLIMIT_RUNTIME@", str(WRAPPER))
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    path = STATE_DIR / "containers.conf"
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_name(f"{path.name}.{os.getpid()}")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(containers_conf())}


def podman(*args: str, timeout_s: float = 120.0, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``podman ARGS`` with the sandbox's containers.conf; never raises on a non-zero exit (callers assert)."""
    return subprocess.run(
        ["podman", *args],
        env=podman_env(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def image_exists(ref: str) -> bool:
    return podman("image", "exists", ref, timeout_s=60).returncode == 0


def inspect_image(ref: str) -> dict[str, object]:
    done = podman("image", "inspect", ref, timeout_s=60)
    assert done.returncode == 0, f"podman image inspect {ref}: {done.stderr}"
    found = json.loads(done.stdout)
    assert isinstance(found, list) and found and isinstance(found[0], dict)
    return found[0]


def build_image(ref: str) -> str:
    """Run containers/build.sh for `ref`; returns its last output line (id, size, seconds)."""
    done = subprocess.run(
        [str(BUILD_SCRIPT), ref],
        cwd=REPO,
        env=podman_env(),
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(
            f"containers/build.sh {ref} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-6000:]}"
        )
    return done.stdout.strip().splitlines()[-1]


def ensure_image() -> str:
    """The image reference, built / brought up to date once per session; skips (a failure under
    VISIONPIPE_NO_SKIPS=1) when podman, buildah or runc is missing."""
    missing = missing_tools()
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (install: {INSTALL_HINT})")
    ref = image_ref()
    if os.environ.get("VISIONPIPE_TEST_IMAGE_BUILD", "1") == "0":
        if not image_exists(ref):
            pytest.fail(f"VISIONPIPE_TEST_IMAGE_BUILD=0 but image {ref} does not exist; run `make image IMAGE={ref}`")
        return ref
    build_image(ref)
    return ref


def run_args(
    *,
    network: str = "none",
    env: Mapping[str, str] | None = None,
    volumes: Sequence[tuple[Path, str]] = (),
    user: str | None = None,
    ports: Sequence[tuple[int, int]] = (),
) -> list[str]:
    """podman run options: read-only bind mounts (host, container), loopback-only port publishing."""
    args = [f"--network={network}"]
    for key, value in (env or {}).items():
        args += ["--env", f"{key}={value}"]
    for host, target in volumes:
        args += ["--volume", f"{host}:{target}:ro"]
    if user is not None:
        args += ["--user", user]
    for host_port, container_port in ports:
        args += ["--publish", f"127.0.0.1:{host_port}:{container_port}"]
    return args


def run_in_image(
    ref: str,
    argv: Sequence[str],
    *,
    network: str = "none",
    env: Mapping[str, str] | None = None,
    volumes: Sequence[tuple[Path, str]] = (),
    user: str | None = None,
    entrypoint: str | None = None,
    timeout_s: float = 180.0,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """``podman run --rm`` one command in the image (no network unless asked), bounded by `timeout_s`."""
    options = run_args(network=network, env=env, volumes=volumes, user=user)
    if entrypoint is not None:
        options += ["--entrypoint", entrypoint]
    if stdin is not None:
        options.append("--interactive")
    return podman("run", "--rm", *options, ref, *argv, timeout_s=timeout_s, stdin=stdin)


def python_in_image(
    ref: str,
    code: str,
    *,
    env: Mapping[str, str] | None = None,
    volumes: Sequence[tuple[Path, str]] = (),
    timeout_s: float = 180.0,
) -> str:
    """Run `code` with the image's ``python`` (no network); returns stdout, fails with the output otherwise."""
    done = run_in_image(ref, ["python", "-c", code], env=env, volumes=volumes, timeout_s=timeout_s)
    assert done.returncode == 0, (
        f"python in {ref} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout


@dataclass
class Container:
    """A detached container started by `running_container` (stopped and removed by its id on exit)."""

    id: str
    ref: str

    def logs(self, chars: int = 6000) -> str:
        done = podman("logs", self.id, timeout_s=30)
        return (done.stdout + done.stderr)[-chars:]


@contextlib.contextmanager
def running_container(
    ref: str,
    argv: Sequence[str],
    *,
    entrypoint: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    volumes: Sequence[tuple[Path, str]] = (),
    ports: Sequence[tuple[int, int]] = (),
    ready_url: str | None = None,
    timeout_s: float = 120.0,
) -> Iterator[Container]:
    """``podman run -d`` (default network, ports published on 127.0.0.1 only); waits until `ready_url` answers
    200 (bounded by `timeout_s`); removes the container by its id on exit, whatever happens."""
    options = run_args(network="bridge", env=env, volumes=volumes, ports=ports)
    if entrypoint is not None:
        options += ["--entrypoint", json.dumps(list(entrypoint))]
    started = podman("run", "--detach", *options, ref, *argv, timeout_s=120)
    assert started.returncode == 0, f"podman run -d {ref}: {started.stderr[-3000:]}"
    container = Container(id=started.stdout.strip().splitlines()[-1], ref=ref)
    try:
        if ready_url is not None:
            wait_ready(container, ready_url, timeout_s)
        yield container
    finally:
        podman("rm", "--force", "--time", "5", container.id, timeout_s=60)


def wait_ready(container: Container, url: str, timeout_s: float) -> None:
    """Poll `url` until it answers 200 (bounded by `timeout_s`); fails with the container's log if it exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = podman("inspect", "--format", "{{.State.Running}}", container.id, timeout_s=30).stdout.strip()
        if state == "false":
            raise AssertionError(f"container {container.id[:12]} exited before {url} was ready:\n{container.logs()}")
        if answers_ok(url):
            return
        time.sleep(0.25)
    raise AssertionError(f"{url} not ready after {timeout_s:.0f} s:\n{container.logs()}")


# --------------------------------------------------------------------------- kfp.local.DockerRunner over podman
@contextlib.contextmanager
def podman_socket(timeout_s: float = 60.0) -> Iterator[str]:
    """``podman system service`` on a private unix socket (Docker's API, what kfp.local.DockerRunner's `docker`
    client speaks); yields the DOCKER_HOST value, and on exit ends that service by its PID (SIGTERM, then
    SIGKILL after 10 s)."""
    import docker

    STATE_DIR.mkdir(parents=True, exist_ok=True)
    socket = STATE_DIR / f"podman-{os.getpid()}.sock"
    socket.unlink(missing_ok=True)
    url = f"unix://{socket}"
    log = (STATE_DIR / f"podman-{os.getpid()}.log").open("w")
    ok = False
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", url], env=podman_env(), stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if service.poll() is not None:
                raise AssertionError(f"podman system service exited {service.returncode}: see {log.name}")
            if socket.exists():
                with contextlib.suppress(docker.errors.DockerException, OSError):
                    client = docker.DockerClient(base_url=url, timeout=10)
                    try:
                        if client.ping():
                            break
                    finally:
                        client.close()
            if time.monotonic() > deadline:
                raise AssertionError(f"podman's socket {socket} did not answer within {timeout_s:.0f} s")
            time.sleep(0.2)
        yield url
        ok = True
    finally:
        service.terminate()
        try:
            service.wait(timeout=10)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait(timeout=10)
        log.close()
        socket.unlink(missing_ok=True)
    if ok:  # kept for a look when something failed
        Path(log.name).unlink(missing_ok=True)


@dataclass(frozen=True)
class TaskContainer:
    """One task container that kfp.local.DockerRunner started: its image, command (the IR's command + resolved
    args) and exit code."""

    image: str
    command: tuple[str, ...]
    exit_code: int


def recording_container_runner(record: list[TaskContainer]) -> Callable[..., int]:
    """A stand-in for `kfp.local.docker_task_handler.run_docker_container` (kfp 2.17.3) that runs the same
    container with the same arguments, but keeps it until its exit code is read, then removes it by its id.

    Why: kfp's function starts the container with ``auto_remove=True`` and then streams its logs; when a task
    finishes first (a two-second task does), the container is already gone. Docker answers that with a 404, which
    kfp catches as ``docker.errors.NotFound`` and then *assumes exit code 0*; podman 4.3's Docker-compatible API
    answers ``500 ... no such container`` (an ``APIError``, not caught), so the first short task crashes the run.
    Waiting before removing gives the real exit code under both engines. The rest of DockerRunner (the image and
    command from the compiled IR, the pipeline root bind-mounted at its own path, the executor input) is kfp's."""
    from kfp.local import docker_task_handler

    def run_docker_container(
        client: docker.DockerClient,
        image: str,
        command: list[str],
        volumes: dict[str, object],
        **container_run_args: object,
    ) -> int:
        image = docker_task_handler.add_latest_tag_if_not_present(image=image)
        container = client.containers.run(
            image=image, command=command, detach=True, stdout=True, stderr=True, volumes=volumes, **container_run_args
        )
        try:
            for line in container.logs(stream=True, follow=True):
                print(line.decode(errors="replace"), end="")
            exit_code = int(container.wait(timeout=3600)["StatusCode"])
        finally:
            container.remove(force=True)
        record.append(TaskContainer(image, tuple(command), exit_code))
        return exit_code

    return run_docker_container
