"""Multi-view inference (global view + grid x grid tiles, aggregated; visionpipe/serving/views.py): tile geometry,
aggregation properties, batching, the spec (signature, validation messages), and served = validated with views
on: a bundle built by the real decision chain (supervised_train's logits, threshold_sweep, calibration,
bundle_validation) answers the same probabilities over KServe's ModelServer on 127.0.0.1 (tritonclient REST,
PNG / JPEG bytes) as bundle_validation's path computes."""

from __future__ import annotations

import io
import itertools
import json
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import pytest
import torch
from images import png_bytes
from PIL import Image
from torch import nn

from visionpipe.data.datasets import load_dataset
from visionpipe.data.logits import load_logits
from visionpipe.harness import ServerProcess, free_port, running_server
from visionpipe.phases import supervised_train as st
from visionpipe.serving import bundle as B
from visionpipe.serving import metrics as M
from visionpipe.serving.models import build_model, load_weights
from visionpipe.serving.predictor import EnsembleError, check_ensemble
from visionpipe.serving.preprocessing import to_model_input
from visionpipe.serving.views import (
    aggregate_views,
    evaluate_views,
    model_input,
    predict_rows,
    spans,
    tile_boxes,
    view_boxes,
    views_input,
)
from visionpipe.specs import ArchSpec, PreprocessError, PreprocessSpec
from visionpipe.specs.preprocess import ViewsChoice, ViewsSpec
from visionpipe.specs.resolve import pending_views, resolve_preprocess
from visionpipe.training.recipes import RecipeError, load_recipe

tritonhttp = pytest.importorskip("tritonclient.http")

RGB = PreprocessSpec(channels=3, size=16, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
VIEWS = ViewsSpec(grid=3, overlap=0.25, aggregate="max")


def _images(n: int, height: int, width: int, channels: int = 3, seed: int = 0) -> npt.NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, channels), dtype=np.uint8)


# -------------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("grid", [2, 3, 4])
@pytest.mark.parametrize("overlap", [0.0, 0.1, 0.25, 0.45])
@pytest.mark.parametrize("length", [1, 2, 7, 64, 333, 640])
def test_spans_cover_the_axis_with_the_requested_overlap(grid: int, overlap: float, length: int) -> None:
    got = spans(length, grid, overlap)
    assert len(got) == grid
    covered = np.zeros(length, dtype=bool)
    for start, end in got:
        assert 0 <= start < end <= length
        covered[start:end] = True
    assert covered.all(), f"pixels {np.flatnonzero(~covered)} are in no tile"
    assert got[0][0] == 0 and got[-1][1] == length
    if length >= 64:  # big enough for the fractions to be visible in whole pixels
        tile = length / (grid - (grid - 1) * overlap)
        for (s0, e0), (s1, _) in itertools.pairwise(got):
            assert tile - 1 < e0 - s0 < tile + 2  # floor(start), ceil(end)
            assert abs((e0 - s1) - overlap * tile) <= 2.0  # pixels shared with the next tile
        assert all(b[0] < a[0] for b, a in itertools.pairwise(got))


def test_view_boxes_cover_a_non_square_image_row_by_row_global_first() -> None:
    boxes = view_boxes(480, 640, VIEWS)
    assert len(boxes) == VIEWS.count == 10 and boxes[0] == (0, 0, 480, 640)
    assert boxes[1:] == tile_boxes(480, 640, VIEWS)
    tops = [b[0] for b in boxes[1:]]
    assert tops == sorted(tops) and len(set(tops)) == 3  # row by row
    seen = np.zeros((480, 640), dtype=np.int64)
    for top, left, bottom, right in boxes[1:]:
        seen[top:bottom, left:right] += 1
        assert (
            abs((bottom - top) - 480 * VIEWS.tile_fraction) <= 1
            and abs((right - left) - 640 * VIEWS.tile_fraction) <= 1
        )
    assert seen.min() >= 1 and seen.max() == 4  # every pixel covered; overlaps of two tiles per axis


def test_views_input_layout_sizes_and_the_global_view_is_to_model_input() -> None:
    images = _images(3, 45, 60)
    spec = replace(RGB, views=VIEWS)
    x = views_input(images, spec)
    assert x.shape == (3 * 10, 3, 16, 16) and x.dtype == torch.float32
    for i in range(3):
        assert torch.equal(x[i * 10], to_model_input(images[i : i + 1], RGB)[0])  # view 0 = the old model input
    # a tile is the crop of the ORIGINAL image resized, through the same preprocessing
    top, left, bottom, right = tile_boxes(45, 60, VIEWS)[8]  # the bottom-right tile
    crop = np.ascontiguousarray(images[1:2, top:bottom, left:right])
    np.testing.assert_allclose(x[1 * 10 + 9].numpy(), to_model_input(crop, RGB)[0].numpy(), rtol=0, atol=1e-6)


def test_tiles_are_cut_from_the_original_resolution_not_the_resized_input() -> None:
    """A fine checkerboard survives in a tile cut from the 96 px original; it is gone in one cut from the 16 px
    model input (the global view)."""
    yy, xx = np.mgrid[0:96, 0:96]
    board = (((yy // 2 + xx // 2) % 2) * 255).astype(np.uint8)[None, ..., None].repeat(3, axis=3)
    spec = replace(RGB, views=ViewsSpec(grid=4, overlap=0.0))
    tiles = views_input(board, spec)[1:]  # 4x4 tiles of 24 px, each 2 px squares -> 16 px input
    from_small = views_input(
        np.asarray(Image.fromarray(board[0]).resize((16, 16), Image.Resampling.BILINEAR))[None], spec
    )[1:]
    assert float(tiles.std()) > 4 * float(from_small.std())


def test_a_spot_in_one_corner_reaches_only_the_tiles_that_hold_it() -> None:
    image = np.zeros((1, 90, 90, 3), dtype=np.uint8)
    image[0, 80:, 80:] = 255  # bottom-right corner
    spec = replace(RGB, views=VIEWS)
    x = views_input(image, spec)
    black = to_model_input(np.zeros((1, 4, 4, 3), dtype=np.uint8), RGB)[0]
    lit = [v for v in range(10) if not torch.allclose(x[v], black, atol=1e-6)]
    assert lit == [0, 9]  # the global view and the last tile


def test_required_side_gives_tiles_at_least_the_model_input_size() -> None:
    for views, size in ((VIEWS, 224), (ViewsSpec(grid=2, overlap=0.1), 224), (ViewsSpec(grid=4, overlap=0.3), 96)):
        side = views.required_side(size)
        assert min(e - s for s, e in spans(side, views.grid, views.overlap)) >= size - 1
        assert min(e - s for s, e in spans(side - 20, views.grid, views.overlap)) < size - 1
    assert VIEWS.required_side(224) == 560  # 224 / 0.4: the figure docs/README quote
    note = st.views_resolution_note(replace(RGB, size=224, views=VIEWS), (224, 224, 3))
    assert "image_size=560" in note
    assert st.views_resolution_note(replace(RGB, size=224, views=VIEWS), (560, 560, 3)) == ""
    assert st.views_resolution_note(replace(RGB, size=224), (64, 64, 3)) == ""


# ----------------------------------------------------------------------------------------- aggregation


def _rows(n: int, k: int, views: ViewsSpec, seed: int = 0) -> npt.NDArray[np.float64]:
    return np.random.default_rng(seed).normal(scale=3.0, size=(n * views.count, k))


@pytest.mark.parametrize("positive", [0, 1])
def test_binary_max_is_the_largest_views_positive_probability(positive: int) -> None:
    rows = _rows(40, 2, VIEWS)
    agg = aggregate_views(rows, replace(RGB, views=VIEWS), positive)
    per_view = M.softmax(rows)[:, positive].reshape(40, 10)
    p = np.exp(agg)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)
    assert (p[:, positive][:, None] >= per_view - 1e-12).all()
    np.testing.assert_allclose(p[:, positive], per_view.max(axis=1), atol=1e-12)


@pytest.mark.parametrize("k_classes", [2, 5])
@pytest.mark.parametrize("views", [VIEWS, ViewsSpec(aggregate="topk_mean", k=3), ViewsSpec(aggregate="mean")])
def test_aggregation_ignores_the_order_of_the_views(k_classes: int, views: ViewsSpec) -> None:
    spec = replace(RGB, views=views)
    rows = _rows(8, k_classes, views, seed=1)
    perm = np.random.default_rng(2).permutation(views.count)
    shuffled = rows.reshape(8, views.count, k_classes)[:, perm].reshape(rows.shape)
    np.testing.assert_allclose(aggregate_views(shuffled, spec), aggregate_views(rows, spec), atol=1e-12)
    assert np.allclose(np.exp(aggregate_views(rows, spec)).sum(axis=1), 1.0)


@pytest.mark.parametrize("k_classes", [2, 5])
def test_topk_mean_runs_from_max_at_k1_to_mean_at_every_view(k_classes: int) -> None:
    rows = _rows(16, k_classes, VIEWS, seed=3)

    def agg(views: ViewsSpec) -> npt.NDArray[np.float64]:
        return aggregate_views(rows, replace(RGB, views=views))

    np.testing.assert_allclose(agg(ViewsSpec(aggregate="topk_mean", k=1)), agg(ViewsSpec(aggregate="max")), atol=1e-12)
    np.testing.assert_allclose(
        agg(ViewsSpec(aggregate="topk_mean", k=10)), agg(ViewsSpec(aggregate="mean")), atol=1e-12
    )
    if k_classes == 2:  # the positive probability falls as k grows
        p = [np.exp(agg(ViewsSpec(aggregate="topk_mean", k=k)))[:, 1] for k in (1, 3, 10)]
        assert (p[0] >= p[1] - 1e-12).all() and (p[1] >= p[2] - 1e-12).all()


def test_aggregation_is_shift_invariant_and_refuses_a_wrong_row_count() -> None:
    spec = replace(RGB, views=VIEWS)
    rows = _rows(4, 3, VIEWS, seed=4)
    shifted = rows + np.random.default_rng(5).normal(size=(rows.shape[0], 1)) * 50  # raw logits vs log-probs
    np.testing.assert_allclose(aggregate_views(shifted, spec), aggregate_views(rows, spec), atol=1e-9)
    with pytest.raises(PreprocessError, match="10 views per image"):
        aggregate_views(rows[:-1], spec)
    np.testing.assert_array_equal(aggregate_views(rows, RGB), rows)  # no views: unchanged


# --------------------------------------------------------------------------------------------- batching


def _tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 2)).eval()


def test_n_images_make_one_forward_of_n_times_views_and_batching_equals_one_by_one() -> None:
    model = _tiny_model()
    spec = replace(RGB, views=ViewsSpec(aggregate="topk_mean", k=2))
    images = _images(5, 30, 42, seed=6)
    calls: list[int] = []

    def counted(x: torch.Tensor) -> torch.Tensor:
        calls.append(int(x.shape[0]))
        out: torch.Tensor = model(x)
        return out

    together = evaluate_views(counted, spec, images, batch_size=1000)
    assert calls == [50] and together.shape == (5, 2)
    calls.clear()
    alone = evaluate_views(counted, spec, images, batch_size=1)
    assert calls == [10] * 5
    np.testing.assert_allclose(alone, together, atol=1e-6)
    # uploads of different sizes, each tiled at its own size
    mixed = [images[0], _images(1, 64, 20, seed=7)[0], images[2]]
    rows = model_input(mixed, spec)
    assert rows.shape == (30, 3, 16, 16)
    assert torch.equal(rows[:10], views_input(images[:1], spec))
    # without views, evaluate_views gives the model's own logits, as before
    with torch.no_grad():
        np.testing.assert_allclose(
            evaluate_views(model, RGB, images), model(to_model_input(images, RGB)).numpy(), atol=1e-6
        )


def test_supervised_train_logits_and_bundle_path_share_predict_rows() -> None:
    model = _tiny_model(1)
    spec = replace(RGB, views=VIEWS)
    images = _images(7, 33, 33, seed=8)
    logits = st.predict_logits(model, images, spec, batch_size=20, positive_index=0)
    assert logits.dtype == np.float32 and logits.shape == (7, 2)

    def log_probs(x: torch.Tensor) -> npt.NDArray[np.float64]:
        with torch.no_grad():
            return np.asarray(torch.log_softmax(model(x).double(), dim=1).numpy())

    np.testing.assert_allclose(logits, predict_rows(log_probs, images, spec, positive_index=0), atol=1e-6)


# ------------------------------------------------------------------------------------------------- spec


def test_signature_names_the_views_and_is_unchanged_without_them() -> None:
    assert PreprocessSpec().signature == "v1/grayscale+resize28+norm(0.5,0.5)"  # every bundle before views
    assert "views" not in PreprocessSpec().to_dict()
    signatures = {
        replace(RGB, views=v).signature
        for v in (
            VIEWS,
            ViewsSpec(grid=2),
            ViewsSpec(overlap=0.1),
            ViewsSpec(aggregate="mean"),
            ViewsSpec(aggregate="topk_mean", k=2),
            ViewsSpec(aggregate="topk_mean", k=3),
        )
    }
    assert len(signatures) == 6 and RGB.signature not in signatures
    assert replace(RGB, views=VIEWS).signature == RGB.signature + "+views(global+tiles3x3,overlap0.25,max)"
    for spec in (RGB, replace(RGB, views=ViewsSpec(aggregate="topk_mean", k=4))):
        assert PreprocessSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize(
    ("views", "message"),
    [
        ({"grid": 1}, r"grid=1 is not allowed; allowed values: an integer in \[2, 6\]"),
        ({"grid": "3"}, r"grid='3' is a str; allowed values: an integer in \[2, 6\]"),
        ({"overlap": 0.5}, r"overlap=0.5 is out of range; allowed values: \[0, 0.5\)"),
        ({"overlap": -0.1}, r"allowed values: \[0, 0.5\)"),
        ({"overlap": "a lot"}, r"overlap='a lot' must be a number in \[0, 0.5\)"),
        ({"aggregate": "median"}, "aggregate='median' is not allowed; allowed values: max, topk_mean, mean"),
        ({"aggregate": "topk_mean"}, r"k=0 is out of range for topk_mean; allowed values: an integer in \[1, 10\]"),
        ({"aggregate": "topk_mean", "k": 11}, r"k=11 is out of range .* \[1, 10\]"),
        ({"aggregate": "max", "k": 2}, "k=2 applies only to aggregate='topk_mean'"),
        (
            {"tiles": 9},
            r"unknown preprocess.views fields \['tiles'\]; allowed: \['aggregate', 'grid', 'k', 'overlap', 'weights'\]",
        ),
        ("3x3", "must be a mapping with grid, overlap, aggregate"),
        ({"aggregate": "learned"}, r"weights has 0 values; aggregate='learned' needs 10 \(one per view"),
        ({"aggregate": "learned", "weights": [0.5, 0.5]}, "weights has 2 values; aggregate='learned' needs 10"),
        ({"aggregate": "learned", "weights": [-0.1] + [1.1 / 9] * 9}, r"weights\[0\]=-0.1 is not allowed; .* >= 0"),
        ({"aggregate": "learned", "weights": [float("nan")] + [0.1] * 9}, r"weights\[0\]=nan is not allowed; allowed"),
        ({"aggregate": "learned", "weights": [0.1] * 9 + [float("inf")]}, r"weights\[9\]=inf is not allowed"),
        ({"aggregate": "learned", "weights": [0.1] * 9 + ["a"]}, r"weights\[9\]='a' is not allowed"),
        ({"aggregate": "learned", "weights": [0.2] * 10}, r"weights sum to 2; they must sum to 1 \(within 0.001"),
        (
            {"aggregate": "learned", "weights": "uniform"},
            "weights='uniform' must be a list of 1 \\+ grid \\* grid numbers",
        ),
        ({"aggregate": "mean", "weights": [0.1] * 10}, r"weights=\[0.1, .*\] applies only to aggregate='learned'"),
        (
            {"aggregate": "auto"},
            "aggregate='auto' is not allowed; .*'auto' is a recipe setting: supervised_train resolves",
        ),
    ],
)
def test_views_validation_names_the_field_the_value_and_the_allowed_values(views: object, message: str) -> None:
    with pytest.raises(PreprocessError, match=message):
        PreprocessSpec.from_dict({**RGB.to_dict(), "views": views})


def test_views_need_the_standard_kind() -> None:
    with pytest.raises(PreprocessError, match=r"kind='digit-upload' .* views need kind='standard'"):
        PreprocessSpec(kind="digit-upload", views=ViewsSpec())


# ------------------------------------------------------------------------------ learned weighting and auto


def _learned(weights: list[float], grid: int = 3) -> ViewsSpec:
    return ViewsSpec(grid=grid, aggregate="learned", weights=tuple(weights))


def test_learned_weights_are_stored_rounded_and_named_by_the_signature() -> None:
    raw = [0.1234567, 0.0765433] + [0.1] * 8
    spec = replace(RGB, views=_learned(raw))
    assert spec.views is not None and spec.views.weights[:2] == (0.123457, 0.076543)
    assert re.fullmatch(
        re.escape(RGB.signature) + r"\+views\(global\+tiles3x3,overlap0\.25,learned:[0-9a-f]{12}\)", spec.signature
    )
    back = PreprocessSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back == spec and back.signature == spec.signature  # the bundle's spec round-trips exactly
    swapped = replace(RGB, views=_learned([raw[1], raw[0], *raw[2:]]))
    uniform = replace(RGB, views=_learned([0.1] * 10))
    assert len({spec.signature, swapped.signature, uniform.signature, replace(RGB, views=ViewsSpec()).signature}) == 4
    assert "weights" not in ViewsSpec(aggregate="mean").to_dict()


@pytest.mark.parametrize("k_classes", [2, 5])
def test_learned_is_the_weighted_mean_of_the_views_and_uniform_weights_are_mean(k_classes: int) -> None:
    rows = _rows(12, k_classes, VIEWS, seed=9)
    weights = np.random.default_rng(10).dirichlet(np.ones(10))
    learned = aggregate_views(rows, replace(RGB, views=_learned(list(weights))), positive_index=0)
    per_view = M.log_softmax(rows).reshape(12, 10, k_classes)
    w = np.asarray(_learned(list(weights)).weights)
    if k_classes == 2:  # the weighted positive (class 0) log-odds
        margin = (per_view[..., 0] - per_view[..., 1]) @ (w / w.sum())
        np.testing.assert_allclose(learned[:, 0] - learned[:, 1], margin, atol=1e-9)
    else:
        expected = M.log_softmax(np.einsum("nvk,v->nk", per_view, w / w.sum()))
        np.testing.assert_allclose(learned, expected, atol=1e-9)
    np.testing.assert_allclose(
        aggregate_views(rows, replace(RGB, views=_learned([0.1] * 10))),
        aggregate_views(rows, replace(RGB, views=ViewsSpec(aggregate="mean"))),
        atol=1e-12,
    )


def _synthetic(
    signal: list[int], n: int = 160, k_classes: int = 2, strength: float = 2.0, seed: int = 0
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Per-view log-probabilities (n, 10, K): every view is noise, those in `signal` also carry the label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k_classes, n)
    logits = rng.normal(size=(n, 10, k_classes))
    for v in signal:
        logits[np.arange(n), v, labels] += strength
    return M.log_softmax(logits.reshape(-1, k_classes)).reshape(n, 10, k_classes), labels


@pytest.mark.parametrize("k_classes", [2, 4])
def test_learned_weights_recover_the_one_informative_tile(k_classes: int) -> None:
    per_view, labels = _synthetic([5], k_classes=k_classes)  # view 5 = tile 4, the centre of the 3x3 grid
    weights = np.asarray(st.fit_view_weights(per_view, labels))
    assert weights.shape == (10,) and (weights >= 0).all() and abs(weights.sum() - 1) < 1e-5
    assert int(weights.argmax()) == 5 and weights[5] > 3 * np.delete(weights, 5).max()
    np.testing.assert_array_equal(weights, np.round(weights, 6))
    # the pull toward uniform: a stronger one flattens the weights, none lets the tile take almost everything
    flat = np.asarray(st.fit_view_weights(per_view, labels, l2=100.0))
    assert int(flat.argmax()) == 5 and flat[5] < weights[5]
    # the same inputs give the same weights (deterministic), and a ViewsSpec accepts them as they are
    assert st.fit_view_weights(per_view, labels) == tuple(weights)
    _learned(list(weights))


def _rule_winner(candidates: dict[str, dict[str, float]]) -> str:
    """VIEWS_RULE recomputed from the recorded scores: the simplest within one paired SE (or the tie nats)."""
    best = min(candidates.values(), key=lambda c: c["nll"])["nll"]
    assert all(abs(c["excess"] - (c["nll"] - best)) < 1e-9 for c in candidates.values())
    return next(
        name
        for name in st.VIEW_CANDIDATES
        if candidates[name]["excess"] <= max(candidates[name]["paired_se"], st.VIEWS_TIE_NATS)
    )


@pytest.mark.parametrize(
    ("signal", "expected"),
    [
        ([0], "global"),  # only the global view informs: tiles only add noise
        ([5], "learned"),  # only the centre tile informs: learned finds it, the fixed pools dilute it
        (list(range(10)), "mean"),  # every view informs equally: learned (about uniform) ties with mean
    ],
)
def test_auto_picks_what_its_rule_says(signal: list[int], expected: str) -> None:
    per_view, labels = _synthetic(signal)
    selection = st.choose_views(per_view, labels, ViewsChoice(aggregate="auto"))
    assert set(selection.candidates) == set(st.VIEW_CANDIDATES)
    assert selection.chosen == expected == _rule_winner(selection.candidates)
    assert selection.requested == "auto" and selection.images == len(labels)
    if expected == "global":
        assert selection.views is None
    else:
        assert selection.views is not None and selection.views.aggregate == expected
        assert (selection.views.grid, selection.views.overlap) == (3, 0.25)


def test_auto_breaks_a_tie_toward_the_simpler_option() -> None:
    """Every view identical: all five candidates score the same, so the simplest (the global view) wins, though
    the exact numbers can differ in the last bits."""
    per_view, labels = _synthetic([0], n=120)
    same = np.repeat(per_view[:, :1], 10, axis=1)
    selection = st.choose_views(same, labels, ViewsChoice(aggregate="auto"))
    scores = [c["nll"] for c in selection.candidates.values()]
    assert max(scores) - min(scores) < st.VIEWS_TIE_NATS
    assert selection.chosen == "global" and selection.views is None
    # with k and a 2x2 grid: the topk_mean candidate uses the recipe's k
    small, _ = _synthetic([0], n=40)
    selection = st.choose_views(small[:, :5], labels[:40], ViewsChoice(grid=2, aggregate="auto", k=2))
    assert st.candidate_views(ViewsChoice(grid=2, aggregate="auto", k=2))["topk_mean"] == ViewsSpec(
        grid=2, aggregate="topk_mean", k=2
    )
    # too few images of a class to cross-fit: views stay off, and the record says why
    tiny = st.choose_views(same[:3], np.array([0, 0, 1]), ViewsChoice(aggregate="auto"))
    assert tiny.chosen == "global" and "fewer than 2" in tiny.rule


def test_recipe_views_auto_and_learned_are_resolved_by_supervised_train_never_stored() -> None:
    recipe = load_recipe("digits-cnn", {"preprocess.views": {"grid": 3, "aggregate": "auto"}})  # bench/roadwork.py
    assert resolve_preprocess(recipe, 1).views is None  # training and the epoch selection: the global view
    assert pending_views(recipe) == ViewsChoice(grid=3, aggregate="auto")
    learned = load_recipe("digits-cnn", {"preprocess.views": {"aggregate": "learned"}})
    assert pending_views(learned) == ViewsChoice(aggregate="learned")
    fixed = load_recipe("digits-cnn", {"preprocess.views": {"aggregate": "learned", "weights": [0.1] * 10}})
    assert pending_views(fixed) is None and resolve_preprocess(fixed, 1).views == _learned([0.1] * 10)
    assert "weights" not in recipe.to_dict()["preprocess"]["views"]  # type: ignore[index]  # plain JSON mapping
    for bad, message in (
        ({"aggregate": "auto", "weights": [0.1] * 10}, "weights=.* applies only to aggregate='learned'"),
        ({"aggregate": "auto", "k": 11}, r"k=11 is out of range for auto's topk_mean candidate; .* \[1, 10\]"),
        ({"aggregate": "learned", "weights": [1.0]}, "weights has 1 values; aggregate='learned' needs 10"),
        ({"aggregate": "best"}, "aggregate='best' is not allowed; allowed values: max, topk_mean, mean, learned, auto"),
    ):
        with pytest.raises(RecipeError, match=message):
            load_recipe("digits-cnn", {"preprocess.views": bad})


def test_auto_through_supervised_train_ends_with_a_concrete_spec(binary_candidate: Path, tmp_path: Path) -> None:
    """supervised_train on a tiny model with `aggregate: auto`: model.json carries a concrete spec (never auto)
    and the record of the choice, and the val_calib / val_test logits are computed with that spec."""
    ds_dir = binary_candidate.parent / "ds"
    recipe = load_recipe("digits-cnn", {"epochs": 1, "preprocess.views": {"grid": 2, "aggregate": "auto"}})
    lines: list[str] = []
    result = st.run(ds_dir, tmp_path / "model", tmp_path / "logits", recipe, tmp_path / "ckpt", log=lines.append)
    info = json.loads((tmp_path / "model" / st.MODEL_META_FILE).read_text())
    spec = PreprocessSpec.from_dict(info["preprocess"])  # a bundle can read it: no auto, weights when learned
    assert info["preprocess_signature"] == spec.signature
    record = info["views_selection"]
    assert record == result.views_selection and record["requested"] == "auto"
    assert record["chosen"] in st.VIEW_CANDIDATES and record["chosen"] == _rule_winner(record["candidates"])
    assert (spec.views is None) == (record["chosen"] == "global")
    if spec.views is not None:
        assert spec.views.aggregate == record["chosen"] and spec.views.grid == 2
    assert any(f"views auto -> {record['chosen']}" in line for line in lines)
    model = build_model(ArchSpec.from_dict(info["arch"]))
    load_weights(model, tmp_path / "model" / st.MODEL_FILE, strict=True)
    images = load_dataset(ds_dir).split("val_test", "evaluate").images
    z, _ = load_logits(tmp_path / "logits", "val_test")
    np.testing.assert_allclose(z, st.predict_logits(model.eval(), images, spec, 64, "cpu"), atol=1e-5)


# ---------------------------------------------------------------------------- served = validated, views on


class Chain(NamedTuple):
    bundle: Path  # the validated bundle with views
    dataset: Path  # the Dataset it was validated on
    logits: Path  # supervised_train's logits with views (what threshold_sweep and calibration read)
    views: ViewsSpec  # the bundle's views


def _decision_chain(binary_candidate: Path, root: Path, views: ViewsSpec | ViewsChoice) -> Chain:
    """binary_candidate's trained model with `views` through the real decision chain: supervised_train's
    val_calib / val_test logits, threshold_sweep, calibration, bundle_validation (whose parity check compares
    those logits with `BundleModel.predict_images`). A pending ViewsChoice is first resolved on val_select by
    supervised_train's own `resolve_views` (learned: the weights fitted there)."""
    from visionpipe.phases.bundle_validation import run as validate
    from visionpipe.phases.calibration import run as calibrate
    from visionpipe.phases.threshold_sweep import run as sweep

    src = binary_candidate.parent
    shutil.copytree(src / "model", root / "model")
    info = json.loads((root / "model" / "model.json").read_text())
    model = build_model(ArchSpec.from_dict(info["arch"]))
    load_weights(model, root / "model" / st.MODEL_FILE, strict=True)
    dataset = load_dataset(src / "ds")
    base = PreprocessSpec.from_dict(info["preprocess"])
    if isinstance(views, ViewsChoice):
        select = dataset.split("val_select", "select")
        spec, _ = st.resolve_views(model, select, base, views, 64, dataset.positive_index or 1)
    else:
        spec = replace(base, views=views)
    assert spec.views is not None
    info["preprocess"], info["preprocess_signature"] = spec.to_dict(), spec.signature
    (root / "model" / "model.json").write_text(json.dumps(info))
    st.write_logits(model.eval(), dataset, spec, 64, root / "logits", torch.device("cpu"))
    sweep(root / "logits", root / "thr", objective="mcc", bootstrap=20)
    calibrate(root / "logits", root / "thr", root / "cal", calibration_method="platt")
    out = root / "bundle"
    validate(src / "ds", root / "model", root / "logits", root / "cal", out, root / "thr", name="eights-views")
    return Chain(out, src / "ds", root / "logits", spec.views)


@pytest.fixture(scope="module")
def chain(binary_candidate: Path, tmp_path_factory: pytest.TempPathFactory) -> Chain:
    """The decision chain with views 3x3, overlap 0.25, max."""
    return _decision_chain(binary_candidate, tmp_path_factory.mktemp("views"), VIEWS)


@pytest.fixture(scope="module")
def learned_chain(binary_candidate: Path, tmp_path_factory: pytest.TempPathFactory) -> Chain:
    """The decision chain with `aggregate: learned`, the weights fitted on val_select by supervised_train."""
    return _decision_chain(binary_candidate, tmp_path_factory.mktemp("learned"), ViewsChoice(aggregate="learned"))


@pytest.fixture(scope="module")
def views_server(chain: Chain, learned_chain: Chain, binary_candidate: Path) -> Iterator[ServerProcess]:
    http_port, grpc_port = free_port(), free_port()
    spec = {
        "views": {"bundles": [str(chain.bundle)]},
        "learned": {"bundles": [str(learned_chain.bundle)]},
        "global": {"bundles": [str(binary_candidate)]},
    }
    argv = [sys.executable, str(Path(__file__).parent / "serve_many.py"), str(http_port), str(grpc_port)]
    with running_server([*argv, json.dumps(spec)], http_port, timeout_s=120) as proc:
        yield proc


def _serve(server: ServerProcess, model: str, encoded: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(calibrated probabilities, labels) for encoded images sent as raw BYTES (binary tensor extension)."""
    client = tritonhttp.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    tensor = tritonhttp.InferInput("image", [len(encoded)], "BYTES")
    tensor.set_data_from_numpy(np.array(encoded, dtype=np.object_), binary_data=True)
    answer = client.infer(model, [tensor])
    return answer.as_numpy("probabilities").astype(np.float64), answer.as_numpy("label")


def _jpeg(image: npt.NDArray[np.uint8]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[..., 0]).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("served_model", ["views", "learned"])
def test_served_equals_validated_with_views_on(
    served_model: str, chain: Chain, learned_chain: Chain, views_server: ServerProcess
) -> None:
    if served_model == "learned":
        chain = learned_chain
        assert chain.views.aggregate == "learned" and len(set(chain.views.weights)) > 1  # fitted, not uniform
    else:
        assert chain.views == VIEWS
    bundle = B.read_bundle(chain.bundle)
    assert bundle.preprocess.views == chain.views and bundle.signature.endswith(chain.views.signature)
    runtime = B.BundleModel(bundle)
    images = load_dataset(chain.dataset).split("val_test", "evaluate").images[:16]
    # what the decision phases saw (supervised_train's logits) and what bundle_validation's path computes
    z, _ = load_logits(chain.logits, "val_test")
    validated = runtime.decide(M.log_softmax(z[:16]))
    bundle_path = runtime.predict_images(images)
    np.testing.assert_allclose(bundle_path.raw_probs, M.softmax(z[:16]), atol=1e-6)
    served, served_labels = _serve(views_server, served_model, [png_bytes(img) for img in images])
    np.testing.assert_allclose(served, validated.calibrated_probs, atol=2e-6)
    np.testing.assert_allclose(served, bundle_path.calibrated_probs, atol=2e-6)
    np.testing.assert_array_equal(served_labels, validated.decisions.labels)
    # the views matter: the global-only bundle (same weights) answers differently
    global_only, _ = _serve(views_server, "global", [png_bytes(img) for img in images])
    assert float(np.max(np.abs(global_only - served))) > 1e-3


def test_served_large_uploads_are_tiled_at_their_own_resolution(chain: Chain, views_server: ServerProcess) -> None:
    """Non-square uploads, larger than the model input, PNG and JPEG mixed in one request: the server answers
    what the bundle path computes on the decoded pixels, each tiled at its own size."""
    runtime = B.BundleModel(B.read_bundle(chain.bundle))
    digits = load_dataset(chain.dataset).split("val_test", "evaluate").images[16:20]
    sizes = [(40, 64), (72, 48), (33, 90), (64, 64)]
    uploads = [
        np.asarray(Image.fromarray(d[..., 0]).resize((w, h), Image.Resampling.BILINEAR))[..., None]
        for d, (h, w) in zip(digits, sizes, strict=True)
    ]
    encoded = [png_bytes(uploads[0]), _jpeg(uploads[1]), png_bytes(uploads[2]), _jpeg(uploads[3])]
    decoded = [np.asarray(Image.open(io.BytesIO(e)).convert("L"))[..., None] for e in encoded]
    expected = np.concatenate([runtime.predict_images(d[None]).calibrated_probs for d in decoded])
    served, _ = _serve(views_server, "views", encoded)
    np.testing.assert_allclose(served, expected, atol=2e-6)


def test_a_bundle_whose_views_differ_from_its_signature_is_refused(chain: Chain, tmp_path: Path) -> None:
    manifest = json.loads((chain.bundle / B.BUNDLE_FILE).read_text())
    spec = PreprocessSpec.from_dict(manifest["preprocessing"]["spec"])
    manifest["preprocessing"]["signature"] = replace(spec, views=ViewsSpec(aggregate="mean")).signature
    manifest.pop("files")
    card = json.loads((chain.bundle / B.MODEL_CARD_FILE).read_text())
    B.write_bundle(tmp_path / "b", manifest, [chain.bundle / "weights" / "member-0.safetensors"], card)
    with pytest.raises(B.SignatureMismatch, match="views"):
        B.read_bundle(tmp_path / "b")


def test_a_learned_bundle_whose_weights_differ_from_its_signature_is_refused(
    learned_chain: Chain, tmp_path: Path
) -> None:
    """The signature names the learned weights (their digest): swapping two weights in the stored spec, with
    the signature left as validated, is refused."""
    manifest = json.loads((learned_chain.bundle / B.BUNDLE_FILE).read_text())
    weights = manifest["preprocessing"]["spec"]["views"]["weights"]
    first = int(np.argmin(weights))  # a weight other than the first (they differ: fitted)
    weights[0], weights[first] = weights[first], weights[0]
    assert (
        PreprocessSpec.from_dict(manifest["preprocessing"]["spec"]).signature != manifest["preprocessing"]["signature"]
    )
    manifest.pop("files")
    card = json.loads((learned_chain.bundle / B.MODEL_CARD_FILE).read_text())
    B.write_bundle(tmp_path / "b", manifest, [learned_chain.bundle / "weights" / "member-0.safetensors"], card)
    with pytest.raises(B.SignatureMismatch, match="views"):
        B.read_bundle(tmp_path / "b")


def test_an_ensemble_cannot_mix_views(chain: Chain, binary_candidate: Path) -> None:
    runtimes = [B.BundleModel(B.read_bundle(p)) for p in (binary_candidate, chain.bundle)]
    with pytest.raises(EnsembleError, match="an ensemble needs one preprocessing"):
        check_ensemble(runtimes)
