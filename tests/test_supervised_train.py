"""supervised_train: best-epoch selection, logits from the saved best weights, exact resume, PEFT, kfp.local."""

# No `from __future__ import annotations`: kfp reads the pipeline signature below at definition time.

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from visionpipe.data.datasets import load_dataset
from visionpipe.kfp.components.supervised_train import supervised_train
from visionpipe.phases import supervised_train as st
from visionpipe.phases.data_fetch import write_dataset_from_arrays
from visionpipe.serving.models import build_model, load_weights
from visionpipe.serving.preprocessing import to_model_input
from visionpipe.serving.storage import StorageError
from visionpipe.specs import ArchSpec, PreprocessSpec
from visionpipe.training import augment as aug
from visionpipe.training import batching, checkpoint, errors, loop, losses, schedule
from visionpipe.training.recipes import LossSpec, Recipe, RecipeError, load_recipe, recipe_hash

TINY = {
    "epochs": 3,
    "batch_size": 16,
    "eval_batch_size": 64,
    "arch": {"name": "cnn-small", "width": 4, "dropout": 0.1},
    "preprocess": {"kind": "standard", "channels": 0, "size": 8, "mean": [0.5], "std": [0.5]},
    "optimizer": {"name": "adamw", "lr": 0.01},
    "schedule": {"warmup_epochs": 1},
    "augment": {"rotation_deg": 10, "translate": 0.1, "scale": [0.9, 1.1], "erasing_prob": 0.3},
    "early_stopping": {"patience": 0},
}
TINY_VIT = {"name": "vit", "patch_size": 4, "hidden_dim": 16, "num_layers": 1, "num_heads": 2, "mlp_dim": 32}
TINY_DINOV2 = {**TINY_VIT, "name": "dinov2"}


def quiet(_msg: str) -> None:
    pass


def tiny_recipe(**overrides: object) -> Recipe:
    return load_recipe("digits-cnn", TINY).with_overrides(overrides)


def make_dataset(root: Path, num_classes: int = 3, per_class: int = 40, seed: int = 0) -> Path:
    """Noisy 8x8 grey images: class k is a bright bar at row 2k+1 (easy, but not trivially separable)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for k in range(num_classes):
        for _ in range(per_class):
            img = rng.integers(0, 90, (8, 8)).astype(np.float64)
            img[(2 * k + 1) % 8, :] += 150
            images.append(np.clip(img, 0, 255).astype(np.uint8))
            labels.append(k)
    classes = [f"c{k}" for k in range(num_classes)]
    positive = classes[1] if num_classes == 2 else None
    out = root / "dataset"
    write_dataset_from_arrays(
        out,
        np.stack(images)[..., None],
        np.asarray(labels, dtype=np.int64),
        classes,
        [f"img{i}" for i in range(len(labels))],
        ratios=(0.55, 0.15, 0.15, 0.15),
        seed=seed,
        positive_class=positive,
    )
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ds"))


@pytest.fixture(scope="module")
def binary_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ds2"), num_classes=2, per_class=30)


def train(ds: Path, out: Path, recipe: Recipe, **kwargs: object) -> st.TrainResult:
    return st.run(ds, out / "model", out / "logits", recipe, out / "ckpt", log=quiet, **kwargs)  # type: ignore[arg-type]


def saved_model(out: Path) -> tuple[torch.nn.Module, PreprocessSpec, dict[str, object]]:
    meta = json.loads((out / "model" / "model.json").read_text())
    model = build_model(ArchSpec.from_dict(meta["arch"]))
    load_weights(model, out / "model" / "model.safetensors")
    return model, PreprocessSpec.from_dict(meta["preprocess"]), meta


# ------------------------------------------------------------------------------------------------ outputs


def test_outputs_follow_the_contract(dataset: Path, tmp_path: Path) -> None:
    result = train(dataset, tmp_path, tiny_recipe(epochs=3), curve_path=tmp_path / "curve.png")
    ds = load_dataset(dataset)
    _, _, meta = saved_model(tmp_path)
    assert meta["classes"] == list(ds.classes) and meta["positive_class"] is None
    assert meta["arch"]["num_classes"] == 3 and meta["arch"]["in_channels"] == 1  # type: ignore[index]
    assert meta["recipe_hash"] == recipe_hash(tiny_recipe(epochs=3))
    assert meta["split_fingerprints"] == {k: ds.split_fingerprints[k] for k in ("train", "val_select")}
    assert [h["epoch"] for h in meta["history"]] == [1.0, 2.0, 3.0]  # type: ignore[attr-defined]
    assert json.loads((tmp_path / "logits" / "meta.json").read_text()) == {"classes": ["c0", "c1", "c2"],
                                                                           "positive_class": None}  # fmt: skip
    for split in ("val_calib", "val_test"):
        with np.load(tmp_path / "logits" / f"{split}.npz") as npz:
            assert npz["logits"].dtype == np.float32 and npz["logits"].shape == (len(npz["labels"]), 3)
            assert npz["labels"].dtype == np.int64
            np.testing.assert_array_equal(npz["labels"], ds.split(split, "evaluate").labels)
    assert (tmp_path / "curve.png").stat().st_size > 1000
    assert result.epochs_run == 3 and result.images_per_second > 0
    # the best epoch is the maximum val_select score, ties broken by the lower val_select loss
    keys = [(h["val_select_accuracy"], -h["val_select_loss"]) for h in result.history]
    assert result.best_epoch == meta["best_epoch"] == keys.index(max(keys)) + 1
    # the checkpoint holds no pickle: safetensors and JSON only
    assert {p.suffix for p in (tmp_path / "ckpt").iterdir()} == {".safetensors", ".json"}


def test_early_stopping_keeps_best_epoch_and_logits_come_from_it(dataset: Path, tmp_path: Path) -> None:
    """min_delta=1 makes every epoch after the first 'no improvement': best = epoch 1, stop after 1+patience."""
    recipe = tiny_recipe(epochs=6, early_stopping={"patience": 2, "min_delta": 1.0})
    result = train(dataset, tmp_path, recipe)
    assert (result.best_epoch, result.epochs_run, result.stopped_early) == (1, 3, True)
    model, preprocess, meta = saved_model(tmp_path)
    assert meta["best_epoch"] == 1
    ds = load_dataset(dataset)
    # the saved weights reproduce epoch 1's val_select score, and every saved logit exactly
    select = ds.split("val_select", "select")
    score = st.selection_metric(st.predict_logits(model, select.images, preprocess), select.labels, "accuracy")
    assert score == pytest.approx(result.history[0]["val_select_accuracy"], abs=1e-12)
    for split in ("val_calib", "val_test"):
        with np.load(tmp_path / "logits" / f"{split}.npz") as npz:
            recomputed = st.predict_logits(model, ds.split(split, "evaluate").images, preprocess)
            np.testing.assert_array_equal(npz["logits"], recomputed)
    # ...and they are not the last epoch's weights
    state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    last = load_file(str(tmp_path / "ckpt" / state["state_file"]))
    saved = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert not torch.equal(last["model/head.weight"], saved["head.weight"])


@pytest.mark.parametrize(
    ("score", "loss", "min_delta", "expected"),
    [
        (0.9, 1.0, 0.0, True),  # higher score
        (0.8, 0.1, 0.0, True),  # equal score, lower loss
        (0.8, 0.6, 0.0, False),  # equal score, higher loss
        (0.7, 0.1, 0.0, False),  # lower score
        (0.85, 0.1, 0.1, False),  # not better by min_delta, and no tie-break with min_delta > 0
        (0.8, 0.1, 0.1, False),
        (0.95, 0.9, 0.1, True),
    ],
)
def test_is_improvement(score: float, loss: float, min_delta: float, expected: bool) -> None:
    assert st.is_improvement(score, loss, 0.8, 0.5, min_delta) is expected


# ------------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {
            "ema": {"enabled": True, "decay": 0.9},
            "augment": {"mixup_alpha": 0.4, "cutmix_alpha": 1.0, "hflip": True},
            "optimizer": {"name": "sgd", "lr": 0.05},
            "grad_accum_steps": 2,
            "grad_clip_norm": 1.0,
        },
    ],
    ids=["adamw", "ema-mixup-cutmix-sgd-accum-clip"],
)
def test_resume_after_interruption_reproduces_the_uninterrupted_run(
    dataset: Path, tmp_path: Path, extra: dict[str, object]
) -> None:
    recipe = tiny_recipe(epochs=3, **extra)
    straight = train(dataset, tmp_path / "a", recipe)
    with pytest.raises(errors.TrainingInterrupted):
        train(dataset, tmp_path / "b", recipe, stop_after_epoch=1)
    assert not (tmp_path / "b" / "model" / "model.safetensors").exists()
    resumed = train(dataset, tmp_path / "b", recipe)
    assert resumed.resumed_from_epoch == 1
    a, b = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("a", "b"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for split in ("val_calib", "val_test"):
        x, y = (np.load(tmp_path / d / "logits" / f"{split}.npz")["logits"] for d in ("a", "b"))
        np.testing.assert_array_equal(x, y)
    keys = ("train_loss", "val_select_loss", "val_select_accuracy", "lr")
    assert [[h[k] for k in keys] for h in straight.history] == [[h[k] for k in keys] for h in resumed.history]


def test_finished_checkpoint_is_not_retrained(dataset: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(epochs=1)
    first = train(dataset, tmp_path, recipe)
    again = train(dataset, tmp_path, recipe)
    assert again.resumed_from_epoch == 1 and again.history == first.history


@pytest.mark.parametrize("where", ["s3", "folder"])
def test_a_retry_on_a_fresh_disk_resumes_from_the_checkpoint_mirror(
    dataset: Path, tmp_path: Path, where: str, request: pytest.FixtureRequest
) -> None:
    """On a cluster a retried pod gets an empty disk: the checkpoint mirrored to checkpoint_uri carries the run."""
    from visionpipe.serving import storage

    remote = storage.join(request.getfixturevalue("s3_bucket"), "ckpt/task") if where == "s3" else str(tmp_path / "m")
    recipe = tiny_recipe(epochs=3, ema={"enabled": True, "decay": 0.9})
    straight = train(dataset, tmp_path / "a", recipe)
    with pytest.raises(errors.TrainingInterrupted):
        train(dataset, tmp_path / "first-pod", recipe, stop_after_epoch=1, checkpoint_uri=remote)
    names = sorted(u.rsplit("/", 1)[-1] for u in storage.list_uris(remote))
    assert names == ["best-0001.safetensors", "state-0001.safetensors", checkpoint.STATE_FILE]

    resumed = train(dataset, tmp_path / "second-pod", recipe, checkpoint_uri=remote)
    assert resumed.resumed_from_epoch == 1
    a, b = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("a", "second-pod"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["train_loss"] for h in straight.history] == [h["train_loss"] for h in resumed.history]
    names = [u.rsplit("/", 1)[-1] for u in storage.list_uris(remote)]  # stale epochs were deleted remotely
    assert f"state-{3:04d}.safetensors" in names and len(names) == 3

    checkpoint.remove_mirror(remote)
    assert not storage.exists(storage.join(remote, checkpoint.STATE_FILE))


@pytest.mark.parametrize("uri", ["relative/folder", "s3:/one-slash", "s3://"])
def test_a_bad_checkpoint_uri_is_refused_before_training(dataset: Path, tmp_path: Path, uri: str) -> None:
    with pytest.raises((errors.TrainError, StorageError), match=r"s3://"):
        train(dataset, tmp_path, tiny_recipe(epochs=1), checkpoint_uri=uri)
    assert not (tmp_path / "ckpt").exists()


def test_a_broken_mirror_is_refused_with_its_location(dataset: Path, tmp_path: Path) -> None:
    remote = tmp_path / "mirror"
    remote.mkdir()
    (remote / checkpoint.STATE_FILE).write_text("{not json")
    with pytest.raises(errors.ResumeError, match=r"mirror/state.json is not valid JSON"):
        train(dataset, tmp_path / "pod", tiny_recipe(epochs=1), checkpoint_uri=str(remote))


def test_resume_refuses_another_recipe(dataset: Path, tmp_path: Path) -> None:
    train(dataset, tmp_path, tiny_recipe(epochs=1))
    with pytest.raises(errors.ResumeError, match="another recipe"):
        train(dataset, tmp_path, tiny_recipe(epochs=1, seed=5))


# --------------------------------------------------------------------------------------------------- PEFT


@pytest.mark.parametrize(
    ("arch", "method"),
    [(TINY_VIT, "lora"), (TINY_VIT, "dora"), (TINY_DINOV2, "lora"), (TINY_DINOV2, "dora")],
    ids=["vit-lora", "vit-dora", "dinov2-lora", "dinov2-dora"],
)
def test_peft_recipes_train_tiny_transformers_and_save_merged_weights(
    binary_dataset: Path, tmp_path: Path, arch: dict[str, object], method: str
) -> None:
    recipe = tiny_recipe(
        epochs=1,
        arch=arch,
        preprocess={"channels": 3, "mean": [0.5], "std": [0.5]},
        peft={"method": method, "rank": 2, "alpha": 4, "dropout": 0.1},
        loss={"name": "focal", "class_weights": "balanced"},
        augment={"hflip": True},
    )
    result = train(binary_dataset, tmp_path, recipe)
    assert result.metric_name == "mcc"
    model, preprocess, meta = saved_model(tmp_path)  # a plain model: adapters were merged before saving
    assert preprocess.channels == 3 and meta["positive_class"] == "c1"
    assert not any("lora" in k for k in load_file(str(tmp_path / "model" / "model.safetensors")))
    with np.load(tmp_path / "logits" / "val_test.npz") as npz:
        images = load_dataset(binary_dataset).split("val_test", "evaluate").images
        np.testing.assert_array_equal(npz["logits"], st.predict_logits(model, images, preprocess))


def test_peft_trains_only_adapters_and_head(binary_dataset: Path) -> None:
    recipe = tiny_recipe(arch=TINY_VIT, preprocess={"channels": 3}, peft={"method": "lora", "rank": 2})
    arch = st.resolve_arch(recipe, 2, st.resolve_preprocess(recipe, 1))
    model = loop.build_trainable_model(recipe, arch, None)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or ".head." in n for n in trainable)


# ------------------------------------------------------------------------------------------ pure helpers


def test_predict_logits_matches_forward_on_shared_preprocessing() -> None:
    torch.manual_seed(0)
    model = build_model(ArchSpec("cnn-small", 3, 1, 8, width=4)).eval()
    images = np.random.default_rng(0).integers(0, 255, (10, 6, 6, 1), dtype=np.uint8)
    spec = PreprocessSpec(size=8)
    with torch.no_grad():
        expected = model(to_model_input(images, spec)).numpy()
    got = st.predict_logits(model, images, spec, batch_size=3)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_per_batch_preprocessing_in_workers_matches_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large splits are preprocessed per batch in DataLoader workers; the values equal the cached path."""
    images = np.random.default_rng(0).integers(0, 255, (20, 6, 6, 1), dtype=np.uint8)
    spec = PreprocessSpec(size=8)
    batches = batching.batches(np.random.default_rng(1).permutation(20), 6)
    cached = batching.ModelInputs(images, spec)
    monkeypatch.setattr(batching, "CACHE_LIMIT_BYTES", 0)
    streamed = batching.ModelInputs(images, spec)
    assert cached.cached is not None and streamed.cached is None
    for (xa, ia), (xb, ib) in zip(cached.iterate(batches, 0), streamed.iterate(batches, 1), strict=True):
        np.testing.assert_array_equal(ia, ib)
        torch.testing.assert_close(xa, xb, rtol=0, atol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_equals_cross_entropy_for_one_hot_targets(smoothing: float) -> None:
    logits = torch.randn(7, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    targets = losses.soft_targets(y, 4, smoothing)
    ours = losses.weighted_loss(logits, targets, torch.ones(4), LossSpec(label_smoothing=smoothing))
    assert float(ours) == pytest.approx(float(F.cross_entropy(logits, y, label_smoothing=smoothing)), rel=1e-6)
    weights = torch.tensor([1.0, 2.0, 0.5, 3.0])
    expected = F.cross_entropy(logits, y, weight=weights)
    assert float(losses.weighted_loss(logits, losses.soft_targets(y, 4, 0.0), weights, LossSpec())) == pytest.approx(
        float(expected), rel=1e-6
    )


def test_focal_loss_down_weights_easy_examples() -> None:
    logits = torch.tensor([[4.0, -4.0], [0.1, -0.1]])
    targets = losses.soft_targets(torch.tensor([0, 0]), 2, 0.0)
    ce = losses.weighted_loss(logits, targets, torch.ones(2), LossSpec(name="cross_entropy"))
    focal = losses.weighted_loss(logits, targets, torch.ones(2), LossSpec(name="focal", focal_gamma=2.0))
    same = losses.weighted_loss(logits, targets, torch.ones(2), LossSpec(name="focal", focal_gamma=0.0))
    assert float(focal) < float(ce) and float(same) == pytest.approx(float(ce))


def test_augment_without_settings_is_identity_and_mixing_keeps_targets_normalised() -> None:
    x = torch.randn(6, 1, 8, 8)
    plain = tiny_recipe(augment={"rotation_deg": 0, "translate": 0, "scale": [1, 1], "erasing_prob": 0})
    rng = np.random.default_rng(0)
    assert torch.equal(aug.augment(x, plain.augment, rng, torch.tensor([-1.0])), x)
    mixing = tiny_recipe(augment={"mixup_alpha": 1.0, "cutmix_alpha": 1.0, "mix_prob": 1.0})
    targets = losses.soft_targets(torch.arange(6) % 3, 3, 0.1)
    for seed in range(6):
        mixed, t = aug.mix(x, targets, mixing.augment, np.random.default_rng(seed))
        assert mixed.shape == x.shape
        torch.testing.assert_close(t.sum(dim=1), torch.ones(6))


def test_affine_fills_borders_with_black() -> None:
    x = torch.full((4, 1, 8, 8), 1.0)  # a white image, normalised
    recipe = tiny_recipe(augment={"rotation_deg": 0, "translate": 0.4, "scale": [1, 1], "affine_prob": 1.0})
    black = torch.tensor([-1.0])
    out = aug.augment(x, recipe.augment, np.random.default_rng(3), black)
    assert out.min() >= -1.0 - 1e-6 and out.max() <= 1.0 + 1e-6
    assert (out < 0).any()  # shifted content leaves black borders, not mid-grey ones


def test_elastic_warp_is_smooth_bounded_and_sized_by_alpha() -> None:
    shape = torch.Size((32, 1, 28, 28))
    pixels = aug.elastic_offsets(shape, 34.0, 4.0, np.random.default_rng(0)) / torch.tensor([2 / 28, 2 / 28])
    # uniform noise smoothed by a sigma-4 Gaussian has std ~0.577 / (2 sqrt(pi) 4) ~ 0.04 -> ~1.4 px at alpha 34
    assert 0.7 < float(pixels.std()) < 2.5
    neighbours = torch.corrcoef(torch.stack([pixels[:, :, :-1].flatten(), pixels[:, :, 1:].flatten()]))[0, 1]
    assert float(neighbours) > 0.9  # a smooth field, not pixel noise
    half = aug.elastic_offsets(shape, 17.0, 4.0, np.random.default_rng(0))
    torch.testing.assert_close(half * 2, aug.elastic_offsets(shape, 34.0, 4.0, np.random.default_rng(0)))

    x = torch.full((4, 1, 28, 28), -1.0)
    x[:, :, 8:20, 12:16] = 1.0  # a white bar on black
    recipe = tiny_recipe(augment={"rotation_deg": 0, "translate": 0, "scale": [1, 1], "elastic_alpha": 34.0})
    out = aug.augment(x, recipe.augment, np.random.default_rng(1), torch.tensor([-1.0]))
    assert not torch.allclose(out, x)
    assert out.min() >= -1.0 - 1e-5 and out.max() <= 1.0 + 1e-5
    assert torch.equal(out[:, :, :2], x[:, :, :2])  # far from the bar the black background stays black
    with pytest.raises(RecipeError, match=r"augment.elastic_sigma=0.1 .*allowed values: \[0.5, 20\]"):
        tiny_recipe(augment={"elastic_sigma": 0.1})


def test_erasing_blanks_a_box_per_image() -> None:
    x = torch.ones(5, 1, 8, 8)
    recipe = tiny_recipe(augment={"rotation_deg": 0, "translate": 0, "scale": [1, 1], "erasing_prob": 1.0,
                                  "erasing_area": [0.2, 0.3]})  # fmt: skip
    out = aug.augment(x, recipe.augment, np.random.default_rng(0), torch.tensor([-1.0]))
    erased = (out == 0).float().mean(dim=(1, 2, 3))
    assert ((erased > 0.05) & (erased < 0.6)).all()


def test_lr_schedule_warms_up_then_decays_to_the_floor() -> None:
    factors = [schedule.lr_factor(s, 100, 10, "cosine", 0.01) for s in range(101)]
    assert all(a < b for a, b in itertools.pairwise(factors[:11]))
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    assert factors[-1] == pytest.approx(0.01)
    assert schedule.lr_factor(50, 100, 10, "constant", 0.01) == 1.0


def test_balanced_class_weights_have_mean_one() -> None:
    recipe = tiny_recipe(loss={"class_weights": "balanced"})
    w = losses.class_weights(recipe.loss, np.array([0, 0, 0, 1], dtype=np.int64), 2)
    assert float(w.mean()) == pytest.approx(1.0) and float(w[1]) == pytest.approx(3 * float(w[0]))
    with pytest.raises(errors.TrainError, match="3 values; this task has 2 classes"):
        losses.class_weights(tiny_recipe(loss={"class_weights": [1, 2, 3]}).loss, np.array([0, 1]), 2)


def test_mcc_selection_needs_a_binary_task() -> None:
    with pytest.raises(errors.TrainError, match="needs a binary task"):
        st.selection_metric_name(tiny_recipe(early_stopping={"metric": "mcc"}), 3)


# --------------------------------------------------------------------------------------------- kfp.local


@pytest.mark.parametrize("mirrored", [False, True], ids=["local-checkpoint", "mirrored-to-s3"])
def test_component_runs_under_kfp_local_and_a_retry_resumes(
    dataset: Path, tmp_path: Path, mirrored: bool, request: pytest.FixtureRequest
) -> None:
    """The first attempt crashes after epoch 1 (test hook); set_retry reruns it and it resumes from epoch 1.
    With checkpoint_uri the checkpoint is mirrored to S3 during the run and the mirror is removed at the end."""
    from kfp import dsl, local

    from visionpipe.serving import storage

    mirror = storage.join(request.getfixturevalue("s3_bucket"), "checkpoints") if mirrored else ""
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    overrides = json.dumps({k: v for k, v in TINY.items() if k != "epochs"} | {"epochs": 2})

    @dsl.pipeline
    def train_pipeline(dataset_uri: str) -> None:
        ds = dsl.importer(artifact_uri=dataset_uri, artifact_class=dsl.Dataset, reimport=False)
        task = supervised_train(
            dataset=ds.output, recipe="digits-cnn", recipe_overrides_json=overrides, checkpoint_uri=mirror
        )
        task.set_env_variable("VISIONPIPE_CRASH_AFTER_EPOCH", "1")
        task.set_retry(num_retries=1)

    train_pipeline(dataset_uri=str(dataset))
    found = list((tmp_path / "root").rglob("model.safetensors"))
    assert len(found) == 1
    task_root = found[0].parent.parent
    assert (task_root / "logits" / "val_calib.npz").is_file()
    assert "<img" in (task_root / "curve").read_text()
    assert (task_root / "model-checkpoint" / "state.json").is_file()
    meta = json.loads((task_root / "model" / "model.json").read_text())
    assert meta["recipe"]["epochs"] == 2 and len(meta["history"]) == 2
    # the retried run equals an uninterrupted core run of the same recipe
    train(dataset, tmp_path / "direct", tiny_recipe(epochs=2))
    a = load_file(str(found[0]))
    b = load_file(str(tmp_path / "direct" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    if mirrored:
        assert storage.list_uris(mirror) == []
