"""Calibration by simulation: the correlations across a study say "p <= 0.05" about 5% of the
time when nothing is there, and find a real configuration-level relation most of the time.

The simulated studies (analysis/stats/simulation.py) have most of the variance of both the score
and the error at configuration level, as real studies do (a configuration's seeds agree far more
than two configurations do). Counting seeds as independent trials made 20-30% of null studies
"significant"; benchmarks/calibration.py prints the rates before and after.
"""

from __future__ import annotations

import pytest

from analysis.stats.simulation import rejection_rates

# 400 studies, as the issue asks: binomial sd 1.1% around the true rate. Measured over 4,000
# studies (benchmarks/calibration.py) the rates are 3.7-5% for rho and 5-5.5% for the partial rho
# at 6 configurations (a rank partial with 4 residual degrees of freedom is slightly eager), so
# about 1 simulation seed in 10 puts the partial's 400-study rate above 7%: the seed is fixed.
STUDIES = 400


@pytest.mark.parametrize("configurations, seeds", [(6, 3), (10, 2)])
@pytest.mark.parametrize("config_share", [0.8, 0.9])
def test_null_studies_reject_at_most_7_percent(configurations, seeds, config_share):
    rates = rejection_rates(configurations, seeds, config_share, studies=STUDIES, seed=0)
    assert rates["p_rho"] <= 0.07, rates
    assert rates["p_partial"] <= 0.07, rates


@pytest.mark.parametrize("configurations, seeds, config_share", [(6, 3, 0.9), (10, 2, 0.8)])
def test_the_mixed_model_second_opinion_is_calibrated_too(configurations, seeds, config_share):
    rates = rejection_rates(configurations, seeds, config_share, studies=150, seed=1, mixed=True)
    assert rates["p_mixed"] <= 0.07, rates


def test_the_simulation_catches_seeds_counted_as_trials():
    # The same null studies analysed per trial (the code before issue 11): far above 5%. If this
    # fails, the simulation has become too easy to tell anything.
    rates = rejection_rates(6, 3, 0.9, studies=STUDIES, seed=6, per_trial=True)
    assert rates["p_rho"] > 0.15, rates


def test_a_planted_configuration_level_correlation_of_0_8_is_found_in_most_studies():
    rates = rejection_rates(10, 2, 0.85, rho=0.8, studies=STUDIES, seed=3)
    assert rates["p_rho"] > 0.5, rates


# ---------------------------------------------------------------------------- factorial studies
# 200 simulated studies per scenario (analysis/stats/simulation.py): binomial sd 1.5% around a true 95%,
# so a calibrated interval covers less than 90% of them with probability below 0.1%.
FACTORIAL_STUDIES = 200


@pytest.mark.parametrize("scenario", ["2x2, planted interaction", "2^3, additive (4 null)"])
def test_factorial_intervals_with_the_test_molecules_cover_planted_effects_95_percent_of_the_time(scenario):
    from analysis.stats.simulation import FACTORIAL_SCENARIOS, calibration

    table = calibration(FACTORIAL_SCENARIOS[scenario], FACTORIAL_STUDIES, seed=11)
    terms = table[table["term"] != "lack of fit"]
    assert ((terms["coverage"] >= 0.9) & (terms["coverage"] <= 0.995)).all(), terms.to_string()


@pytest.mark.parametrize("scenario", ["2x2, additive (null l1:l2)", "2^3, additive (4 null)"])
def test_null_interactions_and_the_lack_of_fit_test_reject_about_5_percent(scenario):
    from analysis.stats.simulation import FACTORIAL_SCENARIOS, calibration

    table = calibration(FACTORIAL_SCENARIOS[scenario], FACTORIAL_STUDIES, seed=12)
    # Additive on the meV scale: every interaction there is a true null, and so is the lack of fit.
    nulls = table[(table["scale"] == "meV") & ((table["truth"] == 0) | (table["term"] == "lack of fit"))]
    assert len(nulls) == (2 if scenario.startswith("2x2") else 5)
    assert (nulls["rejects"] <= 0.08).all(), nulls.to_string()


def test_the_simulation_catches_intervals_that_leave_out_the_test_set_sampling():
    from analysis.stats.simulation import FACTORIAL_SCENARIOS, calibration

    # The same studies with intervals from the seed residual alone (conditional on the test set):
    # they miss the population effect far more often than 5%. If this fails, the simulated test-set
    # sampling has become too small to tell the two apart.
    table = calibration(FACTORIAL_SCENARIOS["2x2, planted interaction"], FACTORIAL_STUDIES, seed=13, with_molecules=False)
    terms = table[table["term"] != "lack of fit"]
    assert (terms["coverage"] < 0.85).all(), terms.to_string()
    # Without test-set sampling in the simulation, the seed residual is all there is and suffices.
    table = calibration(FACTORIAL_SCENARIOS["2x2, no test-set sampling"], FACTORIAL_STUDIES, seed=14, with_molecules=False)
    assert (table[table["term"] != "lack of fit"]["coverage"] >= 0.9).all(), table.to_string()
