"""Serve bundles with KServe's ModelServer: ``python -m visionpipe.serving.server`` (the container entry point).

Binds 127.0.0.1 unless `--host` says otherwise (the ServingRuntime passes ``--host=0.0.0.0`` inside a pod).
`--model_dir` is where KServe's storage initializer puts the bundle (``/mnt/models``); `--bundle` takes any
bundle URI instead (local folder or s3://, repeatable for an ensemble).

Work per request is bounded before it is done, each limit a flag with a named refusal (HTTP 400 / gRPC
INVALID_ARGUMENT unless noted): `--max_body_bytes` (413 ``body_too_large``; gRPC RESOURCE_EXHAUSTED),
`--max_batch` (``batch_too_large``, counted before any image is looked at), `--max_bytes` per encoded image
(``too_many_bytes``), `--max_side` and `--max_pixels` per image (``image_too_large``, from the header, before
decoding), `--max_request_pixels` summed over a request's images (``request_too_many_pixels``, from the
headers, before decoding). Decoding and inference run on `--pool_workers` threads (default: the CPU budget,
from the cgroup quota and the CPU affinity) with at most `--max_queue` more requests waiting (beyond that:
503 ``overloaded`` / UNAVAILABLE); torch uses `--torch_threads` intra-op threads (default: the CPU budget
shared out among the workers, i.e. 1 with the default workers; 0 leaves torch's own default).

Micro-batching (visionpipe/serving/batching.py): concurrent requests share one forward pass of up to
`--max_batch_size` images (0 or 1: off, one forward pass per request), the first queued request waiting at most
`--max_batch_wait_ms` for others (none when the pool is idle). Unset, each takes the bundle's
``serving.batching`` field, else the measured default (32 images, 2 ms); a flag wins over the bundle.
`--max_batch` is another thing: the most images ONE request may carry.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from visionpipe.serving.limits import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_REQUEST_PIXELS,
    DEFAULT_MAX_SIDE,
)
from visionpipe.serving.server_util import LOOPBACK, run_model_server
from visionpipe.specs.preprocess import TTA_MODES

EVENT_MODES = ("all", "request", "response")  # visionpipe/serving/event_logger.py MODES (imported lazily there)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m visionpipe.serving.server", description=__doc__)
    add_serve_arguments(parser)
    parser.add_argument("--model_dir", default="", help="KServe storage-initializer folder (e.g. /mnt/models)")
    return parser


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", action="append", default=[], help="bundle URI (repeat for an ensemble)")
    parser.add_argument("--model_name", "--model-name", dest="model_name", default="visionpipe")
    parser.add_argument("--host", default=os.environ.get("VISIONPIPE_HOST", LOOPBACK), help="bind address")
    parser.add_argument("--http_port", "--port", dest="http_port", type=int, default=8080)
    parser.add_argument("--grpc_port", "--grpc-port", dest="grpc_port", type=int, default=0, help="0 = no gRPC")
    parser.add_argument("--tta", choices=TTA_MODES, default="off", help="test-time augmentation variants")
    parser.add_argument(
        "--runtime",
        choices=("torch", "onnx"),  # visionpipe.serving.compiled.RUNTIMES (not imported here: it imports torch)
        default="torch",
        help="forward pass: torch, or onnx (ONNX Runtime on the bundle's compiled/member-<i>.onnx, which it must ship)",
    )
    parser.add_argument(
        "--allow-unsigned",
        "--allow_unsigned",
        dest="allow_unsigned",
        action="store_true",
        help="serve bundles without a trusted signature (a bad signature is still refused)",
    )
    events = parser.add_argument_group(
        "inference logging: KServe-format CloudEvents of every request and answer, REST and gRPC "
        "(visionpipe/serving/event_logger.py; each flag defaults to its VISIONPIPE_EVENT_LOGGER_* variable)"
    )
    events.add_argument(
        "--event_logger_url",
        "--event-logger-url",
        dest="event_logger_url",
        default=None,
        help="collector URL (unset: no logging)",
    )
    events.add_argument(
        "--event_logger_mode",
        "--event-logger-mode",
        dest="event_logger_mode",
        default=None,
        choices=EVENT_MODES,
        help="what to log (default all)",
    )
    events.add_argument(
        "--event_logger_source",
        "--event-logger-source",
        dest="event_logger_source",
        default=None,
        help="ce-source (default: the host name, i.e. the pod name)",
    )
    events.add_argument(
        "--event_logger_inference_service",
        "--event-logger-inference-service",
        dest="event_logger_inference_service",
        default=None,
        help="ce-inferenceservicename (default: --model_name)",
    )
    events.add_argument(
        "--event_logger_protocols",
        "--event-logger-protocols",
        dest="event_logger_protocols",
        default=None,
        help="rest,grpc (default) or one of them: grpc when KServe's agent logs REST",
    )
    parser.add_argument(
        "--enable_latency_logging",
        "--enable-latency-logging",
        dest="enable_latency_logging",
        action="store_true",
        help="KServe's per-request log line with preprocess / predict / postprocess ms (default off: the same "
        "figures are KServe's request_*_seconds histograms on /metrics)",
    )
    limits = parser.add_argument_group("limits (each refusal is a named 4xx)")
    _int_flag(limits, "max_batch", DEFAULT_MAX_BATCH, "images per request (batch_too_large)")
    _int_flag(limits, "max_bytes", DEFAULT_MAX_BYTES, "bytes per encoded image (too_many_bytes)")
    _int_flag(limits, "max_side", DEFAULT_MAX_SIDE, "longest image side in pixels (image_too_large)")
    _int_flag(limits, "max_pixels", DEFAULT_MAX_PIXELS, "pixels per image, from its header (image_too_large)")
    _int_flag(
        limits,
        "max_request_pixels",
        DEFAULT_MAX_REQUEST_PIXELS,
        "pixels per request, all images (request_too_many_pixels)",
    )
    _int_flag(
        limits,
        "max_body_bytes",
        DEFAULT_MAX_BODY_BYTES,
        "request body bytes, REST and gRPC (413 body_too_large / RESOURCE_EXHAUSTED)",
    )
    pool = parser.add_argument_group("worker pool")
    _int_flag(
        pool, "pool_workers", None, "decode/inference threads (default: the CPU budget: cgroup quota and CPU affinity)"
    )
    _int_flag(
        pool, "max_queue", DEFAULT_MAX_QUEUE, "requests waiting for a worker beyond which 503 overloaded is answered"
    )
    _int_flag(
        pool,
        "torch_threads",
        None,
        "torch intra-op threads (default: CPU budget / workers, at least 1; 0: torch's own default)",
    )
    batching = parser.add_argument_group(
        "micro-batching (unset: the bundle's serving.batching, else the default; visionpipe/serving/batching.py)"
    )
    _int_flag(batching, "max_batch_size", None, "images per shared forward pass (0 or 1: off; default 32)")
    batching.add_argument(
        "--max_batch_wait_ms",
        "--max-batch-wait-ms",
        dest="max_batch_wait_ms",
        type=float,
        default=None,
        help="longest wait of the first queued request for others, ms (default 2; none when the pool is idle)",
    )
    _int_flag(batching, "max_concurrent_batches", None, "forward passes at once (default: one per pool worker)")


def _int_flag(group: argparse._ArgumentGroup, name: str, default: int | None, help_text: str) -> None:
    """An integer option under both spellings KServe's own flags use: --max_batch and --max-batch."""
    group.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name, type=int, default=default, help=help_text)


def serve(args: argparse.Namespace, bundles: Sequence[str]) -> None:
    from visionpipe.serving.batching import BatchingConfigError
    from visionpipe.serving.bundle import BundleError  # torch: imported only when serving, not for --help
    from visionpipe.serving.event_logger import EventLogger, EventLoggerError, from_flags
    from visionpipe.serving.hard_examples import HardExampleConfig, HardExampleLogger
    from visionpipe.serving.predictor import ServeConfig, VisionPredictor
    from visionpipe.serving.runtime import WorkerPool, configure_torch_threads, cpu_budget, default_torch_threads
    from visionpipe.serving.upload import InputLimits

    limits = InputLimits(max_bytes=args.max_bytes, max_side=args.max_side, max_pixels=args.max_pixels)
    try:
        config = ServeConfig(
            tta=args.tta,
            limits=limits,
            max_batch=args.max_batch,
            max_request_pixels=args.max_request_pixels,
            allow_unsigned=args.allow_unsigned,
            max_batch_size=args.max_batch_size,
            max_batch_wait_ms=args.max_batch_wait_ms,
            max_concurrent_batches=args.max_concurrent_batches,
            runtime=args.runtime,
        )
    except BatchingConfigError as exc:
        raise SystemExit(f"python -m visionpipe.serving.server: {exc}") from None
    if args.torch_threads is not None and args.torch_threads < 0:
        raise SystemExit(f"--torch_threads={args.torch_threads} must be >= 0 (0: torch's own default)")
    budget = cpu_budget()
    pool = WorkerPool(args.pool_workers or budget, args.max_queue)
    threads = default_torch_threads(pool.workers, budget) if args.torch_threads is None else args.torch_threads
    torch_threads = configure_torch_threads(threads)
    hard = HardExampleConfig.from_env()  # VISIONPIPE_HARD_EXAMPLES=s3://bucket/prefix turns logging on
    try:
        events = from_flags(
            args.model_name,
            args.event_logger_url,
            args.event_logger_mode,
            args.event_logger_source,
            args.event_logger_inference_service,
            args.event_logger_protocols,
        )
    except EventLoggerError as exc:
        raise SystemExit(f"python -m visionpipe.serving.server: {exc}") from None
    predictor = VisionPredictor(
        args.model_name,
        list(bundles),
        config,
        HardExampleLogger(hard) if hard else None,
        pool=pool,
        event_logger=EventLogger(events) if events else None,
    )
    try:
        predictor.load()  # ready only once every bundle verified
    except BundleError as exc:  # a named refusal, not a traceback
        raise SystemExit(f"python -m visionpipe.serving.server: refusing bundle: {exc.reason}: {exc}") from None
    print(
        f"serving {args.model_name} ({predictor.ensemble_version}) on http://{args.host}:{args.http_port}; "
        f"cpu budget {budget}, {pool.workers} workers, queue {pool.max_queue}, torch threads {torch_threads}, "
        f"{predictor.batching.describe()}",
        flush=True,
    )
    if events:
        print(
            f"logging {events.mode} of {','.join(events.protocols)} to {events.url} as "
            f"{events.inference_service} ({events.source})",
            flush=True,
        )
    run_model_server(
        [predictor],
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port or None,
        max_body_bytes=args.max_body_bytes,
        latency_log=args.enable_latency_logging,
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    bundles = args.bundle or ([args.model_dir] if args.model_dir else [])
    if not bundles:
        raise SystemExit("python -m visionpipe.serving.server: give --bundle URI (or --model_dir)")
    serve(args, bundles)


if __name__ == "__main__":
    main()
