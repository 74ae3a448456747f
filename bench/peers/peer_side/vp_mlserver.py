"""MLServer runtime serving a visionpipe bundle (runs in bench/peers/mlserver/.venv; started by bench/peers).

`mlserver start <dir>` reads ``<dir>/settings.json`` (host 127.0.0.1, ports, parallel workers) and
``<dir>/model-settings.json``: name, ``implementation: vp_mlserver.VisionpipeRuntime``, ``parameters.uri`` (the
bundle folder), ``parameters.extra.torch_threads``, and MLServer's adaptive batching, ``max_batch_size`` /
``max_batch_time`` (seconds). The adaptive batcher (mlserver/batching/adaptive.py) queues requests until the batch
is full or `max_batch_time` has passed since the first one, merges their inputs along the first dimension
(mlserver/batching/requests.py, `BatchedRequests`), calls `predict` once and splits the outputs back per request
by each request's first-dimension size.

Request: v2 REST, one BYTES input of shape [N] whose elements are base64 text of encoded images (the body
bench/serve.py sends our server). Answer: ``probabilities`` FP32 [N, C] (calibrated) and ``label`` INT64 [N]
(-1 = abstain), computed by vp_peer_model.PeerModel (visionpipe's own code).
"""

from __future__ import annotations

from mlserver import MLModel  # type: ignore[import-not-found]  # only in the peer's venv
from mlserver.errors import MLServerError  # type: ignore[import-not-found]  # only in the peer's venv
from mlserver.types import (  # type: ignore[import-not-found]  # only in the peer's venv
    InferenceRequest,
    InferenceResponse,
    ResponseOutput,
)
from vp_peer_model import PeerModel, image_bytes


class VisionpipeRuntime(MLModel):  # type: ignore[misc]  # MLModel is untyped here
    async def load(self) -> bool:
        parameters = self.settings.parameters
        extra = parameters.extra or {}
        self.peer = PeerModel(str(parameters.uri), int(extra.get("torch_threads", 2)))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        if len(payload.inputs) != 1 or payload.inputs[0].datatype != "BYTES":
            got = [(i.name, i.datatype) for i in payload.inputs]
            raise MLServerError(f"expected exactly one BYTES input of base64 images; got {got}", 400)
        data = list(payload.inputs[0].data)
        try:
            probs, labels = self.peer.infer([image_bytes(item) for item in data])
        except ValueError as exc:
            raise MLServerError(str(exc), 400) from None
        return InferenceResponse(
            id=payload.id,
            model_name=self.name,
            outputs=[
                ResponseOutput(
                    name="probabilities", shape=list(probs.shape), datatype="FP32", data=probs.ravel().tolist()
                ),
                ResponseOutput(name="label", shape=[len(labels)], datatype="INT64", data=labels.tolist()),
            ],
        )
