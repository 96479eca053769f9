"""A self-contained HTML report: tables and PNG figures inlined (base64), no external resources,
so it can be mailed, attached to an MLflow run, or opened offline."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.8em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #555; }
img { max-width: 100%; } .note { font-size: 0.85em; color: #555; }
.warning { border: 2px solid #c62828; background: #fdecea; padding: 0.5em 1em; margin: 1em 0; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 12px; font-size: 0.9em; }
dt { font-weight: 600; }
ul.findings { font-size: 1em; line-height: 1.5; } p.caption { font-weight: 600; font-size: 0.85em; margin: 1em 0 0.2em; }
"""


def _table(frame: pd.DataFrame, table_id: str) -> str:
    if frame.empty:
        return '<p class="note">(empty)</p>'
    return frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="", border=0, table_id=table_id, escape=True)


def _figure(path: Path, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def write_report(
    path: Path,
    title: str,
    summary: dict[str, str],
    sections: list[tuple[str, str, list[tuple[str, pd.DataFrame]], list[tuple[Path, str]]]],
    warnings: list[str] | None = None,
) -> Path:
    """``sections``: (heading, explanatory note, [(table id, table) or (table id, table, caption)],
    [(png, caption)]) each, optionally with a fifth element: sentences shown as a list before the
    note (the findings). ``warnings``: sentences shown in a box above the sections (what limits
    every result below)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<dl>" + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in summary.items()) + "</dl>",
    ]
    if warnings:
        parts.append('<div class="warning" id="warnings">' + "".join(f"<p>{html.escape(w)}</p>" for w in warnings) + "</div>")
    for heading, note, tables, figures, *points in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if points and points[0]:
            parts.append('<ul class="findings">' + "".join(f"<li>{html.escape(p)}</li>" for p in points[0]) + "</ul>")
        if note:
            parts.append(f'<p class="note">{html.escape(note)}</p>')
        for table_id, frame, *caption in tables:
            if caption:
                parts.append(f'<p class="caption">{html.escape(caption[0])}</p>')
            parts.append(_table(frame, table_id))
        for png, caption in figures:
            parts.append(_figure(png, caption))
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
