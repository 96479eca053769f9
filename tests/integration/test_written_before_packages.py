"""Files the code wrote before its modules moved into packages still work: a trial's logged MLflow
model loads and predicts what its best_model.pt does, and a sweep stopped with Ctrl-C resumes to
the end, though their pickles name the old modules (`study.model.IrrepConvModel`,
`study.space.OptunaSpace`, `study.sweep.SeedRepeater`, ...).

The fixture (tests/fixtures/before_packages/sweep) is a sweep of 2 Optuna proposals x 2 seeds
with the seed-aware ASHA, stopped with SIGINT after its first trials finished, written by the
code before the move (tests/fixtures/before_packages/make_fixture.py says how). A sweep folder
names itself by absolute path, so it is copied back to the folder it was written in.
"""

from __future__ import annotations

import json
import pickletools
import shutil
import sqlite3
from pathlib import Path

import pytest

from tests.helpers.mlflow_trials import predictions_of_best_model_pt
from tests.helpers.services import start_sweep, sweep_report

pytestmark = pytest.mark.slow  # a real sweep resumed on a local Ray

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "before_packages" / "sweep"
WHERE = Path("/tmp/irrep-study-before-packages/sweep")  # where make_fixture.py ran the sweep


def old_names(pickle_bytes: bytes) -> set[str]:
    """The `study.*` module names a pickle refers to (protocol 2's GLOBAL holds "module name")."""
    return {arg.split(" ")[0] for _, arg, _ in pickletools.genops(pickle_bytes) if isinstance(arg, str) and arg.startswith("study.")}


@pytest.fixture
def sweep_folder():
    shutil.rmtree(WHERE, ignore_errors=True)
    shutil.copytree(FIXTURE, WHERE)
    yield WHERE
    shutil.rmtree(WHERE.parent, ignore_errors=True)


def trial_runs(folder: Path) -> dict[str, tuple[str, str]]:
    """run id -> (status tag, MLflow status) of every trial run, read from the SQLite store."""
    with sqlite3.connect(folder / "mlflow.db") as connection:
        rows = connection.execute(
            "select runs.run_uuid, tags.value, runs.status from runs join tags on tags.run_uuid = runs.run_uuid "
            "where tags.key = 'irrep_study.status' and runs.run_uuid in "
            "(select run_uuid from tags where key = 'irrep_study.role' and value = 'trial')"
        ).fetchall()
    return {run_id: (status, state) for run_id, status, state in rows}


def test_the_fixture_names_the_modules_that_moved():
    # What makes this test mean something: the saved state really names the old modules.
    [state] = FIXTURE.glob("ray_results/*/tuner.pkl")
    assert {"study.sweep", "study.space"} <= old_names(state.read_bytes())
    model = next(FIXTURE.glob("mlartifacts/*/artifacts/model/data/model.pth"))
    import zipfile

    with zipfile.ZipFile(model) as archive:
        [data] = [name for name in archive.namelist() if name.endswith("data.pkl")]
        assert {"study.model", "study.irreps", "study.fast_tp"} <= old_names(archive.read(data))


def test_a_model_logged_before_the_move_loads_and_predicts_as_its_weights_do(sweep_folder, qm9, monkeypatch):
    import mlflow.pytorch
    import torch

    from study.nn.model import IrrepConvModel

    uri = f"sqlite:///{sweep_folder / 'mlflow.db'}"
    finished = [run_id for run_id, (status, _) in trial_runs(sweep_folder).items() if status == "completed"]
    assert finished
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for run_id in finished:
        loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
        assert isinstance(loaded, IrrepConvModel)
        expected, batch = predictions_of_best_model_pt(uri, run_id, qm9, [0, 3, 7, 11])
        with torch.no_grad():
            assert torch.equal(loaded(batch), expected)


def test_a_sweep_stopped_before_the_move_resumes_to_the_end(sweep_folder, qm9_cache_dir):
    before = trial_runs(sweep_folder)
    assert sorted(status for status, _ in before.values()) == ["completed", "interrupted"]
    report = sweep_report(start_sweep(sweep_folder / "space.yaml", sweep_folder, qm9_cache_dir, "--resume"), sweep_folder)
    assert report["interrupted"] is False
    # Every trial ran to its end: completed, or stopped by the seed-aware ASHA with its other seed.
    statuses = {(t["l_values"], t["status"]) for t in report["trials"]}
    assert len(report["trials"]) == 4 and {s for _, s in statuses} <= {"completed", "stopped_early"}, report["trials"]
    assert len({l_values for l_values, _ in statuses}) == len(statuses)  # one status per configuration
    after = trial_runs(sweep_folder)
    assert set(before) <= set(after) and len(after) == 4  # the interrupted trial kept its run; none doubled
    assert sorted(status for status, _ in after.values()) == sorted(t["status"] for t in report["trials"])
    assert all(state == "FINISHED" for _, state in after.values()), after
    [state] = sweep_folder.glob("ray_results/*/irrep_study_sweep.json")
    assert json.loads(state.read_text())["finished"] is True
