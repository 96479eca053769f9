"""`irrep-study analyze --address`: the trials are scored as Ray tasks on a real two-node cluster
(`ray start`), and get exactly the scores of trials scored one after another in this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from analysis.pipeline import AnalysisSettings, run_analysis
from analysis.scoring.scores import ScoreSettings
from tests.helpers.mlflow_trials import make_logged_study, one_torch_thread
from tests.helpers.services import RayCluster

pytestmark = pytest.mark.slow  # a Ray cluster, and Ray workers that import the analysis

TRIALS = [dict(l_values=[0, 1], seed=1), dict(l_values=[0, 1], seed=2), dict(l_values=[0], seed=1)]
MAX_MOLECULES = 30
BOOTSTRAP = 200


def test_trials_scored_as_ray_tasks_on_a_cluster_get_the_serial_scores_exactly(qm9, qm9_cache_dir, tmp_path):
    study = make_logged_study(tmp_path / "mlflow", qm9, TRIALS, experiment="on-ray")
    with one_torch_thread():
        serial = run_analysis(
            study.experiment,
            tmp_path / "serial",
            tracking_uri=study.tracking_uri,
            settings=AnalysisSettings(
                scores=ScoreSettings(max_molecules=MAX_MOLECULES),
                n_boot=BOOTSTRAP,
                n_perm=BOOTSTRAP,
                umap_figures=0,
                log_to_mlflow=False,
                reuse_scores=False,
            ),
            qm9_cache_dir=qm9_cache_dir,
            descriptor_cache_dir=tmp_path / "descriptors",
        )

    cluster = RayCluster(workers=1, cpus=1)  # two nodes of one CPU: the three trials' tasks spread over both
    try:
        env = {**os.environ, **cluster.client_env, "IRREP_STUDY_CACHE": str(qm9_cache_dir)}
        command = [sys.executable, "-m", "study.cli", "analyze", "--experiment", study.experiment]
        command += ["--tracking-uri", study.tracking_uri, "--address", cluster.address, "--out", str(tmp_path / "on-ray")]
        command += ["--max-molecules", str(MAX_MOLECULES), "--bootstrap", str(BOOTSTRAP), "--no-reuse-scores", "--no-log-mlflow"]
        command += ["--cache-dir", str(qm9_cache_dir), "--json"]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    finally:
        cluster.stop()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "scores of 3 trials: 3 to compute (as tasks on the Ray cluster)" in result.stderr
    assert json.loads(result.stdout)["trials_analysed"] == 3

    on_ray = pd.read_csv(tmp_path / "on-ray" / "scores.csv")
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "serial" / "scores.csv"), on_ray, check_exact=True)
    trials = pd.read_csv(tmp_path / "on-ray" / "trials.csv")
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "serial" / "trials.csv"), trials, check_exact=True)
    # Knockouts ran on the cluster's workers: they need the weights, which travelled with each task.
    assert np.isfinite(trials["knockout_model_mae_meV"]).all()
    assert set(on_ray["score"]) >= {"knockout_all_share", "knockout_last_share"}
    assert len(serial.trials) == 3
