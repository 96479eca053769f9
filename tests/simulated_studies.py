"""Test helper: simulated studies with known truth, for calibrating the analysis's statistics.

A study has ``configurations`` x ``seeds`` trials. A score and the test error each have a
configuration-level part (shared by the seeds of a configuration) holding ``config_share`` of
their variance and a seed-level part holding the rest; ``rho`` is the correlation of the two
configuration-level parts (0: the null). The parameter count is a configuration-level quantity
unrelated to both, as in a study where it follows the l set.

Used by tests/test_analysis_calibration.py and benchmarks/calibration.py (false-positive rates of
the per-trial analysis that counted seeds as trials, and of the per-configuration one).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.correlate import correlate, mixed_model


def simulated_study(rng: np.random.Generator, configurations: int, seeds: int, config_share: float, rho: float = 0.0) -> pd.DataFrame:
    """One row per trial: configuration, seed, score, test_mae_meV, num_params."""
    between = rng.multivariate_normal([0.0, 0.0], [[1.0, rho], [rho, 1.0]], size=configurations) * np.sqrt(config_share)
    within = rng.normal(size=(configurations, seeds, 2)) * np.sqrt(1.0 - config_share)
    values = between[:, None, :] + within
    size = rng.lognormal(mean=9.0, sigma=1.0, size=configurations)
    return pd.DataFrame({
        "configuration": np.repeat([f"c{k}" for k in range(configurations)], seeds),
        "seed": np.tile(np.arange(seeds), configurations),
        "score": values[..., 0].ravel(),
        "test_mae_meV": 100.0 + 10.0 * values[..., 1].ravel(),
        "num_params": np.repeat(size, seeds),
    })


def per_trial_p(study: pd.DataFrame, n_perm: int, seed: int) -> dict[str, float]:
    """The analysis before issue 11: every trial one unit; partial on the rank of num_params."""
    result = correlate(study["score"], study["test_mae_meV"], size=study["num_params"], n_boot=0, n_perm=n_perm, seed=seed)
    return {"p_rho": result["p_rho"], "p_partial": result["p_partial_size"]}


def per_configuration_p(study: pd.DataFrame, n_perm: int, seed: int, mixed: bool = False) -> dict[str, float]:
    """The analysis after issue 11: configurations' means over seeds are the units."""
    means = study.groupby("configuration").mean(numeric_only=True)
    result = correlate(means["score"], means["test_mae_meV"], size=means["num_params"], n_boot=0, n_perm=n_perm, seed=seed)
    p = {"p_rho": result["p_rho"], "p_partial": result["p_partial_size"]}
    if mixed:
        p["p_mixed"] = mixed_model(study["score"], study["test_mae_meV"], study["configuration"])["p_mixed"]
    return p


def rejection_rates(
    configurations: int, seeds: int, config_share: float, rho: float = 0.0, studies: int = 400, n_perm: int = 200,
    seed: int = 0, per_trial: bool = False, mixed: bool = False, alpha: float = 0.05,
) -> dict[str, float]:
    """Share of simulated studies with p <= alpha, for each p the chosen analysis reports."""
    rng = np.random.default_rng(seed)
    hits: dict[str, list[bool]] = {}
    for k in range(studies):
        study = simulated_study(rng, configurations, seeds, config_share, rho)
        p = per_trial_p(study, n_perm, k) if per_trial else per_configuration_p(study, n_perm, k, mixed)
        for name, value in p.items():
            hits.setdefault(name, []).append(bool(value <= alpha))
    return {name: float(np.mean(values)) for name, values in hits.items()}
