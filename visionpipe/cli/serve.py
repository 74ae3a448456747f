"""`visionpipe serve --bundle URI`: serve a bundle with KServe's ModelServer (binds 127.0.0.1 by default)."""

from __future__ import annotations

import argparse

from visionpipe.cli.errors import bad_input


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from visionpipe.serving.server import add_serve_arguments

    parser = sub.add_parser("serve", help="serve a bundle with KServe's ModelServer (binds 127.0.0.1 by default)")
    add_serve_arguments(parser)
    parser.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from visionpipe.serving.server import serve

    if not args.bundle:
        raise bad_input("give --bundle URI (a folder or s3://bucket/name/version)")
    serve(args, args.bundle)
    return 0
