"""Virtual time for asyncio: an event loop whose clock jumps to the next scheduled event.

The loop's selector never blocks: when nothing is ready it moves the clock forward by the time
the loop was about to wait, so ``asyncio.sleep``, ``asyncio.timeout`` and ``loop.call_at`` all
run on simulated time, in order, as fast as the CPU allows. :class:`VirtualClock` is the same
time as a buttress clock (``buttress._clock.set_clock``), so every pattern measures and waits on
it too. A simulation with nothing scheduled and nothing ready is stuck: that raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import selectors
from collections.abc import Callable, Coroutine, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

from buttress import _clock

T = TypeVar("T")


class _Selector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    def __init__(self, clock: VirtualClock) -> None:
        super().__init__()
        self._virtual = clock

    def select(self, timeout: float | None = None) -> list[Any]:
        ready = super().select(0)
        if ready:
            return ready
        if timeout is None:
            raise RuntimeError("simulation stuck: nothing is scheduled and nothing is ready")
        self._virtual.now += timeout
        return ready


class _Loop(asyncio.SelectorEventLoop):
    def __init__(self, clock: VirtualClock) -> None:
        super().__init__(_Selector(clock))
        self._virtual = clock

    def time(self) -> float:
        return self._virtual.now


class VirtualClock:
    """Simulated seconds since the start: a buttress clock for async code only."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_800_000_000.0 + self.now

    def sleep(self, seconds: float) -> None:
        raise RuntimeError("the simulation runs async code only")

    async def asleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def wait(self, event: Any, seconds: float | None) -> bool:
        raise RuntimeError("the simulation runs async code only")

    def timeout(self, seconds: float | None) -> AbstractAsyncContextManager[object]:
        return asyncio.timeout(seconds)

    def call_later(self, seconds: float, callback: Callable[[], object]) -> asyncio.TimerHandle:
        loop = asyncio.get_running_loop()
        return loop.call_at(loop.time() + seconds, callback)


@contextlib.contextmanager
def virtual_time() -> Iterator[Callable[[Coroutine[Any, Any, T]], T]]:
    """A runner of coroutines on virtual time; buttress's clock is that time meanwhile."""
    clock = VirtualClock()
    loop = _Loop(clock)
    previous = _clock.set_clock(clock)
    try:
        yield loop.run_until_complete
        # What the dependency still works on for clients that left (its queue after an
        # overload) is cancelled, not left pending when the loop closes.
        leftover = asyncio.all_tasks(loop)
        if leftover:
            for task in leftover:
                task.cancel()

            async def drained() -> None:
                await asyncio.gather(*leftover, return_exceptions=True)

            loop.run_until_complete(drained())
    finally:
        _clock.set_clock(previous)
        loop.close()
