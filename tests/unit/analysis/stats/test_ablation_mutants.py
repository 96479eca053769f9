"""analysis/stats/ablation.py on small tables whose answers are computed here independently (numpy,
scipy, statsmodels-free least squares) or known exactly: what each estimate, interval, count and
sentence of the ablation table is, and which inputs are refused or give no number."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.stats import ablation
from analysis.stats.ablation import (
    ABLATION_COLUMNS,
    MODELS,
    ablation_effects,
    factorial_terms,
    headline,
    headline_estimates,
    is_factorial,
    molecule_errors,
    paired_differences,
    paired_effect,
    regression_design,
    regression_effects,
    unpaired_effect,
)


def trials_table(rows: list[tuple]) -> pd.DataFrame:
    """(configuration, l_values, hidden_dim, seed, test MAE) rows."""
    return pd.DataFrame(rows, columns=["configuration", "l_values", "hidden_dim", "seed", "test_mae_meV"])


def t_interval_by_hand(values) -> tuple[float, float, float]:
    values = np.asarray(values, dtype=float)
    lo, hi = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    return values.mean(), lo, hi


# Two hidden sizes, each with a configuration with and without l=1, three seeds each: two
# configuration pairs, so the interval is over the two pairs' mean differences.
TWO_PAIRS = trials_table(
    [
        ("a", "0", "8", "1", 100.0),
        ("a", "0", "8", "2", 102.0),
        ("a", "0", "8", "3", 101.0),
        ("b", "0,1", "8", "1", 110.0),
        ("b", "0,1", "8", "2", 111.0),
        ("b", "0,1", "8", "3", 115.0),
        ("c", "0", "16", "1", 90.0),
        ("c", "0", "16", "2", 93.0),
        ("c", "0", "16", "3", 92.0),
        ("d", "0,1", "16", "1", 95.0),
        ("d", "0,1", "16", "2", 99.0),
        ("d", "0,1", "16", "3", 94.0),
    ]
)


def test_t_interval_is_scipys_and_gives_no_interval_below_two_values():
    values = np.array([3.0, 5.0, 4.5, 9.0])
    assert ablation._t_interval(values) == pytest.approx(t_interval_by_hand(values))
    mean, lo, hi = ablation._t_interval(np.array([7.0]))
    assert mean == 7.0 and math.isnan(lo) and math.isnan(hi)
    assert all(math.isnan(x) for x in ablation._t_interval(np.array([])))


@pytest.mark.parametrize(
    ("l_values", "l", "expected"),
    [("0,1,2", 1, "0,2"), ("0, 1, 2", 2, "0,1"), ("0,1,10", 1, "0,10"), ("1", 1, ""), ("0,2", 1, "0,2")],
)
def test_without_drops_exactly_that_order(l_values, l, expected):
    assert ablation._without(l_values, l) == expected


def test_paired_differences_are_with_minus_without_per_seed():
    pairs = paired_differences(TWO_PAIRS, 1, ["hidden_dim"])
    assert len(pairs) == 6
    by_key = {(r.configuration_with, r.configuration_without, r.seed): r.difference for r in pairs.itertuples()}
    assert by_key == {
        ("b", "a", "1"): 10.0,
        ("b", "a", "2"): 9.0,
        ("b", "a", "3"): 14.0,
        ("d", "c", "1"): 5.0,
        ("d", "c", "2"): 6.0,
        ("d", "c", "3"): 2.0,
    }
    # Another metric column is the one differenced.
    other = TWO_PAIRS.assign(val_mae=TWO_PAIRS["test_mae_meV"] * 2)
    assert sorted(paired_differences(other, 1, ["hidden_dim"], metric="val_mae")["difference"]) == [4.0, 10.0, 12.0, 18.0, 20.0, 28.0]


def test_paired_differences_match_a_missing_parameter_with_a_missing_one():
    # A parameter not logged (NaN) on both sides is the same context; floats match as logged.
    trials = pd.DataFrame(
        {
            "configuration": ["a", "b"],
            "l_values": ["0", "0,1"],
            "dropout": [math.nan, math.nan],
            "seed": [1, 1],
            "test_mae_meV": [10.0, 13.0],
        }
    )
    pairs = paired_differences(trials, 1, ["dropout"])
    assert list(pairs["difference"]) == [3.0]


def test_paired_effect_is_the_t_interval_over_configuration_pair_means():
    row = paired_effect(TWO_PAIRS, 1, ["hidden_dim"])
    mean, lo, hi = t_interval_by_hand([11.0, 13.0 / 3.0])
    assert row["effect_meV"] == pytest.approx(mean) and row["lo_meV"] == pytest.approx(lo) and row["hi_meV"] == pytest.approx(hi)
    assert row["l"] == 1 and row["method"] == "paired"
    assert row["n_pairs"] == 6 and row["n_trials"] == 12 and row["n_configuration_pairs"] == 2 and row["n_configurations"] == 4
    assert row["interval"] == "t over configuration pairs" and row["note"] == ""


def test_paired_effect_of_one_configuration_pair_is_over_its_seeds_and_of_one_seed_has_no_interval():
    one_pair = TWO_PAIRS[TWO_PAIRS["hidden_dim"] == "8"]
    row = paired_effect(one_pair, 1, ["hidden_dim"])
    mean, lo, hi = t_interval_by_hand([10.0, 9.0, 14.0])
    assert (row["effect_meV"], row["lo_meV"], row["hi_meV"]) == pytest.approx((mean, lo, hi))
    assert row["n_configuration_pairs"] == 1 and row["n_configurations"] == 2 and row["interval"] == "t over seeds"
    assert row["note"] == "one pair of configurations: the interval covers seed noise only, not other contexts"
    two_seeds = paired_effect(one_pair[one_pair["seed"] != "3"], 1, ["hidden_dim"])
    assert (two_seeds["effect_meV"], two_seeds["lo_meV"], two_seeds["hi_meV"]) == pytest.approx(t_interval_by_hand([10.0, 9.0]))
    assert two_seeds["interval"] == "t over seeds"
    one_seed = one_pair[one_pair["seed"] == "2"]
    row = paired_effect(one_seed, 1, ["hidden_dim"])
    assert row["effect_meV"] == 9.0 and math.isnan(row["lo_meV"]) and math.isnan(row["hi_meV"])
    assert row["interval"] == "" and row["n_pairs"] == 1 and row["n_trials"] == 2


def test_paired_effect_of_another_metric_differences_that_metric():
    doubled = TWO_PAIRS.assign(val_mae=2 * TWO_PAIRS["test_mae_meV"], test_mae_meV=0.0)
    row = paired_effect(doubled, 1, ["hidden_dim"], metric="val_mae")
    assert row["effect_meV"] == pytest.approx(2 * np.mean([11.0, 13.0 / 3.0]))
    table = ablation_effects(doubled, ["hidden_dim"], metric="val_mae").set_index("method")
    assert table.loc["unpaired", "effect_meV"] == pytest.approx(2 * (104.0 - (101.0 + 275.0 / 3.0) / 2))
    assert table.loc["paired", "effect_meV"] == pytest.approx(row["effect_meV"])
    # The regression too: twice the metric, twice the coefficient.
    study = regression_study()
    on_test = ablation_effects(study, ["hidden_dim"]).set_index(["l", "method"])
    on_val = ablation_effects(study.assign(val_mae=2 * study["test_mae_meV"], test_mae_meV=0.0), ["hidden_dim"], metric="val_mae")
    on_val = on_val.set_index(["l", "method"])
    assert on_val.loc[(1, "regression"), "effect_meV"] == pytest.approx(2 * on_test.loc[(1, "regression"), "effect_meV"])


def test_paired_effect_without_pairs_says_so():
    no_pairs = TWO_PAIRS[TWO_PAIRS["configuration"].isin(["a", "d"])]
    row = paired_effect(no_pairs, 1, ["hidden_dim"])
    assert row["n_pairs"] == 0 and row["n_trials"] == 0 and row["n_configuration_pairs"] == 0 and row["n_configurations"] == 0
    assert all(math.isnan(row[k]) for k in ("effect_meV", "lo_meV", "hi_meV"))
    assert row["interval"] == "" and row["note"] == "no two configurations differ only in this l"
    assert row["l"] == 1 and row["method"] == "paired"


def welch_by_hand(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    result = stats.ttest_ind(a, b, equal_var=False)
    ci = result.confidence_interval(0.95)
    return a.mean() - b.mean(), ci.low, ci.high


def test_unpaired_effect_is_welchs_interval_over_configuration_means():
    row = unpaired_effect(TWO_PAIRS, 1)
    with_l = [112.0, 96.0]  # b, d
    without = [101.0, 275.0 / 3.0]  # a, c
    assert (row["effect_meV"], row["lo_meV"], row["hi_meV"]) == pytest.approx(welch_by_hand(with_l, without))
    assert row["method"] == "unpaired" and row["l"] == 1 and row["interval"] == "Welch t over configurations"
    assert row["n_configurations"] == 4 and row["n_trials"] == 12 and row["note"] == "confounded; for comparison"
    assert math.isnan(row["n_pairs"]) and math.isnan(row["n_configuration_pairs"])


def test_unpaired_effect_with_unequal_groups_uses_welchs_degrees_of_freedom():
    trials = trials_table(
        [
            ("a", "0", "8", "1", 1.0),
            ("b", "0", "8", "1", 4.0),
            ("c", "0,1", "8", "1", 10.0),
            ("d", "0,1", "8", "1", 30.0),
            ("e", "0,1", "8", "1", 14.0),
        ]
    )
    row = unpaired_effect(trials, 1)
    assert (row["effect_meV"], row["lo_meV"], row["hi_meV"]) == pytest.approx(welch_by_hand([10.0, 30.0, 14.0], [1.0, 4.0]))
    # In other units (a standard error below 1) the interval scales with them.
    scaled = unpaired_effect(trials.assign(test_mae_meV=trials["test_mae_meV"] / 100), 1)
    assert (scaled["effect_meV"], scaled["lo_meV"], scaled["hi_meV"]) == pytest.approx(
        tuple(v / 100 for v in welch_by_hand([10.0, 30.0, 14.0], [1.0, 4.0]))
    )


def test_unpaired_effect_with_more_configurations_without_the_order():
    trials = trials_table(
        [
            ("a", "0", "8", "1", 1.0),
            ("b", "0", "8", "1", 4.0),
            ("c", "0", "8", "1", 9.0),
            ("d", "0,1", "8", "1", 10.0),
            ("e", "0,1", "8", "1", 30.0),
        ]
    )
    row = unpaired_effect(trials, 1)
    assert (row["effect_meV"], row["lo_meV"], row["hi_meV"]) == pytest.approx(welch_by_hand([10.0, 30.0], [1.0, 4.0, 9.0]))


def test_unpaired_effect_of_identical_configurations_has_a_zero_width_interval():
    trials = trials_table([(c, ls, "8", "1", v) for c, ls, v in [("a", "0", 5.0), ("b", "0", 5.0), ("c", "0,1", 7.0), ("d", "0,1", 7.0)]])
    row = unpaired_effect(trials, 1)
    assert row["effect_meV"] == 2.0 and row["lo_meV"] == 2.0 and row["hi_meV"] == 2.0


def test_unpaired_effect_of_one_configuration_a_side_has_no_interval_and_of_none_no_effect():
    trials = TWO_PAIRS[TWO_PAIRS["configuration"].isin(["a", "c", "d"])]
    row = unpaired_effect(trials, 1)
    assert row["effect_meV"] == pytest.approx(96.0 - (101.0 + 275.0 / 3.0) / 2)
    assert math.isnan(row["lo_meV"]) and math.isnan(row["hi_meV"]) and row["interval"] == ""
    row = unpaired_effect(TWO_PAIRS[TWO_PAIRS["configuration"].isin(["a", "b", "d"])], 1)
    assert row["effect_meV"] == pytest.approx(104.0 - 101.0) and math.isnan(row["lo_meV"]) and math.isnan(row["hi_meV"])
    row = unpaired_effect(TWO_PAIRS[TWO_PAIRS["configuration"].isin(["b", "d"])], 1)
    assert all(math.isnan(row[k]) for k in ("effect_meV", "lo_meV", "hi_meV"))
    assert row["interval"] == "" and row["n_configurations"] == 2 and row["n_trials"] == 6


def test_regression_design_codes_indicators_logs_wide_positive_numbers_and_categories():
    configurations = pd.DataFrame(
        {
            "l_values": ["0", "0,1", "0,2", "0,1,2", "0", "0,1", "0,2", "0"],
            "lr": [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 3e-3, 3e-2, 3e-4],  # numeric, 8 levels, all positive
            "shift": [-1.0, 0.0, 1.0, 2.0, 3.0, 5.0, 4.0, 7.0],  # numeric, 8 levels, not all positive
            "hidden_dim": ["8", "16", "32", "8", "16", "32", "16", "16"],  # strings: categories
            "depth": [2] * 8,  # constant: no column
        }
    )
    design, sources = regression_design(configurations, [1, 2], ["depth", "lr", "shift", "hidden_dim"])
    assert list(design.columns) == ["const", "l1", "l2", "log10 lr", "shift", "hidden_dim=32", "hidden_dim=8"]
    assert list(design["const"]) == [1.0] * 8
    assert list(design["l1"]) == [0, 1, 0, 1, 0, 1, 0, 0] and list(design["l2"]) == [0, 0, 1, 1, 0, 0, 1, 0]
    assert design["log10 lr"].to_numpy() == pytest.approx(np.log10(configurations["lr"].to_numpy()))
    assert list(design["shift"]) == list(configurations["shift"])
    assert list(design["hidden_dim=8"]) == [1, 0, 0, 1, 0, 0, 0, 0] and list(design["hidden_dim=32"]) == [0, 0, 1, 0, 0, 1, 0, 0]
    assert sources == {"log10 lr": "lr", "shift": "shift", "hidden_dim=32": "hidden_dim", "hidden_dim=8": "hidden_dim"}


def test_regression_design_takes_text_as_categories_and_a_number_with_zeros_as_it_is():
    configurations = pd.DataFrame(
        {
            "l_values": ["0", "0,1"] * 5,
            "act": ["8", "9", "10", "11", "12"] * 2,  # text, 5 levels: categories even if it reads as numbers
            "weight_decay": [0.0, 1e-4, 1e-3, 1e-2, 1e-1, 0.0, 1e-4, 1e-3, 1e-2, 1e-1],  # has 0: no log
        }
    )
    design, sources = regression_design(configurations, [1], ["act"])
    assert list(design.columns) == ["const", "l1", "act=11", "act=12", "act=8", "act=9"]
    design, sources = regression_design(configurations, [1], ["weight_decay"])
    assert list(design.columns) == ["const", "l1", "weight_decay"] and sources == {"weight_decay": "weight_decay"}
    assert list(design["weight_decay"]) == list(configurations["weight_decay"])


def test_regression_design_takes_levels_of_mixed_types_and_keeps_the_trials_index():
    # A parameter logged as a number in some trials and as text in others has categories all the same.
    configurations = pd.DataFrame(
        {"l_values": ["0", "0,1", "0", "0,1", "0"], "norm": [8, "auto", "auto", 8, 8]}, index=[10, 11, 12, 13, 14]
    )
    design, sources = regression_design(configurations, [1], ["norm"])
    assert list(design.columns) == ["const", "l1", "norm=auto"] and sources == {"norm=auto": "norm"}
    assert list(design["norm=auto"]) == [0, 1, 1, 0, 0]
    # The design's rows line up with the trials' by index.
    assert list(design.index) == [10, 11, 12, 13, 14]


def test_regression_design_takes_a_numeric_parameter_of_few_levels_as_categories():
    # 4 levels (MAX_LEVELS_AS_CATEGORIES) are categories; 5 are a number.
    four = pd.DataFrame({"l_values": ["0", "0,1"] * 4, "depth": [1, 1, 2, 2, 3, 3, 4, 4]})
    design, sources = regression_design(four, [1], ["depth"])
    assert list(design.columns) == ["const", "l1", "depth=2", "depth=3", "depth=4"]
    assert set(sources.values()) == {"depth"}
    five = pd.DataFrame({"l_values": ["0", "0,1"] * 5, "depth": [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]})
    design, sources = regression_design(five, [1], ["depth"])
    assert list(design.columns) == ["const", "l1", "log10 depth"] and sources == {"log10 depth": "depth"}


def test_regression_design_drops_an_aliased_covariate_before_the_order_asked_for():
    # hidden_dim is 8 exactly when l=1 is in: the covariate goes, the indicator stays.
    configurations = pd.DataFrame({"l_values": ["0", "0,1", "0", "0,1"], "hidden_dim": ["16", "8", "16", "8"]})
    design, sources = regression_design(configurations, [1], ["hidden_dim"])
    assert list(design.columns) == ["const", "l1"] and sources == {}


def ols_by_hand(X: np.ndarray, y: np.ndarray, k: int) -> tuple[float, float, float]:
    """Coefficient k of y on X and its 95% t interval on n - p degrees of freedom."""
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ beta
    dof = len(y) - X.shape[1]
    sigma2 = resid @ resid / dof
    se = math.sqrt(sigma2 * np.linalg.inv(X.T @ X)[k, k])
    half = stats.t.ppf(0.975, dof) * se
    return beta[k], beta[k] - half, beta[k] + half


def regression_study() -> pd.DataFrame:
    """Six configurations over l=1, l=2 and the hidden size, two seeds each; l=0 is in all."""
    cells = [("0", "8"), ("0,1", "8"), ("0,2", "16"), ("0,1,2", "16"), ("0,1", "16"), ("0", "16")]
    means = [100.0, 113.0, 87.0, 104.0, 103.0, 91.0]
    rows = []
    for k, ((ls, h), m) in enumerate(zip(cells, means)):
        rows += [(f"c{k}", ls, h, "1", m - 1.0 - 0.5 * k), (f"c{k}", ls, h, "2", m + 1.0 + 0.5 * k)]
    return trials_table(rows)


def test_regression_effects_are_ols_of_configuration_means_with_t_intervals():
    trials = regression_study()
    rows = {row["l"]: row for row in regression_effects(trials, ["hidden_dim"])}
    assert set(rows) == {1, 2}  # l=0 is everywhere
    means = trials.groupby("configuration")["test_mae_meV"].mean().to_numpy()
    config = trials.drop_duplicates("configuration")
    X = np.column_stack(
        [
            np.ones(6),
            [("1" in v.split(",")) for v in config["l_values"]],
            [("2" in v.split(",")) for v in config["l_values"]],
            (config["hidden_dim"] == "8").to_numpy(),
        ]
    ).astype(float)
    for k, l in ((1, 1), (2, 2)):
        row = rows[l]
        assert (row["effect_meV"], row["lo_meV"], row["hi_meV"]) == pytest.approx(ols_by_hand(X, means, k))
        assert row["method"] == "regression" and row["interval"] == "OLS t over configuration means"
        assert row["note"] == "adjusted for hidden_dim"
        assert row["n_configurations"] == 6 and row["n_trials"] == 12
        assert math.isnan(row["n_pairs"]) and math.isnan(row["n_configuration_pairs"])


def test_regression_with_nothing_else_varying_says_so():
    trials = regression_study().assign(hidden_dim="8")
    rows = regression_effects(trials, ["hidden_dim"])
    assert [row["note"] for row in rows] == ["adjusted for nothing else (no other parameter varies)"] * 2


def test_regression_refuses_to_fit_without_two_residual_degrees_of_freedom():
    # 5 configurations for 4 coefficients: one residual degree of freedom.
    trials = regression_study()
    trials = trials[trials["configuration"] != "c5"]
    rows = regression_effects(trials, ["hidden_dim"])
    assert [row["l"] for row in rows] == [1, 2]
    for row in rows:
        assert all(math.isnan(row[k]) for k in ("effect_meV", "lo_meV", "hi_meV")) and row["interval"] == ""
        assert row["note"] == "too few configurations (5) for 4 coefficients"
        assert row["n_configurations"] == 5 and row["n_trials"] == 10 and row["method"] == "regression"
    # 6 for 4: two residual degrees of freedom are enough.
    assert all(math.isfinite(row["lo_meV"]) for row in regression_effects(regression_study(), ["hidden_dim"]))


def test_an_order_aliased_with_another_is_not_identifiable():
    # l=1 and l=2 always come together: l=2's indicator is dropped and said to be aliased; l=3,
    # after it, is estimated all the same.
    cells = [("0", "8"), ("0,1,2", "8"), ("0", "16"), ("0,1,2", "16"), ("0,3", "16"), ("0,1,2,3", "8"), ("0,3", "8")]
    rows = []
    for k, (ls, h) in enumerate(cells):
        m = 10.0 + 4.0 * ("1" in ls) + 2.0 * ("3" in ls) + (h == "16")
        rows += [(f"c{k}", ls, h, "1", m - 0.3 * k), (f"c{k}", ls, h, "2", m + 0.5 * k)]
    trials = trials_table(rows)
    out = {row["l"]: row for row in regression_effects(trials, ["hidden_dim"])}
    assert set(out) == {1, 2, 3}
    assert math.isfinite(out[1]["effect_meV"]) and math.isfinite(out[3]["lo_meV"])
    assert math.isnan(out[2]["effect_meV"]) and math.isnan(out[2]["lo_meV"]) and math.isnan(out[2]["hi_meV"])
    assert out[2]["interval"] == "" and out[2]["note"] == "not identifiable: aliased with other parameters"
    assert out[2]["method"] == "regression" and out[2]["n_configurations"] == 7


def test_an_order_in_a_single_trial_is_still_estimated():
    trials = regression_study()
    trials = trials[trials["seed"] == "1"].copy()
    trials.loc[trials["configuration"] == "c3", "l_values"] = "0,1"  # l=2 is left in c2's one trial only
    rows = {row["l"]: row for row in regression_effects(trials, ["hidden_dim"])}
    assert set(rows) == {1, 2} and math.isfinite(rows[2]["effect_meV"])
    table = ablation_effects(trials, ["hidden_dim"])
    assert list(zip(table["l"], table["method"])) == [(l, m) for l in (1, 2) for m in ("paired", "regression", "unpaired")]
    assert table.set_index(["l", "method"]).loc[(2, "unpaired"), "effect_meV"] == pytest.approx(
        trials.loc[trials["l_values"] == "0,2", "test_mae_meV"].mean() - trials.loc[trials["l_values"] != "0,2", "test_mae_meV"].mean()
    )


def test_regression_has_no_rows_when_no_order_varies():
    trials = regression_study().assign(l_values="0,1")
    assert regression_effects(trials, ["hidden_dim"]) == []


def test_ablation_table_orders_rows_by_l_then_paired_regression_unpaired_and_labels_them():
    trials = pd.concat([TWO_PAIRS, regression_study().assign(configuration=lambda t: "r" + t["configuration"], hidden_dim="32")])
    trials = trials.reset_index(drop=True)
    table = ablation_effects(trials, ["hidden_dim"])
    assert list(table.columns) == list(ABLATION_COLUMNS)
    assert list(zip(table["l"], table["method"])) == [
        (1, "paired"),
        (1, "regression"),
        (1, "unpaired"),
        (2, "paired"),
        (2, "regression"),
        (2, "unpaired"),
    ]
    assert list(table["kind"]) == ["average"] * 6 and list(table["term"]) == ["l1"] * 3 + ["l2"] * 3
    assert list(table["model"]) == [MODELS[m] for m in table["method"]]
    assert table.index.tolist() == list(range(6))
    assert not is_factorial(table) and factorial_terms(table) is None


def test_trials_without_a_finite_metric_are_left_out():
    broken = TWO_PAIRS.copy()
    broken.loc[len(broken)] = ("b", "0,1", "8", "4", math.inf)
    broken.loc[len(broken)] = ("b", "0,1", "8", "5", math.nan)
    table = ablation_effects(broken, ["hidden_dim"])
    clean = ablation_effects(TWO_PAIRS, ["hidden_dim"])
    pd.testing.assert_frame_equal(table, clean)
    # Also from a column of objects where a missing trial is None (as a JSON table reads back).
    missing = broken.astype({"test_mae_meV": object})
    missing.loc[len(missing) - 1, "test_mae_meV"] = None
    pd.testing.assert_frame_equal(ablation_effects(missing, ["hidden_dim"]), clean, check_dtype=False)


def factorial_trials() -> pd.DataFrame:
    rows = [("a", "0", "8", s, 100.0 + int(s)) for s in ("1", "2", "3")] + [
        ("b", "0,1", "8", s, 110.0 + 2 * int(s)) for s in ("1", "2", "3")
    ]
    trials = trials_table(rows)
    trials["run_id"] = [f"run{k}" for k in range(len(trials))]
    return trials


def test_a_factorial_study_takes_the_per_molecule_errors_into_its_intervals():
    trials = factorial_trials()
    rng = np.random.default_rng(0)
    molecules = [5, 3, 9, 1]
    errors = {run: pd.Series(rng.uniform(0, 20, size=4), index=molecules) for run in trials["run_id"]}
    with_molecules = ablation_effects(trials, ["hidden_dim"], errors=errors)
    conditional = ablation_effects(trials, ["hidden_dim"])
    assert is_factorial(with_molecules) and list(with_molecules.columns) == list(ABLATION_COLUMNS)
    main = with_molecules[with_molecules["kind"] == "main"].iloc[0]
    main_conditional = conditional[conditional["kind"] == "main"].iloc[0]
    assert main["effect_meV"] == pytest.approx(main_conditional["effect_meV"])
    # The molecule sampling widens the interval beyond the seed part.
    assert main["se_meV"] > main["se_seed_meV"] and main_conditional["se_meV"] == main_conditional["se_seed_meV"]
    terms = factorial_terms(with_molecules)
    assert terms is not None and list(terms["term"]) == ["l1"]
    (method, row) = headline_estimates(with_molecules)[1]
    assert method == "factorial" and row["effect_meV"] == pytest.approx(main["effect_meV"])
    # The headline is the factorial's, and says its intervals carry the test molecules.
    assert "from the seed residual plus the sampling of the test molecules" in headline(with_molecules)[0]
    assert "conditional on this test set" in headline(conditional)[0]


def test_a_two_factor_study_reports_each_main_effect_as_the_average_of_its_simple_effects():
    cells = {"0": 100.0, "0,1": 112.0, "0,2": 95.0, "0,1,2": 101.0}
    rows = [(ls, ls, "8", str(s), m + (-1.0, 0.5, 0.5)[s]) for ls, m in cells.items() for s in range(3)]
    trials = trials_table(rows)
    table = ablation_effects(trials, ["hidden_dim"])
    assert is_factorial(table)
    chosen = headline_estimates(table)
    assert set(chosen) == {1, 2} and {method for method, _ in chosen.values()} == {"factorial"}
    # Main effect of l=1: its effect with l=2 out and with l=2 in, averaged (cell means by hand).
    assert chosen[1][1]["effect_meV"] == pytest.approx(((112.0 - 100.0) + (101.0 - 95.0)) / 2)
    assert chosen[2][1]["effect_meV"] == pytest.approx(((95.0 - 100.0) + (101.0 - 112.0)) / 2)
    assert all(row["kind"] == "main" for _, row in chosen.values())


def test_a_trial_table_with_a_column_named_index_is_analysed_the_same():
    # As a filtered table's reset_index() leaves it (twice: index and level_0).
    with_index = TWO_PAIRS.reset_index().reset_index()
    assert {"index", "level_0"} <= set(with_index.columns)
    pd.testing.assert_frame_equal(ablation_effects(with_index, ["hidden_dim"]), ablation_effects(TWO_PAIRS, ["hidden_dim"]))


def test_molecule_errors_line_up_trials_and_molecules_or_give_none():
    trials = factorial_trials().iloc[:3]
    errors = {
        "run0": pd.Series([1.0, 2.0, 3.0], index=[30, 10, 20]),
        "run1": pd.Series([4.0, 5.0, 6.0], index=[10, 20, 30]),
        "run2": pd.Series([7.0, 8.0, 9.0], index=[20, 30, 10]),
    }
    # Rows in the order of the trials, columns by sorted molecule id.
    assert molecule_errors(trials, errors).tolist() == [[2.0, 3.0, 1.0], [4.0, 5.0, 6.0], [9.0, 7.0, 8.0]]
    assert molecule_errors(trials.iloc[:1], errors).tolist() == [[2.0, 3.0, 1.0]]
    assert molecule_errors(trials, None) is None
    assert molecule_errors(trials.drop(columns="run_id"), errors) is None
    assert molecule_errors(trials, {k: v for k, v in errors.items() if k != "run1"}) is None
    fewer = {**errors, "run2": pd.Series([7.0, 8.0], index=[20, 30])}
    assert molecule_errors(trials, fewer) is None
    other = {**errors, "run2": pd.Series([7.0, 8.0, 9.0], index=[20, 30, 40])}
    assert molecule_errors(trials, other) is None
    more = {**errors, "run1": pd.Series([4.0, 5.0, 6.0, 7.0], index=[10, 20, 30, 40])}
    assert molecule_errors(trials, more) is None


def row(method, l, effect, lo, hi, **extra):
    return {"method": method, "l": l, "effect_meV": effect, "lo_meV": lo, "hi_meV": hi, **extra}


def test_headline_picks_pairs_then_regression_and_says_when_neither_estimates():
    # Rows out of order (as a table read back and filtered might be): the sentences go by l.
    table = pd.DataFrame(
        [
            row("regression", 5, 0.5, -1.0, 2.0, n_pairs=math.nan, n_configurations=6, n_trials=12, note="adjusted for h"),
            row("paired", 1, 4.0, 1.0, 7.0, n_pairs=6, n_configuration_pairs=2, note=""),
            row("regression", 1, 5.0, 0.0, 10.0, n_pairs=math.nan, n_configurations=4, n_trials=12, note="adjusted for h"),
            row("paired", 2, math.nan, math.nan, math.nan, n_pairs=0, n_configuration_pairs=0, note="no two"),
            row("regression", 2, -3.25, -6.0, -0.5, n_pairs=math.nan, n_configurations=6, n_trials=12, note="adjusted for h"),
            row("paired", 3, math.nan, math.nan, math.nan, n_pairs=0, n_configuration_pairs=0, note="no two"),
            row("regression", 3, math.nan, math.nan, math.nan, n_pairs=math.nan, n_configurations=6, n_trials=12, note="aliased"),
            row("paired", 4, 2.0, math.nan, math.nan, n_pairs=1, n_configuration_pairs=1, note="one pair of configurations"),
        ]
    )
    table["kind"] = "average"
    chosen = headline_estimates(table)
    assert list(chosen) == [1, 2, 4, 5] and chosen[5][0] == "regression"
    assert chosen[1][0] == "paired" and chosen[1][1]["effect_meV"] == 4.0
    assert chosen[2][0] == "regression" and chosen[2][1]["effect_meV"] == -3.25
    assert chosen[4][0] == "paired"
    assert headline(table) == [
        "including l=1 changed test MAE by +4.0 meV [+1.0, +7.0] over 6 paired comparisons (2 pairs of configurations).",
        "including l=2 changed test MAE by -3.2 meV [-6.0, -0.5] by regression over 6 configurations (12 trials; "
        "adjusted for h); no two configurations differ only in l=2.",
        "the study cannot estimate the effect of l=3: no paired comparisons and no identifiable regression.",
        "including l=4 changed test MAE by +2.0 meV (no interval: too few comparisons) over 1 paired comparisons "
        "(1 pairs of configurations; one pair of configurations).",
        "including l=5 changed test MAE by +0.5 meV [-1.0, +2.0] by regression over 6 configurations (12 trials; "
        "adjusted for h); no two configurations differ only in l=5.",
    ]


def test_headline_of_a_study_with_only_paired_rows_and_no_pairs_cannot_estimate():
    table = pd.DataFrame([row("paired", 1, math.nan, math.nan, math.nan, n_pairs=0, n_configuration_pairs=0, note="no two")])
    assert headline_estimates(table) == {}
    assert headline(table) == ["the study cannot estimate the effect of l=1: no paired comparisons and no identifiable regression."]
    # A paired row with a count but no finite effect does not count as pairs either.
    table = pd.DataFrame(
        [
            row("paired", 1, math.nan, math.nan, math.nan, n_pairs=2, n_configuration_pairs=1, note=""),
            row("regression", 1, 1.5, 0.5, 2.5, n_pairs=math.nan, n_configurations=5, n_trials=10, note="adjusted for h"),
        ]
    )
    assert headline_estimates(table)[1][0] == "regression"


def test_is_factorial_needs_rows_and_every_row_factorial():
    assert not is_factorial(pd.DataFrame({"method": []}))
    assert is_factorial(pd.DataFrame({"method": ["factorial", "factorial"]}))
    assert not is_factorial(pd.DataFrame({"method": ["factorial", "paired"]}))
