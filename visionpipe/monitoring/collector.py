"""The shadow collector: KServe logger CloudEvents from the primary and the candidate in, agreement metrics out.

The mesh mirrors live requests to the candidate (manifests/overlays/shadow, shadow-standard) and drops its
answers; both InferenceServices log request and response as CloudEvents to this one collector (KServe's agent,
``spec.predictor.logger``, for REST; visionpipe/serving/event_logger.py in the predictor for gRPC, or for both).
The collector:

1. accepts each event at once (202; binary mode, ``ce-*`` headers, as KServe's agent sends them, or structured
   mode, ``application/cloudevents+json``), with bounded memory: events over `max_body_bytes` are refused (413),
   at most `max_pending` requests are tracked, halves still unpaired after `pair_ttl_s` expire;
2. tells the primary from the candidate by ``ce-inferenceservicename`` (``--primary digits --candidate
   digits-candidate``), else by ``ce-source`` (KServe's agent sends the pod name, ``<isvc>-predictor-...``:
   kserve pkg/webhook/admission/pod/agent_injector.go);
3. joins the two by the request id both see: ``X-Request-Id`` from the ``ce-metadata`` extension (KServe's agent
   sends the headers listed in the logger's ``metadataHeaders`` there, pkg/logger/handler.go; the mesh's Envoy sets
   ``x-request-id`` once and the mirrored copy carries the same value), else ``ce-id`` (the agent reuses an
   incoming ``Ce-Id`` header, else draws a UUID per server, so ``ce-id`` alone joins only when the client sets it);
4. compares the two answers once all four halves are in (or at `pair_ttl_s`, when both answers are): the label of
   every instance, from v1 ``{"predictions": [{"label": ...}]}`` and v2 ``{"outputs": [{"name": "label"}, {"name":
   "abstain"}]}`` answers of visionpipe/serving/predictor.py (label -1 = abstain);
5. exports Prometheus metrics on ``GET /metrics`` (prefix ``visionpipe_shadow_``):
   ``comparisons_total{result=agree|disagree}`` (per request: every instance's label equal),
   ``instances_total{result}``, ``flips_total{primary,candidate}`` (per instance whose label differs, labels as class
   indices or ``abstain``), ``abstentions_total{model=primary|candidate}`` and the gauge ``abstention_delta``
   (candidate minus primary abstentions per compared instance), ``latency_seconds{model}`` and
   ``latency_delta_seconds`` (candidate minus primary server-side latency: the ``ce-latencyms`` extension of
   visionpipe's logger, else the response's ``ce-time`` minus the request's, which KServe's agent stamps on arrival
   and on answer), ``candidate_errors_total{reason}`` (``no_response``: the candidate logged the request but no
   answer, i.e. it refused or failed it, since loggers log only 200 answers; ``missing``: nothing from the candidate
   within `pair_ttl_s`; ``unreadable_answer``; ``instance_count``), ``dropped_total{reason}`` (invalid or unusable
   events), ``events_total{model,type}`` and ``pending_pairs``;
6. with ``--drift-reference <bundle dir or s3:// URI>``, feeds every primary request / answer pair to
   `visionpipe.monitoring.drift.DriftMonitor` (on one worker thread; a scrape after new observations queues a new
   report there and shows the previous one, so a scrape never waits) and exports ``visionpipe_drift_statistic``,
   ``_threshold``, ``_alarm`` ``{feature,test}`` and ``visionpipe_drift_window``.

Run: ``python -m visionpipe.monitoring.collector --primary digits --candidate digits-candidate --port 8080``
(binds 127.0.0.1 unless ``--host`` says otherwise; in a pod ``--host 0.0.0.0``). One replica: pairs live in memory.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import uvicorn
from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from visionpipe.monitoring.answers import ABSTAIN_LABEL, read_answers
from visionpipe.monitoring.answers import AnswerError as AnswerError  # re-exported: raised by read_answer

if TYPE_CHECKING:
    from visionpipe.monitoring.drift import DriftMonitor

REQUEST_TYPE = "org.kubeflow.serving.inference.request"  # kserve pkg/logger/worker.go CEInferenceRequest
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"  # CEInferenceResponse
LATENCY_EXTENSION = "latencyms"  # visionpipe/serving/event_logger.py
JOIN_HEADER = "X-Request-Id"  # Go's canonical form, as the agent writes ce-metadata keys
ABSTAIN = "abstain"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DELTA_BUCKETS = (-2.5, -1.0, -0.5, -0.25, -0.1, -0.05, -0.025, -0.01, 0.0, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

Side = Literal["primary", "candidate"]
SIDES: tuple[Side, Side] = ("primary", "candidate")
log = logging.getLogger("visionpipe.collector")


class CollectorError(ValueError):
    """Invalid collector configuration."""


class CloudEventError(ValueError):
    """An HTTP request that is not a usable CloudEvent."""


# --------------------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class CollectorConfig:
    """primary / candidate: the InferenceService names (``ce-inferenceservicename``) of the two sides.

    pair_ttl_s: how long a request waits for its missing halves. max_pending: requests tracked at once (more are
    dropped). max_body_bytes: larger events are refused (413). sweep_interval_s: how often expiry runs."""

    primary: str = "digits"
    candidate: str = "digits-candidate"
    pair_ttl_s: float = 30.0
    max_pending: int = 10_000
    max_body_bytes: int = 8 * 1024 * 1024
    sweep_interval_s: float = 0.5
    drift_reference: str | None = None
    drift_window: int = 256
    drift_false_alarm_rate: float = 0.01

    def __post_init__(self) -> None:
        if not self.primary or not self.candidate or self.primary == self.candidate:
            raise CollectorError(
                f"primary={self.primary!r} and candidate={self.candidate!r} must be two different InferenceService "
                "names (e.g. --primary digits --candidate digits-candidate)"
            )
        for name in ("max_pending", "max_body_bytes", "drift_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise CollectorError(f"CollectorConfig.{name}={value!r} must be a positive integer")
        for name in ("pair_ttl_s", "sweep_interval_s"):
            value = getattr(self, name)
            if not value > 0:
                raise CollectorError(f"CollectorConfig.{name}={value!r} must be a positive number of seconds")
        if not 0 < self.drift_false_alarm_rate < 1:
            raise CollectorError(
                f"CollectorConfig.drift_false_alarm_rate={self.drift_false_alarm_rate!r} must be between 0 and 1"
            )


# --------------------------------------------------------------------------------------------- events
@dataclass(frozen=True)
class CloudEvent:
    id: str
    type: str
    source: str
    data: bytes
    extensions: Mapping[str, str] = field(default_factory=dict)
    time: str | None = None
    content_type: str = "application/json"


CORE_ATTRIBUTES = ("id", "type", "source", "specversion", "time", "datacontenttype", "data", "data_base64")


def parse_cloudevent(headers: Mapping[str, str], body: bytes) -> CloudEvent:
    """A CloudEvent from an HTTP request in binary mode (``ce-*`` headers) or structured mode (JSON envelope).

    `headers` must be case-insensitive or lower-case (Starlette's are)."""
    content_type = headers.get("content-type", "application/json")
    if content_type.startswith("application/cloudevents+json"):
        return _structured_event(body)
    event_id, event_type = headers.get("ce-id"), headers.get("ce-type")
    if not event_id or not event_type:
        raise CloudEventError(
            "missing ce-id or ce-type header: expected a binary-mode CloudEvent (ce-* headers) or a structured one "
            "(Content-Type: application/cloudevents+json)"
        )
    extensions = {
        key[3:].lower(): value
        for key, value in headers.items()
        if key.lower().startswith("ce-") and key[3:].lower() not in CORE_ATTRIBUTES
    }
    return CloudEvent(
        id=event_id,
        type=event_type,
        source=headers.get("ce-source", ""),
        data=body,
        extensions=extensions,
        time=headers.get("ce-time"),
        content_type=content_type,
    )


def _structured_event(body: bytes) -> CloudEvent:
    try:
        envelope = json.loads(body)
    except ValueError as exc:
        raise CloudEventError(f"structured CloudEvent is not JSON: {exc}") from exc
    if not isinstance(envelope, dict) or not envelope.get("id") or not envelope.get("type"):
        raise CloudEventError("a structured CloudEvent needs 'id' and 'type'")
    if "data_base64" in envelope:
        try:
            payload = base64.b64decode(str(envelope["data_base64"]), validate=True)
        except ValueError as exc:
            raise CloudEventError(f"data_base64 is not valid base64: {exc}") from exc
    else:
        data = envelope.get("data")
        payload = data.encode() if isinstance(data, str) else json.dumps(data).encode()
    extensions = {str(k).lower(): _attribute(v) for k, v in envelope.items() if k not in CORE_ATTRIBUTES}
    return CloudEvent(
        id=str(envelope["id"]),
        type=str(envelope["type"]),
        source=str(envelope.get("source", "")),
        data=payload,
        extensions=extensions,
        time=None if envelope.get("time") is None else str(envelope["time"]),
        content_type=str(envelope.get("datacontenttype", "application/json")),
    )


def _attribute(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def join_key(event: CloudEvent) -> str:
    """The request id both servers see: ``X-Request-Id`` from ``ce-metadata`` (any case), else ``ce-id``."""
    raw = event.extensions.get("metadata")
    if raw:
        with contextlib.suppress(ValueError):
            metadata = json.loads(raw)
            if isinstance(metadata, dict):
                for key, values in metadata.items():
                    if str(key).lower() == JOIN_HEADER.lower():
                        value = values[0] if isinstance(values, list) and values else values
                        if isinstance(value, str) and value:
                            return "rid:" + value
    return "ceid:" + event.id


def event_seconds(value: str | None) -> float | None:
    """RFC 3339 ``ce-time`` -> epoch seconds (nanoseconds, as Go writes them, cut to microseconds)."""
    if not value:
        return None
    text = value.strip().replace("Z", "+00:00").replace("z", "+00:00")
    fraction = re.search(r"\.(\d+)", text)
    if fraction:  # Python reads at most 6 fractional digits
        digits = fraction.group(1)
        text = text[: fraction.start()] + "." + digits[:6].ljust(6, "0") + text[fraction.end() :]
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------- answers
@dataclass(frozen=True)
class Decision:
    label: str  # class index as text, or "abstain"

    @property
    def abstained(self) -> bool:
        return self.label == ABSTAIN


def read_answer(answer: object) -> tuple[Decision, ...]:
    """Every instance's decision in a v1 or v2 answer of visionpipe's predictor (bytes, text or parsed JSON;
    the parser the drift monitor uses too: visionpipe/monitoring/answers.py)."""
    labels = read_answers(answer).labels
    return tuple(Decision(ABSTAIN if label == ABSTAIN_LABEL else str(int(label))) for label in labels)


# --------------------------------------------------------------------------------------------- metrics
class CollectorMetrics:
    """The collector's Prometheus metrics, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        p, r = "visionpipe_shadow_", self.registry
        self.events = Counter(p + "events", "CloudEvents received, by side and type", ["model", "type"], registry=r)
        self.comparisons = Counter(
            p + "comparisons", "Requests compared; agree when every instance's label matches", ["result"], registry=r
        )
        self.instances = Counter(p + "instances", "Instances compared, by agreement", ["result"], registry=r)
        self.flips = Counter(
            p + "flips", "Instances whose label differs, by primary and candidate label", ["primary", "candidate"],
            registry=r,
        )  # fmt: skip
        self.abstentions = Counter(p + "abstentions", "Abstained instances among those compared", ["model"], registry=r)
        self.abstention_delta = Gauge(
            p + "abstention_delta", "Candidate minus primary abstentions per compared instance", registry=r
        )
        self.latency = Histogram(
            p + "latency_seconds", "Server-side latency of compared requests", ["model"], buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.latency_delta = Histogram(
            p + "latency_delta_seconds", "Candidate minus primary server-side latency", buckets=DELTA_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.candidate_errors = Counter(
            p + "candidate_errors", "Requests the candidate did not answer usably", ["reason"], registry=r
        )
        self.dropped = Counter(p + "dropped", "Events or requests not compared", ["reason"], registry=r)
        self.pending = Gauge(p + "pending_pairs", "Requests waiting for halves", registry=r)
        self.drift_statistic = Gauge(
            "visionpipe_drift_statistic", "Drift statistic on the live window", ["feature", "test"], registry=r
        )
        self.drift_threshold = Gauge(
            "visionpipe_drift_threshold", "Null threshold of the statistic at this window", ["feature", "test"],
            registry=r,
        )  # fmt: skip
        self.drift_alarm = Gauge(
            "visionpipe_drift_alarm", "1 when the statistic exceeds its threshold on a full window",
            ["feature", "test"], registry=r,
        )  # fmt: skip
        self.drift_window = Gauge("visionpipe_drift_window", "Observations in the live window", registry=r)
        self.drift_errors = Counter(
            "visionpipe_drift_errors", "Primary request/answer pairs the drift monitor could not read", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


# --------------------------------------------------------------------------------------------- pairing
@dataclass
class _Half:
    request: bytes | None = None
    response: bytes | None = None
    request_time: float | None = None
    response_time: float | None = None
    latency_s: float | None = None

    def latency(self) -> float | None:
        if self.latency_s is not None:
            return self.latency_s
        if self.request_time is not None and self.response_time is not None:
            return max(0.0, self.response_time - self.request_time)
        return None


@dataclass
class _Entry:
    created: float
    halves: dict[str, _Half] = field(default_factory=lambda: {side: _Half() for side in SIDES})

    def complete(self) -> bool:
        return all(h.request is not None and h.response is not None for h in self.halves.values())


@dataclass
class Collector:
    """Joins events and counts; all state lives on one asyncio loop (no locks needed)."""

    config: CollectorConfig
    metrics: CollectorMetrics = field(default_factory=CollectorMetrics)
    drift: DriftMonitor | None = None
    _pending: OrderedDict[str, _Entry] = field(default_factory=OrderedDict, init=False)
    _compared_instances: int = field(default=0, init=False)
    _abstained: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SIDES, 0), init=False)
    _drift_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="drift"), init=False
    )
    _drift_jobs: set[asyncio.Future[None]] = field(default_factory=set, init=False)
    _drift_dirty: bool = field(default=False, init=False)
    _drift_refreshing: bool = field(default=False, init=False)

    def side_of(self, event: CloudEvent) -> Side | None:
        names: tuple[tuple[Side, str], ...] = (("primary", self.config.primary), ("candidate", self.config.candidate))
        name = event.extensions.get("inferenceservicename", "")
        for side, isvc in names:
            if name == isvc:
                return side
        if not name:  # KServe's agent: ce-source is the pod name, <isvc>-predictor-<revision/replicaset>-<id>
            for side, isvc in names:
                if event.source.startswith(f"{isvc}-predictor"):
                    return side
        return None

    # -- intake (from the HTTP handler; never awaits) --
    def accept(self, event: CloudEvent, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        side = self.side_of(event)
        kind = {REQUEST_TYPE: "request", RESPONSE_TYPE: "response"}.get(event.type, "other")
        self.metrics.events.labels(model=side or "unknown", type=kind).inc()
        if side is None:
            self.metrics.dropped.labels(reason="unknown_model").inc()
            return
        if kind == "other":
            self.metrics.dropped.labels(reason="unknown_type").inc()
            return
        key = join_key(event)
        entry = self._pending.get(key)
        if entry is None:
            if len(self._pending) >= self.config.max_pending:
                self.metrics.dropped.labels(reason="too_many_pending").inc()
                return
            entry = self._pending[key] = _Entry(created=now)
        half = entry.halves[side]
        at = event_seconds(event.time)
        if kind == "request":
            if half.request is not None:
                self.metrics.dropped.labels(reason="duplicate").inc()
                return
            half.request, half.request_time = event.data, at
        else:
            if half.response is not None:
                self.metrics.dropped.labels(reason="duplicate").inc()
                return
            half.response, half.response_time = event.data, at
            latency = event.extensions.get(LATENCY_EXTENSION)
            if latency:
                with contextlib.suppress(ValueError):
                    half.latency_s = max(0.0, float(latency) / 1000.0)
        if entry.complete():
            del self._pending[key]
            self._finish(entry)
        self.metrics.pending.set(len(self._pending))

    def sweep(self, now: float | None = None) -> None:
        """Expire entries older than the TTL: compare what can be compared, count what is missing."""
        now = time.monotonic() if now is None else now
        while self._pending:
            key, entry = next(iter(self._pending.items()))
            if now - entry.created < self.config.pair_ttl_s:
                break  # insertion order = age order
            del self._pending[key]
            self._finish(entry)
        self.metrics.pending.set(len(self._pending))

    # -- outcome --
    def _finish(self, entry: _Entry) -> None:
        primary, candidate = entry.halves["primary"], entry.halves["candidate"]
        if primary.response is None:
            self.metrics.dropped.labels(reason="primary_incomplete" if primary.request else "primary_missing").inc()
            return
        try:
            ours = read_answer(primary.response)
        except AnswerError as exc:
            log.debug("primary answer unreadable: %s", exc)
            self.metrics.dropped.labels(reason="primary_unreadable").inc()
            return
        if primary.request is not None:
            self._observe_drift(primary.request, primary.response)
        if candidate.response is None:
            self.metrics.candidate_errors.labels(reason="no_response" if candidate.request else "missing").inc()
            return
        try:
            theirs = read_answer(candidate.response)
        except AnswerError as exc:
            log.debug("candidate answer unreadable: %s", exc)
            self.metrics.candidate_errors.labels(reason="unreadable_answer").inc()
            return
        if len(ours) != len(theirs):
            self.metrics.candidate_errors.labels(reason="instance_count").inc()
            return
        self._compare(ours, theirs)
        p_latency, c_latency = primary.latency(), candidate.latency()
        if p_latency is not None:
            self.metrics.latency.labels(model="primary").observe(p_latency)
        if c_latency is not None:
            self.metrics.latency.labels(model="candidate").observe(c_latency)
        if p_latency is not None and c_latency is not None:
            self.metrics.latency_delta.observe(c_latency - p_latency)

    def _compare(self, ours: Sequence[Decision], theirs: Sequence[Decision]) -> None:
        agree = all(a.label == b.label for a, b in zip(ours, theirs, strict=True))
        self.metrics.comparisons.labels(result="agree" if agree else "disagree").inc()
        for a, b in zip(ours, theirs, strict=True):
            if a.label == b.label:
                self.metrics.instances.labels(result="agree").inc()
            else:
                self.metrics.instances.labels(result="disagree").inc()
                self.metrics.flips.labels(primary=a.label, candidate=b.label).inc()
        for side, decisions in (("primary", ours), ("candidate", theirs)):
            count = sum(d.abstained for d in decisions)
            self._abstained[side] += count
            self.metrics.abstentions.labels(model=side).inc(count)
        self._compared_instances += len(ours)
        delta = (self._abstained["candidate"] - self._abstained["primary"]) / self._compared_instances
        self.metrics.abstention_delta.set(delta)

    # -- drift (H4's visionpipe/monitoring/drift.py) --
    def _observe_drift(self, request: bytes, response: bytes) -> None:
        if self.drift is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside the server (tests): run inline
            self._drift_step(request, response)
            self.drift_report()
            return
        job = loop.run_in_executor(self._drift_pool, self._drift_step, request, response)
        self._drift_jobs.add(job)
        job.add_done_callback(self._drift_jobs.discard)

    def _drift_step(self, request: bytes, response: bytes) -> None:
        """One primary pair into the monitor (on the drift thread); the gauges follow at the next scrape."""
        from visionpipe.monitoring.drift import DriftError

        assert self.drift is not None
        try:
            added = self.drift.observe_event(json.loads(request), json.loads(response))
        except (DriftError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
            log.debug("drift: pair unreadable: %s", exc)
            self.metrics.drift_errors.inc()
            return
        except Exception:  # a drift failure must not stop the collector; counted and logged
            log.exception("drift: observing a pair failed")
            self.metrics.drift_errors.inc()
            return
        self._drift_dirty = self._drift_dirty or added > 0

    def drift_report(self) -> None:
        """The drift gauges from the monitor's report, recomputed only after new observations (drift thread)."""
        if self.drift is None or not self._drift_dirty:
            return
        self._drift_dirty = False
        window = 0
        for stat in self.drift.report():
            labels = {"feature": stat.feature, "test": stat.test}
            self.metrics.drift_statistic.labels(**labels).set(stat.value)
            self.metrics.drift_threshold.labels(**labels).set(stat.threshold)
            self.metrics.drift_alarm.labels(**labels).set(1.0 if stat.alarm else 0.0)
            window = max(window, stat.window)
        self.metrics.drift_window.set(window)

    def refresh_drift(self) -> None:
        """At a scrape: queue a report on the drift thread (after the observations queued before it). The scrape
        never waits for it: it shows the gauges of the last report (decoding can take a while)."""
        if self.drift is None or self._drift_refreshing:
            return
        self._drift_refreshing = True

        def report() -> None:
            try:
                self.drift_report()
            except Exception:  # a drift failure must not stop the collector
                log.exception("drift report failed")
            finally:
                self._drift_refreshing = False

        job = asyncio.get_running_loop().run_in_executor(self._drift_pool, report)
        self._drift_jobs.add(job)
        job.add_done_callback(self._drift_jobs.discard)

    async def drain_drift(self) -> None:
        if self._drift_jobs:
            await asyncio.gather(*self._drift_jobs, return_exceptions=True)


def load_drift_monitor(config: CollectorConfig, allow_unsigned: bool = False) -> DriftMonitor | None:
    """The drift monitor for ``--drift-reference`` (a bundle folder or an s3:// bundle URI), or None."""
    if not config.drift_reference:
        return None
    import tempfile

    from visionpipe.monitoring.drift import DriftMonitor, load_reference

    source = config.drift_reference
    if source.startswith("s3://"):
        from visionpipe.serving.storage import download_prefix

        folder = download_prefix(source, Path(tempfile.mkdtemp(prefix="drift-reference-")))
    else:
        folder = Path(source)
    reference = load_reference(folder, allow_unsigned=allow_unsigned)
    return DriftMonitor(reference, window=config.drift_window, false_alarm_rate=config.drift_false_alarm_rate)


# --------------------------------------------------------------------------------------------- HTTP app
def create_app(config: CollectorConfig, drift: DriftMonitor | None = None) -> FastAPI:
    """The collector as an ASGI app: ``POST /`` (CloudEvents), ``GET /metrics``, ``GET /healthz``."""
    collector = Collector(config, drift=drift)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def sweeper() -> None:
            while True:
                await asyncio.sleep(config.sweep_interval_s)
                collector.sweep()

        task = asyncio.create_task(sweeper())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await collector.drain_drift()
            collector._drift_pool.shutdown(wait=False)

    app = FastAPI(title="visionpipe shadow collector", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.collector = collector

    @app.post("/", status_code=202)
    async def receive(request: Request) -> Response:
        declared = request.headers.get("content-length") or "0"
        if declared.isdigit() and int(declared) > config.max_body_bytes:
            collector.metrics.dropped.labels(reason="too_large").inc()
            return Response(status_code=413, content=f"event over {config.max_body_bytes} bytes".encode())
        body = await request.body()
        if len(body) > config.max_body_bytes:
            collector.metrics.dropped.labels(reason="too_large").inc()
            return Response(status_code=413, content=f"event over {config.max_body_bytes} bytes".encode())
        try:
            event = parse_cloudevent(request.headers, body)
        except CloudEventError as exc:
            collector.metrics.dropped.labels(reason="not_a_cloudevent").inc()
            return Response(status_code=400, content=str(exc).encode())
        collector.accept(event)
        return Response(status_code=202)

    @app.get("/metrics")
    async def metrics() -> Response:
        collector.refresh_drift()
        return Response(content=collector.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


# --------------------------------------------------------------------------------------------- entry point
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m visionpipe.monitoring.collector", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 inside a pod)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--primary", default="digits", help="the primary's InferenceService name")
    parser.add_argument("--candidate", default="digits-candidate", help="the candidate's InferenceService name")
    parser.add_argument("--pair-ttl-s", type=float, default=30.0, help="seconds a request waits for its halves")
    parser.add_argument("--max-pending", type=int, default=10_000, help="requests tracked at once")
    parser.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024)
    parser.add_argument("--drift-reference", default=None, help="bundle folder or s3:// URI with drift_reference.json")
    parser.add_argument("--drift-window", type=int, default=256)
    parser.add_argument("--drift-false-alarm-rate", type=float, default=0.01)
    parser.add_argument("--allow-unsigned", action="store_true", help="accept an unsigned drift-reference bundle")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        config = CollectorConfig(
            primary=args.primary,
            candidate=args.candidate,
            pair_ttl_s=args.pair_ttl_s,
            max_pending=args.max_pending,
            max_body_bytes=args.max_body_bytes,
            drift_reference=args.drift_reference,
            drift_window=args.drift_window,
            drift_false_alarm_rate=args.drift_false_alarm_rate,
        )
        drift = load_drift_monitor(config, allow_unsigned=args.allow_unsigned)
    except ValueError as exc:  # CollectorError, DriftError
        raise SystemExit(f"python -m visionpipe.monitoring.collector: {exc}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("shadow collector on %s:%d: primary %s, candidate %s", args.host, args.port, args.primary, args.candidate)
    uvicorn.run(create_app(config, drift), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
