"""Run a pipeline on this machine with kfp.local (SubprocessRunner, no virtualenv per task)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kfp import local

from visionpipe.kfp.platform import CREATE_TIME, SCHEDULE_TIME
from visionpipe.kfp.progress import TaskProgress, TaskRecord
from visionpipe.specs.params import ParameterError as ParameterError  # re-exported for parse_parameters' callers
from visionpipe.specs.params import Value, kinds, parse_assignments


@dataclass(frozen=True)
class LocalRun:
    """A finished local run: the pipeline's outputs and, when its output was followed, each task as it ran."""

    pipeline_root: Path
    outputs: Mapping[str, object]  # pipeline output name -> value (str, ...) or kfp artifact (.path/.uri/.metadata)
    seconds: float
    run_dir: Path | None = None  # <pipeline_root>/<pipeline>-<timestamp>, known when tasks were followed
    tasks: tuple[TaskRecord, ...] = field(default_factory=tuple)
    log_path: Path | None = None  # the whole kfp.local output, when it was captured

    def artifact_path(self, name: str) -> Path:
        artifact = self.outputs[name]
        path = getattr(artifact, "path", None)
        if not isinstance(path, str):
            raise KeyError(f"pipeline output {name!r} is not an artifact")
        return Path(path)

    def output(self, name: str) -> object:
        """A pipeline output by name; KeyError naming the outputs there are."""
        if name not in self.outputs:
            raise KeyError(f"the pipeline has no output {name!r}; outputs: {', '.join(sorted(self.outputs))}")
        return self.outputs[name]

    def task(self, display_name: str) -> TaskRecord:
        """The last task run under `display_name` (kfp.local's name without its -N suffix)."""
        found = [t for t in self.tasks if t.display_name == display_name]
        if not found:
            ran = ", ".join(t.name for t in self.tasks) or "none recorded"
            raise KeyError(f"no task {display_name!r} in this run (tasks: {ran})")
        return found[-1]


def pipeline_table_name(pipeline: object) -> str:
    """The run-form table of a @dsl.pipeline: "visionpipe-training" -> "training"."""
    name = getattr(getattr(pipeline, "pipeline_spec", None), "pipeline_info", None)
    text = getattr(name, "name", None) or getattr(pipeline, "name", "")
    return str(text).removeprefix("visionpipe-")


def parse_parameters(pipeline: object, pairs: Sequence[str]) -> dict[str, Value]:
    """`name=value` strings -> typed arguments of `pipeline` (the one parser, visionpipe.specs.params)."""
    table = pipeline_table_name(pipeline)
    return parse_assignments(pairs, kinds(table), table)


def run_pipeline(
    pipeline: Callable[..., object],
    arguments: Mapping[str, object],
    runs_dir: Path,
    progress: TaskProgress | None = None,
) -> LocalRun:
    """Run `pipeline` with kfp.local; artifacts land under `runs_dir` (one folder per run).

    With `progress`, kfp.local's output (stdout and stderr) goes to it while the pipeline runs: one line per
    task, logs under the run folder (visionpipe/kfp/progress.py). Raises RuntimeError naming the failed task."""
    from visionpipe.kfp.reaper import guard_descendants

    guard_descendants()  # task processes die with this one, even on SIGKILL (visionpipe/kfp/reaper.py)
    runs_dir = runs_dir.resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    install_local_job_times()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(runs_dir), raise_on_error=True)
    started = time.monotonic()
    log_path: Path | None = None
    with _captured(progress):
        try:
            task = pipeline(**arguments)
        finally:
            if progress is not None:
                log_path = progress.close_run()
    outputs = dict(getattr(task, "outputs", {}) or {})
    return LocalRun(
        pipeline_root=runs_dir,
        outputs=outputs,
        seconds=time.monotonic() - started,
        run_dir=progress.run_dir if progress else None,
        tasks=tuple(progress.tasks) if progress else (),
        log_path=log_path,
    )


@contextlib.contextmanager
def _captured(progress: TaskProgress | None) -> Iterator[None]:
    if progress is None:
        yield
        return
    with contextlib.redirect_stdout(progress), contextlib.redirect_stderr(progress):
        yield


# ------------------------------------------------------------------------------- run-time placeholders
_local_times: dict[str, str] = {}  # placeholder -> value that kfp.local substitutes (local_job_times)


def install_local_job_times() -> None:
    """Teach kfp.local (2.17.3) the two time placeholders; idempotent.

    kfp.local resolves every string input of a task with `resolve_individual_placeholder`
    (kfp/local/placeholder_utils.py, called from `resolve_self_references_in_executor_input`). Its table of constant
    placeholders lacks these two, so they fall through to `resolve_io_placeholders`, which splits
    ``pipeline_job_schedule_time_utc`` into one part and `convert_placeholder_parts_to_path` fails on ``parts[1]``
    with an IndexError: without this, no local run of a pipeline that takes them starts a single task. The wrapper
    substitutes them first, as the 2.17 driver does for a manual run: the create time is the current UTC time and
    the schedule time equals the create time, unless `local_job_times` sets either (a test then plays the backend
    filling a recurring run's slot)."""
    from kfp.local import placeholder_utils

    original = placeholder_utils.resolve_individual_placeholder
    if getattr(original, "_visionpipe_job_times", False):
        return

    def resolve(element: str, *args: object, **kwargs: object) -> str:
        if SCHEDULE_TIME in element or CREATE_TIME in element:
            import datetime as dt

            now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            create = _local_times.get(CREATE_TIME, now)
            element = element.replace(CREATE_TIME, create).replace(
                SCHEDULE_TIME, _local_times.get(SCHEDULE_TIME, create)
            )
        resolved: str = original(element, *args, **kwargs)  # kfp.local's own arguments, passed on
        return resolved

    resolve._visionpipe_job_times = True  # type: ignore[attr-defined]  # marks the wrapper (idempotence)
    placeholder_utils.resolve_individual_placeholder = resolve


@contextlib.contextmanager
def local_job_times(schedule_time: str | None = None, create_time: str | None = None) -> Iterator[None]:
    """Within the block, kfp.local runs see these values for the schedule / create time placeholders (None: the
    defaults of `install_local_job_times`), as if the KFP backend had filled them."""
    install_local_job_times()
    saved = dict(_local_times)
    for placeholder, value in ((SCHEDULE_TIME, schedule_time), (CREATE_TIME, create_time)):
        if value is not None:
            _local_times[placeholder] = value
    try:
        yield
    finally:
        _local_times.clear()
        _local_times.update(saved)
