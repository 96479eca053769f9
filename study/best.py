"""`irrep-study best`: rank a study's configurations from MLflow and export the winner as a trial config.

A configuration is every trial parameter except the seed, as `irrep-study analyze` defines it
(study/config/configuration.py): the device, the tensor-product backend and torch.compile do not
change what is trained, and params logged beside the config (where the trial ran, the fitted
target reference) are not chosen. Its runs are seeds of one measurement, so a configuration is ranked by the mean
of its seeds, with their sd beside it: one lucky seed does not make a winner. Configurations of
two sweeps (parent runs) of one study are never merged: the sweeps may have run other code.

Ranking is by the best validation MAE by default: selection uses validation metrics and test
metrics are only reported (docs/analysis.md), otherwise the exported winner is the configuration that
happened to do best on the test set and its test MAE is an optimistic estimate. Each row shows the
test MAE beside the composition fit's (``baseline_test_mae_meV``): a model is only useful where it
beats counting atoms.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from pathlib import Path

from pydantic import ValidationError

from study.config.trial import LEGACY_DEFAULTS, TrialConfig, _first_error
from study.errors import UserError
from study.names import BASELINE_TEST_MAE, BEST_VAL_MAE, TEST_MAE
from study.paths import atomic_write
from study.tracking import store

SELECTION_METRIC = BEST_VAL_MAE
# Shown for every configuration, whatever ranks it.
REPORTED_METRICS = (BEST_VAL_MAE, TEST_MAE, BASELINE_TEST_MAE)


def _value(run, metric: str) -> float | None:
    """The run's latest value of `metric` when it is a finite number, else None."""
    value = run.data.metrics.get(metric)
    return value if isinstance(value, float) and math.isfinite(value) else None


def _status(run) -> str:
    return run.data.tags.get(store.STATUS_TAG, run.info.status.lower())


def _summary(values: list[float]) -> dict:
    """Mean and seed-to-seed sd (ddof 1; None with one value) of the values that exist."""
    return {
        "mean": statistics.fmean(values) if values else None,
        "sd": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
    }


def rank_configurations(
    uri: str, experiment: str, metric: str = SELECTION_METRIC, top: int = 10, where: str | None = None, parent: str | None = None
) -> dict:
    """The `top` configurations of `experiment` (or of its sweep `parent`) with the lowest mean
    `metric` over their seeds, best first, and what was left out of the ranking.

    Only runs with a finite `metric` are ranked; the others (runs stopped early or failed before
    their final metrics, diverged runs) are counted by status in ``left_out`` and named in their
    configuration's ``left_out_run_ids``, and their statuses count in its ``statuses``.
    """
    from study.config.configuration import configuration_params, label_configurations

    experiment_id = store.find_experiment(uri, experiment)
    if parent:
        store.check_sweep_run(uri, experiment, experiment_id, parent)
    try:
        runs = store.child_runs(uri, experiment_id, parent_run_id=parent, filter_string=where or "")
    except Exception as exc:
        if not where:
            raise
        message = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise UserError(f"--where {where!r}: not a valid MLflow filter ({message})") from None
    measured = [run for run in runs if _value(run, metric) is not None]
    if runs and not measured and not where and metric not in {m for r in runs for m in r.data.metrics}:
        raise UserError(f"--metric: no trial of {experiment!r} has a metric named {metric!r}")

    # Every run joins its configuration, measured or not, so a configuration's statuses show its
    # seeds that did not finish. The parent run id is part of the key: two sweeps never merge.
    groups: dict[tuple[str, str], list] = {}
    for run in runs:
        key = (run.data.tags.get(store.PARENT_TAG, ""), json.dumps(configuration_params(run.data.params), sort_keys=True))
        groups.setdefault(key, []).append(run)
    names = {run_id: run.info.run_name for run_id, run in store.sweep_runs(uri, experiment_id).items()}
    configurations = []
    for (parent_id, _), members in groups.items():
        ranked = sorted((run for run in members if _value(run, metric) is not None), key=lambda run: _value(run, metric))
        if not ranked:
            continue
        metrics = {
            name: _summary([v for run in ranked if (v := _value(run, name)) is not None])
            for name in dict.fromkeys((metric, *REPORTED_METRICS))
        }
        # Mean over seeds of each seed's ratio, as `analyze` reports it.
        ratios = [
            _value(run, TEST_MAE) / _value(run, BASELINE_TEST_MAE)
            for run in ranked
            if _value(run, TEST_MAE) is not None and _value(run, BASELINE_TEST_MAE)
        ]
        sizes = [v for run in ranked if (v := _value(run, "num_params")) is not None]
        best = ranked[0]
        configurations.append(
            {
                "sweep": names.get(parent_id, parent_id) or None,
                "parent_run_id": parent_id or None,
                "n": len(ranked),
                "metrics": metrics,
                "test_over_baseline": statistics.fmean(ratios) if ratios else None,
                "num_params": round(statistics.fmean(sizes)) if sizes else None,  # the same for every seed
                "statuses": dict(sorted(Counter(_status(run) for run in members).items())),
                "params": configuration_params(best.data.params),
                "seeds": [run.data.params.get("seed") for run in ranked],
                "run_ids": [run.info.run_id for run in ranked],
                "left_out_run_ids": [run.info.run_id for run in members if _value(run, metric) is None],
                # --export writes this run's config: the configuration's best seed.
                "best_run": {
                    "run_id": best.info.run_id,
                    "seed": best.data.params.get("seed"),
                    metric: _value(best, metric),
                    "params": dict(best.data.params),
                },
            }
        )
    # Lowest mean first; between equal means, the one with the better best seed.
    configurations.sort(key=lambda c: (c["metrics"][metric]["mean"], c["best_run"][metric]))
    # Labels name every parameter that varies across the study's configurations (l=0,1 h=8).
    labels = list(label_configurations([c["params"] for c in configurations])[0]["configuration"]) if configurations else []
    ranking = [
        {"rank": rank, "configuration": label, **configuration}
        for rank, (configuration, label) in enumerate(zip(configurations, labels), start=1)
    ]

    unranked = [run for run in runs if _value(run, metric) is None]
    missing = Counter(_status(run) for run in unranked if metric not in run.data.metrics)
    not_finite = Counter(_status(run) for run in unranked if metric in run.data.metrics)
    return {
        "configurations": ranking[:top],
        "total_configurations": len(ranking),
        "runs": len(runs),
        "left_out": {
            "runs": len(unranked),
            "missing": dict(sorted(missing.items())),
            "not_finite": dict(sorted(not_finite.items())),
            "note": left_out_note(metric, len(runs), missing, not_finite),
        },
    }


def left_out_note(metric: str, total: int, missing: Counter, not_finite: Counter) -> str | None:
    """One line: how many runs the ranking left out and why, by status; None when none was."""
    by_status = lambda counts: ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))  # noqa: E731
    reasons = []  # (runs, why)
    if missing:
        reasons.append((sum(missing.values()), f"without {metric} ({by_status(missing)})"))
    if not_finite:
        reasons.append((sum(not_finite.values()), f"with a non-finite {metric} ({by_status(not_finite)})"))
    if not reasons:
        return None
    if len(reasons) == 1:
        runs, why = reasons[0]
        return f"left out of the ranking: {runs} of {total} runs {why}"
    listed = "; ".join(f"{runs} {why}" for runs, why in reasons)
    return f"left out of the ranking: {sum(runs for runs, _ in reasons)} of {total} runs: {listed}"


def _number(value: float) -> str:
    return f"{value:.1f}" if abs(value) >= 1 else f"{value:.3g}"


def describe(summary: dict, runs: int, spread: bool = True) -> str:
    """A table cell: "mean ± sd" (the mean alone for one seed), and below it "(k of n)" when only k
    of the configuration's n ranked runs have the metric, so a mean over fewer seeds is never
    mistaken for one over all of them."""
    if summary["mean"] is None:
        text = "-"
    else:
        text = _number(summary["mean"])
        if spread and summary["sd"] is not None:
            text += f" ± {_number(summary['sd'])}"
    if summary["n"] < runs:
        text += f"\n({summary['n']} of {runs})"
    return text


def statuses_text(statuses: dict[str, int]) -> str:
    return ", ".join(f"{n} {status}" for status, n in statuses.items())


def config_from_params(params: dict[str, str]) -> TrialConfig:
    """The trial config a run was trained with, from its MLflow params ("" stands for None).

    Runs logged before a field existed lack its param; they were trained with the field's legacy
    value (LEGACY_DEFAULTS), not with today's default, so that value fills the gap.
    """
    known = {k: (None if v == "" else v) for k, v in params.items() if k in TrialConfig.model_fields}
    return TrialConfig(**{**LEGACY_DEFAULTS, **known})


def export_config(row: dict, path: Path, comment: str = "") -> None:
    """Write the trial config of run ``row["run_id"]`` (from its ``row["params"]``) as YAML to `path`,
    headed by a comment naming the run (and `comment`, a line on why it was chosen)."""
    try:
        config = config_from_params(row["params"])
    except ValidationError as exc:
        # A run logged by an older version may hold a value that today's config refuses.
        field, message = _first_error(exc)
        raise UserError(f"--export: run {row['run_id']} has params that are not a valid trial config ({field}: {message})") from None
    header = f"# exported by `irrep-study best` from MLflow run {row['run_id']}\n"
    if comment:
        header += "# " + " ".join(comment.split()) + "\n"  # one comment line, whatever it holds
    text = header + config.to_yaml()
    # A failed write (a full disk) leaves an earlier export whole and names the file.
    atomic_write(path, lambda tmp: tmp.write_text(text), option="--export")
