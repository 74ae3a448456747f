"""How fast later phases read the Dataset artifact: data_fetch on mnist-5k-train, then load and read splits.

    python bench/data_load.py [--source ../shared/datasets/mnist-5k-train]

Last line: `fetch_seconds=<float> load_images_per_second=<float>`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from visionpipe.data.datasets import SPLITS, load_dataset
from visionpipe.phases.data_fetch import run

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(REPO.parent / "shared" / "datasets" / "mnist-5k-train"))
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = run(args.source, Path(tmp) / "ds")
        fetch_seconds = time.perf_counter() - started
        print(f"data_fetch: {result.num_images} images from {args.source} in {fetch_seconds:.1f} s")
        started = time.perf_counter()
        images = 0
        for _ in range(args.repeats):
            ds = load_dataset(Path(tmp) / "ds")
            for split in SPLITS:
                images += len(ds.split(split, "evaluate").images)
        seconds = time.perf_counter() - started
        rate = images / seconds
        print(f"load_dataset + read all four splits, {args.repeats} times: {images} images in {seconds:.2f} s")
        print(f"fetch_seconds={fetch_seconds:.2f} load_images_per_second={rate:.0f}")


if __name__ == "__main__":
    main()
