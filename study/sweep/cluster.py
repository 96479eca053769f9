"""Joining Ray: a local Ray for this machine or the cluster at `--address`, and the check that the
cluster can place one trial of the space (CPUs, GPUs) before any work starts."""

from __future__ import annotations

import os
from typing import Any

from study.config.space import SearchSpace
from study.errors import UserError


def connect_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (`auto`, `host:port`, `ray://host:port`), or start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    if address is not None and address != "auto":
        _check_port_open(address)
    # Ray warns on every checkpoint of short trials that snapshots come often; that is by design here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": False}
    try:
        if address is None:
            # "local": a Ray of this process's own. Without an address, ray.init first looks for a
            # Ray someone started on this machine (`ray start`, RAY_ADDRESS) and joins it, or, with
            # num_cpus given, refuses to start at all.
            ray.init(address="local", num_cpus=num_cpus, **kwargs)
        else:
            kwargs.pop("include_dashboard")
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        if address is None:
            raise UserError(f"cannot start a local Ray ({reason})") from None
        raise UserError(f"--address {address}: cannot connect to the Ray cluster ({reason})") from None


def _check_port_open(address: str, timeout: float = 5.0) -> None:
    """ray.init waits minutes on an address where nothing listens; a plain TCP connect answers at once."""
    import socket

    host_port = address.removeprefix("ray://")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {address}: expected auto, host:port or ray://host:port")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise UserError(f"--address {address}: no Ray cluster answers there ({exc.strerror or type(exc).__name__})") from None


def check_resources(space: SearchSpace) -> None:
    """Refuse a trial that no node of the cluster could ever hold, instead of waiting forever."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    most_cpus = max((n["Resources"].get("CPU", 0) for n in nodes), default=0)
    most_gpus = max((n["Resources"].get("GPU", 0) for n in nodes), default=0)
    wanted = space.resources
    if wanted.gpus_per_trial > most_gpus:
        raise UserError(
            f"resources.gpus_per_trial: {wanted.gpus_per_trial:g} GPUs per trial, but no node of the cluster has more than {most_gpus:g}"
        )
    if wanted.cpus_per_trial > most_cpus:
        raise UserError(
            f"resources.cpus_per_trial: {wanted.cpus_per_trial:g} CPUs per trial, but no node of the cluster has more than {most_cpus:g}"
        )
