"""`visionpipe validate-bundle URI`: verify a published bundle as serving does.

Its verdict is its output: the report on stdout and, for a refused bundle, ``visionpipe validate-bundle:
<reason>: <message>`` on stderr with exit 1 (the reason is the verifier's, e.g. ``bad_signature``); a verifier
bug refuses the bundle too (``internal_error``), never with a traceback."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    check.set_defaults(func=cmd_validate_bundle)


def cmd_validate_bundle(args: argparse.Namespace) -> int:
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
