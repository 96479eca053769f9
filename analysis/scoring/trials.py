"""Scoring trials: one trial's every score, and many trials at once in worker processes.

A trial is always scored with one thread (PyTorch's and the BLAS's under scikit-learn), so its
scores are the same bits whether it is scored alone, beside others in a process pool, or on
another machine with the same libraries: a float32 forward pass or a ridge fit summed in another
order by another thread count would differ in the last bits, and the kept scores
(analysis/scoring/kept.py) and the test of serial against parallel scoring rely on equality.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from analysis.load import Trial
from analysis.scoring.kept import TrialScores
from analysis.scoring.scores import ScoreSettings, knockout_shares, residual_target, score_embedding, structure_sample


@dataclass(frozen=True)
class ScoringJob:
    """One trial to score and the nSPS of its test molecules (from the study's descriptor table)."""

    trial: Trial
    nsps: np.ndarray


@contextmanager
def one_thread():
    import torch
    from threadpoolctl import threadpool_limits

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(saved)


def score_trial(
    trial: Trial, nsps: np.ndarray, settings: ScoreSettings, knockout: bool, tensors_loader, on_step: Callable[[str], None] | None = None
) -> TrialScores:
    """Utilization, structure and (if ``knockout``) knockout scores of one trial, its UMAP
    coordinates, and the model's and the composition fit's MAE on the knockout molecules (NaN
    without knockouts). ``tensors_loader()`` returns QM9 (study.data.qm9.QM9Tensors)."""
    with one_thread():
        embeddings = trial.embeddings
        residual = residual_target(embeddings)
        result = score_embedding(embeddings.graph, embeddings.layout, residual, nsps, settings, on_block=on_step)
        maes = (math.nan, math.nan)
        if knockout:
            from analysis.scoring.knockout import trial_knockout

            sample = structure_sample(len(embeddings.target), settings)
            rows = None if len(sample) == len(embeddings.target) else sample
            knocked = trial_knockout(trial, tensors_loader(), rows=rows, on_step=on_step)
            # The gain over the composition fit is measured on the same molecules as the deltas.
            composition_mae = float(np.abs(residual[sample]).mean() * 1000.0)
            maes = (knocked.baseline_mae_meV, composition_mae)
            for block, deltas in knocked.deltas.items():
                result.values[block].update(knockout_shares(deltas, knocked.baseline_mae_meV, composition_mae))
    return TrialScores(result.values, result.sample, result.umap, maes)


def lazy_qm9(cache_dir: Path | None, log: Callable[[str], None] = lambda message: None) -> Callable[[], object]:
    """QM9 loaded at the first call only: only knockouts need it."""
    tensors = None

    def load():
        nonlocal tensors
        if tensors is None:
            from study.data.qm9 import load_qm9

            tensors = load_qm9(cache_dir, log=log)
        return tensors

    return load


# Per worker process: QM9, loaded at its first knockout.
_worker_qm9: Callable[[], object] | None = None


def _start_worker(cache_dir: Path | None) -> None:
    global _worker_qm9
    _worker_qm9 = lazy_qm9(cache_dir)


def _score_in_worker(job: ScoringJob, settings: ScoreSettings, knockout: bool) -> TrialScores:
    return score_trial(job.trial, job.nsps, settings, knockout, _worker_qm9)


# Per process that runs portable jobs (a Ray worker): QM9 by cache folder, loaded at its first knockout.
_portable_qm9: dict[Path | None, Callable[[], object]] = {}


def score_portable(job: ScoringJob, weights: bytes, settings: ScoreSettings, knockout: bool, cache_dir: Path | None) -> TrialScores:
    """`score_trial` in a process that may be on another machine (a Ray task): the trial's weights
    come as bytes, since its weights_path is a file of the analysing machine's, and QM9 is loaded
    from ``cache_dir`` there (None: that machine's default cache)."""
    loader = _portable_qm9.setdefault(cache_dir, lazy_qm9(cache_dir))
    with tempfile.TemporaryDirectory(prefix="irrep-study-scoring-") as folder:
        weights_path = Path(folder) / "best_model.pt"
        weights_path.write_bytes(weights)
        trial = dataclasses.replace(job.trial, weights_path=weights_path)
        return score_trial(trial, job.nsps, settings, knockout, loader)


def score_trials(
    jobs: Sequence[ScoringJob],
    settings: ScoreSettings,
    knockout: bool,
    workers: int,
    qm9_cache_dir: Path | None,
    on_scored: Callable[[int, TrialScores], None],
    log: Callable[[str], None] = lambda message: None,
    executor: Executor | None = None,
) -> None:
    """Scores every job, ``workers`` at a time (1: in this process), calling ``on_scored(index,
    scores)`` in this process as each one finishes (in the order they finish).

    ``executor``: where to score instead, all jobs submitted at once (a cluster's Ray tasks:
    study.sweep.ray_tasks, so that analysis itself imports no Ray); each job carries its trial's
    weights, and QM9 is loaded where it runs."""
    if not jobs:
        return
    if executor is not None:
        pending = {
            executor.submit(score_portable, job, _weights(job, knockout), settings, knockout, qm9_cache_dir): index
            for index, job in enumerate(jobs)
        }
        _collect(executor, pending, on_scored)
        return
    loader = lazy_qm9(qm9_cache_dir, log)
    if knockout:
        # Here first: a missing cache is processed once, not by every worker at the same time.
        loader()
    if workers <= 1 or len(jobs) == 1:
        for index, job in enumerate(jobs):
            on_scored(index, score_trial(job.trial, job.nsps, settings, knockout, loader))
        return
    # spawn, not fork: a forked child of a process that has run PyTorch's thread pools can hang.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context, initializer=_start_worker, initargs=(qm9_cache_dir,)) as pool:
        pending = {pool.submit(_score_in_worker, job, settings, knockout): index for index, job in enumerate(jobs)}
        _collect(pool, pending, on_scored)


def _weights(job: ScoringJob, knockout: bool) -> bytes:
    # Only knockouts run the model.
    return Path(job.trial.weights_path).read_bytes() if knockout else b""


def _collect(executor: Executor, pending: dict[Future, int], on_scored: Callable[[int, TrialScores], None]) -> None:
    try:
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                on_scored(pending.pop(future), future.result())
    except BaseException:
        # Ctrl-C or a trial that cannot be scored: the queued trials are not started; the
        # trials already scored were kept by on_scored.
        executor.shutdown(wait=True, cancel_futures=True)
        raise
