"""Rank correlations of scores with test error, across configurations, with honest uncertainty.

A configuration is every trial parameter except the seed (analysis/stats/configurations.py). Seeds of
one configuration are replicates, not independent evidence: when most of the variance of a score
and of the error is at configuration level, counting each seed as a trial makes a null relation
"significant" in about a quarter of studies of 6 configurations x 3 seeds (nominal 5%; measured by
benchmarks/calibration.py). So every statistic here is computed on the configurations' means over
their seeds. For every (block, score) that varies across configurations:

- ``rho`` (Spearman) and ``tau`` (Kendall tau-b) of the score against the test MAE;
- 95% bootstrap percentile intervals of both (scipy.stats.bootstrap, configurations resampled
  with replacement, paired; resamples where either variable is constant are left out); with fewer
  than MIN_N_FOR_INTERVAL configurations the interval is left empty: a percentile bootstrap of 4
  points reports [1, 1] for any monotone quartet, a certainty the data cannot give (the
  permutation p stays honest);
- two-sided permutation p-values of both (scipy.stats.permutation_test, the error shuffled across
  configurations). With n! <= EXACT_PERMUTATIONS_MAX (n <= 8) every permutation is enumerated and
  p is exact; beyond, n_perm seeded random permutations, counted with the observed labelling
  ((1 + hits) / (1 + n_perm)). p is the share of permutations with |statistic| >= |observed|:
  an exact test of |rho| whatever the shape of the null. Without ties the null is symmetric and
  this is scipy's own two-sided p (twice the smaller tail); with ties in both variables the null
  can be lopsided and doubling a tail overstates p, so scipy's ``pvalue`` is not used;
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
- ``q_rho``: p of rho adjusted for the false discovery rate (scipy's false_discovery_control;
  ``fdr_method`` "bh", Benjamini-Hochberg, or "by", Benjamini-Yekutieli, valid however the scores
  depend on each other), over the rows ``in_fdr_family`` only: those with a finite p whose design
  can reach the level at all, ``min_p_rho`` <= ``fdr_level``. ``min_p_rho`` is the smallest p the
  permutation test can give on that row: with every permutation enumerated, the share of them
  whose |rho| reaches the largest one (2/n! without ties: 0.083 at 4 configurations), else
  1/(n_perm + 1). A row of 4 configurations can never be significant; counted in the family it
  would only raise everyone else's q. Rows outside the family get no q (NaN);
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

from analysis.scoring.scores import DETERMINED_BY_ERROR
from study.names import TEST_MAE

MIN_N_FOR_INTERVAL = 8
# Up to this many permutations (8!) the permutation tests enumerate all of them: p is exact.
EXACT_PERMUTATIONS_MAX = math.factorial(8)
# Rows whose smallest attainable p is above this level are left out of the FDR family.
FDR_LEVEL = 0.05
FDR_METHODS = ("bh", "by")
# A covariate with at most this many distinct values enters as indicators of its levels.
MAX_LEVELS_AS_INDICATORS = 4
DESIGN_COVARIATES = ("hidden_dim", "num_layers", "lr")
SIZE_COVARIATE = "num_params"
STAT_COLUMNS = (
    "rho",
    "rho_lo",
    "rho_hi",
    "p_rho",
    "tau",
    "tau_lo",
    "tau_hi",
    "p_tau",
    "covariates",
    "partial_rho",
    "p_partial",
    "partial_rho_size",
    "p_partial_size",
)
MIXED_COLUMNS = ("mixed_slope", "mixed_lo", "mixed_hi", "p_mixed")
CORRELATION_COLUMNS = (
    "block",
    "score",
    "n_configurations",
    "n_trials",
    "within_share",
    *STAT_COLUMNS,
    *MIXED_COLUMNS,
    "q_rho",
    "min_p_rho",
    "in_fdr_family",
    "fdr_method",
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


def _rowwise(statistic):
    """``statistic`` (of [k, n] rows, giving [k]) as scipy's resampling calls it: on [n] or [..., n]."""

    def on_last_axis(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
        shape = np.broadcast_shapes(*(sample.shape for sample in samples))[:-1]
        rows = [np.broadcast_to(sample, (*shape, sample.shape[-1])).reshape(-1, sample.shape[-1]) for sample in samples]
        return np.asarray(statistic(*rows)).reshape(shape)

    return on_last_axis


def _permutation_null(statistic, sample: np.ndarray, n_perm: int, seed) -> tuple[np.ndarray, bool]:
    """``statistic`` of ``sample`` permuted ([k, n] -> [k]), over every permutation when there are
    at most EXACT_PERMUTATIONS_MAX (then True), else over ``n_perm`` seeded random ones (False).

    A fresh generator from the same ``seed`` for each statistic: they all see the same permutations.
    """
    n_all = math.factorial(len(sample))
    exact = n_all <= EXACT_PERMUTATIONS_MAX
    n_resamples = n_all if exact else n_perm
    if n_resamples < 1:
        return np.empty(0), False
    result = stats.permutation_test(
        (sample,),
        _rowwise(statistic),
        permutation_type="pairings",
        vectorized=True,
        n_resamples=n_resamples,
        alternative="two-sided",
        rng=np.random.default_rng(seed),
    )
    # scipy enumerates all permutations exactly when n_resamples >= n!; check that it did.
    assert len(result.null_distribution) == n_resamples
    return np.asarray(result.null_distribution, dtype=np.float64).reshape(-1), exact


def _permutation_p(observed: float, null: np.ndarray, exact: bool) -> float:
    """Two-sided p: the share of permutations with |statistic| >= |observed| (see module doc)."""
    null = null[np.isfinite(null)]
    if not math.isfinite(observed) or len(null) == 0:
        return math.nan
    hits = int(np.sum(np.abs(null) >= abs(observed) - 1e-12))
    if exact:
        return hits / len(null)  # the observed labelling (identity) is among the enumerated ones
    # Sampled: +1 in numerator and denominator, the observed labelling is one of the permutations.
    return (1 + hits) / (1 + len(null))


def _smallest_p(null: np.ndarray, exact: bool) -> float:
    """The smallest p :func:`_permutation_p` can give with this null: what the most extreme data could reach."""
    null = null[np.isfinite(null)]
    if len(null) == 0:
        return math.nan
    if exact:
        return _permutation_p(float(np.abs(null).max()), null, exact=True)
    return 1 / (1 + len(null))


def _interval(statistic, x: np.ndarray, y: np.ndarray, n_boot: int, seed) -> tuple[float, float]:
    """95% percentile bootstrap interval of ``statistic`` ([k, n], [k, n] -> [k]) over (x, y) pairs.

    Resamples where x or y is constant have no rank correlation (NaN). scipy takes the quantiles
    of the whole bootstrap distribution with NaN propagating (and warns), so one constant resample
    would make the interval NaN; scipy has no option to skip them. So scipy draws the resamples
    and computes the statistic, and the percentiles are taken here over the finite ones with the
    same (linear) quantile rule: where no resample is constant this is scipy's interval exactly.
    Leaving them out conditions on resamples that have a correlation at all, the rule kept from
    before; with fewer than 10 of those there is no interval.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)  # the NaN interval we do not use
        result = stats.bootstrap(
            (x, y),
            _rowwise(statistic),
            n_resamples=n_boot,
            paired=True,
            vectorized=True,
            method="percentile",
            confidence_level=0.95,
            rng=np.random.default_rng(seed),
        )
    values = np.asarray(result.bootstrap_distribution, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) < 10:
        return math.nan, math.nan
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def _partial(x: np.ndarray, y: np.ndarray, design: np.ndarray, n_perm: int, seed) -> tuple[float, float]:
    """Partial Spearman of x and y given ``design``, and its Freedman-Lane permutation p."""
    residualize = _residualizer(design)
    if residualize is None:
        return math.nan, math.nan
    rx, ry = residualize @ stats.rankdata(x), residualize @ stats.rankdata(y)
    partial = float(_pearson_rows(rx[None], ry[None])[0])
    # Freedman-Lane: permute y's residuals, then remove the covariates again before correlating
    # (skipping the second removal made the test too eager: 9% false positives at 6 configurations).
    null, exact = _permutation_null(lambda ry_perm: _pearson_rows(rx, ry_perm @ residualize.T), ry, n_perm, seed)
    return partial, _permutation_p(partial, null, exact)


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
    (a parameter count, entered as its rank). Each row is one independent unit (a configuration).

    Also ``min_p_rho``, the smallest p the permutation test of rho can give with these n (see the
    module doc), and ``n``. With n! <= EXACT_PERMUTATIONS_MAX the p-values are exact and
    ``n_perm`` is not used."""
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
    result["min_p_rho"] = math.nan
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return result
    # Separate streams for the permutations and the bootstrap; each is restarted per statistic, so
    # rho, tau and the partials see the same permutations, and rho and tau the same resamples.
    permutation_seed, bootstrap_seed = np.random.SeedSequence(seed).spawn(2)
    rho = float(spearman_rows(x[None], y[None])[0])
    tau = float(kendall_rows(x[None], y[None])[0])
    rho_null, exact = _permutation_null(lambda y_perm: spearman_rows(x, y_perm), y, n_perm, permutation_seed)
    tau_null, _ = _permutation_null(
        lambda y_perm: kendall_rows(np.broadcast_to(x, y_perm.shape), y_perm),
        y,
        n_perm,
        permutation_seed,
    )
    result.update(
        rho=rho,
        tau=tau,
        p_rho=_permutation_p(rho, rho_null, exact),
        p_tau=_permutation_p(tau, tau_null, exact),
        min_p_rho=_smallest_p(rho_null, exact),
    )
    if n >= MIN_N_FOR_INTERVAL and n_boot > 0:
        result["rho_lo"], result["rho_hi"] = _interval(spearman_rows, x, y, n_boot, bootstrap_seed)
        result["tau_lo"], result["tau_hi"] = _interval(kendall_rows, x, y, n_boot, bootstrap_seed)
    design = design[:, np.ptp(design, axis=0) > 0] if design.size else design
    if design.shape[1]:
        result["partial_rho"], result["p_partial"] = _partial(x, y, design, n_perm, permutation_seed)
    if size is not None and np.ptp(size[keep]) > 0:
        with_size = np.column_stack([design, stats.rankdata(size[keep])])
        result["partial_rho_size"], result["p_partial_size"] = _partial(x, y, with_size, n_perm, permutation_seed)
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
        mixed_slope=slope,
        mixed_lo=slope - half,
        mixed_hi=slope + half,
        p_mixed=float(2 * stats.t.sf(abs(slope / se), dof)),
    )
    return result


def fdr(p_values: Sequence[float], method: str = "bh") -> np.ndarray:
    """FDR-adjusted p-values (q): Benjamini-Hochberg ("bh") or Benjamini-Yekutieli ("by", valid
    under any dependence between the tests); NaN stays NaN and does not count as a test."""
    if method not in FDR_METHODS:
        raise ValueError(f"fdr_method must be one of {FDR_METHODS}, got {method!r}")
    p = np.asarray(p_values, dtype=np.float64)
    q = np.full_like(p, np.nan)
    finite = np.isfinite(p)
    if finite.any():
        q[finite] = stats.false_discovery_control(p[finite], method=method)
    return q


def correlate_scores(
    scores: pd.DataFrame,
    trials: pd.DataFrame,
    covariates: Sequence[str] = DESIGN_COVARIATES,
    n_boot: int = 2000,
    n_perm: int = 2000,
    seed: int = 0,
    mixed: bool = True,
    fdr_level: float = FDR_LEVEL,
    fdr_method: str = "bh",
) -> pd.DataFrame:
    """One row per (block, score): the score's relation to ``test_mae_meV`` across configurations.

    ``scores``: long table with columns ``run_id, block, score, value``;
    ``trials``: one row per trial with ``run_id, configuration, test_mae_meV``, ``num_params`` and
    the ``covariates`` columns (each constant within a configuration). Scores determined by the
    test MAE itself (scores.DETERMINED_BY_ERROR) are left out. ``q_rho`` is adjusted by
    ``fdr_method`` ("bh" or "by") over the rows whose smallest attainable p is <= ``fdr_level``.
    """
    if fdr_method not in FDR_METHODS:
        raise ValueError(f"fdr_method must be one of {FDR_METHODS}, got {fdr_method!r}")
    wanted = ["run_id", "configuration", TEST_MAE, SIZE_COVARIATE, *[c for c in covariates if c in trials.columns]]
    covariates = wanted[4:]
    merged = scores[["run_id", "block", "score", "value"]].merge(trials[wanted], on="run_id", how="inner")
    rows = []
    for (block, score), group in merged.groupby(["block", "score"], sort=True):
        if (block, score) in DETERMINED_BY_ERROR:
            continue
        group = group[np.isfinite(group["value"].to_numpy(dtype=np.float64)) & np.isfinite(group[TEST_MAE].to_numpy(dtype=np.float64))]
        per_config = group.groupby("configuration", sort=True)
        means = per_config.agg(value=("value", "mean"), test_mae_meV=(TEST_MAE, "mean"), size=(SIZE_COVARIATE, "mean"))
        firsts = per_config[covariates].first() if covariates else pd.DataFrame(index=means.index)
        design, used = covariate_design(firsts)
        values = group["value"].to_numpy(dtype=np.float64)
        total = float(np.var(values)) if len(values) else math.nan  # no finite value: no share
        within = float(np.mean(np.square(values - per_config["value"].transform("mean").to_numpy()))) if len(values) else math.nan
        result = correlate(
            means["value"].to_numpy(),
            means[TEST_MAE].to_numpy(),
            design,
            means["size"].to_numpy(),
            n_boot=n_boot,
            n_perm=n_perm,
            seed=seed,
        )
        result.pop("n")
        row = {
            "block": block,
            "score": score,
            "n_configurations": len(means),
            "n_trials": len(group),
            "within_share": within / total if total > 0 else math.nan,
            **result,
            "covariates": ", ".join(used) if used else "none",
        }
        if mixed:
            row.update(mixed_model(group["value"].to_numpy(), group[TEST_MAE].to_numpy(), group["configuration"].to_numpy()))
        rows.append(row)
    table = pd.DataFrame(rows, columns=list(CORRELATION_COLUMNS))
    p = table["p_rho"].to_numpy(dtype=np.float64)
    # Only rows that could be significant enter the family: a row whose best possible p is above
    # the level adds a test that can never be rejected, and raises every other row's q.
    family = np.isfinite(p) & (table["min_p_rho"].to_numpy(dtype=np.float64) <= fdr_level)
    table["in_fdr_family"] = family
    table["q_rho"] = fdr(np.where(family, p, np.nan), method=fdr_method)
    table["fdr_method"] = fdr_method
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
