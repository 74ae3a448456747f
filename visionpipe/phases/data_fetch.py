"""Phase 1, data_fetch: read labelled images from a source, split them leakage-free, write a Dataset artifact.

Sources:
  * ``builtin://sklearn-digits`` — scikit-learn's 1,797 8x8 grey digits, shipped inside scikit-learn (no
    download); the embedded default.
  * an image folder laid out as ``<class_name>/<image file>`` (png / jpg / jpeg), on a local path or under
    ``s3://bucket/prefix`` (read through `visionpipe.serving.storage`, credentials from the environment).

Class names are sorted; the class index is the position in that order. Splits are stratified and seeded;
images with identical content (same pixel hash) form one group that is never cut across two splits.

Decoding is the predictor's (visionpipe/serving/preprocessing.py `decode_to_array`: EXIF orientation, transparency
composited onto black, or the digit rule for a ``digit-upload`` recipe), so a training image is the array serving
computes from the same file.

Stored size (`image_size`): a positive value resizes every image to image_size x image_size. 0 keeps the native
size when every image has the same one (MNIST folders, the built-in digits); a folder of mixed sizes (photos) is
stored at the recipe's side instead: ``preprocess.size``, or with multi-view inference the side whose tiles need
no upsampling (`ViewsSpec.required_side`). The summary says which side was used and why.
"""

import io
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visionpipe.data.datasets import (
    FORMAT,
    SPLITS,
    Int64Array,
    UInt8Array,
    content_hash,
    fingerprint_of,
    write_json,
)

BUILTIN_DIGITS = "builtin://sklearn-digits"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Largest source image accepted, read from the file header before decoding: 40 megapixels is far above any
# training photo, and a larger file (or a decompression bomb) is excluded as a bad file instead of killing the step.
MAX_SOURCE_PIXELS = 40_000_000
DEFAULT_RATIOS = (0.7, 0.1, 0.1, 0.1)


class DataFetchError(ValueError):
    """The source cannot become a usable Dataset; the message says what to fix."""


@dataclass(frozen=True)
class FetchConfig:
    """Validated data_fetch parameters."""

    ratios: tuple[float, float, float, float] = DEFAULT_RATIOS
    seed: int = 0
    positive_class: str = ""
    image_size: int = 0
    min_per_class_per_split: int = 1
    max_bad_fraction: float = 0.05

    def __post_init__(self) -> None:
        if len(self.ratios) != len(SPLITS):
            raise DataFetchError(f"ratios needs {len(SPLITS)} values ({', '.join(SPLITS)}), got {self.ratios}")
        for name, r in zip(SPLITS, self.ratios, strict=True):
            if not r > 0:
                raise DataFetchError(f"ratio for {name} is {r}; every split ratio must be > 0")
        if not math.isclose(sum(self.ratios), 1.0, abs_tol=1e-6):
            raise DataFetchError(f"split ratios {self.ratios} sum to {sum(self.ratios):.6g}; they must sum to 1")
        if (
            isinstance(self.image_size, bool)
            or not isinstance(self.image_size, int)
            or not 0 <= self.image_size <= 4096
        ):
            raise DataFetchError(
                f"image_size={self.image_size!r} is not allowed; allowed values: 0 (the native size when every image "
                "has the same one, else the recipe's input side) or 1..4096 pixels"
            )
        if self.min_per_class_per_split < 1:
            raise DataFetchError(f"min_per_class_per_split={self.min_per_class_per_split} must be >= 1")
        if not 0 <= self.max_bad_fraction < 1:
            raise DataFetchError(f"max_bad_fraction={self.max_bad_fraction} must be in [0, 1)")


@dataclass(frozen=True)
class SizePlan:
    """How data_fetch sizes and decodes the images: `side` > 0 resizes every image to side x side; `mixed_side`
    is the side used when `side` is 0 and the images turn out to have different sizes (None: refuse them);
    `kind` is the recipe's preprocessing kind (the decoding rule); `reason` says where `side` / `mixed_side`
    come from."""

    side: int = 0
    mixed_side: int | None = None
    kind: str = "standard"
    reason: str = ""


@dataclass(frozen=True)
class RawItem:
    """One decoded image with its class name and a stable id (relative path or builtin index)."""

    item_id: str
    class_name: str
    image: UInt8Array


@dataclass
class FetchResult:
    """What data_fetch wrote, and the numbers the summary shows."""

    out_dir: Path
    classes: list[str]
    positive_class: str | None
    num_images: int
    class_counts: dict[str, dict[str, int]]
    bad_files: list[dict[str, str]] = field(default_factory=list)
    duplicate_groups: int = 0
    label_conflicts: list[dict[str, object]] = field(default_factory=list)
    summary_markdown: str = ""


# --------------------------------------------------------------------------------------------------- core


def run(
    source: str,
    out_dir: Path,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    seed: int = 0,
    positive_class: str = "",
    image_size: int = 0,
    min_per_class_per_split: int = 1,
    max_bad_fraction: float = 0.05,
    recipe: str = "",
    recipe_overrides_json: str = "{}",
) -> FetchResult:
    """Fetch `source`, split it, and write the Dataset artifact to `out_dir`.

    `recipe` (a shipped name or a recipe YAML path, with `recipe_overrides_json`) is the one training will use: it
    gives the stored side when image_size is 0 and the images have mixed sizes, and the decoding kind. Empty: no
    recipe (mixed sizes then need image_size; decoding is kind ``standard``). The summary (which the step prints)
    says which side the images were stored at and why."""
    config = FetchConfig(
        ratios=_four(ratios),
        seed=seed,
        positive_class=positive_class,
        image_size=image_size,
        min_per_class_per_split=min_per_class_per_split,
        max_bad_fraction=max_bad_fraction,
    )
    plan = size_plan(config.image_size, recipe, recipe_overrides_json)
    items, bad, native = read_source(source, plan)
    _check_bad_share(source, len(items), bad, config.max_bad_fraction)
    size_note = _size_note(plan, native, items)
    notes = [*_empty_class_notes(source, items, bad), *([size_note] if size_note else [])]
    classes = sorted({it.class_name for it in items})
    _check_classes(source, classes, config.positive_class)
    label_of = {name: i for i, name in enumerate(classes)}
    images, channels_note = _stack(items)
    labels = np.asarray([label_of[it.class_name] for it in items], dtype=np.int64)
    return write_dataset_from_arrays(
        out_dir,
        images,
        labels,
        classes,
        [it.item_id for it in items],
        ratios=config.ratios,
        seed=config.seed,
        positive_class=config.positive_class or None,
        min_per_class_per_split=config.min_per_class_per_split,
        source=source,
        bad_files=bad,
        notes=[*notes, channels_note] if channels_note else notes,
        max_conflict_fraction=config.max_bad_fraction,
    )


def write_dataset_from_arrays(
    out_dir: Path,
    images: UInt8Array,
    labels: Int64Array,
    classes: list[str],
    ids: list[str],
    ratios: Sequence[float] = DEFAULT_RATIOS,
    seed: int = 0,
    positive_class: str | None = None,
    min_per_class_per_split: int = 1,
    source: str = "arrays://",
    bad_files: list[dict[str, str]] | None = None,
    notes: list[str] | None = None,
    max_conflict_fraction: float = 1.0,
) -> FetchResult:
    """Split in-memory images (uint8 N,H,W,C) and write them as a Dataset artifact (also used by tests).

    Identical images that carry different labels are reported (summary and report.json) and fail the step when
    they make up more than `max_conflict_fraction` of the images (data_fetch passes its max_bad_fraction)."""
    config = FetchConfig(ratios=_four(ratios), seed=seed, min_per_class_per_split=min_per_class_per_split)
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels) or len(ids) != len(labels):
        raise DataFetchError("images must be uint8 (N,H,W,C) with one label and one id per image")
    _check_classes(source, sorted(classes), positive_class or "")
    hashes = [content_hash(img) for img in images]
    conflicts = label_conflicts(hashes, labels, classes, ids)
    _check_conflict_share(source, len(labels), conflicts, max_conflict_fraction)
    assignment, duplicate_groups = assign_splits(hashes, labels, config.ratios, config.seed)
    split_indices = {s: np.flatnonzero(assignment == k) for k, s in enumerate(SPLITS)}
    class_counts = _class_counts(split_indices, labels, classes)
    _check_enough_per_split(class_counts, config.min_per_class_per_split)

    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "images.npy", np.ascontiguousarray(images))
    np.save(out_dir / "labels.npy", labels.astype(np.int64))
    _, h, w, c = images.shape
    write_json(
        out_dir / "dataset.json",
        {
            "format": FORMAT,
            "source": source,
            "classes": list(classes),
            "positive_class": positive_class,
            "height": int(h),
            "width": int(w),
            "channels": int(c),
            "num_images": len(labels),
            "ids": list(ids),
            "hashes": hashes,
            "fingerprint": fingerprint_of(hashes),
        },
    )
    write_json(out_dir / "splits.json", _splits_payload(split_indices, hashes, ids, class_counts, config))
    write_json(
        out_dir / "report.json",
        {"bad_files": bad_files or [], "duplicate_groups": duplicate_groups, "label_conflicts": conflicts},
    )
    result = FetchResult(
        out_dir=out_dir,
        classes=list(classes),
        positive_class=positive_class,
        num_images=len(labels),
        class_counts=class_counts,
        bad_files=bad_files or [],
        duplicate_groups=duplicate_groups,
        label_conflicts=conflicts,
    )
    result.summary_markdown = render_summary(result, source, notes or [])
    (out_dir / "summary.md").write_text(result.summary_markdown)
    return result


def assign_splits(
    hashes: Sequence[str], labels: Int64Array, ratios: Sequence[float], seed: int
) -> tuple[Int64Array, int]:
    """Stratified, seeded, duplicate-aware split assignment: index into SPLITS for every image.

    Images with the same content hash form a group that goes to one split as a whole. Within each class
    (a group's class is its most common label), groups are ordered by hash (independent of file order),
    shuffled with `seed`, and cut at the cumulative ratio boundaries, counted in images.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(hashes):
        groups[h].append(i)
    by_class: dict[int, list[str]] = defaultdict(list)
    for h, members in groups.items():
        by_class[Counter(int(labels[i]) for i in members).most_common(1)[0][0]].append(h)
    assignment = np.full(len(hashes), -1, dtype=np.int64)
    bounds = np.cumsum(np.asarray(ratios, dtype=np.float64))
    for cls in sorted(by_class):
        ordered = sorted(by_class[cls])
        rng = np.random.default_rng([seed, cls])
        order = rng.permutation(len(ordered))
        total = sum(len(groups[h]) for h in ordered)
        seen = 0
        for pos in order:
            members = groups[ordered[pos]]
            # Place the group by the position of its midpoint along the class's cumulative image count.
            mid = (seen + len(members) / 2) / total
            k = int(np.searchsorted(bounds, mid, side="right"))
            assignment[members] = min(k, len(SPLITS) - 1)
            seen += len(members)
    duplicate_groups = sum(1 for members in groups.values() if len(members) > 1)
    return assignment, duplicate_groups


def render_summary(result: FetchResult, source: str, notes: list[str]) -> str:
    """Markdown: class counts per split, excluded files, duplicates."""
    lines = [
        "## Dataset",
        "",
        f"Source `{source}`: {result.num_images} images, {len(result.classes)} classes"
        + (f", positive class `{result.positive_class}`" if result.positive_class else "")
        + ".",
        "",
        "| class | " + " | ".join(SPLITS) + " | total |",
        "|---|" + "---:|" * (len(SPLITS) + 1),
    ]
    for name in result.classes:
        row = [result.class_counts[s][name] for s in SPLITS]
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + f" | {sum(row)} |")
    totals = [sum(result.class_counts[s].values()) for s in SPLITS]
    lines.append("| **total** | " + " | ".join(str(v) for v in totals) + f" | {sum(totals)} |")
    lines.append("")
    lines.append(f"Duplicate-content groups kept inside one split: {result.duplicate_groups}.")
    if result.bad_files:
        lines.append(f"Excluded {len(result.bad_files)} unreadable or non-image files (see report.json):")
        lines.extend(f"- `{b['file']}`: {b['reason']}" for b in result.bad_files[:20])
    if result.label_conflicts:
        count = sum(len(_as_str_list(c["ids"])) for c in result.label_conflicts)
        lines.append(
            f"Identical images with conflicting labels: {len(result.label_conflicts)} groups, {count} images "
            "(kept, each group in one split; fix their labels):"
        )
        for c in result.label_conflicts[:20]:
            pairs = zip(_as_str_list(c["ids"]), _as_str_list(c["labels"]), strict=True)
            lines.append("- " + ", ".join(f"`{i}` ({label})" for i, label in pairs))
    lines.extend(notes)
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------- sources


def size_plan(image_size: int, recipe: str = "", recipe_overrides_json: str = "{}") -> SizePlan:
    """The stored side and decoding kind: an explicit image_size wins; with 0 the recipe (when given) supplies the
    side for mixed-size images, ``preprocess.size`` or, with views, `ViewsSpec.required_side(size)`."""
    if not recipe:
        return SizePlan(side=image_size, reason="image_size" if image_size else "")
    from visionpipe.training.recipes import load_recipe, parse_overrides

    chosen = load_recipe(recipe, parse_overrides(recipe_overrides_json))
    p = chosen.preprocess
    if image_size:
        return SizePlan(side=image_size, kind=p.kind, reason="image_size")
    if p.views is None:
        return SizePlan(mixed_side=p.size, kind=p.kind, reason=f"recipe {chosen.name}'s preprocess.size")
    views = p.views.geometry  # grid and overlap (the aggregation, maybe chosen later, does not change the side)
    side = views.required_side(p.size)
    return SizePlan(
        mixed_side=side,
        kind=p.kind,
        reason=(
            f"recipe {chosen.name}'s multi-view inference: preprocess.views grid {views.grid}, overlap "
            f"{views.overlap:g} needs ceil({p.size} / {views.tile_fraction:.4g}) = {side} pixels so no "
            f"{p.size}-pixel tile is upsampled"
        ),
    )


def read_source(
    source: str, plan: SizePlan | int = 0
) -> tuple[list[RawItem], list[dict[str, str]], Counter[tuple[int, int]]]:
    """Decode every image of `source` (sized and decoded as `plan` says; an int is an explicit image_size);
    returns the items, the files that had to be excluded and the count of each native (height, width)."""
    if isinstance(plan, int):
        plan = SizePlan(side=plan)
    if source.startswith("builtin://"):
        if source != BUILTIN_DIGITS:
            raise DataFetchError(f"unknown built-in data set {source!r}; available: {BUILTIN_DIGITS}")
        digits = _sklearn_digits(plan.side)
        return digits, [], Counter({(8, 8): len(digits)})
    return _image_folder(source, plan)


def _sklearn_digits(image_size: int) -> list[RawItem]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    items = []
    for i, (img, target) in enumerate(zip(pixels, digits.target, strict=True)):
        arr = _resize(img[..., None], image_size)
        items.append(RawItem(item_id=f"sklearn-digits/{i:04d}", class_name=str(int(target)), image=arr))
    return items


def _image_folder(source: str, plan: SizePlan) -> tuple[list[RawItem], list[dict[str, str]], Counter[tuple[int, int]]]:
    from visionpipe.serving import storage

    items: list[RawItem] = []
    bad: list[dict[str, str]] = []
    native: Counter[tuple[int, int]] = Counter()
    side = plan.side
    files = list(class_files(source, storage.list_uris))
    if not files:
        raise DataFetchError(
            f"no files found under {source}; expected an image folder laid out as <class_name>/<image file>"
        )
    for class_name, rel, uri in files:
        if not rel.lower().endswith(IMAGE_SUFFIXES):
            bad.append({"file": rel, "reason": f"not an image file (allowed: {', '.join(IMAGE_SUFFIXES)})"})
            continue
        try:
            image = _decode(storage.read_bytes(uri), plan.kind)
        except ValueError as exc:
            bad.append({"file": rel, "reason": str(exc)})
            continue
        native[image.shape[:2]] += 1
        if side == 0 and len(native) > 1 and plan.mixed_side is not None:
            # the first image of a second size: from now on (and for the images kept so far) the recipe's side
            side = plan.mixed_side
            items = [RawItem(it.item_id, it.class_name, _resize(it.image, side)) for it in items]
        items.append(RawItem(item_id=rel, class_name=class_name, image=_resize(image, side)))
    return items, bad, native


def class_files(source: str, list_uris: Callable[[str], list[str]]) -> Iterator[tuple[str, str, str]]:
    """(class_name, relative path, uri) for every file exactly one folder below `source`."""
    root = source.rstrip("/")
    for uri in sorted(list_uris(root)):
        rel = uri[len(root) :].lstrip("/")
        parts = rel.split("/")
        if len(parts) == 2 and parts[0] and parts[1] and not parts[1].startswith("."):
            yield parts[0], rel, uri


def _decode(data: bytes, kind: str = "standard") -> UInt8Array:
    """Bytes -> uint8 (H, W, C) with the predictor's decoding rule (`decode_to_array`), grey kept one channel."""
    from PIL import Image, UnidentifiedImageError

    from visionpipe.serving.upload import decode_to_array

    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            width, height = img.size
            if width * height > MAX_SOURCE_PIXELS:
                raise ValueError(f"image too large: {width}x{height} pixels > {MAX_SOURCE_PIXELS} allowed")
            img.load()
            return decode_to_array(img, None, kind)
    except UnidentifiedImageError as exc:
        raise ValueError("not a decodable image") from exc
    except Image.DecompressionBombError as exc:  # Image.open refuses > 2x Image.MAX_IMAGE_PIXELS itself
        raise ValueError(f"image too large (decompression bomb: {exc})") from exc
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"unreadable image ({exc})") from exc


def _resize(image: UInt8Array, size: int) -> UInt8Array:
    if size == 0 or image.shape[:2] == (size, size):
        return image
    from PIL import Image

    mode = "L" if image.shape[2] == 1 else "RGB"
    pil = Image.fromarray(image[..., 0] if mode == "L" else image, mode=mode)
    out = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
    return out[..., None] if out.ndim == 2 else out


def _size_note(plan: SizePlan, native: Counter[tuple[int, int]], items: Sequence[RawItem]) -> str:
    """One line for the summary (which the step prints): the stored side, and why ("" when mixed sizes have no
    side to go to: `_stack` then refuses them)."""
    h, w = items[0].image.shape[:2]
    sizes = f"{len(native)} different native sizes" if len(native) > 1 else "one native size"
    if plan.side:
        return f"Images stored at {h}x{w} pixels: image_size={plan.side} was given ({sizes})."
    if len(native) > 1 and plan.mixed_side is None:
        return ""
    if len(native) == 1:
        return f"Images stored at their native {h}x{w} pixels: image_size=0 and every image has that size."
    return (
        f"Images stored at {h}x{w} pixels: image_size=0 and the images have {sizes}, so the side is the "
        f"{plan.reason}; give image_size to choose another."
    )


def _stack(items: list[RawItem]) -> tuple[UInt8Array, str]:
    """One uint8 (N,H,W,C) array; grey images are promoted to RGB when the source mixes both."""
    shapes = Counter(it.image.shape[:2] for it in items)
    if len(shapes) > 1:
        listing = ", ".join(f"{h}x{w} ({n} images)" for (h, w), n in shapes.most_common(5))
        raise DataFetchError(
            f"images have different sizes ({listing}); set image_size to resize them all to one size, or give the "
            "recipe so they are stored at its input side"
        )
    channels = {it.image.shape[2] for it in items}
    if channels == {1}:
        return np.stack([it.image for it in items]), ""
    images = np.stack([np.repeat(it.image, 3, axis=2) if it.image.shape[2] == 1 else it.image for it in items])
    note = "Grey and colour images were mixed; grey images were stored as RGB." if len(channels) > 1 else ""
    return images, note


# ------------------------------------------------------------------------------------------- checks


def _check_bad_share(source: str, good: int, bad: list[dict[str, str]], max_bad_fraction: float) -> None:
    total = good + len(bad)
    if good == 0:
        raise DataFetchError(f"{source} holds no readable images ({len(bad)} files excluded): nothing to train on")
    if len(bad) / total > max_bad_fraction:
        examples = "; ".join(f"{b['file']}: {b['reason']}" for b in bad[:5])
        raise DataFetchError(
            f"{len(bad)} of {total} files under {source} are unreadable or not images "
            f"({len(bad) / total:.1%} > max_bad_fraction={max_bad_fraction:.1%}); e.g. {examples}. "
            "Remove or fix them, or raise max_bad_fraction."
        )


def label_conflicts(
    hashes: Sequence[str], labels: Int64Array, classes: Sequence[str], ids: Sequence[str]
) -> list[dict[str, object]]:
    """Groups of identical images (same content hash) whose labels differ: ids and class names, by hash."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(hashes):
        groups[h].append(i)
    return [
        {"hash": h, "ids": [ids[i] for i in members], "labels": [classes[int(labels[i])] for i in members]}
        for h, members in sorted(groups.items())
        if len({int(labels[i]) for i in members}) > 1
    ]


def _check_conflict_share(source: str, total: int, conflicts: list[dict[str, object]], limit: float) -> None:
    count = sum(len(_as_str_list(c["ids"])) for c in conflicts)
    if total and count / total > limit:
        example = ", ".join(f"{i}" for i in _as_str_list(conflicts[0]["ids"])[:4])
        raise DataFetchError(
            f"{count} of {total} images under {source} are identical copies with conflicting labels "
            f"({count / total:.1%} > max_bad_fraction={limit:.1%}); e.g. {example}. "
            "Fix the labels or remove the copies, or raise max_bad_fraction."
        )


def _as_str_list(value: object) -> list[str]:
    assert isinstance(value, list)
    return [str(v) for v in value]


def _empty_class_notes(source: str, items: Sequence[RawItem], bad: Sequence[dict[str, str]]) -> list[str]:
    """A note for every class folder that holds no readable image (empty, or only bad files)."""
    if source.startswith("builtin://"):
        return []
    from visionpipe.serving import storage

    folders = {b["file"].split("/")[0] for b in bad if "/" in b["file"]}
    root = Path(source[len("file://") :] if source.startswith("file://") else source)
    if not storage.is_s3(source) and root.is_dir():
        folders |= {d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")}
    empty = sorted(folders - {it.class_name for it in items})
    return [f"Class folder `{name}/` holds no readable image and was left out of the classes." for name in empty]


def _check_classes(source: str, classes: list[str], positive_class: str) -> None:
    if len(classes) < 2:
        found = classes[0] if classes else "none"
        raise DataFetchError(f"{source} has a single class ({found}); a classifier needs at least two class folders")
    if positive_class and positive_class not in classes:
        raise DataFetchError(f"positive_class={positive_class!r} is not a class; classes are {classes}")


def _class_counts(
    split_indices: dict[str, Int64Array], labels: Int64Array, classes: list[str]
) -> dict[str, dict[str, int]]:
    return {
        s: {name: int(np.sum(labels[idx] == k)) for k, name in enumerate(classes)} for s, idx in split_indices.items()
    }


def _check_enough_per_split(class_counts: dict[str, dict[str, int]], minimum: int) -> None:
    short = [f"{name} in {s} ({n})" for s, counts in class_counts.items() for name, n in counts.items() if n < minimum]
    if short:
        raise DataFetchError(
            f"too few images per class per split (need >= {minimum}): {', '.join(short[:10])}. "
            "Add images to those classes, or change the split ratios."
        )


def _splits_payload(
    split_indices: dict[str, Int64Array],
    hashes: list[str],
    ids: list[str],
    class_counts: dict[str, dict[str, int]],
    config: FetchConfig,
) -> dict[str, object]:
    splits: dict[str, object] = {}
    for s, idx in split_indices.items():
        member_hashes = sorted({hashes[i] for i in idx})
        splits[s] = {
            "indices": [int(i) for i in idx],
            "ids": [ids[i] for i in idx],
            "count": len(idx),
            "class_counts": class_counts[s],
            "fingerprint": fingerprint_of(member_hashes),
            "hashes": member_hashes,
        }
    return {"seed": config.seed, "ratios": dict(zip(SPLITS, config.ratios, strict=True)), "splits": splits}


def _four(ratios: Sequence[float]) -> tuple[float, float, float, float]:
    values = tuple(float(r) for r in ratios)
    if len(values) != 4:
        raise DataFetchError(f"ratios needs 4 values ({', '.join(SPLITS)}), got {len(values)}")
    return values[0], values[1], values[2], values[3]
