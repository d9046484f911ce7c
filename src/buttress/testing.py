"""Helpers for testing code that uses buttress, and for buttress's own tests.

* :class:`FakeClock`: simulated time. Backoff sleeps, open-circuit timeouts, rate-limit refills,
  bulkhead queue timeouts and ``with_timeout`` deadlines all move with it, so no test sleeps.
* :func:`set_testing` / :func:`testing_mode`: real time, but every wait buttress chooses itself
  (backoff, rate-limit pacing) is zero.
* :func:`capture_events`: record the events buttress emits.
* :func:`force_circuit_state` and :func:`reset`: put a service's circuit into a state, or forget
  every shared instance.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import Any, TypeVar

from buttress import _clock, _deferral, events, registry

__all__ = [
    "CapturedEvents",
    "FakeClock",
    "capture_events",
    "fake_clock",
    "force_circuit_state",
    "reset",
    "set_testing",
    "testing_mode",
]

E = TypeVar("E")

# How often a thread blocked in FakeClock.wait looks at the simulated time. Only the reaction time
# of a waiter to another thread's progress, never a duration under test.
_POLL_SECONDS = 0.0005


class _Timer:
    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[], object]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """Simulated time for tests: sleeping advances it, and nothing waits for real.

    ``sleep(s)`` and ``asleep(s)`` record the wait and move time forward by ``s``, firing every
    deadline that falls inside (timeouts, bulkhead queue limits) in order, so a timed-out call
    observes the same ordering it would in real time. ``advance(s)`` moves time from the test.

    Attributes:
        sleeps: every wait that went through ``sleep``/``asleep``, in order.
    """

    def __init__(self, start: float = 1_000.0, wall_start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall_start - start
        self._lock = threading.RLock()
        self._timers: list[tuple[float, int, _Timer]] = []
        self._seq = itertools.count()
        self.sleeps: list[float] = []

    # -- reading time -------------------------------------------------------------------------
    def monotonic(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    # -- moving time --------------------------------------------------------------------------
    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, firing the deadlines passed on the way."""
        if seconds < 0:
            raise ValueError("time cannot go backwards")
        with self._lock:
            target = self._now + seconds
            while self._timers and self._timers[0][0] <= target:
                when, _, timer = heapq.heappop(self._timers)
                self._now = max(self._now, when)
                if not timer.cancelled:
                    timer.callback()
            self._now = target

    def call_at(self, when: float, callback: Callable[[], object]) -> _Timer:
        """Run ``callback`` when simulated time reaches ``when`` (at once if it has)."""
        timer = _Timer(callback)
        with self._lock:
            if when <= self._now:
                callback()
            else:
                heapq.heappush(self._timers, (when, next(self._seq), timer))
        return timer

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(max(0.0, seconds))

    async def asleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(max(0.0, seconds))
        # Yield once, as a real sleep would, so a deadline that just fired can cancel this task.
        await asyncio.sleep(0)

    # -- waiting for another party ------------------------------------------------------------
    def wait(self, event: threading.Event, seconds: float | None) -> bool:
        if event.is_set():
            return True
        if seconds is None:
            return event.wait()
        expired = threading.Event()

        def on_deadline() -> None:
            # Decided at the simulated instant of the deadline: an event set later is late.
            if not event.is_set():
                expired.set()

        timer = self.call_at(self._now + seconds, on_deadline)
        try:
            while not expired.is_set():
                if event.wait(_POLL_SECONDS):
                    break
        finally:
            timer.cancel()
        return not expired.is_set()

    def timeout(self, seconds: float | None) -> AbstractAsyncContextManager[object]:
        return self._timeout(seconds)

    def call_later(self, seconds: float, callback: Callable[[], object]) -> _Timer:
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()

        def fire() -> None:
            # From the loop's thread (a task's own simulated sleep) it must run now, before the
            # sleeping task resumes; from another thread it is handed to the loop.
            if threading.get_ident() == loop_thread:
                callback()
            else:
                loop.call_soon_threadsafe(callback)

        return self.call_at(self._now + seconds, fire)

    @asynccontextmanager
    async def _timeout(self, seconds: float | None) -> AsyncIterator[None]:
        if seconds is None:
            yield
            return
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()
        async with asyncio.timeout(None) as scope:

            def expire() -> None:
                # asyncio's own Timeout cancels the task and turns it into TimeoutError. From the
                # loop's thread it must happen now, before the sleeping task is resumed.
                if threading.get_ident() == loop_thread:
                    scope.reschedule(loop.time())
                else:
                    loop.call_soon_threadsafe(scope.reschedule, loop.time())

            timer = self.call_at(self._now + seconds, expire)
            try:
                yield
            finally:
                timer.cancel()


@contextmanager
def fake_clock(clock: FakeClock | None = None) -> Iterator[FakeClock]:
    """Install a :class:`FakeClock` (a new one unless given) for the duration of the block."""
    active = FakeClock() if clock is None else clock
    previous = _clock.set_clock(active)
    try:
        yield active
    finally:
        _clock.set_clock(previous)


def set_testing(on: bool) -> None:
    """Switch testing mode: real time, but backoff and rate-limit waits return at once."""
    _clock.set_clock(_clock.ZeroWaitClock() if on else _clock.SystemClock())


@contextmanager
def testing_mode() -> Iterator[None]:
    """Testing mode for the duration of the block, then the previous clock again."""
    previous = _clock.set_clock(_clock.ZeroWaitClock())
    try:
        yield
    finally:
        _clock.set_clock(previous)


class CapturedEvents(list[Any]):
    """The events seen by :func:`capture_events`, in order, with a filter by kind."""

    def of(self, kind: type[E]) -> list[E]:
        """The captured events of one kind."""
        return [event for event in self if type(event) is kind]


@contextmanager
def capture_events(kinds: Iterable[type[Any]] | None = None) -> Iterator[CapturedEvents]:
    """Record the events buttress emits inside the block (every kind unless ``kinds`` is given)."""
    captured = CapturedEvents()
    lock = threading.Lock()

    def record(event: Any) -> None:
        with lock:
            captured.append(event)

    undo = events.subscribe(record, kinds)
    try:
        yield captured
    finally:
        undo()


def force_circuit_state(service: str, state: str) -> None:
    """Put the circuit of ``service`` into ``state`` (building its breaker if no call has yet).

    ``state`` is one of:

    * ``closed``: reset: closed, counters and rate window cleared, any override ended;
    * ``open``: trip now; after ``timeout`` seconds the next call is a half-open trial;
    * ``half_open``: the next calls are trials;
    * ``forced_open``: reject every call until the next ``closed``;
    * ``forced_closed``: admit every call, never trip, until the next ``closed``;
    * ``disabled``: no breaker at all until the next ``closed``.
    """
    cb = registry.breaker(service)
    moves: dict[str, Callable[[], object]] = {
        "closed": cb.reset,
        "open": cb.open,
        "half_open": cb.half_open,
        "forced_open": cb.force_open,
        "forced_closed": cb.force_closed,
        "disabled": cb.disable,
    }
    try:
        move = moves[state]
    except KeyError:
        raise ValueError(
            f"unknown circuit state {state!r}; expected one of {sorted(moves)}"
        ) from None
    move()


def reset() -> None:
    """Forget every built breaker, bulkhead and rate limiter, the fallbacks health remembers, the
    queues of deferred calls, and the code arguments of decorated functions that no longer exist
    (a test's own: the next test may give the same service other values).

    The next call of each decorated function builds fresh instances from the current settings:
    a clean start between tests without re-importing the code under test.
    """
    from buttress import registry  # noqa: PLC0415 - health imports the settings
    from buttress.health_app import reset as forget_fallbacks  # noqa: PLC0415

    registry.clear()
    registry.forget_gone()  # the code arguments of functions that no longer exist
    forget_fallbacks()
    _deferral.clear()
