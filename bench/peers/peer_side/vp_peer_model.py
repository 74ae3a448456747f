"""The model every peer serves: a visionpipe bundle, through visionpipe's own code (runs in a peer's venv).

A peer process has ``PYTHONPATH=<repo>:<repo>/bench/peers/peer_side`` and imports only visionpipe's torch / numpy
modules, never kserve (which is not installed in a peer venv):

- the bundle: `visionpipe.serving.bundle.read_bundle` (manifest, checksums, signature, preprocessing signature,
  calibrator, policy) and `BundleModel` (the checked `load_member`, `log_probs`, `aggregate`, `decide`), the
  classes our predictor serves with;
- one image: `visionpipe.serving.upload.open_image` + `load_image` (header checks, then decode),
  `visionpipe.serving.upload.decode_to_array` (orientation, alpha, colour: the predictor's rule),
  `visionpipe.serving.views.model_input` (the shared
  preprocessing, `to_model_input` for a bundle without views): the steps of our predictor's `_plan_encoded` /
  `_load_encoded` / `_materialise`;
- the answer: `BundleModel.decide(BundleModel.aggregate(BundleModel.log_probs(x)))`, i.e. the calibrated
  probabilities and the policy's labels (-1 = abstain), as our predictor's `infer` computes them (TTA off).

So the model forward, the preprocessing, the calibrator and the policy are the same code in every row of the
side-by-side bench; only the serving around them differs.
"""

from __future__ import annotations

import base64
import binascii
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from visionpipe.serving.bundle import BundleModel, read_bundle
from visionpipe.serving.runtime import configure_torch_threads
from visionpipe.serving.upload import decode_to_array, load_image, open_image
from visionpipe.serving.views import model_input
from visionpipe.specs import PreprocessSpec

ALLOW_UNSIGNED_ENV = "VISIONPIPE_PEER_ALLOW_UNSIGNED"  # "1": read the bundle as `--allow_unsigned` would
LOG_BATCHES_ENV = "VP_PEER_LOG_BATCHES"  # "1": print "vp-peer batch <n>" per forward pass (the smoke test reads it)


def image_to_array(image: Image.Image, spec: PreprocessSpec) -> npt.NDArray[np.uint8]:
    """A decoded upload -> uint8 HxWxC, by the one rule data_fetch and our predictor's `image_to_array` share."""
    return decode_to_array(image, spec.channels, spec.kind)


def image_bytes(item: bytes | str) -> bytes:
    """One BYTES element as it arrives over REST JSON: base64 text of the encoded image (what our server takes)."""
    text = item.encode("ascii") if isinstance(item, str) else item
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"a BYTES element is not base64 text of an image ({exc}); send base64 of the PNG") from None


class PeerModel:
    """The bundle in eval mode; `infer` maps encoded images to (calibrated probabilities [N, C], labels [N])."""

    def __init__(self, bundle_dir: str | Path, torch_threads: int = 2) -> None:
        self.torch_threads = configure_torch_threads(torch_threads)
        allow_unsigned = os.environ.get(ALLOW_UNSIGNED_ENV, "") == "1"
        self.runtime = BundleModel(read_bundle(Path(bundle_dir), allow_unsigned=allow_unsigned))
        self.spec = self.runtime.bundle.preprocess
        self.classes = self.runtime.bundle.classes
        self.log_batches = os.environ.get(LOG_BATCHES_ENV, "") == "1"

    def model_input(self, encoded: Sequence[bytes]) -> torch.Tensor:
        rows = []
        with torch.inference_mode():
            for data in encoded:
                image = image_to_array(load_image(open_image(data)), self.spec)
                rows.append(model_input(image[None], self.spec))
        return torch.cat(rows)

    def infer(self, encoded: Sequence[bytes]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Encoded images (PNG, JPEG, ... bytes) -> float32 calibrated probabilities and int64 labels."""
        if not encoded:
            return np.zeros((0, len(self.classes)), np.float32), np.zeros((0,), np.int64)
        if self.log_batches:
            print(f"vp-peer batch {len(encoded)}", file=sys.stderr, flush=True)
        x = self.model_input(encoded)
        with torch.inference_mode():
            prediction = self.runtime.decide(self.runtime.aggregate(self.runtime.log_probs(x)))
        probs = np.asarray(prediction.calibrated_probs, dtype=np.float32)
        return probs, np.asarray(prediction.decisions.labels, dtype=np.int64)
