"""The searcher of a space: Optuna (TPE, random, ...) behind Ray Tune's OptunaSearch and the seed
repeater, or a grid, with the param space Ray samples from and the number of samples."""

from __future__ import annotations

from ray.tune.search.optuna import OptunaSearch

from study.config.space import OptunaSpace, SearchSpace
from study.names import VAL_MAE
from study.sweep.scheduling import SeedRepeater

OPTUNA_FILE = "optuna.db"  # the Optuna study of an optuna sweep, in its folder (unless --optuna-storage)


class ResumableOptunaSearch(OptunaSearch):
    """Ray Tune's OptunaSearch, safe to resume after its driver was killed. A driver killed after
    telling Optuna that a trial ended, but before Ray saved the trial as ended, leaves a resumed
    sweep whose restored searcher still counts the trial as running: Ray runs the trial's last
    epochs again from its checkpoint and reports them, and Optuna refuses a report for a finished
    trial (UpdateFinishedTrialError), which stopped the whole sweep. Such a trial's results are not
    reported again: the study keeps what it was told (OptunaSearch already ignores a second
    completion)."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        # The study's storage knows; the trial object restored with the searcher does not.
        if ot_trial is not None and self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished():
            self._completed_trials.add(trial_id)
            return
        super().on_trial_result(trial_id, result)


def searcher_and_space(space: SearchSpace, verbose: bool = False, optuna_storage: str | None = None, study_name: str = "optuna"):
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

    if not verbose:  # "A new study created in memory ...": Optuna's INFO lines only with --verbose
        optuna.logging.set_verbosity(optuna.logging.WARNING)

    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=space.search.seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=space.search.seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=space.search.seed),
    }
    metrics = space.search.objective_metrics
    searcher = ResumableOptunaSearch(
        space=OptunaSpace(space.search),
        metric=metrics if len(metrics) > 1 else VAL_MAE,
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
