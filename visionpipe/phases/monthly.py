"""Components of the monthly retrain: the month's data (+ labelled hard examples), the champion as warm start,
and the optional canary that patches the InferenceService through the Kubernetes API.

Data layout (documented in docs/monthly.md):

    <data_prefix>/<YYYY-MM>/<class>/<image>                  the month's new labelled images
    <hard_examples_prefix>/<YYYY-MM>/labelled/<class>/<image> hard examples logged by serving, once labelled

Which month a run works on (`choose_month`), first match wins:

1. `data_month` when set (YYYY-MM);
2. else the calendar month *before* the run's scheduled time (KFP's `{{$.pipeline_job_schedule_time_utc}}`): a
   recurring run scheduled on the 1st retrains on the month that just ended, and a catch-up run started late for
   an old slot still gets that slot's month;
3. else the month before the run's creation time (`{{$.pipeline_job_create_time_utc}}`, one-off runs);
4. else the month before this step's own clock (UTC).

A run time counts as absent when it is empty (KFP 2.16 declares the fields but never fills them), when it is still
the literal placeholder (KFP < 2.16 hands an unknown runtime-value constant through unchanged: kubeflow/pipelines
backend/src/v2/driver/resolve.go, `resolveInputParameter`, `default: v = val`), or when it is the zero time
(1970-01-01T00:00:00Z or Go's 0001-01-01T00:00:00Z). KFP >= 2.17 fills the schedule time from the Workflow's
`pipelines.kubeflow.org/workflowEpoch` label (set by the ScheduledWorkflow controller) and falls back to the create
time for manual runs (backend/src/v2/cmd/driver/main.go, `resolvePipelineJobScheduleTimeUTCFromWorkflow`), both
RFC 3339 in UTC. Any other value that is not an RFC 3339 time is refused.
"""

import datetime as dt
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

# How the month was chosen (MonthChoice.basis), in the order they are tried.
BASES = ("data_month", "schedule_time", "create_time", "clock")
_BASIS_TEXT = {
    "data_month": "data_month={time!r}",
    "schedule_time": "the month before the run's schedule time {time}",
    "create_time": "the month before the run's creation time {time} (no schedule time: a one-off run)",
    "clock": "the month before this step's clock, {time} (the run has no schedule or creation time)",
}
_ZERO_YEARS = (1, 1970)  # Go's zero time.Time, and the Unix epoch of an unset timestamp


class MonthlyError(ValueError):
    """The month's inputs are missing or malformed; the message says what to fix."""


@dataclass(frozen=True)
class MonthChoice:
    """The month a run works on and where it came from (`basis`: one of BASES; `time`: the value it came from)."""

    month: str
    basis: str
    time: str

    def describe(self) -> str:
        return _BASIS_TEXT[self.basis].format(time=self.time)


@dataclass(frozen=True)
class MonthData:
    month: str
    folder: Path
    new_images: dict[str, int]
    hard_examples: dict[str, int]
    source: str = ""  # <data_prefix>/<month>
    choice: MonthChoice | None = None


def run_time(value: str, name: str) -> dt.datetime | None:
    """A KFP run time (`schedule_time` / `create_time` input) as an aware UTC datetime, or None when absent:
    empty, the unresolved literal placeholder, or the zero time (see the module docstring)."""
    text = value.strip()
    if not text or (text.startswith("{{$.") and text.endswith("}}")):
        return None
    try:
        parsed = dt.datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError as exc:
        raise MonthlyError(
            f"{name}={value!r} is not an RFC 3339 time such as 2026-11-01T03:00:00Z (KFP fills it from "
            "{{$.pipeline_job_" + name.removesuffix("_time") + "_time_utc}}); set data_month=YYYY-MM to bypass it"
        ) from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)  # KFP's times are UTC
    parsed = parsed.astimezone(dt.UTC)
    if parsed.year in _ZERO_YEARS and parsed.month == 1 and parsed.day == 1 and parsed.time() == dt.time(0):
        return None
    return parsed


def previous_month(moment: dt.datetime | dt.date) -> str:
    """`YYYY-MM` of the calendar month before the one `moment` (UTC) falls in."""
    first = (moment.date() if isinstance(moment, dt.datetime) else moment).replace(day=1)
    return (first - dt.timedelta(days=1)).strftime("%Y-%m")


def choose_month(
    data_month: str, schedule_time: str = "", create_time: str = "", now: dt.datetime | None = None
) -> MonthChoice:
    """The month a run works on (the rule in the module docstring)."""
    if data_month:
        try:
            dt.datetime.strptime(data_month, "%Y-%m")
        except ValueError as exc:
            raise MonthlyError(f"data_month={data_month!r} must look like 2026-10 (or be empty)") from exc
        return MonthChoice(data_month, "data_month", data_month)
    for basis, value in (("schedule_time", schedule_time), ("create_time", create_time)):
        moment = run_time(value, basis)
        if moment is not None:
            return MonthChoice(previous_month(moment), basis, moment.strftime("%Y-%m-%dT%H:%M:%SZ"))
    clock = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    return MonthChoice(previous_month(clock), "clock", clock.strftime("%Y-%m-%dT%H:%M:%SZ"))


def resolve_month(
    data_month: str, schedule_time: str = "", create_time: str = "", now: dt.datetime | None = None
) -> str:
    """`YYYY-MM` as given, else the month before the run's schedule / creation time / the clock (UTC)."""
    return choose_month(data_month, schedule_time, create_time, now).month


def gather_month(
    data_prefix: str,
    data_month: str,
    hard_examples_prefix: str,
    out: Path,
    schedule_time: str = "",
    create_time: str = "",
) -> MonthData:
    """Copy the month's images and its labelled hard examples into one `<class>/<file>` folder."""
    from visionpipe.data.hard_examples import collect_labelled
    from visionpipe.phases.data_fetch import class_files
    from visionpipe.serving import storage

    choice = choose_month(data_month, schedule_time, create_time)
    month = choice.month
    source = storage.join(data_prefix, month)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    try:
        uris = storage.list_uris(source)
    except storage.ObjectNotFound:
        uris = []  # a local prefix without the month's folder; S3 lists an empty prefix as []
    for class_name, rel, uri in class_files(source, lambda _prefix: uris):
        dest = out / class_name / f"{month}-{Path(rel).name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(storage.read_bytes(uri))
        counts[class_name] = counts.get(class_name, 0) + 1
    hard: dict[str, int] = {}
    if hard_examples_prefix:
        staging = out.parent / (out.name + "-hard")
        hard = collect_labelled(hard_examples_prefix, [month], staging)
        for path in sorted(staging.rglob("*")):
            if path.is_file():
                dest = out / path.parent.name / f"hard-{path.name}"
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(path), dest)
        shutil.rmtree(staging, ignore_errors=True)
    if not counts and not hard:
        hard_text = (
            f" and no labelled hard examples under {storage.join(hard_examples_prefix, month, 'labelled')}"
            if hard_examples_prefix
            else ""
        )
        raise MonthlyError(
            f"no data for month {month}: no images under {source} (expected {source}/<class>/<image>){hard_text}. "
            f"The month is {choice.describe()}; upload the month's images there, or set data_month=YYYY-MM to "
            "retrain on another month"
        )
    return MonthData(month, out, counts, hard, source, choice)


def record_month(dataset_dir: Path, month: MonthData) -> None:
    """Write the month into the Dataset's dataset.json: `source` becomes `<data_prefix>/<month>` (not the staging
    folder), plus `month` and `month_basis`. bundle_validation copies `source` into the bundle's
    `provenance.data_source`, so every bundle names the month it was trained on."""
    from visionpipe.data.datasets import write_json

    path = dataset_dir / "dataset.json"
    meta = json.loads(path.read_text())
    meta["source"] = month.source
    meta["month"] = month.month
    meta["month_basis"] = month.choice.describe() if month.choice else ""
    write_json(path, meta)


def champion_backbone(champion_uri: str, out_dir: Path) -> dict[str, object]:
    """Verify the champion bundle and write its backbone (supervised_train's warm start) to `out_dir`."""
    from visionpipe.serving.bundle import read_bundle
    from visionpipe.serving.models import save_backbone

    bundle = read_bundle(champion_uri)
    if len(bundle.members) != 1:
        raise MonthlyError(f"champion {champion_uri} is an ensemble of {len(bundle.members)}; warm start needs one")
    model = bundle.load_models()[0]
    info: dict[str, object] = {"parent_bundle": champion_uri, "parent_version": bundle.version}
    save_backbone(model, out_dir, extra=info)
    return info
