"""Counts over a sliding window of time, on the buttress clock (the retry budget, the throttle).

The window is kept as :data:`SLOTS` slots and slides one slot at a time: a count leaves the window
between ``window`` and ``window * (1 + 1/SLOTS)`` seconds after it was added. Not thread-safe on
its own: its owner calls it under its own lock (one lock for the counts and the decision on them).
"""

from __future__ import annotations

from typing import Final

__all__ = ["SLOTS", "SlidingCounts"]

SLOTS: Final = 10


class SlidingCounts:
    """``kinds`` counters (a first attempt, a retry...) summed over the last ``window`` seconds.

    ``current`` is the slot being filled until ``slot_end``: an owner on a hot path may count into
    it directly (``current[kind] += 1; totals[kind] += 1``) while ``now < slot_end``, and call
    :meth:`add` otherwise.
    """

    __slots__ = ("_slot", "_slots", "_tick", "current", "slot_end", "totals", "window")

    def __init__(self, window: float, kinds: int) -> None:
        self.window = window
        self._slot = window / SLOTS
        self._slots = [[0] * kinds for _ in range(SLOTS)]
        self._tick = 0
        self.current = self._slots[0]
        self.slot_end = 0.0  # the first add() slides to its own time
        # The sum of each counter over the window as of the last ``advance``.
        self.totals = [0] * kinds

    def advance(self, now: float) -> list[int]:
        """Slide the window to ``now``; return the counters of the slot ``now`` falls in."""
        if now < self.slot_end:
            return self.current
        tick = int(now // self._slot)
        passed = tick - self._tick
        if passed:
            totals = self.totals
            if passed >= SLOTS or passed < 0:
                for counts in self._slots:
                    counts[:] = [0] * len(counts)
                totals[:] = [0] * len(totals)
            else:
                for step in range(1, passed + 1):
                    gone = self._slots[(self._tick + step) % SLOTS]
                    for kind, count in enumerate(gone):
                        totals[kind] -= count
                        gone[kind] = 0
            self._tick = tick
        self.current = self._slots[tick % SLOTS]
        self.slot_end = (tick + 1) * self._slot
        return self.current

    def add(self, now: float, kind: int) -> None:
        """Count one of ``kind`` at ``now``."""
        self.advance(now)[kind] += 1
        self.totals[kind] += 1
