"""The one preprocessing definition shared by training, validation and serving.

A `PreprocessSpec` is stored in every bundle; its `signature` (e.g. ``v1/grayscale+resize28+norm``) must equal
the one the runtime computes, or the bundle is refused. Training feeds uint8 NHWC arrays from the Dataset
artifact through `to_model_input`; the server decodes uploaded images to the same uint8 arrays first, so both
sides run the very same tensor code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

PREPROCESS_VERSION = "v1"
KINDS = ("standard", "digit-upload")


class PreprocessError(ValueError):
    """A preprocessing spec is invalid, or an input does not fit it."""


@dataclass(frozen=True)
class PreprocessSpec:
    """How raw uint8 images become model input.

    kind: ``standard`` (channel conversion, resize, normalise) or ``digit-upload`` (photos of handwritten
    digits are normalised to MNIST style first when served; see visionpipe/serving/upload.py).
    channels: model input channels (1 grey, 3 RGB). size: model input side in pixels (square).
    mean / std: per-channel normalisation after scaling pixels to [0, 1].
    """

    kind: str = "standard"
    channels: int = 1
    size: int = 28
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PreprocessError(f"preprocess.kind={self.kind!r} is not one of {', '.join(KINDS)}")
        if self.channels not in (1, 3):
            raise PreprocessError(f"preprocess.channels={self.channels} must be 1 (grey) or 3 (RGB)")
        if not 4 <= self.size <= 1024:
            raise PreprocessError(f"preprocess.size={self.size} must be between 4 and 1024 pixels")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != self.channels:
                raise PreprocessError(
                    f"preprocess.{name} has {len(values)} values; it needs one per channel ({self.channels})"
                )
        if any(s <= 0 for s in self.std):
            raise PreprocessError(f"preprocess.std={self.std} must be positive")

    @property
    def signature(self) -> str:
        """A stable string naming every step; training and serving must agree on it."""
        colour = "grayscale" if self.channels == 1 else "rgb"
        steps = [
            colour,
            f"resize{self.size}",
            "norm(" + ";".join(f"{m:g},{s:g}" for m, s in zip(self.mean, self.std, strict=True)) + ")",
        ]
        if self.kind == "digit-upload":
            steps.insert(0, "digitupload")
        return f"{PREPROCESS_VERSION}/" + "+".join(steps)

    def to_dict(self) -> dict[str, object]:
        payload = asdict(self)
        payload["mean"] = list(self.mean)
        payload["std"] = list(self.std)
        return payload

    @classmethod
    def from_dict(cls, payload: dict[str, object]) -> PreprocessSpec:
        known = {"kind", "channels", "size", "mean", "std"}
        unknown = set(payload) - known
        if unknown:
            raise PreprocessError(f"unknown preprocess fields {sorted(unknown)}; allowed: {sorted(known)}")
        try:
            mean = payload.get("mean", [0.5])
            std = payload.get("std", [0.5])
            assert isinstance(mean, list | tuple) and isinstance(std, list | tuple)
            return cls(
                kind=str(payload.get("kind", "standard")),
                channels=int(str(payload.get("channels", 1))),
                size=int(str(payload.get("size", 28))),
                mean=tuple(float(m) for m in mean),
                std=tuple(float(s) for s in std),
            )
        except (AssertionError, ValueError) as exc:
            raise PreprocessError(f"invalid preprocess spec {payload}: {exc}") from exc


def to_model_input(images: npt.NDArray[np.uint8], spec: PreprocessSpec) -> torch.Tensor:
    """uint8 images (N, H, W, C) -> float32 model input (N, spec.channels, spec.size, spec.size)."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8:
        raise PreprocessError(f"expected uint8 images (N, H, W, C); got {images.dtype} {images.shape}")
    if spec.kind == "digit-upload":
        images = normalise_digits(images)
    if not images.flags.writeable:  # e.g. np.asarray(PIL image); torch wants a writable buffer
        images = images.copy()
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    x = _convert_channels(x, spec.channels)
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
