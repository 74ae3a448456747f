"""The Dataset artifact: the compact on-disk form `data_fetch` writes and every later phase reads.

Layout of a Dataset artifact directory::

    images.npy     uint8 (N, H, W, C), every image at one size (C = 1 grey or 3 RGB)
    labels.npy     int64 (N,), class index = position of the class name in `classes`
    dataset.json   classes, positive class, image shape, source URI, per-image ids and content hashes
    splits.json    the four splits: members (indices and ids), per-split content fingerprints, class counts
    report.json    files excluded as unreadable / not images, duplicate groups
    summary.md     class counts per split (shown in the Kubeflow UI)

Loading memory-maps `images.npy`, so later phases read thousands of images per second.

Splits have fixed roles (see DESIGN.md): a phase states *why* it reads a split and a read outside the split's
role fails with `SplitRoleError`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

FORMAT = "visionpipe-dataset/v1"
SPLITS: tuple[str, ...] = ("train", "val_select", "val_calib", "val_test")

Purpose = Literal["fit", "select", "calibrate", "evaluate"]
# Which splits a purpose may read. `evaluate` computes outputs or metrics that never feed back into fitting,
# selection or calibration (e.g. logits of val_test for the report).
ALLOWED_SPLITS: dict[str, frozenset[str]] = {
    "fit": frozenset({"train"}),
    "select": frozenset({"val_select"}),
    "calibrate": frozenset({"val_calib"}),
    "evaluate": frozenset(SPLITS),
}

UInt8Array = npt.NDArray[np.uint8]
Int64Array = npt.NDArray[np.int64]


class DatasetError(ValueError):
    """The Dataset artifact is missing, malformed or of an unknown format."""


class SplitRoleError(PermissionError):
    """A phase asked for a split outside that split's role (the split contract)."""


@dataclass(frozen=True)
class SplitData:
    """One split's images (uint8 NHWC) and labels."""

    name: str
    images: UInt8Array
    labels: Int64Array
    fingerprint: str


@dataclass(frozen=True)
class Dataset:
    """A loaded Dataset artifact (images memory-mapped)."""

    path: Path
    classes: tuple[str, ...]
    positive_class: str | None
    images: UInt8Array
    labels: Int64Array
    hashes: tuple[str, ...]
    split_indices: dict[str, Int64Array]
    split_fingerprints: dict[str, str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of every stored image."""
        _, h, w, c = self.images.shape
        return int(h), int(w), int(c)

    @property
    def positive_index(self) -> int | None:
        return None if self.positive_class is None else self.classes.index(self.positive_class)

    def split(self, name: str, purpose: Purpose) -> SplitData:
        """Images and labels of split `name`, read for `purpose`; refuses reads outside its role."""
        check_split_role(name, purpose)
        idx = self.split_indices[name]
        return SplitData(
            name=name,
            images=np.asarray(self.images[idx]),
            labels=np.asarray(self.labels[idx]),
            fingerprint=self.split_fingerprints[name],
        )

    def split_hashes(self, name: str) -> frozenset[str]:
        """Content hashes of the members of split `name` (for split-contract checks, no pixels read)."""
        return frozenset(self.hashes[i] for i in self.split_indices[name])


def check_split_role(split: str, purpose: str) -> None:
    """Raise SplitRoleError unless `purpose` may read `split`."""
    if split not in SPLITS:
        raise SplitRoleError(f"unknown split {split!r}; the splits are {', '.join(SPLITS)}")
    if purpose not in ALLOWED_SPLITS:
        raise SplitRoleError(f"unknown purpose {purpose!r}; allowed: {', '.join(sorted(ALLOWED_SPLITS))}")
    if split not in ALLOWED_SPLITS[purpose]:
        allowed = ", ".join(sorted(ALLOWED_SPLITS[purpose]))
        raise SplitRoleError(
            f"split {split!r} may not be read to {purpose}: only {allowed} may (split contract in DESIGN.md)"
        )


def content_hash(image: UInt8Array) -> str:
    """sha256 of an image's decoded pixels and shape: identical content gives the identical hash."""
    h = hashlib.sha256()
    h.update(repr(tuple(int(s) for s in image.shape)).encode())
    h.update(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
    return h.hexdigest()


def fingerprint_of(hashes: list[str] | tuple[str, ...] | frozenset[str]) -> str:
    """Order-independent fingerprint of a set of content hashes."""
    return hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()


def load_dataset(path: Path | str) -> Dataset:
    """Load a Dataset artifact directory written by `data_fetch` (images memory-mapped)."""
    root = Path(path)
    meta = _read_json(root / "dataset.json")
    if meta.get("format") != FORMAT:
        raise DatasetError(f"{root}: unknown dataset format {meta.get('format')!r}; expected {FORMAT!r}")
    splits = _read_json(root / "splits.json")
    images = np.load(root / "images.npy", mmap_mode="r")
    labels = np.load(root / "labels.npy")
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
        raise DatasetError(f"{root}: images.npy must be uint8 (N,H,W,C) with one label per image")
    try:
        members = _as_dict(splits["splits"])
        positive = meta.get("positive_class")
        return Dataset(
            path=root,
            classes=tuple(str(c) for c in _as_list(meta["classes"])),
            positive_class=None if positive is None else str(positive),
            images=images,
            labels=labels.astype(np.int64),
            hashes=tuple(str(h) for h in _as_list(meta["hashes"])),
            split_indices={s: np.asarray(_as_list(_as_dict(members[s])["indices"]), dtype=np.int64) for s in SPLITS},
            split_fingerprints={s: str(_as_dict(members[s])["fingerprint"]) for s in SPLITS},
        )
    except (KeyError, TypeError) as exc:
        raise DatasetError(f"{root}: dataset.json / splits.json lack a field ({exc})") from exc


def write_json(path: Path, payload: object) -> None:
    """Deterministic JSON (sorted keys, fixed separators, trailing newline): same content, same bytes."""
    path.write_text(json.dumps(payload, sort_keys=True, indent=1, ensure_ascii=False) + "\n")


def _as_dict(value: object) -> dict[str, object]:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {type(value).__name__}")
    return value


def _as_list(value: object) -> list[object]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return value


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise DatasetError(f"{path.parent}: not a Dataset artifact ({path.name} is missing)") from exc
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object")
    return data
