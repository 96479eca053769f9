"""Rank correlations of scores with test error, across configurations, with honest uncertainty.

A configuration is every trial parameter except the seed (analysis/configurations.py). Seeds of
one configuration are replicates, not independent evidence: when most of the variance of a score
and of the error is at configuration level, counting each seed as a trial makes a null relation
"significant" in about a quarter of studies of 6 configurations x 3 seeds (nominal 5%; measured by
benchmarks/calibration.py). So every statistic here is computed on the configurations' means over
their seeds. For every (block, score) that varies across configurations:

- ``rho`` (Spearman) and ``tau`` (Kendall tau-b) of the score against the test MAE;
- 95% bootstrap percentile intervals of both (configurations resampled with replacement; resamples
  where either variable is constant are left out); with fewer than MIN_N_FOR_INTERVAL
  configurations the interval is left empty: a percentile bootstrap of 4 points reports [1, 1]
  for any monotone quartet, a certainty the data cannot give (the permutation p stays honest);
- two-sided permutation p-values of both (the error shuffled across configurations);
- ``partial_rho``: Spearman correlation given the named design ``covariates`` that vary (hidden
  size, depth, learning rate): ranks of score and error each regressed on the covariates, then
  correlated, with a permutation p of the residuals (Freedman-Lane). A covariate with few levels
  enters as indicators of its levels, so any effect it has, monotone or not, is removed exactly
  (entered as one rank, a monotone confounder leaves part of itself behind); one with many
  levels (an Optuna learning rate) enters as its rank. ``partial_rho_size`` adds the parameter
  count. The count is mostly the radial MLPs' weights, i.e. mostly the l set itself, so it is
  shown separately: controlling for it also removes part of what the l set does;
- ``within_share``: the share of the score's variance that is seed-to-seed, within
  configurations (near 1: the score is mostly seed noise, and its configuration means too);
- ``mixed_slope`` (+ 95% CI, ``p_mixed``): where configurations have several seeds, a second
  opinion from a linear mixed model (statsmodels MixedLM) of the error's rank on the score's rank
  (both standardized, per trial) with a random intercept per configuration; its p uses a t
  distribution with (configurations - 2) degrees of freedom, since the configurations, not the
  trials, are the replicates of a between-configuration effect;
- ``q_rho``: Benjamini-Hochberg adjusted p of rho over all rows (scipy's false_discovery_control);
- ``n_configurations``, ``n_trials``: what the row rests on.

Within one trial, :func:`molecule_correlations` relates per-molecule absolute error to each
descriptor (Spearman, scipy's p-value).

Resampling is vectorised: a table has ~100 (block, score) rows, each with thousands of resamples.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from analysis.scores import DETERMINED_BY_ERROR

MIN_N_FOR_INTERVAL = 8
# A covariate with at most this many distinct values enters as indicators of its levels.
MAX_LEVELS_AS_INDICATORS = 4
DESIGN_COVARIATES = ("hidden_dim", "num_layers", "lr")
SIZE_COVARIATE = "num_params"
STAT_COLUMNS = (
    "rho", "rho_lo", "rho_hi", "p_rho", "tau", "tau_lo", "tau_hi", "p_tau",
    "covariates", "partial_rho", "p_partial", "partial_rho_size", "p_partial_size",
)
MIXED_COLUMNS = ("mixed_slope", "mixed_lo", "mixed_hi", "p_mixed")
CORRELATION_COLUMNS = (
    "block", "score", "n_configurations", "n_trials", "within_share", *STAT_COLUMNS, *MIXED_COLUMNS, "q_rho",
)


def _rank_rows(values: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis (ties share their mean rank, as Spearman needs)."""
    return stats.rankdata(values, axis=-1)


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of a with the same row of b; NaN where a row is constant."""
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    denominator = np.sqrt((a * a).sum(axis=-1) * (b * b).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=-1) / denominator
    return np.where(denominator > 1e-9, r, np.nan)


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return _pearson_rows(_rank_rows(x), _rank_rows(y))


def kendall_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall tau-b of each row pair: sum sign(dx) sign(dy) / sqrt(pairs untied in x * in y)."""
    x, y = np.atleast_2d(x), np.atleast_2d(y)
    # Rows are processed in chunks of about 2e7 pair entries, so hundreds of trials fit in memory.
    chunk = max(1, int(2e7 // max(x.shape[1] ** 2, 1)))
    out = np.empty(x.shape[0])
    for start in range(0, x.shape[0], chunk):
        xs, ys = x[start : start + chunk], y[start : start + chunk]
        sx = np.sign(xs[:, :, None] - xs[:, None, :])
        sy = np.sign(ys[:, :, None] - ys[:, None, :])
        numerator = (sx * sy).sum(axis=(1, 2))
        denominator = np.sqrt(np.abs(sx).sum(axis=(1, 2)) * np.abs(sy).sum(axis=(1, 2)))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start : start + chunk] = np.where(denominator > 0, numerator / denominator, np.nan)
    return out


def covariate_design(covariates: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """Columns to regress out, one row per configuration, and the names of the covariates used.

    A covariate that does not vary is left out. One with at most MAX_LEVELS_AS_INDICATORS levels
    becomes indicators of its levels (the first level is the reference), so its effect is removed
    whatever its shape; one with more levels enters as its rank.
    """
    columns, used = [], []
    for name in covariates.columns:
        values = covariates[name]
        levels = pd.unique(values)
        if len(levels) < 2:
            continue
        used.append(name)
        if len(levels) <= MAX_LEVELS_AS_INDICATORS:
            columns.extend((values == level).to_numpy(dtype=np.float64) for level in levels[1:])
        else:
            columns.append(stats.rankdata(values.to_numpy(dtype=np.float64)))
    design = np.column_stack(columns) if columns else np.zeros((len(covariates), 0))
    return design, used


def _residualizer(design: np.ndarray) -> np.ndarray | None:
    """The matrix that takes a vector to its residual after least squares on [1, design]; None
    when the design leaves fewer than 3 residual degrees of freedom (nothing left to correlate)."""
    full = np.column_stack([np.ones(len(design)), design])
    rank = np.linalg.matrix_rank(full)
    if len(full) - rank < 3:
        return None
    return np.eye(len(full)) - full @ np.linalg.pinv(full)


def _permutation_p(observed: float, null: np.ndarray) -> float:
    null = null[np.isfinite(null)]
    if not math.isfinite(observed) or len(null) == 0:
        return math.nan
    # +1 in numerator and denominator: the observed labelling is one of the permutations.
    return float((1 + np.sum(np.abs(null) >= abs(observed) - 1e-12)) / (1 + len(null)))


def _interval(values: np.ndarray) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if len(values) < 10:
        return math.nan, math.nan
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def _partial(x: np.ndarray, y: np.ndarray, design: np.ndarray, shuffled: np.ndarray) -> tuple[float, float]:
    """Partial Spearman of x and y given ``design``, and its Freedman-Lane permutation p."""
    residualize = _residualizer(design)
    if residualize is None:
        return math.nan, math.nan
    rx, ry = residualize @ stats.rankdata(x), residualize @ stats.rankdata(y)
    partial = float(_pearson_rows(rx[None], ry[None])[0])
    # Freedman-Lane: permute y's residuals, then remove the covariates again before correlating
    # (skipping the second removal made the test too eager: 9% false positives at 6 configurations).
    null = _pearson_rows(np.broadcast_to(rx, shuffled.shape), ry[shuffled] @ residualize.T)
    return partial, _permutation_p(partial, null)


def correlate(
    x: np.ndarray,
    y: np.ndarray,
    covariates: np.ndarray | None = None,
    size: np.ndarray | None = None,
    n_boot: int = 2000,
    n_perm: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """rho, tau, their bootstrap 95% CIs and permutation p-values; partial rho given the
    ``covariates`` design ([n, k], e.g. from :func:`covariate_design`), and given it plus ``size``
    (a parameter count, entered as its rank). Each row is one independent unit (a configuration)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    design = np.zeros((len(x), 0)) if covariates is None else np.asarray(covariates, dtype=np.float64)
    # No covariate columns (or no rows at all: a score that is non-finite in every trial) is an empty design.
    design = design.reshape(len(x), -1) if design.size else np.zeros((len(x), 0))
    keep = np.isfinite(x) & np.isfinite(y) & np.isfinite(design).all(axis=1)
    if size is not None:
        size = np.asarray(size, dtype=np.float64)
        keep &= np.isfinite(size)
    x, y, design = x[keep], y[keep], design[keep]
    n = int(len(x))
    result: dict[str, float] = {name: math.nan for name in STAT_COLUMNS if name != "covariates"}
    result["n"] = n
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return result
    rng = np.random.default_rng(seed)
    rho = float(spearman_rows(x[None], y[None])[0])
    tau = float(kendall_rows(x[None], y[None])[0])
    shuffled = np.argsort(rng.random((n_perm, n)), axis=1)
    xs = np.broadcast_to(x, (n_perm, n))
    result.update(
        rho=rho, tau=tau,
        p_rho=_permutation_p(rho, spearman_rows(xs, y[shuffled])),
        p_tau=_permutation_p(tau, kendall_rows(xs, y[shuffled])),
    )
    if n >= MIN_N_FOR_INTERVAL and n_boot > 0:
        resample = rng.integers(0, n, size=(n_boot, n))
        result["rho_lo"], result["rho_hi"] = _interval(spearman_rows(x[resample], y[resample]))
        result["tau_lo"], result["tau_hi"] = _interval(kendall_rows(x[resample], y[resample]))
    design = design[:, np.ptp(design, axis=0) > 0] if design.size else design
    if design.shape[1]:
        result["partial_rho"], result["p_partial"] = _partial(x, y, design, shuffled)
    if size is not None and np.ptp(size[keep]) > 0:
        with_size = np.column_stack([design, stats.rankdata(size[keep])])
        result["partial_rho_size"], result["p_partial_size"] = _partial(x, y, with_size, shuffled)
    return result


def mixed_model(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """Slope of y's rank on x's rank (both standardized, per trial) with a random intercept per group.

    statsmodels MixedLM (REML). The p-value and interval use a t distribution with (groups - 2)
    degrees of freedom: with a handful of configurations the usual z test is too eager. NaN when
    the design has no replicated group or the fit fails.
    """
    from statsmodels.regression.mixed_linear_model import MixedLM
    from statsmodels.tools.sm_exceptions import ConvergenceWarning

    result = {name: math.nan for name in MIXED_COLUMNS}
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y, groups = x[keep], y[keep], np.asarray(groups)[keep]
    labels, codes, counts = np.unique(groups, return_inverse=True, return_counts=True)
    if len(labels) < 4 or counts.max() < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return result
    rx, ry = stats.zscore(stats.rankdata(x)), stats.zscore(stats.rankdata(y))
    exog = np.column_stack([np.ones(len(rx)), rx])
    try:
        with warnings.catch_warnings():
            # Boundary fits (no configuration variance) and slow convergence are reported as
            # warnings; the estimate is still the fixed effect asked for.
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            warnings.simplefilter("ignore", UserWarning)
            fit = MixedLM(ry, exog, groups=codes).fit(reml=True)
            # Standard errors are computed lazily, here, and warn here on a singular fit.
            slope, se = float(fit.fe_params[1]), float(fit.bse_fe[1])
    except (np.linalg.LinAlgError, ValueError):
        return result
    if not (math.isfinite(slope) and math.isfinite(se) and se > 0):
        return result
    dof = len(labels) - 2
    half = float(stats.t.ppf(0.975, dof)) * se
    result.update(
        mixed_slope=slope, mixed_lo=slope - half, mixed_hi=slope + half,
        p_mixed=float(2 * stats.t.sf(abs(slope / se), dof)),
    )
    return result


def fdr(p_values: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q); NaN stays NaN and does not count as a test."""
    p = np.asarray(p_values, dtype=np.float64)
    q = np.full_like(p, np.nan)
    finite = np.isfinite(p)
    if finite.any():
        q[finite] = stats.false_discovery_control(p[finite], method="bh")
    return q


def correlate_scores(
    scores: pd.DataFrame,
    trials: pd.DataFrame,
    covariates: Sequence[str] = DESIGN_COVARIATES,
    n_boot: int = 2000,
    n_perm: int = 2000,
    seed: int = 0,
    mixed: bool = True,
) -> pd.DataFrame:
    """One row per (block, score): the score's relation to ``test_mae_meV`` across configurations.

    ``scores``: long table with columns ``run_id, block, score, value``;
    ``trials``: one row per trial with ``run_id, configuration, test_mae_meV``, ``num_params`` and
    the ``covariates`` columns (each constant within a configuration). Scores determined by the
    test MAE itself (scores.DETERMINED_BY_ERROR) are left out.
    """
    wanted = ["run_id", "configuration", "test_mae_meV", SIZE_COVARIATE, *[c for c in covariates if c in trials.columns]]
    covariates = wanted[4:]
    merged = scores[["run_id", "block", "score", "value"]].merge(trials[wanted], on="run_id", how="inner")
    rows = []
    for (block, score), group in merged.groupby(["block", "score"], sort=True):
        if (block, score) in DETERMINED_BY_ERROR:
            continue
        group = group[np.isfinite(group["value"].to_numpy(dtype=np.float64)) & np.isfinite(group["test_mae_meV"].to_numpy(dtype=np.float64))]
        per_config = group.groupby("configuration", sort=True)
        means = per_config.agg(value=("value", "mean"), test_mae_meV=("test_mae_meV", "mean"), size=(SIZE_COVARIATE, "mean"))
        firsts = per_config[covariates].first() if covariates else pd.DataFrame(index=means.index)
        design, used = covariate_design(firsts)
        values = group["value"].to_numpy(dtype=np.float64)
        total = float(np.var(values))
        within = float(np.mean(np.square(values - per_config["value"].transform("mean").to_numpy()))) if len(values) else math.nan
        result = correlate(
            means["value"].to_numpy(), means["test_mae_meV"].to_numpy(), design, means["size"].to_numpy(),
            n_boot=n_boot, n_perm=n_perm, seed=seed,
        )
        result.pop("n")
        row = {
            "block": block, "score": score, "n_configurations": len(means), "n_trials": len(group),
            "within_share": within / total if total > 0 else math.nan,
            **result, "covariates": ", ".join(used) if used else "none",
        }
        if mixed:
            row.update(mixed_model(group["value"].to_numpy(), group["test_mae_meV"].to_numpy(), group["configuration"].to_numpy()))
        rows.append(row)
    table = pd.DataFrame(rows, columns=list(CORRELATION_COLUMNS))
    table["q_rho"] = fdr(table["p_rho"].to_numpy())
    return table


def molecule_correlations(abs_error: np.ndarray, descriptors: pd.DataFrame) -> pd.DataFrame:
    """Spearman of per-molecule absolute error with each numeric descriptor of one trial."""
    rows = []
    error = np.asarray(abs_error, dtype=np.float64)
    for name in descriptors.columns:
        values = descriptors[name]
        if not pd.api.types.is_numeric_dtype(values):
            continue
        values = values.to_numpy(dtype=np.float64)
        keep = np.isfinite(values) & np.isfinite(error)
        n = int(keep.sum())
        if n < 3 or np.ptp(values[keep]) == 0 or np.ptp(error[keep]) == 0:
            rows.append({"descriptor": name, "rho": math.nan, "p": math.nan, "n": n})
            continue
        result = stats.spearmanr(values[keep], error[keep])
        rows.append({"descriptor": name, "rho": float(result.statistic), "p": float(result.pvalue), "n": n})
    return pd.DataFrame(rows, columns=["descriptor", "rho", "p", "n"])
