"""`sweep`, `best` and `analyze` print the link to the experiment's training-runs page when the
tracking URI is an MLflow server: MLflow 3's UI opens an experiment in its GenAI view for a new
browser, where a sweep looks empty. A local store (sqlite, file) has no UI page to link."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from study.cli import app
from study.tracking import store

SERVER = "http://mlflow.example:5000"
RUNS_PAGE = f"MLflow runs: {SERVER}/#/experiments/42/runs"


@pytest.mark.parametrize(
    "uri, page",
    [
        ("http://mlflow.example:5000", "http://mlflow.example:5000/#/experiments/42/runs"),
        ("https://mlflow.example/", "https://mlflow.example/#/experiments/42/runs"),
        ("https://proxy.example/mlflow", "https://proxy.example/mlflow/#/experiments/42/runs"),  # served under a path
        ("http://user:secret@mlflow.example:5000", "http://mlflow.example:5000/#/experiments/42/runs"),  # never the password
        ("sqlite:////tmp/mlflow.db", None),
        ("file:///tmp/mlruns", None),
        ("/tmp/mlruns", None),
    ],
)
def test_the_runs_page_is_linked_for_a_tracking_server_only(uri, page):
    assert store.runs_page_url(uri, "42") == page


def _invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.fixture
def ranked(monkeypatch):
    """`best` on an empty ranking, the experiment found with id 42 (no store needed)."""
    import study.best

    ranking = {"configurations": [], "left_out": {"note": ""}, "runs": 0, "total_configurations": 0}
    monkeypatch.setattr(study.best, "rank_configurations", lambda *args, **kwargs: ranking)
    monkeypatch.setattr(store, "find_experiment", lambda uri, name: "42")


def test_best_prints_the_runs_page_of_a_server(ranked):
    assert RUNS_PAGE in _invoke("best", "--experiment", "e", "--tracking-uri", SERVER).stdout
    result = _invoke("best", "--experiment", "e", "--tracking-uri", SERVER, "--json")
    json.loads(result.stdout)  # stdout stays the JSON document: the link goes to stderr
    assert RUNS_PAGE in result.stderr
    assert "MLflow runs:" not in _invoke("best", "--experiment", "e", "--tracking-uri", "sqlite:////tmp/x.db").output


def test_analyze_prints_the_runs_page_of_a_server(monkeypatch, tmp_path):
    import analysis.pipeline

    def analysed(experiment, out, tracking_uri=None, **kwargs):
        study = SimpleNamespace(tracking_uri=tracking_uri, experiment_id="42")
        document = {
            "trials_analysed": 4,
            "notes": [],
            "ablation": [],
            "top_correlations": [],
            "files": {"report": str(Path(out) / "report.html")},
        }
        return SimpleNamespace(study=study, analysis_run_id="run", to_dict=lambda: document)

    monkeypatch.setattr(analysis.pipeline, "run_analysis", analysed)
    args = ["analyze", "--experiment", "e", "--out", str(tmp_path / "a"), "--cache-dir", str(tmp_path / "cache")]
    assert _invoke(*args, "--tracking-uri", SERVER).stdout.rstrip().endswith(RUNS_PAGE)
    result = _invoke(*args, "--tracking-uri", SERVER, "--json")
    assert json.loads(result.stdout)["trials_analysed"] == 4 and RUNS_PAGE in result.stderr
    assert "MLflow runs:" not in _invoke(*args, "--tracking-uri", "sqlite:////tmp/x.db").output


def test_sweep_prints_the_runs_page_of_a_server(monkeypatch, tmp_path):
    import study.sweep.driver
    import study.sweep.preflight

    outcome = SimpleNamespace(
        interrupted=False,
        path=tmp_path / "sweep-1",
        experiment="e",
        experiment_id="42",
        optuna_storage=None,
        to_dict=lambda: {"trials": [], "best": None},
    )

    def checked(space_path, storage, cache_dir, tracking_uri=None, **kwargs):
        return study.sweep.preflight.CheckedSweep(SimpleNamespace(name="e"), None, tracking_uri)

    monkeypatch.setattr(study.sweep.preflight, "check_sweep", checked)
    monkeypatch.setattr(study.sweep.driver, "run_sweep", lambda *args, **kwargs: outcome)
    args = ["sweep", "space.yaml", "--address", "auto", "--storage", str(tmp_path / "ray"), "--cache-dir", str(tmp_path / "cache")]
    assert _invoke(*args, "--tracking-uri", SERVER).stdout.rstrip().endswith(RUNS_PAGE)
    result = _invoke(*args, "--tracking-uri", SERVER, "--json")
    assert json.loads(result.stdout)["trials"] == [] and RUNS_PAGE in result.stderr
    assert "MLflow runs:" not in _invoke(*args, "--tracking-uri", "sqlite:////tmp/x.db").output
