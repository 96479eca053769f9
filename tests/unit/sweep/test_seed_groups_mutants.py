"""Seed-aware rungs (study/sweep/seed_groups.py): the guarantees the other tests left unpinned,
written to kill the mutants that survived them (docs/mutation.md)."""

from __future__ import annotations

import pytest

from study.sweep.seed_groups import CONTINUE, PAUSE, STOP, SeedGroups, Verdict, rungs


def seeds(groups: SeedGroups, config: dict, *trial_ids: str) -> None:
    for k, trial_id in enumerate(trial_ids):
        groups.add(trial_id, {**config, "__trial_index__": k})


@pytest.mark.parametrize("grace, factor", [(0, 2), (-1, 2), (1, 1), (1, 0.5), (0, 1)])
def test_rungs_refuse_a_grace_period_that_is_not_positive_or_a_factor_not_above_one(grace, factor):
    with pytest.raises(ValueError, match="^grace_period must be positive and reduction_factor above 1$"):
        rungs(grace, factor, 10)


def test_rungs_start_at_the_grace_period_and_grow_by_the_factor():
    assert rungs(1, 3, 30) == [1, 3, 9, 27]
    assert rungs(0.5, 2, 5) == [1, 2, 4]  # 0.5 rounds up to 1; 1 is not a second rung
    assert rungs(2, 2, 9) == [2, 4, 8]  # 8 is below max_t: a rung
    assert rungs(2, 2, 8) == [2, 4]  # 8 reaches max_t: the trial is done there anyway
    assert rungs(3, 1.1, 6) == [3, 4, 5]  # 3, 3.3, 3.63, 3.99, 4.39, 4.83, 5.31, 5.85: each whole epoch once


@pytest.mark.parametrize("mode", ["mean", "MIN", ""])
def test_a_mode_other_than_min_or_max_is_refused(mode):
    with pytest.raises(ValueError, match=f"^mode must be min or max, got {mode!r}$"):
        SeedGroups([1], group_size=1, reduction_factor=2, mode=mode)


def test_a_group_needs_at_least_one_seed():
    with pytest.raises(ValueError, match="^group_size must be at least 1$"):
        SeedGroups([1], group_size=0, reduction_factor=2)
    assert SeedGroups([1], group_size=1, reduction_factor=2).group_size == 1


def test_the_summary_counts_the_configurations_judged_at_each_rung():
    groups = SeedGroups([2, 1, 2], group_size=1, reduction_factor=2)
    assert groups.rungs == [1, 2]
    assert groups.summary() == "epoch 1: 0 configurations judged; epoch 2: 0 configurations judged"
    for name in ("a", "b"):
        seeds(groups, {"config": name}, f"{name}0")
    groups.result("a0", 1, 10.0)
    groups.result("b0", 1, 5.0)
    assert groups.summary() == "epoch 1: 2 configurations judged; epoch 2: 0 configurations judged"
    assert SeedGroups([], group_size=1, reduction_factor=2).summary() == "no rungs"


def test_closing_decides_every_short_group_releasing_some_and_stopping_others():
    groups = SeedGroups([1], group_size=2, reduction_factor=2)
    for name, value in (("a", 50.0), ("b", 70.0), ("c", 40.0)):
        groups.add(f"{name}0", {"config": name, "__trial_index__": 0})  # the searcher never sent seed 1
        assert groups.result(f"{name}0", 1, value).trial == PAUSE
    verdict = groups.close()
    assert (verdict.release, verdict.stop) == (["a0", "c0"], ["b0"])
    assert groups.released == {"a0", "c0"}


def test_verdicts_merge_by_adding_up_what_to_stop_and_release():
    verdict = Verdict(stop=["a"], release=["b"]).merge(Verdict(stop=["c"], release=["d"])).merge(Verdict())
    assert (verdict.trial, verdict.stop, verdict.release) == (CONTINUE, ["a", "c"], ["b", "d"])


def test_a_seed_that_finished_on_its_own_counts_with_its_last_value_at_later_rungs():
    groups = SeedGroups([1, 2], group_size=2, reduction_factor=2)
    seeds(groups, {"lr": 0.1}, "a0", "a1")
    groups.result("a0", 1, 60.0)
    groups.result("a1", 1, 40.0)
    assert groups.released == {"a0"}
    groups.end("a0", "finished", value=30.0)  # it ended before the last epoch (Tune told us outside a result)
    assert "a0" not in groups.released  # an ended trial is never resumed
    verdict = groups.result("a1", 2, 50.0)
    assert verdict.trial == CONTINUE and groups.groups[0].means == {1: 50.0, 2: 40.0}


def test_a_dropped_seed_does_not_count_in_its_groups_mean():
    groups = SeedGroups([1], group_size=3, reduction_factor=2)
    seeds(groups, {"lr": 0.1}, "a0", "a1", "a2")
    groups.end("a2", "dropped", value=1000.0)
    groups.result("a0", 1, 50.0)
    assert groups.result("a1", 1, 60.0).trial == CONTINUE
    assert groups.groups[0].means == {1: 55.0}


def test_a_trial_the_groups_do_not_know_runs_on_and_stops_when_it_ends():
    groups = SeedGroups([1], group_size=1, reduction_factor=2)
    assert groups.group("nobody") is None
    assert groups.result("nobody", 1, 50.0).trial == CONTINUE
    assert groups.result("nobody", 2, 50.0, final=True).trial == STOP
    verdict = groups.end("nobody", "finished", 50.0)
    assert (verdict.trial, verdict.stop, verdict.release) == (CONTINUE, [], [])


def test_a_removed_seed_that_reports_late_is_stopped_and_not_counted():
    groups = SeedGroups([1, 2], group_size=2, reduction_factor=2)
    seeds(groups, {"lr": 0.1}, "a0", "a1")
    groups.end("a1", "dropped")
    assert groups.result("a0", 1, 50.0).trial == CONTINUE  # decided with a0 alone
    assert groups.result("a1", 1, 10.0).trial == STOP
    assert groups.result("a1", 2, 10.0, final=True).trial == STOP
    assert groups.result("a0", 2, 60.0).trial == CONTINUE and groups.groups[0].means == {1: 50.0, 2: 60.0}


def test_a_restored_seed_of_a_stopped_configuration_is_stopped_once():
    groups = SeedGroups([1], group_size=2, reduction_factor=2)
    groups.add("b0", {"lr": 0.2, "__trial_index__": 0}, "stopped")
    groups.add("b1", {"lr": 0.2, "__trial_index__": 1}, "live", epoch=3, value=60.0)
    assert groups.result("b1", 4, 58.0).trial == STOP  # it reported before the sweep settled
    assert groups.settle().stop == []  # already stopped: not stopped a second time
    assert groups.end("b1", "finished", 58.0).stop == []


def test_settling_goes_past_a_stopped_configuration_to_the_next_and_marks_the_released_for_resuming():
    groups = SeedGroups([1, 2], group_size=2, reduction_factor=2)
    groups.add("b0", {"lr": 0.2, "__trial_index__": 0}, "stopped")
    groups.add("b1", {"lr": 0.2, "__trial_index__": 1}, "live", epoch=1, value=60.0)
    groups.add("a1", {"lr": 0.1, "__trial_index__": 1}, "live", epoch=1, value=45.0)
    groups.add("a0", {"lr": 0.1, "__trial_index__": 0}, "live", epoch=2, value=40.0)
    settled = groups.settle()
    assert (settled.stop, settled.release) == (["b1"], ["a1"])
    assert groups.released == {"a1"}  # the scheduler resumes exactly these paused trials


def test_a_released_seed_whose_configuration_is_then_stopped_is_no_longer_marked_for_resuming():
    groups = SeedGroups([1, 2], group_size=3, reduction_factor=2)
    groups.add("b1", {"lr": 0.2, "__trial_index__": 1}, "live", epoch=1, value=45.0)
    groups.add("b0", {"lr": 0.2, "__trial_index__": 0}, "live", epoch=2, value=40.0)
    assert groups.settle().release == ["b1"] and groups.released == {"b1"}
    groups.add("b2", {"lr": 0.2, "__trial_index__": 2}, "stopped")  # restored later: its group was stopped
    assert sorted(groups.settle().stop) == ["b0", "b1"]
    assert groups.released == set()


def test_a_stopped_configuration_is_not_judged_at_later_rungs_and_does_not_raise_the_bar():
    groups = SeedGroups([1, 2], group_size=2, reduction_factor=2)
    seeds(groups, {"config": "x"}, "x0", "x1")
    seeds(groups, {"config": "b"}, "b0", "b1")
    groups.result("x0", 1, 50.0), groups.result("x1", 1, 50.0)
    groups.result("b0", 1, 90.0, final=True)  # finished on its own, at a poor value
    assert groups.result("b1", 1, 80.0).trial == STOP  # mean 85, worse than x's 50
    assert groups.end("b1", "stopped").stop == []  # Tune reports the stop it was told to make
    assert groups.recorded[2] == {}
    groups.result("x0", 2, 100.0)
    assert groups.result("x1", 2, 100.0).trial == CONTINUE  # the first judged at epoch 2: no cutoff yet


def test_a_seed_that_reached_the_rung_counts_with_its_value_there_whatever_ended_it_after():
    groups = SeedGroups([1], group_size=2, reduction_factor=2)
    seeds(groups, {"lr": 0.1}, "a0", "a1")
    assert groups.result("a0", 1, 50.0).trial == PAUSE
    groups.end("a0", "finished", value=30.0)  # ended while paused, with a later, better value
    groups.result("a1", 1, 70.0)
    assert groups.groups[0].means == {1: 60.0}  # a0 at the rung, not its final value
    seeds(groups, {"lr": 0.2}, "b0", "b1")
    groups.result("b0", 1, 50.0)
    groups.end("b0", "dropped")  # failed for good after reaching the rung: no longer counts
    groups.result("b1", 1, 70.0)
    assert groups.groups[1].means == {1: 70.0}


def test_a_seed_that_finished_without_a_value_does_not_count():
    groups = SeedGroups([1], group_size=2, reduction_factor=2)
    seeds(groups, {"lr": 0.1}, "a0", "a1")
    groups.end("a1", "finished")
    assert groups.result("a0", 1, 50.0).trial == CONTINUE and groups.groups[0].means == {1: 50.0}


def test_a_configuration_stopped_once_is_stopped_again_when_proposed_again():
    groups = SeedGroups([1], group_size=2, reduction_factor=2)
    seeds(groups, {"lr": 0.1}, "x0", "x1")
    seeds(groups, {"lr": 0.5}, "a0", "a1")
    seeds(groups, {"lr": 0.5}, "c0", "c1")  # a again
    groups.result("x0", 1, 40.0), groups.result("x1", 1, 40.0)
    groups.result("a0", 1, 60.0)
    assert groups.result("a1", 1, 60.0).trial == STOP
    groups.result("c0", 1, 10.0)
    verdict = groups.result("c1", 1, 10.0)  # on its own it would go on; it is a, which stopped
    assert (verdict.trial, verdict.stop) == (STOP, ["c0"])
    assert groups.groups[2].decided == {1: STOP}


def test_a_resumed_repeat_of_a_configuration_that_went_on_is_released_at_the_rung():
    groups = SeedGroups([1, 2], group_size=2, reduction_factor=2)
    seeds(groups, {"lr": 0.1}, "a0", "a1")
    groups.result("a0", 1, 50.0), groups.result("a1", 1, 50.0)
    groups.add("c0", {"lr": 0.1, "__trial_index__": 0}, "live", epoch=1, value=90.0)  # a proposed again, restored
    groups.add("c1", {"lr": 0.1, "__trial_index__": 1}, "live", epoch=1, value=90.0)
    assert groups.settle().release == ["c0", "c1"]
    assert groups.groups[1].decided == {1: CONTINUE}


@pytest.mark.parametrize(
    "mean, verdict",
    [(14.0, CONTINUE), (20.0, CONTINUE), (21.0, STOP), (25.0, STOP)],
)
def test_a_group_goes_on_when_its_mean_is_in_the_best_one_over_reduction_factor_of_those_judged_before(mean, verdict):
    groups = SeedGroups([1], group_size=1, reduction_factor=3)
    for k, earlier in enumerate((10.0, 20.0, 30.0, 40.0)):
        groups.add(f"e{k}", {"config": k, "__trial_index__": 0})
        groups.result(f"e{k}", 1, earlier)
    # The 2/3 quantile of the scores -40, -30, -20, -10 is -20: a mean of 20 or better goes on.
    groups.add("new", {"config": "new", "__trial_index__": 0})
    assert groups.result("new", 1, mean).trial == verdict


@pytest.mark.parametrize("mean, verdict", [(39.9, CONTINUE), (40.0, CONTINUE), (40.1, STOP)])
def test_with_a_reduction_factor_of_two_the_cutoff_is_the_median_of_the_earlier_means(mean, verdict):
    groups = SeedGroups([1], group_size=1, reduction_factor=2)
    for k, earlier in enumerate((30.0, 50.0)):
        groups.add(f"e{k}", {"config": k, "__trial_index__": 0})
        groups.result(f"e{k}", 1, earlier)
    groups.add("new", {"config": "new", "__trial_index__": 0})
    assert groups.result("new", 1, mean).trial == verdict


def test_in_max_mode_a_higher_mean_is_better():
    groups = SeedGroups([1], group_size=1, reduction_factor=2, mode="max")
    for name, value, verdict in (("a", 0.5, CONTINUE), ("b", 0.4, STOP), ("c", 0.9, CONTINUE)):
        groups.add(name, {"config": name, "__trial_index__": 0})
        assert groups.result(name, 1, value).trial == verdict
    assert groups.recorded[1] == {0: 0.5, 1: 0.4, 2: 0.9}


def test_adding_a_trial_again_changes_nothing():
    groups = SeedGroups([1], group_size=2, reduction_factor=2)
    assert groups.add("a0", {"lr": 0.1, "__trial_index__": 0}, "live", epoch=1, value=50.0)  # restored, waiting
    assert groups.add("a0", {"lr": 0.1, "__trial_index__": 0}, "live", epoch=1, value=50.0) is False
    assert groups.add("a0", {"lr": 0.9, "__trial_index__": 5}) is False
    assert [sorted(g.seeds) for g in groups.groups] == [["a0"]]


def test_a_seed_proposed_again_before_its_configuration_is_complete_starts_a_new_group():
    groups = SeedGroups([1], group_size=3, reduction_factor=2)
    groups.add("a0", {"lr": 0.1, "__trial_index__": 0})
    groups.add("a1", {"lr": 0.1, "__trial_index__": 1})
    groups.add("b0", {"lr": 0.1, "__trial_index__": 0})  # seed 0 of the same configuration again: a repeat
    groups.add("a2", {"lr": 0.1, "__trial_index__": 2})
    assert [sorted(g.seeds) for g in groups.groups] == [["a0", "a1", "a2"], ["b0"]]


def test_a_restored_seed_that_had_finished_counts_with_its_last_value():
    groups = SeedGroups([1], group_size=2, reduction_factor=2)
    groups.add("a0", {"lr": 0.1, "__trial_index__": 0}, "finished", value=30.0)
    assert groups.add("a1", {"lr": 0.1, "__trial_index__": 1}, "live", epoch=1, value=50.0)
    assert groups.settle().release == ["a1"]
    assert groups.groups[0].means == {1: 40.0}
