"""Drift monitoring: a reference of what the served bundle saw on val_test, and a sliding-window monitor.

**The reference** (`REFERENCE_FILE`, inside every bundle, listed, hashed and signed by bundle.json like every other
file) is built by the bundle-validation phase from val_test (the split that only evaluates; never from a split
that fits, selects or calibrates, and never from mnist-test-dev), with what the SERVED bundle answers:

- ``confidence``: the calibrated max probability (rounded to 6 decimals, as the v1 answer's records are);
- ``score`` (binary bundles only): the calibrated probability of the positive class;
- ``predicted_class``: the policy's decision, abstain (-1) included;
- input statistics of the uint8 image exactly as the server decodes a request (visionpipe/serving/predictor.py
  `image_to_array`): ``input_mean``, ``input_std``, ``input_dark`` (fraction of pixels below 64),
  ``input_bright`` (fraction at or above 192), on the grey level (mean over channels) scaled to [0, 1];
- ``embedding``: a model-free low-dimensional embedding, the image's grey level box-downsampled to 8x8, centred and
  scaled by the reference's mean / spread, times a seeded Gaussian random projection to `EMBED_DIMS` dimensions
  (the projection matrix itself is stored, so the monitor computes the very same embedding). alibi-detect
  recommends exactly this kind of preprocessing before MMD on images: "Untrained AutoEncoders (UAE)" and random
  projections reduce the dimension without a trained model (its MMDDrift docs, docs.seldon.ai/alibi-detect/cd/
  methods/offline/mmddrift, after "Failing Loudly", Rabanser et al. 2019).

At most `MAX_REFERENCE` images (a seeded subsample beyond that), which keeps the file under ~300 KB.

**The monitor** (`DriftMonitor`) keeps the last `window` observations of each feature (bounded deques) and, on
`report()`, compares them with the reference:

- ``ks``: the two-sample Kolmogorov-Smirnov statistic (sup of the ECDF difference; equal to scipy's
  ``ks_2samp(...).statistic``) on each scalar feature;
- ``psi``: the population stability index, sum (p_live - p_ref) ln(p_live / p_ref), on 10 bins cut at the
  reference's deciles (ties merged), proportions floored at `PSI_FLOOR`; for ``predicted_class`` the bins are the
  classes plus abstain;
- ``mmd``: the unbiased squared maximum mean discrepancy on the embedding, RBF kernel exp(-d^2 / (2 sigma^2)) with
  the median heuristic sigma^2 = median(d^2) / 2 over the reference's pairs (alibi-detect's `sigma_median`,
  alibi_detect/utils/pytorch/kernels.py).

**Thresholds are not hand-picked.** The reference is split once (seeded) into a comparison half A and a null pool
B. The live window is compared with A. Each statistic's null distribution at the monitor's window size is the
statistic of A against `n_null` bootstrap windows drawn from B (with replacement; in the MMD the pairs of one
pool point with itself are left out), so the windows are independent of A and the null is not optimistic (drawing
windows from A itself would compare A with part of itself). With T statistics, each threshold is the
(1 - false_alarm_rate / T) quantile of its null (Bonferroni): a full in-distribution window raises any alarm with
probability about false_alarm_rate or less. An alarm needs a full window (`window` observations of that feature).

Where this differs from alibi-detect (the anchor; not a dependency): its KSDrift (alibi_detect/cd/ks.py) uses
scipy's asymptotic KS p-values per feature with a Bonferroni (or FDR) correction over the features of one batch;
its MMDDrift (alibi_detect/cd/mmd.py) runs a permutation test per batch (n_permutations=100 by default), i.e. the
null is recomputed for every batch and compares the batch with the whole reference. Here the null is computed
once per monitor from held-apart reference data, so report() is cheap and the thresholds hold for every window
of that size; with a small reference (fewer than ~2 windows in each half) the bootstrap null is wider than the
true one and the monitor errs towards fewer alarms.

This module imports neither torch nor kserve; reading request bodies imports the predictor's decoding lazily.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt
from PIL import Image

from visionpipe.monitoring.answers import AnswerError, read_answers
from visionpipe.specs import PreprocessError, PreprocessSpec

if TYPE_CHECKING:
    from visionpipe.serving.predictor import VisionPredictor

REFERENCE_FILE = "drift_reference.json"
FORMAT = "visionpipe-drift-reference/v1"
MAX_REFERENCE = 2000
EMBED_GRID = 8
EMBED_DIMS = 8
DARK_BELOW = 64  # uint8 grey level: a pixel below this is "dark"
BRIGHT_FROM = 192  # a pixel at or above this is "bright"
PSI_BINS = 10
PSI_FLOOR = 1e-4
ABSTAIN = -1
INPUT_FEATURES: tuple[str, ...] = ("input_mean", "input_std", "input_dark", "input_bright")
_DECIMALS = {"confidence": 6, "score": 6, **{f: 5 for f in INPUT_FEATURES}}
_EMBED_DECIMALS = 4

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
UInt8Array = npt.NDArray[np.uint8]


class DriftError(ValueError):
    """A drift reference is missing or invalid, or a logged request / response cannot be read."""


@dataclass(frozen=True)
class DriftStat:
    feature: str  # "confidence", "score", "predicted_class", "input_mean", ..., "embedding"
    test: str  # "psi" | "ks" | "mmd"
    value: float
    threshold: float  # from the bootstrap null, at the monitor's window size
    alarm: bool  # value > threshold and the window is full
    window: int  # observations of this feature in the current window


# ------------------------------------------------------------------------------------------------ features


def image_stats(images: Sequence[UInt8Array]) -> dict[str, FloatArray]:
    """Per-image input statistics of uint8 HxWxC (or HxW) images, rounded as the reference stores them."""
    out: dict[str, list[float]] = {f: [] for f in INPUT_FEATURES}
    for image in images:
        grey = _grey(image)
        out["input_mean"].append(float(grey.mean()) / 255.0)
        out["input_std"].append(float(grey.std()) / 255.0)
        out["input_dark"].append(float((grey < DARK_BELOW).mean()))
        out["input_bright"].append(float((grey >= BRIGHT_FROM).mean()))
    return {
        f: np.asarray(np.round(np.asarray(v, dtype=np.float64), _DECIMALS[f]), dtype=np.float64) for f, v in out.items()
    }


def downsampled(images: Sequence[UInt8Array]) -> FloatArray:
    """(N, EMBED_GRID**2): each image's grey level in [0, 1], box-averaged to EMBED_GRID x EMBED_GRID."""
    rows = []
    for image in images:
        grey = Image.fromarray(_grey(image).astype(np.float32) / 255.0, mode="F")
        small = grey.resize((EMBED_GRID, EMBED_GRID), Image.Resampling.BOX)
        rows.append(np.asarray(small, dtype=np.float64).reshape(-1))
    return np.stack(rows) if rows else np.zeros((0, EMBED_GRID * EMBED_GRID))


def output_features(
    calibrated: FloatArray, labels: IntArray, positive_index: int | None
) -> tuple[FloatArray, FloatArray | None, IntArray]:
    """(confidence, score or None, predicted class) of calibrated probabilities and decisions, rounded."""
    probs = np.asarray(calibrated, dtype=np.float64)
    confidence = np.round(probs.max(axis=1), _DECIMALS["confidence"]) if len(probs) else np.zeros(0)
    score = None if positive_index is None else np.round(probs[:, positive_index], _DECIMALS["score"])
    return confidence, score, np.asarray(labels, dtype=np.int64)


def _grey(image: UInt8Array) -> npt.NDArray[np.float64]:
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise DriftError(f"images must be uint8, got {array.dtype}")
    if array.ndim == 3:
        return np.asarray(array.mean(axis=2), dtype=np.float64)
    if array.ndim == 2:
        return np.asarray(array, dtype=np.float64)
    raise DriftError(f"an image must be HxW or HxWxC, got shape {array.shape}")


# ----------------------------------------------------------------------------------------------- reference


@dataclass(frozen=True)
class DriftReference:
    """What the served bundle saw on val_test (see the module docstring); `to_json` / `from_json`."""

    classes: tuple[str, ...]
    positive_class: str | None
    preprocessing: dict[str, object]  # the bundle's PreprocessSpec.to_dict(): how requests are decoded
    bundle_version: str
    source: str  # the split it was built from
    seed: int
    confidence: FloatArray
    score: FloatArray | None
    predicted: IntArray
    inputs: dict[str, FloatArray]
    embedding: FloatArray  # (n, EMBED_DIMS)
    embed_center: FloatArray  # (EMBED_GRID**2,)
    embed_scale: float
    projection: FloatArray  # (EMBED_GRID**2, EMBED_DIMS)

    @property
    def size(self) -> int:
        return len(self.confidence)

    @property
    def spec(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(dict(self.preprocessing))

    def embed(self, small: FloatArray) -> FloatArray:
        """Downsampled images (`downsampled`) -> embedding vectors, as stored in the reference."""
        z = (np.asarray(small, dtype=np.float64) - self.embed_center) / self.embed_scale
        return np.round(z @ self.projection, _EMBED_DECIMALS)

    def to_json(self) -> str:
        payload: dict[str, object] = {
            "format": FORMAT,
            "source": self.source,
            "size": self.size,
            "seed": self.seed,
            "bundle_version": self.bundle_version,
            "classes": list(self.classes),
            "positive_class": self.positive_class,
            "preprocessing": self.preprocessing,
            "thresholds": {"dark_below": DARK_BELOW, "bright_from": BRIGHT_FROM},
            "confidence": self.confidence.tolist(),
            "score": None if self.score is None else self.score.tolist(),
            "predicted_class": self.predicted.tolist(),
            "inputs": {k: v.tolist() for k, v in self.inputs.items()},
            "embedding": {
                "grid": EMBED_GRID,
                "dims": int(self.projection.shape[1]),
                "center": np.round(self.embed_center, 6).tolist(),
                "scale": round(self.embed_scale, 8),
                "projection": np.round(self.projection, 8).tolist(),
                "sample": self.embedding.tolist(),
            },
        }
        return json.dumps(payload, separators=(",", ":"), sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> DriftReference:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise DriftError(f"{REFERENCE_FILE}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise DriftError(f"{REFERENCE_FILE}: expected a JSON object")
        if data.get("format") != FORMAT:
            raise DriftError(f"{REFERENCE_FILE}: format {data.get('format')!r} is not supported (expected {FORMAT!r})")
        try:
            classes = tuple(str(c) for c in _list(data, "classes"))
            positive = data.get("positive_class")
            n = int(_number(data, "size", integer=True))
            embedding = _dict(data, "embedding")
            grid, dims = int(_number(embedding, "grid", True)), int(_number(embedding, "dims", True))
            ref = cls(
                classes=classes,
                positive_class=None if positive is None else str(positive),
                preprocessing=_dict(data, "preprocessing"),
                bundle_version=str(data.get("bundle_version", "")),
                source=str(data.get("source", "")),
                seed=int(_number(data, "seed", integer=True)),
                confidence=_floats(data.get("confidence"), (n,), "confidence"),
                score=None if data.get("score") is None else _floats(data["score"], (n,), "score"),
                predicted=np.asarray(_floats(data.get("predicted_class"), (n,), "predicted_class"), dtype=np.int64),
                inputs={f: _floats(_dict(data, "inputs").get(f), (n,), f"inputs.{f}") for f in INPUT_FEATURES},
                embedding=_floats(embedding.get("sample"), (n, dims), "embedding.sample"),
                embed_center=_floats(embedding.get("center"), (grid * grid,), "embedding.center"),
                embed_scale=_number(embedding, "scale"),
                projection=_floats(embedding.get("projection"), (grid * grid, dims), "embedding.projection"),
            )
        except (TypeError, ValueError) as exc:
            if isinstance(exc, DriftError):
                raise
            raise DriftError(f"{REFERENCE_FILE}: invalid field ({exc})") from exc
        if grid != EMBED_GRID:
            raise DriftError(f"{REFERENCE_FILE}: embedding grid {grid}; this runtime computes {EMBED_GRID}")
        if n < 4:
            raise DriftError(f"{REFERENCE_FILE}: {n} reference images; at least 4 are needed")
        if ref.embed_scale <= 0:
            raise DriftError(f"{REFERENCE_FILE}: embedding.scale={ref.embed_scale} must be > 0")
        if ref.positive_class is not None and ref.positive_class not in classes:
            raise DriftError(f"{REFERENCE_FILE}: positive_class {ref.positive_class!r} is not one of {classes}")
        if (ref.positive_class is None) != (ref.score is None):
            raise DriftError(f"{REFERENCE_FILE}: a score sample is stored exactly when there is a positive class")
        bad = ref.predicted[(ref.predicted < ABSTAIN) | (ref.predicted >= len(classes))]
        if len(bad):
            raise DriftError(f"{REFERENCE_FILE}: predicted_class holds {int(bad[0])}; allowed -1..{len(classes) - 1}")
        try:
            ref.spec  # noqa: B018 - validates the stored preprocessing
        except (PreprocessError, TypeError, ValueError) as exc:
            raise DriftError(f"{REFERENCE_FILE}: preprocessing: {exc}") from exc
        return ref


def build_reference(
    images: UInt8Array,
    calibrated: FloatArray,
    labels: IntArray,
    *,
    classes: Sequence[str],
    positive_class: str | None,
    preprocessing: PreprocessSpec,
    bundle_version: str,
    source: str = "val_test",
    seed: int = 0,
    max_size: int = MAX_REFERENCE,
    dims: int = EMBED_DIMS,
) -> DriftReference:
    """The reference of val_test `images` (uint8 NHWC, as decoded from requests) and what the served bundle answered
    for them (`calibrated` probabilities, `labels` = decisions, -1 = abstain); a seeded subsample of `max_size`."""
    n = len(images)
    if n < 4:
        raise DriftError(f"{n} images for the drift reference; at least 4 are needed")
    if len(calibrated) != n or len(labels) != n:
        raise DriftError(f"{n} images but {len(calibrated)} probability rows and {len(labels)} decisions")
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(n, size=max_size, replace=False)) if n > max_size else np.arange(n)
    imgs = [np.asarray(images[i]) for i in keep]
    positive_index = None if positive_class is None else list(classes).index(positive_class)
    confidence, score, predicted = output_features(
        np.asarray(calibrated)[keep], np.asarray(labels)[keep], positive_index
    )
    small = downsampled(imgs)
    center = small.mean(axis=0)
    scale = float((small - center).std()) or 1.0
    projection = rng.standard_normal((EMBED_GRID * EMBED_GRID, dims)) / math.sqrt(dims)
    ref = DriftReference(
        classes=tuple(classes),
        positive_class=positive_class,
        preprocessing=preprocessing.to_dict(),
        bundle_version=bundle_version,
        source=source,
        seed=seed,
        confidence=confidence,
        score=score,
        predicted=predicted,
        inputs=image_stats(imgs),
        embedding=np.zeros((0, dims)),
        embed_center=np.round(center, 6),
        embed_scale=round(scale, 8),
        projection=np.round(projection, 8),
    )
    # round-tripped: the in-memory reference is exactly what a reader of the file gets
    return DriftReference.from_json(dataclasses.replace(ref, embedding=ref.embed(small)).to_json())


def load_reference(bundle_dir: Path, *, verify: bool = True, allow_unsigned: bool = False) -> DriftReference:
    """The drift reference of a local bundle folder; DriftError when it is missing, unlisted or invalid.

    verify: read the bundle through `visionpipe.serving.bundle.read_bundle` first (signature, every file's
    sha256), so a tampered reference is refused like any other tampered file (the check's reason is named)."""
    root = Path(bundle_dir)
    path = root / REFERENCE_FILE
    if verify:
        from visionpipe.serving.bundle import BundleError, read_bundle

        try:
            bundle = read_bundle(root, allow_unsigned=allow_unsigned)
        except BundleError as exc:
            raise DriftError(f"{root}: the bundle does not verify: [{exc.reason}] {exc}") from exc
        files = bundle.manifest.get("files")
        if not isinstance(files, dict) or REFERENCE_FILE not in files:
            raise DriftError(
                f"{root}: the bundle lists no {REFERENCE_FILE} (built before drift references existed?); "
                "rebuild it with bundle_validation to monitor drift"
            )
    if not path.is_file():
        raise DriftError(f"{root}: no {REFERENCE_FILE}; rebuild the bundle with bundle_validation to monitor drift")
    return DriftReference.from_json(path.read_text(encoding="utf-8"))


def _dict(data: Mapping[str, object], name: str) -> dict[str, object]:
    value = data.get(name)
    if not isinstance(value, dict):
        raise DriftError(f"{REFERENCE_FILE}: field {name!r} must be an object, got {value!r:.60}")
    return value


def _list(data: Mapping[str, object], name: str) -> list[object]:
    value = data.get(name)
    if not isinstance(value, list):
        raise DriftError(f"{REFERENCE_FILE}: field {name!r} must be a list, got {value!r:.60}")
    return value


def _number(data: Mapping[str, object], name: str, integer: bool = False) -> float:
    value = data.get(name)
    kinds = (int,) if integer else (int, float)
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise DriftError(
            f"{REFERENCE_FILE}: field {name!r} must be {'an integer' if integer else 'a number'}, got {value!r:.60}"
        )
    return float(value)


def _floats(value: object, shape: tuple[int, ...], where: str) -> FloatArray:
    if not isinstance(value, list):
        raise DriftError(f"{REFERENCE_FILE}: {where} must be a list")
    array = np.asarray(value, dtype=np.float64)
    if array.shape != shape:
        raise DriftError(f"{REFERENCE_FILE}: {where} has shape {array.shape}, expected {shape}")
    if not np.isfinite(array).all():
        raise DriftError(f"{REFERENCE_FILE}: {where} holds NaN or infinite values")
    return array


# ---------------------------------------------------------------------------------------------- statistics


def ks_statistic(reference: FloatArray, live: FloatArray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: max |F_ref(x) - F_live(x)| over every observed x (ties handled
    like scipy.stats.ks_2samp, whose `statistic` this equals)."""
    a, b = np.sort(np.asarray(reference, dtype=np.float64)), np.sort(np.asarray(live, dtype=np.float64))
    if not len(a) or not len(b):
        return 0.0
    points = np.concatenate([a, b])
    fa = np.searchsorted(a, points, side="right") / len(a)
    fb = np.searchsorted(b, points, side="right") / len(b)
    return float(np.max(np.abs(fa - fb)))


def psi_edges(reference: FloatArray, bins: int = PSI_BINS) -> FloatArray:
    """Inner bin edges at the reference's quantiles (duplicates from ties merged)."""
    qs = np.quantile(np.asarray(reference, dtype=np.float64), np.linspace(0, 1, bins + 1)[1:-1])
    return np.unique(qs)


def proportions(values: FloatArray | IntArray, edges: FloatArray, floor: float = PSI_FLOOR) -> FloatArray:
    """Bin proportions of `values` (bin k holds edges[k-1] <= x < edges[k]), floored at `floor`, renormalised."""
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1).astype(np.float64)
    return _floor(counts, floor)


def category_proportions(labels: IntArray, n_classes: int, floor: float = PSI_FLOOR) -> FloatArray:
    """Proportions of abstain (-1) and of each class 0..n_classes-1, floored and renormalised."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64) + 1, minlength=n_classes + 1).astype(np.float64)
    return _floor(counts, floor)


def psi(expected: FloatArray, actual: FloatArray) -> float:
    """Population stability index of two (floored) proportion vectors."""
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def _floor(counts: FloatArray, floor: float) -> FloatArray:
    total = counts.sum()
    p = counts / total if total else np.full_like(counts, 1.0 / len(counts))
    p = np.maximum(p, floor)
    out: FloatArray = p / p.sum()
    return out


def median_bandwidth(x: FloatArray) -> float:
    """sigma^2 of the RBF kernel by the median heuristic: half the median squared distance between distinct
    reference pairs (alibi-detect `sigma_median`, alibi_detect/utils/pytorch/kernels.py)."""
    d2 = _sq_dists(x, x)
    iu = np.triu_indices(len(x), k=1)
    med = float(np.median(d2[iu])) if len(iu[0]) else 1.0
    return med / 2.0 if med > 0 else 0.5


def rbf(x: FloatArray, y: FloatArray, sigma2: float) -> FloatArray:
    out: FloatArray = np.exp(-_sq_dists(x, y) / (2.0 * sigma2))
    return out


def mmd2_unbiased(x: FloatArray, y: FloatArray, sigma2: float) -> float:
    """Unbiased estimate of the squared MMD between samples x and y (Gretton et al. 2012, eq. 3)."""
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        return 0.0
    kxx, kyy, kxy = rbf(x, x, sigma2), rbf(y, y, sigma2), rbf(x, y, sigma2)
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean()
    )


def _sq_dists(x: FloatArray, y: FloatArray) -> FloatArray:
    d2: FloatArray = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
    return np.maximum(d2, 0.0)


# ------------------------------------------------------------------------------------------------- monitor


class _Test(Protocol):
    feature: str
    test: str

    def statistic(self, live: FloatArray) -> float: ...


class _KS:
    test = "ks"

    def __init__(self, feature: str, compare: FloatArray) -> None:
        self.feature, self.compare = feature, np.sort(compare)

    def statistic(self, live: FloatArray) -> float:
        return ks_statistic(self.compare, live)


class _PSI:
    test = "psi"

    def __init__(self, feature: str, compare: FloatArray, n_classes: int | None = None) -> None:
        self.feature, self.n_classes = feature, n_classes
        self.edges = psi_edges(compare) if n_classes is None else np.zeros(0)
        self.expected = self._proportions(compare)

    def _proportions(self, values: FloatArray) -> FloatArray:
        if self.n_classes is not None:
            return category_proportions(np.asarray(values, dtype=np.int64), self.n_classes)
        return proportions(values, self.edges)

    def statistic(self, live: FloatArray) -> float:
        return psi(self.expected, self._proportions(live))


class _MMD:
    feature, test = "embedding", "mmd"

    def __init__(self, compare: FloatArray) -> None:
        self.compare = compare
        self.sigma2 = median_bandwidth(compare)
        k = rbf(compare, compare, self.sigma2)
        m = len(compare)
        self.kxx_mean = float((k.sum() - np.trace(k)) / (m * (m - 1)))

    def statistic(self, live: FloatArray) -> float:
        n = len(live)
        if n < 2:
            return 0.0
        kyy = rbf(live, live, self.sigma2)
        kxy = rbf(self.compare, live, self.sigma2)
        return float(self.kxx_mean + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean())

    def null(self, pool: FloatArray, window: int, draws: int, rng: np.random.Generator) -> FloatArray:
        """MMD^2 of `compare` against `draws` bootstrap windows of `pool` (pairs of a point with itself left out)."""
        kpp = rbf(pool, pool, self.sigma2)
        cross = rbf(pool, self.compare, self.sigma2).mean(axis=1)
        out = np.empty(draws)
        for b in range(draws):
            idx = rng.integers(0, len(pool), size=window)
            distinct = idx[:, None] != idx[None, :]
            kyy = kpp[np.ix_(idx, idx)]
            pairs = int(distinct.sum())
            yy = float(kyy[distinct].sum() / pairs) if pairs else 0.0
            out[b] = self.kxx_mean + yy - 2 * float(cross[idx].mean())
        return out


class DriftMonitor:
    """A sliding window of live observations compared with a `DriftReference` (see the module docstring).

    window: observations per feature kept (and needed before any alarm). false_alarm_rate: the per-window
    family-wise false-alarm rate, Bonferroni-split over the statistics. n_null: bootstrap windows per statistic
    (default: enough for about 10 null values beyond each threshold, 1,000 to 20,000)."""

    def __init__(
        self,
        reference: DriftReference,
        window: int = 256,
        false_alarm_rate: float = 0.01,
        seed: int = 0,
        *,
        n_null: int | None = None,
    ) -> None:
        if window < 2:
            raise DriftError(f"window={window} must be >= 2")
        if not 0 < false_alarm_rate < 1:
            raise DriftError(f"false_alarm_rate={false_alarm_rate} must be between 0 and 1 (exclusive)")
        self.reference, self.window, self.false_alarm_rate, self.seed = reference, window, false_alarm_rate, seed
        self.positive_index = (
            None if reference.positive_class is None else reference.classes.index(reference.positive_class)
        )
        rng = np.random.default_rng(seed)
        order = rng.permutation(reference.size)
        half = (reference.size + 1) // 2
        a, b = order[:half], order[half:]
        self.compare_size, self.pool_size = len(a), len(b)
        scalars = self._scalar_features(reference)
        self.tests: list[_Test] = []
        for feature, values in scalars.items():
            self.tests.append(_KS(feature, values[a]))
            if feature in ("confidence", "score", "input_mean"):
                self.tests.append(_PSI(feature, values[a]))
        self.tests.append(_PSI("predicted_class", reference.predicted[a].astype(np.float64), len(reference.classes)))
        self.tests.append(_MMD(reference.embedding[a]))
        self.per_test_rate = false_alarm_rate / len(self.tests)
        self.n_null = n_null or int(min(20_000, max(1_000, math.ceil(10 / self.per_test_rate))))
        self.thresholds: dict[tuple[str, str], float] = {}
        self.null: dict[tuple[str, str], FloatArray] = {}
        for t in self.tests:
            if isinstance(t, _MMD):
                draws = t.null(reference.embedding[b], window, self.n_null, rng)
            else:
                pool = (
                    reference.predicted[b].astype(np.float64)
                    if t.feature == "predicted_class"
                    else scalars[t.feature][b]
                )
                draws = np.array(
                    [t.statistic(pool[rng.integers(0, len(pool), size=window)]) for _ in range(self.n_null)]
                )
            self.null[(t.feature, t.test)] = draws
            self.thresholds[(t.feature, t.test)] = float(np.quantile(draws, 1 - self.per_test_rate, method="higher"))
        self._windows: dict[str, deque[float]] = {f: deque(maxlen=window) for f in (*scalars, "predicted_class")}
        self._embeddings: deque[FloatArray] = deque(maxlen=window)
        self._report: list[DriftStat] | None = None
        self._decoder: VisionPredictor | None = None

    @staticmethod
    def _scalar_features(reference: DriftReference) -> dict[str, FloatArray]:
        out = {"confidence": reference.confidence}
        if reference.score is not None:
            out["score"] = reference.score
        return {**out, **reference.inputs}

    # ------------------------------------------------------------------------------------------ observing
    def observe(
        self,
        images: Sequence[UInt8Array],
        confidence: FloatArray,
        labels: IntArray,
        score: FloatArray | None = None,
    ) -> int:
        """Add decoded images (uint8 HxWxC, as the server decodes them) and the served answers for them."""
        inputs, embeddings = self.image_features(images)
        return self.observe_features(inputs, embeddings, confidence, labels, score)

    def image_features(self, images: Sequence[UInt8Array]) -> tuple[dict[str, FloatArray], FloatArray]:
        """(input statistics, embeddings) of decoded images, computed as for the reference."""
        return image_stats(images), self.reference.embed(downsampled(images))

    def observe_features(
        self,
        inputs: Mapping[str, FloatArray],
        embeddings: FloatArray,
        confidence: FloatArray,
        labels: IntArray,
        score: FloatArray | None = None,
    ) -> int:
        """Add instances whose image features (`image_features`) are already computed; returns how many."""
        n = len(embeddings)
        sizes = {len(inputs[f]) for f in INPUT_FEATURES} | {len(confidence), len(labels)}
        if sizes != {n} or (score is not None and len(score) != n):
            raise DriftError(f"{n} images but {len(confidence)} confidences / {len(labels)} labels in the answer")
        labels = np.asarray(labels, dtype=np.int64)
        bad = labels[(labels < ABSTAIN) | (labels >= len(self.reference.classes))]
        if len(bad):
            raise DriftError(
                f"label {int(bad[0])} is not a class of this bundle: allowed -1..{len(self.reference.classes) - 1}"
            )
        conf = np.asarray(confidence, dtype=np.float64)
        if not np.isfinite(conf).all() or (conf < 0).any() or (conf > 1).any():
            raise DriftError("confidences must be finite probabilities in [0, 1]")
        self._windows["confidence"].extend(np.round(conf, _DECIMALS["confidence"]).tolist())
        if score is not None and "score" in self._windows:
            self._windows["score"].extend(np.round(np.asarray(score, dtype=np.float64), _DECIMALS["score"]).tolist())
        for f in INPUT_FEATURES:
            self._windows[f].extend(np.asarray(inputs[f], dtype=np.float64).tolist())
        self._windows["predicted_class"].extend(labels.astype(np.float64).tolist())
        self._embeddings.extend(np.asarray(embeddings, dtype=np.float64))
        self._report = None
        return n

    def observe_event(self, request: Mapping[str, object], response: Mapping[str, object]) -> int:
        """One logged inference: the JSON request body (v1 {"instances": [...]} or v2 REST {"inputs": [...]})
        and the JSON response body (v1 {"predictions": [...]} or v2 {"outputs": [...]}), exactly as the
        predictor's logger sends them; returns how many instances were added to the window. Raises
        DriftError on bodies it cannot read (the collector counts them, never crashes)."""
        if not isinstance(request, Mapping) or not isinstance(response, Mapping):
            raise DriftError(
                f"request and response must be JSON objects, got {type(request).__name__} / {type(response).__name__}"
            )
        images = self._decode_request(request)
        confidence, labels, score = parse_response(response, self.reference.classes, self.positive_index)
        if len(labels) != len(images):
            raise DriftError(f"the request holds {len(images)} image(s) but the response answers {len(labels)}")
        return self.observe(images, confidence, labels, score)

    def _decode_request(self, request: Mapping[str, object]) -> list[UInt8Array]:
        if self._decoder is None:
            self._decoder = _make_decoder(self.reference.spec)
        return decode_request_images(self._decoder, request)

    # ------------------------------------------------------------------------------------------- report
    def report(self) -> list[DriftStat]:
        """Every statistic on the current window with its threshold and alarm (recomputed only after new data)."""
        if self._report is not None:
            return list(self._report)
        out = []
        for t in self.tests:
            if isinstance(t, _MMD):
                count = len(self._embeddings)
                live = np.asarray(list(self._embeddings)) if count else np.zeros((0, self.reference.embedding.shape[1]))
            else:
                values = self._windows[t.feature]
                count = len(values)
                live = np.asarray(values, dtype=np.float64)
            value = t.statistic(live) if count >= 2 else 0.0
            threshold = self.thresholds[(t.feature, t.test)]
            out.append(
                DriftStat(t.feature, t.test, value, threshold, count >= self.window and value > threshold, count)
            )
        self._report = out
        return list(out)

    @property
    def observations(self) -> int:
        """Observations in the current window (of the confidence feature, which every answer carries)."""
        return len(self._windows["confidence"])

    def reset(self) -> None:
        """Empty the window (e.g. after a new bundle was rolled out)."""
        for d in self._windows.values():
            d.clear()
        self._embeddings.clear()
        self._report = None


# ----------------------------------------------------------------------------------------- request bodies


def _make_decoder(spec: PreprocessSpec) -> VisionPredictor:
    """The predictor's own request decoding (limits, v1 / v2 planning, image_to_array) for this preprocessing,
    with no bundle loaded: the same uint8 images the served model received."""
    return _decoder_class()(spec)


@functools.cache
def _decoder_class() -> Callable[[PreprocessSpec], VisionPredictor]:
    from visionpipe.serving.predictor import VisionPredictor
    from visionpipe.serving.runtime import WorkerPool

    class RequestDecoder(VisionPredictor):
        def __init__(self, spec: PreprocessSpec) -> None:
            super().__init__("drift-monitor", ["(drift reference)"], pool=WorkerPool(workers=1))
            self._spec = spec

        @property
        def preprocess_spec(self) -> PreprocessSpec:
            return self._spec

    return RequestDecoder


def decode_request_images(decoder: VisionPredictor, request: Mapping[str, object]) -> list[UInt8Array]:
    """A logged request body -> its images as the predictor decodes them (`VisionPredictor` planning + loading,
    every limit checked); DriftError naming the problem otherwise."""
    from kserve.errors import InvalidInput
    from kserve.protocol.infer_type import InferRequest

    from visionpipe.serving.upload import InputError

    try:
        if "instances" in request:
            pending = decoder._plan_v1(dict(request))
        elif "inputs" in request:
            inputs = request["inputs"]
            if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
                raise DriftError('v2 request: "inputs" must be a list of tensor objects')
            for i in inputs:
                missing = [k for k in ("name", "shape", "datatype", "data") if k not in i]
                if missing:
                    raise DriftError(f"v2 request: input {i.get('name')!r} lacks {', '.join(missing)} (JSON data only)")
            body = json.dumps(dict(request)).encode()
            # the dataplane's REST parse (kserve/protocol/infer_type.py InferRequest.from_bytes, json_length = all)
            infer = InferRequest.from_bytes(body, len(body), decoder.name)
            pending = decoder._plan_v2(infer)
        else:
            raise DriftError(
                f'request body has neither "instances" (v1) nor "inputs" (v2); keys: {sorted(map(str, request))[:8]}'
            )
        total = sum(p.pixels for p in pending)
        if total > decoder.config.max_request_pixels:
            raise DriftError(f"request: {total} pixels; the limit is {decoder.config.max_request_pixels}")
        images = []
        for i, p in enumerate(pending):
            try:
                images.append(p.load())
            except InputError as exc:
                raise DriftError(f"request: image {i}: {exc.code}: {exc}") from exc
        return images
    except InvalidInput as exc:
        raise DriftError(f"request: {exc}") from exc
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, DriftError):
            raise
        raise DriftError(f"request: unreadable body ({type(exc).__name__}: {exc})") from exc


def parse_response(
    response: Mapping[str, object], classes: Sequence[str], positive_index: int | None
) -> tuple[FloatArray, IntArray, FloatArray | None]:
    """(confidence, label, score or None) per instance of a v1 {"predictions": [...]} or v2 {"outputs": [...]}
    answer of the predictor, read by the collector's parser (visionpipe/monitoring/answers.py)."""
    try:
        answers = read_answers(response, classes)
    except AnswerError as exc:
        raise DriftError(f"response: {exc}") from exc
    if answers.confidence is None:
        raise DriftError(
            "response: reading it needs label and confidence (or probabilities) per instance: v1 records with "
            "'confidence', or the v2 outputs label + confidence / probabilities, or result"
        )
    probabilities = answers.probabilities
    score = None if probabilities is None or positive_index is None else probabilities[:, positive_index]
    return answers.confidence, answers.labels, score
