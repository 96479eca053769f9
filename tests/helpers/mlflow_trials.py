"""Test helper: real tiny trials logged to a real MLflow store the way a sweep logs them.

Independent of analysis/ (and of study/sweep/): it writes the tracking contract of
study/tracking/store.py by hand with the MLflow client, so analysis tests read exactly what they would
read after a sweep: a parent run tagged ``irrep_study.role=sweep``, one nested child per trial with
``irrep_study.role=trial`` and ``irrep_study.status``, the flattened config as params, per-epoch
``train_loss`` / ``val_mae_meV`` / ``norm_share_l{l}``, final metrics, and the trial's files as
artifacts at the run's root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from study.config.trial import TrialConfig, load_trial_config
from study.data.qm9 import CollatedSplit, QM9Dataset
from study.nn.model import build_model, model_dtype, to_device
from study.tracking import store
from study.training.trial import run_trial
from tests.helpers.services import empty_mlflow_store

# A few seconds per trial on 2 CPU cores; the composition reference (the default) makes them learn.
TINY = dict(hidden_dim=4, num_layers=1, subset=400, epochs=2, batch_size=32, lr=3e-3)
# Two architectures seen by every score, one trial without l=2 and one without l=1 (blocks absent
# from some trials), and one trained long enough that removing l=0 clearly hurts (knockout tests).
ANALYSIS_TRIALS = [
    dict(l_values=[0, 1, 2], seed=1),
    dict(l_values=[0, 1, 2], seed=2, hidden_dim=8, epochs=6),
    dict(l_values=[0, 1], seed=3),
    dict(l_values=[0, 2], seed=4, hidden_dim=6, epochs=3),
]
KNOCKOUT_TRIAL = 1  # index in ANALYSIS_TRIALS


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP
    threads spinning against other processes made these trials 20x slower (measured)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def console_script(work: Path, cache_dir: Path, threads: int | None = None) -> Callable[..., dict]:
    """Runs `irrep-study ARGS --json` as a subprocess in `work` (as a user would) and returns its
    JSON document; a non-zero exit fails the test with the end of stderr."""
    env = {**os.environ, "IRREP_STUDY_CACHE": str(cache_dir)}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)

    def run(*args: str) -> dict:
        if args[0] == "sweep" and "--tracking-uri" not in args:
            empty_mlflow_store(work / "mlflow.db")  # MLflow's tables made once per session, not per sweep
        result = subprocess.run(
            [sys.executable, "-m", "study.cli", *args, "--json"], cwd=work, env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout)

    return run


@dataclass
class LoggedStudy:
    tracking_uri: str
    experiment: str
    experiment_id: str
    parent_run_id: str
    trial_run_ids: list[str] = field(default_factory=list)  # completed trials, in logging order
    other_run_ids: dict[str, str] = field(default_factory=dict)  # status -> run id of a non-completed trial
    trial_dirs: dict[str, Path] = field(default_factory=dict)  # run id -> run_trial output folder
    configs: dict[str, TrialConfig] = field(default_factory=dict)  # run id -> config
    results: dict[str, object] = field(default_factory=dict)  # run id -> TrialResult


def tracking_store(root: Path) -> str:
    """The URI of an empty SQLite store in `root` (copied from the session's template: MLflow's
    own table creation takes about 7 s per store)."""
    root.mkdir(parents=True, exist_ok=True)
    empty_mlflow_store(root / "mlflow.db")
    return f"sqlite:///{root / 'mlflow.db'}"


def log_trial(client, experiment_id: str, parent_run_id: str, config: TrialConfig, out_dir: Path, result) -> str:
    """One completed trial run, as study/tracking/store.py's TrialRun logs it."""
    from mlflow.entities import Metric, Param

    tags = {"mlflow.parentRunId": parent_run_id, "irrep_study.role": "trial", "irrep_study.status": "running"}
    name = f"l={','.join(map(str, config.l_values))} h={config.hidden_dim} seed={config.seed}"
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    client.log_batch(run_id, params=[Param(k, v) for k, v in config.flat_params().items()])
    stamp = int(time.time() * 1000)
    for epoch in result.history:
        client.log_batch(run_id, metrics=[Metric(k, float(v), stamp, epoch.epoch) for k, v in epoch.tracked().items()])
    final = {
        "test_mae_meV": result.test_mae_meV,
        "best_val_mae_meV": result.best_val_mae_meV,
        "baseline_val_mae_meV": result.baseline_val_mae_meV,
        "baseline_test_mae_meV": result.baseline_test_mae_meV,
        "num_params": result.num_params,
        "train_seconds": result.train_seconds,
    }
    client.log_batch(run_id, metrics=[Metric(k, float(v), stamp, 0) for k, v in final.items()])
    # Like study/tracking/store.py, whatever of the trial's files exists is logged; tests remove one to
    # make a broken trial.
    for artifact in ("config.yaml", "best_model.pt", "test_embeddings.npz", "result.json"):
        if (out_dir / artifact).exists():
            client.log_artifact(run_id, str(out_dir / artifact))
    client.set_tag(run_id, "irrep_study.status", "completed")
    client.set_terminated(run_id, "FINISHED")
    return run_id


def log_unfinished_trial(client, experiment_id: str, parent_run_id: str, status: str, config: TrialConfig) -> str:
    """A trial that never reached its test evaluation (stopped early, diverged or failed): no artifacts."""
    from mlflow.entities import Metric, Param

    tags = {"mlflow.parentRunId": parent_run_id, "irrep_study.role": "trial", "irrep_study.status": status}
    run_id = client.create_run(experiment_id, run_name=f"{status} trial", tags=tags).info.run_id
    client.log_batch(run_id, params=[Param(k, v) for k, v in config.flat_params().items()])
    client.log_batch(run_id, metrics=[Metric("val_mae_meV", 9999.0, int(time.time() * 1000), 1)])
    client.set_terminated(run_id, "FINISHED" if status == "stopped_early" else "FAILED")
    return run_id


def make_logged_study(
    root: Path, tensors, trial_overrides: list[dict], experiment: str = "analysis-test", unfinished: tuple[str, ...] = ()
) -> LoggedStudy:
    """Train each trial of ``trial_overrides`` (on top of TINY) for real and log it as one sweep."""
    from mlflow.tracking import MlflowClient

    uri = tracking_store(root)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(experiment, artifact_location=(root / "artifacts").resolve().as_uri())
    parent = client.create_run(experiment_id, run_name="sweep", tags={"irrep_study.role": "sweep"}).info.run_id
    study = LoggedStudy(uri, experiment, experiment_id, parent)
    for index, overrides in enumerate(trial_overrides):
        config = TrialConfig(**{**TINY, **overrides})
        out_dir = root / f"trial-{index}"
        with one_torch_thread():
            result = run_trial(config, out_dir, tensors=tensors)
        assert result.status == "completed", result.reason
        run_id = log_trial(client, experiment_id, parent, config, out_dir, result)
        study.trial_run_ids.append(run_id)
        study.trial_dirs[run_id] = out_dir
        study.configs[run_id] = config
        study.results[run_id] = result
    for status in unfinished:
        study.other_run_ids[status] = log_unfinished_trial(client, experiment_id, parent, status, TrialConfig(**TINY))
    client.set_tag(parent, "irrep_study.status", "completed")
    client.set_terminated(parent, "FINISHED")
    return study


def predictions_of_best_model_pt(uri: str, run_id: str, tensors, molecules: list[int]) -> tuple[torch.Tensor, object]:
    """What the run's best_model.pt predicts, loaded the project's usual way (analysis/scoring/knockout.py:
    the model of the run's config, then the weights), and the batch it predicted."""
    client = store.client(uri)
    config = load_trial_config(Path(client.download_artifacts(run_id, "config.yaml")))
    model = build_model(config)
    model.load_state_dict(torch.load(client.download_artifacts(run_id, "best_model.pt"), map_location="cpu", weights_only=True))
    dataset = QM9Dataset(tensors, molecules, edges=config.edges, cutoff=config.cutoff)
    batch = to_device(CollatedSplit(dataset).batch(list(range(len(molecules)))), torch.device("cpu"), model_dtype(config))
    model.eval()
    with torch.no_grad():
        return model(batch), batch
