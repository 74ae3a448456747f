"""Batches of a split and its model input: the whole split preprocessed once when it fits in
CACHE_LIMIT_BYTES, else per batch in DataLoader workers."""

import os
from collections.abc import Iterator, Sequence

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from visionpipe.serving.preprocessing import to_model_input
from visionpipe.specs import PreprocessSpec

CACHE_LIMIT_BYTES = 512 * 2**20  # preprocess the whole split once when its model input fits in this much memory

Batch = npt.NDArray[np.int64]


class ModelInputs(torch.utils.data.Dataset[tuple[Tensor, Batch]]):
    """Model input of a split: preprocessed once when small, else per batch (in DataLoader workers)."""

    def __init__(self, images: npt.NDArray[np.uint8], preprocess: PreprocessSpec) -> None:
        self.images = images
        self.preprocess = preprocess
        per_image = 4 * preprocess.channels * preprocess.size**2
        self.cached = to_model_input(images, preprocess) if len(images) * per_image <= CACHE_LIMIT_BYTES else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: Batch) -> tuple[Tensor, Batch]:
        if self.cached is not None:
            return self.cached[torch.from_numpy(idx)], idx
        return to_model_input(np.asarray(self.images[idx]), self.preprocess), idx

    def iterate(self, batches: Sequence[Batch], num_workers: int) -> Iterator[tuple[Tensor, Batch]]:
        """Yield (model input, indices) per batch in order; workers only when preprocessing per batch."""
        if self.cached is not None:
            for idx in batches:
                yield self[idx]
            return
        workers = auto_workers() if num_workers < 0 else num_workers
        loader = torch.utils.data.DataLoader(
            self,
            sampler=list(batches),
            batch_size=None,
            num_workers=workers,
            generator=torch.Generator().manual_seed(0),
            persistent_workers=False,
            collate_fn=_keep,
        )
        yield from loader


def _keep(batch: list[object]) -> object:
    """DataLoader collate for pre-batched items (batch_size=None hands the item itself)."""
    return batch


def auto_workers() -> int:
    """DataLoader workers sized to the machine: one per CPU beyond the main process, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus - 1))


def batches(order: Batch, batch_size: int, min_last: int | None = None) -> list[Batch]:
    """Consecutive batches of `order`. A last batch smaller than `min_last` is dropped unless it is the only
    one; by default min_last is half a batch (at least 2: batch norm needs more than one image and tiny
    batches add noise); min_last = batch_size keeps full batches only."""
    limit = max(2, batch_size // 2) if min_last is None else min_last
    out = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if len(out) > 1 and len(out[-1]) < limit:
        out.pop()
    return out


def num_batches(n: int, batch_size: int, min_last: int | None = None) -> int:
    return len(batches(np.arange(n, dtype=np.int64), batch_size, min_last))


def in_order(n: int, batch_size: int) -> list[Batch]:
    """Every index 0..n-1 in order, in batches of batch_size (evaluation: nothing dropped)."""
    order = np.arange(n, dtype=np.int64)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]
