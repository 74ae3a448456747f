"""Benchmark: roadwork detection on real street photos (../shared/datasets/roadwork-tracon) with the
roadwork-effnet-lite0 recipe, through the project's own phases, on the CPU, against a linear probe.

Per split seed (``--seeds``; data_fetch's seeded, stratified splits): data_fetch -> supervised_train (epoch
picked by MCC on val_select) -> per inference view (``--views``) threshold_sweep (MCC threshold on val_calib) ->
calibration (calibrator, conformal and SCRC fitted on val_calib, the hybrid policy) -> a report on val_test ONLY:
MCC with a 95% bootstrap CI (threshold held fixed), accuracy, the threshold, log-loss and ECE before / after
calibration, the hybrid policy's decision / abstain rates. Nothing is chosen on val_test.

Baseline, on the same split: a linear probe on the frozen ImageNet features (sklearn LogisticRegression fitted on
train, C chosen by MCC on val_select, its MCC threshold chosen on val_calib with the same `exact_sweep` /
`choose_binary` as threshold_sweep), with its val_test log-loss and ECE (its own probabilities, uncalibrated).

Over the seeds: means of every figure, and the paired difference fine-tuned - probe (MCC on the pooled val_test
images, accuracy, log-loss) with a paired bootstrap 95% CI: the val_test images of every seed are resampled with
replacement within their seed, both models' answers on the same resampled images. The val_test sets of different
seeds overlap (each is 10% of the same 526 photos), so the pooled interval is somewhat narrower than independent
images would give.

``--views`` takes a comma-separated list of inference views, each ``global`` or ``GxG:AGG`` (G tiles per side,
overlap 0.25) with AGG ``max``, ``mean``, ``topkK`` (top-K mean) or any other aggregate name the preprocessing
spec knows (e.g. ``auto``, ``learned``); ``GxG@O:AGG`` sets the overlap O. Each becomes the recipe override
``preprocess.views`` (the recipe validation judges it). The model is trained ONCE per seed (training and its
val_select selection use the global view only, views or not: visionpipe/phases/supervised_train.py) with the
first entry's views; the other entries' val_calib / val_test logits come from the same saved weights through
`supervised_train.write_logits` with their own preprocessing. With views on, data_fetch stores images at
``ViewsSpec.required_side`` (560 px for 224 / 3x3 / 0.25) unless ``--data-size`` says otherwise.

`--finetune` swaps the recipe's fine-tuning mode (full / partial / lora), `--set` adds recipe overrides (JSON);
`--train-only` stops after training (val_select MCC and log-loss of the kept epoch, time): the runs that choose
the recipe.

    .venv/bin/python bench/roadwork.py                        # seed 0, the shipped recipe, global view
    .venv/bin/python bench/roadwork.py --seeds 0 1 2          # the fuller comparison with the probe
    .venv/bin/python bench/roadwork.py --views global,3x3:mean --seeds 0 1
    .venv/bin/python bench/roadwork.py --finetune full --epochs 3 --train-only

Last line: mcc=<mean val_test MCC, first view> ci=[lo,hi] accuracy=<mean> probe_mcc=<mean> diff=<pooled MCC
fine-tuned - probe> diff_ci=[lo,hi] train_s=<mean> load=<1-min load>
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from visionpipe.data.datasets import SPLITS, load_dataset, write_json
from visionpipe.data.logits import load_logits
from visionpipe.phases import calibration, data_fetch, supervised_train, threshold_sweep
from visionpipe.phases.threshold_sweep import bootstrap_binary, choose_binary, exact_sweep, parse_objective
from visionpipe.serving.metrics import ece, mcc, nll, softmax
from visionpipe.serving.models import build_model, load_pretrained_backbone, load_weights
from visionpipe.serving.policies import apply_policy
from visionpipe.serving.preprocessing import to_model_input
from visionpipe.specs.resolve import pending_views, resolve_arch, resolve_preprocess
from visionpipe.training.pretrained import imagenet_backbone
from visionpipe.training.recipes import Recipe, load_recipe, recipe_hash

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
VIEW_PATTERN = re.compile(r"^(\d+)x(\d+)(?:@([0-9.]+))?:([a-z_0-9]+)$")
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def parse_views(text: str) -> dict[str, object] | None:
    """One ``--views`` entry -> the ``preprocess.views`` mapping (None = the global view only). The recipe
    validation (`ViewsSpec`) judges the values; this only reads the notation."""
    if text == "global":
        return None
    match = VIEW_PATTERN.match(text)
    if match is None or match.group(1) != match.group(2):
        raise SystemExit(
            f"--views entry {text!r} is not understood; allowed: 'global' or 'GxG:AGG' with G tiles per side "
            "(e.g. 3x3:max, 3x3:mean, 3x3:topk3, 3x3:auto), optionally 'GxG@OVERLAP:AGG' (e.g. 3x3@0.25:max)"
        )
    views: dict[str, object] = {"grid": int(match.group(1))}
    if match.group(3) is not None:
        views["overlap"] = float(match.group(3))
    aggregate = match.group(4)
    topk = re.fullmatch(r"topk(\d+)", aggregate)
    if topk:
        views |= {"aggregate": "topk_mean", "k": int(topk.group(1))}
    else:
        views["aggregate"] = aggregate
    return views


def view_overrides(views: str) -> dict[str, object]:
    """Recipe overrides for one inference-view entry (`parse_views`)."""
    return {"preprocess.views": parse_views(views)}


@dataclass(frozen=True)
class Scored:
    """One model's val_test answers on one seed: what the pooled paired comparison needs."""

    labels: IntArray
    predicted: IntArray
    p_true: FloatArray  # the probability given to the true class (for log-loss)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(SOURCE))
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="split seeds (data_fetch + recipe)")
    parser.add_argument("--seed", type=int, default=None, help="one split seed (= --seeds SEED); default 0")
    parser.add_argument("--data-size", type=int, default=0, help="data_fetch image_size; 0 = 224, or the views' need")
    parser.add_argument("--finetune", choices=sorted(FINETUNE), default="recipe")
    parser.add_argument("--epochs", type=int, default=0, help="0 = the recipe's")
    parser.add_argument("--set", default="{}", help="extra recipe overrides, JSON: '{\"loss.label_smoothing\": 0.1}'")
    parser.add_argument("--views", default="global", help="comma-separated: global, 3x3:max, 3x3:mean, 3x3:topk3, ...")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--train-only", action="store_true", help="stop after training (val_select MCC, log-loss)")
    parser.add_argument("--no-probe", action="store_true", help="skip the linear-probe baseline")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the figures use 2)")
    parser.add_argument("--out", default="", help="work folder (default: a temporary one)")
    parser.add_argument("--json", default="", help="also write the full report to this JSON file")
    parser.add_argument(
        "--folds",
        type=int,
        default=0,
        help="K-fold evaluation: per seed, K runs whose val_test are the K disjoint folds (every photo tested once)",
    )
    parser.add_argument(
        "--pool", nargs="+", default=None, metavar="JSON", help="no training: pool the seeds of earlier --json reports"
    )
    args = parser.parse_args(argv)
    if args.seeds is not None and args.seed is not None:
        parser.error("give --seeds or --seed, not both")
    seeds: list[int] = args.seeds if args.seeds is not None else [args.seed if args.seed is not None else 0]
    if args.folds == 1 or args.folds < 0:
        parser.error(f"--folds={args.folds}: give 0 (data_fetch's own split) or K >= 2 folds")
    torch.set_num_threads(args.threads)
    if args.pool:
        return _pool(args)

    entries = [v.strip() for v in args.views.split(",") if v.strip()]
    if not entries or len(set(entries)) != len(entries):
        parser.error(f"--views={args.views!r} needs one or more distinct entries")
    try:
        extra = json.loads(args.set)
    except json.JSONDecodeError as exc:
        parser.error(f"--set={args.set!r} is not JSON ({exc}); give an object such as '{{\"epochs\": 3}}'")
    if not isinstance(extra, dict):
        parser.error(f"--set={args.set!r} must be a JSON object of recipe overrides")
    base: dict[str, object] = {**FINETUNE[args.finetune], **extra}
    if args.epochs:
        base["epochs"] = args.epochs
    # every entry's recipe, validated before anything runs (a bad --views fails here, with the spec's message)
    recipes = {v: load_recipe(RECIPE, {**base, "seed": seeds[0], **view_overrides(v)}) for v in entries}
    data_size = args.data_size or max(
        r.preprocess.views.geometry.required_side(r.preprocess.size) if r.preprocess.views else r.preprocess.size
        for r in recipes.values()
    )
    started = time.perf_counter()
    per_seed: list[dict[str, object]] = []
    scored: dict[str, list[Scored]] = {v: [] for v in entries}
    probe_scored: list[Scored] = []
    with tempfile.TemporaryDirectory(prefix="bench-roadwork-") as tmp:
        for seed, fold in itertools.product(seeds, range(args.folds) if args.folds else [None]):
            name = f"seed{seed}" if fold is None else f"seed{seed}-fold{fold}"
            out = Path(args.out or tmp) / name
            per_seed.append(_one_seed(args, seed, fold, base, entries, data_size, out, scored, probe_scored))
    if args.train_only:
        return 0
    summary = _summary(args, entries, per_seed, scored, probe_scored, time.perf_counter() - started, data_size)
    _finish(args, entries, summary)
    return 0


def _pool(args: argparse.Namespace) -> int:
    """The summary over the seeds of several `--json` reports (runs of one recipe, e.g. one seed per process)."""
    reports = [json.loads(Path(p).read_text()) for p in args.pool]
    entries: list[str] = reports[0]["entries"]
    if any(r["entries"] != entries or r["recipe_hash"] != reports[0]["recipe_hash"] for r in reports):
        raise SystemExit(f"--pool: the reports {args.pool} differ in --views entries or recipe; pool one setting")
    per_seed = [row for r in reports for row in r["per_seed"]]
    seeds = [(row["seed"], row.get("fold")) for row in per_seed]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--pool: (seed, fold) repeated across the reports: {seeds}")

    def answers(payload: dict[str, list[float]]) -> Scored:
        return Scored(
            np.asarray(payload["labels"], dtype=np.int64),
            np.asarray(payload["predicted"], dtype=np.int64),
            np.asarray(payload["p_true"], dtype=np.float64),
        )

    scored = {v: [answers(row["answers"][v]) for row in per_seed] for v in entries}
    probe = [answers(row["answers"]["probe"]) for row in per_seed if "probe" in row["answers"]]
    args.finetune = reports[0]["finetune"]
    seconds = sum(float(r["total_seconds"]) for r in reports)
    summary = _summary(args, entries, per_seed, scored, probe, seconds, int(reports[0]["data_size"]))
    summary["pooled_from"] = list(args.pool)
    summary["load_average_end_per_report"] = [r["load_average_end"] for r in reports]
    _finish(args, entries, summary)
    return 0


def _finish(args: argparse.Namespace, entries: list[str], summary: dict[str, object]) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1, sort_keys=True))
    first = summary["views"][entries[0]]  # type: ignore[index]  # a dict built just above
    diff = first.get("vs_probe", {})
    print(
        f"mcc={first['mcc_mean']:.4f} ci=[{first['mcc_ci95_first_seed'][0]:.4f},{first['mcc_ci95_first_seed'][1]:.4f}] "
        f"accuracy={first['accuracy_mean']:.4f} probe_mcc={summary.get('probe_mcc_mean', float('nan')):.4f} "
        f"diff={diff.get('mcc_pooled_diff', float('nan')):.4f} "
        f"diff_ci=[{diff.get('mcc_diff_ci95', [float('nan')] * 2)[0]:.4f},"
        f"{diff.get('mcc_diff_ci95', [float('nan')] * 2)[1]:.4f}] "
        f"train_s={summary['train_seconds_mean']:.1f} load={os.getloadavg()[0]:.2f}"
    )


def _one_seed(
    args: argparse.Namespace,
    seed: int,
    fold: int | None,
    base: dict[str, object],
    entries: list[str],
    data_size: int,
    out: Path,
    scored: dict[str, list[Scored]],
    probe_scored: list[Scored],
) -> dict[str, object]:
    recipes = {v: load_recipe(RECIPE, {**base, "seed": seed, **view_overrides(v)}) for v in entries}
    fetched = data_fetch.run(args.source, out / "dataset", seed=seed, positive_class="roadwork", image_size=data_size)
    class_counts = fetched.class_counts if fold is None else refold(out / "dataset", seed, fold, args.folds)
    counts = {s: sum(c.values()) for s, c in class_counts.items()}
    where = "" if fold is None else f" fold {fold + 1}/{args.folds} as val_test,"
    print(f"seed {seed} data: {fetched.num_images} images,{where} splits {counts} ({data_size} px)", flush=True)

    probe: dict[str, object] = {}
    row_answers: dict[str, object] = {}
    if not (args.no_probe or args.train_only):
        probe, answers = linear_probe(out / "dataset", recipes[entries[0]])
        probe_scored.append(answers)
        row_answers["probe"] = _plain_answers(answers)
        print(
            f"seed {seed} linear probe (C={probe['C']:g} by val_select MCC {probe['val_select_mcc']:.4f}, threshold "
            f"{probe['threshold']:.3f} on val_calib): val_test MCC {probe['mcc']:.4f}, accuracy "
            f"{probe['accuracy']:.4f}, log-loss {probe['log_loss']:.4f}, ECE {probe['ece']:.4f}",
            flush=True,
        )

    trained = recipes[entries[0]]
    result = supervised_train.run(
        out / "dataset",
        out / "model",
        out / "logits-0",
        trained,
        out / "checkpoint",
        log=lambda line: print(f"  {line}", flush=True),
    )
    select_loss = result.history[result.best_epoch - 1]["val_select_loss"]
    print(
        f"seed {seed} train ({args.finetune}): best epoch {result.best_epoch}/{result.epochs_run}, val_select MCC "
        f"{result.best_metric:.4f}, log-loss {select_loss:.4f}, {result.train_seconds:.1f} s "
        f"({result.images_per_second:.1f} img/s)",
        flush=True,
    )
    row: dict[str, object] = {
        "seed": seed,
        "fold": fold,
        "splits": counts,
        "train_seconds": result.train_seconds,
        "recipe_hash": recipe_hash(load_recipe(RECIPE, {**base, **view_overrides(entries[0])})),
        "best_epoch": result.best_epoch,
        "val_select_mcc": result.best_metric,
        "val_select_log_loss": select_loss,
        "probe": probe,
    }
    if args.train_only:
        print(
            f"finetune={args.finetune} seed={seed} val_select_mcc={result.best_metric:.4f} "
            f"val_select_logloss={select_loss:.4f} train_s={result.train_seconds:.1f} load={os.getloadavg()[0]:.2f}",
            flush=True,
        )
        return row

    views: dict[str, object] = {}
    for i, entry in enumerate(entries):
        logits_dir = out / f"logits-{i}"
        if i == 0:  # what supervised_train resolved (auto / learned are chosen on val_select there)
            meta = json.loads((out / "model" / supervised_train.MODEL_META_FILE).read_text())
            chosen = str(meta.get("views_selection", {}).get("chosen", entry))
        else:  # the same saved weights, this entry's preprocessing (views), resolved the way supervised_train does
            ds = load_dataset(out / "dataset")
            preprocess = resolve_preprocess(recipes[entry], ds.image_shape[2])
            model = build_model(resolve_arch(recipes[entry], ds.num_classes, preprocess))
            load_weights(model, result.model_path, strict=True)
            model.eval()
            choice, chosen = pending_views(recipes[entry]), entry
            if choice is not None:
                positive = ds.positive_index if ds.positive_index is not None else 1
                select = ds.split("val_select", "select")
                preprocess, selection = supervised_train.resolve_views(
                    model, select, preprocess, choice, trained.eval_batch_size, positive
                )
                chosen = selection.chosen
                print(f"  {supervised_train.describe_views_selection(selection)}", flush=True)
            cpu = torch.device("cpu")
            supervised_train.write_logits(model, ds, preprocess, trained.eval_batch_size, logits_dir, cpu)
        report, answers = _decide(args, seed, logits_dir, out / f"decisions-{i}")
        report["views_chosen"] = chosen
        scored[entry].append(answers)
        row_answers[entry] = _plain_answers(answers)
        views[entry] = report
        print(
            f"seed {seed} view {entry}: val_test MCC {report['mcc']:.4f} [{report['mcc_ci95'][0]:.4f}, "  # type: ignore[index]  # a list
            f"{report['mcc_ci95'][1]:.4f}], accuracy {report['accuracy']:.4f}, threshold {report['threshold']:.3f}, "  # type: ignore[index]  # a list
            f"log-loss {report['log_loss_before']:.4f} / {report['log_loss_after']:.4f}, "
            f"ECE {report['ece_before']:.4f} / {report['ece_after']:.4f} ({report['calibrator']}), "
            f"decides {report['decision_rate']:.3f}",
            flush=True,
        )
    row["views"] = views
    row["answers"] = row_answers  # per val_test image, for --pool
    row["load_average"] = list(os.getloadavg())
    return row


def _decide(args: argparse.Namespace, seed: int, logits_dir: Path, out: Path) -> tuple[dict[str, object], Scored]:
    """threshold_sweep + calibration on one set of logits; the val_test report and answers."""
    sweep = threshold_sweep.run(logits_dir, out / "threshold", objective="mcc", bootstrap=args.bootstrap)
    cal = calibration.run(logits_dir, out / "threshold", out / "calibration", active_policy="threshold")
    test = sweep.metrics_val_test
    counts4 = (test["tp"], test["fp"], test["tn"], test["fn"])
    lo, hi = bootstrap_binary(counts4, parse_objective("mcc"), args.bootstrap, seed)
    logits, labels = load_logits(logits_dir, "val_test")
    raw = softmax(logits)
    decisions = apply_policy(cal.policy, cal.calibrator.probabilities(logits), raw)
    decided = ~decisions.abstained
    decided_acc = float(np.mean(decisions.labels[decided] == labels[decided])) if decided.any() else 1.0
    # the threshold rule's own answers on val_test, as threshold_sweep scores them (the MCC above)
    predicted = apply_policy(sweep.policy, raw, raw).labels.astype(np.int64)
    ece_split = cal.metrics["val_test"]
    report: dict[str, object] = {
        "val_test_n": int(test["n"]),
        "mcc": test["mcc"],
        "mcc_ci95": [lo, hi],
        "accuracy": test["accuracy"],
        "threshold": sweep.threshold,
        "threshold_space": sweep.space,
        "calibrator": cal.method,
        "ece_before": ece_split["before"]["ece"],
        "ece_after": ece_split["after"]["ece"],
        "log_loss_before": ece_split["before"]["nll"],
        "log_loss_after": ece_split["after"]["nll"],
        "hybrid": f"{cal.policy.active} (fallback {cal.policy.fallback})",
        "decision_rate": float(np.mean(decided)),
        "abstain_rate": float(np.mean(~decided)),
        "decided_accuracy": decided_acc,
    }
    answers = Scored(labels.astype(np.int64), predicted, raw[np.arange(len(labels)), labels].astype(np.float64))
    return report, answers


def _summary(
    args: argparse.Namespace,
    entries: list[str],
    per_seed: list[dict[str, object]],
    scored: dict[str, list[Scored]],
    probe_scored: list[Scored],
    seconds: float,
    data_size: int,
) -> dict[str, object]:
    def mean_of(rows: list[dict[str, object]], key: str) -> float:
        return float(np.mean([float(r[key]) for r in rows]))  # type: ignore[arg-type]  # numbers from _decide

    views: dict[str, object] = {}
    for entry in entries:
        rows = [r["views"][entry] for r in per_seed]  # type: ignore[index]  # dicts built in _one_seed
        keys = ("mcc", "accuracy", "threshold", "ece_before", "ece_after", "log_loss_before", "log_loss_after",
                "decision_rate", "abstain_rate")  # fmt: skip
        summary: dict[str, object] = {f"{k}_mean": mean_of(rows, k) for k in keys}
        summary["mcc_per_seed"] = [r["mcc"] for r in rows]
        summary["mcc_ci95_first_seed"] = rows[0]["mcc_ci95"]
        summary["mcc_pooled"] = _pooled_mcc(scored[entry])
        if probe_scored:
            summary["vs_probe"] = paired_comparison(scored[entry], probe_scored, args.bootstrap, per_seed[0]["seed"])  # type: ignore[arg-type]  # an int
        views[entry] = summary
    report: dict[str, object] = {
        "recipe": RECIPE,
        "recipe_hash": per_seed[0]["recipe_hash"],
        "entries": entries,
        "finetune": args.finetune,
        "seeds": [r["seed"] for r in per_seed],
        "data_size": data_size,
        "per_seed": per_seed,
        "views": views,
        "train_seconds_mean": float(np.mean([float(r["train_seconds"]) for r in per_seed])),  # type: ignore[arg-type]  # a float
        "total_seconds": seconds,
        "load_average_end": list(os.getloadavg()),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }
    if probe_scored:
        probes = [r["probe"] for r in per_seed]
        for key in ("mcc", "accuracy", "log_loss", "ece"):
            report[f"probe_{key}_mean"] = mean_of(probes, key)  # type: ignore[arg-type]  # dicts from linear_probe
        report["probe_mcc_pooled"] = _pooled_mcc(probe_scored)
    shown = {**report, "per_seed": [{k: v for k, v in r.items() if k != "answers"} for r in per_seed]}
    print(json.dumps(shown, indent=1, sort_keys=True))  # the per-image answers only go to --json
    return report


def refold(dataset_dir: Path, seed: int, fold: int, folds: int) -> dict[str, dict[str, int]]:
    """Rewrite the Dataset's splits.json so that val_test is fold `fold` of `folds` disjoint, stratified folds,
    and train / val_select / val_calib split the rest 7 : 1 : 1 (data_fetch's default proportions). As in
    data_fetch.assign_splits: identical images form one group, kept in one split; within each class the groups
    are ordered by hash, shuffled with (seed, class) and placed by the midpoint of their cumulative image count.
    Over fold = 0 .. folds - 1 every image is in val_test exactly once. Returns the class counts per split."""
    meta = json.loads((dataset_dir / "dataset.json").read_text())
    hashes: list[str] = meta["hashes"]
    ids: list[str] = meta["ids"]
    classes: list[str] = meta["classes"]
    labels = np.load(dataset_dir / "labels.npy")
    groups: dict[str, list[int]] = {}
    for i, h in enumerate(hashes):
        groups.setdefault(h, []).append(i)
    by_class: dict[int, list[str]] = {}
    for h, members in groups.items():
        by_class.setdefault(int(np.bincount(labels[members]).argmax()), []).append(h)
    assignment = np.full(len(hashes), -1, dtype=np.int64)
    rest_bounds = np.cumsum([7 / 9, 1 / 9, 1 / 9])
    for cls, class_hashes in sorted(by_class.items()):
        ordered = sorted(class_hashes)
        order = [ordered[p] for p in np.random.default_rng([seed, cls, folds]).permutation(len(ordered))]
        total = sum(len(groups[h]) for h in ordered)
        seen, rest = 0, []
        for h in order:
            mid = (seen + len(groups[h]) / 2) / total
            seen += len(groups[h])
            if min(int(mid * folds), folds - 1) == fold:
                assignment[groups[h]] = 3  # val_test
            else:
                rest.append(h)
        rest_total, seen = sum(len(groups[h]) for h in rest), 0
        for h in rest:
            mid = (seen + len(groups[h]) / 2) / rest_total
            seen += len(groups[h])
            assignment[groups[h]] = min(int(np.searchsorted(rest_bounds, mid, side="right")), 2)
    split_indices = {s: np.flatnonzero(assignment == k) for k, s in enumerate(SPLITS)}
    counts = data_fetch._class_counts(split_indices, labels, classes)
    ratios = tuple(len(split_indices[s]) / len(hashes) for s in SPLITS)
    config = data_fetch.FetchConfig(ratios=(ratios[0], ratios[1], ratios[2], 1.0 - sum(ratios[:3])), seed=seed)
    payload = data_fetch._splits_payload(split_indices, hashes, ids, counts, config)
    write_json(dataset_dir / "splits.json", payload)
    return counts


def _plain_answers(answers: Scored) -> dict[str, object]:
    labels, predicted = answers.labels.tolist(), answers.predicted.tolist()
    return {"labels": labels, "predicted": predicted, "p_true": answers.p_true.tolist()}


def _pooled_mcc(answers: list[Scored]) -> float:
    labels = np.concatenate([a.labels for a in answers])
    predicted = np.concatenate([a.predicted for a in answers])
    return mcc(labels == 1, predicted == 1)


def paired_comparison(model: list[Scored], probe: list[Scored], n_boot: int, seed: int) -> dict[str, object]:
    """Fine-tuned - probe on the pooled val_test images of every seed: MCC, accuracy, log-loss, with a paired
    bootstrap 95% percentile interval (images resampled with replacement within each seed; both models are
    scored on the same resampled images)."""
    labels = np.concatenate([a.labels for a in model])
    if not np.array_equal(labels, np.concatenate([a.labels for a in probe])):
        raise ValueError("the fine-tuned model and the probe were scored on different val_test images")
    pred_m = np.concatenate([a.predicted for a in model])
    pred_p = np.concatenate([a.predicted for a in probe])
    loss_m = -np.log(np.clip(np.concatenate([a.p_true for a in model]), 1e-12, 1.0))
    loss_p = -np.log(np.clip(np.concatenate([a.p_true for a in probe]), 1e-12, 1.0))
    offsets = np.cumsum([0] + [len(a.labels) for a in model])
    rng = np.random.default_rng(seed)

    def figures(idx: IntArray) -> tuple[float, float, float]:
        y = labels[idx] == 1
        return (
            mcc(y, pred_m[idx] == 1) - mcc(y, pred_p[idx] == 1),
            float(np.mean(pred_m[idx] == labels[idx]) - np.mean(pred_p[idx] == labels[idx])),
            float(np.mean(loss_m[idx]) - np.mean(loss_p[idx])),
        )

    draws = np.empty((n_boot, 3))
    for b in range(n_boot):
        idx = np.concatenate([rng.integers(lo, hi, hi - lo) for lo, hi in itertools.pairwise(offsets)])
        draws[b] = figures(idx)
    point = figures(np.arange(len(labels)))
    low, high = np.percentile(draws, [2.5, 97.5], axis=0)
    both_wrong = int(np.sum((pred_m != labels) & (pred_p != labels)))
    return {
        "n_images": len(labels),
        "mcc_pooled_diff": point[0],
        "mcc_diff_ci95": [float(low[0]), float(high[0])],
        "accuracy_diff": point[1],
        "accuracy_diff_ci95": [float(low[1]), float(high[1])],
        "log_loss_diff": point[2],
        "log_loss_diff_ci95": [float(low[2]), float(high[2])],
        "errors_model": int(np.sum(pred_m != labels)),
        "errors_probe": int(np.sum(pred_p != labels)),
        "errors_both": both_wrong,
    }


def linear_probe(dataset_dir: Path, recipe: Recipe) -> tuple[dict[str, object], Scored]:
    """LogisticRegression on frozen ImageNet features (global view): fitted on train, C chosen by MCC on
    val_select at 0.5 (ties: the lower val_select log-loss), the MCC threshold on P(roadwork) chosen on
    val_calib; reported on val_test (MCC, accuracy, log-loss and ECE of its own probabilities)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    ds = load_dataset(dataset_dir)
    preprocess = replace(resolve_preprocess(recipe, ds.image_shape[2]), views=None)
    arch = resolve_arch(recipe, ds.num_classes, preprocess)
    model = build_model(arch)
    load_pretrained_backbone(model, str(imagenet_backbone(arch)))
    model.eval()
    started = time.perf_counter()

    def features(images: npt.NDArray[np.uint8]) -> FloatArray:
        out = []
        with torch.no_grad():
            for i in range(0, len(images), 64):
                out.append(model.features(to_model_input(images[i : i + 64], preprocess)).numpy())
        return np.concatenate(out).astype(np.float64)

    train, select = ds.split("train", "fit"), ds.split("val_select", "select")
    calib, test = ds.split("val_calib", "calibrate"), ds.split("val_test", "evaluate")
    x_train, x_select = features(train.images), features(select.images)
    x_calib, x_test = features(calib.images), features(test.images)
    seconds = time.perf_counter() - started
    scaler = StandardScaler().fit(x_train)
    # C by val_select MCC, ties broken by val_select log-loss: the rule supervised_train picks its epoch by
    # (is_improvement), so the probe is chosen as fairly as the fine-tuned model
    best: tuple[float, float, float, LogisticRegression] | None = None
    for c in PROBE_C:
        clf = LogisticRegression(C=c, max_iter=5000).fit(scaler.transform(x_train), train.labels)
        probs_select = clf.predict_proba(scaler.transform(x_select)).astype(np.float64)
        score = mcc(select.labels == 1, probs_select.argmax(axis=1) == 1)
        loss = nll(probs_select, select.labels.astype(np.int64))
        if best is None or score > best[0] or (score == best[0] and loss < best[2]):
            best = (score, c, loss, clf)
    assert best is not None
    clf = best[3]
    curve = exact_sweep(clf.predict_proba(scaler.transform(x_calib))[:, 1], calib.labels == 1)
    threshold = float(curve.threshold[choose_binary(curve, parse_objective("mcc"))])
    probs = clf.predict_proba(scaler.transform(x_test)).astype(np.float64)
    predicted = (probs[:, 1] >= threshold).astype(np.int64)
    labels = test.labels.astype(np.int64)
    report: dict[str, object] = {
        "C": best[1],
        "val_select_mcc": best[0],
        "val_select_log_loss": best[2],
        "threshold": threshold,
        "mcc": mcc(labels == 1, predicted == 1),
        "accuracy": float(np.mean(predicted == labels)),
        "log_loss": nll(probs, labels),
        "ece": ece(probs, labels),
        "feature_seconds": seconds,
    }
    return report, Scored(labels, predicted, probs[np.arange(len(labels)), labels])


if __name__ == "__main__":
    sys.exit(main())
