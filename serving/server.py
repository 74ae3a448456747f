"""Serve bundles with KServe's ModelServer: ``python -m serving.server`` (the container entry point).

Binds 127.0.0.1 unless `--host` says otherwise (the ServingRuntime passes ``--host=0.0.0.0`` inside a pod).
`--model_dir` is where KServe's storage initializer puts the bundle (``/mnt/models``); `--bundle` takes any
bundle URI instead (local folder or s3://, repeatable for an ensemble).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from serving.server_util import LOOPBACK, run_model_server
from serving.tta import TTA_MODES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving.server", description=__doc__)
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
    parser.add_argument("--max_batch", "--max-batch", dest="max_batch", type=int, default=64)
    parser.add_argument("--max_bytes", "--max-bytes", dest="max_bytes", type=int, default=10 * 1024 * 1024)
    parser.add_argument("--max_side", "--max-side", dest="max_side", type=int, default=4096)


def serve(args: argparse.Namespace, bundles: Sequence[str]) -> None:
    from serving.hard_examples import HardExampleConfig, HardExampleLogger
    from serving.predictor import ServeConfig, VisionPredictor
    from serving.upload import InputLimits

    limits = InputLimits(max_bytes=args.max_bytes, max_side=args.max_side)
    config = ServeConfig(tta=args.tta, limits=limits, max_batch=args.max_batch)
    hard = HardExampleConfig.from_env()  # VISIONPIPE_HARD_EXAMPLES=s3://bucket/prefix turns logging on
    predictor = VisionPredictor(args.model_name, list(bundles), config, HardExampleLogger(hard) if hard else None)
    predictor.load()
    print(
        f"serving {args.model_name} ({predictor.ensemble_version}) on http://{args.host}:{args.http_port}", flush=True
    )
    run_model_server([predictor], host=args.host, http_port=args.http_port, grpc_port=args.grpc_port or None)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    bundles = args.bundle or ([args.model_dir] if args.model_dir else [])
    if not bundles:
        raise SystemExit("python -m serving.server: give --bundle URI (or --model_dir)")
    serve(args, bundles)


if __name__ == "__main__":
    main()
