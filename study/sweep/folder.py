"""A sweep's folder (`--storage`/<name>-<time>/) through its life: claimed for a new sweep with its
MLflow parent run, found again and reopened by `--resume`, and the Optuna storage a resume must
share; Optuna trials a stopped driver proposed but Ray never saved are marked failed."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from study.config.space import SearchSpace
from study.errors import UserError
from study.sweep.search import OPTUNA_FILE
from study.tracking import store
from study.tracking.journal import (
    SWEEP_FILE,
    SweepRecord,
    latest_unfinished,
    write_state,
)


def check_optuna_storage(space: SearchSpace, resume: bool, url: str | None) -> None:
    """Refuse an `--optuna-storage` that cannot serve, before any run is created."""
    import optuna

    if url is None:
        return
    if resume:
        raise UserError("--optuna-storage: a resumed sweep keeps the Optuna storage it started with; leave it out")
    if space.search.method != "optuna":
        raise UserError(f"--optuna-storage: {space.name!r} is a grid search, which has no Optuna study")
    try:
        optuna.storages.RDBStorage(url)
    except Exception as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UserError(f"--optuna-storage {store.redact(url)}: Optuna cannot open it ({reason})") from None


ORPHANED_OPTUNA_REASON = "proposed by a driver that stopped before Ray Tune saved the trial; the resumed sweep did not run it"


def fail_orphaned_optuna_trials(record: SweepRecord, log: Callable[[str], None]) -> None:
    """At the end of a sweep, Optuna trials still RUNNING in its study were asked for by a driver
    that was killed before Ray saved them (the resumed searcher does not know them): marked FAIL
    with the reason, so optuna-dashboard and `optuna.load_study` show no trial running forever."""
    if not record.optuna_storage or not record.optuna_study:
        return
    import optuna

    try:
        study = optuna.load_study(study_name=record.optuna_study, storage=record.optuna_storage)
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        for trial in running:
            # The reason shows in optuna-dashboard; Optuna's public API sets user attributes only
            # through a live Trial, so through the storage, as Optuna's own stale-trial check does.
            study._storage.set_trial_user_attr(trial._trial_id, "irrep_study.reason", ORPHANED_OPTUNA_REASON)
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    except Exception as exc:  # a convenience: the sweep's results are in MLflow either way
        log(f"could not close the Optuna study's orphaned trials ({type(exc).__name__})")
        return
    if running:
        log(f"optuna study {record.optuna_study!r}: {len(running)} trial(s) proposed before a driver stopped, never run, marked FAIL")


def new_sweep(
    storage: Path, space: SearchSpace, tracking_uri: str, experiment: str, log: Callable[[str], None], optuna_storage: str | None = None
) -> SweepRecord:
    """A new sweep folder and its MLflow parent run (the experiment created if missing)."""
    try:
        experiment_id = store.ensure_experiment(tracking_uri, experiment)
    except store.TrackingError:
        raise
    except Exception as exc:
        raise store.TrackingError(
            f"--tracking-uri {store.redact(tracking_uri)}: cannot create the sweep's runs ({type(exc).__name__})"
        ) from None
    path = claim_folder(storage, space.name)
    try:
        parent_run_id = store.start_sweep_run(
            tracking_uri, experiment_id, path.name, space.summary_params(), space=space.model_dump(mode="json")
        )
    except Exception as exc:
        path.rmdir()
        raise store.TrackingError(
            f"--tracking-uri {store.redact(tracking_uri)}: cannot create the sweep's runs ({type(exc).__name__})"
        ) from None
    record = SweepRecord(path, experiment, experiment_id, parent_run_id)
    if space.search.method == "optuna":
        # optuna-dashboard and optuna.load_study(study_name=..., storage=...) read it, during the sweep and after.
        record.optuna_storage = optuna_storage or f"sqlite:///{path / OPTUNA_FILE}"
        record.optuna_study = path.name
        _tag_parent(
            tracking_uri,
            parent_run_id,
            {"irrep_study.optuna_storage": store.redact(record.optuna_storage), "irrep_study.optuna_study": record.optuna_study},
        )
    write_state(record, space, tracking_uri, finished=False)
    log(f"sweep {path.name}: {space.total_trials} trials; MLflow experiment {experiment!r}, parent run {parent_run_id}")
    return record


def _tag_parent(tracking_uri: str, parent_run_id: str, tags: dict[str, str]) -> None:
    try:
        for key, value in tags.items():
            store.client(tracking_uri).set_tag(parent_run_id, key, value)
    except Exception as exc:  # the tags are a convenience: the sweep's state file holds the same
        print(f"could not tag the parent run ({type(exc).__name__}); {SWEEP_FILE} names the Optuna study", file=sys.stderr)


def claim_folder(storage: Path, name: str) -> Path:
    """`<name>-<time>`, created here; two drivers starting the same study in the same second (a
    shared cluster) each get their own folder, the later one with a suffix."""
    stem = f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    for attempt in range(100):
        path = storage / (stem if attempt == 0 else f"{stem}-{attempt + 1}")
        try:
            path.mkdir(parents=True, exist_ok=False)  # atomic: exactly one driver wins each name
            return path
        except FileExistsError:
            continue
    raise UserError(f"--storage {storage}: 100 sweeps named {stem!r} already; wait a second and start again")


def reopen_sweep(storage: Path, space: SearchSpace, tracking_uri: str, log: Callable[[str], None]) -> SweepRecord:
    """The latest unfinished sweep of `space` in `storage`, its parent run set running again."""
    path = latest_unfinished(storage, space.name)
    if path is None:
        raise UserError(f"--resume: no unfinished sweep named {space.name!r} in {storage}")
    record = SweepRecord.from_state(path, json.loads((path / SWEEP_FILE).read_text()))
    store.reopen_run(tracking_uri, record.parent_run_id)  # it ended as interrupted after a Ctrl-C
    log(f"resuming {path.name}: MLflow experiment {record.experiment!r}, parent run {record.parent_run_id}")
    return record
