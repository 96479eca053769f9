"""The report's UMAP grids: which trials get one (the best and the worst by test MAE) and drawing
them, in a process of their own while the analysis goes on when it may use more than one.

The grids are the report's most expensive figures (a few seconds each: two panels of every block's
1,000 molecules), and they need nothing but a trial's kept projections, its test errors and its
rank: so they can be drawn while the main process computes the correlations and the other figures,
which is a third of a second `analyze` (scores read back) on 2 cores."""

from __future__ import annotations

import multiprocessing
import re
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from analysis.report import plots


@dataclass(frozen=True)
class UmapGrid:
    """One trial's grid: everything `plots.umap_figure` needs, so it can be drawn in another process."""

    name: str  # the figure's name in the report (and its file name without .png)
    title: str
    projections: dict[str, np.ndarray]  # block -> (molecules, 2) UMAP coordinates
    nsps: np.ndarray
    abs_error_meV: np.ndarray
    path: Path

    @property
    def caption(self) -> str:
        return f"2D UMAP of each block's invariant features: {self.title}. Left: nSPS; right: |error|."

    def draw(self) -> Path:
        return plots.umap_figure(self.title, self.projections, self.nsps, self.abs_error_meV, self.path)


def umap_grids(out_dir: Path, trials, projections: dict, best_and_worst: int) -> list[UmapGrid]:
    """The grids of the ``best_and_worst`` best and as many worst trials by test MAE (the trials
    ranked as the trial table ranks them: by test MAE, ties in the study's order)."""
    order = [t.run_id for t in sorted(trials, key=lambda t: t.test_mae_meV)]  # sorted() is stable
    chosen = list(dict.fromkeys(order[:best_and_worst] + order[::-1][:best_and_worst]))
    by_id = {t.run_id: t for t in trials}
    grids = []
    for run_id in chosen:
        result, nsps = projections[run_id]
        if not result.umap:
            continue
        trial = by_id[run_id]
        sample = result.sample
        position = order.index(run_id) + 1
        name = f"umap_{position:03d}_{safe_name(trial.label)}"
        title = f"{trial.label} (test MAE {trial.test_mae_meV:.1f} meV, rank {position}/{len(order)}; run {run_id})"
        abs_error = np.abs(trial.embeddings.prediction - trial.embeddings.target)[sample] * 1000.0
        grids.append(UmapGrid(name, title, result.umap, nsps[sample], abs_error, out_dir / f"{name}.png"))
    return grids


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:80]


def _draw(grid: UmapGrid) -> Path:
    return grid.draw()


class UmapDrawing:
    """Draws ``grids`` as soon as it is made: in one process of its own when ``in_background``,
    otherwise (one worker) when `figures` is asked. Use as a context manager: leaving it stops the
    process, also when the analysis fails."""

    def __init__(self, grids: list[UmapGrid], in_background: bool):
        self._grids = grids
        self._pool: ProcessPoolExecutor | None = None
        self._futures: list[Future] = []
        if in_background and grids:
            # spawn, not fork: the analysis process holds threads (BLAS, MLflow's) that a fork copies mid-state.
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            self._futures = [self._pool.submit(_draw, grid) for grid in grids]

    def figures(self) -> dict[str, tuple[Path, str]]:
        """Each grid's name -> (its file, its caption), in the order of `umap_grids`."""
        paths = [future.result() for future in self._futures] if self._pool else [grid.draw() for grid in self._grids]
        return {grid.name: (path, grid.caption) for grid, path in zip(self._grids, paths)}

    def __enter__(self) -> UmapDrawing:
        return self

    def __exit__(self, *exc) -> None:
        if self._pool:
            self._pool.shutdown(wait=True, cancel_futures=True)
