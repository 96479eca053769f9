"""Faults of a shared Ray cluster, with real processes on loopback: a node leaving mid-sweep, and two
drivers sweeping the same study at once."""

from __future__ import annotations

import json
import os
import signal

import pytest
from mlflow.tracking import MlflowClient

from study.tracking.store import PARENT_TAG, ROLE_TAG, STATUS_TAG
from tests.helpers.services import (
    MlflowServer,
    RayCluster,
    epochs_logged,
    grid_space,
    start_sweep,
    trial_runs_of,
    wait_for_epochs,
)

pytestmark = pytest.mark.slow  # a Ray cluster, a node killed, two drivers


def restored_trials(sweep_folder) -> list[str]:
    """Trials whose results show a restore from a checkpoint (fewer iterations since the restore
    than in total), from Ray Tune's own result files."""
    restored = []
    for result_file in sweep_folder.glob("*/result.json"):
        results = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        if any(r["iterations_since_restore"] < r["training_iteration"] for r in results):
            restored.append(results[-1]["trial_id"])
    return restored


def test_a_node_leaving_mid_sweep_its_trial_continues_on_another_from_its_checkpoint(qm9, qm9_cache_dir, tmp_path):
    cluster = RayCluster(workers=1, cpus=1)
    server = MlflowServer(tmp_path / "mlflow")
    client = MlflowClient(server.uri)
    space = grid_space(tmp_path, "node-loss", [[0, 1], [0, 2]], epochs=6, max_concurrent=2, max_failures=2)
    sweep = start_sweep(space, tmp_path, qm9_cache_dir, "--address", cluster.address, "--tracking-uri", server.uri, env=cluster.client_env)
    try:
        wait_for_epochs(sweep, tmp_path, lambda: (client, trial_runs_of(client, "node-loss")), epochs=2, trials=2)
        for process in cluster.node_processes(1):  # one trial per node (1 CPU each): one trial goes down with it
            process.kill()
        stdout, _ = sweep.communicate(timeout=600)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
        cluster.stop()
        server.stop()
    assert sweep.returncode == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    report = json.loads(stdout)
    assert [t["status"] for t in report["trials"]] == ["completed", "completed"]
    assert len(restored_trials(next(tmp_path.glob("ray_results/node-loss-*")))) == 1

    server.start()
    try:
        runs = trial_runs_of(client, "node-loss", deleted_too=True)
        assert len(runs) == 2  # the moved trial kept its run; nothing doubled, not even deleted
        for run in runs:
            assert run.info.status == "FINISHED" and run.data.tags[STATUS_TAG] == "completed"
            assert epochs_logged(client, run) == [1, 2, 3, 4, 5, 6]  # each epoch once
            assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 6
    finally:
        server.stop()


def test_two_drivers_sweeping_the_same_study_at_once_keep_their_own_parent_runs(qm9, qm9_cache_dir, tmp_path, run_cli):
    from analysis.load import load_study

    cluster = RayCluster(workers=1, cpus=1)
    server = MlflowServer(tmp_path / "mlflow")
    client = MlflowClient(server.uri)
    space = grid_space(tmp_path, "shared", [[0, 1], [0, 2]], epochs=2, max_concurrent=1)
    options = ("--address", cluster.address, "--tracking-uri", server.uri)
    drivers = [start_sweep(space, tmp_path, qm9_cache_dir, *options, env=cluster.client_env) for _ in range(2)]
    try:
        reports = []
        for driver in drivers:
            stdout, _ = driver.communicate(timeout=600)
            assert driver.returncode == 0, (tmp_path / "sweep.log").read_text()[-3000:]
            reports.append(json.loads(stdout))
    finally:
        for driver in drivers:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
        cluster.stop()

    try:
        assert len({r["path"] for r in reports}) == 2  # each its own sweep folder, even started in the same second
        assert len({r["parent_run_id"] for r in reports}) == 2
        assert reports[0]["experiment_id"] == reports[1]["experiment_id"]  # one study, one experiment
        runs = trial_runs_of(client, "shared", deleted_too=True)
        assert len(runs) == 4 and all(run.info.lifecycle_stage == "active" for run in runs)
        for report in reports:
            # Every trial of a driver is logged under that driver's parent run, and only those.
            children = {run.info.run_id for run in runs if run.data.tags[PARENT_TAG] == report["parent_run_id"]}
            assert children == {trial["mlflow_run_id"] for trial in report["trials"]}
            assert all(trial["status"] == "completed" for trial in report["trials"])
            parent = client.get_run(report["parent_run_id"])
            assert parent.info.status == "FINISHED" and parent.data.tags[ROLE_TAG] == "sweep"
            assert {run.run_id for run in load_study("shared", report["parent_run_id"], server.uri).trials} == children

            # `best` tells the two sweeps apart: restricted to one, it ranks only that sweep's runs.
            result = run_cli(
                "best", "--experiment", "shared", "--tracking-uri", server.uri, "--parent", report["parent_run_id"], "--json", check_exit=0
            )
            listed = {run_id for row in json.loads(result.stdout)["configurations"] for run_id in row["run_ids"]}
            assert listed == children
    finally:
        server.stop()


def test_sweeps_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    from datetime import datetime

    from study.sweep import folder

    class FrozenClock:
        @staticmethod
        def now():
            return datetime(2026, 11, 26, 7, 38, 41)

    monkeypatch.setattr(folder, "datetime", FrozenClock)
    folders = [folder.claim_folder(tmp_path, "shared") for _ in range(3)]
    assert [f.name for f in folders] == ["shared-20261126-073841", "shared-20261126-073841-2", "shared-20261126-073841-3"]
    assert all(f.is_dir() for f in folders)
