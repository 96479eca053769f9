"""A study's budget before it runs (``irrep-study plan SPACE.yaml``).

Per configuration: parameters, edges of a large batch and peak memory (study/training/resources.py), and
the time of a training step measured on real batches (a short calibration: 2 untimed steps, then
the median of ``steps``), with the threads one trial of the study gets. From these: the time of a
trial's training steps (validation and test embeddings add a few percent, not counted), the
study's total compute, and its wall time on this machine at ``max_concurrent`` trials at once.
Configurations: every grid entry; for an Optuna space, its smallest and its largest, so the
figures are a range.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from study.bench.steps import timed_step
from study.bench.tables import render_text
from study.config.space import SearchSpace
from study.config.trial import TrialConfig
from study.data.qm9 import (
    CollatedSplit,
    QM9Dataset,
    QM9Tensors,
    split_indices,
    target_index,
)
from study.nn.model import build_model, make_optimizer
from study.training.resources import Estimate, available_bytes, estimate, gib
from study.training.trial import select_device

WARMUP_STEPS = 2


def extreme_configs(space: SearchSpace, tensors: QM9Tensors) -> dict[str, TrialConfig]:
    """The configurations to plan: every grid entry, or an Optuna space's smallest and largest.

    Smallest and largest are chosen one dimension at a time (each at the value of least, or most,
    estimated memory given the others): exact when the cost grows with each dimension alone.
    """
    seed = space.seed_list[0]
    if space.search.method == "grid":
        return {f"grid[{k}]": space.trial_config(entry, seed) for k, entry in enumerate(space.search.grid)}
    picked = {}
    for name, pick in (("smallest", min), ("largest", max)):
        overrides: dict[str, Any] = {}
        for field, dimension in space.search.params.items():
            values = dimension.bounding_values()
            cost = {k: estimate(space.trial_config({**overrides, field: v}, seed), tensors).total_bytes for k, v in enumerate(values)}
            overrides[field] = values[pick(cost, key=cost.get)]
        picked[name] = space.trial_config(overrides, seed)
    return picked


def concurrent_trials(space: SearchSpace, num_cpus: int | None = None) -> int:
    """Trials at once on this machine: max_concurrent, else as many as its CPUs hold."""
    if space.resources.max_concurrent is not None:
        return space.resources.max_concurrent
    return max(1, int((num_cpus or os.cpu_count() or 1) // space.resources.cpus_per_trial))


def largest_config(space: SearchSpace, tensors: QM9Tensors) -> TrialConfig:
    """The configuration of the space with the largest estimated peak memory."""
    return max(extreme_configs(space, tensors).values(), key=lambda config: estimate(config, tensors).total_bytes)


def step_seconds(config: TrialConfig, tensors: QM9Tensors, steps: int) -> float:
    """Median time of a training step of ``config`` on its own molecules, after 2 untimed steps."""
    count = (WARMUP_STEPS + steps) * config.batch_size
    pool = split_indices(len(tensors), seed=config.split_seed, fractions=(1.0, 0.0, 0.0), subset=config.subset)["train"]
    molecules = QM9Dataset(tensors, pool[: min(count, len(pool))], edges=config.edges, cutoff=config.cutoff)
    device = select_device(config.device)
    torch.manual_seed(config.seed)
    model = build_model(config).to(device)
    optimizer = make_optimizer(model, config.lr)
    column = target_index(config.target)
    dtype = next(model.parameters()).dtype
    batches = list(CollatedSplit(molecules, device).batches(config.batch_size))
    seconds = []
    for index in range(WARMUP_STEPS + steps):
        batch = batches[index % len(batches)]
        batch.pos = batch.pos.to(dtype)
        elapsed = timed_step(model, optimizer, batch, column, device)
        if index >= WARMUP_STEPS:
            seconds.append(elapsed)
    return statistics.median(seconds)


def steps_per_trial(config: TrialConfig, tensors: QM9Tensors) -> int:
    splits = split_indices(
        len(tensors), seed=config.split_seed, fractions=config.split_fractions, sizes=config.split_sizes, subset=config.subset
    )
    return math.ceil(len(splits["train"]) / config.batch_size) * config.epochs


def plan_study(space: SearchSpace, name: str, tensors: QM9Tensors, steps: int = 3, log: Callable[[str], None] = print) -> dict:
    """The plan of a study as one JSON-ready document (see the module doc)."""
    started = time.perf_counter()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(space.resources.cpus_per_trial)))
    rows = []
    try:
        for label, config in extreme_configs(space, tensors).items():
            found: Estimate = estimate(config, tensors)
            log(f"calibrating {label}: l_values={list(config.l_values)} hidden_dim={config.hidden_dim}")
            per_step = step_seconds(config, tensors, steps)
            trial_steps = steps_per_trial(config, tensors)
            rows.append(
                {
                    "label": label,
                    "l_values": list(config.l_values),
                    "hidden_dim": config.hidden_dim,
                    "num_layers": config.num_layers,
                    "num_params": found.num_params,
                    "edges_per_batch": found.edges_per_batch,
                    "memory_bytes": found.total_bytes,
                    "step_seconds": per_step,
                    "steps_per_trial": trial_steps,
                    "trial_seconds": per_step * trial_steps,
                }
            )
    finally:
        torch.set_num_threads(threads_before)
    seeds = len(space.seed_list)
    configurations = len(space.search.grid) if space.search.method == "grid" else space.search.num_samples
    concurrent = concurrent_trials(space)
    trial_seconds = [row["trial_seconds"] for row in rows]
    if space.search.method == "grid":
        compute = [seeds * sum(trial_seconds)] * 2
    else:
        compute = [seeds * configurations * min(trial_seconds), seeds * configurations * max(trial_seconds)]
    return {
        "study": name,
        "method": space.search.method,
        "trials": configurations * seeds,
        "configurations": configurations,
        "seeds": seeds,
        "max_concurrent": concurrent,
        "threads_per_trial": max(1, int(space.resources.cpus_per_trial)),
        "device": select_device(space.base.device).type,
        "rows": rows,
        "compute_seconds": compute,
        # Wall time if the trials packed perfectly onto max_concurrent slots; early stopping shortens it.
        "wall_seconds": [c / concurrent for c in compute],
        "peak_memory_bytes": concurrent * max(row["memory_bytes"] for row in rows),
        "free_memory_bytes": available_bytes(select_device(space.base.device)),
        "plan_seconds": time.perf_counter() - started,
    }


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def format_plan(plan: dict) -> str:
    from rich.table import Table

    table = Table(
        title=f"study {plan['study']}: {plan['trials']} trials ({plan['configurations']} configurations x "
        f"{plan['seeds']} seeds), {plan['threads_per_trial']} thread(s) per trial on {plan['device']}",
        title_justify="left",
    )
    for column in (
        "configuration",
        "l_values",
        "hidden",
        "layers",
        "parameters",
        "edges/batch",
        "memory/trial",
        "s/step",
        "steps/trial",
        "time/trial",
    ):
        table.add_column(column, justify="left" if column in ("configuration", "l_values") else "right")
    for row in plan["rows"]:
        table.add_row(
            row["label"],
            str(row["l_values"]),
            str(row["hidden_dim"]),
            str(row["num_layers"]),
            f"{row['num_params']:,}",
            f"{row['edges_per_batch']:.0f}",
            gib(row["memory_bytes"]),
            f"{row['step_seconds']:.3f}",
            str(row["steps_per_trial"]),
            _duration(row["trial_seconds"]),
        )
    low, high = plan["compute_seconds"]
    wall_low, wall_high = plan["wall_seconds"]

    def span(a: float, b: float) -> str:
        return _duration(a) if math.isclose(a, b) else f"{_duration(a)} to {_duration(b)}"

    free = plan["free_memory_bytes"]
    lines = [
        f"compute: {span(low, high)} of training steps; wall on this machine at {plan['max_concurrent']} at once: "
        f"{span(wall_low, wall_high)} (early stopping shortens it; validation adds a few percent)",
        f"memory at {plan['max_concurrent']} trials at once: {gib(plan['peak_memory_bytes'])}"
        + (f" of {gib(free)} free" if free is not None else ""),
        f"planned in {plan['plan_seconds']:.1f} s",
    ]
    return render_text(table, *lines)
