"""The trial's tracking journal (study/tracking/journal.py) against a real MLflow server behind a proxy that loses responses."""

from __future__ import annotations

import pytest

from study.tracking import journal, store
from tests.helpers.mlflow_trials import tracking_store
from tests.helpers.services import FlakyProxy


@pytest.fixture
def proxy(mlflow_server):
    flaky = FlakyProxy(mlflow_server.port)
    yield flaky
    flaky.stop()


@pytest.fixture
def sweep_http_policy(monkeypatch):
    """What a sweep's processes run under (`store.fail_fast`), undone after the test."""
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)
    store.fail_fast()
    yield
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)


def test_a_lost_create_response_retried_by_mlflow_leaves_one_run_per_trial(mlflow_server, proxy, sweep_http_policy, tmp_path):
    experiment_id = store.ensure_experiment(mlflow_server.uri, "lost-responses")
    parent = store.start_sweep_run(mlflow_server.uri, experiment_id, "sweep", {})

    # The server creates the run, but its answer never arrives: MLflow retries (creating more runs),
    # gives up, and the trial journals its `open`.
    proxy.lose_responses = "runs/create"
    run = journal.TrialRun(proxy.uri, experiment_id, parent, "t_00000", "t l=0,1", spool_dir=tmp_path)
    attempts = proxy.count("lost")
    assert attempts == 1 + store.SWEEP_RETRIES  # retried, then journaled
    assert run.run_id is None and run.spool.pending()

    proxy.lose_responses = None
    run.log_epoch(1, {"val_mae_meV": 100.0, "train_loss": 1.0})
    run.finish("completed")
    assert not run.spool.pending()

    client = store.client(mlflow_server.uri)
    runs = store.child_runs(mlflow_server.uri, experiment_id, parent)
    assert len(runs) == 1  # the duplicates made by the retries are deleted
    assert runs[0].info.run_id == run.run_id and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.run_id, "val_mae_meV")] == [1]
    created = client.search_runs(
        [experiment_id], filter_string=f"tags.`{store.TRIAL_ID_TAG}` = 't_00000'", run_view_type=3
    )  # ViewType.ALL: the deleted duplicates too
    assert len(created) == attempts  # every lost response did create a run on the server
    # The trial's run is the oldest one, so every later attempt of the trial finds the same.
    assert run.run_id == min(created, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id


def test_a_server_answering_503_gets_retries_then_the_journal_replays_in_order(mlflow_server, proxy, sweep_http_policy, tmp_path):
    experiment_id = store.ensure_experiment(mlflow_server.uri, "unavailable")
    parent = store.start_sweep_run(mlflow_server.uri, experiment_id, "sweep", {})
    run = journal.TrialRun(proxy.uri, experiment_id, parent, "t_00001", "t l=0", spool_dir=tmp_path)
    run.log_epoch(1, {"val_mae_meV": 90.0})

    proxy.refuse = 503
    run.log_epoch(2, {"val_mae_meV": 80.0})
    assert proxy.count("refused") == 1 + store.SWEEP_RETRIES  # MLflow's retries with backoff, then the journal
    refused = proxy.count("refused")
    run.log_epoch(3, {"val_mae_meV": 70.0})
    assert proxy.count("refused") == refused + 1  # while the journal is pending: one attempt per write
    assert run.spool.pending()

    proxy.refuse = None
    run.log_epoch(4, {"val_mae_meV": 60.0})
    assert not run.spool.pending()
    history = store.client(mlflow_server.uri).get_metric_history(run.run_id, "val_mae_meV")
    assert sorted((m.step, m.value) for m in history) == [(1, 90.0), (2, 80.0), (3, 70.0), (4, 60.0)]


def test_resume_finds_only_the_unfinished_sweeps_of_its_own_study(tmp_path):
    from study.config.space import SearchSpace

    def sweep_folder(study: str, stamp: str, finished: bool):
        space = SearchSpace.model_validate(
            {
                "name": study,
                "trial": {"hidden_dim": 4, "subset": 300, "epochs": 1},
                "search": {"method": "grid", "grid": [{"l_values": [0]}]},
            }
        )
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


# ---------------------------------------------------------------------------- the sweep's parent run


def _small_space():
    from study.config.space import SearchSpace

    return SearchSpace.model_validate(
        {
            "name": "parent",
            "trial": {"hidden_dim": 4, "subset": 300, "epochs": 1},
            "search": {"method": "grid", "grid": [{"l_values": [0]}, {"l_values": [0, 1]}]},
        }
    )


def _checkout_commit() -> str | None:
    """HEAD of the checkout the tests run from, asked of git directly; None without git or checkout."""
    import subprocess
    from pathlib import Path

    root = Path(store.__file__).resolve().parents[2]
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True, text=True)
    except OSError:
        return None
    lines = done.stdout.splitlines()
    return lines[1] if done.returncode == 0 and Path(lines[0]).resolve() == root else None


def test_the_sweep_parent_run_holds_its_search_space_and_source_tags(tmp_path):
    import yaml

    from study.config.space import SearchSpace

    uri = tracking_store(tmp_path)
    experiment_id = store.ensure_experiment(uri, "parent-run")
    space = _small_space()
    parent = store.start_sweep_run(uri, experiment_id, "parent-1", space.summary_params(), space=space.model_dump(mode="json"))

    client = store.client(uri)
    assert [a.path for a in client.list_artifacts(parent)] == [store.SEARCH_SPACE_ARTIFACT]
    text = open(client.download_artifacts(parent, store.SEARCH_SPACE_ARTIFACT, str(tmp_path))).read()
    assert SearchSpace.model_validate(yaml.safe_load(text)) == space  # the validated space, whole
    tags = client.get_run(parent).data.tags
    assert tags[store.ROLE_TAG] == "sweep"
    assert tags["mlflow.source.name"] == "irrep-study sweep" and tags["mlflow.source.type"] == "LOCAL"
    assert tags[store.VERSION_TAG] == store.package_version() != ""
    commit = _checkout_commit()
    if commit is None:
        assert "mlflow.source.git.commit" not in tags
    else:
        assert tags["mlflow.source.git.commit"] == commit and tags[store.GIT_DIRTY_TAG] in ("true", "false")


def test_git_state_is_none_without_git_or_for_another_repository(tmp_path, monkeypatch):
    from pathlib import Path

    assert store.git_state(tmp_path) is None  # not a checkout
    # A folder inside a checkout whose top is elsewhere (a venv in another project's repository).
    assert store.git_state(Path(store.__file__).resolve().parent) is None
    monkeypatch.setenv("PATH", str(tmp_path))  # no git binary at all
    assert store.git_state() is None
    assert "mlflow.source.git.commit" not in store.source_tags("irrep-study sweep")


class _FakeTrial:
    """What TrackTrialEnds reads of a Tune trial."""

    def __init__(self, trial_id: str, status: str, last_result: dict):
        self.trial_id, self.status, self.last_result = trial_id, status, last_result


def _complete(callback, trials: list, trial_id: str, status: str, best_val=None, test=None) -> None:
    """Tune's order: the trial ends RUNNING into on_trial_complete, and is TERMINATED afterwards."""
    result = {"trial_status": status, "epoch": 2, "mlflow_run_id": None}
    if best_val is not None:
        result.update(best_val_mae_meV=best_val, test_mae_meV=test)
    trial = _FakeTrial(trial_id, "RUNNING", result)
    trials.append(trial)
    callback.on_trial_complete(0, trials, trial)
    trial.status = "TERMINATED"


def test_the_parent_run_charts_the_best_trial_so_far_and_a_resume_goes_on_counting(tmp_path):
    from study.sweep.callbacks import TrackTrialEnds

    uri = tracking_store(tmp_path)
    experiment_id = store.ensure_experiment(uri, "best-so-far")
    parent = store.start_sweep_run(uri, experiment_id, "sweep", {})
    callback = TrackTrialEnds(uri, str(tmp_path / "journal"), parent)
    trials: list = []
    completed = [("t1", 120.0, 300.0), ("t2", 90.0, 95.0), ("t3", 110.0, 80.0)]  # t3's lower test MAE is not chosen
    for trial_id, best_val, test in completed:
        _complete(callback, trials, trial_id, "completed", best_val, test)
    _complete(callback, trials, "t4", "diverged")  # no test MAE: neither counted nor logged
    # A driver restart (`--resume`): a new callback, and Tune's restored trial states.
    resumed = TrackTrialEnds(uri, str(tmp_path / "journal"), parent)
    _complete(resumed, trials, "t5", "completed", 70.0, 200.0)
    completed.append(("t5", 70.0, 200.0))

    client = store.client(uri)

    def history(name):
        return [(m.step, m.value) for m in sorted(client.get_metric_history(parent, name), key=lambda m: m.step)]

    running_min, best = [], None
    for _, best_val, test in completed:
        best = (best_val, test) if best is None or best_val < best[0] else best
        running_min.append(best)
    steps = list(range(1, len(completed) + 1))
    assert history("best_val_mae_meV") == list(zip(steps, [b[0] for b in running_min]))
    assert history("best_trial_test_mae_meV") == list(zip(steps, [b[1] for b in running_min]))
    assert history("trials_finished") == [(s, float(s)) for s in steps]


def test_best_so_far_is_skipped_with_one_line_when_the_server_is_down(tmp_path, capsys):
    from study.sweep.callbacks import TrackTrialEnds
    from tests.helpers.services import free_port

    callback = TrackTrialEnds(f"http://127.0.0.1:{free_port()}", str(tmp_path / "journal"), "parent")
    _complete(callback, [], "t1", "completed", 90.0, 95.0)  # nothing listens there: must not raise
    err = capsys.readouterr().err
    assert "best-so-far metrics after 1 completed trials not logged" in err and err.count("\n") == 1
    # The callback of a sweep started before it knew its parent run, restored by `--resume`.
    old = TrackTrialEnds.__new__(TrackTrialEnds)
    old.__dict__.update(tracking_uri=callback.tracking_uri, spool_dir=callback.spool_dir)
    _complete(old, [], "t2", "completed", 80.0, 85.0)
    assert capsys.readouterr().err == ""


def test_a_finished_sweep_ends_the_trial_runs_its_killed_driver_left_running_and_only_those(tmp_path):
    """The orphan path of a resume: a trial run the killed driver had opened but Ray never saved
    stays RUNNING; once the resumed sweep has finished, it is ended as interrupted, with the reason,
    and the parent run as completed. Runs of the sweep already ended and runs of another sweep stay
    as they are."""
    uri = tracking_store(tmp_path)
    experiment_id = store.ensure_experiment(uri, "orphans")
    client = store.client(uri)

    def run(parent: str | None, name: str) -> str:
        tags = {store.ROLE_TAG: "trial" if parent else "sweep", store.STATUS_TAG: "running"}
        if parent:
            tags[store.PARENT_TAG] = parent
        return client.create_run(experiment_id, tags=tags, run_name=name).info.run_id

    parent, other_parent = run(None, "sweep"), run(None, "other sweep")
    done, orphan, elsewhere = run(parent, "done"), run(parent, "orphan"), run(other_parent, "elsewhere")
    store.finish_run(client, done, "completed")
    said = []
    record = journal.SweepRecord(tmp_path / "sweep", "orphans", experiment_id, parent)

    assert journal.finish_tracking(uri, record, said.append, final=True) == 0

    ended = client.get_run(orphan)
    assert ended.info.status == "KILLED" and ended.data.tags[store.STATUS_TAG] == "interrupted"
    assert ended.data.tags["irrep_study.reason"] == journal.ORPHAN_REASON
    assert client.get_run(done).data.tags[store.STATUS_TAG] == "completed" and client.get_run(done).info.status == "FINISHED"
    assert client.get_run(elsewhere).info.status == "RUNNING"  # another sweep's run is not this sweep's orphan
    finished = client.get_run(parent)
    assert finished.info.status == "FINISHED" and finished.data.tags[store.STATUS_TAG] == "completed"
    assert said == ["marked 1 trial run(s) that an interrupted driver left behind as interrupted"]
