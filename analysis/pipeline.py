"""`irrep-study analyze` end to end: trials from MLflow -> scores -> correlations -> files -> MLflow.

Outputs in ``out_dir``:
- ``scores.csv``: one row per trial x block x score (with the trial's test MAE and size);
- ``correlations.csv``: per (block, score) rho, tau, their 95% CIs, permutation p, partial rho, q, n;
- ``trials.csv``: the analysed trials; ``within_trial.csv``: per trial, Spearman of per-molecule
  |error| with each descriptor; ``molecules.csv``: per test molecule, its descriptors and each
  trial's absolute error;
- PNGs (UMAP per block, score vs error, correlation heatmap, norm share per epoch) and a
  self-contained ``report.html``.
Everything is then logged as one MLflow run tagged ``irrep_study.role=analysis``.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import plots
from analysis.correlate import correlate_scores, molecule_correlations
from analysis.descriptors import descriptors
from analysis.load import ROLE_TAG, Study, Trial, load_study
from analysis.report import write_report
from analysis.scores import ALL_SCORES, ScoreSettings, score_embedding, structure_sample

ANALYZED_PARENT_TAG = "irrep_study.analyzed_parent"
Progress = Callable[[str, int, int], None]  # (what, done, total)


@dataclass
class AnalysisSettings:
    scores: ScoreSettings = field(default_factory=ScoreSettings)
    knockout: bool = True
    n_boot: int = 2000
    n_perm: int = 2000
    umap_figures: int = 3  # UMAP grids of this many best and this many worst trials
    log_to_mlflow: bool = True


@dataclass
class AnalysisOutcome:
    out_dir: Path
    study: Study
    trials: pd.DataFrame
    scores: pd.DataFrame
    correlations: pd.DataFrame
    files: dict[str, Path]
    analysis_run_id: str | None

    def to_dict(self, top: int = 10) -> dict:
        ranked = self.correlations[np.isfinite(self.correlations["rho"])]
        ranked = ranked.reindex(ranked["p_rho"].sort_values(kind="stable").index).head(top)
        return {
            "experiment": self.study.experiment_name,
            "parent_run_id": self.study.parent_run_id,
            "tracking_uri": self.study.tracking_uri,
            "analysis_run_id": self.analysis_run_id,
            "out_dir": str(self.out_dir),
            "trials_analysed": len(self.study.trials),
            "trials_skipped": self.study.skipped,
            "files": {name: str(path) for name, path in self.files.items()},
            "top_correlations": _records(ranked),
        }


def _records(frame: pd.DataFrame) -> list[dict]:
    """JSON-safe records: NaN becomes null."""
    return [
        {key: (None if isinstance(value, float) and not math.isfinite(value) else value) for key, value in row.items()}
        for row in frame.to_dict(orient="records")
    ]


def _trial_table(trials: list[Trial], baselines: dict[str, float]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "run_id": t.run_id,
                "run_name": t.run_name,
                "label": t.label,
                "l_values": ",".join(map(str, t.config.l_values)),
                "hidden_dim": t.config.hidden_dim,
                "seed": t.config.seed,
                "num_params": int(t.num_params) if math.isfinite(t.num_params) else None,
                "test_mae_meV": t.test_mae_meV,
                "test_molecules": len(t.embeddings.target),
                "knockout_baseline_mae_meV": baselines.get(t.run_id, math.nan),
            }
            for t in trials
        ]
    )


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:80]


def score_trial(trial: Trial, nsps: np.ndarray, settings: AnalysisSettings, tensors_loader, on_step=None):
    """Utilization, structure and (if enabled) knockout scores of one trial, and its UMAP coordinates."""
    embeddings = trial.embeddings
    result = score_embedding(embeddings.graph, embeddings.layout, embeddings.target, nsps, settings.scores, on_block=on_step)
    baseline = math.nan
    if settings.knockout:
        from analysis.knockout import trial_knockout

        sample = structure_sample(len(embeddings.target), settings.scores)
        rows = None if len(sample) == len(embeddings.target) else sample
        knockout = trial_knockout(trial, tensors_loader(), rows=rows, on_step=on_step)
        baseline = knockout.baseline_mae_meV
        for block, deltas in knockout.deltas.items():
            result.values[block].update(deltas)
    return result, baseline


def run_analysis(
    experiment: str,
    out_dir: Path,
    parent_run_id: str | None = None,
    tracking_uri: str | None = None,
    settings: AnalysisSettings | None = None,
    qm9_cache_dir: Path | None = None,
    descriptor_cache_dir: Path | None = None,
    log: Callable[[str], None] = lambda message: None,
    progress: Progress | None = None,
) -> AnalysisOutcome:
    settings = settings or AnalysisSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report = progress or (lambda what, done, total: None)

    study = load_study(experiment, parent_run_id, tracking_uri)
    trials = study.trials
    skipped = ", ".join(f"{n} {status}" for status, n in sorted(study.skipped.items())) or "none"
    log(f"{len(trials)} completed trials in {experiment!r} (not analysed: {skipped})")
    if len(trials) < 3:
        log("fewer than 3 completed trials: correlations across trials are undefined; per-trial scores are still written")

    all_smiles = sorted({s for t in trials for s in t.embeddings.smiles.tolist()})
    report("descriptors", 0, 1)
    table = descriptors(all_smiles, descriptor_cache_dir).set_index("smiles")
    report("descriptors", 1, 1)

    tensors = None

    def tensors_loader():
        nonlocal tensors
        if tensors is None:
            from study.data import load_qm9

            tensors = load_qm9(qm9_cache_dir, log=log)
        return tensors

    score_rows, projections, baselines, within, error_columns = [], {}, {}, [], {}
    for index, trial in enumerate(trials):
        report(f"scoring {trial.label}", index, len(trials))
        molecules = table.loc[trial.embeddings.smiles.tolist()]
        nsps = molecules["nsps"].to_numpy(dtype=np.float64)
        result, baselines[trial.run_id] = score_trial(
            trial, nsps, settings, tensors_loader,
            on_step=lambda step, label=trial.label, index=index: report(f"scoring {label}: {step}", index, len(trials)),
        )
        projections[trial.run_id] = (result, nsps)
        for block, values in result.values.items():
            for score in ALL_SCORES:
                if score in values:
                    score_rows.append({"run_id": trial.run_id, "block": block, "score": score, "value": values[score]})
        abs_error = np.abs(trial.embeddings.prediction - trial.embeddings.target) * 1000.0
        per_descriptor = molecule_correlations(abs_error, molecules.reset_index(drop=True))
        per_descriptor.insert(0, "run_id", trial.run_id)
        per_descriptor.insert(1, "label", trial.label)
        within.append(per_descriptor)
        error_columns[trial.run_id] = pd.Series(abs_error, index=trial.embeddings.mol_id)
    report("scoring", len(trials), len(trials))

    trial_table = _trial_table(trials, baselines)
    scores = pd.DataFrame(score_rows).merge(
        trial_table[["run_id", "run_name", "label", "test_mae_meV", "num_params"]], on="run_id"
    )
    scores = scores[["run_id", "run_name", "label", "block", "score", "value", "test_mae_meV", "num_params"]]
    report("correlations", 0, 1)
    correlations = correlate_scores(scores, trial_table, n_boot=settings.n_boot, n_perm=settings.n_perm, seed=settings.scores.seed)
    report("correlations", 1, 1)
    within_table = pd.concat(within, ignore_index=True)

    files: dict[str, Path] = {}
    files["scores"] = out_dir / "scores.csv"
    scores.to_csv(files["scores"], index=False)
    files["correlations"] = out_dir / "correlations.csv"
    correlations.to_csv(files["correlations"], index=False)
    files["trials"] = out_dir / "trials.csv"
    trial_table.to_csv(files["trials"], index=False)
    files["within_trial"] = out_dir / "within_trial.csv"
    within_table.to_csv(files["within_trial"], index=False)
    files["molecules"] = out_dir / "molecules.csv"
    _molecule_table(trials, table, error_columns).to_csv(files["molecules"], index=False)

    report("figures", 0, 1)
    figures = _figures(out_dir, trials, trial_table, scores, correlations, projections, settings)
    files.update({name: path for name, (path, _) in figures.items()})
    report("figures", 1, 1)

    files["report"] = write_report(
        out_dir / "report.html",
        title=f"irrep-study analysis: {experiment}",
        summary={
            "experiment": experiment,
            "sweep (parent run)": parent_run_id or "all sweeps of the experiment",
            "tracking URI": study.tracking_uri,
            "trials analysed": str(len(trials)),
            "trials not analysed": skipped,
            "structure scores on": f"at most {settings.scores.max_molecules} test molecules per trial (seed {settings.scores.seed})",
            "knockouts": "yes" if settings.knockout else "no",
            "bootstrap / permutations": f"{settings.n_boot} / {settings.n_perm}",
        },
        sections=_sections(trial_table, scores, correlations, within_table, figures),
    )

    outcome = AnalysisOutcome(out_dir, study, trial_table, scores, correlations, files, None)
    if settings.log_to_mlflow:
        report("logging to MLflow", 0, 1)
        outcome.analysis_run_id = log_analysis_run(outcome, settings, time.perf_counter() - started)
        report("logging to MLflow", 1, 1)
    return outcome


def _molecule_table(trials: list[Trial], table: pd.DataFrame, error_columns: dict[str, pd.Series]) -> pd.DataFrame:
    """Per test molecule: id, SMILES, target, descriptors, and each trial's |error| (meV)."""
    first: dict[int, tuple[str, float]] = {}
    for trial in trials:
        for mol, smiles, target in zip(trial.embeddings.mol_id.tolist(), trial.embeddings.smiles.tolist(), trial.embeddings.target.tolist()):
            first.setdefault(mol, (smiles, target))
    ids = sorted(first)
    frame = pd.DataFrame({"mol_id": ids, "smiles": [first[m][0] for m in ids], "target": [first[m][1] for m in ids]})
    frame = frame.join(table, on="smiles")
    for trial in trials:
        frame[f"abs_error_meV[{trial.run_id}]"] = error_columns[trial.run_id].reindex(ids).to_numpy()
    return frame


def _figures(out_dir, trials, trial_table, scores, correlations, projections, settings) -> dict[str, tuple[Path, str]]:
    figures: dict[str, tuple[Path, str]] = {}
    path = plots.heatmap_figure(correlations, out_dir / "correlation_heatmap.png")
    if path:
        figures["correlation_heatmap"] = (path, "Spearman rho of each score (row) of each block (column) with test MAE across trials.")
    path = plots.score_scatter_figure(scores, correlations, out_dir / "score_vs_error.png")
    if path:
        figures["score_vs_error"] = (path, "Strongest rank correlations: rank of score vs rank of test MAE, with the rank fit (slope = rho).")
    path = plots.norm_share_figure([(t.label, t.test_mae_meV, t.history) for t in trials], out_dir / "norm_share_by_epoch.png")
    if path:
        figures["norm_share_by_epoch"] = (path, "Share of the validation embeddings' squared norm per l, by epoch (logged during training); colour: test MAE.")
    order = trial_table.sort_values("test_mae_meV", kind="stable")["run_id"].tolist()
    chosen = list(dict.fromkeys(order[: settings.umap_figures] + order[::-1][: settings.umap_figures]))
    by_id = {t.run_id: t for t in trials}
    for rank, run_id in enumerate(chosen):
        result, nsps = projections[run_id]
        if not result.umap:
            continue
        trial = by_id[run_id]
        sample = result.sample
        abs_error = np.abs(trial.embeddings.prediction - trial.embeddings.target)[sample] * 1000.0
        position = order.index(run_id) + 1
        name = f"umap_{position:03d}_{_safe_name(trial.label)}"
        title = f"{trial.label} (test MAE {trial.test_mae_meV:.1f} meV, rank {position}/{len(order)}; run {run_id})"
        path = plots.umap_figure(title, result.umap, nsps[sample], abs_error, out_dir / f"{name}.png")
        figures[name] = (path, f"2D UMAP of each block's invariant features: {title}. Left: nSPS; right: |error|.")
    return figures


def _sections(trial_table, scores, correlations, within_table, figures):
    summary = scores.groupby(["block", "score"])["value"].agg(["mean", "std", "min", "max", "count"]).reset_index()
    rank = {name: k for k, name in enumerate(plots.block_order(summary["block"]))}
    summary = summary.sort_values(["block", "score"], key=lambda col: col.map(rank) if col.name == "block" else col)
    ranked = correlations.reindex(correlations["p_rho"].sort_values(kind="stable", na_position="last").index)
    within_wide = within_table.pivot_table(index="label", columns="descriptor", values="rho", aggfunc="first").reset_index()
    umaps = [figures[name] for name in figures if name.startswith("umap_")]
    others = [figures[name] for name in ("correlation_heatmap", "score_vs_error", "norm_share_by_epoch") if name in figures]
    return [
        ("Trials", "Completed trials of the study, as logged; knockout baseline is the MAE recomputed from the weights on the scored molecules.",
         [("trials", trial_table)], []),
        ("Scores vs test error",
         "Spearman rho and Kendall tau of each score with test MAE across trials, 95% bootstrap CIs, permutation p-values, "
         "partial rho controlling for num_params, Benjamini-Hochberg q. Sorted by p. n < ~10 trials gives wide intervals: read them.",
         [("correlations", ranked)], others),
        ("Scores per block", "Mean, spread and range of every score across trials (scores.csv has every value).", [("score_summary", summary)], []),
        ("Per-molecule error vs descriptors", "Spearman rho of |error| with each RDKit descriptor, within each trial (within_trial.csv has p and n).",
         [("within_trial", within_wide)], []),
        ("Latent maps", "UMAP projections are pictures of the invariant features; their faithfulness is the umap_trustworthiness score.", [], umaps),
    ]


def log_analysis_run(outcome: AnalysisOutcome, settings: AnalysisSettings, seconds: float) -> str:
    """One MLflow run (role=analysis) in the study's experiment: settings, rho per score, every file."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    study = outcome.study
    client = MlflowClient(tracking_uri=study.tracking_uri)
    tags = {ROLE_TAG: "analysis"}
    if study.parent_run_id:
        tags[ANALYZED_PARENT_TAG] = study.parent_run_id
    run = client.create_run(study.experiment_id, run_name=f"analysis {time.strftime('%Y%m%d-%H%M%S')}", tags=tags)
    run_id = run.info.run_id
    try:
        params = {
            "parent_run_id": study.parent_run_id or "",
            "trials_analysed": len(study.trials),
            "trials_skipped": ", ".join(f"{n} {s}" for s, n in sorted(study.skipped.items())),
            "n_boot": settings.n_boot,
            "n_perm": settings.n_perm,
            "knockout": settings.knockout,
            **{f"scores.{key}": value for key, value in asdict(settings.scores).items()},
        }
        stamp = int(time.time() * 1000)
        metrics = [Metric("trials_analysed", float(len(study.trials)), stamp, 0), Metric("analysis_seconds", seconds, stamp, 0)]
        for row in outcome.correlations.itertuples():
            for name in ("rho", "tau", "p_rho", "partial_rho"):
                value = getattr(row, name)
                if isinstance(value, float) and math.isfinite(value):
                    metrics.append(Metric(f"{name}/{row.block}/{row.score}", value, stamp, 0))
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        for start in range(0, len(metrics), 1000):  # MLflow caps a batch at 1000 metrics
            client.log_batch(run_id, metrics=metrics[start : start + 1000])
        client.log_artifacts(run_id, str(outcome.out_dir))
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id
