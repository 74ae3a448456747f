"""Benchmark: roadwork detection on real street photos (../shared/datasets/roadwork-tracon) with the
roadwork-effnet-lite0 recipe, through the project's own phases, on the CPU.

data_fetch (the pipeline's seeded, stratified splits) -> supervised_train (epoch picked by MCC on val_select)
-> threshold_sweep (MCC threshold on val_calib) -> calibration (calibrator, conformal and SCRC fitted on
val_calib, the hybrid policy) -> a report on val_test ONLY: MCC with a 95% bootstrap CI (threshold held fixed),
accuracy, the threshold, ECE before / after calibration, the hybrid policy's decision / abstain rates. Nothing
is chosen on val_test. Baseline: a linear probe on the frozen ImageNet features (sklearn LogisticRegression fitted
on train, C chosen by MCC on val_select). `--finetune` swaps the recipe's fine-tuning mode (full / partial / lora)
for the measurement that chose the recipe's mode; `--train-only` stops after training (val_select MCC + time).

    .venv/bin/python bench/roadwork.py --seed 0
    .venv/bin/python bench/roadwork.py --finetune full --epochs 3 --train-only

Multi-view inference (global view + tiles, a `views` field of the preprocessing spec, built elsewhere) plugs in
at `--views`: today only ``global`` exists; the logits every later phase reads come from supervised_train, so
once the spec has views the recipe override `preprocess.views` is all this bench has to pass (`view_overrides`).

Last line: mcc=<val_test MCC> ci=[lo,hi] accuracy=<float> probe_mcc=<float> train_s=<float> load=<1-min load>
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from visionpipe.data.datasets import load_dataset
from visionpipe.data.logits import load_logits
from visionpipe.phases import calibration, data_fetch, supervised_train, threshold_sweep
from visionpipe.phases.threshold_sweep import bootstrap_binary, parse_objective
from visionpipe.serving.metrics import mcc, softmax
from visionpipe.serving.models import build_model, load_pretrained_backbone
from visionpipe.serving.policies import apply_policy
from visionpipe.serving.preprocessing import to_model_input
from visionpipe.specs.resolve import resolve_arch, resolve_preprocess
from visionpipe.training.pretrained import imagenet_backbone
from visionpipe.training.recipes import Recipe, load_recipe

RECIPE = "roadwork-effnet-lite0"
SOURCE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "roadwork-tracon"
# the fine-tuning modes compared (recipe overrides); `recipe` = as shipped
LITE0_LAST_BLOCKS = [f"backbone.blocks.{i}" for i in (13, 14, 15)] + ["backbone.top", "backbone.top_bn"]
FINETUNE: dict[str, dict[str, object]] = {
    "recipe": {},
    "full": {"peft": {"method": "none", "extra_trainable": []}, "optimizer.lr": 3e-4},
    "partial": {"peft": {"method": "none", "extra_trainable": LITE0_LAST_BLOCKS}},
    "lora": {"peft": {"method": "lora", "rank": 8, "alpha": 16.0, "extra_trainable": []}, "optimizer.lr": 2e-3},
}
PROBE_C = (0.001, 0.01, 0.1, 1.0, 10.0)


def view_overrides(views: str) -> dict[str, object]:
    """Recipe overrides for the inference views: the hook for multi-view (a preprocessing `views` field)."""
    if views == "global":
        return {}
    raise SystemExit(f"--views={views!r}: only 'global' exists until the preprocessing spec has a views field")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(SOURCE))
    parser.add_argument("--seed", type=int, default=0, help="split seed (data_fetch) and recipe seed")
    parser.add_argument("--data-size", type=int, default=224, help="data_fetch image_size (stored side)")
    parser.add_argument("--finetune", choices=sorted(FINETUNE), default="recipe")
    parser.add_argument("--epochs", type=int, default=0, help="0 = the recipe's")
    parser.add_argument("--views", default="global", help="inference views (multi-view hook); only 'global' today")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--train-only", action="store_true", help="stop after training (val_select MCC, time)")
    parser.add_argument("--no-probe", action="store_true", help="skip the linear-probe baseline")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the figures use 2)")
    parser.add_argument("--out", default="", help="work folder (default: a temporary one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    overrides: dict[str, object] = {"seed": args.seed, **FINETUNE[args.finetune], **view_overrides(args.views)}
    if args.epochs:
        overrides["epochs"] = args.epochs
    recipe = load_recipe(RECIPE, overrides)
    with tempfile.TemporaryDirectory(prefix="bench-roadwork-") as tmp:
        out = Path(args.out or tmp)
        return _bench(args, recipe, out)


def _bench(args: argparse.Namespace, recipe: Recipe, out: Path) -> int:
    started = time.perf_counter()
    fetched = data_fetch.run(
        args.source, out / "dataset", seed=args.seed, positive_class="roadwork", image_size=args.data_size
    )
    counts = {s: sum(c.values()) for s, c in fetched.class_counts.items()}
    print(f"data: {fetched.num_images} images, splits {counts} (seed {args.seed}, stored at {args.data_size} px)")

    probe = {} if args.no_probe or args.train_only else linear_probe(out / "dataset", recipe)
    if probe:
        print(
            f"linear probe (frozen ImageNet features, C={probe['C']:g} chosen on val_select MCC "
            f"{probe['val_select_mcc']:.4f}): val_test MCC {probe['mcc']:.4f}, accuracy {probe['accuracy']:.4f}, "
            f"features {probe['feature_seconds']:.1f} s"
        )

    result = supervised_train.run(
        out / "dataset",
        out / "model",
        out / "logits",
        recipe,
        out / "checkpoint",
        log=lambda line: print(f"  {line}", flush=True),
    )
    print(
        f"train ({args.finetune}): best epoch {result.best_epoch}/{result.epochs_run}, val_select MCC "
        f"{result.best_metric:.4f}, {result.train_seconds:.1f} s ({result.images_per_second:.1f} img/s)"
    )
    if args.train_only:
        print(
            f"finetune={args.finetune} val_select_mcc={result.best_metric:.4f} train_s={result.train_seconds:.1f} "
            f"load={os.getloadavg()[0]:.2f}"
        )
        return 0

    sweep = threshold_sweep.run(out / "logits", out / "threshold", objective="mcc", bootstrap=args.bootstrap)
    cal = calibration.run(out / "logits", out / "threshold", out / "calibration", active_policy="threshold")
    test = sweep.metrics_val_test
    counts4 = (test["tp"], test["fp"], test["tn"], test["fn"])
    lo, hi = bootstrap_binary(counts4, parse_objective("mcc"), args.bootstrap, args.seed)
    logits, labels = load_logits(out / "logits", "val_test")
    raw = softmax(logits)
    decisions = apply_policy(cal.policy, cal.calibrator.probabilities(logits), raw)
    decided = ~decisions.abstained
    decided_acc = float(np.mean(decisions.labels[decided] == labels[decided])) if decided.any() else 1.0
    ece = cal.metrics["val_test"]
    report = {
        "val_test_n": int(test["n"]),
        "mcc": test["mcc"],
        "mcc_ci95": [lo, hi],
        "accuracy": test["accuracy"],
        "threshold": sweep.threshold,
        "threshold_space": sweep.space,
        "calibrator": cal.method,
        "ece_before": ece["before"]["ece"],
        "ece_after": ece["after"]["ece"],
        "hybrid": f"{cal.policy.active} (fallback {cal.policy.fallback})",
        "decision_rate": float(np.mean(decided)),
        "abstain_rate": float(np.mean(~decided)),
        "decided_accuracy": decided_acc,
        "train_seconds": result.train_seconds,
        "best_epoch": result.best_epoch,
        "val_select_mcc": result.best_metric,
        "probe": probe,
        "total_seconds": time.perf_counter() - started,
        "load_average": list(os.getloadavg()),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(report, indent=1, sort_keys=True))
    probe_mcc = probe.get("mcc", float("nan"))
    print(
        f"mcc={report['mcc']:.4f} ci=[{lo:.4f},{hi:.4f}] accuracy={report['accuracy']:.4f} "
        f"probe_mcc={probe_mcc:.4f} train_s={result.train_seconds:.1f} load={os.getloadavg()[0]:.2f}"
    )
    return 0


def linear_probe(dataset_dir: Path, recipe: Recipe) -> dict[str, float]:
    """LogisticRegression on frozen ImageNet features: fitted on train, C chosen by MCC on val_select,
    reported on val_test."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    ds = load_dataset(dataset_dir)
    preprocess = resolve_preprocess(recipe, ds.image_shape[2])
    arch = resolve_arch(recipe, ds.num_classes, preprocess)
    model = build_model(arch)
    load_pretrained_backbone(model, str(imagenet_backbone(arch)))
    model.eval()
    started = time.perf_counter()

    def features(images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float64]:
        out = []
        with torch.no_grad():
            for i in range(0, len(images), 64):
                out.append(model.features(to_model_input(images[i : i + 64], preprocess)).numpy())
        return np.concatenate(out).astype(np.float64)

    train, select, test = ds.split("train", "fit"), ds.split("val_select", "select"), ds.split("val_test", "evaluate")
    x_train, x_select, x_test = features(train.images), features(select.images), features(test.images)
    seconds = time.perf_counter() - started
    scaler = StandardScaler().fit(x_train)
    best: tuple[float, float, LogisticRegression] | None = None
    for c in PROBE_C:
        clf = LogisticRegression(C=c, max_iter=5000).fit(scaler.transform(x_train), train.labels)
        score = mcc(select.labels == 1, clf.predict(scaler.transform(x_select)) == 1)
        if best is None or score > best[0]:
            best = (score, c, clf)
    assert best is not None
    predicted = best[2].predict(scaler.transform(x_test))
    return {
        "C": best[1],
        "val_select_mcc": best[0],
        "mcc": mcc(test.labels == 1, predicted == 1),
        "accuracy": float(np.mean(predicted == test.labels)),
        "feature_seconds": seconds,
    }


if __name__ == "__main__":
    sys.exit(main())
