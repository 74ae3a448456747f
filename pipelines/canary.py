"""`visionpipe canary start|promote|rollback|status`: the kubectl steps of a KServe canary rollout.

Each action is a pure function returning the kubectl argv; the CLI prints it (``--dry-run``) or runs it.
The steps follow KServe's Serverless canary strategy (see docs/rollout.md):

- start: point the predictor at the new bundle and give it ``canaryTrafficPercent`` of the traffic; KServe
  keeps the last fully rolled-out revision serving the rest.
- promote: remove ``canaryTrafficPercent``; the new revision gets all the traffic.
- rollback: ``canaryTrafficPercent: 0``; all traffic returns to the previous revision (optionally also
  point ``storageUri`` back at the previous bundle, so the spec matches what is served).
- status: the InferenceService's bundle, canary percentage, readiness and traffic split.

Merge patches are used throughout (a JSON ``null`` removes a field and does not fail when it is absent).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

ACTIONS = ("start", "promote", "rollback", "status")
URI_SCHEMES = ("s3://", "gs://", "pvc://", "https://", "http://", "hdfs://", "oci://")
NAME_PATTERN = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
STATUS_COLUMNS = (
    "NAME:.metadata.name",
    'READY:.status.conditions[?(@.type=="Ready")].status',
    "BUNDLE:.spec.predictor.model.storageUri",
    "CANARY%:.spec.predictor.canaryTrafficPercent",
    "TRAFFIC:.status.components.predictor.traffic[*].percent",
    "REVISIONS:.status.components.predictor.traffic[*].revisionName",
)


class CanaryError(ValueError):
    """Invalid canary arguments (the message names the argument, the bad value and what is allowed)."""


@dataclass(frozen=True)
class Target:
    """The InferenceService a rollout acts on, and how to reach the cluster."""

    name: str
    namespace: str | None = None
    context: str | None = None
    kubectl: str = "kubectl"

    def __post_init__(self) -> None:
        for field_name in ("name", "namespace"):
            value = getattr(self, field_name)
            if value is not None and not NAME_PATTERN.match(value):
                raise CanaryError(
                    f"{field_name}={value!r} is not a valid Kubernetes name (lower-case letters, digits, '-')"
                )

    def kubectl_prefix(self) -> list[str]:
        argv = [self.kubectl]
        if self.context:
            argv += ["--context", self.context]
        if self.namespace:
            argv += ["--namespace", self.namespace]
        return argv


# --------------------------------------------------------------------------------------------- argv builders
def start_argv(target: Target, bundle_uri: str, percent: int) -> list[str]:
    """Serve `bundle_uri` as a canary taking `percent` % of the traffic."""
    _check_uri(bundle_uri)
    _check_percent(percent, low=1, high=99)
    patch = {"spec": {"predictor": {"canaryTrafficPercent": percent, "model": {"storageUri": bundle_uri}}}}
    return _merge_patch(target, patch)


def promote_argv(target: Target) -> list[str]:
    """Send all traffic to the latest revision (the canary's bundle)."""
    return _merge_patch(target, {"spec": {"predictor": {"canaryTrafficPercent": None}}})


def rollback_argv(target: Target, previous_uri: str | None = None) -> list[str]:
    """Send all traffic back to the last fully rolled-out revision; optionally restore its bundle URI."""
    predictor: dict[str, object] = {"canaryTrafficPercent": 0}
    if previous_uri is not None:
        _check_uri(previous_uri)
        predictor["model"] = {"storageUri": previous_uri}
    return _merge_patch(target, {"spec": {"predictor": predictor}})


def status_argv(target: Target) -> list[str]:
    return [
        *target.kubectl_prefix(),
        "get",
        "inferenceservice",
        target.name,
        "-o",
        "custom-columns=" + ",".join(STATUS_COLUMNS),
    ]


def _merge_patch(target: Target, patch: Mapping[str, object]) -> list[str]:
    return [
        *target.kubectl_prefix(),
        "patch",
        "inferenceservice",
        target.name,
        "--type",
        "merge",
        "--patch",
        json.dumps(patch, separators=(",", ":"), sort_keys=True),
    ]


def _check_percent(percent: int, low: int, high: int) -> None:
    if isinstance(percent, bool) or not isinstance(percent, int) or not low <= percent <= high:
        raise CanaryError(f"percent={percent!r} must be an integer from {low} to {high}")


def _check_uri(uri: str) -> None:
    if not uri.startswith(URI_SCHEMES) or len(uri) <= len(uri.split("://")[0]) + 3:
        raise CanaryError(f"bundle uri={uri!r} must start with one of {', '.join(URI_SCHEMES)}")


# --------------------------------------------------------------------------------------------- CLI
def build_argv(args: argparse.Namespace) -> list[str]:
    """The kubectl argv for parsed `visionpipe canary ...` arguments."""
    target = Target(name=args.name, namespace=args.namespace, context=args.context, kubectl=args.kubectl)
    builders: dict[str, Callable[[], list[str]]] = {
        "start": lambda: start_argv(target, args.bundle_uri, args.percent),
        "promote": lambda: promote_argv(target),
        "rollback": lambda: rollback_argv(target, args.previous_uri),
        "status": lambda: status_argv(target),
    }
    return builders[args.canary_action]()


def run_canary(args: argparse.Namespace) -> int:
    """Print (``--dry-run``) or run the kubectl command; returns its exit code."""
    try:
        argv = build_argv(args)
    except CanaryError as exc:
        print(f"visionpipe canary: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(shlex.join(argv))
        return 0
    print(f"+ {shlex.join(argv)}", file=sys.stderr)
    try:
        return subprocess.run(argv, check=False).returncode
    except FileNotFoundError:
        print(f"visionpipe canary: {argv[0]!r} not found; install kubectl or pass --kubectl", file=sys.stderr)
        return 127


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``canary`` with its sub-commands; sets ``func`` (args -> exit code) on the parsed namespace."""
    canary = sub.add_parser("canary", help="canary rollout of a bundle on KServe (kubectl)", description=__doc__)
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
        if action == "rollback":
            parser.add_argument("--previous-uri", default=None, help="also point storageUri back at this bundle")
        parser.set_defaults(func=run_canary)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default="digits", help="InferenceService name")
    parser.add_argument("--namespace", "-n", default=None)
    parser.add_argument("--context", default=None, help="kubeconfig context")
    parser.add_argument("--kubectl", default="kubectl", help="kubectl executable")
    parser.add_argument("--dry-run", action="store_true", help="print the kubectl command instead of running it")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="visionpipe")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
