"""Shared validation helpers of the specs: every message names the field, the value given and the allowed values."""

from __future__ import annotations

from collections.abc import Sequence


class SpecError(ValueError):
    """A spec (architecture, preprocessing, PEFT) holds a disallowed value; the message names the field."""


def one_of(name: str, value: object, allowed: Sequence[object], error: type[ValueError] = SpecError) -> None:
    """Refuse `value` unless it is one of `allowed`."""
    if value not in allowed:
        raise error(f"{name}={value!r} is not allowed; allowed values: {', '.join(map(str, allowed))}")


def in_range(
    name: str,
    value: float,
    low: float,
    high: float,
    low_open: bool = False,
    high_open: bool = False,
    error: type[ValueError] = SpecError,
) -> None:
    """Refuse `value` outside [low, high] (an open end excludes its bound)."""
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise error(f"{name}={value!r} is out of range; allowed values: {interval}")
