"""Ablation effects: what including each order l does to the test error, with a 95% interval.

The question of the seed ("does pruning l = 1, 2 help?") is a causal contrast the study can
measure directly, because the l set is what the sweep varies. Which estimate a study gets depends
on its design, and every row of the table says which model produced it (``method``, ``model``):

- ``factorial`` (analysis/stats/factorial.py): when the l sets are every subset of some orders on top of
  orders all configurations hold, and nothing else varies, the study is a full 2^k factorial and is
  analysed as one: a trial-level model with every interaction, residual = seed-to-seed variation;
  main effects, interactions, simple effects (adding l to one context) and a lack-of-fit test of
  the additive model, on MAE and on log MAE. Its contexts are the whole fixed set of cells, so the
  spread of an effect across them is an interaction the design estimates, not noise, and the
  other estimates below are not computed.
- ``paired``: differences of test MAE between two trials that differ only in that l: same other
  parameters, same seed (so the same split, initialisation stream and data order). Differences
  are averaged over seeds within each pair of configurations, and the 95% t interval is taken
  over those configuration pairs: with other parameters varying (hidden size, depth) the
  configuration pairs stand for the contexts l can be added to. With a single configuration pair
  the interval is over its seeds and only covers seed noise; the ``interval`` column says which.
- ``regression``: least squares (statsmodels OLS) of the configurations' mean test MAE over their
  seeds on an indicator per l that varies, plus the other parameters that vary (a learning rate
  as log10, parameters with few levels as categories); t intervals on (configurations -
  coefficients) degrees of freedom. For Optuna studies, where configurations rarely differ in
  exactly one l, this is the estimate. The configuration is the unit because seeds of one
  configuration are not independent; a trial-level fit with cluster-robust errors by
  configuration was the other candidate, but with 14-16 configurations its 95% intervals covered
  the planted effects only 85-91% of the time in simulated studies (means: 95-96%).
- ``unpaired``: mean of the configurations with l minus the mean of those without (Welch t
  interval over configurations). Confounded by whatever else differs between the two groups;
  shown only to see what pairing buys.

Only completed trials of configurations whose seeds all completed should be passed in
(analysis/stats/survival.py): an effect measured on survivors of early stopping is biased toward zero or worse.
The effect is in meV of test MAE: positive means including l made the error larger.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from analysis.stats import factorial
from analysis.stats.configurations import includes, l_orders
from study.names import TEST_MAE

MAX_LEVELS_AS_CATEGORIES = 4
# One schema for every design: the factorial's columns, then the paired design's counts.
ABLATION_COLUMNS = (*factorial.FACTORIAL_COLUMNS[:-1], "n_pairs", "n_configuration_pairs", "n_configurations", "note")
MODELS = {
    "paired": "differences of seed-paired trials, t over configuration pairs",
    "regression": "OLS of configuration means on inclusion indicators (additive) and covariates",
    "unpaired": "configurations with l minus those without, Welch t (confounded)",
}


def _t_interval(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and 95% t interval of the mean; NaN interval below two values."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean()) if len(values) else math.nan
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
    return mean, mean - half, mean + half


def _without(l_values: str, l: int) -> str:
    return ",".join(part.strip() for part in str(l_values).split(",") if part.strip() != str(l))


def paired_differences(trials: pd.DataFrame, l: int, context: Sequence[str], metric: str = TEST_MAE) -> pd.DataFrame:
    """Every pair of trials that differ only in including ``l``: one row per pair with the two
    configurations, the seed and ``difference`` = metric(with l) - metric(without l)."""
    keys = ["l_values", *context, "seed"]
    # Stringified keys: NaN never equals NaN in a merge, and float parameters logged as the same
    # string must match exactly.
    frame = trials[[*keys, "configuration", metric]].copy()
    for key in keys:
        frame[key] = frame[key].astype(str)
    with_l = frame[[includes(v, l) for v in frame["l_values"]]].copy()
    with_l["l_values"] = [_without(v, l) for v in with_l["l_values"]]
    pairs = with_l.merge(frame, on=keys, suffixes=("_with", "_without"))
    return pd.DataFrame(
        {
            "configuration_with": pairs["configuration_with"],
            "configuration_without": pairs["configuration_without"],
            "seed": pairs["seed"],
            "difference": pairs[f"{metric}_with"] - pairs[f"{metric}_without"],
        }
    )


def paired_effect(trials: pd.DataFrame, l: int, context: Sequence[str], metric: str = TEST_MAE) -> dict:
    """The ``paired`` row for ``l`` (see the module docstring)."""
    pairs = paired_differences(trials, l, context, metric)
    row = {"l": l, "method": "paired", "n_pairs": len(pairs), "n_trials": 2 * len(pairs)}
    if pairs.empty:
        return {
            **row,
            "effect_meV": math.nan,
            "lo_meV": math.nan,
            "hi_meV": math.nan,
            "n_configuration_pairs": 0,
            "n_configurations": 0,
            "interval": "",
            "note": "no two configurations differ only in this l",
        }
    per_config_pair = pairs.groupby(["configuration_with", "configuration_without"])["difference"].mean()
    n_configurations = len(set(pairs["configuration_with"]) | set(pairs["configuration_without"]))
    if len(per_config_pair) >= 2:
        effect, lo, hi = _t_interval(per_config_pair.to_numpy())
        interval, note = "t over configuration pairs", ""
    else:
        effect, lo, hi = _t_interval(pairs["difference"].to_numpy())
        interval = "t over seeds" if len(pairs) >= 2 else ""
        note = "one pair of configurations: the interval covers seed noise only, not other contexts"
    return {
        **row,
        "effect_meV": effect,
        "lo_meV": lo,
        "hi_meV": hi,
        "n_configuration_pairs": len(per_config_pair),
        "n_configurations": n_configurations,
        "interval": interval,
        "note": note,
    }


def unpaired_effect(trials: pd.DataFrame, l: int, metric: str = TEST_MAE) -> dict:
    """The ``unpaired`` row for ``l``: configurations with l minus without, Welch t interval."""
    means = trials.groupby("configuration").agg(value=(metric, "mean"), l_values=("l_values", "first"))
    has = np.array([includes(v, l) for v in means["l_values"]])
    a, b = means["value"].to_numpy()[has], means["value"].to_numpy()[~has]
    row = {
        "l": l,
        "method": "unpaired",
        "n_pairs": math.nan,
        "n_configuration_pairs": math.nan,
        "n_configurations": len(means),
        "n_trials": len(trials),
        "interval": "",
        "note": "confounded; for comparison",
    }
    if len(a) == 0 or len(b) == 0:
        return {**row, "effect_meV": math.nan, "lo_meV": math.nan, "hi_meV": math.nan}
    effect = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return {**row, "effect_meV": effect, "lo_meV": math.nan, "hi_meV": math.nan}
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if se > 0 else len(a) + len(b) - 2
    half = float(stats.t.ppf(0.975, dof)) * se
    return {**row, "effect_meV": effect, "lo_meV": effect - half, "hi_meV": effect + half, "interval": "Welch t over configurations"}


def regression_design(trials: pd.DataFrame, orders: Sequence[int], context: Sequence[str]) -> tuple[pd.DataFrame, dict[str, str]]:
    """Intercept, one inclusion indicator per order, then the context parameters that vary; and
    for each covariate column, the parameter it comes from.

    Columns that add nothing to the design's rank are dropped, indicators last: an aliased
    covariate is left out before an l (the effect asked for) is.
    """
    columns = {"const": np.ones(len(trials))}
    sources: dict[str, str] = {}
    for l in orders:
        columns[f"l{l}"] = np.array([includes(v, l) for v in trials["l_values"]], dtype=np.float64)
    for name in context:
        values = trials[name]
        levels = pd.unique(values)
        if len(levels) < 2:
            continue
        numeric = pd.api.types.is_numeric_dtype(values)
        if numeric and len(levels) > MAX_LEVELS_AS_CATEGORIES:
            data = values.to_numpy(dtype=np.float64)
            # A learning rate or a size spans orders of magnitude: its effect is closer to linear in the log.
            column = f"log10 {name}" if (data > 0).all() else name
            columns[column] = np.log10(data) if (data > 0).all() else data
            sources[column] = name
        else:
            for level in sorted(levels, key=str)[1:]:
                columns[f"{name}={level}"] = (values == level).to_numpy(dtype=np.float64)
                sources[f"{name}={level}"] = name
    design = pd.DataFrame(columns, index=trials.index)
    kept: list[str] = []
    for name in design.columns:
        candidate = design[[*kept, name]].to_numpy()
        if np.linalg.matrix_rank(candidate) == len(kept) + 1:
            kept.append(name)
    return design[kept], {column: source for column, source in sources.items() if column in kept}


def regression_effects(trials: pd.DataFrame, context: Sequence[str], metric: str = TEST_MAE) -> list[dict]:
    """The ``regression`` rows, one per order that varies (see the module docstring)."""
    import statsmodels.api as sm

    orders = [l for l in l_orders(trials["l_values"]) if 0 < sum(includes(v, l) for v in trials["l_values"]) < len(trials)]
    if not orders:
        return []
    means = trials.groupby("configuration", sort=True)[metric].mean()
    # Every parameter but the seed is constant within a configuration: its first trial describes it.
    configurations = trials.drop_duplicates("configuration").set_index("configuration").loc[means.index].reset_index()
    design, sources = regression_design(configurations, orders, context)
    covariates = list(dict.fromkeys(sources.values()))
    base = {
        "method": "regression",
        "n_pairs": math.nan,
        "n_configuration_pairs": math.nan,
        "n_configurations": len(means),
        "n_trials": len(trials),
    }
    note = "adjusted for " + (", ".join(covariates) if covariates else "nothing else (no other parameter varies)")
    empty = {"effect_meV": math.nan, "lo_meV": math.nan, "hi_meV": math.nan}
    if len(means) - design.shape[1] < 2:
        reason = f"too few configurations ({len(means)}) for {design.shape[1]} coefficients"
        return [{**base, "l": l, **empty, "interval": "", "note": reason} for l in orders]
    fit = sm.OLS(means.to_numpy(dtype=np.float64), design.to_numpy(), hasconst=True).fit()
    bounds = np.asarray(fit.conf_int(alpha=0.05))
    rows = []
    names = list(design.columns)
    for l in orders:
        name = f"l{l}"
        if name not in names:
            rows.append({**base, "l": l, **empty, "interval": "", "note": "not identifiable: aliased with other parameters"})
            continue
        k = names.index(name)
        rows.append(
            {
                **base,
                "l": l,
                "effect_meV": float(fit.params[k]),
                "lo_meV": float(bounds[k, 0]),
                "hi_meV": float(bounds[k, 1]),
                "interval": "OLS t over configuration means",
                "note": note,
            }
        )
    return rows


def ablation_effects(
    trials: pd.DataFrame, context: Sequence[str], metric: str = TEST_MAE, errors: dict[str, pd.Series] | None = None
) -> pd.DataFrame:
    """The effects of every order that is in some configurations and not in others, by the model
    the study's design implies (see the module docstring). ``trials``: completed trials with
    ``configuration, l_values, seed`` (the l set as a comma list), the ``context`` columns (the
    other parameters that vary) and ``metric``; ``errors``: optional per-molecule absolute errors
    (meV) by run id, indexed by molecule id, which a factorial study uses to carry the sampling of
    the test molecules into its intervals (when every trial was tested on the same molecules)."""
    trials = trials[np.isfinite(trials[metric].to_numpy(dtype=np.float64))].reset_index(drop=True)
    design = factorial.factorial_design(trials, context)
    if design is not None:
        return _schema(factorial.factorial_effects(trials, design, metric, molecule_errors(trials, errors)))
    orders = [l for l in l_orders(trials["l_values"]) if 0 < sum(includes(v, l) for v in trials["l_values"]) < len(trials)]
    rows = [paired_effect(trials, l, context, metric) for l in orders]
    rows += regression_effects(trials, context, metric)
    rows += [unpaired_effect(trials, l, metric) for l in orders]
    for row in rows:
        row.update(kind="average", term=f"l{row['l']}", model=MODELS[row["method"]])
    table = _schema(pd.DataFrame(rows))
    method_order = {"paired": 0, "regression": 1, "unpaired": 2}
    table = table.sort_values(["l", "method"], key=lambda c: c.map(method_order) if c.name == "method" else c, kind="stable")
    return table.reset_index(drop=True)


def _schema(table: pd.DataFrame) -> pd.DataFrame:
    return table.reindex(columns=list(ABLATION_COLUMNS))


def molecule_errors(trials: pd.DataFrame, errors: dict[str, pd.Series] | None) -> np.ndarray | None:
    """[trials, molecules] absolute errors in the order of ``trials`` (by ``run_id``), or None when
    they are not given for every trial or the trials were not all tested on the same molecules."""
    if errors is None or "run_id" not in trials or any(run_id not in errors for run_id in trials["run_id"]):
        return None
    first = errors[trials["run_id"].iloc[0]]
    molecules = pd.Index(first.index).sort_values()
    rows = []
    for run_id in trials["run_id"]:
        series = errors[run_id]
        if len(series) != len(molecules) or not pd.Index(series.index).sort_values().equals(molecules):
            return None
        rows.append(series.reindex(molecules).to_numpy(dtype=np.float64))
    return np.vstack(rows)


def is_factorial(table: pd.DataFrame) -> bool:
    return bool(len(table)) and (table["method"] == factorial.METHOD).all()


def factorial_terms(table: pd.DataFrame) -> pd.DataFrame | None:
    """A factorial table's main effects and interactions (the Holm family); None for other designs."""
    return factorial.family(table) if is_factorial(table) else None


def _headline_methods(group: pd.DataFrame) -> tuple[pd.Series | None, pd.Series | None]:
    """The paired row when the study has pairs for this l, else None; and the regression row."""
    by_method = group.set_index("method")
    paired = by_method.loc["paired"] if "paired" in by_method.index else None
    regression = by_method.loc["regression"] if "regression" in by_method.index else None
    if paired is not None and not (paired["n_pairs"] > 0 and math.isfinite(paired["effect_meV"])):
        paired = None
    return paired, regression


def headline_estimates(table: pd.DataFrame) -> dict[int, tuple[str, pd.Series]]:
    """Per l, (method, row) of the estimate the headline reports, picked as `headline` picks it
    (a factorial's main effect; else the paired row where there are pairs, else the regression's);
    an l the study cannot estimate is absent."""
    if is_factorial(table):
        return {int(row["l"]): (factorial.METHOD, row) for _, row in table[table["kind"] == "main"].iterrows()}
    chosen = {}
    for l, group in table.groupby("l", sort=True):
        paired, regression = _headline_methods(group)
        if paired is not None:
            chosen[int(l)] = ("paired", paired)
        elif regression is not None and math.isfinite(regression["effect_meV"]):
            chosen[int(l)] = ("regression", regression)
    return chosen


def headline(table: pd.DataFrame) -> list[str]:
    """The factorial's sentences for a factorial study; else one sentence per l: the paired
    estimate where the study has pairs, else the regression's."""
    if is_factorial(table):
        return factorial.factorial_sentences(table)
    sentences = []
    for l, group in table.groupby("l", sort=True):
        paired, regression = _headline_methods(group)
        if paired is not None:
            sentences.append(
                f"including l={l} changed test MAE by {_interval_text(paired)} over {int(paired['n_pairs'])} paired "
                f"comparisons ({int(paired['n_configuration_pairs'])} pairs of configurations"
                + (f"; {paired['note']}" if paired["note"] else "")
                + ")."
            )
        elif regression is not None and math.isfinite(regression["effect_meV"]):
            sentences.append(
                f"including l={l} changed test MAE by {_interval_text(regression)} by regression over "
                f"{int(regression['n_configurations'])} configurations ({int(regression['n_trials'])} trials; "
                f"{regression['note']}); no two configurations differ only in l={l}."
            )
        else:
            sentences.append(f"the study cannot estimate the effect of l={l}: no paired comparisons and no identifiable regression.")
    return sentences


def _interval_text(row: pd.Series) -> str:
    if math.isfinite(row["lo_meV"]):
        return f"{row['effect_meV']:+.1f} meV [{row['lo_meV']:+.1f}, {row['hi_meV']:+.1f}]"
    return f"{row['effect_meV']:+.1f} meV (no interval: too few comparisons)"
