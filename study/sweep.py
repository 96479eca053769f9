"""A study on Ray Tune: Optuna (or a grid) proposes trial configs, a seed-aware ASHA stops the weak
configurations early (all their seeds at the same epoch; study/seed_groups.py), each trial trains
with study.train and logs itself to MLflow from its own process.

The only module that knows Ray. Layout of one sweep's folder (`--storage`/<name>-<time>/):
Ray Tune's experiment state (so `Tuner.restore` and `ExperimentAnalysis` read it), the trials'
checkpoints, and `irrep_study_sweep.json` naming the MLflow experiment and parent run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

from ray.tune import Callback
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Repeater

from study import seed_groups, tracking
from study import journal
from study.journal import SWEEP_FILE, SweepRecord, finish_from_driver, finish_tracking, latest_unfinished, write_state
from study.data import QM9Tensors
from study.errors import UserError
from study.reference import TargetReference
from study.space import OptunaSpace, SearchSpace, trial_overrides

METRIC = "val_mae_meV"


@dataclass(frozen=True)
class SweepContext:
    """What every trial needs besides its config; small, so it travels with each trial."""

    space: dict  # SearchSpace.model_dump()
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    spool_dir: str  # tracking journals of trials whose writes the server could not take


# ---------------------------------------------------------------------------- the trial


def run_sweep_trial(params: dict[str, Any], tensors: QM9Tensors, context: SweepContext) -> None:
    """Ray Tune function trainable: one trial, resumable from its last Tune checkpoint."""
    import ray
    import torch
    from ray import tune

    from study.train import cpu_fallback_warning, run_trial

    space = SearchSpace.model_validate(context.space)
    seed = space.seed_list[params.get("__trial_index__", 0)] if "seed" not in params else int(params["seed"])
    config = space.trial_config(trial_overrides(params), seed)
    torch.set_num_threads(max(1, int(space.resources.cpus_per_trial)))

    tracking.fail_fast()
    trial_id = tune.get_context().get_trial_id()
    l_text = ",".join(map(str, config.l_values))
    run = journal.TrialRun(
        context.tracking_uri, context.experiment_id, context.parent_run_id, trial_id,
        run_name=f"{trial_id} l={l_text} h={config.hidden_dim} seed={seed}", spool_dir=Path(context.spool_dir),
    )
    # Where the trial runs, beside its config: the GPUs Ray gave it ("" for none), and when
    # `device: auto` cannot use them, the warning that it trains on the CPU instead.
    placement = {"ray_gpu_ids": ",".join(str(i) for i in ray.get_gpu_ids())}
    fallback = cpu_fallback_warning(config.device)
    if fallback is not None:
        placement["device_warning"] = fallback
    run.log_params({**config.flat_params(), **placement})
    identity = {"l_values": l_text, "hidden_dim": config.hidden_dim, "seed": seed, "mlflow_run_id": run.run_id}

    work = Path(tempfile.mkdtemp(prefix=f"irrep-study-{trial_id}-"))
    resumed = _restore_checkpoint(tune.get_checkpoint(), work, trial_id)
    last_epoch = {}

    def on_epoch(metrics) -> None:
        run.log_epoch(metrics.epoch, metrics.tracked())
        last_epoch.update(epoch=metrics.epoch, **metrics.tracked())
        if metrics.epoch < config.epochs:  # the last epoch is reported with the test result below
            report = {**identity, **last_epoch, "trial_status": "running"}
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(str(work)))

    try:
        result = run_trial(config, work, tensors=tensors, resume=resumed, on_epoch=on_epoch)
        if result.status == "diverged":
            reason = f"{result.reason} at epoch {result.diverged_epoch}"
            run.finish("diverged", reason)
            # The searcher is told with the worst value, so it steers away from here.
            tune.report({**identity, "epoch": result.diverged_epoch, METRIC: math.inf, "trial_status": "diverged"})
            return
        final = {metric: getattr(result, metric) for metric in tracking.FINAL_METRICS}
        run.log_params(TargetReference.from_dict(result.reference).flat_params())
        run.log_final(final, work)
        run.finish("completed")
        tune.report({**identity, **last_epoch, **final, "trial_status": "completed"})
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _restore_checkpoint(checkpoint, work: Path, trial_id: str) -> bool:
    """Copy the trial's last Tune checkpoint into `work`; False when there is none to continue from.

    A driver killed between Ray's experiment snapshot and its next one can leave the snapshot
    pointing at a checkpoint that `num_to_keep` has since deleted. The trial then starts over
    (training is seeded, so it logs the same epochs, which the journal does not log twice)
    instead of failing every retry on the missing file."""
    if checkpoint is None:
        return False
    try:
        with checkpoint.as_directory() as saved:
            shutil.copy(Path(saved) / "checkpoint.pt", work / "checkpoint.pt")
        return True
    except OSError as problem:
        print(f"trial {trial_id}: its last checkpoint is unreadable ({problem}); starting it over", file=sys.stderr)
        return False


# ---------------------------------------------------------------------------- the driver


class TrackTrialEnds(Callback):
    """Statuses only the driver sees: stopped by ASHA, or failed for good after retries."""

    def __init__(self, tracking_uri: str, spool_dir: str):
        self.tracking_uri = tracking_uri
        self.spool_dir = spool_dir

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        if result.get("trial_status") == "running":
            reason = f"stopped by the scheduler after epoch {result.get('epoch')}"
            finish_from_driver(self.tracking_uri, self.spool_dir, trial.trial_id, result.get("mlflow_run_id"), "stopped_early", reason)

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = (trial.last_result or {}).get("mlflow_run_id")
        finish_from_driver(self.tracking_uri, self.spool_dir, trial.trial_id, run_id, "failed", _error_line(trial))


class ProgressTable(Callback):
    """A table of every trial (l values, seed, epoch, validation MAE, status) on stderr, every few seconds."""

    def __init__(self, every_seconds: float = 10.0, quiet_seconds: float = 120.0):
        self.every_seconds = every_seconds  # at most this often
        self.quiet_seconds = quiet_seconds  # and when nothing changed, only this often
        self.last = 0.0
        self.last_rows: list[dict] = []

    @staticmethod
    def rows(trials) -> list[dict]:
        rows = []
        for trial in trials:
            result = trial.last_result or {}
            status = trial.status.lower()
            if trial.status == "TERMINATED":
                status = {"running": "stopped_early"}.get(result.get("trial_status"), result.get("trial_status", "done"))
            rows.append({
                "trial": trial.trial_id,
                "l_values": result.get("l_values") or (trial.config or {}).get("l_values", ""),
                "seed": result.get("seed", ""),
                "epoch": result.get("epoch", 0),
                METRIC: result.get(METRIC),
                "status": status,
            })
        return rows

    def render(self, trials) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"trials ({datetime.now():%H:%M:%S})", title_justify="left")
        for column in ("trial", "l_values", "seed", "epoch", "val MAE (meV)", "status"):
            table.add_column(column)
        for row in self.rows(trials):
            value = row[METRIC]
            shown = f"{value:.1f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"
            table.add_row(row["trial"], str(row["l_values"]), str(row["seed"]), str(row["epoch"]), shown, row["status"])
        Console(stderr=True, width=100).print(table)

    def on_step_end(self, iteration, trials, **info):
        since = time.monotonic() - self.last
        if since < self.every_seconds:
            return
        rows = self.rows(trials)
        if rows != self.last_rows or since > self.quiet_seconds:
            self.last, self.last_rows = time.monotonic(), rows
            self.render(trials)

    def on_experiment_end(self, trials, **info):
        self.render(trials)


def _error_line(trial) -> str:
    error_file = getattr(trial, "error_file", None)
    try:
        lines = [line for line in Path(error_file).read_text().splitlines() if line.strip()]
        return lines[-1][:500] if lines else "trial failed"
    except (TypeError, OSError):
        return "trial failed"


# ---------------------------------------------------------------------------- seeds, searcher, scheduler


class SeedRepeater(Repeater):
    """Ray's Repeater (one searcher proposal trained once per seed, the searcher told the mean over
    seeds), telling the searcher each seed's value at the epoch where the seed ended.

    Tune gives `on_trial_complete` no result for a trial stopped while paused (SeedAwareASHA stops
    the paused seeds of a configuration together with the one whose result decided it); Repeater
    would count such a seed as NaN and average the others alone. The last result each seed
    reported is remembered instead. A seed that failed for good counts as missing; the proposal is
    a failure for the searcher only when all its seeds failed."""

    def __init__(self, searcher, repeat: int = 1, set_index: bool = True):
        super().__init__(searcher, repeat=repeat, set_index=set_index)
        self._last_values: dict[str, float] = {}  # trial id -> metric of its last result

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.searcher.metric in result:
            self._last_values[trial_id] = result[self.searcher.metric]

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False, **kwargs) -> None:
        group = self._trial_id_to_group.get(trial_id)
        last = self._last_values.pop(trial_id, None)
        if group is None:
            return
        metric = self.searcher.metric
        if result and metric in result:
            value = result[metric]
        elif not error and last is not None:
            value = last
        else:
            value = math.nan
        group.report(trial_id, value)
        if group.finished_reporting():
            values = [v for v in group.scores() if not math.isnan(v)]
            if values:
                mean = math.fsum(values) / len(values) if all(math.isfinite(v) for v in values) else math.inf
                self.searcher.on_trial_complete(group.primary_trial_id, result={metric: mean})
            else:
                self.searcher.on_trial_complete(group.primary_trial_id, result=None, error=True)


class SeedAwareASHA(FIFOScheduler):
    """ASHA over configurations instead of trials: Ray Tune's side of study.seed_groups.

    A trial that reaches a rung before the other seeds of its configuration is paused (it resumes
    from its last checkpoint, in the same MLflow run); when the last live seed gets there, the
    group continues (the paused seeds are released) or stops (the paused seeds are stopped with
    it, so every stopped seed ends at the same epoch). Trials are grouped by their config without
    the seed keys (`seed`, `__trial_index__`), so Optuna proposals repeated by a Repeater and grid
    entries crossed with seeds group alike."""

    _supports_buffered_results = False  # a paused trial must not have trained past its rung

    def __init__(self, max_t: int, grace_period: int, reduction_factor: float, group_size: int,
                 time_attr: str = "epoch", status_key: str = "trial_status", running: str = "running",
                 metric: str | None = None, mode: str | None = None):
        super().__init__()
        self._max_t = max_t
        self._rungs = seed_groups.rungs(grace_period, reduction_factor, max_t)
        self._reduction_factor = reduction_factor
        self._group_size = group_size
        self._time_attr = time_attr
        self._status_key, self._running = status_key, running
        self._metric, self._mode = metric, mode
        self.groups: seed_groups.SeedGroups | None = None
        self._stopped_by_us: set[str] = set()
        self._to_stop: set[str] = set()  # seeds to stop once Tune has finished pausing them
        self._closed = False
        self._settled = True  # False after a resumed sweep restored trials, until settle() ran
        if mode is not None:
            self._make_groups()

    def _make_groups(self) -> None:
        if self.groups is None:
            self.groups = seed_groups.SeedGroups(self._rungs, self._group_size, self._reduction_factor, self._mode)

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        if (self._metric and metric and metric != self._metric) or (self._mode and mode and mode != self._mode):
            return False
        self._metric = self._metric or metric
        self._mode = self._mode or mode
        if not self._metric or self._mode not in ("min", "max"):
            return False
        self._make_groups()
        return True

    def on_trial_add(self, tune_controller, trial) -> None:
        from ray.tune.experiment import Trial

        last = trial.last_result or {}
        if trial.status == Trial.TERMINATED:  # restored by --resume
            state = "stopped" if last.get(self._status_key) == self._running else "finished"
        elif trial.status == Trial.ERROR:
            state = "dropped"
        else:
            state = "live"
        held = self.groups.add(trial.trial_id, trial.config, state, last.get(self._time_attr), last.get(self._metric))
        if held and trial.status == Trial.PENDING:
            # Restored while it waited at a rung: Tune would start it and it would train past the
            # rung undecided. It stays paused (its checkpoint is the rung's) until its group decides.
            trial.set_status(Trial.PAUSED)
        if last:
            self._settled = False

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self._time_attr not in result or self._metric not in result:
            return TrialScheduler.CONTINUE
        epoch = result[self._time_attr]
        final = epoch >= self._max_t or result.get(self._status_key, self._running) != self._running
        verdict = self.groups.result(trial.trial_id, epoch, result[self._metric], final=final)
        self._apply(tune_controller, verdict)
        if verdict.trial == seed_groups.STOP:
            if not final:
                self._stopped_by_us.add(trial.trial_id)
            return TrialScheduler.STOP
        return TrialScheduler.PAUSE if verdict.trial == seed_groups.PAUSE else TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        how = "stopped" if trial.trial_id in self._stopped_by_us else "finished"
        self._apply(tune_controller, self.groups.end(trial.trial_id, how, (result or {}).get(self._metric)))

    def on_trial_error(self, tune_controller, trial) -> None:
        self._apply(tune_controller, self.groups.end(trial.trial_id, "dropped"))

    def on_trial_remove(self, tune_controller, trial) -> None:
        how = "stopped" if trial.trial_id in self._stopped_by_us else "dropped"
        self._apply(tune_controller, self.groups.end(trial.trial_id, how))

    def choose_trial_to_run(self, tune_controller):
        from ray.tune.experiment import Trial

        if not self._settled:  # a resumed sweep: stopped groups stop, passed rungs release, ready rungs decide
            self._settled = True
            self._apply(tune_controller, self.groups.settle())
        self._stop_paused(tune_controller)
        if not self._closed and tune_controller.search_alg.is_finished():
            # A group the searcher left short of seeds (it stopped early) must not wait forever.
            self._closed = True
            self._apply(tune_controller, self.groups.close())
        trials = tune_controller.get_trials()
        # Never a paused seed that waits for its group: it would train past the rung undecided.
        for trial in trials:
            if trial.status == Trial.PAUSED and trial.trial_id in self.groups.released:
                return trial
        for trial in trials:
            if trial.status == Trial.PENDING:
                return trial
        return None

    def _apply(self, tune_controller, verdict: seed_groups.Verdict) -> None:
        self._to_stop.update(verdict.stop)  # released seeds need nothing: choose_trial_to_run resumes them
        self._stop_paused(tune_controller)

    def _stop_paused(self, tune_controller) -> None:
        """Stop the seeds a group decision stopped; one Tune is still pausing waits for the next step."""
        from ray.tune.experiment import Trial

        if not self._to_stop:
            return
        for trial in list(tune_controller.get_trials()):
            if trial.trial_id in self._to_stop and trial.status in (Trial.PAUSED, Trial.PENDING):
                self._to_stop.discard(trial.trial_id)
                self._stopped_by_us.add(trial.trial_id)
                tune_controller.stop_trial(trial)
            elif trial.trial_id in self._to_stop and trial.status in (Trial.TERMINATED, Trial.ERROR):
                self._to_stop.discard(trial.trial_id)

    def debug_string(self) -> str:
        return f"Seed-aware ASHA at epochs {self._rungs}: {self.groups.summary() if self.groups else ''}"


def _searcher_and_space(space: SearchSpace, verbose: bool = False):
    from ray import tune

    if space.search.method == "grid":
        # The seed axis is `__trial_index__` (run_sweep_trial maps it to space.seed_list), not `seed`:
        # Tune varies the alphabetically first grid key fastest, so the seeds of one configuration
        # are created one after another, as Repeater creates them. With a concurrency limit and a
        # seed-aware scheduler they must be: a seed paused at a rung waits for its siblings, and
        # siblings queued behind every other configuration could never start.
        param_space = {
            "grid_entry": tune.grid_search(space.search.grid),
            "__trial_index__": tune.grid_search(list(range(len(space.seed_list)))),
        }
        return None, param_space, 1
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    if not verbose:  # "A new study created in memory ...": Optuna's INFO lines only with --verbose
        optuna.logging.set_verbosity(optuna.logging.WARNING)

    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=space.search.seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=space.search.seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=space.search.seed),
    }
    searcher = OptunaSearch(
        space=OptunaSpace(space.search), metric=METRIC, mode="min", sampler=samplers[space.search.sampler]()
    )
    repeats = len(space.seed_list)
    if repeats > 1:
        # Each proposal is trained once per seed; Optuna is told the mean over seeds.
        searcher = SeedRepeater(searcher, repeat=repeats, set_index=True)
    return searcher, {}, space.search.num_samples * repeats


def _scheduler(space: SearchSpace, epochs: int):
    if space.scheduler.type == "none":
        return None
    return SeedAwareASHA(
        max_t=epochs,
        grace_period=min(space.scheduler.grace_period, epochs),
        reduction_factor=space.scheduler.reduction_factor,
        group_size=len(space.seed_list),
    )


def _live_trial_limit(space: SearchSpace) -> int | None:
    """Tune's `max_concurrent_trials`, which counts paused trials too. With the seed-aware
    scheduler, all seeds of a configuration must be able to exist at once (a seed paused at a
    rung waits for the others), so the limit is at least the number of seeds."""
    limit = space.resources.max_concurrent
    if limit is None or space.scheduler.type == "none":
        return limit
    return max(limit, len(space.seed_list))


def connect_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (`auto`, `host:port`, `ray://host:port`), or start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    if address is not None and address != "auto":
        _check_port_open(address)
    # Ray warns on every checkpoint of short trials that snapshots come often; that is by design here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": False}
    try:
        if address is None:
            ray.init(num_cpus=num_cpus, **kwargs)
        else:
            kwargs.pop("include_dashboard")
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UserError(f"--address {address}: cannot connect to the Ray cluster ({reason})") from None


def _check_port_open(address: str, timeout: float = 5.0) -> None:
    """ray.init waits minutes on an address where nothing listens; a plain TCP connect answers at once."""
    import socket

    host_port = address.removeprefix("ray://")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {address}: expected auto, host:port or ray://host:port")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise UserError(f"--address {address}: no Ray cluster answers there ({exc.strerror or type(exc).__name__})") from None


def check_resources(space: SearchSpace) -> None:
    """Refuse a trial that no node of the cluster could ever hold, instead of waiting forever."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    most_cpus = max((n["Resources"].get("CPU", 0) for n in nodes), default=0)
    most_gpus = max((n["Resources"].get("GPU", 0) for n in nodes), default=0)
    wanted = space.resources
    if wanted.gpus_per_trial > most_gpus:
        raise UserError(
            f"resources.gpus_per_trial: {wanted.gpus_per_trial:g} GPUs per trial, but no node of the cluster has more than {most_gpus:g}"
        )
    if wanted.cpus_per_trial > most_cpus:
        raise UserError(
            f"resources.cpus_per_trial: {wanted.cpus_per_trial:g} CPUs per trial, but no node of the cluster has more than {most_cpus:g}"
        )


SIGINT_REASON = ("interrupted: the sweep's driver was stopped (SIGINT, Ctrl-C) while this trial ran; "
                 "`irrep-study sweep SPACE.yaml --resume` continues it from its last checkpoint")


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

    def to_dict(self) -> dict:
        # Chosen on validation, never on test (DESIGN.md): the test MAE is only reported.
        finished = [t for t in self.trials if t.get("best_val_mae_meV") is not None and t.get("test_mae_meV") is not None]
        best = min(finished, key=lambda t: t["best_val_mae_meV"]) if finished else None
        return {
            "path": str(self.path),
            "experiment": self.experiment,
            "experiment_id": self.experiment_id,
            "parent_run_id": self.parent_run_id,
            "tracking_uri": tracking.redact(self.tracking_uri),
            "trials": self.trials,
            "best": best,
            "unsynced_trials": self.unsynced,
            "interrupted": self.interrupted,
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
) -> SweepOutcome:
    """Run (or with `resume`, continue) the study `space`; every trial ends up in MLflow.

    SIGINT (Ctrl-C) stops it cleanly: Ray Tune saves its state and stops the trials, their MLflow
    runs end as `interrupted` (KILLED) with the reason, and the outcome says `interrupted`."""
    storage = Path(storage).resolve()
    tracking.fail_fast()
    if resume:
        record = _reopen_sweep(storage, space, tracking_uri, log)
    else:
        record = _new_sweep(storage, space, tracking_uri, experiment, log)
    tuner = _tuner(space, tensors, tracking_uri, record, resume, show_progress, verbose)
    with _watching_for_interruption() as interruption:
        results = tuner.fit()

    unfinished = _unfinished_trials(record.path) if interruption.happened else set()
    trials = [_trial_row(result, unfinished) for result in results]
    outcome = SweepOutcome(record.path, record.experiment, record.experiment_id, record.parent_run_id,
                           tracking_uri, trials, interrupted=interruption.happened)
    if outcome.interrupted:
        # The sweep stays unfinished, so that `--resume` finds it.
        outcome.unsynced = _end_interrupted(tracking_uri, record, len(unfinished), log)
        return outcome
    write_state(record, space, tracking_uri, finished=True)
    # One pass: replay the trials' journals, then (only when nothing is left pending) end orphaned
    # runs and the parent run.
    outcome.unsynced = finish_tracking(tracking_uri, record, log, final=True)
    return outcome


def _new_sweep(storage: Path, space: SearchSpace, tracking_uri: str, experiment: str, log: Callable[[str], None]) -> SweepRecord:
    """A new sweep folder and its MLflow parent run (the experiment created if missing)."""
    try:
        experiment_id = tracking.ensure_experiment(tracking_uri, experiment)
    except tracking.TrackingError:
        raise
    except Exception as exc:
        raise tracking.TrackingError(
            f"--tracking-uri {tracking.redact(tracking_uri)}: cannot create the sweep's runs ({type(exc).__name__})"
        ) from None
    path = _claim_folder(storage, space.name)
    try:
        parent_run_id = tracking.start_sweep_run(tracking_uri, experiment_id, path.name, space.summary_params())
    except Exception as exc:
        path.rmdir()
        raise tracking.TrackingError(
            f"--tracking-uri {tracking.redact(tracking_uri)}: cannot create the sweep's runs ({type(exc).__name__})"
        ) from None
    record = SweepRecord(path, experiment, experiment_id, parent_run_id)
    write_state(record, space, tracking_uri, finished=False)
    log(f"sweep {path.name}: {space.total_trials} trials; MLflow experiment {experiment!r}, parent run {parent_run_id}")
    return record


def _claim_folder(storage: Path, name: str) -> Path:
    """`<name>-<time>`, created here; two drivers starting the same study in the same second (a
    shared cluster) each get their own folder, the later one with a suffix."""
    stem = f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    for attempt in range(100):
        path = storage / (stem if attempt == 0 else f"{stem}-{attempt + 1}")
        try:
            path.mkdir(parents=True, exist_ok=False)  # atomic: exactly one driver wins each name
            return path
        except FileExistsError:
            continue
    raise UserError(f"--storage {storage}: 100 sweeps named {stem!r} already; wait a second and start again")


def _reopen_sweep(storage: Path, space: SearchSpace, tracking_uri: str, log: Callable[[str], None]) -> SweepRecord:
    """The latest unfinished sweep of `space` in `storage`, its parent run set running again."""
    path = latest_unfinished(storage, space.name)
    if path is None:
        raise UserError(f"--resume: no unfinished sweep named {space.name!r} in {storage}")
    record = SweepRecord.from_state(path, json.loads((path / SWEEP_FILE).read_text()))
    tracking.reopen_run(tracking_uri, record.parent_run_id)  # it ended as interrupted after a Ctrl-C
    log(f"resuming {path.name}: MLflow experiment {record.experiment!r}, parent run {record.parent_run_id}")
    return record


def _tuner(space: SearchSpace, tensors: QM9Tensors, tracking_uri: str, record: SweepRecord, resume: bool,
           show_progress: bool, verbose: bool):
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
    callbacks: list[Callback] = [TrackTrialEnds(tracking_uri, str(spool_dir))] + ([ProgressTable()] if show_progress else [])
    searcher, param_space, num_samples = _searcher_and_space(space, verbose)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="min",
            search_alg=searcher,
            scheduler=_scheduler(space, space.base.epochs),
            num_samples=num_samples,
            max_concurrent_trials=_live_trial_limit(space),
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
    tune_catches = threading.current_thread() is threading.main_thread() and not int(
        os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0"))
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
    status = metrics.get("trial_status", "failed" if result.error else "unknown")
    if result.error:
        status = "failed"
    elif metrics.get("trial_id") in unfinished or (unfinished and not metrics):
        status = "interrupted"
    elif status == "running":
        status = "stopped_early"
    return {
        "trial_id": metrics.get("trial_id"),
        "mlflow_run_id": metrics.get("mlflow_run_id"),
        "l_values": metrics.get("l_values"),
        "hidden_dim": metrics.get("hidden_dim"),
        "seed": metrics.get("seed"),
        "status": status,
        "epochs": metrics.get("epoch"),
        "val_mae_meV": _finite(metrics.get(METRIC)),
        "best_val_mae_meV": _finite(metrics.get("best_val_mae_meV")),
        "test_mae_meV": _finite(metrics.get("test_mae_meV")),
        "baseline_test_mae_meV": _finite(metrics.get("baseline_test_mae_meV")),
    }


def _end_interrupted(uri: str, record: SweepRecord, unfinished: int, log: Callable[[str], None]) -> int:
    """After a stop signal: write the trials' journals, then end every trial run still running and
    the parent run as `interrupted` with the reason. Returns the trial journals still pending."""
    pending = finish_tracking(uri, record, log)
    if pending:
        return pending  # the server takes no writes: the runs stay RUNNING until `--resume` continues them
    try:
        stopped = tracking.end_running_trials(uri, record.experiment_id, record.parent_run_id, SIGINT_REASON)
        tracking.finish_run(tracking.client(uri), record.parent_run_id, "interrupted", SIGINT_REASON)
    except Exception as exc:
        log(f"could not end the interrupted runs ({type(exc).__name__}); `--resume` continues them all the same")
        return 1
    log(f"interrupted: {unfinished} trial(s) left unfinished, {stopped} running MLflow run(s) ended as interrupted (KILLED)")
    return 0


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
