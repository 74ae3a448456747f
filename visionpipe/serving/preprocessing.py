"""The one preprocessing definition shared by training, validation and serving.

A `PreprocessSpec` (defined in visionpipe/specs/preprocess.py) is stored in every bundle; its `signature` (e.g.
``v1/grayscale+resize28+norm``) must equal the one the runtime computes, or the bundle is refused. Training
feeds uint8 NHWC arrays from the Dataset artifact through `to_model_input`; the server decodes uploaded images
to the same uint8 arrays first, so both sides run the very same tensor code.

Decoding is shared too: `decode_to_array` (defined torch-free in visionpipe/serving/upload.py, re-exported here)
turns a PIL image into that uint8 array (EXIF orientation, the alpha rule, colour mode) for data_fetch's image
folders and for every upload the predictor decodes (`image_to_array`).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

# The one decoding rule (EXIF orientation, alpha, colour mode) lives with the upload decoding, torch-free, so
# data_fetch does not import torch for it (importing this module costs ~6 s more under load); re-exported here.
from visionpipe.serving.upload import decode_to_array as decode_to_array
from visionpipe.serving.upload import has_transparency as has_transparency

# The spec (dataclass, signature, validation) is defined once, torch-free, in visionpipe.specs.preprocess;
# re-exported here so the old import paths keep working.
from visionpipe.specs.preprocess import KINDS as KINDS
from visionpipe.specs.preprocess import PREPROCESS_VERSION as PREPROCESS_VERSION
from visionpipe.specs.preprocess import PreprocessError as PreprocessError
from visionpipe.specs.preprocess import PreprocessSpec as PreprocessSpec


def to_model_input(images: npt.NDArray[np.uint8], spec: PreprocessSpec) -> torch.Tensor:
    """uint8 images (N, H, W, C) -> float32 model input (N, spec.channels, spec.size, spec.size).

    This is the global view only; a spec with `views` is applied by visionpipe/serving/views.py
    (`views_input`), whose first view per image is exactly this."""
    return resize_normalise(to_unit_tensor(images, spec), spec)


def to_unit_tensor(images: npt.NDArray[np.uint8], spec: PreprocessSpec) -> torch.Tensor:
    """uint8 images (N, H, W, C) -> float32 (N, spec.channels, H, W) in [0, 1], at their own size (the first
    half of `to_model_input`; multi-view inference cuts its tiles from this full-resolution tensor)."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8:
        raise PreprocessError(f"expected uint8 images (N, H, W, C); got {images.dtype} {images.shape}")
    if spec.kind == "digit-upload":
        images = normalise_digits(images)
    if not images.flags.writeable:  # e.g. np.asarray(PIL image); torch wants a writable buffer
        images = images.copy()
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return _convert_channels(x, spec.channels)


def resize_normalise(x: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """float (N, C, H, W) in [0, 1] -> model input: resized to spec.size (bilinear, antialiased; skipped when
    already that size) and normalised with spec.mean / spec.std (the second half of `to_model_input`)."""
    if x.shape[-2:] != (spec.size, spec.size):
        x = F.interpolate(x, size=(spec.size, spec.size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(spec.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def normalise_digits(images: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """MNIST-style normalisation of every image (visionpipe/serving/upload.py), for the ``digit-upload`` kind.

    Training, validation and serving all pass through here, so a photo is normalised exactly as the training
    images were."""
    from PIL import Image

    from visionpipe.serving.upload import normalise_digit_photo

    grey = (
        images
        if images.shape[3] == 1
        else np.asarray([np.asarray(Image.fromarray(img).convert("L")) for img in images])[..., None]
    )
    return np.stack([normalise_digit_photo(Image.fromarray(img[..., 0], mode="L")) for img in grey])[..., None]


def _convert_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    have = x.shape[1]
    if have == channels:
        return x
    if have == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1)
    if have == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
        return (x * weights).sum(dim=1, keepdim=True)
    raise PreprocessError(f"cannot convert {have}-channel images to {channels} channels")
