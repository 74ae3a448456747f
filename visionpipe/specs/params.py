"""The run form of both pipelines as one typed constraint table (torch-, numpy- and kfp-free).

Every run-form parameter of the pipelines "training" and "monthly-retrain" is one `Param` here: its KFP type,
its default, and what it accepts. The CLI checks `-p` values against it before `visionpipe run` / `submit` /
`schedule` contact anything, and each pipeline's first step checks the whole form again, so a run started from
the Kubeflow UI with a bad value fails before any data is read. A bad value is refused with the field, the
value given and the allowed values, all bad fields at once (in the spirit of scikit-learn's
``sklearn/utils/_param_validation.py``).

The allowed values are the ones the phases accept. The phase modules import numpy, so the choices are written
here and tests/test_params.py keeps them equal to the phases' own constants (calibration methods,
conformal scores, objectives, policies, ranges).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal

Kind = Literal["STRING", "NUMBER_INTEGER", "NUMBER_DOUBLE", "BOOLEAN", "LIST", "STRUCT"]
Value = str | int | float | bool | list[object] | dict[str, object]
PIPELINES: Final = ("training", "monthly-retrain")

# What the phases accept (tests/test_params.py compares each with the phase's own constant).
CALIBRATION_METHODS: Final = ("auto", "identity", "temperature", "platt", "beta", "isotonic")  # calibration.py
CONFORMAL_SCORES: Final = ("lac", "aps", "aps-conservative", "raps")  # serving/policies.py CONFORMAL_METHODS
ACTIVE_POLICIES: Final = ("threshold", "scrc")  # calibration.py ACTIVE_CHOICES
COMPILED_RUNTIMES: Final = ("none", "onnx")  # serving/compiled.py COMPILED_RUNTIMES (bundle_validation)
SIMPLE_OBJECTIVES: Final = ("mcc", "f1", "youden")  # threshold_sweep.py
CONSTRAINED_OBJECTIVES: Final = ("recall_at_precision", "precision_at_recall")  # threshold_sweep.py
SPLIT_RATIOS: Final = ("train_ratio", "val_select_ratio", "val_calib_ratio", "val_test_ratio")
RATIO_SUM_TOLERANCE: Final = 1e-6  # data_fetch.py: math.isclose(sum, 1.0, abs_tol=1e-6)
MAX_IMAGE_SIZE: Final = 4096  # data_fetch.py
MAX_TRAIN_WORKERS: Final = 64  # visionpipe/kfp/trainjob.py MAX_WORKERS (tests/test_trainjob.py keeps them equal)
_CONSTRAINED = re.compile(r"^(recall_at_precision|precision_at_recall)>=([0-9]*\.?[0-9]+)$")  # threshold_sweep.py

PYTHON_TYPES: Final[Mapping[Kind, tuple[type, ...]]] = {
    "STRING": (str,),
    "NUMBER_INTEGER": (int,),
    "NUMBER_DOUBLE": (float, int),
    "BOOLEAN": (bool,),
    "LIST": (list,),
    "STRUCT": (dict,),
}
TYPE_NAMES: Final[Mapping[Kind, str]] = {
    "STRING": "a string",
    "NUMBER_INTEGER": "an integer",
    "NUMBER_DOUBLE": "a number",
    "BOOLEAN": "true or false",
    "LIST": "a JSON list",
    "STRUCT": "a JSON object",
}


class ParameterError(ValueError):
    """One or more run-form values are not accepted; the message names each field, its value and what is allowed."""


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Final = _Required()


@dataclass(frozen=True)
class Interval:
    """A numeric range; `None` is unbounded on that side."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def __str__(self) -> str:
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        return f"{left}{low}, {high}{right}"


Check = Callable[[object], bool]


@dataclass(frozen=True)
class Param:
    """One run-form parameter: its KFP type and default, and the values it accepts."""

    name: str
    kind: Kind
    default: Value | _Required
    choices: tuple[str, ...] = ()
    interval: Interval | None = None
    check: Check | None = None  # further rule for values a choice list or range cannot express
    allowed_text: str = ""  # how the check's rule reads in an error message
    note: str = ""  # e.g. what a special value means ("negative = gate off")

    @property
    def required(self) -> bool:
        return isinstance(self.default, _Required)

    def allowed(self) -> str:
        if self.allowed_text:
            text = self.allowed_text
        elif self.choices:
            text = "one of " + ", ".join(self.choices)
        elif self.interval is not None:
            text = f"{TYPE_NAMES[self.kind]} in {self.interval}"
        else:
            text = TYPE_NAMES[self.kind]
        return f"{text} ({self.note})" if self.note else text

    def problem(self, value: object) -> str | None:
        """None when `value` is accepted, else what is wrong with it."""
        if (isinstance(value, bool) and self.kind != "BOOLEAN") or not isinstance(value, PYTHON_TYPES[self.kind]):
            return f"{self.name}={value!r} is not {TYPE_NAMES[self.kind]}; allowed: {self.allowed()}"
        ok = True
        if self.choices and value not in self.choices:
            ok = False
        if self.interval is not None and isinstance(value, int | float) and not self.interval.contains(float(value)):
            ok = False
        if self.check is not None and not self.check(value):
            ok = False
        return None if ok else f"{self.name}={value!r} is not allowed; allowed: {self.allowed()}"


# --------------------------------------------------------------------------------------------- checks
def _objective_ok(value: object) -> bool:
    if not isinstance(value, str):
        return False
    text = value.strip()
    match = _CONSTRAINED.match(text.replace(" ", ""))
    if match:
        return 0.0 <= float(match.group(2)) <= 1.0
    return text in SIMPLE_OBJECTIVES


def _json_object_ok(value: object) -> bool:
    try:
        return isinstance(json.loads(str(value)), dict)
    except ValueError:
        return False


def _month_ok(value: object) -> bool:
    if value == "":
        return True
    try:
        datetime.strptime(str(value), "%Y-%m")
    except ValueError:
        return False
    return True


def _non_empty(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


OBJECTIVE_TEXT: Final = (
    f"one of {', '.join(SIMPLE_OBJECTIVES)}, recall_at_precision>=P or precision_at_recall>=R with P, R in [0, 1]"
)
UNIT_OPEN: Final = Interval(0.0, 1.0, low_open=True, high_open=True)
UNIT_HALF_OPEN: Final = Interval(0.0, 1.0, low_open=True)  # (0, 1]


def _shared() -> list[Param]:
    """Parameters both pipelines take, with the same meaning and constraints."""
    return [
        Param("positive_class", "STRING", "", note="empty = none; else one of the class names"),
        Param(
            "image_size",
            "NUMBER_INTEGER",
            0,
            interval=Interval(0, MAX_IMAGE_SIZE),
            note="0 = native size if all images share one, else the recipe's input side",
        ),
        Param("seed", "NUMBER_INTEGER", 0),
        Param("compiled_runtime", "STRING", "none", choices=COMPILED_RUNTIMES),
        Param("recipe", "STRING", "digits-cnn", check=_non_empty, allowed_text="a recipe name or YAML path"),
        Param(
            "recipe_overrides_json",
            "STRING",
            "{}",
            check=_json_object_ok,
            allowed_text='a JSON object, e.g. {"epochs": 3}',
        ),
        Param("checkpoint_uri", "STRING", ""),
        Param(
            "train_workers",
            "NUMBER_INTEGER",
            1,
            interval=Interval(1, MAX_TRAIN_WORKERS),
            note="1 = one process; N > 1: data-parallel (a TrainJob on a cluster, needs an s3:// checkpoint_uri)",
        ),
        Param("objective", "STRING", "mcc", check=_objective_ok, allowed_text=OBJECTIVE_TEXT),
        Param("target_selective_accuracy", "NUMBER_DOUBLE", 0.99, interval=UNIT_HALF_OPEN),
        Param("bootstrap", "NUMBER_INTEGER", 1000, interval=Interval(1)),
        Param("calibration_method", "STRING", "auto", choices=CALIBRATION_METHODS),
        Param("alpha", "NUMBER_DOUBLE", 0.1, interval=UNIT_OPEN),
        Param("conformal_score", "STRING", "aps", choices=CONFORMAL_SCORES),
        Param("scrc_selection_rate", "NUMBER_DOUBLE", 0.9, interval=UNIT_HALF_OPEN),
        Param("scrc_delta", "NUMBER_DOUBLE", 0.1, interval=UNIT_OPEN),
        Param("active_policy", "STRING", "threshold", choices=ACTIVE_POLICIES),
        Param("model_name", "STRING", "digits", check=_non_empty, allowed_text="a non-empty name"),
        Param("min_accuracy", "NUMBER_DOUBLE", -1.0, interval=Interval(high=1.0), note="negative = gate off"),
        Param("min_mcc", "NUMBER_DOUBLE", -2.0, interval=Interval(high=1.0), note="below -1 = gate off"),
        Param("max_ece", "NUMBER_DOUBLE", -1.0, interval=Interval(high=1.0), note="negative = gate off"),
        Param("champion_margin", "NUMBER_DOUBLE", 0.0, interval=Interval(0.0)),
        Param("destination", "STRING", "bundles", check=_non_empty, allowed_text="s3://bucket/prefix or a folder"),
    ]


def _training() -> list[Param]:
    ratio = Interval(0.0, 1.0, low_open=True, high_open=True)
    return [
        Param("source", "STRING", "builtin://sklearn-digits", check=_non_empty, allowed_text="a data source URI"),
        Param("train_ratio", "NUMBER_DOUBLE", 0.7, interval=ratio),
        Param("val_select_ratio", "NUMBER_DOUBLE", 0.1, interval=ratio),
        Param("val_calib_ratio", "NUMBER_DOUBLE", 0.1, interval=ratio),
        Param("val_test_ratio", "NUMBER_DOUBLE", 0.1, interval=ratio),
        Param("max_bad_fraction", "NUMBER_DOUBLE", 0.05, interval=Interval(0.0, 1.0, high_open=True)),
        Param("domain_pretrain_enabled", "BOOLEAN", False),
        Param("pretrain_epochs", "NUMBER_INTEGER", 5, interval=Interval(1)),
        Param("pretrain_max_steps", "NUMBER_INTEGER", 0, interval=Interval(0), note="0 = no cap"),
        Param("description", "STRING", ""),
        Param("submitter", "STRING", ""),
        Param("parent_bundle", "STRING", ""),
        Param("champion_uri", "STRING", ""),
        Param("threshold_at_half", "BOOLEAN", False, note="needs positive_class"),
        *_shared(),
    ]


def _monthly() -> list[Param]:
    return [
        Param("data_prefix", "STRING", REQUIRED, check=_non_empty, allowed_text="a folder or s3://bucket/prefix"),
        Param("champion_uri", "STRING", REQUIRED, check=_non_empty, allowed_text="a bundle folder or s3:// URI"),
        Param("data_month", "STRING", "", check=_month_ok, allowed_text="YYYY-MM, e.g. 2026-10, or empty"),
        Param("hard_examples_prefix", "STRING", ""),
        Param("submitter", "STRING", "monthly-retrain"),
        Param("start_canary_enabled", "BOOLEAN", False),
        Param("isvc_name", "STRING", "digits", check=_non_empty, allowed_text="an InferenceService name"),
        Param("namespace", "STRING", "kubeflow-user", check=_non_empty, allowed_text="a Kubernetes namespace"),
        Param("canary_percent", "NUMBER_INTEGER", 10, interval=Interval(1, 99)),
        *_shared(),
    ]


TABLE: Final[Mapping[str, Mapping[str, Param]]] = {
    "training": {p.name: p for p in _training()},
    "monthly-retrain": {p.name: p for p in _monthly()},
}


def params(pipeline: str) -> Mapping[str, Param]:
    """The run form of `pipeline` ("training" or "monthly-retrain"): name -> Param."""
    try:
        return TABLE[pipeline]
    except KeyError:
        raise ParameterError(f"pipeline={pipeline!r} is not one of {', '.join(PIPELINES)}") from None


def defaults(pipeline: str) -> dict[str, object]:
    """Name -> default of every parameter of `pipeline` that has one (required ones are left out)."""
    return {name: p.default for name, p in params(pipeline).items() if not p.required}


def kinds(pipeline: str) -> dict[str, Kind]:
    """Name -> KFP parameter type (what the one `-p` parser coerces to)."""
    return {name: p.kind for name, p in params(pipeline).items()}


def problems(pipeline: str, values: Mapping[str, object]) -> list[str]:
    """Every problem of `values` (given fields over the defaults), one message per field; [] when it is valid.

    Required fields that are absent are not reported (the run form asks for them; KFP refuses a run without
    them); a given value is checked whatever it is."""
    table = params(pipeline)
    found: list[str] = []
    unknown = [name for name in values if name not in table]
    if unknown:
        found.append(
            f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} of {pipeline}; "
            f"parameters: {', '.join(sorted(table))}"
        )
    for name, value in values.items():
        if name in table and (message := table[name].problem(value)) is not None:
            found.append(message)
    merged = {**defaults(pipeline), **{k: v for k, v in values.items() if k in table}}
    found += _cross_field(pipeline, merged)
    return found


def validate_run_form(pipeline: str, values: Mapping[str, object]) -> None:
    """Raise `ParameterError` naming every bad field (value given, allowed values); return None when valid."""
    found = problems(pipeline, values)
    if found:
        head = f"{len(found)} bad run-form value{'s' if len(found) > 1 else ''} for {pipeline}"
        raise ParameterError(head + ":\n  " + "\n  ".join(found))


def _cross_field(pipeline: str, merged: Mapping[str, object]) -> list[str]:
    found: list[str] = []
    if pipeline == "training":
        ratios = [merged.get(name) for name in SPLIT_RATIOS]
        numbers = [float(r) for r in ratios if isinstance(r, int | float) and not isinstance(r, bool)]
        if len(numbers) == len(SPLIT_RATIOS):
            total = sum(numbers)
            if not math.isclose(total, 1.0, abs_tol=RATIO_SUM_TOLERANCE):
                shown = ", ".join(f"{n}={r!r}" for n, r in zip(SPLIT_RATIOS, ratios, strict=True))
                found.append(f"split ratios {shown} sum to {total:.6g}; allowed: four ratios summing to 1")
        if merged.get("threshold_at_half") is True and not merged.get("positive_class"):
            found.append(
                "threshold_at_half=True needs positive_class (a two-class task's positive class name); "
                "allowed: threshold_at_half=false, or set positive_class"
            )
    return found


# --------------------------------------------------------------------------------------------- -p NAME=VALUE
def parse_assignments(pairs: Sequence[str], kinds: Mapping[str, Kind], where: str) -> dict[str, Value]:
    """The one ``-p NAME=VALUE`` parser: strings -> values typed by `kinds` (name -> KFP type), unknown names
    refused. `where` names the run form in messages (a pipeline, or a package file). Raises `ParameterError`."""
    out: dict[str, Value] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ParameterError(f"-p {pair!r}: expected NAME=VALUE (a name=value pair, e.g. -p seed=3)")
        if kinds and name not in kinds:
            raise ParameterError(
                f"-p {pair!r}: unknown pipeline parameter {name!r}: {where} has no parameter {name!r}; "
                f"parameters: {', '.join(sorted(kinds))}"
            )
        out[name] = coerce(name, raw, kinds.get(name, "STRING"))
    return out


def coerce(name: str, raw: str, kind: Kind) -> Value:
    """One ``-p`` value as `kind`: integers, numbers, true/false/1/0, JSON lists and objects; text as is."""
    try:
        if kind == "NUMBER_INTEGER":
            return int(raw)
        if kind == "NUMBER_DOUBLE":
            return float(raw)
        if kind == "BOOLEAN":
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError("expected true or false")
            return raw.lower() in ("true", "1")
        if kind in ("LIST", "STRUCT"):
            value = json.loads(raw)
            expected = list if kind == "LIST" else dict
            if not isinstance(value, expected):
                raise ValueError(f"expected a JSON {expected.__name__}")
            return value
    except ValueError as exc:
        raise ParameterError(f"-p {name}={raw!r}: {exc} (parameter type {kind})") from exc
    return raw
