"""Shared KFP settings for every component: the project image, the component decorator, HTML pages for the UI."""

import base64
import html
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kfp import dsl

if TYPE_CHECKING:  # importing it at run time inside a running component is a circular import in kfp
    from kfp.dsl.python_component import PythonComponent

# The image every executor of the compiled IR names (built from the repository's Dockerfile). Components are
# lightweight KFP components whose body only imports the project's own code, so the image must contain this
# distribution; kfp itself is installed in the image too, hence install_kfp_package=False.
#
# This is a PLACEHOLDER, kept in the checked-in pipelines/compiled/*.yaml: REPLACE IT WITH YOUR DIGEST at compile
# time, `visionpipe compile --image registry.example.com/visionpipe@sha256:<64 hex> --out dist/pipelines`
# (pipelines/compile.py rewrites every executor's image). It is digest-shaped so that the checked-in IR is
# reproducible, and it lives under the reserved `.invalid` domain (RFC 2606), so a package uploaded without
# `--image` fails at image pull with this very name instead of running whatever some mutable tag points at.
BASE_IMAGE = "registry.invalid/replace-with-your-image/visionpipe@sha256:" + "0" * 64


def component(func: Callable[..., object]) -> "PythonComponent":
    """`@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)` for a thin component function.

    Inside a running component KFP imports `kfp.dsl` in runtime mode (`_KFP_RUNTIME=true`), without its
    decorators; the component body then imports this module to reach the core function, so the decorator is
    skipped there (the undecorated function is never called in that process).
    """
    decorator = getattr(dsl, "component", None)
    if decorator is None:
        return func
    return decorator(base_image=BASE_IMAGE, install_kfp_package=False)(func)


# A table for `html_page`: the header cells, then the rows (cells as already formatted text).
Table = tuple[Sequence[str], Sequence[Sequence[str]]]


def html_page(title: str, png_path: Path, tables: Sequence[Table], notes: Sequence[str] = ()) -> str:
    """A self-contained HTML page (the PNG inlined as a base64 data URI, then the tables) for a `dsl.HTML` output.

    The Kubeflow UI renders an HTML artifact's file in its visualisation pane; it cannot show a PNG inside a
    generic Artifact folder, and the page must not point at other files, hence the data URI.
    """
    png = base64.b64encode(Path(png_path).read_bytes()).decode("ascii")
    parts = [
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>',
        html.escape(title),
        "</title><style>body{font-family:sans-serif}table{border-collapse:collapse;margin:8px 0}"
        "th,td{border:1px solid #bbb;padding:2px 8px;text-align:right}th:first-child,td:first-child{text-align:left}"
        "</style></head><body>\n<h3>",
        html.escape(title),
        f'</h3>\n<img alt="{html.escape(Path(png_path).name)}" src="data:image/png;base64,{png}"/>\n',
    ]
    for header, rows in tables:
        parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>\n")
    parts += [f"<p>note: {html.escape(note)}</p>\n" for note in notes]
    parts.append("</body></html>\n")
    return "".join(parts)
