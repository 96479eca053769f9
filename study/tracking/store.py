"""MLflow tracking: one experiment per study, a parent run per sweep, a nested child run per trial.

Everything goes through an explicit `MlflowClient` (no fluent global state), so a trial logs from
its own process, on any node, straight to the tracking server. The one module that reads and
writes runs; what the server could not take waits in a sweep's journal (study/tracking/journal.py).

Names other parts rely on (docs/formats.md):
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
  (study/training/embeddings.py), `result.json`; and the folder `model`, the best weights as an MLflow
  Model (PyTorch flavour, study/tracking/logged_model.py) that `irrep-study best --register` registers.

On a sweep's parent run: the search space's summary as params, the validated space as the artifact
`search_space.yaml`, MLflow's source tags (`mlflow.source.name`, `mlflow.source.type`,
`mlflow.source.git.commit` when the package runs from its git checkout) with `irrep_study.version`
and `irrep_study.git_dirty`, and each time a trial completes (step = trials completed so far):
`best_val_mae_meV` (the lowest over completed trials), `best_trial_test_mae_meV` (that trial's test
MAE, only reported) and `trials_finished`. An analysis run (role=analysis) is nested under the
sweep whose trials it analysed, with a few summary metrics; its tables and report.html are
artifacts, and its description (`mlflow.note.content`) is the report's findings.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from study.errors import UserError
from study.names import (
    BASELINE_TEST_MAE,
    BASELINE_VAL_MAE,
    BEST_VAL_MAE,
    COMPLETED,
    FAILED,
    INTERRUPTED,
    RUNNING,
    STOPPED_EARLY,
    TEST_MAE,
)

ROLE_TAG = "irrep_study.role"
STATUS_TAG = "irrep_study.status"
REASON_TAG = "irrep_study.reason"
TRIAL_ID_TAG = "irrep_study.trial_id"
ANALYZED_PARENT_TAG = "irrep_study.analyzed_parent"  # on an analysis run: the sweep it analysed
PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"  # a run's description in the MLflow UI (Markdown)
VERSION_TAG = "irrep_study.version"
GIT_DIRTY_TAG = "irrep_study.git_dirty"  # "true" when the checkout had uncommitted changes to tracked files
SEARCH_SPACE_ARTIFACT = "search_space.yaml"
# Metrics of a sweep's parent run, logged by the driver each time a trial completes.
BEST_SO_FAR_METRICS = (BEST_VAL_MAE, "best_trial_test_mae_meV", "trials_finished")
TRIAL_ARTIFACTS = ("config.yaml", "best_model.pt", "test_embeddings.npz", "result.json")
FINAL_METRICS = (TEST_MAE, BEST_VAL_MAE, BASELINE_VAL_MAE, BASELINE_TEST_MAE, "num_params", "train_seconds")
# MLflow's REST client retries for minutes by default; a preflight check should answer quickly.
PREFLIGHT_TIMEOUT_S = 10


class TrackingError(UserError):
    """The tracking server cannot be reached or does not hold what was asked for."""


def redact(uri: str) -> str:
    """A URI without its user:password part, fit for logs and files."""
    parts = urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def runs_page_url(uri: str, experiment_id: str) -> str | None:
    """The MLflow UI's page of an experiment's runs, for a tracking server (http or https); None
    for a local store (sqlite, file), which has no UI of its own. MLflow 3 opens an experiment in
    its GenAI view for a new browser, where a sweep's training runs do not show: this page does."""
    if urlsplit(uri).scheme not in ("http", "https"):
        return None
    return f"{redact(uri).rstrip('/')}/#/experiments/{experiment_id}/runs"


def resolve_tracking_uri(uri: str | None) -> str:
    """`--tracking-uri`, else $MLFLOW_TRACKING_URI, else a SQLite store in the working directory."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a local SQLite store (`sqlite:///PATH`); None for any other store."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def default_artifact_location(uri: str) -> str | None:
    """For a local SQLite store, artifacts go to ./mlartifacts beside it; a server decides itself."""
    database = sqlite_file(uri)
    return None if database is None else (database.parent / "mlartifacts").resolve().as_uri()


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


def quick_failure():
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
    """Fail fast, with one line, when the tracking store cannot be used. Writes nothing: a local
    SQLite store that does not exist yet is not created here (opening it would), only its folder
    checked; the sweep creates it once every check has passed."""
    database = sqlite_file(uri)
    if database is not None and not database.exists():
        from study.paths import writable_folder

        writable_folder(database.parent, "--tracking-uri")
        return
    with quick_failure():
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
    """The id of an existing experiment; TrackingError naming it when there is none (a local
    SQLite store that does not exist holds none, and is not created by looking)."""
    database = sqlite_file(uri)
    if database is not None and not database.exists():
        raise TrackingError(f"--experiment: no experiment named {name!r}: there is no MLflow store at {database}")
    with quick_failure():
        try:
            experiment = client(uri).get_experiment_by_name(name)
        except Exception as exc:
            raise TrackingError(f"--tracking-uri {uri}: tracking server unreachable ({type(exc).__name__})") from None
    if experiment is None or experiment.lifecycle_stage == "deleted":
        raise TrackingError(f"--experiment: no experiment named {name!r} in {uri}")
    return experiment.experiment_id


def check_sweep_run(uri: str, experiment: str, experiment_id: str, run_id: str) -> None:
    """`--parent RUN_ID` (of `best` and `analyze`) must name a sweep's parent run in `experiment`."""
    try:
        run = client(uri).get_run(run_id)
    except Exception:
        raise TrackingError(f"--parent: no run {run_id!r} in {uri}") from None
    if run.info.experiment_id != experiment_id:
        raise TrackingError(f"--parent: run {run_id} belongs to another experiment than {experiment!r}")
    role = run.data.tags.get(ROLE_TAG)
    if role != "sweep":
        # A trial's run id would otherwise select nothing, silently.
        raise TrackingError(f"--parent: run {run_id} is not a sweep (its role is {role or 'unset'}); give a sweep's parent run id")


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("irrep-study")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def git_state(root: Path | None = None) -> tuple[str, bool] | None:
    """(commit, dirty) of the git checkout this package runs from, else None: git is missing, the
    package is installed from a wheel, or the enclosing repository is another one (a virtual
    environment inside some other project's checkout). Never raises: a sweep must start anyway."""
    root = (root or Path(__file__).resolve().parents[2]).resolve()

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):  # no git binary, or one that hangs
            return None
        return done.stdout if done.returncode == 0 else None

    found = git("rev-parse", "--show-toplevel", "HEAD")  # fails without a commit, or outside a repository
    lines = found.splitlines() if found else []
    if len(lines) != 2 or Path(lines[0]).resolve() != root:
        return None
    changes = git("status", "--porcelain", "--untracked-files=no")
    return lines[1].strip(), bool(changes and changes.strip())


def source_tags(entry_point: str) -> dict[str, str]:
    """MLflow's standard source tags (what ran, and from which commit) and the package version."""
    tags = {"mlflow.source.name": entry_point, "mlflow.source.type": "LOCAL", VERSION_TAG: package_version()}
    state = git_state()
    if state is not None:
        tags["mlflow.source.git.commit"], dirty = state
        tags[GIT_DIRTY_TAG] = "true" if dirty else "false"
    return tags


def start_sweep_run(
    uri: str, experiment_id: str, name: str, space_params: dict[str, str], space: dict | None = None, entry_point: str = "irrep-study sweep"
) -> str:
    """The sweep's parent run: tags, the space's summary params and (given `space`, the validated
    SearchSpace.model_dump) the artifact search_space.yaml. A write that fails after the run exists
    ends it FAILED and is raised: the sweep does not start."""
    import yaml

    mlflow_client = client(uri)
    run = mlflow_client.create_run(experiment_id, run_name=name, tags={ROLE_TAG: "sweep", **source_tags(entry_point)})
    run_id = run.info.run_id
    try:
        if space_params:
            log_params(mlflow_client, run_id, space_params)
        if space is not None:
            mlflow_client.log_text(run_id, yaml.safe_dump(space, sort_keys=False), SEARCH_SPACE_ARTIFACT)
    except Exception as exc:
        try:  # so that the runs of the experiment show no sweep that never ran as running
            finish_run(mlflow_client, run_id, FAILED, f"the sweep could not start ({type(exc).__name__})")
        except Exception:
            pass
        raise
    return run_id


def log_best_so_far(uri: str, parent_run_id: str, step: int, metrics: dict[str, float]) -> None:
    """Metrics of a sweep's parent run at `step`, in one attempt (no retries): the driver must not
    wait on a tracking server that is down; the caller decides what a failure costs."""
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    with quick_failure():
        client(uri).log_batch(parent_run_id, metrics=[Metric(key, float(value), stamp, step) for key, value in metrics.items()])


def log_params(mlflow_client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    # MLflow caps a batch at 100 params and each value at 6000 characters.
    items = [Param(key, str(value)[:6000]) for key, value in params.items()]
    for start in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=items[start : start + 100])


def finish_run(mlflow_client, run_id: str, status: str, reason: str | None = None) -> None:
    """Record the study's status tag and end the MLflow run with the matching lifecycle state."""
    mlflow_client.set_tag(run_id, STATUS_TAG, status)
    if reason:
        mlflow_client.set_tag(run_id, REASON_TAG, reason[:5000])
    lifecycle = {COMPLETED: "FINISHED", STOPPED_EARLY: "FINISHED", INTERRUPTED: "KILLED"}.get(status, "FAILED")
    mlflow_client.set_terminated(run_id, lifecycle)


def reopen_run(uri: str, run_id: str) -> None:
    """A run that `finish_run` ended (a sweep or trial stopped by Ctrl-C) running again, for `--resume`."""
    mlflow_client = client(uri)
    reopen(mlflow_client, mlflow_client.get_run(run_id))


def reopen(mlflow_client, run) -> None:
    """Status RUNNING and tag running; writes only what differs (a new run needs nothing)."""
    if run.info.status != "RUNNING":
        mlflow_client.update_run(run.info.run_id, status="RUNNING")
    if run.data.tags.get(STATUS_TAG) != RUNNING:
        mlflow_client.set_tag(run.info.run_id, STATUS_TAG, RUNNING)
    if REASON_TAG in run.data.tags:  # why it ended before no longer holds
        mlflow_client.delete_tag(run.info.run_id, REASON_TAG)


def _every_page(uri: str, experiment_id: str, filter_string: str) -> list:
    mlflow_client = client(uri)
    runs, token = [], None
    while True:
        page = mlflow_client.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def child_runs(uri: str, experiment_id: str, parent_run_id: str | None = None, filter_string: str = "") -> list:
    """Trial runs of an experiment (or of one sweep), every page."""
    clauses = [f"tags.`{ROLE_TAG}` = 'trial'"]
    if parent_run_id:
        clauses.append(f"tags.`{PARENT_TAG}` = '{parent_run_id}'")
    if filter_string:
        clauses.append(filter_string)
    return _every_page(uri, experiment_id, " and ".join(clauses))


def sweep_runs(uri: str, experiment_id: str) -> dict[str, object]:
    """Parent run id -> run, for every sweep of the experiment (deleted ones are absent)."""
    return {run.info.run_id: run for run in _every_page(uri, experiment_id, f"tags.`{ROLE_TAG}` = 'sweep'")}


def log_analysis_run(
    uri: str,
    experiment_id: str,
    name: str,
    parent_run_id: str | None,
    params: dict[str, object],
    metrics: dict[str, float],
    folder: Path,
    nest_under: str | None = None,
    description: str | None = None,
) -> str:
    """One run (role=analysis) in the study's experiment: params, final metrics and every file of
    `folder`; it ends FAILED, and the error is raised, when a write fails.

    `parent_run_id` is the sweep the analysis was restricted to (`--parent`); `nest_under` the
    sweep run it is nested under (mlflow.parentRunId), so that it sits beside that sweep's trials
    instead of among the experiment's top-level runs. Readers of trials filter on the role tag.
    `description` (Markdown) becomes the run's description in the MLflow UI (its
    mlflow.note.content tag): what the study found, on the run's page."""
    from mlflow.entities import Metric

    mlflow_client = client(uri)
    tags = {ROLE_TAG: "analysis", **source_tags("irrep-study analyze")}
    if parent_run_id:
        tags[ANALYZED_PARENT_TAG] = parent_run_id
    if nest_under:
        tags[PARENT_TAG] = nest_under
    if description:
        tags[NOTE_TAG] = description
    run_id = mlflow_client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    try:
        log_params(mlflow_client, run_id, {key: str(value) for key, value in params.items()})
        stamp = int(time.time() * 1000)
        entries = [Metric(key, value, stamp, 0) for key, value in metrics.items()]
        for start in range(0, len(entries), 1000):  # MLflow caps a batch at 1000 metrics
            mlflow_client.log_batch(run_id, metrics=entries[start : start + 1000])
        mlflow_client.log_artifacts(run_id, str(folder))
    except Exception:
        mlflow_client.set_terminated(run_id, "FAILED")
        raise
    mlflow_client.set_terminated(run_id, "FINISHED")
    return run_id


def end_running_trials(uri: str, experiment_id: str, parent_run_id: str, reason: str) -> int:
    """End the trial runs of one sweep still marked RUNNING as `interrupted`, with the reason: after
    a Ctrl-C on the driver, or once a resumed sweep has finished without the trials that its killed
    driver had started but Ray had not saved. Returns how many were ended."""
    running = [r for r in child_runs(uri, experiment_id, parent_run_id) if r.info.status == "RUNNING"]
    mlflow_client = client(uri)
    for run in running:
        finish_run(mlflow_client, run.info.run_id, INTERRUPTED, reason)
    return len(running)
