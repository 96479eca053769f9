"""The sweep's live status on stderr (a Ray Tune callback): trials done of the total, how many run,
the best validation MAE so far and its configuration, an ETA, and a table of the live trials with
the searched parameters as columns."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from ray.tune import Callback

from study.config.space import SearchSpace
from study.names import BEST_VAL_MAE, FAILED, RUNNING, STOPPED_EARLY, VAL_MAE


class SweepStatus(Callback):
    """One live status of the sweep on stderr: trials done of the total, how many run, the best
    validation MAE so far with the configuration that holds it, an ETA, and the live trials with
    the searched parameters as columns.

    On a terminal it is redrawn in place (rich's Live, at most about once a second) and its final
    state stays on screen. Elsewhere (logs, CI, nohup) it prints a compact block when something
    changed, at most every `every_seconds`, a heartbeat every `quiet_seconds` when nothing did,
    and the final state at the end.

    Ray pickles the callbacks with the run config (and `--resume` unpickles them): the console and
    the Live display are created at the first step and left out of the pickled state."""

    def __init__(
        self,
        space: SearchSpace,
        every_seconds: float = 10.0,
        quiet_seconds: float = 120.0,
        live_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        terminal: bool | None = None,
    ):
        # Plain values rather than the space itself: what the status needs, small to pickle.
        self.name = space.name
        self.total = space.total_trials
        if space.search.method == "grid":
            self.params = list(dict.fromkeys(key for entry in space.search.grid for key in entry))
        else:
            self.params = list(space.search.params)
        self.seeds = list(space.seed_list)
        self.grid = space.search.method == "grid"
        # A grid entry without one of the columns' keys trains with the base trial's value.
        base = space.base
        self.defaults = {name: getattr(base, name, None) for name in self.params} if self.grid else {}
        self.every_seconds = every_seconds  # not a terminal: at most this often
        self.quiet_seconds = quiet_seconds  # not a terminal, nothing changed: only this often
        self.live_seconds = live_seconds  # a terminal: redrawn at most this often
        self.clock = clock
        self.terminal = terminal  # None: whether stderr is a terminal, seen at the first step
        self._reset()

    def _reset(self) -> None:
        self._console = None
        self._live = None
        self._started: float | None = None  # clock at the first step of this driver
        self._epochs_at_start = 0  # epochs trained before it (a resumed sweep's restored trials)
        self._last_shown = -math.inf
        self._last_key: tuple | None = None
        self._best_val: dict[str, float] = {}  # trial id -> lowest validation MAE it reported

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in ("_console", "_live", "_started", "_epochs_at_start", "_last_shown", "_last_key", "_best_val"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    # -------------------------------------------------------------- what is shown

    def param_values(self, trial) -> dict[str, str]:
        config = trial.config or {}
        source = {**self.defaults, **config.get("grid_entry", {})} if self.grid else config
        return {name: _shown(source.get(name)) for name in self.params}

    def seed(self, trial) -> Any:
        result = trial.last_result or {}
        if "seed" in result:
            return result["seed"]
        index = (trial.config or {}).get("__trial_index__", 0)  # as run_sweep_trial maps it
        return self.seeds[index] if 0 <= index < len(self.seeds) else "-"

    def lowest_val(self, trial) -> float | None:
        """The trial's lowest validation MAE reported so far (never its test MAE)."""
        result = trial.last_result or {}
        values = [self._best_val.get(trial.trial_id), result.get(VAL_MAE), result.get(BEST_VAL_MAE)]
        finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        return min(finite) if finite else None

    @staticmethod
    def status(trial) -> str:
        if trial.status == "TERMINATED":
            ended = (trial.last_result or {}).get("trial_status")
            # A trial the scheduler stopped last reported itself as running.
            return {RUNNING: STOPPED_EARLY, None: "done"}.get(ended, ended)
        return FAILED if trial.status == "ERROR" else trial.status.lower()

    def snapshot(self, trials, now: float) -> dict:
        """Everything the status shows, from Tune's trials at clock time `now`."""
        trials = list(trials)
        epochs = {t.trial_id: int((t.last_result or {}).get("epoch") or 0) for t in trials}
        if self._started is None:
            self._started, self._epochs_at_start = now, sum(epochs.values())
        finished = [t for t in trials if t.status in ("TERMINATED", "ERROR")]
        ended: dict[str, int] = {}
        for trial in finished:
            ended[self.status(trial)] = ended.get(self.status(trial), 0) + 1
        live = [t for t in trials if t.status in ("RUNNING", "PAUSED")]
        rated = [(value, t) for t in trials if (value := self.lowest_val(t)) is not None]
        best = None
        if rated:
            value, trial = min(rated, key=lambda pair: pair[0])
            best = {"value": value, "trial": trial.trial_id, "params": self.param_values(trial), "seed": self.seed(trial)}
        return {
            "done": len(finished),
            "total": max(self.total, len(trials)),
            "ended": ended,
            RUNNING: sum(t.status == "RUNNING" for t in trials),
            "paused": sum(t.status == "PAUSED" for t in trials),
            "best": best,
            "eta": self.eta(trials, finished, epochs, now),
            "elapsed": now - self._started,
            "live": [
                {
                    "trial": t.trial_id,
                    **self.param_values(t),
                    "seed": self.seed(t),
                    "epoch": epochs[t.trial_id],
                    "val": (t.last_result or {}).get(VAL_MAE),
                    "status": self.status(t),
                }
                for t in live
            ],
        }

    def eta(self, trials, finished, epochs: dict[str, int], now: float) -> float | None:
        """Seconds left at the throughput so far (trial-epochs trained per second by this driver),
        each unfinished trial expected to train as many epochs as the finished ones did on average
        (with ASHA that counts the trials it stopped early). None until a trial finished."""
        elapsed = now - self._started
        trained = sum(epochs.values()) - self._epochs_at_start
        if not finished or elapsed <= 0 or trained <= 0:
            return None
        expected = sum(epochs[t.trial_id] for t in finished) / len(finished)
        unfinished = [t for t in trials if t.status not in ("TERMINATED", "ERROR")]
        left = sum(max(expected - epochs[t.trial_id], 0.0) for t in unfinished)
        left += max(self.total - len(trials), 0) * expected  # trials the searcher has not proposed yet
        return left / (trained / elapsed)

    def renderable(self, snap: dict):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        ended = ", ".join(f"{n} {status}" for status, n in sorted(snap["ended"].items()))
        head = f"{self.name} {datetime.now():%H:%M:%S}: {snap['done']}/{snap['total']} trials done"
        head += f" ({ended})" if ended else ""
        head += f" | {snap['running']} running" + (f", {snap['paused']} paused" if snap["paused"] else "")
        head += f" | {_duration(snap['elapsed'])} elapsed, ETA {_duration(snap['eta'])}"
        best = snap["best"]
        if best is None:
            best_line = "best val MAE: -"
        else:
            params = " ".join(f"{name}={value}" for name, value in best["params"].items())
            best_line = f"best val MAE: {best['value']:.1f} meV  {params} seed={best['seed']} (trial {best['trial']})"
        parts: list[Any] = [Text(head), Text(best_line)]
        if snap["live"]:
            table = Table(box=None, padding=(0, 1), show_edge=False)
            for column in ("trial", *self.params, "seed", "epoch", "val MAE (meV)", "status"):
                table.add_column(column)
            for row in snap["live"]:
                table.add_row(
                    row["trial"],
                    *(row[name] for name in self.params),
                    str(row["seed"]),
                    str(row["epoch"]),
                    _shown_mae(row["val"]),
                    row["status"],
                )
            parts.append(table)
        return Group(*parts)

    # -------------------------------------------------------------- Tune's hooks

    def _show(self, trials, final: bool = False) -> None:
        from rich.console import Console

        if self._console is None:
            self._console = Console(stderr=True)
            if self.terminal is None:
                self.terminal = self._console.is_terminal
            if not self.terminal:
                self._console.width = 120  # a log has no width; rich would fold the table at 80
        now = self.clock()
        snap = self.snapshot(trials, now)
        if self.terminal:
            if self._live is None:
                from rich.live import Live

                self._live = Live(console=self._console, auto_refresh=False, transient=False)
                self._live.start()
            if final or now - self._last_shown >= self.live_seconds:
                self._last_shown = now
                self._live.update(self.renderable(snap), refresh=True)
            if final:
                self._live.stop()  # not transient: the final state stays on screen
                self._live = None
            return
        since = now - self._last_shown
        if not final and since < self.every_seconds:
            return
        # What counts as a change: the trials' states and the best, not the clock or the ETA.
        key = (
            snap["done"],
            tuple(sorted(snap["ended"].items())),
            snap[RUNNING],
            snap["paused"],
            snap["best"] and snap["best"]["value"],
            tuple(tuple(row.items()) for row in snap["live"]),
        )
        if final or key != self._last_key or since >= self.quiet_seconds:
            self._last_shown, self._last_key = now, key
            self._console.print(self.renderable(snap))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(VAL_MAE)
        if isinstance(value, (int, float)) and math.isfinite(value):
            self._best_val[trial.trial_id] = min(value, self._best_val.get(trial.trial_id, math.inf))

    def on_step_end(self, iteration, trials, **info):
        self._show(trials)

    def on_experiment_end(self, trials, **info):
        self._show(trials, final=True)


def _shown(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _shown_mae(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"
