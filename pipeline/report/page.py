"""HTML of the report: plain, self-contained (images inlined as data URIs), no scripts."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from typing import Any

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.8rem 0; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: right; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
td:not(.text) { white-space: nowrap; } .scroll { overflow-x: auto; } section > img { max-width: 100%; height: auto; }
.grid { display: flex; flex-wrap: wrap; gap: 0.7rem; }
figure { width: 150px; margin: 0; font-size: 0.75rem; overflow-wrap: anywhere; }
figure img { width: 96px; height: 96px; image-rendering: pixelated; border: 1px solid #aaa; }
.tag { color: #b00; font-weight: bold; } .muted { color: #777; }
pre { background: #f6f6f6; padding: 0.6rem; overflow-x: auto; font-size: 0.75rem; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def img(png: bytes, alt: str) -> str:
    return f'<img src="{data_uri(png, "image/png")}" alt="{esc(alt)}">'


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if v != v else f"{v:.4g}"
    return esc(v)


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]], text_cols: int = 1) -> str:
    """A table; the first ``text_cols`` columns are left-aligned text."""
    head = "".join(
        f'<th class="text">{esc(c)}</th>' if i < text_cols else f"<th>{esc(c)}</th>"
        for i, c in enumerate(columns)
    )
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="text">{_cell(v)}</td>' if i < text_cols else f"<td>{_cell(v)}</td>"
            for i, v in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    # wide tables scroll inside the page instead of widening it
    return (
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


# Web captions can be pages of text (alt text dumps, URLs): a gallery cell shows the start.
CAPTION_CHARS = 300


def short_caption(text: str) -> str:
    return text if len(text) <= CAPTION_CHARS else text[: CAPTION_CHARS - 1] + "\u2026"


def gallery(items: Sequence[dict[str, Any]]) -> str:
    """Thumbnails with caption, score and (when known) the injected defect."""
    cells = []
    for it in items:
        caption = short_caption(it["caption"])
        pic = (
            f'<img src="{data_uri(it["jpeg"], "image/jpeg")}" alt="{esc(caption)}">'
            if it.get("jpeg")
            else '<span class="muted">(no image)</span>'
        )
        tag = f' <span class="tag">{esc(it["defect"])}</span>' if it.get("defect") else ""
        cells.append(
            f"<figure>{pic}<figcaption>{esc(caption)}<br>"
            f'<span class="muted">score {it["score"]:.4g}</span>{tag}</figcaption></figure>'
        )
    return f'<div class="grid">{"".join(cells)}</div>'


def page(title: str, sections: Sequence[tuple[str, str]], intro: str = "") -> str:
    """The whole document: ``sections`` are (heading, inner HTML)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        intro,
    ]
    for heading, inner in sections:
        parts.append(f"<section><h2>{esc(heading)}</h2>{inner}</section>")
    parts.append("</body></html>")
    return "\n".join(parts)
