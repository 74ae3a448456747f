"""Specs defined once, torch- and kfp-free: architecture (`ArchSpec`, `ArchChoice`), preprocessing
(`PreprocessSpec`), PEFT (`PeftSpec`, `PeftChoice`) and the one architecture registry (`registry`).

`visionpipe.specs.resolve` resolves a recipe against a Dataset; `visionpipe.specs.params` holds the run-form
parameter table. Neither is imported here (resolve needs visionpipe.training.recipes, which imports this).
"""

from visionpipe.specs.arch import ArchChoice, ArchSpec, ArchSpecError
from visionpipe.specs.checks import SpecError
from visionpipe.specs.peft import METHODS, PeftChoice, PeftError, PeftSpec
from visionpipe.specs.preprocess import KINDS, PREPROCESS_VERSION, PreprocessError, PreprocessSpec
from visionpipe.specs.registry import ARCHITECTURES, CONVNETS, REGISTRY, TRANSFORMERS, ArchInfo, arch_info

__all__ = [
    "ARCHITECTURES",
    "CONVNETS",
    "KINDS",
    "METHODS",
    "PREPROCESS_VERSION",
    "REGISTRY",
    "TRANSFORMERS",
    "ArchChoice",
    "ArchInfo",
    "ArchSpec",
    "ArchSpecError",
    "PeftChoice",
    "PeftError",
    "PeftSpec",
    "PreprocessError",
    "PreprocessSpec",
    "SpecError",
    "arch_info",
]
