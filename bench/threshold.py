"""Benchmark: the exact MCC threshold sweep vs a 5000-point grid loop vs sklearn's TunedThresholdClassifierCV.

Same synthetic scores for all three, one run each. The grid method is the planning documents' one:
np.linspace(0, 1, 5000) and a Python loop over sklearn.metrics.matthews_corrcoef. Every MCC below is
recomputed with sklearn on the rule 'positive iff score >= threshold'.

    .venv/bin/python bench/threshold.py --n 100000

Last line: n=<N> speedup_vs_grid=<float> mcc_exact=<float> mcc_grid=<float> mcc_tuned=<float>
"""

import argparse
import sys
import time

import numpy as np
import numpy.typing as npt
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.metrics import matthews_corrcoef
from sklearn.model_selection import TunedThresholdClassifierCV

from visionpipe.phases.threshold_sweep import choose_binary, exact_sweep, parse_objective

GRID_POINTS = 5000


class FixedScores(ClassifierMixin, BaseEstimator):  # type: ignore[misc]
    """A 'prefit' classifier whose P(positive) is the single feature column."""

    def fit(self, x: npt.NDArray[np.float64], y: npt.NDArray[np.int64]) -> "FixedScores":
        self.classes_ = np.array([0, 1])
        return self

    def predict_proba(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        s = x[:, 0]
        return np.stack([1.0 - s, s], axis=1)

    def predict(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
        return (x[:, 0] >= 0.5).astype(np.int64)


def synthetic(n: int, seed: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(np.int64)
    margin = rng.normal(loc=np.where(y == 1, 1.2, -1.2), scale=1.5)
    return 1.0 / (1.0 + np.exp(-margin)), y


def exact(scores: npt.NDArray[np.float64], y: npt.NDArray[np.int64]) -> tuple[float, float]:
    start = time.perf_counter()
    curve = exact_sweep(scores, y == 1)
    best = choose_binary(curve, parse_objective("mcc"))
    elapsed = time.perf_counter() - start
    return elapsed, float(curve.threshold[best])


def grid(scores: npt.NDArray[np.float64], y: npt.NDArray[np.int64]) -> tuple[float, float]:
    start = time.perf_counter()
    thresholds = np.linspace(0, 1, GRID_POINTS)
    values = np.empty(GRID_POINTS)
    for i, t in enumerate(thresholds):
        values[i] = matthews_corrcoef(y, (scores >= t).astype(np.int64))
        if (i + 1) % 500 == 0:
            print(
                f"  grid {i + 1}/{GRID_POINTS} ({time.perf_counter() - start:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
    elapsed = time.perf_counter() - start
    return elapsed, float(thresholds[int(np.argmax(values))])


def tuned(scores: npt.NDArray[np.float64], y: npt.NDArray[np.int64]) -> tuple[float, float]:
    x = scores[:, None]
    start = time.perf_counter()
    model = TunedThresholdClassifierCV(
        FixedScores().fit(x, y), cv="prefit", refit=False, scoring="matthews_corrcoef"
    ).fit(x, y)
    elapsed = time.perf_counter() - start
    return elapsed, float(model.best_threshold_)


def mcc_at(scores: npt.NDArray[np.float64], y: npt.NDArray[np.int64], t: float) -> float:
    return float(matthews_corrcoef(y, (scores >= t).astype(np.int64)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    scores, y = synthetic(args.n, args.seed)
    print(f"n={args.n}: exact sweep ...", flush=True)
    t_exact, thr_exact = exact(scores, y)
    print(f"  exact: {t_exact * 1e3:.1f} ms, threshold {thr_exact:.6f}", flush=True)
    print(f"grid loop over {GRID_POINTS} thresholds (slow) ...", flush=True)
    t_grid, thr_grid = grid(scores, y)
    print(f"  grid: {t_grid:.2f} s, threshold {thr_grid:.6f}", flush=True)
    print("TunedThresholdClassifierCV(cv='prefit', refit=False) ...", flush=True)
    t_tuned, thr_tuned = tuned(scores, y)
    print(f"  tuned: {t_tuned * 1e3:.1f} ms, threshold {thr_tuned:.6f}", flush=True)
    mcc_exact, mcc_grid, mcc_tuned = (mcc_at(scores, y, t) for t in (thr_exact, thr_grid, thr_tuned))
    print(f"  speedup vs tuned: {t_tuned / t_exact:.1f}x", flush=True)
    print(
        f"n={args.n} speedup_vs_grid={t_grid / t_exact:.1f} mcc_exact={mcc_exact:.6f} "
        f"mcc_grid={mcc_grid:.6f} mcc_tuned={mcc_tuned:.6f}"
    )


if __name__ == "__main__":
    main()
