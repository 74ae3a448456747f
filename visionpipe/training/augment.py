"""Training-time augmentation of preprocessed tensors (N, C, H, W): random affine (one affine-grid
implementation for every phase), elastic warp, flip, random erasing, Mixup / CutMix, and the random resized
crops of self-supervised views."""

import math

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor

from visionpipe.specs import PreprocessSpec
from visionpipe.training.recipes import AugmentSpec


def augment(x: Tensor, spec: AugmentSpec, rng: np.random.Generator, fill: Tensor) -> Tensor:
    """Per-image random affine and elastic warp, horizontal flip and random erasing (recipe augmentation)."""
    n = x.shape[0]
    if spec.uses_affine or spec.elastic_alpha > 0:
        grid = _recipe_affine_grid(x.shape, spec, rng)
        if spec.elastic_alpha > 0:
            grid = grid + elastic_offsets(x.shape, spec.elastic_alpha, spec.elastic_sigma, rng)
        x = resample(x, grid.to(x), fill)
    if spec.hflip:
        flip = torch.from_numpy(rng.random(n) < 0.5).to(x.device).view(n, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
    if spec.erasing_prob > 0:
        x = random_erasing(x, spec.erasing_prob, spec.erasing_area, rng)
    return x


def mix(x: Tensor, targets: Tensor, spec: AugmentSpec, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """Mixup or CutMix of a batch with a shuffled copy of itself (soft targets mixed in proportion)."""
    if not spec.uses_mixing or x.shape[0] < 2 or rng.random() >= spec.mix_prob:
        return x, targets
    use_cutmix = spec.cutmix_alpha > 0 and (spec.mixup_alpha <= 0 or rng.random() < 0.5)
    alpha = spec.cutmix_alpha if use_cutmix else spec.mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(x.shape[0])).to(x.device)
    if not use_cutmix:
        return lam * x + (1.0 - lam) * x[perm], lam * targets + (1.0 - lam) * targets[perm]
    h, w = x.shape[-2:]
    cut_h, cut_w = round(h * math.sqrt(1.0 - lam)), round(w * math.sqrt(1.0 - lam))
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h - cut_h // 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w - cut_w // 2, w)
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    return out, lam * targets + (1.0 - lam) * targets[perm]


def affine_grid(shape: torch.Size, angle: Tensor, sx: Tensor, sy: Tensor, tx: Tensor, ty: Tensor) -> Tensor:
    """Sampling grid (N, H, W, 2), float32, of a per-image affine map in normalised coordinates: output pixel p
    samples the input at R(angle) diag(sx, sy) p + (tx, ty). sx < 1 zooms in; a negative sx flips
    horizontally. Computed in the dtype of the arguments."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [torch.stack([sx * cos, -sy * sin, tx], dim=1), torch.stack([sx * sin, sy * cos, ty], dim=1)], dim=1
    )
    return F.affine_grid(theta.float(), list(shape), align_corners=False)


def random_resized_crop(
    x: Tensor,
    scale: tuple[float, float],
    rotation_degrees: float,
    flip_prob: float,
    gen: torch.Generator,
) -> Tensor:
    """Random resized crop (area fraction in `scale`, aspect 3/4..4/3) + rotation (+ flip) in one batched
    resample (borders repeat the edge), then random contrast (0.7..1.3) and brightness (+-0.3)."""
    n = x.shape[0]
    area = torch.empty(n).uniform_(scale[0], scale[1], generator=gen)
    log_ratio = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
    sx = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    sy = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    tx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sx)
    ty = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sy)
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(rotation_degrees)
    flip = torch.where(torch.rand(n, generator=gen) < flip_prob, -1.0, 1.0)
    grid = affine_grid(x.shape, angle, sx * flip, sy, tx, ty).to(x.dtype)
    out = F.grid_sample(x, grid.to(x.device), mode="bilinear", padding_mode="border", align_corners=False)
    contrast = torch.empty(n, 1, 1, 1).uniform_(0.7, 1.3, generator=gen).to(x.device)
    brightness = torch.empty(n, 1, 1, 1).uniform_(-0.3, 0.3, generator=gen).to(x.device)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return (out - mean) * contrast + mean + brightness


def _recipe_affine_grid(shape: torch.Size, spec: AugmentSpec, rng: np.random.Generator) -> Tensor:
    """The recipe's random affine per image (identity for the images not drawn, and for all of them when only
    the elastic warp is on)."""
    n = shape[0]
    prob = spec.affine_prob if spec.uses_affine else 0
    active = rng.random(n) < prob
    angle = np.deg2rad(rng.uniform(-spec.rotation_deg, spec.rotation_deg, n)) * active
    inverse_zoom = 1.0 / np.where(active, rng.uniform(spec.scale[0], spec.scale[1], n), 1.0)
    t = rng.uniform(-spec.translate, spec.translate, (n, 2)) * 2.0 * active[:, None]  # normalised coords span 2
    zoom = torch.from_numpy(inverse_zoom)
    return affine_grid(shape, torch.from_numpy(angle), zoom, zoom, torch.from_numpy(t[:, 0]), torch.from_numpy(t[:, 1]))


def elastic_offsets(shape: torch.Size, alpha: float, sigma: float, rng: np.random.Generator) -> Tensor:
    """Elastic displacement (N, H, W, 2) in normalised grid units: per image and axis, uniform noise in [-1, 1]
    smoothed by a Gaussian of `sigma` pixels (separable, zero-padded) and scaled to `alpha` pixels."""
    n, _, h, w = shape
    noise = torch.from_numpy(rng.uniform(-1.0, 1.0, (n * 2, 1, h, w))).float()
    radius = min(math.ceil(3 * sigma), max(h, w))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    smooth = F.conv2d(noise, kernel.view(1, 1, 1, -1), padding=(0, radius))
    smooth = F.conv2d(smooth, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    pixels = smooth.view(n, 2, h, w).permute(0, 2, 3, 1) * alpha  # (N, H, W, [dx, dy]) in pixels
    return pixels * torch.tensor([2.0 / w, 2.0 / h])


def resample(x: Tensor, grid: Tensor, fill: Tensor) -> Tensor:
    """Bilinear resampling of x at grid; what falls outside the image is filled with `fill` (black)."""
    background = fill.view(1, -1, 1, 1)
    return F.grid_sample(x - background, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + (
        background
    )


def random_erasing(x: Tensor, prob: float, area: tuple[float, float], rng: np.random.Generator) -> Tensor:
    """With probability `prob` per image, a box of `area` (fraction range, aspect 0.3..3.3) set to 0."""
    n, _, h, w = x.shape
    active = rng.random(n) < prob
    frac = rng.uniform(area[0], area[1], n)
    aspect = np.exp(rng.uniform(math.log(0.3), math.log(3.3), n))
    eh = np.clip(np.round(np.sqrt(frac * h * w * aspect)), 1, h).astype(np.int64)
    ew = np.clip(np.round(np.sqrt(frac * h * w / aspect)), 1, w).astype(np.int64)
    top = (rng.random(n) * (h - eh + 1)).astype(np.int64)
    left = (rng.random(n) * (w - ew + 1)).astype(np.int64)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)

    def col(values: npt.NDArray[np.int64]) -> Tensor:
        return torch.from_numpy(values).to(x.device).view(n, 1, 1)

    box = (rows >= col(top)) & (rows < col(top + eh)) & (cols >= col(left)) & (cols < col(left + ew))
    box = box & torch.from_numpy(active).to(x.device).view(n, 1, 1)
    return x.masked_fill(box.unsqueeze(1), 0.0)


def black_level(preprocess: PreprocessSpec) -> Tensor:
    """The normalised value of a black pixel per channel (affine borders are filled with it)."""
    return torch.tensor([(0.0 - m) / s for m, s in zip(preprocess.mean, preprocess.std, strict=True)])
