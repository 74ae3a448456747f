"""The `visionpipe` command line: run the pipeline locally, compile it for Kubeflow, and more."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from visionpipe.kfp.local import LocalRun


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visionpipe",
        description="Train, threshold, calibrate, validate, publish and serve image classifiers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the training pipeline locally with kfp.local")
    run.add_argument("--source", default=None, help="data source (default: builtin://sklearn-digits)")
    run.add_argument(
        "-p",
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any pipeline parameter, e.g. -p seed=3 (repeatable); `visionpipe params` lists them",
    )
    run.add_argument("--runs-dir", type=Path, default=Path("runs"), help="pipeline root for artifacts")
    run.add_argument("--bundles-dir", type=Path, default=Path("bundles"), help="default export destination")
    run.set_defaults(func=_cmd_run)

    demo = sub.add_parser("demo", help="the demo: run the pipeline on built-in digits (what `make demo` does)")
    demo.add_argument("--runs-dir", type=Path, default=Path("runs"), help="pipeline root for artifacts")
    demo.add_argument("--bundles-dir", type=Path, default=Path("bundles"), help="where the bundle is published")
    demo.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE", help="pipeline parameter")
    demo.set_defaults(func=_cmd_demo, source=None)

    params = sub.add_parser("params", help="list the training pipeline's parameters and defaults")
    params.set_defaults(func=_cmd_params)

    check = sub.add_parser(
        "validate-bundle",
        help="verify a published bundle (local folder or s3://): signature, files, weights, one forward pass",
        description="Verify a bundle as serving does: its Ed25519 signature (trusted keys from "
        "VISIONPIPE_TRUSTED_KEYS and the local key), layout (no links, no unlisted files), checksums, fields, and "
        "the weights (safetensors header, shapes, dtypes, finite values, a forward pass). Exit 0 when it verifies, "
        "1 with 'reason: message' otherwise.",
    )
    check.add_argument("uri", help="bundle folder or s3://bucket/name/version")
    check.add_argument(
        "--allow-unsigned",
        action="store_true",
        help="accept a bundle without a signature, or signed by an untrusted key (a bad signature is still refused)",
    )
    check.set_defaults(func=_cmd_validate_bundle)

    serve = sub.add_parser("serve", help="serve a bundle with KServe's ModelServer (binds 127.0.0.1 by default)")
    from visionpipe.serving.server import add_serve_arguments

    add_serve_arguments(serve)
    serve.set_defaults(func=_cmd_serve)

    from visionpipe.cli.canary import register as register_canary

    register_canary(sub)
    from visionpipe.kfp.client import register as register_kfp

    register_kfp(sub)

    comp = sub.add_parser(
        "compile",
        help="compile the pipelines to visionpipe/kfp/compiled/*.yaml",
        description="Compile the pipelines to IR YAML for the Kubeflow UI. The checked-in files name a placeholder "
        "image; for a cluster compile with --image REF (your pushed image, pinned by digest) into --out.",
    )
    comp.add_argument("--check", action="store_true", help="exit 1 when the YAML in --out is stale")
    comp.add_argument("--out", type=Path, default=None, help="output folder (default visionpipe/kfp/compiled)")
    comp.add_argument(
        "--image",
        default=None,
        metavar="REF",
        help="image every step runs, e.g. registry.example.com/visionpipe@sha256:<64 hex> (a bare tag is accepted "
        "with a warning; default: the placeholder in visionpipe/kfp/platform.py)",
    )
    comp.set_defaults(func=_cmd_compile)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        result = _run_training(args)
    except CliError as exc:
        return exc.report()
    from visionpipe.cli.demo import summarise_run

    print()
    print(result.artifact_path("data_summary").read_text())
    summary = summarise_run(result)
    print(summary.report)
    print(f"Bundle: {summary.bundle_uri}\nArtifacts: {summary.run_dir} ({result.seconds:.1f} s)")
    return 0


class CliError(Exception):
    """A command failed in a way the user can fix; carries the exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code

    def report(self) -> int:
        print(f"visionpipe: {self}", file=sys.stderr)
        return self.code


def _run_training(args: argparse.Namespace) -> LocalRun:
    from visionpipe.kfp.local import ParameterError, parse_parameters, run_pipeline
    from visionpipe.kfp.training import training_pipeline

    try:
        arguments = parse_parameters(training_pipeline, args.param)
    except ParameterError as exc:
        raise CliError(str(exc), 2) from exc
    if args.source:
        arguments["source"] = args.source
    arguments.setdefault("destination", str(args.bundles_dir.resolve()))
    try:
        return run_pipeline(training_pipeline, arguments, args.runs_dir)
    except RuntimeError as exc:
        raise CliError(f"the pipeline failed: {exc}\n(the failing step's log is above)", 1) from exc


def _cmd_demo(args: argparse.Namespace) -> int:
    from visionpipe.cli.demo import classify_over_http, summarise_run

    started = time.monotonic()
    print("visionpipe demo: the seven phases on builtin://sklearn-digits through kfp.local\n", flush=True)
    try:
        result = _run_training(args)
    except CliError as exc:
        return exc.report()
    pipeline_seconds = time.monotonic() - started
    summary = summarise_run(result)
    print("\n" + "=" * 100)
    print(result.artifact_path("data_summary").read_text())
    for text in summary.decision_summaries:
        print(text)
    print(summary.report)
    print(f"Bundle published at {summary.bundle_uri}")
    print(f"Pipeline artifacts under {summary.run_dir} (pipeline {pipeline_seconds:.0f} s)\n", flush=True)
    dataset_dir = result.artifact_path("dataset")
    print(classify_over_http(summary.bundle_uri, dataset_dir))
    print(f"\nvisionpipe demo: done in {time.monotonic() - started:.0f} s")
    return 0


def _cmd_params(args: argparse.Namespace) -> int:
    from visionpipe.kfp.local import pipeline_parameters
    from visionpipe.kfp.training import training_pipeline

    for name, param in pipeline_parameters(training_pipeline).items():
        print(f"{name} = {param.default!r}")
    return 0


def _cmd_validate_bundle(args: argparse.Namespace) -> int:
    from visionpipe.serving.bundle import verify

    try:
        outcome = verify(args.uri, allow_unsigned=args.allow_unsigned)
    except Exception as exc:  # fail closed without a traceback: a verifier bug still refuses the bundle
        print(f"REFUSED [internal_error] {type(exc).__name__}: {exc}")
        print(f"visionpipe validate-bundle: internal_error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(outcome.report)
    if not outcome.ok:
        print(f"visionpipe validate-bundle: {outcome.reason}: {outcome.message}", file=sys.stderr)
    return 0 if outcome.ok else 1


def _cmd_serve(args: argparse.Namespace) -> int:
    from visionpipe.serving.server import serve

    if not args.bundle:
        print("visionpipe serve: give --bundle URI (a folder or s3://bucket/name/version)", file=sys.stderr)
        return 2
    serve(args, args.bundle)
    return 0


def _cmd_compile(args: argparse.Namespace) -> int:
    from visionpipe.kfp.compile import COMPILED_DIR, ImageRefError, compile_all, parse_image_ref, stale_pipelines
    from visionpipe.kfp.platform import BASE_IMAGE

    if args.image is not None:
        try:
            warning = parse_image_ref(args.image).warning()
        except ImageRefError as exc:
            print(f"visionpipe compile: --image: {exc}", file=sys.stderr)
            return 2
        if warning:
            print(f"visionpipe compile: warning: {warning}", file=sys.stderr)
    out_dir = args.out or COMPILED_DIR
    if args.check:
        stale = stale_pipelines(out_dir, args.image)
        again = "visionpipe compile" + (f" --image {args.image}" if args.image else "")
        again += f" --out {args.out}" if args.out else ""
        for name, diff in stale.items():
            print(f"{name}: compiled YAML is stale; run `{again}`\n{diff}", file=sys.stderr)
        if not stale:
            print("compiled pipelines are current")
        return 1 if stale else 0
    for path in compile_all(out_dir, args.image):
        print(f"wrote {path}")
    if args.image is None:
        print(
            f"note: every step names the placeholder image {BASE_IMAGE}; for a cluster, compile with "
            "--image <registry>/visionpipe@sha256:<digest> --out <folder> and upload that",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
