"""Exponential moving averages of a model (supervised EMA weights, the DINO teacher)."""

import copy
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def frozen_copy(module: M) -> M:
    """A deep copy of `module` with every parameter frozen (the EMA / teacher starts as the model)."""
    twin = copy.deepcopy(module)
    twin.requires_grad_(False)
    return twin


def warmup_decay(decay: float, updates: int) -> float:
    """The EMA decay after `updates` updates: min(decay, (1 + updates) / (10 + updates)), so early averages
    follow the model closely."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


def ema_update(ema: nn.Module, model: nn.Module, decay: float, average_buffers: bool = True) -> None:
    """ema = decay * ema + (1 - decay) * model for the floating-point tensors of the state dict; the others
    (and, with average_buffers=False, every buffer) are copied from `model`."""
    buffers = {name for name, _ in ema.named_buffers()}
    live = model.state_dict()
    with torch.no_grad():
        for name, value in ema.state_dict().items():
            if value.is_floating_point() and (average_buffers or name not in buffers):
                value.lerp_(live[name], 1.0 - decay)
            else:
                value.copy_(live[name])
