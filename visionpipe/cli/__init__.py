"""The `visionpipe` command line (entry point `visionpipe.cli:main`; verbs in this package's modules)."""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """`visionpipe ...`: see visionpipe/cli/app.py."""
    from visionpipe.cli.app import main as run_main

    return run_main(argv)
