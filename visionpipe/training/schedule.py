"""The learning-rate schedule (one warmup formula for every phase) and the cosine ramp of EMA momenta."""

import math

import torch


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> float:
    """LR multiplier at optimizer step `step` (0-based): linear warmup, then cosine decay or constant.

    Warmup: (step + 1) / (warmup_steps + 1) for the first warmup_steps steps, so the last warmup step is still
    below the peak and the first step after it is at the peak. Cosine: from 1 down to `min_ratio` at
    `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def cosine_ramp(start: float, end: float, step: int, total_steps: int) -> float:
    """`start` at step 0 rising (or falling) along a half cosine to `end` at `total_steps` (DINO's teacher
    momentum schedule)."""
    return end - (end - start) * (math.cos(math.pi * step / total_steps) + 1) / 2
