"""Micro-batching (visionpipe/serving/batching.py) behind KServe's real ModelServer on 127.0.0.1, checked with the
independent tritonclient (REST in-process, gRPC in a subprocess) and raw HTTP for v1:

* many concurrent mixed requests (REST v2, gRPC, v1; 1 to 4 images; different requested outputs) each get
  exactly the answer the same request gets unbatched, with its id echoed, and batches really form;
* a request whose forward pass fails inside a batch fails alone (its own 400), the others of that batch answer;
* under no load a lone request does not wait (the idle rule) and stays within the wait bound;
* the batcher itself (no server): a cancelled request never poisons a batch and keeps its pool slot until its
  forward pass is done, oversized requests run alone, whole requests leave in arrival order;
* the limits: flags over the bundle's ``serving.batching`` over the defaults, bad values named.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import select
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from images import png_bytes

from visionpipe.data.datasets import load_dataset
from visionpipe.harness import ServerProcess, free_port, running_server
from visionpipe.serving import bundle as B
from visionpipe.serving.batching import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_BATCH_WAIT_MS,
    BatchingConfig,
    BatchingConfigError,
    MicroBatcher,
    resolve_batching,
)
from visionpipe.serving.runtime import WorkerPool

tritonhttp = pytest.importorskip("tritonclient.http")
tritonutils = pytest.importorskip("tritonclient.utils")

OUTPUTS = ("label", "probabilities", "confidence", "abstain", "result")
WAIT_MS = 30.0  # the batched models' max_batch_wait_ms: long enough that batches surely form under the test's load
JSON = {"Content-Type": "application/json"}

# One ModelServer, three models over the same bundle and one worker pool (as visionpipe.serving.server):
# "digits" (batching on), "reference" (batching off: the single-request answers) and "poison", a test-only
# subclass whose forward pass fails for an all-white image and sleeps for an all-black one.
LAUNCHER = r"""
import json, sys, time
from kserve.errors import InvalidInput
from visionpipe.serving.predictor import ServeConfig, VisionPredictor
from visionpipe.serving.runtime import WorkerPool, configure_torch_threads, default_torch_threads
from visionpipe.serving.server_util import run_model_server

class Poisoned(VisionPredictor):
    def infer(self, batch):
        flat = batch.x.reshape(len(batch.x), -1)
        constant = flat.amax(dim=1) == flat.amin(dim=1)
        if bool((constant & (flat[:, 0] > 0)).any()):  # an all-white image: decodes, fails at inference
            raise InvalidInput("poisoned_image: an all-white image fails this test model's forward pass")
        if bool((constant & (flat[:, 0] < 0)).any()):  # an all-black image: a slow forward pass
            time.sleep(1.0)
        return super().infer(batch)

http_port, grpc_port, spec = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
pool = WorkerPool(2, 64)
configure_torch_threads(default_torch_threads(pool.workers))
models = []
for name, entry in spec["models"].items():
    size, wait, concurrent = entry["batching"]
    config = ServeConfig(max_batch_size=size, max_batch_wait_ms=wait, max_concurrent_batches=concurrent)
    cls = Poisoned if entry.get("poison") else VisionPredictor
    model = cls(name, [spec["bundle"]], config, pool=pool)
    model.load()
    models.append(model)
run_model_server(models, host="127.0.0.1", http_port=http_port, grpc_port=grpc_port)
"""

GRPC_CLIENT = r"""
import json, sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
import numpy as np
import tritonclient.grpc as grpcclient

spec = json.loads(sys.stdin.readline())
client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{spec['port']}")

def call(request):
    tensor = grpcclient.InferInput("image", [len(request["images"])], "BYTES")
    tensor.set_data_from_numpy(np.array([bytes.fromhex(h) for h in request["images"]], dtype=np.object_))
    outputs = [grpcclient.InferRequestedOutput(name) for name in request["outputs"]]
    answer = client.infer(spec["model"], [tensor], outputs=outputs or None, request_id=request["id"])
    response = answer.get_response(as_json=True)
    names = [o["name"] for o in response["outputs"]]
    values = {n: answer.as_numpy(n).tolist() if n != "result" else
              [r.decode() for r in answer.as_numpy(n).tolist()] for n in names}
    return {"id": response.get("id", ""), "names": names, "values": values}

call(spec["requests"][0])  # connected and warm
print("ready", flush=True)
sys.stdin.readline()  # "go"
with ThreadPoolExecutor(len(spec["requests"])) as pool:
    print(json.dumps(list(pool.map(call, spec["requests"]))), flush=True)
"""


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def served(candidate: Path) -> Iterator[tuple[ServerProcess, int]]:
    http_port, grpc_port = free_port(), free_port()
    spec = {
        "bundle": str(candidate),
        "models": {
            "digits": {"batching": [16, WAIT_MS, None]},
            "reference": {"batching": [0, 0, None]},
            "poison": {"batching": [16, 0, 1], "poison": True},
        },
    }
    argv = [sys.executable, "-c", LAUNCHER, str(http_port), str(grpc_port), json.dumps(spec)]
    with running_server(argv, http_port, timeout_s=120) as proc:
        yield proc, grpc_port


@pytest.fixture(scope="module")
def digits(trained: Path) -> list[npt.NDArray[np.uint8]]:
    return list(load_dataset(trained / "ds").split("val_test", "evaluate").images[:24])


def _client(served: tuple[ServerProcess, int]) -> object:
    return tritonhttp.InferenceServerClient(url=f"127.0.0.1:{served[0].port}", network_timeout=60.0)


def _tensor(pngs: Sequence[bytes], binary: bool) -> object:
    tensor = tritonhttp.InferInput("image", [len(pngs)], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array(list(pngs), dtype=np.object_), binary_data=True)
    else:
        tensor.set_data_from_numpy(np.array([base64.b64encode(p).decode() for p in pngs], dtype=np.object_), False)
    return tensor


def _metrics(served: tuple[ServerProcess, int]) -> dict[str, float]:
    """The server's visionpipe_batch_* samples: 'name{labels}' -> value."""
    conn = http.client.HTTPConnection("127.0.0.1", served[0].port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("visionpipe_batch"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _sample(metrics: dict[str, float], name: str, model: str, le: str | None = None) -> float:
    labels = f'le="{le}",model="{model}"' if le is not None else f'model="{model}"'
    return metrics.get(f"{name}{{{labels}}}", 0.0)


def _post(served: tuple[ServerProcess, int], path: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    conn = http.client.HTTPConnection("127.0.0.1", served[0].port, timeout=60)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers=JSON)
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read() or b"{}")
    finally:
        conn.close()


Answer = dict[str, list[object]]


def _reference(served: tuple[ServerProcess, int], pngs: Sequence[bytes]) -> Answer:
    """Every output of the unbatched model for these images, one request."""
    result = _client(served).infer("reference", [_tensor(pngs, True)])
    out: Answer = {n: result.as_numpy(n).tolist() for n in OUTPUTS if n != "result"}
    out["result"] = [json.loads(r) for r in result.as_numpy("result")]
    return out


ROUNDING = 1.5e-6  # records carry probabilities rounded to 6 decimals: values 1e-6 apart may round 1e-6 apart


def _check_records(got: Sequence[object], want: Sequence[object]) -> None:
    """JSON records: every field exact but the (rounded) probabilities and confidence, within one rounding unit."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert isinstance(g, dict) and isinstance(w, dict)
        assert {k: v for k, v in g.items() if k not in ("probabilities", "confidence")} == {
            k: v for k, v in w.items() if k not in ("probabilities", "confidence")
        }
        assert g["probabilities"].keys() == w["probabilities"].keys()
        got_p, want_p = list(g["probabilities"].values()), list(w["probabilities"].values())
        np.testing.assert_allclose(got_p, want_p, rtol=0, atol=ROUNDING)
        assert g["confidence"] == pytest.approx(w["confidence"], abs=ROUNDING)


def _check_answer(names: list[str], values: Answer, wanted: Sequence[str], want: Answer) -> None:
    assert names == (list(wanted) or list(OUTPUTS))  # only the requested outputs, in the requested order
    for name in names:
        if name == "result":
            records = [json.loads(r.decode() if isinstance(r, bytes) else str(r)) for r in values[name]]
            _check_records(records, want[name])
        elif name in ("probabilities", "confidence"):
            got = np.asarray(values[name], dtype=np.float64)
            np.testing.assert_allclose(got, np.asarray(want[name]), rtol=0, atol=1e-6)  # FP32 tensors
        else:
            assert values[name] == want[name], name


# ------------------------------------------------------------------------------------- concurrent mixed
@dataclass(frozen=True)
class Req:
    id: str
    picks: tuple[int, ...]  # indices into the test images
    outputs: tuple[str, ...]  # requested outputs, in order (empty: all)
    binary: bool  # REST: binary tensor data for the input and the outputs


def test_concurrent_mixed_requests_get_their_own_unbatched_answers(
    served: tuple[ServerProcess, int], digits: list[npt.NDArray[np.uint8]]
) -> None:
    rng = np.random.default_rng(0)
    pngs = [png_bytes(d) for d in digits]

    def plan(prefix: str, count: int) -> list[Req]:
        out = []
        for i in range(count):
            picks = tuple(int(k) for k in rng.choice(len(pngs), size=int(rng.integers(1, 5)), replace=False))
            wanted = () if i % 4 == 0 else tuple(str(o) for o in rng.permutation(OUTPUTS)[: int(rng.integers(1, 5))])
            out.append(Req(f"{prefix}-{i}", picks, wanted, bool(i % 2)))
        return out

    rest, grpc, v1 = plan("rest", 24), plan("grpc", 12), plan("v1", 8)
    reference = {r.picks: _reference(served, [pngs[k] for k in r.picks]) for r in rest + grpc + v1}
    requests = [{"id": r.id, "images": [pngs[k].hex() for k in r.picks], "outputs": list(r.outputs)} for r in grpc]
    # tritonclient.grpc and kserve register the same protobuf names: the gRPC client runs in its own process.
    proc = subprocess.Popen(
        [sys.executable, "-c", GRPC_CLIENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps({"port": served[1], "model": "digits", "requests": requests}) + "\n")
        proc.stdin.flush()
        assert select.select([proc.stdout], [], [], 90)[0], "the gRPC client did not get ready"
        assert proc.stdout.readline().strip() == "ready"  # after one warm-up call of its own
        before = _metrics(served)
        proc.stdin.write("go\n")
        proc.stdin.flush()

        def rest_call(r: Req) -> tuple[str, list[str], Answer]:
            wanted = [tritonhttp.InferRequestedOutput(n, binary_data=r.binary) for n in r.outputs]
            tensor = _tensor([pngs[k] for k in r.picks], r.binary)
            result = _client(served).infer("digits", [tensor], outputs=wanted or None, request_id=r.id)
            response = result.get_response()
            names = [o["name"] for o in response["outputs"]]
            return str(response.get("id", "")), names, {n: result.as_numpy(n).tolist() for n in names}

        def v1_call(r: Req) -> tuple[int, dict[str, object]]:
            instances = [{"b64": base64.b64encode(pngs[k]).decode()} for k in r.picks]
            return _post(served, "/v1/models/digits:predict", {"instances": instances})

        with ThreadPoolExecutor(len(rest) + len(v1)) as pool:
            rest_futures = [pool.submit(rest_call, r) for r in rest]
            v1_futures = [pool.submit(v1_call, r) for r in v1]
            rest_answers = [f.result(timeout=120) for f in rest_futures]
            v1_answers = [f.result(timeout=120) for f in v1_futures]
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0
    grpc_answers = json.loads(out)

    for r, (rid, names, values) in zip(rest, rest_answers, strict=True):
        assert rid == r.id
        _check_answer(names, values, r.outputs, reference[r.picks])
    for r, got in zip(grpc, grpc_answers, strict=True):
        assert got["id"] == r.id
        _check_answer(got["names"], got["values"], r.outputs, reference[r.picks])
    for r, (status, body) in zip(v1, v1_answers, strict=True):
        assert status == 200, body
        predictions = body["predictions"]
        assert isinstance(predictions, list)
        _check_records(predictions, reference[r.picks]["result"])

    after = _metrics(served)

    def delta(name: str, le: str | None = None) -> float:
        return _sample(after, name, "digits", le) - _sample(before, name, "digits", le)

    batches = delta("visionpipe_batch_images_count")
    assert delta("visionpipe_batch_images_sum") == sum(len(r.picks) for r in rest + grpc + v1)  # each image once
    assert delta("visionpipe_batch_requests_sum") == len(rest) + len(grpc) + len(v1)
    assert delta("visionpipe_batch_requests_bucket", "1.0") < batches  # some forward passes served several requests
    assert delta("visionpipe_batch_images_bucket", "16.0") == batches  # never more than max_batch_size images
    assert delta("visionpipe_batch_isolated_total") == 0


# --------------------------------------------------------------------------------------------- isolation
def test_a_request_failing_inside_a_batch_fails_alone(
    served: tuple[ServerProcess, int], digits: list[npt.NDArray[np.uint8]]
) -> None:
    size = digits[0].shape[0]
    black = np.zeros((1, size, size, 1), np.uint8)  # the slow one: holds the single batch slot for 1 s
    white = png_bytes(np.full((size, size, 1), 255, np.uint8))  # decodes, fails at inference
    innocents = [[png_bytes(digits[i]), png_bytes(digits[i + 1])] for i in (0, 2, 4)]
    references = [_reference(served, pngs) for pngs in innocents]
    before = _metrics(served)

    def slow() -> object:
        tensor = tritonhttp.InferInput("pixels_uint8", list(black.shape), "UINT8")
        tensor.set_data_from_numpy(black, binary_data=True)
        return _client(served).infer("poison", [tensor]).as_numpy("label")

    with ThreadPoolExecutor(5) as pool:
        blocker = pool.submit(slow)
        deadline = time.monotonic() + 30
        while _sample(_metrics(served), "visionpipe_batch_requests_count", "poison") <= _sample(
            before, "visionpipe_batch_requests_count", "poison"
        ):  # the slow forward pass has started: what follows queues behind it and leaves as one batch
            assert time.monotonic() < deadline, "the slow request never started"
            time.sleep(0.02)
        bad = pool.submit(lambda: _client(served).infer("poison", [_tensor([white], True)], request_id="bad"))
        good = [
            pool.submit(lambda p=p, i=i: _client(served).infer("poison", [_tensor(p, True)], request_id=f"ok-{i}"))
            for i, p in enumerate(innocents)
        ]
        assert blocker.result(timeout=60).shape == (1,)
        with pytest.raises(tritonutils.InferenceServerException) as refused:
            bad.result(timeout=60)
        answers = [g.result(timeout=60) for g in good]
    assert refused.value.status() == "400" and "poisoned_image" in str(refused.value.message())
    for i, (answer, want) in enumerate(zip(answers, references, strict=True)):
        assert answer.get_response()["id"] == f"ok-{i}"
        names = [o["name"] for o in answer.get_response()["outputs"]]
        _check_answer(names, {n: answer.as_numpy(n).tolist() for n in names}, [], want)
    after = _metrics(served)

    def delta(name: str, le: str | None = None) -> float:
        return _sample(after, name, "poison", le) - _sample(before, name, "poison", le)

    assert delta("visionpipe_batch_isolated_total") == 1  # one batched forward failed and was re-run per request
    assert delta("visionpipe_batch_requests_count") == 2  # the slow one alone, then the other four together
    assert delta("visionpipe_batch_requests_sum") == 5
    assert delta("visionpipe_batch_images_sum") == 1 + 1 + 2 * len(innocents)


# ------------------------------------------------------------------------------------------ wait bound
def test_a_lone_request_does_not_wait(served: tuple[ServerProcess, int], digits: list[npt.NDArray[np.uint8]]) -> None:
    client = _client(served)
    tensors = [_tensor([png_bytes(d)], True) for d in digits[:6]]
    latencies: dict[str, list[float]] = {"digits": [], "reference": []}
    for model in latencies:  # warm both
        client.infer(model, [tensors[0]])
    before = _metrics(served)
    for i in range(30):  # alternating, so both see the same machine load
        for model, times in latencies.items():
            t0 = time.perf_counter()
            client.infer(model, [tensors[i % len(tensors)]])
            times.append(1000 * (time.perf_counter() - t0))
    after = _metrics(served)
    count = _sample(after, "visionpipe_batch_queue_seconds_count", "digits") - _sample(
        before, "visionpipe_batch_queue_seconds_count", "digits"
    )
    queued_s = _sample(after, "visionpipe_batch_queue_seconds_sum", "digits") - _sample(
        before, "visionpipe_batch_queue_seconds_sum", "digits"
    )
    assert count == 30
    # The idle rule: nothing else queued or running, so a lone request is dispatched at once, far below the 30 ms
    # it may wait (the queue time is measured by the server itself, immune to the client's scheduling).
    assert queued_s / count < 0.005, f"a lone request waited {1000 * queued_s / count:.1f} ms on average"
    batched, unbatched = statistics.median(latencies["digits"]), statistics.median(latencies["reference"])
    assert batched <= unbatched + WAIT_MS + 15.0, (batched, unbatched)


# ------------------------------------------------------------------------------------ the batcher itself
def test_cancelled_requests_never_poison_a_batch_and_keep_their_slot_while_running() -> None:
    pool = WorkerPool(1, 8)
    release = {"hold": threading.Event(), "held": threading.Event()}
    calls: list[list[str]] = []

    def run(items: Sequence[str]) -> list[str]:
        calls.append(list(items))
        for item in items:
            if item in release:
                assert release[item].wait(10)
        return [item.upper() for item in items]

    batcher: MicroBatcher[str, str] = MicroBatcher(pool, run, len, BatchingConfig(16, 0.0, 1))

    async def request(item: str) -> str:
        async with pool.admit():
            return await batcher.submit(item)

    async def started(count: int) -> None:
        deadline = time.monotonic() + 10
        while len(calls) < count:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)

    async def scenario() -> None:
        first = asyncio.ensure_future(request("hold"))
        await started(1)
        queued = [asyncio.ensure_future(request(x)) for x in ("aa", "gone", "cc")]
        await asyncio.sleep(0.05)
        assert pool.in_flight == 4 and batcher.queued == 3
        queued[1].cancel()  # its client went away while it was queued: its slot is free at once
        await asyncio.sleep(0.01)
        assert pool.in_flight == 3
        release["hold"].set()
        assert await first == "HOLD"
        assert [await queued[0], await queued[2]] == ["AA", "CC"]
        assert queued[1].cancelled()

        # Cancelled while its batch runs: the others of that batch answer; its slot stays taken until it ends.
        release["hold"].clear()
        blocker = asyncio.ensure_future(request("hold"))
        await started(3)
        together = [asyncio.ensure_future(request(x)) for x in ("held", "bb")]
        await asyncio.sleep(0.05)
        release["hold"].set()
        await started(4)  # held + bb as one batch, held blocking it
        together[0].cancel()
        await asyncio.sleep(0.02)
        assert pool.in_flight == 2  # "held" is cancelled, but the forward pass it joined still runs
        release["held"].set()
        assert await blocker == "HOLD"
        assert await together[1] == "BB"
        deadline = time.monotonic() + 5
        while pool.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert pool.in_flight == 0

    asyncio.run(scenario())
    pool.shutdown()
    assert calls == [["hold"], ["aa", "cc"], ["hold"], ["held", "bb"]]  # "gone" never ran


def test_batches_take_whole_requests_in_order_and_run_oversized_ones_alone() -> None:
    pool = WorkerPool(1, 16)
    gate = threading.Event()
    calls: list[list[str]] = []

    def run(items: Sequence[str]) -> list[str]:
        calls.append(list(items))
        if items[0] == "hold":
            assert gate.wait(10)
        if "boom" in items:
            raise ValueError("boom")
        return list(items)

    batcher: MicroBatcher[str, str] = MicroBatcher(pool, run, len, BatchingConfig(8, 0.0, 1))

    async def scenario() -> list[str | BaseException]:
        first = asyncio.ensure_future(batcher.submit("hold"))
        while not calls:
            await asyncio.sleep(0.005)
        rest = [asyncio.ensure_future(batcher.submit(x)) for x in ("aa", "gone", "boom", "cc", "toolarge-item")]
        await asyncio.sleep(0.02)
        rest[1].cancel()
        await asyncio.sleep(0.01)
        gate.set()
        await first
        return list(await asyncio.gather(*[r for i, r in enumerate(rest) if i != 1], return_exceptions=True))

    results = asyncio.run(scenario())
    pool.shutdown()
    assert results[0] == "aa" and results[2] == "cc" and results[3] == "toolarge-item"
    assert isinstance(results[1], ValueError)
    # hold alone; aa + boom + cc (8 characters; "gone" skipped) failed together, then ran one by one;
    # toolarge-item (13 > 8) alone, never split.
    assert calls == [["hold"], ["aa", "boom", "cc"], ["aa"], ["boom"], ["cc"], ["toolarge-item"]]


# ------------------------------------------------------------------------------------------------ limits
def test_flags_win_over_the_bundle_over_the_defaults(candidate: Path, tmp_path: Path) -> None:
    from visionpipe.serving.predictor import BatchingFieldError, ServeConfig, VisionPredictor
    from visionpipe.serving.server import build_parser

    manifest = json.loads((candidate / B.BUNDLE_FILE).read_text())
    manifest.pop("files")
    card = json.loads((candidate / B.MODEL_CARD_FILE).read_text())
    weights = [candidate / "weights" / "member-0.safetensors"]

    def bundle(batching: object, name: str) -> Path:
        B.write_bundle(tmp_path / name, {**manifest, "serving": {"batching": batching}}, weights, card)
        return tmp_path / name

    field = {"serving": {"batching": {"max_batch_size": 8, "max_batch_wait_ms": 4}}}
    for flags, want in [
        ((None, None), (8, 4.0, "bundle")),
        ((None, 1.5), (8, 1.5, "bundle+flags")),
        ((0, None), (0, 4.0, "flags+bundle")),
        ((12, 0.0), (12, 0.0, "flags")),
    ]:
        got = resolve_batching(*flags, field)
        assert (got.max_batch_size, got.max_batch_wait_ms, got.source) == want
    got = resolve_batching(None, None, manifest)
    assert (got.max_batch_size, got.max_batch_wait_ms) == (DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_BATCH_WAIT_MS)

    # Through a signed bundle: the field is read from the verified manifest (bundle.py is not involved).
    predictor = VisionPredictor("digits", [str(bundle({"max_batch_size": 8, "max_batch_wait_ms": 4}, "with"))])
    predictor.load()
    assert (predictor.batching.max_batch_size, predictor.batching.max_batch_wait_ms) == (8, 4.0)
    assert predictor.batcher is not None and predictor.batcher.config == predictor.batching
    off = VisionPredictor("digits", [str(candidate)], ServeConfig(max_batch_size=1))
    off.load()
    assert off.batcher is None and not off.batching.enabled
    for batching, message in [
        ({"max_batch_size": "8"}, r"serving\.batching\.max_batch_size='8' must be an integer"),
        ({"batch": 8}, r"unknown fields \['batch'\]; allowed: \['max_batch_size', 'max_batch_wait_ms'\]"),
        ({"max_batch_wait_ms": 5000}, r"max_batch_wait_ms=5000.0 must be a number of milliseconds in \[0, 1000\]"),
    ]:
        with pytest.raises(BatchingFieldError, match=message):  # refused before any model is built
            VisionPredictor("digits", [str(bundle(batching, "bad"))]).load()

    args = build_parser().parse_args(["--bundle", "x", "--max_batch_size", "4", "--max-batch-wait-ms", "0.5"])
    assert (args.max_batch_size, args.max_batch_wait_ms, args.max_concurrent_batches) == (4, 0.5, None)
    with pytest.raises(BatchingConfigError, match=r"max_batch_size=-1 must be an integer >= 0"):
        ServeConfig(max_batch_size=-1)
