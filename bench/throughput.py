"""Benchmark: training throughput (images/s) per shipped recipe / architecture on this machine's CPU.

Each recipe's model is built exactly as supervised_train builds it (seeded init, PEFT adapters when the recipe
asks), and timed over full training steps (augmentation, forward, loss, backward, optimizer step) on random
images at the recipe's input size. Evaluation throughput (eval mode, no grad) is reported too.

    .venv/bin/python bench/throughput.py [--recipes digits-cnn,digits-resnet18,...] [--steps 5]
        [--max-batch 32] [--threads N]
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/train_mnist.py

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from visionpipe.serving.models import count_parameters  # noqa: E402
from visionpipe.specs.resolve import resolve_arch, resolve_preprocess  # noqa: E402
from visionpipe.training import augment as aug  # noqa: E402
from visionpipe.training.loop import build_trainable_model, make_optimizer, training_memory_format  # noqa: E402
from visionpipe.training.losses import soft_targets, weighted_loss  # noqa: E402
from visionpipe.training.recipes import list_recipes, load_recipe  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default=",".join(list_recipes()))
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per recipe (after 1 warmup)")
    parser.add_argument("--max-batch", type=int, default=32, help="cap on the recipe's batch size")
    parser.add_argument("--num-classes", type=int, default=0, help="0 = 10 for digits recipes, else 2")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    header = f"{'recipe':<22} {'arch':<10} {'peft':<5} {'input':<10} {'trainable/total':>21} {'batch':>5}"
    print(header + f" {'train img/s':>11} {'eval img/s':>10}")
    for name in args.recipes.split(","):
        row = measure(name, args.steps, args.max_batch, args.num_classes)
        print(row, flush=True)
    return 0


def measure(name: str, steps: int, max_batch: int, num_classes: int) -> str:
    recipe = load_recipe(name)
    classes = num_classes or (10 if name.startswith("digits") else 2)
    preprocess = resolve_preprocess(recipe, 1 if recipe.preprocess.channels in (0, 1) else 3)
    arch = resolve_arch(recipe, classes, preprocess)
    memory_format = training_memory_format(arch)
    model = build_trainable_model(recipe, arch, None).to(memory_format=memory_format)
    optimizer = make_optimizer(model, recipe)
    batch = min(recipe.batch_size, max_batch)
    x = torch.randn(batch, preprocess.channels, preprocess.size, preprocess.size)
    y = torch.arange(batch) % classes
    weights = torch.ones(classes)
    fill = aug.black_level(preprocess)
    rng = np.random.default_rng(0)

    def step() -> None:
        xb = aug.augment(x, recipe.augment, rng, fill)
        xb, targets = aug.mix(xb, soft_targets(y, classes, recipe.loss.label_smoothing), recipe.augment, rng)
        xb = xb.contiguous(memory_format=memory_format)
        loss = weighted_loss(model(xb).float(), targets, weights, recipe.loss)
        torch.autograd.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    train_rate = steps * batch / (time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        model(x)
        t0 = time.perf_counter()
        for _ in range(steps):
            model(x)
        eval_rate = steps * batch / (time.perf_counter() - t0)
    params = f"{count_parameters(model, trainable_only=True):,}/{count_parameters(model):,}"
    size = f"{preprocess.channels}x{preprocess.size}x{preprocess.size}"
    return (
        f"{name:<22} {arch.name:<10} {recipe.peft.method:<5} {size:<10} {params:>21} {batch:>5}"
        f" {train_rate:>11.1f} {eval_rate:>10.1f}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
