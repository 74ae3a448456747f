"""Benchmark: conformal prediction sets on the same MNIST softmax, ours vs MAPIE, over many random splits.

Probabilities: a small CNN (2 conv + 1 linear layer) trained on ../shared/datasets/mnist-5k-train only, by 2-fold
cross-fitting: the CNN trained on one half gives the softmax of the other half, so each of the 5,000 rows comes
from a model that never saw its image. mnist-test-dev is never read. Then, for each of --splits random splits
of those rows into calibration (--n-cal) and test (the rest), every method is fitted on the calibration rows and
measured on the test rows: coverage, mean set size, empty-set share (means over the splits; +- is one standard
deviation over the splits).

Methods: ours (visionpipe.phases.conformal.fit_conformal + visionpipe.serving.policies.conformal_sets):
``aps`` (randomized, u from a hash of each image's probabilities), ``aps-conservative`` (non-randomized,
includes the crossing class), ``aps-legacy`` (the old default: inclusive mass <= qhat; only read from old
bundles), ``lac``, ``raps`` (lam 0.01, k_reg 1); MAPIE 1.x ``SplitConformalClassifier(conformity_score="aps",
prefit=True)`` with ``include_last_label="randomized"`` (a fresh random_state per split) and ``True``.

    .venv/bin/python bench/conformal.py [--alpha 0.1 [0.05 ...]] [--splits 200] [--n-cal 2000] [--epochs 4]
        [--threads 2]

Prints one markdown table per alpha, each followed by ``alpha=<a> aps_size=<f> mapie_aps_size=<f>
aps_coverage=<f>``.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image
from sklearn.base import BaseEstimator, ClassifierMixin

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from visionpipe.phases.conformal import conformal_quantile, fit_conformal, set_report  # noqa: E402
from visionpipe.serving.policies import ConformalConfig, conformal_score_matrix, conformal_sets  # noqa: E402

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
TRAIN_DIR = REPO.parent / "shared" / "datasets" / "mnist-5k-train"


def load_mnist(folder: Path) -> tuple[npt.NDArray[np.float32], IntArray]:
    images, labels = [], []
    for label in range(10):
        for path in sorted((folder / str(label)).glob("*.png")):
            with Image.open(path) as img:
                images.append(np.asarray(img.convert("L"), dtype=np.float32) / 255.0)
            labels.append(label)
    return np.stack(images)[:, None], np.array(labels, dtype=np.int64)


def cross_fitted_softmax(x: npt.NDArray[np.float32], y: IntArray, epochs: int, seed: int) -> FloatArray:
    import torch
    from torch import nn

    rng = np.random.default_rng(seed)
    fold = np.zeros(len(y), dtype=np.int64)
    for label in range(10):  # class-stratified halves
        members = rng.permutation(np.flatnonzero(y == label))
        fold[members[: len(members) // 2]] = 1
    probs = np.zeros((len(y), 10))
    for k in (0, 1):
        torch.manual_seed(seed + k)
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
        )  # fmt: skip
        train = np.flatnonzero(fold != k)
        xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(train))
            for start in range(0, len(train), 64):
                batch = order[start : start + 64]
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(xt[batch]), yt[batch])
                loss.backward()  # type: ignore[no-untyped-call]  # torch's Tensor.backward is unannotated
                opt.step()
        model.eval()
        held = np.flatnonzero(fold == k)
        with torch.no_grad():
            logits = model(torch.from_numpy(x[held])).double()
        probs[held] = torch.softmax(logits, dim=1).numpy()
    return probs


class ProbabilityTable(ClassifierMixin, BaseEstimator):  # type: ignore[misc]  # sklearn ships no types
    """Prefit 'classifier' whose single feature is a row index into fixed probabilities (MAPIE scores ours)."""

    def __init__(self, probs: FloatArray) -> None:
        self.probs = probs
        self.classes_ = np.arange(probs.shape[1])
        self.n_features_in_ = 1

    def fit(self, x: FloatArray, y: IntArray) -> "ProbabilityTable":
        return self

    def predict_proba(self, x: FloatArray) -> FloatArray:
        return self.probs[np.asarray(x)[:, 0].astype(np.int64)]

    def predict(self, x: FloatArray) -> IntArray:
        out: IntArray = self.predict_proba(x).argmax(axis=1)
        return out


def legacy_config(probs: FloatArray, labels: IntArray, alpha: float) -> ConformalConfig:
    """The old `aps` fit (inclusive mass, u = 1), which fit_conformal no longer offers."""
    scores = conformal_score_matrix(probs, "aps-legacy")[np.arange(len(labels)), labels]
    return ConformalConfig("aps-legacy", conformal_quantile(scores, alpha), alpha)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--alpha", type=float, nargs="+", default=[0.1])
    parser.add_argument("--splits", type=int, default=200)
    parser.add_argument("--n-cal", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from mapie.classification import SplitConformalClassifier  # type: ignore[import-untyped]  # no py.typed

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    x, y = load_mnist(TRAIN_DIR)
    probs = cross_fitted_softmax(x, y, args.epochs, args.seed)
    train_s = time.perf_counter() - start
    accuracy = float(np.mean(probs.argmax(axis=1) == y))
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-9)

    table = ProbabilityTable(probs)
    print(
        f"MNIST 5k-train, 2-fold cross-fitted CNN softmax ({args.epochs} epochs, accuracy {accuracy:.4f}, "
        f"{train_s:.0f} s); {args.splits} random splits of {args.n_cal} calibration / {len(y) - args.n_cal} test rows"
    )
    for alpha in args.alpha:
        run_alpha(probs, y, table, alpha, args.splits, args.n_cal, args.seed, SplitConformalClassifier)


def run_alpha(
    probs: FloatArray, y: IntArray, table: ProbabilityTable, alpha: float, splits: int, n_cal: int, seed: int,
    mapie_class: type,
) -> None:  # fmt: skip
    methods = ["aps", "aps-conservative", "aps-legacy", "lac", "raps", "mapie-aps-randomized", "mapie-aps-last-label"]
    results: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    rng = np.random.default_rng(seed + 1)
    start = time.perf_counter()
    for i in range(splits):
        perm = rng.permutation(len(y))
        cal, test = perm[:n_cal], perm[n_cal:]
        for method in ("aps", "aps-conservative", "lac", "raps"):
            config = fit_conformal(probs[cal], y[cal], alpha, method)
            results[method].append(set_report(conformal_sets(probs[test], config), y[test]))
        legacy = legacy_config(probs[cal], y[cal], alpha)
        results["aps-legacy"].append(set_report(conformal_sets(probs[test], legacy), y[test]))
        mapie = mapie_class(table, confidence_level=1 - alpha, conformity_score="aps", prefit=True, random_state=i)
        mapie.conformalize(cal[:, None], y[cal])
        for name, last in (("mapie-aps-randomized", "randomized"), ("mapie-aps-last-label", True)):
            _, sets = mapie.predict_set(test[:, None], conformity_score_params={"include_last_label": last})
            results[name].append(set_report(sets[:, :, 0], y[test]))
    splits_s = time.perf_counter() - start

    print(f"\nalpha={alpha} ({splits_s:.0f} s; load average {os.getloadavg()[0]:.2f})")
    print(f"\n| method | coverage (target {1 - alpha:g}) | mean set size | empty sets |\n|---|---|---|---|")
    for method in methods:
        cov = np.array([r["coverage"] for r in results[method]])
        size = np.array([r["mean_set_size"] for r in results[method]])
        empty = np.array([r["empty_rate"] for r in results[method]])
        print(
            f"| {method} | {cov.mean():.4f} +- {cov.std():.4f} | {size.mean():.3f} +- {size.std():.3f} | "
            f"{100 * empty.mean():.1f} % |"
        )
    ours = np.mean([r["mean_set_size"] for r in results["aps"]])
    theirs = np.mean([r["mean_set_size"] for r in results["mapie-aps-randomized"]])
    coverage = np.mean([r["coverage"] for r in results["aps"]])
    print(f"\nalpha={alpha} aps_size={ours:.4f} mapie_aps_size={theirs:.4f} aps_coverage={coverage:.4f}")


if __name__ == "__main__":
    main()
