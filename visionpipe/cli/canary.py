"""`visionpipe canary start|promote|rollback|status`: the kubectl steps of a KServe canary rollout.

The kubectl argv of each action comes from visionpipe/rollout/canary.py (pure functions; see its docstring for
the two deployment modes); this prints it (``--dry-run``) or runs it and returns kubectl's exit code
(127 when kubectl is missing, as a shell would).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Callable

from visionpipe.cli.errors import CliError, bad_input
from visionpipe.rollout import canary as rollout_canary
from visionpipe.rollout.canary import (
    ACTIONS,
    DEFAULT_NAME,
    MODES,
    CanaryError,
    Target,
    promote_argv,
    rollback_argv,
    start_argv,
    status_argv,
)

KUBECTL_NOT_FOUND = 127


def build_argv(args: argparse.Namespace) -> list[str]:
    """The kubectl argv for parsed `visionpipe canary ...` arguments."""
    target = Target(
        name=args.name, namespace=args.namespace, context=args.context, kubectl=args.kubectl, mode=args.mode
    )
    builders: dict[str, Callable[[], list[str]]] = {
        "start": lambda: start_argv(target, args.bundle_uri, args.percent),
        "promote": lambda: promote_argv(target, args.bundle_uri),
        "rollback": lambda: rollback_argv(target, args.previous_uri),
        "status": lambda: status_argv(target),
    }
    return builders[args.canary_action]()


def run_canary(args: argparse.Namespace) -> int:
    """Print (``--dry-run``) or run the kubectl command; returns its exit code."""
    try:
        argv = build_argv(args)
    except CanaryError as exc:
        raise bad_input(str(exc)) from exc
    if args.dry_run:
        print(shlex.join(argv))
        return 0
    print(f"+ {shlex.join(argv)}", file=sys.stderr)
    try:
        return subprocess.run(argv, check=False).returncode
    except FileNotFoundError as exc:
        raise CliError(f"{argv[0]!r} not found; install kubectl or pass --kubectl", KUBECTL_NOT_FOUND) from exc


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``canary`` with its sub-commands; sets ``func`` (args -> exit code) on the parsed namespace."""
    canary = sub.add_parser(
        "canary",
        help="canary rollout of a bundle on KServe (kubectl)",
        description=rollout_canary.__doc__,
    )
    actions = canary.add_subparsers(dest="canary_action", required=True, metavar="ACTION")
    helps = {
        "start": "serve a new bundle to a percentage of the traffic",
        "promote": "send all traffic to the canary",
        "rollback": "send all traffic back to the previous revision",
        "status": "show bundle, canary percentage and traffic split",
    }
    for action in ACTIONS:
        parser = actions.add_parser(action, help=helps[action])
        _add_common(parser)
        if action == "start":
            parser.add_argument("--bundle-uri", required=True, help="the new bundle, e.g. s3://visionpipe/...")
            parser.add_argument("--percent", type=int, default=10, help="canary traffic percentage (1-99)")
        if action == "promote":
            parser.add_argument(
                "--bundle-uri", default=None, help="standard mode: the canary's bundle, which becomes the stable one"
            )
        if action == "rollback":
            parser.add_argument("--previous-uri", default=None, help="also point storageUri back at this bundle")
        parser.set_defaults(func=run_canary)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default=DEFAULT_NAME, help="InferenceService name")
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="serverless",
        help="the InferenceService's deployment mode: serverless (Knative, canaryTrafficPercent) or standard "
        "(spec.canary)",
    )
    parser.add_argument("--namespace", "-n", default=None)
    parser.add_argument("--context", default=None, help="kubeconfig context")
    parser.add_argument("--kubectl", default="kubectl", help="kubectl executable")
    parser.add_argument("--dry-run", action="store_true", help="print the kubectl command instead of running it")
