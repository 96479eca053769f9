"""A shipped study, shrunk, trained end to end once per backend (``irrep-study bench --study``).

Per-step timings leave out what a study pays besides the tensor product: splits and the
composition fit, collating, validation every epoch, the test embeddings. Here a shrunk copy of a
search space (``--shrink 4x1x2``: 4 of its configurations x its first seed x 2 epochs, on the
space's own data size) runs through :func:`study.training.trial.run_trial` once per backend, with the
torch threads of one trial of the study (``resources.cpus_per_trial``) and no Ray or MLflow
around it. Configurations: evenly spaced entries of a grid, or an Optuna space's own random
sampler (seeded by ``search.seed``) for an Optuna space. The backends take turns per
configuration, the order flipped each time, so a slow phase of a shared machine hits both.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from study.config.space import OptunaSpace, SearchSpace, trial_overrides
from study.config.trial import TrialConfig
from study.data.qm9 import QM9Tensors
from study.errors import UserError
from study.names import TEST_MAE
from study.nn.model import BACKENDS
from study.training.trial import run_trial


@dataclass(frozen=True)
class Shrink:
    """``CONFIGSxSEEDSxEPOCHS``: how much of a study to run."""

    configurations: int
    seeds: int
    epochs: int


def parse_shrink(spec: str) -> Shrink:
    parts = spec.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UserError(f"--shrink {spec}: expected CONFIGSxSEEDSxEPOCHS of positive integers, e.g. 4x1x2")
    return Shrink(*map(int, parts))


def shrunk_configs(space: SearchSpace, shrink: Shrink) -> list[TrialConfig]:
    """``shrink.configurations`` configurations of the space x its first ``shrink.seeds`` seeds."""
    if space.search.method == "grid":
        grid = space.search.grid
        picks = np.unique(np.round(np.linspace(0, len(grid) - 1, min(shrink.configurations, len(grid)))).astype(int))
        overrides = [dict(grid[k]) for k in picks]
    else:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=space.search.seed))
        proposals = OptunaSpace(space.search)
        overrides = []
        for _ in range(shrink.configurations):
            trial = study.ask()
            constants = proposals(trial)
            overrides.append(trial_overrides({**trial.params, **constants}))
    seeds = space.seed_list[: shrink.seeds]
    return [space.trial_config(entry, seed).model_copy(update={"epochs": shrink.epochs}) for entry in overrides for seed in seeds]


def run_study_bench(
    space: SearchSpace,
    name: str,
    shrink: Shrink,
    tensors: QM9Tensors,
    device: str = "auto",
    log: Callable[[str], None] = print,
) -> dict:
    """Wall seconds of every shrunk trial per backend, their totals and the e3nn/fast ratio."""
    configs = shrunk_configs(space, shrink)
    threads = space.resources.cpus_per_trial if device != "cuda" else torch.get_num_threads()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    trials = []
    try:
        with tempfile.TemporaryDirectory(prefix="irrep-bench-study-") as scratch:
            for index, config in enumerate(configs):
                order = list(BACKENDS) if index % 2 == 0 else list(reversed(BACKENDS))
                row = {"l_values": list(config.l_values), "seed": config.seed, "seconds": {}, TEST_MAE: {}}
                for backend in order:
                    trial_config = config.model_copy(update={"backend": backend, "device": device})
                    started = time.perf_counter()
                    result = run_trial(trial_config, Path(scratch) / f"{index}-{backend}", tensors=tensors)
                    row["seconds"][backend] = time.perf_counter() - started
                    row[TEST_MAE][backend] = result.test_mae_meV
                log(
                    f"  trial {index + 1}/{len(configs)} l={row['l_values']}: "
                    + ", ".join(f"{b} {row['seconds'][b]:.1f} s" for b in BACKENDS)
                )
                trials.append(row)
    finally:
        torch.set_num_threads(previous_threads)
    totals = {backend: sum(t["seconds"][backend] for t in trials) for backend in BACKENDS}
    return {
        "study": name,
        "shrink": f"{shrink.configurations}x{shrink.seeds}x{shrink.epochs}",
        "device": device,
        "threads": int(threads),
        "subset": configs[0].subset,
        "trials": trials,
        "total_seconds": totals,
        "speedup": totals["e3nn"] / totals["fast"],
    }


def format_study_bench(report: dict) -> str:
    totals = report["total_seconds"]
    return (
        f"study {report['study']} shrunk to {report['shrink']} (configurations x seeds x epochs), "
        f"{report['subset'] or 'all'} molecules, device {report['device']}, {report['threads']} torch thread(s) per trial\n"
        f"end to end: e3nn {totals['e3nn']:.1f} s, fast {totals['fast']:.1f} s: fast is {report['speedup']:.2f}x faster"
    )
