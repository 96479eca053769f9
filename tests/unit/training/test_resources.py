"""Resource estimates before any work (study/training/resources.py) and `irrep-study plan`."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import yaml

from study.bench.steps import PeakMemory, training_step
from study.config.trial import TrialConfig
from study.data.qm9 import CollatedSplit, QM9Dataset, split_indices, target_index
from study.errors import UserError
from study.nn.model import build_model, count_parameters, make_optimizer
from study.training.resources import check_fits, estimate, num_params

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_test")  # tiny models: one thread, reproducible under load


@pytest.mark.parametrize(
    "fields",
    [
        dict(l_values=[0], hidden_dim=2, num_layers=0),
        dict(l_values=[0, 1, 2], hidden_dim=8, num_layers=2),
        dict(l_values=[0, 2, 5], hidden_dim=3, num_layers=1, atom_dim=16, edge_dim=7),
    ],
)
def test_parameter_count_without_building_the_model(fields):
    config = TrialConfig(**fields)
    assert num_params(config) == count_parameters(build_model(config))


def test_memory_estimate_is_near_the_measured_peak_of_a_training_step(qm9):
    # Calibrated on a GPU allocator (exact peaks); on CPU the process's peak RSS during the step
    # (study.bench.steps.PeakMemory) measured 0.8-0.95x of it on four configurations.
    config = TrialConfig(l_values=[0, 1, 2, 3], hidden_dim=16, num_layers=1, batch_size=64, subset=2000)
    found = estimate(config, qm9)
    model = build_model(config)
    optimizer = make_optimizer(model, lr=1e-3)
    indices = split_indices(len(qm9), seed=config.split_seed, fractions=(1.0, 0.0, 0.0), subset=config.subset)["train"]
    batches = list(CollatedSplit(QM9Dataset(qm9, indices[:128])).batches(64))
    column = target_index(config.target)
    training_step(model, optimizer, batches[0], column)  # optimizer state exists from here on
    memory = PeakMemory(torch.device("cpu"))
    if not memory.available:
        # CI's machines are Linux with /proc: there a missing measurement is a defect, not a skip.
        if os.environ.get("CI") == "true":
            pytest.fail("peak memory cannot be measured (/proc/self/clear_refs or libc missing)")
        pytest.skip("peak memory is measured from Linux's /proc")
    memory.start()
    training_step(model, optimizer, batches[1], column)
    measured = memory.peak_bytes()
    assert 0.6 < found.step_bytes / measured < 1.6, (found.step_bytes, measured)


def test_a_configuration_beyond_the_free_memory_is_refused_in_one_line(qm9, monkeypatch):
    from study.training import resources

    config = TrialConfig(l_values=[0, 1], hidden_dim=4, num_layers=0)
    found = estimate(config, qm9)
    monkeypatch.setattr(resources, "available_bytes", lambda device: found.total_bytes - 1)
    with pytest.raises(UserError) as caught:
        check_fits(config, found, torch.device("cpu"), "train")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("train: l_values=[0, 1] hidden_dim=4")
    assert "needs an estimated" in message and "--force" in message
    monkeypatch.setattr(resources, "available_bytes", lambda device: 2 * found.total_bytes)
    check_fits(config, found, torch.device("cpu"), "train")  # fits: no error
    with pytest.raises(UserError, match="3 trials at once"):
        check_fits(config, found, torch.device("cpu"), "sweep", copies=3)


def tiny_space(tmp_path, search: dict) -> str:
    space = {
        "name": "tiny",
        "trial": {"hidden_dim": 2, "num_layers": 0, "subset": 300, "epochs": 2, "batch_size": 32},
        "search": search,
        "seeds": [1, 2, 3],
        "scheduler": {"type": "none"},
        "resources": {"cpus_per_trial": 1, "max_concurrent": 2},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(space))
    return str(path)


def test_plan_of_a_grid_counts_every_trial_and_adds_up(run_cli_in_process, tmp_path):
    path = tiny_space(tmp_path, {"method": "grid", "grid": [{"l_values": [0]}, {"l_values": [0, 1, 2], "hidden_dim": 4}]})
    report = json.loads(run_cli_in_process("plan", path, "--steps", "2", "--json", check_exit=0).stdout)
    assert report["trials"] == 6 and report["configurations"] == 2 and report["seeds"] == 3
    assert [row["label"] for row in report["rows"]] == ["grid[0]", "grid[1]"]
    small, large = report["rows"]
    assert large["num_params"] > small["num_params"] and large["memory_bytes"] > small["memory_bytes"]
    for row in report["rows"]:
        # 300 molecules, 80% train: 240 -> 8 batches of 32 per epoch, 2 epochs.
        assert row["steps_per_trial"] == 16
        assert row["trial_seconds"] == pytest.approx(row["step_seconds"] * 16)
    low, high = report["compute_seconds"]
    assert low == high == pytest.approx(3 * (small["trial_seconds"] + large["trial_seconds"]))
    assert report["wall_seconds"][0] == pytest.approx(low / 2)
    assert report["peak_memory_bytes"] == 2 * large["memory_bytes"]
    text = run_cli_in_process("plan", path, "--steps", "1", check_exit=0).stdout
    assert "6 trials" in text and "memory/trial" in text and "planned in" in text


def test_plan_of_an_optuna_space_gives_its_smallest_and_largest(run_cli_in_process, tmp_path):
    path = tiny_space(
        tmp_path,
        {
            "method": "optuna",
            "num_samples": 4,
            "params": {"l_values": {"subsets_of": [0, 1, 2]}, "hidden_dim": {"choice": [2, 6]}, "lr": {"loguniform": [1e-3, 1e-2]}},
        },
    )
    report = json.loads(run_cli_in_process("plan", path, "--steps", "1", "--json", check_exit=0).stdout)
    assert report["trials"] == 12
    smallest, largest = report["rows"]
    assert (smallest["label"], smallest["l_values"], smallest["hidden_dim"]) == ("smallest", [0], 2)
    assert (largest["label"], largest["l_values"], largest["hidden_dim"]) == ("largest", [0, 1, 2], 6)
    low, high = report["compute_seconds"]
    assert low == pytest.approx(12 * smallest["trial_seconds"]) and high == pytest.approx(12 * largest["trial_seconds"])
    assert math.isfinite(report["plan_seconds"])
