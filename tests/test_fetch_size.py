"""data_fetch's stored size: image_size=0 keeps one native size, stores mixed sizes at the recipe's side (its
preprocess.size, or the side multi-view tiles need), and an explicit image_size always wins."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from images import png_bytes

from visionpipe.data.datasets import load_dataset
from visionpipe.phases.data_fetch import DataFetchError, run, size_plan
from visionpipe.specs.preprocess import ViewsSpec

ROADWORK = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "roadwork-tracon"
# (height, width) of the mixed folder's images, cycled
MIXED_SIZES = ((30, 20), (17, 25), (40, 40), (23, 31))
RECIPE_SIDE = 16


def _write_folder(root: Path, sizes: tuple[tuple[int, int], ...], channels: int = 3, per_class: int = 10) -> Path:
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = sizes[i % len(sizes)]
            shape = (h, w, channels) if channels == 3 else (h, w)
            (root / name / f"{i:02d}.png").write_bytes(png_bytes(rng.integers(0, 256, shape, dtype=np.uint8)))
    return root


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_folder(tmp_path_factory.mktemp("mixed"), MIXED_SIZES)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny-rgb.yaml"
    path.write_text(f"arch:\n  name: cnn-small\npreprocess:\n  channels: 3\n  size: {RECIPE_SIDE}\n")
    return path


def test_mixed_sizes_are_stored_at_the_recipes_side(mixed: Path, recipe: Path, tmp_path: Path) -> None:
    result = run(str(mixed), tmp_path / "o", recipe=str(recipe))
    ds = load_dataset(result.out_dir)
    assert ds.image_shape == (RECIPE_SIDE, RECIPE_SIDE, 3)
    assert len(ds.images) == 20 and result.num_images == 20
    assert f"Images stored at {RECIPE_SIDE}x{RECIPE_SIDE} pixels" in result.summary_markdown
    assert "4 different native sizes" in result.summary_markdown
    assert "recipe tiny-rgb's preprocess.size" in result.summary_markdown


def test_the_images_kept_before_a_second_size_appears_are_resized_too(
    mixed: Path, recipe: Path, tmp_path: Path
) -> None:
    """The first images (all 30x20 here, sorted first) are resized like the later ones: equal to the same folder
    fetched with image_size set explicitly to the recipe's side."""
    by_recipe = load_dataset(run(str(mixed), tmp_path / "r", recipe=str(recipe)).out_dir)
    explicit = load_dataset(run(str(mixed), tmp_path / "e", image_size=RECIPE_SIDE).out_dir)
    np.testing.assert_array_equal(by_recipe.images, explicit.images)


def test_views_store_the_side_their_tiles_need(mixed: Path, recipe: Path, tmp_path: Path) -> None:
    views = {"preprocess.views": {"grid": 3, "overlap": 0.25, "aggregate": "max"}}
    need = ViewsSpec(grid=3, overlap=0.25).required_side(RECIPE_SIDE)
    assert need == 40  # ceil(16 / (1 / (3 - 2 * 0.25)))
    result = run(str(mixed), tmp_path / "o", recipe=str(recipe), recipe_overrides_json=json.dumps(views))
    assert load_dataset(result.out_dir).image_shape == (need, need, 3)
    assert f"= {need} pixels so no {RECIPE_SIDE}-pixel tile is upsampled" in result.summary_markdown


def test_an_explicit_image_size_wins(mixed: Path, recipe: Path, tmp_path: Path) -> None:
    result = run(str(mixed), tmp_path / "o", image_size=12, recipe=str(recipe))
    assert load_dataset(result.out_dir).image_shape == (12, 12, 3)
    assert "image_size=12 was given" in result.summary_markdown


def test_one_native_size_is_kept_even_with_a_recipe(recipe: Path, tmp_path: Path) -> None:
    """MNIST-like folders (every image one size) keep their size: the recipe resizes them when it trains."""
    src = _write_folder(tmp_path / "src", ((8, 8),), channels=1)
    result = run(str(src), tmp_path / "o", recipe=str(recipe))
    assert load_dataset(result.out_dir).image_shape == (8, 8, 1)
    assert "native 8x8 pixels" in result.summary_markdown


def test_mixed_sizes_without_a_recipe_say_how_to_fix(mixed: Path, tmp_path: Path) -> None:
    with pytest.raises(DataFetchError, match=r"different sizes .*set image_size.*or give the recipe"):
        run(str(mixed), tmp_path / "o")


@pytest.mark.parametrize("bad", [-1, 4097, True])
def test_bad_image_sizes_name_the_allowed_values(bad: int, mixed: Path, tmp_path: Path) -> None:
    with pytest.raises(DataFetchError, match=r"image_size=.* is not allowed; allowed values: 0 .* or 1\.\.4096"):
        run(str(mixed), tmp_path / "o", image_size=bad)


def test_the_plan_follows_the_shipped_roadwork_recipe() -> None:
    plan = size_plan(0, "roadwork-effnet-lite0")
    assert (plan.side, plan.mixed_side, plan.kind) == (0, 224, "standard")
    assert size_plan(300, "roadwork-effnet-lite0").side == 300
    assert size_plan(0).mixed_side is None


@pytest.mark.skipif(not ROADWORK.is_dir(), reason="../shared/datasets/roadwork-tracon is not in this workspace")
def test_real_road_photos_of_mixed_sizes_need_no_image_size(tmp_path: Path) -> None:
    """What `visionpipe run --source roadwork-tracon -p recipe=roadwork-effnet-lite0` does, on 10 photos a class."""
    for name in ("roadwork", "no_roadwork"):
        (tmp_path / "src" / name).mkdir(parents=True)
        for photo in sorted((ROADWORK / name).glob("*.jpg"))[:10]:
            shutil.copy(photo, tmp_path / "src" / name / photo.name)
    result = run(str(tmp_path / "src"), tmp_path / "o", positive_class="roadwork", recipe="roadwork-effnet-lite0")
    assert load_dataset(result.out_dir).image_shape == (224, 224, 3)
    assert "recipe roadwork-effnet-lite0's preprocess.size" in result.summary_markdown
