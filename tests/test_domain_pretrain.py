"""visionpipe/phases/domain_pretrain.py: DINO/ExPLoRA pretraining runs, does not collapse, writes a loadable
backbone."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from visionpipe.phases.data_fetch import write_dataset_from_arrays
from visionpipe.phases.domain_pretrain import CURVE_FILE, SUMMARY_FILE, CollapseError, koleo_loss, make_views, run
from visionpipe.serving.models import build_model, load_pretrained_backbone
from visionpipe.specs import ArchSpec, PreprocessSpec
from visionpipe.training.pretrain_config import PretrainConfig, PretrainError

torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and other work shares the machine

SIZE = 16
PREP = PreprocessSpec(size=SIZE)
FAST = PretrainConfig(
    epochs=2,
    batch_size=16,
    num_local_crops=1,
    out_dim=64,
    head_hidden_dim=32,
    head_bottleneck_dim=16,
    teacher_momentum=0.9,
    lr=1e-3,
)


def tiny_arch(name: str) -> ArchSpec:
    return ArchSpec(
        name=name,
        num_classes=2,
        in_channels=1,
        image_size=SIZE,
        width=8,
        patch_size=4,
        hidden_dim=16,
        num_layers=3,
        num_heads=2,
        mlp_dim=32,
    )


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """80 grey 16x16 images: bars (class a) and blobs (class b) at random places, with noise."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 40, size=(80, SIZE, SIZE, 1)).astype(np.uint8)
    for i in range(80):
        r, c = rng.integers(2, SIZE - 6, size=2)
        if i % 2:
            images[i, r : r + 5, c : c + 5] = 220
        else:
            images[i, :, c : c + 2] = 220
    out = tmp_path_factory.mktemp("ds")
    labels = (np.arange(80) % 2).astype(np.int64)
    write_dataset_from_arrays(out, images, labels, ["a", "b"], [f"img{i}" for i in range(80)])
    return out


@pytest.mark.parametrize("name", ["vit", "dinov2"])
def test_explora_pretraining_keeps_frozen_weights_and_loads(name: str, dataset_dir: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    result = run(dataset_dir, tmp_path, tiny_arch(name), PREP, FAST, log=lines.append)

    assert result.mode.startswith("ExPLoRA")
    assert result.epochs_run == 2 and len(result.history) == 2
    assert not result.collapsed_epochs
    assert all(h["feature_std"] > FAST.collapse_std_floor for h in result.history)
    assert all(np.isfinite(h["loss"]) for h in result.history)
    assert sum(1 for line in lines if line.startswith("epoch ")) == 2
    assert "ETA" in lines[-1] and "feature_std" in lines[-1]
    for f in ("backbone.safetensors", "backbone.json", CURVE_FILE, SUMMARY_FILE):
        assert (tmp_path / f).is_file(), f
    meta = json.loads((tmp_path / "backbone.json").read_text())
    assert meta["arch"]["name"] == name and len(meta["history"]) == 2 and meta["preprocess"]["size"] == SIZE

    torch.manual_seed(FAST.seed)
    init = build_model(tiny_arch(name)).eval()  # the very initialisation `run` started from
    loaded = build_model(tiny_arch(name)).eval()
    load_pretrained_backbone(loaded, str(tmp_path))
    before, after = init.state_dict(), loaded.state_dict()
    frozen, lora_block, open_block = _param_groups(name)
    for key in frozen:
        assert torch.equal(before[key], after[key]), f"frozen weight {key} changed"
    for key in (lora_block, open_block):
        assert not torch.equal(before[key], after[key]), f"{key} did not train"
    x = torch.randn(4, 1, SIZE, SIZE)
    with torch.no_grad():
        assert torch.isfinite(loaded(x)).all()


def _param_groups(name: str) -> tuple[list[str], str, str]:
    """(weights ExPLoRA must not touch, a LoRA-adapted weight of block 0, a weight of the unfrozen last block)."""
    if name == "vit":
        block = "backbone.encoder.layers.encoder_layer_"
        frozen = [
            "backbone.conv_proj.weight",
            "backbone.class_token",
            f"{block}0.mlp.0.weight",
            f"{block}1.ln_1.weight",
        ]
        return frozen, f"{block}0.self_attention.in_proj_weight", f"{block}2.mlp.0.weight"
    block = "backbone.model.encoder.layer."
    frozen = [
        "backbone.model.embeddings.patch_embeddings.projection.weight",
        f"{block}0.mlp.fc1.weight",
        f"{block}1.attention.k_proj.weight",
    ]
    return frozen, f"{block}0.attention.q_proj.weight", f"{block}2.mlp.fc1.weight"


def test_cnn_is_fully_fine_tuned_and_says_so(dataset_dir: Path, tmp_path: Path) -> None:
    config = PretrainConfig.from_dict({**FAST.to_dict(), "epochs": 1})
    result = run(dataset_dir, tmp_path, tiny_arch("cnn-small").to_dict(), PREP.to_dict(), config, log=lambda _: None)
    assert "full fine-tuning" in result.mode and "LoRA n/a" in result.mode
    assert "full fine-tuning" in (tmp_path / SUMMARY_FILE).read_text()
    fresh = build_model(tiny_arch("cnn-small"))
    load_pretrained_backbone(fresh, str(tmp_path))


def test_max_steps_caps_training(dataset_dir: Path, tmp_path: Path) -> None:
    config = PretrainConfig.from_dict({**FAST.to_dict(), "epochs": 5, "max_steps": 3, "koleo_weight": 0.1})
    result = run(dataset_dir, tmp_path, tiny_arch("vit").to_json(), json.dumps(PREP.to_dict()), config, log=print)
    assert result.steps == 3 and result.epochs_run == 1


@pytest.mark.parametrize(
    "trigger",
    [{"collapse_std_floor": 100.0}, {"collapse_uniform_ceiling": 0.0}, {"collapse_entropy_floor": 1.0}],
    ids=["feature-std", "uniform-teacher", "one-prototype"],
)
@pytest.mark.parametrize(("patience", "raises"), [(1, True), (0, False)])
def test_collapse_guard_fails_or_warns(
    dataset_dir: Path, tmp_path: Path, trigger: dict[str, float], patience: int, raises: bool
) -> None:
    # thresholds no healthy run can meet stand in for a collapsed run
    config = PretrainConfig.from_dict(
        {**FAST.to_dict(), "epochs": 1, "max_steps": 1, "collapse_patience": patience, **trigger}
    )
    lines: list[str] = []
    if raises:
        with pytest.raises(CollapseError, match="collapsed for 1 consecutive epoch"):
            run(dataset_dir, tmp_path, tiny_arch("vit"), PREP, config, log=lines.append)
    else:
        result = run(dataset_dir, tmp_path, tiny_arch("vit"), PREP, config, log=lines.append)
        assert result.collapsed_epochs == [1]
    assert "WARNING: features collapsed" in lines[-1]


def test_arch_and_preprocess_must_agree(dataset_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(PretrainError, match="does not match preprocess"):
        run(dataset_dir, tmp_path, tiny_arch("vit"), PreprocessSpec(size=SIZE * 2), FAST)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"epochs": 0}, "epochs=0"),
        ({"batch_size": 1}, "batch_size=1"),
        ({"lora_rank": -1}, "lora_rank=-1"),
        ({"lr": 0.0}, r"lr=0.0 must be in \(0.0"),
        ({"teacher_momentum": 1.5}, "teacher_momentum=1.5"),
        ({"teacher_temp": 0.2}, "teacher_temp=0.2 must be <= student_temp"),
        ({"local_crop_scale": [0.5, 0.1]}, "local_crop_scale"),
        ({"out_dim": 1}, "out_dim=1"),
        ({"collapse_entropy_floor": 2.0}, "collapse_entropy_floor=2.0"),
        ({"collapse_uniform_ceiling": -0.1}, "collapse_uniform_ceiling=-0.1"),
        ({"koleo_weight": -1.0}, "koleo_weight=-1.0"),
        ({"teacher_tmp": 0.04}, "unknown pretrain fields"),
        ({"epochs": "many"}, "epochs='many' is invalid"),
    ],
)
def test_config_validation_names_field_and_value(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(PretrainError, match=match):
        PretrainConfig.from_dict(overrides)


def test_config_round_trips_through_dict() -> None:
    assert PretrainConfig.from_dict(json.loads(json.dumps(FAST.to_dict()))) == FAST


def test_koleo_is_lower_for_spread_features() -> None:
    spread = torch.eye(8)
    bunched = torch.ones(8, 8) + 0.01 * torch.randn(8, 8)
    assert koleo_loss(spread) < koleo_loss(bunched)


def test_views_have_model_shape_and_are_seeded() -> None:
    x = torch.randn(5, 1, SIZE, SIZE)
    a = make_views(x, FAST, torch.Generator().manual_seed(1))
    b = make_views(x, FAST, torch.Generator().manual_seed(1))
    assert len(a) == 2 + FAST.num_local_crops
    assert all(v.shape == x.shape for v in a)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[0], a[1])


def test_component_compiles(tmp_path: Path) -> None:
    from kfp import compiler

    from visionpipe.kfp.components.domain_pretrain import domain_pretrain

    path = tmp_path / "c.yaml"
    compiler.Compiler().compile(domain_pretrain, str(path))
    text = path.read_text()
    assert "arch_json" in text and "init_backbone" in text and "enabled" in text


def test_disabled_component_writes_only_the_pass_through_marker(dataset_dir: Path, tmp_path: Path) -> None:
    """enabled=False trains nothing: backbone.json = {"passthrough": true} alone, and a one-line summary."""
    from kfp.dsl import Dataset, Markdown, Model

    from visionpipe.kfp.components.domain_pretrain import domain_pretrain
    from visionpipe.training.passthrough import is_passthrough

    backbone = Model(name="backbone", uri=str(tmp_path / "backbone"), metadata={})
    summary = Markdown(name="summary", uri=str(tmp_path / "summary.md"), metadata={})
    dataset = Dataset(name="ds", uri=str(dataset_dir), metadata={})
    domain_pretrain.python_func(
        dataset=dataset, backbone=backbone, summary=summary, arch_json="{}", preprocess_json="{}", enabled=False
    )
    assert sorted(p.name for p in (tmp_path / "backbone").iterdir()) == ["backbone.json"]
    assert json.loads((tmp_path / "backbone" / "backbone.json").read_text()) == {"passthrough": True}
    assert is_passthrough(tmp_path / "backbone")
    assert len((tmp_path / "summary.md").read_text().strip().splitlines()) == 1
