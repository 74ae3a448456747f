"""Hard examples, training side: label the logged examples and collect the labelled ones for a retrain.

The layout (``<prefix>/<YYYY-MM>/unlabelled|labelled/...``) and the logger that writes it at serving time are in
`visionpipe.serving.hard_examples`; this module only reads and copies what the logger wrote.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from visionpipe.serving import storage
from visionpipe.serving.hard_examples import (
    CLASS_PATTERN,
    IMAGE_SUFFIXES,
    LABELLED,
    MONTH_PATTERN,
    UNLABELLED,
    HardExampleError,
    parse_month,
)


def label_example(image_uri: str, class_name: str) -> str:
    """Copy an unlabelled example's image into ``<prefix>/<YYYY-MM>/labelled/<class_name>/``; returns the URI."""
    _check_class(class_name)
    parent, _, name = image_uri.rstrip("/").rpartition("/")
    month_dir, _, kind = parent.rpartition("/")
    if kind != UNLABELLED or not MONTH_PATTERN.match(month_dir.rpartition("/")[2]):
        raise HardExampleError(f"image_uri={image_uri!r} is not under <prefix>/<YYYY-MM>/{UNLABELLED}/")
    target = storage.join(month_dir, LABELLED, class_name, name)
    storage.write_bytes(target, storage.read_bytes(image_uri))
    return target


def list_unlabelled(prefix: str, month: str) -> list[str]:
    """The PNG URIs waiting for a label in one month (empty when none)."""
    parse_month(month)
    try:
        uris = storage.list_uris(storage.join(prefix, month, UNLABELLED))
    except storage.ObjectNotFound:
        return []
    return [u for u in uris if u.endswith(".png")]


def collect_labelled(prefix: str, months: Sequence[str], out_dir: Path) -> dict[str, int]:
    """Copy the labelled images of `months` into ``out_dir/<class>/<file>``; returns images per class.

    A month without a ``labelled/`` folder contributes nothing. A file name already present with other
    content (the same name labelled in two months) is kept as ``<YYYY-MM>-<file>``."""
    for month in months:
        parse_month(month)
    counts: Counter[str] = Counter()
    for month in dict.fromkeys(months):
        root = storage.join(prefix, month, LABELLED)
        try:
            uris = storage.list_uris(root)
        except storage.ObjectNotFound:
            continue
        for uri in uris:
            relative = uri[len(root.rstrip("/")) + 1 :]
            parts = relative.split("/")
            if len(parts) != 2 or not parts[1].lower().endswith(IMAGE_SUFFIXES) or not CLASS_PATTERN.match(parts[0]):
                continue
            class_name, name = parts
            data = storage.read_bytes(uri)
            target = out_dir / class_name / name
            if target.exists() and target.read_bytes() != data:
                target = out_dir / class_name / f"{month}-{name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            counts[class_name] += 1
    return dict(sorted(counts.items()))


def _check_class(class_name: str) -> None:
    if not isinstance(class_name, str) or not CLASS_PATTERN.match(class_name):
        raise HardExampleError(
            f"class_name={class_name!r} must be a folder name: not empty, no '/' or '\\', not starting with '.'"
        )
