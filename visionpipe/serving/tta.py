"""Test-time augmentation: slightly moved copies of each image, one forward pass, averaged probabilities.

Modes:
- ``off``: the image itself (1 variant).
- ``5``: identity and the four 1-pixel shifts (up, down, left, right).
- ``17``: identity, the eight 1-pixel shifts (including diagonals), rotations by -3, -1.5, +1.5 and +3
  degrees, and scales 0.95, 0.975, 1.025 and 1.05 (the issue's list adds up to 15; the two middle
  scales make 17).

Layout: `tta_batch` stacks variants variant-major, ``[variant 0 of all N images, variant 1 of all N, ...]``,
so the first N rows are the untouched input. Pixels moved in from outside the image take ``fill``: pass the
*normalised* background value (e.g. ``(0 - mean) / std`` for MNIST), so shifted-in borders look like
background. Shifts are exact integer moves; rotations and scales use `affine_grid` / `grid_sample` (bilinear).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from visionpipe.specs.preprocess import TTA_MODES as TTA_MODES  # defined with the specs, torch-free

Shift = tuple[int, int]  # (dy, dx) in pixels: +dy moves content down, +dx moves it right
FOUR_SHIFTS: tuple[Shift, ...] = ((-1, 0), (1, 0), (0, -1), (0, 1))
EIGHT_SHIFTS: tuple[Shift, ...] = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))
ROTATIONS_DEGREES = (-3.0, -1.5, 1.5, 3.0)
SCALES = (0.95, 0.975, 1.025, 1.05)


class TTAError(ValueError):
    """An unknown TTA mode, or tensors whose shapes do not fit it."""


def n_variants(mode: str) -> int:
    """How many copies of each image the mode makes (1, 5 or 17)."""
    _check_mode(mode)
    return {
        "off": 1,
        "5": 1 + len(FOUR_SHIFTS),
        "17": 1 + len(EIGHT_SHIFTS) + len(ROTATIONS_DEGREES) + len(SCALES),
    }[mode]


def tta_batch(x: torch.Tensor, mode: str, fill: float) -> torch.Tensor:
    """(N, C, H, W) -> (N * V, C, H, W), variant-major, identity first."""
    _check_mode(mode)
    if x.ndim != 4:
        raise TTAError(f"tta_batch expects (N, C, H, W); got shape {tuple(x.shape)}")
    if mode == "off":
        return x
    variants = [x]
    shifts = FOUR_SHIFTS if mode == "5" else EIGHT_SHIFTS
    variants.extend(shift_image(x, dy, dx, fill) for dy, dx in shifts)
    if mode == "17":
        variants.extend(warp_image(x, degrees=d, scale=1.0, fill=fill) for d in ROTATIONS_DEGREES)
        variants.extend(warp_image(x, degrees=0.0, scale=s, fill=fill) for s in SCALES)
    return torch.cat(variants, dim=0)


def average_tta(probs: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """(N * V, K) probabilities in `tta_batch`'s layout -> (N, K) mean over the V variants."""
    variants = n_variants(mode)
    if probs.ndim != 2 or probs.shape[0] != n * variants:
        raise TTAError(
            f"average_tta expects ({n} * {variants}, K) probabilities for mode {mode!r}; got {tuple(probs.shape)}"
        )
    return probs.reshape(variants, n, probs.shape[1]).mean(dim=0)


def predict_proba_tta(
    logits_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, mode: str, fill: float
) -> torch.Tensor:
    """Softmax probabilities (N, K) averaged over the mode's variants, in one forward pass."""
    with torch.no_grad():
        logits = logits_fn(tta_batch(x, mode, fill))
    return average_tta(torch.softmax(logits.float(), dim=1), x.shape[0], mode)


def shift_image(x: torch.Tensor, dy: int, dx: int, fill: float) -> torch.Tensor:
    """Move the content by whole pixels (+dy down, +dx right); uncovered pixels take `fill`."""
    height, width = x.shape[-2:]
    if abs(dy) >= height or abs(dx) >= width:
        return torch.full_like(x, fill)
    out = torch.full_like(x, fill)
    src_rows = slice(max(0, -dy), height - max(0, dy))
    dst_rows = slice(max(0, dy), height - max(0, -dy))
    src_cols = slice(max(0, -dx), width - max(0, dx))
    dst_cols = slice(max(0, dx), width - max(0, -dx))
    out[..., dst_rows, dst_cols] = x[..., src_rows, src_cols]
    return out


def warp_image(x: torch.Tensor, degrees: float, scale: float, fill: float) -> torch.Tensor:
    """Rotate by `degrees` and scale (>1 enlarges) about the centre; pixels from outside take `fill`."""
    theta_rad = math.radians(degrees)
    cos, sin = math.cos(theta_rad) / scale, math.sin(theta_rad) / scale
    # affine_grid maps output coordinates to input coordinates, hence the inverse transform.
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    moved = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return moved + fill


def _check_mode(mode: str) -> None:
    if mode not in TTA_MODES:
        raise TTAError(f"tta mode {mode!r} is not one of {', '.join(TTA_MODES)}")
