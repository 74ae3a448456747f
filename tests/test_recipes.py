"""Recipes: every shipped recipe loads and validates; bad values name the field and the allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from visionpipe.training import recipes as rc
from visionpipe.training.recipes import Recipe, RecipeError, load_recipe, recipe_hash

REQUIRED = ("digits-cnn", "digits-resnet18", "roadwork-vit-dora", "roadwork-dinov2-lora", "roadwork-effnet-lite0")


def test_required_recipes_are_shipped() -> None:
    assert set(REQUIRED) <= set(rc.list_recipes())


@pytest.mark.parametrize("name", rc.list_recipes())
def test_every_shipped_recipe_loads_validates_and_round_trips(name: str) -> None:
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.description
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert Recipe.from_dict(yaml.safe_load(yaml.safe_dump(recipe.to_dict()))) == recipe
    assert len(recipe_hash(recipe)) == 64


@pytest.mark.parametrize(
    ("name", "arch", "peft"),
    [
        ("digits-cnn", "cnn-small", "none"),
        ("digits-resnet18", "resnet18", "none"),
        ("roadwork-vit-dora", "vit", "dora"),
        ("roadwork-dinov2-lora", "dinov2", "lora"),
        ("roadwork-effnet-lite0", "efficientnet-lite0", "none"),
    ],
)
def test_shipped_recipes_choose_the_documented_model(name: str, arch: str, peft: str) -> None:
    recipe = load_recipe(name)
    assert (recipe.arch.name, recipe.peft.method) == (arch, peft)


def test_roadwork_recipes_select_by_mcc_on_rgb() -> None:
    for name in ("roadwork-vit-dora", "roadwork-dinov2-lora", "roadwork-effnet-lite0"):
        recipe = load_recipe(name)
        assert recipe.early_stopping.metric == "mcc"
        assert recipe.preprocess.channels == 3


def test_allowed_sets_mirror_the_runtime() -> None:
    from visionpipe.serving.models import ARCHITECTURES
    from visionpipe.serving.preprocessing import KINDS
    from visionpipe.training.peft import METHODS

    assert rc.ARCH_NAMES == ARCHITECTURES
    assert rc.PREPROCESS_KINDS == KINDS
    assert rc.PEFT_METHODS == METHODS


def test_shipped_peft_targets_exist_in_the_models() -> None:
    """The target modules a shipped recipe names match modules of its (tiny) architecture."""
    from visionpipe.serving.models import ArchSpec, build_model
    from visionpipe.training.peft import PeftSpec, apply_peft

    for name in ("roadwork-vit-dora", "roadwork-dinov2-lora"):
        recipe = load_recipe(name)
        patch = recipe.arch.patch_size
        spec = ArchSpec(recipe.arch.name, 2, 3, 2 * patch, patch_size=patch, hidden_dim=16, num_heads=2,
                        num_layers=1, mlp_dim=32)  # fmt: skip
        p = recipe.peft
        apply_peft(build_model(spec), PeftSpec(p.method, p.rank, p.alpha, p.dropout, p.target_modules), spec.name)


@pytest.mark.parametrize(
    ("overrides", "field", "allowed"),
    [
        ({"optimizer": {"name": "adam"}}, "optimizer.name='adam'", "adamw, sgd"),
        ({"schedule.name": "step"}, "schedule.name='step'", "cosine, constant"),
        ({"loss.name": "mse"}, "loss.name='mse'", "cross_entropy, focal"),
        ({"loss.class_weights": "inverse"}, "loss.class_weights='inverse'", "none, balanced"),
        ({"early_stopping.metric": "f1"}, "early_stopping.metric='f1'", "auto, mcc, accuracy"),
        ({"peft.method": "ia3"}, "peft.method='ia3'", "none, lora, dora"),
        ({"arch.name": "vgg"}, "arch.name='vgg'", "cnn-small, resnet18, vit, dinov2"),
        ({"preprocess.kind": "fancy"}, "preprocess.kind='fancy'", "standard, digit-upload"),
        ({"preprocess.channels": 2}, "preprocess.channels=2", "0, 1, 3"),
        ({"optimizer.lr": 0}, "optimizer.lr=0.0", "(0, 10]"),
        ({"epochs": 0}, "epochs=0", "[1, 10000]"),
        ({"batch_size": -4}, "batch_size=-4", "[1, 65536]"),
        ({"loss.label_smoothing": 1.0}, "loss.label_smoothing=1.0", "[0, 1)"),
        ({"augment.rotation_deg": 400}, "augment.rotation_deg=400.0", "[0, 180]"),
        ({"augment.erasing_prob": 1.5}, "augment.erasing_prob=1.5", "[0, 1]"),
        ({"ema.decay": 1.0}, "ema.decay=1.0", "[0, 1)"),
        ({"peft.rank": 0}, "peft.rank=0", "[1, 1024]"),
        ({"grad_accum_steps": 0}, "grad_accum_steps=0", "[1, 1024]"),
    ],
)
def test_bad_value_names_field_and_allowed_values(overrides: dict[str, object], field: str, allowed: str) -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe("digits-cnn", overrides)
    assert field in str(err.value)
    assert allowed in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"optimiser": {"lr": 0.1}}, "unknown recipe field(s) optimiser; allowed: name, description, seed"),
        ({"optimizer.learning_rate": 0.1}, "optimizer.learning_rate; allowed: optimizer.name, optimizer.lr"),
        ({"epochs": "ten"}, "epochs='ten' must be an integer"),
        ({"epochs": 2.5}, "epochs=2.5 must be an integer"),
        ({"ema.enabled": "yes"}, "ema.enabled='yes' must be true or false"),
        ({"augment.scale": [0.9]}, "augment.scale=[0.9] must have exactly 2 values"),
        ({"augment.scale": [1.2, 0.8]}, "augment.scale=[1.2, 0.8] must be [min, max]"),
        ({"optimizer": 3}, "optimizer must be a mapping"),
        ({"loss.class_weights": [1.0]}, "loss.class_weights=[1.0] needs one weight per class"),
        ({"loss.class_weights": [1.0, -2.0]}, "loss.class_weights[1]=-2.0 is out of range"),
        ({"arch": {"name": "vit", "patch_size": 5}}, "preprocess.size=28 must be a multiple of arch.patch_size=5"),
    ],
)
def test_malformed_recipe_errors_name_the_field(overrides: dict[str, object], fragment: str) -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe("digits-cnn", overrides)
    assert fragment in str(err.value)


def test_overrides_nested_and_dotted_agree_and_change_the_hash() -> None:
    base = load_recipe("digits-cnn")
    dotted = load_recipe("digits-cnn", {"optimizer.lr": 0.01, "epochs": 2})
    nested = load_recipe("digits-cnn", {"optimizer": {"lr": 0.01}, "epochs": 2})
    assert dotted == nested
    assert dotted.optimizer.lr == 0.01 and dotted.epochs == 2
    assert dotted.optimizer.name == base.optimizer.name  # untouched siblings survive
    assert recipe_hash(dotted) == recipe_hash(nested) != recipe_hash(base)
    assert recipe_hash(base) == recipe_hash(load_recipe("digits-cnn"))


def test_class_weights_accept_a_list_or_a_keyword() -> None:
    assert load_recipe("digits-cnn", {"loss.class_weights": [1, 2.5]}).loss.class_weights == (1.0, 2.5)
    assert load_recipe("digits-cnn", {"loss.class_weights": "balanced"}).loss.class_weights == "balanced"


def test_load_by_path_and_unknown_name(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"epochs": 3, "arch": {"name": "resnet18"}}))
    recipe = load_recipe(str(path))
    assert (recipe.name, recipe.epochs, recipe.arch.name) == ("mine", 3, "resnet18")
    with pytest.raises(RecipeError, match=r"unknown recipe 'nope'; shipped recipes: .*digits-cnn"):
        load_recipe("nope")
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        load_recipe(str(tmp_path / "list.yaml"))


def test_recipe_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "extra-recipe.yaml").write_text("epochs: 1\n")
    monkeypatch.setenv(rc.RECIPE_DIR_ENV, str(tmp_path))
    assert "extra-recipe" in rc.list_recipes()
    assert load_recipe("extra-recipe").epochs == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", {}), ("{}", {}), ('{"epochs": 2, "optimizer.lr": 0.1}', {"epochs": 2, "optimizer.lr": 0.1})],
)
def test_parse_overrides(text: str, expected: dict[str, object]) -> None:
    assert rc.parse_overrides(text) == expected


@pytest.mark.parametrize("text", ["[1]", "{epochs: 2}"])
def test_parse_overrides_rejects_non_objects(text: str) -> None:
    with pytest.raises(RecipeError, match="overrides"):
        rc.parse_overrides(text)


# recipe_hash of every shipped recipe as it was before the arch / peft sections became the spec types
# (visionpipe/specs); the hash feeds bundle versions and checkpoint resume, so it must not move.
SHIPPED_HASHES = {
    "digits-cnn": "2b1a7b94eabadf9102484c4e6909da95c46c50b20e254a7062cadf1873b7c737",
    "digits-cnn-mnist": "6384d15a56dbe2b2d9b13c39b3ccfae835bb067e51baf4eb59bf5da5636dd142",
    "digits-resnet18": "c6804bdcab3d7f3f45de875331d5ee2f0ee280ea19baec2dbffe52dd5398fdfb",
    "roadwork-dinov2-lora": "877caf4254c5e479013831bac32d9f78c06c0f1f46c393e9ad9377f0aa2dc75b",
    "roadwork-vit-dora": "375b5727c42de5f6de95fb0d29538014daba7e19e559b29e02c56adc63b6e3e8",
    # added with the recipe (issue 16); bench/roadwork.py's figures were measured with it
    "roadwork-effnet-lite0": "05a64f16894870280e720e943bd9a2f6afcf82961e078ec5758abf65cd26ae5f",
}


@pytest.mark.parametrize("name", sorted(SHIPPED_HASHES))
def test_shipped_recipe_hashes_are_unchanged(name: str) -> None:
    assert recipe_hash(load_recipe(name)) == SHIPPED_HASHES[name]


def test_recipe_sections_are_the_spec_types() -> None:
    from visionpipe.specs import ArchChoice, PeftChoice, PeftSpec

    recipe = load_recipe("roadwork-dinov2-lora")
    assert type(recipe.arch) is ArchChoice and type(recipe.peft) is PeftChoice
    assert isinstance(recipe.peft, PeftSpec)
