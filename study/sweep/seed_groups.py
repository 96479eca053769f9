"""Seed-aware successive halving: the seeds of one configuration continue or stop together.

ASHA judges every trial alone, so with several seeds per configuration one seed can be stopped at
the first rung while another runs to the end, and the searcher then averages seeds measured at
different epochs. Here the trials of one configuration (its seeds) form a group. A trial that
reaches a rung waits there (Tune pauses it; it resumes from its checkpoint) until every live seed
of its group has reached the rung; then the group continues or stops as a whole, judged by the
mean of its seeds at that rung against ASHA's cutoff: the (1 - 1/reduction_factor) quantile of the
group means recorded at that rung before it. Stopped seeds therefore stop at the same epoch, and a
sweep never ends with one seed of a configuration stopped and another completed.

A seed that ends on its own (diverged, or finished before the last epoch) counts with its last
value at every later rung; a non-finite group mean (a diverged seed) stops the group. A seed that
fails for good, or is removed, no longer counts. Pure bookkeeping, no Ray: study/sweep/scheduling.py adapts
it to Ray Tune's TrialScheduler interface.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from study.config.configuration import configuration_key

CONTINUE, PAUSE, STOP = "continue", "pause", "stop"


def rungs(grace_period: float, reduction_factor: float, max_t: int) -> list[int]:
    """The epochs at which groups are judged: ASHA's milestones grace * rf**k, rounded up to whole
    epochs, below `max_t` (a trial that reaches `max_t` is done anyway)."""
    if grace_period <= 0 or reduction_factor <= 1:
        raise ValueError("grace_period must be positive and reduction_factor above 1")
    found: list[int] = []
    k = 0
    while True:
        milestone = math.ceil(grace_period * reduction_factor**k - 1e-9)
        if milestone >= max_t:
            return found
        if not found or milestone > found[-1]:
            found.append(milestone)
        k += 1


def seed_of(config: dict[str, Any]) -> Any:
    return config.get("__trial_index__", config.get("seed"))


@dataclass
class Verdict:
    """What to do: with the trial that reported (`trial`), and with other, paused seeds."""

    trial: str = CONTINUE
    stop: list[str] = field(default_factory=list)  # paused seeds to stop now
    release: list[str] = field(default_factory=list)  # paused seeds that may resume

    def merge(self, other: Verdict) -> Verdict:
        self.stop += other.stop
        self.release += other.release
        return self


@dataclass
class _Seed:
    trial_id: str
    seed: Any
    state: str = "live"  # live | finished (ended on its own) | stopped (by its group) | dropped (failed, removed)
    reached: dict[int, float] = field(default_factory=dict)  # rung -> value when it got there
    final: float | None = None  # last value of a finished seed
    waiting_at: int | None = None  # the rung it is paused at


@dataclass
class _Group:
    number: int
    key: str
    seeds: dict[str, _Seed] = field(default_factory=dict)
    decided: dict[int, str] = field(default_factory=dict)  # rung -> CONTINUE | STOP
    means: dict[int, float] = field(default_factory=dict)  # rung -> seed mean it was judged on
    complete: bool = False  # every seed has been added (or no more will come)
    stopped: bool = False


class SeedGroups:
    """Groups trials by configuration and decides, per rung, for each group as a whole."""

    def __init__(self, rung_epochs: list[int], group_size: int, reduction_factor: float, mode: str = "min"):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be min or max, got {mode!r}")
        if group_size < 1:
            raise ValueError("group_size must be at least 1")
        self.rungs = sorted(set(rung_epochs))
        self.group_size = group_size
        self.reduction_factor = reduction_factor
        self.sign = -1.0 if mode == "min" else 1.0  # scores: higher is better, as in ASHA
        self.groups: list[_Group] = []
        self.group_of: dict[str, int] = {}
        self.recorded: dict[int, dict[int, float]] = {rung: {} for rung in self.rungs}
        # A configuration proposed twice (Optuna can repeat itself) is two groups with one decision
        # per rung, the first one taken: its seeds never end split between stopped and completed.
        self.decisions: dict[tuple[str, int], str] = {}
        self.released: set[str] = set()  # paused seeds whose group passed their rung

    # ------------------------------------------------------------------------ membership

    def add(
        self, trial_id: str, config: dict[str, Any], state: str = "live", epoch: float | None = None, value: float | None = None
    ) -> bool:
        """A new trial, or (on a resumed sweep) a restored one with its state and last result.

        True: a restored trial that was waiting at a rung; it must stay paused until its group
        decides (`settle` then releases or stops it, as it does the rest of a restored sweep)."""
        if trial_id in self.group_of:
            return False
        key, seed = configuration_key(config), seed_of(config)
        group = next(
            (g for g in self.groups if g.key == key and not g.complete and seed not in {s.seed for s in g.seeds.values()}),
            None,
        )
        if group is None:  # the first seed of a configuration (or of a repeated proposal of one)
            group = _Group(len(self.groups), key)
            self.groups.append(group)
        member = _Seed(trial_id, seed, state=state)
        group.seeds[trial_id] = member
        self.group_of[trial_id] = group.number
        group.complete = len(group.seeds) >= self.group_size
        if state == "stopped":
            group.stopped = True
        elif state == "finished":
            member.final = value
        elif state == "live" and epoch is not None:
            for rung in self.rungs:
                if rung < epoch:  # it went past this rung before the sweep was resumed: its group passed it
                    group.decided.setdefault(rung, CONTINUE)
                elif rung == epoch and value is not None:
                    member.reached[rung] = value
                    member.waiting_at = rung
        return member.waiting_at is not None

    def group(self, trial_id: str) -> _Group | None:
        number = self.group_of.get(trial_id)
        return None if number is None else self.groups[number]

    # ------------------------------------------------------------------------ events

    def result(self, trial_id: str, epoch: float, value: float, final: bool = False) -> Verdict:
        """A trial reported `value` after `epoch` epochs; `final`: it ends with this result."""
        group = self.group(trial_id)
        if group is None:
            return Verdict(STOP if final else CONTINUE)
        member = group.seeds[trial_id]
        self.released.discard(trial_id)
        member.waiting_at = None
        if member.state != "live" or group.stopped:
            if member.state == "live":
                member.state = "stopped"
            return Verdict(STOP)
        if final:
            member.state, member.final = "finished", value
            verdict = self._advance(group, trigger=None)
            verdict.trial = STOP
            return verdict
        for rung in self.rungs:
            if rung <= epoch and rung not in member.reached:
                member.reached[rung] = value
        return self._advance(group, trigger=member)

    def end(self, trial_id: str, how: str, value: float | None = None) -> Verdict:
        """A trial ended outside `result`: finished on its own, stopped as its group decided, or
        dropped (failed for good, removed); the rest of its group may now be able to go on."""
        group = self.group(trial_id)
        if group is None:
            return Verdict()
        member = group.seeds[trial_id]
        self.released.discard(trial_id)
        member.waiting_at = None
        if member.state == "live":
            member.state = how
            if how == "finished":
                member.final = value
        if group.stopped:
            return Verdict()
        return self._advance(group, trigger=None)

    def close(self) -> Verdict:
        """No more trials will come: groups still short of seeds decide with the seeds they have."""
        for group in self.groups:
            group.complete = True
        return self.settle()

    def settle(self) -> Verdict:
        """Bring every group in line with what is known (after restoring a sweep, or `close`):
        live seeds of stopped groups stop, seeds waiting at a rung their group passed are released,
        and rungs every live seed has reached are decided."""
        verdict = Verdict()
        for group in self.groups:
            live = [s for s in group.seeds.values() if s.state == "live"]
            if group.stopped:
                for seed in live:
                    seed.state, seed.waiting_at = "stopped", None
                    self.released.discard(seed.trial_id)
                    verdict.stop.append(seed.trial_id)
                continue
            for seed in live:
                if seed.waiting_at is not None and group.decided.get(seed.waiting_at) == CONTINUE:
                    seed.waiting_at = None
                    self.released.add(seed.trial_id)
                    verdict.release.append(seed.trial_id)
            verdict.merge(self._advance(group, trigger=None))
        return verdict

    # ------------------------------------------------------------------------ decisions

    def _advance(self, group: _Group, trigger: _Seed | None) -> Verdict:
        """Decide every rung of `group` that has become decidable, lowest first."""
        verdict = Verdict()
        for rung in self.rungs:
            if rung in group.decided:
                continue
            if trigger is not None and rung not in trigger.reached:
                break  # the trial that reported is below this rung: nothing to decide for it yet
            if not self._ready(group, rung):
                if trigger is not None:
                    trigger.waiting_at = rung
                    verdict.trial = PAUSE
                break
            waiting = [s for s in group.seeds.values() if s.state == "live" and s is not trigger and s.waiting_at == rung]
            if self._decide(group, rung) == STOP:
                group.stopped = True
                for seed in waiting:
                    seed.state, seed.waiting_at = "stopped", None
                    self.released.discard(seed.trial_id)
                    verdict.stop.append(seed.trial_id)
                if trigger is not None:
                    trigger.state = "stopped"
                    verdict.trial = STOP
                # Seeds of the group still running (only after a resumed sweep) stop at their next result.
                return verdict
            for seed in waiting:
                seed.waiting_at = None
                self.released.add(seed.trial_id)
                verdict.release.append(seed.trial_id)
        return verdict

    def _ready(self, group: _Group, rung: int) -> bool:
        if not group.complete:
            return False
        return all(rung in s.reached for s in group.seeds.values() if s.state == "live")

    def _values(self, group: _Group, rung: int) -> list[float]:
        values = []
        for seed in group.seeds.values():
            if seed.state == "live" or (seed.state == "finished" and rung in seed.reached):
                values.append(seed.reached[rung])
            elif seed.state == "finished" and seed.final is not None:
                values.append(seed.final)
        return values

    def _decide(self, group: _Group, rung: int) -> str:
        import numpy as np

        values = self._values(group, rung)
        if not values:  # every seed failed or was removed: nothing left to stop
            group.decided[rung] = CONTINUE
            return CONTINUE
        mean = math.fsum(values) / len(values) if all(math.isfinite(v) for v in values) else math.inf
        group.means[rung] = mean
        if (group.key, rung) in self.decisions:
            decision = self.decisions[(group.key, rung)]
        elif not math.isfinite(mean):
            decision = STOP
        else:
            score = self.sign * mean
            recorded = self.recorded[rung]
            cutoff = np.nanpercentile(list(recorded.values()), (1 - 1 / self.reduction_factor) * 100) if recorded else None
            decision = STOP if cutoff is not None and score < cutoff else CONTINUE
            recorded[group.number] = score
        self.decisions.setdefault((group.key, rung), decision)
        group.decided[rung] = decision
        return decision

    def summary(self) -> str:
        parts = []
        for rung in self.rungs:
            scores = list(self.recorded[rung].values())
            parts.append(f"epoch {rung}: {len(scores)} configurations judged")
        return "; ".join(parts) or "no rungs"
