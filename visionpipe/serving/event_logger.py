"""In-process inference logger: KServe's payload-logger CloudEvents, posted from the predictor itself.

Why: KServe's logger is the agent sidecar (kserve cmd/agent/main.go + pkg/logger/handler.go), an HTTP reverse
proxy in front of the model container, so it logs REST traffic only and never gRPC. This logger is called from
`VisionPredictor.__call__`, the one path REST v1, REST v2 and gRPC requests all take (kserve/protocol/dataplane.py
DataPlane.infer -> Model.__call__; kserve/protocol/grpc/servicer.py ModelInfer calls the same DataPlane.infer,
with the gRPC invocation metadata as headers, kserve/utils/utils.py to_headers), and posts the same events the
agent posts, so one collector reads both.

The agent's event format, as read in KServe's sources (kserve/kserve, pkg/logger):

* transport: one HTTP POST per event, CloudEvents 1.0 in binary mode (worker.go: ``cloudevents.WithEncodingBinary``):
  the body is the payload, the attributes are ``ce-*`` headers;
* ``ce-type``: ``org.kubeflow.serving.inference.request`` or ``...inference.response`` (worker.go CEInferenceRequest
  / CEInferenceResponse); a response is logged only for a 200 answer (handler.go ``lrw.statusCode == http.StatusOK``),
  so a refused or failed request leaves a request event without its response;
* ``ce-id``: the incoming ``Ce-Id`` header, else a fresh UUID (handler.go getOrCreateID); request and response share
  it. It is NOT the ``x-request-id``: the agent passes that header on only through ``ce-metadata``, a JSON object
  {canonical header name: [values]} of the headers listed in the logger's ``metadataHeaders`` (handler.go,
  worker.go MetadataAttr; the names are Go's canonical ``X-Request-Id`` form);
* ``ce-source``: the pod name (pkg/webhook/admission/pod/agent_injector.go passes ``--source-uri <pod name>``);
* ``ce-time``: when the request arrived / the response was complete (handler.go requestTime, responseTime);
  ``ce-recordedtime``: when the event was sent (worker.go RecordedTimeAttr);
* extensions ``ce-inferenceservicename``, ``ce-namespace``, ``ce-component`` (predictor, transformer, explainer),
  ``ce-endpoint`` (the pod's ``endpoint`` label: default or canary) (worker.go, agent_injector.go);
* ``content-type``: the request's Content-Type, for both events (handler.go passes ``contentType`` twice).

This logger adds one extension, ``ce-latencyms`` (response events): the server-side time of the call in
milliseconds, from the request's arrival to its answer (CloudEvents extension names are lowercase alphanumeric).

Bodies: REST v1 requests and answers as their JSON; v2 (REST or gRPC) as v2 REST JSON (``{"id", "inputs":
[{"name", "datatype", "shape", "data"}]}`` / ``{"model_name", "id", "outputs": [...]}``), raw tensor contents
turned into JSON data (BYTES elements as base64 text, which the predictor accepts as well), so the content type
is always ``application/json``.

Never in the way of an inference: `EventLogger.log_*` only puts the objects on a bounded queue (a full queue drops
the event and counts it); serialising and posting happen on one background thread, whose failures are counted and
logged, never raised. Metrics (the server's Prometheus registry, its /metrics):
``visionpipe_event_logger_events_total{type, result}`` with result sent / dropped / failed.

Configuration (flags of ``python -m visionpipe.serving.server``, defaulting to these environment variables):
``VISIONPIPE_EVENT_LOGGER_URL`` (unset: off), ``..._MODE`` (all | request | response), ``..._SOURCE`` (default: the
host name, i.e. the pod name), ``..._INFERENCE_SERVICE`` (default: the model name), ``..._NAMESPACE`` (default
``POD_NAMESPACE``), ``..._COMPONENT`` (predictor), ``..._ENDPOINT`` (default), ``..._PROTOCOLS`` (``rest,grpc``;
``grpc`` when the agent logs REST already, see docs/rollout.md), ``..._METADATA_HEADERS`` (``X-Request-Id``),
``..._QUEUE_SIZE`` (1000).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import queue
import socket
import struct
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, cast
from urllib.parse import urlparse

import httpx
import numpy as np
from prometheus_client import REGISTRY, CollectorRegistry, Counter

REQUEST_TYPE = "org.kubeflow.serving.inference.request"  # kserve pkg/logger/worker.go CEInferenceRequest
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"  # CEInferenceResponse
MODES = ("all", "request", "response")  # kserve pkg/apis/serving/v1beta1/inference_service.go LoggerType
PROTOCOLS = ("rest", "grpc")
LATENCY_EXTENSION = "latencyms"
DEFAULT_METADATA_HEADERS = ("X-Request-Id",)
ENV_PREFIX = "VISIONPIPE_EVENT_LOGGER_"

Mode = Literal["all", "request", "response"]
log = logging.getLogger("visionpipe.event_logger")


class EventLoggerError(ValueError):
    """Invalid logger configuration."""


def canonical_header(name: str) -> str:
    """Go's textproto.CanonicalMIMEHeaderKey: ``x-request-id`` -> ``X-Request-Id`` (the agent's metadata keys)."""
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


@dataclass(frozen=True)
class EventLoggerConfig:
    """Where and what to log; see the module docstring for each field's meaning and default."""

    url: str
    mode: Mode = "all"
    source: str = field(default_factory=socket.gethostname)
    inference_service: str = ""
    namespace: str = ""
    component: str = "predictor"
    endpoint: str = "default"
    protocols: tuple[str, ...] = PROTOCOLS
    metadata_headers: tuple[str, ...] = DEFAULT_METADATA_HEADERS
    queue_size: int = 1000
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        parsed = urlparse(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise EventLoggerError(
                f"event logger url={self.url!r} must be an http:// or https:// URL (e.g. http://visionpipe-collector/)"
            )
        if self.mode not in MODES:
            raise EventLoggerError(f"event logger mode={self.mode!r} is not allowed; allowed: {', '.join(MODES)}")
        unknown = [p for p in self.protocols if p not in PROTOCOLS]
        if unknown or not self.protocols:
            raise EventLoggerError(
                f"event logger protocols={','.join(self.protocols)!r} is not allowed; allowed: a comma-separated "
                f"subset of {', '.join(PROTOCOLS)}"
            )
        if not isinstance(self.queue_size, int) or self.queue_size < 1:
            raise EventLoggerError(f"event logger queue_size={self.queue_size!r} must be a positive integer")
        if not self.timeout_s > 0:
            raise EventLoggerError(f"event logger timeout_s={self.timeout_s!r} must be a positive number of seconds")

    @classmethod
    def from_env(cls, model_name: str, environ: Mapping[str, str] | None = None) -> EventLoggerConfig | None:
        """The configuration from ``VISIONPIPE_EVENT_LOGGER_*``; None when no URL is set (logging off)."""
        env = os.environ if environ is None else environ

        def get(name: str, default: str) -> str:
            return env.get(ENV_PREFIX + name, "") or default

        url = get("URL", "")
        if not url:
            return None
        mode = get("MODE", "all")
        try:
            queue_size = int(get("QUEUE_SIZE", "1000"))
        except ValueError:
            raise EventLoggerError(
                f"{ENV_PREFIX}QUEUE_SIZE={get('QUEUE_SIZE', '')!r} must be a positive integer"
            ) from None
        return cls(
            url=url,
            mode=cast(Mode, mode),  # checked in __post_init__
            source=get("SOURCE", socket.gethostname()),
            inference_service=get("INFERENCE_SERVICE", model_name),
            namespace=get("NAMESPACE", env.get("POD_NAMESPACE", "")),
            component=get("COMPONENT", "predictor"),
            endpoint=get("ENDPOINT", "default"),
            protocols=split_list(get("PROTOCOLS", ",".join(PROTOCOLS))),
            metadata_headers=split_list(get("METADATA_HEADERS", ",".join(DEFAULT_METADATA_HEADERS))),
            queue_size=queue_size,
        )


def split_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


# --------------------------------------------------------------------------------------------- serialising
def request_json(body: object) -> object:
    """A request as the predictor received it -> JSON: a v1 dict as is, a KServe InferRequest as v2 REST JSON."""
    if isinstance(body, dict):
        return body
    inputs = getattr(body, "inputs", None)
    if inputs is None:
        raise TypeError(f"cannot log a request of type {type(body).__name__}")
    out: dict[str, object] = {"inputs": [_tensor_json(t) for t in inputs]}
    request_id = getattr(body, "id", None)
    if request_id:
        out = {"id": str(request_id), **out}
    parameters = _plain_parameters(getattr(body, "parameters", None))
    if parameters:
        out["parameters"] = parameters
    requested = getattr(body, "request_outputs", None)
    if requested:
        out["outputs"] = [{"name": str(o.name)} for o in requested]
    return out


def response_json(answer: object) -> object:
    """An answer as the predictor returned it -> JSON: a v1 dict as is, an InferResponse as v2 REST JSON."""
    if isinstance(answer, dict):
        return answer
    outputs = getattr(answer, "outputs", None)
    if outputs is None:
        raise TypeError(f"cannot log an answer of type {type(answer).__name__}")
    out: dict[str, object] = {
        "model_name": str(getattr(answer, "model_name", "")),
        "id": str(getattr(answer, "id", "") or ""),
        "outputs": [_tensor_json(t) for t in outputs],
    }
    parameters = _plain_parameters(getattr(answer, "parameters", None))
    if parameters:
        out["parameters"] = parameters
    return out


def _tensor_json(tensor: object) -> dict[str, object]:
    name, datatype = str(getattr(tensor, "name", "")), str(getattr(tensor, "datatype", ""))
    shape = [int(d) for d in getattr(tensor, "shape", [])]
    raw = getattr(tensor, "_raw_data", None)  # gRPC raw contents / REST binary extension (kserve infer_type.py)
    data: object
    if raw is not None and datatype == "BYTES":
        data = [_text(item) for item in _split_bytes(bytes(raw))]
    elif raw is not None:
        data = np.frombuffer(bytes(raw), dtype=_NUMPY[datatype]).tolist()
    else:
        values = getattr(tensor, "data", None)
        if isinstance(values, np.ndarray):
            values = values.ravel().tolist() if values.dtype != np.object_ else list(values.ravel())
        data = _jsonable(values)
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


_NUMPY: dict[str, type[np.generic]] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


def _split_bytes(raw: bytes) -> list[bytes]:
    """A BYTES tensor's raw contents: 4-byte little-endian lengths, each followed by the element."""
    out, offset = [], 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        out.append(raw[offset : offset + length])
        offset += length
    return out


def _text(item: object) -> object:
    """A BYTES element for JSON: UTF-8 text when it is (e.g. the `result` records), else base64 (images)."""
    if isinstance(item, (bytes, bytearray)):
        try:
            text = bytes(item).decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(bytes(item)).decode("ascii")
        return text if text.isprintable() else base64.b64encode(bytes(item)).decode("ascii")
    return item


def _jsonable(value: object) -> object:
    if isinstance(value, (bytes, bytearray)):
        return _text(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _plain_parameters(parameters: object) -> dict[str, object]:
    if not isinstance(parameters, Mapping):
        return {}  # gRPC parameter maps (protobuf) are not carried into the event
    out: dict[str, object] = {}
    for key, value in parameters.items():
        if isinstance(value, (str, int, float, bool)):
            out[str(key)] = value
    return out


def rfc3339(epoch_s: float) -> str:
    """CloudEvents ``time`` (RFC 3339, UTC, microseconds), as the Go SDK writes it."""
    return datetime.fromtimestamp(epoch_s, UTC).isoformat().replace("+00:00", "Z")


# --------------------------------------------------------------------------------------------- the logger
@dataclass(frozen=True)
class _Event:
    kind: str  # "request" | "response"
    event_id: str
    body: object
    at: float  # epoch seconds: ce-time
    metadata: dict[str, list[str]]
    latency_ms: float | None = None


class EventLogger:
    """Posts request / response CloudEvents for each inference from one background thread."""

    def __init__(self, config: EventLoggerConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self._queue: queue.Queue[_Event | None] = queue.Queue(maxsize=config.queue_size)
        self.events = _counter(registry or REGISTRY)
        self._thread = threading.Thread(target=self._run, name="visionpipe-event-logger", daemon=True)
        self._thread.start()

    # -- called on the request path: never blocks, never raises --
    def wants(self, grpc: bool) -> bool:
        return ("grpc" if grpc else "rest") in self.config.protocols

    def start(self, body: object, headers: Mapping[str, str] | None) -> LoggedCall:
        """Note a request's arrival (and queue its request event, in modes all / request)."""
        now = time.time()
        lowered = {k.lower(): v for k, v in (headers or {}).items()}
        event_id = lowered.get("ce-id") or str(uuid.uuid4())  # kserve pkg/logger/handler.go getOrCreateID
        metadata = {
            canonical_header(name): [str(lowered[name.lower()])]
            for name in self.config.metadata_headers
            if name.lower() in lowered
        }
        call = LoggedCall(self, event_id, metadata, now, time.perf_counter())
        if self.config.mode in ("all", "request"):
            self._put(_Event("request", event_id, body, now, metadata))
        return call

    def _put(self, event: _Event) -> None:
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.events.labels(type=event.kind, result="dropped").inc()

    # -- the background thread --
    def _run(self) -> None:
        with httpx.Client(timeout=self.config.timeout_s) as client:
            while True:
                event = self._queue.get()
                if event is None:
                    return
                try:
                    self._send(client, event)
                except Exception as exc:  # the thread must survive anything one event does
                    self.events.labels(type=event.kind, result="failed").inc()
                    log.warning("event logger: %s event %s not sent: %s", event.kind, event.event_id, exc)
                else:
                    self.events.labels(type=event.kind, result="sent").inc()
                finally:
                    self._queue.task_done()

    def _send(self, client: httpx.Client, event: _Event) -> None:
        body = request_json(event.body) if event.kind == "request" else response_json(event.body)
        headers = self.headers(event)
        answer = client.post(self.config.url, content=json.dumps(body).encode(), headers=headers)
        if answer.status_code >= 300:
            raise RuntimeError(f"the collector answered {answer.status_code}")

    def headers(self, event: _Event) -> dict[str, str]:
        """The binary-mode CloudEvent headers the agent sends (kserve pkg/logger/worker.go sendHttpCloudEvent)."""
        config = self.config
        headers = {
            "ce-specversion": "1.0",
            "ce-id": event.event_id,
            "ce-type": REQUEST_TYPE if event.kind == "request" else RESPONSE_TYPE,
            "ce-source": config.source,
            "ce-time": rfc3339(event.at),
            "ce-recordedtime": rfc3339(time.time()),
            "ce-inferenceservicename": config.inference_service,
            "ce-namespace": config.namespace,
            "ce-component": config.component,
            "ce-endpoint": config.endpoint,
            "ce-metadata": json.dumps(event.metadata, separators=(",", ":")),
            "content-type": "application/json",
        }
        if event.latency_ms is not None:
            headers["ce-" + LATENCY_EXTENSION] = f"{event.latency_ms:.3f}"
        return headers

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued event was handled (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    def close(self) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)


@dataclass
class LoggedCall:
    """One inference being logged: `done(answer)` queues its response event (modes all / response)."""

    logger: EventLogger
    event_id: str
    metadata: dict[str, list[str]]
    arrived: float
    started: float

    def done(self, answer: object) -> None:
        if self.logger.config.mode not in ("all", "response"):
            return
        latency_ms = (time.perf_counter() - self.started) * 1000.0
        event = _Event("response", self.event_id, answer, time.time(), self.metadata, latency_ms)
        self.logger._put(event)


_COUNTERS: dict[int, Counter] = {}


def _counter(registry: CollectorRegistry) -> Counter:
    """One counter per registry (several loggers in one process share it)."""
    key = id(registry)
    if key not in _COUNTERS:
        _COUNTERS[key] = Counter(
            "visionpipe_event_logger_events",
            "Inference CloudEvents by type (request/response) and result (sent, dropped: queue full, failed)",
            ["type", "result"],
            registry=registry,
        )
    return _COUNTERS[key]


def from_flags(
    model_name: str,
    url: str | None,
    mode: str | None,
    source: str | None,
    inference_service: str | None,
    protocols: str | None,
    environ: Mapping[str, str] | None = None,
) -> EventLoggerConfig | None:
    """Flags over ``VISIONPIPE_EVENT_LOGGER_*``: a flag given wins, else its variable, else the default."""
    env = dict(os.environ if environ is None else environ)
    for name, value in (
        ("URL", url),
        ("MODE", mode),
        ("SOURCE", source),
        ("INFERENCE_SERVICE", inference_service),
        ("PROTOCOLS", protocols),
    ):
        if value:
            env[ENV_PREFIX + name] = value
    return EventLoggerConfig.from_env(model_name, env)
