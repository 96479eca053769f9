"""Configurations: what a trial is a replicate of.

A configuration is every trial parameter except the seed: the trials of one configuration differ
only by chance (initialisation, data order), so they are replicates of one measurement, and the
configuration, not the trial, is the unit every comparison across the study counts (analysis/
correlate.py, analysis/ablation.py). Bookkeeping parameters that do not change what is trained
are left out too: the device it ran on and the tensor-product backend (the same function with
the same parameters, study/fast_tp.py). MLflow params that are not trial-config fields (the
fitted target reference, logged after training) are derived from the data, not chosen: ignored.

This module turns the runs' MLflow params into a ``configuration`` label and typed columns of
the parameters that vary, and summarises each configuration over its seeds.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from study.config import EXECUTION_FIELDS, LEGACY_DEFAULTS, TrialConfig

REPLICATE_PARAM = "seed"
BOOKKEEPING_PARAMS = ("device", *EXECUTION_FIELDS)
# Short names in labels, in this order first; other varying parameters follow by name.
LABEL_NAMES = {"l_values": "l", "hidden_dim": "h", "num_layers": "layers", "lr": "lr"}


def configuration_params(params: dict[str, str]) -> dict[str, str]:
    """The run's parameters that define its configuration (strings, as MLflow holds them).

    A field missing from an older run gets the value it was trained with (LEGACY_DEFAULTS), so an
    old and a new run of the same setup are the same configuration.
    """
    known = {**{k: str(v) for k, v in LEGACY_DEFAULTS.items()}, **params}
    excluded = {REPLICATE_PARAM, *BOOKKEEPING_PARAMS}
    return {name: str(known.get(name, "")) for name in TrialConfig.model_fields if name not in excluded}


def _typed(values: pd.Series) -> pd.Series:
    """Numbers where every value is one (hidden_dim, lr, ...); the strings otherwise (l_values)."""
    numeric = pd.to_numeric(values, errors="coerce")
    return numeric if numeric.notna().all() else values


def _label_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def label_configurations(params: Sequence[dict[str, str]]) -> tuple[pd.DataFrame, list[str]]:
    """For each run's params: its ``configuration`` label and a typed column per varying parameter.

    Returns the table (one row per run, in order) and the names of the parameters that vary across
    the runs other than ``l_values`` (the context within which an l is added or removed). Labels
    name every varying parameter (``l=0,1 h=8 lr=0.003``), so different configurations get
    different labels; ``l`` is always named, since the l set is what the study is about.
    """
    rows = [configuration_params(p) for p in params]
    frame = pd.DataFrame(rows, columns=[n for n in TrialConfig.model_fields if n not in (REPLICATE_PARAM, *BOOKKEEPING_PARAMS)])
    varying = [name for name in frame.columns if frame[name].nunique() > 1 and name != "l_values"]
    ordered = [n for n in LABEL_NAMES if n in varying] + sorted(n for n in varying if n not in LABEL_NAMES)
    table = pd.DataFrame({"l_values": frame["l_values"]})
    for name in ordered:
        table[name] = _typed(frame[name])
    key = frame.apply(lambda row: tuple(row), axis=1) if len(frame) else pd.Series([], dtype=object)
    labels = {}
    for index, row in table.iterrows():
        text = " ".join(
            [f"l={row['l_values']}"] + [f"{LABEL_NAMES.get(n, n)}={_label_value(row[n])}" for n in ordered]
        )
        labels[index] = text
    table.insert(0, "configuration", pd.Series(labels, dtype=object))
    # Rounding in labels could merge two configurations (lr 0.0031234 and 0.0031236): disambiguate.
    for text, group in table.groupby("configuration"):
        keys = key[group.index].unique()
        if len(keys) > 1:
            for k, value in enumerate(keys):
                table.loc[group.index[key[group.index] == value], "configuration"] = f"{text} #{k + 1}"
    return table, ordered


def includes(l_values: str, l: int) -> bool:
    """Whether a comma list of l values (as MLflow logs it) holds ``l``."""
    return str(l) in {part.strip() for part in str(l_values).split(",")}


def l_orders(l_values: pd.Series) -> list[int]:
    """Every order that occurs in the study, ascending."""
    return sorted({int(part) for text in l_values for part in str(text).split(",") if part.strip()})


def configuration_summary(trials: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Per configuration: trial count, and mean and seed-to-seed sd of each metric present.

    ``trials``: one row per completed trial with ``configuration`` and the metric columns. The sd
    is over the configuration's seeds (ddof 1; NaN with one seed): the noise a single run carries.
    """
    present = [m for m in metrics if m in trials.columns]
    grouped = trials.groupby("configuration", sort=False)
    table = grouped.size().rename("n_trials").to_frame()
    for metric in present:
        table[f"{metric}_mean"] = grouped[metric].mean()
        table[f"{metric}_sd"] = grouped[metric].std(ddof=1)
    table = table.reset_index()
    if "test_mae_meV_mean" in table.columns:
        table = table.sort_values("test_mae_meV_mean", kind="stable")
    return table.reset_index(drop=True)


# A configuration whose mean test MAE is above this fraction of the composition fit's has not
# clearly learned chemistry beyond counting atoms (the bar every shipped study clears is 1/3).
CLEARLY_BEATS_BASELINE = 0.5


def baseline_notes(summary: pd.DataFrame) -> list[str]:
    """A warning naming the configurations that do not clearly beat the composition fit.

    ``summary``: per configuration, ``configuration`` and ``test_over_baseline_mean`` (the mean over
    seeds of test MAE / composition-fit test MAE)."""
    ratio = summary["test_over_baseline_mean"]
    weak = summary[ratio.isna() | (ratio > CLEARLY_BEATS_BASELINE)]
    if weak.empty:
        return []
    listed = ", ".join(
        f"{row.configuration} ({row.test_over_baseline_mean:.2f} x)" for row in weak.itertuples()
    )
    return [
        f"{len(weak)} of {len(summary)} configurations do not clearly beat the composition fit (mean test MAE above "
        f"{CLEARLY_BEATS_BASELINE:g} x the fit's): {listed}; their scores describe models that learned little beyond "
        "counting atoms"
    ]
