"""The sweep's live status (study.sweep.status.SweepStatus) on fake Tune trials and an injected clock."""

from __future__ import annotations

import io
import pickle
from types import SimpleNamespace

from rich.console import Console

from study.config.space import SearchSpace
from study.sweep.status import SweepStatus

OPTUNA = {
    "name": "quick",
    "trial": {"epochs": 4},
    "search": {
        "method": "optuna",
        "num_samples": 3,
        "params": {"l_values": {"subsets_of": [0, 1, 2]}, "lr": {"loguniform": [1.0e-4, 1.0e-2]}},
    },
    "seeds": [11, 22],
}
GRID = {
    "name": "grid",
    "trial": {"epochs": 4, "hidden_dim": 4},
    "search": {"method": "grid", "grid": [{"l_values": [0, 1]}, {"l_values": [0, 2], "hidden_dim": 2}]},
    "seeds": [11, 22],
}


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def optuna_trial(n, status, index, l_values, lr, **result):
    # As OptunaSearch (define-by-run) and the Repeater make it: Optuna's flags, the l_values
    # constant, the sampled lr, and the seed index.
    config = {"use_l1": "1" in l_values, "use_l2": "2" in l_values, "l_values": l_values, "lr": lr, "__trial_index__": index}
    return SimpleNamespace(trial_id=f"t_{n:05d}", status=status, config=config, last_result=result)


def grid_trial(n, status, entry, index, **result):
    config = {"grid_entry": entry, "__trial_index__": index}
    return SimpleNamespace(trial_id=f"g_{n:05d}", status=status, config=config, last_result=result)


def text(status: SweepStatus, trials, now: float) -> str:
    console = Console(file=io.StringIO(), width=200)
    console.print(status.renderable(status.snapshot(trials, now)))
    return console.file.getvalue()


def some_trials():
    return [
        optuna_trial(
            0,
            "TERMINATED",
            0,
            "0,1",
            0.00316,
            epoch=4,
            val_mae_meV=190.0,
            best_val_mae_meV=175.25,
            test_mae_meV=50.0,
            trial_status="completed",
            seed=11,
        ),
        optuna_trial(1, "TERMINATED", 1, "0,1", 0.00316, epoch=1, val_mae_meV=300.0, trial_status="running", seed=22),
        optuna_trial(2, "ERROR", 0, "0,2", 0.0001, epoch=1, val_mae_meV=400.0, trial_status="running", seed=11),
        optuna_trial(3, "TERMINATED", 1, "0,2", 0.0001, epoch=1, val_mae_meV=float("inf"), trial_status="diverged", seed=22),
        optuna_trial(4, "RUNNING", 0, "0,1,2", 0.001, epoch=2, val_mae_meV=250.0, trial_status="running", seed=11),
        optuna_trial(5, "PAUSED", 1, "0,1,2", 0.001, epoch=1, val_mae_meV=260.0, trial_status="running", seed=22),
    ]


def test_counts_trials_done_of_the_total_and_running():
    status = SweepStatus(SearchSpace.model_validate(OPTUNA), clock=Clock(), terminal=False)
    snap = status.snapshot(some_trials(), 0.0)
    assert (snap["done"], snap["total"], snap["running"], snap["paused"]) == (4, 6, 1, 1)
    assert snap["ended"] == {"completed": 1, "stopped_early": 1, "failed": 1, "diverged": 1}
    assert [row["status"] for row in snap["live"]] == ["running", "paused"]
    shown = text(status, some_trials(), 0.0)
    assert "4/6 trials done (1 completed, 1 diverged, 1 failed, 1 stopped_early) | 1 running, 1 paused" in shown


def test_best_so_far_is_the_lowest_validation_mae_with_its_configuration():
    status = SweepStatus(SearchSpace.model_validate(OPTUNA), clock=Clock(), terminal=False)
    trials = some_trials()
    best = status.snapshot(trials, 0.0)["best"]
    # Trial 0's best epoch (175.25), not its last (190) nor its test MAE (50); the diverged inf is no value.
    assert best == {"value": 175.25, "trial": "t_00000", "params": {"l_values": "0,1", "lr": "0.00316"}, "seed": 11}
    assert "best val MAE: 175.2 meV  l_values=0,1 lr=0.00316 seed=11 (trial t_00000)" in text(status, trials, 0.0)

    # A running trial's earlier epoch counts though its last result is worse: Tune keeps only the last.
    running = trials[4]
    status.on_trial_result(0, trials, running, {"val_mae_meV": 120.0})
    running.last_result = {**running.last_result, "epoch": 3, "val_mae_meV": 240.0}
    best = status.snapshot(trials, 0.0)["best"]
    assert (best["value"], best["trial"], best["params"], best["seed"]) == (120.0, "t_00004", {"l_values": "0,1,2", "lr": "0.001"}, 11)


def test_no_best_and_no_eta_before_any_result():
    status = SweepStatus(SearchSpace.model_validate(OPTUNA), clock=Clock(), terminal=False)
    pending = [optuna_trial(0, "PENDING", 0, "0,1", 0.001)]
    shown = text(status, pending, 0.0)
    assert "0/6 trials done | 0 running" in shown and "ETA -" in shown and "best val MAE: -" in shown


def test_eta_appears_once_a_trial_finished():
    status = SweepStatus(SearchSpace.model_validate(OPTUNA), clock=Clock(), terminal=False)
    first = optuna_trial(0, "RUNNING", 0, "0,1", 0.001, epoch=0)
    second = optuna_trial(1, "RUNNING", 1, "0,1", 0.001, epoch=0)
    status.snapshot([first, second], 0.0)  # the first step: the clock starts
    first.last_result, second.last_result = {"epoch": 2, "val_mae_meV": 300.0}, {"epoch": 2, "val_mae_meV": 310.0}
    assert status.snapshot([first, second], 10.0)["eta"] is None  # trained, but nothing finished
    assert "ETA -" in text(status, [first, second], 10.0)

    first.status, first.last_result = "TERMINATED", {"epoch": 4, "val_mae_meV": 200.0, "trial_status": "completed"}
    second.last_result = {"epoch": 4, "val_mae_meV": 210.0}
    # 8 trial-epochs in 20 s; a trial takes 4 epochs (the finished one): 4 more trials never
    # proposed yet (16 epochs) and the second one done training (0 left): 16 / 0.4 = 40 s.
    assert status.snapshot([first, second], 20.0)["eta"] == 40.0
    assert "20s elapsed, ETA 40s" in text(status, [first, second], 20.0)


def test_eta_counts_only_the_epochs_trained_since_this_driver_started():
    """A resumed sweep: the epochs of restored trials were not trained at today's rate."""
    status = SweepStatus(SearchSpace.model_validate(OPTUNA), clock=Clock(), terminal=False)
    restored = [optuna_trial(n, "TERMINATED", n % 2, "0,1", 0.001, epoch=4, trial_status="completed") for n in range(4)]
    running = optuna_trial(4, "RUNNING", 0, "0,2", 0.001, epoch=0)
    status.snapshot([*restored, running], 100.0)
    assert status.snapshot([*restored, running], 110.0)["eta"] is None  # nothing trained since
    running.last_result = {"epoch": 2}
    # 2 epochs in 10 s; left: 2 of the running trial's 4 and 4 of the last, never-proposed one.
    assert status.snapshot([*restored, running], 110.0)["eta"] == 30.0


def test_the_searched_params_are_the_columns():
    optuna = SweepStatus(SearchSpace.model_validate(OPTUNA), clock=Clock(), terminal=False)
    header = next(line for line in text(optuna, some_trials(), 0.0).splitlines() if "trial" in line and "status" in line)
    assert header.split() == ["trial", "l_values", "lr", "seed", "epoch", "val", "MAE", "(meV)", "status"]
    rows = optuna.snapshot(some_trials(), 0.0)["live"]
    assert rows[1] == {"trial": "t_00005", "l_values": "0,1,2", "lr": "0.001", "seed": 22, "epoch": 1, "val": 260.0, "status": "paused"}

    grid = SweepStatus(SearchSpace.model_validate(GRID), clock=Clock(), terminal=False)
    # The seed comes from the seed index before the trial reports it; a key an entry lacks shows
    # the base trial's value.
    trials = [
        grid_trial(0, "RUNNING", {"l_values": [0, 1]}, 1),
        grid_trial(1, "RUNNING", {"l_values": [0, 2], "hidden_dim": 2}, 0, epoch=1, val_mae_meV=321.0, seed=11),
    ]
    shown = text(grid, trials, 0.0)
    assert "0/4 trials done | 2 running" in shown
    lines = shown.splitlines()
    assert lines[2].split() == ["trial", "l_values", "hidden_dim", "seed", "epoch", "val", "MAE", "(meV)", "status"]
    assert lines[3].split() == ["g_00000", "0,1", "4", "22", "0", "-", "running"]
    assert lines[4].split() == ["g_00001", "0,2", "2", "11", "1", "321.0", "running"]


def test_off_a_terminal_it_prints_on_change_at_most_every_ten_seconds(capsys):
    clock = Clock()
    status = SweepStatus(SearchSpace.model_validate(OPTUNA), clock=clock, terminal=False)
    trial = optuna_trial(0, "RUNNING", 0, "0,1", 0.001, epoch=0)

    def printed(now: float) -> int:
        clock.now = now
        status.on_step_end(0, [trial])
        return capsys.readouterr().err.count("trials done")

    assert printed(0.0) == 1  # the first step shows where it stands
    assert printed(5.0) == 0  # nothing changed
    trial.last_result = {"epoch": 1, "val_mae_meV": 300.0}
    assert printed(9.0) == 0  # changed, but within 10 s of the last block
    assert printed(10.0) == 1
    assert printed(60.0) == 0  # nothing changed since
    assert printed(129.0) == 0
    assert printed(130.0) == 1  # a heartbeat after 2 minutes of quiet
    trial.status, trial.last_result = "TERMINATED", {"epoch": 4, "val_mae_meV": 200.0, "trial_status": "completed"}
    clock.now = 131.0
    status.on_experiment_end([trial])  # the final state, whatever the rate limit
    final = capsys.readouterr().err
    assert "1/6 trials done (1 completed) | 0 running" in final and "best val MAE: 200.0 meV" in final


def test_on_a_terminal_it_updates_one_live_display_in_place():
    clock = Clock()
    status = SweepStatus(SearchSpace.model_validate(OPTUNA), clock=clock, terminal=True)
    status._console = Console(file=io.StringIO(), force_terminal=True, width=150)  # instead of stderr
    trial = optuna_trial(0, "RUNNING", 0, "0,1", 0.001, epoch=1, val_mae_meV=300.0)
    status.on_step_end(0, [trial])
    assert status._live is not None and status._live.is_started
    trial.status, trial.last_result = "TERMINATED", {"epoch": 4, "val_mae_meV": 200.0, "trial_status": "completed"}
    clock.now = 0.5
    status.on_step_end(1, [trial])  # within a second of the last redraw: not redrawn
    assert "200.0" not in status._console.file.getvalue()
    status.on_experiment_end([trial])
    assert status._live is None  # stopped; not transient, so the final state stays on screen
    assert "1/6 trials done (1 completed)" in status._console.file.getvalue()


def test_pickles_without_its_console_as_ray_saves_and_resume_restores_it(capsys):
    status = SweepStatus(SearchSpace.model_validate(OPTUNA), terminal=False)
    status.on_step_end(0, [optuna_trial(0, "RUNNING", 0, "0,1", 0.001, epoch=1, val_mae_meV=300.0)])
    assert status._console is not None
    restored = pickle.loads(pickle.dumps(status))
    assert restored._console is None and restored._started is None and restored.total == 6
    restored.on_step_end(0, [optuna_trial(0, "RUNNING", 0, "0,1", 0.001, epoch=2, val_mae_meV=280.0)])
    assert "0/6 trials done | 1 running" in capsys.readouterr().err
