"""Label efficiency: does domain pretraining (DINO, visionpipe/phases/domain_pretrain.py) help with 10% of the labels?

Protocol (CPU, < 15 min on 2 cores):
  1. data_fetch the MNIST 5k training folder -> Dataset (train 3,500 / val_select / val_calib / val_test 500).
  2. domain_pretrain on the train split's images (labels unused) -> backbone.
  3. Keep `--label-fraction` of the train labels (stratified, one subset per seed). For each seed, fine-tune
     the same architecture twice with the same budget (epochs, lr, augmentation): from the pretrained backbone
     and from scratch (same initial head). Report accuracy on val_test and, as a final evaluation only,
     on mnist-test-dev (never used to train, select or tune anything).
  4. Linear probe (logistic regression on frozen features of the labelled subset) of the pretrained and of the
     random backbone: a direct read of what the self-supervised features hold.

No weights can be downloaded here, so the "pretrained" backbone starts from random initialisation; with every
block trainable (`--unfreeze-last-blocks` = num layers, the default) this is plain DINO pretraining on the
domain. ExPLoRA proper (last block + LoRA on the rest) presumes a pretrained start: `--unfreeze-last-blocks 1`
runs it anyway, from random frozen blocks.

  .venv/bin/python bench/label_efficiency.py                      # the reported run
  .venv/bin/python bench/label_efficiency.py --pretrain-epochs 2 --finetune-epochs 5 --seeds 1   # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from visionpipe.data.datasets import load_dataset
from visionpipe.phases.data_fetch import run as fetch
from visionpipe.phases.domain_pretrain import make_views
from visionpipe.phases.domain_pretrain import run as pretrain
from visionpipe.serving.models import VisionClassifier, build_model, load_pretrained_backbone
from visionpipe.serving.preprocessing import to_model_input
from visionpipe.specs import ArchSpec, PreprocessSpec
from visionpipe.training.pretrain_config import PretrainConfig

TRAIN_DIR = Path("/work/shared/datasets/mnist-5k-train")
TEST_DIR = Path("/work/shared/datasets/mnist-test-dev")  # final evaluation only


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="label-eff-"))
    t_start = time.perf_counter()
    arch = ArchSpec(
        name=args.arch,
        num_classes=10,
        in_channels=1,
        image_size=28,
        patch_size=args.patch_size,
        hidden_dim=args.hidden_dim,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        mlp_dim=2 * args.hidden_dim,
        width=16,
    )
    prep = PreprocessSpec(size=28)
    fetch(str(TRAIN_DIR), work / "ds")
    ds = load_dataset(work / "ds")
    train, test = ds.split("train", "fit"), ds.split("val_test", "evaluate")
    final = _final_eval_images(work, args)
    print(f"data: train {len(train.labels)}, val_test {len(test.labels)}, final {len(final[1]) if final else 0}")

    config = PretrainConfig(
        epochs=args.pretrain_epochs,
        batch_size=64,
        lr=args.pretrain_lr,
        unfreeze_last_blocks=args.unfreeze_last_blocks or args.num_layers,
        lora_rank=8,
        num_local_crops=args.local_crops,
        out_dim=1024,
        teacher_momentum=0.99,
        koleo_weight=args.koleo_weight,
        collapse_patience=0,  # warn only: the figures below are reported either way
        seed=0,
    )
    t0 = time.perf_counter()
    result = pretrain(work / "ds", work / "backbone", arch, prep, config)
    pretrain_s = time.perf_counter() - t0
    print(f"collapsed epochs (warned): {result.collapsed_epochs or 'none'}")

    x_train, x_test = to_model_input(train.images, prep), to_model_input(test.images, prep)
    x_final = to_model_input(final[0], prep) if final else None
    rows: list[dict[str, object]] = []
    for seed in range(args.seeds):
        idx = _label_subset(train.labels, args.label_fraction, seed)
        for start in ("pretrained", "scratch"):
            model = _fresh(arch, seed, work / "backbone" if start == "pretrained" else None)
            probe = _linear_probe(model, x_train[idx], train.labels[idx], x_test, test.labels)
            t1 = time.perf_counter()
            _finetune(model, x_train[idx], train.labels[idx], args, seed)
            row: dict[str, object] = {
                "seed": seed,
                "start": start,
                "labels": len(idx),
                "linear_probe_val_test": probe,
                "val_test": _accuracy(model, x_test, test.labels),
                "mnist_test_dev": _accuracy(model, x_final, final[1]) if final and x_final is not None else None,
                "finetune_s": time.perf_counter() - t1,
            }
            rows.append(row)
            print(json.dumps(row))
    report(rows, result.history, pretrain_s, time.perf_counter() - t_start, arch, config, args)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit", choices=["vit", "dinov2", "cnn-small"])
    p.add_argument("--patch-size", type=int, default=7)
    p.add_argument("--hidden-dim", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--unfreeze-last-blocks", type=int, default=0, help="0 = all blocks (plain DINO)")
    p.add_argument("--pretrain-epochs", type=int, default=20)
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--local-crops", type=int, default=2)
    p.add_argument("--koleo-weight", type=float, default=0.1)
    p.add_argument("--finetune-epochs", type=int, default=40)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--label-fraction", type=float, default=0.1)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-final-eval", action="store_true", help="skip mnist-test-dev")
    return p.parse_args()


def _final_eval_images(work: Path, args: argparse.Namespace) -> tuple[npt.NDArray[np.uint8], np.ndarray] | None:
    if args.no_final_eval or not TEST_DIR.is_dir():
        return None
    fetch(str(TEST_DIR), work / "final")
    ds = load_dataset(work / "final")
    return np.asarray(ds.images), ds.labels  # every image: evaluation only


def _label_subset(labels: npt.NDArray[np.int64], fraction: float, seed: int) -> npt.NDArray[np.int64]:
    rng = np.random.default_rng(1000 + seed)
    picks = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        picks.append(rng.choice(members, size=max(1, round(fraction * len(members))), replace=False))
    return np.sort(np.concatenate(picks)).astype(np.int64)


def _fresh(arch: ArchSpec, seed: int, backbone: Path | None) -> VisionClassifier:
    torch.manual_seed(seed)
    model = build_model(arch)
    if backbone is not None:
        load_pretrained_backbone(model, str(backbone))
    return model


def _finetune(
    model: VisionClassifier, x: torch.Tensor, y: npt.NDArray[np.int64], args: argparse.Namespace, seed: int
) -> None:
    """Same budget for both starts: AdamW, cosine lr, light crop/rotation augmentation, batch 32."""
    aug = PretrainConfig(num_local_crops=0, global_crop_scale=(0.7, 1.0), rotation_degrees=10.0)
    labels = torch.from_numpy(y)
    opt = torch.optim.AdamW(model.parameters(), lr=args.finetune_lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(x) / 32)
    total = steps_per_epoch * args.finetune_epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.finetune_lr, total_steps=total, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(args.finetune_epochs):
        order = torch.randperm(len(x), generator=gen)
        for s in range(steps_per_epoch):
            idx = order[s * 32 : (s + 1) * 32]
            view = make_views(x[idx], aug, gen)[0]
            loss = F.cross_entropy(model(view), labels[idx], label_smoothing=0.1)
            opt.zero_grad()
            torch.autograd.backward(loss)
            opt.step()
            sched.step()
    model.eval()


@torch.no_grad()
def _accuracy(model: VisionClassifier, x: torch.Tensor | None, y: np.ndarray) -> float:
    assert x is not None
    model.eval()
    preds = torch.cat([model(x[i : i + 512]).argmax(1) for i in range(0, len(x), 512)]).numpy()
    return float((preds == y).mean())


@torch.no_grad()
def _linear_probe(
    model: VisionClassifier, x_fit: torch.Tensor, y_fit: np.ndarray, x_eval: torch.Tensor, y_eval: np.ndarray
) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    model.eval()
    f_fit = torch.cat([model.features(x_fit[i : i + 512]) for i in range(0, len(x_fit), 512)]).numpy()
    f_eval = torch.cat([model.features(x_eval[i : i + 512]) for i in range(0, len(x_eval), 512)]).numpy()
    scaler = StandardScaler().fit(f_fit)
    clf = LogisticRegression(max_iter=2000, C=0.5).fit(scaler.transform(f_fit), y_fit)
    return float(clf.score(scaler.transform(f_eval), y_eval))


def report(
    rows: list[dict[str, object]],
    history: list[dict[str, float]],
    pretrain_s: float,
    total_s: float,
    arch: ArchSpec,
    config: PretrainConfig,
    args: argparse.Namespace,
) -> None:
    print("\n## label efficiency", f"({args.label_fraction:.0%} of train labels, {args.seeds} seed(s))")
    print(f"arch {json.dumps(arch.to_dict())}")
    print(
        f"pretrain: {config.epochs} epochs, {pretrain_s:.0f} s, final loss {history[-1]['loss']:.3f}, "
        f"feature_std {history[-1]['feature_std']:.3f}, unfreeze_last_blocks {config.unfreeze_last_blocks}"
    )
    print("| start | linear probe (val_test) | fine-tuned val_test | fine-tuned mnist-test-dev |")
    print("|---|---:|---:|---:|")
    for start in ("pretrained", "scratch"):
        sel = [r for r in rows if r["start"] == start]
        cells = []
        for key in ("linear_probe_val_test", "val_test", "mnist_test_dev"):
            vals = [float(str(r[key])) for r in sel if r[key] is not None]
            cells.append(f"{np.mean(vals):.4f} ± {np.std(vals):.4f}" if vals else "n/a")
        print(f"| {start} | " + " | ".join(cells) + " |")
    print(f"total wall time {total_s:.0f} s")


if __name__ == "__main__":
    main()
