"""Uploaded images: safe decoding with input limits, and MNIST-style normalisation of digit photos.

`decode_image` turns untrusted bytes into a loaded PIL image or raises an `InputError` whose ``code`` the
predictor maps to an HTTP 4xx answer. The pixel count is checked from the header, before the full decode, so a
small file that would expand to gigabytes (a decompression bomb) is refused cheaply.

`decode_to_array` is the one decoding rule (EXIF orientation, transparency, colour mode) for training images
(data_fetch) and uploads (the predictor's `image_to_array`), torch-free so data_fetch need not import torch.

`normalise_digit_photo` turns a photo of a handwritten digit (dark ink on light paper, or light on dark, any
size, possibly rotated a little, possibly with alpha or an EXIF orientation) into a uint8 (28, 28) array in
MNIST style: white digit on black, digit scaled into a 20x20 box, centre of mass in the middle of the canvas.
The MNIST mean/std normalisation is NOT applied here; `visionpipe.serving.preprocessing.to_model_input` does it, for the
PreprocessSpec kind ``digit-upload``.

Steps, in order (each a small function below):
EXIF transpose -> alpha composite -> grayscale -> auto-invert dark backgrounds -> Otsu binarisation ->
largest connected component (plus large companions: handwritten 4s and 5s are often two strokes) ->
deskew (PCA angle, at most ``max_deskew_degrees``, only when the shape is elongated enough to trust it) ->
centre of mass on a square canvas -> resize to 28x28.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

from visionpipe.specs.preprocess import KINDS, PreprocessError

FloatImage = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]

SUPPORTED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")


# --------------------------------------------------------------------- errors
class InputError(ValueError):
    """An uploaded image is refused; ``code`` is a stable machine-readable reason (maps to HTTP 4xx)."""

    code = "invalid_input"


class NotAnImageError(InputError):
    code = "not_an_image"


class UnsupportedFormatError(InputError):
    code = "unsupported_format"


class TruncatedImageError(InputError):
    code = "truncated_image"


class ImageTooLargeError(InputError):
    code = "image_too_large"


class TooManyBytesError(InputError):
    code = "too_many_bytes"


class EmptyImageError(InputError):
    """The image has no contrast, so there is no digit to find."""

    code = "empty_image"


# --------------------------------------------------------------------- configs
@dataclass(frozen=True)
class InputLimits:
    """Limits applied to untrusted uploads before and while decoding.

    max_bytes: size of the encoded upload. max_side: longest image side in pixels.
    max_pixels: width * height, checked from the header before decoding (decompression-bomb guard).
    formats: PIL format names accepted.
    """

    max_bytes: int = 10 * 1024 * 1024
    max_side: int = 8192
    max_pixels: int = 40_000_000
    formats: tuple[str, ...] = SUPPORTED_FORMATS

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_side", "max_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"InputLimits.{name}={value!r} must be a positive integer")
        unknown = sorted(set(self.formats) - set(SUPPORTED_FORMATS))
        if unknown or not self.formats:
            raise ValueError(f"InputLimits.formats={self.formats!r} must be a non-empty subset of {SUPPORTED_FORMATS}")


@dataclass(frozen=True)
class UploadConfig:
    """Parameters of `normalise_digit_photo` (the defaults reproduce MNIST's layout).

    size: output side (28). digit_box: the digit's longer side after scaling (20, as in MNIST).
    invert: ``auto`` (invert when the background is brighter than the ink), ``always`` or ``never``.
    min_contrast: grey-level range (0..255) below which the image counts as empty.
    companion_fraction: connected components at least this fraction of the largest one are kept too.
    deskew: rotate the digit upright when its principal axis leans by at most ``max_deskew_degrees`` and its
    elongation (1 - minor/major eigenvalue) is at least ``deskew_min_elongation``.
    """

    size: int = 28
    digit_box: int = 20
    invert: str = "auto"
    min_contrast: float = 24.0
    companion_fraction: float = 0.2
    deskew: bool = True
    max_deskew_degrees: float = 10.0
    min_deskew_degrees: float = 1.0
    deskew_min_elongation: float = 0.6

    def __post_init__(self) -> None:
        if not 8 <= self.size <= 512:
            raise ValueError(f"UploadConfig.size={self.size} must be between 8 and 512")
        if not 4 <= self.digit_box <= self.size:
            raise ValueError(f"UploadConfig.digit_box={self.digit_box} must be between 4 and size={self.size}")
        if self.invert not in ("auto", "always", "never"):
            raise ValueError(f"UploadConfig.invert={self.invert!r} must be one of 'auto', 'always', 'never'")
        if not 0 <= self.min_contrast < 255:
            raise ValueError(f"UploadConfig.min_contrast={self.min_contrast} must be in [0, 255)")
        if not 0 < self.companion_fraction <= 1:
            raise ValueError(f"UploadConfig.companion_fraction={self.companion_fraction} must be in (0, 1]")
        if not 0 <= self.min_deskew_degrees <= self.max_deskew_degrees <= 45:
            raise ValueError(
                f"UploadConfig deskew degrees min={self.min_deskew_degrees} max={self.max_deskew_degrees} "
                "must satisfy 0 <= min <= max <= 45"
            )
        if not 0 <= self.deskew_min_elongation < 1:
            raise ValueError(f"UploadConfig.deskew_min_elongation={self.deskew_min_elongation} must be in [0, 1)")


# --------------------------------------------------------------------- decoding
def decode_image(data: bytes, limits: InputLimits = InputLimits()) -> Image.Image:
    """Decode untrusted bytes into a fully loaded PIL image, or raise an `InputError` subclass."""
    return load_image(open_image(data, limits))


def open_image(data: bytes, limits: InputLimits = InputLimits()) -> Image.Image:
    """Read only the header of untrusted bytes and check format, sides and pixel count; nothing is decoded.

    PIL's `Image.open` parses the header lazily (`.size` and `.format` are known, the pixels are not); the
    caller may sum `.size` over a whole request before it decodes any image with `load_image`."""
    if len(data) > limits.max_bytes:
        raise TooManyBytesError(f"upload has {len(data)} bytes; the limit is {limits.max_bytes}")
    if not data:
        raise NotAnImageError("upload is empty")
    image = _open_header(data)
    _check_format_and_size(image, limits)
    return image


def load_image(image: Image.Image) -> Image.Image:
    """Decode the pixels of an image from `open_image` (truncated or corrupt data: `TruncatedImageError`)."""
    return _load_pixels(image)


def _open_header(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image header declares too many pixels: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise NotAnImageError("upload is not a recognised image") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise TruncatedImageError(f"image header is unreadable: {exc}") from exc


def _check_format_and_size(image: Image.Image, limits: InputLimits) -> None:
    if image.format not in limits.formats:
        raise UnsupportedFormatError(f"image format {image.format!r} is not one of {limits.formats}")
    width, height = image.size
    if width <= 0 or height <= 0:
        raise NotAnImageError(f"image has no pixels ({width}x{height})")
    if max(width, height) > limits.max_side:
        raise ImageTooLargeError(f"image is {width}x{height}; the longest side may be {limits.max_side}")
    if width * height > limits.max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}"
        )


def _load_pixels(image: Image.Image) -> Image.Image:
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise TruncatedImageError(f"image data is truncated or corrupt: {exc}") from exc
    return image


# --------------------------------------------------------------------- normalising
def normalise_digit_photo(image: Image.Image, config: UploadConfig = UploadConfig()) -> npt.NDArray[np.uint8]:
    """A photo of one handwritten digit -> uint8 (size, size), white digit on black, MNIST layout."""
    upright = ImageOps.exif_transpose(image)
    grey = _to_grayscale(composite_alpha(upright))
    ink = _auto_invert(grey, config)
    mask = _otsu_mask(ink, config)
    mask = _keep_main_components(mask, config.companion_fraction)
    digit = _isolate_digit(ink, mask)
    if config.deskew:
        digit = _deskew(digit, config)
    return _centre_on_canvas(digit, config)


def composite_alpha(image: Image.Image) -> Image.Image:
    """Flatten transparency over a background that contrasts with the visible strokes."""
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if not has_alpha:
        return image
    rgba = image.convert("RGBA")
    pixels = np.asarray(rgba, dtype=np.float64)
    alpha = pixels[..., 3] / 255.0
    if alpha.sum() <= 0:
        raise EmptyImageError("image is fully transparent")
    luminance = pixels[..., :3] @ np.array([0.299, 0.587, 0.114])
    visible_brightness = float((luminance * alpha).sum() / alpha.sum())
    background = (255, 255, 255, 255) if visible_brightness < 128 else (0, 0, 0, 255)
    canvas = Image.new("RGBA", rgba.size, background)
    return Image.alpha_composite(canvas, rgba).convert("RGB")


# PIL modes whose pixels are grey (data_fetch stores them with one channel when `channels` is None)
GREY_MODES: tuple[str, ...] = ("1", "L", "LA", "La", "I", "F")
# PIL modes that carry an alpha channel; palette, grey and RGB images may instead carry a tRNS entry
# (`image.info["transparency"]`: a palette index table, or the one grey value / RGB triple that is transparent)
ALPHA_MODES: tuple[str, ...] = ("RGBA", "RGBa", "LA", "La", "PA")
# The alpha rule of `decode_to_array` for kind "standard": transparent pixels are composited onto opaque black,
# i.e. each pixel becomes its colour times its opacity (what the predictor did before the rule was shared).
ALPHA_BACKGROUND = (0, 0, 0, 255)


def decode_to_array(image: Image.Image, channels: int | None, kind: str = "standard") -> npt.NDArray[np.uint8]:
    """A decoded PIL image -> the uint8 (H, W, C) array training stores and serving preprocesses. ONE rule for
    data_fetch (visionpipe/phases/data_fetch.py) and the predictor (`image_to_array` in predictor.py):

    1. EXIF orientation applied (`ImageOps.exif_transpose`), so a phone photo is upright on both sides.
    2. Transparency flattened. kind ``standard``: every transparent or half-transparent pixel is composited onto
       opaque black (`ALPHA_BACKGROUND`), whether the file stores it as an alpha channel (RGBA, LA, PA), a palette
       with transparency or a tRNS colour key; an opaque image is left untouched. kind ``digit-upload``: the
       digit rule above (`composite_alpha`: a background that contrasts with the visible strokes).
    3. Colour mode: `channels` 1 -> grey (PIL's ``L``: ITU-R 601-2 luma), 3 -> RGB; None -> the image's own
       (grey modes stay one channel, every other mode becomes RGB), which data_fetch stores.
    """
    if kind not in KINDS:
        raise PreprocessError(f"kind={kind!r} is not allowed; allowed values: {', '.join(KINDS)}")
    if channels not in (None, 1, 3):
        raise PreprocessError(f"channels={channels!r} is not allowed; allowed values: 1 (grey), 3 (RGB), None (own)")
    upright = ImageOps.exif_transpose(image)
    grey = upright.mode in GREY_MODES or upright.mode.startswith("I;")
    if kind == "digit-upload":
        flat = composite_alpha(upright)  # strokes kept visible, as the photo normalisation expects
    elif has_transparency(upright):
        flat = Image.alpha_composite(Image.new("RGBA", upright.size, ALPHA_BACKGROUND), upright.convert("RGBA"))
    else:
        flat = upright
    want = channels if channels is not None else (1 if grey else 3)
    array = np.asarray(flat.convert("L" if want == 1 else "RGB"), dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def has_transparency(image: Image.Image) -> bool:
    """Whether `image` can hold a transparent pixel: an alpha mode, or a tRNS / palette transparency entry."""
    return image.mode in ALPHA_MODES or "transparency" in image.info


def _to_grayscale(image: Image.Image) -> FloatImage:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(image.convert("F"), dtype=np.float64)
        top = float(values.max())
        scaled = values * (255.0 / top) if top > 255 else values
        return np.clip(scaled, 0, 255)
    return np.asarray(image.convert("L"), dtype=np.float64)


def _border(grey: FloatImage) -> FloatImage:
    band = max(1, min(grey.shape) // 20)
    return np.concatenate([grey[:band].ravel(), grey[-band:].ravel(), grey[:, :band].ravel(), grey[:, -band:].ravel()])


def _auto_invert(grey: FloatImage, config: UploadConfig) -> FloatImage:
    """Return an image where the ink is bright and the background dark (MNIST polarity)."""
    if float(grey.max() - grey.min()) < config.min_contrast:
        raise EmptyImageError(
            f"image has a grey-level range of {grey.max() - grey.min():.0f} (< min_contrast="
            f"{config.min_contrast:g}); no digit found"
        )
    if config.invert == "always":
        return 255.0 - grey
    if config.invert == "never":
        return grey
    threshold = otsu_threshold(grey)
    background_is_bright = float(np.median(_border(grey))) > threshold
    return 255.0 - grey if background_is_bright else grey


def otsu_threshold(grey: FloatImage) -> float:
    """Otsu's threshold on 256 grey levels: the level maximising the between-class variance."""
    histogram, _ = np.histogram(np.clip(grey, 0, 255), bins=256, range=(0.0, 256.0))
    probability = histogram.astype(np.float64) / max(1, histogram.sum())
    levels = np.arange(256, dtype=np.float64)
    weight_low = np.cumsum(probability)
    mean_low_sum = np.cumsum(probability * levels)
    total_mean = mean_low_sum[-1]
    weight_high = 1.0 - weight_low
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total_mean * weight_low - mean_low_sum) ** 2 / (weight_low * weight_high)
    between = np.nan_to_num(between, nan=-1.0, posinf=-1.0)
    return float(np.argmax(between)) + 0.5


def _otsu_mask(ink: FloatImage, config: UploadConfig) -> Mask:
    mask = ink > otsu_threshold(ink)
    if not mask.any():
        raise EmptyImageError("Otsu binarisation found no ink")
    return np.asarray(mask, dtype=np.bool_)


def _keep_main_components(mask: Mask, companion_fraction: float) -> Mask:
    """Keep the largest 8-connected component and any component at least `companion_fraction` its size."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(sizes >= companion_fraction * sizes.max()) + 1
    return np.asarray(np.isin(labels, keep), dtype=np.bool_)


def _isolate_digit(ink: FloatImage, mask: Mask) -> FloatImage:
    """Keep only the kept strokes; grey levels stretched so background is 0 and stroke cores are 255.

    The mask is grown by a few pixels so the anti-aliased stroke edges survive (MNIST digits have soft edges);
    everything outside it (noise, other marks) becomes background. The result is cropped to the grown mask.
    """
    grow = max(1, round(0.01 * max(mask.shape)))
    soft = ndimage.binary_dilation(mask, iterations=grow)
    background = float(np.median(ink[~soft])) if (~soft).any() else float(ink.min())
    core = float(np.percentile(ink[mask], 90))
    span = max(core - background, 1.0)
    stretched = np.clip((ink - background) / span, 0.0, 1.0) * 255.0
    stretched[~soft] = 0.0
    return _crop_to(stretched, soft)


def _crop_to(image: FloatImage, keep: Mask) -> FloatImage:
    rows = np.flatnonzero(keep.any(axis=1))
    cols = np.flatnonzero(keep.any(axis=0))
    return np.asarray(image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1], dtype=np.float64)


def principal_angle(digit: FloatImage) -> tuple[float, float]:
    """(lean in degrees, elongation in [0, 1]) of the intensity-weighted pixel cloud.

    The lean is the angle of the principal axis from vertical, in `scipy.ndimage.rotate`'s convention, so
    ``ndimage.rotate(digit, -lean)`` makes the axis vertical. Elongation is 1 - minor/major eigenvalue: 0 for
    a round blob (axis undefined), near 1 for a stroke.
    """
    weights = digit / max(float(digit.sum()), 1e-9)
    ys, xs = np.indices(digit.shape, dtype=np.float64)
    my, mx = float((weights * ys).sum()), float((weights * xs).sum())
    cyy = float((weights * (ys - my) ** 2).sum())
    cxx = float((weights * (xs - mx) ** 2).sum())
    cxy = float((weights * (ys - my) * (xs - mx)).sum())
    eigenvalues, eigenvectors = np.linalg.eigh(np.array([[cyy, cxy], [cxy, cxx]]))
    major = eigenvectors[:, 1]
    vy, vx = float(major[0]), float(major[1])
    if vy < 0:
        vy, vx = -vy, -vx
    lean = math.degrees(math.atan2(vx, vy))
    elongation = 1.0 - float(eigenvalues[0]) / max(float(eigenvalues[1]), 1e-12)
    return lean, elongation


def _deskew(digit: FloatImage, config: UploadConfig) -> FloatImage:
    lean, elongation = principal_angle(digit)
    gated = (
        elongation < config.deskew_min_elongation
        or abs(lean) > config.max_deskew_degrees
        or abs(lean) < config.min_deskew_degrees
    )
    if gated:
        return digit
    pad = max(digit.shape) // 4 + 2
    rotated = ndimage.rotate(np.pad(digit, pad), -lean, reshape=True, order=1, mode="constant", cval=0.0)
    rotated = np.clip(rotated, 0.0, 255.0)
    return _crop_to(rotated, rotated > 1.0)


def _centre_on_canvas(digit: FloatImage, config: UploadConfig) -> npt.NDArray[np.uint8]:
    """Scale the ink's longer side to `digit_box`, then put the centre of mass in the middle of the canvas.

    As in MNIST, the box bounds the ink (pixels at least half bright), not its anti-aliased fringe. Works on a
    canvas `oversample` times larger than the output, so the centring is sub-pixel exact, and box-filters it
    down to `size` at the end.
    """
    oversample = 4
    ink = digit >= 127.5
    if not ink.any():
        ink = digit > 0
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    extent = max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
    scale = config.digit_box * oversample / extent
    crop = _crop_to(digit, digit > 0)
    side = config.size * oversample
    height, width = crop.shape
    new_h, new_w = min(side, max(1, round(height * scale))), min(side, max(1, round(width * scale)))
    scaled = np.asarray(
        Image.fromarray(crop.astype(np.float32), mode="F").resize((new_w, new_h), Image.Resampling.BOX),
        dtype=np.float64,
    )
    canvas = np.zeros((side, side), dtype=np.float64)
    com_y, com_x = ndimage.center_of_mass(scaled)
    centre = side / 2 + (oversample - 1) / 2
    top = min(max(round(centre - com_y), 0), side - new_h)
    left = min(max(round(centre - com_x), 0), side - new_w)
    canvas[top : top + new_h, left : left + new_w] = scaled
    small = canvas.reshape(config.size, oversample, config.size, oversample).mean(axis=(1, 3))
    peak = float(small.max())
    if peak > 0:
        small = small * (255.0 / peak)
    return np.asarray(np.clip(np.rint(small), 0, 255), dtype=np.uint8)
