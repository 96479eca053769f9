"""Every check before a sweep, in one step the CLI calls once: the search space, the folders, the
Optuna storage, the tracking server, QM9, the memory of the largest trial on this machine, and
Ray's resources. Each refusal is one line (UserError) and comes before any work: nothing is
written to the tracking store or a sweep folder until every check has passed (the last check,
of Ray's resources, needs Ray connected, or a local Ray started).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from study.config.space import SearchSpace, load_search_space
from study.data.cache import cache_folder
from study.data.qm9 import QM9Tensors, load_qm9
from study.paths import writable_folder
from study.sweep.cluster import check_resources, connect_ray
from study.sweep.folder import check_optuna_storage
from study.tracking.store import check_reachable, resolve_tracking_uri
from study.training.plan import concurrent_trials, largest_config
from study.training.resources import check_memory


@dataclass(frozen=True)
class CheckedSweep:
    """A sweep that passed every check, with Ray connected: what `run_sweep` starts from."""

    space: SearchSpace
    tensors: QM9Tensors
    tracking_uri: str


def check_sweep(
    space_path: Path,
    storage: Path,
    cache_dir: Path | None,
    tracking_uri: str | None = None,
    address: str | None = None,
    resume: bool = False,
    num_cpus: int | None = None,
    optuna_storage: str | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> CheckedSweep:
    """The checks in the order that costs least first. `cache_dir`: QM9's cache folder (None: the
    default). Without `address` the trials run here: the largest configuration of the space,
    as many at once as the space runs, must fit this machine's memory (`force` skips that check;
    on a cluster, `irrep-study plan` gives the figures to budget it)."""
    space = load_search_space(space_path)
    writable_folder(storage, "--storage")
    qm9_folder = cache_folder(cache_dir)
    if optuna_storage is not None:
        check_optuna_storage(space, resume, optuna_storage)
    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    tensors = load_qm9(qm9_folder, log=log)
    if address is None:
        check_memory(largest_config(space, tensors), tensors, "sweep", copies=concurrent_trials(space, num_cpus), force=force, log=log)
    connect_ray(address, num_cpus=num_cpus)
    check_resources(space)
    return CheckedSweep(space, tensors, uri)
