"""data_fetch: leakage-free, stratified, deterministic splits; bad data; local and S3 image folders."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionpipe.data.datasets import SPLITS, SplitRoleError, load_dataset
from visionpipe.phases.data_fetch import DataFetchError, run, write_dataset_from_arrays
from visionpipe.serving import storage


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _random_images(n: int, seed: int = 0, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 1), dtype=np.uint8)


def _folder(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name, count in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            (root / name / f"{i:03d}.png").write_bytes(_png(rng.integers(0, 256, (8, 8), dtype=np.uint8)))
    return root


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    run("builtin://sklearn-digits", out, seed=3)
    return out


def test_splits_are_disjoint_and_cover_everything(digits: Path) -> None:
    ds = load_dataset(digits)
    members = [set(ds.split_indices[s].tolist()) for s in SPLITS]
    assert sum(len(m) for m in members) == len(ds.labels) == 1797
    assert len(set().union(*members)) == 1797
    for i, a in enumerate(members):
        for b in members[i + 1 :]:
            assert not a & b
    hashes = [ds.split_hashes(s) for s in SPLITS]
    for i, a in enumerate(hashes):
        for b in hashes[i + 1 :]:
            assert not a & b


def test_splits_are_stratified(digits: Path) -> None:
    ds = load_dataset(digits)
    for split, ratio in zip(SPLITS, (0.7, 0.1, 0.1, 0.1), strict=True):
        labels = ds.labels[ds.split_indices[split]]
        for k in range(10):
            share = np.mean(labels == k) if len(labels) else 0
            assert abs(share - np.mean(ds.labels == k)) < 0.02, (split, k)
        assert abs(len(labels) / len(ds.labels) - ratio) < 0.01


def test_same_seed_gives_byte_identical_splits(tmp_path: Path) -> None:
    run("builtin://sklearn-digits", tmp_path / "a", seed=7)
    run("builtin://sklearn-digits", tmp_path / "b", seed=7)
    run("builtin://sklearn-digits", tmp_path / "c", seed=8)
    assert (tmp_path / "a/splits.json").read_bytes() == (tmp_path / "b/splits.json").read_bytes()
    assert (tmp_path / "a/splits.json").read_bytes() != (tmp_path / "c/splits.json").read_bytes()


def test_file_order_does_not_change_splits(tmp_path: Path) -> None:
    images = _random_images(200, seed=1)
    labels = np.arange(200, dtype=np.int64) % 2
    ids = [f"img{i}" for i in range(200)]
    a = write_dataset_from_arrays(tmp_path / "a", images, labels, ["a", "b"], ids, seed=1)
    perm = np.random.default_rng(0).permutation(200)
    b = write_dataset_from_arrays(
        tmp_path / "b", images[perm], labels[perm], ["a", "b"], [ids[i] for i in perm], seed=1
    )
    for s in SPLITS:
        assert load_dataset(a.out_dir).split_fingerprints[s] == load_dataset(b.out_dir).split_fingerprints[s]


def test_duplicates_never_straddle_splits(tmp_path: Path) -> None:
    base = _random_images(120, seed=2)
    # 30 images appear 3 to 6 times each: exact content duplicates under different ids.
    dup_idx = np.repeat(np.arange(30), np.random.default_rng(0).integers(3, 7, size=30))
    images = np.concatenate([base, base[dup_idx]])
    labels = (np.arange(len(images)) % 120 % 3).astype(np.int64)
    labels[120:] = (dup_idx % 3).astype(np.int64)
    result = write_dataset_from_arrays(
        tmp_path / "d", images, labels, ["x", "y", "z"], [f"i{i}" for i in range(len(images))]
    )
    assert result.duplicate_groups == 30
    ds = load_dataset(tmp_path / "d")
    split_of = {}
    for s in SPLITS:
        for i in ds.split_indices[s]:
            split_of.setdefault(ds.hashes[i], set()).add(s)
    assert all(len(v) == 1 for v in split_of.values())


@pytest.mark.parametrize(
    ("ratios", "message"),
    [
        ((0.7, 0.1, 0.1, 0.2), "sum to"),
        ((0.8, 0.2, 0.0, 0.0), "must be > 0"),
        ((0.9, 0.1, -0.1, 0.1), "must be > 0"),
        ((0.5, 0.5), "needs 4 values"),
    ],
)
def test_bad_ratios_are_refused(tmp_path: Path, ratios: tuple[float, ...], message: str) -> None:
    with pytest.raises(DataFetchError, match=message):
        run("builtin://sklearn-digits", tmp_path, ratios=ratios)


def test_too_few_images_per_class_per_split(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", {"a": 30, "b": 5})
    with pytest.raises(DataFetchError, match=r"too few images per class per split.*b in"):
        run(str(src), tmp_path / "out")


def test_bad_files_are_listed_and_excluded(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", {"cat": 40, "dog": 40})
    (src / "cat" / "notes.txt").write_text("not an image")
    (src / "dog" / "broken.png").write_bytes(_png(np.zeros((8, 8), np.uint8))[:30])
    (src / "dog" / "fake.jpg").write_bytes(b"GIF89a nonsense")
    result = run(str(src), tmp_path / "out", max_bad_fraction=0.1)
    assert result.num_images == 80
    assert sorted(b["file"] for b in result.bad_files) == ["cat/notes.txt", "dog/broken.png", "dog/fake.jpg"]
    assert "Excluded 3" in (tmp_path / "out" / "summary.md").read_text()


def test_too_many_bad_files_fail_the_step(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", {"a": 20, "b": 20})
    for i in range(5):
        (src / "a" / f"junk{i}.png").write_bytes(b"junk")
    with pytest.raises(DataFetchError, match=r"5 of 45 files .* max_bad_fraction"):
        run(str(src), tmp_path / "out", max_bad_fraction=0.05)


def test_empty_source_and_single_class(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFetchError, match="no files found"):
        run(str(tmp_path / "empty"), tmp_path / "o1")
    with pytest.raises(DataFetchError, match="single class"):
        run(str(_folder(tmp_path / "one", {"only": 20})), tmp_path / "o2")
    with pytest.raises(DataFetchError, match="unknown built-in"):
        run("builtin://imagenet", tmp_path / "o3")


def test_positive_class_must_exist(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", {"roadwork": 20, "clear": 20})
    assert run(str(src), tmp_path / "ok", positive_class="roadwork").positive_class == "roadwork"
    with pytest.raises(DataFetchError, match="positive_class='cone' is not a class"):
        run(str(src), tmp_path / "bad", positive_class="cone")


def test_mixed_sizes_need_image_size(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", {"a": 20, "b": 20})
    (src / "a" / "big.png").write_bytes(_png(np.zeros((16, 12), np.uint8)))
    with pytest.raises(DataFetchError, match=r"different sizes.*set image_size"):
        run(str(src), tmp_path / "o")
    assert load_dataset(run(str(src), tmp_path / "o2", image_size=10).out_dir).image_shape == (10, 10, 1)


def test_split_roles_are_enforced(digits: Path) -> None:
    ds = load_dataset(digits)
    assert len(ds.split("train", "fit").labels) > 1000
    assert ds.split("val_test", "evaluate").images.shape[1:] == (8, 8, 1)
    for split, purpose in [("val_test", "fit"), ("val_calib", "select"), ("train", "calibrate")]:
        with pytest.raises(SplitRoleError, match=f"split '{split}' may not be read to {purpose}"):
            ds.split(split, purpose)  # type: ignore[arg-type]


def test_fetch_from_s3_image_folder(s3_bucket: str, mnist_train_dir: Path, tmp_path: Path) -> None:
    local = tmp_path / "subset"
    for digit in ("3", "5", "8"):
        (local / digit).mkdir(parents=True)
        for png in sorted((mnist_train_dir / digit).glob("*.png"))[:12]:
            shutil.copy(png, local / digit / png.name)
            storage.upload_file(png, f"{s3_bucket}/mnist/{digit}/{png.name}")
    from_s3 = run(f"{s3_bucket}/mnist", tmp_path / "s3ds", seed=5)
    from_local = run(str(local), tmp_path / "localds", seed=5)
    assert from_s3.classes == ["3", "5", "8"] and from_s3.num_images == 36
    s3ds, localds = load_dataset(from_s3.out_dir), load_dataset(from_local.out_dir)
    assert s3ds.image_shape == (28, 28, 1)
    assert s3ds.split_fingerprints == localds.split_fingerprints
    assert np.array_equal(np.asarray(s3ds.images), np.asarray(localds.images))


# ----------------------------------------------------------------------------------- hostile or messy data
def _blank_png(width: int, height: int) -> bytes:
    """A 1-bit blank PNG: huge in pixels, a few hundred kB on disk (a decompression bomb when large)."""
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("width", "height", "reason"),
    [
        (20000, 20000, "decompression bomb"),  # 400 MP: PIL's own guard (> 2 x MAX_IMAGE_PIXELS) refuses it
        (8000, 6000, "8000x6000 pixels > 40000000"),  # 48 MP: under PIL's guard, over ours (from the header)
    ],
)
def test_huge_image_is_a_bad_file_not_a_crash(tmp_path: Path, width: int, height: int, reason: str) -> None:
    root = _folder(tmp_path / "src", {"a": 90, "b": 90})
    (root / "a" / "huge.png").write_bytes(_blank_png(width, height))
    result = run(str(root), tmp_path / "out", seed=0)
    assert result.num_images == 180
    [bad] = result.bad_files
    assert bad["file"] == "a/huge.png"
    assert "image too large" in bad["reason"] and reason in bad["reason"]
    assert "a/huge.png" in result.summary_markdown


def test_identical_images_with_conflicting_labels_are_reported(tmp_path: Path) -> None:
    root = _folder(tmp_path / "src", {"a": 40, "b": 40})
    shutil.copyfile(root / "a" / "000.png", root / "b" / "copy-of-a0.png")
    result = run(str(root), tmp_path / "out", seed=0, min_per_class_per_split=1)
    [conflict] = result.label_conflicts
    assert sorted(zip(conflict["ids"], conflict["labels"], strict=True)) == [
        ("a/000.png", "a"),
        ("b/copy-of-a0.png", "b"),
    ]
    assert "conflicting labels: 1 groups, 2 images" in result.summary_markdown
    assert "`b/copy-of-a0.png` (b)" in result.summary_markdown


def test_too_many_conflicting_labels_fail_the_step(tmp_path: Path) -> None:
    root = _folder(tmp_path / "src", {"a": 40, "b": 40})
    for i in range(3):  # 6 of 83 images (7 %) are conflicting copies: above the 5 % default
        shutil.copyfile(root / "a" / f"{i:03d}.png", root / "b" / f"copy-{i}.png")
    with pytest.raises(DataFetchError, match=r"6 of 83 images .* conflicting labels .* max_bad_fraction=5\.0%"):
        run(str(root), tmp_path / "out", seed=0)
    assert not (tmp_path / "out" / "dataset.json").exists()
    result = run(str(root), tmp_path / "out2", seed=0, max_bad_fraction=0.1)
    assert len(result.label_conflicts) == 3


def test_empty_class_folder_is_named_in_the_summary(tmp_path: Path) -> None:
    root = _folder(tmp_path / "src", {"a": 40, "b": 40})
    (root / "c").mkdir()
    (root / "d").mkdir()
    (root / "d" / "notes.txt").write_text("not an image")
    result = run(str(root), tmp_path / "out", seed=0, max_bad_fraction=0.1)
    assert result.classes == ["a", "b"]
    assert "Class folder `c/` holds no readable image" in result.summary_markdown
    assert "Class folder `d/` holds no readable image" in result.summary_markdown
