"""Benchmark: serving latency and throughput of the KServe predictor over HTTP (v2 REST), TTA off and 17.

For each TTA mode and each torch thread setting (``--torch-threads``, default ``default,1``: torch's own
intra-op thread count, i.e. unset, the old behaviour, beside the server's new default of one thread per pool
worker) the real server (``python -m visionpipe.serving.server``) is started as a subprocess on a free loopback port,
warmed up, and sent ``--requests`` single-image v2 requests (one BYTES input, shape [1], a base64 PNG of a
val_test digit) at each concurrency of ``--levels`` (default 1, 8, 32) from a thread pool (one keep-alive
connection per thread). Per-request wall latency (send -> whole answer read) gives p50 / p95 / p99; requests /
wall time gives throughput. The server is stopped by its PID before the next one starts; all settings run in
one invocation, so their rows share the machine's conditions (the load average is printed with each row).

Beside that, the same bundle is timed in-process, without HTTP: the model's forward pass for one image (and for
the 17 TTA variants of one image) under torch.inference_mode, and the predictor hooks preprocess -> predict ->
postprocess, each the median of many runs, so the table shows where the time goes.

    .venv/bin/python bench/serve.py [--bundle DIR] [--requests 300] [--warmup 30] [--levels 1,8,32]
        [--tta off,17] [--torch-threads default,1] [--pool-workers N] [--level-timeout 120] [--reps 300]
        [--no-in-process] [--profile]

Each HTTP row also shows the server process's CPU time per request (user + system, from /proc) and the 1-minute
load average: on a machine shared with other jobs, latency swings with their load while CPU ms/request stays put.

Without --bundle a demo bundle is built into bench/out/ (builtin://sklearn-digits, the full digits-cnn recipe
with ``standard`` preprocessing, threshold sweep, calibration, bundle validation: the same core functions as the
`trained` / `candidate` test fixtures) and reused on later runs. Targets on a 2-core CPU machine: single-image
p50 <= 20 ms and p95 <= 60 ms with TTA off, p50 <= 60 ms with 17-variant TTA.

The last line printed is ``p50_ms=<float> p95_ms=<float> tta17_p50_ms=<float> rps_c8=<float>`` (p50 / p95 at
concurrency 1 with TTA off, p50 at concurrency 1 with TTA 17, requests/s at concurrency 8 with TTA off, all
with the last ``--torch-threads`` setting).
"""

from __future__ import annotations

import os

# Set before torch is imported (here and, inherited, in the server subprocesses): see bench/train_mnist.py.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import base64
import cProfile
import http.client
import io
import json
import pstats
import statistics
import sys
import threading
import time
from collections.abc import Callable, Coroutine
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
MODEL_NAME = "digits"
T = TypeVar("T")


# ------------------------------------------------------------------------------------------------ inputs
def build_demo_bundle(root: Path) -> Path:
    """The demo bundle (cached): fetch -> train (full digits-cnn, standard preprocessing) -> sweep -> calibrate ->
    validate, as the `trained` / `candidate` fixtures do."""
    from visionpipe.phases.bundle_validation import Gates
    from visionpipe.phases.bundle_validation import run as validate
    from visionpipe.phases.calibration import run as calibrate
    from visionpipe.phases.supervised_train import run as train
    from visionpipe.phases.threshold_sweep import run as sweep
    from visionpipe.training.recipes import load_recipe

    if (DEMO_BUNDLE / "bundle.json").is_file():
        return DEMO_BUNDLE
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
    )
    print(f"built demo bundle {DEMO_BUNDLE} in {time.perf_counter() - t0:.0f} s", flush=True)
    return DEMO_BUNDLE


def ensure_dataset() -> Path:
    from visionpipe.phases.data_fetch import run as fetch

    if not (DEMO_DATASET / "splits.json").is_file():
        fetch("builtin://sklearn-digits", DEMO_DATASET, seed=0)
    return DEMO_DATASET


def val_test_pngs(limit: int = 200) -> tuple[list[str], npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
    """base64 PNGs of (up to `limit`) val_test digits, their labels, and the uint8 images."""
    from visionpipe.data.datasets import load_dataset

    split = load_dataset(ensure_dataset()).split("val_test", "evaluate")
    images = np.asarray(split.images[:limit])
    out = []
    for img in images:
        buffer = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).save(buffer, format="PNG")
        out.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return out, np.asarray(split.labels[:limit]), images


def v2_body(png_b64: str) -> bytes:
    return json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [png_b64]}]}).encode()


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


def in_process(bundle: Path, tta: str, pngs: list[str], reps: int, profile: bool) -> dict[str, float]:
    """Median times (ms) of the model forward and of each predictor hook for one image, without HTTP."""
    from kserve.protocol.infer_type import InferInput, InferRequest

    from visionpipe.serving.predictor import ServeConfig, VisionPredictor, image_to_array
    from visionpipe.serving.preprocessing import to_model_input
    from visionpipe.serving.tta import tta_batch
    from visionpipe.serving.upload import decode_image

    predictor = VisionPredictor(MODEL_NAME, [str(bundle)], ServeConfig(tta=tta))
    predictor.load()
    spec = predictor.preprocess_spec
    model = predictor.primary.models[0]
    image = image_to_array(decode_image(base64.b64decode(pngs[0])), spec)
    x = to_model_input(image[None], spec)
    fill = float((0.0 - spec.mean[0]) / spec.std[0])
    xv = tta_batch(x, tta, fill)

    def forward() -> None:
        with torch.inference_mode():
            model(xv)

    counter = iter(range(10**9))

    def request() -> Any:
        return request_of(pngs[next(counter) % len(pngs)], InferRequest, InferInput)

    # The hooks' synchronous bodies (the server runs them on its worker pool): decode, infer; postprocess.
    def whole() -> object:
        batch = predictor.decode(request())
        return run_sync(predictor.postprocess(predictor.infer(batch)))

    batch = predictor.decode(request())
    answers = predictor.infer(batch)
    times = {
        f"model forward ({len(xv)} x {tuple(xv.shape[1:])})": median_ms(forward, reps),
        "to_model_input (decoded image -> tensor)": median_ms(lambda: to_model_input(image[None], spec), reps),
        "tta_batch (variants)": median_ms(lambda: tta_batch(x, tta, fill), reps) if tta != "off" else 0.0,
        "decode (preprocess: base64 PNG -> model input)": median_ms(lambda: predictor.decode(request()), reps),
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
        print(f"\n--- cProfile: 200 whole-path calls in-process, tta={tta} (top 15 by cumulative time) ---")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(15)
    return times


def request_of(png_b64: str, request_cls: Any, input_cls: Any) -> Any:
    return request_cls(MODEL_NAME, [input_cls("image", [1], "BYTES", [png_b64])])


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

    def __init__(self, port: int, timeout_s: float = 60.0) -> None:
        self.port = port
        self.timeout_s = timeout_s
        self.local = threading.local()
        self.path = f"/v2/models/{MODEL_NAME}/infer"
        self.connections: list[http.client.HTTPConnection] = []
        self.lock = threading.Lock()

    def connection(self) -> http.client.HTTPConnection:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=self.timeout_s)
            self.local.conn = conn
            with self.lock:
                self.connections.append(conn)
        return conn

    def post(self, body: bytes) -> tuple[float, int]:
        conn = self.connection()
        headers = {"Content-Type": "application/json"}
        t0 = time.perf_counter()
        try:
            conn.request("POST", self.path, body=body, headers=headers)
            answer = conn.getresponse()
            data = answer.read()
        except (http.client.HTTPException, OSError):
            conn.close()
            self.local.conn = None
            raise
        elapsed = 1000 * (time.perf_counter() - t0)
        if answer.status != 200:
            raise RuntimeError(f"HTTP {answer.status}: {data[:300]!r}")
        outputs = {o["name"]: o for o in json.loads(data)["outputs"]}
        return elapsed, int(outputs["label"]["data"][0])

    def close(self) -> None:
        with self.lock:
            for conn in self.connections:
                conn.close()
            self.connections.clear()


def run_level(
    client: Client,
    server_pid: int,
    bodies: list[bytes],
    labels: npt.NDArray[np.int64],
    concurrency: int,
    n: int,
    timeout_s: float,
) -> LevelResult:
    """`n` requests from `concurrency` threads (bounded by `timeout_s`: later requests are skipped)."""
    latencies: list[float] = []
    errors = correct = 0
    lock = threading.Lock()
    deadline = time.perf_counter() + timeout_s

    def one(i: int) -> None:
        nonlocal errors, correct
        if time.perf_counter() > deadline:
            return
        k = i % len(bodies)
        try:
            ms, label = client.post(bodies[k])
        except (http.client.HTTPException, OSError, RuntimeError, ValueError, KeyError):
            with lock:
                errors += 1
            return
        with lock:
            latencies.append(ms)
            correct += int(label == labels[k])

    cpu0, t0 = process_cpu_s(server_pid), time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(n)))
    wall, cpu = time.perf_counter() - t0, process_cpu_s(server_pid) - cpu0
    client.close()
    return LevelResult(concurrency, latencies, wall, errors, correct, cpu, os.getloadavg()[0])


def bench_server(
    bundle: Path,
    tta: str,
    threads: str,
    bodies: list[bytes],
    labels: npt.NDArray[np.int64],
    args: argparse.Namespace,
) -> list[LevelResult]:
    """One server (TTA mode, torch threads ``default`` = torch's own, i.e. unset, or a count), every level."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "visionpipe.serving.server",
        "--bundle",
        str(bundle),
        "--host",
        LOOPBACK,
        "--http_port",
        str(port),
        "--tta",
        tta,
        "--model_name",
        MODEL_NAME,
        "--torch_threads",
        "0" if threads == "default" else threads,  # 0: the server leaves torch's own default alone
        "--max_queue",
        str(max(args.levels) + 8),  # never refuse the benchmark's own concurrency
    ]
    if args.pool_workers:
        argv += ["--pool_workers", str(args.pool_workers)]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # torch's default must really be its own
        env.pop(name, None)
    t0 = time.perf_counter()
    results = []
    with running_server(argv, port, timeout_s=90.0, env=env) as server:
        print(
            f"server tta={tta} torch_threads={threads}: pid {server.pid}, port {port}, "
            f"ready in {time.perf_counter() - t0:.1f} s; {_startup_line(server.log_tail(20000))}",
            flush=True,
        )
        client = Client(port)
        for i in range(args.warmup):
            client.post(bodies[i % len(bodies)])
        client.close()
        for level in args.levels:
            results.append(run_level(client, server.pid, bodies, labels, level, args.requests, args.level_timeout))
    return results


def _startup_line(log: str) -> str:
    """The server's own account of its CPU budget, workers and torch threads (visionpipe/serving/server.py prints
    it)."""
    line = next((ln for ln in log.splitlines() if ln.startswith("serving ") and "torch threads" in ln), "")
    return line.split("; ", 1)[-1] if line else "(no startup line)"


# -------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: demo bundle in bench/out)")
    parser.add_argument("--requests", type=int, default=300, help="requests per concurrency level (bounded)")
    parser.add_argument("--warmup", type=int, default=30, help="sequential warmup requests per server")
    parser.add_argument("--levels", default="1,8,32", help="client concurrency levels, in order")
    parser.add_argument("--tta", default="off,17", help="TTA modes to serve, one server each")
    parser.add_argument(
        "--torch-threads",
        default="default,1",
        help="torch intra-op thread settings, one server each: 'default' (torch's own, unset) or a count",
    )
    parser.add_argument("--pool-workers", type=int, default=0, help="the servers' --pool_workers (0: theirs)")
    parser.add_argument("--level-timeout", type=float, default=120.0, help="seconds per level at most")
    parser.add_argument("--reps", type=int, default=300, help="in-process repetitions per timing (median)")
    parser.add_argument("--no-in-process", action="store_true", help="skip the in-process timings")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of the in-process path")
    args = parser.parse_args(argv)
    args.requests = max(1, min(args.requests, 10_000))
    args.levels = [max(1, min(int(v), 256)) for v in args.levels.split(",")]
    modes = [m.strip() for m in args.tta.split(",") if m.strip()]
    settings = [t.strip() for t in args.torch_threads.split(",") if t.strip()]
    for setting in settings:
        if setting != "default" and not (setting.isdigit() and int(setting) >= 1):
            parser.error(f"--torch-threads: {setting!r} is neither 'default' nor a positive count")

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, torch thread settings {settings}, "
        f"load average {os.getloadavg()}",
        flush=True,
    )
    OUT.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or build_demo_bundle(OUT)
    pngs, labels, _images = val_test_pngs()
    bodies = [v2_body(p) for p in pngs]
    print(f"bundle {bundle}; {len(bodies)} val_test digits, request body ~{len(bodies[0])} bytes", flush=True)

    inproc: dict[str, dict[str, float]] = {}
    http_results: dict[tuple[str, str], list[LevelResult]] = {}
    for tta in modes:
        if not args.no_in_process:
            inproc[tta] = in_process(bundle, tta, pngs, args.reps, args.profile)
        for threads in settings:
            http_results[(tta, threads)] = bench_server(bundle, tta, threads, bodies, labels, args)

    if inproc:
        print(f"\nin-process, one image (median of up to {args.reps} runs, ms):")
        for tta in modes:
            for name, ms in inproc[tta].items():
                if ms:
                    print(f"  tta={tta:<3} {name:<56} {ms:8.3f}")
    print(f"\nHTTP v2 REST, one image per request, {args.requests} requests per level (latency in ms):")
    print(
        f"  {'tta':<4} {'torch':>7} {'conc':>4} {'n':>5} {'err':>4} {'acc':>6} {'p50':>8} {'p95':>8} {'p99':>8}"
        f" {'rps':>8} {'srv cpu ms/req':>14} {'load1':>6}"
    )
    for tta in modes:
        for level in args.levels:  # the settings side by side at each level
            for threads in settings:
                r = next(x for x in http_results[(tta, threads)] if x.concurrency == level)
                acc = r.correct / len(r.latencies_ms) if r.latencies_ms else float("nan")
                print(
                    f"  {tta:<4} {threads:>7} {r.concurrency:>4} {len(r.latencies_ms):>5} {r.errors:>4} {acc:>6.3f}"
                    f" {r.pct(50):>8.2f} {r.pct(95):>8.2f} {r.pct(99):>8.2f} {r.rps:>8.1f}"
                    f" {r.cpu_ms_per_request:>14.2f} {r.load1:>6.2f}"
                )
    print(f"load average after: {os.getloadavg()}")

    last = settings[-1] if settings else "default"

    def find(tta: str, level: int) -> LevelResult | None:
        return next((r for r in http_results.get((tta, last), []) if r.concurrency == level), None)

    off1, off8, t17 = find("off", 1), find("off", 8), find("17", 1)
    nan = float("nan")
    print(
        f"p50_ms={off1.pct(50) if off1 else nan:.2f} p95_ms={off1.pct(95) if off1 else nan:.2f} "
        f"tta17_p50_ms={t17.pct(50) if t17 else nan:.2f} rps_c8={off8.rps if off8 else nan:.1f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
