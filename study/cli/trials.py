"""`irrep-study data` and `irrep-study train`: QM9 and one trial."""

from __future__ import annotations

import time
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from study.cli.app import (
    CacheDirOption,
    ForceOption,
    JsonOption,
    app,
    emit_json,
    load_tensors,
    log,
)
from study.data.cache import cache_folder
from study.errors import UserError
from study.names import (
    COMPLETED,
)
from study.paths import writable_folder


class EdgeKind(str, Enum):
    bonds = "bonds"
    radius = "radius"


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
    from study.data.qm9 import TARGETS, QM9Dataset, split_indices, target_stats

    if target not in TARGETS:
        raise UserError(f"--target: unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if cutoff <= 0:
        raise UserError(f"--cutoff: must be positive, got {cutoff}")
    if subset is not None and subset <= 0:
        raise UserError(f"--subset: must be positive, got {subset}")
    started = time.perf_counter()
    tensors = load_tensors(cache_dir)
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
        emit_json(report)
        return
    stats = report["target"]
    typer.echo(f"molecules: {report['molecules']}  atoms: {num_atoms}")
    typer.echo(f"edges ({edges.value}): {num_edges} directed, mean degree {num_edges / num_atoms:.2f}")
    typer.echo(f"{target}: mean {stats['mean']:.4f}  std {stats['std']:.4f}  min {stats['min']:.4f}  max {stats['max']:.4f}")


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
    from study.config.trial import load_trial_config

    config = load_trial_config(config_path, overrides)  # refused before torch is even imported
    if resume and out is None:
        raise UserError("--resume: give the --out folder of the run to continue")
    if out is None:
        out = Path("runs") / f"{config_path.stem}-{datetime.now():%Y%m%d-%H%M%S}"
    writable_folder(out, "--out")
    cache_folder(cache_dir)
    from study.training.resources import check_memory
    from study.training.trial import run_trial

    tensors = load_tensors(cache_dir)
    check_memory(config, tensors, "train", force=force, log=lambda message: log.print(message))
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
        emit_json({"out_dir": str(out), **result.to_dict()})
    elif result.status == COMPLETED:
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
