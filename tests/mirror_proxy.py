"""A small mirroring proxy for the shadow tests: what Istio's `mirror` / Gateway API's RequestMirror do, on loopback.

REST: every request is forwarded to the primary and the primary's answer returned; a copy goes to the candidate in
the background and its answer is dropped (Envoy's request mirroring: fire and forget). gRPC: the same for every
method, with a generic handler that passes the serialised messages through untouched. Like Envoy, the proxy sets
``x-request-id`` when the client sent none, and the mirrored copy carries the same value (Envoy's
``x-request-id`` generation: envoy docs, "x-request-id" in HTTP header manipulation; the shadow request is a copy
of the routed request's headers, source/common/router/router.cc). ``GET /healthz`` answers 200 once both
listeners are up; ``GET /mirrored`` reports the mirrored calls that finished ({"rest": n, "grpc": n}).

Run: ``python tests/mirror_proxy.py --http-port P --grpc-port G --primary-http URL --candidate-http URL
--primary-grpc HOST:PORT --candidate-grpc HOST:PORT``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import uuid
from collections.abc import Callable, Sequence

import grpc
import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

HOP_BY_HOP = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "upgrade"}
Identity = Callable[[bytes], bytes]


def _identity(data: bytes) -> bytes:
    return data


class Mirror:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.client = httpx.AsyncClient(timeout=30.0)
        self.primary = grpc.aio.insecure_channel(args.primary_grpc)
        self.candidate = grpc.aio.insecure_channel(args.candidate_grpc)
        self.done = {"rest": 0, "grpc": 0}
        self.tasks: set[asyncio.Task[None]] = set()

    def _fire(self, coroutine: object, kind: str) -> None:
        async def run() -> None:
            with contextlib.suppress(Exception):  # the mirror's answer and errors are dropped
                await coroutine  # type: ignore[misc]
            self.done[kind] += 1

        task = asyncio.ensure_future(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- REST --
    async def rest(self, request: Request) -> Response:
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers.setdefault("x-request-id", str(uuid.uuid4()))
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        self._fire(
            self.client.request(request.method, self.args.candidate_http + path, content=body, headers=headers), "rest"
        )
        answer = await self.client.request(request.method, self.args.primary_http + path, content=body, headers=headers)
        out = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP | {"content-encoding"}}
        return Response(content=answer.content, status_code=answer.status_code, headers=out)

    # -- gRPC --
    def handler(self) -> grpc.GenericRpcHandler:
        mirror = self

        class Handler(grpc.GenericRpcHandler):  # type: ignore[misc]
            def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
                method = details.method

                async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                    metadata = [(m.key, m.value) for m in context.invocation_metadata() or ()]
                    if not any(key == "x-request-id" for key, _ in metadata):
                        metadata.append(("x-request-id", str(uuid.uuid4())))
                    copy = mirror.candidate.unary_unary(method, _identity, _identity)
                    mirror._fire(copy(request, metadata=metadata, timeout=30.0), "grpc")
                    call = mirror.primary.unary_unary(method, _identity, _identity)
                    try:
                        return bytes(await call(request, metadata=metadata, timeout=30.0))
                    except grpc.aio.AioRpcError as exc:
                        await context.abort(exc.code(), exc.details() or "")
                        raise

                return grpc.unary_unary_rpc_method_handler(unary, _identity, _identity)

        return Handler()


async def serve(args: argparse.Namespace) -> None:
    mirror = Mirror(args)
    ready = {"grpc": False}

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"}) if ready["grpc"] else JSONResponse({"status": "starting"}, 503)

    async def mirrored(request: Request) -> Response:
        return JSONResponse(mirror.done)

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/mirrored", mirrored, methods=["GET"]),
        Route("/{path:path}", mirror.rest, methods=["GET", "POST", "PUT", "DELETE"]),
    ]
    app = Starlette(routes=routes)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((mirror.handler(),))
    server.add_insecure_port(f"127.0.0.1:{args.grpc_port}")
    await server.start()
    ready["grpc"] = True
    config = uvicorn.Config(app, host="127.0.0.1", port=args.http_port, log_level="warning", access_log=False)
    try:
        await uvicorn.Server(config).serve()
    finally:
        await server.stop(1)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--primary-http", required=True)
    parser.add_argument("--candidate-http", required=True)
    parser.add_argument("--primary-grpc", required=True)
    parser.add_argument("--candidate-grpc", required=True)
    asyncio.run(serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
