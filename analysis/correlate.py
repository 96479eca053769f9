"""Rank correlations of scores with test error, across trials, with honest uncertainty.

For every (block, score) that varies across trials:

- ``rho`` (Spearman) and ``tau`` (Kendall tau-b) of the score against the test MAE;
- 95% bootstrap percentile intervals of both (trials resampled with replacement; resamples
  where either variable is constant are left out); with fewer than MIN_N_FOR_INTERVAL trials
  the interval is left empty: a percentile bootstrap of 4 points reports [1, 1] for any
  monotone quartet, a certainty the data cannot give (the permutation p stays honest there);
- two-sided permutation p-values of both (the error shuffled across trials);
- ``partial_rho``: Spearman correlation controlling for ``num_params`` (ranks of score and error
  each regressed on the rank of num_params, then correlated), with its permutation p-value; a
  score that only tracks model size gets a partial correlation near 0;
- ``q_rho``: Benjamini-Hochberg adjusted p of rho over all rows, since many scores are tested;
- ``n``: the trials with both values finite.

Within one trial, :func:`molecule_correlations` relates per-molecule absolute error to each
descriptor (Spearman, scipy's p-value).

Everything here is vectorised over resamples: a sweep has tens to hundreds of trials and a table
has ~100 (block, score) rows, each with thousands of resamples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

MIN_N_FOR_INTERVAL = 8
CORRELATION_COLUMNS = (
    "block", "score", "n", "rho", "rho_lo", "rho_hi", "p_rho", "tau", "tau_lo", "tau_hi", "p_tau",
    "partial_rho", "p_partial", "q_rho",
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


def _residual_ranks(values: np.ndarray, control: np.ndarray) -> np.ndarray:
    """Ranks of values minus their least-squares fit on the ranks of control (a constant control: centred ranks)."""
    r = stats.rankdata(values)
    c = stats.rankdata(control)
    c = c - c.mean()
    r = r - r.mean()
    if not np.any(c):
        return r
    return r - c * (r @ c) / (c @ c)


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


def correlate(
    x: np.ndarray,
    y: np.ndarray,
    control: np.ndarray | None = None,
    n_boot: int = 2000,
    n_perm: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """rho, tau, their bootstrap 95% CIs and permutation p-values, and the partial rho given control."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    if control is not None:
        control = np.asarray(control, dtype=np.float64)
        keep &= np.isfinite(control)
    x, y = x[keep], y[keep]
    n = int(len(x))
    result = {name: math.nan for name in CORRELATION_COLUMNS[3:]}
    result["n"] = n
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return result
    rng = np.random.default_rng(seed)
    rho = float(spearman_rows(x[None], y[None])[0])
    tau = float(kendall_rows(x[None], y[None])[0])
    shuffled = np.argsort(rng.random((n_perm, n)), axis=1)
    xs = np.broadcast_to(x, (n_perm, n))
    perm_rho = spearman_rows(xs, y[shuffled])
    perm_tau = kendall_rows(xs, y[shuffled])
    result.update(rho=rho, tau=tau, p_rho=_permutation_p(rho, perm_rho), p_tau=_permutation_p(tau, perm_tau))
    if n >= MIN_N_FOR_INTERVAL:
        resample = rng.integers(0, n, size=(n_boot, n))
        boot_rho = spearman_rows(x[resample], y[resample])
        boot_tau = kendall_rows(x[resample], y[resample])
        result["rho_lo"], result["rho_hi"] = _interval(boot_rho)
        result["tau_lo"], result["tau_hi"] = _interval(boot_tau)
    if control is not None:
        control = control[keep]
        rx, ry = _residual_ranks(x, control), _residual_ranks(y, control)
        partial = float(_pearson_rows(rx[None], ry[None])[0])
        # Permuting one set of residuals keeps the control's effect removed from both (Freedman-Lane style).
        perm_partial = _pearson_rows(np.broadcast_to(rx, (n_perm, n)), ry[shuffled])
        result["partial_rho"] = partial
        result["p_partial"] = _permutation_p(partial, perm_partial)
    return result


def benjamini_hochberg(p_values: Sequence[float]) -> np.ndarray:
    """BH-adjusted p-values (q); NaN stays NaN and does not count as a test."""
    p = np.asarray(p_values, dtype=np.float64)
    q = np.full_like(p, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    if len(finite) == 0:
        return q
    order = finite[np.argsort(p[finite])]
    m = len(order)
    adjusted = p[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum.accumulate(adjusted[::-1])[::-1]
    q[order] = np.minimum(adjusted, 1.0)
    return q


def correlate_scores(
    scores: pd.DataFrame, trials: pd.DataFrame, n_boot: int = 2000, n_perm: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """One row per (block, score): correlations of the score with ``test_mae_meV`` across trials.

    ``scores``: long table with columns ``run_id, block, score, value``;
    ``trials``: one row per trial with ``run_id, test_mae_meV, num_params``.
    """
    merged = scores[["run_id", "block", "score", "value"]].merge(trials[["run_id", "test_mae_meV", "num_params"]], on="run_id", how="inner")
    rows = []
    for (block, score), group in merged.groupby(["block", "score"], sort=True):
        stats_row = correlate(
            group["value"].to_numpy(), group["test_mae_meV"].to_numpy(), group["num_params"].to_numpy(),
            n_boot=n_boot, n_perm=n_perm, seed=seed,
        )
        rows.append({"block": block, "score": score, **stats_row})
    table = pd.DataFrame(rows, columns=list(CORRELATION_COLUMNS))
    table["q_rho"] = benjamini_hochberg(table["p_rho"].to_numpy())
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
