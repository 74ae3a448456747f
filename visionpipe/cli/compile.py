"""`visionpipe compile`: the pipelines as IR YAML for the Kubeflow UI (``--check``: exit 1 when stale)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from visionpipe.cli.errors import bad_input


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    comp.set_defaults(func=cmd_compile)


def cmd_compile(args: argparse.Namespace) -> int:
    from visionpipe.kfp.compile import COMPILED_DIR, ImageRefError, compile_all, parse_image_ref, stale_pipelines
    from visionpipe.kfp.platform import BASE_IMAGE

    if args.image is not None:
        try:
            warning = parse_image_ref(args.image).warning()
        except ImageRefError as exc:
            raise bad_input(f"--image: {exc}") from exc
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
