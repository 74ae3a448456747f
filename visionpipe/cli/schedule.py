"""`visionpipe schedule`: a recurring run (6-field cron, seconds first) on a Kubeflow Pipelines endpoint."""

from __future__ import annotations

import argparse

from visionpipe.cli.kfp_request import DESCRIPTION, add_common_arguments, send
from visionpipe.kfp.cron import DEFAULT_CRON


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "schedule",
        help="create a recurring run (6-field cron, seconds first) on a Kubeflow Pipelines endpoint",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(parser, default_pipeline="monthly-retrain")
    parser.add_argument("--cron", default=DEFAULT_CRON, help=f"6-field cron, seconds first (default {DEFAULT_CRON!r})")
    parser.add_argument("--job-name", default=None, help="recurring run name (default visionpipe-<pipeline>)")
    parser.add_argument("--description", default=None)
    parser.add_argument("--max-concurrency", type=int, default=1, help="runs allowed at once (default 1)")
    parser.add_argument("--catchup", action="store_true", help="backfill missed intervals (default: no catch-up)")
    parser.add_argument("--disabled", action="store_true", help="create the recurring run paused")
    parser.set_defaults(func=run_schedule)


def run_schedule(args: argparse.Namespace) -> int:
    return send(args)
