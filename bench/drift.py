"""Benchmark: drift alarms of visionpipe/monitoring/drift.py on real digits, false-alarm and detection rates.

A digits bundle is built the pipeline's way (data_fetch -> supervised_train -> threshold_sweep -> calibration ->
bundle_validation, the same core functions as the test fixtures) from 350 images per class of
../shared/datasets/mnist-5k-train (split ratios 0.55 / 0.10 / 0.10 / 0.25, so val_test, which builds the bundle's
drift reference, holds 875 images). The other 150 images per class are HELD OUT: they neither train the bundle nor
build its reference. Windows of `--windows` sizes are drawn from them (without replacement within a window):

  in-distribution  held-out digits as they are (the false-alarm rate; target: <= --false-alarm-rate)
  inverted         255 - pixel
  rotated-30       rotated by 30 degrees (black fill)
  noise-40         gaussian pixel noise, sigma 40 grey levels, clipped to 0..255
  digits-0-4       only held-out digits of the classes 0-4 (a label-mix shift; images unchanged)
  mnist-test-dev   the first --test-dev images of ../shared/datasets/mnist-test-dev (MNIST's official test set:
                   other writers, not a synthetic shift; reported for information, evaluation-only data)

Every window goes through the served bundle (BundleModel: calibrated probabilities, the policy's decisions) and a
DriftMonitor(window=w, false_alarm_rate=--false-alarm-rate) built from the bundle's own drift_reference.json. The
table gives, per scenario and window size, the share of windows in which each statistic alarmed and in which any
alarmed, with a 95 % Clopper-Pearson interval on the "any" rate (the windows are random subsets of one pool of
1,500 images, so they overlap and the interval is approximate). Results: bench/out/drift.json and
bench/out/drift.png.

    .venv/bin/python bench/drift.py [--windows 100,200] [--n-windows 300] [--false-alarm-rate 0.01]
        [--epochs 6] [--test-dev 2000] [--rebuild]

The last line printed is ``false_alarm_any_w<w>=<rate> ... detect_any_<scenario>_w<w>=<rate> ...``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/train_mnist.py

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from visionpipe.monitoring.drift import DriftMonitor, DriftStat, load_reference  # noqa: E402

OUT = REPO / "bench" / "out"
WORK = OUT / "drift-work"
BUNDLE = OUT / "drift-bundle"
TRAIN_DIR = REPO.parent / "shared" / "datasets" / "mnist-5k-train"
TEST_DEV = REPO.parent / "shared" / "datasets" / "mnist-test-dev"
PER_CLASS_PIPELINE = 350
RATIOS = (0.55, 0.10, 0.10, 0.25)
UInt8 = npt.NDArray[np.uint8]


def split_files(seed: int = 0) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Per class: the files for the pipeline (350) and the held-out files (the rest), seeded."""
    rng = np.random.default_rng(seed)
    pipeline, held = {}, {}
    for folder in sorted(p for p in TRAIN_DIR.iterdir() if p.is_dir()):
        files = sorted(folder.glob("*.png"))
        order = rng.permutation(len(files))
        pipeline[folder.name] = [files[i] for i in order[:PER_CLASS_PIPELINE]]
        held[folder.name] = [files[i] for i in order[PER_CLASS_PIPELINE:]]
    return pipeline, held


def build_bundle(pipeline: dict[str, list[Path]], epochs: int, rebuild: bool) -> Path:
    from visionpipe.phases.bundle_validation import Gates
    from visionpipe.phases.bundle_validation import run as validate
    from visionpipe.phases.calibration import run as calibrate
    from visionpipe.phases.data_fetch import run as fetch
    from visionpipe.phases.supervised_train import run as train
    from visionpipe.phases.threshold_sweep import run as sweep
    from visionpipe.training.recipes import load_recipe

    if (BUNDLE / "bundle.json").is_file() and not rebuild:
        print(f"reusing {BUNDLE} (--rebuild to build it again)", flush=True)
        return BUNDLE
    shutil.rmtree(WORK, ignore_errors=True)
    shutil.rmtree(BUNDLE, ignore_errors=True)
    src = WORK / "src"
    for cls, files in pipeline.items():
        (src / cls).mkdir(parents=True)
        for f in files:
            shutil.copyfile(f, src / cls / f.name)
    t0 = time.perf_counter()
    fetch(str(src), WORK / "ds", ratios=RATIOS, seed=0)
    recipe = load_recipe("digits-cnn", {"epochs": epochs, "preprocess": {"kind": "standard"}})
    train(WORK / "ds", WORK / "model", WORK / "logits", recipe, WORK / "ckpt", log=lambda _msg: None)
    sweep(WORK / "logits", WORK / "thr", bootstrap=100)
    calibrate(WORK / "logits", WORK / "thr", WORK / "cal")
    result = validate(
        WORK / "ds",
        WORK / "model",
        WORK / "logits",
        WORK / "cal",
        BUNDLE,
        threshold_dir=WORK / "thr",
        gates=Gates(min_accuracy=0.5),
        name="digits-drift-bench",
    )
    acc = result.metrics["val_test"]["accuracy"]
    print(f"built {BUNDLE} in {time.perf_counter() - t0:.0f} s (val_test accuracy {acc:.4f})", flush=True)
    return BUNDLE


def load_pngs(files: list[Path]) -> UInt8:
    return np.stack([np.asarray(Image.open(f).convert("L"), dtype=np.uint8)[..., None] for f in files])


def scenarios(held: dict[str, list[Path]], test_dev: int, seed: int) -> dict[str, UInt8]:
    files = [f for cls in sorted(held) for f in held[cls]]
    labels = np.array([int(cls) for cls in sorted(held) for _ in held[cls]])
    images = load_pngs(files)
    rng = np.random.default_rng(seed)
    noisy = np.clip(images.astype(np.float64) + rng.normal(0, 40, images.shape), 0, 255)
    rotated = np.stack([np.asarray(Image.fromarray(im[..., 0]).rotate(30, fillcolor=0))[..., None] for im in images])
    out = {
        "in-distribution": images,
        "inverted": (255 - images).astype(np.uint8),
        "rotated-30": rotated.astype(np.uint8),
        "noise-40": np.rint(noisy).astype(np.uint8),
        "digits-0-4": images[labels <= 4],
    }
    if test_dev > 0 and TEST_DEV.is_dir():
        dev = sorted(TEST_DEV.glob("*/*.png"), key=lambda p: p.name)[:test_dev]
        out["mnist-test-dev"] = load_pngs(dev)
    return out


def exact_ci(k: int, n: int) -> tuple[float, float]:
    ci = stats.binomtest(k, n).proportion_ci(0.95, method="exact")
    return float(ci.low), float(ci.high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", default="100,200", help="window sizes, comma-separated")
    parser.add_argument("--n-windows", type=int, default=300, help="windows per scenario and size")
    parser.add_argument("--false-alarm-rate", type=float, default=0.01)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--test-dev", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rebuild", action="store_true")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    from visionpipe.serving.bundle import BundleModel, read_bundle

    command = "  ".join(["command:", " ".join([".venv/bin/python", "bench/drift.py", *sys.argv[1:]])])
    print(command)
    print(f"load average {os.getloadavg()}, cpus {os.cpu_count()}", flush=True)
    t_start = time.perf_counter()
    pipeline, held = split_files(args.seed)
    bundle_dir = build_bundle(pipeline, args.epochs, args.rebuild)
    reference = load_reference(bundle_dir)
    runtime = BundleModel(read_bundle(bundle_dir))
    print(f"reference: {reference.size} val_test images ({(bundle_dir / 'drift_reference.json').stat().st_size:,} B)")

    data = scenarios(held, args.test_dev, args.seed)
    served = {}
    for name, images in data.items():
        pred = runtime.predict_images(images)
        served[name] = (pred.calibrated_probs.max(axis=1), pred.decisions.labels)
    sizes = [int(w) for w in args.windows.split(",")]
    rng = np.random.default_rng(args.seed + 1)
    results: dict[str, object] = {
        "command": command.removeprefix("command:").strip(),
        "reference_size": reference.size,
        "false_alarm_rate": args.false_alarm_rate,
        "n_windows": args.n_windows,
        "held_out_images": len(data["in-distribution"]),
        "rows": [],
    }
    rows: list[dict[str, object]] = []
    for w in sizes:
        t0 = time.perf_counter()
        monitor = DriftMonitor(reference, window=w, false_alarm_rate=args.false_alarm_rate, seed=args.seed)
        t_null = time.perf_counter() - t0
        keys = [(t.feature, t.test) for t in monitor.tests]
        print(
            f"\nwindow {w}: {len(keys)} statistics, Bonferroni per-test rate {monitor.per_test_rate:.5f}, "
            f"{monitor.n_null} bootstrap windows each, null computed in {t_null:.1f} s",
            flush=True,
        )
        features = {name: monitor.image_features(list(images)) for name, images in data.items()}
        header = f"{'scenario':<16} {'any':>6} {'95% CI':>15}  " + " ".join(f"{f[:12]}/{t}".rjust(17) for f, t in keys)
        print(header)
        t_report: list[float] = []
        for name, images in data.items():
            inputs, emb = features[name]
            conf, labels = served[name]
            counts = dict.fromkeys(keys, 0)
            any_alarm = 0
            for _ in range(args.n_windows):
                idx = rng.choice(len(images), size=w, replace=False)
                monitor.reset()
                monitor.observe_features({k: v[idx] for k, v in inputs.items()}, emb[idx], conf[idx], labels[idx])
                t1 = time.perf_counter()
                report: list[DriftStat] = monitor.report()
                t_report.append(time.perf_counter() - t1)
                hit = False
                for s in report:
                    if s.alarm:
                        counts[(s.feature, s.test)] += 1
                        hit = True
                any_alarm += hit
            low, high = exact_ci(any_alarm, args.n_windows)
            rate = any_alarm / args.n_windows
            per = {f"{f}/{t}": counts[(f, t)] / args.n_windows for f, t in keys}
            print(
                f"{name:<16} {rate:6.3f} [{low:5.3f}, {high:5.3f}]  "
                + " ".join(f"{per[f'{f}/{t}']:17.3f}" for f, t in keys),
                flush=True,
            )
            rows.append(
                {
                    "scenario": name,
                    "window": w,
                    "any": rate,
                    "any_ci95": [low, high],
                    "alarms": any_alarm,
                    "per_statistic": per,
                    "thresholds": {f"{f}/{t}": monitor.thresholds[(f, t)] for f, t in keys},
                }
            )
        print(f"report(): median {np.median(t_report) * 1e3:.2f} ms per window of {w}")
        results.setdefault("null_seconds", {})[str(w)] = round(t_null, 2)  # type: ignore[union-attr]
        results.setdefault("report_ms_median", {})[str(w)] = round(float(np.median(t_report)) * 1e3, 3)  # type: ignore[union-attr]
    results["rows"] = rows
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    results["load_average"] = os.getloadavg()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "drift.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(rows, sizes, OUT / "drift.png", args.false_alarm_rate)
    print(
        f"\nwrote {OUT / 'drift.json'} and {OUT / 'drift.png'} in {results['seconds']} s; "
        f"load average {os.getloadavg()}"
    )
    last = [f"false_alarm_any_w{r['window']}={r['any']:.4f}" for r in rows if r["scenario"] == "in-distribution"]
    last += [
        f"detect_any_{r['scenario']}_w{r['window']}={r['any']:.4f}" for r in rows if r["scenario"] != "in-distribution"
    ]
    print(" ".join(last))


def plot(rows: list[dict[str, object]], sizes: list[int], path: Path, rate: float) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    names = list(dict.fromkeys(str(r["scenario"]) for r in rows))
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
    width = 0.8 / len(sizes)
    for j, w in enumerate(sizes):
        vals = [next(float(str(r["any"])) for r in rows if r["scenario"] == n and r["window"] == w) for n in names]
        ax.bar(np.arange(len(names)) + j * width, vals, width, label=f"window {w}")
    ax.axhline(rate, color="k", lw=0.8, ls="--", label=f"target false-alarm rate {rate:g}")
    ax.set_xticks(np.arange(len(names)) + width * (len(sizes) - 1) / 2, names, rotation=20, fontsize=8)
    ax.set_ylabel("windows with any alarm")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
