"""One trial as Ray Tune runs it, in its worker process: its config from the space and the sampled
parameters, a restore from its last checkpoint after a retry, training with its MLflow run (the
journal keeps every write through a tracking outage), and the results Ray Tune sees each epoch."""

from __future__ import annotations

import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from study.config.space import SearchSpace, trial_overrides
from study.data.qm9 import QM9Tensors
from study.data.reference import TargetReference
from study.names import COMPLETED, EPOCH_SECONDS, RUNNING, VAL_MAE
from study.tracking import journal, store
from study.training.resources import num_params


@dataclass(frozen=True)
class SweepContext:
    """What every trial needs besides its config; small, so it travels with each trial."""

    space: dict  # SearchSpace.model_dump()
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    spool_dir: str  # tracking journals of trials whose writes the server could not take


# ---------------------------------------------------------------------------- the trial


def run_sweep_trial(params: dict[str, Any], tensors: QM9Tensors, context: SweepContext) -> None:
    """Ray Tune function trainable: one trial, resumable from its last Tune checkpoint."""
    import ray
    import torch
    from ray import tune

    from study.training.trial import cpu_fallback_warning, run_trial

    space = SearchSpace.model_validate(context.space)
    seed = space.seed_list[params.get("__trial_index__", 0)] if "seed" not in params else int(params["seed"])
    config = space.trial_config(trial_overrides(params), seed)
    torch.set_num_threads(max(1, int(space.resources.cpus_per_trial)))

    store.fail_fast()
    trial_id = tune.get_context().get_trial_id()
    l_text = ",".join(map(str, config.l_values))
    run = journal.TrialRun(
        context.tracking_uri,
        context.experiment_id,
        context.parent_run_id,
        trial_id,
        run_name=f"{trial_id} l={l_text} h={config.hidden_dim} seed={seed}",
        spool_dir=Path(context.spool_dir),
    )
    # Where the trial runs, beside its config: the GPUs Ray gave it ("" for none), and when
    # `device: auto` cannot use them, the warning that it trains on the CPU instead.
    placement = {"ray_gpu_ids": ",".join(str(i) for i in ray.get_gpu_ids())}
    fallback = cpu_fallback_warning(config.device)
    if fallback is not None:
        placement["device_warning"] = fallback
    run.log_params({**config.flat_params(), **placement})
    # num_params travels with every report: a multi-objective searcher needs it for every proposal,
    # early-stopped ones included.
    identity = {
        "l_values": l_text,
        "hidden_dim": config.hidden_dim,
        "seed": seed,
        "mlflow_run_id": run.run_id,
        "num_params": float(num_params(config)),
    }

    work = Path(tempfile.mkdtemp(prefix=f"irrep-study-{trial_id}-"))
    resumed = _restore_checkpoint(tune.get_checkpoint(), work, trial_id)
    last_epoch = {}
    clock = {"since": time.perf_counter()}

    def on_epoch(metrics) -> None:
        run.log_epoch(metrics.epoch, metrics.tracked())
        now = time.perf_counter()
        # Wall time of the epoch in this process (training and validation), the `epoch_seconds` objective.
        last_epoch.update(epoch=metrics.epoch, epoch_seconds=now - clock["since"], **metrics.tracked())
        clock["since"] = now
        if metrics.epoch < config.epochs:  # the last epoch is reported with the test result below
            report = {**identity, **last_epoch, "trial_status": RUNNING}
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(str(work)))

    try:
        result = run_trial(config, work, tensors=tensors, resume=resumed, on_epoch=on_epoch)
        if result.status == "diverged":
            reason = f"{result.reason} at epoch {result.diverged_epoch}"
            run.finish("diverged", reason)
            # The searcher is told with the worst value, so it steers away from here.
            tune.report(
                {
                    **identity,
                    "epoch": result.diverged_epoch,
                    VAL_MAE: math.inf,
                    "trial_status": "diverged",
                    EPOCH_SECONDS: last_epoch.get(EPOCH_SECONDS, math.inf),
                }
            )
            return
        final = {metric: getattr(result, metric) for metric in store.FINAL_METRICS}
        run.log_params(TargetReference.from_dict(result.reference).flat_params())
        run.log_final(final, work)
        run.finish(COMPLETED)
        tune.report({**identity, **last_epoch, **final, "trial_status": COMPLETED})
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _restore_checkpoint(checkpoint, work: Path, trial_id: str) -> bool:
    """Copy the trial's last Tune checkpoint into `work`; False when there is none to continue from.

    A driver killed between Ray's experiment snapshot and its next one can leave the snapshot
    pointing at a checkpoint that `num_to_keep` has since deleted. The trial then starts over
    (training is seeded, so it logs the same epochs, which the journal does not log twice)
    instead of failing every retry on the missing file."""
    if checkpoint is None:
        return False
    try:
        with checkpoint.as_directory() as saved:
            shutil.copy(Path(saved) / "checkpoint.pt", work / "checkpoint.pt")
        return True
    except OSError as problem:
        print(f"trial {trial_id}: its last checkpoint is unreadable ({problem}); starting it over", file=sys.stderr)
        return False
