"""Seed-aware early stopping without a Ray cluster: the group bookkeeping, the Tune scheduler that
drives it (against a small stand-in for Tune's trial loop), and what the searcher is told."""

from __future__ import annotations

import math

import pytest

from study.config.configuration import configuration_key
from study.sweep.seed_groups import (
    CONTINUE,
    PAUSE,
    STOP,
    SeedGroups,
    rungs,
)


def seeds(groups: SeedGroups, config: dict, *trial_ids: str) -> None:
    for k, trial_id in enumerate(trial_ids):
        groups.add(trial_id, {**config, "__trial_index__": k})


def test_rungs_are_ashas_milestones_in_whole_epochs_below_the_last():
    assert rungs(1, 2, 4) == [1, 2]
    assert rungs(2, 2, 6) == [2, 4]
    assert rungs(1, 1.5, 6) == [1, 2, 3, 4]  # 1, 1.5, 2.25, 3.4 rounded up; 5.1 would be 6 = max_t
    assert rungs(1, 1.2, 3) == [1, 2]  # 1.2 and 1.44 both round up to 2: one rung
    assert rungs(3, 2, 3) == []


def test_seeds_group_by_configuration_and_a_repeated_proposal_is_a_new_group():
    groups = SeedGroups([1], group_size=2, reduction_factor=2)
    seeds(groups, {"lr": 0.01, "l_values": "0,1"}, "a0", "a1")
    seeds(groups, {"lr": 0.01, "l_values": "0,1"}, "b0", "b1")  # Optuna proposed the same again
    groups.add("g0", {"grid_entry": {"l_values": [0, 2]}, "seed": 1})
    groups.add("g1", {"grid_entry": {"l_values": [0, 2]}, "seed": 2})
    assert [sorted(g.seeds) for g in groups.groups] == [["a0", "a1"], ["b0", "b1"], ["g0", "g1"]]
    assert configuration_key({"x": 1, "seed": 3}) == configuration_key({"x": 1, "__trial_index__": 0})


def test_the_first_seed_waits_at_the_rung_and_the_group_goes_on_together():
    groups = SeedGroups([1, 2], group_size=2, reduction_factor=2)
    seeds(groups, {"lr": 0.1}, "a0", "a1")
    assert groups.result("a0", 1, 50.0).trial == PAUSE
    verdict = groups.result("a1", 1, 70.0)
    assert (verdict.trial, verdict.release, verdict.stop) == (CONTINUE, ["a0"], [])
    assert groups.released == {"a0"}
    assert groups.groups[0].means == {1: 60.0}
    assert groups.result("a1", 2, 40.0).trial == PAUSE  # a1 got to epoch 2 first this time
    assert groups.released == {"a0"}
    verdict = groups.result("a0", 2, 42.0)
    assert (verdict.trial, verdict.release) == (CONTINUE, ["a1"]) and groups.released == {"a1"}


def test_groups_are_judged_on_their_seed_mean_not_seed_by_seed():
    groups = SeedGroups([1], group_size=2, reduction_factor=2)
    for name in ("a", "b", "c"):
        seeds(groups, {"config": name}, f"{name}0", f"{name}1")
    # a: the first group at the rung goes on (no cutoff yet).
    groups.result("a0", 1, 50)
    assert groups.result("a1", 1, 50).trial == CONTINUE
    # b: seed 0 (40) beats a, but the mean (55) does not: both seeds stop, at epoch 1.
    assert groups.result("b0", 1, 40).trial == PAUSE
    verdict = groups.result("b1", 1, 70)
    assert (verdict.trial, verdict.stop) == (STOP, ["b0"])
    assert {s.state for s in groups.groups[1].seeds.values()} == {"stopped"}
    # c: seed 0 (60) is worse than a, but the mean (45) is better: both seeds go on.
    groups.result("c0", 1, 60)
    verdict = groups.result("c1", 1, 30)
    assert (verdict.trial, verdict.release) == (CONTINUE, ["c0"])
    assert groups.recorded[1] == {0: -50.0, 1: -55.0, 2: -45.0}
    # A stopped group's seed that still reports is stopped.
    assert groups.result("b0", 2, 10).trial == STOP


def test_a_configuration_proposed_twice_gets_one_decision_per_rung():
    groups = SeedGroups([1], group_size=2, reduction_factor=2)
    seeds(groups, {"lr": 0.1}, "a0", "a1")
    seeds(groups, {"lr": 0.2}, "b0", "b1")
    seeds(groups, {"lr": 0.1}, "c0", "c1")  # a again
    groups.result("a0", 1, 50), groups.result("a1", 1, 50)  # first at the rung: continues
    groups.result("b0", 1, 30), groups.result("b1", 1, 30)
    groups.result("c0", 1, 50)
    # On its own, c (mean 50) would now be stopped (worse than b); it is a, so it goes on as a did.
    assert groups.result("c1", 1, 50).trial == CONTINUE
    assert groups.recorded[1] == {0: -50.0, 1: -30.0}  # judged once


def test_a_diverged_seed_stops_its_group_at_the_next_rung():
    groups = SeedGroups([1, 2], group_size=2, reduction_factor=2)
    seeds(groups, {"lr": 1.0}, "a0", "a1")
    groups.result("a0", 1, 50)
    groups.result("a1", 1, 50)
    assert groups.result("a0", 2, 40).trial == PAUSE
    verdict = groups.result("a1", 2, math.inf, final=True)  # diverged in epoch 2
    assert (verdict.trial, verdict.stop) == (STOP, ["a0"])
    # Diverged before the other seed got to the rung: that seed is stopped on arrival.
    seeds(groups, {"lr": 2.0}, "b0", "b1")
    assert groups.result("b0", 1, math.inf, final=True).trial == STOP
    assert groups.result("b1", 1, 45).trial == STOP


def test_a_failed_seed_no_longer_holds_its_group_back():
    groups = SeedGroups([1], group_size=3, reduction_factor=2)
    seeds(groups, {"lr": 0.1}, "a0", "a1", "a2")
    groups.result("a0", 1, 50)
    groups.result("a1", 1, 52)
    verdict = groups.end("a2", "dropped")
    assert verdict.release == ["a0", "a1"] and groups.groups[0].means == {1: 51.0}


def test_a_group_the_searcher_left_short_decides_with_the_seeds_it_has():
    groups = SeedGroups([1], group_size=2, reduction_factor=2)
    groups.add("a0", {"lr": 0.1, "__trial_index__": 0})
    assert groups.result("a0", 1, 50).trial == PAUSE
    assert groups.close().release == ["a0"]


def test_a_resumed_sweep_rebuilds_its_groups_from_the_trials():
    groups = SeedGroups([1, 2], group_size=2, reduction_factor=2)
    # Before the driver died: a1 was paused at rung 1 when the group passed it, a0 paused at rung 2.
    # Restored in Tune's order (latest result first); both were waiting at a rung: held.
    assert groups.add("a1", {"lr": 0.1, "__trial_index__": 1}, "live", epoch=1, value=45.0)
    assert groups.add("a0", {"lr": 0.1, "__trial_index__": 0}, "live", epoch=2, value=40.0)
    assert groups.groups[0].decided == {1: CONTINUE}  # a0 went past rung 1, so the group passed it
    # A configuration stopped before the driver died stays stopped: its restored live seed stops.
    assert not groups.add("b1", {"lr": 0.2, "__trial_index__": 1}, "live", epoch=3, value=60.0)
    groups.add("b0", {"lr": 0.2, "__trial_index__": 0}, "stopped")
    settled = groups.settle()
    assert (settled.release, settled.stop) == (["a1"], ["b1"])
    assert groups.result("b1", 4, 58.0).trial == STOP
    verdict = groups.result("a1", 2, 44.0)
    assert (verdict.trial, verdict.release) == (CONTINUE, ["a0"]) and groups.groups[0].means == {2: 42.0}


# ---------------------------------------------------------------------------- the Tune scheduler


class FakeTrial:
    def __init__(self, trial_id: str, config: dict):
        self.trial_id, self.config, self.status, self.last_result = trial_id, config, "PENDING", {}
        self.epoch = 0


class FakeSearch:
    def __init__(self):
        self.finished = False

    def is_finished(self) -> bool:
        return self.finished


class FakeTune:
    """Tune's trial loop as the scheduler sees it: PENDING trials start when a slot is free, PAUSED
    ones only when the scheduler picks them, a result gets CONTINUE/PAUSE/STOP, stop_trial on a
    paused trial calls on_trial_remove and on a running one on_trial_complete."""

    def __init__(self, scheduler, trials, slots: int):
        self.scheduler, self.trials, self.slots = scheduler, trials, slots
        self.search_alg = FakeSearch()
        self.stopped_while_paused: list[str] = []
        for trial in trials:
            scheduler.on_trial_add(self, trial)
        self.search_alg.finished = True

    def get_trials(self):
        return self.trials

    def stop_trial(self, trial):
        if trial.status in ("PENDING", "PAUSED"):
            self.stopped_while_paused.append(trial.trial_id)
            self.scheduler.on_trial_remove(self, trial)
        elif trial.status == "RUNNING":
            self.scheduler.on_trial_complete(self, trial, trial.last_result)
        trial.status = "TERMINATED"

    def run(self, curve, epochs: int) -> None:
        for _ in range(1000):
            chosen = self.scheduler.choose_trial_to_run(self)
            if chosen is not None:
                chosen.status = "PENDING"
            for trial in self.trials:
                if trial.status == "PENDING" and sum(t.status == "RUNNING" for t in self.trials) < self.slots:
                    trial.status = "RUNNING"
            running = [t for t in self.trials if t.status == "RUNNING"]
            if not running:
                assert all(t.status == "TERMINATED" for t in self.trials), [(t.trial_id, t.status) for t in self.trials]
                return
            trial = running[0]
            trial.epoch += 1
            done = trial.epoch == epochs
            trial.last_result = {
                "epoch": trial.epoch,
                "val_mae_meV": curve(trial.config, trial.epoch),
                "trial_status": "completed" if done else "running",
            }
            decision = self.scheduler.on_trial_result(self, trial, trial.last_result)
            if decision == "STOP" or done:
                self.stop_trial(trial)
            elif decision == "PAUSE":
                trial.status = "PAUSED"
        raise AssertionError("the sweep did not end")


def test_the_tune_scheduler_stops_or_completes_every_configuration_as_a_whole():
    from study.sweep.scheduling import SeedAwareASHA

    epochs, configs, n_seeds = 5, 6, 3
    scheduler = SeedAwareASHA(max_t=epochs, grace_period=1, reduction_factor=2, group_size=n_seeds)
    assert scheduler.set_search_properties("val_mae_meV", "min")
    trials = [FakeTrial(f"t{c}{s}", {"lr": c, "__trial_index__": s}) for c in range(configs) for s in range(n_seeds)]

    def curve(config, epoch):  # configurations improve at different speeds; seed 1 is always the worst
        return 100 / (1 + epoch * (1 + (config["lr"] * 7) % 5)) + 10 * (config["__trial_index__"] == 1)

    tune = FakeTune(scheduler, trials, slots=2)
    tune.run(curve, epochs)
    assert tune.stopped_while_paused  # the stop of a group reached seeds that were waiting at the rung
    by_config: dict[int, list[FakeTrial]] = {}
    for trial in trials:
        by_config.setdefault(trial.config["lr"], []).append(trial)
    outcomes = set()
    for group in by_config.values():
        statuses = {t.last_result["trial_status"] for t in group}
        assert len(statuses) == 1, [(t.trial_id, t.last_result) for t in group]  # never split
        assert len({t.epoch for t in group}) == 1  # stopped seeds stopped at the same epoch
        outcomes.add((statuses.pop(), group[0].epoch))
    assert ("completed", epochs) in outcomes and any(status == "running" for status, _ in outcomes)


# ---------------------------------------------------------------------------- the searcher


def test_the_searcher_is_told_the_seed_mean_at_the_epoch_where_the_seeds_stopped():
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from study.config.space import OptunaSpace, Search
    from study.names import VAL_MAE
    from study.sweep.scheduling import SeedRepeater

    search = Search(method="optuna", num_samples=2, params={"l_values": {"subsets_of": [0, 1, 2]}})
    optuna_search = OptunaSearch(space=OptunaSpace(search), metric=VAL_MAE, mode="min", sampler=optuna.samplers.RandomSampler(seed=0))
    repeater = SeedRepeater(optuna_search, repeat=2)
    first, second = repeater.suggest("s0"), repeater.suggest("s1")
    assert first["__trial_index__"] == 0 and second == {**first, "__trial_index__": 1}
    for epoch, (v0, v1) in enumerate([(80.0, 90.0), (60.0, 75.0)], start=1):
        repeater.on_trial_result("s0", {VAL_MAE: v0, "epoch": epoch, "training_iteration": epoch})
        repeater.on_trial_result("s1", {VAL_MAE: v1, "epoch": epoch, "training_iteration": epoch})
    # The group stops at epoch 2: the seed whose result decided it is stopped with that result, the
    # paused one without a result (Tune passes none for a trial stopped while paused).
    repeater.on_trial_complete("s1", result={VAL_MAE: 75.0, "epoch": 2})
    assert optuna_search._ot_study.trials[0].value is None  # told only when all seeds are in
    repeater.on_trial_complete("s0")
    assert optuna_search._ot_study.trials[0].value == pytest.approx((60.0 + 75.0) / 2)

    # One seed failed for good: the proposal is worth the other seed; all failed: a failed proposal.
    repeater.suggest("s2"), repeater.suggest("s3")
    repeater.on_trial_result("s2", {VAL_MAE: 70.0, "epoch": 1, "training_iteration": 1})
    repeater.on_trial_complete("s2", error=True)
    repeater.on_trial_complete("s3", result={VAL_MAE: 65.0, "epoch": 4})
    assert optuna_search._ot_study.trials[1].value == pytest.approx(65.0)


def test_with_two_objectives_each_is_the_mean_over_the_seeds_of_a_proposal():
    import optuna

    from study.config.space import SearchSpace
    from study.names import VAL_MAE
    from study.sweep.search import searcher_and_space

    space = SearchSpace.model_validate(
        {
            "name": "two",
            "seeds": [1, 2],
            "search": {
                "method": "optuna",
                "sampler": "random",
                "num_samples": 2,
                "params": {"l_values": {"subsets_of": [0, 1, 2]}},
                "objectives": [{"metric": VAL_MAE}, {"metric": "epoch_seconds"}],
            },
        }
    )
    repeater, _, samples = searcher_and_space(space)
    assert samples == 4
    repeater.suggest("s0"), repeater.suggest("s1")
    repeater.on_trial_result("s0", {VAL_MAE: 50.0, "epoch_seconds": 2.0, "epoch": 1})
    repeater.on_trial_complete("s0")  # stopped while paused: its last result counts
    repeater.on_trial_complete("s1", result={VAL_MAE: 70.0, "epoch_seconds": 4.0, "epoch": 1})
    study = repeater.searcher._ot_study
    assert study.directions == [optuna.study.StudyDirection.MINIMIZE] * 2
    assert study.trials[0].values == pytest.approx([60.0, 3.0])
    # A diverged seed (infinite error) makes the proposal worst on that objective, not a failure.
    repeater.suggest("s2"), repeater.suggest("s3")
    repeater.on_trial_complete("s2", result={VAL_MAE: math.inf, "epoch_seconds": 2.0, "epoch": 1})
    repeater.on_trial_complete("s3", result={VAL_MAE: 40.0, "epoch_seconds": 2.0, "epoch": 1})
    assert study.trials[1].values[0] == math.inf and study.trials[1].values[1] == pytest.approx(2.0)
    assert [t.number for t in study.best_trials] == [0, 1]  # 0: lower error, 1: faster


def test_optuna_trials_a_killed_driver_asked_for_are_failed_with_the_reason_when_the_sweep_ends(tmp_path):
    import optuna

    from study.sweep.folder import ORPHANED_OPTUNA_REASON, fail_orphaned_optuna_trials
    from study.tracking.journal import SweepRecord

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=url, study_name="s")
    done = study.ask()
    done.suggest_float("lr", 1e-3, 1e-2)
    study.tell(done, 50.0)
    study.ask().suggest_float("lr", 1e-3, 1e-2)  # asked, then the driver died: never told
    said = []
    fail_orphaned_optuna_trials(SweepRecord(tmp_path, "e", "1", "p", url, "s"), said.append)
    trials = optuna.load_study(study_name="s", storage=url).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
    assert trials[0].value == 50.0 and trials[1].user_attrs["irrep_study.reason"] == ORPHANED_OPTUNA_REASON
    assert said and "1 trial(s)" in said[0]


@pytest.mark.parametrize(
    "search, message",
    [
        ({"objectives": [{"metric": "num_params"}, {"metric": "val_mae_meV"}]}, "first objective must be val_mae_meV"),
        ({"objectives": [{"metric": "val_mae_meV"}, {"metric": "val_mae_meV"}]}, "named twice"),
        ({"objectives": [{"metric": "val_mae_meV"}, {"metric": "test_mae_meV"}]}, "objectives.1.metric"),
        ({"sampler": "cmaes", "objectives": [{"metric": "val_mae_meV"}, {"metric": "num_params"}]}, "cmaes optimises one"),
    ],
)
def test_objectives_that_cannot_be_searched_are_refused(tmp_path, search, message):
    import yaml

    from study.config.space import load_search_space
    from study.errors import UserError

    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "search": {"params": {"lr": {"loguniform": [1e-3, 1e-2]}}, **search}}))
    with pytest.raises(UserError, match=message):
        load_search_space(path)


def test_a_grid_creates_the_seeds_of_a_configuration_one_after_another():
    from ray.tune.search.variant_generator import generate_variants

    from study.config.space import SearchSpace
    from study.sweep.scheduling import live_trial_limit
    from study.sweep.search import searcher_and_space

    space = SearchSpace.model_validate(
        {
            "name": "g",
            "search": {"method": "grid", "grid": [{"l_values": [0, 1]}, {"l_values": [0, 2]}]},
            "seeds": [7, 8, 9],
            "resources": {"max_concurrent": 1},
        }
    )
    _, param_space, _ = searcher_and_space(space)
    order = [(c["grid_entry"]["l_values"], space.seed_list[c["__trial_index__"]]) for _, c in generate_variants(param_space)]
    assert order == [([0, 1], 7), ([0, 1], 8), ([0, 1], 9), ([0, 2], 7), ([0, 2], 8), ([0, 2], 9)]
    # Paused seeds count against Tune's limit on live trials: all seeds of a configuration must fit.
    assert live_trial_limit(space) == 3
    from study.config.space import Scheduler

    assert live_trial_limit(space.model_copy(update={"scheduler": Scheduler(type="none")})) == 1


def test_a_searcher_restored_from_before_its_trial_ended_does_not_stop_the_resumed_sweep(tmp_path):
    """A driver killed after telling Optuna a trial ended but before Ray saved the trial as ended:
    the resumed searcher (state saved earlier) sees the trial's last epochs reported again."""
    import pickle

    import optuna

    from study.config.space import SearchSpace
    from study.names import VAL_MAE
    from study.sweep.search import searcher_and_space

    space = SearchSpace.model_validate(
        {"name": "one", "search": {"method": "optuna", "num_samples": 1, "params": {"l_values": {"subsets_of": [0, 1]}}}}
    )
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher, _, _ = searcher_and_space(space, optuna_storage=url, study_name="s")
    searcher.suggest("t0")
    epoch = {VAL_MAE: 80.0, "epoch": 1, "training_iteration": 1}
    searcher.on_trial_result("t0", epoch)
    saved = pickle.dumps(searcher)  # Ray's last save of the searcher before the kill
    searcher.on_trial_result("t0", {**epoch, VAL_MAE: 60.0, "epoch": 2, "training_iteration": 2})
    searcher.on_trial_complete("t0", result={VAL_MAE: 60.0, "epoch": 2})

    restored = pickle.loads(saved)
    restored.on_trial_result("t0", {**epoch, VAL_MAE: 61.0, "epoch": 2, "training_iteration": 2})  # epoch 2 again
    restored.on_trial_complete("t0", result={VAL_MAE: 61.0, "epoch": 2})
    [trial] = optuna.load_study(study_name="s", storage=url).trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == 60.0  # what it was told first
