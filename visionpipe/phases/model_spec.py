"""resolve_model_spec: the architecture and preprocessing a recipe gives on a Dataset, as JSON parameters.

domain_pretrain takes the architecture and preprocessing as JSON so it can adapt any backbone; in the training
pipeline they come from the same recipe supervised_train uses, resolved against the Dataset (class count,
channels) by supervised_train's own functions, so both phases build the same model.
"""

# No `from __future__ import annotations` here: KFP reads the component signature at import time.

import json
from pathlib import Path
from typing import NamedTuple

from kfp.dsl import Dataset, Input

from visionpipe.kfp.platform import component


class ModelSpec(NamedTuple):
    arch_json: str
    preprocess_json: str


def resolve(dataset_dir: Path, recipe: str, recipe_overrides_json: str = "{}") -> ModelSpec:
    from visionpipe.data.datasets import load_dataset
    from visionpipe.phases.supervised_train import resolve_arch, resolve_preprocess
    from visionpipe.training.recipes import load_recipe, parse_overrides

    ds = load_dataset(dataset_dir)
    chosen = load_recipe(recipe, parse_overrides(recipe_overrides_json))
    preprocess = resolve_preprocess(chosen, ds.image_shape[2])
    arch = resolve_arch(chosen, ds.num_classes, preprocess)
    return ModelSpec(json.dumps(arch.to_dict(), sort_keys=True), json.dumps(preprocess.to_dict(), sort_keys=True))


@component
def resolve_model_spec(
    dataset: Input[Dataset], recipe: str = "digits-cnn", recipe_overrides_json: str = "{}"
) -> NamedTuple("Outputs", [("arch_json", str), ("preprocess_json", str)]):  # type: ignore[valid-type]
    """The architecture and preprocessing (JSON) that `recipe` gives on this Dataset."""
    from pathlib import Path

    from visionpipe.phases.model_spec import resolve

    return resolve(Path(dataset.path), recipe, recipe_overrides_json)
