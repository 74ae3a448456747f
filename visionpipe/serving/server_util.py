"""Run KServe's ModelServer on a chosen interface (the process helpers for tests are in visionpipe/harness.py).

KServe 0.21's `ModelServer` hard-codes ``host="0.0.0.0"`` for REST and ``[::]`` for gRPC. `run_model_server`
serves the same FastAPI app (the v1/v2 protocol endpoints, /metrics, health) but binds the host you give:
``127.0.0.1`` (the default) for local use and tests, ``0.0.0.0`` inside a container.

Use in a ``python -m`` entry point::

    from visionpipe.serving.server_util import run_model_server
    model = MyPredictor(name=args.model_name, ...)   # a kserve.Model; load() it first so model.ready is True
    run_model_server([model], host=args.host, http_port=args.http_port, grpc_port=None)   # blocks

Open Inference Protocol conformance on top of KServe 0.21 (both installed by `run_model_server`):

* every REST error body is ``{"error": "<code>: <message>"}``: FastAPI's request-validation errors (422
  ``{"detail": ...}`` by default: malformed JSON, a body that is not an inference request) become 400, and
  Starlette's HTTP errors (unknown route 404, wrong method 405) keep their status with an ``error`` body;
* REST v2 bodies that are not ``Content-Type: application/json`` (the binary tensor extension:
  ``Inference-Header-Content-Length`` + binary tensor data after the JSON) are parsed by
  `decode_rest_v2_body`, which keeps BYTES tensors as raw bytes (KServe decodes them as UTF-8 text, a 500
  for a PNG) and answers a short body, a bad header length or a lying ``binary_data_size`` with a named 400.

Bounded work and quiet logs (also installed by `run_model_server`):

* the request body is capped on both transports at `max_body_bytes` (default 8 MiB, KServe's own
  MAX_GRPC_MESSAGE_LENGTH in kserve/constants/constants.py): REST by `BodyLimitMiddleware` (a declared
  ``Content-Length`` over the cap is refused before any byte is read; a chunked body is counted as it
  streams) with 413 ``{"error": "body_too_large: ..."}`` and ``Connection: close``; gRPC by
  ``grpc.max_receive_message_length``, which grpc itself answers with RESOURCE_EXHAUSTED;
* a request the worker pool cannot admit (visionpipe/serving/runtime.py `Overloaded`) is 503 ``overloaded`` with
  ``Retry-After: 1`` over REST and UNAVAILABLE over gRPC;
* a 4xx is logged as one line (status, code, model, request id); KServe's handlers (kserve/errors.py, and
  ExceptionToStatusInterceptor in kserve/protocol/grpc/interceptors.py) log every InvalidInput with a full
  traceback. Tracebacks stay for 5xx (KServe's own handlers).

This module imports kserve lazily.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import json
import logging
import re
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, cast

from visionpipe.serving.limits import DEFAULT_MAX_BODY_BYTES

if TYPE_CHECKING:
    import kserve
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.infer_type import InferRequest
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOOPBACK = "127.0.0.1"
READY_PATH = "/v2/health/ready"
INFERENCE_HEADER = "inference-header-content-length"  # kserve.constants.INFERENCE_CONTENT_LENGTH_HEADER
GRPC_MAX_SEND_BYTES = 8 * 1024 * 1024
log = logging.getLogger("kserve")  # KServe's logger (kserve/logging.py), configured by its ModelServer


class ServerStartError(RuntimeError):
    """A server process exited or did not become ready in time; the message carries its log tail."""


# ----------------------------------------------------------------------------------------- serving in-process
def run_model_server(
    models: Sequence[kserve.Model],
    *,
    host: str = LOOPBACK,
    http_port: int = 8080,
    grpc_port: int | None = None,
    grace_period_s: int = 10,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    latency_log: bool = False,
) -> None:
    """Serve `models` with KServe's REST app on ``host:http_port`` (and gRPC on ``host:grpc_port`` if given).

    Request bodies over `max_body_bytes` are refused on both (REST 413 ``body_too_large``, gRPC
    RESOURCE_EXHAUSTED). Blocks until SIGTERM/SIGINT. At least one model must be ready (KServe raises
    NoModelReady otherwise).

    `latency_log`: KServe's per-request ``kserve.trace`` line (preprocess / predict / postprocess ms; KServe's
    ``--enable_latency_logging``, on by default there). Off by default here: the same figures are KServe's
    Prometheus histograms on /metrics (``request_preprocess_seconds``, ...), and formatting and writing a line
    per request costs the event loop.
    """
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes={max_body_bytes} must be >= 1")
    server = _host_bound_model_server(
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        grace_period_s=grace_period_s,
        max_body_bytes=max_body_bytes,
        latency_log=latency_log,
    )
    server.start(list(models))


def _host_bound_model_server(
    *, host: str, http_port: int, grpc_port: int | None, grace_period_s: int, max_body_bytes: int, latency_log: bool
) -> kserve.ModelServer:
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from kserve import ModelServer
    from kserve.errors import InvalidInput, ModelNotFound
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.grpc.server import GRPCServer
    from kserve.protocol.rest.server import RESTServer
    from starlette.exceptions import HTTPException
    from timing_asgi import TimingMiddleware  # type: ignore[import-untyped]  # timing_asgi ships no types

    from visionpipe.serving.runtime import Overloaded

    class OIPDataPlane(DataPlane):  # type: ignore[misc]
        """DataPlane whose REST v2 decoding of non-JSON bodies is `decode_rest_v2_body`.

        KServe's v2 infer route (kserve/protocol/rest/v2_endpoints.py) hands a body that is not
        ``application/json`` to DataPlane.decode -> decode_inference_request (kserve/protocol/dataplane.py)
        as bytes; JSON bodies arrive validated as InferenceRequest and keep KServe's path.
        """

        def decode_inference_request(self, body: object, headers: dict[str, str], model_name: str) -> InferRequest:
            if isinstance(body, bytes):
                return decode_rest_v2_body(body, headers.get(INFERENCE_HEADER), model_name)
            return super().decode_inference_request(body, headers, model_name)

    class OIPRESTServer(RESTServer):  # type: ignore[misc]
        """RESTServer that adds `{"error": ...}` handlers after KServe's own (kserve/protocol/rest/server.py,
        `_add_exception_handlers`, which maps kserve.errors exceptions to status codes; a later
        add_exception_handler for the same class replaces KServe's), and the body cap."""

        def _add_exception_handlers(self, app: FastAPI) -> None:
            super()._add_exception_handlers(app)
            app.add_exception_handler(RequestValidationError, request_validation_handler)
            app.add_exception_handler(HTTPException, http_exception_handler)
            app.add_exception_handler(InvalidInput, invalid_input_handler)
            app.add_exception_handler(ModelNotFound, model_not_found_handler)
            app.add_exception_handler(Overloaded, overloaded_handler)

        def _add_middlewares(self, app: FastAPI) -> None:
            super()._add_middlewares(app)
            # KServe's TimingMiddleware (kserve/protocol/rest/server.py `_add_middlewares`, timing_asgi) scans every
            # route again to name each request and logs two `kserve.trace` lines per request (wall and CPU time):
            # about 0.5 ms of the event loop per request for figures nothing reads. Latency stays observable in
            # KServe's own request histograms (`request_predict_seconds`, ... on /metrics) and the event logger.
            app.user_middleware = [m for m in app.user_middleware if m.cls is not TimingMiddleware]
            app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)  # outermost of the app's own

        def _register_endpoints(self, app: FastAPI) -> None:
            super()._register_endpoints(app)
            # Our v2 infer route first: the router takes the first full match, so KServe's own route for the same
            # path (kserve/protocol/rest/v2_endpoints.py) is never reached; every other route is KServe's.
            app.router.routes.insert(0, v2_infer_route(self.dataplane))

    class HostBoundModelServer(ModelServer):  # type: ignore[misc]
        """ModelServer whose REST (and gRPC) listeners bind `host` instead of all interfaces."""

        def start(self, models: list[kserve.Model]) -> None:
            self._register_and_check_atleast_one_model_is_ready(models)
            # ModelServer.__init__ builds a plain DataPlane over the same registry; REST and gRPC share ours.
            self.dataplane = OIPDataPlane(model_registry=self.registered_models)
            self._rest_server = OIPRESTServer(
                "kserve.model_server:app",
                self.dataplane,
                self.model_repository_extension,
                self.http_port,
                access_log_format=self.access_log_format,
                workers=1,
                grace_period=self.grace_period,
                event_loop=self.event_loop,
                timeout_keep_alive=self.timeout_keep_alive,
            )
            # uvicorn.Server keeps a reference to this Config object, so the host is read at serve() time.
            self._rest_server.config.host = host
            # The app is loaded from its import string at serve() time (uvicorn Config.load); KServe's module-level
            # FastAPI object is the one create_application fills in. v2 infer POSTs skip its middleware stack.
            import kserve.model_server

            fast = FastV2Infer(kserve.model_server.app, v2_infer_route(self.dataplane).endpoint, max_body_bytes)
            self._rest_server.config.app = fast
            self.servers.append(self._rest_server.start())
            if grpc_port is not None:
                self._grpc_server = GRPCServer(
                    grpc_port,
                    self.dataplane,
                    self.model_repository_extension,
                    kwargs={},
                    grace_period=self.grace_period,
                )
                self.servers.append(_grpc_on_host(self._grpc_server, host, grpc_port, self.max_threads, max_body_bytes))
            self.register_signal_handler()
            # Everything loaded so far (torch, kserve, fastapi, the models: ~300k objects) lives as long as the
            # process; a full garbage collection over it holds the GIL for 80-230 ms, a stall of the event loop
            # (health checks included) at some random request. Frozen objects are never scanned again.
            gc.collect()
            gc.freeze()

            async def serve() -> None:
                # KServe calls setup_event_loop (exception handler, default executor) before asyncio.run, i.e. on
                # a loop that is never used (kserve/model_server.py `start`); here it is the serving loop.
                self.setup_event_loop()
                await self._serve()

            run_event_loop(serve(), self.event_loop)

    return HostBoundModelServer(
        http_port=http_port,
        grpc_port=grpc_port or 0,
        workers=1,
        enable_grpc=grpc_port is not None,
        grace_period=grace_period_s,
        enable_latency_logging=latency_log,  # ModelServer hands it to each model (`model.enable_latency_logging`)
    )


def run_event_loop(main: Coroutine[object, object, None], event_loop: str = "auto") -> None:
    """Run `main` to completion on uvloop when it is installed (``event_loop`` "auto" or "uvloop"), else asyncio.

    KServe's ``--event_loop`` means "auto (default; use uvloop if available)" (kserve/model_server.py), and
    uvicorn's auto loop picks uvloop the same way (uvicorn/loops/auto.py), but both apply only when uvicorn runs
    its own loop; KServe's single-process ModelServer.start serves through `asyncio.run`, i.e. the pure-Python
    loop. uvloop (a dependency of uvicorn[standard], which kserve requires) costs the event loop less per
    request and per thread hand-off. ``"asyncio"`` keeps asyncio's own loop."""
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvicorn[standard] brings it on Linux
            pass
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def v2_infer_route(dataplane: DataPlane) -> Route:
    """``POST /v2/models/{model_name}/infer``: KServe's v2 infer endpoint (kserve/protocol/rest/v2_endpoints.py
    `V2Endpoints.infer`) as a plain Starlette route, with the same steps and the same error answers.

    KServe declares its body as ``Union[InferenceRequest, bytes]``, validates its answer dict as
    `InferenceResponse` and lets FastAPI walk that model once more (`jsonable_encoder`) before `json.dumps`; here
    the request is checked by the same pydantic model (kserve/protocol/rest/v2_datamodels.py), an all-JSON answer
    is written in one pass (`rest_v2_json`), any other answer goes through KServe's `DataPlane.encode`, and the
    route is matched first. As FastAPI did (fastapi/routing.py `get_request_handler`, strict content type,
    FastAPI's default): a body is JSON only with ``Content-Type: application/json`` (or ``application/*+json``);
    any other body, the binary tensor extension included, goes to `decode_rest_v2_body` through
    `DataPlane.decode`. A body that is not JSON, or not an inference request, is a 400 with the message
    `validation_error_message` gave before (``bad_json`` / ``bad_request``)."""
    from kserve.constants.constants import PredictorProtocol
    from kserve.errors import InvalidInput, ModelNotReady
    from kserve.protocol.rest.v2_datamodels import InferenceRequest, InferenceResponse
    from pydantic import ValidationError
    from starlette.responses import Response as StarletteResponse
    from starlette.routing import Route as StarletteRoute

    protocol = PredictorProtocol.REST_V2.value

    def parse(body: bytes, headers: Mapping[str, str]) -> InferenceRequest | bytes:
        binary = INFERENCE_HEADER in headers
        if not body:  # FastAPI: a required body that is missing
            raise InvalidInput(validation_error_message([{"loc": ("body",), "msg": "Field required"}], binary))
        if not _is_json(headers.get("content-type")):
            return body
        try:
            payload = json.loads(body)
        except json.JSONDecodeError as exc:
            error = {"type": "json_invalid", "loc": ("body", exc.pos), "ctx": {"error": exc.msg}}
            raise InvalidInput(validation_error_message([error], binary)) from None
        except ValueError:  # not UTF-8: FastAPI's 400 "There was an error parsing the body"
            message = "bad_json: the request body could not be parsed as JSON (There was an error parsing the body)"
            raise InvalidInput(message + (BINARY_AS_JSON_HINT if binary else "")) from None
        try:
            return InferenceRequest.model_validate(payload)
        except ValidationError as exc:
            raise InvalidInput(validation_error_message(exc.errors(), binary)) from None

    async def infer(request: Request) -> Response:
        """V2Endpoints.infer's steps; an all-JSON answer written straight from the InferResponse."""
        model_name = str(request.path_params["model_name"])
        if not await dataplane.model_ready(model_name, True):
            raise ModelNotReady(model_name)
        headers = dict(request.headers)
        body = parse(await request.body(), headers)
        infer_request, _ = dataplane.decode(body, headers, protocol_version=protocol, model_name=model_name)
        response, response_headers = await dataplane.infer(
            model_name=model_name, request=infer_request, headers=headers
        )
        answer = rest_v2_json(response) if not _cloudevent(headers) else None
        if answer is None:  # binary outputs, a CloudEvent, anything unusual: KServe's own encoding
            return await encode(model_name, response, response_headers, headers)
        response_headers.pop("content-length", None)
        response_headers.pop("content-type", None)
        return StarletteResponse(answer, media_type="application/json", headers=response_headers)

    async def encode(
        model_name: str, response: object, response_headers: dict[str, str], headers: dict[str, str]
    ) -> Response:
        encoded, encode_headers = dataplane.encode(
            model_name=model_name, response=response, headers=headers, req_attributes={}
        )
        response_headers.update(encode_headers)
        response_headers.pop("content-length", None)
        response_headers.pop("content-type", None)
        if isinstance(encoded, bytes):  # binary tensor data (InferResponse.to_rest), as KServe sends it
            return StarletteResponse(encoded, headers=response_headers)
        answer = InferenceResponse.model_validate(encoded).model_dump_json().encode()
        return StarletteResponse(answer, media_type="application/json", headers=response_headers)

    return StarletteRoute("/v2/models/{model_name}/infer", infer, methods=["POST"])


_INFER_PATH = re.compile(r"/v2/models/([^/]+)/infer")


class FastV2Infer:
    """ASGI app in front of KServe's FastAPI app: ``POST /v2/models/<model>/infer`` goes straight to the
    `v2_infer_route` endpoint, under the same `BodyLimitMiddleware`, with the app's own exception handlers
    (looked up along the exception's classes, as Starlette's ExceptionMiddleware does: our named 400s, 404,
    503 ``overloaded``, KServe's generic 500); every other request, and the lifespan, is the app's.

    What it skips for the one hot route: FastAPI's and Starlette's middleware layers (ServerErrorMiddleware,
    exception telemetry, FastAPI's own body limit, ExceptionMiddleware, the AsyncExitStack for uploaded files)
    and the router's scan: about 1 ms of the event loop per request on the 2-core machine, measured by thread
    CPU time around uvicorn's `run_asgi` and the endpoint (the difference, at concurrency 1)."""

    def __init__(self, app: ASGIApp, endpoint: Callable[[Request], Awaitable[Response]], max_body_bytes: int) -> None:
        self.app = app
        self.endpoint = endpoint
        self.limited = BodyLimitMiddleware(self._infer, max_body_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST" and not scope.get("root_path"):
            match = _INFER_PATH.fullmatch(str(scope.get("path", "")))
            if match is not None:
                scope["path_params"] = {"model_name": match.group(1)}
                await self.limited(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _infer(self, scope: Scope, receive: Receive, send: Send) -> None:
        from starlette.requests import Request as StarletteRequest

        request = StarletteRequest(scope, receive)
        try:
            response = await self.endpoint(request)
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise
            answer = handler(request, exc)
            response = cast("Response", await answer if inspect.isawaitable(answer) else answer)
        await response(scope, receive, send)

    def _handler(self, exc: Exception) -> Callable[[Request, Exception], object] | None:
        handlers = getattr(self.app, "exception_handlers", {})
        for cls in type(exc).__mro__:
            if cls in handlers:
                handler: Callable[[Request, Exception], object] = handlers[cls]
                return handler
        return None


def rest_v2_json(response: object) -> bytes | None:
    """An InferResponse whose every answered output is JSON data from a numeric / bool / BYTES numpy array -> the
    REST v2 JSON body, else None (binary data, raw contents, FP16, other payloads: KServe's `to_rest` then).

    The same document KServe sends: `InferResponse.to_rest` (kserve/protocol/infer_type.py: the requested outputs
    in their order, data as `set_data_from_numpy(binary_data=False)` writes it, i.e. the flattened values, BYTES
    as UTF-8 text), validated as `InferenceResponse` (kserve/protocol/rest/v2_datamodels.py), whose optional
    fields are written as null. Built with `tolist` and orjson (a kserve dependency) in one pass, without the
    per-element `.item()` loop and the pydantic round trip."""
    import numpy as np
    import orjson
    from kserve.protocol.infer_type import InferResponse, to_http_parameters

    if not isinstance(response, InferResponse) or response.from_grpc:
        return None
    requested = response._requested_outputs
    if requested:
        if any(o.binary_data for o in requested):
            return None
        by_name = {o.name: o for o in response.outputs}
        chosen = [by_name.get(o.name) for o in requested]
    else:
        if response._use_binary_outputs:
            return None
        chosen = list(response.outputs)
    outputs = []
    for output in chosen:
        data = None if output is None else output.data
        if (
            output is None
            or not isinstance(data, np.ndarray)
            or output._raw_data is not None
            or output.datatype == "FP16"
            or list(data.shape) != list(output.shape)
        ):
            return None
        if data.dtype == np.object_:
            if not all(isinstance(v, bytes) for v in data.flat):
                return None
            try:
                values: list[object] = [v.decode("utf-8") for v in data.flat]
            except UnicodeDecodeError:
                return None
        elif data.dtype.kind in "biuf":
            values = data.reshape(-1).tolist()
        else:
            return None
        parameters = dict(output.parameters or {})
        parameters.pop("binary_data_size", None)
        outputs.append(
            {
                "name": output.name,
                "shape": list(output.shape),
                "datatype": output.datatype,
                "parameters": to_http_parameters(parameters) if parameters else None,
                "data": values,
            }
        )
    document = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "id": response.id,
        "parameters": to_http_parameters(response.parameters) if response.parameters else None,
        "outputs": outputs,
    }
    try:
        return bytes(orjson.dumps(document))
    except TypeError:  # a value orjson does not write (a parameter of another type)
        return None


def _cloudevent(headers: Mapping[str, str]) -> bool:
    """A CloudEvent request, which KServe answers with a CloudEvent (kserve/protocol/dataplane.py `encode`)."""
    from cloudevents.sdk.converters.util import has_binary_headers

    return bool(has_binary_headers(headers)) or headers.get("content-type", "") == "application/cloudevents+json"


def _is_json(content_type: str | None) -> bool:
    """FastAPI's rule: ``application/json`` or ``application/<anything>+json``, parameters ignored."""
    if not content_type:
        return False
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


async def _grpc_on_host(grpc_server: object, host: str, port: int, max_threads: int, max_body_bytes: int) -> None:
    """KServe's GRPCServer.start (kserve/protocol/grpc/server.py) with the listen address bound to `host`
    instead of ``[::]``, the same body cap as REST (``grpc.max_receive_message_length``; grpc refuses a
    larger message with RESOURCE_EXHAUSTED before any handler runs) and `OIPExceptionToStatusInterceptor`."""
    import importlib
    from concurrent import futures

    aio = importlib.import_module("grpc.aio")  # no type stubs for grpc in the project's dependencies
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
    from kserve.protocol.grpc.interceptors import LoggingInterceptor
    from kserve.protocol.grpc.servicer import InferenceServicer

    servicer = InferenceServicer(
        grpc_server._data_plane,  # type: ignore[attr-defined]
        grpc_server._model_repository_extension,  # type: ignore[attr-defined]
    )
    server = aio.server(
        futures.ThreadPoolExecutor(max_workers=max_threads),
        interceptors=(LoggingInterceptor(), _oip_grpc_interceptor()),
        options=[
            ("grpc.max_receive_message_length", max_body_bytes),
            ("grpc.max_send_message_length", max(GRPC_MAX_SEND_BYTES, max_body_bytes)),
        ],
    )
    grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"{host}:{port}")
    grpc_server._server = server  # type: ignore[attr-defined]  # so ModelServer.stop() stops it
    await server.start()
    await server.wait_for_termination()


def _oip_grpc_interceptor() -> object:
    """KServe's ExceptionToStatusInterceptor (kserve/protocol/grpc/interceptors.py), except that a refused
    request (InvalidInput, ModelNotFound) is logged as one line instead of with a traceback, and
    `Overloaded` is UNAVAILABLE; everything else (tracebacks for internal errors) is KServe's."""
    import importlib

    from kserve.errors import InvalidInput, ModelNotFound
    from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor

    from visionpipe.serving.runtime import Overloaded

    status_code = importlib.import_module("grpc").StatusCode

    class OIPExceptionToStatusInterceptor(ExceptionToStatusInterceptor):  # type: ignore[misc]
        async def handle_exception(
            self, ex: Exception, request_or_iterator: object, context: object, method_name: str
        ) -> None:
            refusals = ((InvalidInput, "INVALID_ARGUMENT"), (ModelNotFound, "NOT_FOUND"), (Overloaded, "UNAVAILABLE"))
            for kind, status in refusals:
                if isinstance(ex, kind):
                    model = getattr(request_or_iterator, "model_name", "") or getattr(request_or_iterator, "name", "")
                    request_id = getattr(ex, "request_id", None) or getattr(request_or_iterator, "id", None)
                    log_refusal(f"grpc {status}", str(ex), str(getattr(ex, "model", "") or model), request_id)
                    await context.abort(getattr(status_code, status), str(ex))  # type: ignore[attr-defined]
                    return
            await super().handle_exception(ex, request_or_iterator, context, method_name)

    return OIPExceptionToStatusInterceptor()


# ------------------------------------------------------------------------------------ limits, refusals, logs
def log_refusal(status: str, message: str, model: str | None, request_id: str | None) -> None:
    """One log line for a refused request: status, code (the message up to its first colon), model, id."""
    text = " ".join(message.split())  # one line whatever the message holds
    code = text.split(":", 1)[0] if ":" in text else text
    log.warning(
        "refused %s %s model=%s request_id=%s: %s",
        status,
        code[:60],
        model or "-",
        request_id or "-",
        text[:300],
    )


def _request_model(request: Request, exc: Exception) -> str:
    model = getattr(exc, "model", None) or request.path_params.get("model_name")
    return str(model or "-")


def _request_id(request: Request, exc: Exception) -> str | None:
    request_id = getattr(exc, "request_id", None) or request.headers.get("x-request-id")
    return None if request_id is None else str(request_id)


async def invalid_input_handler(request: Request, exc: Exception) -> Response:
    """kserve.errors.InvalidInput -> 400 ``{"error": ...}`` (as KServe's own handler), logged as one line."""
    from starlette.responses import JSONResponse

    log_refusal("400", str(exc), _request_model(request, exc), _request_id(request, exc))
    return JSONResponse({"error": str(exc)}, status_code=400)


async def model_not_found_handler(request: Request, exc: Exception) -> Response:
    """kserve.errors.ModelNotFound -> 404 ``{"error": ...}``, logged as one line."""
    from starlette.responses import JSONResponse

    log_refusal("404", str(exc), _request_model(request, exc), _request_id(request, exc))
    return JSONResponse({"error": str(exc)}, status_code=404)


async def overloaded_handler(request: Request, exc: Exception) -> Response:
    """visionpipe.serving.runtime.Overloaded -> 503 ``{"error": "overloaded: ..."}`` with ``Retry-After: 1``."""
    from starlette.responses import JSONResponse

    log_refusal("503", str(exc), _request_model(request, exc), _request_id(request, exc))
    return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "1"})


class BodyLimitMiddleware:
    """ASGI middleware: refuse a request body over `max_bytes` with 413 ``body_too_large``, before reading it.

    A declared ``Content-Length`` over the cap is refused at once (the server delivers no more than the
    declared length, so a body within it passes straight through); a body without one (chunked) is read up
    to the cap, then replayed to the app. The refusal closes the connection (``Connection: close``): the
    rest of the body is never read. 413, not 400, because HTTP defines it for exactly this (RFC 9110
    15.5.14), with the server free to close the connection, and proxies and clients know it."""

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope.get("headers", []) if k.lower() == b"content-length"), None)
        if declared is not None:
            length = int(declared) if declared.strip().isdigit() else None
            if length is not None and length > self.max_bytes:
                await self._refuse(scope, send, f"the body declares {length} bytes")
                return
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        total = 0
        more = True
        while more:  # one message per pass; ends at the last one, or as soon as the cap is passed
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body = bytes(message.get("body", b""))
            total += len(body)
            if total > self.max_bytes:
                await self._refuse(scope, send, f"the body holds more than {self.max_bytes} bytes")
                return
            chunks.append(body)
            more = bool(message.get("more_body", False))
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send, what: str) -> None:
        message = f"body_too_large: {what}; the limit is {self.max_bytes} bytes"
        model = re.search(r"/models/([^/:]+)", str(scope.get("path", "")))
        request_id = next((v for k, v in scope.get("headers", []) if k.lower() == b"x-request-id"), None)
        log_refusal(
            "413", message, model.group(1) if model else None, request_id.decode("latin-1") if request_id else None
        )
        body = json.dumps({"error": message}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


# ------------------------------------------------------------------------------------ OIP: REST bodies, errors
def decode_rest_v2_body(body: bytes, header: str | None, model_name: str) -> InferRequest:
    """A REST v2 inference body that is not ``application/json`` -> KServe's InferRequest, or a named 400.

    The binary tensor extension (https://kserve.github.io/website/docs/concepts/architecture/data-plane/
    v2-protocol/binary-tensor-data-extension, after Triton's extension_binary_data): the first
    ``Inference-Header-Content-Length`` bytes are the JSON inference request; each input with
    ``parameters.binary_data_size`` takes that many of the following bytes, in input order, and they must
    add up to the rest of the body. Without the header the whole body is JSON. Binary data is kept as raw
    bytes on the input (``_raw_data``, as KServe's own InferRequest.from_bytes and from_grpc do), so BYTES
    elements stay binary (the predictor splits their 4-byte length prefixes).
    """
    from kserve.errors import InvalidInput
    from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput

    if header is None:
        json_length = len(body)
    else:
        try:
            json_length = int(header.strip())
        except ValueError:
            raise InvalidInput(
                f"bad_binary: Inference-Header-Content-Length {header[:40]!r} is not an integer"
            ) from None
        if not 0 < json_length <= len(body):
            raise InvalidInput(
                f"bad_binary: Inference-Header-Content-Length is {json_length} but the body holds {len(body)} bytes"
            )
    try:
        payload = json.loads(body[:json_length])
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        where = "the body" if header is None else f"the JSON header (the first {json_length} bytes)"
        trailing = isinstance(exc, UnicodeDecodeError) or getattr(exc, "msg", "") == "Extra data"
        hint = (
            "; binary tensor data needs the Inference-Header-Content-Length header"
            if header is None and trailing
            else ""
        )
        raise InvalidInput(f"bad_json: {where} is not valid JSON: {exc}{hint}") from None
    if not isinstance(payload, dict):
        raise InvalidInput("bad_request: an inference request is a JSON object")
    inputs = payload.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidInput('bad_request: "inputs" must be a list of tensors')
    offset = json_length
    infer_inputs = []
    for i, item in enumerate(inputs):
        name, datatype, shape, parameters = _tensor_header(item, f"inputs[{i}]")
        size = parameters.get("binary_data_size") if parameters else None
        if isinstance(item, dict) and "data" in item:
            if size is not None:
                raise InvalidInput(f'bad_request: input {name!r} has both "data" and parameters.binary_data_size')
            infer_inputs.append(InferInput(name, shape, datatype, data=item["data"], parameters=parameters))
            continue
        if size is None:
            raise InvalidInput(f'bad_request: input {name!r} has neither "data" nor parameters.binary_data_size')
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInput(f"bad_binary: input {name!r} has binary_data_size {size!r}; expected a byte count")
        if size > len(body) - offset:
            missing = (
                " (no Inference-Header-Content-Length header: the whole body was read as JSON)"
                if header is None
                else ""
            )
            raise InvalidInput(
                f"bad_binary: input {name!r} declares binary_data_size {size} but only {len(body) - offset} bytes "
                f"of binary data remain{missing}"
            )
        tensor = InferInput(name, shape, datatype, parameters=parameters)
        tensor._raw_data = body[offset : offset + size]
        offset += size
        infer_inputs.append(tensor)
    if offset != len(body):
        raise InvalidInput(
            f"bad_binary: {len(body) - offset} bytes follow the JSON header beyond the inputs' binary_data_size"
        )
    outputs = payload.get("outputs")
    if outputs is not None and not isinstance(outputs, list):
        raise InvalidInput('bad_request: "outputs" must be a list of {"name": ...} objects')
    requested = []
    for i, item in enumerate(outputs or []):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput(f'bad_request: outputs[{i}] must be an object with a string "name"')
        requested.append(RequestedOutput(name=item["name"], parameters=_parameters(item, f"outputs[{i}]")))
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput('bad_request: "id" must be a string')
    return InferRequest(
        model_name=model_name,
        infer_inputs=infer_inputs,
        request_id=request_id,
        parameters=_parameters(payload, "the request"),
        request_outputs=requested or None,
    )


def _tensor_header(item: object, where: str) -> tuple[str, str, list[int], dict[str, object] | None]:
    from kserve.errors import InvalidInput

    if not isinstance(item, dict):
        raise InvalidInput(f"bad_request: {where} must be a tensor object")
    name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str):
        raise InvalidInput(f'bad_request: {where} needs a string "name" and "datatype"')
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidInput(f'bad_request: {where} ({name!r}) needs "shape": a list of integers')
    return name, datatype, shape, _parameters(item, where)


def _parameters(item: dict[str, object], where: str) -> dict[str, object] | None:
    from kserve.errors import InvalidInput

    parameters = item.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise InvalidInput(f'bad_request: "parameters" of {where} must be an object')
    return parameters


BINARY_AS_JSON_HINT = (
    "; a body with binary tensor data (Inference-Header-Content-Length) must not be sent as "
    "Content-Type: application/json (send application/octet-stream)"
)


def validation_error_message(errors: Sequence[Mapping[str, object]], binary_header: bool = False) -> str:
    """FastAPI's request-validation errors -> one ``bad_json: ...`` / ``bad_request: ...`` message."""
    broken = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if broken is not None:
        ctx = broken.get("ctx")
        detail = f" ({ctx['error']})" if isinstance(ctx, dict) and "error" in ctx else ""
        return f"bad_json: the request body is not valid JSON{detail}" + (BINARY_AS_JSON_HINT if binary_header else "")
    parts = []
    for error in errors:
        loc = error.get("loc")
        path = [str(p) for p in loc if p != "body"] if isinstance(loc, list | tuple) else []
        if path[:1] == ["bytes"]:  # the Union[InferenceRequest, bytes] body's other branch: not informative
            continue
        if path[:1] == ["InferenceRequest"]:
            path = path[1:]
        parts.append(f"{'.'.join(path) or 'body'}: {error.get('msg', 'invalid')}")
    shown = "; ".join(parts[:5]) + (f" (+{len(parts) - 5} more)" if len(parts) > 5 else "")
    return f"bad_request: the body is not a valid inference request: {shown or 'invalid body'}"


async def request_validation_handler(request: Request, exc: Exception) -> Response:
    """FastAPI's RequestValidationError (default: 422 ``{"detail": [...]}``) -> 400 ``{"error": ...}``.

    400, not 422: the Open Inference Protocol answers a request it cannot use with a 4xx and
    ``{"error": <message>}``; KServe answers its own InvalidInput (a bad request) with 400, and so do all our
    named input errors, so a client sees one status for "your request is wrong".
    """
    from fastapi.exceptions import RequestValidationError
    from starlette.responses import JSONResponse

    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    message = validation_error_message(errors, INFERENCE_HEADER in request.headers)
    return JSONResponse({"error": message}, status_code=400)


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    """Starlette's HTTP errors (unknown route 404, wrong method 405, ...) with an ``{"error": ...}`` body.

    FastAPI also raises a 400 HTTPException when a JSON body cannot even be read (e.g. not UTF-8): that one
    is named ``bad_json`` like the validation errors.
    """
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse

    if not isinstance(exc, HTTPException):
        return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=500)
    message = str(exc.detail)
    if exc.status_code == 400 and "json" in request.headers.get("content-type", ""):
        message = f"bad_json: the request body could not be parsed as JSON ({message})"
        message += BINARY_AS_JSON_HINT if INFERENCE_HEADER in request.headers else ""
    return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)
