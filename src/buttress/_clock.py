"""The one place buttress reads time and waits.

Every duration is measured on the active :class:`Clock`'s monotonic time and every wait goes
through it, so tests can replace it (:class:`buttress.testing.FakeClock`). Why the hot path calls
the rebound module-level functions: ``docs/internals.md`` (Time).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol, runtime_checkable

__all__ = [
    "Cancellable",
    "Clock",
    "SystemClock",
    "ZeroWaitClock",
    "asleep",
    "call_later",
    "get_clock",
    "monotonic",
    "set_clock",
    "sleep",
    "timeout",
    "wait",
    "wall",
]


@runtime_checkable
class Clock(Protocol):
    """What a clock must provide. Durations are seconds as floats."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards; only differences are meaningful."""

    def wall(self) -> float:
        """Seconds since the epoch (only for HTTP dates in ``Retry-After``)."""

    def sleep(self, seconds: float) -> None:
        """Block the current thread for ``seconds``."""

    async def asleep(self, seconds: float) -> None:
        """Suspend the current task for ``seconds``."""

    def wait(self, event: threading.Event, seconds: float | None) -> bool:
        """Wait until ``event`` is set or ``seconds`` pass; return whether it was set."""

    def timeout(self, seconds: float | None) -> AbstractAsyncContextManager[object]:
        """An ``asyncio.timeout``: cancels the enclosed block and raises ``TimeoutError``."""

    def call_later(self, seconds: float, callback: Callable[[], object]) -> Cancellable:
        """Run ``callback`` on the running event loop's thread after ``seconds``."""


class Cancellable(Protocol):
    """A scheduled callback that can be called off."""

    def cancel(self) -> None:
        """Make sure the callback does not run (no effect once it has)."""


class SystemClock:
    """The real clock: time.monotonic, time.sleep, asyncio.sleep and asyncio.timeout."""

    monotonic = staticmethod(time.monotonic)
    wall = staticmethod(time.time)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    async def asleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def wait(self, event: threading.Event, seconds: float | None) -> bool:
        return event.wait(seconds)

    def timeout(self, seconds: float | None) -> AbstractAsyncContextManager[object]:
        return asyncio.timeout(seconds)

    def call_later(self, seconds: float, callback: Callable[[], object]) -> Cancellable:
        loop = asyncio.get_running_loop()
        return loop.call_at(loop.time() + seconds, callback)


class ZeroWaitClock(SystemClock):
    """Real time, but every sleep returns at once: the clock of testing mode.

    Waits for another party (a bulkhead slot, a timeout) still take real time; only the waits
    buttress chooses itself (backoff, rate-limit pacing) are skipped.
    """

    def sleep(self, seconds: float) -> None:
        return

    async def asleep(self, seconds: float) -> None:
        # One trip through the loop keeps the cooperative-scheduling behaviour of a real sleep.
        await asyncio.sleep(0)


_lock = threading.Lock()
_current: Clock = SystemClock()

monotonic: Callable[[], float] = _current.monotonic
wall: Callable[[], float] = _current.wall
sleep: Callable[[float], None] = _current.sleep
# Run a callback on the running loop's thread after some seconds on the active clock: the
# per-call async deadline (cheaper than timeout(): no context manager, no coroutine). Bound to
# the active clock like the three above, so the call makes no frame of its own.
call_later: Callable[[float, Callable[[], object]], Cancellable] = _current.call_later


async def asleep(seconds: float) -> None:
    """Suspend the current task for ``seconds`` on the active clock."""
    await _current.asleep(seconds)


def wait(event: threading.Event, seconds: float | None) -> bool:
    """Wait for ``event`` at most ``seconds`` on the active clock; return whether it was set."""
    return _current.wait(event, seconds)


def timeout(seconds: float | None) -> AbstractAsyncContextManager[object]:
    """``asyncio.timeout(seconds)`` on the active clock."""
    return _current.timeout(seconds)


def get_clock() -> Clock:
    """The active clock."""
    return _current


def set_clock(clock: Clock) -> Clock:
    """Make ``clock`` the active clock and return the previous one."""
    global _current, monotonic, wall, sleep, call_later
    with _lock:
        previous = _current
        _current = clock
        monotonic = clock.monotonic
        wall = clock.wall
        sleep = clock.sleep
        call_later = clock.call_later
    return previous
