"""The analysis as an MLflow run: nested under the sweep it analysed, with the report and tables as
artifacts, summary metrics, the settings as params, and the findings as the run's description
(so the experiment page says what the study found)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from analysis.report.findings import SIGNIFICANCE

if TYPE_CHECKING:
    from analysis.pipeline import AnalysisOutcome, AnalysisSettings

import math
import time
from dataclasses import asdict

from analysis.load import Study
from analysis.report import findings as found
from analysis.stats.ablation import (
    headline_estimates,
)
from study.tracking import store


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
        # The report's findings count them the same way (analysis/report/findings.py).
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
    return store.log_analysis_run(
        study.tracking_uri,
        study.experiment_id,
        f"analysis {time.strftime('%Y%m%d-%H%M%S')}",
        study.parent_run_id,
        params,
        metrics,
        outcome.out_dir,
        nest_under=analysed_sweep(study),
        description=run_description(outcome),
    )


DESCRIPTION_CHARACTERS = 5000  # MLflow caps a tag's value (the description is one); the report has everything


def run_description(outcome: AnalysisOutcome) -> str:
    """The analysis run's description in MLflow (Markdown): the findings, then what limits them,
    and where the whole report is, so the run's page says what the study found."""
    trials = outcome.trials
    lines = [
        f"**Findings** of {len(trials)} completed trials in {trials['configuration'].nunique()} configurations (irrep-study analyze):",
        "",
        *(f"- {sentence}" for sentence in outcome.findings),
    ]
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
