"""visionpipe/serving/models.py: the model zoo builds, trains, round-trips through safetensors and loads backbones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from visionpipe.serving.models import (
    BUILDERS,
    Dinov2Backbone,
    VisionClassifier,
    WeightsError,
    build_model,
    load_pretrained_backbone,
    load_weights,
    register_builder,
    save_backbone,
    save_weights,
    transformer_blocks,
)
from visionpipe.specs import ARCHITECTURES, ArchSpec, ArchSpecError

torch.set_num_threads(2)

SIZE = 16


def tiny(name: str, channels: int = 1, num_classes: int = 3, **overrides: int | float) -> ArchSpec:
    base: dict[str, object] = dict(
        name=name,
        num_classes=num_classes,
        in_channels=channels,
        image_size=SIZE,
        width=8,
        patch_size=4,
        hidden_dim=16,
        num_layers=2,
        num_heads=2,
        mlp_dim=32,
    )
    base.update(overrides)
    return ArchSpec.from_dict(base)


def batch(channels: int, n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, SIZE, SIZE, generator=g), torch.arange(n) % 3


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_builds_and_forward_shapes(name: str, channels: int) -> None:
    model = build_model(tiny(name, channels)).eval()
    x, _ = batch(channels)
    with torch.no_grad():
        feats = model.features(x)
        logits = model(x)
    assert isinstance(model, VisionClassifier)
    assert feats.shape == (6, model.feature_dim)
    assert logits.shape == (6, 3)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_train_steps_change_weights_and_lower_loss(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny(name)).train()
    x, y = batch(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(3 if name == "resnet18" else 8):  # resnet18 has 11M parameters: keep it short
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        torch.autograd.backward(loss)
        opt.step()
        losses.append(loss.item())
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_safetensors_round_trip_gives_identical_outputs(name: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = build_model(tiny(name, 3)).eval()
    path = tmp_path / "model.safetensors"
    save_weights(model, path)
    torch.manual_seed(2)
    fresh = build_model(tiny(name, 3)).eval()
    load_weights(fresh, path)
    x, _ = batch(3)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


@pytest.mark.parametrize("size", [12, 20, 28, 32])
def test_cnn_small_accepts_any_input_size(size: int) -> None:
    model = build_model(ArchSpec(name="cnn-small", num_classes=10, in_channels=1, image_size=size)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, size, size)).shape == (2, 10)


def test_cnn_small_default_is_small() -> None:
    model = build_model(ArchSpec(name="cnn-small", num_classes=10, in_channels=1, image_size=28))
    assert 100_000 <= sum(p.numel() for p in model.parameters()) <= 300_000


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ({"name": "alexnet", "num_classes": 3, "in_channels": 1, "image_size": 16}, "cnn-small, resnet18"),
        ({"name": "vit", "num_classes": 3, "in_channels": 2, "image_size": 16}, "in_channels=2"),
        ({"name": "vit", "num_classes": 1, "in_channels": 1, "image_size": 16}, "num_classes=1"),
        (
            {"name": "vit", "num_classes": 3, "in_channels": 1, "image_size": 15},
            "multiple of arch.patch_size",
        ),
        (
            {"name": "vit", "num_classes": 3, "in_channels": 1, "image_size": 16, "num_heads": 3},
            "num_heads=3",
        ),
        ({"name": "dinov2", "num_classes": 3, "in_channels": 1, "image_size": 16, "mlp_dim": 100}, "mlp_dim"),
        ({"name": "vit", "num_classes": 3, "in_channels": 1, "image_size": 16, "dropout": 1.0}, "dropout"),
        ({"name": "vit", "num_classes": 3, "in_channels": 1, "image_size": 16, "depth": 3}, "unknown arch"),
        ({"name": "vit", "num_classes": 3, "in_channels": 1}, "required fields"),
        ({"name": "vit", "num_classes": "three", "in_channels": 1, "image_size": 16}, "num_classes"),
    ],
)
def test_arch_spec_rejects_bad_values(payload: dict[str, object], match: str) -> None:
    with pytest.raises(ArchSpecError, match=match):
        ArchSpec.from_dict(payload)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_arch_spec_json_round_trip(name: str) -> None:
    spec = tiny(name, 3, dropout=0.1)
    assert ArchSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert ArchSpec.from_json(spec.to_json()) == spec


def test_load_weights_refuses_pickle_and_mismatches(tmp_path: Path) -> None:
    model = build_model(tiny("vit"))
    pickle_path = tmp_path / "model.pt"
    torch.save(model.state_dict(), pickle_path)
    with pytest.raises(WeightsError, match="not a safetensors file"):
        load_weights(model, pickle_path)
    other = tmp_path / "other.safetensors"
    save_weights(build_model(tiny("vit", hidden_dim=32)), other)
    with pytest.raises(WeightsError, match="shapes do not fit"):
        load_weights(model, other)
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights(model, tmp_path / "missing.safetensors")


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_pretrained_backbone_loads_into_fresh_model_head_untouched(name: str, tmp_path: Path) -> None:
    torch.manual_seed(3)
    source = build_model(tiny(name, num_classes=5)).eval()
    save_backbone(source, tmp_path / "bb", extra={"note": "test"})
    torch.manual_seed(4)
    target = build_model(tiny(name, num_classes=3)).eval()
    head_before = target.head.weight.clone()
    load_pretrained_backbone(target, str(tmp_path / "bb"))
    x, _ = batch(1)
    with torch.no_grad():
        assert torch.equal(source.features(x), target.features(x))
    assert torch.equal(target.head.weight, head_before)


def test_pretrained_backbone_accepts_full_classifier_state(tmp_path: Path) -> None:
    source = build_model(tiny("vit")).eval()
    save_weights(source, tmp_path / "backbone.safetensors")  # keys carry "backbone." and "head." prefixes
    target = build_model(tiny("vit")).eval()
    load_pretrained_backbone(target, str(tmp_path))
    x, _ = batch(1)
    with torch.no_grad():
        assert torch.equal(source.features(x), target.features(x))


def test_pretrained_backbone_refuses_other_architecture(tmp_path: Path) -> None:
    save_backbone(build_model(tiny("vit", hidden_dim=32)), tmp_path)
    with pytest.raises(WeightsError, match="hidden_dim"):
        load_pretrained_backbone(build_model(tiny("vit")), str(tmp_path))
    with pytest.raises(WeightsError, match=r"no backbone\.safetensors"):
        load_pretrained_backbone(build_model(tiny("vit")), str(tmp_path / "nowhere"))


def _hf_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renames = {
        "attention.q_proj": "attention.attention.query",
        "attention.k_proj": "attention.attention.key",
        "attention.v_proj": "attention.attention.value",
        "attention.o_proj": "attention.output.dense",
    }
    out = {}
    for key, value in state.items():
        for new, old in renames.items():
            key = key.replace(new, old)
        out[key] = value.contiguous().clone()
    return out


def test_dinov2_loads_hugging_face_checkpoint_and_resizes_positions(tmp_path: Path) -> None:
    source = build_model(tiny("dinov2", 3)).eval()
    assert isinstance(source.backbone, Dinov2Backbone)
    save_file(_hf_names(source.backbone.model.state_dict()), str(tmp_path / "model.safetensors"))
    same = build_model(tiny("dinov2", 3)).eval()
    load_pretrained_backbone(same, str(tmp_path))
    x, _ = batch(3)
    with torch.no_grad():
        assert torch.allclose(source.features(x), same.features(x), atol=1e-6)
    bigger = build_model(tiny("dinov2", 3, image_size=24)).eval()
    load_pretrained_backbone(bigger, str(tmp_path))  # 4x4 position grid resized to 6x6
    with torch.no_grad():
        assert bigger.features(torch.randn(2, 3, 24, 24)).shape == (2, bigger.feature_dim)


@pytest.mark.parametrize(("name", "blocks"), [("vit", 2), ("dinov2", 2), ("cnn-small", 0), ("resnet18", 0)])
def test_transformer_blocks_name_real_modules(name: str, blocks: int) -> None:
    model = build_model(tiny(name))
    names = transformer_blocks(model)
    assert len(names) == blocks
    for n in names:
        model.get_submodule(n)


def test_every_registry_architecture_has_one_builder_and_vice_versa() -> None:
    from visionpipe.specs.registry import REGISTRY

    assert set(BUILDERS) == set(REGISTRY) == set(ARCHITECTURES)
    with pytest.raises(ArchSpecError, match=r"not in visionpipe/specs/registry\.py"):
        register_builder("alexnet")
    with pytest.raises(ArchSpecError, match="already registered"):
        register_builder("vit")(BUILDERS["vit"])


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_transformer_blocks_follow_the_registry(name: str) -> None:
    from visionpipe.specs.registry import REGISTRY

    model = build_model(tiny(name))
    blocks = transformer_blocks(model)
    assert blocks == REGISTRY[name].block_names(model.spec.num_layers)
    modules = dict(model.named_modules())
    assert all(b in modules for b in blocks)
    if REGISTRY[name].transformer:
        assert len(blocks) == model.spec.num_layers and REGISTRY[name].final_norm in modules


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
@pytest.mark.parametrize("channels", [1, 3])
def test_efficientnet_parameter_count_is_exact_and_activations_bound_the_widest_map(name: str, channels: int) -> None:
    from visionpipe.serving.models import activation_elements, count_parameters, parameter_count

    spec = ArchSpec(name, 2, channels, 64)
    model = build_model(spec)
    assert parameter_count(spec) == count_parameters(model)
    widest = [0]

    def record(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> None:
        widest[0] = max(widest[0], output[0].numel())

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.randn(1, channels, 64, 64))
    for hook in hooks:
        hook.remove()
    assert 2 * widest[0] + channels * 64 * 64 <= activation_elements(spec) <= 3 * widest[0] + channels * 64 * 64


def test_efficientnet_backbone_meta_compares_only_name_and_channels(tmp_path: Path) -> None:
    """efficientnet-lite has no recipe shape fields: a backbone.json whose (unused) width differs still loads; one
    built for grey input does not."""
    rgb = ArchSpec("efficientnet-lite0", 2, 3, 32)
    save_backbone(build_model(rgb), tmp_path / "rgb")
    meta = json.loads((tmp_path / "rgb" / "backbone.json").read_text())
    meta["arch"]["width"] = 99
    (tmp_path / "rgb" / "backbone.json").write_text(json.dumps(meta))
    load_pretrained_backbone(build_model(ArchSpec("efficientnet-lite0", 5, 3, 48)), str(tmp_path / "rgb"))
    save_backbone(build_model(ArchSpec("efficientnet-lite0", 2, 1, 32)), tmp_path / "grey")
    with pytest.raises(WeightsError, match="in_channels: backbone 1 vs model 3"):
        load_pretrained_backbone(build_model(rgb), str(tmp_path / "grey"))
