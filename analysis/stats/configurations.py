"""Configurations in a study's tables: each summarised over its seeds, checked against the
composition baseline, and the l orders it includes. What a configuration is (the key, the labels)
is defined once, in study/config/configuration.py."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd


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
    listed = ", ".join(f"{row.configuration} ({row.test_over_baseline_mean:.2f} x)" for row in weak.itertuples())
    return [
        f"{len(weak)} of {len(summary)} configurations do not clearly beat the composition fit (mean test MAE above "
        f"{CLEARLY_BEATS_BASELINE:g} x the fit's): {listed}; their scores describe models that learned little beyond "
        "counting atoms"
    ]
