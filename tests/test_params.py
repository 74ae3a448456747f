"""visionpipe/specs/params.py: the run-form table agrees with the compiled pipelines and with the phases."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from visionpipe.specs import params as P

COMPILED = Path(__file__).resolve().parents[1] / "visionpipe" / "kfp" / "compiled"


def _compiled_parameters(pipeline: str) -> dict[str, dict[str, object]]:
    spec = next(iter(yaml.safe_load_all((COMPILED / f"{pipeline}.yaml").read_text())))
    parameters: dict[str, dict[str, object]] = spec["root"]["inputDefinitions"]["parameters"]
    return parameters


# --------------------------------------------------------------------------------------------- vs compiled YAML
@pytest.mark.parametrize("pipeline", P.PIPELINES)
def test_table_is_exactly_the_compiled_run_form(pipeline: str) -> None:
    compiled = _compiled_parameters(pipeline)
    table = P.params(pipeline)
    assert sorted(table) == sorted(compiled), "table and compiled run form differ"
    for name, entry in compiled.items():
        param = table[name]
        assert param.kind == entry["parameterType"], name
        if "defaultValue" not in entry:
            assert param.required, f"{name}: the compiled form has no default, the table has {param.default!r}"
            continue
        assert not param.required, name
        default = entry["defaultValue"]
        if param.kind == "NUMBER_INTEGER":  # the IR stores integer defaults as numbers (1000.0)
            assert float(param.default) == default and isinstance(param.default, int), name  # type: ignore[arg-type]
        else:
            assert param.default == default and type(param.default) is type(default), name


@pytest.mark.parametrize("pipeline", P.PIPELINES)
def test_defaults_are_valid(pipeline: str) -> None:
    P.validate_run_form(pipeline, P.defaults(pipeline))
    P.validate_run_form(pipeline, {})


# --------------------------------------------------------------------------------------------- messages
def test_bad_values_are_all_named_with_what_is_allowed() -> None:
    with pytest.raises(P.ParameterError) as err:
        P.validate_run_form(
            "training",
            {"calibration_method": "bogus", "alpha": 1.5, "seed": "3", "typo": 1, "threshold_at_half": True},
        )
    message = str(err.value)
    assert "5 bad run-form values for training" in message
    assert (
        "calibration_method='bogus'" in message
        and "one of auto, identity, temperature, platt, beta, isotonic" in message
    )
    assert "alpha=1.5" in message and "(0, 1)" in message
    assert "seed='3' is not an integer" in message
    assert "unknown parameter 'typo' of training" in message
    assert "threshold_at_half=True needs positive_class" in message


@pytest.mark.parametrize(
    ("ratios", "ok"),
    [
        ((0.7, 0.1, 0.1, 0.1), True),
        ((0.6, 0.2, 0.1, 0.1), True),
        ((0.7, 0.1, 0.1, 0.1 + 5e-7), True),
        ((0.7, 0.1, 0.1, 0.2), False),
        ((1.0, 0.0, 0.0, 0.0), False),
        ((0.8, 0.2, 0.1, -0.1), False),
    ],
)
def test_split_ratios_sum_to_one_and_lie_in_the_open_unit_interval(
    ratios: tuple[float, float, float, float], ok: bool
) -> None:
    values = dict(zip(P.SPLIT_RATIOS, ratios, strict=True))
    assert (P.problems("training", values) == []) is ok


def test_bool_is_not_a_number_and_an_int_is_a_float() -> None:
    assert P.problems("training", {"alpha": 0}) != []  # 0 is outside (0, 1), but is a number
    assert "is not a number" in P.problems("training", {"alpha": True})[0]
    assert P.problems("training", {"min_accuracy": 1}) == []
    assert "is not an integer" in P.problems("training", {"seed": 1.0})[0]


def test_monthly_required_fields_and_month() -> None:
    assert "data_prefix" not in P.defaults("monthly-retrain")
    assert P.problems("monthly-retrain", {"data_prefix": "s3://d", "champion_uri": "s3://b/m/1"}) == []
    assert "data_prefix=''" in P.problems("monthly-retrain", {"data_prefix": ""})[0]
    assert "YYYY-MM" in P.problems("monthly-retrain", {"data_month": "2026-13"})[0]


def test_unknown_pipeline() -> None:
    with pytest.raises(P.ParameterError, match="not one of training, monthly-retrain"):
        P.params("nightly")


# --------------------------------------------------------------------------------------------- vs the phases
def test_choices_are_the_phases_constants() -> None:
    from visionpipe.phases import calibration, threshold_sweep
    from visionpipe.serving import calibrators, policies

    assert P.CALIBRATION_METHODS == calibration.METHOD_CHOICES == ("auto", *calibrators.CALIBRATION_METHODS)
    assert P.CONFORMAL_SCORES == policies.CONFORMAL_METHODS
    assert P.ACTIVE_POLICIES == calibration.ACTIVE_CHOICES
    assert set(P.ACTIVE_POLICIES) <= set(policies.POLICY_KINDS)
    assert P.SIMPLE_OBJECTIVES == threshold_sweep.SIMPLE_OBJECTIVES
    assert P.CONSTRAINED_OBJECTIVES == threshold_sweep.CONSTRAINED_OBJECTIVES


def _accepts(call: Callable[[], object]) -> bool:
    try:
        call()
    except ValueError:
        return False
    return True


def _table_accepts(name: str, value: object, pipeline: str = "training") -> bool:
    return P.params(pipeline)[name].problem(value) is None


OBJECTIVES = [
    "mcc",
    "f1",
    "youden",
    " mcc ",
    "recall_at_precision>=0.9",
    "precision_at_recall >= 0.95",
    "recall_at_precision>=1",
    "recall_at_precision>=1.5",
    "recall_at_precision>0.9",
    "accuracy",
    "MCC",
    "",
    "precision_at_recall>=.5",
]


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_objective_rule_is_parse_objective(objective: str) -> None:
    from visionpipe.phases.threshold_sweep import parse_objective

    assert _table_accepts("objective", objective) is _accepts(lambda: parse_objective(objective))


@pytest.mark.parametrize(
    ("field", "table_name", "value"),
    [
        *[("method", "calibration_method", m) for m in (*P.CALIBRATION_METHODS, "bogus", "Temperature", "")],
        *[("conformal_score", "conformal_score", s) for s in ("lac", "aps", "raps", "thr", "")],
        *[("active_policy", "active_policy", s) for s in ("threshold", "scrc", "hybrid", "")],
        *[("alpha", "alpha", v) for v in (0.0, 1e-9, 0.1, 0.999, 1.0)],
        *[("scrc_delta", "scrc_delta", v) for v in (0.0, 0.5, 1.0)],
        *[("scrc_selection_rate", "scrc_selection_rate", v) for v in (0.0, 0.5, 1.0, 1.01)],
    ],
)
def test_calibration_fields_agree_with_the_phase(field: str, table_name: str, value: object) -> None:
    import dataclasses

    from visionpipe.phases.calibration import CalibrationParams

    names = {f.name for f in dataclasses.fields(CalibrationParams)}
    key = table_name if table_name in names else field  # the phase's field has had either name
    phase = _accepts(lambda: CalibrationParams(**{key: value}))  # type: ignore[arg-type]
    assert _table_accepts(table_name, value) is phase


@pytest.mark.parametrize(
    ("field", "value"),
    [
        *[("min_accuracy", v) for v in (-1.0, 0.0, 1.0, 1.01)],
        *[("max_ece", v) for v in (-1.0, 0.5, 1.0, 1.5)],
        *[("min_mcc", v) for v in (-2.0, -1.0, 1.0, 1.1)],
        *[("champion_margin", v) for v in (-0.1, 0.0, 0.2)],
    ],
)
def test_gates_agree_with_bundle_validation(field: str, value: float) -> None:
    from visionpipe.phases.bundle_validation import Gates

    assert _table_accepts(field, value) is _accepts(lambda: Gates(**{field: value}))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        *[("image_size", v) for v in (-1, 0, 1, 4096, 4097)],
        *[("max_bad_fraction", v) for v in (-0.1, 0.0, 0.5, 1.0)],
    ],
)
def test_data_fetch_fields_agree_with_the_phase(field: str, value: object) -> None:
    from visionpipe.phases.data_fetch import FetchConfig

    assert _table_accepts(field, value) is _accepts(lambda: FetchConfig(**{field: value}))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "ratios", [(0.7, 0.1, 0.1, 0.1), (0.7, 0.1, 0.1, 0.2), (1.0, 0.0, 0.0, 0.0), (0.5, 0.5, 0.1, -0.1)]
)
def test_split_rule_agrees_with_data_fetch(ratios: tuple[float, float, float, float]) -> None:
    from visionpipe.phases.data_fetch import FetchConfig

    values = dict(zip(P.SPLIT_RATIOS, ratios, strict=True))
    assert (P.problems("training", values) == []) is _accepts(lambda: FetchConfig(ratios=ratios))


@pytest.mark.parametrize(
    ("field", "value"),
    [*[("bootstrap", v) for v in (0, 1, 1000)], *[("target_selective_accuracy", v) for v in (0.0, 0.5, 1.0, 1.1)]],
)
def test_sweep_fields_agree_with_the_phase(field: str, value: float, tmp_path: Path) -> None:
    from visionpipe.phases.threshold_sweep import SweepError, run

    try:  # the range checks come first; a valid value fails later, on the missing logits
        run(tmp_path / "no-logits", tmp_path / "out", **{field: value})  # type: ignore[arg-type]
        phase = True
    except SweepError as exc:
        phase = field not in str(exc)
    except (OSError, ValueError):
        phase = True
    assert _table_accepts(field, value) is phase


@pytest.mark.parametrize("month", ["", "2026-10", "2026-13", "26-10", "2026/10", "october"])
def test_data_month_agrees_with_the_phase(month: str) -> None:
    from visionpipe.phases.monthly import resolve_month

    assert _table_accepts("data_month", month, "monthly-retrain") is _accepts(lambda: resolve_month(month))


@pytest.mark.parametrize("percent", [0, 1, 50, 99, 100, 101])
def test_canary_percent_agrees_with_the_step_in_every_mode(percent: int) -> None:
    """The run form accepts exactly the percentages the canary step accepts in both deployment modes (the form
    cannot know the InferenceService's mode; Knative refuses 100)."""
    from visionpipe.rollout.canary import MODES, start_patch

    assert _table_accepts("canary_percent", percent, "monthly-retrain") is all(
        _accepts(lambda mode=mode: start_patch(mode, "s3://b/m/1", percent)) for mode in MODES
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [("pretrain_epochs", 0), ("pretrain_epochs", 1), ("pretrain_max_steps", -1), ("pretrain_max_steps", 0)],
)
def test_pretrain_fields_agree_with_the_phase(field: str, value: int) -> None:
    from visionpipe.training.pretrain_config import PretrainConfig

    key = {"pretrain_epochs": "epochs", "pretrain_max_steps": "max_steps"}[field]
    assert _table_accepts(field, value) is _accepts(lambda: PretrainConfig(**{key: value}))  # type: ignore[arg-type]


def test_threshold_at_half_without_positive_class_is_what_export_refuses() -> None:
    from visionpipe.phases import export

    # export.derive_threshold_at_half refuses a bundle without a positive class; the table refuses it up front
    assert "positive class" in Path(export.__file__).read_text()
    assert P.problems("training", {"threshold_at_half": True, "positive_class": "roadwork"}) == []
    assert P.problems("training", {"threshold_at_half": True}) != []
