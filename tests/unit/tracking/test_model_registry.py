"""Every completed trial logs its best model as an MLflow Model (`model/`, PyTorch flavour) through
the trial's journal, and `irrep-study best --register NAME` registers the winning configuration's
best seed's model: what the registry serves predicts what the trial's best_model.pt predicts."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from mlflow.entities import Metric, Param
from typer.testing import CliRunner

from study.cli import app, main
from study.config.trial import TrialConfig
from study.data.reference import TargetReference
from study.tracking import journal, store
from study.tracking.logged_model import MODEL_ARTIFACT, save_trial_model
from study.training.trial import run_trial
from tests.helpers.mlflow_trials import (
    TINY,
    one_torch_thread,
    predictions_of_best_model_pt,
    tracking_store,
)

EXPERIMENT = "registry"
SEEDS = (1, 2)  # two seeds of one configuration: the better one on validation is registered
CONFIG = dict(TINY, l_values=[0, 1], subset=200)


@dataclass
class Logged:
    uri: str
    experiment_id: str
    parent_run_id: str
    runs: dict[int, str] = field(default_factory=dict)  # seed -> run id
    best_val: dict[int, float] = field(default_factory=dict)  # seed -> best_val_mae_meV


def sweep_parent(uri: str, experiment: str) -> tuple[str, str]:
    experiment_id = store.ensure_experiment(uri, experiment)
    parent = store.client(uri).create_run(experiment_id, run_name="sweep", tags={store.ROLE_TAG: "sweep"})
    return experiment_id, parent.info.run_id


def log_like_a_sweep_trial(uri: str, experiment_id: str, parent: str, config: TrialConfig, tensors, root: Path) -> tuple[str, float]:
    """One real trial logged the way study/sweep/trainable.py logs it (no Ray): TrialRun with a
    journal, its work folder deleted afterwards. (run id, best validation MAE)."""
    trial_id = f"t_{config.seed:05d}"
    run = journal.TrialRun(
        uri, experiment_id, parent, trial_id, run_name=f"{trial_id} seed={config.seed}", spool_dir=root / "tracking_journal"
    )
    run.log_params(config.flat_params())
    work = root / trial_id
    with one_torch_thread():
        result = run_trial(config, work, tensors=tensors, on_epoch=lambda m: run.log_epoch(m.epoch, m.tracked()))
    assert result.status == "completed", result.reason
    run.log_params(TargetReference.from_dict(result.reference).flat_params())
    run.log_final({metric: getattr(result, metric) for metric in store.FINAL_METRICS}, work)
    run.finish("completed")
    assert not run.spool.pending()
    shutil.rmtree(work)  # as a sweep does: the logged model must not need the trial's folder
    return run.run_id, result.best_val_mae_meV


@pytest.fixture(scope="module")
def logged(qm9, tmp_path_factory) -> Logged:
    root = tmp_path_factory.mktemp("registry")
    uri = tracking_store(root)
    study = Logged(uri, *sweep_parent(uri, EXPERIMENT))
    for seed in SEEDS:
        config = TrialConfig(**CONFIG, seed=seed)
        study.runs[seed], study.best_val[seed] = log_like_a_sweep_trial(uri, study.experiment_id, study.parent_run_id, config, qm9, root)
    return study


def test_the_registered_model_predicts_what_the_winning_trials_best_model_pt_predicts(logged, qm9, run_cli, monkeypatch):
    import mlflow.pytorch
    from mlflow.models import get_model_info

    document = json.loads(
        run_cli("best", "--experiment", EXPERIMENT, "--tracking-uri", logged.uri, "--register", "qm9-u0", "--json", check_exit=0).stdout
    )
    best_seed = min(SEEDS, key=lambda seed: logged.best_val[seed])  # chosen on validation
    winner = logged.runs[best_seed]
    assert document["registered"] == {
        "name": "qm9-u0",
        "version": 1,
        "run_id": winner,
        "source": f"runs:/{winner}/{MODEL_ARTIFACT}",
        "model_uri": "models:/qm9-u0/1",
    }

    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged.uri)  # where models:/ URIs are resolved
    served = mlflow.pytorch.load_model("models:/qm9-u0/1")
    expected, batch = predictions_of_best_model_pt(logged.uri, winner, qm9, [0, 1, 2, 3, 5, 8, 13, 21])
    with torch.no_grad():
        got = served(batch)
    assert got.shape == (8,) and torch.allclose(got, expected)
    # The model of the other seed predicts otherwise: the comparison can tell models apart.
    other = logged.runs[next(seed for seed in SEEDS if seed != best_seed)]
    assert not torch.allclose(mlflow.pytorch.load_model(f"runs:/{other}/{MODEL_ARTIFACT}")(batch).detach(), expected)
    # The trial config travels with the model.
    metadata = get_model_info("models:/qm9-u0/1").metadata
    assert metadata["trial_config"]["seed"] == best_seed and metadata["trial_config"]["l_values"] == [0, 1]
    assert metadata["target_reference"]["kind"] == "composition"

    # Registering again under the same name adds a version.
    again = CliRunner().invoke(app, ["best", "--experiment", EXPERIMENT, "--tracking-uri", logged.uri, "--register", "qm9-u0"])
    assert again.exit_code == 0, again.output
    assert "as qm9-u0 version 2" in again.stderr


def run_main(monkeypatch, capsys, *args: str) -> list[str]:
    """`irrep-study ARGS` in process; it must end with exit code 2; the lines of stderr."""
    monkeypatch.setattr(sys, "argv", ["irrep-study", *args])
    capsys.readouterr()  # what the test's own setup printed (MLflow creating the store)
    with pytest.raises(SystemExit) as ended:
        main()
    assert ended.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


def test_a_winner_logged_without_a_model_is_one_line_and_exit_2(logged, monkeypatch, capsys):
    # A run as trials were logged before models were: params, metrics, no `model/`. (In the same
    # store: a new SQLite store costs seconds of schema migrations.)
    uri = logged.uri
    experiment_id, parent = sweep_parent(uri, "old")
    client = store.client(uri)
    tags = {store.PARENT_TAG: parent, store.ROLE_TAG: "trial", store.STATUS_TAG: "completed"}
    run_id = client.create_run(experiment_id, run_name="old trial", tags=tags).info.run_id
    client.log_batch(
        run_id,
        params=[Param(k, v) for k, v in TrialConfig(**CONFIG).flat_params().items()],
        metrics=[Metric("best_val_mae_meV", 50.0, 0, 0), Metric("test_mae_meV", 55.0, 0, 0)],
    )

    lines = run_main(monkeypatch, capsys, "best", "--experiment", "old", "--tracking-uri", uri, "--register", "m")
    assert len(lines) == 1 and lines[0].startswith("error: --register"), lines
    assert run_id in lines[0] and "no logged MLflow model" in lines[0]
    assert not client.search_registered_models(filter_string="name = 'm'")


def test_registering_refuses_a_model_chosen_on_the_test_set(tmp_path, monkeypatch, capsys):
    lines = run_main(
        monkeypatch,
        capsys,
        "best",
        "--experiment",
        "any",
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'x.db'}",
        "--by",
        "test_mae_meV",
        "--register",
        "m",
    )
    assert lines == ["error: --register: the registered model is chosen on validation; drop --by test_mae_meV"]


def test_a_registry_that_cannot_register_is_one_line_and_exit_2(logged, tmp_path, monkeypatch, capsys):
    # The runs are in a SQL store, the registry is a folder (a file store, which MLflow 3 refuses).
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "false")
    lines = run_main(monkeypatch, capsys, "best", "--experiment", EXPERIMENT, "--tracking-uri", logged.uri, "--register", "m")
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: --register m: the model registry {(tmp_path / 'mlruns').as_uri()} refused it ("), lines


def test_a_journaled_model_reaches_mlflow_once_after_the_trials_folder_is_gone(logged, qm9, tmp_path):
    """The `final` operation as a trial journals it when the server is down, replayed later (twice:
    a replay that the server took but whose answer was lost is applied again)."""
    import mlflow.pytorch

    client = store.client(logged.uri)
    source = logged.runs[SEEDS[0]]
    # A trial folder with the files of a finished trial (downloaded from the first trial's run).
    work = tmp_path / "work"
    work.mkdir()
    for name in ("config.yaml", "best_model.pt", "result.json"):
        shutil.copy(client.download_artifacts(source, name), work / name)
    spool = journal.Spool(tmp_path / "journal" / "t_replay.jsonl")
    model = spool.keep_files([str(save_trial_model(work))])[0]  # as TrialRun.log_final keeps it
    files = spool.keep_files([str(work / "best_model.pt")])
    shutil.rmtree(work)

    run_id = client.create_run(logged.experiment_id, run_name="replayed").info.run_id
    operation = {
        "op": "final",
        "trial_id": "t_replay",
        "run_id": run_id,
        "metrics": {"test_mae_meV": 1.0},
        "files": files,
        "model": model,
        "timestamp": 0,
    }
    spool.append(operation)
    assert spool.replay(journal.Replayer(logged.uri)) and not spool.pending()
    listing = sorted(info.path for info in client.list_artifacts(run_id, MODEL_ARTIFACT))
    journal.Replayer(logged.uri).apply(dict(operation))
    assert sorted(info.path for info in client.list_artifacts(run_id, MODEL_ARTIFACT)) == listing
    assert f"{MODEL_ARTIFACT}/MLmodel" in listing

    expected, batch = predictions_of_best_model_pt(logged.uri, source, qm9, [4, 6])
    replayed = mlflow.pytorch.load_model(f"{client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT}")
    assert torch.allclose(replayed(batch).detach(), expected)
