"""`irrep-study`: the command line.

Commands that report take `--json`: one JSON document on stdout, logs and progress on stderr.
Bad input ends with one line on stderr and exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from study.errors import UserError
from study.lvalues import MAX_L
from study.paths import writable_file, writable_folder

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain help, not typer's rich panels: those show every on/off flag as taking a value
    # (`--json <bool>`, `--help <bool>`), which they do not.
    rich_markup_mode=None,
    # Up to 120 columns where the terminal has them (click's default stops at 80, cutting the
    # command list's summaries short).
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
    help="Sweeps and ablations of equivariant GNNs over irrep configurations on QM9.",
)
# soft_wrap: a long line (a path, a run id) stays one line in a log file instead of being cut at 80 columns.
log = Console(stderr=True, highlight=False, soft_wrap=True)
# The exit code of a process stopped by SIGINT (128 + 2), as shells report Ctrl-C.
INTERRUPTED_EXIT = 130
_debug = False
_verbose = False


class EdgeKind(str, Enum):
    bonds = "bonds"
    radius = "radius"


CacheDirOption = Annotated[
    Optional[Path],
    typer.Option("--cache-dir", help="Where the processed QM9 cache lives (default: $IRREP_STUDY_CACHE or ~/.cache/irrep-study)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout; logs go to stderr.")]
ForceOption = Annotated[bool, typer.Option("--force", help="Start even when the memory estimate exceeds the free memory.")]


def _print_version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("irrep-study")
    except PackageNotFoundError:  # run from a source tree that was never installed
        found = "unknown (not installed)"
    typer.echo(f"irrep-study {found}")
    raise typer.Exit()


@app.callback()
def _global_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
    version: Annotated[
        bool,
        # Eager: answered before the command that would otherwise be required.
        typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_print_version),
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Also show Ray's, MLflow's and Optuna's own log lines and Ray Tune's banners.")
    ] = False,
) -> None:
    global _debug, _verbose
    _debug, _verbose = debug, verbose
    if not verbose:
        _quiet_libraries()


def _quiet_libraries() -> None:
    """What this tool says is enough by default: MLflow's INFO lines (creating its tables), Ray's
    note that token authentication is on (README says so), Ray Tune's experiment banner and its
    TensorBoard hint are shown only with --verbose (Optuna's INFO lines: study/sweep.py, where the
    study is created). Their warnings and errors still are."""
    import logging

    # Read by MLflow when it is imported, here and in the trial workers this process starts.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # Ray Tune's older console output, which `verbose=0` (study/sweep.py) silences entirely.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


def _emit_json(document: dict) -> None:
    sys.stdout.write(json.dumps(document, indent=2) + "\n")
    # Ray's exit hooks can end the process before Python flushes a piped stdout.
    sys.stdout.flush()


def _cache_folder(cache_dir: Optional[Path], subfolder: Optional[str] = None) -> Path:
    """The QM9 cache folder (or `subfolder` of it), checked before any work: a built cache is only
    read, so a read-only folder holding one will do; otherwise it must be a folder that can be written."""
    from study.data import CACHE_FILE, default_cache_dir

    if cache_dir is not None:
        option = "--cache-dir"
    elif os.environ.get("IRREP_STUDY_CACHE"):
        option = "IRREP_STUDY_CACHE"
    else:
        option = "QM9 cache folder"
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if subfolder is not None:
        return writable_folder(folder / subfolder, option)
    if (folder / CACHE_FILE).is_file():
        return folder
    return writable_folder(folder, option)


def _load_tensors(cache_dir: Optional[Path]):
    from study.data import load_qm9

    return load_qm9(_cache_folder(cache_dir), log=lambda message: log.print(message))


def _check_memory(config, tensors, force: bool, what: str, copies: int = 1) -> None:
    """Refuse, before any work, a configuration whose estimated peak memory exceeds the free memory."""
    from study.resources import check_fits, estimate, gib
    from study.train import select_device

    found = estimate(config, tensors)
    log.print(f"estimate: {found.num_params:,} parameters, {found.edges_per_batch:.0f} edges per batch, "
              f"peak {gib(found.total_bytes)} per trial")
    if not force:
        check_fits(config, found, select_device(config.device), what, copies)


@app.command()
def data(
    subset: Annotated[Optional[int], typer.Option(help="Report on a seeded random subset of this many molecules.")] = None,
    edges: Annotated[EdgeKind, typer.Option(help="Edge kind: covalent bonds or a radius graph.")] = EdgeKind.bonds,
    cutoff: Annotated[float, typer.Option(help="Radius-graph cutoff in Angstrom.")] = 6.0,
    target: Annotated[str, typer.Option(help="Target whose statistics are printed.")] = "U0_atom",
    split_seed: Annotated[int, typer.Option(help="Seed of the subset selection.")] = 21616,
    cache_dir: CacheDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Prepare QM9 (processed once, then cached) and print the molecule count and target statistics."""
    from study.data import TARGETS, QM9Dataset, split_indices, target_stats

    if target not in TARGETS:
        raise UserError(f"--target: unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if cutoff <= 0:
        raise UserError(f"--cutoff: must be positive, got {cutoff}")
    if subset is not None and subset <= 0:
        raise UserError(f"--subset: must be positive, got {subset}")
    started = time.perf_counter()
    tensors = _load_tensors(cache_dir)
    load_seconds = time.perf_counter() - started
    if subset is not None and subset > len(tensors):
        raise UserError(f"--subset: {subset} exceeds the {len(tensors)} molecules of QM9")
    if subset is None:
        indices = list(range(len(tensors)))
    else:
        indices = split_indices(len(tensors), seed=split_seed, fractions=(1.0, 0.0, 0.0), subset=subset)["train"]
    dataset = QM9Dataset(tensors, indices, edges=edges.value, cutoff=cutoff)
    num_atoms = sum(dataset[k].num_nodes for k in range(len(dataset)))
    num_edges = sum(dataset[k].num_edges for k in range(len(dataset)))
    report = {
        "molecules": len(dataset),
        "atoms": num_atoms,
        "edges": {
            "kind": edges.value,
            "cutoff": cutoff if edges is EdgeKind.radius else None,
            "directed_edges": num_edges,
            "mean_degree": num_edges / num_atoms,
        },
        "target": {"name": target, **target_stats(tensors, target, indices)},
        "load_seconds": round(load_seconds, 3),
    }
    if as_json:
        _emit_json(report)
        return
    stats = report["target"]
    typer.echo(f"molecules: {report['molecules']}  atoms: {num_atoms}")
    typer.echo(f"edges ({edges.value}): {num_edges} directed, mean degree {num_edges / num_atoms:.2f}")
    typer.echo(
        f"{target}: mean {stats['mean']:.4f}  std {stats['std']:.4f}  min {stats['min']:.4f}  max {stats['max']:.4f}"
    )


@app.command()
def train(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG.yaml", help="Trial config (see configs/).")],
    overrides: Annotated[
        Optional[list[str]],
        # One KEY=VALUE per --set (typer would show the type as <list[str]>).
        typer.Option("--set", metavar="KEY=VALUE", help="Override a config key: --set hidden_dim=16 --set l_values=0,1,2."),
    ] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: runs/<config name>-<time>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the checkpoint in --out.")] = False,
    force: ForceOption = False,
    cache_dir: CacheDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Train one trial with a progress bar and print its test MAE."""
    from study.config import load_trial_config

    config = load_trial_config(config_path, overrides)  # refused before torch is even imported
    if resume and out is None:
        raise UserError("--resume: give the --out folder of the run to continue")
    if out is None:
        out = Path("runs") / f"{config_path.stem}-{datetime.now():%Y%m%d-%H%M%S}"
    writable_folder(out, "--out")
    _cache_folder(cache_dir)
    from study.train import run_trial

    tensors = _load_tensors(cache_dir)
    _check_memory(config, tensors, force, "train")
    log.print(
        f"trial: l_values={list(config.l_values)} hidden_dim={config.hidden_dim} epochs={config.epochs} "
        f"reference={config.target_reference} lr_schedule={config.lr_schedule} -> {out}"
    )

    with Progress(
        TextColumn("[bold]train[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("batches"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
        console=log,
        transient=True,
    ) as bar:
        task = bar.add_task("", total=None)

        def on_progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        def on_epoch(metrics) -> None:
            line = f"epoch {metrics.epoch}/{config.epochs}  train_loss {metrics.train_loss:.4f}  val_mae {metrics.val_mae_meV:.1f} meV"
            bar.update(task, description=line)
            log.print(line)

        result = run_trial(config, out, tensors=tensors, resume=resume, on_epoch=on_epoch, progress=on_progress)

    if as_json:
        _emit_json({"out_dir": str(out), **result.to_dict()})
    elif result.status == "completed":
        ratio = result.test_mae_meV / result.baseline_test_mae_meV
        typer.echo(
            f"test MAE: {result.test_mae_meV:.1f} meV, {ratio:.2f} x the composition baseline's "
            f"{result.baseline_test_mae_meV:.1f} meV  (best val {result.best_val_mae_meV:.1f} meV at epoch "
            f"{result.best_epoch}, baseline val {result.baseline_val_mae_meV:.1f} meV; {result.num_params} parameters, "
            f"{result.train_seconds:.0f} s)  -> {out}"
        )
    if result.status == "diverged":
        log.print(f"trial diverged at epoch {result.diverged_epoch}: {result.reason}")
        raise typer.Exit(1)


def _print_runs_page(uri: str, experiment_id: str, as_json: bool) -> None:
    """The MLflow UI's page of the experiment's training runs, when the tracking URI is a server:
    MLflow 3 opens an experiment in its GenAI view, where a sweep looks empty. On stderr under
    --json (stdout holds the document)."""
    from study import tracking

    url = tracking.runs_page_url(uri, experiment_id)
    if url is None:
        return
    line = f"MLflow runs: {url}"
    if as_json:
        log.print(line, markup=False)
    else:
        typer.echo(line)


TrackingUriOption = Annotated[
    Optional[str],
    typer.Option("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)."),
]


@app.command()
def sweep(
    space_path: Annotated[Path, typer.Argument(metavar="SPACE.yaml", help="Search space (see search_spaces/).")],
    address: Annotated[
        Optional[str], typer.Option(help="Ray cluster to join: auto, host:port or ray://host:port (default: start a local Ray).")
    ] = None,
    tracking_uri: TrackingUriOption = None,
    experiment: Annotated[Optional[str], typer.Option(help="MLflow experiment (default: the space's name).")] = None,
    storage: Annotated[Path, typer.Option(help="Folder for Ray Tune's experiment state and checkpoints.")] = Path("ray_results"),
    resume: Annotated[bool, typer.Option(help="Continue the latest unfinished sweep of this space in --storage.")] = False,
    num_cpus: Annotated[Optional[int], typer.Option(help="CPUs of the local Ray (no --address); default: all.")] = None,
    optuna_storage: Annotated[Optional[str], typer.Option(
        help="Optuna RDB URL for the study's Optuna trials, e.g. one database a cluster shares "
        "(default: sqlite optuna.db in the sweep's folder).")] = None,
    force: ForceOption = False,
    cache_dir: CacheDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Run a study on Ray Tune (Optuna or grid, ASHA), every trial tracked in MLflow."""
    from study import tracking
    from study.space import load_search_space

    space = load_search_space(space_path)
    writable_folder(storage, "--storage")
    _cache_folder(cache_dir)
    if optuna_storage is not None:
        from study.sweep import check_optuna_storage

        check_optuna_storage(space, resume, optuna_storage)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_reachable(uri)
    tensors = _load_tensors(cache_dir)
    if address is None:
        # Its largest configuration, as many at once as the space allows, on this machine. (On a
        # cluster the trials run elsewhere: `irrep-study plan` gives the figures to budget it.)
        from study.plan import concurrent_trials, largest_config

        _check_memory(largest_config(space, tensors), tensors, force, "sweep", copies=concurrent_trials(space, num_cpus))

    from study.sweep import check_resources, connect_ray, run_sweep
    from study.tracking import redact

    connect_ray(address, num_cpus=num_cpus)
    check_resources(space)
    log.print(f"tracking: {redact(uri)}")
    # Ray Tune prints its own banners on stdout; stdout belongs to the --json document.
    with contextlib.redirect_stdout(sys.stderr):
        outcome = run_sweep(
            space, tensors, uri, experiment or space.name, storage,
            address=address, resume=resume, show_progress=True, log=lambda message: log.print(message), verbose=_verbose,
            optuna_storage=optuna_storage,
        )
    report = outcome.to_dict()
    if as_json:
        _emit_json(report)
    if outcome.interrupted:
        # Ctrl-C: Ray Tune saved its state and stopped the trials; say how to go on, exit as SIGINT does.
        left = sum(trial["status"] == "interrupted" for trial in report["trials"])
        log.print(f"interrupted: {left} trial(s) unfinished; continue with: irrep-study sweep {space_path} --resume")
        raise typer.Exit(INTERRUPTED_EXIT)
    if as_json:
        _print_runs_page(uri, outcome.experiment_id, as_json)
        return
    best = report["best"]
    counts: dict[str, int] = {}
    for trial in report["trials"]:
        counts[trial["status"]] = counts.get(trial["status"], 0) + 1
    typer.echo(f"sweep {outcome.path.name}: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    if best:
        baseline = best.get("baseline_test_mae_meV")
        versus = f", {best['test_mae_meV'] / baseline:.2f} x the composition baseline's {baseline:.1f} meV" if baseline else ""
        typer.echo(
            f"best by validation: l_values={best['l_values']} seed={best['seed']} val MAE {best['best_val_mae_meV']:.1f} meV, "
            f"test MAE {best['test_mae_meV']:.1f} meV{versus} (run {best['mlflow_run_id']})"
        )
    if outcome.optuna_storage:
        typer.echo(f"optuna study {outcome.optuna_study!r}: optuna-dashboard {redact(outcome.optuna_storage)}")
    typer.echo(f"next: irrep-study best --experiment {outcome.experiment}" + (f" --tracking-uri {redact(uri)}" if tracking_uri else ""))
    _print_runs_page(uri, outcome.experiment_id, as_json)


@app.command()
def sync(
    experiment: Annotated[str, typer.Option(help="MLflow experiment (the study name) whose sweeps to sync.")],
    tracking_uri: TrackingUriOption = None,
    storage: Annotated[Path, typer.Option(help="The sweeps' --storage folder.")] = Path("ray_results"),
    as_json: JsonOption = False,
) -> None:
    """Write to MLflow what sweeps logged while the tracking server was unreachable."""
    from study import tracking
    from study.journal import sync_sweeps

    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_reachable(uri)
    with contextlib.redirect_stdout(sys.stderr):  # MLflow prints "View run" lines when it ends runs
        report = sync_sweeps(uri, storage, experiment, log=lambda message: log.print(message))
    if as_json:
        _emit_json(report)
    else:
        typer.echo(f"synced {report['sweeps']} sweep(s); {report['pending']} trial journal(s) still pending")
    if report["pending"]:
        raise typer.Exit(1)


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
            "--metric", "--by",
            help="Rank configurations by the mean of this metric over their seeds, lowest first; its column comes first. "
                 "Default: the best validation MAE (ranking by test_mae_meV chooses on the test set).",
        ),
    ] = "best_val_mae_meV",
    top: Annotated[int, typer.Option(help="How many configurations to show.")] = 10,
    where: Annotated[
        Optional[str], typer.Option(help="MLflow filter on the trial runs, e.g. \"params.hidden_dim = '16'\".")
    ] = None,
    export: Annotated[
        Optional[Path],
        typer.Option(help="Write the winning configuration's trial config YAML here (the seed of its best run); "
                          "irrep-study train FILE retrains it."),
    ] = None,
    register: Annotated[
        Optional[str],
        typer.Option(metavar="NAME",
                     help="Register the MLflow model of the winning configuration's best run (chosen on validation) "
                          "in the MLflow Model Registry under NAME; prints the name and version."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Rank a study's configurations from MLflow by their mean over seeds; --export writes the winner's config,
    --register registers its best run's model."""
    from study import tracking
    from study.best import describe, export_config, rank_configurations, statuses_text

    if top <= 0:
        raise UserError(f"--top: must be positive, got {top}")
    if export is not None:
        writable_file(export, "--export")
    if register is not None and not register.strip():
        raise UserError("--register: give the registered model's name")
    if register is not None and "test" in metric:
        # Selection uses validation metrics (docs/analysis.md): a model chosen on the test set is not registered.
        raise UserError(f"--register: the registered model is chosen on validation; drop --by {metric}")
    uri = tracking.resolve_tracking_uri(tracking_uri)
    ranking = rank_configurations(uri, experiment, metric, top, where, parent)
    configurations, left_out = ranking["configurations"], ranking["left_out"]["note"]
    chosen_by = f"ranked by the mean {metric} over each configuration's seeds" + (
        " (a test metric: the winner is chosen on the test set)" if metric.startswith("test") else "")
    if export is not None:
        if not configurations:
            raise UserError(f"--export: experiment {experiment!r} has no trial with {metric}")
        winner = configurations[0]
        run = winner["best_run"]
        why = (f"configuration {winner['configuration']} of sweep {winner['sweep']}: mean {metric} "
               f"{winner['metrics'][metric]['mean']:.4g} over {winner['n']} run(s); seed {run['seed']} was its best")
        export_config(run, export, comment=why)
        log.print(f"wrote the config of {winner['configuration']} with seed {run['seed']} (run {run['run_id']}) to {export}: "
                  f"irrep-study train {export}")
    registered = None
    if register is not None:
        from study.mlflow_model import MODEL_ARTIFACT, register_run_model

        if not configurations:
            raise UserError(f"--register: experiment {experiment!r} has no trial with {metric}")
        winner = configurations[0]
        run = winner["best_run"]
        version = register_run_model(uri, run["run_id"], register)
        registered = {"name": register, "version": version, "run_id": run["run_id"],
                      "source": f"runs:/{run['run_id']}/{MODEL_ARTIFACT}", "model_uri": f"models:/{register}/{version}"}
        log.print(f"registered the model of {winner['configuration']} with seed {run['seed']} (run {run['run_id']}) "
                  f"as {register} version {version}: mlflow.pytorch.load_model('models:/{register}/{version}')")
    if as_json:
        # stdout holds the document: the ranking's one-line notes go to stderr.
        log.print(chosen_by)
        if left_out:
            log.print(left_out)
        _emit_json({"experiment": experiment, "parent_run_id": parent, "metric": metric, "ranked_by": chosen_by,
                    "trial_runs": ranking["runs"], "total_configurations": ranking["total_configurations"],
                    "left_out": ranking["left_out"], "configurations": configurations,
                    **({"registered": registered} if registered else {})})
        _print_runs_page(uri, tracking.find_experiment(uri, experiment), as_json)
        return
    from rich.table import Table

    title = f"{experiment}: {chosen_by}"
    if len(configurations) < ranking["total_configurations"]:
        title += f"; the best {len(configurations)} of {ranking['total_configurations']} configurations"
    table = Table(title=title, caption=left_out)
    # The ranking metric's column first, so what ranks is what is shown; then the others reported.
    shown = list(dict.fromkeys((metric, "best_val_mae_meV", "test_mae_meV")))
    labels = {"best_val_mae_meV": "best val MAE", "test_mae_meV": "test MAE"}
    columns = ["rank", "sweep", "configuration", "n", *(labels.get(m, m) for m in shown),
               "baseline test MAE", "test / baseline", "params", "statuses"]
    for column in columns:
        # A number never breaks (describe() puts "(k of n)" on a line of its own); names and
        # statuses wrap where the table is too wide.
        table.add_column(column, no_wrap=column not in ("sweep", "configuration", "statuses"))
    for row in configurations:
        ratio, size = row["test_over_baseline"], row["num_params"]
        table.add_row(
            str(row["rank"]), row["sweep"] or "-", row["configuration"], str(row["n"]),
            *(describe(row["metrics"][m], row["n"]) for m in shown),
            describe(row["metrics"]["baseline_test_mae_meV"], row["n"], spread=False),
            "-" if ratio is None else f"{ratio:.2f}", "-" if size is None else str(size), statuses_text(row["statuses"]),
        )
    Console(width=160).print(table)
    _print_runs_page(uri, tracking.find_experiment(uri, experiment), as_json)


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
    cache_dir: CacheDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Per-irrep utilization, structure and knockout scores of every completed trial, correlated with test error."""
    from analysis.pipeline import AnalysisSettings, run_analysis
    from analysis.scores import ScoreSettings

    if max_molecules < 10:
        raise UserError(f"--max-molecules: must be at least 10, got {max_molecules}")
    if bootstrap < 100:
        raise UserError(f"--bootstrap: must be at least 100, got {bootstrap}")
    if out is None:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment)
        out = Path("analyses") / f"{safe}-{datetime.now():%Y%m%d-%H%M%S}"
    writable_folder(out, "--out")
    _cache_folder(cache_dir, subfolder="descriptors")  # the descriptor cache is written every time
    if knockout:
        _cache_folder(cache_dir)
    settings = AnalysisSettings(
        scores=ScoreSettings(seed=seed, max_molecules=max_molecules),
        knockout=knockout,
        n_boot=bootstrap,
        n_perm=bootstrap,
        log_to_mlflow=log_mlflow,
    )
    with Progress(
        TextColumn("[bold]analyze[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.description}"), console=log, transient=True,
    ) as bar:
        task = bar.add_task("", total=None)

        def on_progress(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        outcome = run_analysis(
            experiment, out, parent_run_id=parent, tracking_uri=tracking_uri, settings=settings,
            qm9_cache_dir=cache_dir, descriptor_cache_dir=cache_dir / "descriptors" if cache_dir else None,
            log=lambda message: log.print(message), progress=on_progress,
        )
    document = outcome.to_dict()
    if as_json:
        _emit_json(document)
        _print_runs_page(outcome.study.tracking_uri, outcome.study.experiment_id, as_json)
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
    _print_runs_page(outcome.study.tracking_uri, outcome.study.experiment_id, as_json)


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
        _emit_json({"files": {name: str(path) for name, path in result.files.items()}, "findings": result.sentences})
        return
    for sentence in result.sentences:
        typer.echo(sentence)
    typer.echo("wrote " + ", ".join(str(path) for path in result.files.values()))


class BenchDevice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@app.command()
def plan(
    space_path: Annotated[Path, typer.Argument(metavar="SPACE.yaml", help="Search space (see search_spaces/).")],
    steps: Annotated[int, typer.Option(help="Timed training steps per configuration (after 2 untimed ones).")] = 3,
    cache_dir: CacheDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Budget a study before launching it: trials, memory and time per trial, total compute and wall time."""
    from study.space import load_search_space

    if steps < 1:
        raise UserError(f"--steps: must be at least 1, got {steps}")
    space = load_search_space(space_path)
    _cache_folder(cache_dir)
    from study.plan import format_plan, plan_study

    report = plan_study(space, space_path.stem, _load_tensors(cache_dir), steps=steps, log=lambda message: log.print(message))
    _print_report(report, as_json, format_plan)


@app.command()
def bench(
    configs: Annotated[
        Optional[list[str]],
        typer.Option("--configs", metavar="SPEC",
                     help="A model to measure, L_VALUESxHIDDEN[:radius]; repeat the option for more (default: the seed's five)."),
    ] = None,
    repeats: Annotated[int, typer.Option(help="Timed training steps per backend and config; the median is reported.")] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed steps per backend and config first.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Molecules per training step.")] = 32,
    num_layers: Annotated[int, typer.Option(help="num_layers of every model (blocks after the input block are num_layers + 1).")] = 3,
    threads: Annotated[Optional[int], typer.Option(help="torch intra-op threads (default: torch's choice).")] = None,
    device: Annotated[BenchDevice, typer.Option(help="auto picks a CUDA GPU when there is one.")] = BenchDevice.auto,
    quick: Annotated[bool, typer.Option("--quick", help="A smoke run of seconds: tiny models, one layer, one step.")] = False,
    lmax_sweep: Annotated[
        Optional[int],
        typer.Option("--lmax-sweep", help="Instead: l = 0..lmax at hidden 16 for lmax = 1..N, with the growth exponent of time and memory."),
    ] = None,
    study: Annotated[
        Optional[Path],
        typer.Option("--study", help="Instead: a search space YAML, shrunk (--shrink) and trained end to end once per backend."),
    ] = None,
    shrink: Annotated[str, typer.Option(help="With --study: CONFIGSxSEEDSxEPOCHS of the space to run.")] = "4x1x2",
    cache_dir: CacheDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Training throughput, FLOP rate and peak memory of the tensor-product backends (e3nn, fast, and
    cuEquivariance when installed); or their cost as lmax grows; or a whole shrunk study per backend."""
    import torch

    from study.bench import DEFAULT_CASES, QUICK_CASES, format_lmax_sweep, format_table, parse_case, run_bench, run_lmax_sweep
    from study.train import select_device

    # Checked here, not with typer's min=: a bad value gets the CLI's one-line error and exit code 2.
    for name, value, least in (("--repeats", repeats, 1), ("--warmup", warmup, 0), ("--batch-size", batch_size, 1),
                               ("--num-layers", num_layers, 0), ("--threads", threads, 1), ("--lmax-sweep", lmax_sweep, 1)):
        if value is not None and value < least:
            raise UserError(f"{name}: must be at least {least}, got {value}")
    if lmax_sweep is not None and lmax_sweep > MAX_L:
        raise UserError(f"--lmax-sweep: at most {MAX_L}, got {lmax_sweep}")
    if study is not None and lmax_sweep is not None:
        raise UserError("--study and --lmax-sweep: give one of them")
    if threads is not None:
        torch.set_num_threads(threads)
    if study is not None:
        from study.bench_study import format_study_bench, parse_shrink, run_study_bench
        from study.space import load_search_space

        plan = parse_shrink(shrink)
        space = load_search_space(study)
        report = run_study_bench(space, study.stem, plan, _load_tensors(cache_dir), device=device.value,
                                 log=lambda message: log.print(message))
        _print_report(report, as_json, format_study_bench)
        return
    if quick:
        num_layers, repeats, warmup, batch_size = 1, 1, 1, 8
    cases = [parse_case(spec, num_layers) for spec in (configs or (QUICK_CASES if quick else DEFAULT_CASES))]
    tensors = _load_tensors(cache_dir)
    on_device = select_device(device.value)
    if lmax_sweep is not None:
        report = run_lmax_sweep(tensors, lmax_sweep, num_layers, repeats=repeats, warmup=warmup, batch_size=batch_size,
                                device=on_device, log=lambda message: log.print(message))
        _print_report(report, as_json, format_lmax_sweep)
        return
    report = run_bench(
        tensors, cases, repeats=repeats, warmup=warmup, batch_size=batch_size, device=on_device,
        matmul_size=256 if quick else 2048, loading_batches=3 if quick else 50, log=lambda message: log.print(message),
    )
    _print_report(report, as_json, format_table)


def _print_report(report: dict, as_json: bool, as_text) -> None:
    if as_json:
        _emit_json(report)
    else:
        typer.echo(as_text(report))


def main() -> None:
    try:
        app()
    except UserError as exc:
        if _debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
