"""`visionpipe canary start|promote|rollback|status`: a KServe canary through the Kubernetes API.

The state machine is visionpipe/rollout/canary.py (see its docstring for the two deployment modes); this reaches
the cluster like kubectl (``--kubeconfig``, ``--context``, ``--namespace``; in a pod, its service account), reads
the InferenceService's deployment mode from the live object, applies the action and prints the status (a table,
or JSON with ``--json``).

``--dry-run`` prints the equivalent ``kubectl patch ... --type merge --patch ...`` (to copy) and writes nothing:
- without ``--mode`` it READS the live object (one GET) and prints the patch the action would send, after the same
  checks (mode, canary state);
- with ``--mode`` it never contacts the cluster and prints the patch for that mode from the arguments alone
  (serverless start then cannot record the stable bundle; serverless rollback needs ``--previous-uri``, standard
  promote ``--bundle-uri``).
Exit codes: 2 bad arguments, 1 a refused transition or API error (the message names it), 0 otherwise.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable

from visionpipe.cli.errors import bad_input, failure
from visionpipe.rollout import canary as rollout
from visionpipe.rollout.canary import (
    ACTIONS,
    DEFAULT_NAME,
    MODES,
    Canary,
    CanaryError,
    CanaryStatus,
    Connection,
    JsonObj,
    KubeIsvcApi,
    RolloutError,
    Target,
)


def offline_argv(args: argparse.Namespace) -> list[str]:
    """The kubectl argv for ``--dry-run --mode`` (from the arguments alone; nothing is contacted)."""
    target = _target(args, args.mode or "serverless")
    builders: dict[str, Callable[[], list[str]]] = {
        "start": lambda: rollout.start_argv(target, args.bundle_uri, args.percent),
        "promote": lambda: rollout.promote_argv(target, args.bundle_uri),
        "rollback": lambda: rollout.rollback_argv(target, args.previous_uri),
        "status": lambda: rollout.status_argv(target),
    }
    return builders[args.canary_action]()


def run_canary(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except CanaryError as exc:
        raise bad_input(str(exc)) from exc
    except RolloutError as exc:
        raise failure(f"{type(exc).__name__}: {exc}") from exc


def _run(args: argparse.Namespace) -> int:
    action = args.canary_action
    if action == "start":
        rollout.check_uri(args.bundle_uri)
        rollout.check_percent(args.percent)
    if args.dry_run and (args.mode is not None or action == "status"):
        argv = offline_argv(args)
        if action == "start" and rollout.kserve_mode(args.mode or "serverless") == rollout.KNATIVE:
            print(
                f"# offline: {rollout.STABLE_URI_ANNOTATION} is not recorded (drop --mode to read the live object); "
                "rollback will need --previous-uri",
                file=sys.stderr,
            )
        print(shlex.join(argv))
        return 0
    api = KubeIsvcApi.connect(
        Connection(kubeconfig=args.kubeconfig, context=args.context, timeout_s=args.request_timeout)
    )
    namespace = args.namespace or api.default_namespace or "default"  # kubectl's order
    canary = Canary(api, args.name, namespace, args.mode)
    if args.dry_run:
        live = canary.read()
        mode = rollout.deployment_mode(live, args.mode)
        plan: JsonObj | None
        if action == "start":
            plan = rollout.plan_start(live, args.bundle_uri, args.percent, args.mode)
        elif action == "promote":
            plan = rollout.plan_promote(live, args.bundle_uri, args.mode)
        else:
            plan = rollout.plan_rollback(live, args.previous_uri, args.mode)
        if plan is None:
            print(f"# nothing to do: {args.name} already runs this canary at {args.percent}%", file=sys.stderr)
            return 0
        target = _target(args, mode, namespace)
        print(shlex.join(rollout.patch_argv(target, plan)))
        return 0
    if action == "status":
        _show(canary.status(), args.json)
        return 0
    if action == "start":
        outcome = canary.start(args.bundle_uri, args.percent)
    elif action == "promote":
        outcome = canary.promote(args.bundle_uri)
    else:
        outcome = canary.rollback(args.previous_uri)
    if outcome.patch is None:
        print(f"# nothing to do: {args.name} already runs this canary at {args.percent}%", file=sys.stderr)
    else:
        target = _target(args, outcome.status.mode, namespace)
        print(f"+ {shlex.join(rollout.patch_argv(target, outcome.patch))}", file=sys.stderr)
    _show(outcome.status, args.json)
    return 0


def _target(args: argparse.Namespace, mode: str, namespace: str | None = None) -> Target:
    return Target(
        name=args.name,
        namespace=namespace or args.namespace,
        context=args.context,
        mode="standard" if rollout.kserve_mode(mode) == rollout.STANDARD else "serverless",
        kubeconfig=args.kubeconfig,
    )


def format_status(status: CanaryStatus) -> str:
    """The status as a small table (what `status` prints without --json)."""
    if status.canary_running:
        canary = f"{status.canary_bundle} at {status.canary_percent}% (ready: {_show_value(status.canary_ready)})"
    else:
        canary = "none"
    rows = [
        ("InferenceService", f"{status.name} (namespace {status.namespace}, {status.mode} mode)"),
        ("ready", _show_value(status.ready)),
        ("bundle (spec)", _show_value(status.bundle)),
        ("stable bundle", _show_value(status.stable_bundle)),
        ("canary", canary),
        ("url", _show_value(status.url)),
        ("resourceVersion", _show_value(status.resource_version)),
    ]
    rows += [("condition", message) for message in status.messages]
    width = max(len(k) for k, _ in rows)
    lines = [f"{key:<{width}}  {value}" for key, value in rows]
    if status.traffic:
        table = [("TARGET", "PERCENT", "TAG", "READY", "BUNDLE")] + [
            (t.target, f"{t.percent}%", t.tag or "-", _show_value(t.ready), t.bundle or "-") for t in status.traffic
        ]
        widths = [max(len(row[i]) for row in table) for i in range(5)]
        lines.append("traffic (from status):")
        lines += [
            "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table
        ]
    else:
        lines.append("traffic (from status): not reported yet")
    return "\n".join(lines)


def _show_value(value: object) -> str:
    return "-" if value is None else str(value)


def _show(status: CanaryStatus, as_json: bool) -> None:
    print(status.to_json() if as_json else format_status(status))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``canary`` with its sub-commands; sets ``func`` (args -> exit code) on the parsed namespace."""
    canary = sub.add_parser(
        "canary",
        help="canary rollout of a bundle on KServe (Kubernetes API; --dry-run prints the kubectl command)",
        description=f"{__doc__}\n{rollout.__doc__}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = canary.add_subparsers(dest="canary_action", required=True, metavar="ACTION")
    helps = {
        "start": "serve a new bundle to a percentage of the traffic",
        "promote": "send all traffic to the canary",
        "rollback": "send all traffic back to the stable bundle",
        "status": "show the bundles, the canary percentage, readiness and the traffic split",
    }
    for action in ACTIONS:
        parser = actions.add_parser(action, help=helps[action], description=helps[action])
        _add_common(parser)
        if action == "start":
            parser.add_argument("--bundle-uri", required=True, help="the new bundle, e.g. s3://visionpipe/...")
            parser.add_argument(
                "--percent", type=int, default=10, help="canary traffic percentage, 1-100, serverless 1-99 (default 10)"
            )
        if action == "promote":
            parser.add_argument(
                "--bundle-uri",
                default=None,
                help="the canary's bundle: checked against the live canary (needed only by --dry-run --mode standard)",
            )
        if action == "rollback":
            parser.add_argument(
                "--previous-uri",
                default=None,
                help="serverless: the stable bundle, when it was not recorded by `start` (or with --dry-run --mode)",
            )
        parser.set_defaults(func=run_canary)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"InferenceService name (default {DEFAULT_NAME})")
    parser.add_argument(
        "--namespace", "-n", default=None, help="namespace (default: the context's, in a pod its own, else default)"
    )
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig file (default $KUBECONFIG, ~/.kube/config)")
    parser.add_argument("--context", default=None, help="kubeconfig context (default: the current one)")
    parser.add_argument(
        "--mode",
        choices=MODES,
        default=None,
        help="the deployment mode you expect; read from the live object and refused when it disagrees; with "
        "--dry-run: print the patch for this mode without contacting the cluster",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the equivalent kubectl command; change nothing (see `visionpipe canary -h`)",
    )
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    parser.add_argument("--request-timeout", type=float, default=30.0, help="seconds per API request (default 30)")
