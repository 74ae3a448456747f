"""Shadow traffic end to end on loopback: mirroring proxy -> two real KServe ModelServers -> one collector.

The stack (started once for the module, every process stopped by PID):
  tests/mirror_proxy.py  REST + gRPC: forwards to the primary and returns its answer, mirrors a copy to the
                         candidate and drops its answer, sets x-request-id when absent (as Envoy does)
  primary                python -m visionpipe.serving.server, VisionPredictor on `binary_candidate` (eights vs
                         threes, threshold chosen for MCC), in-process event logger -> the collector
  candidate              the same on `half_candidate` (the same network, threshold 0.5) with 5-view test-time
                         augmentation (--tta 5: other probabilities), ce-inferenceservicename digits-candidate,
                         --max_side 12 (it refuses a 16x16 image the primary answers)
  collector              python -m visionpipe.monitoring.collector --primary digits --candidate digits-candidate

What each request should give is computed first from each server's own direct answers; the collector's metrics must
then equal it exactly: agreement per request, flips per class pair, abstentions, latency counts, and the candidate
errors (a refused request: no_response; a candidate that is down: missing).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from visionpipe.harness import ServerProcess, free_port, running_server, start_server
from visionpipe.monitoring.collector import (
    REQUEST_TYPE,
    RESPONSE_TYPE,
    AnswerError,
    CloudEvent,
    CloudEventError,
    Collector,
    CollectorConfig,
    CollectorError,
    Decision,
    event_seconds,
    join_key,
    parse_cloudevent,
    read_answer,
)
from visionpipe.serving.event_logger import EventLoggerConfig, EventLoggerError, canonical_header, request_json

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TTL_S = 3.0
DRIFT_WINDOW = 16
START_TIMEOUT_S = 150.0  # four torch-importing processes at once on a 2-core machine
Image = list[list[int]]


# --------------------------------------------------------------------------------------------- helpers
def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value in Prometheus text format (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.value:
                out[tuple(sorted(sample.labels.items()))] = float(sample.value)
    return out


def wait_for(base_url: str, expected: dict[tuple[str, tuple[tuple[str, str], ...]], float], timeout_s: float) -> str:
    """Poll /metrics (bounded) until every (name, labels) reaches its expected value; the last text."""
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(f"{base_url}/metrics", timeout=2.0).text
        if all(metric(text, name, **dict(labels)) >= value for (name, labels), value in expected.items()):
            return text
        time.sleep(0.1)
    raise AssertionError(f"metrics never reached {expected}; last:\n{text}")


def digit_pair() -> tuple[np.ndarray, np.ndarray, list[Image]]:
    """A sklearn 3 and 8 (0..255) to blend, and a few real 3s and 8s."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    scaled = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255)
    threes, eights = scaled[digits.target == 3], scaled[digits.target == 8]
    real = [np.rint(img).astype(int).tolist() for img in (*threes[-4:], *eights[-4:])]
    return threes[0], eights[0], real


def blends(three: np.ndarray, eight: np.ndarray, alphas: np.ndarray) -> list[Image]:
    return [np.rint((1 - a) * three + a * eight).astype(int).tolist() for a in alphas]


def labels_of(answer: dict[str, object]) -> list[str]:
    return [d.label for d in read_answer(answer)]


# --------------------------------------------------------------------------------------------- the stack
@pytest.fixture(scope="module")
def stack(binary_candidate: Path, half_candidate: Path) -> Iterator[dict[str, ServerProcess]]:
    ports = {n: free_port() for n in ("collector", "primary", "primary_grpc", "candidate", "candidate_grpc")}
    ports |= {"proxy": free_port(), "proxy_grpc": free_port()}
    collector_url = f"http://127.0.0.1:{ports['collector']}/"

    def server(name: str, bundle: Path, isvc: str, *extra: str) -> list[str]:
        return [
            sys.executable, "-m", "visionpipe.serving.server", f"--bundle={bundle}", "--model_name=digits",
            f"--http_port={ports[name]}", f"--grpc_port={ports[name + '_grpc']}", "--pool_workers=1",
            "--torch_threads=1", f"--event_logger_url={collector_url}", f"--event_logger_inference_service={isvc}",
            f"--event_logger_source={isvc}-predictor-test", *extra,
        ]  # fmt: skip

    plans = {
        "collector": (
            [
                sys.executable,
                "-m",
                "visionpipe.monitoring.collector",
                f"--port={ports['collector']}",
                "--primary=digits",
                "--candidate=digits-candidate",
                f"--pair-ttl-s={TTL_S}",
                f"--drift-reference={binary_candidate}",  # the primary's bundle (H4's drift_reference.json)
                f"--drift-window={DRIFT_WINDOW}",
            ],
            "/healthz",
        ),
        "primary": (server("primary", binary_candidate, "digits"), "/v2/health/ready"),
        "candidate": (
            server("candidate", half_candidate, "digits-candidate", "--max_side=12", "--tta=5"),
            "/v2/health/ready",
        ),
        "proxy": (
            [
                sys.executable,
                str(TESTS / "mirror_proxy.py"),
                f"--http-port={ports['proxy']}",
                f"--grpc-port={ports['proxy_grpc']}",
                f"--primary-http=http://127.0.0.1:{ports['primary']}",
                f"--candidate-http=http://127.0.0.1:{ports['candidate']}",
                f"--primary-grpc=127.0.0.1:{ports['primary_grpc']}",
                f"--candidate-grpc=127.0.0.1:{ports['candidate_grpc']}",
            ],
            "/healthz",
        ),
    }
    started: dict[str, ServerProcess] = {}
    with ThreadPoolExecutor(max_workers=len(plans)) as pool:
        futures = {
            name: pool.submit(start_server, argv, ports[name], ready_path=path, timeout_s=START_TIMEOUT_S, cwd=ROOT)
            for name, (argv, path) in plans.items()
        }
        try:
            for name, future in futures.items():
                started[name] = future.result()
        finally:
            if len(started) < len(plans):
                for future in futures.values():
                    if future.done() and future.exception() is None:
                        future.result().stop()
    for name in ("primary", "candidate"):
        started[name + "_grpc"] = ServerProcess(started[name].process, ports[name + "_grpc"])
    started["proxy_grpc"] = ServerProcess(started["proxy"].process, ports["proxy_grpc"])
    try:
        yield started
    finally:
        for name in ("proxy", "candidate", "primary", "collector"):
            started[name].stop()


GRPC_CLIENT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient

port = sys.argv[1]
client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{port}")
out = []
for image in json.loads(sys.stdin.read()):
    array = np.asarray(image, dtype=np.uint8)[None, :, :, None]
    tensor = grpcclient.InferInput("pixels_uint8", list(array.shape), "UINT8")
    tensor.set_data_from_numpy(array)
    answer = client.infer("digits", [tensor])
    out.append([int(v) for v in answer.as_numpy("label").tolist()])
print(json.dumps(out))
"""


def grpc_labels(port: int, images: list[Image]) -> list[list[int]]:
    """tritonclient.grpc in its own process (it and kserve register the same protobuf names)."""
    done = subprocess.run(
        [sys.executable, "-c", GRPC_CLIENT, str(port)],
        input=json.dumps(images),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: list[list[int]] = json.loads(done.stdout)
    return result


def v2_body(images: list[Image]) -> dict[str, object]:
    array = np.asarray(images, dtype=np.float32)[..., None]
    return {
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": list(array.shape), "data": array.ravel().tolist()}]
    }


# --------------------------------------------------------------------------------------------- end to end
def test_collector_metrics_match_the_two_servers_answers(stack: dict[str, ServerProcess]) -> None:
    primary_url, candidate_url = stack["primary"].base_url, stack["candidate"].base_url
    proxy, collector = stack["proxy"].base_url, stack["collector"].base_url
    three, eight, real = digit_pair()
    direct = 0  # direct calls to each server: logged as well, and counted below
    with httpx.Client(timeout=30.0) as client:

        def answers(url: str, batch: list[Image]) -> list[str]:
            return labels_of(client.post(f"{url}/v1/models/digits:predict", json={"instances": batch}).json())

        # 1. each server's own answers. The two share one network (thresholds MCC-chosen vs 0.5, and TTA on the
        # candidate), so they disagree only on a narrow band of blends between a 3 and an 8: zoom in on where the
        # primary's label changes until both kinds of probe exist (at most three rounds).
        low, high = 0.0, 1.0
        for _ in range(3):
            alphas = np.linspace(low, high, 48)
            images = real + blends(three, eight, alphas)
            ours, theirs = answers(primary_url, images), answers(candidate_url, images)
            direct += 1
            agree = [i for i in range(len(images)) if ours[i] == theirs[i]]
            differ = [i for i in range(len(images)) if ours[i] != theirs[i]]
            if agree and differ:
                break
            switch = [k for k in range(1, len(alphas)) if ours[len(real) + k] != ours[len(real) + k - 1]]
            assert switch, f"no label change along the blend: {ours}"
            low, high = float(alphas[switch[0] - 1]), float(alphas[switch[0]])
        assert agree and differ, f"the two bundles must agree on some probes and differ on others: {ours} {theirs}"

        # 2. the mix through the mirroring proxy: single-image requests over REST v1, REST v2 and gRPC, plus one
        # two-image v1 request (one agreeing + one differing image: the request disagrees)
        rest_v1 = [agree[0], differ[0], agree[1 % len(agree)], differ[-1]]
        rest_v2 = [agree[-1], differ[len(differ) // 2]]
        grpc = [agree[len(agree) // 2], differ[0]]
        requests: list[list[int]] = [[i] for i in rest_v1 + rest_v2 + grpc] + [[agree[0], differ[-1]]]
        for i in rest_v1:
            answer = client.post(f"{proxy}/v1/models/digits:predict", json={"instances": [images[i]]})
            assert answer.status_code == 200 and labels_of(answer.json()) == [ours[i]], "the proxy returns the primary"
        for i in rest_v2:
            answer = client.post(f"{proxy}/v2/models/digits/infer", json=v2_body([images[i]]))
            assert answer.status_code == 200 and labels_of(answer.json()) == [ours[i]]
        pair = requests[-1]
        answer = client.post(
            f"{proxy}/v1/models/digits:predict",
            json={"instances": [images[j] for j in pair]},
            headers={"x-request-id": f"client-{uuid.uuid4()}"},  # a client's own id is kept, as Envoy keeps it
        )
        assert labels_of(answer.json()) == [ours[j] for j in pair]
        # a request only the candidate refuses (16x16 > its --max_side 12): the user still gets the primary's answer
        big = np.kron(np.asarray(images[agree[0]]), np.ones((2, 2), dtype=int)).tolist()
        answer = client.post(f"{proxy}/v1/models/digits:predict", json={"instances": [big]})
        assert answer.status_code == 200
        refused = client.post(f"{candidate_url}/v1/models/digits:predict", json={"instances": [big]})
        assert refused.status_code == 400 and "image_too_large" in refused.text  # (a direct call: counted below)
    got = grpc_labels(stack["proxy_grpc"].port, [images[i] for i in grpc])
    assert got == [[int(ours[i]) if ours[i] != "abstain" else -1] for i in grpc]

    # 3. what the collector must count
    compared = len(requests)
    disagreeing = sum(any(ours[j] != theirs[j] for j in r) for r in requests)
    flips = Counter((ours[j], theirs[j]) for r in requests for j in r if ours[j] != theirs[j])
    instances = [j for r in requests for j in r]
    abstained = {"primary": sum(ours[j] == "abstain" for j in instances)}
    abstained["candidate"] = sum(theirs[j] == "abstain" for j in instances)
    expected = {
        ("visionpipe_shadow_comparisons_total", (("result", "agree"),)): compared - disagreeing,
        ("visionpipe_shadow_comparisons_total", (("result", "disagree"),)): disagreeing,
        ("visionpipe_shadow_candidate_errors_total", (("reason", "no_response"),)): 1,  # the refused mirror
        ("visionpipe_shadow_candidate_errors_total", (("reason", "missing"),)): direct,  # direct primary calls
        ("visionpipe_shadow_dropped_total", (("reason", "primary_missing"),)): direct + 1,  # direct candidate calls
    }
    text = wait_for(collector, expected, timeout_s=TTL_S + 20)
    time.sleep(TTL_S + 1.0)  # nothing more may arrive: exact counts, not lower bounds
    text = httpx.get(f"{collector}/metrics", timeout=2.0).text
    for (name, labels), value in expected.items():
        assert metric(text, name, **dict(labels)) == value, (name, labels, text)
    assert metric(text, "visionpipe_shadow_instances_total", result="disagree") == sum(flips.values())
    assert metric(text, "visionpipe_shadow_instances_total", result="agree") == len(instances) - sum(flips.values())
    assert samples(text, "visionpipe_shadow_flips_total") == {
        (("candidate", c), ("primary", p)): float(n) for (p, c), n in flips.items()
    }
    for side in ("primary", "candidate"):
        assert metric(text, "visionpipe_shadow_abstentions_total", model=side) == abstained[side]
        assert metric(text, "visionpipe_shadow_latency_seconds_count", model=side) == compared
    delta = (abstained["candidate"] - abstained["primary"]) / len(instances)
    assert metric(text, "visionpipe_shadow_abstention_delta") == pytest.approx(delta)
    assert metric(text, "visionpipe_shadow_latency_delta_seconds_count") == compared
    assert metric(text, "visionpipe_shadow_pending_pairs") == 0
    # every event: per server, one request + one response per call it answered (the refusal: a request only)
    served = compared + 1 + direct + 1  # the candidate: the mix, the mirrored big image, its direct calls
    for kind in ("request", "response"):  # the primary: the mix, the big image, its direct calls
        assert metric(text, "visionpipe_shadow_events_total", model="primary", type=kind) == compared + 1 + direct
    assert metric(text, "visionpipe_shadow_events_total", model="candidate", type="request") == served
    assert metric(text, "visionpipe_shadow_events_total", model="candidate", type="response") == compared + direct
    # drift (visionpipe/monitoring/drift.py): every primary request/answer pair fed, none unreadable
    assert metric(text, "visionpipe_drift_errors_total") == 0
    text = wait_for(collector, {("visionpipe_drift_window", ()): DRIFT_WINDOW}, timeout_s=60)  # > window instances
    assert samples(text, "visionpipe_drift_statistic"), "the drift statistics are exported"
    for server in ("primary", "candidate"):
        logged = httpx.get(f"{stack[server].base_url}/metrics", timeout=2.0).text
        assert metric(logged, "visionpipe_event_logger_events_total", type="request", result="dropped") == 0
        assert metric(logged, "visionpipe_event_logger_events_total", type="request", result="failed") == 0


def test_a_candidate_that_is_down_is_counted_missing(stack: dict[str, ServerProcess]) -> None:
    """Runs last: stops the candidate. The user is still answered; the collector counts each request missing."""
    collector = stack["collector"].base_url
    before = httpx.get(f"{collector}/metrics", timeout=2.0).text
    missing = metric(before, "visionpipe_shadow_candidate_errors_total", reason="missing")
    stack["candidate"].stop()
    image = digit_pair()[2][0]
    with httpx.Client(timeout=30.0) as client:
        for _ in range(2):
            answer = client.post(f"{stack['proxy'].base_url}/v1/models/digits:predict", json={"instances": [image]})
            assert answer.status_code == 200
    key = ("visionpipe_shadow_candidate_errors_total", (("reason", "missing"),))
    text = wait_for(collector, {key: missing + 2}, timeout_s=TTL_S + 20)
    assert metric(text, "visionpipe_shadow_candidate_errors_total", reason="missing") == missing + 2


def test_collector_refuses_non_cloudevents_and_binds_loopback() -> None:
    port = free_port()
    argv = [sys.executable, "-m", "visionpipe.monitoring.collector", f"--port={port}"]
    with running_server(argv, port, ready_path="/healthz", timeout_s=30.0) as server:
        answer = httpx.post(server.base_url + "/", content=b"{}", headers={"content-type": "application/json"})
        assert answer.status_code == 400 and "ce-id" in answer.text
        text = httpx.get(server.base_url + "/metrics").text
        assert metric(text, "visionpipe_shadow_dropped_total", reason="not_a_cloudevent") == 1
        rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
        listening = {row[1] for row in rows if row[3] == "0A"}
        assert f"0100007F:{port:04X}" in listening and f"00000000:{port:04X}" not in listening


# --------------------------------------------------------------------------------------------- in process
AGENT_HEADERS = {  # what KServe's agent sends (pkg/logger/worker.go), with metadataHeaders: [X-Request-Id]
    "ce-specversion": "1.0",
    "ce-source": "digits-predictor-00001-deployment-abc",
    "ce-inferenceservicename": "digits",
    "ce-namespace": "ml",
    "ce-component": "predictor",
    "ce-endpoint": "default",
    "content-type": "application/json",
}


def agent_event(kind: str, isvc: str, request_id: str, body: object, at: str) -> CloudEvent:
    headers = AGENT_HEADERS | {
        "ce-id": str(uuid.uuid4()),  # the agent draws one per server: only X-Request-Id joins the two
        "ce-type": REQUEST_TYPE if kind == "request" else RESPONSE_TYPE,
        "ce-inferenceservicename": isvc,
        "ce-time": at,
        "ce-metadata": json.dumps({"X-Request-Id": [request_id]}),
    }
    return parse_cloudevent(headers, json.dumps(body).encode())


def test_agent_style_events_join_by_x_request_id_and_expire() -> None:
    collector = Collector(CollectorConfig(pair_ttl_s=5.0))
    v2 = {"outputs": [{"name": "label", "datatype": "INT64", "shape": [2], "data": [1, -1]},
                      {"name": "abstain", "datatype": "BOOL", "shape": [2], "data": [False, True]}]}  # fmt: skip
    v1 = {"predictions": [{"label": 1, "decision": {"abstain": False}}, {"label": 0, "decision": {"abstain": False}}]}
    request = {"instances": [[[0]], [[1]]]}
    events = [
        agent_event("response", "digits-candidate", "r1", v1, "2026-01-01T00:00:00.250000000Z"),
        agent_event("request", "digits", "r1", request, "2026-01-01T00:00:00.000000000Z"),
        agent_event("response", "digits", "r1", v2, "2026-01-01T00:00:00.100000000Z"),
        agent_event("request", "digits-candidate", "r1", request, "2026-01-01T00:00:00.050000000Z"),
        agent_event("request", "digits", "r2", request, "2026-01-01T00:00:01Z"),  # the primary failed: no answer
        agent_event("response", "digits", "r3", v1, "2026-01-01T00:00:02Z"),  # response-only logging, no candidate
    ]
    for event in events:
        collector.accept(event, now=0.0)
    text = collector.metrics.render().decode()
    assert metric(text, "visionpipe_shadow_comparisons_total", result="disagree") == 1
    assert samples(text, "visionpipe_shadow_flips_total") == {(("candidate", "0"), ("primary", "abstain")): 1.0}
    assert metric(text, "visionpipe_shadow_abstentions_total", model="primary") == 1
    assert metric(text, "visionpipe_shadow_abstention_delta") == pytest.approx(-0.5)
    # latency from ce-time (the agent stamps arrival and answer): primary 0.1 s, candidate 0.2 s
    # (a histogram with negative buckets exports no _sum: prometheus_client follows OpenMetrics there)
    assert metric(text, "visionpipe_shadow_latency_delta_seconds_bucket", le="0.05") == 0
    assert metric(text, "visionpipe_shadow_latency_delta_seconds_bucket", le="0.25") == 1
    assert metric(text, "visionpipe_shadow_latency_seconds_sum", model="candidate") == pytest.approx(0.2, abs=1e-6)
    assert metric(text, "visionpipe_shadow_latency_seconds_sum", model="primary") == pytest.approx(0.1, abs=1e-6)
    assert metric(text, "visionpipe_shadow_pending_pairs") == 2
    collector.sweep(now=4.9)
    assert metric(collector.metrics.render().decode(), "visionpipe_shadow_pending_pairs") == 2
    collector.sweep(now=5.0)
    text = collector.metrics.render().decode()
    assert metric(text, "visionpipe_shadow_dropped_total", reason="primary_incomplete") == 1
    assert metric(text, "visionpipe_shadow_candidate_errors_total", reason="missing") == 1
    assert metric(text, "visionpipe_shadow_pending_pairs") == 0


def test_unknown_sources_duplicates_and_the_pending_cap() -> None:
    collector = Collector(CollectorConfig(max_pending=1))
    collector.accept(agent_event("request", "someone-else", "x", {}, "2026-01-01T00:00:00Z"))
    first = agent_event("request", "digits", "a", {}, "2026-01-01T00:00:00Z")
    collector.accept(first)
    collector.accept(first)
    collector.accept(agent_event("request", "digits", "b", {}, "2026-01-01T00:00:00Z"))
    text = collector.metrics.render().decode()
    assert metric(text, "visionpipe_shadow_dropped_total", reason="unknown_model") == 1
    assert metric(text, "visionpipe_shadow_dropped_total", reason="duplicate") == 1
    assert metric(text, "visionpipe_shadow_dropped_total", reason="too_many_pending") == 1
    # no ce-inferenceservicename: the agent's ce-source (the pod name) decides
    bare = {k: v for k, v in AGENT_HEADERS.items() if k != "ce-inferenceservicename"}
    event = parse_cloudevent(
        bare | {"ce-id": "i", "ce-type": REQUEST_TYPE, "ce-source": "digits-candidate-predictor-x"}, b"{}"
    )
    assert collector.side_of(event) == "candidate"


def test_structured_events_and_join_keys() -> None:
    envelope = {
        "specversion": "1.0", "id": "x2", "type": RESPONSE_TYPE, "source": "s", "inferenceservicename": "digits",
        "metadata": {"x-request-id": ["r9"]}, "time": "2026-01-01T00:00:00.123456789Z", "data": {"predictions": []},
    }  # fmt: skip
    event = parse_cloudevent({"content-type": "application/cloudevents+json"}, json.dumps(envelope).encode())
    assert (event.id, json.loads(event.data), join_key(event)) == ("x2", {"predictions": []}, "rid:r9")
    assert event_seconds(event.time) == pytest.approx(1767225600.123456)
    assert join_key(parse_cloudevent({"ce-id": "c", "ce-type": REQUEST_TYPE}, b"")) == "ceid:c"
    with pytest.raises(CloudEventError, match="ce-id"):
        parse_cloudevent({"content-type": "application/json"}, b"{}")


@pytest.mark.parametrize(
    ("answer", "labels"),
    [
        ({"predictions": [{"label": 3}, {"label": -1, "decision": {"abstain": True}}]}, ("3", "abstain")),
        ({"outputs": [{"name": "label", "datatype": "INT64", "shape": [2], "data": [5, 6]}]}, ("5", "6")),
        (b'{"predictions": [{"label": 9}]}', ("9",)),
    ],
)
def test_read_answer(answer: object, labels: tuple[str, ...]) -> None:
    assert tuple(d.label for d in read_answer(answer)) == labels
    assert all(isinstance(d, Decision) for d in read_answer(answer))


@pytest.mark.parametrize(
    "answer", [b"not json", [1], {"result": 1}, {"predictions": [3]}, {"outputs": [{"name": "probs", "data": [1]}]}]
)
def test_read_answer_refuses(answer: object) -> None:
    with pytest.raises(AnswerError):
        read_answer(answer)


def test_configuration_errors_name_the_value() -> None:
    with pytest.raises(CollectorError, match="'digits'"):
        CollectorConfig(primary="digits", candidate="digits")
    with pytest.raises(CollectorError, match="pair_ttl_s"):
        CollectorConfig(pair_ttl_s=0)
    with pytest.raises(EventLoggerError, match="allowed: all, request, response"):
        EventLoggerConfig(url="http://127.0.0.1:1/", mode="everything")  # type: ignore[arg-type]
    with pytest.raises(EventLoggerError, match="ftp"):
        EventLoggerConfig(url="ftp://x/")
    with pytest.raises(EventLoggerError, match="grpc"):
        EventLoggerConfig(url="http://x/", protocols=("http",))
    assert EventLoggerConfig.from_env("digits", {}) is None
    config = EventLoggerConfig.from_env("digits", {"VISIONPIPE_EVENT_LOGGER_URL": "http://c/", "POD_NAMESPACE": "ml"})
    assert config is not None and (config.inference_service, config.namespace, config.mode) == ("digits", "ml", "all")
    assert canonical_header("x-request-id") == "X-Request-Id"


def test_grpc_style_requests_are_logged_as_v2_rest_json() -> None:
    from kserve.protocol.infer_type import InferInput, InferRequest

    tensor = InferInput("pixels_uint8", [1, 2, 2, 1], "UINT8")
    tensor._raw_data = bytes([0, 1, 2, 255])
    request = InferRequest(model_name="digits", infer_inputs=[tensor], request_id="r1")
    assert request_json(request) == {
        "id": "r1",
        "inputs": [{"name": "pixels_uint8", "datatype": "UINT8", "shape": [1, 2, 2, 1], "data": [0, 1, 2, 255]}],
    }
    png = InferInput("image", [1], "BYTES")
    png._raw_data = len(b"\x89PNG").to_bytes(4, "little") + b"\x89PNG"
    logged = request_json(InferRequest(model_name="digits", infer_inputs=[png]))
    assert logged == {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["iVBORw=="]}]}
