"""Combine tuning-mode runs of bench/train_mnist.py (same --holdout-fold) into one ensemble, per TTA mode.

    .venv/bin/python bench/train_mnist.py --holdout-fold 0 --seeds 2 --work-dir /tmp/f0-a
    .venv/bin/python bench/train_mnist.py --holdout-fold 0 --seeds 2 --seed-offset 2 --work-dir /tmp/f0-b
    .venv/bin/python bench/heldout_ensemble.py /tmp/f0-a /tmp/f0-b

Prints, for TTA off / 5 / 17, every member's held-out accuracy, the ensemble's (mean softmax) accuracy and its
negative log-likelihood. Reads only the eval_probs.npz files the tuning runs wrote (never mnist-test-dev).
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from visionpipe.serving.tta import TTA_MODES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work_dirs", nargs="+", type=Path, help="--work-dir of tuning runs on the same fold")
    args = parser.parse_args(argv)
    runs = [np.load(d / "eval_probs.npz") for d in args.work_dirs]
    labels = runs[0]["labels"]
    evaluated = {str(r["evaluated"]) if "evaluated" in r.files else "?" for r in runs}
    if len(evaluated) > 1 or any(not np.array_equal(r["labels"], labels) for r in runs):
        raise SystemExit("the runs were evaluated on different held-out folds; pass runs of one --holdout-fold")
    for mode in TTA_MODES:
        members = [r[k] for r in runs for k in r.files if k.startswith("seed") and k.endswith(f"_tta{mode}")]
        if not members:
            raise SystemExit(f"no tta{mode} probabilities in {args.work_dirs}: were these tuning-mode runs?")
        mean = np.mean(members, axis=0)
        nll = float(-np.mean(np.log(mean[np.arange(len(labels)), labels] + 1e-12)))
        accs = " ".join(f"{float(np.mean(m.argmax(1) == labels)):.4f}" for m in members)
        print(
            f"tta {mode:>3}: members {accs}; ensemble of {len(members)}: "
            f"accuracy {float(np.mean(mean.argmax(1) == labels)):.4f}, nll {nll:.4f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
