"""PyTriton serving a visionpipe bundle through Triton's dynamic batcher (runs in bench/peers/pytriton/.venv).

    python vp_pytriton.py --bundle DIR --http-port P --grpc-port G --metrics-port M [--model-name digits]
        [--max-batch-size 32] [--max-wait-ms 2] [--torch-threads 2]

PyTriton starts the bundled tritonserver binary (HTTP, gRPC and metrics bound to 127.0.0.1 here) and runs
`infer` in this process. The model is bound with ``max_batch_size`` and
``DynamicBatcher(max_queue_delay_microseconds)``: Triton's dynamic batcher gathers queued requests into one
batch, up to the maximum batch or the queue delay (pytriton/model_config/common.py `DynamicBatcher`; Triton
docs/user_guide/model_configuration.md "Dynamic Batcher"), and `@batch` (pytriton/decorators.py) hands `infer`
the stacked inputs and splits its outputs back per request.

Request: v2 REST, one BYTES input ``image`` whose elements are base64 text of encoded images. A batching Triton
model has a leading batch dimension plus at least one per-sample dimension, so the input is declared
per-sample (1,) and the request's shape is [N, 1] (our server and MLServer take [N]; the bytes are the same).
Answer: ``probabilities`` FP32 [N, C] and ``label`` INT64 [N, 1] (-1 = abstain), from vp_peer_model.PeerModel.
"""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType

import numpy as np
import numpy.typing as npt
from pytriton.decorators import batch  # type: ignore[import-not-found]  # only in the peer's venv
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor  # type: ignore[import-not-found]  # same
from pytriton.triton import Triton, TritonConfig  # type: ignore[import-not-found]  # same
from vp_peer_model import PeerModel, image_bytes

LOOPBACK = "127.0.0.1"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--model-name", default="digits")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--torch-threads", type=int, default=2)
    args = parser.parse_args(argv)

    peer = PeerModel(args.bundle, args.torch_threads)

    @batch  # type: ignore[untyped-decorator]  # pytriton is not installed in the repo venv
    def infer(image: npt.NDArray[np.object_]) -> dict[str, npt.NDArray[np.generic]]:
        probs, labels = peer.infer([image_bytes(item) for item in image.reshape(-1)])
        return {"probabilities": probs, "label": labels[:, None]}

    config = TritonConfig(
        http_address=LOOPBACK,
        http_port=args.http_port,
        grpc_address=LOOPBACK,
        grpc_port=args.grpc_port,
        metrics_address=LOOPBACK,
        metrics_port=args.metrics_port,
        allow_gpu_metrics=False,
        allow_sagemaker=False,
        allow_vertex_ai=False,
    )

    def _terminate(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # leaves the `with`, which stops tritonserver

    signal.signal(signal.SIGTERM, _terminate)
    with Triton(config=config) as triton:
        triton.bind(
            model_name=args.model_name,
            infer_func=infer,
            inputs=[Tensor(name="image", dtype=bytes, shape=(1,))],
            outputs=[
                Tensor(name="probabilities", dtype=np.float32, shape=(len(peer.classes),)),
                Tensor(name="label", dtype=np.int64, shape=(1,)),
            ],
            config=ModelConfig(
                max_batch_size=args.max_batch_size,
                batcher=DynamicBatcher(max_queue_delay_microseconds=round(args.max_wait_ms * 1000)),
            ),
            strict=True,
        )
        print(
            f"pytriton serving {args.model_name} on http://{LOOPBACK}:{args.http_port}: max_batch_size "
            f"{args.max_batch_size}, max_queue_delay {args.max_wait_ms} ms, torch threads {peer.torch_threads}",
            flush=True,
        )
        triton.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
