"""The analysis as a results page: one self-contained HTML file (figures inlined as base64, one
stylesheet, no script, nothing loaded from elsewhere), so it can be mailed, attached to an MLflow
run, or opened offline.

The page is rendered from a Jinja2 template (templates/report.html.j2, its stylesheet
templates/report.css). It opens with a contents bar linking every section and the findings, each
beside the figure that supports it; figures and tables are numbered in order of appearance, every
table has a one-line caption saying what a row is and a link to the CSV beside report.html that
holds it at full precision (the HTML is formatted by analysis/report/format.py; the CSV is not), and a
long table shows its first rows with the others folded into a <details> element. Wide tables
scroll inside their own container, never the page.
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import pandas as pd

from analysis.report.format import display_columns

TEMPLATES = Path(__file__).parent / "templates"
ROWS_SHOWN = 10  # a longer table shows this many rows; the others are one click away
WIDE = 2.2  # a figure wider than this many times its height gets the whole width of the page, not half


@dataclass
class Figure:
    name: str  # the PNG's file name without .png: its anchor (#figure-NAME) and its file beside report.html
    path: Path
    caption: str


@dataclass
class Table:
    id: str  # the HTML id of the <table>
    frame: pd.DataFrame
    caption: str  # one line: what a row is
    csv: str  # the file beside report.html with every row and column at full precision
    kinds: dict[str, str] = field(default_factory=dict)  # number formats by column (analysis/report/format.py)


@dataclass
class Finding:
    sentences: list[str]
    figure: Figure | None = None  # the figure that supports them, shown beside them


@dataclass
class Section:
    id: str  # the anchor the contents bar links to
    heading: str
    contents: str  # its short name in the contents bar
    note: str = ""
    findings: list[Finding] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    facts: dict[str, str] = field(default_factory=dict)  # a definition list (what was analysed, how)


def _png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's header: given to <img>, the page's layout is known before
    the images are decoded."""
    width, height = struct.unpack(">II", data[16:24])
    return width, height


class _Numbering:
    """Figures and tables numbered in order of first appearance; a figure met again is a link to
    the first one, not a second copy of its pixels."""

    def __init__(self):
        self.figures: dict[str, int] = {}
        self.tables = 0

    def figure(self, figure: Figure | None) -> dict | None:
        if figure is None:
            return None
        if figure.name in self.figures:
            return {"name": figure.name, "number": self.figures[figure.name], "first": False}
        self.figures[figure.name] = len(self.figures) + 1
        data = Path(figure.path).read_bytes()
        width, height = _png_size(data)
        return {
            "name": figure.name,
            "number": self.figures[figure.name],
            "first": True,
            "caption": figure.caption,
            "file": Path(figure.path).name,
            "width": width,
            "height": height,
            "wide": width > WIDE * height,
            "src": "data:image/png;base64," + base64.b64encode(data).decode("ascii"),
        }

    def table(self, table: Table) -> dict:
        self.tables += 1
        columns = display_columns(table.frame, table.kinds)
        classes = [column.css_class for column in columns]
        rows = [[(column.cells[i], kind) for column, kind in zip(columns, classes)] for i in range(len(table.frame))]
        return {
            "id": table.id,
            "number": self.tables,
            "caption": table.caption,
            "csv": table.csv,
            "header": [(column.name, kind) for column, kind in zip(columns, classes)],
            "rows": rows[:ROWS_SHOWN],
            "rest": rows[ROWS_SHOWN:],
        }


def render_report(title: str, lede: str, sections: list[Section], warnings: list[str] | None = None) -> str:
    """The page as text. ``lede``: one line under the title (what was analysed); ``warnings``:
    sentences in a box above the findings (what limits every result below)."""
    numbering = _Numbering()
    shown = []
    for section in sections:
        shown.append(
            {
                "id": section.id,
                "heading": section.heading,
                "contents": section.contents,
                "note": section.note,
                "facts": section.facts,
                "findings": [{"sentences": f.sentences, "figure": numbering.figure(f.figure)} for f in section.findings],
                "tables": [numbering.table(table) for table in section.tables],
                "figures": [numbering.figure(figure) for figure in section.figures],
            }
        )
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined
    )
    return environment.get_template("report.html.j2").render(title=title, lede=lede, warnings=warnings or [], sections=shown)


def write_report(path: Path, title: str, lede: str, sections: list[Section], warnings: list[str] | None = None) -> Path:
    """`render_report` written to ``path``; the CSV files its tables link to belong beside it."""
    path = Path(path)
    path.write_text(render_report(title, lede, sections, warnings), encoding="utf-8")
    return path
