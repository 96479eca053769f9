"""Correlations across trials: exactness against scipy, planted relations, nulls, confounds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.correlate import (
    MIN_N_FOR_INTERVAL,
    benjamini_hochberg,
    correlate,
    correlate_scores,
    kendall_rows,
    molecule_correlations,
    spearman_rows,
)

FAST = dict(n_boot=1000, n_perm=1000)


def test_vectorised_rank_correlations_match_scipy_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.integers(0, 5, size=12).astype(float)  # many ties
        y = x + rng.integers(-2, 3, size=12)
        assert spearman_rows(x[None], y[None])[0] == pytest.approx(stats.spearmanr(x, y).statistic)
        assert kendall_rows(x[None], y[None])[0] == pytest.approx(stats.kendalltau(x, y).statistic)


def test_planted_monotone_relation_gives_rho_near_one_with_ci_excluding_zero():
    rng = np.random.default_rng(1)
    score = rng.uniform(0, 3, size=30)
    error = np.exp(score) + rng.normal(scale=0.2, size=30)  # monotone, not linear
    result = correlate(score, error, **FAST)
    assert result["n"] == 30
    assert result["rho"] > 0.95 and result["tau"] > 0.8
    assert 0 < result["rho_lo"] <= result["rho"] <= result["rho_hi"]
    assert 0 < result["tau_lo"] <= result["tau"] <= result["tau_hi"]
    assert result["p_rho"] < 0.01 and result["p_tau"] < 0.01
    falling = correlate(score, -error, **FAST)
    assert falling["rho"] < -0.95 and falling["rho_hi"] < 0


def test_planted_null_intervals_cover_zero_and_p_values_are_not_small():
    rng = np.random.default_rng(2)
    covered, small_p = 0, 0
    for seed in range(20):
        result = correlate(rng.normal(size=30), rng.normal(size=30), seed=seed, **FAST)
        covered += result["rho_lo"] <= 0 <= result["rho_hi"]
        small_p += result["p_rho"] < 0.05
    # A 95% interval misses 0 in about 1 of 20 null studies; 4 or more misses would mean it is too narrow.
    assert covered >= 16, covered
    assert small_p <= 4, small_p


def test_partial_correlation_removes_a_relation_that_only_goes_through_model_size():
    rng = np.random.default_rng(3)
    n = 60
    log_params = rng.uniform(np.log(1e3), np.log(1e5), size=n)
    num_params = np.exp(log_params)
    # Bigger models have smaller error; the first score merely tracks size, with its own noise.
    error = 1e3 * np.exp(-log_params / 2 + rng.normal(scale=0.3, size=n))
    by_size = log_params + rng.normal(scale=0.6, size=n)
    confounded = correlate(by_size, error, num_params, **FAST)
    assert confounded["rho"] < -0.7
    # Null spread of a correlation over 60 trials is about 0.13: 0.4 is three of those.
    assert abs(confounded["partial_rho"]) < 0.4

    # A score with an effect of its own keeps it once size is accounted for.
    own = rng.normal(size=n)
    error_2 = 1e3 * np.exp(-log_params / 2 + rng.normal(scale=0.3, size=n) + 0.8 * own)
    real = correlate(own, error_2, num_params, **FAST)
    assert real["partial_rho"] > 0.6 and real["p_partial"] < 0.01
    assert real["partial_rho"] > real["rho"]  # size was noise for this score; removing it sharpens


def test_too_few_or_constant_values_give_no_invented_numbers():
    assert math.isnan(correlate([1.0, 2.0], [3.0, 4.0])["rho"])
    constant = correlate([1.0] * 10, np.arange(10.0))
    assert constant["n"] == 10 and math.isnan(constant["rho"]) and math.isnan(constant["p_rho"])
    small = correlate(np.arange(5.0), np.arange(5.0) ** 2, **FAST)
    assert small["rho"] == pytest.approx(1.0) and 5 < MIN_N_FOR_INTERVAL and math.isnan(small["rho_lo"])
    # The permutation p of a perfect 5-point ranking is 2/120 at best, not 0.
    assert 0.005 < small["p_rho"] < 0.05
    with_nan = correlate([1.0, np.nan, 3.0, 4.0, 5.0], [2.0, 1.0, 3.0, 5.0, 4.0], **FAST)
    assert with_nan["n"] == 4


def test_correlate_scores_makes_one_row_per_block_and_score():
    rng = np.random.default_rng(4)
    run_ids = [f"run{k}" for k in range(12)]
    mae = rng.uniform(10, 100, size=12)
    trials = pd.DataFrame({"run_id": run_ids, "test_mae_meV": mae, "num_params": rng.uniform(1e3, 1e4, 12)})
    rows = []
    for k, run_id in enumerate(run_ids):
        rows.append({"run_id": run_id, "block": "l0", "score": "tracks_error", "value": 2 * mae[k]})
        rows.append({"run_id": run_id, "block": "l0", "score": "constant", "value": 1.0})
        if k % 2 == 0:  # a block only half of the trials have
            rows.append({"run_id": run_id, "block": "l3", "score": "tracks_error", "value": -mae[k]})
    table = correlate_scores(pd.DataFrame(rows), trials, **FAST)
    by_key = table.set_index(["block", "score"])
    assert len(table) == 3
    assert by_key.loc[("l0", "tracks_error"), "rho"] == pytest.approx(1.0)
    assert by_key.loc[("l3", "tracks_error"), "n"] == 6 and by_key.loc[("l3", "tracks_error"), "rho"] == pytest.approx(-1.0)
    assert math.isnan(by_key.loc[("l0", "constant"), "rho"])
    finite = table.dropna(subset=["p_rho"])
    assert (finite["q_rho"] >= finite["p_rho"] - 1e-12).all()


def test_benjamini_hochberg_by_hand():
    q = benjamini_hochberg([0.01, 0.04, 0.03, np.nan, 0.5])
    # sorted p: 0.01, 0.03, 0.04, 0.5 with m = 4 -> 0.04, 0.06, 0.0533 -> monotone 0.04, 0.0533, 0.0533, 0.5
    assert q[0] == pytest.approx(0.04) and q[2] == pytest.approx(0.16 / 3) and q[1] == pytest.approx(0.16 / 3)
    assert math.isnan(q[3]) and q[4] == pytest.approx(0.5)


def test_molecule_correlations_find_a_planted_descriptor():
    rng = np.random.default_rng(5)
    frame = pd.DataFrame({"smiles": ["C"] * 200, "nsps": rng.uniform(0, 50, 200), "rings": np.zeros(200)})
    error = 3 * frame["nsps"].to_numpy() + rng.normal(scale=5, size=200)
    result = molecule_correlations(error, frame).set_index("descriptor")
    assert list(result.index) == ["nsps", "rings"]  # the SMILES column is not a descriptor
    assert result.loc["nsps", "rho"] > 0.9 and result.loc["nsps", "p"] < 1e-10 and result.loc["nsps", "n"] == 200
    assert math.isnan(result.loc["rings", "rho"])
