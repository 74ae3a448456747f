"""visionpipe/rollout/shadow.py: the shadow replayer, against real KServe ModelServers on loopback.

Run as a script, this file serves two trivial kserve.Models (label = (sum of the instance + offset) mod 10):
``agree`` (offset 0, like the primary) and ``disagree`` (offset 1), with
visionpipe.serving.server_util.run_model_server.
The tests start that ModelServer and two replayers (one per candidate model) as subprocesses on free loopback
ports, stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from visionpipe.harness import ServerProcess, free_port, running_server, start_server
from visionpipe.rollout.shadow import (
    REQUEST_TYPE,
    RESPONSE_TYPE,
    CloudEvent,
    CloudEventError,
    LabelError,
    ShadowConfig,
    ShadowError,
    ShadowReplayer,
    extract_labels,
    parse_cloudevent,
)

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- helpers
def fixed_label(instance: list[float], offset: int) -> int:
    return (int(sum(instance)) + offset) % 10


def logger_headers(event_id: str, event_type: str) -> dict[str, str]:
    """The headers KServe's request logger sends (binary-mode CloudEvents)."""
    return {
        "ce-id": event_id,
        "ce-type": event_type,
        "ce-source": "http://localhost:9081/",
        "ce-specversion": "1.0",
        "ce-inferenceservicename": "digits",
        "ce-namespace": "default",
        "ce-component": "predictor",
        "ce-endpoint": "default",
        "content-type": "application/json",
    }


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def wait_for_metric(base_url: str, name: str, expected: float, timeout_s: float = 15.0, **labels: str) -> str:
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(f"{base_url}/metrics", timeout=2.0).text
        if metric(text, name, **labels) >= expected:
            return text
        time.sleep(0.1)
    raise AssertionError(f"{name}{labels} never reached {expected}; metrics:\n{text}")


def assert_listens_on_loopback_only(port: int) -> None:
    """/proc/net/tcp lists listening sockets (state 0A) as hex ADDR:PORT; 0100007F is 127.0.0.1."""
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    listening = {row[1] for row in rows if row[3] == "0A"}
    assert f"0100007F:{port:04X}" in listening
    assert f"00000000:{port:04X}" not in listening
    rows6 = [line.split() for line in Path("/proc/net/tcp6").read_text().splitlines()[1:]]
    assert not any(row[1].endswith(f":{port:04X}") and row[3] == "0A" for row in rows6)


def model_server_argv(port: int) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), f"--http_port={port}"]


def replayer_argv(port: int, candidate_port: int, model: str) -> list[str]:
    url = f"http://127.0.0.1:{candidate_port}/v1/models/{model}:predict"
    return [
        sys.executable,
        "-m",
        "visionpipe.rollout.shadow",
        f"--candidate-url={url}",
        f"--port={port}",
        "--workers=2",
    ]


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, ServerProcess]]:
    """The candidates' ModelServer (kserve) and one replayer per candidate model, started in parallel."""
    ports = {name: free_port() for name in ("candidates", "shadow_agree", "shadow_disagree")}
    plans = {
        "candidates": (model_server_argv(ports["candidates"]), "/v2/health/ready"),
        "shadow_agree": (replayer_argv(ports["shadow_agree"], ports["candidates"], "agree"), "/healthz"),
        "shadow_disagree": (
            replayer_argv(ports["shadow_disagree"], ports["candidates"], "disagree"),
            "/healthz",
        ),
    }
    started: dict[str, ServerProcess] = {}
    with ThreadPoolExecutor(max_workers=len(plans)) as pool:
        futures = {
            name: pool.submit(start_server, argv, ports[name], ready_path=path, timeout_s=45.0, cwd=ROOT)
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
    try:
        yield started
    finally:
        for server in started.values():
            server.stop()


# --------------------------------------------------------------------------------------------- end to end
def test_candidates_answer_like_kserve(servers: dict[str, ServerProcess]) -> None:
    body = {"instances": [[1, 2], [4, 4]]}
    base = servers["candidates"].base_url
    agree = httpx.post(f"{base}/v1/models/agree:predict", json=body).json()
    disagree = httpx.post(f"{base}/v1/models/disagree:predict", json=body).json()
    assert extract_labels(agree) == ("3", "8")
    assert extract_labels(disagree) == ("4", "9")
    assert_listens_on_loopback_only(servers["candidates"].port)  # run_model_server's default host


def test_replayer_counts_agreement_and_latency(servers: dict[str, ServerProcess]) -> None:
    n = 12
    for shadow in ("shadow_agree", "shadow_disagree"):
        url = servers[shadow].base_url
        with httpx.Client(timeout=5.0) as client:
            for i in range(n):
                instances = [[float(i)], [float(i + 3)]]
                request = json.dumps({"instances": instances}).encode()
                primary = json.dumps({"predictions": [fixed_label(x, 0) for x in instances]}).encode()
                events = [
                    (REQUEST_TYPE, request),
                    (RESPONSE_TYPE, primary),
                ]
                if i % 3 == 0:  # the logger gives no ordering guarantee
                    events.reverse()
                for event_type, payload in events:
                    answer = client.post(url + "/", content=payload, headers=logger_headers(f"id-{i}", event_type))
                    assert answer.status_code == 202
        wait_for_metric(url, "visionpipe_shadow_candidate_latency_seconds_count", n)

    agree_text = wait_for_metric(
        servers["shadow_agree"].base_url, "visionpipe_shadow_comparisons_total", n, result="agree"
    )
    assert metric(agree_text, "visionpipe_shadow_comparisons_total", result="disagree") == 0
    assert metric(agree_text, "visionpipe_shadow_instances_total", result="agree") == 2 * n
    assert metric(agree_text, "visionpipe_shadow_events_total", type="request") == n
    assert metric(agree_text, "visionpipe_shadow_events_total", type="response") == n
    assert metric(agree_text, "visionpipe_shadow_candidate_latency_seconds_count") == n
    assert metric(agree_text, "visionpipe_shadow_primary_latency_seconds_count") == n
    assert metric(agree_text, "visionpipe_shadow_pending_pairs") == 0

    disagree_text = wait_for_metric(
        servers["shadow_disagree"].base_url, "visionpipe_shadow_comparisons_total", n, result="disagree"
    )
    assert metric(disagree_text, "visionpipe_shadow_comparisons_total", result="agree") == 0
    assert metric(disagree_text, "visionpipe_shadow_instances_total", result="disagree") == 2 * n


def test_replayer_refuses_non_cloudevents(servers: dict[str, ServerProcess]) -> None:
    url = servers["shadow_agree"].base_url
    answer = httpx.post(url + "/", content=b"{}", headers={"content-type": "application/json"})
    assert answer.status_code == 400
    text = httpx.get(url + "/metrics").text
    assert metric(text, "visionpipe_shadow_dropped_total", reason="not_a_cloudevent") >= 1


def test_replayer_binds_loopback_by_default() -> None:
    port = free_port()
    argv = [sys.executable, "-m", "visionpipe.rollout.shadow", "--candidate-url=http://127.0.0.1:9/x", f"--port={port}"]
    with running_server(argv, port, ready_path="/healthz", timeout_s=30.0) as server:
        assert httpx.get(f"{server.base_url}/healthz").json() == {"status": "ok"}
        assert_listens_on_loopback_only(port)


# --------------------------------------------------------------------------------------------- in process
def test_queue_full_drops_without_blocking() -> None:
    async def scenario() -> ShadowReplayer:
        replayer = ShadowReplayer(ShadowConfig(candidate_url="http://127.0.0.1:9/x", queue_size=2))
        for i in range(5):  # no workers running: the queue fills after two
            replayer.accept(CloudEvent(f"e{i}", REQUEST_TYPE, "src", b'{"instances": [[1]]}'))
        for i in range(5):
            replayer.accept(CloudEvent(f"e{i}", RESPONSE_TYPE, "src", b'{"predictions": [1]}'))
        return replayer

    replayer = asyncio.run(scenario())
    text = replayer.metrics.render().decode()
    assert metric(text, "visionpipe_shadow_dropped_total", reason="queue_full") == 3
    assert metric(text, "visionpipe_shadow_queue_depth") == 2
    assert metric(text, "visionpipe_shadow_pending_pairs") == 2  # the two queued, waiting for the candidate


def test_unreachable_candidate_is_counted() -> None:
    async def scenario() -> ShadowReplayer:
        replayer = ShadowReplayer(ShadowConfig(candidate_url=f"http://127.0.0.1:{free_port()}/x", timeout_s=2))
        async with httpx.AsyncClient(timeout=2.0) as client:
            worker = asyncio.create_task(replayer.run_worker(client))
            replayer.accept(CloudEvent("a", REQUEST_TYPE, "src", b'{"instances": [[1]]}'))
            replayer.accept(CloudEvent("a", RESPONSE_TYPE, "src", b'{"predictions": [1]}'))
            await asyncio.wait_for(replayer._queue.join(), timeout=10)
            worker.cancel()
        return replayer

    replayer = asyncio.run(scenario())
    text = replayer.metrics.render().decode()
    assert metric(text, "visionpipe_shadow_candidate_errors_total", reason="connection") == 1
    assert metric(text, "visionpipe_shadow_comparisons_total", result="agree") == 0
    assert metric(text, "visionpipe_shadow_pending_pairs") == 0


# --------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    ("answer", "labels"),
    [
        ({"predictions": [3, 7]}, ("3", "7")),
        ({"predictions": ["cat", "dog"]}, ("cat", "dog")),
        ({"predictions": [2.0]}, ("2",)),
        ({"predictions": [[0.1, 0.7, 0.2]]}, ("1",)),
        ({"predictions": [{"label": 4, "probabilities": [0.0] * 10}]}, ("4",)),
        ({"predictions": [{"class": "roadwork"}]}, ("roadwork",)),
        ({"predictions": [{"probabilities": [0.9, 0.1]}]}, ("0",)),
        ({"outputs": [{"name": "label", "datatype": "INT64", "shape": [2], "data": [5, 6]}]}, ("5", "6")),
        (
            {
                "outputs": [
                    {
                        "name": "probs",
                        "datatype": "FP32",
                        "shape": [2, 3],
                        "data": [0.1, 0.8, 0.1, 0.6, 0.3, 0.1],
                    },
                ]
            },
            ("1", "0"),
        ),
        (
            {
                "outputs": [
                    {"name": "probs", "datatype": "FP32", "shape": [1, 2], "data": [0.1, 0.9]},
                    {"name": "predicted_label", "datatype": "BYTES", "shape": [1], "data": ["yes"]},
                ]
            },
            ("yes",),
        ),
        (b'{"predictions": [9]}', ("9",)),
    ],
)
def test_extract_labels(answer: object, labels: tuple[str, ...]) -> None:
    assert extract_labels(answer) == labels


@pytest.mark.parametrize(
    "answer",
    [b"not json", [1, 2], {"result": 1}, {"predictions": 3}, {"predictions": [{"x": 1}]}, {"outputs": []}],
)
def test_extract_labels_refuses(answer: object) -> None:
    with pytest.raises(LabelError):
        extract_labels(answer)


def test_parse_binary_and_structured_events() -> None:
    binary = parse_cloudevent(logger_headers("x1", REQUEST_TYPE), b'{"instances": []}')
    assert (binary.id, binary.type, binary.data) == ("x1", REQUEST_TYPE, b'{"instances": []}')
    envelope = {
        "specversion": "1.0",
        "id": "x2",
        "type": RESPONSE_TYPE,
        "source": "s",
        "data": {"predictions": [1]},
    }
    structured = parse_cloudevent({"content-type": "application/cloudevents+json"}, json.dumps(envelope).encode())
    assert structured.id == "x2" and json.loads(structured.data) == {"predictions": [1]}
    with pytest.raises(CloudEventError):
        parse_cloudevent({"content-type": "application/json"}, b"{}")


@pytest.mark.parametrize(
    ("field", "value"),
    [("candidate_url", "ftp://x/y"), ("candidate_url", "no-scheme"), ("queue_size", 0), ("timeout_s", 0.0)],
)
def test_config_validation(field: str, value: object) -> None:
    kwargs: dict[str, object] = {"candidate_url": "http://127.0.0.1:1/x", field: value}
    with pytest.raises(ShadowError, match=field):
        ShadowConfig(**kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- script mode
def _serve_fixed_label_model(argv: list[str]) -> None:
    import kserve

    from visionpipe.serving.server_util import run_model_server

    parser = argparse.ArgumentParser()
    parser.add_argument("--http_port", type=int, required=True)
    args, _ = parser.parse_known_args(argv)

    class FixedLabelModel(kserve.Model):  # type: ignore[misc]
        def __init__(self, name: str, offset: int) -> None:
            super().__init__(name)
            self.offset = offset
            self.ready = True

        async def predict(
            self,
            payload: dict[str, list[list[float]]],
            headers: dict[str, str] | None = None,
            response_headers: dict[str, str] | None = None,
        ) -> dict[str, list[int]]:
            return {"predictions": [fixed_label(x, self.offset) for x in payload["instances"]]}

    models = [FixedLabelModel("agree", 0), FixedLabelModel("disagree", 1)]
    run_model_server(models, http_port=args.http_port)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _serve_fixed_label_model(sys.argv[1:])
