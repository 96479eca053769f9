"""`irrep-study best` chooses on validation error and says so; the test error is reported beside
the composition baseline, never used to choose unless asked for."""

from __future__ import annotations

import json

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from study.best import best_runs
from study.cli import app
from study.config import TrialConfig

# (validation MAE, test MAE) per trial: the best on validation is not the best on test.
TRIALS = {"a": (30.0, 60.0), "b": (40.0, 35.0), "c": (50.0, 45.0)}
BASELINE = 900.0


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("best")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("picks", artifact_location=(root / "artifacts").resolve().as_uri())
    parent = client.create_run(experiment_id, run_name="sweep", tags={"irrep_study.role": "sweep"}).info.run_id
    for seed, (name, (val, test)) in enumerate(TRIALS.items(), start=1):
        tags = {"mlflow.parentRunId": parent, "irrep_study.role": "trial", "irrep_study.status": "completed"}
        run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        config = TrialConfig(hidden_dim=8, seed=seed, lr=1e-3 * seed)
        metrics = {"best_val_mae_meV": val, "test_mae_meV": test, "baseline_test_mae_meV": BASELINE, "num_params": 1000.0}
        client.log_batch(run_id, params=[Param(k, v) for k, v in config.flat_params().items()],
                         metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])
        client.set_terminated(run_id, "FINISHED")
    return uri


def test_best_ranks_by_validation_mae_by_default(store):
    rows = best_runs(store, "picks")
    assert [row["best_val_mae_meV"] for row in rows] == [30.0, 40.0, 50.0]
    assert rows[0]["test_mae_meV"] == 60.0  # the validation winner keeps its (worse) test MAE
    assert rows[0]["baseline_test_mae_meV"] == BASELINE and rows[0]["test_over_baseline"] == pytest.approx(60.0 / BASELINE)


def test_best_cli_says_which_metric_chose_and_exports_the_validation_winner(store, tmp_path):
    winner = tmp_path / "winner.yaml"
    result = CliRunner().invoke(app, ["best", "--experiment", "picks", "--tracking-uri", store, "--json", "--export", str(winner)])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["metric"] == "best_val_mae_meV" and document["ranked_by"] == "ranked by best_val_mae_meV"
    assert "ranked by best_val_mae_meV" in result.stderr
    assert "seed: 1" in winner.read_text()  # trial "a", the best on validation

    table = CliRunner().invoke(app, ["best", "--experiment", "picks", "--tracking-uri", store])
    assert table.exit_code == 0 and "ranked by best_val_mae_meV" in table.stdout
    assert "baseline test MAE" in table.stdout and "900.0" in table.stdout and "0.07" in table.stdout


def test_ranking_by_the_test_metric_is_possible_and_flagged(store):
    result = CliRunner().invoke(app, ["best", "--experiment", "picks", "--tracking-uri", store, "--by", "test_mae_meV", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert [row["test_mae_meV"] for row in document["runs"]] == [35.0, 45.0, 60.0]
    assert "chosen on the test set" in document["ranked_by"]


def test_a_run_logged_before_the_reference_field_exports_the_setup_it_was_trained_with():
    from study.best import config_from_params

    params = {k: v for k, v in TrialConfig(target_reference="mean", lr_schedule="constant").flat_params().items()
              if k not in ("target_reference", "lr_schedule")}
    old = config_from_params(params)
    assert (old.target_reference, old.lr_schedule) == ("mean", "constant")
    new = config_from_params(TrialConfig().flat_params())
    assert new.target_reference == TrialConfig().target_reference
