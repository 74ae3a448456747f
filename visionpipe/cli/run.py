"""`visionpipe run`: the training pipeline on this machine with kfp.local, one progress line per task."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from visionpipe.cli.errors import failure
from visionpipe.cli.options import add_param_option, run_form

if TYPE_CHECKING:
    from visionpipe.kfp.local import LocalRun

PIPELINE = "training"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("run", help="run the training pipeline locally with kfp.local")
    parser.add_argument("--source", default=None, help="data source (default: builtin://sklearn-digits)")
    add_run_options(parser, "any pipeline parameter, e.g. -p seed=3 (repeatable); `visionpipe params` lists them")
    parser.set_defaults(func=cmd_run)


def add_run_options(parser: argparse.ArgumentParser, param_help: str) -> None:
    """The options `run` and `demo` share."""
    add_param_option(parser, param_help)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="pipeline root for artifacts")
    parser.add_argument("--bundles-dir", type=Path, default=Path("bundles"), help="default export destination")
    parser.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="stream kfp.local's whole output (executor inputs, task logs) instead of one line per task; "
        "either way it is written to <run folder>/logs/",
    )


def cmd_run(args: argparse.Namespace) -> int:
    from visionpipe.cli.summary import summarise_run

    result = run_training(args)
    print()
    print(result.artifact_path("data_summary").read_text())
    summary = summarise_run(result)
    print(summary.report)
    print(f"Bundle: {summary.bundle_uri}\nArtifacts: {summary.run_dir} ({result.seconds:.1f} s)")
    if result.log_path is not None:
        print(f"Logs: {result.log_path.parent}")
    return 0


def run_training(args: argparse.Namespace) -> LocalRun:
    """Validate the run form (before any step runs), then run the training pipeline with progress lines."""
    given: dict[str, str] = {"source": args.source} if args.source else {}
    arguments = run_form(PIPELINE, args.param, given)
    arguments.setdefault("destination", str(args.bundles_dir.resolve()))

    from visionpipe.kfp.local import run_pipeline
    from visionpipe.kfp.progress import ANSI, TaskProgress
    from visionpipe.kfp.training import training_pipeline

    progress = TaskProgress(sys.stdout, args.runs_dir.resolve(), verbose=args.verbose)
    try:
        return run_pipeline(training_pipeline, arguments, args.runs_dir, progress=progress)
    except RuntimeError as exc:
        failed = [t for t in progress.tasks if t.ok is False]
        where = f"; its log: {failed[-1].log_path}" if failed and failed[-1].log_path else ""
        raise failure(f"the pipeline failed: {ANSI.sub('', str(exc))}{where}") from exc
