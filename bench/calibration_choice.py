"""Benchmark: how reliably binary `calibration_method=auto` picks the calibrator that is best on held-out data.

For each case (real or synthetic binary scores) and each calibration size n, over `--splits` seeded random
splits: the first n images are the calibration part (val_calib), the rest the held-out part. Every candidate
(identity, temperature, platt, beta, isotonic) is fitted on the calibration part exactly as the phase fits it
(visionpipe.phases.calibrators_fit) and scored on the held-out part; the held-out-best is the lowest held-out NLL.
Every selection rule (visionpipe.phases.calibration.CANDIDATE_RULES, the phase's own code; cv5_min is the rule
before issue 16) then picks from the calibration part alone, and the bench reports, side by side:

- hit: how often the rule picked the held-out-best;
- regret: held-out NLL of its pick minus that of the held-out-best, in nats per image (mean and max);
- the picks.

Regret is what the rule is chosen by (a pick that misses the best by 1e-5 nats costs nothing); hit rate is shown.

Cases. Real: MNIST one-vs-rest (digit d vs the rest; digits 3, 8, 9) from a small MLP (scikit-learn, 784-64-10,
60 epochs) and digit 8 from a logistic regression (standardised pixels, C = 0.05), both on
../shared/datasets/mnist-5k-train, their scores out-of-fold (5-fold cross_val_predict), so every score is from a
model that did not see the image; the binary logits are [log P(not d), log P(d)]. mnist-test-dev is never read.
Synthetic, well-specified: margin m ~ N(0, 2^2), label ~ Bernoulli(sigmoid(m)), logits [0, f(m)] with
f(m) = m (truth: identity), 2.5 m (truth: temperature 2.5) or 2 m + 1 (truth: platt).

    .venv/bin/python bench/calibration_choice.py                  # 30 splits, n = 200 and 1000
    .venv/bin/python bench/calibration_choice.py --splits 20 --sizes 300

Writes bench/out/calibration_choice.json. Last line: the recommended rule's and cv5_min's mean regret over all
cases and splits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visionpipe.phases.calibration import BINARY_RULE, CANDIDATE_RULES, CvLosses, cross_fit_losses
from visionpipe.phases.calibrators_fit import fit_calibrator
from visionpipe.serving.calibrators import CALIBRATION_METHODS
from visionpipe.serving.metrics import FloatArray, IntArray

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "datasets" / "mnist-5k-train"
OUT = ROOT / "bench" / "out" / "calibration_choice.json"
SYNTHETIC_HELD_OUT = 20000
MNIST_DIGITS = (3, 8, 9)
LOGREG_DIGIT = 8
FIXED = ("identity", "temperature", "platt")  # always-this baselines shown for scale


@dataclass(frozen=True)
class Case:
    name: str
    logits: FloatArray  # (N, 2)
    labels: IntArray


def mnist_cases(digits: tuple[int, ...], logreg_digit: int | None) -> list[Case]:
    from PIL import Image
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xs, ys = [], []
    for cls in sorted(p.name for p in MNIST.iterdir() if p.is_dir()):
        for f in sorted((MNIST / cls).iterdir()):
            with Image.open(f) as im:
                xs.append(np.asarray(im.convert("L"), dtype=np.float64).ravel() / 255.0)
            ys.append(int(cls))
    x, y = np.stack(xs), np.array(ys, dtype=np.int64)
    mlp = MLPClassifier((64,), max_iter=60, random_state=0)
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probs = cross_val_predict(mlp, x, y, cv=folds, method="predict_proba")
    cases = [_one_vs_rest(f"mnist-ovr-{d} (MLP)", probs, y, d) for d in digits]
    if logreg_digit is not None:  # a second model family: smoother, less extreme scores
        logreg = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=300))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            probs = cross_val_predict(logreg, x, y, cv=folds, method="predict_proba")
        cases.append(_one_vs_rest(f"mnist-ovr-{logreg_digit} (logistic)", probs, y, logreg_digit))
    return cases


def _one_vs_rest(name: str, probs: FloatArray, y: IntArray, digit: int) -> Case:
    """Binary logits [log P(not d), log P(d)] of a 10-class model's out-of-fold probabilities."""
    rest = np.delete(probs, digit, axis=1).sum(axis=1)
    z = np.log(np.clip(np.stack([rest, probs[:, digit]], axis=1), 1e-300, None))
    return Case(name, z, (y == digit).astype(np.int64))


def synthetic_cases(n: int, seed: int) -> list[Case]:
    rng = np.random.default_rng(seed)
    m = rng.normal(0.0, 2.0, n)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-m))).astype(np.int64)
    zero = np.zeros(n)
    return [
        Case("synthetic, truth identity", np.stack([zero, m], axis=1), y),
        Case("synthetic, truth temperature 2.5", np.stack([zero, 2.5 * m], axis=1), y),
        Case("synthetic, truth platt (2m + 1)", np.stack([zero, 2.0 * m + 1.0], axis=1), y),
    ]


def held_out_nll(logits: FloatArray, labels: IntArray, cal: IntArray, held: IntArray) -> dict[str, float]:
    out = {}
    for method in CALIBRATION_METHODS:
        calibrator = fit_calibrator(method, 2, logits[cal], labels[cal], 1)
        p = calibrator.probabilities(logits[held])[np.arange(len(held)), labels[held]]
        out[method] = float(-np.mean(np.log(np.clip(p, 1e-12, 1.0))))
    return out


def picks_for_split(logits: FloatArray, labels: IntArray, seed: int) -> dict[str, tuple[str, str]]:
    """Each rule's (pick, reason) on one calibration part; repeats / folds computed once and shared."""
    max_repeats = max(r.repeats for r in CANDIDATE_RULES if r.n_folds == 5)
    cv5 = cross_fit_losses(CALIBRATION_METHODS, 2, 1, logits, labels, seed, 5, max_repeats)
    cache: dict[tuple[int, int], CvLosses] = {}
    out = {}
    for rule in CANDIDATE_RULES:
        key = (rule.n_folds, rule.repeats)
        if key not in cache:
            if rule.n_folds == 5:  # repeat r of the shared run is exactly what the rule would compute
                cache[key] = CvLosses(cv5.methods, cv5.sample_nll[: rule.repeats], cv5.folds[: rule.repeats], 5)
            else:
                cache[key] = cross_fit_losses(
                    CALIBRATION_METHODS, 2, 1, logits, labels, seed, rule.n_folds, rule.repeats
                )
        out[rule.name] = rule.choose(cache[key])
    for method in FIXED:
        out[f"always {method}"] = (method, "fixed baseline")
    return out


def run_case(case: Case, n_cal: int, splits: int) -> dict[str, object]:
    rows: dict[str, dict[str, list[float | str]]] = {}
    best_counts: dict[str, int] = {}
    for s in range(splits):
        rng = np.random.default_rng(1000 + s)
        perm = rng.permutation(len(case.labels))
        cal, held = perm[:n_cal], perm[n_cal:]
        held_nll = held_out_nll(case.logits, case.labels, cal, held)
        best = min(CALIBRATION_METHODS, key=lambda m: (held_nll[m], CALIBRATION_METHODS.index(m)))
        best_counts[best] = best_counts.get(best, 0) + 1
        for name, (pick, _) in picks_for_split(case.logits[cal], case.labels[cal], seed=s).items():
            row = rows.setdefault(name, {"regret": [], "hit": [], "pick": []})
            row["regret"].append(held_nll[pick] - held_nll[best])
            row["hit"].append(float(pick == best))
            row["pick"].append(pick)
    table = {}
    for name, row in rows.items():
        regret = np.array(row["regret"], dtype=np.float64)
        picks = [str(p) for p in row["pick"]]
        table[name] = {
            "hits": int(sum(float(h) for h in row["hit"])),
            "mean_regret": float(regret.mean()),
            "max_regret": float(regret.max()),
            "picks": {m: picks.count(m) for m in CALIBRATION_METHODS if picks.count(m)},
        }
    return {
        "case": case.name,
        "n_cal": n_cal,
        "n_held_out": len(case.labels) - n_cal,
        "splits": splits,
        "held_out_best": best_counts,
        "rules": table,
    }


def short(picks: dict[str, int]) -> str:
    abbrev = {"identity": "id", "temperature": "T", "platt": "pl", "beta": "be", "isotonic": "iso"}
    return " ".join(f"{abbrev[m]}{c}" for m, c in picks.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, default=30)
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--digits", type=int, nargs="*", default=list(MNIST_DIGITS))
    parser.add_argument("--logreg-digit", type=int, default=LOGREG_DIGIT, help="-1: no logistic-regression case")
    parser.add_argument("--no-synthetic", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.splits < 1 or any(n < 20 for n in args.sizes):
        parser.error(f"--splits={args.splits} must be >= 1 and every --sizes value >= 20; got {args.sizes}")
    start = time.perf_counter()
    logreg = None if args.logreg_digit < 0 else args.logreg_digit
    cases = mnist_cases(tuple(args.digits), logreg) if args.digits or logreg is not None else []
    if not args.no_synthetic:
        cases += synthetic_cases(max(args.sizes) + SYNTHETIC_HELD_OUT, seed=7)
    results = []
    names = [r.name for r in CANDIDATE_RULES] + [f"always {m}" for m in FIXED]
    for case in cases:
        for n_cal in args.sizes:
            if n_cal >= len(case.labels) - 100:
                continue
            res = run_case(case, n_cal, args.splits)
            results.append(res)
            best = short(res["held_out_best"])  # type: ignore[arg-type]  # dict[str, int] built above
            print(f"\n## {case.name}, n_cal={n_cal}, held-out {res['n_held_out']}, held-out-best: {best}")
            print("| rule | hits | mean regret | max regret | picks |\n|---|---|---|---|---|")
            table = res["rules"]
            assert isinstance(table, dict)
            for name in names:
                row = table[name]
                print(
                    f"| {name} | {row['hits']}/{args.splits} | {row['mean_regret']:.5f} | {row['max_regret']:.5f} |"
                    f" {short(row['picks'])} |"
                )
            sys.stdout.flush()
    summary = {}
    for name in names:
        regrets = [r["rules"][name]["mean_regret"] for r in results]  # type: ignore[index]  # JSON-shaped dict
        maxes = [r["rules"][name]["max_regret"] for r in results]  # type: ignore[index]
        hits = [r["rules"][name]["hits"] for r in results]  # type: ignore[index]
        summary[name] = {
            "mean_regret": float(np.mean(regrets)),
            "worst_case_mean_regret": float(np.max(regrets)),
            "max_regret": float(np.max(maxes)),
            "hit_rate": float(np.sum(hits)) / (args.splits * len(results)),
        }
    print(f"\n## all {len(results)} case x size rows, {args.splits} splits each")
    print("| rule | hit rate | mean regret | worst row's mean regret | max regret |\n|---|---|---|---|---|")
    for name, row in summary.items():
        print(
            f"| {name} | {row['hit_rate']:.2f} | {row['mean_regret']:.5f} | {row['worst_case_mean_regret']:.5f} |"
            f" {row['max_regret']:.5f} |"
        )
    elapsed = time.perf_counter() - start
    load = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"args": {**vars(args), "out": str(args.out)}, "results": results, "summary": summary, "seconds": elapsed},
            indent=2,
        )
        + "\n"
    )
    print(f"\n{elapsed:.0f} s, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; wrote {args.out}")
    print(
        f"binary_rule={BINARY_RULE.name} mean_regret={summary[BINARY_RULE.name]['mean_regret']:.6f} "
        f"cv5_min_mean_regret={summary['cv5_min']['mean_regret']:.6f}"
    )


if __name__ == "__main__":
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]  # threadpoolctl ships no types

    with threadpool_limits(1):  # thousands of tiny fits: one BLAS thread is ~4x faster here than 2 fighting
        main()
