"""Timeout: give up on a call that takes too long (async: cancelled; sync: abandoned, counted).

The pattern decides the limit of each call and what is reported; the drivers in
:mod:`buttress.policy` run the call under it, with what :mod:`buttress._deadline` provides.

An ``async def`` call is cancelled when its time is up, by a timer on its event loop (through
``_clock.call_later``), with the bookkeeping of ``asyncio.timeout`` done inline: it costs half as
much, and the deadline is paid on every call.

A ``def`` call cannot be interrupted safely from outside, so it runs on a worker thread of a
small daemon pool while the caller waits for at most the time limit; when the limit passes the
caller gets :class:`~buttress.TimeoutExceededError` and the worker is *abandoned*: left to finish
on its own, counted, and reported when it does. Each service may hold at most a quarter of the
pool's threads, so one hung dependency cannot starve the sync timeouts of the others.

Both publish the call's deadline (``buttress.remaining()``), the tighter of the enclosing deadline
and ``now + seconds``, so cooperative code can pass it down as an I/O timeout, and a nested timeout
or a retry never waits past it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from pydantic import Field

from buttress import _clock, _context, events
from buttress._deadline import (
    MAX_WORKERS,
    MAX_WORKERS_PER_SERVICE,
    WorkerPoolSnapshot,
    caller_gave_up,
    not_started,
    worker_pool_snapshot,
)
from buttress._values import PositiveSeconds
from buttress.exceptions import TimeoutExceededError
from buttress.patterns._base import BuildContext, Mode, Options, Strategy

__all__ = [
    "MAX_WORKERS",
    "MAX_WORKERS_PER_SERVICE",
    "PATTERN",
    "TimeoutOptions",
    "TimeoutStrategy",
    "WorkerPoolSnapshot",
    "build",
    "caller_gave_up",
    "not_started",
    "worker_pool_snapshot",
]

PATTERN = "timeout"


class TimeoutOptions(Options):
    """Options of ``with_timeout`` (and of ``services.<name>.timeout``)."""

    enabled: bool = True
    seconds: PositiveSeconds = Field(30.0, description="time limit of one attempt")


_deadline = _context.deadline


class TimeoutStrategy:
    """``with_timeout`` for one call site: ``seconds`` per call, within any enclosing deadline.

    Enforced, it decides the limit of each call (``limit``) and what is reported; the drivers run
    the call under that deadline (a worker thread for ``def`` callers, a timer on the loop for
    ``async def`` ones). In shadow mode it is a gate that only measures.
    """

    pattern: ClassVar[str] = PATTERN

    def __init__(self, service: str, seconds: float, mode: Mode = "enforce") -> None:
        self.service = service
        self.seconds = seconds
        self.mode = mode
        # Every call reports its elapsed time: through a pre-bound recorder, no event built. The
        # async driver calls its ``record`` inline (one frame less than ``finished``), and reads
        # the clock at the call's end only when it is not ``None``.
        self.recorded = events.recorder(events.TimedCallFinished, service)
        if mode == "shadow":
            self.before: Callable[[], tuple[float, float]] = self._started
            self.after: Callable[[tuple[float, float]], None] = self._observed

    def limit(self, start: float) -> float:
        """Seconds this call may take: ``seconds``, or less when an enclosing deadline is nearer.

        Raises:
            TimeoutExceededError: the enclosing deadline has passed already (reported as a
                timed-out call that took no time).
        """
        enclosing = _deadline.get()
        if enclosing is not None and enclosing - start < self.seconds:
            limit = enclosing - start
            if limit <= 0:
                self.finished(0.0, timed_out=True)
                raise self.exceeded(limit, 0.0, " (the enclosing deadline had already passed)")
            return limit
        return self.seconds

    def exceeded(self, limit: float, elapsed: float, detail: str = "") -> TimeoutExceededError:
        """The error of a call that ran out of time (``TimeoutExceeded`` emitted)."""
        handlers = events.ROUTES.get(events.TimeoutExceeded)
        if handlers:
            events.dispatch(handlers, events.TimeoutExceeded(self.service, limit, elapsed))
        return TimeoutExceededError(
            f"call to {self.service!r} did not finish within {max(limit, 0.0):g} s{detail}",
            service=self.service,
            seconds=max(limit, 0.0),
        )

    def finished(self, elapsed: float, timed_out: bool) -> None:
        """The call is over for its caller, after ``elapsed`` s."""
        record = self.recorded.record
        if record is not None:
            try:
                record(elapsed, timed_out)
            except Exception:  # noqa: BLE001 - a subscriber must never break the call
                events.failed(record)

    # -- shadow mode: a gate that measures ---------------------------------------------------------
    def _started(self) -> tuple[float, float]:
        start = _clock.monotonic()
        enclosing = _deadline.get()
        if enclosing is not None and enclosing - start < self.seconds:
            return start, enclosing - start
        return start, self.seconds

    def _observed(self, token: tuple[float, float]) -> None:
        start, limit = token
        elapsed = _clock.monotonic() - start
        if elapsed > limit:
            handlers = events.ROUTES.get(events.ShadowDecision)
            if handlers:
                events.dispatch(handlers, events.ShadowDecision(self.service, PATTERN, "timeout"))
        self.finished(elapsed, timed_out=False)


def build(ctx: BuildContext) -> Strategy | None:
    """A :class:`TimeoutStrategy` from ``ctx.options`` (a :class:`TimeoutOptions`)."""
    options: TimeoutOptions = ctx.options
    if not options.enabled:
        return None
    return TimeoutStrategy(ctx.service, options.seconds, ctx.mode)
