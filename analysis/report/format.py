"""How the report shows a table: human column names and numbers with their units' precision.

Only the HTML is formatted; the CSV files keep their raw columns and full precision. A column's
kind (count, meV, p value, ratio, ...) follows from its name (`column_kind`), and its display name
from `DISPLAY_NAMES` (with ``_mean`` / ``_sd`` suffixes and intervals derived from it). Two
pairs of columns become one cell each, as a paper's table prints them: an estimate and its 95%
interval (``effect_meV``, ``lo_meV``, ``hi_meV`` -> "+12.3 [+4.5, +20.1]") and a mean over seeds
with its seed-to-seed sd (``test_mae_meV_mean``, ``test_mae_meV_sd`` -> "176.7 ± 17.1").
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.report.findings import FOREST_SEEDS
from study.names import (
    BASELINE_TEST_MAE,
    BEST_VAL_MAE,
    COMPLETED,
    EPOCH_SECONDS,
    TEST_MAE,
)

MISSING = "–"  # an en dash: undefined or not applicable (empty in the CSV)

# Column name -> what a reader sees. Names not here are shown as they are (a descriptor, a score).
DISPLAY_NAMES = {
    # configurations, trials
    "configuration": "configuration",
    "n_trials": "trials",
    "n_completed": COMPLETED,
    "n": "seeds",
    "not_completed": "not completed",
    "all_completed": "all seeds completed",
    "in_comparisons": "in comparisons",
    "run_id": "MLflow run",
    "run_name": "run name",
    "label": "trial",
    "seed": "seed",
    "l_values": "l set",
    "hidden_dim": "hidden size",
    "num_layers": "layers",
    "lr": "learning rate",
    "epochs": "epochs",
    TEST_MAE: "test MAE (meV)",
    BEST_VAL_MAE: "validation MAE (meV), best epoch",
    BASELINE_TEST_MAE: "composition fit: test MAE (meV)",
    "test_over_baseline": "test MAE / composition fit",
    "num_params": "parameters",
    EPOCH_SECONDS: "seconds per epoch",
    "test_molecules": "test molecules",
    "knockout_model_mae_meV": "model MAE on knockout molecules (meV)",
    "knockout_composition_mae_meV": "composition fit MAE on knockout molecules (meV)",
    "on_front": "on the Pareto front",
    # importance
    "parameter": "parameter",
    "importance": "importance (mean over forest seeds)",
    "importance_min": "importance (min over forest seeds)",
    "importance_max": "importance (max over forest seeds)",
    "first_in_seeds": f"first in (of {FOREST_SEEDS} forest seeds)",
    # ablation
    "method": "method",
    "kind": "kind",
    "term": "term",
    "l": "l",
    "context": "context",
    "effect_meV": "effect on test MAE (meV)",
    "se_meV": "standard error (meV)",
    "se_seed_meV": "standard error, seed part alone (meV)",
    "ratio": "ratio of test MAE",
    "p": "p",
    "p_holm": "p, Holm-adjusted",
    "df": "degrees of freedom",
    "F": "F",
    "df_num": "numerator degrees of freedom",
    "n_pairs": "seed pairs",
    "n_configuration_pairs": "configuration pairs",
    "n_configurations": "configurations",
    "interval": "interval",
    "model": "model",
    "note": "note",
    # correlations
    "block": "block",
    "score": "score",
    "within_share": "seed-to-seed share of the score's variance",
    "rho": "Spearman rho",
    "p_rho": "p (permutation)",
    "tau": "Kendall tau",
    "p_tau": "p of tau (permutation)",
    "covariates": "covariates",
    "partial_rho": "partial rho given the covariates",
    "p_partial": "p of partial rho",
    "partial_rho_size": "partial rho given the covariates and parameters",
    "p_partial_size": "p of partial rho (with parameters)",
    "mixed_slope": "mixed-model slope (meV per unit of score)",
    "p_mixed": "p of the mixed-model slope",
    "q_rho": "q (false discovery rate)",
    "min_p_rho": "smallest p reachable",
    "in_fdr_family": "in the correction",
    "fdr_method": "correction",
    # score summary
    "mean": "mean",
    "std": "sd",
    "min": "min",
    "max": "max",
    # RDKit descriptors (analysis/scoring/descriptors.py)
    "sps": "SPS",
    "nsps": "nSPS",
    "stereo_centers": "stereo centres",
    "stereo_bonds": "stereo bonds",
    "aromatic": "aromatic atoms",
    "heavy_neighbours": "heavy-atom neighbours",
    "heavy_atoms": "heavy atoms",
    "rings": "rings",
}

# An estimate and the columns of its 95% interval: shown as one cell, "estimate [lo, hi]".
INTERVALS = {
    "effect_meV": ("lo_meV", "hi_meV"),
    "ratio": ("ratio_lo", "ratio_hi"),
    "rho": ("rho_lo", "rho_hi"),
    "tau": ("tau_lo", "tau_hi"),
    "mixed_slope": ("mixed_lo", "mixed_hi"),
}
# Signed estimates print their sign ("+12.3"): a change, whose direction is the point.
SIGNED = {"effect_meV", "mixed_slope"}

COUNTS = {
    "n",
    "seed",
    "hidden_dim",
    "num_layers",
    "epochs",
    "num_params",
    "test_molecules",
    "first_in_seeds",
    "df_num",
    "batch_size",
    "subset",
    "l",
}
P_VALUES = {"p", "q", "p_holm", "q_rho", "min_p_rho"}
# Read to two decimals: ratios, shares, correlations, importances, F, and seconds per epoch.
TWO_DECIMALS = {
    "ratio",
    "test_over_baseline",
    "rho",
    "tau",
    "partial_rho",
    "partial_rho_size",
    "within_share",
    "importance",
    "importance_min",
    "importance_max",
    "F",
    EPOCH_SECONDS,
}
P_FLOOR = 1e-4  # p below this is shown as "< 0.0001": two significant digits of 3e-9 say nothing more
GENERAL_FLOOR = 1e-6  # other magnitudes below this are shown as "≈ 0" (a share or R^2 at rounding level)


def base_name(column: str) -> tuple[str, str]:
    """(the measured quantity, its statistic over seeds: "mean", "sd" or "")."""
    for suffix in ("mean", "sd"):
        if column.endswith(f"_{suffix}"):
            return column[: -len(suffix) - 1], suffix
    return column, ""


def display_name(column: str) -> str:
    """What the report calls a column: `DISPLAY_NAMES`, with ", mean" / ", seed sd" for the
    per-configuration summaries of a metric (``test_mae_meV_mean`` -> "test MAE (meV), mean")."""
    if column in DISPLAY_NAMES:
        return DISPLAY_NAMES[column]
    base, statistic = base_name(column)
    if statistic and base in DISPLAY_NAMES:
        return f"{DISPLAY_NAMES[base]}, " + ("mean" if statistic == "mean" else "seed sd")
    return column


def column_kind(column: str) -> str:
    """count, meV, p, ratio, lr or general: how a column's numbers are printed."""
    base, _ = base_name(column)
    if base in P_VALUES or base.startswith(("p_", "q_")):
        return "p"
    if base in COUNTS or base.startswith(("n_", "num_params")):
        return "count"
    if "meV" in base or base == "mixed_slope":
        return "meV"
    if base in TWO_DECIMALS:
        return "ratio"
    if base == "lr":
        return "lr"
    return "general"


def number(value: float, kind: str, signed: bool = False) -> str:
    """One number as the report prints it: never in exponent notation."""
    value = float(value)
    if not math.isfinite(value):
        return MISSING
    sign = "+" if signed else ""
    if kind == "count":
        return f"{value:{sign},.0f}"
    if kind == "meV":
        return f"{value:{sign},.1f}"
    if kind == "ratio":
        return f"{value:{sign},.2f}"
    if kind == "p":
        return f"< {P_FLOOR:g}" if value < P_FLOOR else significant(value, 2)
    if kind == "lr":
        return np.format_float_positional(value, trim="-")
    # Three significant digits; large numbers rounded, with thousands separators (999.96 too).
    if abs(float(f"{value:.3g}")) >= 1000:
        return f"{value:{sign},.0f}"
    if abs(value) < GENERAL_FLOOR:
        return "0" if value == 0 else "≈ 0"
    text = significant(value, 3)
    return f"+{text}" if signed and value > 0 else text


def significant(value: float, digits: int) -> str:
    """``value`` to ``digits`` significant digits in positional notation, trailing zeros kept
    (0.5 -> "0.50", 0.0999 -> "0.10"): a column of them reads at one precision."""
    if value == 0:
        return "0"
    rounded = float(f"{value:.{digits}g}")
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(rounded))))
    return f"{rounded:.{decimals}f}"


def cell(value, kind: str, signed: bool = False) -> str:
    """Any table value: numbers by kind, booleans as yes / no, text as it is, missing as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA or value is pd.NaT:
        return MISSING
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}" if kind in ("count", "general") else number(float(value), kind, signed)
    if isinstance(value, numbers.Real):
        return number(value, kind, signed)
    return plain_text(str(value)) or MISSING


# A number in exponent notation inside text (a note's "ratio p 2.3e-10"), which a table cell must not show.
EXPONENT = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?[eE][-+]?\d+(?![\w.])")


def plain_text(text: str) -> str:
    """``text`` with every number in exponent notation written out (two significant digits; below
    1e-4, as "< 0.0001": such numbers in notes are p values)."""

    def plain(match: re.Match) -> str:
        value = float(match.group(0))
        return f"< {P_FLOOR:g}" if 0 <= value < P_FLOOR else significant(value, 2)

    return EXPONENT.sub(plain, text)


LONG_TEXT = 40  # characters: a text column holding a longer cell is given room to wrap in a few lines, not many
SHORT_TEXT = 24  # characters: a text column of cells no longer than this (labels, l sets) does not wrap


@dataclass
class Column:
    name: str  # what the reader sees
    cells: list[str]
    numeric: bool  # right-aligned, never wrapped

    @property
    def css_class(self) -> str:
        """num (right-aligned, never wrapped), or text, short (never wrapped) or long (wide when wrapped)."""
        if self.numeric:
            return "num"
        longest = max((len(text) for text in self.cells), default=0)
        return "text long" if longest > LONG_TEXT else "text short" if longest <= SHORT_TEXT else "text"


def display_columns(frame: pd.DataFrame, kinds: dict[str, str] | None = None) -> list[Column]:
    """The frame's columns as the report shows them, in order: estimates with their interval and
    means with their seed sd folded into one column each. ``kinds``: a kind per column name that
    overrides `column_kind` (``"*"`` for every column, e.g. a table of correlations by descriptor)."""
    kinds = kinds or {}
    if len(frame):
        # A column empty in every row (a factorial's F on a paired design's rows) says nothing here.
        frame = frame.dropna(axis=1, how="all")

    def kind_of(name: str) -> str:
        return kinds.get(name, kinds.get("*", column_kind(name)))

    def numeric(name: str) -> bool:
        return pd.api.types.is_numeric_dtype(frame[name]) and not pd.api.types.is_bool_dtype(frame[name])

    columns, used = [], set()
    for name in frame.columns:
        if name in used:
            continue
        kind, signed = kind_of(name), name in SIGNED
        lo_hi = INTERVALS.get(name)
        base, statistic = base_name(name)
        sd = f"{base}_sd"
        if lo_hi and all(c in frame.columns for c in lo_hi):
            used.update(lo_hi)
            cells = [_with_interval(v, lo, hi, kind, signed) for v, lo, hi in zip(frame[name], frame[lo_hi[0]], frame[lo_hi[1]])]
            columns.append(Column(f"{display_name(name)} [95% CI]", cells, True))
        elif statistic == "mean" and sd in frame.columns:
            used.add(sd)
            cells = [_with_sd(m, s, kind) for m, s in zip(frame[name], frame[sd])]
            columns.append(Column(f"{display_name(base)}, mean ± seed sd", cells, True))
        else:
            columns.append(Column(display_name(name), [cell(v, kind, signed) for v in frame[name]], numeric(name)))
    return columns


def _finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _with_interval(value, lo, hi, kind: str, signed: bool) -> str:
    shown = cell(value, kind, signed)
    if _finite(value) and _finite(lo) and _finite(hi):
        return f"{shown} [{number(lo, kind, signed)}, {number(hi, kind, signed)}]"
    return shown


def _with_sd(mean, sd, kind: str) -> str:
    shown = cell(mean, kind)
    # One seed has no sd; parameter counts are the same for every seed (sd 0): the mean alone.
    if _finite(mean) and _finite(sd) and not (kind == "count" and sd == 0):
        return f"{shown} ± {number(sd, kind)}"
    return shown
