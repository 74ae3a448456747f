"""Multi-view inference: one image -> a global view + grid x grid overlapping tiles -> one batched forward pass ->
one row of log-probabilities per image. The one implementation that training-side evaluation (supervised_train's
val_calib / val_test logits, hence threshold_sweep and calibration), bundle_validation (`BundleModel.predict_images`)
and the served predictor all call, so served = validated holds with views on.

Views (`visionpipe.specs.preprocess.ViewsSpec`; ``spec.views is None`` = the global view only, exactly
`to_model_input`):

- geometry: the tiles are cut from the image at the resolution it arrives in (the upload, or the Dataset's stored
  image), NEVER from the already resized model input. Along each axis of length L, tile i of g spans
  [floor(i * s * L), ceil((i * s + t) * L)) with t = 1 / (g - (g - 1) * overlap) (the tile side as a fraction)
  and s = t * (1 - overlap) (the stride): the tiles cover the image exactly, neighbours share about
  overlap * t * L pixels, and the last tile ends at L. The geometry is relative, so a Dataset image stored as a
  squashed square (data_fetch ``image_size``) gives the same tiles as the original upload, up to resampling.
- each view goes through the shared preprocessing (`to_unit_tensor`, then `resize_normalise`: bilinear,
  antialiased, normalised), so the first view of every image is bit for bit `to_model_input` of that image.
- layout: image-major, ``rows[i * V : (i + 1) * V]`` are image i's V = 1 + g * g views, the global view first,
  then the tiles row by row. N images make one forward pass of N * V rows.
- aggregation space: per-view LOG-PROBABILITIES (log_softmax of the model's logits; for an ensemble bundle, the
  log of the members' mean softmax, what `BundleModel.log_probs` returns). The aggregated row is again a
  normalised log-probability vector, which is a valid logit vector (softmax gives the aggregated probabilities
  back), so threshold_sweep, calibration and the served calibrator / policy read it exactly like logits:
  - binary (K = 2, positive class index p): the per-view positive log-odds m_v = log p_v(pos) - log p_v(neg)
    are pooled (``max``: the largest, so P(positive) = the largest view's P(positive); ``topk_mean``: the mean of
    the k largest; ``mean``: the mean; ``learned``: sum_v w_v m_v with the spec's weights, a convex mix), and the
    row is (log sigmoid(-m), log sigmoid(m)) in class order. Max and top-k are one-sided on purpose: roadwork in
    ANY tile makes the image positive.
  - multiclass (K > 2): each class's log-probability is pooled over the views the same way, then renormalised
    (log_softmax). For ``mean`` this is the normalised geometric mean of the views' probabilities, for
    ``learned`` the weighted one, and binary ``mean`` / ``learned`` are the same thing (uniform weights are
    ``mean`` exactly).
- TTA (serving only) composes: each view's TTA variants are averaged first (per-view log-probabilities), then the
  views are aggregated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
import torch

from visionpipe.serving.preprocessing import resize_normalise, to_unit_tensor
from visionpipe.specs.preprocess import PreprocessError, PreprocessSpec, ViewsSpec

Box = tuple[int, int, int, int]  # (top, left, bottom, right), bottom / right exclusive, in source pixels
FloatArray = npt.NDArray[np.float64]
UInt8Images = npt.NDArray[np.uint8] | Sequence[npt.NDArray[np.uint8]]
# model input rows (R, C, S, S) -> float rows (R, K): raw logits or log-probabilities
RowsFn = Callable[[torch.Tensor], npt.NDArray[np.floating]]


# ------------------------------------------------------------------------------------------------ geometry


def spans(length: int, grid: int, overlap: float) -> list[tuple[int, int]]:
    """[start, end) of the `grid` tiles along an axis of `length` pixels (see the module docstring)."""
    if length < 1:
        raise PreprocessError(f"an image side of {length} pixels cannot be tiled; it needs at least 1 pixel")
    tile = 1.0 / (grid - (grid - 1) * overlap)
    stride = tile * (1.0 - overlap)
    out = []
    for i in range(grid):
        start = min(math.floor(i * stride * length + 1e-9), length - 1)
        end = length if i == grid - 1 else min(length, math.ceil((i * stride + tile) * length - 1e-9))
        out.append((start, max(end, start + 1)))
    return out


def tile_boxes(height: int, width: int, views: ViewsSpec) -> list[Box]:
    """The grid x grid tiles of an image, row by row."""
    rows, cols = spans(height, views.grid, views.overlap), spans(width, views.grid, views.overlap)
    return [(top, left, bottom, right) for top, bottom in rows for left, right in cols]


def view_boxes(height: int, width: int, views: ViewsSpec) -> list[Box]:
    """Every view of an image: the global view (the whole image) first, then the tiles."""
    return [(0, 0, height, width), *tile_boxes(height, width, views)]


def views_per_image(spec: PreprocessSpec) -> int:
    """Model input rows per image: 1 without views, 1 + grid * grid with."""
    return 1 if spec.views is None else spec.views.count


# ------------------------------------------------------------------------------------------------ tensors


def views_input(images: npt.NDArray[np.uint8], spec: PreprocessSpec) -> torch.Tensor:
    """uint8 images (N, H, W, C) of one size -> model input (N * V, C, S, S), image-major, global view first."""
    if spec.views is None:
        raise PreprocessError("views_input needs a preprocessing spec with views; use to_model_input without")
    x = to_unit_tensor(images, spec)  # (N, C, H, W) at the source resolution
    n, _, height, width = x.shape
    boxes = view_boxes(height, width, spec.views)
    parts = [resize_normalise(x[:, :, top:bottom, left:right], spec) for top, left, bottom, right in boxes]
    return torch.stack(parts, dim=1).reshape(n * len(parts), *parts[0].shape[1:])


def model_input(images: UInt8Images, spec: PreprocessSpec) -> torch.Tensor:
    """The model input of uint8 images under `spec`: (N, C, S, S) without views, (N * V, C, S, S) with.

    `images` is one (N, H, W, C) array, or a sequence of (H, W, C) arrays of any sizes (uploads): each image is
    then processed at its own size and the rows concatenated in order."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return resize_normalise(to_unit_tensor(images, spec), spec) if spec.views is None else views_input(images, spec)
    rows = [model_input(np.asarray(image)[None], spec) for image in images]
    if not rows:
        raise PreprocessError("model_input got no images")
    return torch.cat(rows)


# ------------------------------------------------------------------------------------------------ aggregation


def aggregate_views(rows: npt.NDArray[np.floating], spec: PreprocessSpec, positive_index: int = 1) -> FloatArray:
    """Per-view rows (N * V, K) (logits or log-probabilities, image-major) -> one row of log-probabilities per
    image (N, K); without views the rows are returned unchanged (as float64).

    `positive_index` (binary only; ignored for K > 2) is the positive class: 1 when the task names none, as the
    logits artifact's meta (visionpipe/data/logits.py) reads it."""
    values = np.asarray(rows, dtype=np.float64)
    views = spec.views
    if views is None:
        return values
    if values.ndim != 2 or values.shape[0] % views.count:
        raise PreprocessError(
            f"view rows of shape {values.shape} do not hold {views.count} views per image ({views.signature})"
        )
    return pool_views(_log_softmax(values.reshape(-1, views.count, values.shape[1])), views, positive_index)


def pool_views(per_view: FloatArray, views: ViewsSpec, positive_index: int = 1) -> FloatArray:
    """Per-view log-probabilities (N, V, K) -> the aggregated log-probabilities (N, K) under `views`' aggregation
    (the second half of `aggregate_views`; supervised_train's choice on val_select pools cached per-view rows
    through it, so every candidate is scored by the code that serves it)."""
    k_classes = per_view.shape[2]
    if k_classes == 2:
        if positive_index not in (0, 1):
            raise PreprocessError(f"positive_index={positive_index} must be 0 or 1 for a binary task")
        p = positive_index
        margin = _pool(per_view[..., p] - per_view[..., 1 - p], views)  # (N,) positive log-odds
        out = np.empty((margin.shape[0], 2), dtype=np.float64)
        out[:, p] = -np.logaddexp(0.0, -margin)  # log sigmoid(m)
        out[:, 1 - p] = -np.logaddexp(0.0, margin)  # log sigmoid(-m)
        return out
    return _log_softmax(_pool(per_view, views))


def _pool(values: FloatArray, views: ViewsSpec) -> FloatArray:
    """Pool over axis 1 (the views): max, mean of the k largest, mean, or the learned convex mix."""
    if views.aggregate == "max":
        return np.asarray(values.max(axis=1), dtype=np.float64)
    if views.aggregate == "mean":
        return np.asarray(values.mean(axis=1), dtype=np.float64)
    if views.aggregate == "learned":
        weights = np.asarray(views.weights, dtype=np.float64)
        weights = weights / weights.sum()  # exactly convex after rounding (ViewsSpec: sums to 1 within 1e-3)
        return np.asarray(np.einsum("nv...,v->n...", values, weights), dtype=np.float64)
    top = np.sort(values, axis=1)[:, values.shape[1] - views.k :]
    return np.asarray(top.mean(axis=1), dtype=np.float64)


def _log_softmax(values: FloatArray) -> FloatArray:
    shifted = values - values.max(axis=-1, keepdims=True)
    return np.asarray(shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True)), dtype=np.float64)


# ------------------------------------------------------------------------------------------------ evaluation


def predict_rows(
    rows_fn: RowsFn,
    images: UInt8Images,
    spec: PreprocessSpec,
    positive_index: int = 1,
    batch_size: int = 256,
) -> FloatArray:
    """One float64 row per image: `rows_fn` over the model input of chunks of images, views aggregated.

    Each chunk of images is ONE forward pass of (images * views) rows, at most about `batch_size` rows (at least
    one image). Without views the rows are `rows_fn`'s own (e.g. raw logits); with views they are aggregated
    log-probabilities (`aggregate_views`). The answer does not depend on the chunking (up to float rounding of
    batched kernels)."""
    step = max(1, batch_size // views_per_image(spec))
    parts = [
        aggregate_views(rows_fn(model_input(images[start : start + step], spec)), spec, positive_index)
        for start in range(0, len(images), step)
    ]
    if not parts:
        raise PreprocessError("predict_rows got no images")
    return np.concatenate(parts)


def view_log_probs(rows_fn: RowsFn, images: UInt8Images, spec: PreprocessSpec, batch_size: int = 256) -> FloatArray:
    """Per-view log-probabilities (N, V, K) of `images` under `spec`'s views (its aggregation unused): the same
    chunks and model input as `predict_rows`, one forward pass of (images * views) rows per chunk, before
    pooling. `pool_views` of the result is `predict_rows`' answer (up to float rounding)."""
    if spec.views is None:
        raise PreprocessError("view_log_probs needs a preprocessing spec with views")
    count = spec.views.count
    step = max(1, batch_size // count)
    parts = []
    for start in range(0, len(images), step):
        rows = np.asarray(rows_fn(model_input(images[start : start + step], spec)), dtype=np.float64)
        parts.append(_log_softmax(rows.reshape(-1, count, rows.shape[1])))
    if not parts:
        raise PreprocessError("view_log_probs got no images")
    return np.concatenate(parts)


def evaluate_views(
    model: Callable[[torch.Tensor], torch.Tensor],
    spec: PreprocessSpec,
    images: UInt8Images,
    positive_index: int = 1,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> FloatArray:
    """Logits (N, K) of a model (a torch module in eval mode, or any tensor -> tensor function) over uint8 images
    at their original resolution, under `spec`: raw logits without views, aggregated log-probabilities with
    (softmax either to get probabilities). For benches (bench/roadwork.py, bench/views.py): pass
    ``dataclasses.replace(spec, views=None)`` for the global view alone and ``replace(spec, views=ViewsSpec(...))``
    for multi-view, same model, same images."""
    if device is None and isinstance(model, torch.nn.Module):
        device = next(iter(model.parameters()), torch.empty(0)).device
    dev = torch.device(device or "cpu")

    def rows_fn(x: torch.Tensor) -> npt.NDArray[np.floating]:
        with torch.no_grad():
            return np.asarray(model(x.to(dev)).float().cpu().numpy())

    return predict_rows(rows_fn, images, spec, positive_index, batch_size)
