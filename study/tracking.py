"""MLflow tracking: one experiment per study, a parent run per sweep, a nested child run per trial.

Everything goes through an explicit `MlflowClient` (no fluent global state), so a trial logs from
its own process, on any node, straight to the tracking server.

Names other parts rely on (see DESIGN.md):
- tags: `irrep_study.role` = sweep | trial | analysis; on trials `irrep_study.status` =
  running | completed | stopped_early | diverged | failed | interrupted,
  `irrep_study.reason`, and
  `irrep_study.trial_id` (Ray Tune's trial id, which survives retries and `--resume`);
- params: `TrialConfig.flat_params()` (`l_values` as "0,3,4,5,6");
- metrics: `train_loss`, `val_mae_meV`, `norm_share_l{l}` per epoch (step = epoch), then
  `test_mae_meV`, `best_val_mae_meV`, `num_params`, `train_seconds`;
- artifacts at the run's root: `config.yaml`, `best_model.pt`, `test_embeddings.npz`
  (study/embeddings.py), `result.json`.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from study.errors import UserError

ROLE_TAG = "irrep_study.role"
STATUS_TAG = "irrep_study.status"
REASON_TAG = "irrep_study.reason"
TRIAL_ID_TAG = "irrep_study.trial_id"
PARENT_TAG = "mlflow.parentRunId"
TRIAL_ARTIFACTS = ("config.yaml", "best_model.pt", "test_embeddings.npz", "result.json")
FINAL_METRICS = ("test_mae_meV", "best_val_mae_meV", "num_params", "train_seconds")
# MLflow's REST client retries for minutes by default; a preflight check should answer quickly.
PREFLIGHT_TIMEOUT_S = 10


class TrackingError(UserError):
    """The tracking server cannot be reached or does not hold what was asked for."""


def resolve_tracking_uri(uri: str | None) -> str:
    """`--tracking-uri`, else $MLFLOW_TRACKING_URI, else a SQLite store in the working directory."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def default_artifact_location(uri: str) -> str | None:
    """For a local SQLite store, artifacts go to ./mlartifacts beside it; a server decides itself."""
    if uri.startswith("sqlite:///"):
        store = Path(uri.removeprefix("sqlite:///"))
        return (store.parent / "mlartifacts").resolve().as_uri()
    return None


@contextmanager
def _quick_failure() -> Iterator[None]:
    # MLflow reads these environment variables on every request.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(PREFLIGHT_TIMEOUT_S)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def check_reachable(uri: str) -> None:
    """Fail fast, with one line, when the tracking store cannot be used."""
    with _quick_failure():
        try:
            client(uri).search_experiments(max_results=1)
        except Exception as exc:
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise TrackingError(f"--tracking-uri {uri}: tracking server unreachable ({reason})") from None


def ensure_experiment(uri: str, name: str) -> str:
    """The id of experiment `name`, created if missing."""
    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(f"experiment {name!r} is deleted in {uri}; restore it or choose another name")
        return experiment.experiment_id
    return mlflow_client.create_experiment(name, artifact_location=default_artifact_location(uri))


def find_experiment(uri: str, name: str) -> str:
    """The id of an existing experiment; TrackingError naming it when there is none."""
    with _quick_failure():
        try:
            experiment = client(uri).get_experiment_by_name(name)
        except Exception as exc:
            raise TrackingError(f"--tracking-uri {uri}: tracking server unreachable ({type(exc).__name__})") from None
    if experiment is None or experiment.lifecycle_stage == "deleted":
        raise TrackingError(f"--experiment: no experiment named {name!r} in {uri}")
    return experiment.experiment_id


def start_sweep_run(uri: str, experiment_id: str, name: str, space_params: dict[str, str]) -> str:
    run = client(uri).create_run(experiment_id, run_name=name, tags={ROLE_TAG: "sweep"})
    if space_params:
        log_params(uri, run.info.run_id, space_params)
    return run.info.run_id


def log_params(uri: str, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    # MLflow caps a batch at 100 params and each value at 6000 characters.
    items = [Param(key, str(value)[:6000]) for key, value in params.items()]
    for start in range(0, len(items), 100):
        client(uri).log_batch(run_id, params=items[start : start + 100])


def finish_run(uri: str, run_id: str, status: str, reason: str | None = None) -> None:
    """Record the study's status tag and end the MLflow run with the matching lifecycle state."""
    mlflow_client = client(uri)
    mlflow_client.set_tag(run_id, STATUS_TAG, status)
    if reason:
        mlflow_client.set_tag(run_id, REASON_TAG, reason[:5000])
    lifecycle = {"completed": "FINISHED", "stopped_early": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED")
    mlflow_client.set_terminated(run_id, lifecycle)


class TrialRun:
    """The MLflow child run of one trial, found again by trial id after a retry or `--resume`."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, trial_id: str, run_name: str):
        self.uri = uri
        self.client = client(uri)
        existing = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TRIAL_ID_TAG}` = '{trial_id}'",
            max_results=1,
        )
        if existing:
            self.run_id = existing[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.set_tag(self.run_id, STATUS_TAG, "running")
        else:
            tags = {PARENT_TAG: parent_run_id, ROLE_TAG: "trial", TRIAL_ID_TAG: trial_id, STATUS_TAG: "running"}
            self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        # Epochs already logged by an earlier attempt of this trial are not logged twice.
        history = self.client.get_metric_history(self.run_id, "val_mae_meV")
        self.logged_epochs = {metric.step for metric in history}

    def log_params(self, params: dict[str, str]) -> None:
        # Params are immutable in MLflow: log them once, on the first attempt.
        if not self.client.get_run(self.run_id).data.params:
            log_params(self.uri, self.run_id, params)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        if epoch in self.logged_epochs:
            return
        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), stamp, epoch) for k, v in metrics.items()])
        self.logged_epochs.add(epoch)

    def log_final(self, metrics: dict[str, float], out_dir: Path) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), stamp, 0) for k, v in metrics.items()])
        for name in TRIAL_ARTIFACTS:
            if (out_dir / name).exists():
                self.client.log_artifact(self.run_id, str(out_dir / name))

    def finish(self, status: str, reason: str | None = None) -> None:
        finish_run(self.uri, self.run_id, status, reason)


def child_runs(uri: str, experiment_id: str, parent_run_id: str | None = None, filter_string: str = "") -> list:
    """Trial runs of an experiment (or of one sweep), every page."""
    clauses = [f"tags.`{ROLE_TAG}` = 'trial'"]
    if parent_run_id:
        clauses.append(f"tags.`{PARENT_TAG}` = '{parent_run_id}'")
    if filter_string:
        clauses.append(filter_string)
    mlflow_client = client(uri)
    runs, token = [], None
    while True:
        page = mlflow_client.search_runs([experiment_id], filter_string=" and ".join(clauses), max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def end_orphaned_runs(uri: str, experiment_id: str, parent_run_id: str, reason: str) -> int:
    """Trial runs of a finished sweep still marked RUNNING: trials whose driver died before Ray saved
    them, so the resumed sweep never ran them again. They end as `interrupted`, with the reason."""
    orphans = [r for r in child_runs(uri, experiment_id, parent_run_id) if r.info.status == "RUNNING"]
    for run in orphans:
        finish_run(uri, run.info.run_id, "interrupted", reason)
    return len(orphans)
