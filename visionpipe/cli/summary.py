"""What `visionpipe run` and `visionpipe demo` print after the pipeline: read from the run's own record.

The bundle URI is the pipeline's output ``bundle_uri`` (`LocalRun.outputs`); the validation report and the
decision summaries are outputs of the tasks that ran (`LocalRun.tasks`, each with its folder as kfp.local
named it in the task's executor input). Nothing is searched for in the runs folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from visionpipe.cli.errors import failure
from visionpipe.kfp.local import LocalRun

BUNDLE_OUTPUT = "bundle_uri"
DECISION_TASKS = ("threshold-sweep", "calibrate")


@dataclass(frozen=True)
class RunSummary:
    run_dir: Path
    bundle_uri: str
    report: str
    decision_summaries: list[str]


def summarise_run(result: LocalRun) -> RunSummary:
    run_dir = result.run_dir or result.artifact_path("data_summary").parent.parent  # <run>/<task>/<artifact>
    try:
        report = result.task("bundle-validation").artifact_path("report").read_text()
    except (KeyError, OSError) as exc:
        raise failure(f"the run finished without a bundle validation report: {exc}") from exc
    decisions: list[str] = []
    for name in DECISION_TASKS:
        try:
            decisions.append(result.task(name).artifact_path("summary").read_text())
        except (KeyError, OSError):
            continue
    return RunSummary(run_dir, bundle_uri(result), report, decisions)


def bundle_uri(result: LocalRun) -> str:
    """The published bundle's URI: the pipeline output `bundle_uri`.

    Until the pipeline declares that output, the export task's own record of it (the ``bundle_uri`` metadata of
    its ``published`` artifact) stands in."""
    value = result.outputs.get(BUNDLE_OUTPUT)
    if isinstance(value, str) and value:
        return value
    try:
        recorded = result.task("export").metadata().get(BUNDLE_OUTPUT)
    except KeyError as exc:
        raise failure(f"the pipeline has no output {BUNDLE_OUTPUT!r} and no export task ran: {exc}") from exc
    if not isinstance(recorded, str) or not recorded:
        raise failure(f"the pipeline has no output {BUNDLE_OUTPUT!r} and the export task recorded no bundle URI")
    return recorded
