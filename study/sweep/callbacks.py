"""What the driver records of trials it alone sees end (Ray Tune callbacks): a trial stopped by the
scheduler or failed for good, in its MLflow run (through its journal), and on the sweep's parent
run, each time a trial completes, the best trial so far."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from ray.tune import Callback

from study.names import (
    BEST_VAL_MAE,
    COMPLETED,
    FAILED,
    RUNNING,
    STOPPED_EARLY,
    TEST_MAE,
)
from study.tracking import store
from study.tracking.journal import (
    finish_from_driver,
)

# ---------------------------------------------------------------------------- the driver


class TrackTrialEnds(Callback):
    """Statuses only the driver sees: stopped by ASHA, or failed for good after retries; and on the
    sweep's parent run, each time a trial completes, the best trial so far."""

    # A class default: the callback of a sweep started before the parent run id was passed comes
    # back from Ray's saved state (`--resume`) without the attribute, and then logs no best-so-far.
    parent_run_id: str | None = None

    def __init__(self, tracking_uri: str, spool_dir: str, parent_run_id: str | None = None):
        self.tracking_uri = tracking_uri
        self.spool_dir = spool_dir
        self.parent_run_id = parent_run_id

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        if result.get("trial_status") == RUNNING:
            reason = f"stopped by the scheduler after epoch {result.get('epoch')}"
            finish_from_driver(self.tracking_uri, self.spool_dir, trial.trial_id, result.get("mlflow_run_id"), STOPPED_EARLY, reason)
        elif result.get("trial_status") == COMPLETED and self.parent_run_id:
            self.log_best_so_far(trials, trial)

    def log_best_so_far(self, trials, trial) -> None:
        progress = best_so_far(trials, trial)
        if progress is None:
            return
        step, metrics = progress
        try:
            store.log_best_so_far(self.tracking_uri, self.parent_run_id, step, metrics)
        except Exception as exc:
            # Skipped, not journaled: the next completed trial logs the best over all completed
            # trials again, so a lost point leaves a gap in the chart, not a wrong value; the
            # trials' own runs (journaled) keep every number this is computed from.
            print(
                f"sweep parent run: best-so-far metrics after {step} completed trials not logged "
                f"({type(exc).__name__}); the tracking server did not take them",
                file=sys.stderr,
            )

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = (trial.last_result or {}).get("mlflow_run_id")
        finish_from_driver(self.tracking_uri, self.spool_dir, trial.trial_id, run_id, FAILED, _error_line(trial))


def best_so_far(trials, completing) -> tuple[int, dict[str, float]] | None:
    """(trials completed, the parent run's metrics) once `completing` has completed: the lowest best
    validation MAE over completed trials and that trial's test MAE (chosen on validation, never on
    test). Counted from Tune's trial states, which `--resume` restores, so a resumed sweep goes on
    from its count. At `on_trial_complete` the trial is still RUNNING for Tune, so it is counted
    by identity. None when no completed trial has a finite validation MAE."""

    def completed(candidate) -> bool:
        return candidate.status == "TERMINATED" and (candidate.last_result or {}).get("trial_status") == COMPLETED

    done = [t for t in trials if t is completing or completed(t)]
    if not any(t is completing for t in done):
        done.append(completing)
    measured = [t for t in done if finite_or_none((t.last_result or {}).get(BEST_VAL_MAE)) is not None]
    if not measured:
        return None
    best = min(measured, key=lambda t: t.last_result[BEST_VAL_MAE]).last_result
    metrics = {BEST_VAL_MAE: float(best[BEST_VAL_MAE]), "trials_finished": float(len(done))}
    test = finite_or_none(best.get(TEST_MAE))
    if test is not None:
        metrics["best_trial_test_mae_meV"] = test
    return len(done), metrics


def _error_line(trial) -> str:
    error_file = getattr(trial, "error_file", None)
    try:
        lines = [line for line in Path(error_file).read_text().splitlines() if line.strip()]
        return lines[-1][:500] if lines else "trial failed"
    except (TypeError, OSError):
        return "trial failed"


def finite_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
