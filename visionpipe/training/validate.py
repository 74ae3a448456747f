"""Range checks for config dataclasses: one table of limits per config, one checker, errors naming the field,
the value and the allowed interval."""

import math
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Limit:
    """Allowed interval of a number: [low, high], either end open when low_open / high_open."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def admits(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        if self.high == math.inf and not self.low_open:
            return f">= {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


def at_least(low: int) -> Limit:
    return Limit(low=low)


def check_limits(
    prefix: str, values: Mapping[str, float], limits: Mapping[str, Limit], error: type[ValueError]
) -> None:
    """Raise `error` for the first field of `limits` whose value lies outside its interval."""
    for name, limit in limits.items():
        value = values[name]
        if not limit.admits(value):
            raise error(f"{prefix}{name}={value} must be {limit.describe()}")


def check_ordered_pair(name: str, pair: tuple[float, float], low: float, high: float, error: type[ValueError]) -> None:
    """A (low, high) pair inside (low, high] with pair[0] <= pair[1]."""
    if not low < pair[0] <= pair[1] <= high:
        raise error(f"{name}={pair} must satisfy {low:g} < low <= high <= {high:g}")
