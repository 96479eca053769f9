"""`irrep-study best`, `analyze` and `reanalyze`: what a study found."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from study.cli.app import (
    CacheDirOption,
    JsonOption,
    TrackingUriOption,
    app,
    emit_json,
    log,
    print_runs_page,
)
from study.data.cache import cache_folder
from study.errors import UserError
from study.names import (
    BASELINE_TEST_MAE,
    BEST_VAL_MAE,
    TEST_MAE,
)
from study.paths import writable_file, writable_folder


@app.command()
def best(
    experiment: Annotated[str, typer.Option(help="MLflow experiment (the study name).")],
    parent: Annotated[
        Optional[str], typer.Option(help="Rank only the trials of this sweep (parent run id); default: every sweep of the study.")
    ] = None,
    tracking_uri: TrackingUriOption = None,
    metric: Annotated[
        str,
        typer.Option(
            "--metric",
            "--by",
            help="Rank configurations by the mean of this metric over their seeds, lowest first; its column comes first. "
            "Default: the best validation MAE (ranking by test_mae_meV chooses on the test set).",
        ),
    ] = BEST_VAL_MAE,
    top: Annotated[int, typer.Option(help="How many configurations to show.")] = 10,
    where: Annotated[Optional[str], typer.Option(help="MLflow filter on the trial runs, e.g. \"params.hidden_dim = '16'\".")] = None,
    export: Annotated[
        Optional[Path],
        typer.Option(
            help="Write the winning configuration's trial config YAML here (the seed of its best run); irrep-study train FILE retrains it."
        ),
    ] = None,
    register: Annotated[
        Optional[str],
        typer.Option(
            metavar="NAME",
            help="Register the MLflow model of the winning configuration's best run (chosen on validation) "
            "in the MLflow Model Registry under NAME; prints the name and version.",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Rank a study's configurations from MLflow by their mean over seeds; --export writes the winner's config,
    --register registers its best run's model."""
    from study.best import describe, export_config, rank_configurations, statuses_text
    from study.tracking import store

    if top <= 0:
        raise UserError(f"--top: must be positive, got {top}")
    if export is not None:
        writable_file(export, "--export")
    if register is not None and not register.strip():
        raise UserError("--register: give the registered model's name")
    if register is not None and "test" in metric:
        # Selection uses validation metrics (docs/analysis.md): a model chosen on the test set is not registered.
        raise UserError(f"--register: the registered model is chosen on validation; drop --by {metric}")
    uri = store.resolve_tracking_uri(tracking_uri)
    ranking = rank_configurations(uri, experiment, metric, top, where, parent)
    configurations, left_out = ranking["configurations"], ranking["left_out"]["note"]
    chosen_by = f"ranked by the mean {metric} over each configuration's seeds" + (
        " (a test metric: the winner is chosen on the test set)" if metric.startswith("test") else ""
    )
    if export is not None:
        if not configurations:
            raise UserError(f"--export: experiment {experiment!r} has no trial with {metric}")
        winner = configurations[0]
        run = winner["best_run"]
        why = (
            f"configuration {winner['configuration']} of sweep {winner['sweep']}: mean {metric} "
            f"{winner['metrics'][metric]['mean']:.4g} over {winner['n']} run(s); seed {run['seed']} was its best"
        )
        export_config(run, export, comment=why)
        log.print(
            f"wrote the config of {winner['configuration']} with seed {run['seed']} (run {run['run_id']}) to {export}: "
            f"irrep-study train {export}"
        )
    registered = None
    if register is not None:
        from study.tracking.logged_model import MODEL_ARTIFACT, register_run_model

        if not configurations:
            raise UserError(f"--register: experiment {experiment!r} has no trial with {metric}")
        winner = configurations[0]
        run = winner["best_run"]
        version = register_run_model(uri, run["run_id"], register)
        registered = {
            "name": register,
            "version": version,
            "run_id": run["run_id"],
            "source": f"runs:/{run['run_id']}/{MODEL_ARTIFACT}",
            "model_uri": f"models:/{register}/{version}",
        }
        log.print(
            f"registered the model of {winner['configuration']} with seed {run['seed']} (run {run['run_id']}) "
            f"as {register} version {version}: mlflow.pytorch.load_model('models:/{register}/{version}')"
        )
    if as_json:
        # stdout holds the document: the ranking's one-line notes go to stderr.
        log.print(chosen_by)
        if left_out:
            log.print(left_out)
        emit_json(
            {
                "experiment": experiment,
                "parent_run_id": parent,
                "metric": metric,
                "ranked_by": chosen_by,
                "trial_runs": ranking["runs"],
                "total_configurations": ranking["total_configurations"],
                "left_out": ranking["left_out"],
                "configurations": configurations,
                **({"registered": registered} if registered else {}),
            }
        )
        print_runs_page(uri, store.find_experiment(uri, experiment), as_json)
        return
    from rich.table import Table

    title = f"{experiment}: {chosen_by}"
    if len(configurations) < ranking["total_configurations"]:
        title += f"; the best {len(configurations)} of {ranking['total_configurations']} configurations"
    table = Table(title=title, caption=left_out)
    # The ranking metric's column first, so what ranks is what is shown; then the others reported.
    shown = list(dict.fromkeys((metric, BEST_VAL_MAE, TEST_MAE)))
    labels = {BEST_VAL_MAE: "best val MAE", TEST_MAE: "test MAE"}
    columns = [
        "rank",
        "sweep",
        "configuration",
        "n",
        *(labels.get(m, m) for m in shown),
        "baseline test MAE",
        "test / baseline",
        "params",
        "statuses",
    ]
    for column in columns:
        # A number never breaks (describe() puts "(k of n)" on a line of its own); names and
        # statuses wrap where the table is too wide.
        table.add_column(column, no_wrap=column not in ("sweep", "configuration", "statuses"))
    for row in configurations:
        ratio, size = row["test_over_baseline"], row["num_params"]
        table.add_row(
            str(row["rank"]),
            row["sweep"] or "-",
            row["configuration"],
            str(row["n"]),
            *(describe(row["metrics"][m], row["n"]) for m in shown),
            describe(row["metrics"][BASELINE_TEST_MAE], row["n"], spread=False),
            "-" if ratio is None else f"{ratio:.2f}",
            "-" if size is None else str(size),
            statuses_text(row["statuses"]),
        )
    Console(width=160).print(table)
    print_runs_page(uri, store.find_experiment(uri, experiment), as_json)


@app.command()
def analyze(
    experiment: Annotated[str, typer.Option(help="MLflow experiment (the study name).")],
    parent: Annotated[Optional[str], typer.Option(help="Analyse only the trials of this sweep (parent run id).")] = None,
    tracking_uri: Annotated[
        Optional[str],
        typer.Option("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)."),
    ] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: analyses/<experiment>-<time>).")] = None,
    max_molecules: Annotated[
        int, typer.Option(help="Test molecules per trial for structure scores and knockouts (seeded subsample).")
    ] = 2000,
    knockout: Annotated[bool, typer.Option(help="Zero each irrep block in the trained models (needs the QM9 cache).")] = True,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples and permutations per correlation.")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of subsampling, UMAP, cross-validation and resampling.")] = 0,
    log_mlflow: Annotated[bool, typer.Option(help="Log the analysis as an MLflow run (role=analysis).")] = True,
    workers: Annotated[
        Optional[int], typer.Option(help="Trials scored at the same time, each in its own process (default: one per CPU core).")
    ] = None,
    address: Annotated[
        Optional[str],
        typer.Option(
            help="Score the trials as Ray tasks (one CPU each) on the cluster at this address: auto, host:port or "
            "ray://host:port (default: --workers processes here)."
        ),
    ] = None,
    reuse_scores: Annotated[
        bool,
        typer.Option(
            help="Read each trial's scores back from its MLflow run where an analysis with the same settings kept them, "
            "and keep the newly computed ones there."
        ),
    ] = True,
    cache_dir: CacheDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Per-irrep utilization, structure and knockout scores of every completed trial, correlated with test error."""
    from analysis.pipeline import AnalysisSettings, run_analysis
    from analysis.scoring.scores import ScoreSettings

    if max_molecules < 10:
        raise UserError(f"--max-molecules: must be at least 10, got {max_molecules}")
    if bootstrap < 100:
        raise UserError(f"--bootstrap: must be at least 100, got {bootstrap}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers: must be at least 1, got {workers}")
    if workers is not None and address is not None:
        raise UserError("--workers and --address: give one (with --address, Ray runs as many trials at once as the cluster has CPUs)")
    if out is None:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment)
        out = Path("analyses") / f"{safe}-{datetime.now():%Y%m%d-%H%M%S}"
    writable_folder(out, "--out")
    cache_folder(cache_dir, subfolder="descriptors")  # the descriptor cache is written every time
    if knockout:
        cache_folder(cache_dir)
    settings = AnalysisSettings(
        scores=ScoreSettings(seed=seed, max_molecules=max_molecules),
        knockout=knockout,
        n_boot=bootstrap,
        n_perm=bootstrap,
        log_to_mlflow=log_mlflow,
        workers=workers or os.cpu_count() or 1,
        reuse_scores=reuse_scores,
    )
    executor = None
    if address is not None:
        from study.sweep.cluster import connect_ray
        from study.sweep.ray_tasks import RayTaskExecutor

        connect_ray(address)
        executor = RayTaskExecutor()
    with Progress(
        TextColumn("[bold]analyze[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=log,
        transient=True,
    ) as bar:
        task = bar.add_task("", total=None)

        def on_progress(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        outcome = run_analysis(
            experiment,
            out,
            parent_run_id=parent,
            tracking_uri=tracking_uri,
            settings=settings,
            qm9_cache_dir=cache_dir,
            descriptor_cache_dir=cache_dir / "descriptors" if cache_dir else None,
            log=lambda message: log.print(message),
            progress=on_progress,
            executor=executor,
        )
    document = outcome.to_dict()
    if as_json:
        emit_json(document)
        print_runs_page(outcome.study.tracking_uri, outcome.study.experiment_id, as_json)
        return
    typer.echo(f"analysed {document['trials_analysed']} trials of {experiment!r} -> {out}")
    for note in document["notes"]:
        typer.echo(f"  {note}")
    for sentence in document["ablation"]:
        typer.echo(f"  {sentence}")
    for row in document["top_correlations"][:5]:
        interval = f" [{row['rho_lo']:.2f}, {row['rho_hi']:.2f}]" if row["rho_lo"] is not None else ""
        typer.echo(
            f"  {row['block']:>6} {row['score']:<22} rho {row['rho']:+.2f}{interval}  p {row['p_rho']:.3g}  "
            f"{row['n_configurations']} configurations ({row['n_trials']} trials)"
        )
    typer.echo(f"report: {document['files']['report']}" + (f"  (MLflow run {outcome.analysis_run_id})" if outcome.analysis_run_id else ""))
    print_runs_page(outcome.study.tracking_uri, outcome.study.experiment_id, as_json)


@app.command()
def reanalyze(
    folder: Annotated[Path, typer.Argument(metavar="FOLDER", help="An analysis folder: trials.csv, scores.csv (molecules.csv if kept).")],
    out: Annotated[Optional[Path], typer.Option(help="Where to write (default: FOLDER itself).")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples and permutations per correlation.")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the resampling.")] = 0,
    as_json: JsonOption = False,
) -> None:
    """Recompute the study-level statistics (ablation effects, correlations) from an analysis folder's tables."""
    from analysis.reanalysis import reanalyse

    if bootstrap < 100:
        raise UserError(f"--bootstrap: must be at least 100, got {bootstrap}")
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder")
    writable_folder(out or folder, "--out")
    result = reanalyse(folder, out, n_boot=bootstrap, n_perm=bootstrap, seed=seed)
    if as_json:
        emit_json({"files": {name: str(path) for name, path in result.files.items()}, "findings": result.sentences})
        return
    for sentence in result.sentences:
        typer.echo(sentence)
    typer.echo("wrote " + ", ".join(str(path) for path in result.files.values()))
