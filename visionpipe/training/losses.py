"""Classification losses against soft targets, with per-class weights."""

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor

from visionpipe.training.errors import TrainError
from visionpipe.training.recipes import LossSpec


def weighted_loss(logits: Tensor, targets: Tensor, weights: Tensor, spec: LossSpec) -> Tensor:
    """Cross-entropy (focal when spec.name == 'focal') against soft targets, with per-class weights.

    loss = sum_i sum_k w_k t_ik (1 - p_ik)^gamma (-log p_ik) / sum_i sum_k w_k t_ik; with one-hot targets,
    unit weights and gamma = 0 this is the usual mean cross-entropy.
    """
    gamma = spec.focal_gamma if spec.name == "focal" else 0.0
    logp = F.log_softmax(logits, dim=1)
    weighted = targets * weights.view(1, -1)
    per = -logp if gamma == 0 else -logp * (1.0 - logp.exp()).clamp_min(0.0).pow(gamma)
    return (weighted * per).sum() / weighted.sum().clamp_min(1e-12)


def soft_targets(y: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """One-hot targets, label-smoothed by `smoothing`."""
    onehot = F.one_hot(y, num_classes).float()
    return onehot * (1.0 - smoothing) + smoothing / num_classes if smoothing > 0 else onehot


def class_weights(spec: LossSpec, labels: npt.NDArray[np.int64], num_classes: int) -> Tensor:
    """Per-class loss weights: ones, inverse train frequency (mean 1), or the recipe's explicit list."""
    w = spec.class_weights
    if isinstance(w, tuple):
        if len(w) != num_classes:
            raise TrainError(f"loss.class_weights has {len(w)} values; this task has {num_classes} classes")
        return torch.tensor(w, dtype=torch.float32)
    if w == "balanced":
        counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
        inv = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
        return torch.tensor(inv / inv[counts > 0].mean(), dtype=torch.float32)
    return torch.ones(num_classes, dtype=torch.float32)
