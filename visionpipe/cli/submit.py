"""`visionpipe submit`: start one run of a compiled pipeline on a Kubeflow Pipelines endpoint."""

from __future__ import annotations

import argparse

from visionpipe.cli.kfp_request import DESCRIPTION, add_common_arguments, send


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "submit",
        help="start one run of a compiled pipeline on a Kubeflow Pipelines endpoint",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(parser, default_pipeline="training")
    parser.add_argument("--run-name", default=None, help="run name shown in the UI (default: <pipeline> <UTC time>)")
    parser.set_defaults(func=run_submit)


def run_submit(args: argparse.Namespace) -> int:
    return send(args)
