"""A recipe resolved against a Dataset: the full `PreprocessSpec` and `ArchSpec`, torch-free.

supervised_train, domain_pretrain's spec step (visionpipe/phases/model_spec.py) and the benches all call these,
so every phase builds the same model from the same recipe.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from visionpipe.specs.arch import ArchSpec
from visionpipe.specs.checks import SpecError
from visionpipe.specs.preprocess import PreprocessSpec, ViewsChoice

if TYPE_CHECKING:  # recipes import the specs; a runtime import here would be circular
    from visionpipe.training.recipes import Recipe


class ResolveError(SpecError):
    """A recipe does not fit the data it is resolved against (the message names the field)."""


def resolve_preprocess(recipe: Recipe, data_channels: int) -> PreprocessSpec:
    """The recipe's preprocessing with channels filled from the data (0) and mean / std per channel.

    ``views`` passes through when the recipe fixes them; while they are still to be chosen on val_select
    (`pending_views`: ``aggregate: auto``, or ``learned`` without weights) the spec has no views, which is what
    training and the epoch selection use anyway; supervised_train then sets the resolved views."""
    p = recipe.preprocess
    channels = p.channels or (1 if data_channels == 1 else 3)
    mean = p.mean * channels if len(p.mean) == 1 else p.mean
    std = p.std * channels if len(p.std) == 1 else p.std
    if len(mean) != channels or len(std) != channels:
        raise ResolveError(f"preprocess.mean / std have 3 values but the model input has {channels} channel(s)")
    return PreprocessSpec(
        kind=p.kind,
        channels=channels,
        size=p.size,
        mean=mean,
        std=std,
        views=None if p.views is None else p.views.fixed,
    )


def resolve_arch(recipe: Recipe, num_classes: int, preprocess: PreprocessSpec) -> ArchSpec:
    """The full ArchSpec: the recipe's fields + num_classes (data) + in_channels / image_size (preprocess)."""
    return ArchSpec.from_choice(recipe.arch, num_classes, preprocess.channels, preprocess.size)


def pending_views(recipe: Recipe) -> ViewsChoice | None:
    """The recipe's views when supervised_train must still resolve them on val_select, else None."""
    views = recipe.preprocess.views
    return views if views is not None and views.pending else None
