"""Data-parallel supervised_train under torchrun (gloo, CPU): 2 workers == 1 worker == one plain process
(same global batch and seed), a worker SIGKILLed mid-epoch resumes from rank 0's checkpoint, the outputs keep
the single-process format, and the train_worker / run_torchrun contracts.

The torchrun launches are slow here (each process imports torch, ~10 s on this machine), so one module fixture
starts all of them at once and the tests share their outputs."""

import json
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from visionpipe.phases import supervised_train as st
from visionpipe.phases import train_worker
from visionpipe.serving import storage
from visionpipe.training import distributed
from visionpipe.training.errors import TrainError
from visionpipe.training.loop import build_trainable_model
from visionpipe.training.losses import weighted_loss
from visionpipe.training.peft import merge_peft
from visionpipe.training.recipes import LossSpec, RecipeError, load_recipe, recipe_hash

sys.path.insert(0, str(Path(__file__).parent))
from test_supervised_train import make_dataset  # the shared tiny dataset writer

# cnn-small has batch norm (2d and 1d): the global-batch statistics are part of what is checked. No dropout:
# dropout masks are drawn per rank (visionpipe/training/distributed.py), so they would differ by design.
OVERRIDES = {
    "epochs": 3,
    "batch_size": 16,
    "eval_batch_size": 64,
    "num_workers": 0,
    "grad_accum_steps": 2,
    "arch": {"name": "cnn-small", "width": 4, "dropout": 0.0},
    "preprocess": {"kind": "standard", "channels": 0, "size": 8, "mean": [0.5], "std": [0.5]},
    "optimizer": {"name": "adamw", "lr": 0.01},
    "schedule": {"warmup_epochs": 1},
    "augment": {
        "rotation_deg": 10,
        "translate": 0.1,
        "scale": [0.9, 1.1],
        "erasing_prob": 0.3,
        "mix_prob": 0.5,
        "mixup_alpha": 0.4,
        "cutmix_alpha": 1.0,
    },
    "loss": {"label_smoothing": 0.1, "class_weights": "balanced"},
    "ema": {"enabled": True, "decay": 0.9},
    "early_stopping": {"patience": 0},
}
# 66 train images / batch 16 = 4 global batches, 2 per optimizer step (grad_accum_steps): 2 steps per epoch, so
# step 3 is mid epoch 2, after epoch 1's checkpoint
KILL_AT_STEP = 3
TOLERANCE = 1e-4  # max |delta w| allowed between worker counts (measured: ~1e-6)
# the files train_worker writes under --out (its docstring's layout)
WORKER_OUTPUTS = {
    "model/model.safetensors",
    "model/model.json",
    "logits/val_calib.npz",
    "logits/val_test.npz",
    "logits/meta.json",
    "curve.png",
    "result.json",
    "_SUCCESS",
}


# FSDP2 (distributed.strategy fsdp2) on the transformer recipes: a tiny ViT with DoRA adapters on its MLP and a
# tiny DINOv2 with LoRA, EMA on (sharded twin), gradient accumulation and clipping, the same augmentation as above.
# peft's adapter dropout is off for the same reason as the model's.
FSDP2_BASE = {
    **{k: v for k, v in OVERRIDES.items() if k not in ("arch", "preprocess")},
    "preprocess": {"kind": "standard", "channels": 0, "size": 8, "mean": [0.5], "std": [0.5]},
    "optimizer": {"name": "adamw", "lr": 0.005},
    "grad_clip_norm": 1.0,
    "early_stopping": {"metric": "auto", "patience": 0},
    "loss": {"name": "cross_entropy", "label_smoothing": 0.1, "class_weights": "balanced"},
    "distributed": {"strategy": "fsdp2"},
}
TRANSFORMER = {"patch_size": 4, "hidden_dim": 16, "num_layers": 2, "num_heads": 2, "dropout": 0.0}
FSDP2_RECIPES = {
    "vit": (
        "roadwork-vit-dora",
        {
            **FSDP2_BASE,
            "arch": {"name": "vit", **TRANSFORMER, "mlp_dim": 32},
            "peft": {"method": "dora", "rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["mlp.0", "mlp.3"]},
        },
    ),
    "dinov2": (
        "roadwork-dinov2-lora",
        {
            **FSDP2_BASE,
            "arch": {"name": "dinov2", **TRANSFORMER, "mlp_dim": 64},
            "peft": {"method": "lora", "rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": []},
        },
    ),
}


def worker_argv(dataset: Path, out: Path, seed: int = 0, arch: str = "") -> list[str]:
    recipe, overrides = FSDP2_RECIPES[arch] if arch else ("digits-cnn", OVERRIDES)
    return [
        "--dataset",
        str(dataset),
        "--out",
        str(out),
        "--recipe",
        recipe,
        "--recipe-overrides-json",
        json.dumps({**overrides, "seed": seed}),
        "--device",
        "cpu",
    ]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ddp-data"))


@pytest.fixture(scope="module")
def plain(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One plain process (train_worker.main in this process, no torchrun environment)."""
    out = tmp_path_factory.mktemp("ddp-plain") / "out"
    assert train_worker.main(worker_argv(dataset, out)) == 0
    return out


@pytest.fixture(scope="module")
def runs(dataset: Path, plain: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Output folders: plain; seed1 (plain, another seed); torchrun1 / torchrun2 (1 / 2 workers under torchrun);
    killed (2 workers, rank 1 SIGKILLed after step KILL_AT_STEP, --max-restarts=1); the log of a launch
    that fails (a bad recipe override) under "failed"; and FSDP2: fsdp2-<arch>-plain (one process),
    fsdp2-<arch> (2 workers) for vit and dinov2, fsdp2-vit-killed (killed as above). The launches run at once
    (each costs ~10 s of torch import per process here)."""
    root = tmp_path_factory.mktemp("ddp")
    names = ("seed1", "torchrun1", "torchrun2", "killed", "failed", "fsdp2-vit", "fsdp2-vit-killed", "fsdp2-dinov2")
    names += ("fsdp2-vit-plain", "fsdp2-dinov2-plain")
    out = {name: root / name for name in names}
    logs: dict[str, list[str]] = {name: [] for name in out}

    def launch(
        name: str, nproc: int, env: dict[str, str] | None = None, restarts: int = 0, argv: list[str] | None = None
    ) -> Callable[[], None]:
        def go() -> None:
            distributed.run_torchrun(
                nproc,
                argv or worker_argv(dataset, out[name]),
                env=env,
                timeout_s=400,
                log=logs[name].append,
                max_restarts=restarts,
            )

        return go

    bad = [*worker_argv(dataset, out["failed"])[:6], "--recipe-overrides-json", '{"optimizer.name": "lion"}']
    jobs = {
        "torchrun2": launch("torchrun2", 2),
        "killed": launch("killed", 2, {distributed.KILL_HOOK_ENV: f"1:{KILL_AT_STEP}"}, restarts=1),
        "torchrun1": launch("torchrun1", 1),
        "failed": launch("failed", 1, argv=bad),
        "fsdp2-vit": launch("fsdp2-vit", 2, argv=worker_argv(dataset, out["fsdp2-vit"], arch="vit")),
        "fsdp2-vit-killed": launch(
            "fsdp2-vit-killed",
            2,
            {distributed.KILL_HOOK_ENV: f"1:{KILL_AT_STEP}"},
            restarts=1,
            argv=worker_argv(dataset, out["fsdp2-vit-killed"], arch="vit"),
        ),
        "fsdp2-dinov2": launch("fsdp2-dinov2", 2, argv=worker_argv(dataset, out["fsdp2-dinov2"], arch="dinov2")),
    }
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        assert train_worker.main(worker_argv(dataset, out["seed1"], seed=1)) == 0
        for arch in ("vit", "dinov2"):
            assert train_worker.main(worker_argv(dataset, out[f"fsdp2-{arch}-plain"], arch=arch)) == 0
        for name, future in futures.items():
            if name == "failed":
                with pytest.raises(distributed.TorchrunFailed) as failure:
                    future.result()
                out["failed"].mkdir(parents=True, exist_ok=True)
                (out["failed"] / "error.txt").write_text(str(failure.value))
            else:
                future.result()
    return {"plain": plain, **out}


def weights(out: Path) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for k, v in load_file(str(out / "model" / st.MODEL_FILE)).items()}


def max_delta(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    return max(float(np.abs(wa[k] - wb[k]).max()) for k in wa)


def result(out: Path) -> st.TrainResult:
    return st.TrainResult.from_json((out / train_worker.RESULT_FILE).read_text())


@pytest.mark.long
def test_two_workers_one_worker_and_one_process_reach_the_same_weights(runs: dict[str, Path]) -> None:
    d_2_vs_plain = max_delta(runs["torchrun2"], runs["plain"])
    d_1_vs_plain = max_delta(runs["torchrun1"], runs["plain"])
    d_seed = max_delta(runs["seed1"], runs["plain"])
    assert d_2_vs_plain < TOLERANCE, d_2_vs_plain
    assert d_1_vs_plain < TOLERANCE, d_1_vs_plain
    assert d_seed > 100 * TOLERANCE, d_seed  # another seed does differ: the comparison can fail
    plain, two = result(runs["plain"]), result(runs["torchrun2"])
    assert two.epochs_run == plain.epochs_run == OVERRIDES["epochs"]
    assert two.best_epoch == plain.best_epoch
    for h2, h1 in zip(two.history, plain.history, strict=True):
        assert h2["train_loss"] == pytest.approx(h1["train_loss"], abs=1e-5)  # the global batch's loss
        assert h2["val_select_loss"] == pytest.approx(h1["val_select_loss"], abs=1e-4)
        assert h2["train_images"] == h1["train_images"]
    for split in ("val_calib", "val_test"):
        a = np.load(runs["torchrun2"] / "logits" / f"{split}.npz")["logits"]
        b = np.load(runs["plain"] / "logits" / f"{split}.npz")["logits"]
        assert float(np.abs(a - b).max()) < 1e-3


@pytest.mark.long
def test_killed_worker_resumes_from_the_last_checkpoint_and_matches(runs: dict[str, Path]) -> None:
    killed = result(runs["killed"])
    assert killed.resumed_from_epoch == 1  # the restarted group loaded epoch 1's checkpoint (fresh would be 0)
    assert killed.epochs_run == OVERRIDES["epochs"]
    assert (runs["killed"] / train_worker.SUCCESS_FILE).is_file()
    assert max_delta(runs["killed"], runs["torchrun2"]) < TOLERANCE
    assert [h["train_loss"] for h in killed.history] == pytest.approx(
        [h["train_loss"] for h in result(runs["torchrun2"]).history], abs=1e-5
    )


@pytest.mark.long
@pytest.mark.parametrize("arch", ["vit", "dinov2"])
def test_fsdp2_two_workers_reach_the_one_process_weights(runs: dict[str, Path], arch: str) -> None:
    """FSDP2: sharded parameters, gradients (reduce-scattered), optimizer state and EMA twin; evaluation
    sharded over both ranks; the gathered result is the one-process run's."""
    two, plain = runs[f"fsdp2-{arch}"], runs[f"fsdp2-{arch}-plain"]
    assert max_delta(two, plain) < TOLERANCE
    a, b = result(two), result(plain)
    assert a.epochs_run == b.epochs_run == OVERRIDES["epochs"] and a.best_epoch == b.best_epoch
    for h2, h1 in zip(a.history, b.history, strict=True):
        assert h2["train_loss"] == pytest.approx(h1["train_loss"], abs=1e-5)
        assert h2["val_select_loss"] == pytest.approx(h1["val_select_loss"], abs=1e-4)  # the sharded evaluation
    recipe = load_recipe(*FSDP2_RECIPES[arch])  # the run did train: far from its seeded init (the comparison can fail)
    spec = st.resolve_arch(recipe, 3, st.resolve_preprocess(recipe, 1))
    init = {
        k: v.double().numpy() for k, v in merge_peft(build_trainable_model(recipe, spec, None)).state_dict().items()
    }
    trained = weights(two)
    assert max(float(np.abs(trained[k] - init[k]).max()) for k in trained) > 100 * TOLERANCE
    meta = json.loads((two / "model" / st.MODEL_META_FILE).read_text())
    assert meta["recipe"]["distributed"] == {"strategy": "fsdp2"}


@pytest.mark.long
def test_fsdp2_killed_worker_resumes_from_the_gathered_checkpoint(runs: dict[str, Path]) -> None:
    """The checkpoint of a sharded run (whole model, EMA and optimizer state gathered on rank 0, the
    one-process format) loads back into the shards after a restart and the run ends where an unbroken one does."""
    killed = result(runs["fsdp2-vit-killed"])
    assert killed.resumed_from_epoch == 1
    assert max_delta(runs["fsdp2-vit-killed"], runs["fsdp2-vit"]) < TOLERANCE
    assert [h["val_select_loss"] for h in killed.history] == pytest.approx(
        [h["val_select_loss"] for h in result(runs["fsdp2-vit"]).history], abs=1e-5
    )


@pytest.mark.long
def test_outputs_keep_the_single_process_format(runs: dict[str, Path]) -> None:
    def files(out: Path) -> list[str]:
        return sorted(
            p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and ".checkpoint" not in p.parts
        )

    plain, two = runs["plain"], runs["torchrun2"]
    assert files(two) == files(plain) == files(runs["killed"])
    assert files(runs["fsdp2-vit"]) == files(runs["fsdp2-vit-plain"]) == files(plain)
    assert set(files(plain)) >= WORKER_OUTPUTS
    a, b = load_file(str(two / "model" / st.MODEL_FILE)), load_file(str(plain / "model" / st.MODEL_FILE))
    assert {k: (tuple(v.shape), v.dtype) for k, v in a.items()} == {k: (tuple(v.shape), v.dtype) for k, v in b.items()}
    meta2 = json.loads((two / "model" / st.MODEL_META_FILE).read_text())
    meta1 = json.loads((plain / "model" / st.MODEL_META_FILE).read_text())
    assert sorted(meta2) == sorted(meta1)
    for key in (
        "arch",
        "preprocess",
        "preprocess_signature",
        "classes",
        "recipe",
        "recipe_hash",
        "best_epoch",
        "split_fingerprints",
    ):
        assert meta2[key] == meta1[key], key
    assert [sorted(h) for h in meta2["history"]] == [sorted(h) for h in meta1["history"]]
    for split in ("val_calib", "val_test"):
        z2, z1 = np.load(two / "logits" / f"{split}.npz"), np.load(plain / "logits" / f"{split}.npz")
        assert sorted(z2.files) == sorted(z1.files)
        assert {k: (z2[k].shape, z2[k].dtype) for k in z2.files} == {k: (z1[k].shape, z1[k].dtype) for k in z1.files}
        assert np.array_equal(z2["labels"], z1["labels"])
    assert (two / "logits" / "meta.json").read_text() == (plain / "logits" / "meta.json").read_text()
    assert sorted(json.loads((two / "result.json").read_text())) == sorted(
        json.loads((plain / "result.json").read_text())
    )


# ------------------------------------------------------------------------------------------ fast unit checks


def test_shards_cover_the_global_batch_in_order() -> None:
    for n in (2, 7, 16):
        for world in (1, 2, 3):
            if n < world:
                continue
            bounds = [distributed.shard_bounds(n, world, r) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(bounds[r][1] == bounds[r + 1][0] for r in range(world - 1))
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(TrainError, match="cannot be split over 3 workers"):
        distributed.shard_bounds(2, 3, 0)


def test_equal_shares_have_one_length_and_cover_the_images_in_order() -> None:
    for n in (1, 5, 18, 19):
        for world in (1, 2, 3, 4):
            shares = [distributed.equal_share(n, world, r) for r in range(world)]
            assert len({len(s) for s in shares}) == 1  # the same number of batches on every rank
            assert np.concatenate(shares)[:n].tolist() == list(range(n))


def test_distributed_strategy_is_checked_with_the_allowed_values() -> None:
    with pytest.raises(RecipeError, match=r"distributed.strategy='zero3'.*ddp.*fsdp2"):
        load_recipe("roadwork-vit-dora", {"distributed.strategy": "zero3"})
    with pytest.raises(RecipeError, match=r"fsdp2.*transformer architecture \(vit, dinov2\).*'cnn-small'.*'ddp'"):
        load_recipe("digits-cnn", {"distributed.strategy": "fsdp2"})
    default = load_recipe("roadwork-vit-dora")
    fsdp2 = load_recipe("roadwork-vit-dora", {"distributed.strategy": "fsdp2"})
    assert "distributed" not in default.to_dict()  # recipes from before FSDP2 keep their content hash
    assert fsdp2.to_dict()["distributed"] == {"strategy": "fsdp2"}
    assert recipe_hash(fsdp2) != recipe_hash(default)  # a checkpoint of one is not resumed by the other


def test_optimizer_state_renumbering_round_trips_and_refuses_a_foreign_model() -> None:
    """torch.distributed.checkpoint names the parameters; checkpoints number them in param_groups order (the
    one-process layout), so a sharded run's checkpoint is the same file a one-process run writes."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW([{"params": [model[0].weight, model[1].weight]}, {"params": [model[0].bias]}])
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    numbered = dict(optimizer.state_dict())
    names = distributed.param_names(model, optimizer)
    assert names == ["0.weight", "1.weight", "0.bias"]
    by_name = distributed.renumber_by_name(numbered, names)
    assert sorted(by_name["state"]) == sorted(names)
    assert [g["params"] for g in by_name["param_groups"]] == [["0.weight", "1.weight"], ["0.bias"]]
    back = distributed.renumber_by_position(by_name, names)
    assert back["param_groups"] == numbered["param_groups"]
    assert sorted(back["state"]) == [0, 1, 2]
    with pytest.raises(TrainError, match="does not fit this model's parameters"):
        distributed.renumber_by_position(by_name, names[:2])


def test_env_context_reads_torchrun_and_refuses_nonsense() -> None:
    assert distributed.env_context({}) == distributed.SINGLE
    ctx = distributed.env_context({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (ctx.rank, ctx.local_rank, ctx.world_size, ctx.is_main, ctx.enabled) == (3, 1, 4, False, True)
    with pytest.raises(TrainError, match="RANK=4 WORLD_SIZE=4"):
        distributed.env_context({"WORLD_SIZE": "4", "RANK": "4"})
    with pytest.raises(TrainError, match="must be integers"):
        distributed.env_context({"WORLD_SIZE": "two"})


def test_train_result_json_round_trip(plain: Path) -> None:
    text = (plain / "result.json").read_text()
    parsed = st.TrainResult.from_json(text)
    assert parsed.to_json() == text
    broken = json.loads(text)
    del broken["best_epoch"]
    with pytest.raises(TrainError, match="lacks \\['best_epoch'\\]"):
        st.TrainResult.from_json(json.dumps(broken))
    with pytest.raises(TrainError, match="epochs_run='3' must be an integer"):
        st.TrainResult.from_json(json.dumps({**json.loads(text), "epochs_run": "3"}))


def test_worker_errors_exit_2_with_a_named_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = worker_argv(tmp_path / "missing", tmp_path / "out")
    assert train_worker.main(argv) == train_worker.EXIT_NAMED_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_worker: ") and "missing" in err[0], err
    bad = [*argv[:-4], "--recipe-overrides-json", json.dumps({"batch_size": 0}), "--device", "cpu"]
    assert train_worker.main(bad) == train_worker.EXIT_NAMED_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "RecipeError" in err[0] and "batch_size" in err[0], err


@pytest.mark.long
def test_run_torchrun_raises_with_the_workers_last_lines(runs: dict[str, Path]) -> None:
    message = (runs["failed"] / "error.txt").read_text()
    assert "torchrun with 1 workers exited with code 1" in message
    assert "train_worker: RecipeError: optimizer.name='lion'" in message, message


def test_plain_run_writes_the_worker_layout(plain: Path) -> None:
    """The --out layout of one process: model/, logits/, curve.png, result.json, _SUCCESS (written last)."""
    names = {p.name for p in plain.iterdir()}
    assert {"model", "logits", "curve.png", "result.json", "_SUCCESS", ".checkpoint"} == names
    last = max((p for p in plain.rglob("*") if p.is_file()), key=lambda p: p.stat().st_mtime_ns)
    assert last.name == train_worker.SUCCESS_FILE
    parsed = result(plain)
    assert parsed.resumed_from_epoch == 0 and parsed.epochs_run == OVERRIDES["epochs"]
    assert parsed.model_path == plain / "model" / st.MODEL_FILE


@pytest.fixture()
def one_rank_group(tmp_path: Path) -> Iterator[None]:
    """A real gloo process group of world size 1 in this process (a FileStore: no port), torn down after."""
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def test_global_batch_norm_matches_batch_norm(one_rank_group: None) -> None:
    """The global-batch statistics path (two-pass mean / variance through the differentiable all-reduce,
    running statistics as F.batch_norm keeps them) gives batch norm's outputs, gradients and buffers."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64) * 2 + 1
    ref, ours = torch.nn.BatchNorm2d(3).double(), torch.nn.BatchNorm2d(3).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    ours.load_state_dict(ref.state_dict())
    x_ref, x_ours = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    probe = torch.randn_like(x)
    (ref(x_ref) * probe).sum().backward()
    (distributed.global_batch_norm(ours, x_ours) * probe).sum().backward()
    assert x_ours.grad is not None and x_ref.grad is not None
    assert torch.allclose(x_ours.grad, x_ref.grad, atol=1e-6)
    assert ours.weight.grad is not None and ref.weight.grad is not None
    assert torch.allclose(ours.weight.grad, ref.weight.grad, atol=1e-6)
    for name, value in ref.state_dict().items():
        assert torch.allclose(ours.state_dict()[name].double(), value.double(), atol=1e-6), name
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.BatchNorm1d(36)
    )
    keys = list(model.state_dict())
    assert distributed.use_global_batch_norm(model) == 2
    assert list(model.state_dict()) == keys and type(model[1]) is distributed.GlobalBatchNorm2d


def test_shard_losses_add_up_to_the_global_batch_loss() -> None:
    """The shard loss of train_epoch (weighted_loss x shard weight total / global weight total) summed over the
    shards is the global batch's loss, with soft (smoothed, mixed) targets and class weights."""
    torch.manual_seed(1)
    logits = torch.randn(11, 4, dtype=torch.float64)
    targets = torch.softmax(torch.randn(11, 4, dtype=torch.float64) * 3, dim=1)
    weights = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=torch.float64)
    spec = LossSpec(name="focal", focal_gamma=2.0)
    whole = weighted_loss(logits, targets, weights, spec)
    total = (targets * weights).sum()
    for world in (2, 3, 4):
        parts = []
        for rank in range(world):
            a, b = distributed.shard_bounds(len(logits), world, rank)
            shard_total = (targets[a:b] * weights).sum()
            parts.append(weighted_loss(logits[a:b], targets[a:b], weights, spec) * (shard_total / total))
        assert float(sum(parts)) == pytest.approx(float(whole), rel=1e-12)


def test_worker_reads_and_writes_s3(dataset: Path, s3_bucket: str) -> None:
    """s3:// --dataset is downloaded, the outputs are uploaded under an s3:// --out with _SUCCESS, the checkpoint
    is mirrored to --checkpoint-uri, and the node-local staging folder is removed."""
    for path in sorted(p for p in dataset.rglob("*") if p.is_file()):
        storage.upload_file(path, storage.join(s3_bucket, "ds", path.relative_to(dataset).as_posix()))
    out, mirror = storage.join(s3_bucket, "run"), storage.join(s3_bucket, "ckpt")
    argv = worker_argv(Path("x"), Path("y"))
    argv[1], argv[3] = storage.join(s3_bucket, "ds"), out
    argv[7] = json.dumps({**OVERRIDES, "epochs": 1})
    before = set(Path(tempfile.gettempdir()).glob(f"{train_worker.STAGING_PREFIX}*"))
    assert train_worker.main([*argv, "--checkpoint-uri", mirror]) == 0
    names = {uri.removeprefix(out + "/") for uri in storage.list_uris(out)}
    assert names == WORKER_OUTPUTS
    parsed = st.TrainResult.from_json(storage.read_bytes(storage.join(out, "result.json")).decode())
    assert parsed.epochs_run == 1
    assert storage.exists(storage.join(mirror, "state.json"))
    assert set(Path(tempfile.gettempdir()).glob(f"{train_worker.STAGING_PREFIX}*")) == before
