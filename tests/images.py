"""Test images as the predictor receives them: a uint8 array (H, W) or (H, W, C) encoded as PNG (bytes, or base64
text for JSON bodies). One helper for every test that builds requests or image folders."""

from __future__ import annotations

import base64
import io

import numpy as np
import numpy.typing as npt
from PIL import Image


def png_bytes(image: npt.NDArray[np.uint8]) -> bytes:
    """`image` as PNG; a single channel (H, W, 1) is written as greyscale."""
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def png_b64(image: npt.NDArray[np.uint8]) -> str:
    """`image` as base64 PNG text (the v1 `{"b64": ...}` instance, the v2 BYTES element in JSON)."""
    return base64.b64encode(png_bytes(image)).decode()
