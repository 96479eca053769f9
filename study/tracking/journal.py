"""What a sweep keeps on disk for MLflow, and its replay; Ray-free (`irrep-study sync` needs no Ray).

- The sweep's state file (`irrep_study_sweep.json` in its folder): the MLflow experiment and
  parent run, the search space, and whether it finished (`--resume` takes the latest unfinished).
- Each trial's journal (`tracking_journal/<trial id>.jsonl`): the tracking writes the server could
  not take, in order, replayed at the trial's next write, at the end of the sweep, or by
  `irrep-study sync`. Every operation is idempotent, so a replay never logs anything twice.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from study.config.space import SearchSpace
from study.errors import UserError
from study.names import COMPLETED, RUNNING, TEST_MAE, VAL_MAE
from study.paths import atomic_write
from study.tracking import store
from study.tracking.logged_model import MODEL_ARTIFACT, save_trial_model
from study.tracking.store import (
    PARENT_TAG,
    ROLE_TAG,
    STATUS_TAG,
    TRIAL_ARTIFACTS,
    TRIAL_ID_TAG,
)

SWEEP_FILE = "irrep_study_sweep.json"


# Why a run ends as `interrupted` (MLflow status KILLED), by who stopped it.
ORPHAN_REASON = "interrupted: the sweep's driver stopped before Ray Tune saved this trial, so the resumed sweep did not continue it"


@dataclass
class SweepRecord:
    """Where one sweep lives: its folder and its MLflow experiment and parent run."""

    path: Path
    experiment: str
    experiment_id: str
    parent_run_id: str
    optuna_storage: str | None = None  # the Optuna study's RDB URL (password redacted); None for a grid
    optuna_study: str | None = None  # its study name there

    @classmethod
    def from_state(cls, folder: Path, state: dict) -> SweepRecord:
        """The record of the sweep in `folder`, from its state file's contents."""
        return cls(
            Path(folder),
            state["experiment"],
            state["experiment_id"],
            state["parent_run_id"],
            state.get("optuna_storage"),
            state.get("optuna_study"),
        )


def write_state(record: SweepRecord, space: SearchSpace, tracking_uri: str, finished: bool) -> None:
    """The sweep's state file, written whole or not at all."""
    state = {
        "space": space.model_dump(mode="json"),
        "experiment": record.experiment,
        "experiment_id": record.experiment_id,
        "parent_run_id": record.parent_run_id,
        "tracking_uri": store.redact(tracking_uri),  # never a password in a file
        "optuna_storage": record.optuna_storage and store.redact(record.optuna_storage),
        "optuna_study": record.optuna_study,
        "finished": finished,
    }
    text = json.dumps(state, indent=2)
    atomic_write(record.path / SWEEP_FILE, lambda tmp: tmp.write_text(text))


def latest_unfinished(storage: Path, name: str) -> Path | None:
    """The newest sweep folder of study `name` in `storage` that has not finished (for `--resume`)."""
    candidates = []
    for marker in storage.glob(f"{name}-*/{SWEEP_FILE}"):
        try:
            state = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        # `quick-*` also matches the folders of a study named `quick-big`.
        if not state.get("finished") and state.get("space", {}).get("name") == name:
            candidates.append(marker.parent)
    return max(candidates, key=lambda p: p.name) if candidates else None


class TrialRun:
    """The MLflow child run of one trial, found again by trial id after a retry or `--resume`.

    Every write is an idempotent operation. When the tracking server cannot take one, it and all
    later ones of this trial go, in order, to a journal (`spool_dir/<trial id>.jsonl`, artifacts
    copied beside it) and are replayed at the next write, at the end of the sweep, or by
    `irrep-study sync`. Training waits for the server only for one write's retries per outage."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, trial_id: str, run_name: str, spool_dir: Path | None = None):
        self.uri = uri
        self.trial_id = trial_id
        self.spool = Spool(spool_dir / f"{trial_id}.jsonl") if spool_dir is not None else None
        self.replayer = Replayer(uri)
        self._apply(
            {"op": "open", "experiment_id": experiment_id, "parent_run_id": parent_run_id, "trial_id": trial_id, "run_name": run_name}
        )

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
            with store.quick_failure():
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
        self._apply({"op": "epoch", "trial_id": self.trial_id, "epoch": epoch, "metrics": metrics, "timestamp": int(time.time() * 1000)})

    def log_final(self, metrics: dict[str, float], out_dir: Path) -> None:
        files = [str(out_dir / name) for name in TRIAL_ARTIFACTS if (out_dir / name).exists()]
        model = self._build_model(out_dir)
        if self.spool is not None:
            # The trial's folder is deleted after the trial: keep copies the journal can point to.
            files = self.spool.keep_files(files)
            model = self.spool.keep_files([model])[0] if model else None
        self._apply(
            {
                "op": "final",
                "trial_id": self.trial_id,
                "metrics": metrics,
                "files": files,
                "model": model,
                "timestamp": int(time.time() * 1000),
            }
        )

    def _build_model(self, out_dir: Path) -> str | None:
        """The trial's MLflow Model folder (study/tracking/logged_model.py), or None. A failure to build it
        costs the trial its model, never its metrics and files: it is reported in one line."""
        try:
            folder = save_trial_model(out_dir)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            print(
                f"trial {self.trial_id}: its MLflow model was not built ({type(exc).__name__}: {first}); the trial is logged without it",
                file=sys.stderr,
            )
            return None
        return str(folder) if folder is not None else None

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
        return store.client(self.uri)

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
                store.log_params(mlflow_client, run_id, new)
        elif kind == "epoch":
            run_id, epoch = self._run_id(operation), operation["epoch"]
            if run_id not in self._logged_epochs:
                history = mlflow_client.get_metric_history(run_id, VAL_MAE)
                self._logged_epochs[run_id] = {metric.step for metric in history}
            if epoch in self._logged_epochs[run_id]:
                return  # an earlier attempt of this trial logged it already
            stamp = operation["timestamp"]
            metrics = [Metric(k, float(v), stamp, epoch) for k, v in operation["metrics"].items()]
            mlflow_client.log_batch(run_id, metrics=metrics)
            self._logged_epochs[run_id].add(epoch)
        elif kind == "final":
            run_id = self._run_id(operation)
            if TEST_MAE not in mlflow_client.get_run(run_id).data.metrics:
                stamp = operation["timestamp"]
                metrics = [Metric(k, float(v), stamp, 0) for k, v in operation["metrics"].items()]
                mlflow_client.log_batch(run_id, metrics=metrics)
            for path in operation["files"]:
                mlflow_client.log_artifact(run_id, path)  # same name: overwritten, not duplicated
            if operation.get("model"):  # absent from journals written before trials logged models
                # Every file of the folder under `model/`, each overwritten by a replay like the files above.
                mlflow_client.log_artifacts(run_id, operation["model"], artifact_path=MODEL_ARTIFACT)
        elif kind == "finish":
            store.finish_run(mlflow_client, self._run_id(operation), operation["status"], operation.get("reason"))
        else:
            raise ValueError(f"unknown journal operation {kind!r}")

    def _open(self, operation: dict) -> None:
        mlflow_client = self.client
        runs = self._trial_runs(operation)
        if not runs:
            tags = {PARENT_TAG: operation["parent_run_id"], ROLE_TAG: "trial", TRIAL_ID_TAG: operation["trial_id"], STATUS_TAG: RUNNING}
            mlflow_client.create_run(operation["experiment_id"], run_name=operation["run_name"], tags=tags)
            runs = self._trial_runs(operation)
        # A create_run whose response was lost (a timeout, a 502 from a proxy) and that MLflow then
        # retried leaves a second run of the same trial: the oldest one is the trial's run, every
        # attempt finds the same one, and the others, still empty, are deleted.
        run = runs[0]
        for duplicate in runs[1:]:
            mlflow_client.delete_run(duplicate.info.run_id)
        store.reopen(mlflow_client, run)
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
            if Path(name).is_dir():  # the trial's MLflow Model folder
                shutil.rmtree(target, ignore_errors=True)  # a retried trial's copy: replaced whole
                shutil.copytree(name, target)
            else:
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


def finish_from_driver(uri: str, spool_dir: str, trial_id: str, run_id: str | None, status: str, reason: str) -> None:
    """End a trial's run from the driver; behind the trial's own pending writes if it has any."""
    spool = Spool(Path(spool_dir) / f"{trial_id}.jsonl")
    operation = {"op": "finish", "trial_id": trial_id, "run_id": run_id, "status": status, "reason": reason}
    if spool.pending() or run_id is None:
        if spool.path.exists():  # else the trial never got as far as opening a run
            spool.append(operation)
            spool.replay(Replayer(uri))
        return
    try:
        Replayer(uri).apply(operation)
    except Exception:
        spool.append(operation)


def finish_tracking(uri: str, record: SweepRecord, log: Callable[[str], None], final: bool = False) -> int:
    """Replay the trials' journals; once all are in (and when `final`), end orphaned trial runs and
    the parent run.

    Returns how many trial journals are still pending (the server is unreachable)."""
    journal = record.path / "tracking_journal"
    complete, pending = sync_spools(uri, journal)
    if complete:
        log(f"wrote the tracking journals of {complete} trial(s) to MLflow")
    if pending:
        log(
            f"the tracking server took no writes for {pending} trial(s); their journals wait in "
            f"{journal}: run `irrep-study sync` once it is back"
        )
        return pending
    if final:
        try:
            orphans = store.end_running_trials(uri, record.experiment_id, record.parent_run_id, ORPHAN_REASON)
            if orphans:
                log(f"marked {orphans} trial run(s) that an interrupted driver left behind as interrupted")
            store.finish_run(store.client(uri), record.parent_run_id, COMPLETED)
        except Exception as exc:
            log(f"could not close the sweep's parent run ({type(exc).__name__}); `irrep-study sync` will")
            return 1
    return 0


def sync_sweeps(uri: str, storage: Path, experiment: str, log: Callable[[str], None]) -> dict:
    """`irrep-study sync`: write what the sweeps of `experiment` in `storage` could not log."""
    folders = []
    for marker in sorted(Path(storage).glob(f"*/{SWEEP_FILE}")):
        state = json.loads(marker.read_text())
        if state.get("experiment") == experiment:
            folders.append((marker.parent, state))
    if not folders:
        raise UserError(f"--experiment: no sweep of experiment {experiment!r} in {storage}")
    pending = 0
    for folder, state in folders:
        pending += finish_tracking(uri, SweepRecord.from_state(folder, state), log, final=state.get("finished", False))
    return {"sweeps": len(folders), "pending": pending}
