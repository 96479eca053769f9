"""`irrep-study sweep`, `sync`, `plan` and `bench`: running a study and what it costs."""

from __future__ import annotations

import contextlib
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from study.cli.app import (
    INTERRUPTED_EXIT,
    OPTIONS,
    CacheDirOption,
    ForceOption,
    JsonOption,
    TrackingUriOption,
    app,
    emit_json,
    load_tensors,
    log,
    print_report,
    print_runs_page,
)
from study.config.lvalues import MAX_L
from study.data.cache import cache_folder
from study.errors import UserError
from study.names import (
    BASELINE_TEST_MAE,
    INTERRUPTED,
)


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
    optuna_storage: Annotated[
        Optional[str],
        typer.Option(
            help="Optuna RDB URL for the study's Optuna trials, e.g. one database a cluster shares "
            "(default: sqlite optuna.db in the sweep's folder)."
        ),
    ] = None,
    force: ForceOption = False,
    cache_dir: CacheDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Run a study on Ray Tune (Optuna or grid, ASHA), every trial tracked in MLflow."""
    from study.sweep.driver import run_sweep
    from study.sweep.preflight import check_sweep
    from study.tracking.store import redact

    checked = check_sweep(
        space_path,
        storage,
        cache_dir,
        tracking_uri,
        address=address,
        resume=resume,
        num_cpus=num_cpus,
        optuna_storage=optuna_storage,
        force=force,
        log=lambda message: log.print(message),
    )
    space, uri = checked.space, checked.tracking_uri
    log.print(f"tracking: {redact(uri)}")
    # Ray Tune prints its own banners on stdout; stdout belongs to the --json document.
    with contextlib.redirect_stdout(sys.stderr):
        outcome = run_sweep(
            space,
            checked.tensors,
            uri,
            experiment or space.name,
            storage,
            address=address,
            resume=resume,
            show_progress=True,
            log=lambda message: log.print(message),
            verbose=OPTIONS.verbose,
            optuna_storage=optuna_storage,
        )
    report = outcome.to_dict()
    if as_json:
        emit_json(report)
    if outcome.interrupted:
        # Ctrl-C: Ray Tune saved its state and stopped the trials; say how to go on, exit as SIGINT does.
        left = sum(trial["status"] == INTERRUPTED for trial in report["trials"])
        log.print(f"interrupted: {left} trial(s) unfinished; continue with: irrep-study sweep {space_path} --resume")
        raise typer.Exit(INTERRUPTED_EXIT)
    if as_json:
        print_runs_page(uri, outcome.experiment_id, as_json)
        return
    best = report["best"]
    counts: dict[str, int] = {}
    for trial in report["trials"]:
        counts[trial["status"]] = counts.get(trial["status"], 0) + 1
    typer.echo(f"sweep {outcome.path.name}: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    if best:
        baseline = best.get(BASELINE_TEST_MAE)
        versus = f", {best['test_mae_meV'] / baseline:.2f} x the composition baseline's {baseline:.1f} meV" if baseline else ""
        typer.echo(
            f"best by validation: l_values={best['l_values']} seed={best['seed']} val MAE {best['best_val_mae_meV']:.1f} meV, "
            f"test MAE {best['test_mae_meV']:.1f} meV{versus} (run {best['mlflow_run_id']})"
        )
    if outcome.optuna_storage:
        typer.echo(f"optuna study {outcome.optuna_study!r}: optuna-dashboard {redact(outcome.optuna_storage)}")
    typer.echo(f"next: irrep-study best --experiment {outcome.experiment}" + (f" --tracking-uri {redact(uri)}" if tracking_uri else ""))
    print_runs_page(uri, outcome.experiment_id, as_json)


@app.command()
def sync(
    experiment: Annotated[str, typer.Option(help="MLflow experiment (the study name) whose sweeps to sync.")],
    tracking_uri: TrackingUriOption = None,
    storage: Annotated[Path, typer.Option(help="The sweeps' --storage folder.")] = Path("ray_results"),
    as_json: JsonOption = False,
) -> None:
    """Write to MLflow what sweeps logged while the tracking server was unreachable."""
    from study.tracking import store
    from study.tracking.journal import sync_sweeps

    uri = store.resolve_tracking_uri(tracking_uri)
    store.check_reachable(uri)
    with contextlib.redirect_stdout(sys.stderr):  # MLflow prints "View run" lines when it ends runs
        report = sync_sweeps(uri, storage, experiment, log=lambda message: log.print(message))
    if as_json:
        emit_json(report)
    else:
        typer.echo(f"synced {report['sweeps']} sweep(s); {report['pending']} trial journal(s) still pending")
    if report["pending"]:
        raise typer.Exit(1)


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
    from study.config.space import load_search_space

    if steps < 1:
        raise UserError(f"--steps: must be at least 1, got {steps}")
    space = load_search_space(space_path)
    cache_folder(cache_dir)
    from study.training.plan import format_plan, plan_study

    report = plan_study(space, space_path.stem, load_tensors(cache_dir), steps=steps, log=lambda message: log.print(message))
    print_report(report, as_json, format_plan)


@app.command()
def bench(
    configs: Annotated[
        Optional[list[str]],
        typer.Option(
            "--configs",
            metavar="SPEC",
            help="A model to measure, L_VALUESxHIDDEN[:radius]; repeat the option for more (default: the seed's five).",
        ),
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
        typer.Option(
            "--lmax-sweep", help="Instead: l = 0..lmax at hidden 16 for lmax = 1..N, with the growth exponent of time and memory."
        ),
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

    from study.bench.steps import DEFAULT_CASES, QUICK_CASES, parse_case, run_bench, run_lmax_sweep
    from study.bench.tables import format_lmax_sweep, format_table
    from study.training.trial import select_device

    # Checked here, not with typer's min=: a bad value gets the CLI's one-line error and exit code 2.
    for name, value, least in (
        ("--repeats", repeats, 1),
        ("--warmup", warmup, 0),
        ("--batch-size", batch_size, 1),
        ("--num-layers", num_layers, 0),
        ("--threads", threads, 1),
        ("--lmax-sweep", lmax_sweep, 1),
    ):
        if value is not None and value < least:
            raise UserError(f"{name}: must be at least {least}, got {value}")
    if lmax_sweep is not None and lmax_sweep > MAX_L:
        raise UserError(f"--lmax-sweep: at most {MAX_L}, got {lmax_sweep}")
    if study is not None and lmax_sweep is not None:
        raise UserError("--study and --lmax-sweep: give one of them")
    if threads is not None:
        torch.set_num_threads(threads)
    if study is not None:
        from study.bench.study import format_study_bench, parse_shrink, run_study_bench
        from study.config.space import load_search_space

        plan = parse_shrink(shrink)
        space = load_search_space(study)
        report = run_study_bench(
            space, study.stem, plan, load_tensors(cache_dir), device=device.value, log=lambda message: log.print(message)
        )
        print_report(report, as_json, format_study_bench)
        return
    if quick:
        num_layers, repeats, warmup, batch_size = 1, 1, 1, 8
    cases = [parse_case(spec, num_layers) for spec in (configs or (QUICK_CASES if quick else DEFAULT_CASES))]
    tensors = load_tensors(cache_dir)
    on_device = select_device(device.value)
    if lmax_sweep is not None:
        report = run_lmax_sweep(
            tensors,
            lmax_sweep,
            num_layers,
            repeats=repeats,
            warmup=warmup,
            batch_size=batch_size,
            device=on_device,
            log=lambda message: log.print(message),
        )
        print_report(report, as_json, format_lmax_sweep)
        return
    report = run_bench(
        tensors,
        cases,
        repeats=repeats,
        warmup=warmup,
        batch_size=batch_size,
        device=on_device,
        matmul_size=256 if quick else 2048,
        loading_batches=3 if quick else 50,
        log=lambda message: log.print(message),
    )
    print_report(report, as_json, format_table)
