"""Designed l-set studies analysed as factorials (analysis/stats/factorial.py), against statsmodels'
own fit of the same model, on simulated studies with planted effects (analysis/stats/simulation.py),
and on the published ablation study's trials."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import statsmodels.formula.api as smf
from scipy import stats

from analysis.stats.ablation import ablation_effects, headline, headline_estimates
from analysis.stats.factorial import (
    CONDITIONAL,
    WITH_MOLECULES,
    factorial_design,
    factorial_effects,
    holm,
)
from analysis.stats.simulation import SimulatedFactorial, planted, simulate

PRUNING = planted((1, 2), {(1,): -20.0, (2,): -30.0, (1, 2): 15.0})


def _study(spec: SimulatedFactorial = PRUNING, seed: int = 0, fixed: tuple[str, ...] = ("3", "4", "5", "6")):
    """A simulated study; the seed's contrast by default ({0, 3, 4, 5, 6} always in)."""
    trials, errors = simulate(spec, np.random.default_rng(seed))
    trials["l_values"] = trials["l_values"].map(lambda v: ",".join(sorted({*v.split(","), *fixed}, key=int)))
    return trials, errors


def _coded(trials: pd.DataFrame, l: int) -> np.ndarray:
    return np.array([0.5 if str(l) in v.split(",") else -0.5 for v in trials["l_values"]])


def test_the_seeds_contrast_is_recognised_as_a_2x2_factorial_with_the_held_orders_fixed():
    trials, _ = _study()
    design = factorial_design(trials, [])
    assert design.factors == (1, 2) and design.fixed == (0, 3, 4, 5, 6)
    # A missing cell, another parameter varying, or no seed replicates: not a factorial.
    assert factorial_design(trials[trials["l_values"] != "0,1,2,3,4,5,6"], []) is None
    assert factorial_design(trials.assign(lr=np.arange(len(trials)) % 2), ["lr"]) is None
    assert factorial_design(trials.drop_duplicates("l_values"), []) is None


def test_effects_intervals_and_lack_of_fit_equal_statsmodels_fit_of_the_saturated_model():
    trials, _ = _study(
        planted((1, 2, 3), {(1,): -40.0, (2,): -80.0, (3,): -35.0, (1, 2): 45.0, (1, 2, 3): -100.0}, intercept_meV=200.0), seed=1, fixed=()
    )
    trials = trials.iloc[:-3]  # unbalanced: one cell with 2 seeds
    table = factorial_effects(trials, factorial_design(trials, []))
    frame = pd.DataFrame({"y": trials["test_mae_meV"], **{f"x{l}": _coded(trials, l) for l in (1, 2, 3)}})
    full = smf.ols("y ~ x1 * x2 * x3", frame).fit()
    bounds = full.conf_int(0.05)
    by_term = table.set_index("term")
    for term, name in {
        "l1": "x1",
        "l2": "x2",
        "l3": "x3",
        "l1:l2": "x1:x2",
        "l1:l3": "x1:x3",
        "l2:l3": "x2:x3",
        "l1:l2:l3": "x1:x2:x3",
    }.items():
        row = by_term.loc[term] if term not in ("l1", "l2", "l3") else by_term[by_term["kind"] == "main"].loc[term]
        assert row["effect_meV"] == pytest.approx(full.params[name], abs=1e-9)
        assert (row["lo_meV"], row["hi_meV"]) == pytest.approx(tuple(bounds.loc[name]), abs=1e-9)
        assert row["p"] == pytest.approx(full.pvalues[name], rel=1e-6)
        assert row["df"] == full.df_resid == len(trials) - 8
    log_fit = smf.ols("np.log(y) ~ x1 * x2 * x3", frame).fit()
    main = table[table["kind"] == "main"].set_index("term")
    assert main.loc["l2", "ratio"] == pytest.approx(math.exp(log_fit.params["x2"]))
    assert main.loc["l2", "ratio_lo"] == pytest.approx(math.exp(log_fit.conf_int().loc["x2", 0]))
    additive = smf.ols("y ~ x1 + x2 + x3", frame).fit()
    expected = sm.stats.anova_lm(additive, full).iloc[1]
    lack = table[(table["kind"] == "lack_of_fit") & table["context"].str.contains("meV")].iloc[0]
    assert lack["F"] == pytest.approx(expected["F"]) and lack["p"] == pytest.approx(expected["Pr(>F)"], rel=1e-6)
    assert (lack["df_num"], lack["df"]) == (4, len(trials) - 8)
    assert (table["interval"].iloc[0], table["method"].unique().tolist()) == (CONDITIONAL, ["factorial"])


def test_simple_effects_are_differences_of_cell_means_with_the_seed_residual():
    trials, _ = _study(seed=2)
    table = factorial_effects(trials, factorial_design(trials, []))
    simple = table[table["kind"] == "simple"].set_index(["term", "context"])
    means = trials.groupby("l_values")["test_mae_meV"].mean()
    row = simple.loc[("l1", "0,2,3,4,5,6")]
    assert row["effect_meV"] == pytest.approx(means["0,1,2,3,4,5,6"] - means["0,2,3,4,5,6"])
    residual = trials["test_mae_meV"] - trials.groupby("l_values")["test_mae_meV"].transform("mean")
    s2 = float((residual**2).sum()) / (len(trials) - 4)
    half = stats.t.ppf(0.975, len(trials) - 4) * math.sqrt(s2 * (1 / 5 + 1 / 5))
    assert row["hi_meV"] - row["lo_meV"] == pytest.approx(2 * half)
    assert set(simple.index) == {("l1", "0,3,4,5,6"), ("l1", "0,2,3,4,5,6"), ("l2", "0,3,4,5,6"), ("l2", "0,1,3,4,5,6")}


def test_the_test_molecules_sampling_is_added_to_the_seed_variance_exactly():
    trials, errors = _study(seed=3)
    design = factorial_design(trials, [])
    conditional = factorial_effects(trials, design).set_index(["kind", "term"])
    carried = factorial_effects(trials, design, errors=errors).set_index(["kind", "term"])
    # The main effect of l2 is a fixed combination w of the trials' MAEs, so a mean over molecules of
    # d_i = w @ errors[:, i]: its molecule-sampling variance is var(d) / molecules.
    # Balanced, +-1/2 coding: the main effect is mean(with l2) - mean(without l2).
    w = np.where(_coded(trials, 2) > 0, 1.0, -1.0) / (len(trials) / 2)
    d = w @ errors
    seed_se = conditional.loc[("main", "l2"), "se_meV"]
    assert carried.loc[("main", "l2"), "effect_meV"] == pytest.approx(float(w @ trials["test_mae_meV"]))
    assert carried.loc[("main", "l2"), "se_meV"] ** 2 == pytest.approx(seed_se**2 + d.var(ddof=1) / errors.shape[1])
    assert carried.loc[("main", "l2"), "interval"] == WITH_MOLECULES
    with pytest.raises(ValueError, match="one row per trial"):
        factorial_effects(trials, design, errors=errors[:-1])


def test_a_factorial_study_gets_only_factorial_rows_and_its_headline_says_which_model():
    trials, errors = _study(seed=4)
    trials["run_id"] = [f"r{k}" for k in range(len(trials))]
    by_run = {run: pd.Series(row, index=np.arange(errors.shape[1]) + 7) for run, row in zip(trials["run_id"], errors)}
    table = ablation_effects(trials, [], errors=by_run)
    assert set(table["method"]) == {"factorial"} and set(table["kind"]) == {"main", "interaction", "simple", "lack_of_fit"}
    assert (table["interval"][table["kind"] != "lack_of_fit"] == WITH_MOLECULES).all()
    assert set(headline_estimates(table)) == {1, 2}
    sentences = headline(table)
    assert sentences[0].startswith("The l sets form a 2^2 factorial: l=1, l=2 each in or out, always in: 0,3,4,5,6;")
    assert "16 residual degrees of freedom over 4 cells" in sentences[0] and "Holm-adjusted over the 3 terms" in sentences[0]
    assert sentences[1].startswith("including l=1 changed test MAE by -") and "Holm p" in sentences[1]
    # Molecules missing for one trial: the intervals fall back to conditional on the test set, and say so.
    by_run["r0"] = by_run["r0"].iloc[1:]
    assert (ablation_effects(trials, [], errors=by_run)["interval"].iloc[0]) == CONDITIONAL


def test_holm_matches_its_definition():
    p = np.array([0.01, 0.04, 0.03, 0.2])
    # Sorted 0.01, 0.03, 0.04, 0.2 times 4, 3, 2, 1, then made monotone.
    assert holm(p).tolist() == pytest.approx([0.04, 0.09, 0.09, 0.2])
