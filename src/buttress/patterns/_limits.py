"""Adaptive concurrency limits: how many calls a dependency can take, learned from its answers.

The algorithms of Netflix concurrency-limits (``AIMDLimit``, ``Gradient2Limit``), as plain
arithmetic: each gets one sample (a round-trip time, the calls in flight, and whether a call was
*dropped*: timed out or refused) and returns the new limit. As in concurrency-limits'
``WindowedLimit``, the samples of the finished calls are gathered into windows (at least
:data:`WINDOW_SECONDS` and :data:`WINDOW_SAMPLES` calls) and the algorithm sees one sample per
window: the average round-trip time, the most calls in flight, and whether any call dropped. So a
limit moves about once a second whatever the traffic, and its long-term average spans minutes,
not milliseconds. The adaptive bulkhead (:mod:`buttress.patterns.bulkhead`) calls them under its
lock, with the time; nothing here reads the clock or waits.
"""

from __future__ import annotations

import math
from typing import Final, Literal

__all__ = [
    "AIMD",
    "WINDOW_SAMPLES",
    "WINDOW_SECONDS",
    "Algorithm",
    "Gradient2",
    "Limit",
    "Windowed",
    "make_limit",
]

Algorithm = Literal["aimd", "gradient2"]


class Limit:
    """An adaptive limit: ``update(rtt, inflight, dropped)`` returns the limit to use next."""

    __slots__ = ("estimate", "max_limit", "min_limit")

    def __init__(self, initial: int, min_limit: int, max_limit: int) -> None:
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.estimate = float(min(max(initial, min_limit), max_limit))

    @property
    def limit(self) -> int:
        return max(self.min_limit, int(self.estimate))

    def _clamp(self, value: float) -> float:
        return min(float(self.max_limit), max(float(self.min_limit), value))

    def update(self, rtt: float, inflight: int, dropped: bool) -> int:
        raise NotImplementedError


class AIMD(Limit):
    """Additive increase, multiplicative decrease (``AIMDLimit``).

    A drop cuts the limit to ``BACKOFF`` of itself; a call that ended while at least half the
    limit was in use (the limit was the constraint) raises it by one. A call that ended with the
    limit mostly unused says nothing about it.
    """

    __slots__ = ()

    BACKOFF: Final = 0.9

    def update(self, rtt: float, inflight: int, dropped: bool) -> int:
        if dropped:
            self.estimate = self._clamp(math.floor(self.estimate * self.BACKOFF))
        elif inflight * 2 >= self.estimate:
            self.estimate = self._clamp(self.estimate + 1)
        return self.limit


class Gradient2(Limit):
    """The gradient of short-term to long-term latency (``Gradient2Limit``).

    The short-term latency is the sample (a window's average), the long-term one an exponential
    average over ``LONG_SAMPLES`` samples (a plain mean over the first ``WARMUP``).
    ``gradient = clamp(TOLERANCE * long_rtt / short_rtt, 0.5, 1)``; the new limit is
    ``limit * gradient + QUEUE``, smoothed. While latency stays near its long-term average the
    limit grows by ``QUEUE`` (times the smoothing) per sample; when it rises past ``TOLERANCE``
    times that average the limit shrinks, at most by half per sample. The long-term average
    forgets faster when latency has fallen well below it (the dependency recovered). A limit that
    is mostly unused does not grow. A drop is a sample like any other: its round-trip time (up to
    the timeout that dropped it) is what pulls the limit down.
    """

    TOLERANCE: Final = 1.5
    QUEUE: Final = 4.0
    SMOOTHING: Final = 0.2
    LONG_SAMPLES: Final = 600
    WARMUP: Final = 10

    __slots__ = ("_long", "_samples")

    def __init__(self, initial: int, min_limit: int, max_limit: int) -> None:
        super().__init__(initial, min_limit, max_limit)
        self._long = 0.0
        self._samples = 0

    @staticmethod
    def _average(current: float, sample: float, samples: int, count: int) -> float:
        if count <= 1:
            return sample
        if count <= Gradient2.WARMUP:  # a plain mean while there are few samples
            return current + (sample - current) / count
        factor = 2.0 / (samples + 1)
        return current + (sample - current) * factor

    def update(self, rtt: float, inflight: int, dropped: bool) -> int:
        self._samples = count = self._samples + 1
        short = max(rtt, 1e-6)  # the window's average: the short-term latency as it is
        self._long = long_rtt = self._average(self._long, short, self.LONG_SAMPLES, count)
        if long_rtt / short > 2:
            # Latency fell far below the long-term average: let the average catch up.
            self._long = long_rtt = long_rtt * 0.95
        if inflight < self.estimate / 2:
            return self.limit
        gradient = max(0.5, min(1.0, self.TOLERANCE * long_rtt / short))
        target = self.estimate * gradient + self.QUEUE
        smoothed = self.estimate * (1 - self.SMOOTHING) + target * self.SMOOTHING
        self.estimate = self._clamp(smoothed)
        return self.limit


# A window of samples closes once it is this long and holds this many calls (WindowedLimit's
# defaults: 1 s, 10 samples).
WINDOW_SECONDS: Final = 1.0
WINDOW_SAMPLES: Final = 10


class Windowed:
    """Gathers the samples of finished calls into windows and feeds ``limit`` one per window."""

    __slots__ = ("_dropped", "_inflight", "_samples", "_start", "_total", "limit")

    def __init__(self, limit: Limit) -> None:
        self.limit = limit
        self._samples = 0
        self._start = 0.0
        self._total = 0.0
        self._inflight = 0
        self._dropped = False

    def sample(self, now: float, rtt: float, inflight: int, dropped: bool) -> int:
        """Add one finished call; return the limit (new when this closed a window)."""
        if self._samples == 0:
            self._start = now
        self._samples += 1
        self._total += rtt
        self._inflight = max(self._inflight, inflight)
        self._dropped = self._dropped or dropped
        if self._samples < WINDOW_SAMPLES or now - self._start < WINDOW_SECONDS:
            return self.limit.limit
        limit = self.limit.update(self._total / self._samples, self._inflight, self._dropped)
        self._samples = self._inflight = 0
        self._total = 0.0
        self._dropped = False
        return limit


def make_limit(algorithm: Algorithm, initial: int, min_limit: int, max_limit: int) -> Windowed:
    """The limit of ``algorithm`` starting at ``initial``, kept within the bounds, windowed."""
    kind = AIMD if algorithm == "aimd" else Gradient2
    return Windowed(kind(initial, min_limit, max_limit))
