"""Which trials finished, per configuration: survivorship, stated instead of silently analysed.

Only completed trials have test metrics and embeddings. Trials that ASHA stopped, that diverged
or that failed are not a random sample: a configuration whose weak seed was stopped looks better
than it is if only its surviving seed is averaged. So comparisons across configurations
(correlations, ablation effects) use only the configurations whose seeds all completed, and the
report says which configurations that drops and why. A study run with an early-stopping scheduler
gets a warning in any case: its completed trials are the ones the scheduler liked.

Reads every trial run of the study from MLflow (analysis/load.py keeps only the completed ones).
"""

from __future__ import annotations

import math

import pandas as pd

from analysis.load import Study
from study.config.configuration import REPLICATE_PARAM, label_configurations
from study.names import (
    BASELINE_TEST_MAE,
    BASELINE_VAL_MAE,
    BEST_VAL_MAE,
    COMPLETED,
    STOPPED_EARLY,
    TEST_MAE,
    VAL_MAE,
)
from study.tracking import store
from study.tracking.store import PARENT_TAG, STATUS_TAG

COMPLETED = COMPLETED
# val_mae_meV: the last validation MAE a run logged, which early-stopped runs have too.
RUN_METRICS = (TEST_MAE, BEST_VAL_MAE, VAL_MAE, BASELINE_TEST_MAE, BASELINE_VAL_MAE, "num_params")
EARLY_STOPPING_SCHEDULERS = ("asha",)


def trial_runs(study: Study) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Every trial run of the study's scope, any status: a table, the varying context parameters,
    and the schedulers of the sweeps the runs came from (from the sweep runs' ``scheduler`` param)."""
    runs = store.child_runs(study.tracking_uri, study.experiment_id, study.parent_run_id)
    runs.sort(key=lambda run: (run.info.start_time or 0, run.info.run_id))
    records = [
        {
            "run_id": run.info.run_id,
            "status": run.data.tags.get(STATUS_TAG, "unknown"),
            "params": dict(run.data.params),
            "metrics": dict(run.data.metrics),
        }
        for run in runs
    ]
    table, context = run_table(records)
    parents = {run.data.tags.get(PARENT_TAG) for run in runs} - {None}
    sweeps = store.sweep_runs(study.tracking_uri, study.experiment_id)
    # A deleted sweep run is absent: its trials are still analysed.
    schedulers = sorted({sweeps[parent].data.params.get("scheduler", "") for parent in parents if parent in sweeps} - {""})
    return table, context, schedulers


def run_table(records: list[dict]) -> tuple[pd.DataFrame, list[str]]:
    """One row per run from ``{run_id, status, params, metrics}`` records: configuration label,
    seed, status, the varying parameters (typed) and the run's final metrics (NaN when absent)."""
    labels, context = label_configurations([r["params"] for r in records])
    table = labels.copy()
    table.insert(0, "run_id", [r["run_id"] for r in records])
    table.insert(2, "seed", [r["params"].get(REPLICATE_PARAM, "") for r in records])
    table.insert(3, "status", [r["status"] for r in records])
    for metric in RUN_METRICS:
        table[metric] = [_finite(r["metrics"].get(metric)) for r in records]
    return table, context


def _finite(value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def survival_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per configuration: trials, completed trials, the other statuses, and whether all completed."""
    rows = []
    for configuration, group in runs.groupby("configuration", sort=False):
        counts = group["status"].value_counts()
        others = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()) if status != COMPLETED)
        rows.append(
            {
                "configuration": configuration,
                "n_trials": len(group),
                "n_completed": int(counts.get(COMPLETED, 0)),
                "not_completed": others,
                "all_completed": bool(counts.get(COMPLETED, 0) == len(group)),
            }
        )
    return pd.DataFrame(rows, columns=["configuration", "n_trials", "n_completed", "not_completed", "all_completed"])


def complete_configurations(runs: pd.DataFrame) -> set[str]:
    """Configurations whose every trial completed: the ones comparisons across the study use."""
    table = survival_table(runs)
    return set(table.loc[table["all_completed"], "configuration"])


def survival_notes(runs: pd.DataFrame, schedulers: list[str]) -> list[str]:
    """Plain sentences for the report: what did not finish, what that drops, early stopping."""
    notes = []
    table = survival_table(runs)
    statuses = runs["status"].value_counts()
    unfinished = {status: int(n) for status, n in statuses.items() if status != COMPLETED}
    if unfinished:
        listed = ", ".join(f"{n} {status}" for status, n in sorted(unfinished.items()))
        notes.append(f"{sum(unfinished.values())} of {len(runs)} trials did not complete ({listed}).")
    dropped = table[~table["all_completed"] & (table["n_completed"] > 0)]
    if len(dropped):
        notes.append(
            f"{len(dropped)} configuration(s) with some but not all seeds completed are left out of the correlations and "
            f"ablation effects ({int(dropped['n_completed'].sum())} completed trials not used): "
            + "; ".join(f"{row.configuration} ({row.not_completed})" for row in dropped.itertuples())
        )
    none_done = table[table["n_completed"] == 0]
    if len(none_done):
        notes.append(f"{len(none_done)} configuration(s) have no completed trial at all.")
    stopped = int(statuses.get(STOPPED_EARLY, 0))
    early = [s for s in schedulers if s in EARLY_STOPPING_SCHEDULERS]
    if stopped or early:
        notes.append(
            "WARNING: this study used early stopping"
            + (f" ({', '.join(early)})" if early else "")
            + (f"; {stopped} trial(s) were stopped" if stopped else "")
            + ": the completed configurations are the ones the scheduler kept, selected on validation error, so effects "
            "and correlations describe the survivors, not every configuration the search proposed."
        )
    return notes
