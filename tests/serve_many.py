"""Test launcher: serve several VisionPredictors in one KServe ModelServer on 127.0.0.1.

argv: HTTP_PORT GRPC_PORT JSON, where JSON maps model name -> {"bundles": [uri, ...], "tta": mode}.
"""

from __future__ import annotations

import json
import sys

from serving.hard_examples import HardExampleConfig, HardExampleLogger
from serving.predictor import ServeConfig, VisionPredictor
from serving.server_util import run_model_server
from serving.upload import InputLimits


def main() -> None:
    http_port, grpc_port, spec = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
    limits = InputLimits(max_bytes=200_000, max_side=512, max_pixels=512 * 512)
    models = []
    for name, entry in spec.items():
        config = ServeConfig(tta=entry.get("tta", "off"), limits=limits)
        hard = entry.get("hard_examples")
        logger = HardExampleLogger(HardExampleConfig(prefix=hard, max_margin=1.0)) if hard else None
        predictor = VisionPredictor(name, entry["bundles"], config, logger)
        predictor.load()
        models.append(predictor)
    run_model_server(models, host="127.0.0.1", http_port=http_port, grpc_port=grpc_port)


if __name__ == "__main__":
    main()
