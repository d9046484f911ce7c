"""Adaptive throttle: refuse calls locally, in proportion to how many the dependency refuses.

Google SRE client-side throttling ("Handling Overload"): over a sliding window of
``window_seconds`` each client counts its ``requests`` and the ones the dependency ``accepts``,
and refuses a new call on its own with probability::

    max(0, (requests - k * accepts) / (requests + 1))

While the dependency accepts nearly everything the probability is 0; once it refuses more than
``1 - 1/k`` of the calls, the client sheds the excess before it leaves the process, so an
overloaded dependency spends nothing on calls it would refuse anyway. ``k = 2`` lets through up
to twice what is accepted (the book's default; ``1.1`` is stricter).

A call is *accepted* when it returns, or fails with an error of its own (a 404, a bad request):
the dependency answered. A transient error (connection refused or reset, a timeout, HTTP 429 or
5xx) or a rejection by a pattern inside this one is not. Locally refused calls count as requests
(as in the book), so a throttled client keeps probing at the rate the dependency accepts. A call
that goes out counts when it ends, not when it starts: calls still in flight (a burst at start-up,
before any answer) would otherwise count as requests with no accept and throttle each other. The
refusal is a :class:`~buttress.RejectedError` (``CallRejected`` reason ``throttled``), which
retry never retries.
"""

from __future__ import annotations

import random
import threading
from typing import ClassVar, TypedDict

from pydantic import Field

from buttress import _clock, events
from buttress._values import PositiveSeconds
from buttress.exceptions import RejectedError, TimeoutExceededError
from buttress.patterns import _transient
from buttress.patterns._base import BuildContext, Mode, Options
from buttress.patterns._sliding import SlidingCounts

__all__ = [
    "PATTERN",
    "AdaptiveThrottle",
    "AdaptiveThrottleOptions",
    "AdaptiveThrottleStrategy",
    "ThrottleSnapshot",
    "build",
]

PATTERN = "adaptive_throttle"

_REQUESTS, _ACCEPTS = 0, 1

# The draws of throttles built without a seed; tests seed it (``adaptive_throttle._rng.seed(1)``)
# or give the pattern a ``seed``.
_rng = random.Random()


class AdaptiveThrottleOptions(Options):
    """Options of ``with_adaptive_throttle`` (and of ``services.<name>.adaptive_throttle``)."""

    enabled: bool = Field(
        default=False,
        description="throttle this service (with_adaptive_throttle() sets it; resilient() "
        "throttles only when settings do)",
    )
    k: float = Field(
        default=2.0, ge=1, le=100, description="calls let through per accepted call (SRE K)"
    )
    window_seconds: PositiveSeconds = Field(
        default=120.0, description="length of the sliding window of requests and accepts"
    )
    seed: int | None = Field(default=None, description="makes the refusals repeatable")


class ThrottleSnapshot(TypedDict):
    """A throttle at one instant."""

    service: str
    requests: int
    accepts: int
    probability: float  # of refusing the next call


def accepted(failure: BaseException) -> bool:
    """Whether a call that raised ``failure`` was still answered by the dependency."""
    if not isinstance(failure, Exception):
        return True  # cancelled or interrupted here: says nothing about the dependency
    if isinstance(failure, RejectedError | TimeoutExceededError):
        return False
    return not _transient.is_transient(failure)


class AdaptiveThrottle:
    """One service's counts of requests and accepts, and the draw that refuses a call."""

    __slots__ = ("_counts", "_lock", "_random", "k", "service")

    def __init__(self, service: str, options: AdaptiveThrottleOptions) -> None:
        self.service = service
        self._lock = threading.Lock()
        self._counts = SlidingCounts(options.window_seconds, 2)
        self.k = options.k
        self._random = _rng.random if options.seed is None else random.Random(options.seed).random

    def reconfigure(self, options: AdaptiveThrottleOptions) -> None:
        with self._lock:
            if options.window_seconds != self._counts.window:
                self._counts = SlidingCounts(options.window_seconds, 2)
            self.k = options.k
            if options.seed is not None:
                self._random = random.Random(options.seed).random

    def _probability(self) -> float:
        requests, accepts = self._counts.totals
        return max(0.0, (requests - self.k * accepts) / (requests + 1))

    def admit(self) -> bool:
        """Whether the call may go; a refused one counts as a request at once."""
        now = _clock.monotonic()
        with self._lock:
            counts = self._counts
            counts.advance(now)
            probability = self._probability()
            if probability <= 0.0 or self._random() >= probability:
                return True
            counts.add(now, _REQUESTS)
            return False

    def finish(self, _token: object, failure: BaseException | None) -> None:
        """The call ended: count it, and count an accept unless the dependency did not answer."""
        now = _clock.monotonic()
        with self._lock:
            counts = self._counts
            counts.add(now, _REQUESTS)
            if failure is None or accepted(failure):
                counts.add(now, _ACCEPTS)

    def snapshot(self) -> ThrottleSnapshot:
        with self._lock:
            self._counts.advance(_clock.monotonic())
            requests, accepts = self._counts.totals
            probability = self._probability()
        return ThrottleSnapshot(
            service=self.service, requests=requests, accepts=accepts, probability=probability
        )


class AdaptiveThrottleStrategy:
    """``with_adaptive_throttle`` at one call site: a gate told how each call ended."""

    pattern: ClassVar[str] = PATTERN

    def __init__(self, throttle: AdaptiveThrottle, mode: Mode = "enforce") -> None:
        self.throttle = throttle
        self._shadow = mode == "shadow"
        self.finish = throttle.finish

    def before(self) -> None:
        throttle = self.throttle
        if throttle.admit():
            return
        if self._shadow:
            events.emit(events.ShadowDecision(throttle.service, PATTERN, "reject"))
            return
        handlers = events.ROUTES.get(events.CallRejected)
        if handlers:
            events.dispatch(
                handlers, events.CallRejected(throttle.service, PATTERN, "throttled", None)
            )
        snap = throttle.snapshot()
        raise RejectedError(
            f"{throttle.service!r} throttled locally: the dependency accepted {snap['accepts']} "
            f"of the last {snap['requests']} calls (refusing with probability "
            f"{snap['probability']:.2f})",
            service=throttle.service,
        )


def build(ctx: BuildContext) -> AdaptiveThrottleStrategy | None:
    """The throttle strategy over the service's shared throttle; ``None`` when switched off."""
    options: AdaptiveThrottleOptions = ctx.options
    if not options.enabled:
        return None
    service = ctx.service

    def make(opts: AdaptiveThrottleOptions) -> AdaptiveThrottle:
        return AdaptiveThrottle(service, opts)

    throttle = ctx.shared(PATTERN, make)
    return AdaptiveThrottleStrategy(throttle, ctx.mode)
