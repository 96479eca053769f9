"""`irrep-study analyze` end to end: trials from MLflow -> scores -> effects and correlations -> files -> MLflow.

Outputs in ``out_dir``:
- ``ablation.csv``: per l, the effect on test MAE of including it, with 95% intervals (paired,
  regression, unpaired; analysis/ablation.py): the report's headline;
- ``configurations.csv``: per configuration (every parameter but the seed), its trials, how many
  completed, mean and seed-to-seed sd of test / validation MAE beside the composition baseline;
- ``scores.csv``: one row per trial x block x score (with the trial's configuration and test MAE);
  ``configuration_scores.csv``: each score's mean and seed-to-seed sd per configuration;
- ``correlations.csv``: per (block, score), correlations with test MAE across configurations
  (analysis/correlate.py), with ``n_configurations`` and ``n_trials``;
- ``trials.csv``: the analysed trials; ``within_trial.csv``: per trial, Spearman of per-molecule
  |error| with each descriptor; ``molecules.csv``: per test molecule, its descriptors and each
  trial's absolute error;
- ``findings.txt``: the report's findings, one sentence per line;
- PNGs (ablation forest plot, test MAE per configuration against the composition fit, accuracy
  against parameters and seconds per epoch, UMAP per block, score vs error, correlation heatmap,
  norm share per epoch) and a self-contained ``report.html`` (analysis/report.py) that opens with
  the findings, each beside the figure that supports it.
Everything is then logged as one MLflow run tagged ``irrep_study.role=analysis``, nested under the
analysed sweep's parent run (see `analysed_sweep`): every file as an artifact, a few summary
numbers as metrics.

Comparisons across the study (effects, correlations) use only configurations whose seeds all
completed (analysis/survival.py); every completed trial is still scored and listed.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import findings as found
from analysis import plots
from analysis.ablation import ablation_effects, factorial_terms, headline, headline_estimates, is_factorial
from analysis.configurations import baseline_notes, configuration_summary
from analysis.correlate import correlate_scores, molecule_correlations
from analysis.descriptors import descriptors
from analysis.load import Study, Trial, load_study
from analysis.report import Figure, Finding, Section, Table, write_report
from analysis.scores import ALL_SCORES, ScoreSettings, knockout_shares, residual_target, score_embedding, structure_sample
from analysis.survival import complete_configurations, survival_notes, survival_table, trial_runs
from study import tracking

Progress = Callable[[str, int, int], None]  # (what, done, total)
# Per configuration, mean and seed sd of each: the errors beside the composition fit, and the cost
# (pruned models are also cheaper: parameters, and the wall time of a training epoch).
SUMMARY_METRICS = ("test_mae_meV", "best_val_mae_meV", "baseline_test_mae_meV", "test_over_baseline", "num_params",
                   "epoch_seconds")
SIGNIFICANCE = 0.05  # a correlation counts as significant in the analysis run's summary when its q_rho is below


@dataclass
class AnalysisSettings:
    scores: ScoreSettings = field(default_factory=ScoreSettings)
    knockout: bool = True
    n_boot: int = 2000
    n_perm: int = 2000
    umap_figures: int = 3  # UMAP grids of this many best and this many worst trials
    log_to_mlflow: bool = True


@dataclass
class AnalysisOutcome:
    out_dir: Path
    study: Study
    trials: pd.DataFrame
    scores: pd.DataFrame
    correlations: pd.DataFrame
    ablation: pd.DataFrame
    configurations: pd.DataFrame
    notes: list[str]
    files: dict[str, Path]
    analysis_run_id: str | None
    findings: list[str] = field(default_factory=list)  # the report's findings, one sentence each

    def to_dict(self, top: int = 10) -> dict:
        ranked = self.correlations[np.isfinite(self.correlations["rho"])]
        ranked = ranked.reindex(ranked["p_rho"].sort_values(kind="stable").index).head(top)
        return {
            "experiment": self.study.experiment_name,
            "parent_run_id": self.study.parent_run_id,
            "tracking_uri": self.study.tracking_uri,
            "analysis_run_id": self.analysis_run_id,
            "out_dir": str(self.out_dir),
            "trials_analysed": len(self.study.trials),
            "trials_skipped": self.study.skipped,
            "configurations_compared": int(self.trials.loc[self.trials["in_comparisons"], "configuration"].nunique()),
            "notes": self.notes,
            "ablation": headline(self.ablation),
            "ablation_effects": _records(self.ablation),
            "files": {name: str(path) for name, path in self.files.items()},
            "top_correlations": _records(ranked),
        }


def _records(frame: pd.DataFrame) -> list[dict]:
    """JSON-safe records: NaN becomes null, numpy scalars plain Python."""
    def plain(value):
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    return [{key: plain(value) for key, value in row.items()} for row in frame.to_dict(orient="records")]


def _trial_table(trials: list[Trial], runs: pd.DataFrame, context: list[str], complete: set[str], knockout: dict[str, tuple[float, float]]) -> pd.DataFrame:
    """One row per analysed trial: identity, configuration, design covariates, errors beside the
    composition baseline, and whether its configuration enters the comparisons across the study."""
    by_run = runs.set_index("run_id")
    rows = []
    for t in trials:
        run = by_run.loc[t.run_id]
        baseline = float(run["baseline_test_mae_meV"])
        if not math.isfinite(baseline):
            # Runs logged before the baseline metric: the same number from the embeddings artifact.
            baseline = float(np.abs(residual_target(t.embeddings)).mean() * 1000.0)
        model_mae, composition_mae = knockout.get(t.run_id, (math.nan, math.nan))
        row = {
            "run_id": t.run_id,
            "run_name": t.run_name,
            "label": t.label,
            "configuration": run["configuration"],
            "in_comparisons": run["configuration"] in complete,
            "seed": run["seed"],
            "l_values": ",".join(map(str, t.config.l_values)),
            # Design covariates always present (constant ones are ignored by the statistics).
            "hidden_dim": t.config.hidden_dim,
            "num_layers": t.config.num_layers,
            "lr": t.config.lr,
        }
        row.update({name: run[name] for name in context if name not in row})
        row.update({
            "num_params": float(t.num_params),
            "test_mae_meV": t.test_mae_meV,
            "best_val_mae_meV": t.metrics.get("best_val_mae_meV", math.nan),
            "baseline_test_mae_meV": baseline,
            "test_over_baseline": t.test_mae_meV / baseline if baseline > 0 else math.nan,
            "test_molecules": len(t.embeddings.target),
            # Training wall time per epoch (validation included), as the trial measured it.
            "epoch_seconds": t.metrics.get("train_seconds", math.nan) / t.config.epochs,
            "knockout_model_mae_meV": model_mae,
            "knockout_composition_mae_meV": composition_mae,
        })
        rows.append(row)
    return pd.DataFrame(rows)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:80]


def score_trial(trial: Trial, nsps: np.ndarray, settings: AnalysisSettings, tensors_loader, on_step=None):
    """Utilization, structure and (if enabled) knockout scores of one trial, its UMAP coordinates,
    and the model's and the composition fit's MAE on the knockout molecules (NaN without knockouts)."""
    embeddings = trial.embeddings
    residual = residual_target(embeddings)
    result = score_embedding(embeddings.graph, embeddings.layout, residual, nsps, settings.scores, on_block=on_step)
    maes = (math.nan, math.nan)
    if settings.knockout:
        from analysis.knockout import trial_knockout

        sample = structure_sample(len(embeddings.target), settings.scores)
        rows = None if len(sample) == len(embeddings.target) else sample
        knockout = trial_knockout(trial, tensors_loader(), rows=rows, on_step=on_step)
        # The gain over the composition fit is measured on the same molecules as the deltas.
        composition_mae = float(np.abs(residual[sample]).mean() * 1000.0)
        maes = (knockout.baseline_mae_meV, composition_mae)
        for block, deltas in knockout.deltas.items():
            result.values[block].update(knockout_shares(deltas, knockout.baseline_mae_meV, composition_mae))
    return result, maes


def run_analysis(
    experiment: str,
    out_dir: Path,
    parent_run_id: str | None = None,
    tracking_uri: str | None = None,
    settings: AnalysisSettings | None = None,
    qm9_cache_dir: Path | None = None,
    descriptor_cache_dir: Path | None = None,
    log: Callable[[str], None] = lambda message: None,
    progress: Progress | None = None,
) -> AnalysisOutcome:
    """Load the study's trials, score every irrep block, relate the scores to test error, write
    tables, figures and report.html to `out_dir`, and (by default) log the analysis to MLflow."""
    settings = settings or AnalysisSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report = progress or (lambda what, done, total: None)

    study = load_study(experiment, parent_run_id, tracking_uri)
    skipped = ", ".join(f"{n} {status}" for status, n in sorted(study.skipped.items())) or "none"
    log(f"{len(study.trials)} completed trials in {experiment!r} (not analysed: {skipped})")
    runs, context, schedulers = trial_runs(study)
    notes = survival_notes(runs, schedulers)
    for note in notes:
        log(note)

    report("descriptors", 0, 1)
    all_smiles = sorted({s for t in study.trials for s in t.embeddings.smiles.tolist()})
    molecules = descriptors(all_smiles, descriptor_cache_dir).set_index("smiles")
    report("descriptors", 1, 1)
    scored = _score_trials(study.trials, molecules, settings, _lazy_qm9(qm9_cache_dir, log), report)
    tables = _tables(study, scored, runs, context, settings, log, report)
    files = _write_tables(out_dir, {**tables.frames, "molecules": _molecule_table(study.trials, molecules, scored.errors)})

    report("figures", 0, 1)
    figures = _figures(out_dir, study.trials, tables.trials, tables.scores, tables.correlations, tables.ablation,
                       scored.projections, settings)
    files.update({name: path for name, (path, _) in figures.items()})
    answer = _findings(runs, context, tables, out_dir)
    files.update({name: path for name, (path, _) in answer.figures.items()})
    files.update(_write_tables(out_dir, {"importance": answer.importance, "pareto": answer.pareto}))
    # The findings as plain text, one sentence per line: what a results README quotes.
    files["findings"] = out_dir / "findings.txt"
    files["findings"].write_text("\n".join(answer.sentences) + "\n")
    report("figures", 1, 1)
    warnings = [*notes, *tables.learned]
    summary = _summary(experiment, parent_run_id, study, tables.trials, tables.compared, skipped, settings)
    shown = {name: Figure(name, path, caption) for name, (path, caption) in {**figures, **answer.figures}.items()}
    files["report"] = write_report(
        out_dir / "report.html",
        title=f"irrep-study analysis: {experiment}",
        lede=f"{summary['trials analysed']}; compared across the study: {summary['compared across the study']}.",
        warnings=warnings,
        sections=[*answer.sections(shown),
                  *_sections(tables.trials, tables.configurations, tables.scores, tables.correlations, tables.ablation,
                             tables.within, shown, notes, summary)],
    )

    outcome = AnalysisOutcome(out_dir, study, tables.trials, tables.scores, tables.correlations, tables.ablation,
                              tables.configurations, warnings, files, None, answer.sentences)
    if settings.log_to_mlflow:
        report("logging to MLflow", 0, 1)
        outcome.analysis_run_id = log_analysis_run(outcome, settings, time.perf_counter() - started)
        report("logging to MLflow", 1, 1)
    return outcome


def _lazy_qm9(cache_dir: Path | None, log: Callable[[str], None]) -> Callable[[], object]:
    """QM9 loaded at the first call only: only knockouts need it."""
    tensors = None

    def load():
        nonlocal tensors
        if tensors is None:
            from study.data import load_qm9

            tensors = load_qm9(cache_dir, log=log)
        return tensors

    return load


@dataclass
class _Scored:
    """Every trial's block scores and its per-molecule errors."""

    score_rows: list[dict] = field(default_factory=list)  # run_id, block, score, value
    projections: dict = field(default_factory=dict)  # run id -> (score result, nsps) for the UMAP figures
    knockout_maes: dict = field(default_factory=dict)  # run id -> (knockout baseline MAE, composition MAE)
    within: list[pd.DataFrame] = field(default_factory=list)  # per trial: |error| vs each descriptor
    errors: dict[str, pd.Series] = field(default_factory=dict)  # run id -> |error| (meV) by mol_id


def _score_trials(trials: list[Trial], molecules: pd.DataFrame, settings: AnalysisSettings, tensors_loader,
                  report: Progress) -> _Scored:
    scored = _Scored()
    for index, trial in enumerate(trials):
        report(f"scoring {trial.label}", index, len(trials))
        own = molecules.loc[trial.embeddings.smiles.tolist()]
        nsps = own["nsps"].to_numpy(dtype=np.float64)
        result, scored.knockout_maes[trial.run_id] = score_trial(
            trial, nsps, settings, tensors_loader,
            on_step=lambda step, label=trial.label, index=index: report(f"scoring {label}: {step}", index, len(trials)),
        )
        scored.projections[trial.run_id] = (result, nsps)
        for block, values in result.values.items():
            for score in ALL_SCORES:
                if score in values:
                    scored.score_rows.append({"run_id": trial.run_id, "block": block, "score": score, "value": values[score]})
        abs_error = np.abs(trial.embeddings.prediction - trial.embeddings.target) * 1000.0
        per_descriptor = molecule_correlations(abs_error, own.reset_index(drop=True))
        per_descriptor.insert(0, "run_id", trial.run_id)
        per_descriptor.insert(1, "label", trial.label)
        scored.within.append(per_descriptor)
        scored.errors[trial.run_id] = pd.Series(abs_error, index=trial.embeddings.mol_id)
    report("scoring", len(trials), len(trials))
    return scored


@dataclass
class _Tables:
    trials: pd.DataFrame
    compared: pd.DataFrame  # trials of configurations with every seed completed
    scores: pd.DataFrame
    correlations: pd.DataFrame
    ablation: pd.DataFrame
    configurations: pd.DataFrame
    configuration_scores: pd.DataFrame
    within: pd.DataFrame
    learned: list[str]  # configurations that did not beat the composition baseline

    @property
    def frames(self) -> dict[str, pd.DataFrame]:
        """The tables written as CSV, by file name."""
        return {"ablation": self.ablation, "configurations": self.configurations, "scores": self.scores,
                "configuration_scores": self.configuration_scores, "correlations": self.correlations,
                "trials": self.trials, "within_trial": self.within}


def _tables(study: Study, scored: _Scored, runs: pd.DataFrame, context: list[str], settings: AnalysisSettings,
            log: Callable[[str], None], report: Progress) -> _Tables:
    """Per trial, per configuration and per score: the study's tables, the statistics among them."""
    trial_table = _trial_table(study.trials, runs, context, complete_configurations(runs), scored.knockout_maes)
    compared = trial_table[trial_table["in_comparisons"]]
    if compared["configuration"].nunique() < 3:
        log(f"{compared['configuration'].nunique()} configuration(s) with every seed completed: correlations across "
            "configurations need at least 3; per-trial scores are still written")
    scores = pd.DataFrame(scored.score_rows).merge(
        trial_table[["run_id", "run_name", "label", "configuration", "test_mae_meV", "num_params"]], on="run_id"
    )
    scores = scores[["run_id", "run_name", "label", "configuration", "block", "score", "value", "test_mae_meV", "num_params"]]
    report("correlations", 0, 1)
    correlations = correlate_scores(scores, compared, n_boot=settings.n_boot, n_perm=settings.n_perm, seed=settings.scores.seed)
    ablation = ablation_effects(compared, context, errors=scored.errors)
    report("correlations", 1, 1)
    configurations = survival_table(runs).merge(configuration_summary(trial_table, SUMMARY_METRICS), on="configuration", how="left",
                                                suffixes=("", "_completed"))
    configurations = configurations.drop(columns=["n_trials_completed"])
    learned = baseline_notes(configurations.dropna(subset=["test_mae_meV_mean"]))
    for note in learned:
        log(note)
    configuration_scores = (
        scores.groupby(["configuration", "block", "score"])["value"].agg(mean="mean", sd="std", n_trials="count").reset_index()
    )
    return _Tables(trial_table, compared, scores, correlations, ablation, configurations, configuration_scores,
                   pd.concat(scored.within, ignore_index=True), learned)


@dataclass
class _Findings:
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
        left_out = (f" {self.unvalued} configuration(s) without any finite validation MAE (diverged or failed in every "
                    "seed) are left out of the importance." if self.unvalued else "")
        front = self.pareto[self.pareto["on_front"]] if len(self.pareto) else self.pareto
        pareto_columns = [c for c in ("configuration", "l_values", "num_params", "best_val_mae_meV_mean",
                                      "best_val_mae_meV_sd", "n_completed", "test_mae_meV_mean") if c in front.columns]
        ranked_columns = [c for c in ("configuration", "n_completed", "best_val_mae_meV_mean", "best_val_mae_meV_sd",
                                      "test_mae_meV_mean", "test_mae_meV_sd", "baseline_test_mae_meV_mean",
                                      "test_over_baseline_mean", "test_over_baseline_sd") if c in self.ranked.columns]
        return [
            Section(
                "findings", "Findings", "Findings",
                note="Parameter importance: Optuna's fANOVA over every configuration of the study "
                f"({self.importance_n}), early-stopped ones at the epoch where they stopped, valued at the mean over "
                f"seeds of the last validation MAE; mean, min and max over {found.FOREST_SEEDS} random-forest seeds and "
                "how often each parameter came first; include_l<k>: whether the l set holds k." + left_out +
                " Pareto front: configurations no other beats on both mean validation MAE and parameter count.",
                findings=[Finding(sentences, figures.get(name)) for name, sentences in self.groups],
                # Beside the figures of accuracy and cost, those of the findings that no sentence came with.
                figures=[figures[name] for name in ("configuration_errors", "optuna_importance", "accuracy_vs_cost", "pareto")
                         if name in figures and name not in dict(self.groups)],
                tables=[
                    Table("importance", self.importance, f"One row per varied parameter: its importance for the "
                          f"validation MAE over {self.importance_n} configurations, most important first.", "importance.csv"),
                    Table("findings_configurations", self.ranked[ranked_columns], "One row per configuration with a "
                          "completed seed, ranked on mean validation MAE; its test MAE beside the composition fit's.",
                          "configurations.csv"),
                    Table("pareto_front", front[pareto_columns], "One row per configuration on the Pareto front of mean "
                          "validation MAE against parameters, smallest first.", "pareto.csv"),
                ],
            ),
            Section("search", "The search as Optuna sees it", "Optuna's view",
                    note="Optuna's stock plots of the same configurations (one Optuna trial per configuration, valued at "
                    "the mean over seeds of the last validation MAE).",
                    figures=[figures[name] for name in ("optuna_history", "optuna_parallel", "optuna_slice") if name in figures]),
        ]


def _finding_groups(sentences: list[str], n_ablation: int) -> list[tuple[str, list[str]]]:
    """The findings' sentences with the figure that supports each, in their order. finding_sentences
    says, in this order: what each l does (``n_ablation`` sentences: the forest plot), which
    parameter mattered (fANOVA importance), which configuration won on validation (the errors per
    configuration), then what holds among the correlations (score vs error) and among the
    ablation effects (the forest plot again)."""
    groups = [("ablation_effects", sentences[:n_ablation])]
    for sentence in sentences[n_ablation:-2]:
        groups.append(("configuration_errors" if sentence.startswith("Best on validation") else "optuna_importance", [sentence]))
    return [*groups, ("score_vs_error", [sentences[-2]]), ("ablation_effects", [sentences[-1]])]


def _findings(runs: pd.DataFrame, context: list[str], tables: _Tables, out_dir: Path) -> _Findings:
    """The answer first: importance over every configuration, errors per configuration, the front."""
    values, unvalued = found.configuration_values(runs, context)
    study = found.importance_study(values)
    importance = found.parameter_importance(study)
    figures = found.optuna_figures(study, out_dir)
    sizes = tables.trials.groupby("configuration", sort=False)[["l_values", "num_params"]].first()
    pareto = found.pareto_front(tables.configurations.join(sizes, on="configuration"))
    path = found.pareto_figure(pareto, out_dir / "pareto.png")
    if path:
        figures["pareto"] = (path, "Mean validation MAE (seed sd as bars) against parameters per configuration, marked by its "
                                   "largest l; red: the Pareto front, labelled with the l sets.")
    terms = factorial_terms(tables.ablation)
    ablation_sentences = headline(tables.ablation)
    sentences = found.finding_sentences(
        ablation_sentences, headline_estimates(tables.ablation), importance, len(values),
        tables.configurations, tables.correlations, SIGNIFICANCE, terms,
    )
    # Without an ablation contrast finding_sentences says so in one sentence.
    groups = _finding_groups(sentences, max(len(ablation_sentences), 1))
    ranked = tables.configurations.dropna(subset=["best_val_mae_meV_mean"]).sort_values("best_val_mae_meV_mean", kind="stable")
    return _Findings(sentences, groups, importance, len(values), unvalued, ranked, pareto, figures)


def per_trial_descriptor_table(within: pd.DataFrame) -> pd.DataFrame:
    """One row per trial (run id and label), one column of rho per descriptor. Keyed by run id:
    two trials may share a label (it leaves out what does not vary in a configuration's name, such
    as a seed-independent lr), and `pivot` raises instead of dropping a duplicate silently."""
    return within.pivot(index=["run_id", "label"], columns="descriptor", values="rho").reset_index()


def _write_tables(out_dir: Path, frames: dict[str, pd.DataFrame]) -> dict[str, Path]:
    files = {}
    for name, frame in frames.items():
        files[name] = out_dir / f"{name}.csv"
        frame.to_csv(files[name], index=False)
    return files


def _summary(experiment, parent_run_id, study, trial_table, compared, skipped, settings) -> dict[str, str]:
    # Chosen on validation, never on test (docs/analysis.md); its test MAE is reported.
    best = (trial_table.groupby("configuration")[["best_val_mae_meV", "test_mae_meV", "baseline_test_mae_meV"]].mean()
            .sort_values("best_val_mae_meV", kind="stable"))
    errors = "none"
    if len(best):
        top = best.iloc[0]
        errors = (
            f"best configuration on validation {best.index[0]}: test MAE {top['test_mae_meV']:.1f} meV (mean over seeds) against "
            f"{top['baseline_test_mae_meV']:.1f} meV for the composition fit alone ({top['test_mae_meV'] / top['baseline_test_mae_meV']:.2f} x)"
        )
    return {
        "experiment": experiment,
        "sweep (parent run)": parent_run_id or "all sweeps of the experiment",
        "tracking URI": study.tracking_uri,
        "trials analysed": f"{len(trial_table)} completed trials in {trial_table['configuration'].nunique()} configurations",
        "trials not analysed": skipped,
        "compared across the study": f"{compared['configuration'].nunique()} configurations whose seeds all completed ({len(compared)} trials)",
        "errors vs composition baseline": errors,
        "structure scores on": f"at most {settings.scores.max_molecules} test molecules per trial (seed {settings.scores.seed}); "
        "probes and kNN on the target minus the composition fit",
        "knockouts": "share of the gain over the composition fit lost when a block is zeroed" if settings.knockout else "no",
        "bootstrap / permutations": f"{settings.n_boot} / {settings.n_perm} (over configurations)",
    }


def _molecule_table(trials: list[Trial], table: pd.DataFrame, error_columns: dict[str, pd.Series]) -> pd.DataFrame:
    """Per test molecule: id, SMILES, target, descriptors, and each trial's |error| (meV)."""
    first: dict[int, tuple[str, float]] = {}
    for trial in trials:
        for mol, smiles, target in zip(trial.embeddings.mol_id.tolist(), trial.embeddings.smiles.tolist(), trial.embeddings.target.tolist()):
            first.setdefault(mol, (smiles, target))
    ids = sorted(first)
    frame = pd.DataFrame({"mol_id": ids, "smiles": [first[m][0] for m in ids], "target": [first[m][1] for m in ids]})
    frame = frame.join(table, on="smiles")
    for trial in trials:
        frame[f"abs_error_meV[{trial.run_id}]"] = error_columns[trial.run_id].reindex(ids).to_numpy()
    return frame


# The study-level figures `analyze` can write (each only when there is something to show), beside
# the UMAP grids of single trials (umap_*.png). results/ folders publish a subset of them.
STUDY_FIGURES = ("pareto.png", "optuna_importance.png", "optuna_history.png", "optuna_parallel.png", "optuna_slice.png",
                 "ablation_effects.png", "correlation_heatmap.png", "score_vs_error.png", "norm_share_by_epoch.png",
                 "configuration_errors.png", "accuracy_vs_cost.png")


def _figures(out_dir, trials, trial_table, scores, correlations, ablation, projections, settings) -> dict[str, tuple[Path, str]]:
    figures: dict[str, tuple[Path, str]] = {}
    path = plots.configuration_errors_figure(trial_table, out_dir / "configuration_errors.png")
    if path:
        figures["configuration_errors"] = (
            path, "Test MAE per configuration: the mean over seeds (bars: seed-to-seed sd; open dots: the seeds), ranked on "
            "mean validation MAE with the best at the top, coloured by the configuration's largest l; dashed: the "
            "composition fit's test MAE (band: its range, where the trials' test splits differ). '(not every seed)': "
            "left out of the comparisons.")
    path = plots.cost_figure(trial_table, out_dir / "accuracy_vs_cost.png")
    if path:
        figures["accuracy_vs_cost"] = (
            path, "Accuracy against cost: mean test MAE over seeds (bars: seed sd) against parameters and against seconds "
            "per training epoch (validation included; bars: seed sd), log axes, one point per configuration coloured by "
            "its largest l; dashed: the composition fit's test MAE.")
    path = plots.ablation_figure(ablation, out_dir / "ablation_effects.png")
    if path and is_factorial(ablation):
        figures["ablation_effects"] = (path, "Factorial effects with 95% intervals, on test MAE (left, meV) and as ratios "
                                       "(right, log scale): main effects and interactions, then each simple effect "
                                       "(adding l to one l set). " + ablation["interval"].iloc[0] + ".")
    elif path:
        figures["ablation_effects"] = (path, "Change of test MAE when each l is included, with 95% intervals: paired "
                                       "comparisons, regression, and (grey, confounded) unpaired means.")
    path = plots.heatmap_figure(correlations, out_dir / "correlation_heatmap.png")
    if path:
        figures["correlation_heatmap"] = (path, "Spearman rho of each score (row) of each block (column) with test MAE across configurations.")
    path = plots.score_scatter_figure(scores[scores["configuration"].isin(trial_table.loc[trial_table["in_comparisons"], "configuration"])],
                                      correlations, out_dir / "score_vs_error.png")
    if path:
        figures["score_vs_error"] = (path, "Strongest rank correlations: each score's value vs test MAE in meV, one point per "
                                     "configuration (means over seeds; bars: seed-to-seed sd of test MAE where it has more "
                                     "than one seed). Per panel: Spearman rho (with its 95% CI where there are enough configurations), "
                                     "its permutation p and the number of configurations n.")
    # Lines are grouped by configuration (its seeds share a style), so the figure gets the configuration label.
    configuration = trial_table.set_index("run_id")["configuration"]
    path = plots.norm_share_figure([(configuration[t.run_id], t.test_mae_meV, t.history) for t in trials],
                                   out_dir / "norm_share_by_epoch.png")
    if path:
        figures["norm_share_by_epoch"] = (path, "Share of the validation embeddings' squared norm per l, by epoch (logged during "
                                          "training), one line per trial; the seeds of a configuration share a colour and line "
                                          "style, configurations ranked by mean test MAE (dark: best), named in the legend with it "
                                          f"(past {plots.NORM_SHARE_LEGEND_MAX} configurations, only the "
                                          f"{plots.NORM_SHARE_LEGEND_ENDS} best and worst).")
    order = trial_table.sort_values("test_mae_meV", kind="stable")["run_id"].tolist()
    chosen = list(dict.fromkeys(order[: settings.umap_figures] + order[::-1][: settings.umap_figures]))
    by_id = {t.run_id: t for t in trials}
    for run_id in chosen:
        result, nsps = projections[run_id]
        if not result.umap:
            continue
        trial = by_id[run_id]
        sample = result.sample
        abs_error = np.abs(trial.embeddings.prediction - trial.embeddings.target)[sample] * 1000.0
        position = order.index(run_id) + 1
        name = f"umap_{position:03d}_{_safe_name(trial.label)}"
        title = f"{trial.label} (test MAE {trial.test_mae_meV:.1f} meV, rank {position}/{len(order)}; run {run_id})"
        path = plots.umap_figure(title, result.umap, nsps[sample], abs_error, out_dir / f"{name}.png")
        figures[name] = (path, f"2D UMAP of each block's invariant features: {title}. Left: nSPS; right: |error|.")
    return figures


def _sections(trial_table, configurations, scores, correlations, ablation, within_table, figures: dict[str, Figure],
              notes, summary: dict[str, str]) -> list[Section]:
    """The report's sections after the findings. ``figures``: every figure of the report by name
    (one the findings already show is a link back to it)."""
    summary_table = (
        scores.groupby(["block", "score"])
        .agg(mean=("value", "mean"), std=("value", "std"), min=("value", "min"), max=("value", "max"),
             n_configurations=("configuration", "nunique"), n_trials=("value", "count"))
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
            "configurations", "Configurations and survivorship", "Configurations",
            note="Per configuration (every parameter but the seed): its trials and how many completed; mean and "
            "seed-to-seed sd of test and best validation MAE; the composition fit's test MAE and the model's MAE as a "
            "fraction of it (below 1: the model beats counting atoms). 'All seeds completed': the configuration enters "
            "the comparisons. " + ("What did not complete is summarised in the box above." if notes else "Every trial completed."),
            tables=[Table("configurations", configurations, "One row per configuration (every parameter but the seed), "
                          "best mean test MAE first.", "configurations.csv")],
        ),
        Section(
            "trials", "Trials", "Trials",
            note="Completed trials, as logged, with the composition fit's test MAE beside each model's; 'in comparisons': "
            "the configuration's seeds all completed. The knockout columns: the model's and the composition fit's MAE "
            "on the molecules the knockouts were measured on.",
            tables=[Table("trials", trial_table, "One row per completed trial (one seed of a configuration).", "trials.csv")],
        ),
        Section(
            "correlations", "Scores vs test error", "Scores vs error",
            note="Spearman rho and Kendall tau of each score with test MAE across configurations (means over seeds), 95% "
            "bootstrap CIs over configurations, permutation p-values, partial rho given the named covariates that vary "
            "(and with the parameter count added), a mixed model (random intercept per configuration) as a second "
            "opinion where seeds exist, and the false-discovery-rate q. The seed-to-seed share: of the score's variance. "
            "The l0 and joint knockouts are left out: they are determined by the test MAE itself. Sorted by p. Few "
            "configurations give wide intervals: read them.",
            figures=shown,
            tables=[Table("correlations", ranked, "One row per block and score: its correlation with test MAE across "
                          "configurations, smallest p first.", "correlations.csv")],
        ),
        Section(
            "scores", "Scores per block", "Scores per block",
            note="Mean, spread and range of every score across trials (scores.csv has every value; "
            "configuration_scores.csv the mean and seed-to-seed sd per configuration).",
            tables=[Table("score_summary", summary_table, "One row per block and score: its distribution over the "
                          "analysed trials.", "scores.csv")],
        ),
        Section(
            "descriptors", "Per-molecule error vs descriptors", "Error vs descriptors",
            note="Spearman rho of |error| with each RDKit descriptor, within each trial (within_trial.csv has p and n).",
            tables=[Table("within_trial", within_wide, "One row per trial: the rank correlation of its per-molecule "
                          "|error| with each descriptor (a column each).", "within_trial.csv", kinds={"*": "ratio"})],
        ),
        Section("latent-maps", "Latent maps", "Latent maps",
                note="UMAP projections are pictures of the invariant features; their faithfulness is the "
                "umap_trustworthiness score.", figures=umaps),
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
        text += ("Rows: kind = main (the effect of including l, averaged with equal weight over the settings of the "
                 "other orders), interaction (how much one order's effect changes when another is in), simple (adding l "
                 "to one l set: the difference of two configurations' means over seeds), lack_of_fit (F test of the "
                 "additive model against the one with every interaction). Effects on test MAE in meV, ratios on log test "
                 "MAE (the factor by which including l multiplies the error); Holm-adjusted p over the main effects "
                 "and interactions; simple effects are unadjusted. Only configurations whose seeds all completed. "
                 + " ".join(f"Every row's {name}: {ablation[name].iloc[0]}." for name in constant))
        table = Table("ablation", ablation.drop(columns=constant), "One row per factorial term (main effect, interaction), "
                      "simple effect and lack-of-fit test.", "ablation.csv")
        return Section("ablation", "Ablation effects: the factorial of the l sets", "Ablation", note=text, tables=[table],
                       figures=figures)
    text += ("paired = trials that differ only in that l (same other parameters, same seed), interval over pairs of "
             "configurations; regression = configurations' mean test MAE on inclusion indicators and the other varying "
             "parameters (OLS, t intervals); unpaired = configurations with l minus those without, confounded, shown for "
             "comparison. Only configurations whose seeds all completed.")
    table = Table("ablation", ablation, "One row per l and estimate (paired, regression, unpaired).", "ablation.csv")
    return Section("ablation", "Ablation effects: what including each l does to the test error", "Ablation", note=text,
                   tables=[table], figures=figures)


def log_analysis_run(outcome: AnalysisOutcome, settings: AnalysisSettings, seconds: float) -> str:
    """One MLflow run (role=analysis) in the study's experiment: settings as params; as metrics only
    a summary (trials, configurations, per l the headline ablation effect with its interval, how
    many correlations are significant after the Benjamini-Hochberg correction, seconds); every file."""
    study = outcome.study
    params = {
        "parent_run_id": study.parent_run_id or "",
        "trials_analysed": len(study.trials),
        "trials_skipped": ", ".join(f"{n} {s}" for s, n in sorted(study.skipped.items())),
        "configurations_compared": int(outcome.trials.loc[outcome.trials["in_comparisons"], "configuration"].nunique()),
        "n_boot": settings.n_boot,
        "n_perm": settings.n_perm,
        "knockout": settings.knockout,
        **{f"scores.{key}": value for key, value in asdict(settings.scores).items()},
    }
    # A handful of summary metrics, not one per score: hundreds of them made the experiment's chart
    # view open on the analysis instead of the trials' curves. Every number is in the CSV artifacts.
    metrics = {
        "trials_analysed": float(len(study.trials)),
        "configurations_compared": float(params["configurations_compared"]),
        # The report's findings count them the same way (analysis/findings.py).
        "correlations_tested": float(len(found.tested_correlations(outcome.correlations))),
        "significant_correlations": float(len(found.significant_correlations(outcome.correlations, SIGNIFICANCE))),
        "analysis_seconds": seconds,
    }
    for l, (method, row) in headline_estimates(outcome.ablation).items():
        params[f"ablation_method/l{l}"] = method
        for name, column in (("effect", "effect_meV"), ("lo", "lo_meV"), ("hi", "hi_meV")):
            value = float(row[column])
            if math.isfinite(value):
                metrics[f"ablation_{name}_meV/l{l}"] = value
    return tracking.log_analysis_run(study.tracking_uri, study.experiment_id, f"analysis {time.strftime('%Y%m%d-%H%M%S')}",
                                     study.parent_run_id, params, metrics, outcome.out_dir, nest_under=analysed_sweep(study),
                                     description=run_description(outcome))


DESCRIPTION_CHARACTERS = 5000  # MLflow caps a tag's value (the description is one); the report has everything


def run_description(outcome: AnalysisOutcome) -> str:
    """The analysis run's description in MLflow (Markdown): the findings, then what limits them,
    and where the whole report is, so the run's page says what the study found."""
    trials = outcome.trials
    lines = [f"**Findings** of {len(trials)} completed trials in {trials['configuration'].nunique()} configurations "
             f"(irrep-study analyze):", "", *(f"- {sentence}" for sentence in outcome.findings)]
    if outcome.notes:
        lines += ["", "**Read with:**", "", *(f"- {note}" for note in outcome.notes)]
    lines += ["", "The whole report, with its figures and tables: the artifact `report.html`."]
    text = "\n".join(lines)
    if len(text) > DESCRIPTION_CHARACTERS:
        text = text[: DESCRIPTION_CHARACTERS - 40].rsplit("\n", 1)[0] + "\n\n(more in report.html)"
    return text


def analysed_sweep(study: Study) -> str | None:
    """The sweep run the analysis run nests under: the `--parent` sweep, or, for an analysis of a
    whole experiment, the one sweep every analysed trial belongs to. Trials of several sweeps leave
    the run at the top level: MLflow gives a run one parent, and nesting it under any one of the
    sweeps would file the others' trials under it."""
    if study.parent_run_id:
        return study.parent_run_id
    parents = {trial.parent_run_id for trial in study.trials}
    return parents.pop() if len(parents) == 1 and None not in parents else None
