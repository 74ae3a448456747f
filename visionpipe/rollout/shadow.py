"""Shadow traffic for KServe: replay the primary's requests to a candidate and measure agreement and latency.

KServe has no native shadow (mirrored) traffic. The primary InferenceService's request logger
(``spec.predictor.logger: {mode: all, url: <this service>}``) posts two CloudEvents per inference, in binary
mode: the request (``ce-type: org.kubeflow.serving.inference.request``) and the response
(``...inference.response``), sharing one ``ce-id``. This replayer:

1. accepts each event and answers 202 at once (it never slows the primary: a bounded queue, and events that
   do not fit are dropped and counted);
2. replays each request body to ``--candidate-url`` (the candidate's full predict URL) from worker tasks;
3. pairs the primary's response with the candidate's by ``ce-id`` and counts agreement on the predicted
   label(s); unpaired halves expire after ``pair_ttl_s``;
4. exposes Prometheus metrics on ``/metrics`` (prefix ``visionpipe_shadow_``): ``comparisons_total{result}``,
   ``instances_total{result}``, ``candidate_latency_seconds``, ``primary_latency_seconds`` (approximate:
   the gap between the two logger events), ``candidate_errors_total{reason}``, ``dropped_total{reason}``,
   ``events_total{type}``, ``queue_depth``, ``pending_pairs``.

Predicted labels are read from v1 answers (``{"predictions": [...]}``, items being labels, probability
lists, or objects with ``label`` / ``predicted_label`` / ``class`` / ``prediction``) and v2 answers
(``{"outputs": [...]}``, preferring an output named ``label``/``labels``/``predicted_label``; a 2-D
floating-point output is arg-maxed per row). See `extract_labels`.

Run: ``python -m visionpipe.rollout.shadow --candidate-url http://cand/v1/models/digits:predict --port 8080``
(binds 127.0.0.1 unless ``--host`` says otherwise; in a pod use ``--host 0.0.0.0``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

REQUEST_TYPE = "org.kubeflow.serving.inference.request"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"
LABEL_KEYS = ("label", "predicted_label", "class", "prediction")
LABEL_OUTPUT_NAMES = ("label", "labels", "predicted_label", "predicted_labels")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

log = logging.getLogger("visionpipe.shadow")


class ShadowError(ValueError):
    """Invalid replayer configuration."""


class CloudEventError(ValueError):
    """An HTTP request that is not a usable CloudEvent."""


class LabelError(ValueError):
    """An inference answer from which no predicted label can be read."""


# --------------------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class ShadowConfig:
    """candidate_url: the candidate's full predict URL (e.g. ``http://cand/v1/models/digits:predict``).

    queue_size: requests waiting for replay; more are dropped. workers: concurrent replays.
    timeout_s: per candidate call. pair_ttl_s: how long half of a pair waits for the other half.
    max_pending: pairs tracked at once. max_body_bytes: larger events are refused (413).
    candidate_host: optional Host header (to reach a Knative service through an ingress gateway).
    """

    candidate_url: str
    queue_size: int = 256
    workers: int = 4
    timeout_s: float = 5.0
    pair_ttl_s: float = 60.0
    max_pending: int = 10_000
    max_body_bytes: int = 8 * 1024 * 1024
    candidate_host: str | None = None

    def __post_init__(self) -> None:
        parsed = urlparse(self.candidate_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ShadowError(f"ShadowConfig.candidate_url={self.candidate_url!r} must be an http:// or https:// URL")
        for name in ("queue_size", "workers", "max_pending", "max_body_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ShadowError(f"ShadowConfig.{name}={value!r} must be a positive integer")
        for name in ("timeout_s", "pair_ttl_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ShadowError(f"ShadowConfig.{name}={value!r} must be a positive number of seconds")


# --------------------------------------------------------------------------------------------- events
@dataclass(frozen=True)
class CloudEvent:
    id: str
    type: str
    source: str
    data: bytes
    content_type: str = "application/json"


def parse_cloudevent(headers: Mapping[str, str], body: bytes) -> CloudEvent:
    """A CloudEvent from an HTTP request in binary mode (``ce-*`` headers) or structured mode (JSON envelope).

    `headers` must be case-insensitive or lower-case (Starlette's are).
    """
    content_type = headers.get("content-type", "application/json")
    if content_type.startswith("application/cloudevents+json"):
        return _structured_event(body)
    event_id, event_type = headers.get("ce-id"), headers.get("ce-type")
    if not event_id or not event_type:
        raise CloudEventError("missing ce-id or ce-type header (binary-mode CloudEvent expected)")
    return CloudEvent(
        id=event_id,
        type=event_type,
        source=headers.get("ce-source", ""),
        data=body,
        content_type=content_type,
    )


def _structured_event(body: bytes) -> CloudEvent:
    try:
        envelope = json.loads(body)
    except ValueError as exc:
        raise CloudEventError(f"structured CloudEvent is not JSON: {exc}") from exc
    if not isinstance(envelope, dict) or not envelope.get("id") or not envelope.get("type"):
        raise CloudEventError("structured CloudEvent needs 'id' and 'type'")
    data = envelope.get("data")
    payload = data.encode() if isinstance(data, str) else json.dumps(data).encode()
    if "data_base64" in envelope:
        import base64

        payload = base64.b64decode(str(envelope["data_base64"]))
    return CloudEvent(
        id=str(envelope["id"]),
        type=str(envelope["type"]),
        source=str(envelope.get("source", "")),
        data=payload,
        content_type=str(envelope.get("datacontenttype", "application/json")),
    )


# --------------------------------------------------------------------------------------------- labels
def extract_labels(answer: object) -> tuple[str, ...]:
    """The predicted label of every instance in a v1 or v2 inference answer (parsed JSON)."""
    if isinstance(answer, (bytes, str)):
        try:
            answer = json.loads(answer)
        except ValueError as exc:
            raise LabelError(f"answer is not JSON: {exc}") from exc
    if not isinstance(answer, dict):
        raise LabelError(f"answer is a {type(answer).__name__}, not a JSON object")
    if "predictions" in answer:
        predictions = answer["predictions"]
        if not isinstance(predictions, list):
            raise LabelError("'predictions' is not a list")
        return tuple(_v1_label(item) for item in predictions)
    if "outputs" in answer:
        return _v2_labels(answer["outputs"])
    raise LabelError(f"answer has neither 'predictions' (v1) nor 'outputs' (v2); keys: {sorted(answer)[:8]}")


def _v1_label(item: object) -> str:
    if isinstance(item, bool):
        return str(item).lower()
    if isinstance(item, (int, str)):
        return str(item)
    if isinstance(item, float):
        return str(int(item)) if item.is_integer() else str(item)
    if isinstance(item, list) and item and all(isinstance(v, (int, float)) for v in item):
        return str(max(range(len(item)), key=lambda i: float(item[i])))
    if isinstance(item, dict):
        for key in LABEL_KEYS:
            if key in item:
                return _v1_label(item[key])
        for key in ("probabilities", "probs", "scores"):
            if key in item:
                return _v1_label(item[key])
    raise LabelError(f"cannot read a label from prediction {str(item)[:80]!r}")


def _v2_labels(outputs: object) -> tuple[str, ...]:
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, dict) for o in outputs):
        raise LabelError("'outputs' must be a non-empty list of objects")
    chosen = next((o for o in outputs if o.get("name") in LABEL_OUTPUT_NAMES), outputs[0])
    data, shape = chosen.get("data"), chosen.get("shape", [])
    if not isinstance(data, list):
        raise LabelError(f"output {chosen.get('name')!r} has no data list")
    is_float = str(chosen.get("datatype", "")).upper().startswith("FP")
    if is_float and isinstance(shape, list) and len(shape) == 2 and int(shape[1]) > 1:
        width = int(shape[1])
        rows = [data[i : i + width] for i in range(0, len(data), width)]
        return tuple(_v1_label(row) for row in rows)
    return tuple(_v1_label(value) for value in data)


# --------------------------------------------------------------------------------------------- metrics
class ShadowMetrics:
    """The replayer's Prometheus metrics, in their own registry (several replayers can share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        prefix = "visionpipe_shadow_"
        self.events = Counter(prefix + "events", "CloudEvents received, by type", ["type"], registry=self.registry)
        self.comparisons = Counter(
            prefix + "comparisons",
            "Paired requests compared; result agree when every instance's label matches",
            ["result"],
            registry=self.registry,
        )
        self.instances = Counter(
            prefix + "instances", "Instances compared, by agreement", ["result"], registry=self.registry
        )
        self.candidate_errors = Counter(
            prefix + "candidate_errors", "Failed candidate calls", ["reason"], registry=self.registry
        )
        self.dropped = Counter(prefix + "dropped", "Events not compared", ["reason"], registry=self.registry)
        self.candidate_latency = Histogram(
            prefix + "candidate_latency_seconds",
            "Candidate round-trip latency",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.primary_latency = Histogram(
            prefix + "primary_latency_seconds",
            "Primary latency, approximated by the gap between its request and response events",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(prefix + "queue_depth", "Requests waiting for replay", registry=self.registry)
        self.pending_pairs = Gauge(prefix + "pending_pairs", "Half-complete pairs", registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


# --------------------------------------------------------------------------------------------- replayer
@dataclass
class _Pair:
    created: float
    request_at: float | None = None
    response_at: float | None = None
    primary: tuple[str, ...] | None = None
    candidate: tuple[str, ...] | None = None
    abandoned: bool = False  # the request was dropped or the candidate failed: the pair is not compared


@dataclass(frozen=True)
class _Job:
    event_id: str
    body: bytes
    content_type: str


@dataclass
class ShadowReplayer:
    """Pairs events and replays requests; all state lives on one asyncio loop (no locks needed)."""

    config: ShadowConfig
    metrics: ShadowMetrics = field(default_factory=ShadowMetrics)
    _queue: asyncio.Queue[_Job] = field(init=False)
    _pending: dict[str, _Pair] = field(default_factory=dict, init=False)
    _last_sweep: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.config.queue_size)

    # -- intake (called from the HTTP handler; never awaits) --
    def accept(self, event: CloudEvent) -> None:
        now = time.monotonic()
        self._sweep(now)
        if event.type == REQUEST_TYPE:
            self.metrics.events.labels(type="request").inc()
            self._accept_request(event, now)
        elif event.type == RESPONSE_TYPE:
            self.metrics.events.labels(type="response").inc()
            self._accept_response(event, now)
        else:
            self.metrics.events.labels(type="other").inc()
        self._update_gauges()

    def _pair(self, event_id: str, now: float) -> _Pair | None:
        pair = self._pending.get(event_id)
        if pair is None:
            if len(self._pending) >= self.config.max_pending:
                self.metrics.dropped.labels(reason="too_many_pending").inc()
                return None
            pair = self._pending[event_id] = _Pair(created=now)
        return pair

    def _accept_request(self, event: CloudEvent, now: float) -> None:
        pair = self._pair(event.id, now)
        if pair is None:
            return
        pair.request_at = now
        try:
            self._queue.put_nowait(_Job(event.id, event.data, event.content_type))
        except asyncio.QueueFull:
            self.metrics.dropped.labels(reason="queue_full").inc()
            self._abandon(event.id, pair)
            return
        self._observe_primary_latency(pair)

    def _accept_response(self, event: CloudEvent, now: float) -> None:
        pair = self._pair(event.id, now)
        if pair is None:
            return
        if pair.abandoned:
            del self._pending[event.id]
            return
        pair.response_at = now
        try:
            pair.primary = extract_labels(event.data)
        except LabelError as exc:
            log.debug("primary answer %s unreadable: %s", event.id, exc)
            self.metrics.dropped.labels(reason="primary_unreadable").inc()
            self._abandon(event.id, pair)
            return
        self._observe_primary_latency(pair)
        self._compare_if_complete(event.id, pair)

    def _observe_primary_latency(self, pair: _Pair) -> None:
        if pair.request_at is not None and pair.response_at is not None:
            self.metrics.primary_latency.observe(max(0.0, pair.response_at - pair.request_at))

    # -- replay (worker tasks) --
    async def run_worker(self, client: httpx.AsyncClient) -> None:
        while True:
            job = await self._queue.get()
            try:
                await self._replay(client, job)
            except Exception:  # a worker must survive anything one request does
                log.exception("replaying %s failed", job.event_id)
                self.metrics.candidate_errors.labels(reason="internal").inc()
            finally:
                self._queue.task_done()
                self._update_gauges()

    async def _replay(self, client: httpx.AsyncClient, job: _Job) -> None:
        headers = {"content-type": job.content_type}
        if self.config.candidate_host:
            headers["host"] = self.config.candidate_host
        started = time.perf_counter()
        try:
            answer = await client.post(self.config.candidate_url, content=job.body, headers=headers)
        except httpx.TimeoutException:
            self._candidate_failed(job.event_id, "timeout")
            return
        except httpx.HTTPError:
            self._candidate_failed(job.event_id, "connection")
            return
        self.metrics.candidate_latency.observe(time.perf_counter() - started)
        if answer.status_code != 200:
            self._candidate_failed(job.event_id, f"http_{answer.status_code}")
            return
        try:
            labels = extract_labels(answer.content)
        except LabelError:
            self._candidate_failed(job.event_id, "unreadable_answer")
            return
        pair = self._pending.get(job.event_id)
        if pair is None:  # expired meanwhile
            return
        if pair.abandoned:
            del self._pending[job.event_id]
            return
        pair.candidate = labels
        self._compare_if_complete(job.event_id, pair)

    def _candidate_failed(self, event_id: str, reason: str) -> None:
        self.metrics.candidate_errors.labels(reason=reason).inc()
        pair = self._pending.get(event_id)
        if pair is not None and pair.abandoned:
            del self._pending[event_id]
        elif pair is not None:
            self._abandon(event_id, pair)

    # -- pairing --
    def _compare_if_complete(self, event_id: str, pair: _Pair) -> None:
        if pair.primary is None or pair.candidate is None:
            return
        del self._pending[event_id]
        agree = pair.primary == pair.candidate
        self.metrics.comparisons.labels(result="agree" if agree else "disagree").inc()
        matches = sum(p == c for p, c in zip(pair.primary, pair.candidate, strict=False))
        total = max(len(pair.primary), len(pair.candidate))
        self.metrics.instances.labels(result="agree").inc(matches)
        self.metrics.instances.labels(result="disagree").inc(total - matches)
        self._update_gauges()

    def _abandon(self, event_id: str, pair: _Pair) -> None:
        """Mark a pair that will never be compared; its other half is discarded when it arrives."""
        if pair.response_at is not None and pair.request_at is not None:
            self._pending.pop(event_id, None)  # both halves seen: nothing more will come
            return
        pair.abandoned = True
        pair.primary = pair.candidate = None

    def _sweep(self, now: float) -> None:
        if now - self._last_sweep < 1.0:
            return
        self._last_sweep = now
        expired = [key for key, pair in self._pending.items() if now - pair.created > self.config.pair_ttl_s]
        for key in expired:
            if not self._pending.pop(key).abandoned:
                self.metrics.dropped.labels(reason="unpaired_expired").inc()

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(self._queue.qsize())
        self.metrics.pending_pairs.set(sum(not pair.abandoned for pair in self._pending.values()))


# --------------------------------------------------------------------------------------------- HTTP app
def create_app(config: ShadowConfig) -> FastAPI:
    """The replayer as an ASGI app: ``POST /`` (CloudEvents), ``GET /metrics``, ``GET /healthz``."""
    state: dict[str, ShadowReplayer] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        replayer = state["replayer"] = ShadowReplayer(config)
        app.state.replayer = replayer
        limits = httpx.Limits(max_connections=config.workers, max_keepalive_connections=config.workers)
        async with httpx.AsyncClient(timeout=config.timeout_s, limits=limits) as client:
            workers = [asyncio.create_task(replayer.run_worker(client)) for _ in range(config.workers)]
            try:
                yield
            finally:
                for task in workers:
                    task.cancel()
                await asyncio.gather(*workers, return_exceptions=True)

    app = FastAPI(title="visionpipe shadow replayer", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.post("/", status_code=202)
    async def receive(request: Request) -> Response:
        declared = int(request.headers.get("content-length") or 0)
        if declared > config.max_body_bytes:
            state["replayer"].metrics.dropped.labels(reason="too_large").inc()
            return Response(status_code=413, content=b"event too large")
        body = await request.body()
        if len(body) > config.max_body_bytes:
            state["replayer"].metrics.dropped.labels(reason="too_large").inc()
            return Response(status_code=413, content=b"event too large")
        try:
            event = parse_cloudevent(request.headers, body)
        except CloudEventError as exc:
            state["replayer"].metrics.dropped.labels(reason="not_a_cloudevent").inc()
            return Response(status_code=400, content=str(exc).encode())
        state["replayer"].accept(event)
        return Response(status_code=202)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(content=state["replayer"].metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


# --------------------------------------------------------------------------------------------- entry point
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m visionpipe.rollout.shadow", description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidate-url", required=True, help="the candidate's full predict URL")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 inside a pod)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--queue-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--timeout-s", type=float, default=5.0)
    parser.add_argument("--pair-ttl-s", type=float, default=60.0)
    parser.add_argument("--candidate-host", default=None, help="Host header for the candidate (optional)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    config = ShadowConfig(
        candidate_url=args.candidate_url,
        queue_size=args.queue_size,
        workers=args.workers,
        timeout_s=args.timeout_s,
        pair_ttl_s=args.pair_ttl_s,
        candidate_host=args.candidate_host,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("shadow replayer on %s:%d -> %s", args.host, args.port, config.candidate_url)
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
