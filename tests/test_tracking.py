"""The trial's tracking journal (study/journal.py) against a real MLflow server behind a proxy that loses responses."""

from __future__ import annotations

import pytest

from study import journal, tracking
from tests.services import FlakyProxy


@pytest.fixture
def proxy(mlflow_server):
    flaky = FlakyProxy(mlflow_server.port)
    yield flaky
    flaky.stop()


@pytest.fixture
def sweep_http_policy(monkeypatch):
    """What a sweep's processes run under (`tracking.fail_fast`), undone after the test."""
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)
    tracking.fail_fast()
    yield
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)


def test_a_lost_create_response_retried_by_mlflow_leaves_one_run_per_trial(mlflow_server, proxy, sweep_http_policy, tmp_path):
    experiment_id = tracking.ensure_experiment(mlflow_server.uri, "lost-responses")
    parent = tracking.start_sweep_run(mlflow_server.uri, experiment_id, "sweep", {})

    # The server creates the run, but its answer never arrives: MLflow retries (creating more runs),
    # gives up, and the trial journals its `open`.
    proxy.lose_responses = "runs/create"
    run = journal.TrialRun(proxy.uri, experiment_id, parent, "t_00000", "t l=0,1", spool_dir=tmp_path)
    attempts = proxy.count("lost")
    assert attempts == 1 + tracking.SWEEP_RETRIES  # retried, then journaled
    assert run.run_id is None and run.spool.pending()

    proxy.lose_responses = None
    run.log_epoch(1, {"val_mae_meV": 100.0, "train_loss": 1.0})
    run.finish("completed")
    assert not run.spool.pending()

    client = tracking.client(mlflow_server.uri)
    runs = tracking.child_runs(mlflow_server.uri, experiment_id, parent)
    assert len(runs) == 1  # the duplicates made by the retries are deleted
    assert runs[0].info.run_id == run.run_id and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.run_id, "val_mae_meV")] == [1]
    created = client.search_runs([experiment_id], filter_string=f"tags.`{tracking.TRIAL_ID_TAG}` = 't_00000'",
                                 run_view_type=3)  # ViewType.ALL: the deleted duplicates too
    assert len(created) == attempts  # every lost response did create a run on the server
    # The trial's run is the oldest one, so every later attempt of the trial finds the same.
    assert run.run_id == min(created, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id


def test_a_server_answering_503_gets_retries_then_the_journal_replays_in_order(mlflow_server, proxy, sweep_http_policy, tmp_path):
    experiment_id = tracking.ensure_experiment(mlflow_server.uri, "unavailable")
    parent = tracking.start_sweep_run(mlflow_server.uri, experiment_id, "sweep", {})
    run = journal.TrialRun(proxy.uri, experiment_id, parent, "t_00001", "t l=0", spool_dir=tmp_path)
    run.log_epoch(1, {"val_mae_meV": 90.0})

    proxy.refuse = 503
    run.log_epoch(2, {"val_mae_meV": 80.0})
    assert proxy.count("refused") == 1 + tracking.SWEEP_RETRIES  # MLflow's retries with backoff, then the journal
    refused = proxy.count("refused")
    run.log_epoch(3, {"val_mae_meV": 70.0})
    assert proxy.count("refused") == refused + 1  # while the journal is pending: one attempt per write
    assert run.spool.pending()

    proxy.refuse = None
    run.log_epoch(4, {"val_mae_meV": 60.0})
    assert not run.spool.pending()
    history = tracking.client(mlflow_server.uri).get_metric_history(run.run_id, "val_mae_meV")
    assert sorted((m.step, m.value) for m in history) == [(1, 90.0), (2, 80.0), (3, 70.0), (4, 60.0)]


def test_resume_finds_only_the_unfinished_sweeps_of_its_own_study(tmp_path):
    from study.space import SearchSpace

    def sweep_folder(study: str, stamp: str, finished: bool):
        space = SearchSpace.model_validate({"name": study, "trial": {"hidden_dim": 4, "subset": 300, "epochs": 1},
                                            "search": {"method": "grid", "grid": [{"l_values": [0]}]}})
        folder = tmp_path / f"{study}-{stamp}"
        folder.mkdir()
        journal.write_state(journal.SweepRecord(folder, study, "1", "parent"), space, "sqlite:///mlflow.db", finished)
        return folder

    mine = sweep_folder("quick", "20261126-080000", finished=False)
    sweep_folder("quick", "20261126-090000", finished=True)
    sweep_folder("quick-big", "20261126-100000", finished=False)  # newer, and `quick-*` matches its name
    assert journal.latest_unfinished(tmp_path, "quick") == mine
    assert journal.latest_unfinished(tmp_path, "quick-big").name == "quick-big-20261126-100000"
    assert journal.latest_unfinished(tmp_path, "other") is None
