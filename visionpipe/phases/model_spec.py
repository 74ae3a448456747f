"""resolve_model_spec: the architecture and preprocessing a recipe gives on a Dataset, as JSON parameters.

domain_pretrain takes the architecture and preprocessing as JSON so it can adapt any backbone; in the training
pipeline they come from the same recipe supervised_train uses, resolved against the Dataset (class count,
channels) by the same functions (visionpipe.specs.resolve), so both phases build the same model.

A pure core, torch- and kfp-free (compiling a graph imports it); the KFP component is
visionpipe/kfp/components/model_spec.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple


class ModelSpec(NamedTuple):
    arch_json: str
    preprocess_json: str


def resolve(dataset_dir: Path, recipe: str, recipe_overrides_json: str = "{}") -> ModelSpec:
    """The recipe's ArchSpec and PreprocessSpec (sorted-key JSON) on the Dataset at `dataset_dir`."""
    from visionpipe.data.datasets import load_dataset
    from visionpipe.specs.resolve import resolve_arch, resolve_preprocess
    from visionpipe.training.recipes import load_recipe, parse_overrides

    ds = load_dataset(dataset_dir)
    chosen = load_recipe(recipe, parse_overrides(recipe_overrides_json))
    preprocess = resolve_preprocess(chosen, ds.image_shape[2])
    arch = resolve_arch(chosen, ds.num_classes, preprocess)
    return ModelSpec(json.dumps(arch.to_dict(), sort_keys=True), json.dumps(preprocess.to_dict(), sort_keys=True))
