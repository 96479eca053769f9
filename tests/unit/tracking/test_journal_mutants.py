"""The tracking journal's resume and replay guarantees (study/tracking/journal.py) against an
in-memory stand-in for the MLflow client: a replay never logs twice, an outage keeps every write
in order, `--resume` picks the right sweep, `sync` reports what is left. Written to kill the
mutants that survived the other tests (docs/mutation.md)."""

from __future__ import annotations

import json
import shutil
import time
from types import SimpleNamespace

import mlflow.entities  # noqa: F401  (the replayer imports it per operation: paid once, at collection)
import pytest

from study.config.space import SearchSpace
from study.errors import UserError
from study.names import COMPLETED, RUNNING, TEST_MAE, VAL_MAE
from study.tracking import journal, store
from study.tracking.logged_model import MODEL_ARTIFACT
from study.tracking.store import PARENT_TAG, REASON_TAG, STATUS_TAG, TRIAL_ID_TAG

SPACE = {
    "name": "quick",
    "trial": {"hidden_dim": 4},
    "search": {"method": "optuna", "num_samples": 2, "params": {"l_values": {"subsets_of": [0, 1]}}},
}


class FakeMlflow:
    """The MlflowClient calls the journal makes, on runs held in memory; `down` makes every call fail."""

    def __init__(self):
        self.runs: dict[str, SimpleNamespace] = {}
        self.calls: list[tuple] = []
        self.down = False
        self.clock = 0

    def _call(self, *call):
        if self.down:
            raise ConnectionError("tracking server down")
        self.calls.append(call)

    def create_run(self, experiment_id, run_name, tags):
        self._call("create_run", run_name)
        self.clock += 1
        run_id = f"r{len(self.runs)}"
        self.runs[run_id] = SimpleNamespace(
            info=SimpleNamespace(run_id=run_id, run_name=run_name, status="RUNNING", start_time=self.clock, experiment_id=experiment_id),
            data=SimpleNamespace(params={}, metrics={}, tags=dict(tags)),
            history={},
            timestamps=[],
            artifacts=[],
        )
        return self.runs[run_id]

    def search_runs(self, experiment_ids, filter_string):
        self._call("search_runs")
        found = []
        for run in self.runs.values():
            tags = run.data.tags
            wanted = f"tags.`{PARENT_TAG}` = '{tags.get(PARENT_TAG)}' and tags.`{TRIAL_ID_TAG}` = '{tags.get(TRIAL_ID_TAG)}'"
            if run.info.experiment_id in experiment_ids and wanted == filter_string and not getattr(run, "deleted", False):
                found.append(run)
        return list(reversed(found))  # not in start order: the journal sorts them itself

    def delete_run(self, run_id):
        self._call("delete_run", run_id)
        self.runs[run_id].deleted = True

    def get_run(self, run_id):
        self._call("get_run", run_id)
        return self.runs[run_id]

    def get_metric_history(self, run_id, key):
        self._call("get_metric_history", run_id, key)
        return [SimpleNamespace(step=step) for step in self.runs[run_id].history.get(key, {})]

    def log_batch(self, run_id, metrics=(), params=()):
        self._call("log_batch", run_id)
        run = self.runs[run_id]
        for metric in metrics:
            run.history.setdefault(metric.key, {}).setdefault(metric.step, []).append(metric.value)
            run.timestamps.append(metric.timestamp)
            run.data.metrics[metric.key] = metric.value
        for param in params:
            assert param.key not in run.data.params, f"param {param.key} logged twice"
            run.data.params[param.key] = param.value

    def log_artifact(self, run_id, path):
        self._call("log_artifact", run_id)
        self.runs[run_id].artifacts.append(("file", path))

    def log_artifacts(self, run_id, path, artifact_path):
        self._call("log_artifacts", run_id)
        self.runs[run_id].artifacts.append((artifact_path, path))

    def set_tag(self, run_id, key, value):
        self._call("set_tag", run_id, key)
        self.runs[run_id].data.tags[key] = value

    def delete_tag(self, run_id, key):
        self._call("delete_tag", run_id, key)
        del self.runs[run_id].data.tags[key]

    def update_run(self, run_id, status):
        self._call("update_run", run_id, status)
        self.runs[run_id].info.status = status

    def set_terminated(self, run_id, status):
        self._call("set_terminated", run_id, status)
        self.runs[run_id].info.status = status


URI = "http://mlflow.test:5000"


@pytest.fixture
def mlflow(monkeypatch):
    """The stand-in, as the client of URI only: a client of any other server cannot connect."""
    fake = FakeMlflow()

    def client(uri):
        if uri != URI:
            raise ConnectionError(f"no tracking server at {uri!r}")
        return fake

    monkeypatch.setattr(store, "client", client)
    return fake


def open_operation(trial_id="t0"):
    return {"op": "open", "experiment_id": "1", "parent_run_id": "p", "trial_id": trial_id, "run_name": f"run {trial_id}"}


def metric_steps(run, key):
    return {step: len(values) for step, values in run.history.get(key, {}).items()}


# ---------------------------------------------------------------------------- the sweep's state file


def test_the_state_file_round_trips_the_record_and_never_holds_a_password(tmp_path):
    space = SearchSpace.model_validate(SPACE)
    record = journal.SweepRecord(tmp_path, "quick", "7", "parent", "postgresql://u:secret@db:5432/optuna", "quick-study")
    journal.write_state(record, space, "http://user:pw@mlflow:5000", finished=False)
    text = (tmp_path / journal.SWEEP_FILE).read_text()
    assert "secret" not in text and "pw@" not in text
    state = json.loads(text)
    assert state["tracking_uri"] == "http://mlflow:5000" and state["optuna_storage"] == "postgresql://db:5432/optuna"
    assert state["finished"] is False and state["space"]["name"] == "quick"
    again = journal.SweepRecord.from_state(tmp_path, state)
    assert again == journal.SweepRecord(tmp_path, "quick", "7", "parent", "postgresql://db:5432/optuna", "quick-study")
    grid = journal.SweepRecord(tmp_path, "quick", "7", "parent")
    journal.write_state(grid, space, "sqlite:///mlflow.db", finished=True)
    state = json.loads((tmp_path / journal.SWEEP_FILE).read_text())
    assert state["optuna_storage"] is None and state["finished"] is True
    assert journal.SweepRecord.from_state(tmp_path, state) == grid


def test_resume_takes_the_newest_unfinished_sweep_and_skips_unreadable_state_files(tmp_path):
    space = SearchSpace.model_validate(SPACE)
    for stamp in ("20261201-100000", "20261203-100000", "20261202-100000"):
        folder = tmp_path / f"quick-{stamp}"
        folder.mkdir()
        journal.write_state(journal.SweepRecord(folder, "quick", "1", "p"), space, "sqlite:///m.db", finished=False)
    broken = tmp_path / "quick-20261204-100000"
    broken.mkdir()
    (broken / journal.SWEEP_FILE).write_text("{not json")
    assert journal.latest_unfinished(tmp_path, "quick") == tmp_path / "quick-20261203-100000"


# ---------------------------------------------------------------------------- the replayer


def test_replaying_a_trials_operations_twice_logs_each_thing_once(mlflow, tmp_path):
    (tmp_path / "config.yaml").write_text("x: 1\n")
    (tmp_path / "model").mkdir()
    operations = [
        open_operation(),
        {"op": "params", "trial_id": "t0", "params": {"lr": "0.1"}},
        {"op": "epoch", "trial_id": "t0", "epoch": 1, "metrics": {VAL_MAE: 50.0}, "timestamp": 1},
        {"op": "epoch", "trial_id": "t0", "epoch": 2, "metrics": {VAL_MAE: "40"}, "timestamp": 2},
        {"op": "params", "trial_id": "t0", "params": {"lr": "0.1", "reference": "fit"}},
        {
            "op": "final",
            "trial_id": "t0",
            "metrics": {TEST_MAE: 42.0},
            "files": [str(tmp_path / "config.yaml")],
            "model": str(tmp_path / "model"),
            "timestamp": 3,
        },
        {"op": "finish", "trial_id": "t0", "status": COMPLETED, "reason": None},
    ]
    first = journal.Replayer(URI)
    for operation in operations:
        first.apply(operation)
    first.apply(operations[3])  # the server took it, but its answer was lost: journalled and replayed
    # A second replayer (a resumed trial, `irrep-study sync`) finds the run and adds nothing.
    second = journal.Replayer(URI)
    for operation in operations:
        second.apply(operation)
    assert list(mlflow.runs) == ["r0"] and second.run_ids == {"t0": "r0"}
    run = mlflow.runs["r0"]
    assert run.data.params == {"lr": "0.1", "reference": "fit"}
    assert metric_steps(run, VAL_MAE) == {1: 1, 2: 1} and run.history[VAL_MAE][2] == [40.0]
    assert metric_steps(run, TEST_MAE) == {0: 1} and run.data.metrics[TEST_MAE] == 42.0
    assert ("file", str(tmp_path / "config.yaml")) in run.artifacts
    assert (MODEL_ARTIFACT, str(tmp_path / "model")) in run.artifacts
    assert run.data.tags[STATUS_TAG] == COMPLETED and run.info.status == "FINISHED"
    with pytest.raises(ValueError, match="unknown journal operation 'bogus'"):
        second.apply({"op": "bogus", "trial_id": "t0"})


def test_a_final_operation_from_before_trials_logged_models_replays_without_one(mlflow, tmp_path):
    replayer = journal.Replayer(URI)
    replayer.apply(open_operation())
    replayer.apply({"op": "final", "trial_id": "t0", "metrics": {TEST_MAE: 1.0}, "files": [], "timestamp": 3})
    replayer.apply({"op": "final", "trial_id": "t0", "metrics": {TEST_MAE: 1.0}, "files": [], "model": None, "timestamp": 3})
    assert mlflow.runs["r0"].artifacts == [] and not any(call[0] == "log_artifacts" for call in mlflow.calls)


def test_reopening_a_trial_keeps_its_oldest_run_deletes_duplicates_and_runs_it_again(mlflow):
    tags = {PARENT_TAG: "p", TRIAL_ID_TAG: "t0", STATUS_TAG: "interrupted", REASON_TAG: "Ctrl-C"}
    oldest = mlflow.create_run("1", "run t0", tags)
    duplicate = mlflow.create_run("1", "run t0", {PARENT_TAG: "p", TRIAL_ID_TAG: "t0"})
    other = mlflow.create_run("1", "run t1", {PARENT_TAG: "p", TRIAL_ID_TAG: "t1"})
    oldest.info.status = "KILLED"
    replayer = journal.Replayer(URI)
    replayer.apply(open_operation())
    assert replayer.run_ids == {"t0": oldest.info.run_id}
    assert getattr(duplicate, "deleted", False) and not getattr(other, "deleted", False)
    assert oldest.info.status == "RUNNING" and oldest.data.tags[STATUS_TAG] == RUNNING and REASON_TAG not in oldest.data.tags
    # A trial of another sweep (another parent) with the same id is not this trial.
    replayer.apply({**open_operation(), "parent_run_id": "q"})
    assert replayer.run_ids["t0"] not in (oldest.info.run_id, duplicate.info.run_id, other.info.run_id)
    created = mlflow.runs[replayer.run_ids["t0"]]
    assert created.data.tags == {PARENT_TAG: "q", "irrep_study.role": "trial", TRIAL_ID_TAG: "t0", STATUS_TAG: RUNNING}


def test_an_operation_carries_its_run_id_so_a_journal_that_starts_after_open_replays_alone(mlflow):
    replayer = journal.Replayer(URI)
    replayer.apply(open_operation())
    alone = journal.Replayer(URI)  # knows no trial
    alone.apply({"op": "finish", "trial_id": "t0", "run_id": "r0", "status": COMPLETED, "reason": "done"})
    assert mlflow.runs["r0"].data.tags[REASON_TAG] == "done"


# ---------------------------------------------------------------------------- the journal (spool)


class Recorder:
    """A replayer that records what it applies and fails on the operations named in `fail`."""

    def __init__(self, fail=()):
        self.applied: list[str] = []
        self.fail = set(fail)

    def apply(self, operation):
        if operation["op"] in self.fail:
            raise ConnectionError("down")
        self.applied.append(operation["op"])


def test_a_journal_replays_in_order_stops_at_the_first_failure_and_resumes_there(tmp_path):
    spool = journal.Spool(tmp_path / "t0.jsonl")
    assert not spool.pending() and spool.replay(Recorder()) is True
    for op in ("open", "params", "epoch", "final"):
        spool.append({"op": op})
    assert spool.pending()
    down = Recorder(fail={"epoch"})
    assert spool.replay(down) is False and down.applied == ["open", "params"]
    assert spool.pending() and (tmp_path / "t0.done").read_text() == "2"
    back = Recorder()
    assert spool.replay(back) is True
    assert back.applied == ["open", "epoch", "final"]  # `open` again for the run id, then what was left
    assert not spool.pending()
    assert journal.Spool(tmp_path / "t0.jsonl").replay(Recorder(fail={"params"})) is True  # nothing left


def test_a_journals_counter_that_cannot_be_read_means_nothing_was_replayed(tmp_path):
    spool = journal.Spool(tmp_path / "t0.jsonl")
    spool.append({"op": "open"})
    spool.append({"op": "finish"})
    (tmp_path / "t0.done").write_text("garbage")
    recorder = Recorder()
    assert spool.replay(recorder) is True and recorder.applied == ["open", "finish"]
    (tmp_path / "t0.jsonl").write_text('{"op": "open"}\n\n{"op": "finish"}\n')  # a blank line is no operation
    assert not journal.Spool(tmp_path / "t0.jsonl").pending()


def test_the_journal_keeps_copies_of_a_trials_files_and_replaces_a_model_folder_whole(tmp_path):
    trial = tmp_path / "trial"
    (trial / "model").mkdir(parents=True)
    (trial / "result.json").write_text("{}")
    (trial / "model" / "MLmodel").write_text("new")
    spool = journal.Spool(tmp_path / "journal" / "t0.jsonl")
    kept_dir = tmp_path / "journal" / "t0"
    (kept_dir / "model").mkdir(parents=True)
    (kept_dir / "model" / "stale").write_text("from a retried attempt")
    kept = spool.keep_files([str(trial / "result.json"), str(trial / "model")])
    assert kept == [str(kept_dir / "result.json"), str(kept_dir / "model")]
    assert (kept_dir / "result.json").read_text() == "{}" and (kept_dir / "model" / "MLmodel").read_text() == "new"
    assert not (kept_dir / "model" / "stale").exists()


# ---------------------------------------------------------------------------- a trial's run through an outage


def test_an_outage_journals_every_later_write_in_order_and_the_next_write_replays_them(mlflow, tmp_path):
    run = journal.TrialRun(URI, "1", "p", "t0", "run t0", spool_dir=tmp_path)
    assert run.run_id == "r0" and not (tmp_path / "t0.jsonl").exists()  # nothing journalled while the server takes writes
    assert (mlflow.runs["r0"].info.run_name, mlflow.runs["r0"].info.experiment_id) == ("run t0", "1")
    mlflow.down = True
    run.log_epoch(1, {VAL_MAE: 50.0})
    run.log_epoch(2, {VAL_MAE: 45.0})
    lines = [json.loads(line) for line in (tmp_path / "t0.jsonl").read_text().splitlines()]
    assert [(line["op"], line.get("epoch"), line["run_id"]) for line in lines] == [("epoch", 1, "r0"), ("epoch", 2, "r0")]
    mlflow.down = False
    run.log_epoch(3, {VAL_MAE: 40.0})  # journalled behind the others, then all replayed in order
    assert metric_steps(mlflow.runs["r0"], VAL_MAE) == {1: 1, 2: 1, 3: 1}
    assert not journal.Spool(tmp_path / "t0.jsonl").pending()
    run.finish(COMPLETED)
    assert mlflow.runs["r0"].info.status == "FINISHED"


def test_a_trial_without_a_journal_raises_what_the_server_raised(mlflow):
    run = journal.TrialRun(URI, "1", "p", "t0", "run t0")
    mlflow.down = True
    with pytest.raises(ConnectionError):
        run.log_params({"lr": "0.1"})


def test_log_final_sends_the_trials_files_from_the_journals_copies(mlflow, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("x: 1\n")
    (out / "result.json").write_text("{}")
    monkeypatch.setattr(journal, "save_trial_model", lambda out_dir: None)
    run = journal.TrialRun(URI, "1", "p", "t0", "run t0", spool_dir=tmp_path / "journal")
    run.log_final({TEST_MAE: 42.0}, out)
    kept = tmp_path / "journal" / "t0"
    assert sorted(mlflow.runs["r0"].artifacts) == [("file", str(kept / "config.yaml")), ("file", str(kept / "result.json"))]
    assert mlflow.runs["r0"].data.metrics[TEST_MAE] == 42.0


def test_a_model_that_cannot_be_built_costs_the_trial_its_model_only(mlflow, tmp_path, monkeypatch, capsys):
    def broken(out_dir):
        raise RuntimeError("no weights\nsecond line")

    monkeypatch.setattr(journal, "save_trial_model", broken)
    run = journal.TrialRun(URI, "1", "p", "t9", "run t9")
    run.log_final({TEST_MAE: 1.0}, tmp_path)
    assert mlflow.runs["r0"].data.metrics[TEST_MAE] == 1.0
    assert capsys.readouterr().err.strip() == (
        "trial t9: its MLflow model was not built (RuntimeError: no weights); the trial is logged without it"
    )


# ---------------------------------------------------------------------------- sync and the driver


def test_sync_counts_the_journals_it_completed_and_those_still_pending(mlflow, tmp_path):
    journal.Replayer(URI).apply(open_operation("t0"))
    done = journal.Spool(tmp_path / "t0.jsonl")
    done.append(open_operation("t0"))
    done.append({"op": "finish", "trial_id": "t0", "status": COMPLETED, "reason": None})
    empty = journal.Spool(tmp_path / "t1.jsonl")
    empty.append(open_operation("t1"))
    empty.done_path.write_text("1")  # replayed before: not counted
    assert journal.sync_spools(URI, tmp_path) == (1, 0)
    assert mlflow.runs["r0"].info.status == "FINISHED"
    stuck = journal.Spool(tmp_path / "t2.jsonl")
    stuck.append({"op": "params", "trial_id": "t2", "params": {}})  # no run to replay into
    assert journal.sync_spools(URI, tmp_path) == (0, 1)


def test_the_driver_ends_a_run_directly_or_behind_the_trials_pending_writes(mlflow, tmp_path):
    journal.Replayer(URI).apply(open_operation("t0"))
    journal.finish_from_driver(URI, str(tmp_path), "t0", "r0", "interrupted", "Ctrl-C")
    assert mlflow.runs["r0"].info.status == "KILLED" and not (tmp_path / "t0.jsonl").exists()
    # A trial that never opened a run (no run id, no journal): nothing to end, nothing written.
    journal.finish_from_driver(URI, str(tmp_path), "t5", None, "interrupted", "Ctrl-C")
    assert not (tmp_path / "t5.jsonl").exists()
    # The server is down: the driver's finish goes to the journal, to be replayed later.
    mlflow.down = True
    journal.finish_from_driver(URI, str(tmp_path), "t0", "r0", COMPLETED, "done")
    assert [json.loads(line)["op"] for line in (tmp_path / "t0.jsonl").read_text().splitlines()] == ["finish"]
    # The trial has pending writes: the finish goes behind them, and all are replayed once the server is back.
    mlflow.down = False
    journal.finish_from_driver(URI, str(tmp_path), "t0", "r0", "failed", "boom")
    assert mlflow.runs["r0"].info.status == "FAILED" and mlflow.runs["r0"].data.tags[REASON_TAG] == "boom"
    assert not journal.Spool(tmp_path / "t0.jsonl").pending()


def test_finishing_a_sweep_waits_for_its_journals_then_ends_orphans_and_the_parent(mlflow, tmp_path, monkeypatch):
    parent = mlflow.create_run("1", "sweep", {})
    record = journal.SweepRecord(tmp_path, "quick", "1", parent.info.run_id)
    stuck = journal.Spool(tmp_path / "tracking_journal" / "t0.jsonl")
    stuck.append({"op": "params", "trial_id": "t0", "params": {}})
    said = []
    assert journal.finish_tracking(URI, record, said.append, final=True) == 1
    assert said == [
        f"the tracking server took no writes for 1 trial(s); their journals wait in {tmp_path / 'tracking_journal'}: "
        "run `irrep-study sync` once it is back"
    ]
    assert parent.info.status == "RUNNING"  # not ended while a trial's writes are missing
    stuck.path.unlink()
    ended = []
    monkeypatch.setattr(store, "end_running_trials", lambda uri, eid, pid, reason: ended.append((eid, pid, reason)) or 2)
    said.clear()
    assert journal.finish_tracking(URI, record, said.append, final=False) == 0
    assert said == [] and ended == [] and parent.info.status == "RUNNING"
    assert journal.finish_tracking(URI, record, said.append, final=True) == 0
    assert ended == [("1", parent.info.run_id, journal.ORPHAN_REASON)]
    assert said == ["marked 2 trial run(s) that an interrupted driver left behind as interrupted"]
    assert parent.info.status == "FINISHED" and parent.data.tags[STATUS_TAG] == COMPLETED
    mlflow.down = True
    said.clear()
    assert journal.finish_tracking(URI, record, said.append, final=True) == 1
    assert said[-1] == "could not close the sweep's parent run (ConnectionError); `irrep-study sync` will"


def test_finishing_reports_the_journals_it_wrote(mlflow, tmp_path):
    parent = mlflow.create_run("1", "sweep", {})
    record = journal.SweepRecord(tmp_path, "quick", "1", parent.info.run_id)
    spool = journal.Spool(tmp_path / "tracking_journal" / "t0.jsonl")
    spool.append(open_operation("t0"))
    said = []
    assert journal.finish_tracking(URI, record, said.append) == 0
    assert said == ["wrote the tracking journals of 1 trial(s) to MLflow"]


def test_sync_finds_the_sweeps_of_its_experiment_and_ends_only_the_finished_ones(mlflow, tmp_path, monkeypatch):
    space = SearchSpace.model_validate(SPACE)
    parents = {}
    for name, experiment, finished in (("a", "quick", True), ("b", "quick", False), ("c", "other", True)):
        parents[name] = mlflow.create_run("1", name, {})
        (tmp_path / name).mkdir()
        journal.write_state(journal.SweepRecord(tmp_path / name, experiment, "1", parents[name].info.run_id), space, "u", finished)
    monkeypatch.setattr(store, "end_running_trials", lambda *args: 0)
    assert journal.sync_sweeps(URI, tmp_path, "quick", print) == {"sweeps": 2, "pending": 0}
    assert [parents[n].info.status for n in "abc"] == ["FINISHED", "RUNNING", "RUNNING"]
    with pytest.raises(UserError, match="--experiment: no sweep of experiment 'nope' in"):
        journal.sync_sweeps(URI, tmp_path, "nope", print)


def fake_model(calls):
    """save_trial_model's stand-in: the MLflow Model folder of the trial in `out_dir`."""

    def save(out_dir):
        calls.append(out_dir)
        folder = out_dir / "mlflow_model"
        folder.mkdir()
        (folder / "MLmodel").write_text("flavors: {}\n")
        return folder

    return save


def test_a_trial_whose_server_was_down_from_the_start_is_logged_whole_by_sync(mlflow, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.json").write_text("{}")
    built = []
    monkeypatch.setattr(journal, "save_trial_model", fake_model(built))
    mlflow.down = True
    run = journal.TrialRun(URI, "1", "p", "t0", "run t0", spool_dir=tmp_path / "journal")
    assert run.run_id is None  # not even the run could be created
    run.log_params({"lr": "0.1"})
    run.log_epoch(1, {VAL_MAE: 50.0})
    run.log_final({TEST_MAE: 42.0}, out)
    run.finish(COMPLETED)
    assert built == [out]
    shutil.rmtree(out)  # Ray deletes the trial's folder after the trial: the journal has copies
    mlflow.down = False
    before_ms = time.time() * 1000
    assert journal.sync_spools(URI, tmp_path / "journal") == (1, 0)
    run = mlflow.runs["r0"]
    assert run.data.params == {"lr": "0.1"} and metric_steps(run, VAL_MAE) == {1: 1}
    assert run.data.metrics[TEST_MAE] == 42.0 and run.info.status == "FINISHED"
    kept = tmp_path / "journal" / "t0"
    assert sorted(run.artifacts) == [("file", str(kept / "result.json")), (MODEL_ARTIFACT, str(kept / "mlflow_model"))]
    assert (kept / "mlflow_model" / "MLmodel").exists()
    # Metrics carry the time they were measured, in milliseconds, not the time of the replay.
    assert all(before_ms - 60_000 < stamp <= before_ms for stamp in run.timestamps)


def test_a_trial_logs_its_model_folder_and_metrics_stamped_in_milliseconds(mlflow, tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(journal, "save_trial_model", fake_model(built))
    start_ms = time.time() * 1000
    run = journal.TrialRun(URI, "1", "p", "t0", "run t0")
    run.log_epoch(1, {VAL_MAE: 50.0})
    run.log_final({TEST_MAE: 42.0}, tmp_path)
    assert built == [tmp_path]
    assert mlflow.runs["r0"].artifacts == [(MODEL_ARTIFACT, str(tmp_path / "mlflow_model"))]
    assert all(start_ms - 1 <= stamp <= time.time() * 1000 + 1 for stamp in mlflow.runs["r0"].timestamps)


@pytest.mark.parametrize(
    "message, shown",
    [("", ""), ("x" * 300 + "\nsecond line", "x" * 200)],
)
def test_a_model_build_failure_is_reported_in_one_line_of_at_most_200_characters(mlflow, tmp_path, monkeypatch, capsys, message, shown):
    def broken(out_dir):
        raise OSError(message)

    monkeypatch.setattr(journal, "save_trial_model", broken)
    journal.TrialRun(URI, "1", "p", "t0", "run t0").log_final({TEST_MAE: 1.0}, tmp_path)
    assert capsys.readouterr().err == (f"trial t0: its MLflow model was not built (OSError: {shown}); the trial is logged without it\n")


def test_the_driver_ends_a_run_it_does_not_know_behind_the_trials_journal(mlflow, tmp_path):
    spool = journal.Spool(tmp_path / "t0.jsonl")
    spool.append(open_operation("t0"))  # the trial journalled its `open` and died
    journal.finish_from_driver(URI, str(tmp_path), "t0", None, "interrupted", "Ctrl-C")
    assert mlflow.runs["r0"].info.status == "KILLED" and mlflow.runs["r0"].data.tags[REASON_TAG] == "Ctrl-C"
    assert not spool.pending()


def test_resume_skips_a_state_file_without_a_search_space(tmp_path):
    for folder, state in (("quick-20261201-100000", {"finished": False}), ("quick-20261202-100000", {})):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / journal.SWEEP_FILE).write_text(json.dumps(state))
    assert journal.latest_unfinished(tmp_path, "quick") is None


def test_a_trials_end_carries_its_status_and_reason(mlflow):
    run = journal.TrialRun(URI, "1", "p", "t0", "run t0")
    run.finish("failed", "diverged at epoch 3")
    assert mlflow.runs["r0"].info.status == "FAILED"
    assert mlflow.runs["r0"].data.tags[REASON_TAG] == "diverged at epoch 3"


def test_sync_adds_up_the_pending_journals_of_every_sweep_and_says_so(mlflow, tmp_path, monkeypatch):
    space = SearchSpace.model_validate(SPACE)
    parents = {}
    for name in ("a", "b"):
        parents[name] = mlflow.create_run("1", name, {})
        (tmp_path / name).mkdir()
        journal.write_state(journal.SweepRecord(tmp_path / name, "quick", "1", parents[name].info.run_id), space, "u", True)
        journal.Spool(tmp_path / name / "tracking_journal" / "t0.jsonl").append({"op": "params", "trial_id": "t0", "params": {}})
    said = []
    assert journal.sync_sweeps(URI, tmp_path, "quick", said.append) == {"sweeps": 2, "pending": 2}
    assert len(said) == 2 and all(line.startswith("the tracking server took no writes for 1 trial(s)") for line in said)


def test_sync_leaves_running_a_sweep_whose_state_does_not_say_it_finished(mlflow, tmp_path, monkeypatch):
    parent = mlflow.create_run("1", "a", {})
    (tmp_path / "a").mkdir()
    state = {"experiment": "quick", "experiment_id": "1", "parent_run_id": parent.info.run_id, "space": SPACE}
    (tmp_path / "a" / journal.SWEEP_FILE).write_text(json.dumps(state))
    monkeypatch.setattr(store, "end_running_trials", lambda *args: 0)
    assert journal.sync_sweeps(URI, tmp_path, "quick", print) == {"sweeps": 1, "pending": 0}
    assert parent.info.status == "RUNNING"


def test_a_journal_is_created_with_its_folders_and_a_single_write_once_replayed_is_done(tmp_path):
    # On a worker node the sweep's folder may not exist yet: the journal makes it.
    spool = journal.Spool(tmp_path / "node" / "sweep" / "tracking_journal" / "t0.jsonl")
    spool.append({"op": "finish"})
    recorder = Recorder()
    assert spool.replay(recorder) is True and recorder.applied == ["finish"]
    assert not spool.pending()
    assert spool.replay(recorder) is True and recorder.applied == ["finish"]  # not applied twice


def test_sync_counts_every_journal_of_a_folder(mlflow, tmp_path):
    for trial in ("t0", "t1"):
        journal.Spool(tmp_path / "down" / f"{trial}.jsonl").append({"op": "params", "trial_id": trial, "params": {}})
        journal.Spool(tmp_path / "up" / f"{trial}.jsonl").append(open_operation(trial))
    assert journal.sync_spools(URI, tmp_path / "down") == (0, 2)
    assert journal.sync_spools(URI, tmp_path / "up") == (2, 0)
