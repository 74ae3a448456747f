"""visionpipe/serving/upload.py: safe decoding with input limits, and MNIST-style normalisation of digit photos."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image, ImageDraw, ImageFilter

from visionpipe.serving.upload import (
    EmptyImageError,
    ImageTooLargeError,
    InputError,
    InputLimits,
    NotAnImageError,
    TooManyBytesError,
    TruncatedImageError,
    UnsupportedFormatError,
    UploadConfig,
    decode_image,
    normalise_digit_photo,
    otsu_threshold,
    principal_angle,
)

MNIST_DIR = Path("/work/shared/datasets/mnist-5k-train")

# Digits drawn as pen strokes on a 240x240 sheet: polylines and ellipses (x, y in sheet pixels).
STROKES: dict[str, list[list[tuple[float, float]]]] = {
    "1": [[(120, 50), (120, 190)]],
    "4": [[(140, 190), (140, 50), (80, 140), (165, 140)]],
    "7": [[(80, 55), (160, 55), (110, 190)]],
}
ELLIPSES: dict[str, list[tuple[float, float, float, float]]] = {"0": [(90, 50, 150, 190)]}
DIGITS = ("0", "1", "4", "7")


def draw_digit(digit: str, *, ink: int = 30, paper: int = 225, width: int = 14, noise: float = 6.0) -> Image.Image:
    """A grey 'photo' of a digit: dark ink on light paper, slightly blurred, with sensor noise."""
    sheet = Image.new("L", (240, 240), paper)
    pen = ImageDraw.Draw(sheet)
    for line in STROKES.get(digit, []):
        pen.line(line, fill=ink, width=width, joint="curve")
    for box in ELLIPSES.get(digit, []):
        pen.ellipse(box, outline=ink, width=width)
    blurred = np.asarray(sheet.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float64)
    noisy = blurred + np.random.default_rng(len(digit) + ord(digit)).normal(0.0, noise, blurred.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), mode="L")


def iou(a: npt.NDArray[np.uint8], b: npt.NDArray[np.uint8], level: int = 50) -> float:
    ma, mb = a >= level, b >= level
    return float((ma & mb).sum() / max(1, (ma | mb).sum()))


def correlation(a: npt.NDArray[np.uint8], b: npt.NDArray[np.uint8]) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def to_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------- normalisation
@pytest.mark.parametrize("digit", DIGITS)
def test_output_is_mnist_layout(digit: str) -> None:
    out = normalise_digit_photo(draw_digit(digit))
    assert out.shape == (28, 28) and out.dtype == np.uint8
    assert out.max() == 255
    core = out >= 128
    assert not (core[0].any() or core[-1].any() or core[:, 0].any() or core[:, -1].any()), "ink off the border"
    ys, xs = np.nonzero(out >= 128)
    assert max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 <= 21, "ink fits the 20x20 box"
    weights = out.astype(np.float64)
    com = (np.indices(out.shape) * weights).sum(axis=(1, 2)) / weights.sum()
    assert np.allclose(com, 14.0, atol=0.6), com


def _dark_background(image: Image.Image) -> Image.Image:
    return Image.fromarray(255 - np.asarray(image), mode="L")


def _rgba_on_transparent(image: Image.Image) -> Image.Image:
    ink = 255 - np.asarray(image, dtype=np.uint8)  # alpha = how much ink
    rgba = np.zeros((*ink.shape, 4), dtype=np.uint8)
    rgba[..., :3] = (20, 40, 200)  # blue ink
    rgba[..., 3] = ink
    return Image.fromarray(rgba, mode="RGBA")


def _rgb_colour_photo(image: Image.Image) -> Image.Image:
    grey = np.asarray(image, dtype=np.float64) / 255.0
    paper, ink = np.array([240.0, 225.0, 190.0]), np.array([30.0, 30.0, 120.0])
    rgb = grey[..., None] * paper + (1 - grey[..., None]) * ink
    return Image.fromarray(rgb.astype(np.uint8), mode="RGB")


def _exif_rotated_jpeg(image: Image.Image) -> Image.Image:
    """Stored sideways with EXIF orientation 6 (viewer rotates 90 degrees clockwise), as phones do."""
    stored = image.convert("RGB").transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=92, exif=exif.tobytes())
    return decode_image(buffer.getvalue(), InputLimits())


def _with_speck(image: Image.Image) -> Image.Image:
    copy = image.copy()
    ImageDraw.Draw(copy).ellipse((10, 10, 18, 18), fill=30)
    return copy


def _larger_and_offset(image: Image.Image) -> Image.Image:
    sheet = Image.new("L", (640, 480), 225)
    sheet.paste(image.resize((360, 360), Image.Resampling.BICUBIC), (40, 100))
    return sheet


VARIANTS = {
    "dark_background": _dark_background,
    "rgba_alpha": _rgba_on_transparent,
    "colour_photo": _rgb_colour_photo,
    "exif_rotated_jpeg": _exif_rotated_jpeg,
    "speck_of_dirt": _with_speck,
    "larger_and_offset": _larger_and_offset,
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("digit", DIGITS)
def test_photo_variants_normalise_alike(digit: str, variant: str) -> None:
    photo = draw_digit(digit)
    reference = normalise_digit_photo(photo)
    changed = normalise_digit_photo(VARIANTS[variant](photo))
    assert iou(reference, changed) >= 0.9, f"{variant}: IoU {iou(reference, changed):.2f}"


@pytest.mark.parametrize("degrees", [-8.0, -4.0, 4.0, 8.0])
@pytest.mark.parametrize("digit", ["0", "1"])
def test_small_rotations_are_deskewed(digit: str, degrees: float) -> None:
    photo = draw_digit(digit)
    tilted = photo.rotate(degrees, resample=Image.Resampling.BICUBIC, fillcolor=225)
    reference = normalise_digit_photo(photo)
    straightened = normalise_digit_photo(tilted)
    without_deskew = normalise_digit_photo(tilted, UploadConfig(deskew=False))
    assert iou(reference, straightened) >= 0.75
    assert correlation(reference, straightened) >= 0.95
    assert correlation(reference, straightened) > correlation(reference, without_deskew)


def test_large_lean_is_not_deskewed() -> None:
    """This 7 leans by 4 degrees by design; tilted 8 more, its lean exceeds 10 degrees and the gate holds."""
    photo = draw_digit("7").rotate(-8.0, resample=Image.Resampling.BICUBIC, fillcolor=225)
    assert principal_angle(np.clip(200.0 - np.asarray(photo, dtype=np.float64), 0, None))[0] < -10
    assert normalise_digit_photo(photo).tobytes() == normalise_digit_photo(photo, UploadConfig(deskew=False)).tobytes()


def test_principal_angle_measures_lean() -> None:
    bar = np.zeros((81, 81))
    bar[10:71, 38:43] = 255.0
    from scipy import ndimage

    for degrees in (-9.0, -3.0, 0.0, 5.0):
        lean, elongation = principal_angle(ndimage.rotate(bar, degrees, reshape=False, order=1))
        assert lean == pytest.approx(degrees, abs=0.5)
        assert elongation > 0.9


def test_otsu_threshold_splits_two_levels() -> None:
    grey = np.full((20, 20), 40.0)
    grey[5:10] = 200.0
    assert 40 < otsu_threshold(grey) < 200


def test_blank_image_is_refused() -> None:
    with pytest.raises(EmptyImageError) as info:
        normalise_digit_photo(Image.new("L", (50, 50), 200))
    assert info.value.code == "empty_image"


def _mnist_files(step: int) -> list[Path]:
    return sorted(MNIST_DIR.glob("*/*.png"))[::step]


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason="MNIST sample not available")
def test_mnist_passes_through_almost_unchanged() -> None:
    correlations = []
    for path in _mnist_files(step=25):
        with Image.open(path) as image:
            original = np.asarray(image, dtype=np.float64)
            normalised = normalise_digit_photo(image).astype(np.float64)
        correlations.append(np.corrcoef(original.ravel(), normalised.ravel())[0, 1])
    assert len(correlations) >= 100
    assert np.median(correlations) >= 0.93
    assert np.percentile(correlations, 10) >= 0.8


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason="MNIST sample not available")
def test_mnist_upscaled_photo_matches_mnist() -> None:
    """An MNIST digit printed large on paper (dark on light) comes back close to the original."""
    for path in _mnist_files(step=500):
        with Image.open(path) as image:
            original = np.asarray(image, dtype=np.uint8)
        photo = Image.fromarray(255 - original).resize((280, 280), Image.Resampling.BICUBIC)
        again = normalise_digit_photo(photo)
        corr = np.corrcoef(original.ravel().astype(float), again.ravel().astype(float))[0, 1]
        assert corr >= 0.8, path


# --------------------------------------------------------------------- decoding
def test_decode_png_roundtrip() -> None:
    image = decode_image(to_png(draw_digit("4")), InputLimits())
    assert image.size == (240, 240)
    assert np.array_equal(np.asarray(image), np.asarray(draw_digit("4")))


def _bomb_png() -> bytes:
    """A 1-bit 20000x20000 PNG: a few kB on disk, 400 megapixels once decoded."""
    return to_png(Image.new("1", (20000, 20000), 0))


CASES: list[tuple[str, bytes, InputLimits, type[InputError], str]] = [
    ("text", b"hello, I am not an image", InputLimits(), NotAnImageError, "not_an_image"),
    ("empty", b"", InputLimits(), NotAnImageError, "not_an_image"),
    ("truncated", to_png(draw_digit("1"))[:600], InputLimits(), TruncatedImageError, "truncated_image"),
    (
        "too_many_bytes",
        to_png(draw_digit("1")),
        InputLimits(max_bytes=100),
        TooManyBytesError,
        "too_many_bytes",
    ),
    (
        "too_wide",
        to_png(Image.new("L", (300, 10))),
        InputLimits(max_side=256),
        ImageTooLargeError,
        "image_too_large",
    ),
    (
        "too_many_pixels",
        to_png(Image.new("L", (200, 200))),
        InputLimits(max_pixels=10_000),
        ImageTooLargeError,
        "image_too_large",
    ),
    ("bomb", _bomb_png(), InputLimits(max_side=30000), ImageTooLargeError, "image_too_large"),
    (
        "format_not_allowed",
        to_png(Image.new("L", (20, 20))),
        InputLimits(formats=("JPEG",)),
        UnsupportedFormatError,
        "unsupported_format",
    ),
]


@pytest.mark.parametrize(("name", "data", "limits", "error", "code"), CASES, ids=[c[0] for c in CASES])
def test_decode_refuses_bad_uploads(
    name: str, data: bytes, limits: InputLimits, error: type[InputError], code: str
) -> None:
    with pytest.raises(error) as info:
        decode_image(data, limits)
    assert info.value.code == code
    assert isinstance(info.value, ValueError)


def test_bomb_is_refused_before_decoding() -> None:
    """The header check fires before PIL allocates the 400-megapixel raster."""
    data = _bomb_png()
    assert len(data) < 200_000
    with pytest.raises(ImageTooLargeError, match="pixels"):
        decode_image(data, InputLimits(max_side=30000))


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_bytes", 0), ("max_side", -1), ("max_pixels", 0), ("formats", ("PNG", "XCF")), ("formats", ())],
)
def test_input_limits_validation(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        InputLimits(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("size", 4),
        ("digit_box", 40),
        ("invert", "maybe"),
        ("companion_fraction", 0.0),
        ("max_deskew_degrees", 90),
    ],
)
def test_upload_config_validation(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field.split("_")[0]):
        UploadConfig(**{field: value})  # type: ignore[arg-type]
