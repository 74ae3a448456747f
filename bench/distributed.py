"""Benchmark: data-parallel training throughput with 1 and N local workers, side by side, through the exact
entry point a cluster runs (`python -m visionpipe.phases.train_worker` under torchrun, launched by
`visionpipe.training.distributed.run_torchrun`).

For each worker count the same recipe, seed and global batch train on a Dataset fetched once from
../shared/datasets/mnist-5k-train (mnist-test-dev is never read). Reported per worker count: the training rate
in images/s (train images / train seconds of the epochs after the first, from result.json's history: the
forward / backward / all-reduce part, not process start-up), the launch's wall time (torch imports,
rendezvous, evaluation and outputs included), the load average before and after, and the max |delta w| of the
saved weights against the first worker count (the equivalence the tests check; recipes with dropout differ
by design, see visionpipe/training/distributed.py).

    .venv/bin/python bench/distributed.py                                   # gloo on CPU, 1 and 2 workers
    .venv/bin/python bench/distributed.py --backend nccl --nproc 1,2,4      # CUDA GPUs, one per worker
    .venv/bin/python bench/distributed.py --recipe roadwork-vit-dora --strategies ddp,fsdp2 \
        --overrides '{"preprocess": {"size": 28, "channels": 1, "mean": [0.5], "std": [0.5]}, "arch.patch_size": 7,
                      "early_stopping.metric": "auto"}'                  # FSDP2 beside DDP (transformers)

--strategies runs every worker count above 1 once per strategy (recipe field distributed.strategy); one worker
is one process either way.

CPU threads: --threads-total (default: the CPUs this process may use) are split evenly over the workers
(OMP_NUM_THREADS), so 1 worker x 2 threads is compared with 2 workers x 1 thread on the same cores.

Writes bench/out/distributed.json; the last line is the images/s per worker count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from visionpipe.phases.data_fetch import run as fetch  # noqa: E402
from visionpipe.training.distributed import run_torchrun  # noqa: E402

MNIST = ROOT.parent / "shared" / "datasets" / "mnist-5k-train"
OUT = ROOT / "bench" / "out" / "distributed.json"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = [int(n) for n in args.nproc.split(",")]
    device = "cuda" if args.backend == "nccl" else "cpu"
    if args.backend == "nccl":
        import torch

        gpus = torch.cuda.device_count()
        if gpus < max(counts):
            print(f"--backend nccl needs one CUDA GPU per worker: {max(counts)} workers, {gpus} GPUs", file=sys.stderr)
            return 2
    work = Path(args.work_dir) if args.work_dir else Path("/tmp") / f"visionpipe-bench-distributed-{os.getpid()}"
    dataset = work / "dataset"
    if not (dataset / "dataset.json").is_file():
        fetch(str(args.train_dir), dataset, seed=0)
    overrides = {"epochs": args.epochs, "num_workers": 0, **json.loads(args.overrides)}
    rows: list[dict[str, object]] = []
    first_weights: dict[str, np.ndarray] | None = None
    strategies = args.strategies.split(",")
    runs = [(n, s) for n in counts for s in (strategies if n > 1 else strategies[:1])]
    for n, strategy in runs:
        out = work / f"out-{args.backend}-{n}-{strategy}"
        threads = max(1, args.threads_total // n)
        argv_worker = [
            "--dataset",
            str(dataset),
            "--out",
            str(out),
            "--recipe",
            args.recipe,
            "--recipe-overrides-json",
            json.dumps({**overrides, "distributed.strategy": strategy}),
            "--device",
            device,
            "--checkpoint-dir",
            str(work / f"checkpoint-{args.backend}-{n}-{time.time_ns()}"),
        ]
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        run_torchrun(n, argv_worker, env={"OMP_NUM_THREADS": str(threads)}, timeout_s=args.timeout, log=quiet)
        wall = time.perf_counter() - started
        load_after = os.getloadavg()[0]
        result = json.loads((out / "result.json").read_text())
        later = result["history"][1:] or result["history"]
        images = sum(h["train_images"] for h in later)
        seconds = sum(h["train_images"] / h["images_per_second"] for h in later if h["images_per_second"] > 0)
        weights = {k: v.astype(np.float64) for k, v in load_file(str(out / "model" / "model.safetensors")).items()}
        if first_weights is None:
            first_weights = weights
        delta = max(float(np.abs(weights[k] - first_weights[k]).max()) for k in weights)
        row: dict[str, object] = {
            "workers": n,
            "strategy": strategy if n > 1 else "one process",
            "backend": args.backend,
            "threads_per_worker": threads if device == "cpu" else None,
            "train_images_per_second": images / seconds if seconds > 0 else 0.0,
            "launch_wall_seconds": wall,
            "load_before": load_before,
            "load_after": load_after,
            "max_abs_delta_w_vs_first": delta,
            "best_val_select": result["best_metric"],
        }
        rows.append(row)
        print(
            f"{n} worker(s) x {row['threads_per_worker']} thread(s), {args.backend}, {row['strategy']}: "
            f"{row['train_images_per_second']:.0f} img/s training, launch {wall:.0f}s wall, "
            f"load {load_before:.1f} -> {load_after:.1f}, max|dw| vs first {delta:.2e}",
            flush=True,
        )
    report = {
        "recipe": args.recipe,
        "overrides": overrides,
        "cpus": len(os.sched_getaffinity(0)),
        "rows": rows,
        "command": " ".join([sys.executable, *sys.argv]),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=1) + "\n")
    print(", ".join(f"{r['workers']} ({r['strategy']}): {r['train_images_per_second']:.0f} img/s" for r in rows))
    return 0


def quiet(_line: str) -> None:
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    parser.add_argument("--strategies", default="ddp", help="comma-separated: ddp, fsdp2 (fsdp2: transformers)")
    parser.add_argument("--recipe", default="digits-cnn-mnist")
    parser.add_argument("--overrides", default="{}", help="recipe overrides as a JSON object")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-dir", type=Path, default=MNIST)
    parser.add_argument("--work-dir", default="")
    parser.add_argument("--threads-total", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--timeout", type=float, default=1800.0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
