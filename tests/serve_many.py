"""Test launcher: serve several VisionPredictors in one KServe ModelServer on 127.0.0.1.

argv: HTTP_PORT GRPC_PORT JSON, where JSON maps model name -> {"bundles": [uri, ...], "tta": mode,
"hard_examples": prefix}; the optional key "" holds server settings: {"limits": {InputLimits fields},
"max_batch", "max_request_pixels", "max_body_bytes", "pool_workers", "max_queue", "torch_threads"}.
The models share one worker pool, as in `visionpipe.serving.server`.
"""

from __future__ import annotations

import json
import sys

from visionpipe.serving.hard_examples import HardExampleConfig, HardExampleLogger
from visionpipe.serving.limits import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_REQUEST_PIXELS,
)
from visionpipe.serving.predictor import ServeConfig, VisionPredictor
from visionpipe.serving.runtime import WorkerPool, configure_torch_threads, cpu_budget, default_torch_threads
from visionpipe.serving.server_util import run_model_server
from visionpipe.serving.upload import InputLimits

TEST_LIMITS = {"max_bytes": 200_000, "max_side": 512, "max_pixels": 512 * 512}


def main() -> None:
    http_port, grpc_port, spec = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
    settings = spec.pop("", {})
    limits = InputLimits(**settings.get("limits", TEST_LIMITS))
    pool = WorkerPool(settings.get("pool_workers") or cpu_budget(), settings.get("max_queue", DEFAULT_MAX_QUEUE))
    threads = settings.get("torch_threads")
    configure_torch_threads(default_torch_threads(pool.workers) if threads is None else threads)
    models = []
    for name, entry in spec.items():
        config = ServeConfig(
            tta=entry.get("tta", "off"),
            limits=limits,
            max_batch=settings.get("max_batch", DEFAULT_MAX_BATCH),
            max_request_pixels=settings.get("max_request_pixels", DEFAULT_MAX_REQUEST_PIXELS),
        )
        hard = entry.get("hard_examples")
        logger = HardExampleLogger(HardExampleConfig(prefix=hard, max_margin=1.0)) if hard else None
        predictor = VisionPredictor(name, entry["bundles"], config, logger, pool=pool)
        predictor.load()
        models.append(predictor)
    run_model_server(
        models,
        host="127.0.0.1",
        http_port=http_port,
        grpc_port=grpc_port,
        max_body_bytes=settings.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES),
    )


if __name__ == "__main__":
    main()
