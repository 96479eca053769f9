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
from study.resources import num_params
from study.space import OptunaSpace, SearchSpace, trial_overrides

METRIC = "val_mae_meV"
OPTUNA_FILE = "optuna.db"  # the Optuna study of an optuna sweep, in its folder (unless --optuna-storage)


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
    # num_params travels with every report: a multi-objective searcher needs it for every proposal,
    # early-stopped ones included.
    identity = {"l_values": l_text, "hidden_dim": config.hidden_dim, "seed": seed, "mlflow_run_id": run.run_id,
                "num_params": float(num_params(config))}

    work = Path(tempfile.mkdtemp(prefix=f"irrep-study-{trial_id}-"))
    resumed = _restore_checkpoint(tune.get_checkpoint(), work, trial_id)
    last_epoch = {}
    clock = {"since": time.perf_counter()}

    def on_epoch(metrics) -> None:
        run.log_epoch(metrics.epoch, metrics.tracked())
        now = time.perf_counter()
        # Wall time of the epoch in this process (training and validation), the `epoch_seconds` objective.
        last_epoch.update(epoch=metrics.epoch, epoch_seconds=now - clock["since"], **metrics.tracked())
        clock["since"] = now
        if metrics.epoch < config.epochs:  # the last epoch is reported with the test result below
            report = {**identity, **last_epoch, "trial_status": "running"}
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(str(work)))

    try:
        result = run_trial(config, work, tensors=tensors, resume=resumed, on_epoch=on_epoch)
        if result.status == "diverged":
            reason = f"{result.reason} at epoch {result.diverged_epoch}"
            run.finish("diverged", reason)
            # The searcher is told with the worst value, so it steers away from here.
            tune.report({**identity, "epoch": result.diverged_epoch, METRIC: math.inf, "trial_status": "diverged",
                         "epoch_seconds": last_epoch.get("epoch_seconds", math.inf)})
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
        if result.get("trial_status") == "running":
            reason = f"stopped by the scheduler after epoch {result.get('epoch')}"
            finish_from_driver(self.tracking_uri, self.spool_dir, trial.trial_id, result.get("mlflow_run_id"), "stopped_early", reason)
        elif result.get("trial_status") == "completed" and self.parent_run_id:
            self.log_best_so_far(trials, trial)

    def log_best_so_far(self, trials, trial) -> None:
        progress = best_so_far(trials, trial)
        if progress is None:
            return
        step, metrics = progress
        try:
            tracking.log_best_so_far(self.tracking_uri, self.parent_run_id, step, metrics)
        except Exception as exc:
            # Skipped, not journaled: the next completed trial logs the best over all completed
            # trials again, so a lost point leaves a gap in the chart, not a wrong value; the
            # trials' own runs (journaled) keep every number this is computed from.
            print(f"sweep parent run: best-so-far metrics after {step} completed trials not logged "
                  f"({type(exc).__name__}); the tracking server did not take them", file=sys.stderr)

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = (trial.last_result or {}).get("mlflow_run_id")
        finish_from_driver(self.tracking_uri, self.spool_dir, trial.trial_id, run_id, "failed", _error_line(trial))


class SweepStatus(Callback):
    """One live status of the sweep on stderr: trials done of the total, how many run, the best
    validation MAE so far with the configuration that holds it, an ETA, and the live trials with
    the searched parameters as columns.

    On a terminal it is redrawn in place (rich's Live, at most about once a second) and its final
    state stays on screen. Elsewhere (logs, CI, nohup) it prints a compact block when something
    changed, at most every `every_seconds`, a heartbeat every `quiet_seconds` when nothing did,
    and the final state at the end.

    Ray pickles the callbacks with the run config (and `--resume` unpickles them): the console and
    the Live display are created at the first step and left out of the pickled state."""

    def __init__(self, space: SearchSpace, every_seconds: float = 10.0, quiet_seconds: float = 120.0,
                 live_seconds: float = 1.0, clock: Callable[[], float] = time.monotonic, terminal: bool | None = None):
        # Plain values rather than the space itself: what the status needs, small to pickle.
        self.name = space.name
        self.total = space.total_trials
        if space.search.method == "grid":
            self.params = list(dict.fromkeys(key for entry in space.search.grid for key in entry))
        else:
            self.params = list(space.search.params)
        self.seeds = list(space.seed_list)
        self.grid = space.search.method == "grid"
        # A grid entry without one of the columns' keys trains with the base trial's value.
        base = space.base
        self.defaults = {name: getattr(base, name, None) for name in self.params} if self.grid else {}
        self.every_seconds = every_seconds  # not a terminal: at most this often
        self.quiet_seconds = quiet_seconds  # not a terminal, nothing changed: only this often
        self.live_seconds = live_seconds  # a terminal: redrawn at most this often
        self.clock = clock
        self.terminal = terminal  # None: whether stderr is a terminal, seen at the first step
        self._reset()

    def _reset(self) -> None:
        self._console = None
        self._live = None
        self._started: float | None = None  # clock at the first step of this driver
        self._epochs_at_start = 0  # epochs trained before it (a resumed sweep's restored trials)
        self._last_shown = -math.inf
        self._last_key: tuple | None = None
        self._best_val: dict[str, float] = {}  # trial id -> lowest validation MAE it reported

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in ("_console", "_live", "_started", "_epochs_at_start", "_last_shown", "_last_key", "_best_val"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    # -------------------------------------------------------------- what is shown

    def param_values(self, trial) -> dict[str, str]:
        config = trial.config or {}
        source = {**self.defaults, **config.get("grid_entry", {})} if self.grid else config
        return {name: _shown(source.get(name)) for name in self.params}

    def seed(self, trial) -> Any:
        result = trial.last_result or {}
        if "seed" in result:
            return result["seed"]
        index = (trial.config or {}).get("__trial_index__", 0)  # as run_sweep_trial maps it
        return self.seeds[index] if 0 <= index < len(self.seeds) else "-"

    def lowest_val(self, trial) -> float | None:
        """The trial's lowest validation MAE reported so far (never its test MAE)."""
        result = trial.last_result or {}
        values = [self._best_val.get(trial.trial_id), result.get(METRIC), result.get("best_val_mae_meV")]
        finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        return min(finite) if finite else None

    @staticmethod
    def status(trial) -> str:
        if trial.status == "TERMINATED":
            ended = (trial.last_result or {}).get("trial_status")
            # A trial the scheduler stopped last reported itself as running.
            return {"running": "stopped_early", None: "done"}.get(ended, ended)
        return "failed" if trial.status == "ERROR" else trial.status.lower()

    def snapshot(self, trials, now: float) -> dict:
        """Everything the status shows, from Tune's trials at clock time `now`."""
        trials = list(trials)
        epochs = {t.trial_id: int((t.last_result or {}).get("epoch") or 0) for t in trials}
        if self._started is None:
            self._started, self._epochs_at_start = now, sum(epochs.values())
        finished = [t for t in trials if t.status in ("TERMINATED", "ERROR")]
        ended: dict[str, int] = {}
        for trial in finished:
            ended[self.status(trial)] = ended.get(self.status(trial), 0) + 1
        live = [t for t in trials if t.status in ("RUNNING", "PAUSED")]
        rated = [(value, t) for t in trials if (value := self.lowest_val(t)) is not None]
        best = None
        if rated:
            value, trial = min(rated, key=lambda pair: pair[0])
            best = {"value": value, "trial": trial.trial_id, "params": self.param_values(trial), "seed": self.seed(trial)}
        return {
            "done": len(finished),
            "total": max(self.total, len(trials)),
            "ended": ended,
            "running": sum(t.status == "RUNNING" for t in trials),
            "paused": sum(t.status == "PAUSED" for t in trials),
            "best": best,
            "eta": self.eta(trials, finished, epochs, now),
            "elapsed": now - self._started,
            "live": [{
                "trial": t.trial_id, **self.param_values(t), "seed": self.seed(t), "epoch": epochs[t.trial_id],
                "val": (t.last_result or {}).get(METRIC), "status": self.status(t),
            } for t in live],
        }

    def eta(self, trials, finished, epochs: dict[str, int], now: float) -> float | None:
        """Seconds left at the throughput so far (trial-epochs trained per second by this driver),
        each unfinished trial expected to train as many epochs as the finished ones did on average
        (with ASHA that counts the trials it stopped early). None until a trial finished."""
        elapsed = now - self._started
        trained = sum(epochs.values()) - self._epochs_at_start
        if not finished or elapsed <= 0 or trained <= 0:
            return None
        expected = sum(epochs[t.trial_id] for t in finished) / len(finished)
        unfinished = [t for t in trials if t.status not in ("TERMINATED", "ERROR")]
        left = sum(max(expected - epochs[t.trial_id], 0.0) for t in unfinished)
        left += max(self.total - len(trials), 0) * expected  # trials the searcher has not proposed yet
        return left / (trained / elapsed)

    def renderable(self, snap: dict):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        ended = ", ".join(f"{n} {status}" for status, n in sorted(snap["ended"].items()))
        head = f"{self.name} {datetime.now():%H:%M:%S}: {snap['done']}/{snap['total']} trials done"
        head += f" ({ended})" if ended else ""
        head += f" | {snap['running']} running" + (f", {snap['paused']} paused" if snap["paused"] else "")
        head += f" | {_duration(snap['elapsed'])} elapsed, ETA {_duration(snap['eta'])}"
        best = snap["best"]
        if best is None:
            best_line = "best val MAE: -"
        else:
            params = " ".join(f"{name}={value}" for name, value in best["params"].items())
            best_line = f"best val MAE: {best['value']:.1f} meV  {params} seed={best['seed']} (trial {best['trial']})"
        parts: list[Any] = [Text(head), Text(best_line)]
        if snap["live"]:
            table = Table(box=None, padding=(0, 1), show_edge=False)
            for column in ("trial", *self.params, "seed", "epoch", "val MAE (meV)", "status"):
                table.add_column(column)
            for row in snap["live"]:
                table.add_row(row["trial"], *(row[name] for name in self.params), str(row["seed"]), str(row["epoch"]),
                              _shown_mae(row["val"]), row["status"])
            parts.append(table)
        return Group(*parts)

    # -------------------------------------------------------------- Tune's hooks

    def _show(self, trials, final: bool = False) -> None:
        from rich.console import Console

        if self._console is None:
            self._console = Console(stderr=True)
            if self.terminal is None:
                self.terminal = self._console.is_terminal
            if not self.terminal:
                self._console.width = 120  # a log has no width; rich would fold the table at 80
        now = self.clock()
        snap = self.snapshot(trials, now)
        if self.terminal:
            if self._live is None:
                from rich.live import Live

                self._live = Live(console=self._console, auto_refresh=False, transient=False)
                self._live.start()
            if final or now - self._last_shown >= self.live_seconds:
                self._last_shown = now
                self._live.update(self.renderable(snap), refresh=True)
            if final:
                self._live.stop()  # not transient: the final state stays on screen
                self._live = None
            return
        since = now - self._last_shown
        if not final and since < self.every_seconds:
            return
        # What counts as a change: the trials' states and the best, not the clock or the ETA.
        key = (snap["done"], tuple(sorted(snap["ended"].items())), snap["running"], snap["paused"],
               snap["best"] and snap["best"]["value"], tuple(tuple(row.items()) for row in snap["live"]))
        if final or key != self._last_key or since >= self.quiet_seconds:
            self._last_shown, self._last_key = now, key
            self._console.print(self.renderable(snap))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(METRIC)
        if isinstance(value, (int, float)) and math.isfinite(value):
            self._best_val[trial.trial_id] = min(value, self._best_val.get(trial.trial_id, math.inf))

    def on_step_end(self, iteration, trials, **info):
        self._show(trials)

    def on_experiment_end(self, trials, **info):
        self._show(trials, final=True)


def _shown(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _shown_mae(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def best_so_far(trials, completing) -> tuple[int, dict[str, float]] | None:
    """(trials completed, the parent run's metrics) once `completing` has completed: the lowest best
    validation MAE over completed trials and that trial's test MAE (chosen on validation, never on
    test). Counted from Tune's trial states, which `--resume` restores, so a resumed sweep goes on
    from its count. At `on_trial_complete` the trial is still RUNNING for Tune, so it is counted
    by identity. None when no completed trial has a finite validation MAE."""
    def completed(candidate) -> bool:
        return candidate.status == "TERMINATED" and (candidate.last_result or {}).get("trial_status") == "completed"

    done = [t for t in trials if t is completing or completed(t)]
    if not any(t is completing for t in done):
        done.append(completing)
    measured = [t for t in done if _finite((t.last_result or {}).get("best_val_mae_meV")) is not None]
    if not measured:
        return None
    best = min(measured, key=lambda t: t.last_result["best_val_mae_meV"]).last_result
    metrics = {"best_val_mae_meV": float(best["best_val_mae_meV"]), "trials_finished": float(len(done))}
    test = _finite(best.get("test_mae_meV"))
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


# ---------------------------------------------------------------------------- seeds, searcher, scheduler


class SeedRepeater(Repeater):
    """Ray's Repeater (one searcher proposal trained once per seed, the searcher told the mean over
    seeds), telling the searcher each seed's values at the epoch where the seed ended.

    Tune gives `on_trial_complete` no result for a trial stopped while paused (SeedAwareASHA stops
    the paused seeds of a configuration together with the one whose result decided it); Repeater
    would count such a seed as NaN and average the others alone. The last result each seed
    reported is remembered instead. A seed that failed for good counts as missing; the proposal is
    a failure for the searcher only when all its seeds failed. With several objectives (a list of
    metrics), each is averaged over the same seeds."""

    def __init__(self, searcher, repeat: int = 1, set_index: bool = True):
        super().__init__(searcher, repeat=repeat, set_index=set_index)
        self._last_values: dict[str, tuple] = {}  # trial id -> its last result's objective values
        self._ended: dict[str, dict[str, tuple | None]] = {}  # proposal -> seed trial -> its values (None: missing)

    @property
    def _metrics(self) -> list[str]:
        metric = self.searcher.metric
        return list(metric) if isinstance(metric, (list, tuple)) else [metric]

    def _read(self, result: dict | None) -> tuple | None:
        if not result or any(metric not in result for metric in self._metrics):
            return None
        return tuple(float(result[metric]) for metric in self._metrics)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        values = self._read(result)
        if values is not None:
            self._last_values[trial_id] = values

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False, **kwargs) -> None:
        group = self._trial_id_to_group.get(trial_id)
        last = self._last_values.pop(trial_id, None)
        if group is None:
            return
        values = self._read(result) or (None if error else last)
        ended = self._ended.setdefault(group.primary_trial_id, {})
        ended[trial_id] = values
        # Repeater's group keeps one number per seed: the first objective's, NaN for a missing seed.
        group.report(trial_id, values[0] if values is not None else math.nan)
        if not group.finished_reporting():
            return
        del self._ended[group.primary_trial_id]
        seeds = [v for v in ended.values() if v is not None and not math.isnan(v[0])]
        if not seeds:
            self.searcher.on_trial_complete(group.primary_trial_id, result=None, error=True)
            return
        means = [math.fsum(column) / len(column) if all(math.isfinite(v) for v in column) else math.inf
                 for column in zip(*seeds)]
        self.searcher.on_trial_complete(group.primary_trial_id, result=dict(zip(self._metrics, means)))


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


def _searcher_and_space(space: SearchSpace, verbose: bool = False, optuna_storage: str | None = None,
                        study_name: str = "optuna"):
    """Ray Tune's searcher, param space and sample count for `space`. An Optuna search keeps its
    study in `optuna_storage` (an Optuna RDB URL; None: in memory) under `study_name`: one Optuna
    trial per configuration, told the seeds' mean of each objective."""
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
    metrics = space.search.objective_metrics
    searcher = OptunaSearch(
        space=OptunaSpace(space.search),
        metric=metrics if len(metrics) > 1 else METRIC,
        mode=["min"] * len(metrics) if len(metrics) > 1 else "min",
        sampler=samplers[space.search.sampler](),
        study_name=study_name,
        # An RDBStorage pickles without its connection (Ray saves the searcher with the sweep) and
        # reconnects to the same URL when `--resume` loads it.
        storage=optuna.storages.RDBStorage(optuna_storage) if optuna_storage else None,
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
    optuna_storage: str | None = None  # where the Optuna study is (optuna sweeps)
    optuna_study: str | None = None

    def to_dict(self) -> dict:
        # Chosen on validation, never on test (docs/analysis.md): the test MAE is only reported.
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
            "optuna_storage": self.optuna_storage and tracking.redact(self.optuna_storage),
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
    tracking.fail_fast()
    check_optuna_storage(space, resume, optuna_storage)
    if resume:
        record = _reopen_sweep(storage, space, tracking_uri, log)
    else:
        record = _new_sweep(storage, space, tracking_uri, experiment, log, optuna_storage)
    tuner = _tuner(space, tensors, tracking_uri, record, resume, show_progress, verbose)
    with _watching_for_interruption() as interruption:
        results = tuner.fit()

    unfinished = _unfinished_trials(record.path) if interruption.happened else set()
    trials = [_trial_row(result, unfinished) for result in results]
    outcome = SweepOutcome(record.path, record.experiment, record.experiment_id, record.parent_run_id,
                           tracking_uri, trials, interrupted=interruption.happened,
                           optuna_storage=record.optuna_storage, optuna_study=record.optuna_study)
    if outcome.interrupted:
        # The sweep stays unfinished, so that `--resume` finds it.
        outcome.unsynced = _end_interrupted(tracking_uri, record, len(unfinished), log)
        return outcome
    write_state(record, space, tracking_uri, finished=True)
    _fail_orphaned_optuna_trials(record, log)
    # One pass: replay the trials' journals, then (only when nothing is left pending) end orphaned
    # runs and the parent run.
    outcome.unsynced = finish_tracking(tracking_uri, record, log, final=True)
    return outcome


def check_optuna_storage(space: SearchSpace, resume: bool, url: str | None) -> None:
    """Refuse an `--optuna-storage` that cannot serve, before any run is created."""
    import optuna

    if url is None:
        return
    if resume:
        raise UserError("--optuna-storage: a resumed sweep keeps the Optuna storage it started with; leave it out")
    if space.search.method != "optuna":
        raise UserError(f"--optuna-storage: {space.name!r} is a grid search, which has no Optuna study")
    try:
        optuna.storages.RDBStorage(url)
    except Exception as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UserError(f"--optuna-storage {tracking.redact(url)}: Optuna cannot open it ({reason})") from None


ORPHANED_OPTUNA_REASON = "proposed by a driver that stopped before Ray Tune saved the trial; the resumed sweep did not run it"


def _fail_orphaned_optuna_trials(record: SweepRecord, log: Callable[[str], None]) -> None:
    """At the end of a sweep, Optuna trials still RUNNING in its study were asked for by a driver
    that was killed before Ray saved them (the resumed searcher does not know them): marked FAIL
    with the reason, so optuna-dashboard and `optuna.load_study` show no trial running forever."""
    if not record.optuna_storage or not record.optuna_study:
        return
    import optuna

    try:
        study = optuna.load_study(study_name=record.optuna_study, storage=record.optuna_storage)
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        for trial in running:
            # The reason shows in optuna-dashboard; Optuna's public API sets user attributes only
            # through a live Trial, so through the storage, as Optuna's own stale-trial check does.
            study._storage.set_trial_user_attr(trial._trial_id, "irrep_study.reason", ORPHANED_OPTUNA_REASON)
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    except Exception as exc:  # a convenience: the sweep's results are in MLflow either way
        log(f"could not close the Optuna study's orphaned trials ({type(exc).__name__})")
        return
    if running:
        log(f"optuna study {record.optuna_study!r}: {len(running)} trial(s) proposed before a driver stopped, never run, marked FAIL")


def _new_sweep(storage: Path, space: SearchSpace, tracking_uri: str, experiment: str, log: Callable[[str], None],
               optuna_storage: str | None = None) -> SweepRecord:
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
        parent_run_id = tracking.start_sweep_run(tracking_uri, experiment_id, path.name, space.summary_params(),
                                                 space=space.model_dump(mode="json"))
    except Exception as exc:
        path.rmdir()
        raise tracking.TrackingError(
            f"--tracking-uri {tracking.redact(tracking_uri)}: cannot create the sweep's runs ({type(exc).__name__})"
        ) from None
    record = SweepRecord(path, experiment, experiment_id, parent_run_id)
    if space.search.method == "optuna":
        # optuna-dashboard and optuna.load_study(study_name=..., storage=...) read it, during the sweep and after.
        record.optuna_storage = optuna_storage or f"sqlite:///{path / OPTUNA_FILE}"
        record.optuna_study = path.name
        _tag_parent(tracking_uri, parent_run_id, {"irrep_study.optuna_storage": tracking.redact(record.optuna_storage),
                                                  "irrep_study.optuna_study": record.optuna_study})
    write_state(record, space, tracking_uri, finished=False)
    log(f"sweep {path.name}: {space.total_trials} trials; MLflow experiment {experiment!r}, parent run {parent_run_id}")
    return record


def _tag_parent(tracking_uri: str, parent_run_id: str, tags: dict[str, str]) -> None:
    try:
        for key, value in tags.items():
            tracking.client(tracking_uri).set_tag(parent_run_id, key, value)
    except Exception as exc:  # the tags are a convenience: the sweep's state file holds the same
        print(f"could not tag the parent run ({type(exc).__name__}); {SWEEP_FILE} names the Optuna study", file=sys.stderr)


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
    callbacks: list[Callback] = [TrackTrialEnds(tracking_uri, str(spool_dir), record.parent_run_id)] + ([SweepStatus(space)] if show_progress else [])
    searcher, param_space, num_samples = _searcher_and_space(space, verbose, record.optuna_storage, record.optuna_study or "optuna")
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
