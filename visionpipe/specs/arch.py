"""Architecture specs, torch-free: `ArchChoice` (the fields a recipe chooses) and `ArchSpec` (a full model spec).

`ArchSpec` extends `ArchChoice` with what comes from the data and the preprocessing (num_classes, in_channels,
image_size); both validate the shared fields with the same code. A recipe bounds each shape field to
[1, 100000] (`ArchChoice.max_dim`); a full spec only needs >= 1 (a bundle's size is bounded by
`visionpipe.serving.models.check_budget` instead).
"""

from __future__ import annotations

import json
from dataclasses import KW_ONLY, dataclass, field, fields
from typing import ClassVar

from visionpipe.specs.checks import SpecError, in_range, one_of
from visionpipe.specs.registry import ARCHITECTURES, REGISTRY

SHAPE_FIELDS: tuple[str, ...] = ("width", "patch_size", "hidden_dim", "num_layers", "num_heads", "mlp_dim")
# the field order of ArchSpec.to_dict (and of the spec before ArchChoice existed)
SPEC_FIELDS: tuple[str, ...] = ("name", "num_classes", "in_channels", "image_size", *SHAPE_FIELDS, "dropout")
REQUIRED_FIELDS: tuple[str, ...] = ("name", "num_classes", "in_channels", "image_size")


class ArchSpecError(SpecError):
    """An architecture spec is invalid or names unknown fields."""


@dataclass(frozen=True)
class ArchChoice:
    """The `ArchSpec` fields a recipe chooses (num_classes and in_channels come from the data, image_size from
    preprocess.size).

    name: one of ARCHITECTURES (visionpipe/specs/registry.py). width: cnn-small base channels. patch_size,
    hidden_dim, num_layers, num_heads, mlp_dim: vit / dinov2 transformer shape. dropout: dropout in the
    backbone (cnn-small feature layer, vit/dinov2 hidden layers); resnet18 ignores it.
    """

    # largest allowed shape field; None = unbounded (a class setting, not a dataclass field)
    max_dim: ClassVar[int | None] = 100_000

    name: str = "cnn-small"
    _: KW_ONLY
    width: int = 32
    patch_size: int = 4
    hidden_dim: int = 64
    num_layers: int = 2
    num_heads: int = 2
    mlp_dim: int = 128
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self._check_name()
        self._check_shape()
        self._check_ratios()

    def _check_name(self) -> None:
        one_of("arch.name", self.name, ARCHITECTURES, ArchSpecError)

    def _check_shape(self) -> None:
        for name in SHAPE_FIELDS:
            value = getattr(self, name)
            if self.max_dim is None:
                if value < 1:
                    raise ArchSpecError(f"arch.{name}={value} must be >= 1")
            else:
                in_range(f"arch.{name}", value, 1, self.max_dim, error=ArchSpecError)
        if not 0.0 <= self.dropout < 1.0:
            raise ArchSpecError(f"arch.dropout={self.dropout} must be in [0, 1)")

    def _check_ratios(self) -> None:
        info = REGISTRY[self.name]
        if info.transformer and self.hidden_dim % self.num_heads:
            raise ArchSpecError(
                f"arch.hidden_dim={self.hidden_dim} must be a multiple of arch.num_heads={self.num_heads}"
            )
        if info.mlp_ratio_integer and self.mlp_dim % self.hidden_dim:
            raise ArchSpecError(
                f"arch.mlp_dim={self.mlp_dim} must be a multiple of arch.hidden_dim={self.hidden_dim} "
                f"for {self.name} (Dinov2Config takes an integer mlp_ratio)"
            )

    @property
    def transformer(self) -> bool:
        return REGISTRY[self.name].transformer


@dataclass(frozen=True)
class ArchSpec(ArchChoice):
    """Everything needed to rebuild a model (stored in every bundle and backbone.json).

    name: one of ARCHITECTURES. num_classes: head outputs. in_channels: 1 (grey) or 3 (RGB).
    image_size: square input side. width: cnn-small base channels. patch_size, hidden_dim, num_layers,
    num_heads, mlp_dim: vit / dinov2 transformer shape. dropout: dropout in the backbone (cnn-small feature
    layer, vit/dinov2 hidden layers); resnet18 ignores it. The shape fields and dropout are keyword-only.
    """

    max_dim: ClassVar[int | None] = None

    name: str = field()  # required here (field() without a default overrides ArchChoice's default)
    num_classes: int
    in_channels: int
    image_size: int

    def __post_init__(self) -> None:
        self._check_name()
        if self.num_classes < 2:
            raise ArchSpecError(f"arch.num_classes={self.num_classes} must be >= 2")
        if self.in_channels not in (1, 3):
            raise ArchSpecError(f"arch.in_channels={self.in_channels} must be 1 (grey) or 3 (RGB)")
        if not 4 <= self.image_size <= 1024:
            raise ArchSpecError(f"arch.image_size={self.image_size} must be between 4 and 1024")
        self._check_shape()
        if self.transformer and self.image_size % self.patch_size:
            raise ArchSpecError(
                f"arch.image_size={self.image_size} must be a multiple of "
                f"arch.patch_size={self.patch_size} for {self.name}"
            )
        self._check_ratios()

    @classmethod
    def from_choice(cls, choice: ArchChoice, num_classes: int, in_channels: int, image_size: int) -> ArchSpec:
        """The full spec: a recipe's choice + what the data (classes, channels) and preprocessing (size) give."""
        return cls(
            choice.name,
            num_classes,
            in_channels,
            image_size,
            **{name: getattr(choice, name) for name in (*SHAPE_FIELDS, "dropout")},
        )

    def choice(self) -> ArchChoice:
        """The recipe-chosen part of this spec."""
        return ArchChoice(self.name, **{name: getattr(self, name) for name in (*SHAPE_FIELDS, "dropout")})

    def to_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in SPEC_FIELDS}

    @classmethod
    def from_dict(cls, payload: dict[str, object]) -> ArchSpec:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(payload) - set(known))
        if unknown:
            raise ArchSpecError(f"unknown arch fields {unknown}; allowed: {sorted(known)}")
        missing = sorted(n for n in REQUIRED_FIELDS if n not in payload)
        if missing:
            raise ArchSpecError(f"arch spec lacks required fields {missing}")
        values: dict[str, str | int | float] = {}
        for key, raw in payload.items():
            kind = known[key].type
            try:
                if kind == "str":
                    values[key] = str(raw)
                elif kind == "int":
                    if isinstance(raw, bool) or not isinstance(raw, int | str):
                        raise TypeError(f"expected an integer, got {raw!r}")
                    values[key] = int(raw)
                else:
                    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
                        raise TypeError(f"expected a number, got {raw!r}")
                    values[key] = float(raw)
            except (TypeError, ValueError) as exc:
                raise ArchSpecError(f"arch.{key}={raw!r} is invalid: {exc}") from exc
        return cls(**values)  # type: ignore[arg-type]

    @classmethod
    def from_json(cls, text: str) -> ArchSpec:
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ArchSpecError(f"arch spec is not valid JSON: {exc}") from exc
        if not isinstance(payload, dict):
            raise ArchSpecError(f"arch spec JSON must be an object, got {type(payload).__name__}")
        return cls.from_dict(payload)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
