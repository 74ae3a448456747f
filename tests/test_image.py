"""The project image (Dockerfile, built by `make image` = containers/build.sh with buildah), checked from outside
with podman (tests/containers.py): hygiene (non-root, no credentials, no .venv, recipes present, installed
versions equal uv.lock), nothing downloaded at run time (`--network none`: server help, a KFP executor command
from the compiled IR, serving a bundle), and the serving runtime started with the ClusterServingRuntime's command
and args answering tritonclient exactly as `visionpipe serve` on the host does.

Needs root, podman, buildah and runc (`apt-get install -y buildah podman runc mmdebstrap`); without them these
tests skip, which is a failure under `.ci/run` (VISIONPIPE_NO_SKIPS=1, tests/conftest.py)."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from images import png_bytes
from kfp import local
from packaging.markers import Marker
from packaging.utils import canonicalize_name

from containers import (
    REPO,
    Container,
    TaskContainer,
    inspect_image,
    podman_socket,
    python_in_image,
    recording_container_runner,
    run_in_image,
    running_container,
    wait_ready,
)
from containers import ensure_image as _ensure_image
from visionpipe.data.datasets import load_dataset
from visionpipe.harness import ServerProcess, free_port, running_server
from visionpipe.kfp.compile import PIPELINES, compile_pipeline
from visionpipe.kfp.local import install_local_job_times
from visionpipe.serving import bundle as B
from visionpipe.serving import signing

# Run with `make test-image` (the container tests need root, buildah and podman; `make test` deselects them).
pytestmark = pytest.mark.image

MODEL = "digits"
OUTPUTS = ("label", "probabilities", "confidence", "abstain", "result")
RUNTIME_UID = 10001

# One container run collects what the hygiene tests look at (each container start costs a second or two).
FACTS = r"""
import hashlib, importlib.metadata as md, json, os, pwd, sys
from packaging.markers import default_environment

SKIP = ("/proc", "/sys", "/dev", "/run", "/tmp")
CRED_NAMES = {".aws", "credentials", "s3-credentials.env", ".env", "id_rsa", "id_ed25519", "id_ecdsa", "id_dsa",
              "signing-key.pem", ".netrc", ".git-credentials", ".pypirc"}
venvs, pyvenvs, cred_names, private_keys, env_files = [], [], [], [], []
for root, dirs, files in os.walk("/"):
    if root.startswith(SKIP):
        dirs[:] = []
        continue
    if "pyvenv.cfg" in files:
        pyvenvs.append(root)
    for d in dirs:
        if d in (".venv", ".aws"):
            (venvs if d == ".venv" else cred_names).append(os.path.join(root, d))
    for f in files:
        path = os.path.join(root, f)
        if f in CRED_NAMES or (f == "config.json" and os.path.basename(root) == ".docker"):
            cred_names.append(path)
        if f.endswith(".env") and "site-packages" not in root:
            env_files.append(path)
        if f.endswith((".pem", ".key")) or f.startswith(("id_rsa", "id_ed25519", "id_ecdsa")):
            try:
                with open(path, "rb") as fh:
                    head = fh.read(1 << 20)
            except OSError:
                continue
            if b"PRIVATE KEY-----" in head:
                private_keys.append(path)
home = os.environ.get("HOME", "")
recipes_dir = os.environ.get("VISIONPIPE_RECIPE_DIR", "")
recipes = {}
if os.path.isdir(recipes_dir):
    for name in sorted(os.listdir(recipes_dir)):
        with open(os.path.join(recipes_dir, name), "rb") as fh:
            recipes[name] = hashlib.sha256(fh.read()).hexdigest()
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "user": pwd.getpwuid(os.getuid()).pw_name, "home": home,
    "home_entries": sorted(os.listdir(home)) if os.path.isdir(home) else None,
    "root_entries": sorted(os.listdir("/root")) if os.access("/root", os.R_OK) else "unreadable",
    "opt_visionpipe": sorted(os.listdir("/opt/visionpipe")),
    "venvs": venvs, "pyvenvs": pyvenvs, "cred_names": cred_names, "private_keys": private_keys, "env_files": env_files,
    "environ": sorted(os.environ), "recipe_dir": recipes_dir, "recipes": recipes,
    "dists": {md_dist.metadata["Name"]: md_dist.version for md_dist in md.distributions()},
    "markers": default_environment(), "executable": sys.executable, "prefix": sys.prefix,
}))
"""


@pytest.fixture(scope="module")
def image() -> str:
    return _ensure_image()


@pytest.fixture(scope="module")
def facts(image: str) -> dict[str, object]:
    found = json.loads(python_in_image(image, FACTS, timeout_s=300))
    assert isinstance(found, dict)
    return found


def _lock_runtime_pins(markers: dict[str, str]) -> dict[str, str]:
    """uv.lock's runtime pins (no dev extra) whose markers hold in the image's environment: `uv export`."""
    done = subprocess.run(
        [str(Path(sys.executable).with_name("uv")), "export", "--frozen", "--no-dev", "--no-emit-project",
         "--no-hashes", "--no-header", "--no-annotate", "--format", "requirements.txt"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    pins: dict[str, str] = {}
    for line in done.stdout.splitlines():
        requirement, _, marker = line.partition(";")
        if "==" not in requirement:
            continue
        if marker.strip() and not Marker(marker.strip()).evaluate(markers):
            continue
        name, version = requirement.strip().split("==")
        pins[str(canonicalize_name(name))] = version
    return pins


# ---------------------------------------------------------------------------------------------------- hygiene
def test_runs_as_non_root_user(image: str, facts: dict[str, object]) -> None:
    config = inspect_image(image)["Config"]
    assert isinstance(config, dict)
    assert config["User"] == f"{RUNTIME_UID}:{RUNTIME_UID}"
    assert (facts["uid"], facts["gid"], facts["user"]) == (RUNTIME_UID, RUNTIME_UID, "visionpipe")
    # KServe's securityContext (runAsNonRoot) only admits a numeric non-root user: 10001 is one.
    assert facts["root_entries"] == "unreadable" or facts["root_entries"] == []


def test_no_credentials_and_no_venv_inside(image: str, facts: dict[str, object]) -> None:
    assert facts["venvs"] == [], "a .venv directory was copied into the image"
    assert facts["pyvenvs"] == ["/opt/venv"], "virtual environments besides the image's /opt/venv"
    assert facts["cred_names"] == [], "credential files in the image"
    assert facts["private_keys"] == [], "private keys in the image"
    assert facts["env_files"] == [], ".env files in the image"
    assert facts["home_entries"] == [], "the runtime user's home is not empty (keys, caches, config?)"
    # Only the recipes are kept of the build context: no sources, tests, benches or the build's lock copy.
    assert facts["opt_visionpipe"] == ["recipes"]
    environ = facts["environ"]
    assert isinstance(environ, list)
    secretish = [n for n in environ if n.startswith(("AWS_", "S3_")) or any(
        word in n for word in ("SECRET", "TOKEN", "PASSWORD", "SIGNING_KEY", "CREDENTIAL"))]  # fmt: skip
    assert secretish == []
    image_env = inspect_image(image)["Config"]
    assert isinstance(image_env, dict)
    names = [item.split("=", 1)[0] for item in image_env["Env"]]
    assert not [n for n in names if n.startswith(("AWS_", "S3_", "SSL_CERT", "PIP_CERT", "UV_"))]
    # The build's CA secret and uv's cache are build-time mounts, not files of the image.
    done = run_in_image(image, ["sh", "-c", "ls -A /run/secrets /root/.cache /var/cache/host-uv 2>&1; true"])
    assert "ca-bundle" not in done.stdout and "archive-v0" not in done.stdout


def test_recipes_present_and_found_by_name(image: str, facts: dict[str, object]) -> None:
    shipped = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((REPO / "recipes").glob("*.y*ml"))}
    assert shipped and facts["recipes"] == shipped
    assert facts["recipe_dir"] == "/opt/visionpipe/recipes"
    code = (
        "from visionpipe.training.recipes import list_recipes, load_recipe; import json;"
        " print(json.dumps([list_recipes(), load_recipe('digits-cnn').name]))"
    )
    listed, loaded = json.loads(python_in_image(image, code).strip().splitlines()[-1])
    assert listed == sorted(Path(n).stem for n in shipped) and loaded == "digits-cnn"


def test_installed_versions_equal_the_lock(facts: dict[str, object]) -> None:
    markers = facts["markers"]
    dists = facts["dists"]
    assert isinstance(markers, dict) and isinstance(dists, dict)
    installed = {str(canonicalize_name(str(n))): str(v) for n, v in dists.items()}
    expected = _lock_runtime_pins({str(k): str(v) for k, v in markers.items()})
    expected["visionpipe"] = str(installed.get("visionpipe"))  # the project itself, at pyproject's version
    assert facts["prefix"] == "/opt/venv"
    missing = sorted(set(expected) - set(installed))
    extra = sorted(set(installed) - set(expected))
    wrong = sorted(
        f"{n}: image {installed[n]} != lock {expected[n]}"
        for n in expected
        if n in installed and installed[n] != expected[n]
    )
    assert (missing, extra, wrong) == ([], [], []), "the image's packages differ from uv.lock's runtime pins"
    assert installed["torch"] == expected["torch"] and "nvidia-cublas" in installed  # PyPI's CUDA build, as locked


# ----------------------------------------------------------------------------------- nothing downloaded at run time
def test_server_help_and_kfp_without_network(image: str) -> None:
    done = run_in_image(image, ["python", "-m", "visionpipe.serving.server", "--help"], network="none")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--model_dir" in done.stdout and "--http_port" in done.stdout
    # KFP's executor runs `python3 -m kfp.dsl.executor_main` (python3 on PATH, kfp importable).
    version = run_in_image(image, ["python3", "-c", "import kfp; print(kfp.__version__)"], network="none")
    assert version.returncode == 0, version.stderr[-2000:]
    assert version.stdout.strip() == _lock_runtime_pins({})["kfp"]  # markers: the host's (kfp has none)


def _executor(pipeline: str, task: str) -> tuple[list[str], list[str], dict[str, object]]:
    """(command, args, root parameter defaults) of `task`'s executor in the compiled IR."""
    docs = list(yaml.safe_load_all((REPO / "visionpipe" / "kfp" / "compiled" / pipeline).read_text()))
    spec = docs[0]
    container = spec["deploymentSpec"]["executors"][f"exec-{task}"]["container"]
    root = spec["root"]["inputDefinitions"]["parameters"]
    # The compiled IR writes NUMBER_INTEGER defaults as floats (5.0); the backend's driver hands the executor
    # ints, as kfp.local does: convert by parameterType.
    defaults = {
        name: int(p["defaultValue"]) if p["parameterType"] == "NUMBER_INTEGER" else p["defaultValue"]
        for name, p in root.items()
        if "defaultValue" in p
    }
    return list(container["command"]), list(container["args"]), defaults


def test_kfp_executor_command_runs_in_the_image_without_network(image: str, tmp_path: Path) -> None:
    """The first task of the training pipeline, run exactly as the IR says (sh -ec ... executor_main ...)."""
    command, args, defaults = _executor("training.yaml", "check-training-run-form")
    values = {**defaults, "source": "builtin://sklearn-digits"}
    executor_input = {"inputs": {"parameterValues": values}, "outputs": {"outputFile": "/tmp/kfp/output.json"}}
    argv = [json.dumps(executor_input) if a == "{{$}}" else a for a in args]
    done = run_in_image(image, [*command[1:], *argv], entrypoint=command[0], network="none")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "the training run form is valid" in done.stdout + done.stderr
    # and a bad value fails the task, naming it (the same component, the same image)
    bad = {**executor_input, "inputs": {"parameterValues": {**values, "objective": "speed"}}}
    argv = [json.dumps(bad) if a == "{{$}}" else a for a in args]
    refused = run_in_image(image, [*command[1:], *argv], entrypoint=command[0], network="none")
    assert refused.returncode != 0 and "objective" in refused.stdout + refused.stderr


# --------------------------------------------------------------------------------------------- serving runtime
def _readable_copy(src: Path, dst: Path) -> Path:
    """A copy the runtime user (uid 10001) can read: pytest's tmp folders are private to root (0700)."""
    shutil.copytree(src, dst)
    for path in [dst, *dst.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dst


@pytest.fixture(scope="module")
def runtime_spec() -> dict[str, object]:
    """The ClusterServingRuntime's kserve-container as `manifests/base` renders it (kubectl kustomize)."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed (needed to render manifests/base)")
    done = subprocess.run(
        ["kubectl", "kustomize", str(REPO / "manifests" / "base")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for obj in yaml.safe_load_all(done.stdout):
        if obj and obj.get("kind") == "ClusterServingRuntime":
            container = obj["spec"]["containers"][0]
            assert isinstance(container, dict)
            return container
    raise AssertionError("manifests/base renders no ClusterServingRuntime")


@pytest.fixture(scope="module")
def model_mounts(candidate: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(bundle folder, trusted-keys folder) readable by the runtime user; the keys folder is what the
    ConfigMap visionpipe-trusted-keys mounts: one public key a line, the key that signed the session bundles."""
    root = tmp_path_factory.mktemp("image-serving")
    root.chmod(0o755)
    bundle = _readable_copy(candidate, root / "bundle")
    keys = root / "trusted-keys"
    keys.mkdir(mode=0o755)
    (keys / "trusted-keys").write_text(signing.public_key_b64(signing.default_signing_key().public_key()) + "\n")
    (keys / "trusted-keys").chmod(0o644)
    return bundle, keys


@pytest.fixture(scope="module")
def pngs(trained: Path) -> list[bytes]:
    return [png_bytes(img) for img in load_dataset(trained / "ds").split("val_test", "evaluate").images[:8]]


def _runtime_argv(runtime_spec: dict[str, object]) -> tuple[list[str], list[str], dict[str, str], str]:
    """(command, args with {{.Name}} filled in as KServe does, env, trusted-keys mount path)."""
    command = [str(c) for c in runtime_spec["command"]]  # type: ignore[attr-defined]  # parsed YAML list
    args = [str(a).replace("{{.Name}}", MODEL) for a in runtime_spec["args"]]  # type: ignore[attr-defined]  # parsed YAML list
    env = {str(e["name"]): str(e["value"]) for e in runtime_spec.get("env", [])}  # type: ignore[attr-defined]  # parsed YAML list
    mounts = {str(m["name"]): str(m["mountPath"]) for m in runtime_spec.get("volumeMounts", [])}  # type: ignore[attr-defined]  # parsed YAML list
    return command, args, env, mounts["trusted-keys"]


@dataclass
class Servers:
    container: Container
    http_port: int
    grpc_port: int
    host: ServerProcess
    host_grpc_port: int


@pytest.fixture(scope="module")
def servers(image: str, runtime_spec: dict[str, object], model_mounts: tuple[Path, Path]) -> Iterator[Servers]:
    """The serving container as KServe starts it, and `visionpipe serve` on the host on the same bundle (both
    started at once: each takes seconds to load torch and the bundle).

    The container: the runtime's command and args, the bundle read-only at /mnt/models, the trusted keys where
    the ConfigMap goes, HTTP (8080) and gRPC (8081) published on 127.0.0.1 only. `--grpc_port=8081` is appended:
    the runtime's args start no gRPC server (visionpipe.serving.server's default is 0 = no gRPC)."""
    command, args, env, keys_path = _runtime_argv(runtime_spec)
    bundle, keys = model_mounts
    http_port, grpc_port, host_http, host_grpc = free_port(), free_port(), free_port(), free_port()
    host_argv = [str(Path(sys.executable).with_name("visionpipe")), "serve", f"--bundle={bundle}",
                 f"--model_name={MODEL}", f"--http_port={host_http}", f"--grpc_port={host_grpc}"]  # fmt: skip
    with (
        running_container(
            image,
            [*command[1:], *args, "--grpc_port=8081"],
            entrypoint=command[:1],
            env=env,
            volumes=[(bundle, "/mnt/models"), (keys, keys_path)],
            ports=[(http_port, 8080), (grpc_port, 8081)],
        ) as container,
        running_server(host_argv, host_http, timeout_s=120) as host,
    ):
        wait_ready(container, f"http://127.0.0.1:{http_port}/v2/health/ready", 180)
        yield Servers(container, http_port, grpc_port, host, host_grpc)


def _rest_answer(port: int, pngs: list[bytes]) -> dict[str, list[object]]:
    import tritonclient.http as tritonhttp

    client = tritonhttp.InferenceServerClient(url=f"127.0.0.1:{port}", connection_timeout=30, network_timeout=60)
    tensor = tritonhttp.InferInput("image", [len(pngs)], "BYTES")
    tensor.set_data_from_numpy(np.array(pngs, dtype=np.object_), binary_data=True)
    result = client.infer(MODEL, [tensor])
    return {name: np.asarray(result.as_numpy(name)).tolist() for name in OUTPUTS}


GRPC_CLIENT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient

port, model = sys.argv[1], sys.argv[2]
pngs = [bytes.fromhex(h) for h in json.loads(sys.stdin.read())]
client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{port}")
tensor = grpcclient.InferInput("image", [len(pngs)], "BYTES")
tensor.set_data_from_numpy(np.array(pngs, dtype=np.object_))
result = client.infer(model, [tensor], client_timeout=60)
outputs = ("label", "probabilities", "confidence", "abstain", "result")
answer = {}
for name in outputs:
    answer[name] = [v.decode() if isinstance(v, bytes) else v for v in np.asarray(result.as_numpy(name)).tolist()]
print(json.dumps(answer))
"""


def _grpc_answer(port: int, pngs: list[bytes]) -> dict[str, list[object]]:
    """tritonclient's gRPC client in a subprocess (as tests/test_oip.py does), answers as JSON."""
    done = subprocess.run(
        [sys.executable, "-c", GRPC_CLIENT, str(port), MODEL],
        input=json.dumps([p.hex() for p in pngs]), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert isinstance(answer, dict)
    return answer


def _decoded(answer: dict[str, list[object]]) -> dict[str, list[object]]:
    return {k: [v.decode() if isinstance(v, bytes) else v for v in vals] for k, vals in answer.items()}


def test_serving_container_answers_rest_like_the_host(servers: Servers, pngs: list[bytes]) -> None:
    from_container = _decoded(_rest_answer(servers.http_port, pngs))
    from_host = _decoded(_rest_answer(servers.host.port, pngs))
    assert len(from_container["label"]) == len(pngs)
    assert from_container == from_host


def test_serving_container_answers_grpc_like_the_host(servers: Servers, pngs: list[bytes]) -> None:
    from_container = _grpc_answer(servers.grpc_port, pngs)
    from_host = _grpc_answer(servers.host_grpc_port, pngs)
    assert len(from_container["label"]) == len(pngs)
    assert from_container == from_host
    # and gRPC agrees with REST on the same container
    assert from_container == _decoded(_rest_answer(servers.http_port, pngs))


SERVE_OFFLINE = r"""
import base64, json, subprocess, sys, time, urllib.request

server = subprocess.Popen([sys.executable, "-m", "visionpipe.serving.server", "--model_name=digits",
                           "--model_dir=/mnt/models", "--http_port=8080", "--host=127.0.0.1"])
try:
    for _ in range(600):
        try:
            with urllib.request.urlopen("http://127.0.0.1:8080/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.2)
    else:
        sys.exit("server not ready after 120 s")
    pngs = json.load(open("/mnt/request/pngs.json"))
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(pngs)], "data": pngs}]}
    req = urllib.request.Request("http://127.0.0.1:8080/v2/models/digits/infer", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        print("ANSWER " + r.read().decode())
finally:
    server.terminate()
    server.wait(timeout=30)
"""


def test_serves_a_bundle_with_no_network(
    image: str,
    model_mounts: tuple[Path, Path],
    runtime_spec: dict[str, object],
    pngs: list[bytes],
    servers: Servers,
    tmp_path: Path,
) -> None:
    """Loading the bundle, torch's model and KServe's server needs nothing from the network: the server runs in
    a `--network none` container and a client in the same container gets the host's labels."""
    _, _, env, keys_path = _runtime_argv(runtime_spec)
    bundle, keys = model_mounts
    request = tmp_path / "request"
    request.mkdir(mode=0o755)
    tmp_path.chmod(0o755)
    (request / "pngs.json").write_text(json.dumps([base64.b64encode(p).decode() for p in pngs]))
    (request / "pngs.json").chmod(0o644)
    done = run_in_image(
        image,
        ["python", "-c", SERVE_OFFLINE],
        network="none",
        env=env,
        volumes=[(bundle, "/mnt/models"), (keys, keys_path), (request, "/mnt/request")],
        timeout_s=240,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    answer = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("ANSWER "))[7:])
    labels = next(o["data"] for o in answer["outputs"] if o["name"] == "label")
    assert labels == _rest_answer(servers.host.port, pngs)["label"]


# ------------------------------------------------------------------------------------- the pipeline in containers
TINY_RUN = {"recipe_overrides_json": '{"epochs": 1, "batch_size": 32}', "bootstrap": 20, "model_name": "in-image"}
# What differs between two runs of the same inputs: the time and the version stamped from it, and the code version
# (the image has no git checkout, so `visionpipe 0.1.0` without the commit). Everything else must be equal.
RUN_STAMPS = frozenset({"created", "submitted", "version", "bundle_version", "code_version"})


def _run_compiled_ir(ir: Path, runner: local.SubprocessRunner | local.DockerRunner, root: Path) -> tuple[Path, Path]:
    """The compiled pipeline `ir` (YAML) under kfp.local with `runner`; (exported bundle folder, dataset)."""
    from kfp import components

    install_local_job_times()
    root.mkdir()
    root.chmod(0o777)  # the task containers run as uid 10001 and write their outputs under the pipeline root
    local.init(runner=runner, pipeline_root=str(root), raise_on_error=True)
    task = components.load_component_from_file(str(ir))(destination=str(root / "bundles"), **TINY_RUN)
    return Path(str(task.outputs["bundle_uri"])), Path(task.outputs["dataset"].path)


def _without_stamps(value: object) -> object:
    if isinstance(value, dict):
        return {k: _without_stamps(v) for k, v in value.items() if k not in RUN_STAMPS}
    if isinstance(value, list):
        return [_without_stamps(v) for v in value]
    return value


def _bundle_contents(folder: Path) -> dict[str, object]:
    """Every file of a bundle: JSON parsed without its run stamps, reports with the version masked, the others
    (weights) by sha256."""
    version = json.loads((folder / B.BUNDLE_FILE).read_text())["version"]
    out: dict[str, object] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = str(path.relative_to(folder))
        if name == B.SIGNATURE_FILE:
            continue  # signs the manifest, which holds the stamps
        if path.suffix == ".json":
            document = json.loads(path.read_text())
            if name == B.BUNDLE_FILE:  # the digests of the stamped files differ with the stamps
                stamped = [n for n in document["files"] if n.endswith((".json", ".md"))]
                document["files"] = {k: v for k, v in document["files"].items() if k not in stamped}
            out[name] = _without_stamps(document)
        elif path.suffix == ".md":
            out[name] = path.read_text().replace(version, "<version>")
        else:
            out[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def test_training_pipeline_in_the_image_gives_the_subprocess_runs_bundle(
    image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiled training IR (every executor naming this image) under kfp.local.DockerRunner through podman's
    Docker-compatible socket, with no network: each task runs in the image with its IR command. The same IR under
    SubprocessRunner on the host gives the same bundle: equal weights, calibrator, thresholds and decisions."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from kfp.local import docker_task_handler

    private = Ed25519PrivateKey.generate()
    keys = {
        signing.SIGNING_KEY_ENV: base64.b64encode(private.private_bytes_raw()).decode(),
        signing.TRUSTED_KEYS_ENV: signing.public_key_b64(private.public_key()),
    }
    entry = next(e for e in PIPELINES if e.name == "training")
    ir = compile_pipeline(entry, tmp_path / "ir", image=image)
    executors = next(yaml.safe_load_all(ir.read_text()))["deploymentSpec"]["executors"]
    ir_commands = {tuple(e["container"]["command"]) for e in executors.values()}
    assert {e["container"]["image"] for e in executors.values()} == {image}

    containers: list[TaskContainer] = []
    monkeypatch.setattr(docker_task_handler, "run_docker_container", recording_container_runner(containers))
    with podman_socket() as docker_host:
        monkeypatch.setenv("DOCKER_HOST", docker_host)
        runner = local.DockerRunner(network_mode="none", environment=keys)
        in_image, dataset = _run_compiled_ir(ir, runner, tmp_path / "docker")
    for name, value in keys.items():
        monkeypatch.setenv(name, value)  # the subprocess tasks inherit the host's environment
    on_host, _ = _run_compiled_ir(ir, local.SubprocessRunner(use_venv=False), tmp_path / "subprocess")

    # every task ran in the image, with its executor's command from the IR, and exited 0
    assert len(containers) >= 8, [c.command[:3] for c in containers]
    assert {c.image for c in containers} == {image}
    assert all(c.exit_code == 0 for c in containers)
    assert all(any(c.command[: len(cmd)] == cmd for cmd in ir_commands) for c in containers)
    assert any("supervised_train" in " ".join(c.command) for c in containers)

    # the bundle the containers wrote verifies (signature, digests, weights) and equals the host's
    verified = B.read_bundle(in_image, cache_dir=tmp_path / "cache")
    verified.load_models()
    assert _bundle_contents(in_image) == _bundle_contents(on_host)
    # and so the two bundles decide alike: labels, abstentions and prediction sets on the held-out images
    images = load_dataset(dataset).split("val_test", "evaluate").images
    ours, theirs = (B.BundleModel(B.read_bundle(b, cache_dir=tmp_path / "cache")) for b in (in_image, on_host))
    a, b = ours.predict_images(images), theirs.predict_images(images)
    assert np.array_equal(a.decisions.labels, b.decisions.labels)
    assert np.array_equal(a.decisions.set_mask, b.decisions.set_mask)
    assert np.array_equal(a.calibrated_probs, b.calibrated_probs)
    assert 0 < int((a.decisions.labels >= 0).sum()) <= len(images)
