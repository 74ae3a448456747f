"""HTML pages for the Kubeflow UI's visualisation pane (a phase's `dsl.HTML` output): a plot and its tables."""

import base64
import html
from collections.abc import Sequence
from pathlib import Path

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
