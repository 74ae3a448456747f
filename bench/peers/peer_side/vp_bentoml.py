"""BentoML service serving a visionpipe bundle with adaptive batching (runs in bench/peers/bentoml/.venv).

    VP_PEER_BUNDLE=DIR [VP_PEER_MODEL_NAME=digits VP_PEER_MAX_BATCH_SIZE=32 VP_PEER_MAX_LATENCY_MS=60000
    VP_PEER_TORCH_THREADS=2] bentoml serve vp_bentoml:VisionpipeService --host 127.0.0.1 --port P

The API is ``batchable=True`` with ``max_batch_size`` and ``max_latency_ms``: BentoML's CorkDispatcher
(bentoml/_internal/marshal/dispatcher.py) gathers queued calls and concatenates their inputs along dimension 0,
choosing how long to wait from the batch latencies it has measured (its own optimizer; there is no "maximum
wait" setting), up to ``max_batch_size``; ``max_latency_ms`` is an SLO: a call whose estimated latency exceeds
it is cancelled (HTTP 503). Set generously here, so no request is refused.

Request: the v2 body our server takes, POST /v2/models/<model>/infer: ``{"inputs": [{"name", "shape",
"datatype": "BYTES", "data": [base64 PNG, ...]}]}``. The batchable parameter is that ``inputs`` list (one tensor
per request), so a batch is the tensors of several requests. Answer: a JSON list, one
``{"probabilities": [[...]], "label": [...]}`` per tensor (calibrated probabilities, -1 = abstain), from
vp_peer_model.PeerModel.
"""

from __future__ import annotations

import os

import bentoml  # type: ignore[import-not-found]  # only in the peer's venv
from pydantic import BaseModel
from vp_peer_model import PeerModel, image_bytes

MODEL_NAME = os.environ.get("VP_PEER_MODEL_NAME", "digits")
MAX_BATCH_SIZE = int(os.environ.get("VP_PEER_MAX_BATCH_SIZE", "32"))
MAX_LATENCY_MS = int(os.environ.get("VP_PEER_MAX_LATENCY_MS", "60000"))


class V2Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[str]


@bentoml.service(workers=1, traffic={"timeout": 120})
class VisionpipeService:
    def __init__(self) -> None:
        self.peer = PeerModel(os.environ["VP_PEER_BUNDLE"], int(os.environ.get("VP_PEER_TORCH_THREADS", "2")))

    @bentoml.api(  # type: ignore[untyped-decorator]  # bentoml is not installed in the repo venv
        route=f"/v2/models/{MODEL_NAME}/infer",
        batchable=True,
        max_batch_size=MAX_BATCH_SIZE,
        max_latency_ms=MAX_LATENCY_MS,
    )
    def infer(self, inputs: list[V2Tensor]) -> list[dict[str, list[object]]]:
        for tensor in inputs:
            if tensor.datatype != "BYTES":
                raise ValueError(f"input {tensor.name!r} is {tensor.datatype}; send BYTES (base64 images)")
        sizes = [len(t.data) for t in inputs]
        probs, labels = self.peer.infer([image_bytes(item) for t in inputs for item in t.data])
        out: list[dict[str, list[object]]] = []
        start = 0
        for size in sizes:
            rows = slice(start, start + size)
            out.append({"probabilities": probs[rows].tolist(), "label": labels[rows].tolist()})
            start += size
        return out
