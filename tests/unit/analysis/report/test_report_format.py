"""What a reader of the report sees in its tables: human column names, numbers with their units'
precision and never in exponent notation, intervals and seed spreads as one cell each, long tables
folded after their first rows, every table and figure numbered and captioned."""

from __future__ import annotations

import math
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from analysis.report import format as fmt  # noqa: E402
from analysis.report.page import (  # noqa: E402
    ROWS_SHOWN,
    Figure,
    Finding,
    Section,
    Table,
    render_report,
)

EXPONENT = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?[eE][-+]?\d+(?![\w.])")


def test_columns_are_named_for_a_reader():
    assert fmt.display_name("importance_min") == "importance (min over forest seeds)"
    assert fmt.display_name("first_in_seeds") == "first in (of 5 forest seeds)"
    assert fmt.display_name("test_mae_meV_mean") == "test MAE (meV), mean"
    assert fmt.display_name("test_mae_meV_sd") == "test MAE (meV), seed sd"
    assert fmt.display_name("num_params") == "parameters"
    assert fmt.display_name("some_new_column") == "some_new_column"  # unknown: as it is, not guessed


@pytest.mark.parametrize(
    "column, value, shown",
    [
        ("num_params", 22922.0, "22,922"),  # parameters with thousands separators
        ("num_params_mean", 450386.0, "450,386"),
        ("test_mae_meV", 176.6649, "176.7"),  # MAE in meV to one decimal
        ("baseline_test_mae_meV_mean", 22920.44, "22,920.4"),
        ("test_over_baseline", 0.3225, "0.32"),  # ratios to two decimals
        ("rho", -0.95, "-0.95"),
        ("p_rho", 0.042131, "0.042"),  # p and q values to two significant digits
        ("q_rho", 0.5, "0.50"),
        ("p_holm", 0.0999, "0.10"),
        ("p", 3.2e-9, "< 0.0001"),
        ("lr", 3e-4, "0.0003"),
        ("value", 0.000345, "0.000345"),  # anything else: three significant digits
        ("value", 12345.6, "12,346"),
        ("value", float("nan"), "–"),
    ],
)
def test_numbers_carry_their_units_precision_and_no_exponent(column, value, shown):
    assert fmt.cell(value, fmt.column_kind(column)) == shown
    assert not EXPONENT.search(shown)


def test_booleans_read_as_words_and_exponents_inside_text_are_written_out():
    assert fmt.cell(True, "general") == "yes" and fmt.cell(False, "general") == "no"
    assert fmt.cell("unadjusted; ratio p 2.3e-10", "general") == "unadjusted; ratio p < 0.0001"
    assert fmt.cell("F 1.5e+03 on 4 terms", "general") == "F 1500 on 4 terms"
    # Hexadecimal run ids are not numbers.
    assert fmt.cell("4242e959ff9c4781b42b8b4c51fdaaa4", "general") == "4242e959ff9c4781b42b8b4c51fdaaa4"


def test_an_interval_and_a_seed_spread_are_one_cell_each_and_empty_columns_are_left_out():
    frame = pd.DataFrame(
        {
            "configuration": ["l=0,1", "l=0"],
            "effect_meV": [-12.345, 4.0],
            "lo_meV": [-20.11, math.nan],
            "hi_meV": [-4.55, math.nan],
            "test_mae_meV_mean": [176.66, 250.0],
            "test_mae_meV_sd": [17.14, math.nan],
            "F": [math.nan, math.nan],  # nothing in any row
        }
    )
    columns = {column.name: column for column in fmt.display_columns(frame)}
    assert list(columns) == ["configuration", "effect on test MAE (meV) [95% CI]", "test MAE (meV), mean ± seed sd"]
    assert columns["effect on test MAE (meV) [95% CI]"].cells == ["-12.3 [-20.1, -4.5]", "+4.0"]
    assert columns["test MAE (meV), mean ± seed sd"].cells == ["176.7 ± 17.1", "250.0"]  # one seed: no sd
    assert columns["configuration"].css_class == "text short" and columns["test MAE (meV), mean ± seed sd"].numeric


def _figure(tmp_path, name: str):
    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [0, 1])
    path = tmp_path / f"{name}.png"
    fig.savefig(path, dpi=50)
    plt.close(fig)
    return Figure(name, path, f"what {name} shows")


def _tables(page: str) -> dict[str, str]:
    return dict(re.findall(r'<table id="([^"]+)">(.*?)</table>', page, re.S))


def test_a_long_table_shows_its_first_rows_and_folds_the_others(tmp_path):
    frame = pd.DataFrame({"configuration": [f"c{k}" for k in range(25)], "test_mae_meV": [100.0 + k for k in range(25)]})
    section = Section(
        "configurations",
        "Configurations",
        "Configurations",
        tables=[Table("configurations", frame, "One row per configuration.", "configurations.csv")],
    )
    page = render_report("t", "lede", [section])
    tables = _tables(page)
    assert tables["configurations"].count("<tr>") == 1 + ROWS_SHOWN  # header and the first rows
    assert tables["configurations-more"].count("<tr>") == 1 + 25 - ROWS_SHOWN
    folded = page[page.index("<details") : page.index("</details>")]
    assert 'id="configurations-more"' in folded and f"Show the other {25 - ROWS_SHOWN} rows" in folded
    assert "<script" not in page  # folding needs no JavaScript
    # The caption says what a row is and links the CSV beside the report.
    assert re.search(r'Table 1\.</span> One row per configuration\. <a class="csv" href="configurations.csv">', page)


def test_figures_are_numbered_captioned_and_shown_once(tmp_path):
    forest, errors = _figure(tmp_path, "ablation_effects"), _figure(tmp_path, "configuration_errors")
    sections = [
        Section(
            "findings",
            "Findings",
            "Findings",
            findings=[
                Finding(["Including l=1 changed test MAE by -3.0 meV."], forest),
                Finding(["Best on validation: l=0,1."], errors),
                Finding(["Ablation: no effect's 95% interval excludes zero."], forest),
            ],
        ),
        Section("ablation", "Ablation effects", "Ablation", figures=[forest]),
    ]
    page = render_report("t", "lede", sections)
    # Each figure once, with its pixels inline and its caption numbered in order of appearance.
    assert page.count("data:image/png;base64,") == 2
    assert re.search(r'<figure id="figure-ablation_effects">.*?Figure 1\.</span> what ablation_effects shows', page, re.S)
    assert re.search(r'<figure id="figure-configuration_errors">.*?Figure 2\.</span> what configuration_errors', page, re.S)
    # Met again, in the findings and in its own section, it is a link back to the first one.
    assert page.count('See <a href="#figure-ablation_effects">Figure 1</a>.') == 2
    # The contents bar links every section.
    nav = re.search(r'<nav class="contents".*?</nav>', page, re.S).group(0)
    assert re.findall(r'href="#([^"]+)"', nav) == ["findings", "ablation"]
    assert re.findall(r'<section id="([^"]+)">', page) == ["findings", "ablation"]
