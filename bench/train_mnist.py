"""Benchmark: train a digits recipe on mnist-5k-train, report accuracy on mnist-test-dev.

mnist-test-dev is used ONLY for the final figure printed here: it is read and evaluated once, after all training
is done, and never feeds training, epoch selection (val_select is carved out of mnist-5k-train) or any tuning
inside this script. The defaults (recipe, 4 seeds, final EMA weights, TTA 17, 2 % val_select) were chosen on
held-out folds of mnist-5k-train only, with the tuning mode below.

Usage (from the repository root):

    .venv/bin/python bench/train_mnist.py [--recipe digits-cnn-mnist] [--overrides '{"epochs": 30}']
        [--seeds 4] [--weights last|best] [--tta 17|5|off|auto] [--val-fraction 0.02] [--time-budget 780]
        [--threads 2] [--train-dir ../shared/datasets/mnist-5k-train] [--test-dir ../shared/datasets/mnist-test-dev]

    # tuning mode: train on 4 of 5 class-stratified folds of mnist-5k-train, evaluate on the fifth
    # (mnist-test-dev is not read); per-member probabilities for every TTA mode land in <work_dir>/eval_probs.npz
    .venv/bin/python bench/train_mnist.py --holdout-fold 0 [--seed-offset 2] [--work-dir DIR] ...

The last line printed is ``mnist_dev_accuracy=<float> train_seconds=<float>`` (``heldout_fold<k>of<n>_accuracy``
in tuning mode). The figure is an ENSEMBLE of --seeds models (mean softmax; --seeds 1 = a single model), trained
as parallel processes of 1 torch thread each, 2 at a time (on 2 cores this trains ~2x faster than one 2-thread
process). --weights last (the default) takes each member's final-epoch EMA weights; --weights best the epoch chosen
on val_select (what the pipeline exports). With --tta 5 / 17 each model's softmax is averaged over shifted (and,
for 17, rotated and scaled) copies of every image (visionpipe/serving/tta.py, applied to the preprocessed tensors);
--tta
auto picks the mode by the ensemble's val_select accuracy. All of it is said plainly in the output.
``train_seconds`` is the wall time of the training phase (all seeds, including their preprocessing and export);
the single test-set evaluation is not counted in it. --time-budget caps it: each member stops after the epoch
that crosses its share (budget / rounds of 2 parallel members).
"""

import os

# Under CPU contention (other processes on the cores) OpenMP's busy-waiting threads slow torch down badly;
# passive waiting is the safer choice for a benchmark. Must be set before torch is imported.
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import argparse
import io
import json
import math
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from visionpipe.data.datasets import load_dataset  # noqa: E402
from visionpipe.phases.data_fetch import run as fetch  # noqa: E402
from visionpipe.phases.supervised_train import run as train  # noqa: E402
from visionpipe.serving.models import build_model, load_weights  # noqa: E402
from visionpipe.serving.preprocessing import to_model_input  # noqa: E402
from visionpipe.serving.tta import TTA_MODES, n_variants, predict_proba_tta  # noqa: E402
from visionpipe.specs import ArchSpec, PreprocessSpec  # noqa: E402
from visionpipe.training.recipes import load_recipe, parse_overrides  # noqa: E402

DEFAULT_TRAIN = REPO.parent / "shared" / "datasets" / "mnist-5k-train"
DEFAULT_TEST = REPO.parent / "shared" / "datasets" / "mnist-test-dev"
# val_calib / val_test carved out of the training folder are unused here, so they are kept tiny (1 % each);
# val_select takes --val-fraction of it and the rest trains.
SPARE = 0.01


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-mnist-"))
    print(f"threads={torch.get_num_threads()} work_dir={work} load_average={os.getloadavg()}", flush=True)

    train_dir, test_dir, what_is_tested = args.train_dir, args.test_dir, "mnist-test-dev"
    if args.holdout_fold >= 0:  # tuning mode: evaluate on a held-out fold of the training folder instead
        train_dir, test_dir = split_folds(args.train_dir, work / "folds", args.folds, args.holdout_fold)
        what_is_tested = f"heldout_fold{args.holdout_fold}of{args.folds}"
    print(f"training on {train_dir}, evaluating on {test_dir} ({what_is_tested})", flush=True)

    started = time.perf_counter()
    ratios = (1.0 - args.val_fraction - 2 * SPARE, args.val_fraction, SPARE, SPARE)
    fetch(str(train_dir), work / "dataset", ratios=ratios, seed=0)
    fetch_seconds = time.perf_counter() - started
    select = load_dataset(work / "dataset").split("val_select", "select")

    seeds = [args.seed_offset + k for k in range(args.seeds)]
    workers = max(1, min(args.seeds, args.threads))
    per_worker = max(1, args.threads // workers)
    rounds = math.ceil(args.seeds / workers)
    overrides = parse_overrides(args.overrides)
    if args.time_budget > 0:  # each member may use its share of the budget (it stops after the epoch crossing it)
        overrides = {**overrides, "max_train_seconds": round(args.time_budget / rounds, 1)}
    print(
        f"training {args.seeds} seed(s), {workers} at a time in parallel processes with {per_worker} torch "
        f"thread(s) each ({workers * per_worker} threads in all, {rounds} round(s))"
        + (f", at most ~{args.time_budget:.0f}s of training in all" if args.time_budget > 0 else ""),
        flush=True,
    )
    t0 = time.perf_counter()
    if workers == 1:
        results = [train_member(args.recipe, overrides, k, work, per_worker) for k in seeds]
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = [pool.submit(train_member, args.recipe, overrides, k, work, per_worker) for k in seeds]
            results = [f.result() for f in futures]
    train_seconds = time.perf_counter() - t0  # wall time of the whole training phase, all seeds

    members = [load_saved(work / f"seed{k}", args.weights) for k in seeds]
    # TTA mode: fixed by --tta, or (auto) the mode with the best val_select accuracy of the ensemble, ties going
    # to fewer variants. Only val_select (carved out of mnist-5k-train) takes part in this choice.
    select_acc = {
        mode: accuracy(np.mean([member_probs(m, select.images, p, mode) for m, p, _ in members], axis=0), select.labels)
        for mode in (TTA_MODES if args.tta == "auto" else (args.tta,))
    }
    tta_mode = max(TTA_MODES, key=lambda m: (select_acc[m], -n_variants(m))) if args.tta == "auto" else args.tta
    for k, (epochs_run, best_epoch, best_metric, seconds) in zip(seeds, results, strict=True):
        print(
            f"seed {k}: {epochs_run} epochs in {seconds:.1f}s, best epoch {best_epoch}, "
            f"val_select accuracy {best_metric:.4f}",
            flush=True,
        )
    print(
        f"val_select accuracy of the {'ensemble' if args.seeds > 1 else 'model'} by TTA mode: "
        + ", ".join(f"{m}: {a:.4f}" for m, a in select_acc.items())
        + f"; TTA mode used: {tta_mode}"
        + (" (chosen on val_select)" if args.tta == "auto" else ""),
        flush=True,
    )

    # The one and only look at the evaluation set (mnist-test-dev, or the held-out fold in tuning mode).
    test_images, test_names = read_image_folder(test_dir)
    probs = np.zeros((len(test_names), 10), dtype=np.float64)
    per_member: dict[str, npt.NDArray[np.float64]] = {}
    for k, (model, preprocess, classes) in zip(seeds, members, strict=True):
        labels = np.asarray([classes.index(c) for c in test_names], dtype=np.int64)
        # tuning mode keeps every TTA mode's probabilities for comparisons; each mode is computed once
        modes = TTA_MODES if args.holdout_fold >= 0 else (tta_mode,)
        by_mode = {m: member_probs(model, test_images, preprocess, m) for m in modes}
        per_member[f"seed{k}"] = member = by_mode[tta_mode]
        if args.holdout_fold >= 0:
            per_member.update({f"seed{k}_tta{m}": p for m, p in by_mode.items()})
        if args.seeds > 1:
            print(f"ensemble member seed {k}: {what_is_tested} accuracy {accuracy(member, labels):.4f}")
        probs += member / args.seeds
    np.savez(work / "eval_probs.npz", labels=labels, evaluated=np.asarray(what_is_tested), **per_member)
    what = f"{args.weights}-epoch weights; "
    what += f"single model (seed {seeds[0]})" if args.seeds == 1 else f"ENSEMBLE of {args.seeds} seeds (mean softmax)"
    tta = "no TTA" if tta_mode == "off" else f"WITH TTA ({n_variants(tta_mode)} variants: {TTA_DESCRIPTION[tta_mode]})"
    print(f"recipe={args.recipe} overrides={json.dumps(overrides)}; {what}, {tta}; dataset fetch {fetch_seconds:.1f}s")
    print(f"whole run (fetch, training, evaluation): {time.perf_counter() - started:.1f}s")
    print(f"per-member probabilities of the evaluation set: {work / 'eval_probs.npz'}")
    metric = "mnist_dev_accuracy" if args.holdout_fold < 0 else f"{what_is_tested}_accuracy"
    print(f"{metric}={accuracy(probs, labels):.4f} train_seconds={train_seconds:.1f}")
    return 0


TTA_DESCRIPTION = {
    "off": "none",
    "5": "identity + 4 one-pixel shifts, softmax averaged",
    "17": "identity + 8 one-pixel shifts + 4 rotations + 4 scales, softmax averaged",
}


def train_member(
    recipe_name: str, overrides: dict[str, object], seed: int, work: Path, threads: int
) -> tuple[int, int, float, float]:
    """Train one ensemble member (recipe seed = `seed`) into work/seed<k>; runs in a worker process when the
    seeds train in parallel. Returns (epochs run, best epoch, best val_select metric, seconds)."""
    torch.set_num_threads(threads)
    recipe = load_recipe(recipe_name, overrides).with_overrides({"seed": seed})
    out = work / f"seed{seed}"
    started = time.perf_counter()
    result = train(
        work / "dataset",
        out / "model",
        out / "logits",
        recipe,
        out / "ckpt",
        log=lambda m: print(f"[seed {seed}] {m}", flush=True),
    )
    return result.epochs_run, result.best_epoch, result.best_metric, time.perf_counter() - started


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="digits-cnn-mnist")
    parser.add_argument("--overrides", default="{}", help="recipe overrides as a JSON object")
    parser.add_argument("--train-dir", type=Path, default=DEFAULT_TRAIN)
    parser.add_argument("--test-dir", type=Path, default=DEFAULT_TEST)
    parser.add_argument("--work-dir", default="")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the benchmark machine has 2 cores)")
    parser.add_argument(
        "--weights",
        choices=("best", "last"),
        default="last",
        help="best: each member's epoch chosen on val_select (the exported model); last: its final-epoch EMA weights",
    )
    parser.add_argument("--seeds", type=int, default=4, help="ensemble size (1 = a single model)")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=780.0,
        help="seconds of training in all; each member stops after the epoch that crosses its share (0 = no limit)",
    )
    parser.add_argument("--seed-offset", type=int, default=0, help="members train with seeds offset .. offset+seeds-1")
    parser.add_argument(
        "--val-fraction", type=float, default=0.02, help="share of the training folder held as val_select"
    )
    parser.add_argument(
        "--holdout-fold",
        type=int,
        default=-1,
        help="tuning mode: train on the other folds of --train-dir and evaluate on this one (mnist-test-dev unread)",
    )
    parser.add_argument("--folds", type=int, default=5, help="number of class-stratified folds for --holdout-fold")
    parser.add_argument(
        "--tta",
        choices=(*TTA_MODES, "auto"),
        default="17",
        help="test-time augmentation (visionpipe/serving/tta.py): off, 5, 17, or auto (the best on val_select)",
    )
    return parser.parse_args(argv)


def split_folds(root: Path, out: Path, folds: int, holdout: int) -> tuple[Path, Path]:
    """Symlink <class>/<file> folders: fold `holdout` of `folds` (per class, files in name order, every
    folds-th file) into out/heldout and the rest into out/train. Deterministic, class-stratified."""
    if not 0 <= holdout < folds:
        raise SystemExit(f"--holdout-fold={holdout} must be in [0, {folds - 1}] for --folds={folds}")
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for i, path in enumerate(sorted(class_dir.glob("*.png"))):
            dest = out / ("heldout" if i % folds == holdout else "train") / class_dir.name / path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not dest.exists():
                dest.symlink_to(path.resolve())
    return out / "train", out / "heldout"


def read_image_folder(root: Path) -> tuple[npt.NDArray[np.uint8], list[str]]:
    """uint8 (N, 28, 28, 1) images and their class names from a <class>/<file>.png folder."""
    images, labels = [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(class_dir.glob("*.png")):
            with Image.open(io.BytesIO(path.read_bytes())) as img:
                images.append(np.asarray(img.convert("L"), dtype=np.uint8))
            labels.append(class_dir.name)
    return np.stack(images)[..., None], labels


def load_saved(member_dir: Path, weights: str) -> tuple[torch.nn.Module, PreprocessSpec, list[str]]:
    """A trained member: the exported model (weights "best": the epoch chosen on val_select) or, with weights
    "last", the EMA (else plain) weights of the final epoch, read from the member's training checkpoint."""
    meta = json.loads((member_dir / "model" / "model.json").read_text())
    model = build_model(ArchSpec.from_dict(meta["arch"]))
    if weights == "best":
        load_weights(model, member_dir / "model" / "model.safetensors")
    else:
        state = json.loads((member_dir / "ckpt" / "state.json").read_text())
        tensors = load_file(str(member_dir / "ckpt" / state["state_file"]))
        prefix = "ema/" if any(k.startswith("ema/") for k in tensors) else "model/"
        model.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)})
    return model.eval(), PreprocessSpec.from_dict(meta["preprocess"]), list(meta["classes"])


def member_probs(
    model: torch.nn.Module, images: npt.NDArray[np.uint8], preprocess: PreprocessSpec, tta: str
) -> npt.NDArray[np.float64]:
    """Softmax of one model, averaged over the TTA variants of each image.

    The variants are made from the preprocessed model input (after any digit-upload normalisation, which would
    re-centre a shifted raw image and undo the shift), with borders filled by the normalised black level."""
    fill = (0.0 - preprocess.mean[0]) / preprocess.std[0]
    out = []
    for start in range(0, len(images), 500):
        x = to_model_input(np.asarray(images[start : start + 500]), preprocess)
        out.append(predict_proba_tta(model, x, tta, fill).double().numpy())
    return np.concatenate(out)


def accuracy(probs: npt.NDArray[np.float64], labels: npt.NDArray[np.int64]) -> float:
    return float(np.mean(probs.argmax(axis=1) == labels))


if __name__ == "__main__":
    raise SystemExit(main())
