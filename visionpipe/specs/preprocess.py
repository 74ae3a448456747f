"""The preprocessing spec, torch-free: what a bundle stores and the signature training and serving must share.

The tensor code that applies it is visionpipe/serving/preprocessing.py (`to_model_input`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from visionpipe.specs.checks import SpecError

PREPROCESS_VERSION = "v1"
KINDS: tuple[str, ...] = ("standard", "digit-upload")
# Test-time augmentation modes a server applies on top of the preprocessing (visionpipe/serving/tta.py).
TTA_MODES: tuple[str, ...] = ("off", "5", "17")


class PreprocessError(SpecError):
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
