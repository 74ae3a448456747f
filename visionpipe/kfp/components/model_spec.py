"""Thin KFP component of phase model_spec (core: visionpipe.phases.model_spec)."""

# No `from __future__ import annotations` here: KFP reads the component signature at import time.

from typing import NamedTuple

from kfp.dsl import Dataset, Input

from visionpipe.kfp.platform import component


@component
def resolve_model_spec(
    dataset: Input[Dataset], recipe: str = "digits-cnn", recipe_overrides_json: str = "{}"
) -> NamedTuple("Outputs", [("arch_json", str), ("preprocess_json", str)]):  # type: ignore[valid-type]
    """The architecture and preprocessing (JSON) that `recipe` gives on this Dataset."""
    from pathlib import Path

    from visionpipe.phases.model_spec import resolve

    return resolve(Path(dataset.path), recipe, recipe_overrides_json)
