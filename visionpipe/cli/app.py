"""The `visionpipe` command line: one entry, one sub-module per verb, one error style.

Each verb module (run, demo, params, validate_bundle, serve, compile, submit, schedule, canary) has
``register(sub)``, which adds its parser and sets ``func`` (args -> exit code). A verb refuses bad input and
reports failures by raising `visionpipe.cli.errors.CliError`; `main` prints it as
``visionpipe <verb>: error: <message>`` on stderr and returns its code (2 bad input, 1 runtime failure).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from visionpipe.cli import canary, demo, params, run, schedule, serve, submit, validate_bundle
from visionpipe.cli import compile as compile_verb
from visionpipe.cli.errors import CliError

VERBS = (run, demo, params, validate_bundle, serve, canary, submit, schedule, compile_verb)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visionpipe",
        description="Train, threshold, calibrate, validate, publish and serve image classifiers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb in VERBS:
        verb.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except CliError as exc:
        print(f"visionpipe {args.command}: error: {exc}", file=sys.stderr)
        return exc.code
    return code


if __name__ == "__main__":
    raise SystemExit(main())
