"""PEFT specs, torch-free: `PeftSpec` (how to adapt a model) and `PeftChoice` (a recipe's peft section).

`PeftChoice` is a `PeftSpec` plus ``extra_trainable``, validated by the same code; a recipe additionally bounds
rank to [1, 1024] and alpha to (0, 10000] (`PeftChoice.bounded`). The torch side (apply / merge) is
visionpipe/training/peft.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from visionpipe.specs.checks import SpecError, in_range, one_of

METHODS: tuple[str, ...] = ("none", "lora", "dora")
MAX_RANK = 1024  # a recipe's bound on peft.rank
MAX_ALPHA = 1e4  # a recipe's bound on peft.alpha


class PeftError(SpecError):
    """A PEFT spec is invalid or cannot be applied to the model."""


@dataclass(frozen=True)
class PeftSpec:
    """How to adapt a model: method (none | lora | dora), adapter rank, alpha, dropout, target modules.

    target_modules are module-name suffixes (peft semantics: a module matches when its qualified name equals
    the target or ends with ``.<target>``); empty means the architecture's defaults
    (`visionpipe.specs.registry.ArchInfo.default_targets`).
    """

    # recipes bound rank and alpha (a class setting, not a dataclass field)
    bounded: ClassVar[bool] = False

    method: str = "none"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        one_of("peft.method", self.method, METHODS, PeftError)
        if self.bounded:
            in_range("peft.rank", self.rank, 1, MAX_RANK, error=PeftError)
            in_range("peft.alpha", self.alpha, 0.0, MAX_ALPHA, low_open=True, error=PeftError)
        else:
            if self.rank < 1:
                raise PeftError(f"peft.rank={self.rank} must be >= 1")
            if not self.alpha > 0:
                raise PeftError(f"peft.alpha={self.alpha} must be > 0")
        in_range("peft.dropout", self.dropout, 0.0, 1.0, high_open=True, error=PeftError)
        if any(not t for t in self.target_modules):
            raise PeftError(f"peft.target_modules={self.target_modules} contains an empty name")

    def to_dict(self) -> dict[str, object]:
        return {
            "method": self.method,
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": list(self.target_modules),
        }


@dataclass(frozen=True)
class PeftChoice(PeftSpec):
    """A recipe's peft section. method: none (full fine-tuning) | lora | dora, on the attention and MLP
    projections of vit / dinov2. target_modules: module name suffixes (empty = the architecture's default
    projections). extra_trainable: further parameter-name prefixes left trainable. The head is always trained.
    """

    bounded: ClassVar[bool] = True

    extra_trainable: tuple[str, ...] = ()

    def spec(self) -> PeftSpec:
        """The plain `PeftSpec` (without extra_trainable)."""
        return PeftSpec(self.method, self.rank, self.alpha, self.dropout, self.target_modules)
