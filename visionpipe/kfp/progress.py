"""One progress line per finished kfp.local task; the full output goes to log files under the run folder.

kfp.local writes everything to ``sys.stdout``: its logging records (a ``logging.StreamHandler(sys.stdout)``
set up per task, kfp/local/logging_utils.py ``local_logger_context``), each task's streamed output (read from
the task process and ``print``-ed, kfp/local/subprocess_task_handler.py ``run_local_subprocess``), which starts
with the executor's dump of its executor input, and the runner's warnings (``warnings`` -> ``sys.stderr``).
`TaskProgress` is a text stream that `visionpipe.kfp.local.run_pipeline` puts in place of both while the
pipeline runs. It follows the records kfp.local writes around each task (kfp/local/task_dispatcher.py
``run_single_task_implementation``: ``Executing task 'NAME'``, ``Task 'NAME' finished with status SUCCESS``,
the task's outputs, then a horizontal line), learns the task's folder from the ``outputFile`` of its executor
input (``<pipeline_root>/<run>/<task>/executor_output.json``, kfp/local/executor_input_utils.py), and then:

- writes the task's output to ``<run folder>/logs/<task>.log`` and everything to ``<run folder>/logs/kfp-local.log``;
- prints one line per finished task: its name, its duration and a key figure read from its
  ``executor_output.json`` (the Metrics / artifact metadata and output parameters it wrote);
- for a failed task, prints a line naming it and its log file, and the last lines of that log (the error).

With ``verbose=True`` it streams everything as kfp.local prints it (and still writes the log files).
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

ANSI = re.compile(r"\x1b\[[0-9;]*m")
EXECUTING = re.compile(r"Executing task '([^']+)'")
FINISHED = re.compile(r"Task '([^']+)' finished with status (SUCCESS|FAILURE)")
OUTPUT_FILE = re.compile(r'"outputFile": "([^"]+)/executor_output\.json"')
RULE = re.compile(r"^-{20,}$")
LOG_DIR = "logs"
FULL_LOG = "kfp-local.log"
ERROR_TAIL_LINES = 12
MAX_FIGURES = 3


def _fmt(template: str) -> Callable[[object], str]:
    def render(value: object) -> str:
        return template.format(f"{value:.4f}" if isinstance(value, float) else value)

    return render


def _count(label: str) -> Callable[[object], str]:
    return lambda value: f"{len(value) if isinstance(value, list | tuple) else value} {label}"


# metadata key -> how it reads; the first MAX_FIGURES keys a task wrote, in this order, make its figure
FIGURES: tuple[tuple[str, Callable[[object], str]], ...] = (
    ("num_images", _fmt("{} images")),
    ("classes", _count("classes")),
    ("val_select_accuracy", _fmt("val_select accuracy {}")),
    ("best_epoch", _fmt("best epoch {}")),
    ("threshold", _fmt("threshold {}")),
    ("objective_value", _fmt("objective {}")),
    ("val_test_after_ece", _fmt("val_test ECE {} after calibration")),
    ("val_test_accuracy", _fmt("val_test accuracy {}")),
    ("val_test_ece", _fmt("val_test ECE {}")),
    ("bundle_uri", _fmt("bundle {}")),
)


@dataclass
class TaskRecord:
    """One kfp.local task as it ran: name (kfp.local's task resource name), outcome, folder, log, outputs."""

    name: str
    started: float
    seconds: float = 0.0
    ok: bool | None = None  # None while it runs
    root: Path | None = None  # <run folder>/<task>, from the executor input
    log_path: Path | None = None
    lines: list[str] = field(default_factory=list)

    @property
    def display_name(self) -> str:
        """The name without kfp.local's de-duplicating suffix (supervised-train-2 -> supervised-train)."""
        return re.sub(r"-\d+$", "", self.name)

    def executor_output(self) -> dict[str, object]:
        """The task's executor_output.json (its output parameters and artifacts' metadata); {} if none."""
        if self.root is None or not (self.root / "executor_output.json").is_file():
            return {}
        try:
            loaded = json.loads((self.root / "executor_output.json").read_text())
        except (OSError, ValueError):
            return {}
        return loaded if isinstance(loaded, dict) else {}

    def parameters(self) -> dict[str, object]:
        values = self.executor_output().get("parameterValues", {})
        return dict(values) if isinstance(values, dict) else {}

    def metadata(self) -> dict[str, object]:
        """The metadata of all the task's output artifacts, merged (Metrics values, bundle URI, ...)."""
        merged: dict[str, object] = {}
        artifacts = self.executor_output().get("artifacts", {})
        for entry in artifacts.values() if isinstance(artifacts, dict) else ():
            for artifact in entry.get("artifacts", []) if isinstance(entry, dict) else ():
                if isinstance(artifact, dict) and isinstance(artifact.get("metadata"), dict):
                    merged.update(artifact["metadata"])
        return merged

    def artifact_path(self, name: str) -> Path:
        if self.root is None:
            raise FileNotFoundError(f"task {self.name!r}: its folder is unknown")
        return self.root / name

    def figure(self) -> str:
        """The task's key figures, e.g. 'val_select accuracy 0.9944, best epoch 11'."""
        metadata = self.metadata()
        shown = [render(metadata[key]) for key, render in FIGURES if key in metadata][:MAX_FIGURES]
        if not shown:
            shown = [f"{k}={v}" for k, v in self.parameters().items() if isinstance(v, str | int | float)]
            shown = [s for s in shown if len(s) <= 80][:MAX_FIGURES]
        return ", ".join(shown)


class TaskProgress(io.TextIOBase):
    """A text stream that turns kfp.local's output into progress lines and log files (see the module doc)."""

    def __init__(self, out: TextIO, runs_dir: Path, verbose: bool = False) -> None:
        super().__init__()
        self.out = out
        self.runs_dir = runs_dir
        self.verbose = verbose
        self.tasks: list[TaskRecord] = []
        self.run_dir: Path | None = None
        self.lines: list[str] = []
        self._partial = ""
        self._current: TaskRecord | None = None
        self._closed_run = False

    # ------------------------------------------------------------------------------------- stream protocol
    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.verbose:
            self.out.write(text)
        self._partial += text
        *complete, self._partial = self._partial.split("\n")
        for line in complete:
            self._line(line)
        return len(text)

    def flush(self) -> None:
        self.out.flush()

    # ------------------------------------------------------------------------------------- parsing
    def _line(self, raw: str) -> None:
        self.lines.append(raw)
        line = ANSI.sub("", raw).strip()
        started = EXECUTING.search(line)
        if started:
            self._finish_current()
            self._current = TaskRecord(name=started.group(1), started=time.monotonic())
            self.tasks.append(self._current)
        task = self._current
        if task is None:
            return
        task.lines.append(raw)
        output_file = OUTPUT_FILE.search(line)
        if output_file and task.root is None:
            task.root = Path(output_file.group(1))
            self.run_dir = self.run_dir or task.root.parent
        finished = FINISHED.search(line)
        if finished and finished.group(1) == task.name:
            task.seconds = time.monotonic() - task.started
            task.ok = finished.group(2) == "SUCCESS"
            if not task.ok:
                self._finish_current()
        elif RULE.match(line) and task.ok is not None:
            self._finish_current()

    def _finish_current(self) -> None:
        task, self._current = self._current, None
        if task is None:
            return
        if task.ok is None:  # ended without a status line (kfp.local raised): a failure
            task.ok = False
            task.seconds = time.monotonic() - task.started
        task.log_path = self._log_dir() / f"{task.name}.log"
        task.log_path.parent.mkdir(parents=True, exist_ok=True)
        task.log_path.write_text("\n".join(ANSI.sub("", line) for line in task.lines) + "\n")
        if not self.verbose:
            self._report(task)

    def _report(self, task: TaskRecord) -> None:
        if task.ok:
            figure = task.figure()
            self.out.write(f"  {task.display_name:<24} {task.seconds:7.1f} s  {figure}".rstrip() + "\n")
        else:
            self.out.write(f"  {task.display_name:<24} FAILED after {task.seconds:.1f} s; full log: {task.log_path}\n")
            for line in _error_tail(task.lines):
                self.out.write(f"    | {line}\n")
        self.out.flush()

    def _log_dir(self) -> Path:
        return (self.run_dir or self.runs_dir) / LOG_DIR

    def close_run(self) -> Path:
        """Finish the last task and write the whole output to <run folder>/logs/kfp-local.log; returns its path."""
        if self._partial:
            self._line(self._partial)
            self._partial = ""
        self._finish_current()
        path = self._log_dir() / FULL_LOG
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(ANSI.sub("", line) for line in self.lines) + "\n")
        self._closed_run = True
        return path


def _error_tail(lines: list[str]) -> list[str]:
    """What a failed task said last: the exception after its traceback's last frame, else its last lines."""
    body = [ANSI.sub("", line).strip() for line in lines]
    body = [line for line in body if line and not FINISHED.search(line) and not RULE.match(line)]
    frames = [i for i, line in enumerate(body) if line.startswith('File "')]
    if frames:
        after = body[frames[-1] + 2 :]  # the frame's line and its source line
        message = [line for line in after if set(line) - set("^~ ")]
        if message:
            return message[:ERROR_TAIL_LINES]  # the exception's first lines say what failed
    return body[-ERROR_TAIL_LINES:]
