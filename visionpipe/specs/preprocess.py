"""The preprocessing spec, torch-free: what a bundle stores and the signature training and serving must share.

The tensor code that applies it is visionpipe/serving/preprocessing.py (`to_model_input`) and, for the optional
multi-view inference (`ViewsSpec`: a global view plus a grid of overlapping tiles, aggregated to one answer per
image), visionpipe/serving/views.py.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from visionpipe.specs.checks import SpecError

PREPROCESS_VERSION = "v1"
KINDS: tuple[str, ...] = ("standard", "digit-upload")
# Test-time augmentation modes a server applies on top of the preprocessing (visionpipe/serving/tta.py).
TTA_MODES: tuple[str, ...] = ("off", "5", "17")
# How the views' answers become one answer per image (visionpipe/serving/views.py, `aggregate_views`).
AGGREGATIONS: tuple[str, ...] = ("max", "topk_mean", "mean", "learned")
# A recipe may also ask supervised_train to choose the aggregation on val_select (`ViewsChoice`); never in a bundle.
AUTO = "auto"
RECIPE_AGGREGATIONS: tuple[str, ...] = (*AGGREGATIONS, AUTO)
AUTO_TOPK = 3  # the k of the topk_mean candidate `auto` weighs, unless the recipe gives k
GRID_RANGE = (2, 6)  # tiles per side
MAX_OVERLAP = 0.5  # overlap is a fraction of the tile side, in [0, MAX_OVERLAP)
WEIGHT_DECIMALS = 6  # learned weights are stored rounded, so the spec and its signature are stable
WEIGHT_SUM_TOLERANCE = 1e-3  # learned weights must sum to 1 within this (a convex mix)


class PreprocessError(SpecError):
    """A preprocessing spec is invalid, or an input does not fit it."""


@dataclass(frozen=True)
class ViewsSpec:
    """Multi-view inference: the global view (the whole image resized, as without views) plus ``grid`` x ``grid``
    tiles cut from the ORIGINAL image, each resized to the model input size, run as one batched forward pass and
    aggregated to one row of log-probabilities per image (visionpipe/serving/views.py).

    overlap: the fraction of a tile's side it shares with its neighbour, in [0, 0.5); the tiles then cover the
    image exactly: tile side = 1 / (grid - (grid - 1) * overlap) of the image side.
    aggregate: ``max`` (binary: the largest positive log-odds of any view, so P(positive) is the largest view's;
    multiclass: each class's largest log-probability, renormalised), ``topk_mean`` (the mean of the ``k`` largest
    instead; k = 1 is max, k = every view is mean), ``mean`` (the mean over views) or ``learned`` (the weighted
    mean sum_v weights[v] * s_v of the same per-view scores, a convex mix fitted on val_select by supervised_train;
    uniform weights are ``mean``). k: only for topk_mean, 1..1 + grid * grid. weights: only for learned, one per
    view (the global view first, then the tiles row by row), finite, >= 0, summing to 1; stored rounded to
    WEIGHT_DECIMALS decimals.
    """

    grid: int = 3
    overlap: float = 0.25
    aggregate: str = "max"
    k: int = 0
    weights: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        low, high = GRID_RANGE
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or not low <= self.grid <= high:
            raise PreprocessError(
                f"preprocess.views.grid={self.grid!r} is not allowed; allowed values: an integer in [{low}, {high}] "
                "(tiles per side; 3 = a 3x3 grid)"
            )
        if not (isinstance(self.overlap, int | float) and math.isfinite(self.overlap)) or not (
            0 <= self.overlap < MAX_OVERLAP
        ):
            raise PreprocessError(
                f"preprocess.views.overlap={self.overlap!r} is out of range; allowed values: [0, {MAX_OVERLAP:g}) "
                "(the fraction of a tile's side shared with its neighbour)"
            )
        if self.aggregate not in AGGREGATIONS:
            hint = (
                " ('auto' is a recipe setting: supervised_train resolves it on val_select to one of these)"
                if self.aggregate == AUTO
                else ""
            )
            raise PreprocessError(
                f"preprocess.views.aggregate={self.aggregate!r} is not allowed; allowed values: "
                f"{', '.join(AGGREGATIONS)}{hint}"
            )
        if self.aggregate == "topk_mean":
            if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= self.count:
                raise PreprocessError(
                    f"preprocess.views.k={self.k!r} is out of range for topk_mean; allowed values: an integer in "
                    f"[1, {self.count}] (the global view + {self.grid}x{self.grid} tiles)"
                )
        elif self.k != 0:
            raise PreprocessError(
                f"preprocess.views.k={self.k!r} applies only to aggregate='topk_mean'; "
                f"remove k or set aggregate to topk_mean (aggregate is {self.aggregate!r})"
            )
        object.__setattr__(self, "weights", self._checked_weights())

    def _checked_weights(self) -> tuple[float, ...]:
        weights = self.weights
        if not isinstance(weights, tuple | list):
            raise PreprocessError(
                f"preprocess.views.weights={weights!r} must be a list of {self.count} numbers (aggregate='learned')"
            )
        if self.aggregate != "learned":
            if weights:
                raise PreprocessError(
                    f"preprocess.views.weights={list(weights)!r} applies only to aggregate='learned'; remove "
                    f"weights or set aggregate to learned (aggregate is {self.aggregate!r})"
                )
            return ()
        if len(weights) != self.count:
            raise PreprocessError(
                f"preprocess.views.weights has {len(weights)} values; aggregate='learned' needs {self.count} "
                f"(one per view: the global view, then the {self.grid}x{self.grid} tiles row by row), each >= 0, "
                "summing to 1; a recipe that leaves weights out has supervised_train fit them on val_select"
            )
        for i, w in enumerate(weights):
            if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
                raise PreprocessError(
                    f"preprocess.views.weights[{i}]={w!r} is not allowed; allowed values: finite numbers >= 0 "
                    "(the weights are a convex mix of the views: non-negative, summing to 1)"
                )
        rounded = tuple(round(float(w), WEIGHT_DECIMALS) + 0.0 for w in weights)  # + 0.0: no -0.0
        total = math.fsum(rounded)
        if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
            raise PreprocessError(
                f"preprocess.views.weights sum to {total:.6g}; they must sum to 1 (within "
                f"{WEIGHT_SUM_TOLERANCE:g}: a convex mix of the views)"
            )
        return rounded

    @property
    def count(self) -> int:
        """Views per image: the global view + grid * grid tiles."""
        return 1 + self.grid * self.grid

    @property
    def tile_fraction(self) -> float:
        """A tile's side as a fraction of the image side."""
        return 1.0 / (self.grid - (self.grid - 1) * self.overlap)

    @property
    def weights_digest(self) -> str:
        """12 hex digits of sha256 over the rounded weights ('' unless learned): names them in the signature."""
        if self.aggregate != "learned":
            return ""
        text = ",".join(f"{w:.{WEIGHT_DECIMALS}f}" for w in self.weights)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def signature(self) -> str:
        if self.aggregate == "topk_mean":
            how = f"top{self.k}mean"
        elif self.aggregate == "learned":
            how = f"learned:{self.weights_digest}"
        else:
            how = self.aggregate
        return f"views(global+tiles{self.grid}x{self.grid},overlap{self.overlap:g},{how})"

    def required_side(self, size: int) -> int:
        """The smallest source side (pixels) whose tiles hold at least `size` pixels per side, so no tile is
        upsampled: ceil(size / tile_fraction). A Dataset stored smaller (data_fetch `image_size`) gives tiles
        upsampled from fewer pixels than a full-size upload has."""
        return math.ceil(size / self.tile_fraction - 1e-9)

    def to_dict(self) -> dict[str, object]:
        payload: dict[str, object] = {"grid": self.grid, "overlap": self.overlap, "aggregate": self.aggregate}
        if self.aggregate == "topk_mean":
            payload["k"] = self.k
        if self.aggregate == "learned":
            payload["weights"] = list(self.weights)
        return payload

    @classmethod
    def from_dict(cls, payload: object) -> ViewsSpec:
        if not isinstance(payload, dict):
            raise PreprocessError(
                f"preprocess.views={payload!r} must be a mapping with grid, overlap, aggregate (and k for "
                "topk_mean, weights for learned), or null for no views"
            )
        known = {"grid", "overlap", "aggregate", "k", "weights"}
        unknown = set(payload) - known
        if unknown:
            raise PreprocessError(f"unknown preprocess.views fields {sorted(unknown)}; allowed: {sorted(known)}")
        grid = _integer(payload, "grid", 3, f"an integer in [{GRID_RANGE[0]}, {GRID_RANGE[1]}]")
        k = _integer(payload, "k", 0, "an integer in [1, 1 + grid * grid] (topk_mean only)")
        overlap = payload.get("overlap", 0.25)
        if isinstance(overlap, bool) or not isinstance(overlap, int | float):
            raise PreprocessError(
                f"preprocess.views.overlap={overlap!r} must be a number in [0, {MAX_OVERLAP:g}), "
                f"not {type(overlap).__name__}"
            )
        aggregate = payload.get("aggregate", "max")
        if not isinstance(aggregate, str):
            raise PreprocessError(
                f"preprocess.views.aggregate={aggregate!r} is not allowed; allowed values: {', '.join(AGGREGATIONS)}"
            )
        weights = payload.get("weights", [])
        if not isinstance(weights, list | tuple):
            raise PreprocessError(
                f"preprocess.views.weights={weights!r} must be a list of 1 + grid * grid numbers (learned only)"
            )
        return cls(grid=grid, overlap=float(overlap), aggregate=aggregate, k=k, weights=tuple(weights))


@dataclass(frozen=True)
class ViewsChoice:
    """``preprocess.views`` as a RECIPE writes it: the fields of a `ViewsSpec`, plus two settings that
    supervised_train resolves on val_select after choosing the epoch (never stored in a bundle):

    - ``aggregate: learned`` without ``weights``: the weights are fitted on val_select;
    - ``aggregate: auto``: the aggregation is chosen on val_select among the global view alone (views off),
      ``mean``, ``max``, ``topk_mean`` (k = ``k``, default AUTO_TOPK) and ``learned``
      (visionpipe/phases/supervised_train.py, `choose_views`).

    Anything else is a concrete spec already (`fixed`)."""

    grid: int = 3
    overlap: float = 0.25
    aggregate: str = "max"
    k: int = 0
    weights: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.aggregate, str) or self.aggregate not in RECIPE_AGGREGATIONS:
            raise PreprocessError(
                f"preprocess.views.aggregate={self.aggregate!r} is not allowed; allowed values: "
                f"{', '.join(RECIPE_AGGREGATIONS)} (auto: chosen on val_select by supervised_train)"
            )
        if not self.pending:
            self.fixed  # noqa: B018 (builds the ViewsSpec: its own messages)
            return
        geometry = self.geometry  # grid / overlap messages
        if self.weights:
            raise PreprocessError(
                f"preprocess.views.weights={list(self.weights)!r} applies only to aggregate='learned'; with "
                "aggregate='auto' supervised_train fits them if it chooses learned; remove weights"
            )
        if self.aggregate == AUTO:
            if self.k != 0 and (
                isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= geometry.count
            ):
                raise PreprocessError(
                    f"preprocess.views.k={self.k!r} is out of range for auto's topk_mean candidate; allowed "
                    f"values: an integer in [1, {geometry.count}], or leave it out (k = {AUTO_TOPK})"
                )
        elif self.k != 0:
            raise PreprocessError(
                f"preprocess.views.k={self.k!r} applies only to aggregate='topk_mean' (or auto's topk_mean "
                f"candidate); remove k (aggregate is {self.aggregate!r})"
            )

    @property
    def pending(self) -> bool:
        """True when supervised_train must resolve it on val_select (auto, or learned without weights)."""
        return self.aggregate == AUTO or (self.aggregate == "learned" and not self.weights)

    @property
    def fixed(self) -> ViewsSpec | None:
        """The concrete spec, or None while `pending`."""
        if self.pending:
            return None
        return ViewsSpec(self.grid, self.overlap, self.aggregate, self.k, tuple(self.weights))

    @property
    def geometry(self) -> ViewsSpec:
        """The views (grid, overlap) with the aggregation left to choose: the tiles to compute per-view scores."""
        return ViewsSpec(self.grid, self.overlap, "mean")

    @property
    def topk(self) -> int:
        """k of auto's topk_mean candidate."""
        return self.k or min(AUTO_TOPK, self.geometry.count)


def _integer(payload: dict[object, object], name: str, default: int, allowed: str) -> int:
    value = payload.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise PreprocessError(
            f"preprocess.views.{name}={value!r} is a {type(value).__name__}; allowed values: {allowed}"
        )
    return value


@dataclass(frozen=True)
class PreprocessSpec:
    """How raw uint8 images become model input.

    kind: ``standard`` (channel conversion, resize, normalise) or ``digit-upload`` (photos of handwritten
    digits are normalised to MNIST style first when served; see visionpipe/serving/upload.py).
    channels: model input channels (1 grey, 3 RGB). size: model input side in pixels (square).
    mean / std: per-channel normalisation after scaling pixels to [0, 1].
    views: None (one view: the whole image resized; every bundle before multi-view) or a `ViewsSpec`.
    """

    kind: str = "standard"
    channels: int = 1
    size: int = 28
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    views: ViewsSpec | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PreprocessError(f"preprocess.kind={self.kind!r} is not one of {', '.join(KINDS)}")
        if self.channels not in (1, 3):
            raise PreprocessError(f"preprocess.channels={self.channels} must be 1 (grey) or 3 (RGB)")
        if not 4 <= self.size <= 1024:
            raise PreprocessError(f"preprocess.size={self.size} must be between 4 and 1024 pixels")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != self.channels:
                raise PreprocessError(
                    f"preprocess.{name} has {len(values)} values; it needs one per channel ({self.channels})"
                )
        if any(s <= 0 for s in self.std):
            raise PreprocessError(f"preprocess.std={self.std} must be positive")
        if self.views is not None and not isinstance(self.views, ViewsSpec):
            raise PreprocessError(f"preprocess.views={self.views!r} must be a ViewsSpec or None")
        if self.views is not None and self.kind == "digit-upload":
            raise PreprocessError(
                "preprocess.views is set but kind='digit-upload' normalises every image to one centred digit; "
                "views need kind='standard' (or remove views)"
            )

    @property
    def signature(self) -> str:
        """A stable string naming every step; training and serving must agree on it."""
        colour = "grayscale" if self.channels == 1 else "rgb"
        steps = [
            colour,
            f"resize{self.size}",
            "norm(" + ";".join(f"{m:g},{s:g}" for m, s in zip(self.mean, self.std, strict=True)) + ")",
        ]
        if self.kind == "digit-upload":
            steps.insert(0, "digitupload")
        if self.views is not None:  # absent without views: the signature of every earlier bundle is unchanged
            steps.append(self.views.signature)
        return f"{PREPROCESS_VERSION}/" + "+".join(steps)

    def to_dict(self) -> dict[str, object]:
        payload: dict[str, object] = {
            "kind": self.kind,
            "channels": self.channels,
            "size": self.size,
            "mean": list(self.mean),
            "std": list(self.std),
        }
        if self.views is not None:  # no key without views, so earlier bundles' specs read back equal
            payload["views"] = self.views.to_dict()
        return payload

    @classmethod
    def from_dict(cls, payload: dict[str, object]) -> PreprocessSpec:
        known = {"kind", "channels", "size", "mean", "std", "views"}
        unknown = set(payload) - known
        if unknown:
            raise PreprocessError(f"unknown preprocess fields {sorted(unknown)}; allowed: {sorted(known)}")
        raw_views = payload.get("views")
        views = None if raw_views is None else ViewsSpec.from_dict(raw_views)  # its own messages, unwrapped
        try:
            mean = payload.get("mean", [0.5])
            std = payload.get("std", [0.5])
            assert isinstance(mean, list | tuple) and isinstance(std, list | tuple)
            return cls(
                kind=str(payload.get("kind", "standard")),
                channels=int(str(payload.get("channels", 1))),
                size=int(str(payload.get("size", 28))),
                mean=tuple(float(m) for m in mean),
                std=tuple(float(s) for s in std),
                views=views,
            )
        except (AssertionError, ValueError) as exc:
            raise PreprocessError(f"invalid preprocess spec {payload}: {exc}") from exc
