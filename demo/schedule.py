"""The phases the demo's upstream moves through, and when: the same seed gives the same phases."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

__all__ = ["PHASES", "Phase", "Schedule", "build_schedule"]

# What each phase does to the upstream (see upstream.py), in the order they happen.
PHASES: Final = ("healthy", "outage", "slow", "rate_limited", "recovery")

# Share of the run each phase gets before the seed's jitter: the outage is the longest because it
# is the story (a breaker opens, probes, and keeps the dependency quiet).
_WEIGHTS: Final = (0.17, 0.23, 0.2, 0.2, 0.2)
_JITTER: Final = 0.15


@dataclass(frozen=True, slots=True)
class Phase:
    """One phase: its name and its span in seconds from the start of the run."""

    name: str
    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Schedule:
    """The phases of one run, back to back from 0 to ``duration``."""

    phases: tuple[Phase, ...]

    @property
    def duration(self) -> float:
        return self.phases[-1].end

    def at(self, elapsed: float) -> Phase:
        """The phase in force ``elapsed`` seconds into the run (the last one after the end)."""
        for phase in self.phases:
            if elapsed < phase.end:
                return phase
        return self.phases[-1]

    def get(self, name: str) -> Phase:
        """The phase called ``name``."""
        return next(phase for phase in self.phases if phase.name == name)


def build_schedule(duration: float, seed: int) -> Schedule:
    """Phase lengths for a run of ``duration`` seconds: the base shares, jittered by the seed."""
    rng = random.Random(seed)
    shares = [w * rng.uniform(1 - _JITTER, 1 + _JITTER) for w in _WEIGHTS]
    total = sum(shares)
    phases: list[Phase] = []
    start = 0.0
    for index, (name, share) in enumerate(zip(PHASES, shares, strict=True)):
        end = duration if index == len(PHASES) - 1 else start + duration * share / total
        phases.append(Phase(name, round(start, 3), round(end, 3)))
        start = end
    return Schedule(tuple(phases))
