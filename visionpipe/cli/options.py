"""Options several verbs share: the one ``-p NAME=VALUE`` option, parsed and validated by the run-form table."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

from visionpipe.cli.errors import bad_input
from visionpipe.specs.params import Kind, ParameterError, Value, kinds, parse_assignments, validate_run_form


def add_param_option(parser: argparse.ArgumentParser, help_text: str = "pipeline argument (repeatable)") -> None:
    parser.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE", help=help_text)


def parse_params(pairs: Sequence[str], types: Mapping[str, Kind], where: str) -> dict[str, Value]:
    """``-p`` strings -> typed values (`visionpipe.specs.params.parse_assignments`); bad input -> CliError(2)."""
    try:
        return parse_assignments(pairs, types, where)
    except ParameterError as exc:
        raise bad_input(str(exc)) from exc


def run_form(pipeline: str, pairs: Sequence[str], given: Mapping[str, Value] | None = None) -> dict[str, Value]:
    """``-p`` strings for one of our pipelines, typed by its table and validated (with `given` values, e.g.
    --source) before anything runs: all bad fields at once, each with what it allows."""
    values: dict[str, Value] = {**parse_params(pairs, kinds(pipeline), pipeline), **(given or {})}
    check_run_form(pipeline, values)
    return values


def check_run_form(pipeline: str, values: Mapping[str, object]) -> None:
    try:
        validate_run_form(pipeline, values)
    except ParameterError as exc:
        raise bad_input(str(exc)) from exc
