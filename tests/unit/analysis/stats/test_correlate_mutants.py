"""analysis/stats/correlate.py against independent computations on small data: exact permutation
p-values enumerated here with itertools and scipy, partial correlations by least squares, the
mixed model fitted directly with statsmodels, FDR by scipy, and the edges where no number is given."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import analysis.stats.correlate as correlate_module
from analysis.stats.correlate import (
    CORRELATION_COLUMNS,
    MIXED_COLUMNS,
    STAT_COLUMNS,
    correlate,
    correlate_scores,
    covariate_design,
    fdr,
    kendall_rows,
    mixed_model,
    molecule_correlations,
    spearman_rows,
)

FAST = dict(n_boot=0, n_perm=200)


def exact_p(statistic, x, y) -> float:
    """Two-sided exact permutation p: share of all orderings of y with |statistic| >= |observed|."""
    observed = statistic(x, y)
    null = [statistic(x, y[list(order)]) for order in itertools.permutations(range(len(y)))]
    return float(np.mean(np.abs(null) >= abs(observed) - 1e-12))


def spearman(x, y):
    return stats.spearmanr(x, y).statistic


def kendall(x, y):
    return stats.kendalltau(x, y).statistic


def residual(design: np.ndarray, v: np.ndarray) -> np.ndarray:
    full = np.column_stack([np.ones(len(v)), design])
    return v - full @ np.linalg.lstsq(full, v, rcond=None)[0]


def test_row_correlations_are_computed_row_by_row():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4, 7)), rng.normal(size=(4, 7))
    x[2, 3] = x[2, 5]  # a tie
    assert spearman_rows(x, y) == pytest.approx([spearman(a, b) for a, b in zip(x, y)])
    assert kendall_rows(x, y) == pytest.approx([kendall(a, b) for a, b in zip(x, y)])
    # Pearson is scale-free: data on a small scale is not taken for a constant row.
    pearson = correlate_module._pearson_rows(0.01 * x, y)
    assert pearson == pytest.approx([np.corrcoef(a, b)[0, 1] for a, b in zip(x, y)])
    constant = correlate_module._pearson_rows(np.ones((1, 5)), np.arange(5.0)[None])
    assert math.isnan(constant[0])
    assert math.isnan(kendall_rows(np.ones(5), np.arange(5.0))[0])


def test_spearman_rows_of_two_plain_vectors_is_one_correlation():
    x, y = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0]), np.array([2.0, 7.0, 1.0, 8.0, 2.0, 8.0])
    assert float(spearman_rows(x, y)) == pytest.approx(spearman(x, y))


def test_correlate_defaults_are_2000_resamples_2000_permutations_and_seed_0():
    rng = np.random.default_rng(13)
    x = rng.normal(size=9)
    y = 0.5 * x + rng.normal(size=9)
    default = correlate(x, y)
    explicit = correlate(x, y, n_boot=2000, n_perm=2000, seed=0)
    for name in ("rho_lo", "rho_hi", "tau_lo", "tau_hi", "p_rho", "p_tau"):
        assert default[name] == explicit[name], name
    assert default["min_p_rho"] == pytest.approx(1 / 2001)


def test_correlate_is_rank_based_takes_none_as_missing_and_returns_its_documented_keys():
    rng = np.random.default_rng(14)
    x, y = rng.normal(size=7), rng.normal(size=7)
    group = np.array([0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    size = rng.uniform(100, 900, size=7)
    reference = correlate(x, y, group, size, **FAST)
    assert set(reference) == {*STAT_COLUMNS} - {"covariates"} | {"n", "min_p_rho"}
    # A monotone rescaling onto a range of exactly 1 changes nothing (ranks).
    unit = lambda v: (v - v.min()) / (v.max() - v.min())  # noqa: E731
    assert correlate(unit(x), unit(y), group, size, **FAST) == pytest.approx(reference, nan_ok=True)

    # A value missing as None (objects) in x, y, the covariates or the size: that row is left out.
    def with_none(v, where):
        out = np.array([*v, 1.0, 1.0, 1.0, 1.0], dtype=object)
        out[7 + where] = None
        return out

    result = correlate(with_none(x, 0), with_none(y, 1), with_none(group, 2)[:, None], with_none(size, 3), **FAST)
    assert result == pytest.approx(reference, nan_ok=True)


def test_kendall_rows_in_several_chunks_match_scipy():
    # 300 points: 222 rows a chunk, so 445 rows are three chunks, the last one a single row. More
    # rows than points: a loop over the points' count instead of the rows' would stop at row 443.
    rng = np.random.default_rng(1)
    x = rng.integers(0, 30, size=(445, 300)).astype(float)
    y = x + rng.normal(scale=20, size=(445, 300))
    out = kendall_rows(x, y)
    for k in (0, 221, 222, 443, 444):
        assert out[k] == pytest.approx(kendall(x[k], y[k]))


def test_covariate_design_indicators_in_order_of_appearance_ranks_beyond_four_levels():
    frame = pd.DataFrame(
        {
            "hidden_dim": [16, 8, 32, 8, 16, 32],  # 3 levels: indicators of 8 and 32 (16 first seen: the reference)
            "lr": [1e-3, 5e-4, 2e-3, 1e-4, 3e-3, 1e-2],  # 6 levels: its rank
            "num_layers": [2] * 6,  # constant: left out
            "depth": [1, 2, 3, 4, 1, 2],  # 4 levels: still indicators
        }
    )
    design, used = covariate_design(frame)
    assert used == ["hidden_dim", "lr", "depth"]
    expected = np.column_stack(
        [
            [0, 1, 0, 1, 0, 0],
            [0, 0, 1, 0, 0, 1],
            stats.rankdata(frame["lr"]),
            [0, 1, 0, 0, 0, 1],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
        ]
    )
    assert design.tolist() == expected.tolist()
    five = covariate_design(pd.DataFrame({"depth": [1, 2, 3, 4, 5, 5]}))[0]
    assert five.tolist() == stats.rankdata([1, 2, 3, 4, 5, 5])[:, None].tolist()
    # MLflow logs parameters as text: numbers in text are ranked as numbers, not as words.
    as_text = covariate_design(pd.DataFrame({"hidden_dim": ["8", "16", "32", "64", "128", "8"]}))[0]
    assert as_text.tolist() == stats.rankdata([8, 16, 32, 64, 128, 8])[:, None].tolist()
    empty, none_used = covariate_design(pd.DataFrame({"num_layers": [2] * 4}))
    assert empty.shape == (4, 0) and none_used == []


def test_exact_p_values_are_the_enumerated_permutation_shares():
    x = np.array([0.3, 1.2, -0.7, 2.2, 0.9])
    y = np.array([1.0, 2.0, 2.0, 5.0, 0.5])  # a tie in y
    result = correlate(x, y, **FAST)
    assert result["n"] == 5
    assert result["rho"] == pytest.approx(spearman(x, y)) and result["tau"] == pytest.approx(kendall(x, y))
    assert result["p_rho"] == pytest.approx(exact_p(spearman, x, y), abs=1e-12)
    assert result["p_tau"] == pytest.approx(exact_p(kendall, x, y), abs=1e-12)
    # The smallest p: the share of permutations as extreme as the most extreme one.
    null = np.array([spearman(x, y[list(o)]) for o in itertools.permutations(range(5))])
    assert result["min_p_rho"] == pytest.approx(np.mean(np.abs(null) >= np.abs(null).max() - 1e-12), abs=1e-12)


def test_eight_points_are_enumerated_and_nine_are_sampled():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=8), rng.normal(size=8)
    eight = correlate(x, y, n_boot=0, n_perm=50)
    # Every one of the 8! orderings: p is a whole number of them, the floor is 2 / 8!.
    assert eight["min_p_rho"] == pytest.approx(2 / math.factorial(8))
    assert eight["p_rho"] * math.factorial(8) == pytest.approx(round(eight["p_rho"] * math.factorial(8)), abs=1e-6)
    x9, y9 = rng.normal(size=9), rng.normal(size=9)
    nine = correlate(x9, y9, n_boot=0, n_perm=50)
    assert nine["min_p_rho"] == pytest.approx(1 / 51)
    # Sampled: (1 + hits) / (1 + n_perm), never 0.
    assert nine["p_rho"] * 51 == pytest.approx(round(nine["p_rho"] * 51)) and 1 / 51 <= nine["p_rho"] <= 1
    assert nine["p_tau"] * 51 == pytest.approx(round(nine["p_tau"] * 51)) and nine["p_tau"] >= 1 / 51
    # One sampled permutation: p is (1 + hits) / 2.
    assert correlate(x9, y9, n_boot=0, n_perm=1)["p_rho"] in (0.5, 1.0)
    # No permutations at all: no p rather than an invented one.
    none = correlate(x9, y9, n_boot=0, n_perm=0)
    assert math.isnan(none["p_rho"]) and math.isnan(none["p_tau"]) and math.isnan(none["min_p_rho"])
    assert none["rho"] == pytest.approx(spearman(x9, y9))


def test_sampled_p_values_depend_on_the_seed_only():
    rng = np.random.default_rng(3)
    x = rng.normal(size=12)
    y = 0.3 * x + rng.normal(size=12)
    a = correlate(x, y, n_boot=0, n_perm=400, seed=1)
    assert correlate(x, y, n_boot=0, n_perm=400, seed=1)["p_rho"] == a["p_rho"]
    others = {correlate(x, y, n_boot=0, n_perm=400, seed=s)["p_rho"] for s in (2, 3, 4)}
    assert others != {a["p_rho"]}
    # Close to the p of a large sample of permutations (binomial sd of a's p: at most 0.025).
    ranks_x, ranks_y = stats.rankdata(x), stats.rankdata(y)
    permuted = ranks_y[np.argsort(rng.random((4000, 12)), axis=1)]
    spread = [np.corrcoef(ranks_x, row)[0, 1] for row in permuted]
    reference = np.mean(np.abs(spread) >= abs(a["rho"]) - 1e-12)
    assert abs(a["p_rho"] - reference) < 0.1


def test_bootstrap_interval_needs_ten_finite_resamples_and_eight_points():
    rng = np.random.default_rng(4)
    x = rng.normal(size=10)
    y = x + rng.normal(size=10)
    assert math.isnan(correlate(x, y, n_boot=9, n_perm=10)["rho_lo"])
    ten = correlate(x, y, n_boot=10, n_perm=10)
    assert ten["rho_lo"] <= ten["rho_hi"] and math.isfinite(ten["tau_lo"]) and math.isfinite(ten["tau_hi"])
    assert -1 <= ten["rho_lo"] and ten["rho_hi"] <= 1
    assert math.isfinite(correlate(x[:8], y[:8], n_boot=200, n_perm=10)["rho_lo"])
    seven = correlate(x[:7], y[:7], n_boot=200, n_perm=10)
    assert all(math.isnan(seven[k]) for k in ("rho_lo", "rho_hi", "tau_lo", "tau_hi"))
    # The interval is of the statistic named: Kendall's tau is smaller than Spearman's rho here.
    wide = correlate(x, y, n_boot=400, n_perm=10)
    assert wide["tau_lo"] < wide["rho_lo"] and wide["tau_hi"] < wide["rho_hi"]
    assert wide["rho_lo"] <= wide["rho"] <= wide["rho_hi"] and wide["tau_lo"] <= wide["tau"] <= wide["tau_hi"]


def freedman_lane_by_hand(x, y, design):
    rx, ry = residual(design, stats.rankdata(x)), residual(design, stats.rankdata(y))
    partial = np.corrcoef(rx, ry)[0, 1]
    null = [np.corrcoef(rx, residual(design, ry[list(o)]))[0, 1] for o in itertools.permutations(range(len(y)))]
    return partial, float(np.mean(np.abs(null) >= abs(partial) - 1e-12))


def test_partial_correlation_and_its_freedman_lane_p_by_hand():
    x = np.array([0.5, 1.5, 0.2, 2.5, 3.1, 1.9])
    y = np.array([2.0, 1.0, 0.4, 3.3, 2.2, 4.1])
    group = np.array([0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    size = np.array([10.0, 30.0, 20.0, 60.0, 50.0, 40.0])
    result = correlate(x, y, group[:, None], size, **FAST)
    partial, p = freedman_lane_by_hand(x, y, group[:, None])
    assert result["partial_rho"] == pytest.approx(partial) and result["p_partial"] == pytest.approx(p, abs=1e-12)
    with_size = np.column_stack([group, stats.rankdata(size)])
    partial_size, p_size = freedman_lane_by_hand(x, y, with_size)
    assert result["partial_rho_size"] == pytest.approx(partial_size) and result["p_partial_size"] == pytest.approx(p_size, abs=1e-12)
    # A one-dimensional covariate is one column; a constant column is left out.
    assert correlate(x, y, group, **FAST)["partial_rho"] == pytest.approx(partial)
    padded = correlate(x, y, np.column_stack([np.full(6, 7.0), group]), **FAST)
    assert padded["partial_rho"] == pytest.approx(partial) and padded["p_partial"] == pytest.approx(p, abs=1e-12)
    only_constant = correlate(x, y, np.full((6, 1), 7.0), **FAST)
    assert math.isnan(only_constant["partial_rho"]) and math.isnan(only_constant["p_partial"])


def test_partial_correlation_needs_three_residual_degrees_of_freedom():
    x = np.array([0.5, 1.5, 0.2, 2.5, 3.1])
    y = np.array([2.0, 1.0, 0.4, 3.3, 2.2])
    group = np.array([0.0, 1.0, 0.0, 1.0, 1.0])[:, None]  # 5 points - 2 coefficients = 3
    five = correlate(x, y, group, **FAST)
    assert five["partial_rho"] == pytest.approx(freedman_lane_by_hand(x, y, group)[0])
    four = correlate(x[:4], y[:4], group[:4], **FAST)  # 4 - 2 = 2: nothing left to correlate
    assert math.isnan(four["partial_rho"]) and math.isnan(four["p_partial"]) and math.isfinite(four["rho"])


def test_rows_missing_a_covariate_or_a_size_are_left_out():
    x = np.array([0.5, 1.5, 0.2, 2.5, 3.1, 1.9, 0.7])
    y = np.array([2.0, 1.0, 0.4, 3.3, 2.2, 4.1, 9.0])
    group = np.array([0.0, 0.0, 1.0, 1.0, 0.0, 1.0, np.nan])
    assert correlate(x, y, group, **FAST)["n"] == 6
    assert correlate(x, y, group, **FAST)["rho"] == pytest.approx(spearman(x[:6], y[:6]))
    size = np.array([10.0, 30.0, 20.0, 60.0, 50.0, 40.0, np.nan])
    assert correlate(x, y, size=size, **FAST)["n"] == 6
    # Only the size's ranks enter: a size in other units (millions of parameters, a range below
    # 1) gives the same partial.
    in_millions = correlate(x, y, size=size / 1e6, **FAST)
    assert math.isfinite(in_millions["partial_rho_size"])
    assert in_millions["partial_rho_size"] == pytest.approx(correlate(x, y, size=size, **FAST)["partial_rho_size"])
    # The size varies only in a row that is left out: no size partial.
    flat = np.array([5.0] * 6 + [99.0])
    y_missing = y.copy()
    y_missing[6] = np.nan
    result = correlate(x, y_missing, size=flat, **FAST)
    assert result["n"] == 6 and math.isnan(result["partial_rho_size"]) and math.isnan(result["p_partial_size"])
    # Three points are enough for rho; two are not.
    three = correlate(x[:3], y[:3], **FAST)
    assert three["rho"] == pytest.approx(spearman(x[:3], y[:3])) and three["p_rho"] == pytest.approx(exact_p(spearman, x[:3], y[:3]))
    two = correlate(x[:2], y[:2], **FAST)
    assert two["n"] == 2 and math.isnan(two["rho"]) and math.isnan(two["tau"]) and math.isnan(two["min_p_rho"])
    assert math.isnan(correlate(np.arange(5.0), np.ones(5), **FAST)["tau"])


def test_mixed_model_is_statsmodels_random_intercept_fit_with_t_on_groups_minus_two():
    from statsmodels.regression.mixed_linear_model import MixedLM

    rng = np.random.default_rng(5)
    groups = np.repeat(np.arange(6), 3)
    level = rng.normal(size=6)[groups]
    x = level + rng.normal(scale=0.5, size=18)
    y = 0.8 * level + 0.3 * x + rng.normal(scale=0.5, size=18)
    result = mixed_model(x, y, groups)
    rx, ry = stats.zscore(stats.rankdata(x)), stats.zscore(stats.rankdata(y))
    fit = MixedLM(ry, np.column_stack([np.ones(18), rx]), groups=groups).fit(reml=True)
    slope, se = fit.fe_params[1], fit.bse_fe[1]
    half = stats.t.ppf(0.975, 4) * se
    assert result["mixed_slope"] == pytest.approx(slope, rel=1e-6)
    assert result["mixed_lo"] == pytest.approx(slope - half, rel=1e-6) and result["mixed_hi"] == pytest.approx(slope + half, rel=1e-6)
    assert result["p_mixed"] == pytest.approx(2 * stats.t.sf(abs(slope / se), 4), rel=1e-6)
    # A non-finite trial is left out before the fit.
    x_nan = np.append(x, np.nan)
    assert mixed_model(x_nan, np.append(y, 1.0), np.append(groups, 0))["mixed_slope"] == pytest.approx(result["mixed_slope"])


def test_mixed_model_is_rank_based_quiet_and_takes_missing_values_as_none():
    rng = np.random.default_rng(9)
    groups = np.repeat(np.arange(5), 3)
    x = rng.normal(size=15)
    y = x + rng.normal(size=15)
    reference = mixed_model(x, y, groups)
    # A monotone change of either variable changes nothing, also onto a range of exactly 1.
    unit_x, unit_y = (x - x.min()) / (x.max() - x.min()), (y - y.min()) / (y.max() - y.min())
    assert np.ptp(unit_x) == 1.0 and np.ptp(unit_y) == 1.0
    assert mixed_model(unit_x, unit_y, groups) == pytest.approx(reference)
    # A trial without a value may come as None in a column of objects (either variable).
    x_none = np.array([*x, None, 1.0], dtype=object)
    y_none = np.array([*y, 1.0, None], dtype=object)
    assert mixed_model(x_none, y_none, np.append(groups, [0, 1])) == pytest.approx(reference)
    # Convergence and boundary warnings of the fit are not passed on.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mixed_model(x, rng.normal(size=15), groups)
    assert [w for w in caught if issubclass(w.category, (RuntimeWarning, UserWarning))] == []


@pytest.mark.parametrize("se", [0.0, math.inf, math.nan])
def test_a_degenerate_mixed_fit_gives_no_numbers(monkeypatch, se):
    # A fit whose slope has a zero, infinite or undefined standard error: no p of 0 or 1, no interval.
    from statsmodels.regression import mixed_linear_model

    class Fit:
        fe_params = np.array([0.0, 0.4])
        bse_fe = np.array([1.0, se])

    monkeypatch.setattr(mixed_linear_model.MixedLM, "fit", lambda self, **kwargs: Fit())
    rng = np.random.default_rng(10)
    result = mixed_model(rng.normal(size=12), rng.normal(size=12), np.repeat(np.arange(6), 2))
    assert all(math.isnan(v) for v in result.values()) and set(result) == set(MIXED_COLUMNS)


def test_mixed_model_needs_four_groups_replicates_and_variation():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=12), rng.normal(size=12)
    nothing = {name: math.nan for name in MIXED_COLUMNS}
    assert mixed_model(x[:9], y[:9], np.repeat(np.arange(3), 3)).keys() == nothing.keys()
    assert all(math.isnan(v) for v in mixed_model(x[:9], y[:9], np.repeat(np.arange(3), 3)).values())
    assert all(math.isfinite(v) for v in mixed_model(x[:8], y[:8], np.repeat(np.arange(4), 2)).values())
    assert all(math.isnan(v) for v in mixed_model(x, y, np.arange(12)).values())  # no replicated group
    assert all(math.isnan(v) for v in mixed_model(np.ones(12), y, np.repeat(np.arange(6), 2)).values())
    assert all(math.isnan(v) for v in mixed_model(x, np.ones(12), np.repeat(np.arange(6), 2)).values())


def test_fdr_by_is_benjamini_yekutieli_and_an_unknown_method_is_refused():
    p = [0.01, 0.04, np.nan, 0.03, 0.5]
    assert np.allclose(fdr([0.01, 0.04, None, 0.03, 0.5]), fdr(p), equal_nan=True)  # None is no test, as NaN
    q = fdr(p, method="by")
    assert q[[0, 1, 3, 4]] == pytest.approx(stats.false_discovery_control([0.01, 0.04, 0.03, 0.5], method="by"))
    assert math.isnan(q[2])
    assert np.isnan(fdr([np.nan, np.nan])).all()
    with pytest.raises(ValueError, match=r"fdr_method must be one of \('bh', 'by'\), got 'holm'"):
        fdr([0.1], method="holm")


def study_tables():
    """7 configurations x 2 seeds; hidden size in two levels; one trial has no test MAE."""
    rng = np.random.default_rng(7)
    configurations = np.repeat([f"c{k}" for k in range(7)], 2)
    mae = np.repeat(rng.uniform(10, 100, size=7), 2) + rng.normal(scale=3, size=14)
    trials = pd.DataFrame(
        {
            "run_id": [f"r{k}" for k in range(14)],
            "configuration": configurations,
            "test_mae_meV": mae,
            "num_params": np.repeat([100.0, 200.0, 150.0, 120.0, 300.0, 250.0, 180.0], 2),
            "hidden_dim": np.repeat([8, 16, 8, 16, 8, 16, 8], 2),
            "num_layers": 2,
        }
    )
    trials.loc[3, "test_mae_meV"] = np.nan
    value = mae + rng.normal(scale=10, size=14)
    scores = pd.DataFrame({"run_id": trials["run_id"], "block": "l1", "score": "norm", "value": value})
    extra = pd.DataFrame(
        {
            "run_id": ["r0", "r1", "r2", "r4", "nobody"],
            "block": ["joint"] * 5,
            "score": ["knockout_all_share"] * 5,
            "value": [0.1, 0.2, 0.3, 0.4, 0.5],
        }
    )
    return pd.concat([scores, extra], ignore_index=True), trials


def test_correlate_scores_row_is_correlate_of_configuration_means_with_their_covariates():
    scores, trials = study_tables()
    table = correlate_scores(scores, trials, covariates=("hidden_dim", "num_layers", "dropout"), n_boot=0, n_perm=100, mixed=False)
    assert list(table.columns) == list(CORRELATION_COLUMNS)
    # joint knockout_all_share is determined by the error: no row.
    assert list(zip(table["block"], table["score"])) == [("l1", "norm")]
    row = table.iloc[0]
    merged = scores[scores["block"] == "l1"].merge(trials, on="run_id")
    merged = merged[np.isfinite(merged["test_mae_meV"])]
    means = merged.groupby("configuration").agg(value=("value", "mean"), mae=("test_mae_meV", "mean"), size=("num_params", "mean"))
    hidden = merged.groupby("configuration")["hidden_dim"].first().to_numpy()
    expected = correlate(means["value"], means["mae"], (hidden == 16).astype(float)[:, None], means["size"], n_boot=0, n_perm=100)
    for name in ("rho", "tau", "p_rho", "p_tau", "partial_rho", "p_partial", "partial_rho_size", "p_partial_size", "min_p_rho"):
        assert row[name] == pytest.approx(expected[name]), name
    assert row["n_configurations"] == 7 and row["n_trials"] == 13
    assert row["covariates"] == "hidden_dim"
    # Seed-to-seed share of the score's variance, by hand.
    v = merged["value"].to_numpy()
    within = np.mean((v - merged.groupby("configuration")["value"].transform("mean").to_numpy()) ** 2)
    assert row["within_share"] == pytest.approx(within / np.var(v))
    assert all(math.isnan(row[name]) for name in MIXED_COLUMNS)
    assert bool(row["in_fdr_family"]) and row["q_rho"] == pytest.approx(row["p_rho"]) and row["fdr_method"] == "bh"
    # The share is scale-free: a score in other units has the same.
    small = correlate_scores(scores.assign(value=scores["value"] / 1000), trials, n_boot=0, n_perm=100, mixed=False).iloc[0]
    assert small["within_share"] == pytest.approx(row["within_share"]) and small["rho"] == pytest.approx(row["rho"])
    # A row whose smallest attainable p is exactly the level is in the family (<=); 7 configurations: 2 / 7!.
    assert row["min_p_rho"] == 2 / math.factorial(7)
    at_level = correlate_scores(scores, trials, n_boot=0, n_perm=100, mixed=False, fdr_level=2 / math.factorial(7))
    assert bool(at_level["in_fdr_family"].iloc[0])
    below = correlate_scores(scores, trials, n_boot=0, n_perm=100, mixed=False, fdr_level=1 / math.factorial(7))
    assert not bool(below["in_fdr_family"].iloc[0]) and math.isnan(below["q_rho"].iloc[0])


def test_correlate_scores_fits_the_mixed_model_on_trials_and_keeps_other_blocks_of_an_error_score():
    scores, trials = study_tables()
    scores.loc[scores["block"] == "joint", "block"] = "l2"  # the same score on an l >= 1 block is a real score
    scores = scores.iloc[::-1]  # rows come out sorted by block and score whatever the input order
    trials["lr"] = np.repeat([1e-3, 2e-3, 5e-4, 1e-2, 3e-3, 2e-4, 7e-3], 2)  # 7 levels: entered as a rank
    table = correlate_scores(scores, trials, n_boot=0, n_perm=100)
    assert list(zip(table["block"], table["score"])) == [("l1", "norm"), ("l2", "knockout_all_share")]
    table = table.set_index(["block", "score"])
    # Only the 4 trials in the trial table count; the one of an unknown run is dropped.
    assert table.loc[("l2", "knockout_all_share"), "n_trials"] == 4
    assert table.loc[("l2", "knockout_all_share"), "n_configurations"] == 3
    assert table.loc[("l1", "norm"), "covariates"] == "hidden_dim, lr"
    merged = scores[scores["block"] == "l1"].merge(trials, on="run_id")
    merged = merged[np.isfinite(merged["test_mae_meV"])]
    expected = mixed_model(merged["value"], merged["test_mae_meV"], merged["configuration"])
    for name in MIXED_COLUMNS:
        assert table.loc[("l1", "norm"), name] == pytest.approx(expected[name])


def nine_configurations():
    """9 configurations (9! > 8!: sampled permutations) x 2 seeds, listed in a scrambled order."""
    rng = np.random.default_rng(12)
    names = [f"c{k}" for k in (3, 0, 7, 1, 8, 5, 2, 6, 4)]
    configurations = np.repeat(names, 2)
    mae = np.repeat(rng.uniform(10, 100, size=9), 2) + rng.normal(scale=2, size=18)
    trials = pd.DataFrame(
        {
            "run_id": [f"r{k}" for k in range(18)],
            "configuration": configurations,
            "test_mae_meV": mae,
            "num_params": np.repeat(rng.uniform(100, 900, size=9), 2),
            "hidden_dim": np.repeat([8, 16, 8, 16, 8, 16, 8, 16, 8], 2),
        }
    )
    scores = pd.DataFrame({"run_id": trials["run_id"], "block": "l1", "score": "norm", "value": mae + rng.normal(scale=20, size=18)})
    return scores, trials


def test_correlate_scores_defaults_seed_and_input_order():
    scores, trials = nine_configurations()
    table = correlate_scores(scores, trials, mixed=False)
    row = table.iloc[0]
    # The defaults: 2000 resamples and permutations, seed 0, on the means sorted by configuration.
    merged = scores.merge(trials, on="run_id")
    means = merged.groupby("configuration").agg(value=("value", "mean"), mae=("test_mae_meV", "mean"), size=("num_params", "mean"))
    hidden = merged.groupby("configuration")["hidden_dim"].first().to_numpy()
    expected = correlate(
        means["value"], means["mae"], (hidden == 16).astype(float)[:, None], means["size"], n_boot=2000, n_perm=2000, seed=0
    )
    for name in ("rho", "rho_lo", "rho_hi", "tau_lo", "tau_hi", "p_rho", "p_tau", "p_partial", "p_partial_size", "min_p_rho"):
        assert row[name] == pytest.approx(expected[name]), name
    assert row["min_p_rho"] == pytest.approx(1 / 2001)
    # The same study with its rows in another order gives the same table.
    shuffled = correlate_scores(scores.iloc[::-1], trials.sample(frac=1.0, random_state=0), mixed=False)
    pd.testing.assert_frame_equal(shuffled, table)
    # The settings asked for are the ones used.
    small = correlate_scores(scores, trials, n_boot=0, n_perm=100, seed=3, mixed=False).iloc[0]
    expected = correlate(means["value"], means["mae"], (hidden == 16).astype(float)[:, None], means["size"], n_boot=0, n_perm=100, seed=3)
    assert (
        math.isnan(small["rho_lo"]) and small["p_rho"] == pytest.approx(expected["p_rho"]) and small["min_p_rho"] == pytest.approx(1 / 101)
    )
    # The seed reaches the resampling: bootstrap bounds are continuous in the draw, so seeds 3 and
    # 0 give different ones (permutation p values of 100 draws can coincide across seeds).
    seeded = correlate_scores(scores, trials, n_boot=200, n_perm=0, seed=3, mixed=False).iloc[0]
    at_3, at_0 = (
        correlate(means["value"], means["mae"], (hidden == 16).astype(float)[:, None], means["size"], n_boot=200, n_perm=0, seed=s)
        for s in (3, 0)
    )
    assert at_3["rho_lo"] != at_0["rho_lo"]
    assert (seeded["rho_lo"], seeded["tau_hi"]) == pytest.approx((at_3["rho_lo"], at_3["tau_hi"]))


def test_correlate_scores_takes_missing_values_as_none_and_gives_an_empty_table_when_nothing_is_left():
    scores, trials = nine_configurations()
    with_nan = scores.copy()
    with_nan.loc[0, "value"] = np.nan
    trials_nan = trials.copy()
    trials_nan.loc[5, "test_mae_meV"] = np.nan
    reference = correlate_scores(with_nan, trials_nan, n_boot=0, n_perm=100, mixed=False)
    with_none = with_nan.astype({"value": object})
    with_none.loc[0, "value"] = None
    trials_none = trials_nan.astype({"test_mae_meV": object})
    trials_none.loc[5, "test_mae_meV"] = None
    got = correlate_scores(with_none, trials_none, n_boot=0, n_perm=100, mixed=False)
    assert got.iloc[0]["n_trials"] == 16
    pd.testing.assert_frame_equal(got, reference)
    # Only a score the error determines: no rows, the columns all the same.
    only_error = scores.assign(block="l0", score="knockout_all_share")
    empty = correlate_scores(only_error, trials, n_boot=0, n_perm=100)
    assert empty.empty and list(empty.columns) == list(CORRELATION_COLUMNS)


def test_correlate_scores_refuses_an_unknown_fdr_method_before_any_work():
    with pytest.raises(ValueError, match=r"fdr_method must be one of \('bh', 'by'\), got 'BH'"):
        correlate_scores(pd.DataFrame(columns=["run_id", "block", "score", "value"]), pd.DataFrame(), fdr_method="BH")


def test_a_score_constant_in_every_trial_has_no_within_share():
    scores, trials = study_tables()
    scores = scores[scores["block"] == "l1"].assign(value=3.0)
    row = correlate_scores(scores, trials, **FAST, mixed=False).iloc[0]
    assert math.isnan(row["within_share"]) and math.isnan(row["rho"]) and not row["in_fdr_family"]


def test_molecule_correlations_are_scipys_spearman_over_the_finite_molecules():
    rng = np.random.default_rng(8)
    error = rng.uniform(0, 10, size=20)
    frame = pd.DataFrame(
        {
            "nsps": error + rng.normal(scale=3, size=20),
            "name": ["x"] * 20,
            "flat": np.ones(20),
            "atoms": rng.integers(3, 9, size=20),
        }
    )
    frame.loc[[2, 5], "nsps"] = np.nan
    error_with_nan = error.copy()
    error_with_nan[7] = np.inf
    result = molecule_correlations(error_with_nan, frame).set_index("descriptor")
    assert list(result.index) == ["nsps", "flat", "atoms"]
    keep = np.isfinite(frame["nsps"].to_numpy()) & np.isfinite(error_with_nan)
    reference = stats.spearmanr(frame["nsps"].to_numpy()[keep], error[keep])
    assert result.loc["nsps", "n"] == 17
    assert result.loc["nsps", "rho"] == pytest.approx(reference.statistic) and result.loc["nsps", "p"] == pytest.approx(reference.pvalue)
    assert result.loc["atoms", "n"] == 19 and math.isfinite(result.loc["atoms", "rho"])
    assert result.loc["flat", "n"] == 19 and math.isnan(result.loc["flat", "rho"]) and math.isnan(result.loc["flat", "p"])
    # Fewer than three molecules, or an error that does not vary: no correlation.
    three = molecule_correlations(np.array([1.0, 2.0, 4.0]), pd.DataFrame({"d": [3.0, 1.0, 2.0]})).iloc[0]
    assert three["rho"] == pytest.approx(stats.spearmanr([3.0, 1.0, 2.0], [1.0, 2.0, 4.0]).statistic)
    two = molecule_correlations(np.array([1.0, 2.0, np.nan]), pd.DataFrame({"d": [3.0, 1.0, 2.0]})).iloc[0]
    assert two["n"] == 2 and math.isnan(two["rho"])
    flat_error = molecule_correlations(np.ones(5), pd.DataFrame({"d": np.arange(5.0)})).iloc[0]
    assert flat_error["n"] == 5 and math.isnan(flat_error["rho"])
    assert list(molecule_correlations(error, pd.DataFrame({"name": ["x"] * 20})).columns) == ["descriptor", "rho", "p", "n"]
    # A yes/no descriptor (range 1), an error on a range of 1, a nullable integer descriptor with a
    # missing molecule, an error given as objects with None: all correlated over what is there.
    aromatic = (frame["nsps"].fillna(0).to_numpy() > 5).astype(float)
    unit_error = (error - error.min()) / (error.max() - error.min())
    assert np.ptp(unit_error) == 1.0
    other = pd.DataFrame({"aromatic": aromatic, "rings": pd.array([*rng.integers(0, 4, size=19), None], dtype="Int64")})
    got = molecule_correlations(unit_error, other).set_index("descriptor")
    assert got.loc["aromatic", "rho"] == pytest.approx(stats.spearmanr(aromatic, error).statistic)
    rings = other["rings"].to_numpy(dtype=float, na_value=np.nan)
    assert got.loc["rings", "n"] == 19
    assert got.loc["rings", "rho"] == pytest.approx(stats.spearmanr(rings[:19], error[:19]).statistic)
    as_objects = np.array([*error[:19], None], dtype=object)
    assert molecule_correlations(as_objects, other).set_index("descriptor").loc["aromatic", "n"] == 19
    # A descriptor of dtype bool (numeric to pandas) is correlated as its 0/1 values.
    flags = molecule_correlations(unit_error, pd.DataFrame({"aromatic": aromatic.astype(bool)})).iloc[0]
    assert flags["n"] == 20 and flags["rho"] == pytest.approx(got.loc["aromatic", "rho"])
