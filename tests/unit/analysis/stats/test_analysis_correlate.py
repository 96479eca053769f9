"""Correlations across configurations: exactness against scipy, planted relations, nulls,
confounds, configuration-level aggregation. (Calibration by simulation: test_analysis_calibration.py.)"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import analysis.stats.correlate as correlate_module
from analysis.stats.correlate import (
    CORRELATION_COLUMNS,
    FDR_LEVEL,
    MIN_N_FOR_INTERVAL,
    correlate,
    correlate_scores,
    covariate_design,
    fdr,
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
    """Over 400 null studies of 30 points (seed 2, fixed, not chosen after a draw), the 95%
    bootstrap interval of rho covers 0 in [364, 393] of them (91% to 98.25%) and p_rho < 0.05 in
    [5, 37] (1.25% to 9.25%). Binomial: P(false failure) = 4.8e-4 for coverage at a true 95% and
    1.5e-4 for the p at a true 5%; an interval that covers 88% passes with P = 0.035, one that
    covers 99% (too wide) with P = 0.11, one that always covers (or a p always 1 or NaN) never;
    a p rejecting 15% passes with P = 4.4e-4. 500 resamples and permutations keep it at seconds."""
    studies, covered_in, small_in = 400, (364, 393), (5, 37)
    rng = np.random.default_rng(2)
    covered, small_p, not_finite = 0, 0, 0
    for seed in range(studies):
        result = correlate(rng.normal(size=30), rng.normal(size=30), seed=seed, n_boot=500, n_perm=500)
        # A NaN bound or p counts as a miss (comparisons with NaN are false) and is counted here too.
        not_finite += not np.isfinite([result["rho_lo"], result["rho_hi"], result["p_rho"]]).all()
        covered += result["rho_lo"] <= 0 <= result["rho_hi"]
        small_p += result["p_rho"] < 0.05
    assert not_finite == 0
    assert covered_in[0] <= covered <= covered_in[1], covered
    assert small_in[0] <= small_p <= small_in[1], small_p


def test_partial_correlation_on_size_removes_a_relation_that_only_goes_through_model_size():
    rng = np.random.default_rng(3)
    n = 60
    log_params = rng.uniform(np.log(1e3), np.log(1e5), size=n)
    num_params = np.exp(log_params)
    # Bigger models have smaller error; the first score merely tracks size, with its own noise.
    error = 1e3 * np.exp(-log_params / 2 + rng.normal(scale=0.3, size=n))
    by_size = log_params + rng.normal(scale=0.6, size=n)
    confounded = correlate(by_size, error, size=num_params, **FAST)
    assert confounded["rho"] < -0.7
    # Null spread of a correlation over 60 trials is about 0.13: 0.4 is three of those.
    assert abs(confounded["partial_rho_size"]) < 0.4
    assert math.isnan(confounded["partial_rho"])  # no design covariate given: nothing to report

    # A score with an effect of its own keeps it once size is accounted for.
    own = rng.normal(size=n)
    error_2 = 1e3 * np.exp(-log_params / 2 + rng.normal(scale=0.3, size=n) + 0.8 * own)
    real = correlate(own, error_2, size=num_params, **FAST)
    assert real["partial_rho_size"] > 0.6 and real["p_partial_size"] < 0.01
    assert real["partial_rho_size"] > real["rho"]  # size was noise for this score; removing it sharpens


def test_a_covariate_with_few_levels_is_removed_whatever_the_shape_of_its_effect():
    # Hidden size (3 levels) drives both score and error, non-monotonically; within a hidden size
    # they are unrelated. Indicators of its levels remove it exactly; one rank would not.
    rng = np.random.default_rng(8)
    hidden = np.repeat([8, 16, 32], 8)
    effect = np.select([hidden == 8, hidden == 16], [0.0, 5.0], 1.0)
    score = effect + rng.normal(scale=0.5, size=24)
    error = effect + rng.normal(scale=0.5, size=24)
    design, used = covariate_design(pd.DataFrame({"hidden_dim": hidden, "num_layers": np.full(24, 2)}))
    assert used == ["hidden_dim"] and design.shape == (24, 2)  # constant depth left out; 3 levels -> 2 indicators
    result = correlate(score, error, design, **FAST)
    assert result["rho"] > 0.6 and result["p_rho"] < 0.01
    assert abs(result["partial_rho"]) < 0.4 and result["p_partial"] > 0.05


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


def test_correlate_scores_makes_one_row_per_block_and_score_over_configuration_means():
    rng = np.random.default_rng(4)
    # 12 configurations x 2 seeds; the configuration's mean error is what the score tracks.
    configurations = np.repeat([f"c{k}" for k in range(12)], 2)
    config_mae = np.repeat(rng.uniform(10, 100, size=12), 2)
    mae = config_mae + rng.normal(scale=1.0, size=24)
    run_ids = [f"run{k}" for k in range(24)]
    trials = pd.DataFrame(
        {
            "run_id": run_ids,
            "configuration": configurations,
            "test_mae_meV": mae,
            "num_params": np.repeat(rng.uniform(1e3, 1e4, 12), 2),
            "hidden_dim": 8,
            "num_layers": 2,
            "lr": 1e-3,
        }
    )
    rows = []
    for k, run_id in enumerate(run_ids):
        rows.append({"run_id": run_id, "block": "l0", "score": "tracks_error", "value": 2 * config_mae[k]})
        rows.append({"run_id": run_id, "block": "l0", "score": "constant", "value": 1.0})
        rows.append({"run_id": run_id, "block": "l0", "score": "knockout_all_share", "value": 1.0 / mae[k]})
        if k % 4 < 2:  # a block only half of the configurations have
            rows.append({"run_id": run_id, "block": "l3", "score": "tracks_error", "value": -config_mae[k]})
    table = correlate_scores(pd.DataFrame(rows), trials, **FAST)
    by_key = table.set_index(["block", "score"])
    # The l0 knockout is a function of the error itself: not tested.
    assert set(by_key.index) == {("l0", "tracks_error"), ("l0", "constant"), ("l3", "tracks_error")}
    assert by_key.loc[("l0", "tracks_error"), "rho"] == pytest.approx(1.0)
    assert by_key.loc[("l0", "tracks_error"), ["n_configurations", "n_trials"]].tolist() == [12, 24]
    assert by_key.loc[("l3", "tracks_error"), ["n_configurations", "n_trials"]].tolist() == [6, 12]
    assert by_key.loc[("l3", "tracks_error"), "rho"] == pytest.approx(-1.0)
    assert by_key.loc[("l0", "tracks_error"), "within_share"] == pytest.approx(0.0)  # the score is constant within configurations
    assert by_key.loc[("l0", "tracks_error"), "covariates"] == "none"
    assert by_key.loc[("l0", "tracks_error"), "mixed_slope"] > 0.9  # 2 seeds each: the mixed model has its say
    assert math.isnan(by_key.loc[("l0", "constant"), "rho"])
    finite = table.dropna(subset=["p_rho"])
    assert (finite["q_rho"] >= finite["p_rho"] - 1e-12).all()


def test_a_score_that_is_not_finite_in_any_trial_gives_an_empty_row_not_a_crash():
    # E.g. a knockout share where the model never beat the composition fit (a real 1-epoch study hit this).
    trials = pd.DataFrame(
        {
            "run_id": ["a", "b", "c", "d"],
            "configuration": ["c1", "c1", "c2", "c2"],
            "test_mae_meV": [5.0, 6.0, 7.0, 8.0],
            "num_params": [10.0, 10.0, 20.0, 20.0],
            "hidden_dim": 8,
            "num_layers": 2,
            "lr": [1e-3, 1e-3, 1e-2, 1e-2],
        }
    )
    scores = pd.DataFrame({"run_id": list(trials["run_id"]), "block": "l1", "score": "never_finite", "value": np.nan})
    table = correlate_scores(scores, trials, **FAST)
    row = table.set_index(["block", "score"]).loc[("l1", "never_finite")]
    assert row["n_configurations"] == 0 and row["n_trials"] == 0 and math.isnan(row["rho"])


def test_fdr_is_benjamini_hochberg_by_hand():
    q = fdr([0.01, 0.04, 0.03, np.nan, 0.5])
    # sorted p: 0.01, 0.03, 0.04, 0.5 with m = 4 -> 0.04, 0.06, 0.0533 -> monotone 0.04, 0.0533, 0.0533, 0.5
    assert q[0] == pytest.approx(0.04) and q[2] == pytest.approx(0.16 / 3) and q[1] == pytest.approx(0.16 / 3)
    assert math.isnan(q[3]) and q[4] == pytest.approx(0.5)


def test_small_n_permutation_p_values_are_exact_and_never_below_the_floor():
    # n! <= 8! permutations are all enumerated: a perfectly monotone pair is as extreme as only
    # itself and its reversal, so p = 2 / n! exactly (a Monte Carlo p scatters around it, and below).
    for n in (4, 5):
        x = np.arange(float(n))
        result = correlate(x, x**3, **FAST)
        assert result["p_rho"] == 2 / math.factorial(n) and result["p_tau"] == 2 / math.factorial(n)
        assert result["min_p_rho"] == 2 / math.factorial(n)
    # Without ties the permutation null is symmetric, and the convention kept (share of |null| >=
    # |observed|) is scipy's own two-sided exact p.
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=6), rng.normal(size=6)
    result = correlate(x, y, **FAST)
    scipy_p = stats.permutation_test(
        (y,),
        lambda s: stats.spearmanr(x, s).statistic,
        permutation_type="pairings",
        vectorized=False,
        n_resamples=720,
    ).pvalue
    assert result["p_rho"] == pytest.approx(scipy_p, abs=1e-12)
    # The Freedman-Lane partial is exact too: a whole number of the 720 permutations of 6 points.
    design = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])[:, None]
    partial = correlate(x, y + design[:, 0], design, **FAST)
    assert math.isfinite(partial["p_partial"]) and partial["p_partial"] >= 1 / 720
    assert partial["p_partial"] * 720 == pytest.approx(round(partial["p_partial"] * 720), abs=1e-9)
    # Past 8! the permutations are sampled: the floor is then 1 / (n_perm + 1).
    big = correlate(np.arange(12.0), np.arange(12.0), n_boot=0, n_perm=300)
    assert big["p_rho"] == big["min_p_rho"] == pytest.approx(1 / 301)


def test_bootstrap_intervals_are_scipys_percentile_intervals_without_constant_resamples(monkeypatch):
    calls = []
    real_bootstrap = stats.bootstrap

    def spy(*args, **kwargs):
        result = real_bootstrap(*args, **kwargs)
        calls.append((kwargs, result))
        return result

    monkeypatch.setattr(correlate_module.stats, "bootstrap", spy)
    rng = np.random.default_rng(10)
    x = rng.normal(size=30)
    y = x + rng.normal(size=30)
    result = correlate(x, y, n_boot=500, n_perm=100, seed=3)
    assert len(calls) == 2  # rho, then tau
    for (kwargs, boot), name in zip(calls, ("rho", "tau")):
        assert kwargs["paired"] and kwargs["method"] == "percentile" and kwargs["n_resamples"] == 500
        # 30 continuous points: no constant resample, so the interval is scipy's own.
        assert np.isfinite(boot.bootstrap_distribution).all()
        assert (result[f"{name}_lo"], result[f"{name}_hi"]) == pytest.approx(tuple(boot.confidence_interval))
    assert result["rho_lo"] <= result["rho"] <= result["rho_hi"]
    again = correlate(x, y, n_boot=500, n_perm=100, seed=3)
    assert (again["rho_lo"], again["rho_hi"]) == (result["rho_lo"], result["rho_hi"])  # seeded

    # Heavy ties: many resamples hold a single x value; scipy's percentile of a distribution with
    # NaN is NaN, so those resamples are left out and the interval stays finite.
    calls.clear()
    x = np.array([0.0] * 7 + [1.0, 2.0, 3.0])
    y = x + rng.normal(scale=0.5, size=10)
    tied = correlate(x, y, n_boot=500, n_perm=100, seed=0)
    distribution = calls[0][1].bootstrap_distribution
    assert np.isnan(distribution).any() and np.isfinite(distribution).sum() >= 10
    low, high = np.percentile(distribution[np.isfinite(distribution)], [2.5, 97.5])
    assert (tied["rho_lo"], tied["rho_hi"]) == pytest.approx((low, high))
    assert -1 <= tied["rho_lo"] <= tied["rho_hi"] <= 1

    # Below MIN_N_FOR_INTERVAL configurations there is no interval, and no bootstrap at all.
    calls.clear()
    assert math.isnan(correlate(np.arange(5.0), np.arange(5.0), **FAST)["rho_lo"]) and not calls


def _study(config_values: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]], mae: np.ndarray):
    """scores and trials tables: one trial per configuration; each (block, score) given as
    (indices of the configurations that have it, values there)."""
    trials = pd.DataFrame(
        {
            "run_id": [f"r{k}" for k in range(len(mae))],
            "configuration": [f"c{k:02d}" for k in range(len(mae))],
            "test_mae_meV": mae,
            "num_params": 1e4,
            "hidden_dim": 8,
            "num_layers": 2,
            "lr": 1e-3,
        }
    )
    rows = [
        {"run_id": f"r{k}", "block": block, "score": score, "value": value}
        for (block, score), (where, values) in config_values.items()
        for k, value in zip(where, values)
    ]
    return pd.DataFrame(rows), trials


def test_fdr_runs_only_over_rows_whose_design_can_reach_significance():
    rng = np.random.default_rng(11)
    mae = rng.uniform(10, 100, size=12)
    everywhere = np.arange(12)
    scores, trials = _study(
        {
            ("l0", "strong"): (everywhere, mae + rng.normal(scale=5, size=12)),
            ("l0", "weak"): (everywhere, mae + rng.normal(scale=40, size=12)),
            ("l0", "null"): (everywhere, rng.normal(size=12)),
            ("l1", "null"): (everywhere, rng.normal(size=12)),
            # Only 4 configurations have l3: even a perfect ranking has p = 2/24 > 0.05.
            ("l3", "perfect"): (everywhere[:4], mae[:4]),
            ("l2", "constant"): (everywhere, np.ones(12)),
        },
        mae,
    )
    table = correlate_scores(scores, trials, n_boot=0, n_perm=300, mixed=False)
    assert list(table.columns) == list(CORRELATION_COLUMNS)
    assert list(table.columns[-4:]) == ["q_rho", "min_p_rho", "in_fdr_family", "fdr_method"]
    by_key = table.set_index(["block", "score"])
    small = by_key.loc[("l3", "perfect")]
    assert small["n_configurations"] == 4 and small["p_rho"] == small["min_p_rho"] == 2 / 24
    assert not small["in_fdr_family"] and math.isnan(small["q_rho"])
    assert not by_key.loc[("l2", "constant"), "in_fdr_family"] and math.isnan(by_key.loc[("l2", "constant"), "q_rho"])
    family = table[table["in_fdr_family"]]
    assert set(zip(family["block"], family["score"])) == {("l0", "strong"), ("l0", "weak"), ("l0", "null"), ("l1", "null")}
    assert family["min_p_rho"].to_numpy() == pytest.approx(np.full(4, 1 / 301)) and FDR_LEVEL == 0.05
    # q is Benjamini-Hochberg over the family alone: the hopeless row does not dilute it.
    assert family["q_rho"].to_numpy() == pytest.approx(stats.false_discovery_control(family["p_rho"].to_numpy(), method="bh"))
    assert (table["fdr_method"] == "bh").all()

    by = correlate_scores(scores, trials, n_boot=0, n_perm=300, mixed=False, fdr_method="by")
    by_family = by[by["in_fdr_family"]]
    assert by_family["q_rho"].to_numpy() == pytest.approx(stats.false_discovery_control(by_family["p_rho"].to_numpy(), method="by"))
    assert (by["fdr_method"] == "by").all() and (by_family["q_rho"].to_numpy() >= family["q_rho"].to_numpy() - 1e-12).all()
    # At a looser level the 4-configuration row (floor 2/24 = 0.083) is in the family too.
    assert correlate_scores(scores, trials, n_boot=0, n_perm=300, mixed=False, fdr_level=0.1)["in_fdr_family"].sum() == 5
    with pytest.raises(ValueError, match="fdr_method"):
        correlate_scores(scores, trials, n_boot=0, n_perm=300, mixed=False, fdr_method="holm")


def test_molecule_correlations_find_a_planted_descriptor():
    rng = np.random.default_rng(5)
    frame = pd.DataFrame({"smiles": ["C"] * 200, "nsps": rng.uniform(0, 50, 200), "rings": np.zeros(200)})
    error = 3 * frame["nsps"].to_numpy() + rng.normal(scale=5, size=200)
    result = molecule_correlations(error, frame).set_index("descriptor")
    assert list(result.index) == ["nsps", "rings"]  # the SMILES column is not a descriptor
    assert result.loc["nsps", "rho"] > 0.9 and result.loc["nsps", "p"] < 1e-10 and result.loc["nsps", "n"] == 200
    assert math.isnan(result.loc["rings", "rho"])
