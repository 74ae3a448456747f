"""What `visionpipe submit` and `visionpipe schedule` share: their options, the request they build, sending it.

Both read a compiled pipeline (``visionpipe/kfp/compiled/<name>.yaml``, or any package given with ``--package``),
type ``-p NAME=VALUE`` arguments by the run-form table (our pipelines) or the package's own parameter types
(another package), refuse a bad value before anything is contacted, probe the endpoint
(``GET {host}/apis/v2beta1/healthz``, short timeout, no proxy) and only then talk to it through
`kfp.Client`. ``--dry-run`` prints the request as JSON and contacts nothing.

The help text adds the cron format (visionpipe/kfp/cron.py) and the authentication, destination and namespace
rules (visionpipe/kfp/client.py) from those modules' own descriptions.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from visionpipe.cli.errors import bad_input, failure
from visionpipe.cli.options import add_param_option, check_run_form, parse_params
from visionpipe.kfp import client, cron
from visionpipe.kfp.client import (
    HOST_ENV_VAR,
    PIPELINE_NAMES,
    TOKEN_ENV_VARS,
    CronError,
    KfpError,
    ParamValue,
    RecurringRunRequest,
    RequestError,
    RunRequest,
    check_destination,
    check_package,
    normalise_host,
    package_for,
    package_kinds,
    package_pipeline,
    resolve_namespace,
    resolve_token,
    schedule,
    submit,
)
from visionpipe.specs.params import kinds

_CLIENT_RULES = (client.__doc__ or "").partition("Authentication:")
# `visionpipe submit|schedule --help`: what they share, the cron format, then the client's rules, each written once.
DESCRIPTION = "\n".join(
    [(__doc__ or "").rpartition("The help text adds")[0], cron.__doc__ or "", _CLIENT_RULES[1] + _CLIENT_RULES[2]]
)


def add_common_arguments(parser: argparse.ArgumentParser, default_pipeline: str) -> None:
    parser.add_argument(
        "--host",
        default=os.environ.get(HOST_ENV_VAR),
        help=f"KFP endpoint URL, e.g. http://localhost:8080 (default ${HOST_ENV_VAR})",
    )
    parser.add_argument(
        "--pipeline",
        choices=PIPELINE_NAMES,
        default=default_pipeline,
        help=f"compiled pipeline from visionpipe/kfp/compiled/<name>.yaml (default {default_pipeline})",
    )
    parser.add_argument("--package", type=Path, default=None, help="a compiled pipeline file (overrides --pipeline)")
    add_param_option(parser, "pipeline argument (repeatable); `visionpipe params --pipeline NAME` lists them")
    parser.add_argument("--experiment", default="visionpipe", help="experiment name (created if missing)")
    parser.add_argument(
        "--namespace",
        "-n",
        default=None,
        help="profile namespace (multi-user Kubeflow; default: the current kube context's namespace)",
    )
    parser.add_argument("--service-account", default=None, help="Kubernetes service account for the run")
    parser.add_argument(
        "--token", default=None, help=f"bearer token (default ${TOKEN_ENV_VARS[0]} or ${TOKEN_ENV_VARS[1]})"
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds for the endpoint probe (default 5)")
    parser.add_argument("--dry-run", action="store_true", help="print the request as JSON; contact nothing")


def request_params(package: Path, pipeline: str | None, pairs: list[str]) -> dict[str, ParamValue]:
    """``-p`` arguments typed and checked by the run-form table when `package` is one of our pipelines, else
    typed by the package's own parameter types."""
    if pipeline is None:
        return parse_params(pairs, package_kinds(package), package.name)
    values = parse_params(pairs, kinds(pipeline), package.name)
    check_run_form(pipeline, values)
    return values


def build_request(args: argparse.Namespace) -> RunRequest | RecurringRunRequest:
    """The request for parsed `visionpipe submit|schedule` arguments (raises RequestError / CronError /
    CliError for a bad -p value)."""
    if args.package:
        package = check_package(args.package)
        pipeline = package_pipeline(package)
    else:
        package, pipeline = package_for(args.pipeline), args.pipeline
    params = request_params(package, pipeline, args.param)
    check_destination(package, params)
    namespace, namespace_source = resolve_namespace(args.namespace)
    if args.command == "submit":
        from datetime import UTC, datetime

        run_name = args.run_name or f"{args.pipeline} {datetime.now(UTC):%Y-%m-%d %H:%M:%S}"
        return RunRequest(
            experiment=args.experiment,
            run_name=run_name,
            package_path=package,
            params=params,
            namespace=namespace,
            service_account=args.service_account,
            namespace_source=namespace_source,
        )
    return RecurringRunRequest(
        experiment=args.experiment,
        job_name=args.job_name or f"visionpipe-{args.pipeline}",
        package_path=package,
        cron=args.cron,
        params=params,
        max_concurrency=args.max_concurrency,
        no_catchup=not args.catchup,
        enabled=not args.disabled,
        description=args.description,
        namespace=namespace,
        service_account=args.service_account,
        namespace_source=namespace_source,
    )


def send(args: argparse.Namespace) -> int:
    """Build the request (bad input: exit 2, nothing contacted), print it (--dry-run) or send it (exit 1 when
    the endpoint fails)."""
    try:
        request = build_request(args)
        host = normalise_host(args.host) if (args.host or not args.dry_run) else None
    except (RequestError, CronError) as exc:
        raise bad_input(str(exc)) from exc
    token, token_source = resolve_token(args.token)
    if args.dry_run:
        described = {
            "host": host,
            "token": token_source,
            "namespace_source": request.namespace_source,
            **request.describe(),
        }
        print(json.dumps(described, indent=2, sort_keys=True, default=str))
        return 0
    assert host is not None
    try:
        if isinstance(request, RunRequest):
            run_id = submit(host, request, token, args.timeout)
            print(f"run id: {run_id}")
        else:
            job_id = schedule(host, request, token, args.timeout)
            print(f"recurring run id: {job_id} (cron {request.cron!r}, UTC)")
    except KfpError as exc:
        raise failure(str(exc)) from exc
    return 0
