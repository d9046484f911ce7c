"""The rate windows: calls, failures and slow calls of the last ``window_seconds`` (``Window``)
or of the last ``window_size`` calls (``CountWindow``)."""

from __future__ import annotations

from typing import Final

__all__ = ["CountWindow", "Window"]

# The rate window slides in this many steps: a call leaves it at most window_seconds/20 late.
_BUCKETS: Final = 20


class Window:
    """Calls, failures and slow calls of the last ``seconds``, in buckets: O(1) per call."""

    __slots__ = ("_calls", "_failures", "_head", "_slow", "_width", "calls", "failures", "slow")

    def __init__(self, seconds: float, now: float) -> None:
        self._width = seconds / _BUCKETS
        self._head = int(now // self._width)  # the bucket number that ``now`` falls in
        self._calls = [0] * _BUCKETS
        self._failures = [0] * _BUCKETS
        self._slow = [0] * _BUCKETS
        self.calls = self.failures = self.slow = 0

    def roll(self, now: float) -> int:
        """Drop the buckets that fell out of the window; return the index of ``now``'s bucket."""
        tick = int(now // self._width)
        head = self._head
        if tick > head:
            if tick - head >= _BUCKETS:
                self._calls = [0] * _BUCKETS
                self._failures = [0] * _BUCKETS
                self._slow = [0] * _BUCKETS
                self.calls = self.failures = self.slow = 0
            else:
                for passed in range(head + 1, tick + 1):
                    i = passed % _BUCKETS
                    self.calls -= self._calls[i]
                    self.failures -= self._failures[i]
                    self.slow -= self._slow[i]
                    self._calls[i] = self._failures[i] = self._slow[i] = 0
            self._head = tick
        # A thread that read the clock before another one recorded lands in the newest bucket.
        return self._head % _BUCKETS

    def add(self, now: float, *, failed: bool, slow: bool) -> None:
        i = self.roll(now)
        self._calls[i] += 1
        self.calls += 1
        if failed:
            self._failures[i] += 1
            self.failures += 1
        if slow:
            self._slow[i] += 1
            self.slow += 1

    @property
    def failure_rate(self) -> float:
        return self.failures / self.calls if self.calls else 0.0

    @property
    def slow_call_rate(self) -> float:
        return self.slow / self.calls if self.calls else 0.0


class CountWindow:
    """Calls, failures and slow calls of the last ``size`` calls, in a ring: O(1) per call.

    Time does not move it (``roll`` is there so both windows read alike): a quiet service keeps
    its last calls' rates until new calls push them out.
    """

    __slots__ = ("_next", "_ring", "calls", "failures", "slow")

    def __init__(self, size: int) -> None:
        # Each slot holds a call's bits: 1 failed, 2 slow; None until that many calls were seen.
        self._ring: list[int | None] = [None] * size
        self._next = 0
        self.calls = self.failures = self.slow = 0

    def roll(self, now: float) -> int:
        return self._next

    def add(self, now: float, *, failed: bool, slow: bool) -> None:
        ring = self._ring
        i = self._next
        old = ring[i]
        if old is None:
            self.calls += 1
        else:
            self.failures -= old & 1
            self.slow -= old >> 1
        ring[i] = failed | slow << 1
        self.failures += failed
        self.slow += slow
        self._next = i + 1 if i + 1 < len(ring) else 0

    @property
    def failure_rate(self) -> float:
        return self.failures / self.calls if self.calls else 0.0

    @property
    def slow_call_rate(self) -> float:
        return self.slow / self.calls if self.calls else 0.0
