"""visionpipe/serving/tta.py: test-time augmentation variants and probability averaging."""

from __future__ import annotations

import pytest
import torch

from visionpipe.serving.tta import (
    TTA_MODES,
    TTAError,
    average_tta,
    n_variants,
    predict_proba_tta,
    shift_image,
    tta_batch,
    warp_image,
)

FILL = (0.0 - 0.1307) / 0.3081  # MNIST background after normalisation


def images(n: int = 3, channels: int = 1, size: int = 28) -> torch.Tensor:
    x = torch.full((n, channels, size, size), FILL)
    for i in range(n):
        x[i, :, 8 + i : 20, 10:18] = 2.0 + i  # a bright block away from the border
    return x


@pytest.mark.parametrize(("mode", "variants"), [("off", 1), ("5", 5), ("17", 17)])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_and_identity_first(mode: str, variants: int, channels: int) -> None:
    x = images(channels=channels)
    batch = tta_batch(x, mode, FILL)
    assert n_variants(mode) == variants
    assert batch.shape == (3 * variants, channels, 28, 28)
    assert torch.equal(batch[:3], x)


def test_off_is_a_no_op() -> None:
    x = images()
    assert tta_batch(x, "off", FILL) is x
    probs = torch.softmax(torch.randn(3, 10), dim=1)
    assert torch.equal(average_tta(probs, 3, "off"), probs)


@pytest.mark.parametrize("mode", TTA_MODES)
def test_averaged_probabilities_sum_to_one(mode: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    x = images(n=4)
    probs = predict_proba_tta(model, x, mode, FILL)
    assert probs.shape == (4, 10)
    assert torch.allclose(probs.sum(dim=1), torch.ones(4), atol=1e-5)
    assert (probs >= 0).all()


def test_average_is_per_image_mean_over_variants() -> None:
    n, mode = 2, "5"
    probs = torch.zeros(n * 5, 3)
    probs[0::2, 0] = 1.0  # image 0 always class 0
    probs[1::2] = torch.tensor([0.0, 0.5, 0.5])  # image 1 split
    probs[3, 1], probs[3, 2] = 1.0, 0.0  # one variant of image 1 disagrees
    averaged = average_tta(probs, n, mode)
    assert torch.allclose(averaged[0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(averaged[1], torch.tensor([0.0, 0.6, 0.4]))


@pytest.mark.parametrize(("dy", "dx"), [(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, 1)])
def test_shift_variant_of_shifted_image_equals_original(dy: int, dx: int) -> None:
    x = images()
    shifted = shift_image(x, dy, dx, FILL)
    batch = tta_batch(shifted, "17", FILL)
    back = [batch[v * 3 : (v + 1) * 3] for v in range(17)]
    assert any(torch.equal(variant, x) for variant in back)


def test_shift_fills_uncovered_border() -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    down = shift_image(x, 1, 0, fill=-7.0)
    assert torch.equal(down[0, 0, 0], torch.full((4,), -7.0))
    assert torch.equal(down[0, 0, 1:], x[0, 0, :3])
    right = shift_image(x, 0, 1, fill=-7.0)
    assert torch.equal(right[0, 0, :, 0], torch.full((4,), -7.0))


def test_warp_identity_and_background() -> None:
    x = images()
    assert torch.allclose(warp_image(x, degrees=0.0, scale=1.0, fill=FILL), x, atol=1e-5)
    background = torch.full((1, 1, 28, 28), FILL)
    for degrees, scale in [(3.0, 1.0), (-1.5, 1.0), (0.0, 0.95), (0.0, 1.05)]:
        assert torch.allclose(warp_image(background, degrees, scale, FILL), background, atol=1e-5)


def test_scale_changes_size_of_content() -> None:
    x = images(n=1)
    mass = (x - FILL).sum()
    for scale in (0.95, 1.05):
        ratio = (warp_image(x, 0.0, scale, FILL) - FILL).sum() / mass
        assert ratio == pytest.approx(scale**2, rel=0.02)


def test_17_variants_are_distinct() -> None:
    batch = tta_batch(images(n=1), "17", FILL)
    flat = batch.flatten(1)
    distances = torch.cdist(flat, flat)
    off_diagonal = distances + torch.eye(17) * 1e9
    assert off_diagonal.min() > 1e-3


@pytest.mark.parametrize("mode", ["3", "on", ""])
def test_unknown_mode_is_refused(mode: str) -> None:
    with pytest.raises(TTAError, match="not one of"):
        tta_batch(images(), mode, FILL)


def test_wrong_shapes_are_refused() -> None:
    with pytest.raises(TTAError):
        tta_batch(torch.zeros(28, 28), "5", FILL)
    with pytest.raises(TTAError):
        average_tta(torch.zeros(7, 10), 2, "5")
