"""A sweep from start to report: `run_sweep` opens the sweep folder (new, or reopened by
`--resume`), builds Ray Tune's Tuner (searcher, seed-aware scheduler, callbacks, the trainable),
runs it while watching for Ctrl-C, and reports every trial's row with the best by validation.
Optuna (or a grid) proposes trial configs, a seed-aware ASHA stops the weak configurations early
(all their seeds at the same epoch; study/sweep/seed_groups.py), and each trial trains with
study.training.trial and logs itself to MLflow from its own process.

Layout of one sweep's folder (`--storage`/<name>-<time>/): Ray Tune's experiment state (so
`Tuner.restore` and `ExperimentAnalysis` read it), the trials' checkpoints, and
`irrep_study_sweep.json` naming the MLflow experiment and parent run (study/sweep/folder.py).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ray.tune import Callback

from study.config.space import SearchSpace
from study.data.qm9 import QM9Tensors
from study.names import (
    BASELINE_TEST_MAE,
    BEST_VAL_MAE,
    FAILED,
    INTERRUPTED,
    RUNNING,
    STOPPED_EARLY,
    TEST_MAE,
    VAL_MAE,
)
from study.sweep.callbacks import TrackTrialEnds, finite_or_none
from study.sweep.folder import (
    check_optuna_storage,
    fail_orphaned_optuna_trials,
    new_sweep,
    reopen_sweep,
)
from study.sweep.scheduling import live_trial_limit, scheduler_for
from study.sweep.search import searcher_and_space
from study.sweep.status import SweepStatus
from study.sweep.trainable import SweepContext, run_sweep_trial
from study.tracking import store
from study.tracking.journal import (
    SweepRecord,
    finish_tracking,
    write_state,
)

SIGINT_REASON = (
    "interrupted: the sweep's driver was stopped (SIGINT, Ctrl-C) while this trial ran; "
    "`irrep-study sweep SPACE.yaml --resume` continues it from its last checkpoint"
)


@dataclass
class SweepOutcome:
    path: Path
    experiment: str
    experiment_id: str
    parent_run_id: str
    tracking_uri: str
    trials: list[dict]
    unsynced: int = 0  # trial journals the tracking server has not taken yet (see `irrep-study sync`)
    interrupted: bool = False  # stopped by SIGINT: `--resume` continues it
    optuna_storage: str | None = None  # where the Optuna study is (optuna sweeps)
    optuna_study: str | None = None

    def to_dict(self) -> dict:
        # Chosen on validation, never on test (docs/analysis.md): the test MAE is only reported.
        finished = [t for t in self.trials if t.get(BEST_VAL_MAE) is not None and t.get(TEST_MAE) is not None]
        best = min(finished, key=lambda t: t[BEST_VAL_MAE]) if finished else None
        return {
            "path": str(self.path),
            "experiment": self.experiment,
            "experiment_id": self.experiment_id,
            "parent_run_id": self.parent_run_id,
            "tracking_uri": store.redact(self.tracking_uri),
            "trials": self.trials,
            "best": best,
            "unsynced_trials": self.unsynced,
            INTERRUPTED: self.interrupted,
            "optuna_storage": self.optuna_storage and store.redact(self.optuna_storage),
            "optuna_study": self.optuna_study,
        }


def run_sweep(
    space: SearchSpace,
    tensors: QM9Tensors,
    tracking_uri: str,
    experiment: str,
    storage: Path,
    address: str | None = None,
    resume: bool = False,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
    verbose: bool = False,
    optuna_storage: str | None = None,
) -> SweepOutcome:
    """Run (or with `resume`, continue) the study `space`; every trial ends up in MLflow.

    SIGINT (Ctrl-C) stops it cleanly: Ray Tune saves its state and stops the trials, their MLflow
    runs end as `interrupted` (KILLED) with the reason, and the outcome says `interrupted`.

    An Optuna search keeps its study in `optuna_storage` (an Optuna RDB URL, e.g. a database the
    whole cluster shares), by default in `optuna.db` in the sweep's folder; the study is named
    after the folder. `--resume` continues the same study (Ray saved the searcher with its URL)."""
    storage = Path(storage).resolve()
    store.fail_fast()
    check_optuna_storage(space, resume, optuna_storage)
    if resume:
        record = reopen_sweep(storage, space, tracking_uri, log)
    else:
        record = new_sweep(storage, space, tracking_uri, experiment, log, optuna_storage)
    tuner = _tuner(space, tensors, tracking_uri, record, resume, show_progress, verbose)
    with _watching_for_interruption() as interruption:
        results = tuner.fit()

    unfinished = _unfinished_trials(record.path) if interruption.happened else set()
    trials = [_trial_row(result, unfinished) for result in results]
    outcome = SweepOutcome(
        record.path,
        record.experiment,
        record.experiment_id,
        record.parent_run_id,
        tracking_uri,
        trials,
        interrupted=interruption.happened,
        optuna_storage=record.optuna_storage,
        optuna_study=record.optuna_study,
    )
    if outcome.interrupted:
        # The sweep stays unfinished, so that `--resume` finds it.
        outcome.unsynced = _end_interrupted(tracking_uri, record, len(unfinished), log)
        return outcome
    write_state(record, space, tracking_uri, finished=True)
    fail_orphaned_optuna_trials(record, log)
    # One pass: replay the trials' journals, then (only when nothing is left pending) end orphaned
    # runs and the parent run.
    outcome.unsynced = finish_tracking(tracking_uri, record, log, final=True)
    return outcome


def _tuner(
    space: SearchSpace, tensors: QM9Tensors, tracking_uri: str, record: SweepRecord, resume: bool, show_progress: bool, verbose: bool
):
    from ray import tune

    spool_dir = record.path / "tracking_journal"
    context = SweepContext(space.model_dump(mode="json"), tracking_uri, record.experiment_id, record.parent_run_id, str(spool_dir))
    trainable = tune.with_resources(
        tune.with_parameters(run_sweep_trial, tensors=tensors, context=context),
        {"cpu": space.resources.cpus_per_trial, "gpu": space.resources.gpus_per_trial},
    )
    if resume:
        # The run config, callbacks included, comes back from Ray's saved experiment state.
        return tune.Tuner.restore(str(record.path), trainable=trainable, resume_unfinished=True, resume_errored=True)
    callbacks: list[Callback] = [TrackTrialEnds(tracking_uri, str(spool_dir), record.parent_run_id)] + (
        [SweepStatus(space)] if show_progress else []
    )
    searcher, param_space, num_samples = searcher_and_space(space, verbose, record.optuna_storage, record.optuna_study or "optuna")
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=VAL_MAE,
            mode="min",
            search_alg=searcher,
            scheduler=scheduler_for(space, space.base.epochs),
            num_samples=num_samples,
            max_concurrent_trials=live_trial_limit(space),
            # A new worker process per trial pays torch's and e3nn's imports again (about 10 s on
            # 2 cores, far longer than a short trial); a reused one keeps them. Trials share no
            # state through it: each builds its own model, generators and tracking client.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=record.path.name,
            storage_path=str(record.path.parent),
            failure_config=tune.FailureConfig(max_failures=space.resources.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=callbacks,
            verbose=0,
        ),
    )


@dataclass
class Interruption:
    happened: bool = False


@contextmanager
def _watching_for_interruption() -> Iterator[Interruption]:
    """Whether Ray Tune's `fit` ended on a stop signal (SIGINT, Ctrl-C), which it does not report.

    `fit` installs its own SIGINT handler and puts the earlier one back only when the signal came
    (ray/tune/tune.py, `_setup_signal_catching`); it does so only in the main thread and unless
    TUNE_DISABLE_SIGINT_HANDLER is set. The handler that `fit` leaves installed tells which."""
    before = signal.getsignal(signal.SIGINT)
    tune_catches = threading.current_thread() is threading.main_thread() and not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0"))
    interruption = Interruption()
    try:
        yield interruption
    finally:
        interruption.happened = tune_catches and signal.getsignal(signal.SIGINT) is before
        if tune_catches:
            signal.signal(signal.SIGINT, before)  # a later Ctrl-C is again this process's own


def _unfinished_trials(path: Path) -> set[str]:
    """Trials that Ray Tune's last saved state (what `--resume` continues) holds as neither
    terminated nor errored. Read from the saved state because `fit`'s own trial objects are marked
    terminated while it cleans up."""
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(str(path)).trials
    return {trial.trial_id for trial in trials if trial.status not in ("TERMINATED", "ERROR")}


def _trial_row(result, unfinished: set[str]) -> dict:
    """One trial of the outcome, from its last result."""
    metrics = result.metrics or {}
    status = metrics.get("trial_status", FAILED if result.error else "unknown")
    if result.error:
        status = FAILED
    elif metrics.get("trial_id") in unfinished or (unfinished and not metrics):
        status = INTERRUPTED
    elif status == RUNNING:
        status = STOPPED_EARLY
    return {
        "trial_id": metrics.get("trial_id"),
        "mlflow_run_id": metrics.get("mlflow_run_id"),
        "l_values": metrics.get("l_values"),
        "hidden_dim": metrics.get("hidden_dim"),
        "seed": metrics.get("seed"),
        "status": status,
        "epochs": metrics.get("epoch"),
        VAL_MAE: finite_or_none(metrics.get(VAL_MAE)),
        BEST_VAL_MAE: finite_or_none(metrics.get(BEST_VAL_MAE)),
        TEST_MAE: finite_or_none(metrics.get(TEST_MAE)),
        BASELINE_TEST_MAE: finite_or_none(metrics.get(BASELINE_TEST_MAE)),
    }


def _end_interrupted(uri: str, record: SweepRecord, unfinished: int, log: Callable[[str], None]) -> int:
    """After a stop signal: write the trials' journals, then end every trial run still running and
    the parent run as `interrupted` with the reason. Returns the trial journals still pending."""
    pending = finish_tracking(uri, record, log)
    if pending:
        return pending  # the server takes no writes: the runs stay RUNNING until `--resume` continues them
    try:
        stopped = store.end_running_trials(uri, record.experiment_id, record.parent_run_id, SIGINT_REASON)
        store.finish_run(store.client(uri), record.parent_run_id, INTERRUPTED, SIGINT_REASON)
    except Exception as exc:
        log(f"could not end the interrupted runs ({type(exc).__name__}); `--resume` continues them all the same")
        return 1
    log(f"interrupted: {unfinished} trial(s) left unfinished, {stopped} running MLflow run(s) ended as interrupted (KILLED)")
    return 0
