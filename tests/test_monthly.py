"""Monthly retrain: month resolution, data + hard examples, warm start from the champion, the champion gate
(end to end through kfp.local). The canary step: tests/test_canary.py."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import numpy as np
import pytest
from images import png_bytes

from visionpipe.kfp.local import local_job_times, run_pipeline
from visionpipe.kfp.monthly import monthly_retrain_pipeline
from visionpipe.phases.monthly import (
    MonthlyError,
    champion_backbone,
    choose_month,
    gather_month,
    record_month,
    resolve_month,
)
from visionpipe.serving import bundle as B
from visionpipe.serving import storage
from visionpipe.serving.models import build_model, load_pretrained_backbone

MONTH = "2026-10"
NEXT_MONTH = "2026-11"  # the second month of the two-month run (new data, no hard examples)


SCHEDULE = "{{$.pipeline_job_schedule_time_utc}}"  # what KFP < 2.16 leaves in the input (resolve.go)
CREATE = "{{$.pipeline_job_create_time_utc}}"
NOW = dt.datetime(2026, 11, 20, 9, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("data_month", "schedule_time", "create_time", "expected", "basis"),
    [
        # KFP >= 2.17, recurring run: the slot's time, whatever the creation time (a late catch-up run)
        ("", "2026-12-01T03:00:00Z", "2027-02-10T08:00:00Z", "2026-11", "schedule_time"),
        ("", "2026-01-01T03:00:00Z", "2026-01-01T03:00:02Z", "2025-12", "schedule_time"),  # across the year
        ("", "2026-01-01T00:30:00+01:00", "", "2025-11", "schedule_time"),  # 2025-12-31T23:30Z in UTC
        ("", "2026-12-01T03:00:00.123456Z", "", "2026-11", "schedule_time"),
        ("", "2026-12-01T03:00:00", "", "2026-11", "schedule_time"),  # no offset: UTC
        # an explicit data_month wins over everything
        ("2026-03", "2026-12-01T03:00:00Z", "2027-02-10T08:00:00Z", "2026-03", "data_month"),
        # KFP 2.16 fills nothing: the creation time, then the clock
        ("", "", "2027-02-10T08:00:00Z", "2027-01", "create_time"),
        ("", "", "", "2026-10", "clock"),
        # KFP < 2.16 hands the literal placeholders through; zero times count as unset
        ("", SCHEDULE, CREATE, "2026-10", "clock"),
        ("", SCHEDULE, "2026-07-01T00:00:05Z", "2026-06", "create_time"),
        ("", "1970-01-01T00:00:00Z", "2026-07-01T00:00:05Z", "2026-06", "create_time"),
        ("", "0001-01-01T00:00:00Z", "", "2026-10", "clock"),
    ],
)
def test_choose_month(data_month: str, schedule_time: str, create_time: str, expected: str, basis: str) -> None:
    choice = choose_month(data_month, schedule_time, create_time, now=NOW)
    assert (choice.month, choice.basis) == (expected, basis)
    assert resolve_month(data_month, schedule_time, create_time, now=NOW) == expected
    if basis in ("schedule_time", "create_time"):
        assert choice.time.endswith("Z") and choice.time in choice.describe()


@pytest.mark.parametrize("bad", ["2026-13", "10-2026", "last month"])
def test_bad_month_is_refused(bad: str) -> None:
    with pytest.raises(MonthlyError, match="must look like 2026-10"):
        resolve_month(bad)


@pytest.mark.parametrize(("field", "bad"), [("schedule_time", "yesterday"), ("create_time", "2026-13-01T00:00:00Z")])
def test_a_garbled_run_time_is_refused(field: str, bad: str) -> None:
    with pytest.raises(MonthlyError, match=rf"{field}='{bad}' is not an RFC 3339 time.*data_month=YYYY-MM"):
        choose_month("", **{field: bad})


CANDIDATE = "s3://visionpipe/bundles/digits/20270105-093000-cd34ef56"


@pytest.fixture(scope="module")
def month_prefix(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two months of new digits (from the champion's Dataset train split), the first with labelled hard examples,
    on disk."""
    from visionpipe.data.datasets import load_dataset

    ds = load_dataset(trained / "ds")
    train = ds.split("train", "fit")
    root = tmp_path_factory.mktemp("monthly")
    for k, name in enumerate(ds.classes):
        idx = np.flatnonzero(train.labels == k)[:26]
        for j, i in enumerate(idx[:12]):
            path = root / "data" / MONTH / name / f"{j:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png_bytes(train.images[i]))
        for j, i in enumerate(idx[12:14]):
            hard = root / "hard" / MONTH / "labelled" / name / f"h{j}.png"
            hard.parent.mkdir(parents=True, exist_ok=True)
            hard.write_bytes(png_bytes(train.images[i]))
        for j, i in enumerate(idx[14:26]):
            path = root / "data" / NEXT_MONTH / name / f"{j:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png_bytes(train.images[i]))
    return root


def test_gather_month_takes_new_data_and_labelled_hard_examples(month_prefix: Path, tmp_path: Path) -> None:
    month = gather_month(str(month_prefix / "data"), MONTH, str(month_prefix / "hard"), tmp_path / "images")
    assert month.month == MONTH
    assert sum(month.new_images.values()) == 120 and sum(month.hard_examples.values()) == 20
    assert len(list((tmp_path / "images").rglob("*.png"))) == 140
    dataset = tmp_path / "ds"
    dataset.mkdir()
    (dataset / "dataset.json").write_text(json.dumps({"source": str(tmp_path / "images"), "classes": ["0"]}))
    record_month(dataset, month)
    recorded = json.loads((dataset / "dataset.json").read_text())
    assert recorded["source"] == f"{month_prefix / 'data'}/{MONTH}" and recorded["month"] == MONTH
    assert recorded["classes"] == ["0"]


def test_a_month_without_data_names_the_month_and_the_prefix(month_prefix: Path, tmp_path: Path) -> None:
    data, hard = str(month_prefix / "data"), str(month_prefix / "hard")
    with pytest.raises(MonthlyError) as caught:
        gather_month(data, "", hard, tmp_path / "none", schedule_time="2026-10-01T03:00:00Z")
    message = str(caught.value)
    assert "no data for month 2026-09" in message and f"no images under {data}/2026-09" in message
    assert f"{hard}/2026-09/labelled" in message and "schedule time 2026-10-01T03:00:00Z" in message
    assert "data_month=YYYY-MM" in message


def test_champion_backbone_is_a_warm_start(candidate: Path, tmp_path: Path) -> None:
    info = champion_backbone(str(candidate), tmp_path / "warm")
    champion = B.read_bundle(candidate)
    assert info == {"parent_bundle": str(candidate), "parent_version": champion.version}
    fresh = build_model(champion.members[0].arch)
    load_pretrained_backbone(fresh, str(tmp_path / "warm"))
    reference = champion.load_models()[0]
    for (name, a), (_, b) in zip(
        fresh.backbone.state_dict().items(), reference.backbone.state_dict().items(), strict=True
    ):
        assert np.array_equal(a.numpy(), b.numpy()), name


MONTHLY_TINY = {"recipe_overrides_json": json.dumps({"epochs": 1, "preprocess": {"kind": "standard"}}), "bootstrap": 20}


def _published(destination: str, cache_dir: Path) -> dict[str, B.Bundle]:
    """URI (as export's storageUri, trailing /) -> bundle, for every bundle published under `destination`."""
    roots = [u.rsplit("/", 1)[0] for u in storage.list_uris(destination) if u.endswith("/bundle.json")]
    cache_dir.mkdir(parents=True, exist_ok=True)
    return {root + "/": B.read_bundle(root, cache_dir=cache_dir) for root in roots}


def _champion_score(report: str) -> float:
    """The champion's val_test score in the validation report's champion row."""
    (row,) = [line for line in report.splitlines() if line.startswith("| champion |")]
    assert "| pass |" in row, row
    match = re.search(r"vs champion (\d+\.\d+)", row)
    assert match, row
    return float(match.group(1))


@pytest.mark.slow
@pytest.mark.long  # `make test-long` (run by .ci/run): keeps `make test` within its 15 minutes
def test_two_months_give_two_bundles_the_second_gated_against_the_first(
    month_prefix: Path, candidate: Path, s3_bucket: str, tmp_path: Path
) -> None:
    """Month 1 (explicit data_month) is gated against the fixture champion; month 2 resolves its month from the
    schedule time the backend would fill for the 2026-12-01 slot, warm-starts from month 1's bundle and is gated
    against it. Two versions, two months in the provenance, no collision at export."""
    from visionpipe.data.datasets import load_dataset
    from visionpipe.phases.bundle_validation import split_metrics

    destination = f"{s3_bucket}/monthly"
    common = {
        **MONTHLY_TINY,
        "data_prefix": str(month_prefix / "data"),
        "hard_examples_prefix": str(month_prefix / "hard"),
        "champion_margin": 1.0,
        "destination": destination,
    }
    first = run_pipeline(
        monthly_retrain_pipeline, {**common, "data_month": MONTH, "champion_uri": str(candidate)}, tmp_path / "r1"
    )
    (first_uri,) = _published(destination, tmp_path / "c1")
    assert first.outputs["bundle_uri"] == first_uri  # export's KServe storageUri
    # the backend fills the schedule time of the 2026-12-01 slot; the creation time (a late catch-up) is ignored
    with local_job_times(schedule_time="2026-12-01T03:00:00Z", create_time="2027-01-15T10:00:00Z"):
        second = run_pipeline(monthly_retrain_pipeline, {**common, "champion_uri": first_uri}, tmp_path / "r2")
    bundles = _published(destination, tmp_path / "c2")
    assert set(bundles) == {first_uri, second.outputs["bundle_uri"]}, "two months, two bundles"
    a, b = bundles[first_uri], bundles[str(second.outputs["bundle_uri"])]
    assert a.version != b.version
    month = second.outputs["dataset"]
    assert (month.metadata["month"], month.metadata["month_basis"]) == (NEXT_MONTH, "schedule_time")
    assert month.metadata["month_time"] == "2026-12-01T03:00:00Z"
    assert f"## Month {NEXT_MONTH}" in second.artifact_path("data_summary").read_text()
    for bundle, expected_parent, expected_month in ((a, str(candidate), MONTH), (b, first_uri, NEXT_MONTH)):
        provenance = bundle.manifest["provenance"]
        assert isinstance(provenance, dict)
        assert provenance["parent_bundle"] == expected_parent
        assert provenance["data_source"] == f"{month_prefix / 'data'}/{expected_month}"
    # the gate of month 2 scored month 1's bundle on month 2's val_test: recompute that score independently
    val_test = load_dataset(second.artifact_path("dataset")).split("val_test", "evaluate")
    champion = B.BundleModel(bundles[first_uri])
    expected = split_metrics(champion.predict_images(val_test.images), val_test.labels)["accuracy"]
    assert _champion_score((b.root / "reports" / "validation.md").read_text()) == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_a_month_without_data_fails_the_run_naming_the_prefix(
    month_prefix: Path, candidate: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    data = str(month_prefix / "data")
    with local_job_times(schedule_time="2027-03-01T03:00:00Z"), pytest.raises(RuntimeError, match="fetch-month"):
        run_pipeline(
            monthly_retrain_pipeline,
            {**MONTHLY_TINY, "data_prefix": data, "champion_uri": str(candidate), "destination": str(tmp_path / "b")},
            tmp_path / "runs",
        )
    logs = capfd.readouterr()
    assert f"no data for month 2027-02: no images under {data}/2027-02" in logs.out + logs.err
    assert not (tmp_path / "b").exists()


def test_the_champion_gate_refuses_a_challenger_that_loses(month_prefix: Path, candidate: Path, tmp_path: Path) -> None:
    """The month's phases, in process: a challenger that loses to the champion on the month's val_test fails
    bundle_validation's champion check (in the pipeline that stops the run before export, as
    tests/test_e2e.py shows for the same decision sub-graph's quality gates)."""
    from visionpipe.phases.bundle_validation import Gates, ValidationFailed
    from visionpipe.phases.bundle_validation import run as validate
    from visionpipe.phases.calibration import run as calibrate
    from visionpipe.phases.data_fetch import run as fetch
    from visionpipe.phases.supervised_train import run as train
    from visionpipe.phases.threshold_sweep import run as sweep
    from visionpipe.training.recipes import load_recipe

    month = gather_month(str(month_prefix / "data"), MONTH, "", tmp_path / "images")
    fetch(str(month.folder), tmp_path / "ds", seed=0)
    # another seed gives the head a fresh random init, and a vanishing learning rate leaves it untrained
    weak = load_recipe(
        "digits-cnn", {"epochs": 1, "seed": 7, "preprocess": {"kind": "standard"}, "optimizer": {"lr": 1e-7}}
    )
    train(tmp_path / "ds", tmp_path / "model", tmp_path / "logits", weak, tmp_path / "ckpt", log=lambda _msg: None)
    sweep(tmp_path / "logits", tmp_path / "thr", bootstrap=20, target_selective_accuracy=0.05)
    calibrate(tmp_path / "logits", tmp_path / "thr", tmp_path / "cal")
    with pytest.raises(ValidationFailed) as failed:
        validate(
            tmp_path / "ds",
            tmp_path / "model",
            tmp_path / "logits",
            tmp_path / "cal",
            tmp_path / "bundle",
            threshold_dir=tmp_path / "thr",
            gates=Gates(champion_uri=str(candidate)),
            name="digits",
        )
    message = str(failed.value)
    assert message.startswith("bundle validation failed: champion (val_test accuracy: candidate"), message[:300]
    assert "worse than champion" in message.split("\n", 1)[0]
