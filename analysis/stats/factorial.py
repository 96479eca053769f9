"""Designed l-set studies analysed as the factorial experiments they are.

When the l sets of a study are every subset of some orders (the *factors*) on top of orders that
every configuration holds (the *fixed* orders), and nothing but the l set tells configurations
apart, the study is a full 2^k factorial over the inclusion of each factor. Its contexts are then
the whole fixed set of cells, not a sample of them, and the spread of an order's effect across
them is an interaction the design estimates, not noise. So the model is the one the design
implies: a trial-level least-squares fit of the test MAE on the inclusion indicators coded
x = -1/2 (out) or +1/2 (in) with every interaction (saturated: one coefficient per cell), whose
residual is seed-to-seed variation alone. With that coding

- a *main effect* of l is the change of test MAE when l is included, averaged with equal weight
  over the 2^(k-1) settings of the other factors;
- an *interaction* l:l' is how much l's effect changes when l' is included (the difference of the
  two averaged effects), and so on for higher orders;
- a *simple effect* is adding l to one context (one setting of the other factors): the
  difference of two cell means.

Every term is fitted on the MAE in meV and on log MAE, shown as a ratio (exp of the coefficient:
the geometric-mean factor by which including l multiplies the error). A lack-of-fit F test
compares the additive model (main effects only) with the saturated one: a small p says the
orders' effects do not add up, and the main effects alone do not describe the study.

Uncertainty. Seeds are the replicates, so the residual of the saturated model is the seed-level
error. Every trial is also tested on the same test molecules, and a mean over ~1,000 molecules is
itself a sample: an effect, being a fixed linear combination of the trials' MAEs, is a mean over
molecules of that combination of the per-molecule errors, so its molecule-sampling variance is
that combination's variance over molecules divided by their number (paired across all trials,
exactly, with no resampling). When the per-molecule errors are given, both parts are carried
(Welch-Satterthwaite degrees of freedom); without them an interval is conditional on this test
set, and its ``interval`` column says so. benchmarks/calibration.py checks both by simulation.

The main effects and interactions are one family: each row has its unadjusted 95% interval and
p, and a Holm-adjusted p over the family (``p_holm``). Simple effects are descriptive, unadjusted.
``se_meV`` is the standard error the interval uses; ``se_seed_meV`` its seed-level part alone
(equal to it when no per-molecule errors are given), so the table shows what the test set adds.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from analysis.stats.configurations import includes, l_orders
from study.names import TEST_MAE

METHOD = "factorial"
MODEL = "trial-level OLS, all interactions (x = +-1/2), residual = seed-to-seed variation"
FACTORIAL_COLUMNS = (
    "method",
    "kind",
    "term",
    "l",
    "context",
    "effect_meV",
    "lo_meV",
    "hi_meV",
    "se_meV",
    "se_seed_meV",
    "ratio",
    "ratio_lo",
    "ratio_hi",
    "p",
    "p_holm",
    "df",
    "F",
    "df_num",
    "n_trials",
    "interval",
    "model",
    "note",
)
CONDITIONAL = "seed residual only: conditional on this test set"
WITH_MOLECULES = "seed residual + test-molecule sampling (paired), Welch-Satterthwaite t"


@dataclass(frozen=True)
class FactorialDesign:
    """Which orders are factors (in or out) and which every configuration holds."""

    factors: tuple[int, ...]
    fixed: tuple[int, ...]

    def cell(self, l_values: str) -> tuple[bool, ...]:
        return tuple(includes(l_values, l) for l in self.factors)

    def describe(self) -> str:
        fixed = ",".join(map(str, self.fixed)) or "none"
        return f"2^{len(self.factors)} factorial: {', '.join(f'l={l}' for l in self.factors)} each in or out, always in: {fixed}"

    def l_set(self, cell: Sequence[bool]) -> str:
        orders = sorted([*self.fixed, *(l for l, on in zip(self.factors, cell) if on)])
        return ",".join(map(str, orders))


def factorial_design(trials: pd.DataFrame, context: Sequence[str]) -> FactorialDesign | None:
    """The study's factorial design, or None when it is not one.

    ``trials``: completed trials with ``configuration`` and ``l_values``; ``context``: the other
    parameters that vary. A design needs at least one factor, every cell of the 2^k present, one
    configuration per cell (nothing else varies), and a seed-level residual to estimate (more
    trials than cells)."""
    if trials.empty or any(trials[name].nunique() > 1 for name in context if name in trials):
        return None
    orders = l_orders(trials["l_values"])
    presence = {l: {includes(v, l) for v in trials["l_values"]} for l in orders}
    factors = tuple(l for l in orders if presence[l] == {True, False})
    fixed = tuple(l for l in orders if presence[l] == {True})
    if not factors:
        return None
    design = FactorialDesign(factors, fixed)
    cells = trials.groupby("l_values")["configuration"].nunique()
    if (cells > 1).any():
        return None
    if {design.cell(v) for v in cells.index} != set(itertools.product((False, True), repeat=len(factors))):
        return None
    if len(trials) <= 2 ** len(factors):
        return None
    return design


def _terms(factors: Sequence[int]) -> list[tuple[int, ...]]:
    """Every non-empty subset of the factors, main effects first, then by order of interaction."""
    return [combo for size in range(1, len(factors) + 1) for combo in itertools.combinations(factors, size)]


def term_name(term: Sequence[int]) -> str:
    return ":".join(f"l{l}" for l in term)


def _coded(trials: pd.DataFrame, design: FactorialDesign) -> dict[int, np.ndarray]:
    return {l: np.array([0.5 if includes(v, l) else -0.5 for v in trials["l_values"]]) for l in design.factors}


def _model_matrix(coded: dict[int, np.ndarray], terms: Sequence[tuple[int, ...]], n: int) -> np.ndarray:
    columns = [np.ones(n)] + [np.prod([coded[l] for l in term], axis=0) for term in terms]
    return np.column_stack(columns)


class _Scale:
    """The saturated fit on one scale (MAE in meV, or log MAE) and the variance of any linear
    combination of the trials' values: seed-level from the residual, plus molecule sampling."""

    def __init__(self, X: np.ndarray, y: np.ndarray, contributions: np.ndarray | None):
        self.y = y
        self.weights = np.linalg.pinv(X)  # coefficients = weights @ y
        self.coef = self.weights @ y
        residual = y - X @ self.coef
        self.df = int(len(y) - np.linalg.matrix_rank(X))
        self.residual_var = float(residual @ residual) / self.df
        # Per molecule, each trial's contribution to its value on this scale (centred per trial).
        self.contributions = contributions

    def seed_covariance(self, combinations: np.ndarray) -> np.ndarray:
        return self.residual_var * combinations @ combinations.T

    def molecule_covariance(self, combinations: np.ndarray) -> np.ndarray | None:
        """Covariance over molecule samples of ``combinations @ values``: each combination's value is
        a mean over molecules of ``combination @ contributions[:, i]``, so its covariance is the
        sample covariance of those per-molecule values over the number of molecules."""
        if self.contributions is None:
            return None
        per_molecule = combinations @ self.contributions
        return np.atleast_2d(np.cov(per_molecule, ddof=1)) / self.contributions.shape[1]

    def interval(self, combination: np.ndarray) -> dict[str, float]:
        """Estimate, 95% t interval and two-sided p of ``combination @ y``."""
        combination = combination[None, :]
        seed_var = float(self.seed_covariance(combination)[0, 0])
        molecule = self.molecule_covariance(combination)
        return _interval(float(combination[0] @ self.y), seed_var, self.df, None if molecule is None else float(molecule[0, 0]))

    def wald(self, combinations: np.ndarray) -> tuple[float, float, int, float]:
        """F statistic (Wald / q), its degrees of freedom and p, for all ``combinations @ y`` = 0.
        Without the molecule part this is the classical nested-model F test."""
        estimate = combinations @ self.y
        covariance = self.seed_covariance(combinations)
        molecule = self.molecule_covariance(combinations)
        if molecule is not None:
            covariance = covariance + molecule
        q = len(combinations)
        F = float(estimate @ np.linalg.solve(covariance, estimate)) / q
        return F, float(q), self.df, float(stats.f.sf(F, q, self.df))


def _interval(effect: float, seed_var: float, seed_df: int, molecule_var: float | None) -> dict[str, float]:
    """t interval and two-sided p for an effect with a seed-level variance (``seed_df`` degrees of
    freedom) and, if given, an independent molecule-sampling variance (many degrees of freedom)."""
    variance = seed_var + (molecule_var or 0.0)
    se = math.sqrt(variance) if variance > 0 else 0.0
    if molecule_var is None or molecule_var <= 0:
        df = float(seed_df)
    else:
        # Welch-Satterthwaite; the molecule part's degrees of freedom (molecules - 1) are taken as infinite.
        df = variance**2 / (seed_var**2 / seed_df) if seed_var > 0 else math.inf
    if se == 0 or not math.isfinite(effect):
        return {"estimate": effect, "se": se, "lo": effect, "hi": effect, "p": math.nan, "df": df, "se_seed": math.sqrt(seed_var)}
    half = float(stats.t.ppf(0.975, df)) * se
    p = float(2 * stats.t.sf(abs(effect) / se, df))
    return {"estimate": effect, "se": se, "lo": effect - half, "hi": effect + half, "p": p, "df": df, "se_seed": math.sqrt(seed_var)}


def _term_context(term: Sequence[int], design: FactorialDesign) -> str:
    """What a term measures, in words."""
    if len(term) == 1:
        others = [f"l{l}" for l in design.factors if l != term[0]]
        return f"averaged over the {2 ** len(others)} settings of {', '.join(others)}" if others else "the one context"
    if len(term) == 2:
        return f"change in l{term[0]}'s effect when l{term[1]} is in"
    return f"change in the {term_name(term[:-1])} interaction when l{term[-1]} is in"


def _scales(trials: pd.DataFrame, X: np.ndarray, metric: str, errors: np.ndarray | None) -> tuple[_Scale, _Scale]:
    """The fit on MAE (a trial's value is the mean of its per-molecule errors) and on log MAE
    (to first order, molecule i moves log MAE by error_i / MAE)."""
    y = trials[metric].to_numpy(dtype=np.float64)
    log_contributions = None if errors is None else errors / errors.mean(axis=1, keepdims=True)
    return _Scale(X, y, errors), _Scale(X, np.log(y), log_contributions)


def factorial_effects(
    trials: pd.DataFrame, design: FactorialDesign, metric: str = TEST_MAE, errors: np.ndarray | None = None
) -> pd.DataFrame:
    """Main effects, interactions, simple effects and the additive model's lack of fit.

    ``trials``: one row per completed trial (``l_values``, ``metric``); ``errors``: optional
    [trials, molecules] absolute errors in meV on one shared test set (rows in the order of
    ``trials``), whose row means are ``metric``. Rows as FACTORIAL_COLUMNS."""
    trials = trials.reset_index(drop=True)
    if errors is not None:
        errors = np.asarray(errors, dtype=np.float64)
        if errors.ndim != 2 or errors.shape[0] != len(trials) or not np.isfinite(errors).all():
            raise ValueError(f"per-molecule errors must be finite, one row per trial: got shape {errors.shape} for {len(trials)} trials")
    terms = _terms(design.factors)
    X = _model_matrix(_coded(trials, design), terms, len(trials))
    meV, log = _scales(trials, X, metric, errors)
    base = {
        "method": METHOD,
        "model": f"{design.describe()}; {MODEL}",
        "n_trials": len(trials),
        "interval": CONDITIONAL if errors is None else WITH_MOLECULES,
    }
    rows = [
        _row(
            base,
            kind="main" if len(term) == 1 else "interaction",
            term=term_name(term),
            l=term[0] if len(term) == 1 else math.nan,
            context=_term_context(term, design),
            meV=meV.interval(meV.weights[k]),
            ratio=log.interval(log.weights[k]),
        )
        for k, term in enumerate(terms, start=1)
    ]
    finite = [row for row in rows if math.isfinite(row["p"])]
    for row, value in zip(finite, holm([row["p"] for row in finite])):
        row["p_holm"] = float(value)
    rows += _simple_effects(trials, design, base, meV, log)
    rows += _lack_of_fit(terms, base, meV, log, errors is not None)
    return pd.DataFrame(rows, columns=list(FACTORIAL_COLUMNS))


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error). statsmodels' multipletests gives the
    same numbers but runs a full garbage collection per call (70 ms), which dominated the
    calibration simulations."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    steps = (len(p) - np.arange(len(p))) * p[order]
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(steps))
    return adjusted


def _row(base: dict, kind: str, term: str, l, context: str, meV: dict, ratio: dict, note: str = "") -> dict:
    return {
        **base,
        "kind": kind,
        "term": term,
        "l": l,
        "context": context,
        "effect_meV": meV["estimate"],
        "lo_meV": meV["lo"],
        "hi_meV": meV["hi"],
        "se_meV": meV["se"],
        "se_seed_meV": meV["se_seed"],
        "ratio": math.exp(ratio["estimate"]),
        "ratio_lo": math.exp(ratio["lo"]),
        "ratio_hi": math.exp(ratio["hi"]),
        "p": meV["p"],
        "p_holm": math.nan,
        "df": meV["df"],
        "F": math.nan,
        "df_num": math.nan,
        "note": " ".join(part for part in (note, f"ratio p {_p_text(ratio['p'])}" if math.isfinite(ratio["p"]) else "") if part),
    }


def _simple_effects(trials: pd.DataFrame, design: FactorialDesign, base: dict, meV: _Scale, log: _Scale) -> list[dict]:
    """Adding each factor to each setting of the others: the difference of two cell means, with the
    saturated model's seed-level variance (and the molecule part when errors are given)."""
    cells = [design.cell(v) for v in trials["l_values"]]
    rows = []
    for position, l in enumerate(design.factors):
        for setting in itertools.product((False, True), repeat=len(design.factors) - 1):
            without_cell = (*setting[:position], False, *setting[position:])
            with_cell = (*setting[:position], True, *setting[position:])
            with_l = np.array([cell == with_cell for cell in cells], dtype=np.float64)
            without = np.array([cell == without_cell for cell in cells], dtype=np.float64)
            combination = with_l / with_l.sum() - without / without.sum()
            rows.append(
                _row(
                    base,
                    kind="simple",
                    term=f"l{l}",
                    l=l,
                    context=design.l_set(without_cell),
                    meV=meV.interval(combination),
                    ratio=log.interval(combination),
                    note="unadjusted; adding l to this l set",
                )
            )
    return rows


def _lack_of_fit(terms: Sequence[tuple[int, ...]], base: dict, meV: _Scale, log: _Scale, with_molecules: bool) -> list[dict]:
    """The additive model (main effects only) against the saturated one: an F test that every
    interaction is zero, per scale."""
    interactions = [k for k, term in enumerate(terms, start=1) if len(term) > 1]
    if not interactions:
        return []
    rows = []
    for scale, name in ((meV, "test MAE (meV)"), (log, "log test MAE")):
        F, df_num, df, p = scale.wald(scale.weights[interactions])
        nan = {"estimate": math.nan, "lo": math.nan, "hi": math.nan, "se": math.nan, "se_seed": math.nan, "p": p, "df": df}
        row = _row(
            base,
            kind="lack_of_fit",
            term="additive model",
            l=math.nan,
            context=f"main effects only vs every interaction, on {name}",
            meV=nan,
            ratio=nan,
            note="small p: the orders' effects do not add up",
        )
        row.update(
            F=F,
            df_num=df_num,
            ratio=math.nan,
            ratio_lo=math.nan,
            ratio_hi=math.nan,
            interval=(
                "Wald F on the seed residual + test-molecule sampling"
                if with_molecules
                else "F test on the seed residual: conditional on this test set"
            ),
        )
        rows.append(row)
    return rows


def family(table: pd.DataFrame) -> pd.DataFrame:
    """The rows Holm adjusts together: the main effects and interactions."""
    return table[table["kind"].isin(["main", "interaction"])]


def factorial_sentences(table: pd.DataFrame) -> list[str]:
    """The headline of a factorial study (a table from :func:`factorial_effects`): the model, each
    main effect and interaction with its intervals (meV and ratio) and Holm-adjusted p, then the
    lack of fit of the additive model."""
    terms = family(table)
    if terms.empty:
        return []
    n_cells = 2 ** int((terms["kind"] == "main").sum())
    residual_df = int(terms["n_trials"].iloc[0]) - n_cells
    conditional = (terms["interval"] == CONDITIONAL).all()
    sentences = [
        f"The l sets form a {terms['model'].iloc[0].split(';')[0]}; analysed with the model the design implies "
        f"({MODEL}; {residual_df} residual degrees of freedom over {n_cells} cells). 95% intervals are "
        + (
            "conditional on this test set (no per-molecule errors given)"
            if conditional
            else "from the seed residual plus the sampling of the test molecules (paired)"
        )
        + f" and unadjusted; p values are Holm-adjusted over the {len(terms)} terms."
    ]
    for row in terms.itertuples():
        what = f"including l={int(row.l)} changed test MAE by" if row.kind == "main" else f"the interaction {row.term} ({row.context}) is"
        sentences.append(
            f"{what} {row.effect_meV:+.1f} meV [{row.lo_meV:+.1f}, {row.hi_meV:+.1f}], ratio {row.ratio:.3f} "
            f"[{row.ratio_lo:.3f}, {row.ratio_hi:.3f}] (Holm p {_p_text(row.p_holm)})"
            + (f", {row.context}" if row.kind == "main" else "")
            + "."
        )
    for row in table[table["kind"] == "lack_of_fit"].itertuples():
        verdict = "the effects do not add up" if row.p < 0.05 else "no evidence that they do not add up"
        sentences.append(
            f"Additive model ({row.context.split(', on ')[1]}): lack of fit F({int(row.df_num)}, {int(row.df)}) = "
            f"{row.F:.1f}, p {_p_text(row.p)}: {verdict}."
        )
    return sentences


def _p_text(p: float) -> str:
    """A p value as a reader quotes it: two significant digits, no exponent (below 1e-4: "< 0.0001")."""
    if not math.isfinite(p):
        return "n/a"
    if p < 1e-4:
        return "< 0.0001"
    return "= " + np.format_float_positional(p, precision=2, unique=False, fractional=False, trim="-")
