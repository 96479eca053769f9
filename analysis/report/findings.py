"""What the study found, said first: the report's opening section.

- Parameter importance of every parameter the study varied, over all its configurations (early
  stopped ones included, at the epoch where they stopped: what the searcher saw), from Optuna's
  own fANOVA evaluator. The trials are rebuilt as an in-memory Optuna study from the MLflow runs,
  so a grid sweep, several sweeps of one experiment, and an Optuna sweep are treated alike: one
  Optuna trial per configuration (seeds are replicates), valued at the mean over its seeds of the
  last validation MAE each seed logged. An l set enters as one inclusion flag per l that varies
  (`include_l1`, ...), the contrast the study asks about. Optuna's stock plots (optimisation
  history, parallel coordinates, slice, importance) are drawn from the same study.
- The accuracy-size trade-off: the Pareto front of configurations on mean validation MAE (chosen
  on validation, never test) and parameter count, each configuration marked by its l set.
- Sentences: the ablation effects, the most important parameter, the best configuration on
  validation beside its test MAE and the composition fit's, then, as two separate families, what
  is significant among the correlations after their false-discovery correction and which ablation
  effects are clear (Holm-adjusted for a factorial, marked unadjusted otherwise).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.stats.configurations import includes, l_orders
from study.names import VAL_MAE

# A correlation counts as significant (findings, the analysis run's summary) when its q is below.
SIGNIFICANCE = 0.05

VALUE = VAL_MAE  # the last validation MAE each run logged: early-stopped runs have one too
SIZE = "num_params"


# ---------------------------------------------------------------------------- Optuna's view


def _distribution(values: pd.Series):
    import optuna

    if values.dtype == bool:
        return optuna.distributions.CategoricalDistribution([False, True])
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().all():
        low, high = float(numeric.min()), float(numeric.max())
        if (numeric == numeric.round()).all() and abs(high) < 2**31:
            return optuna.distributions.IntDistribution(int(low), int(high))
        # A range spanning a decade or more (a learning rate) is searched, and read, on a log scale.
        return optuna.distributions.FloatDistribution(low, high, log=low > 0 and high / low >= 10)
    return optuna.distributions.CategoricalDistribution(sorted(values.astype(str).unique()))


def configuration_values(runs: pd.DataFrame, context: list[str]) -> tuple[pd.DataFrame, int]:
    """Per configuration of `runs` (every trial run, any status): the parameters that vary
    (l inclusion flags first), the number of seeds with a value, and the mean of their last
    validation MAE. Also the number of configurations without any finite value (diverged or
    failed in every seed), which Optuna's evaluators cannot take."""
    varying_l = [l for l in l_orders(runs["l_values"]) if runs["l_values"].map(lambda v, l=l: includes(v, l)).nunique() > 1]
    rows = []
    for configuration, group in runs.groupby("configuration", sort=False):
        first = group.iloc[0]
        row = {"configuration": configuration}
        row.update({f"include_l{l}": includes(first["l_values"], l) for l in varying_l})
        row.update({name: first[name] for name in context})
        values = group[VALUE].dropna() if VALUE in group else pd.Series(dtype=float)
        row["n_seeds"] = len(values)
        row[VALUE] = float(values.mean()) if len(values) else math.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table, 0
    missing = int(table[VALUE].isna().sum())
    return table.dropna(subset=[VALUE]).reset_index(drop=True), missing


def importance_study(values: pd.DataFrame):
    """An in-memory Optuna study with one trial per configuration, in the order they ran."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", study_name="irrep-study configurations")
    parameters = [c for c in values.columns if c not in ("configuration", "n_seeds", VALUE)]
    parameters = [c for c in parameters if values[c].nunique() > 1]
    distributions = {name: _distribution(values[name]) for name in parameters}
    for row in values.itertuples(index=False):
        record = row._asdict()
        params = {}
        for name, distribution in distributions.items():
            value = record[name]
            if isinstance(distribution, optuna.distributions.CategoricalDistribution):
                params[name] = bool(value) if distribution.choices == (False, True) else str(value)
            elif isinstance(distribution, optuna.distributions.IntDistribution):
                params[name] = int(value)
            else:
                params[name] = float(value)
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions=distributions,
                value=record[VALUE],
                user_attrs={"configuration": record["configuration"], "n_seeds": record["n_seeds"]},
            )
        )
    return study


FOREST_SEEDS = 5  # fANOVA fits a random forest: the importances are given over this many forest seeds


def parameter_importance(study) -> pd.DataFrame:
    """Optuna's fANOVA importance of each varied parameter for the validation MAE: mean, min and
    max over `FOREST_SEEDS` random-forest seeds, and in how many of them it ranked first. With
    few configurations the forest is unstable (on the quick study's 10, the first parameter
    changed with the seed), so one seed's ranking is not reported as a finding. Sorted by mean;
    empty below 2 configurations or with nothing varied."""
    import optuna

    columns = ["parameter", "importance", "importance_min", "importance_max", "first_in_seeds"]
    if len(study.trials) < 2 or not study.trials[0].params:
        return pd.DataFrame(columns=columns)
    runs = [
        optuna.importance.get_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed))
        for seed in range(FOREST_SEEDS)
    ]
    firsts = [max(run, key=run.get) for run in runs]
    rows = [
        {
            "parameter": name,
            "importance": float(np.mean([run[name] for run in runs])),
            "importance_min": float(min(run[name] for run in runs)),
            "importance_max": float(max(run[name] for run in runs)),
            "first_in_seeds": firsts.count(name),
        }
        for name in runs[0]
    ]
    return pd.DataFrame(rows, columns=columns).sort_values("importance", ascending=False, kind="stable").reset_index(drop=True)


def importance_figure(importance: pd.DataFrame, path: Path) -> Path | None:
    """The importance table as the findings' sentence reads it: per parameter the mean over the
    forest seeds as a bar, their min to max as a whisker, and in how many seeds it came first."""
    if importance.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = importance.iloc[::-1]  # most important on top
    y = np.arange(len(rows))
    mean = rows["importance"].to_numpy()
    whiskers = np.vstack([mean - rows["importance_min"].to_numpy(), rows["importance_max"].to_numpy() - mean])
    figure, axis = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.6))
    axis.barh(y, mean, color="#4c78a8", xerr=whiskers, capsize=4, error_kw={"ecolor": "#333333"})
    for k, row in enumerate(rows.itertuples()):
        axis.text(
            row.importance_max + 0.01, k, f"{row.importance:.2f}; first in {row.first_in_seeds} of {FOREST_SEEDS}", va="center", fontsize=9
        )
    axis.set_yticks(y, rows["parameter"])
    axis.set_xlim(0, min(1.0, float(rows["importance_max"].max()) + 0.3))
    axis.set_xlabel(f"fANOVA importance for validation MAE (mean; whiskers: min to max over {FOREST_SEEDS} forest seeds)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def optuna_figures(study, out_dir: Path) -> dict[str, tuple[Path, str]]:
    """Optuna's stock matplotlib plots of the configurations' study, each where it has something to show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as optuna_plots

    if len(study.trials) < 2 or not study.trials[0].params:
        return {}
    drawn = {
        "optuna_history": (
            lambda: optuna_plots.plot_optimization_history(study, target_name="val MAE (meV)"),
            "Optuna: optimisation history (each configuration's mean validation MAE over its seeds, in the order run).",
        ),
        "optuna_importance": (
            lambda: optuna_plots.plot_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), target_name="val MAE (meV)"
            ),
            "Optuna: fANOVA importance of each varied parameter for the validation MAE, one forest seed (the "
            "findings' table gives the range over several).",
        ),
        "optuna_parallel": (
            lambda: optuna_plots.plot_parallel_coordinate(study, target_name="val MAE (meV)"),
            "Optuna: parallel coordinates of the varied parameters, coloured by validation MAE.",
        ),
        "optuna_slice": (
            lambda: optuna_plots.plot_slice(study, target_name="val MAE (meV)"),
            "Optuna: validation MAE against each varied parameter.",
        ),
    }
    figures = {}
    for name, (draw, caption) in drawn.items():
        path = Path(out_dir) / f"{name}.png"
        # Optuna's plots switch matplotlib to its ggplot style for good: rc_context puts ours back after.
        with warnings.catch_warnings(), matplotlib.rc_context():
            # Optuna marks its matplotlib plots experimental; its colour bars make tight_layout warn.
            warnings.simplefilter("ignore")
            axes = draw()
            figure = np.ravel(axes)[0].get_figure() if isinstance(axes, np.ndarray) else axes.get_figure()
            figure.set_size_inches(max(figure.get_size_inches()[0], 7), max(figure.get_size_inches()[1], 4.5))
            figure.tight_layout()
            figure.savefig(path, dpi=110)
        plt.close(figure)
        figures[name] = (path, caption)
    return figures


# ---------------------------------------------------------------------------- accuracy vs size


def pareto_front(configurations: pd.DataFrame) -> pd.DataFrame:
    """Configurations with a mean validation MAE and a size, `on_front` where no other is at least
    as good on both and better on one; sorted by size."""
    table = configurations.dropna(subset=["best_val_mae_meV_mean", "num_params"]).copy()
    table = table.sort_values(["num_params", "best_val_mae_meV_mean"], kind="stable").reset_index(drop=True)
    on_front, best = [], math.inf
    for value in table["best_val_mae_meV_mean"]:
        on_front.append(value < best)  # sorted by size: on the front when it beats every smaller one
        best = min(best, value)
    table["on_front"] = on_front
    return table


def pareto_figure(front: pd.DataFrame, path: Path) -> Path | None:
    """Mean validation MAE (with seed sd) against parameters, the front as a step line, every
    configuration marked by its largest l and the front's points labelled by their l set."""
    if len(front) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analysis.report.plots import l_colour, largest_l, plain_log_axis

    lmax = front["l_values"].map(largest_l)
    figure, axes = plt.subplots(figsize=(7.5, 4.8))
    for value in sorted(lmax.unique()):
        chosen = front[lmax == value]
        # The colour of the largest l is the same in every figure of the report (plots.l_colour).
        axes.errorbar(
            chosen["num_params"],
            chosen["best_val_mae_meV_mean"],
            yerr=chosen["best_val_mae_meV_sd"].fillna(0),
            fmt="o",
            color=l_colour(value),
            label=f"largest l = {value}",
            capsize=2,
            alpha=0.85,
        )
    on = front[front["on_front"]]
    axes.step(on["num_params"], on["best_val_mae_meV_mean"], where="post", color="#c62828", lw=1.2, label="Pareto front")
    for row in on.itertuples():
        axes.annotate(
            f"l={row.l_values}", (row.num_params, row.best_val_mae_meV_mean), textcoords="offset points", xytext=(4, 4), fontsize=7
        )
    axes.set_xscale("log")
    plain_log_axis(axes.xaxis)
    axes.set_xlabel("parameters")
    axes.set_ylabel("validation MAE (meV), mean over seeds")
    axes.set_title("Accuracy against size: each configuration, the Pareto front in red")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


# ---------------------------------------------------------------------------- sentences


def tested_correlations(correlations: pd.DataFrame) -> pd.DataFrame:
    """The score-error correlations that were tested: those with a Benjamini-Hochberg q (a score
    without a finite rho, e.g. one that does not vary, has none)."""
    if correlations.empty or "q_rho" not in correlations:
        return correlations.iloc[0:0]
    return correlations[pd.to_numeric(correlations["q_rho"], errors="coerce").notna()]


def significant_correlations(correlations: pd.DataFrame, level: float) -> pd.DataFrame:
    """The tested correlations significant after correction: q below `level`."""
    tested = tested_correlations(correlations)
    return tested[tested["q_rho"].astype(float) < level]


def clear_ablation_effects(estimates: dict[int, tuple[str, pd.Series]]) -> dict[int, tuple[str, pd.Series]]:
    """The headline estimates whose 95% interval excludes zero."""
    return {
        l: (method, row)
        for l, (method, row) in estimates.items()
        if math.isfinite(row["lo_meV"]) and (row["lo_meV"] > 0 or row["hi_meV"] < 0)
    }


def finding_sentences(
    ablation_sentences: list[str],
    estimates: dict[int, tuple[str, pd.Series]],
    importance: pd.DataFrame,
    importance_n: int,
    configurations: pd.DataFrame,
    correlations: pd.DataFrame,
    level: float,
    factorial_terms: pd.DataFrame | None = None,
) -> list[str]:
    """The findings, in the order a reader asks: what the l orders do, what mattered, who won, what
    holds. Corrected correlations and ablation effects are separate sentences, each with its own
    correction: they are different families of tests. ``factorial_terms``: the main-effect and
    interaction rows of a factorial study's table (their Holm p), None otherwise."""
    sentences = [s[0].upper() + s[1:] for s in ablation_sentences] or [
        "No l is in some configurations and not in others: the study has no ablation contrast."
    ]
    if len(importance) == 1:
        sentences.append(
            f"One parameter varied: {importance.iloc[0]['parameter']} (importance 1 by construction, over {importance_n} configurations)."
        )
    elif len(importance) > 1:
        top = importance.iloc[0]
        others = ", ".join(f"{r.parameter} {r.importance:.2f}" for r in importance.iloc[1:].itertuples())
        if int(top["first_in_seeds"]) == FOREST_SEEDS:
            sentences.append(
                f"Of the {len(importance)} varied parameters, {top['parameter']} explains most of the validation MAE across "
                f"{importance_n} configurations (Optuna fANOVA importance {top['importance']:.2f}, "
                f"{top['importance_min']:.2f}-{top['importance_max']:.2f} over {FOREST_SEEDS} forest seeds; {others})."
            )
        else:
            counted = ", ".join(f"{r.parameter} in {int(r.first_in_seeds)}" for r in importance.itertuples() if r.first_in_seeds)
            sentences.append(
                f"No varied parameter consistently explains most of the validation MAE across {importance_n} configurations: "
                f"the first one changes with fANOVA's forest seed (first {counted} of {FOREST_SEEDS} seeds); "
                f"mean importances {top['parameter']} {top['importance']:.2f}, {others}."
            )
    ranked = configurations.dropna(subset=["best_val_mae_meV_mean"]).sort_values("best_val_mae_meV_mean", kind="stable")
    if len(ranked):
        best = ranked.iloc[0]
        versus = ""
        if math.isfinite(best.get("baseline_test_mae_meV_mean", math.nan)):
            versus = (
                f" against {best['baseline_test_mae_meV_mean']:.1f} meV for the composition fit "
                f"({best['test_mae_meV_mean'] / best['baseline_test_mae_meV_mean']:.2f} x)"
            )
        sentences.append(
            f"Best on validation: {best['configuration']} (val MAE {best['best_val_mae_meV_mean']:.1f} meV over "
            f"{int(best['n_completed'])} seed(s)); its test MAE {best['test_mae_meV_mean']:.1f} meV{versus}."
        )
    sentences.append(correlation_sentence(correlations, level))
    sentences.append(ablation_significance_sentence(estimates, factorial_terms))
    return sentences


def correlation_sentence(correlations: pd.DataFrame, level: float) -> str:
    """What holds among the score-error correlations after their false-discovery correction, and
    how many rows could not enter it (too few configurations to ever reach significance)."""
    tested = len(tested_correlations(correlations))
    significant = significant_correlations(correlations, level)
    method = "Benjamini-Hochberg"
    if "fdr_method" in correlations and correlations["fdr_method"].notna().any():
        method = {"bh": "Benjamini-Hochberg", "by": "Benjamini-Yekutieli"}.get(str(correlations["fdr_method"].dropna().iloc[0]), method)
    left_out = ""
    if "in_fdr_family" in correlations:
        outside = int((~correlations["in_fdr_family"].astype(bool) & correlations["p_rho"].notna()).sum())
        if outside:
            left_out = f"; {outside} more with too few configurations to reach p < {level:g} by permutation were left out of the correction"
    if significant.empty:
        return f"Correlations: no score correlates with test MAE at {method} q < {level:g} ({tested} tested{left_out})."
    return (
        f"Correlations: {len(significant)} of {tested} score-error correlations are significant after {method} "
        f"correction (q < {level:g}{left_out}): "
        + ", ".join(f"{r.block}/{r.score} (rho {r.rho:+.2f})" for r in significant.itertuples())
        + "."
    )


def ablation_significance_sentence(estimates: dict[int, tuple[str, pd.Series]], factorial_terms: pd.DataFrame | None) -> str:
    """Which ablation effects are clear, said apart from the correlations and with their own
    multiplicity: Holm-adjusted over a factorial's terms, else marked unadjusted."""
    if factorial_terms is not None and len(factorial_terms):
        clear = factorial_terms[factorial_terms["p_holm"] < 0.05]
        if clear.empty:
            return (
                f"Ablation: no factorial term has Holm-adjusted p < 0.05 (over its {len(factorial_terms)} main effects and interactions)."
            )
        return (
            f"Ablation: {len(clear)} of {len(factorial_terms)} factorial terms have Holm-adjusted p < 0.05: "
            + ", ".join(clear["term"])
            + "."
        )
    clear = clear_ablation_effects(estimates)
    if not estimates:
        return "Ablation: no effect of an l could be estimated."
    if not clear:
        return f"Ablation: no effect's 95% interval excludes zero (per l, unadjusted for the {len(estimates)} orders tested)."
    return (
        "Ablation: effects whose 95% interval excludes zero (per l, not adjusted for the "
        f"{len(estimates)} orders tested): " + ", ".join(f"l={l} ({method})" for l, (method, _) in sorted(clear.items())) + "."
    )


def configuration_errors(configurations: pd.DataFrame) -> pd.DataFrame:
    """Mean +/- sd of validation and test MAE per configuration with n, ranked on validation."""
    table = configurations.dropna(subset=["best_val_mae_meV_mean"]).sort_values("best_val_mae_meV_mean", kind="stable")

    def shown(mean, sd) -> str:
        return f"{mean:.1f} ± {sd:.1f}" if math.isfinite(sd) else f"{mean:.1f}"

    return pd.DataFrame(
        {
            "configuration": table["configuration"],
            "n": table["n_completed"].astype(int),
            "val MAE (meV)": [shown(m, s) for m, s in zip(table["best_val_mae_meV_mean"], table["best_val_mae_meV_sd"])],
            "test MAE (meV)": [shown(m, s) for m, s in zip(table["test_mae_meV_mean"], table["test_mae_meV_sd"])],
            "composition fit (meV)": table["baseline_test_mae_meV_mean"],
            "test / fit": table["test_over_baseline_mean"],
        }
    )
