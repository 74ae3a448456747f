"""Training recipes as data: frozen dataclasses loaded from YAML, validated with errors that name the field.

A recipe is everything `supervised_train` needs besides the data: architecture (`visionpipe.specs.ArchChoice`:
the `ArchSpec` fields except ``num_classes`` / ``in_channels`` / ``image_size``, which come from the data and the
preprocessing), preprocessing, optimizer, LR schedule, augmentation, loss, EMA, early stopping, PEFT
(`visionpipe.specs.PeftChoice`), seed. The arch and peft sections are the spec types themselves, validated by
the specs' own code; their errors surface as `RecipeError` with the same message.

Recipes ship as ``recipes/<name>.yaml`` at the repository root (the image sets $VISIONPIPE_RECIPE_DIR to its copy);
`load_recipe` accepts a shipped name or a path to a YAML file, plus overrides (nested mappings or dotted keys,
e.g. ``{"epochs": 3, "optimizer.lr": 0.01}``). A recipe's identity is `recipe_hash`: the sha256 of its
canonical JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import TypeVar

import yaml

from visionpipe.specs.arch import ArchChoice
from visionpipe.specs.checks import SpecError
from visionpipe.specs.checks import in_range as _spec_in_range
from visionpipe.specs.checks import one_of as _spec_one_of
from visionpipe.specs.peft import METHODS, PeftChoice
from visionpipe.specs.preprocess import KINDS, ViewsChoice
from visionpipe.specs.registry import ARCHITECTURES, TRANSFORMERS

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")
LOSSES = ("cross_entropy", "focal")
CLASS_WEIGHTINGS = ("none", "balanced")
STOP_METRICS = ("auto", "mcc", "accuracy")
PEFT_METHODS = METHODS
TRANSFORMER_ARCHITECTURES = TRANSFORMERS
ARCH_NAMES = ARCHITECTURES  # the architecture registry (visionpipe/specs/registry.py)
PREPROCESS_KINDS = KINDS
DIST_STRATEGIES = ("ddp", "fsdp2")  # visionpipe/training/distributed.py
RECIPE_DIR_ENV = "VISIONPIPE_RECIPE_DIR"


class RecipeError(ValueError):
    """A recipe is missing, malformed or holds a disallowed value (the message names the field)."""


# ------------------------------------------------------------------------------------------------ sections


@dataclass(frozen=True)
class OptimizerSpec:
    """name: adamw | sgd. momentum / nesterov apply to sgd, betas to adamw."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        _one_of("optimizer.name", self.name, OPTIMIZERS)
        _in_range("optimizer.lr", self.lr, 0.0, 10.0, low_open=True)
        _in_range("optimizer.weight_decay", self.weight_decay, 0.0, 1.0)
        _in_range("optimizer.momentum", self.momentum, 0.0, 1.0, high_open=True)
        for i, beta in enumerate(self.betas):
            _in_range(f"optimizer.betas[{i}]", beta, 0.0, 1.0, high_open=True)


@dataclass(frozen=True)
class ScheduleSpec:
    """name: cosine (linear warmup, then cosine decay to min_lr_ratio * lr) | constant (after warmup)."""

    name: str = "cosine"
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01

    def __post_init__(self) -> None:
        _one_of("schedule.name", self.name, SCHEDULES)
        _in_range("schedule.warmup_epochs", self.warmup_epochs, 0.0, 1000.0)
        _in_range("schedule.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)


@dataclass(frozen=True)
class AugmentSpec:
    """Training-time augmentation, applied to the preprocessed tensors (never at evaluation).

    Random affine with probability affine_prob: rotation uniform in +-rotation_deg, translation uniform in
    +-translate (fraction of the side), scale uniform in [scale[0], scale[1]]; borders are filled with black.
    hflip: random horizontal flip (not for digits). Random erasing with probability erasing_prob of a box
    covering erasing_area (fraction range) of the image. Mixup (mixup_alpha) / CutMix (cutmix_alpha) with
    probability mix_prob per batch; when both alphas are > 0 each batch picks one of them at random.
    Elastic distortion (Simard et al. 2003) when elastic_alpha > 0: a per-image random displacement field,
    uniform noise in [-1, 1] smoothed by a Gaussian of elastic_sigma pixels and scaled by elastic_alpha pixels,
    applied in the same resampling as the affine (one interpolation, borders black).
    """

    rotation_deg: float = 0.0
    translate: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    affine_prob: float = 1.0
    hflip: bool = False
    erasing_prob: float = 0.0
    erasing_area: tuple[float, float] = (0.02, 0.2)
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    elastic_alpha: float = 0.0
    elastic_sigma: float = 4.0

    def __post_init__(self) -> None:
        _in_range("augment.rotation_deg", self.rotation_deg, 0.0, 180.0)
        _in_range("augment.translate", self.translate, 0.0, 0.5)
        _ordered_range("augment.scale", self.scale, 0.1, 4.0)
        _in_range("augment.affine_prob", self.affine_prob, 0.0, 1.0)
        _in_range("augment.erasing_prob", self.erasing_prob, 0.0, 1.0)
        _ordered_range("augment.erasing_area", self.erasing_area, 0.0, 1.0)
        _in_range("augment.mixup_alpha", self.mixup_alpha, 0.0, 10.0)
        _in_range("augment.cutmix_alpha", self.cutmix_alpha, 0.0, 10.0)
        _in_range("augment.mix_prob", self.mix_prob, 0.0, 1.0)
        _in_range("augment.elastic_alpha", self.elastic_alpha, 0.0, 100.0)
        _in_range("augment.elastic_sigma", self.elastic_sigma, 0.5, 20.0)

    @property
    def uses_affine(self) -> bool:
        return self.affine_prob > 0 and (self.rotation_deg > 0 or self.translate > 0 or self.scale != (1.0, 1.0))

    @property
    def uses_mixing(self) -> bool:
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


@dataclass(frozen=True)
class LossSpec:
    """name: cross_entropy | focal (focal_gamma). class_weights: none | balanced (inverse train frequency,
    mean 1) | an explicit list with one weight per class. label_smoothing in [0, 1)."""

    name: str = "cross_entropy"
    label_smoothing: float = 0.0
    focal_gamma: float = 2.0
    class_weights: str | tuple[float, ...] = "none"

    def __post_init__(self) -> None:
        _one_of("loss.name", self.name, LOSSES)
        _in_range("loss.label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        _in_range("loss.focal_gamma", self.focal_gamma, 0.0, 10.0)
        if isinstance(self.class_weights, str):
            _one_of("loss.class_weights", self.class_weights, (*CLASS_WEIGHTINGS, "<list of floats>"))
        else:
            if len(self.class_weights) < 2:
                raise RecipeError(
                    f"loss.class_weights={list(self.class_weights)} needs one weight per class (>= 2); "
                    f"allowed: {', '.join(CLASS_WEIGHTINGS)} or a list of positive floats"
                )
            for i, w in enumerate(self.class_weights):
                _in_range(f"loss.class_weights[{i}]", w, 0.0, 1e6, low_open=True)


@dataclass(frozen=True)
class EmaSpec:
    """Exponential moving average of the weights; when enabled, evaluation and checkpoints use the EMA."""

    enabled: bool = False
    decay: float = 0.999

    def __post_init__(self) -> None:
        _in_range("ema.decay", self.decay, 0.0, 1.0, high_open=True)


@dataclass(frozen=True)
class EarlyStoppingSpec:
    """Model selection on val_select. metric: auto (MCC for binary tasks, accuracy otherwise) | mcc |
    accuracy. An epoch is better when its metric exceeds the best by more than min_delta; with
    min_delta 0 an equal metric with a lower val_select loss is better too. patience: stop after this many
    epochs without a better one (0 = train every epoch; the best epoch is still the one kept)."""

    metric: str = "auto"
    patience: int = 0
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        _one_of("early_stopping.metric", self.metric, STOP_METRICS)
        _in_range("early_stopping.patience", self.patience, 0, 10_000)
        _in_range("early_stopping.min_delta", self.min_delta, 0.0, 1.0)


@dataclass(frozen=True)
class DistributedSpec:
    """How the workers of a multi-worker run (train_workers > 1, torchrun) share the model. ddp: every worker
    holds the whole model and gradients are all-reduced (every architecture). fsdp2: parameters, gradients and
    optimizer state are sharded over the workers (torch.distributed.fsdp.fully_shard per transformer block and
    the root), for the transformer architectures only. One process ignores it."""

    strategy: str = "ddp"

    def __post_init__(self) -> None:
        _one_of("distributed.strategy", self.strategy, DIST_STRATEGIES)


# The arch and peft sections are the spec types themselves (visionpipe/specs): one definition, validated once.
# Their SpecErrors become RecipeErrors in `_build`.
ArchRecipe = ArchChoice
PeftRecipe = PeftChoice


@dataclass(frozen=True)
class PreprocessRecipe:
    """The `visionpipe.serving.preprocessing.PreprocessSpec` a recipe chooses. channels: 1 | 3 | 0 (= the data's
    channels). A single mean / std value is repeated for every channel. views: multi-view inference (global view
    + tiles, `visionpipe.specs.preprocess.ViewsChoice`: a concrete `ViewsSpec`, or ``aggregate: auto`` /
    ``learned`` without weights, which supervised_train resolves on val_select), off when absent."""

    kind: str = "standard"
    channels: int = 0
    size: int = 28
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    views: ViewsChoice | None = None

    def __post_init__(self) -> None:
        _one_of("preprocess.kind", self.kind, PREPROCESS_KINDS)
        _one_of("preprocess.channels", self.channels, (0, 1, 3))
        _in_range("preprocess.size", self.size, 4, 1024)
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, 3):
                raise RecipeError(f"preprocess.{name}={list(values)} needs 1 value or one per channel (3)")
        for i, s in enumerate(self.std):
            _in_range(f"preprocess.std[{i}]", s, 0.0, 1e3, low_open=True)


# -------------------------------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class Recipe:
    """A complete, validated training recipe.

    epochs: maximum epochs. batch_size: images per micro-batch; grad_accum_steps micro-batches make one
    optimizer step. grad_clip_norm: clip the global gradient norm (0 = off). num_workers: DataLoader workers
    (-1 = sized to the machine). max_train_seconds: stop after the epoch that crosses it (0 = no limit).
    """

    name: str = "custom"
    description: str = ""
    seed: int = 0
    epochs: int = 10
    batch_size: int = 64
    eval_batch_size: int = 256
    grad_accum_steps: int = 1
    grad_clip_norm: float = 0.0
    num_workers: int = -1
    max_train_seconds: float = 0.0
    arch: ArchChoice = field(default_factory=ArchChoice)
    preprocess: PreprocessRecipe = field(default_factory=PreprocessRecipe)
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    loss: LossSpec = field(default_factory=LossSpec)
    ema: EmaSpec = field(default_factory=EmaSpec)
    early_stopping: EarlyStoppingSpec = field(default_factory=EarlyStoppingSpec)
    peft: PeftChoice = field(default_factory=PeftChoice)
    distributed: DistributedSpec = field(default_factory=DistributedSpec)

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\ "):
            raise RecipeError(f"name={self.name!r} must be a non-empty name without slashes or spaces")
        _in_range("seed", self.seed, 0, 2**31 - 1)
        _in_range("epochs", self.epochs, 1, 10_000)
        _in_range("batch_size", self.batch_size, 1, 65_536)
        _in_range("eval_batch_size", self.eval_batch_size, 1, 65_536)
        _in_range("grad_accum_steps", self.grad_accum_steps, 1, 1024)
        _in_range("grad_clip_norm", self.grad_clip_norm, 0.0, 1e6)
        _in_range("num_workers", self.num_workers, -1, 64)
        _in_range("max_train_seconds", self.max_train_seconds, 0.0, 1e7)
        if self.arch.name in TRANSFORMER_ARCHITECTURES and self.preprocess.size % self.arch.patch_size:
            raise RecipeError(
                f"preprocess.size={self.preprocess.size} must be a multiple of arch.patch_size="
                f"{self.arch.patch_size} for {self.arch.name}"
            )
        if self.distributed.strategy == "fsdp2" and self.arch.name not in TRANSFORMER_ARCHITECTURES:
            raise RecipeError(
                f"distributed.strategy='fsdp2' shards transformer blocks and needs a transformer architecture "
                f"({', '.join(TRANSFORMER_ARCHITECTURES)}); arch.name={self.arch.name!r} trains with "
                "distributed.strategy='ddp'"
            )

    def to_dict(self) -> dict[str, object]:
        """Plain JSON/YAML-ready mapping (tuples become lists). `preprocess.views` is left out while off, its
        `weights` while empty, and `distributed` while it is the default (ddp), so the recipes written before
        views (or learned weights, or FSDP2) existed keep their content hash."""
        payload = _plain(asdict(self))
        assert isinstance(payload, dict)
        if payload.get("distributed") == _plain(asdict(DistributedSpec())):
            payload.pop("distributed")
        preprocess = payload.get("preprocess")
        if isinstance(preprocess, dict) and preprocess.get("views") is None:
            preprocess.pop("views", None)
        views = preprocess.get("views") if isinstance(preprocess, dict) else None
        if isinstance(views, dict) and not views.get("weights"):
            views.pop("weights", None)
        return payload

    @classmethod
    def from_dict(cls, payload: Mapping[str, object]) -> Recipe:
        return _build(cls, payload, "")

    def with_overrides(self, overrides: Mapping[str, object]) -> Recipe:
        """A new recipe with `overrides` (nested mappings and/or dotted keys) applied and re-validated."""
        return Recipe.from_dict(merge_overrides(self.to_dict(), overrides))


# ------------------------------------------------------------------------------------------------- loading


def load_recipe(name_or_path: str | Path, overrides: Mapping[str, object] | None = None) -> Recipe:
    """A shipped recipe by name (``digits-cnn``) or a YAML file path, with optional overrides applied."""
    path = find_recipe(name_or_path)
    try:
        payload = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(payload, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping, got {type(payload).__name__}")
    payload.setdefault("name", path.stem)
    recipe = Recipe.from_dict(payload)
    return recipe.with_overrides(overrides) if overrides else recipe


def find_recipe(name_or_path: str | Path) -> Path:
    """The YAML file for a shipped recipe name or an explicit path; the error lists the shipped names."""
    text = str(name_or_path)
    candidate = Path(text).expanduser()
    if candidate.suffix in (".yaml", ".yml") or os.sep in text or candidate.is_file():
        if candidate.is_file():
            return candidate
        raise RecipeError(f"recipe file {candidate} does not exist")
    for directory in recipe_dirs():
        for suffix in (".yaml", ".yml"):
            path = directory / f"{text}{suffix}"
            if path.is_file():
                return path
    raise RecipeError(f"unknown recipe {text!r}; shipped recipes: {', '.join(list_recipes()) or 'none found'}")


def list_recipes() -> list[str]:
    """Names of the shipped recipes (first directory wins when a name appears twice)."""
    names: set[str] = set()
    for directory in recipe_dirs():
        names.update(p.stem for p in directory.glob("*.y*ml"))
    return sorted(names)


def recipe_dirs() -> list[Path]:
    """Where shipped recipes are looked up: $VISIONPIPE_RECIPE_DIR, then <repo>/recipes."""
    root = Path(__file__).resolve().parents[2]
    dirs = [Path(p) for p in os.environ.get(RECIPE_DIR_ENV, "").split(os.pathsep) if p]
    dirs += [root / "recipes"]
    return [d for d in dirs if d.is_dir()]


def parse_overrides(text: str) -> dict[str, object]:
    """Overrides given as a JSON object (the KFP parameter form); empty text means none."""
    if not text.strip():
        return {}
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecipeError(f"recipe overrides are not valid JSON ({exc}): {text!r}") from exc
    if not isinstance(payload, dict):
        raise RecipeError(f"recipe overrides must be a JSON object, got {type(payload).__name__}")
    return payload


def merge_overrides(base: Mapping[str, object], overrides: Mapping[str, object]) -> dict[str, object]:
    """Deep-merge `overrides` into a recipe mapping; ``a.b`` keys address nested sections."""
    out: dict[str, object] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in base.items()}
    for key, value in overrides.items():
        head, _, rest = str(key).partition(".")
        if rest:
            value = {rest: value}
        current = out.get(head)
        if isinstance(current, Mapping) and isinstance(value, Mapping):
            out[head] = merge_overrides(current, value)
        else:
            out[head] = value
    return out


def recipe_hash(recipe: Recipe) -> str:
    """sha256 of the canonical JSON of the recipe (sorted keys, no whitespace)."""
    canonical = json.dumps(recipe.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# ------------------------------------------------------------------------------------------------- helpers

T = TypeVar("T")


def _build(cls: type[T], payload: Mapping[str, object], prefix: str) -> T:
    """Build dataclass `cls` from a mapping, converting values to the annotated types."""
    if not isinstance(payload, Mapping):
        raise RecipeError(f"{prefix.rstrip('.') or 'recipe'} must be a mapping, got {payload!r}")
    assert is_dataclass(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(str(k) for k in payload if k not in known)
    if unknown:
        raise RecipeError(
            f"unknown recipe field(s) {', '.join(prefix + u for u in unknown)}; allowed: "
            f"{', '.join(prefix + k for k in known)}"
        )
    hints = typing.get_type_hints(cls)
    values = {key: _convert(prefix + key, value, hints[key]) for key, value in payload.items()}
    try:
        return cls(**values)
    except SpecError as exc:  # the arch / peft sections are specs: same message, the recipe's error type
        raise RecipeError(str(exc)) from exc
    except TypeError as exc:
        raise RecipeError(f"{prefix.rstrip('.') or 'recipe'}: {exc}") from exc


def _convert(name: str, value: object, hint: object) -> object:
    if isinstance(hint, type) and is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise RecipeError(f"{name} must be a mapping of its fields, got {value!r}")
        return _build(hint, value, name + ".")
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(hint)
        if value is None and type(None) in options:  # an optional section written as `null`: off
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(name, value, option)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(" or ".join(errors))
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise RecipeError(f"{name}={value!r} must be a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            raise RecipeError(f"{name}={list(value)!r} must have exactly {len(args)} values")
        return tuple(_convert(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    return _scalar(name, value, hint)


def _scalar(name: str, value: object, hint: object) -> object:
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{name}={value!r} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{name}={value!r} must be an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RecipeError(f"{name}={value!r} must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise RecipeError(f"{name}={value!r} must be a string")
        return value
    raise RecipeError(f"{name}: unsupported field type {hint!r}")  # pragma: no cover - recipe schema bug


def _plain(value: object) -> object:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _one_of(name: str, value: object, allowed: Sequence[object]) -> None:
    _spec_one_of(name, value, allowed, RecipeError)


def _in_range(
    name: str,
    value: float,
    low: float,
    high: float,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    _spec_in_range(name, value, low, high, low_open, high_open, RecipeError)


def _ordered_range(name: str, value: tuple[float, float], low: float, high: float) -> None:
    for i, v in enumerate(value):
        _in_range(f"{name}[{i}]", v, low, high)
    if value[0] > value[1]:
        raise RecipeError(f"{name}={list(value)} must be [min, max] with min <= max")
