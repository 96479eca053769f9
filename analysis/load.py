"""Every finished trial of a study, read back from MLflow: config, metrics, embeddings, weights.

Reads the tracking contract of study/tracking/store.py: trials are runs tagged
``irrep_study.role=trial`` (children of a sweep run through ``mlflow.parentRunId``); only those
with ``irrep_study.status=completed`` have test metrics and artifacts (a trial stopped early by
the scheduler never reaches its test evaluation), so those are the ones analysed and the others
are counted. Problems are :class:`AnalysisError`, one line that names the run and the artifact.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from study.config.trial import TrialConfig
from study.errors import UserError
from study.names import COMPLETED, TEST_MAE, TRAIN_LOSS, VAL_MAE
from study.nn.irreps import IrrepsLayout
from study.tracking import store
from study.training.embeddings import (
    EmbeddingsFormatError,
    TestEmbeddings,
    load_embeddings,
)

ANALYSED_STATUS = COMPLETED
EMBEDDINGS_ARTIFACT = "test_embeddings.npz"
WEIGHTS_ARTIFACT = "best_model.pt"
CONFIG_ARTIFACT = "config.yaml"
HISTORY_METRICS = (TRAIN_LOSS, VAL_MAE)


class AnalysisError(UserError):
    """Something the analysis needs is missing or unreadable in the tracking store."""


@dataclass
class Trial:
    """One completed trial, with everything analysis needs already on local disk."""

    run_id: str
    run_name: str
    parent_run_id: str | None
    config: TrialConfig
    params: dict[str, str]
    metrics: dict[str, float]  # the latest value of every metric
    embeddings: TestEmbeddings
    weights_path: Path
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> [(epoch, value)]

    @property
    def layout(self) -> IrrepsLayout:
        return self.embeddings.layout

    @property
    def test_mae_meV(self) -> float:
        return self.metrics[TEST_MAE]

    @property
    def num_params(self) -> float:
        return self.metrics.get("num_params", math.nan)

    @property
    def label(self) -> str:
        """Short, human: ``l=0,1,2 h=16 seed=3``."""
        return f"l={','.join(map(str, self.config.l_values))} h={self.config.hidden_dim} seed={self.config.seed}"


@dataclass
class Study:
    tracking_uri: str
    experiment_name: str
    experiment_id: str
    parent_run_id: str | None
    trials: list[Trial]
    skipped: dict[str, int]  # status -> number of trial runs not analysed


def _client(uri: str):
    # MLflow draws a tqdm bar per downloaded file on stderr; the analysis has its own progress.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return store.client(uri)


def _describe(run) -> str:
    name = run.info.run_name or ""
    return f"trial run {run.info.run_id}" + (f" ({name})" if name else "")


def _artifact(repository, run, name: str, listing: set[str], what: str) -> Path:
    if name not in listing:
        raise AnalysisError(f"{_describe(run)}: no {name} artifact ({what}); logged by an incomplete or older sweep?")
    try:
        # Local artifact stores return the file in place; remote ones download it to a temp folder.
        return Path(repository.download_artifacts(name))
    except Exception as exc:
        raise AnalysisError(f"{_describe(run)}: cannot fetch {name} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None


def _read_config(run, path: Path) -> TrialConfig:
    from study.config.trial import ConfigError, load_trial_config

    try:
        return load_trial_config(path)
    except ConfigError as exc:
        raise AnalysisError(f"{_describe(run)}: {CONFIG_ARTIFACT} is not a valid trial config ({exc})") from None


def _history(client, run_id: str, layout: IrrepsLayout) -> dict[str, list[tuple[int, float]]]:
    names = list(HISTORY_METRICS) + [f"norm_share_l{l}" for l in layout.l_values]
    history = {}
    for name in names:
        points = client.get_metric_history(run_id, name)
        if points:
            history[name] = sorted((int(p.step), float(p.value)) for p in points)
    return history


def load_trial(client, run, tracking_uri: str) -> Trial:
    """A completed trial run's config, metrics, embeddings and weights; AnalysisError if any is missing."""
    # The run's own artifact repository, found once from the run at hand: the client's
    # download_artifacts(run_id, ...) reads the run back and searches its logged models on every
    # call (40 ms each, 5 of the 8 s that reading a 40-trial study took).
    repository = get_artifact_repository(run.info.artifact_uri, tracking_uri=tracking_uri)
    listing = {info.path for info in repository.list_artifacts()}
    metrics = dict(run.data.metrics)
    if TEST_MAE not in metrics or not math.isfinite(metrics[TEST_MAE]):
        raise AnalysisError(f"{_describe(run)}: marked completed but has no finite test_mae_meV metric")
    config = _read_config(run, _artifact(repository, run, CONFIG_ARTIFACT, listing, "the trial config"))
    embeddings_path = _artifact(repository, run, EMBEDDINGS_ARTIFACT, listing, "the test-set embeddings")
    try:
        embeddings = load_embeddings(embeddings_path)
    except EmbeddingsFormatError as exc:
        raise AnalysisError(f"{_describe(run)}: {exc}") from None
    if tuple(sorted(set(embeddings.layout.l_values))) != tuple(config.l_values):
        raise AnalysisError(
            f"{_describe(run)}: embeddings hold l={list(embeddings.layout.l_values)} but the config says {list(config.l_values)}"
        )
    weights = _artifact(repository, run, WEIGHTS_ARTIFACT, listing, "the best weights")
    return Trial(
        run_id=run.info.run_id,
        run_name=run.info.run_name or run.info.run_id,
        parent_run_id=run.data.tags.get(store.PARENT_TAG),
        config=config,
        params=dict(run.data.params),
        metrics=metrics,
        embeddings=embeddings,
        weights_path=weights,
        history=_history(client, run.info.run_id, embeddings.layout),
    )


def load_study(experiment: str, parent_run_id: str | None = None, tracking_uri: str | None = None) -> Study:
    """Every completed trial of ``experiment`` (or of the sweep run ``parent_run_id`` in it)."""
    uri = store.resolve_tracking_uri(tracking_uri)
    client = _client(uri)
    experiment_id = store.find_experiment(uri, experiment)
    if parent_run_id:
        store.check_sweep_run(uri, experiment, experiment_id, parent_run_id)
    runs = store.child_runs(uri, experiment_id, parent_run_id)
    statuses = Counter(run.data.tags.get(store.STATUS_TAG, "unknown") for run in runs)
    completed = [run for run in runs if run.data.tags.get(store.STATUS_TAG) == ANALYSED_STATUS]
    if not completed:
        found = ", ".join(f"{n} {status}" for status, n in sorted(statuses.items())) or "no trial runs"
        scope = f"sweep {parent_run_id}" if parent_run_id else f"experiment {experiment!r}"
        raise AnalysisError(f"no completed trials in {scope} (found: {found})")
    # Oldest first, so tables and plots keep the order in which the sweep ran.
    completed.sort(key=lambda run: (run.info.start_time or 0, run.info.run_id))
    trials = [load_trial(client, run, uri) for run in completed]
    skipped = {status: n for status, n in statuses.items() if status != ANALYSED_STATUS}
    return Study(uri, experiment, experiment_id, parent_run_id, trials, skipped)
