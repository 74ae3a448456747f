"""One decoding rule for training and serving (visionpipe/serving/upload.py `decode_to_array`): data_fetch's loader
and the predictor's path give the same array for transparent images (RGBA, LA, palette and colour-key
transparency, composited onto black), the digit rule for digit-upload, and exactly the old arrays for opaque
images, so a bundle trained before the rule was shared is served as it was."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image, ImageOps

from visionpipe.phases.data_fetch import SizePlan, read_source
from visionpipe.serving.predictor import image_to_array
from visionpipe.serving.preprocessing import decode_to_array as reexported
from visionpipe.serving.upload import InputLimits, composite_alpha, decode_to_array, load_image, open_image
from visionpipe.specs import PreprocessSpec

UInt8 = npt.NDArray[np.uint8]
RGB_SPEC = PreprocessSpec(channels=3, size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
GREY_SPEC = PreprocessSpec(channels=1, size=28)  # the digits bundles' spec (no views: every earlier bundle)
DIGIT_SPEC = PreprocessSpec(kind="digit-upload", channels=1, size=28, mean=(0.1307,), std=(0.3081,))


def _encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def _alpha(h: int = 12, w: int = 10) -> UInt8:
    """Alpha with fully transparent, half-transparent and opaque pixels."""
    a = np.full((h, w), 255, np.uint8)
    a[:4] = 0
    a[4:8] = np.linspace(1, 254, w).astype(np.uint8)
    return a


def transparent_images() -> dict[str, tuple[bytes, int]]:
    """name -> (PNG bytes, the channels data_fetch stores it with)."""
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (12, 10), dtype=np.uint8)
    rgba = Image.fromarray(np.dstack([colour, _alpha()]), mode="RGBA")
    la = Image.fromarray(np.dstack([grey, _alpha()]), mode="LA")
    palette = rgba.convert("RGB").quantize(16)
    indices = np.asarray(palette)
    transparency = bytes(0 if i == int(indices[0, 0]) else 255 for i in range(16))  # tRNS alpha per index
    key = tuple(int(v) for v in colour[0, 0])
    return {
        "rgba.png": (_encode(rgba), 3),
        "la.png": (_encode(la), 1),
        "palette.png": (_encode(palette, transparency=transparency), 3),
        "rgb-colour-key.png": (_encode(Image.fromarray(colour), transparency=key), 3),
        "grey-key.png": (_encode(Image.fromarray(grey), transparency=int(grey[0, 0])), 1),
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("alpha")
    (root / "a").mkdir()
    for name, (data, _) in transparent_images().items():
        (root / "a" / name).write_bytes(data)
    return root


def served(data: bytes, spec: PreprocessSpec) -> UInt8:
    """The predictor's path for one upload: header check, decode, `image_to_array`."""
    return image_to_array(load_image(open_image(data, InputLimits())), spec)


def fetched(folder: Path, kind: str = "standard") -> dict[str, UInt8]:
    items, bad, _ = read_source(str(folder), SizePlan(kind=kind))
    assert not bad, bad
    return {it.item_id.split("/")[1]: it.image for it in items}


def test_training_and_serving_decode_transparency_alike(folder: Path) -> None:
    stored = fetched(folder)
    for name, (data, channels) in transparent_images().items():
        spec = RGB_SPEC if channels == 3 else GREY_SPEC
        assert stored[name].shape[2] == channels, name
        np.testing.assert_array_equal(stored[name], served(data, spec), err_msg=name)


@pytest.mark.parametrize("name", ["rgba.png", "la.png"])
def test_transparent_pixels_are_composited_onto_black(name: str) -> None:
    """Each pixel becomes its colour times its opacity (not its hidden colour, as convert() alone gives)."""
    data, _ = transparent_images()[name]
    with Image.open(io.BytesIO(data)) as img:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float64)
        hidden = np.asarray(img.convert("RGB"))
    expected = rgba[..., :3] * rgba[..., 3:] / 255.0
    got = decode_to_array(Image.open(io.BytesIO(data)), 3)
    assert np.abs(got.astype(np.float64) - expected).max() <= 1.0
    assert np.all(got[:4] == 0)  # the fully transparent rows
    assert not np.array_equal(got, hidden)


def test_palette_transparency_is_honoured() -> None:
    data, _ = transparent_images()["palette.png"]
    with Image.open(io.BytesIO(data)) as img:
        alpha = np.asarray(img.convert("RGBA"))[..., 3]
    got = decode_to_array(Image.open(io.BytesIO(data)), 3)
    assert alpha.min() == 0 and np.all(got[alpha == 0] == 0)
    assert np.any(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[alpha == 0] > 0)


def test_digit_uploads_keep_their_own_rule_on_both_sides(tmp_path: Path) -> None:
    """Dark strokes on a transparent background: the digit rule puts them on white (composite_alpha), both in
    data_fetch (with a digit-upload recipe's kind) and in the predictor; black would hide them."""
    a = np.zeros((28, 28), np.uint8)
    a[6:22, 12:16] = 255  # a "1" of dark ink, the rest transparent
    strokes = Image.fromarray(np.dstack([np.full((28, 28, 3), 20, np.uint8), a]), mode="RGBA")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.png").write_bytes(_encode(strokes))
    stored = fetched(tmp_path, kind="digit-upload")["one.png"]  # RGBA is a colour mode: stored as RGB
    np.testing.assert_array_equal(stored, np.asarray(composite_alpha(strokes)))
    as_grey = np.asarray(Image.fromarray(stored).convert("L"))[..., None]  # what the grey model input sees
    np.testing.assert_array_equal(as_grey, served(_encode(strokes), DIGIT_SPEC))
    assert stored[0, 0, 0] == 255 and stored[10, 13, 0] == 20
    assert fetched(tmp_path)["one.png"][0, 0, 0] == 0  # kind standard: onto black


def test_preprocessing_reexports_the_one_function() -> None:
    assert reexported is decode_to_array


# ------------------------------------------------------------------------- opaque images: nothing changed


def legacy_image_to_array(image: Image.Image, spec: PreprocessSpec) -> UInt8:
    """predictor.py's `image_to_array` before the rule was shared (verbatim), the reference for opaque images."""
    upright = ImageOps.exif_transpose(image)
    if spec.kind == "digit-upload":
        upright = composite_alpha(upright)
    elif upright.mode in ("RGBA", "LA", "P", "PA"):
        upright = Image.alpha_composite(Image.new("RGBA", upright.size, (0, 0, 0, 255)), upright.convert("RGBA"))
    array = np.asarray(upright.convert("L" if spec.channels == 1 else "RGB"), dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def legacy_fetch_decode(image: Image.Image) -> UInt8:
    """data_fetch's `_decode` before (verbatim): no EXIF orientation, alpha dropped."""
    mode = "L" if image.mode in ("1", "L", "I", "I;16", "F") or image.mode.startswith("I;") else "RGB"
    if image.mode == "LA":
        mode = "L"
    arr = np.asarray(image.convert(mode), dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def opaque_images() -> dict[str, bytes]:
    rng = np.random.default_rng(3)
    colour = rng.integers(0, 256, (14, 9, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (14, 9), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    return {
        "rgb.png": _encode(Image.fromarray(colour)),
        "grey.png": _encode(Image.fromarray(grey)),
        "palette.png": _encode(Image.fromarray(colour).quantize(32)),
        "opaque-rgba.png": _encode(Image.fromarray(np.dstack([colour, np.full((14, 9), 255, np.uint8)]))),
        "grey16.png": _encode(Image.fromarray(grey.astype(np.uint16) * 3)),
        "photo.jpg": _encode(Image.fromarray(colour), "JPEG", quality=90),
        "rotated.jpg": _encode(Image.fromarray(colour), "JPEG", quality=90, exif=exif),
    }


@pytest.mark.parametrize("spec", [GREY_SPEC, RGB_SPEC, DIGIT_SPEC], ids=["grey", "rgb", "digit-upload"])
def test_an_old_bundles_spec_serves_opaque_images_as_before(spec: PreprocessSpec) -> None:
    old = PreprocessSpec.from_dict(spec.to_dict())  # as read back from an earlier bundle's preprocess.json
    for name, data in opaque_images().items():
        np.testing.assert_array_equal(
            served(data, old), legacy_image_to_array(Image.open(io.BytesIO(data)), old), err_msg=name
        )


def test_data_fetch_stores_opaque_upright_images_as_before(tmp_path: Path) -> None:
    """Only EXIF-rotated photos change in a Dataset: they are now stored upright, as the predictor sees them."""
    (tmp_path / "a").mkdir()
    for name, data in opaque_images().items():
        (tmp_path / "a" / name).write_bytes(data)
    stored = fetched(tmp_path)
    for name, data in opaque_images().items():
        before = legacy_fetch_decode(Image.open(io.BytesIO(data)))
        if name == "rotated.jpg":
            assert before.shape[:2] == (14, 9) and stored[name].shape[:2] == (9, 14)
            np.testing.assert_array_equal(stored[name], served(data, RGB_SPEC))
        else:
            np.testing.assert_array_equal(stored[name], before, err_msg=name)
