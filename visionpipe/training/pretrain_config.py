"""The self-supervised (DINO / ExPLoRA) pretraining recipe of domain_pretrain: a frozen dataclass whose every
numeric field is checked against one table of limits, with errors naming the field, the value and the interval."""

import math
from dataclasses import asdict, dataclass, fields

from visionpipe.training.validate import Limit, at_least, check_limits, check_ordered_pair


class PretrainError(ValueError):
    """A pretraining config or input is invalid."""


@dataclass(frozen=True)
class PretrainConfig:
    """The SSL recipe. Crop scales are fractions of the image area; every crop is resized to the model size."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.04
    warmup_fraction: float = 0.1
    unfreeze_last_blocks: int = 1
    lora_rank: int = 8
    lora_alpha: float = 16.0
    num_local_crops: int = 4
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    local_crop_scale: tuple[float, float] = (0.1, 0.4)
    rotation_degrees: float = 10.0
    flip_prob: float = 0.0
    teacher_momentum: float = 0.996
    out_dim: int = 1024
    head_hidden_dim: int = 256
    head_bottleneck_dim: int = 64
    teacher_temp: float = 0.04
    student_temp: float = 0.1
    center_momentum: float = 0.9
    koleo_weight: float = 0.0
    collapse_std_floor: float = 0.05
    collapse_entropy_floor: float = 0.02
    collapse_uniform_ceiling: float = 0.99
    collapse_patience: int = 2
    seed: int = 0
    max_steps: int = 0

    def __post_init__(self) -> None:
        values = {name: getattr(self, name) for name in _LIMITS}
        check_limits("pretrain.", values, _LIMITS, PretrainError)
        for name in ("global_crop_scale", "local_crop_scale"):
            check_ordered_pair(f"pretrain.{name}", getattr(self, name), 0.0, 1.0, PretrainError)
        if self.teacher_temp > self.student_temp:
            raise PretrainError(
                f"pretrain.teacher_temp={self.teacher_temp} must be <= student_temp={self.student_temp} "
                "(the teacher sharpens; a softer teacher invites uniform collapse)"
            )

    def to_dict(self) -> dict[str, object]:
        payload = asdict(self)
        payload["global_crop_scale"] = list(self.global_crop_scale)
        payload["local_crop_scale"] = list(self.local_crop_scale)
        return payload

    @classmethod
    def from_dict(cls, payload: dict[str, object]) -> "PretrainConfig":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(payload) - set(known))
        if unknown:
            raise PretrainError(f"unknown pretrain fields {unknown}; allowed: {sorted(known)}")
        values: dict[str, object] = {}
        for key, raw in payload.items():
            default = getattr(cls, key)
            try:
                if isinstance(default, tuple):
                    assert isinstance(raw, list | tuple) and len(raw) == 2, "expected [low, high]"
                    values[key] = (float(raw[0]), float(raw[1]))
                elif isinstance(default, int):
                    assert not isinstance(raw, bool) and isinstance(raw, int | str), "expected an integer"
                    values[key] = int(raw)
                else:
                    assert not isinstance(raw, bool) and isinstance(raw, int | float | str), "expected a number"
                    values[key] = float(raw)
            except (AssertionError, ValueError) as exc:
                raise PretrainError(f"pretrain.{key}={raw!r} is invalid: {exc}") from exc
        return cls(**values)  # type: ignore[arg-type]


# the allowed interval of every numeric field, checked in this order by PretrainConfig.__post_init__
_LIMITS: dict[str, Limit] = {
    "epochs": at_least(1),
    "batch_size": at_least(2),
    "unfreeze_last_blocks": at_least(0),
    "lora_rank": at_least(0),
    "num_local_crops": at_least(0),
    "out_dim": at_least(2),
    "head_hidden_dim": at_least(1),
    "head_bottleneck_dim": at_least(1),
    "collapse_patience": at_least(0),
    "max_steps": at_least(0),
    "lr": Limit(0.0, 1.0, low_open=True),
    "weight_decay": Limit(0.0, 1.0),
    "warmup_fraction": Limit(0.0, 1.0, high_open=True),
    "lora_alpha": Limit(0.0, math.inf, low_open=True),
    "rotation_degrees": Limit(0.0, 180.0),
    "flip_prob": Limit(0.0, 1.0),
    "teacher_momentum": Limit(0.0, 1.0),
    "center_momentum": Limit(0.0, 1.0),
    "teacher_temp": Limit(0.0, math.inf, low_open=True),
    "student_temp": Limit(0.0, math.inf, low_open=True),
    "koleo_weight": Limit(0.0, math.inf),
    "collapse_std_floor": Limit(0.0, math.inf),
    "collapse_entropy_floor": Limit(0.0, 1.0),
    "collapse_uniform_ceiling": Limit(0.0, 1.0),
}
