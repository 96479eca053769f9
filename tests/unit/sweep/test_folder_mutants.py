"""A sweep's folder through its life (study/sweep/folder.py): claimed with its MLflow parent run,
reopened by `--resume`, its Optuna storage checked, its orphaned Optuna trials failed. The MLflow
calls go to a stand-in that records them, so each test runs in milliseconds and pins the exact
refusal, record and state a resume depends on. Written to kill the mutants of folder.py
(docs/mutation.md)."""

from __future__ import annotations

import json
import re
from datetime import datetime
from types import SimpleNamespace

import pytest

from study.config.space import SearchSpace
from study.errors import UserError
from study.sweep import folder
from study.tracking import store
from study.tracking.journal import SWEEP_FILE, SweepRecord, write_state

OPTUNA_SPACE = {
    "name": "quick",
    "trial": {"hidden_dim": 4},
    # A learning-rate range: a tuple in pydantic's Python dump, a list in its JSON dump, so the
    # space handed to MLflow is seen to be the JSON one.
    "search": {"method": "optuna", "num_samples": 2, "params": {"l_values": {"subsets_of": [0, 1]}, "lr": {"loguniform": [1e-3, 1e-2]}}},
}
GRID_SPACE = {"name": "grid", "trial": {"hidden_dim": 4}, "search": {"method": "grid", "grid": [{"l_values": [0, 1]}]}}
URI = "http://user:secret@tracking.example:5000"


class FakeStore:
    """The `store` functions folder.py calls, recording them; each can be told to raise."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple] = []
        self.tags: dict[str, dict[str, str]] = {}
        self.fail: dict[str, Exception] = {}
        for name in ("ensure_experiment", "start_sweep_run", "reopen_run", "client"):
            monkeypatch.setattr(store, name, getattr(self, name))

    def _call(self, name, *args):
        self.calls.append((name, *args))
        if name in self.fail:
            raise self.fail[name]

    def ensure_experiment(self, uri, experiment):
        self._call("ensure_experiment", uri, experiment)
        return "7"

    def start_sweep_run(self, uri, experiment_id, run_name, params, space):
        self._call("start_sweep_run", uri, experiment_id, run_name, params, space)
        return "parent-1"

    def reopen_run(self, uri, run_id):
        self._call("reopen_run", uri, run_id)

    def client(self, uri):
        self._call("client", uri)
        return SimpleNamespace(set_tag=self.set_tag)

    def set_tag(self, run_id, key, value):
        self._call("set_tag", run_id, key, value)
        self.tags.setdefault(run_id, {})[key] = value


@pytest.fixture
def fake_store(monkeypatch) -> FakeStore:
    return FakeStore(monkeypatch)


# ---------------------------------------------------------------------------- check_optuna_storage


def test_no_optuna_storage_is_always_fine_even_for_a_grid_or_a_resume():
    space = SearchSpace.model_validate(GRID_SPACE)
    assert folder.check_optuna_storage(space, resume=True, url=None) is None
    assert folder.check_optuna_storage(space, resume=False, url=None) is None


def test_a_resume_keeps_the_optuna_storage_it_started_with():
    space = SearchSpace.model_validate(OPTUNA_SPACE)
    with pytest.raises(UserError) as error:
        folder.check_optuna_storage(space, resume=True, url="sqlite:///x.db")
    assert str(error.value) == "--optuna-storage: a resumed sweep keeps the Optuna storage it started with; leave it out"


def test_a_grid_search_has_no_optuna_study_to_store():
    space = SearchSpace.model_validate(GRID_SPACE)
    with pytest.raises(UserError) as error:
        folder.check_optuna_storage(space, resume=False, url="sqlite:///x.db")
    assert str(error.value) == "--optuna-storage: 'grid' is a grid search, which has no Optuna study"


def test_an_optuna_storage_optuna_cannot_open_is_refused_with_its_password_redacted(tmp_path):
    space = SearchSpace.model_validate(OPTUNA_SPACE)
    url = "postgresql://user:secret@127.0.0.1:1/optuna"  # nothing listens on port 1
    with pytest.raises(UserError) as error:
        folder.check_optuna_storage(space, resume=False, url=url)
    message = str(error.value)
    assert message.startswith(f"--optuna-storage {store.redact(url)}: Optuna cannot open it (")
    assert "secret" not in message and "\n" not in message


@pytest.mark.parametrize(
    ("raised", "reason"),
    [(ValueError("x" * 250 + "\nsecond line"), "x" * 200), (RuntimeError(), "RuntimeError")],
)
def test_the_reason_optuna_gives_is_its_first_line_cut_to_200_characters_or_the_error_s_name(monkeypatch, raised, reason):
    import optuna

    def refuse(url):
        raise raised

    monkeypatch.setattr(optuna.storages, "RDBStorage", refuse)
    with pytest.raises(UserError) as error:
        folder.check_optuna_storage(SearchSpace.model_validate(OPTUNA_SPACE), resume=False, url="sqlite:///x.db")
    assert str(error.value) == f"--optuna-storage sqlite:///x.db: Optuna cannot open it ({reason})"


def test_an_optuna_storage_that_opens_is_accepted(tmp_path):
    space = SearchSpace.model_validate(OPTUNA_SPACE)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert folder.check_optuna_storage(space, resume=False, url=url) is None
    assert (tmp_path / "optuna.db").exists()


# ---------------------------------------------------------------------------- fail_orphaned_optuna_trials


@pytest.mark.parametrize(("has_storage", "study"), [(False, "s"), (True, None), (False, None)])
def test_a_sweep_without_an_optuna_study_has_no_orphans_to_close(tmp_path, has_storage, study):
    said = []
    storage = f"sqlite:///{tmp_path / 'unused.db'}" if has_storage else None
    folder.fail_orphaned_optuna_trials(SweepRecord(tmp_path, "e", "1", "p", storage, study), said.append)
    assert said == [] and not (tmp_path / "unused.db").exists()


def test_an_optuna_study_with_nothing_running_is_left_as_it_is_and_nothing_said(tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=url, study_name="s")
    study.tell(study.ask(), 1.0)
    said = []
    folder.fail_orphaned_optuna_trials(SweepRecord(tmp_path, "e", "1", "p", url, "s"), said.append)
    assert said == []
    assert [t.state for t in optuna.load_study(study_name="s", storage=url).trials] == [optuna.trial.TrialState.COMPLETE]


def test_two_orphans_are_both_failed_with_the_reason(tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=url, study_name="s")
    study.ask(), study.ask()
    said = []
    folder.fail_orphaned_optuna_trials(SweepRecord(tmp_path, "e", "1", "p", url, "s"), said.append)
    trials = optuna.load_study(study_name="s", storage=url).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL] * 2
    assert all(t.user_attrs == {"irrep_study.reason": folder.ORPHANED_OPTUNA_REASON} for t in trials)
    assert said == ["optuna study 's': 2 trial(s) proposed before a driver stopped, never run, marked FAIL"]


def test_an_optuna_study_that_cannot_be_read_is_one_line_not_a_failed_sweep(tmp_path):
    said = []
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    folder.fail_orphaned_optuna_trials(SweepRecord(tmp_path, "e", "1", "p", url, "missing"), said.append)
    assert said == ["could not close the Optuna study's orphaned trials (KeyError)"]


# ---------------------------------------------------------------------------- claim_folder


def test_a_claimed_folder_is_named_by_study_and_time_and_created_with_its_parents(tmp_path):
    before = datetime.now().replace(microsecond=0)
    path = folder.claim_folder(tmp_path / "deep" / "storage", "quick")
    after = datetime.now()
    assert path.parent == tmp_path / "deep" / "storage" and path.is_dir()
    match = re.fullmatch(r"quick-(\d{8}-\d{6})", path.name)
    assert match, path.name
    assert before <= datetime.strptime(match.group(1), "%Y%m%d-%H%M%S") <= after


def test_drivers_claiming_in_the_same_second_get_suffixes_2_3_and_100_are_refused(tmp_path, monkeypatch):
    frozen = datetime(2026, 12, 7, 13, 0, 0)
    monkeypatch.setattr(folder, "datetime", SimpleNamespace(now=lambda: frozen))
    names = [folder.claim_folder(tmp_path, "quick").name for _ in range(3)]
    assert names == ["quick-20261207-130000", "quick-20261207-130000-2", "quick-20261207-130000-3"]
    for _ in range(4, 101):  # the 4th to the 100th
        folder.claim_folder(tmp_path, "quick")
    with pytest.raises(UserError) as error:
        folder.claim_folder(tmp_path, "quick")
    assert str(error.value) == f"--storage {tmp_path}: 100 sweeps named 'quick-20261207-130000' already; wait a second and start again"
    assert len(list(tmp_path.iterdir())) == 100


# ---------------------------------------------------------------------------- new_sweep


def test_a_new_optuna_sweep_has_its_folder_parent_run_study_tags_and_unfinished_state(tmp_path, fake_store):
    space = SearchSpace.model_validate(OPTUNA_SPACE)
    said = []
    record = folder.new_sweep(tmp_path, space, URI, "quick-exp", said.append)
    assert record.path.parent == tmp_path and record.path.is_dir() and record.path.name.startswith("quick-")
    assert (record.experiment, record.experiment_id, record.parent_run_id) == ("quick-exp", "7", "parent-1")
    assert record.optuna_storage == f"sqlite:///{record.path / 'optuna.db'}"
    assert record.optuna_study == record.path.name
    assert fake_store.calls[0] == ("ensure_experiment", URI, "quick-exp")
    assert fake_store.calls[1] == ("start_sweep_run", URI, "7", record.path.name, space.summary_params(), space.model_dump(mode="json"))
    assert fake_store.tags == {
        "parent-1": {"irrep_study.optuna_storage": record.optuna_storage, "irrep_study.optuna_study": record.path.name}
    }
    assert {call for call in fake_store.calls if call[0] == "client"} == {("client", URI)}  # the tags go to the sweep's server
    state = json.loads((record.path / SWEEP_FILE).read_text())
    assert state["finished"] is False and state["parent_run_id"] == "parent-1" and state["optuna_study"] == record.path.name
    assert state["tracking_uri"] == store.redact(URI)
    assert said == [f"sweep {record.path.name}: 2 trials; MLflow experiment 'quick-exp', parent run parent-1"]


def test_a_given_optuna_storage_is_used_and_tagged_redacted(tmp_path, fake_store):
    space = SearchSpace.model_validate(OPTUNA_SPACE)
    url = "postgresql://user:secret@db.example/optuna"
    record = folder.new_sweep(tmp_path, space, URI, "quick-exp", lambda line: None, optuna_storage=url)
    assert record.optuna_storage == url
    assert fake_store.tags["parent-1"]["irrep_study.optuna_storage"] == store.redact(url)
    assert "secret" not in (record.path / SWEEP_FILE).read_text()


def test_a_new_grid_sweep_has_no_optuna_study_and_no_tags(tmp_path, fake_store):
    space = SearchSpace.model_validate(GRID_SPACE)
    record = folder.new_sweep(tmp_path, space, URI, "grid-exp", lambda line: None)
    assert record.optuna_storage is None and record.optuna_study is None
    assert fake_store.tags == {} and [call[0] for call in fake_store.calls] == ["ensure_experiment", "start_sweep_run"]
    assert json.loads((record.path / SWEEP_FILE).read_text())["optuna_storage"] is None


def test_a_tracking_error_creating_the_experiment_passes_through_unchanged(tmp_path, fake_store):
    fake_store.fail["ensure_experiment"] = store.TrackingError("the server said no")
    with pytest.raises(store.TrackingError) as error:
        folder.new_sweep(tmp_path, SearchSpace.model_validate(GRID_SPACE), URI, "e", lambda line: None)
    assert str(error.value) == "the server said no"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failing", ["ensure_experiment", "start_sweep_run"])
def test_any_other_failure_to_create_the_runs_is_one_redacted_line_and_leaves_no_folder(tmp_path, fake_store, failing):
    fake_store.fail[failing] = ConnectionError("refused")
    with pytest.raises(store.TrackingError) as error:
        folder.new_sweep(tmp_path, SearchSpace.model_validate(GRID_SPACE), URI, "e", lambda line: None)
    assert str(error.value) == f"--tracking-uri {store.redact(URI)}: cannot create the sweep's runs (ConnectionError)"
    assert "secret" not in str(error.value)
    assert list(tmp_path.iterdir()) == []  # the claimed folder is given back


def test_a_parent_run_that_cannot_be_tagged_is_said_on_stderr_and_the_sweep_goes_on(tmp_path, fake_store, capsys):
    fake_store.fail["set_tag"] = ConnectionError("refused")
    record = folder.new_sweep(tmp_path, SearchSpace.model_validate(OPTUNA_SPACE), URI, "e", lambda line: None)
    assert (record.path / SWEEP_FILE).exists()
    assert capsys.readouterr().err == f"could not tag the parent run (ConnectionError); {SWEEP_FILE} names the Optuna study\n"


# ---------------------------------------------------------------------------- reopen_sweep


def test_resume_without_an_unfinished_sweep_is_refused_naming_the_study_and_storage(tmp_path, fake_store):
    with pytest.raises(UserError) as error:
        folder.reopen_sweep(tmp_path, SearchSpace.model_validate(OPTUNA_SPACE), URI, lambda line: None)
    assert str(error.value) == f"--resume: no unfinished sweep named 'quick' in {tmp_path}"
    assert fake_store.calls == []


def test_resume_reopens_the_latest_unfinished_sweep_and_its_parent_run(tmp_path, fake_store):
    space = SearchSpace.model_validate(OPTUNA_SPACE)
    for name, parent, finished in (("quick-20261207-120000", "p-old", False), ("quick-20261207-130000", "p-new", False)):
        record = SweepRecord(tmp_path / name, "exp", "7", parent, f"sqlite:///{tmp_path / name / 'optuna.db'}", name)
        record.path.mkdir()
        write_state(record, space, URI, finished=finished)
    said = []
    record = folder.reopen_sweep(tmp_path, space, URI, said.append)
    assert record == SweepRecord(
        tmp_path / "quick-20261207-130000",
        "exp",
        "7",
        "p-new",
        f"sqlite:///{tmp_path / 'quick-20261207-130000' / 'optuna.db'}",
        "quick-20261207-130000",
    )
    assert fake_store.calls == [("reopen_run", URI, "p-new")]
    assert said == ["resuming quick-20261207-130000: MLflow experiment 'exp', parent run p-new"]
