"""Calibration by simulation: the correlations across a study say "p <= 0.05" about 5% of the
time when nothing is there, and find a real configuration-level relation most of the time.

The simulated studies (tests/simulated_studies.py) have most of the variance of both the score
and the error at configuration level, as real studies do (a configuration's seeds agree far more
than two configurations do). Counting seeds as independent trials made 20-30% of null studies
"significant"; benchmarks/calibration.py prints the rates before and after.
"""

from __future__ import annotations

import pytest
from simulated_studies import rejection_rates

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
