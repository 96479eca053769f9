"""Faults survived with real processes: a trial worker killed mid-epoch, the driver killed or stopped
with Ctrl-C mid-sweep, a tracking server that goes away, answers slowly or answers 5xx."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from study.tracking.store import ROLE_TAG, STATUS_TAG, TRIAL_ID_TAG
from tests.helpers.services import (
    epochs_logged,
    grid_space,
    kill_sweep_and_wait,
    start_sweep,
    sweep_report,
    trial_runs_of,
    wait_for_epochs,
    wait_until,
)

pytestmark = pytest.mark.slow  # real sweeps on a local Ray, killed and restarted

TRIAL = {"hidden_dim": 4, "num_layers": 1}


def trial_runs(cwd, name):
    from mlflow.tracking import MlflowClient

    # Touch the store only once the sweep has created it: two processes creating MLflow's tables
    # at once collide.
    if not list(cwd.glob("ray_results/*/irrep_study_sweep.json")):
        return None, []

    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client, []
    return client, client.search_runs([experiment.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'trial'")


def trial_workers(sweep: subprocess.Popen) -> list[psutil.Process]:
    """The trial workers of this sweep's own local Ray (its raylet is the driver's child), not those
    of a sweep another test runs beside it."""
    found = []
    for process in psutil.Process(sweep.pid).children(recursive=True):
        try:
            cmdline = " ".join(process.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "ray::ImplicitFunc" in cmdline or "ray::run_sweep_trial" in cmdline:
            found.append(process)
    return found


def test_killed_trial_worker_resumes_from_its_checkpoint_with_each_epoch_logged_once(qm9, qm9_cache_dir, tmp_path):
    # Killed after 2 of 10 epochs: 8 epochs (several seconds) stand between the check and the
    # trial's end, so the kill lands mid-training even on a loaded machine (checked below).
    EPOCHS = 10
    space = grid_space(tmp_path, "worker-kill", [[0, 1]], epochs=EPOCHS, subset=2000, max_failures=2)
    sweep = start_sweep(space, tmp_path, qm9_cache_dir)
    try:
        wait_for_epochs(sweep, tmp_path, lambda: trial_runs(tmp_path, "worker-kill"), epochs=2)
        workers = trial_workers(sweep)
        assert workers, "no trial worker process found"
        killed = {worker.pid for worker in workers}
        for worker in workers:
            worker.send_signal(signal.SIGKILL)
        stdout, _ = sweep.communicate(timeout=600)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    assert sweep.returncode == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    report = json.loads(stdout)
    assert [t["status"] for t in report["trials"]] == ["completed"]
    # Continued from its checkpoint, not restarted: Ray's result.json keeps the reports of both
    # attempts, and a restart from scratch would report epoch 1 (and 2) again.
    [trial_dir] = Path(report["path"]).glob("run_sweep_trial_*")
    rows = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]
    reported = [row["epoch"] for row in rows]
    assert reported == list(range(1, EPOCHS + 1)), reported
    # And there was a retry to continue: the first epochs came from a worker that was killed,
    # the last from a new one (Ray puts the reporting process's pid in every result).
    pids = [row["pid"] for row in rows]
    assert pids[0] in killed and pids[-1] not in killed, (pids, killed)

    client, runs = trial_runs(tmp_path, "worker-kill")
    assert len(runs) == 1  # the retry kept the trial's MLflow run
    run = runs[0]
    assert run.data.tags[STATUS_TAG] == "completed" and run.info.status == "FINISHED"
    assert epochs_logged(client, run) == list(range(1, EPOCHS + 1))  # each epoch exactly once
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == EPOCHS
    assert "test_mae_meV" in run.data.metrics


def test_killed_driver_then_resume_completes_the_study_without_duplicate_runs(qm9, qm9_cache_dir, tmp_path):
    # The driver is killed while a trial is early in its training (1 to EARLY of its EPOCHS
    # logged: a window of several polls), so that at least 10 epochs (about 6 s here) stand between
    # the check and that trial's end. With 4 epochs and any count accepted, CI twice saw the trial
    # finish between the check (MLflow queries, slow on a loaded machine) and the kill.
    EPOCHS, EARLY = 16, 6
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "name": "driver-kill",
                "trial": {**TRIAL, "subset": 1200, "epochs": EPOCHS},
                "search": {"method": "optuna", "num_samples": 3, "seed": 3, "params": {"l_values": {"subsets_of": [0, 1, 2]}}},
                "scheduler": {"type": "none"},
                "resources": {"max_concurrent": 1},
            }
        )
    )
    # The sweep creates its store itself: MLflow's "Creating initial MLflow database tables" is
    # one of the lines of chatter checked below to stay out of the log.
    first = start_sweep(space, tmp_path, qm9_cache_dir, premade_store=False)
    try:

        def one_done_one_started():
            assert first.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
            client, runs = trial_runs(tmp_path, "driver-kill")
            done = [r for r in runs if r.data.tags.get(STATUS_TAG) == "completed"]
            early = [r for r in runs if r.data.tags.get(STATUS_TAG) == "running" and 1 <= len(epochs_logged(client, r)) <= EARLY]
            return len(done) >= 1 and len(early) >= 1

        wait_until(one_done_one_started, 400, "one finished trial and one early in its training")
    finally:
        # The driver and the local Ray it started: the snapshot below is read only once every one
        # of them is gone, so that nothing writes to the store after it.
        kill_sweep_and_wait(first)
    # What the killed driver left: the runs it finished and those it left RUNNING (at least one,
    # by the wait above). Each of the latter must, after the resume, be either continued into the
    # same MLflow run or ended as interrupted; never left RUNNING, never doubled by a second run.
    _, left = trial_runs(tmp_path, "driver-kill")
    done_at_kill = {r.info.run_id for r in left if r.data.tags.get(STATUS_TAG) == "completed"}
    running_at_kill = {r.info.run_id for r in left if r.info.status == "RUNNING"}
    assert done_at_kill and running_at_kill, [(r.info.run_id, r.info.status, r.data.tags.get(STATUS_TAG)) for r in left]

    report = sweep_report(start_sweep(space, tmp_path, qm9_cache_dir, "--resume"), tmp_path)
    assert len(report["trials"]) == 3 and all(t["status"] == "completed" for t in report["trials"]), (
        report["trials"],
        (tmp_path / "sweep.log").read_text()[-4000:],
    )
    # Without --verbose, the libraries' own chatter stays out of the log (Optuna, MLflow, Ray Tune).
    log_text = (tmp_path / "sweep.log").read_text()
    for chatter in ("A new study created", "Creating initial MLflow database tables", "TensorBoard", "Token authentication is enabled"):
        assert chatter not in log_text, chatter

    client, runs = trial_runs(tmp_path, "driver-kill")
    by_id = {r.info.run_id: r for r in runs}
    finished_ids = {t["mlflow_run_id"] for t in report["trials"]}
    finished = [by_id[run_id] for run_id in finished_ids]
    assert len(finished) == 3  # one run per trial: none duplicated by the resume
    # Trials finished before the kill kept their runs: the resume did not run them again.
    assert done_at_kill <= finished_ids
    # A trial the killed driver left RUNNING is either restored by Ray and continued in the SAME
    # MLflow run, or (Ray had not saved it yet) not continued: then its run ends as interrupted,
    # with the reason. Which of the two happens depends on timing; both are checked for each run.
    interrupted = running_at_kill - finished_ids
    for run_id in interrupted:
        run = by_id[run_id]
        assert run.info.status == "KILLED" and run.data.tags[STATUS_TAG] == "interrupted", (run.info, run.data.tags)
        assert "driver stopped" in run.data.tags["irrep_study.reason"]
    # Every run is one of the study's 3 trials or one the killed driver left interrupted: no
    # restored trial opened a second run, and no run stays RUNNING.
    assert set(by_id) == finished_ids | interrupted, sorted((r.info.run_id, r.info.status) for r in runs)
    # A Ray trial has one run: the 3 finished runs are 3 trials, and no trial whose run was ended
    # interrupted went on in a new run (Ray restores a saved trial under its trial id).
    trial_ids = [by_id[run_id].data.tags[TRIAL_ID_TAG] for run_id in finished_ids]
    assert len(set(trial_ids)) == 3, trial_ids
    assert not {by_id[run_id].data.tags[TRIAL_ID_TAG] for run_id in interrupted} & set(trial_ids)
    print(f"runs left RUNNING by the killed driver: {len(running_at_kill & finished_ids)} continued, {len(interrupted)} interrupted")
    # Each trial's run holds every epoch exactly once, the continued trial's too.
    for run in finished:
        assert run.info.status == "FINISHED" and run.data.tags[STATUS_TAG] == "completed"
        assert epochs_logged(client, run) == list(range(1, EPOCHS + 1))
    assert not [r for r in runs if r.info.status == "RUNNING"]
    parents = client.search_runs([runs[0].info.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    # The resumed sweep went on with the same Optuna study in the sweep's folder: one completed
    # Optuna trial per configuration, told what its run logged last.
    import optuna

    study = optuna.load_study(study_name=report["optuna_study"], storage=report["optuna_storage"])
    told = sorted(t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    logged = sorted(max(client.get_metric_history(r.info.run_id, "val_mae_meV"), key=lambda m: m.step).value for r in finished)
    assert told == pytest.approx(logged), [(t.number, t.state, t.value) for t in study.trials]
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]


def test_mlflow_outage_mid_sweep_is_journaled_and_synced_afterwards(qm9, qm9_cache_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    from tests.helpers.services import MlflowServer

    server = MlflowServer(tmp_path / "mlflow")
    space = grid_space(tmp_path, "outage", [[0, 1], [0, 2]], epochs=5, max_concurrent=1)
    client = MlflowClient(server.uri)
    sweep = start_sweep(space, tmp_path, qm9_cache_dir, "--tracking-uri", server.uri)
    try:
        wait_for_epochs(sweep, tmp_path, lambda: (client, trial_runs_of(client, "outage")), epochs=1)
        server.stop()  # the tracking server goes away mid-sweep; training must go on
        stdout, _ = sweep.communicate(timeout=600)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
        server.stop()
    assert sweep.returncode == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    assert stdout.lstrip().startswith("{"), stdout[:1500]
    report = json.loads(stdout)
    assert [t["status"] for t in report["trials"]] == ["completed", "completed"]
    assert report["unsynced_trials"] >= 1

    server.start()  # back, with the same store
    try:
        env = {**os.environ, "IRREP_STUDY_CACHE": str(qm9_cache_dir)}
        synced = subprocess.run(
            [sys.executable, "-m", "study.cli", "sync", "--experiment", "outage", "--tracking-uri", server.uri, "--json"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert synced.returncode == 0, synced.stderr
        assert synced.stdout.lstrip().startswith("{"), (synced.stdout, synced.stderr)
        assert json.loads(synced.stdout)["pending"] == 0

        experiment = client.get_experiment_by_name("outage")
        runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'trial'")
        # What a sweep without the outage logs: two runs, each epoch once, final metrics, artifacts.
        assert len(runs) == 2
        for run in runs:
            assert run.info.status == "FINISHED" and run.data.tags[STATUS_TAG] == "completed"
            assert epochs_logged(client, run) == [1, 2, 3, 4, 5]
            assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 5
            assert {"test_mae_meV", "num_params", "train_seconds"} <= set(run.data.metrics)
            assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "test_embeddings.npz"}
            # The trial's MLflow Model, journaled as a folder, arrives whole (study/tracking/logged_model.py).
            assert "model/MLmodel" in {a.path for a in client.list_artifacts(run.info.run_id, "model")}
            assert run.data.params["l_values"] in ("0,1", "0,2")
        parent = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'sweep'")[0]
        assert parent.info.status == "FINISHED"
    finally:
        server.stop()


def test_unreachable_tracking_server_fails_fast_before_any_trial(run_cli, tmp_path):
    from tests.helpers.services import FlakyProxy, free_port

    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "name": "nowhere",
                "trial": {**TRIAL, "subset": 300, "epochs": 1},
                "search": {"method": "grid", "grid": [{"l_values": [0]}]},
            }
        )
    )
    result = run_cli("sweep", str(space), "--tracking-uri", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2 and "tracking server unreachable" in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "ray_results").exists()

    # Fast because the check asks once, without MLflow's minutes of retries: a server answering
    # 503 (a proxy whose backend is down) sees exactly one request.
    proxy = FlakyProxy(free_port())
    proxy.refuse = 503
    try:
        result = run_cli("sweep", str(space), "--tracking-uri", proxy.uri)
    finally:
        proxy.stop()
    assert result.returncode == 2 and "tracking server unreachable" in result.stderr
    assert proxy.count("refused") == 1
    assert not (tmp_path / "ray_results").exists()


def test_diverging_trial_ends_diverged_with_its_reason_and_the_sweep_goes_on(run_cli, tmp_path):
    from mlflow.tracking import MlflowClient

    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "name": "diverge",
                "trial": {**TRIAL, "subset": 300, "epochs": 2},
                "search": {"method": "grid", "grid": [{"l_values": [0, 1], "lr": 1.0e6}, {"l_values": [0, 1]}]},
                "scheduler": {"type": "none"},
                "resources": {"max_concurrent": 1},
            }
        )
    )
    result = run_cli("sweep", str(space), "--num-cpus", "1", "--json", check_exit=0)
    trials = json.loads(result.stdout)["trials"]
    assert sorted(t["status"] for t in trials) == ["completed", "diverged"]
    client, runs = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"), None
    experiment = client.get_experiment_by_name("diverge")
    runs = {r.data.params["lr"]: r for r in client.search_runs([experiment.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'trial'")}
    diverged = runs["1000000.0"]
    assert diverged.data.tags[STATUS_TAG] == "diverged" and diverged.info.status == "FAILED"
    assert "non-finite" in diverged.data.tags["irrep_study.reason"] and "epoch 1" in diverged.data.tags["irrep_study.reason"]
    assert runs["0.001"].data.tags[STATUS_TAG] == "completed"


def test_sigint_on_the_driver_ends_runs_as_killed_and_resume_completes_them(qm9, qm9_cache_dir, tmp_path):
    space = grid_space(tmp_path, "ctrl-c", [[0, 1], [0, 2]], epochs=5, max_concurrent=1)
    first = start_sweep(space, tmp_path, qm9_cache_dir)
    try:
        wait_for_epochs(first, tmp_path, lambda: trial_runs(tmp_path, "ctrl-c"), epochs=2)
        os.killpg(first.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole foreground group
        stdout, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    log_text = (tmp_path / "sweep.log").read_text()
    assert first.returncode == 130, log_text[-3000:]
    report = json.loads(stdout)
    assert report["interrupted"] is True
    # Ray Tune had created only the running trial; the second grid entry is left to the resumed sweep.
    assert [t["status"] for t in report["trials"]] == ["interrupted"]
    assert "--resume" in log_text.splitlines()[-1]
    state = json.loads(next(tmp_path.glob("ray_results/ctrl-c-*/irrep_study_sweep.json")).read_text())
    assert state["finished"] is False

    client, runs = trial_runs(tmp_path, "ctrl-c")
    assert len(runs) == 1  # the second trial had not started
    stopped = runs[0]
    assert stopped.info.status == "KILLED" and stopped.data.tags[STATUS_TAG] == "interrupted"
    assert "SIGINT" in stopped.data.tags["irrep_study.reason"]
    parent = client.get_run(stopped.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "KILLED" and parent.data.tags[STATUS_TAG] == "interrupted"

    report = sweep_report(start_sweep(space, tmp_path, qm9_cache_dir, "--resume"), tmp_path)
    assert report["interrupted"] is False
    assert [t["status"] for t in report["trials"]] == ["completed", "completed"]

    client, runs = trial_runs(tmp_path, "ctrl-c")
    assert len(runs) == 2  # the interrupted trial kept its run
    assert stopped.info.run_id in {r.info.run_id for r in runs}
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags[STATUS_TAG] == "completed"
        assert "irrep_study.reason" not in run.data.tags  # the interruption no longer holds
        assert epochs_logged(client, run) == [1, 2, 3, 4, 5]  # each epoch once, across the stop
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags[STATUS_TAG] == "completed"


def test_slow_then_failing_tracking_server_is_retried_journaled_and_nothing_lost_or_doubled(qm9, qm9_cache_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    from tests.helpers.services import FlakyProxy, MlflowServer

    server = MlflowServer(tmp_path / "mlflow")
    proxy = FlakyProxy(server.port)
    proxy.delay = 1.0  # every request answered a second late
    space = grid_space(tmp_path, "flaky", [[0, 1], [0, 2]], epochs=4, max_concurrent=1)
    client = MlflowClient(server.uri)  # straight to the server, past the proxy
    sweep = start_sweep(space, tmp_path, qm9_cache_dir, "--tracking-uri", proxy.uri)
    try:
        wait_for_epochs(sweep, tmp_path, lambda: (client, trial_runs_of(client, "flaky")), epochs=1)
        proxy.delay, proxy.refuse = 0.0, 503  # then HTTP 503 for a while

        def both_trials_journaled():
            assert sweep.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
            return len(list(tmp_path.glob("ray_results/flaky-*/tracking_journal/*.jsonl"))) == 2

        wait_until(both_trials_journaled, 300, "both trials writing to their journals")
        proxy.refuse = None  # and back
        stdout, _ = sweep.communicate(timeout=600)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
        proxy.stop()
        server.stop()
    assert sweep.returncode == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    report = json.loads(stdout)
    assert [t["status"] for t in report["trials"]] == ["completed", "completed"]
    assert report["unsynced_trials"] == 0  # the journals were replayed once the server answered again
    # Each refused write was retried by the client before it went to the journal.
    refused = [(method, path) for method, path, happened in proxy.requests if happened == "refused"]
    assert max(refused.count(request) for request in set(refused)) >= 1 + 1

    server.start()
    try:
        experiment = client.get_experiment_by_name("flaky")
        every_run = trial_runs_of(client, "flaky", deleted_too=True)
        assert len(every_run) == 2  # nothing doubled, not even a deleted duplicate
        for run in every_run:
            assert run.info.status == "FINISHED" and run.data.tags[STATUS_TAG] == "completed"
            assert epochs_logged(client, run) == [1, 2, 3, 4]  # nothing lost, nothing twice
            assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 4
            assert {"test_mae_meV", "num_params", "train_seconds"} <= set(run.data.metrics)
            assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "test_embeddings.npz"}
        parent = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'sweep'")[0]
        assert parent.info.status == "FINISHED"
    finally:
        server.stop()
