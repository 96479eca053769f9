"""MLflow tracking: one experiment per study, a parent run per sweep, a nested child run per trial.

Everything goes through an explicit `MlflowClient` (no fluent global state), so a trial logs from
its own process, on any node, straight to the tracking server.

Names other parts rely on (see DESIGN.md):
- tags: `irrep_study.role` = sweep | trial | analysis; on trials `irrep_study.status` =
  running | completed | stopped_early | diverged | failed | interrupted,
  `irrep_study.reason`, and
  `irrep_study.trial_id` (Ray Tune's trial id, which survives retries and `--resume`);
- params: `TrialConfig.flat_params()` (`l_values` as "0,3,4,5,6"), then at the end the fitted target
  reference (`TargetReference.flat_params()`: `reference_kind`, `reference_intercept`,
  `reference_scale`, `reference_coef_H`, ...);
- metrics: `train_loss`, `val_mae_meV`, `norm_share_l{l}` per epoch (step = epoch), then
  `test_mae_meV`, `best_val_mae_meV`, `baseline_val_mae_meV`, `baseline_test_mae_meV` (the
  composition fit on the same split), `num_params`, `train_seconds`;
- artifacts at the run's root: `config.yaml`, `best_model.pt`, `test_embeddings.npz`
  (study/embeddings.py), `result.json`.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
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
FINAL_METRICS = ("test_mae_meV", "best_val_mae_meV", "baseline_val_mae_meV", "baseline_test_mae_meV", "num_params", "train_seconds")
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


# In sweep processes a write that fails is retried this often, with exponential backoff (MLflow's
# own retry: waits of 0, 2 and 4 s plus up to 1 s of jitter), before it goes to the trial's journal.
SWEEP_RETRIES = 3
SWEEP_BACKOFF_FACTOR_S = 1
SWEEP_TIMEOUT_S = 10


@contextmanager
def _http_policy(retries: int, timeout_s: int) -> Iterator[None]:
    # MLflow reads these environment variables on every request.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(retries)
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(timeout_s)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _quick_failure():
    """One attempt: a preflight check (or a journal replay) should answer quickly."""
    return _http_policy(retries=0, timeout_s=PREFLIGHT_TIMEOUT_S)


def fail_fast() -> None:
    """In sweep processes an unreachable or failing tracking server must cost seconds, not MLflow's
    default minutes of retries: a write is retried a few times with backoff (a server that answers
    5xx for a moment, a slow one), then goes to the trial's journal and is replayed later."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(SWEEP_RETRIES)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = str(SWEEP_BACKOFF_FACTOR_S)
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(SWEEP_TIMEOUT_S)


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
    from mlflow.exceptions import MlflowException

    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return mlflow_client.create_experiment(name, artifact_location=default_artifact_location(uri))
        except MlflowException:
            # Another driver of the same study created it in between (two sweeps started at once).
            experiment = mlflow_client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(f"experiment {name!r} is deleted in {uri}; restore it or choose another name")
    return experiment.experiment_id


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


def reopen_run(uri: str, run_id: str) -> None:
    """A run that `finish_run` ended (a sweep or trial stopped by Ctrl-C) running again, for `--resume`."""
    mlflow_client = client(uri)
    _reopen(mlflow_client, mlflow_client.get_run(run_id))


def _reopen(mlflow_client, run) -> None:
    """Status RUNNING and tag running; writes only what differs (a new run needs nothing)."""
    if run.info.status != "RUNNING":
        mlflow_client.update_run(run.info.run_id, status="RUNNING")
    if run.data.tags.get(STATUS_TAG) != "running":
        mlflow_client.set_tag(run.info.run_id, STATUS_TAG, "running")
    if REASON_TAG in run.data.tags:  # why it ended before no longer holds
        mlflow_client.delete_tag(run.info.run_id, REASON_TAG)


class TrialRun:
    """The MLflow child run of one trial, found again by trial id after a retry or `--resume`.

    Every write is an idempotent operation. When the tracking server cannot take one, it and all
    later ones of this trial go, in order, to a journal (`spool_dir/<trial id>.jsonl`, artifacts
    copied beside it) and are replayed at the next write, at the end of the sweep, or by
    `irrep-study sync`. Training never waits for the server."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, trial_id: str, run_name: str,
                 spool_dir: Path | None = None):
        self.uri = uri
        self.trial_id = trial_id
        self.spool = Spool(spool_dir / f"{trial_id}.jsonl") if spool_dir is not None else None
        self.replayer = Replayer(uri)
        self._apply({"op": "open", "experiment_id": experiment_id, "parent_run_id": parent_run_id,
                     "trial_id": trial_id, "run_name": run_name})

    @property
    def run_id(self) -> str | None:
        return self.replayer.run_ids.get(self.trial_id)

    def _apply(self, operation: dict) -> None:
        if self.run_id is not None:
            operation["run_id"] = self.run_id  # so a journal that starts after `open` can be replayed alone
        if self.spool is not None and self.spool.pending():
            self.spool.append(operation)
            # The server failed this trial's last write after its retries: one attempt per write
            # until it takes one again, so that an outage costs training the backoff only once.
            with _quick_failure():
                self.spool.replay(self.replayer)
            return
        try:
            self.replayer.apply(operation)
        except Exception:
            if self.spool is None:
                raise
            self.spool.append(operation)

    def log_params(self, params: dict[str, str]) -> None:
        self._apply({"op": "params", "trial_id": self.trial_id, "params": params})

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self._apply({"op": "epoch", "trial_id": self.trial_id, "epoch": epoch, "metrics": metrics,
                     "timestamp": int(time.time() * 1000)})

    def log_final(self, metrics: dict[str, float], out_dir: Path) -> None:
        files = [str(out_dir / name) for name in TRIAL_ARTIFACTS if (out_dir / name).exists()]
        if self.spool is not None:
            # The trial's folder is deleted after the trial: keep copies the journal can point to.
            files = self.spool.keep_files(files)
        self._apply({"op": "final", "trial_id": self.trial_id, "metrics": metrics, "files": files,
                     "timestamp": int(time.time() * 1000)})

    def finish(self, status: str, reason: str | None = None) -> None:
        self._apply({"op": "finish", "trial_id": self.trial_id, "status": status, "reason": reason})


class Replayer:
    """Applies journal operations to MLflow; each one is idempotent, so replaying twice is harmless."""

    def __init__(self, uri: str):
        self.uri = uri
        self.run_ids: dict[str, str] = {}  # trial id -> MLflow run id
        self._logged_epochs: dict[str, set[int]] = {}

    @functools.cached_property
    def client(self):
        """One MLflow client for all operations of this replayer (a trial writes one per epoch),
        built lazily at the first one."""
        return client(self.uri)

    def _run_id(self, operation: dict) -> str:
        return operation.get("run_id") or self.run_ids[operation["trial_id"]]

    def apply(self, operation: dict) -> None:
        from mlflow.entities import Metric

        mlflow_client = self.client
        kind = operation["op"]
        if kind == "open":
            self._open(operation)
        elif kind == "params":
            run_id = self._run_id(operation)
            # Params are immutable in MLflow: log each key once (a retried attempt's keys are there
            # already; the fitted reference, logged at the end, adds new ones).
            existing = mlflow_client.get_run(run_id).data.params
            new = {key: value for key, value in operation["params"].items() if key not in existing}
            if new:
                log_params(self.uri, run_id, new)
        elif kind == "epoch":
            run_id, epoch = self._run_id(operation), operation["epoch"]
            if run_id not in self._logged_epochs:
                history = mlflow_client.get_metric_history(run_id, "val_mae_meV")
                self._logged_epochs[run_id] = {metric.step for metric in history}
            if epoch in self._logged_epochs[run_id]:
                return  # an earlier attempt of this trial logged it already
            stamp = operation["timestamp"]
            metrics = [Metric(k, float(v), stamp, epoch) for k, v in operation["metrics"].items()]
            mlflow_client.log_batch(run_id, metrics=metrics)
            self._logged_epochs[run_id].add(epoch)
        elif kind == "final":
            run_id = self._run_id(operation)
            if "test_mae_meV" not in mlflow_client.get_run(run_id).data.metrics:
                stamp = operation["timestamp"]
                metrics = [Metric(k, float(v), stamp, 0) for k, v in operation["metrics"].items()]
                mlflow_client.log_batch(run_id, metrics=metrics)
            for path in operation["files"]:
                mlflow_client.log_artifact(run_id, path)  # same name: overwritten, not duplicated
        elif kind == "finish":
            finish_run(self.uri, self._run_id(operation), operation["status"], operation.get("reason"))
        else:
            raise ValueError(f"unknown journal operation {kind!r}")

    def _open(self, operation: dict) -> None:
        mlflow_client = self.client
        runs = self._trial_runs(operation)
        if not runs:
            tags = {PARENT_TAG: operation["parent_run_id"], ROLE_TAG: "trial", TRIAL_ID_TAG: operation["trial_id"],
                    STATUS_TAG: "running"}
            mlflow_client.create_run(operation["experiment_id"], run_name=operation["run_name"], tags=tags)
            runs = self._trial_runs(operation)
        # A create_run whose response was lost (a timeout, a 502 from a proxy) and that MLflow then
        # retried leaves a second run of the same trial: the oldest one is the trial's run, every
        # attempt finds the same one, and the others, still empty, are deleted.
        run = runs[0]
        for duplicate in runs[1:]:
            mlflow_client.delete_run(duplicate.info.run_id)
        _reopen(mlflow_client, run)
        self.run_ids[operation["trial_id"]] = run.info.run_id

    def _trial_runs(self, operation: dict) -> list:
        """The runs of this trial of this sweep, oldest first."""
        filter_string = f"tags.`{PARENT_TAG}` = '{operation['parent_run_id']}' and tags.`{TRIAL_ID_TAG}` = '{operation['trial_id']}'"
        runs = self.client.search_runs([operation["experiment_id"]], filter_string=filter_string)
        return sorted(runs, key=lambda run: (run.info.start_time, run.info.run_id))


class Spool:
    """An append-only journal of tracking operations not yet accepted by the server."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.done_path = self.path.with_suffix(".done")

    def _lines(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def _done(self) -> int:
        try:
            return int(self.done_path.read_text())
        except (OSError, ValueError):
            return 0

    def pending(self) -> bool:
        return len(self._lines()) > self._done()

    def append(self, operation: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(operation) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def keep_files(self, files: list[str]) -> list[str]:
        folder = self.path.with_suffix("")
        folder.mkdir(parents=True, exist_ok=True)
        kept = []
        for name in files:
            target = folder / Path(name).name
            shutil.copy(name, target)
            kept.append(str(target))
        return kept

    def replay(self, replayer: Replayer) -> bool:
        """Apply what is pending, in order; stop at the first failure. True when nothing is left.

        The `open` operation is always re-applied first: the replayer needs the run id."""
        lines, done = self._lines(), self._done()
        for index, operation in enumerate(lines):
            if index < done and operation["op"] != "open":
                continue
            try:
                replayer.apply(operation)
            except Exception:
                return False
            if index >= done:
                self.done_path.write_text(str(index + 1))
        return True


def sync_spools(uri: str, spool_dir: Path) -> tuple[int, int]:
    """Replay every trial journal under `spool_dir`; (journals now complete, journals still pending)."""
    complete = pending = 0
    for path in sorted(Path(spool_dir).glob("*.jsonl")):
        spool = Spool(path)
        if not spool.pending():
            continue
        if spool.replay(Replayer(uri)):
            complete += 1
        else:
            pending += 1
    return complete, pending


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


def end_running_trials(uri: str, experiment_id: str, parent_run_id: str, reason: str) -> int:
    """End the trial runs of one sweep still marked RUNNING as `interrupted`, with the reason: after
    a Ctrl-C on the driver, or once a resumed sweep has finished without the trials that its killed
    driver had started but Ray had not saved. Returns how many were ended."""
    running = [r for r in child_runs(uri, experiment_id, parent_run_id) if r.info.status == "RUNNING"]
    for run in running:
        finish_run(uri, run.info.run_id, "interrupted", reason)
    return len(running)
