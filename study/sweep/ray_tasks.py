"""Ray tasks behind the standard `concurrent.futures.Executor` interface: how `irrep-study analyze
--address` scores trials on a cluster's workers while analysis/ itself imports no Ray (it only
calls `submit` and waits on the futures, as it does for its local process pool).

Each submitted call is one Ray task of one CPU (the scoring runs on one thread, so its scores are
the same bits wherever it runs); Ray places the tasks on the cluster's free CPUs and retries one
whose node died. The callable must be importable by name on every node (a module-level function
of the installed package), and its arguments travel pickled through Ray's object store."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any


class RayTaskExecutor(Executor):
    """Runs each `submit`ted call as a Ray task of ``num_cpus`` CPUs on the connected cluster
    (study.sweep.cluster.connect_ray first)."""

    def __init__(self, num_cpus: float = 1):
        self._num_cpus = num_cpus
        self._tasks: dict[Callable, Any] = {}  # callable -> its ray.remote wrapper
        self._refs: list[Any] = []

    def submit(self, fn: Callable, /, *args, **kwargs) -> Future:
        import ray

        if fn not in self._tasks:
            self._tasks[fn] = ray.remote(num_cpus=self._num_cpus)(fn)
        ref = self._tasks[fn].remote(*args, **kwargs)
        self._refs.append(ref)
        return ref.future()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """With ``cancel_futures``: the tasks not finished are cancelled (a finished one is left
        as it is). The cluster stays connected: it is not this executor's."""
        import ray

        if cancel_futures:
            for ref in self._refs:
                ray.cancel(ref)
        if wait and self._refs:
            ray.wait(self._refs, num_returns=len(self._refs), timeout=60)
        self._refs = []
