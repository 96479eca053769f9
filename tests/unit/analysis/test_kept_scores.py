"""A trial's scores are computed once, kept with its MLflow run, read back by the next analysis with
the same settings, and computed again (with a message) when a setting changes; trials scored in
worker processes get exactly the scores of trials scored one after another."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from analysis.pipeline import AnalysisSettings, run_analysis
from analysis.scoring import kept
from analysis.scoring.scores import ScoreSettings
from study.config.trial import TrialConfig
from study.training.trial import run_trial
from tests.helpers.mlflow_trials import TINY, log_trial, make_logged_study, one_torch_thread

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_test")

TRIALS = [dict(l_values=[0, 1], seed=1), dict(l_values=[0, 1], seed=2), dict(l_values=[0], seed=1)]


@pytest.fixture
def study(qm9, tmp_path):
    return make_logged_study(tmp_path / "mlflow", qm9, TRIALS, experiment="kept")


def _analyse(study, out, qm9_cache_dir, **settings):
    lines: list[str] = []
    scores = settings.pop("scores", ScoreSettings())
    outcome = run_analysis(
        study.experiment,
        out,
        tracking_uri=study.tracking_uri,
        # No UMAP figures: drawing them was about a quarter of each analysis here (cProfile: 23.5 of
        # 85.8 s in one test), and what is kept (the projections' coordinates among the scores)
        # does not depend on them.
        settings=AnalysisSettings(scores=scores, n_boot=200, n_perm=200, umap_figures=0, log_to_mlflow=False, **settings),
        qm9_cache_dir=qm9_cache_dir,
        descriptor_cache_dir=out.parent / "descriptors",
        log=lines.append,
    )
    return outcome, [line for line in lines if line.startswith("scores of") or "recomputed" in line]


def _kept_files(study, run_id) -> list[str]:
    client = MlflowClient(tracking_uri=study.tracking_uri)
    return [info.path for info in client.list_artifacts(run_id, kept.ARTIFACT_FOLDER)]


def test_scores_are_kept_then_read_back_and_a_grown_study_scores_only_its_new_trial(study, qm9, qm9_cache_dir, tmp_path):
    first, said = _analyse(study, tmp_path / "first", qm9_cache_dir)
    assert said == ["scores of 3 trials: 0 read back from their MLflow runs, 3 to compute (1 at a time)"]
    name = kept.key_name(kept.score_key(ScoreSettings(), knockout=True))
    for run_id in study.trial_run_ids:
        assert _kept_files(study, run_id) == [f"{kept.ARTIFACT_FOLDER}/{name}"]

    second, said = _analyse(study, tmp_path / "second", qm9_cache_dir)
    assert said == ["scores of 3 trials: 3 read back from their MLflow runs, 0 to compute"]
    pd.testing.assert_frame_equal(first.scores, second.scores, check_exact=True)
    pd.testing.assert_frame_equal(first.trials, second.trials, check_exact=True)

    # The study grows by one trial: only that one is scored.
    client = MlflowClient(tracking_uri=study.tracking_uri)
    config = TrialConfig(**{**TINY, "l_values": [0], "seed": 2})
    with one_torch_thread():
        result = run_trial(config, tmp_path / "new-trial", tensors=qm9)
    new_run = log_trial(client, study.experiment_id, study.parent_run_id, config, tmp_path / "new-trial", result)
    grown, said = _analyse(study, tmp_path / "grown", qm9_cache_dir)
    assert said == ["scores of 4 trials: 3 read back from their MLflow runs, 1 to compute (1 at a time)"]
    assert len(_kept_files(study, new_run)) == 1
    old_rows = grown.scores[grown.scores["run_id"] != new_run].reset_index(drop=True)
    pd.testing.assert_frame_equal(old_rows[first.scores.columns[:7]], first.scores[first.scores.columns[:7]], check_exact=True)


def test_a_changed_setting_or_version_recomputes_and_says_what_changed(study, qm9_cache_dir, tmp_path, monkeypatch):
    _analyse(study, tmp_path / "default", qm9_cache_dir)
    changed, said = _analyse(study, tmp_path / "changed", qm9_cache_dir, scores=ScoreSettings(knn_k=5))
    assert said[0].endswith(", 3 to compute (1 at a time)")
    assert said[1] == "3 of them kept scores of other settings, recomputed (knn_k 10 -> 5)"
    monkeypatch.setattr(kept, "SCORES_VERSION", kept.SCORES_VERSION + 1)
    _, said = _analyse(study, tmp_path / "version", qm9_cache_dir, scores=ScoreSettings(knn_k=5))
    assert said[1].endswith(f"recomputed (version {kept.SCORES_VERSION - 1} -> {kept.SCORES_VERSION})")


def test_trials_scored_in_worker_processes_get_the_serial_scores_exactly(study, qm9_cache_dir, tmp_path):
    serial, said = _analyse(study, tmp_path / "serial", qm9_cache_dir, reuse_scores=False)
    assert said == ["scores of 3 trials: 3 to compute (1 at a time)"]
    parallel, said = _analyse(study, tmp_path / "parallel", qm9_cache_dir, reuse_scores=False, workers=2)
    assert said == ["scores of 3 trials: 3 to compute (2 at a time)"]
    pd.testing.assert_frame_equal(serial.scores, parallel.scores, check_exact=True)
    pd.testing.assert_frame_equal(serial.trials, parallel.trials, check_exact=True)
    # Knockouts ran (the scores include them) in both.
    assert np.isfinite(parallel.trials["knockout_model_mae_meV"]).all()


def test_kept_scores_round_trip_exactly():
    scores = kept.TrialScores(
        values={"l0": {"norm_share": 0.1 + 0.2, "probe_r2_nsps": float("nan")}},
        sample=np.array([0, 3, 7]),
        umap={"l0": np.random.default_rng(0).normal(size=(3, 2))},
        knockout_maes=(12.345678901234567, float("nan")),
    )
    key = kept.score_key(ScoreSettings(), knockout=True)
    read_key, back = kept.from_file(io.BytesIO(kept.to_bytes(scores, key)))
    assert read_key == key
    assert back.values["l0"]["norm_share"] == 0.1 + 0.2 and np.isnan(back.values["l0"]["probe_r2_nsps"])
    assert np.array_equal(back.sample, scores.sample) and np.array_equal(back.umap["l0"], scores.umap["l0"])
    assert back.knockout_maes[0] == scores.knockout_maes[0] and np.isnan(back.knockout_maes[1])
