"""The seeds of one configuration scheduled together, on Ray Tune: `SeedRepeater` hands each Optuna
proposal to Ray once per seed and tells Optuna their mean; `SeedAwareASHA` stops or continues
all seeds of a configuration at once (the rungs' logic is `seed_groups`, which knows no Ray)."""

from __future__ import annotations

import math

from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Repeater

from study.config.space import SearchSpace
from study.names import RUNNING
from study.sweep import seed_groups

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
        means = [math.fsum(column) / len(column) if all(math.isfinite(v) for v in column) else math.inf for column in zip(*seeds)]
        self.searcher.on_trial_complete(group.primary_trial_id, result=dict(zip(self._metrics, means)))


class SeedAwareASHA(FIFOScheduler):
    """ASHA over configurations instead of trials: Ray Tune's side of study.sweep.seed_groups.

    A trial that reaches a rung before the other seeds of its configuration is paused (it resumes
    from its last checkpoint, in the same MLflow run); when the last live seed gets there, the
    group continues (the paused seeds are released) or stops (the paused seeds are stopped with
    it, so every stopped seed ends at the same epoch). Trials are grouped by their config without
    the seed keys (`seed`, `__trial_index__`), so Optuna proposals repeated by a Repeater and grid
    entries crossed with seeds group alike."""

    _supports_buffered_results = False  # a paused trial must not have trained past its rung

    def __init__(
        self,
        max_t: int,
        grace_period: int,
        reduction_factor: float,
        group_size: int,
        time_attr: str = "epoch",
        status_key: str = "trial_status",
        running: str = RUNNING,
        metric: str | None = None,
        mode: str | None = None,
    ):
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


def scheduler_for(space: SearchSpace, epochs: int):
    if space.scheduler.type == "none":
        return None
    return SeedAwareASHA(
        max_t=epochs,
        grace_period=min(space.scheduler.grace_period, epochs),
        reduction_factor=space.scheduler.reduction_factor,
        group_size=len(space.seed_list),
    )


def live_trial_limit(space: SearchSpace) -> int | None:
    """Tune's `max_concurrent_trials`, which counts paused trials too. With the seed-aware
    scheduler, all seeds of a configuration must be able to exist at once (a seed paused at a
    rung waits for the others), so the limit is at least the number of seeds."""
    limit = space.resources.max_concurrent
    if limit is None or space.scheduler.type == "none":
        return limit
    return max(limit, len(space.seed_list))
