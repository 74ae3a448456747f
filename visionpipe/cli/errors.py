"""The one error style of the `visionpipe` command line.

A verb raises `CliError`; `visionpipe.cli.app.main` prints it as ``visionpipe <verb>: error: <message>`` on
stderr and exits with its code: 2 for bad input (a bad flag or `-p` value, refused before anything runs or is
contacted), 1 for a runtime failure (a failed pipeline step, an endpoint that refuses the request).
"""

from __future__ import annotations

BAD_INPUT = 2
RUNTIME_FAILURE = 1


class CliError(Exception):
    """A command failed in a way the message explains; carries the exit code."""

    def __init__(self, message: str, code: int = BAD_INPUT) -> None:
        super().__init__(message)
        self.code = code


def bad_input(message: str) -> CliError:
    return CliError(message, BAD_INPUT)


def failure(message: str) -> CliError:
    return CliError(message, RUNTIME_FAILURE)
