"""The report's content, in one place: the findings with the figures that support them
(`gather_findings`), every figure with its caption (`draw_figures`), and the sections of tables
with their captions (`report_sections`). Numbers and column names are formatted by `format`, the
page is assembled by `page`; the sentences themselves are built by `findings`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from analysis.report.findings import SIGNIFICANCE

if TYPE_CHECKING:
    from analysis.pipeline import StudyTables

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis.report import findings as found
from analysis.report import plots
from analysis.report.page import Figure, Finding, Section, Table
from analysis.stats.ablation import (
    factorial_terms,
    headline,
    headline_estimates,
    is_factorial,
)
from study.names import BASELINE_TEST_MAE, BEST_VAL_MAE, TEST_MAE


@dataclass
class Findings:
    sentences: list[str]
    groups: list[tuple[str, list[str]]]  # (name of the supporting figure, sentences), in the sentences' order
    importance: pd.DataFrame
    importance_n: int  # configurations Optuna's evaluator saw
    unvalued: int  # configurations without any finite validation MAE, left out of the importance
    ranked: pd.DataFrame  # configurations with a completed seed, ranked on mean validation MAE
    pareto: pd.DataFrame
    figures: dict[str, tuple[Path, str]]

    def sections(self, figures: dict[str, Figure]) -> list[Section]:
        """The report's first two sections: the findings, each beside the figure that supports it,
        then Optuna's stock plots of the search. ``figures``: every figure of the report, by name."""
        left_out = (
            f" {self.unvalued} configuration(s) without any finite validation MAE (diverged or failed in every "
            "seed) are left out of the importance."
            if self.unvalued
            else ""
        )
        front = self.pareto[self.pareto["on_front"]] if len(self.pareto) else self.pareto
        pareto_columns = [
            c
            for c in (
                "configuration",
                "l_values",
                "num_params",
                "best_val_mae_meV_mean",
                "best_val_mae_meV_sd",
                "n_completed",
                "test_mae_meV_mean",
            )
            if c in front.columns
        ]
        ranked_columns = [
            c
            for c in (
                "configuration",
                "n_completed",
                "best_val_mae_meV_mean",
                "best_val_mae_meV_sd",
                "test_mae_meV_mean",
                "test_mae_meV_sd",
                "baseline_test_mae_meV_mean",
                "test_over_baseline_mean",
                "test_over_baseline_sd",
            )
            if c in self.ranked.columns
        ]
        return [
            Section(
                "findings",
                "Findings",
                "Findings",
                note="Parameter importance: Optuna's fANOVA over every configuration of the study "
                f"({self.importance_n}), early-stopped ones at the epoch where they stopped, valued at the mean over "
                f"seeds of the last validation MAE; mean, min and max over {found.FOREST_SEEDS} random-forest seeds and "
                "how often each parameter came first; include_l<k>: whether the l set holds k."
                + left_out
                + " Pareto front: configurations no other beats on both mean validation MAE and parameter count.",
                findings=[Finding(sentences, figures.get(name)) for name, sentences in self.groups],
                # Beside the figures of accuracy and cost, those of the findings that no sentence came with.
                figures=[
                    figures[name]
                    for name in ("configuration_errors", "importance", "accuracy_vs_cost", "pareto")
                    if name in figures and name not in dict(self.groups)
                ],
                tables=[
                    Table(
                        "importance",
                        self.importance,
                        f"One row per varied parameter: its importance for the "
                        f"validation MAE over {self.importance_n} configurations, most important first.",
                        "importance.csv",
                    ),
                    Table(
                        "findings_configurations",
                        self.ranked[ranked_columns],
                        "One row per configuration with a "
                        "completed seed, ranked on mean validation MAE; its test MAE beside the composition fit's.",
                        "configurations.csv",
                    ),
                    Table(
                        "pareto_front",
                        front[pareto_columns],
                        "One row per configuration on the Pareto front of mean validation MAE against parameters, smallest first.",
                        "pareto.csv",
                    ),
                ],
            ),
            Section(
                "search",
                "The search as Optuna sees it",
                "Optuna's view",
                note="Optuna's stock plots of the same configurations (one Optuna trial per configuration, valued at "
                "the mean over seeds of the last validation MAE).",
                figures=[
                    figures[name] for name in ("optuna_history", "optuna_importance", "optuna_parallel", "optuna_slice") if name in figures
                ],
            ),
        ]


def _finding_groups(sentences: list[str], n_ablation: int) -> list[tuple[str, list[str]]]:
    """The findings' sentences with the figure that supports each, in their order. finding_sentences
    says, in this order: what each l does (``n_ablation`` sentences: the forest plot), which
    parameter mattered (fANOVA importance), which configuration won on validation (the errors per
    configuration), then what holds among the correlations (score vs error) and among the
    ablation effects (the forest plot again)."""
    groups = [("ablation_effects", sentences[:n_ablation])]
    for sentence in sentences[n_ablation:-2]:
        groups.append(("configuration_errors" if sentence.startswith("Best on validation") else "importance", [sentence]))
    return [*groups, ("score_vs_error", [sentences[-2]]), ("ablation_effects", [sentences[-1]])]


def gather_findings(runs: pd.DataFrame, context: list[str], tables: StudyTables, out_dir: Path) -> Findings:
    """The answer first: importance over every configuration, errors per configuration, the front."""
    values, unvalued = found.configuration_values(runs, context)
    study = found.importance_study(values)
    importance = found.parameter_importance(study)
    figures = found.optuna_figures(study, out_dir)
    path = found.importance_figure(importance, out_dir / "importance.png")
    if path:
        figures["importance"] = (
            path,
            f"Importance of each varied parameter for the validation MAE: mean over {found.FOREST_SEEDS} fANOVA forest "
            "seeds (bars), their range (whiskers) and how often it came first: the numbers the finding quotes.",
        )
    sizes = tables.trials.groupby("configuration", sort=False)[["l_values", "num_params"]].first()
    pareto = found.pareto_front(tables.configurations.join(sizes, on="configuration"))
    path = found.pareto_figure(pareto, out_dir / "pareto.png")
    if path:
        figures["pareto"] = (
            path,
            "Mean validation MAE (seed sd as bars) against parameters per configuration, marked by its "
            "largest l; red: the Pareto front, labelled with the l sets.",
        )
    terms = factorial_terms(tables.ablation)
    ablation_sentences = headline(tables.ablation)
    sentences = found.finding_sentences(
        ablation_sentences,
        headline_estimates(tables.ablation),
        importance,
        len(values),
        tables.configurations,
        tables.correlations,
        SIGNIFICANCE,
        terms,
    )
    # Without an ablation contrast finding_sentences says so in one sentence.
    groups = _finding_groups(sentences, max(len(ablation_sentences), 1))
    ranked = tables.configurations.dropna(subset=["best_val_mae_meV_mean"]).sort_values("best_val_mae_meV_mean", kind="stable")
    return Findings(sentences, groups, importance, len(values), unvalued, ranked, pareto, figures)


# The study-level figures `analyze` can write (each only when there is something to show), beside
# the UMAP grids of single trials (umap_*.png). results/ folders publish a subset of them.
STUDY_FIGURES = (
    "pareto.png",
    "importance.png",
    "optuna_importance.png",
    "optuna_history.png",
    "optuna_parallel.png",
    "optuna_slice.png",
    "ablation_effects.png",
    "correlation_heatmap.png",
    "score_vs_error.png",
    "norm_share_by_epoch.png",
    "configuration_errors.png",
    "accuracy_vs_cost.png",
)


def draw_figures(out_dir, trials, trial_table, scores, correlations, ablation) -> dict[str, tuple[Path, str]]:
    figures: dict[str, tuple[Path, str]] = {}
    path = plots.configuration_errors_figure(trial_table, out_dir / "configuration_errors.png")
    if path:
        figures["configuration_errors"] = (
            path,
            "Test MAE per configuration: the mean over seeds (bars: seed-to-seed sd; open dots: the seeds), ranked on "
            "mean validation MAE with the best at the top, coloured by the configuration's largest l; dashed: the "
            "composition fit's test MAE (band: its range, where the trials' test splits differ). '(not every seed)': "
            "left out of the comparisons.",
        )
    path = plots.cost_figure(trial_table, out_dir / "accuracy_vs_cost.png")
    if path:
        figures["accuracy_vs_cost"] = (
            path,
            "Accuracy against cost: mean test MAE over seeds (bars: seed sd) against parameters and against seconds "
            "per training epoch (validation included; bars: seed sd), log axes, one point per configuration coloured by "
            "its largest l; dashed: the composition fit's test MAE.",
        )
    path = plots.ablation_figure(ablation, out_dir / "ablation_effects.png")
    if path and is_factorial(ablation):
        figures["ablation_effects"] = (
            path,
            "Factorial effects with 95% intervals, on test MAE (left, meV) and as ratios "
            "(right, log scale): main effects and interactions, then each simple effect "
            "(adding l to one l set). " + ablation["interval"].iloc[0] + ".",
        )
    elif path:
        figures["ablation_effects"] = (
            path,
            "Change of test MAE when each l is included, with 95% intervals: paired "
            "comparisons, regression, and (grey, confounded) unpaired means.",
        )
    path = plots.heatmap_figure(correlations, out_dir / "correlation_heatmap.png")
    if path:
        figures["correlation_heatmap"] = (
            path,
            "Spearman rho of each score (row) of each block (column) with test MAE across configurations.",
        )
    path = plots.score_scatter_figure(
        scores[scores["configuration"].isin(trial_table.loc[trial_table["in_comparisons"], "configuration"])],
        correlations,
        out_dir / "score_vs_error.png",
    )
    if path:
        figures["score_vs_error"] = (
            path,
            "Strongest rank correlations: each score's value vs test MAE in meV, one point per "
            "configuration (means over seeds; bars: seed-to-seed sd of test MAE where it has more "
            "than one seed). Per panel: Spearman rho (with its 95% CI where there are enough configurations), "
            "its permutation p and the number of configurations n.",
        )
    # Lines are grouped by configuration (its seeds share a style), so the figure gets the configuration label.
    configuration = trial_table.set_index("run_id")["configuration"]
    path = plots.norm_share_figure(
        [(configuration[t.run_id], t.test_mae_meV, t.history) for t in trials], out_dir / "norm_share_by_epoch.png"
    )
    if path:
        figures["norm_share_by_epoch"] = (
            path,
            "Share of the validation embeddings' squared norm per l, by epoch (logged during "
            "training), one line per trial; the seeds of a configuration share a colour and line "
            "style, configurations ranked by mean test MAE (dark: best), named in the legend with it "
            f"(past {plots.NORM_SHARE_LEGEND_MAX} configurations, only the "
            f"{plots.NORM_SHARE_LEGEND_ENDS} best and worst).",
        )
    return figures


def report_sections(
    trial_table, configurations, scores, correlations, ablation, within_table, figures: dict[str, Figure], notes, summary: dict[str, str]
) -> list[Section]:
    """The report's sections after the findings. ``figures``: every figure of the report by name
    (one the findings already show is a link back to it)."""
    summary_table = (
        scores.groupby(["block", "score"])
        .agg(
            mean=("value", "mean"),
            std=("value", "std"),
            min=("value", "min"),
            max=("value", "max"),
            n_configurations=("configuration", "nunique"),
            n_trials=("value", "count"),
        )
        .reset_index()
    )
    rank = {name: k for k, name in enumerate(plots.block_order(summary_table["block"]))}
    summary_table = summary_table.sort_values(["block", "score"], key=lambda col: col.map(rank) if col.name == "block" else col)
    ranked = correlations.reindex(correlations["p_rho"].sort_values(kind="stable", na_position="last").index)
    within_wide = per_trial_descriptor_table(within_table)
    umaps = [figures[name] for name in figures if name.startswith("umap_")]
    shown = [figures[name] for name in ("score_vs_error", "correlation_heatmap", "norm_share_by_epoch") if name in figures]
    return [
        _ablation_section(ablation, figures.get("ablation_effects")),
        Section(
            "configurations",
            "Configurations and survivorship",
            "Configurations",
            note="Per configuration (every parameter but the seed): its trials and how many completed; mean and "
            "seed-to-seed sd of test and best validation MAE; the composition fit's test MAE and the model's MAE as a "
            "fraction of it (below 1: the model beats counting atoms). 'All seeds completed': the configuration enters "
            "the comparisons. " + ("What did not complete is summarised in the box above." if notes else "Every trial completed."),
            tables=[
                Table(
                    "configurations",
                    configurations,
                    "One row per configuration (every parameter but the seed), best mean test MAE first.",
                    "configurations.csv",
                )
            ],
        ),
        Section(
            "trials",
            "Trials",
            "Trials",
            note="Completed trials, as logged, with the composition fit's test MAE beside each model's; 'in comparisons': "
            "the configuration's seeds all completed. The knockout columns: the model's and the composition fit's MAE "
            "on the molecules the knockouts were measured on.",
            tables=[Table("trials", trial_table, "One row per completed trial (one seed of a configuration).", "trials.csv")],
        ),
        Section(
            "correlations",
            "Scores vs test error",
            "Scores vs error",
            note="Spearman rho and Kendall tau of each score with test MAE across configurations (means over seeds), 95% "
            "bootstrap CIs over configurations, permutation p-values, partial rho given the named covariates that vary "
            "(and with the parameter count added), a mixed model (random intercept per configuration) as a second "
            "opinion where seeds exist, and the false-discovery-rate q. The seed-to-seed share: of the score's variance. "
            "The l0 and joint knockouts are left out: they are determined by the test MAE itself. Sorted by p. Few "
            "configurations give wide intervals: read them.",
            figures=shown,
            tables=[
                Table(
                    "correlations",
                    ranked,
                    "One row per block and score: its correlation with test MAE across configurations, smallest p first.",
                    "correlations.csv",
                )
            ],
        ),
        Section(
            "scores",
            "Scores per block",
            "Scores per block",
            note="Mean, spread and range of every score across trials (scores.csv has every value; "
            "configuration_scores.csv the mean and seed-to-seed sd per configuration).",
            tables=[
                Table(
                    "score_summary", summary_table, "One row per block and score: its distribution over the analysed trials.", "scores.csv"
                )
            ],
        ),
        Section(
            "descriptors",
            "Per-molecule error vs descriptors",
            "Error vs descriptors",
            note="Spearman rho of |error| with each RDKit descriptor, within each trial (within_trial.csv has p and n).",
            tables=[
                Table(
                    "within_trial",
                    within_wide,
                    "One row per trial: the rank correlation of its per-molecule |error| with each descriptor (a column each).",
                    "within_trial.csv",
                    kinds={"*": "ratio"},
                )
            ],
        ),
        Section(
            "latent-maps",
            "Latent maps",
            "Latent maps",
            note="UMAP projections are pictures of the invariant features; their faithfulness is the umap_trustworthiness score.",
            figures=umaps,
        ),
        Section("about", "About this analysis", "About", facts=summary),
    ]


# Columns of a factorial table that hold one text for every row: said once in the section, not per row.
FACTORIAL_CONSTANTS = ("method", "model", "interval")


def _ablation_section(ablation: pd.DataFrame, forest: Figure | None) -> Section:
    """The ablation effects, described by the model that produced them (the findings, at the top of
    the page, say what they are)."""
    text = "The findings above state each estimate. Positive: including l made the error larger. "
    figures = [forest] if forest else []
    if is_factorial(ablation):
        constant = [name for name in FACTORIAL_CONSTANTS if ablation[name].nunique(dropna=False) == 1]
        text += (
            "Rows: kind = main (the effect of including l, averaged with equal weight over the settings of the "
            "other orders), interaction (how much one order's effect changes when another is in), simple (adding l "
            "to one l set: the difference of two configurations' means over seeds), lack_of_fit (F test of the "
            "additive model against the one with every interaction). Effects on test MAE in meV, ratios on log test "
            "MAE (the factor by which including l multiplies the error); Holm-adjusted p over the main effects "
            "and interactions; simple effects are unadjusted. Only configurations whose seeds all completed. "
            + " ".join(f"Every row's {name}: {ablation[name].iloc[0]}." for name in constant)
        )
        table = Table(
            "ablation",
            ablation.drop(columns=constant),
            "One row per factorial term (main effect, interaction), simple effect and lack-of-fit test.",
            "ablation.csv",
        )
        return Section("ablation", "Ablation effects: the factorial of the l sets", "Ablation", note=text, tables=[table], figures=figures)
    text += (
        "paired = trials that differ only in that l (same other parameters, same seed), interval over pairs of "
        "configurations; regression = configurations' mean test MAE on inclusion indicators and the other varying "
        "parameters (OLS, t intervals); unpaired = configurations with l minus those without, confounded, shown for "
        "comparison. Only configurations whose seeds all completed."
    )
    table = Table("ablation", ablation, "One row per l and estimate (paired, regression, unpaired).", "ablation.csv")
    return Section(
        "ablation", "Ablation effects: what including each l does to the test error", "Ablation", note=text, tables=[table], figures=figures
    )


def per_trial_descriptor_table(within: pd.DataFrame) -> pd.DataFrame:
    """One row per trial (run id and label), one column of rho per descriptor. Keyed by run id:
    two trials may share a label (it leaves out what does not vary in a configuration's name, such
    as a seed-independent lr), and `pivot` raises instead of dropping a duplicate silently."""
    return within.pivot(index=["run_id", "label"], columns="descriptor", values="rho").reset_index()


def study_summary(experiment, parent_run_id, study, trial_table, compared, skipped, settings) -> dict[str, str]:
    # Chosen on validation, never on test (docs/analysis.md); its test MAE is reported.
    best = trial_table.groupby("configuration")[[BEST_VAL_MAE, TEST_MAE, BASELINE_TEST_MAE]].mean().sort_values(BEST_VAL_MAE, kind="stable")
    errors = "none"
    if len(best):
        top = best.iloc[0]
        errors = (
            f"best configuration on validation {best.index[0]}: test MAE {top['test_mae_meV']:.1f} meV (mean over seeds) against "
            f"{top['baseline_test_mae_meV']:.1f} meV for the composition fit alone "
            f"({top['test_mae_meV'] / top['baseline_test_mae_meV']:.2f} x)"
        )
    return {
        "experiment": experiment,
        "sweep (parent run)": parent_run_id or "all sweeps of the experiment",
        "tracking URI": study.tracking_uri,
        "trials analysed": f"{len(trial_table)} completed trials in {trial_table['configuration'].nunique()} configurations",
        "trials not analysed": skipped,
        "compared across the study": (
            f"{compared['configuration'].nunique()} configurations whose seeds all completed ({len(compared)} trials)"
        ),
        "errors vs composition baseline": errors,
        "structure scores on": f"at most {settings.scores.max_molecules} test molecules per trial (seed {settings.scores.seed}); "
        "probes and kNN on the target minus the composition fit",
        "knockouts": "share of the gain over the composition fit lost when a block is zeroed" if settings.knockout else "no",
        "bootstrap / permutations": f"{settings.n_boot} / {settings.n_perm} (over configurations)",
    }
