"""`irrep-study analyze` end to end: trials from MLflow -> scores -> effects and correlations -> files -> MLflow.

Outputs in ``out_dir``:
- ``ablation.csv``: per l, the effect on test MAE of including it, with 95% intervals (paired,
  regression, unpaired; analysis/stats/ablation.py): the report's headline;
- ``configurations.csv``: per configuration (every parameter but the seed), its trials, how many
  completed, mean and seed-to-seed sd of test / validation MAE beside the composition baseline;
- ``scores.csv``: one row per trial x block x score (with the trial's configuration and test MAE);
  ``configuration_scores.csv``: each score's mean and seed-to-seed sd per configuration;
- ``correlations.csv``: per (block, score), correlations with test MAE across configurations
  (analysis/stats/correlate.py), with ``n_configurations`` and ``n_trials``;
- ``trials.csv``: the analysed trials; ``within_trial.csv``: per trial, Spearman of per-molecule
  |error| with each descriptor; ``molecules.csv``: per test molecule, its descriptors and each
  trial's absolute error;
- ``findings.txt``: the report's findings, one sentence per line;
- PNGs (ablation forest plot, test MAE per configuration against the composition fit, accuracy
  against parameters and seconds per epoch, UMAP per block, score vs error, correlation heatmap,
  norm share per epoch) and a self-contained ``report.html`` (analysis/report/page.py) that opens with
  the findings, each beside the figure that supports it.
Everything is then logged as one MLflow run tagged ``irrep_study.role=analysis``, nested under the
analysed sweep's parent run (see `analysed_sweep`): every file as an artifact, a few summary
numbers as metrics.

Each trial's scores are kept with its MLflow run and read back by a later analysis with the same
settings (analysis/scoring/kept.py); the others are scored ``settings.workers`` at a time in worker
processes (analysis/scoring/trials.py).

Comparisons across the study (effects, correlations) use only configurations whose seeds all
completed (analysis/stats/survival.py); every completed trial is still scored and listed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.analysis_run import log_analysis_run
from analysis.load import Study, Trial, load_study
from analysis.reanalysis import error_column
from analysis.report.page import Figure, write_report
from analysis.report.sections import (
    draw_figures,
    gather_findings,
    report_sections,
    study_summary,
)
from analysis.report.umap_grids import UmapDrawing, umap_grids
from analysis.scoring.descriptors import descriptors
from analysis.scoring.kept import KeptScores, TrialScores, score_key
from analysis.scoring.scores import ALL_SCORES, ScoreSettings, residual_target
from analysis.scoring.trials import ScoringJob, score_trials
from analysis.stats.ablation import (
    ablation_effects,
    headline,
)
from analysis.stats.configurations import baseline_notes, configuration_summary
from analysis.stats.correlate import correlate_scores, molecule_correlations
from analysis.stats.survival import (
    complete_configurations,
    survival_notes,
    survival_table,
    trial_runs,
)
from study.names import BASELINE_TEST_MAE, BEST_VAL_MAE, EPOCH_SECONDS, TEST_MAE
from study.tracking import store

Progress = Callable[[str, int, int], None]  # (what, done, total)
# Per configuration, mean and seed sd of each: the errors beside the composition fit, and the cost
# (pruned models are also cheaper: parameters, and the wall time of a training epoch).
SUMMARY_METRICS = (TEST_MAE, BEST_VAL_MAE, BASELINE_TEST_MAE, "test_over_baseline", "num_params", EPOCH_SECONDS)


@dataclass
class AnalysisSettings:
    scores: ScoreSettings = field(default_factory=ScoreSettings)
    knockout: bool = True
    n_boot: int = 2000
    n_perm: int = 2000
    umap_figures: int = 3  # UMAP grids of this many best and this many worst trials
    log_to_mlflow: bool = True
    workers: int = 1  # trials scored at the same time, each in its own process (1: in this one)
    reuse_scores: bool = True  # read back and keep each trial's scores with its MLflow run (analysis/scoring/kept.py)


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


def _trial_table(
    trials: list[Trial], runs: pd.DataFrame, context: list[str], complete: set[str], knockout: dict[str, tuple[float, float]]
) -> pd.DataFrame:
    """One row per analysed trial: identity, configuration, design covariates, errors beside the
    composition baseline, and whether its configuration enters the comparisons across the study."""
    by_run = runs.set_index("run_id")
    rows = []
    for t in trials:
        run = by_run.loc[t.run_id]
        baseline = float(run[BASELINE_TEST_MAE])
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
        row.update(
            {
                "num_params": float(t.num_params),
                TEST_MAE: t.test_mae_meV,
                BEST_VAL_MAE: t.metrics.get(BEST_VAL_MAE, math.nan),
                BASELINE_TEST_MAE: baseline,
                "test_over_baseline": t.test_mae_meV / baseline if baseline > 0 else math.nan,
                "test_molecules": len(t.embeddings.target),
                # Training wall time per epoch (validation included), as the trial measured it.
                EPOCH_SECONDS: t.metrics.get("train_seconds", math.nan) / t.config.epochs,
                "knockout_model_mae_meV": model_mae,
                "knockout_composition_mae_meV": composition_mae,
            }
        )
        rows.append(row)
    return pd.DataFrame(rows)


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
    executor: Executor | None = None,
) -> AnalysisOutcome:
    """Load the study's trials, score every irrep block, relate the scores to test error, write
    tables, figures and report.html to `out_dir`, and (by default) log the analysis to MLflow.

    ``executor``: where the trials still to score are scored instead of ``settings.workers`` local
    processes (`irrep-study analyze --address`: a cluster's Ray tasks, study.sweep.ray_tasks)."""
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
    scored = _score_trials(study.trials, molecules, settings, study.tracking_uri, qm9_cache_dir, log, report, executor)
    grids = umap_grids(out_dir, study.trials, scored.projections, settings.umap_figures)
    with UmapDrawing(grids, in_background=settings.workers > 1) as umap_drawing:
        tables = _tables(study, scored, runs, context, settings, log, report)
        files = _write_tables(out_dir, {**tables.frames, "molecules": _molecule_table(study.trials, molecules, scored.errors)})

        report("figures", 0, 1)
        figures = draw_figures(out_dir, study.trials, tables.trials, tables.scores, tables.correlations, tables.ablation)
        answer = gather_findings(runs, context, tables, out_dir)
        figures.update(umap_drawing.figures())
    files.update({name: path for name, (path, _) in figures.items()})
    files.update({name: path for name, (path, _) in answer.figures.items()})
    files.update(_write_tables(out_dir, {"importance": answer.importance, "pareto": answer.pareto}))
    # The findings as plain text, one sentence per line: what a results README quotes.
    files["findings"] = out_dir / "findings.txt"
    files["findings"].write_text("\n".join(answer.sentences) + "\n")
    report("figures", 1, 1)
    warnings = [*notes, *tables.learned]
    summary = study_summary(experiment, parent_run_id, study, tables.trials, tables.compared, skipped, settings)
    shown = {name: Figure(name, path, caption) for name, (path, caption) in {**figures, **answer.figures}.items()}
    files["report"] = write_report(
        out_dir / "report.html",
        title=f"irrep-study analysis: {experiment}",
        lede=f"{summary['trials analysed']}; compared across the study: {summary['compared across the study']}.",
        warnings=warnings,
        sections=[
            *answer.sections(shown),
            *report_sections(
                tables.trials,
                tables.configurations,
                tables.scores,
                tables.correlations,
                tables.ablation,
                tables.within,
                shown,
                notes,
                summary,
            ),
        ],
    )

    outcome = AnalysisOutcome(
        out_dir,
        study,
        tables.trials,
        tables.scores,
        tables.correlations,
        tables.ablation,
        tables.configurations,
        warnings,
        files,
        None,
        answer.sentences,
    )
    if settings.log_to_mlflow:
        report("logging to MLflow", 0, 1)
        outcome.analysis_run_id = log_analysis_run(outcome, settings, time.perf_counter() - started)
        report("logging to MLflow", 1, 1)
    return outcome


@dataclass
class _Scored:
    """Every trial's block scores and its per-molecule errors."""

    score_rows: list[dict] = field(default_factory=list)  # run_id, block, score, value
    projections: dict = field(default_factory=dict)  # run id -> (score result, nsps) for the UMAP figures
    knockout_maes: dict = field(default_factory=dict)  # run id -> (knockout baseline MAE, composition MAE)
    within: list[pd.DataFrame] = field(default_factory=list)  # per trial: |error| vs each descriptor
    errors: dict[str, pd.Series] = field(default_factory=dict)  # run id -> |error| (meV) by mol_id


def _score_trials(
    trials: list[Trial],
    molecules: pd.DataFrame,
    settings: AnalysisSettings,
    tracking_uri: str,
    qm9_cache_dir: Path | None,
    log: Callable[[str], None],
    report: Progress,
    executor: Executor | None = None,
) -> _Scored:
    """Every trial's scores: read back where its run keeps them for these settings, the others
    computed (``settings.workers`` at a time) and kept with their runs as each one finishes."""
    own = [molecules.loc[t.embeddings.smiles.tolist()].reset_index(drop=True) for t in trials]  # each trial's test molecules
    jobs = [ScoringJob(t, table["nsps"].to_numpy(dtype=np.float64)) for t, table in zip(trials, own)]
    scores: dict[int, TrialScores] = {}
    kept = KeptScores(store.client(tracking_uri), score_key(settings.scores, settings.knockout)) if settings.reuse_scores else None
    changed: list[str] = []
    if kept is not None:
        for index, trial in enumerate(trials):
            report("reading kept scores", index, len(trials))
            found, difference = kept.read(trial.run_id)
            if found is not None:
                scores[index] = found
            elif difference:
                changed.append(difference)
    todo = [index for index in range(len(trials)) if index not in scores]
    reused = f"{len(scores)} read back from their MLflow runs, " if kept is not None else ""
    if not todo:
        at_a_time = ""
    elif executor is not None:
        at_a_time = " (as tasks on the Ray cluster)"
    else:
        at_a_time = f" ({min(settings.workers, len(todo))} at a time)"
    log(f"scores of {len(trials)} trials: {reused}{len(todo)} to compute{at_a_time}")
    if changed:
        log(f"{len(changed)} of them kept scores of other settings, recomputed ({'; '.join(sorted(set(changed)))})")
    finished = 0
    report("scoring", 0, len(todo))

    def on_scored(position: int, result: TrialScores) -> None:
        nonlocal finished
        index = todo[position]
        scores[index] = result
        if kept is not None:
            try:
                kept.write(trials[index].run_id, result)
            except Exception as exc:  # a read-only store still gets its analysis, only slower next time
                log(f"could not keep the scores of {trials[index].label} in MLflow ({type(exc).__name__}: {str(exc)[:200]})")
        finished += 1
        report(f"scored {trials[index].label}", finished, len(todo))

    score_trials(
        [jobs[index] for index in todo], settings.scores, settings.knockout, settings.workers, qm9_cache_dir, on_scored, log, executor
    )

    scored = _Scored()
    for index, (trial, job) in enumerate(zip(trials, jobs)):
        result = scores[index]
        scored.knockout_maes[trial.run_id] = result.knockout_maes
        scored.projections[trial.run_id] = (result, job.nsps)
        for block, values in result.values.items():
            for score in ALL_SCORES:
                if score in values:
                    scored.score_rows.append({"run_id": trial.run_id, "block": block, "score": score, "value": values[score]})
        abs_error = np.abs(trial.embeddings.prediction - trial.embeddings.target) * 1000.0
        per_descriptor = molecule_correlations(abs_error, own[index])
        per_descriptor.insert(0, "run_id", trial.run_id)
        per_descriptor.insert(1, "label", trial.label)
        scored.within.append(per_descriptor)
        scored.errors[trial.run_id] = pd.Series(abs_error, index=trial.embeddings.mol_id)
    return scored


@dataclass
class StudyTables:
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
        return {
            "ablation": self.ablation,
            "configurations": self.configurations,
            "scores": self.scores,
            "configuration_scores": self.configuration_scores,
            "correlations": self.correlations,
            "trials": self.trials,
            "within_trial": self.within,
        }


def _tables(
    study: Study,
    scored: _Scored,
    runs: pd.DataFrame,
    context: list[str],
    settings: AnalysisSettings,
    log: Callable[[str], None],
    report: Progress,
) -> StudyTables:
    """Per trial, per configuration and per score: the study's tables, the statistics among them."""
    trial_table = _trial_table(study.trials, runs, context, complete_configurations(runs), scored.knockout_maes)
    compared = trial_table[trial_table["in_comparisons"]]
    if compared["configuration"].nunique() < 3:
        log(
            f"{compared['configuration'].nunique()} configuration(s) with every seed completed: correlations across "
            "configurations need at least 3; per-trial scores are still written"
        )
    scores = pd.DataFrame(scored.score_rows).merge(
        trial_table[["run_id", "run_name", "label", "configuration", TEST_MAE, "num_params"]], on="run_id"
    )
    scores = scores[["run_id", "run_name", "label", "configuration", "block", "score", "value", TEST_MAE, "num_params"]]
    report("correlations", 0, 1)
    correlations = correlate_scores(scores, compared, n_boot=settings.n_boot, n_perm=settings.n_perm, seed=settings.scores.seed)
    ablation = ablation_effects(compared, context, errors=scored.errors)
    report("correlations", 1, 1)
    configurations = survival_table(runs).merge(
        configuration_summary(trial_table, SUMMARY_METRICS), on="configuration", how="left", suffixes=("", "_completed")
    )
    configurations = configurations.drop(columns=["n_trials_completed"])
    learned = baseline_notes(configurations.dropna(subset=["test_mae_meV_mean"]))
    for note in learned:
        log(note)
    configuration_scores = (
        scores.groupby(["configuration", "block", "score"])["value"].agg(mean="mean", sd="std", n_trials="count").reset_index()
    )
    return StudyTables(
        trial_table,
        compared,
        scores,
        correlations,
        ablation,
        configurations,
        configuration_scores,
        pd.concat(scored.within, ignore_index=True),
        learned,
    )


def _write_tables(out_dir: Path, frames: dict[str, pd.DataFrame]) -> dict[str, Path]:
    files = {}
    for name, frame in frames.items():
        files[name] = out_dir / f"{name}.csv"
        frame.to_csv(files[name], index=False)
    return files


def _molecule_table(trials: list[Trial], table: pd.DataFrame, error_columns: dict[str, pd.Series]) -> pd.DataFrame:
    """Per test molecule: id, SMILES, target, descriptors, and each trial's |error| (meV)."""
    first: dict[int, tuple[str, float]] = {}
    for trial in trials:
        for mol, smiles, target in zip(
            trial.embeddings.mol_id.tolist(), trial.embeddings.smiles.tolist(), trial.embeddings.target.tolist()
        ):
            first.setdefault(mol, (smiles, target))
    ids = sorted(first)
    frame = pd.DataFrame({"mol_id": ids, "smiles": [first[m][0] for m in ids], "target": [first[m][1] for m in ids]})
    frame = frame.join(table, on="smiles")
    for trial in trials:
        frame[error_column(trial.run_id)] = error_columns[trial.run_id].reindex(ids).to_numpy()
    return frame
