"""`irrep-study best`: rank a study's trials from MLflow and export the winner as a trial config.

Ranking is by the best validation MAE by default: selection uses validation metrics and test
metrics are only reported (DESIGN.md), otherwise the exported winner is the trial that happened
to do best on the test set and its test MAE is an optimistic estimate. Each row shows the test
MAE beside the composition fit's (``baseline_test_mae_meV``): a model is only useful where it
beats counting atoms.
"""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import ValidationError

from study import tracking
from study.config import LEGACY_DEFAULTS, TrialConfig, _first_error
from study.errors import UserError
from study.paths import atomic_write


SELECTION_METRIC = "best_val_mae_meV"


def best_runs(uri: str, experiment: str, metric: str = SELECTION_METRIC, top: int = 10, where: str | None = None) -> list[dict]:
    """The `top` trial runs of `experiment` with the lowest `metric`, best first."""
    experiment_id = tracking.find_experiment(uri, experiment)
    try:
        runs = tracking.child_runs(uri, experiment_id, filter_string=where or "")
    except Exception as exc:
        message = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise UserError(f"--where {where!r}: not a valid MLflow filter ({message})") from None
    ranked = [r for r in runs if isinstance(r.data.metrics.get(metric), float) and math.isfinite(r.data.metrics[metric])]
    if runs and not ranked and not where and metric not in {m for r in runs for m in r.data.metrics}:
        raise UserError(f"--metric: no trial of {experiment!r} has a metric named {metric!r}")
    ranked.sort(key=lambda r: r.data.metrics[metric])
    rows = []
    for rank, run in enumerate(ranked[:top], start=1):
        metrics = run.data.metrics
        test, baseline = metrics.get("test_mae_meV"), metrics.get("baseline_test_mae_meV")
        rows.append({
            "rank": rank,
            "run_id": run.info.run_id,
            "metric": metrics[metric],
            "params": dict(run.data.params),
            "best_val_mae_meV": metrics.get("best_val_mae_meV"),
            "test_mae_meV": test,
            "baseline_test_mae_meV": baseline,
            "test_over_baseline": test / baseline if test is not None and baseline else None,
            "num_params": metrics.get("num_params"),
            "status": run.data.tags.get(tracking.STATUS_TAG, run.info.status.lower()),
        })
    return rows


def config_from_params(params: dict[str, str]) -> TrialConfig:
    """The trial config a run was trained with, from its MLflow params ("" stands for None).

    Runs logged before a field existed lack its param; they were trained with the field's legacy
    value (LEGACY_DEFAULTS), not with today's default, so that value fills the gap.
    """
    known = {k: (None if v == "" else v) for k, v in params.items() if k in TrialConfig.model_fields}
    return TrialConfig(**{**LEGACY_DEFAULTS, **known})


def export_config(row: dict, path: Path) -> None:
    try:
        config = config_from_params(row["params"])
    except ValidationError as exc:
        # A run logged by an older version may hold a value that today's config refuses.
        field, message = _first_error(exc)
        raise UserError(f"--export: run {row['run_id']} has params that are not a valid trial config ({field}: {message})") from None
    header = f"# exported by `irrep-study best` from MLflow run {row['run_id']}\n"
    text = header + config.to_yaml()
    # A failed write (a full disk) leaves an earlier export whole and names the file.
    atomic_write(path, lambda tmp: tmp.write_text(text), option="--export")
