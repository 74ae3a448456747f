"""`visionpipe params`: a pipeline's run form, from the one table (visionpipe/specs/params.py)."""

from __future__ import annotations

import argparse

from visionpipe.specs.params import PIPELINES, params


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("params", help="list a pipeline's parameters, defaults and allowed values")
    parser.add_argument(
        "--pipeline", choices=PIPELINES, default="training", help="which pipeline's run form (default training)"
    )
    parser.set_defaults(func=cmd_params)


def cmd_params(args: argparse.Namespace) -> int:
    table = params(args.pipeline)
    width = max(len(f"{name} = {p.default!r}") for name, p in table.items())
    for name, param in table.items():
        print(f"{f'{name} = {param.default!r}':<{width}}  # {param.allowed()}")
    return 0
