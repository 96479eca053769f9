"""Calibration by simulation: the correlations across a study say "p <= 0.05" about 5% of the
time when nothing is there (neither much more nor much less), find a real configuration-level
relation most of the time, and the factorial's 95% intervals cover the planted effect about 95%
of the time (neither too narrow nor too wide).

The simulated studies (analysis/stats/simulation.py) have most of the variance of both the score
and the error at configuration level, as real studies do (a configuration's seeds agree far more
than two configurations do). Counting seeds as independent trials made 20-30% of null studies
"significant"; benchmarks/calibration.py prints the rates before and after.

Each rate is a binomial count over independent simulated studies, accepted in a two-sided
interval [a, b] of counts. The probabilities quoted beside each interval (checked by
test_the_stated_binomial_probabilities_hold) are for one check: that it fails although the true
rate is nominal (a false failure), and that it passes although the true rate is off by the stated
amount (a miss). Every seed is fixed and was not chosen after seeing a draw: they are the seeds
the tests had before their intervals were made two-sided, run once with the new study counts
(the 2^3 false-positive test now reads the coverage test's studies, seed 11, instead of
simulating its own with seed 12: decided before any run, to simulate them once).
"""

from __future__ import annotations

import functools

import pytest
from scipy.stats import binom

from analysis.stats.simulation import FACTORIAL_SCENARIOS, calibration, rejection_rates


def binomial_pass(n: int, a: int, b: int, rate: float) -> float:
    """P(a <= count <= b) for a count of n studies, each rejecting (or covering) with `rate`."""
    return float(binom.cdf(b, n, rate) - binom.cdf(a - 1, n, rate))


def accepted(rate: float, n: int, a: int, b: int) -> bool:
    count = round(rate * n)
    return a <= count <= b


# Null correlations: 800 studies, rejections accepted in [11, 65] (1.4% to 8.1%).
# P(false failure) = 7e-5 at a true 5%, 7e-5 at 3.5% and 8.4e-4 at 5.5% (the range measured over
# 4,000 studies by benchmarks/calibration.py: 3.7-5% for rho, 5-5.5% for the rank partial).
# P(pass) = 0.041 at a true 10%, 2.5e-4 at 12%, 0 at 0% (a p that is always 1 or always NaN).
NULL_STUDIES, NULL_A, NULL_B = 800, 11, 65
# The mixed model (slower): 400 studies, accepted in [5, 37] (1.25% to 9.25%).
# P(false failure) = 1.5e-4 at 5%; P(pass) = 0.049 at 12%, 4.4e-4 at 15%, 0 at 0%.
MIXED_STUDIES, MIXED_A, MIXED_B = 400, 5, 37
# Factorial studies: 600 per scenario.
# Coverage of a 95% interval: covered count accepted in [550, 588] (91.7% to 98.0%).
# P(false failure) = 2.5e-4 at 95%; P(pass) = 0.096 at 90%, 0.0024 at 88% (too narrow), 0.020 at
# 99% (too wide).
FACTORIAL_STUDIES, COVER_A, COVER_B = 600, 550, 588
# False positives of a null term or of the lack-of-fit test: accepted in [12, 50] (2% to 8.3%).
# P(false failure) = 2.5e-4 at 5%; P(pass) = 0.096 at 10%, 0.0024 at 12%, 0 at 0%.
FACTORIAL_NULL_A, FACTORIAL_NULL_B = 12, 50


# NaN p-values count as no rejection in the rates, so they are bounded apart, not hidden:
# - rho: never NaN on continuous simulated data.
# - the rank partial on size is undefined (NaN, "no invented numbers") when the error's or the
#   score's ranks equal the size's exactly: probability 2/6! = 0.28% per study at 6
#   configurations (2/10! at 10). At most 8 of 800 accepted: P(more | 0.28%) = 4.9e-4.
# - the mixed model is NaN where its fit fails (documented in correlate.mixed_model): at most 8
#   of 400 (2%) accepted: P(more | 0.25%, the share measured) = 1e-6.
PARTIAL_NAN_MAX, MIXED_NAN_MAX = 8, 8


def test_the_stated_binomial_probabilities_hold():
    # The numbers quoted above, so a change of an interval or a study count must restate them.
    assert 1 - binomial_pass(NULL_STUDIES, NULL_A, NULL_B, 0.05) < 1e-4
    assert 1 - binomial_pass(NULL_STUDIES, NULL_A, NULL_B, 0.055) < 1e-3
    assert binomial_pass(NULL_STUDIES, NULL_A, NULL_B, 0.12) < 1e-3 and binomial_pass(NULL_STUDIES, NULL_A, NULL_B, 0.0) == 0
    assert 1 - binomial_pass(MIXED_STUDIES, MIXED_A, MIXED_B, 0.05) < 2e-4
    assert binomial_pass(MIXED_STUDIES, MIXED_A, MIXED_B, 0.15) < 1e-3 and binomial_pass(MIXED_STUDIES, MIXED_A, MIXED_B, 0.0) == 0
    assert 1 - binomial_pass(FACTORIAL_STUDIES, COVER_A, COVER_B, 0.95) < 3e-4
    assert binomial_pass(FACTORIAL_STUDIES, COVER_A, COVER_B, 0.88) < 3e-3
    assert binomial_pass(FACTORIAL_STUDIES, COVER_A, COVER_B, 0.99) < 0.03
    assert binom.sf(PARTIAL_NAN_MAX, NULL_STUDIES, 2 / 720) < 5e-4 and binom.sf(MIXED_NAN_MAX, MIXED_STUDIES, 0.0025) < 1e-5
    assert 1 - binomial_pass(FACTORIAL_STUDIES, FACTORIAL_NULL_A, FACTORIAL_NULL_B, 0.05) < 3e-4
    assert binomial_pass(FACTORIAL_STUDIES, FACTORIAL_NULL_A, FACTORIAL_NULL_B, 0.12) < 3e-3


def test_the_acceptance_rule_rejects_a_p_value_that_is_always_one_or_always_zero():
    # Guards the rule the tests below use: rates of 0 and 1 fail, the nominal rate passes.
    assert not accepted(0.0, NULL_STUDIES, NULL_A, NULL_B) and not accepted(1.0, NULL_STUDIES, NULL_A, NULL_B)
    assert accepted(0.05, NULL_STUDIES, NULL_A, NULL_B)
    assert not accepted(1.0, FACTORIAL_STUDIES, COVER_A, COVER_B) and accepted(0.95, FACTORIAL_STUDIES, COVER_A, COVER_B)


@pytest.mark.parametrize("configurations, seeds", [(6, 3), (10, 2)])
@pytest.mark.parametrize("config_share", [0.8, 0.9])
def test_null_studies_reject_about_5_percent(configurations, seeds, config_share):
    rates = rejection_rates(configurations, seeds, config_share, studies=NULL_STUDIES, seed=0)
    assert rates["p_rho_nan"] == 0, rates
    assert round(rates["p_partial_nan"] * NULL_STUDIES) <= PARTIAL_NAN_MAX, rates
    assert accepted(rates["p_rho"], NULL_STUDIES, NULL_A, NULL_B), rates
    assert accepted(rates["p_partial"], NULL_STUDIES, NULL_A, NULL_B), rates


@pytest.mark.parametrize("configurations, seeds, config_share", [(6, 3, 0.9), (10, 2, 0.8)])
def test_the_mixed_model_second_opinion_is_calibrated_too(configurations, seeds, config_share):
    rates = rejection_rates(configurations, seeds, config_share, studies=MIXED_STUDIES, seed=1, mixed=True)
    assert round(rates["p_mixed_nan"] * MIXED_STUDIES) <= MIXED_NAN_MAX, rates
    assert accepted(rates["p_mixed"], MIXED_STUDIES, MIXED_A, MIXED_B), rates


def test_the_simulation_catches_seeds_counted_as_trials():
    # The same null studies analysed per trial (the code before issue 11): far above 5%. If this
    # fails, the simulation has become too easy to tell anything. 400 studies: a count above 60
    # (15%) has probability 0.53 at a true 15% and below 1e-12 at 5%, but the rate measured is 20-30%.
    rates = rejection_rates(6, 3, 0.9, studies=400, seed=6, per_trial=True)
    assert rates["p_rho_nan"] == 0, rates
    assert rates["p_rho"] > 0.15, rates


def test_a_planted_configuration_level_correlation_of_0_8_is_found_in_most_studies():
    # Power, one-sided by nature (there is no "too powerful"): above 50% of 400 studies; at a true
    # power of 60% that fails with probability 3e-5.
    rates = rejection_rates(10, 2, 0.85, rho=0.8, studies=400, seed=3)
    assert rates["p_rho_nan"] == 0, rates
    assert rates["p_rho"] > 0.5, rates


# ---------------------------------------------------------------------------- factorial studies
@functools.cache
def factorial_table(scenario: str, seed: int, with_molecules: bool = True):
    # Cached: the coverage and the false-positive tests read the same simulated studies.
    return calibration(FACTORIAL_SCENARIOS[scenario], FACTORIAL_STUDIES, seed=seed, with_molecules=with_molecules)


@pytest.mark.parametrize("scenario", ["2x2, planted interaction", "2^3, additive (4 null)"])
def test_factorial_intervals_with_the_test_molecules_cover_planted_effects_95_percent_of_the_time(scenario):
    table = factorial_table(scenario, seed=11)
    terms = table[table["term"] != "lack of fit"]
    assert len(terms) == (6 if scenario.startswith("2x2") else 14)  # every term, on both scales
    assert (terms["nan"] == 0).all(), terms.to_string()  # a NaN interval counts as a miss, and is also caught here
    covered = [accepted(c, FACTORIAL_STUDIES, COVER_A, COVER_B) for c in terms["coverage"]]
    assert all(covered), terms.to_string()


@pytest.mark.parametrize("scenario", ["2x2, additive (null l1:l2)", "2^3, additive (4 null)"])
def test_null_interactions_and_the_lack_of_fit_test_reject_about_5_percent(scenario):
    table = factorial_table(scenario, seed=11 if scenario.startswith("2^3") else 12)
    # Additive on the meV scale: every interaction there is a true null, and so is the lack of fit.
    nulls = table[(table["scale"] == "meV") & ((table["truth"] == 0) | (table["term"] == "lack of fit"))]
    assert len(nulls) == (2 if scenario.startswith("2x2") else 5)
    assert (nulls["nan"] == 0).all(), nulls.to_string()
    rejects = [accepted(r, FACTORIAL_STUDIES, FACTORIAL_NULL_A, FACTORIAL_NULL_B) for r in nulls["rejects"]]
    assert all(rejects), nulls.to_string()


def test_the_simulation_catches_intervals_that_leave_out_the_test_set_sampling():
    # The same studies with intervals from the seed residual alone (conditional on the test set):
    # they miss the population effect far more often than 5%. If this fails, the simulated test-set
    # sampling has become too small to tell the two apart.
    table = factorial_table("2x2, planted interaction", seed=13, with_molecules=False)
    terms = table[table["term"] != "lack of fit"]
    assert (terms["coverage"] < 0.85).all(), terms.to_string()
    # Without test-set sampling in the simulation, the seed residual is all there is and suffices:
    # calibrated, two-sided, by the same rule as above.
    table = factorial_table("2x2, no test-set sampling", seed=14, with_molecules=False)
    terms = table[table["term"] != "lack of fit"]
    assert (terms["nan"] == 0).all(), terms.to_string()
    assert all(accepted(c, FACTORIAL_STUDIES, COVER_A, COVER_B) for c in terms["coverage"]), terms.to_string()
