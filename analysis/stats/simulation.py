"""Seeded simulations of studies with known truth, for calibrating the analysis's statistics: factorial
l-set studies (analysis/stats/factorial.py) and score-error correlations (analysis/stats/correlate.py).

Factorial studies.

A simulated study is a 2^k factorial over the inclusion of ``factors`` (with order 0 always in),
``seeds`` trials per cell, every trial tested on the same ``molecules`` test molecules drawn from
a population. A trial's absolute error on molecule i is multiplicative, as real errors are
positive and heavy-tailed:

    error[t, i] = mae[cell] * exp(seed shift of t) * difficulty[i] * fit[cell, i] * noise[t, i]

- ``mae[cell]``: the cell's population MAE, from planted coefficients on the x = +-1/2 coding
  (the truth on the meV scale is exactly those coefficients);
- the seed shift (sd ``seed_sd``, a relative sd: 0.03 is a 3% seed-to-seed spread) moves a whole
  trial; ``noise`` (sd ``noise_sd``) is seed-by-molecule scatter;
- ``difficulty`` (sd ``difficulty_sd``) is shared by every trial: a hard molecule is hard for all;
  ``fit`` (sd ``fit_sd``) is shared by the seeds of one cell: which molecules a configuration gets
  wrong. This part does not average out over seeds, only over molecules: it is the test-set
  sampling error that an interval conditional on the test set leaves out.

Every factor is lognormal with mean 1, so the population MAE of a cell is ``mae[cell]``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.stats.correlate import correlate, mixed_model
from analysis.stats.factorial import (
    FactorialDesign,
    factorial_design,
    factorial_effects,
    family,
    term_name,
)
from study.names import TEST_MAE


@dataclass(frozen=True)
class SimulatedFactorial:
    factors: tuple[int, ...] = (1, 2)
    seeds: int = 5
    molecules: int = 1000
    intercept_meV: float = 150.0
    coefficients_meV: tuple[tuple[tuple[int, ...], float], ...] = (((1,), -20.0), ((2,), -30.0), ((1, 2), 15.0))
    seed_sd: float = 0.03
    noise_sd: float = 0.3
    difficulty_sd: float = 1.0
    fit_sd: float = 0.5

    @property
    def cells(self) -> list[tuple[bool, ...]]:
        return list(itertools.product((False, True), repeat=len(self.factors)))

    def cell_mae(self) -> dict[tuple[bool, ...], float]:
        planted = dict(self.coefficients_meV)
        values = {}
        for cell in self.cells:
            coded = {l: 0.5 if on else -0.5 for l, on in zip(self.factors, cell)}
            values[cell] = self.intercept_meV + sum(value * np.prod([coded[l] for l in term]) for term, value in planted.items())
        if min(values.values()) <= 0:
            raise ValueError("planted coefficients give a cell with MAE <= 0")
        return values

    def truth(self) -> dict[str, tuple[float, float]]:
        """Per term name: its population value on the meV scale and on the log scale."""
        mae = self.cell_mae()
        truth = {}
        planted = dict(self.coefficients_meV)
        for size in range(1, len(self.factors) + 1):
            for term in itertools.combinations(self.factors, size):
                # On the +-1/2 coding a saturated factorial's coefficient of a term is the sum over
                # cells of (product of the term's +-1 signs) x cell value / 2^(k - |term|).
                signs = [np.prod([1 if cell[self.factors.index(l)] else -1 for l in term]) for cell in self.cells]
                scale = 2 ** (len(self.factors) - len(term))
                log_value = sum(s * np.log(mae[c]) for s, c in zip(signs, self.cells)) / scale
                truth[term_name(term)] = (planted.get(term, 0.0), float(log_value))
        return truth


def _lognormal(rng: np.random.Generator, sd: float, size) -> np.ndarray:
    """Mean-1 lognormal factors with log-sd ``sd``."""
    return np.exp(rng.normal(-0.5 * sd * sd, sd, size=size))


def simulate(spec: SimulatedFactorial, rng: np.random.Generator) -> tuple[pd.DataFrame, np.ndarray]:
    """One study: trials (configuration, l_values, seed, test_mae_meV) and their [trials, molecules] errors."""
    mae = spec.cell_mae()
    difficulty = _lognormal(rng, spec.difficulty_sd, spec.molecules)
    rows, errors = [], []
    for cell in spec.cells:
        fit = _lognormal(rng, spec.fit_sd, spec.molecules)
        l_values = ",".join(map(str, sorted([0, *(l for l, on in zip(spec.factors, cell) if on)])))
        for seed in range(spec.seeds):
            shift = np.exp(rng.normal(-0.5 * spec.seed_sd**2, spec.seed_sd))
            error = mae[cell] * shift * difficulty * fit * _lognormal(rng, spec.noise_sd, spec.molecules)
            errors.append(error)
            rows.append({"configuration": f"l={l_values}", "l_values": l_values, "seed": seed, TEST_MAE: float(error.mean())})
    return pd.DataFrame(rows), np.array(errors)


def calibration(spec: SimulatedFactorial, studies: int, seed: int = 0, with_molecules: bool = True) -> pd.DataFrame:
    """Over ``studies`` simulated studies: per term (main effects and interactions) and scale, how
    often the 95% interval covers the truth, and how often p <= 0.05 (the false-positive rate
    where the truth is 0); and how often the additive model's lack-of-fit test rejects."""
    rng = np.random.default_rng(seed)
    truth = spec.truth()
    hits: dict[tuple[str, str], list[tuple[bool, bool]]] = {}
    lack: dict[str, list[bool]] = {}
    design: FactorialDesign | None = None
    for _ in range(studies):
        trials, errors = simulate(spec, rng)
        design = design or factorial_design(trials, [])
        table = factorial_effects(trials, design, errors=errors if with_molecules else None)
        for row in family(table).itertuples():
            meV_truth, log_truth = truth[row.term]
            # A NaN bound or p counts as a miss and as no rejection, and is counted apart in "nan",
            # so a rate over the finite intervals alone cannot hide it.
            meV_nan = not np.isfinite([row.lo_meV, row.hi_meV, row.p]).all()
            hits.setdefault((row.term, "meV"), []).append((row.lo_meV <= meV_truth <= row.hi_meV, row.p <= 0.05, meV_nan))
            log_lo, log_hi = np.log(row.ratio_lo), np.log(row.ratio_hi)
            log_nan = not np.isfinite([log_lo, log_hi]).all()
            log_rejects = not log_nan and not (log_lo <= 0 <= log_hi)
            hits.setdefault((row.term, "log"), []).append((log_lo <= log_truth <= log_hi, log_rejects, log_nan))
        for row in table[table["kind"] == "lack_of_fit"].itertuples():
            lack.setdefault("log" if "log" in row.context else "meV", []).append((row.p <= 0.05, not np.isfinite(row.p)))
    rows = []
    for (term, scale), values in hits.items():
        value = truth[term][0 if scale == "meV" else 1]
        covered, rejected, nan = np.array(values).T
        rows.append(
            {
                "term": term,
                "scale": scale,
                "truth": value,
                "coverage": covered.mean(),
                "rejects": rejected.mean(),
                "nan": nan.mean(),
                "studies": studies,
            }
        )
    for scale, values in lack.items():
        rejected, nan = np.array(values).T
        rows.append(
            {
                "term": "lack of fit",
                "scale": scale,
                "truth": np.nan,
                "coverage": np.nan,
                "rejects": rejected.mean(),
                "nan": nan.mean(),
                "studies": studies,
            }
        )
    return pd.DataFrame(rows)


def additive(spec: SimulatedFactorial, scale: str = "meV") -> SimulatedFactorial:
    """The same study with every interaction set to zero on the meV scale (log scale: not additive)."""
    kept = tuple((term, value) for term, value in spec.coefficients_meV if len(term) == 1)
    if scale != "meV":
        raise ValueError("only the meV scale can be planted additive here")
    return SimulatedFactorial(**{**spec.__dict__, "coefficients_meV": kept})


def planted(factors: Sequence[int], coefficients: dict[tuple[int, ...], float], **kwargs) -> SimulatedFactorial:
    return SimulatedFactorial(factors=tuple(factors), coefficients_meV=tuple(coefficients.items()), **kwargs)


# The scenarios benchmarks/calibration.py and the tests run. A 3% seed-to-seed sd is that of
# results/ablation-cpu; the per-molecule spreads are chosen so that the test set's sampling is as
# large as the seed noise, the case where leaving it out matters (in results/pruning-cpu, with
# 4-13% seed sd, it added only 3-7% to the standard errors).
FACTORIAL_SCENARIOS = {
    "2x2, planted interaction": SimulatedFactorial(),
    "2x2, additive (null l1:l2)": additive(SimulatedFactorial()),
    "2^3, additive (4 null)": planted((1, 2, 3), {(1,): -40.0, (2,): -80.0, (3,): -35.0}, intercept_meV=200.0),
    "2x2, no test-set sampling": SimulatedFactorial(difficulty_sd=0.0, fit_sd=0.0),
}


# ---------------------------------------------------------------------------- score-error correlations
# A study has ``configurations`` x ``seeds`` trials. A score and the test error each have a
# configuration-level part (shared by the seeds of a configuration) holding ``config_share`` of
# their variance and a seed-level part holding the rest; ``rho`` is the correlation of the two
# configuration-level parts (0: the null). The parameter count is a configuration-level quantity
# unrelated to both, as in a study where it follows the l set.


def simulated_study(rng: np.random.Generator, configurations: int, seeds: int, config_share: float, rho: float = 0.0) -> pd.DataFrame:
    """One row per trial: configuration, seed, score, test_mae_meV, num_params."""
    between = rng.multivariate_normal([0.0, 0.0], [[1.0, rho], [rho, 1.0]], size=configurations) * np.sqrt(config_share)
    within = rng.normal(size=(configurations, seeds, 2)) * np.sqrt(1.0 - config_share)
    values = between[:, None, :] + within
    size = rng.lognormal(mean=9.0, sigma=1.0, size=configurations)
    return pd.DataFrame(
        {
            "configuration": np.repeat([f"c{k}" for k in range(configurations)], seeds),
            "seed": np.tile(np.arange(seeds), configurations),
            "score": values[..., 0].ravel(),
            "test_mae_meV": 100.0 + 10.0 * values[..., 1].ravel(),
            "num_params": np.repeat(size, seeds),
        }
    )


def per_trial_p(study: pd.DataFrame, n_perm: int, seed: int) -> dict[str, float]:
    """The analysis that counts every trial as a unit (seeds as if independent); partial on the rank
    of num_params. Kept to show its false-positive rate."""
    result = correlate(study["score"], study["test_mae_meV"], size=study["num_params"], n_boot=0, n_perm=n_perm, seed=seed)
    return {"p_rho": result["p_rho"], "p_partial": result["p_partial_size"]}


def per_configuration_p(study: pd.DataFrame, n_perm: int, seed: int, mixed: bool = False) -> dict[str, float]:
    """The analysis `analyze` runs: configurations' means over seeds are the units."""
    means = study.groupby("configuration").mean(numeric_only=True)
    result = correlate(means["score"], means["test_mae_meV"], size=means["num_params"], n_boot=0, n_perm=n_perm, seed=seed)
    p = {"p_rho": result["p_rho"], "p_partial": result["p_partial_size"]}
    if mixed:
        p["p_mixed"] = mixed_model(study["score"], study["test_mae_meV"], study["configuration"])["p_mixed"]
    return p


def rejection_rates(
    configurations: int,
    seeds: int,
    config_share: float,
    rho: float = 0.0,
    studies: int = 400,
    n_perm: int = 200,
    seed: int = 0,
    per_trial: bool = False,
    mixed: bool = False,
    alpha: float = 0.05,
) -> dict[str, float]:
    """Share of simulated studies with p <= alpha, for each p the chosen analysis reports; and,
    under ``NAME_nan``, the share whose p was NaN (counted as not rejecting in the rate, so it is
    reported apart rather than hidden in a low rate)."""
    rng = np.random.default_rng(seed)
    hits: dict[str, list[bool]] = {}
    nans: dict[str, list[bool]] = {}
    for k in range(studies):
        study = simulated_study(rng, configurations, seeds, config_share, rho)
        p = per_trial_p(study, n_perm, k) if per_trial else per_configuration_p(study, n_perm, k, mixed)
        for name, value in p.items():
            hits.setdefault(name, []).append(bool(value <= alpha))
            nans.setdefault(name, []).append(bool(np.isnan(value)))
    rates = {name: float(np.mean(values)) for name, values in hits.items()}
    return rates | {f"{name}_nan": float(np.mean(values)) for name, values in nans.items()}
