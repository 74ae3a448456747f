"""KFP's cron format (robfig/cron v1, evaluated in UTC) for recurring runs: six fields, **seconds first**::

    seconds  minutes  hours  day-of-month  month  day-of-week
    0-59     0-59     0-23   1-31 or ?     1-12 or JAN-DEC   0-6 or SUN-SAT, or ?

Each field is ``*``, a value, a range ``a-b``, a step ``*/n`` / ``a-b/n`` / ``a/n``, or a comma list of those.
A five-field (Unix) expression is refused: KFP would silently read it as seconds..month, so
``0 3 1 * *`` would run every day at 01:03:00 rather than monthly. The monthly retrain default,
``0 0 3 1 * *``, is 03:00:00 UTC on the first of every month. Descriptors (``@monthly``, ``@every 24h``) are
accepted as KFP accepts them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

DEFAULT_CRON = "0 0 3 1 * *"


class CronError(ValueError):
    """A cron expression KFP would refuse or misread; the message names the field and what is allowed."""


@dataclass(frozen=True)
class CronField:
    name: str
    low: int
    high: int
    names: Mapping[str, int] = field(default_factory=dict)
    question_mark: bool = False

    def allowed(self) -> str:
        parts = [f"{self.low}-{self.high}"]
        if self.names:
            keys = list(self.names)
            parts.append(f"{keys[0]}-{keys[-1]}")
        parts.append("*")
        if self.question_mark:
            parts.append("?")
        return " or ".join(parts) + ", ranges a-b, steps */n or a-b/n, lists a,b"


_MONTHS = {
    m: i + 1 for i, m in enumerate(("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"))
}
_DAYS = {d: i for i, d in enumerate(("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"))}
CRON_FIELDS = (
    CronField("seconds", 0, 59),
    CronField("minutes", 0, 59),
    CronField("hours", 0, 23),
    CronField("day-of-month", 1, 31, question_mark=True),
    CronField("month", 1, 12, _MONTHS),
    CronField("day-of-week", 0, 6, _DAYS, question_mark=True),
)
CRON_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")
_NUMBER = re.compile(r"^\d+$")


def validate_cron(expr: str) -> str:
    """Check a KFP cron expression; returns it with single spaces. Raises `CronError` naming the bad field."""
    if not isinstance(expr, str) or not expr.strip():
        raise CronError(f"cron={expr!r} is empty; expected 6 fields: {_layout()}, e.g. {DEFAULT_CRON!r}")
    text = " ".join(expr.split())
    if text.startswith("@"):
        return _validate_descriptor(text)
    parts = text.split(" ")
    if len(parts) == 5:
        raise CronError(
            f"cron={text!r} has 5 fields; KFP cron needs 6 with the seconds field first ({_layout()}). "
            f"KFP would read these 5 as seconds..month; for this schedule write {'0 ' + text!r}"
        )
    if len(parts) != 6:
        raise CronError(f"cron={text!r} has {len(parts)} fields; expected 6: {_layout()}, e.g. {DEFAULT_CRON!r}")
    for value, spec in zip(parts, CRON_FIELDS, strict=True):
        _check_cron_field(text, value, spec)
    return text


def _layout() -> str:
    return " ".join(f.name for f in CRON_FIELDS)


def _validate_descriptor(text: str) -> str:
    if text.lower() in CRON_DESCRIPTORS:
        return text
    head, _, rest = text.partition(" ")
    if head.lower() == "@every" and _DURATION.match(rest.strip()):
        return text
    raise CronError(
        f"cron={text!r} is not a known descriptor; allowed: {', '.join(CRON_DESCRIPTORS)}, "
        f"'@every <duration>' (e.g. @every 24h), or 6 fields: {_layout()}"
    )


def _check_cron_field(expr: str, value: str, spec: CronField) -> None:
    def bad(reason: str) -> CronError:
        return CronError(f"cron={expr!r}: {spec.name} field {value!r} {reason}; allowed: {spec.allowed()}")

    for item in value.split(","):
        if not item:
            raise bad("has an empty list item")
        range_part, slash, step_part = item.partition("/")
        if slash and (not _NUMBER.match(step_part) or int(step_part) == 0):
            raise bad(f"has step {step_part!r}, which must be a whole number >= 1")
        if range_part in ("*", "?"):
            if range_part == "?" and not spec.question_mark:
                raise bad("uses '?', which only day-of-month and day-of-week accept")
            continue
        bounds = range_part.split("-")
        if len(bounds) > 2 or not all(bounds):
            raise bad(f"has a malformed range {range_part!r}")
        numbers = [_cron_value(b, spec, bad) for b in bounds]
        if len(numbers) == 2 and numbers[0] > numbers[1]:
            raise bad(f"has a range {range_part!r} whose start is after its end")


def _cron_value(token: str, spec: CronField, bad: Callable[[str], CronError]) -> int:
    upper = token.upper()
    if upper in spec.names:
        return spec.names[upper]
    if not _NUMBER.match(token):
        what = f"names {', '.join(spec.names)}" if spec.names else "no names"
        raise bad(f"has {token!r}, which is not a number or a name ({spec.name} takes {what})")
    number = int(token)
    if not spec.low <= number <= spec.high:
        raise bad(f"has {number}, outside {spec.low}-{spec.high}")
    return number
