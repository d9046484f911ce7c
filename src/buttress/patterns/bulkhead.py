"""Bulkhead: cap the concurrent calls to a dependency so one slow service cannot take them all.

One :class:`Bulkhead` per service (shared by every call site that names it) counts the calls in
flight under a plain lock and keeps a FIFO queue of waiters. A released slot is handed straight to
the oldest waiter, so a newcomer never overtakes the queue. Waiters are threads (a
``threading.Event``) or tasks on any event loop (a future resolved on its own loop), so one bulkhead
serves threads and several event loops at once. The lock is never held while a protected call runs
or while anybody waits.

A queued call never waits past the enclosing deadline (``buttress.remaining()``): it gives up then
with :class:`~buttress.TimeoutExceededError`, which the enclosing ``with_timeout`` reports as its
own. A call that gets its slot after its deadline, or after the caller of its sync timeout gave up,
gives the slot back without starting.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from typing import Any, ClassVar, TypedDict

from pydantic import Field

from buttress import _clock, _context, events, registry
from buttress._values import Seconds
from buttress.exceptions import BulkheadFullError, TimeoutExceededError
from buttress.patterns import timeout as _timeout
from buttress.patterns._base import AsyncCall, BuildContext, Call, Mode, Options, Strategy

__all__ = [
    "PATTERN",
    "Bulkhead",
    "BulkheadOptions",
    "BulkheadSnapshot",
    "BulkheadStrategy",
    "build",
]

PATTERN = "bulkhead"


class BulkheadOptions(Options):
    """Options of ``with_bulkhead`` (and of ``services.<name>.bulkhead``)."""

    enabled: bool = True
    limit: int | None = Field(
        None, gt=0, description="concurrent calls (unset: no limit, the pattern is off)"
    )
    max_queue: int = Field(0, ge=0, description="calls that may wait for a slot")
    queue_timeout: Seconds | None = Field(
        None, description="seconds a queued call waits (unset: until a slot frees)"
    )


class BulkheadSnapshot(TypedDict):
    """A bulkhead at one instant (what ``buttress.health()`` shows)."""

    service: str
    active: int
    queued: int
    limit: int
    utilization: float  # active / limit


class _Waiter:
    """A call waiting for a slot. ``granted`` is written under the bulkhead's lock only."""

    __slots__ = ("granted",)

    def __init__(self) -> None:
        self.granted = False

    def wake(self) -> bool:
        """Tell the waiter it holds a slot now; ``False`` if it can no longer be told."""
        raise NotImplementedError


class _ThreadWaiter(_Waiter):
    __slots__ = ("event",)

    def __init__(self) -> None:
        super().__init__()
        self.event = threading.Event()

    def wake(self) -> bool:
        self.event.set()
        return True


class _TaskWaiter(_Waiter):
    __slots__ = ("future", "loop", "thread")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.thread = threading.get_ident()

    def wake(self) -> bool:
        try:
            if threading.get_ident() == self.thread:
                # Released from the waiter's own thread: resolve directly, no self-pipe write.
                _resolve(self.future)
            else:
                self.loop.call_soon_threadsafe(_resolve, self.future)
        except RuntimeError:  # its loop was closed under it; that task will never run again
            return False
        return True


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _limit(options: BulkheadOptions) -> int:
    if options.limit is None:  # build() makes no bulkhead without a limit
        raise ValueError("a bulkhead needs a limit")
    return options.limit


class Bulkhead:
    """The shared state of one service's bulkhead: slots in use and the queue of waiters."""

    __slots__ = (
        "_active",
        "_lock",
        "_overflow",
        "_waiters",
        "limit",
        "max_queue",
        "queue_timeout",
        "service",
    )

    def __init__(self, service: str, options: BulkheadOptions) -> None:
        self.service = service
        self._lock = threading.Lock()
        self._active = 0
        # Calls let through by shadow mode although no slot was free (never queued, never counted
        # in ``active``): how far over the limit enforcement would have been.
        self._overflow = 0
        self._waiters: deque[_Waiter] = deque()
        self.limit = _limit(options)
        self.max_queue = options.max_queue
        self.queue_timeout = options.queue_timeout

    # -- decisions (plain sync code shared by both drivers) ----------------------------------------
    def try_acquire(self) -> bool:
        """Take a free slot if there is one (never waits). Waiters exist only while all are busy."""
        with self._lock:
            if self._active < self.limit:
                self._active += 1
                return True
            return False

    def _enqueue(self, waiter: _Waiter) -> str | None:
        """Queue ``waiter``, or take a slot freed meanwhile; return the rejection reason if full."""
        with self._lock:
            if self._active < self.limit:
                self._active += 1
                waiter.granted = True
                return None
            if len(self._waiters) >= self.max_queue:
                return "full"
            self._waiters.append(waiter)
            queued = len(self._waiters)
        handlers = events.ROUTES.get(events.BulkheadQueued)
        if handlers:
            events.dispatch(handlers, events.BulkheadQueued(self.service, queued))
        return None

    def _withdraw(self, waiter: _Waiter) -> bool:
        """The waiter stops waiting (timeout, cancellation); return whether it was granted a slot.

        A slot granted in the same instant is the waiter's: it either uses it or releases it.
        """
        with self._lock:
            if waiter.granted:
                return True
            # Gone already if a release found its event loop closed and passed the slot on.
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            return False

    def release(self) -> None:
        """Give a slot back: to the oldest waiter if the limit allows, else to the pool."""
        with self._lock:
            if self._active <= self.limit:
                while self._waiters:
                    waiter = self._waiters.popleft()
                    waiter.granted = True
                    if waiter.wake():
                        break
                    waiter.granted = False
                else:
                    self._active -= 1
            else:  # over a lowered limit: shrink instead of handing the slot on
                self._active -= 1
            active, queued = self._active, len(self._waiters)
        handlers = events.ROUTES.get(events.BulkheadReleased)
        if handlers:
            events.dispatch(handlers, events.BulkheadReleased(self.service, active, queued))

    def note_acquired(self, waited: float) -> None:
        """Emit ``BulkheadAcquired`` (if anyone listens) for a slot taken after ``waited`` s."""
        handlers = events.ROUTES.get(events.BulkheadAcquired)
        if handlers:
            event = events.BulkheadAcquired(
                self.service, waited, self._active, len(self._waiters), self.limit
            )
            events.dispatch(handlers, event)

    def _rejected(self, reason: str) -> BulkheadFullError:
        self._note_rejected(reason)
        if reason == "full":
            detail = f"{self.limit} calls in flight and {self.max_queue} queued"
        else:
            detail = f"no slot freed within {self.queue_timeout:g} s"
        return BulkheadFullError(
            f"bulkhead of {self.service!r} is full: {detail}", service=self.service
        )

    def _note_rejected(self, reason: str) -> None:
        handlers = events.ROUTES.get(events.CallRejected)
        if handlers:
            events.dispatch(handlers, events.CallRejected(self.service, PATTERN, reason, None))

    def _bound(self, deadline: float | None) -> tuple[float | None, bool]:
        """How long a queued call may wait now, and whether the enclosing deadline sets that."""
        queue_timeout = self.queue_timeout
        if deadline is None:
            return queue_timeout, False
        left = deadline - _clock.monotonic()
        if queue_timeout is None or left <= queue_timeout:
            return max(left, 0.0), True
        return queue_timeout, False

    def _too_late(self, deadline: float | None) -> bool:
        """After a wait: whether the call must not start (deadline passed, or its caller left)."""
        if deadline is not None and _clock.monotonic() >= deadline:
            return True
        return _timeout.caller_gave_up()

    def _not_started(self, deadline: float | None, start: float) -> TimeoutExceededError:
        """The deadline (or the caller) did not wait for a slot: the call never starts."""
        self._note_rejected("deadline")
        waited = (deadline if deadline is not None else _clock.monotonic()) - start
        return _timeout.not_started(self.service, waited, "a bulkhead slot")

    # -- waiting -----------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take a slot for a thread, waiting in the queue if allowed, else ``BulkheadFullError``.

        The wait ends at the enclosing deadline too (then ``TimeoutExceededError``); a slot that
        comes too late is given back, and the call never starts.
        """
        start = _clock.monotonic()
        waiter = _ThreadWaiter()
        reason = self._enqueue(waiter)
        if reason is not None:
            raise self._rejected(reason)
        if not waiter.granted:
            deadline = _deadline.get()
            bound, by_deadline = self._bound(deadline)
            try:
                _clock.wait(waiter.event, bound)
            except BaseException:
                if self._withdraw(waiter):
                    self.release()
                raise
            if not self._withdraw(waiter):
                if by_deadline:
                    raise self._not_started(deadline, start)
                raise self._rejected("queue_timeout")
            if self._too_late(deadline):
                self.release()
                raise self._not_started(deadline, start)
        self.note_acquired(_clock.monotonic() - start)

    async def aacquire(self) -> None:
        """Take a slot for a task, waiting in the queue if allowed, else ``BulkheadFullError``.

        The wait ends at the enclosing deadline too (then ``TimeoutExceededError``); a slot that
        comes too late is given back, and the call never starts.
        """
        start = _clock.monotonic()
        waiter = _TaskWaiter(asyncio.get_running_loop())
        reason = self._enqueue(waiter)
        if reason is not None:
            raise self._rejected(reason)
        if not waiter.granted:
            deadline = _deadline.get()
            bound, by_deadline = self._bound(deadline)
            try:
                async with _clock.timeout(bound):
                    await waiter.future
            except TimeoutError:
                if not self._withdraw(waiter):
                    if by_deadline:
                        raise self._not_started(deadline, start) from None
                    raise self._rejected("queue_timeout") from None
            except BaseException:  # cancelled while queued, possibly just as a slot was granted
                if self._withdraw(waiter):
                    self.release()
                elif deadline is not None and _clock.monotonic() >= deadline:
                    # The enclosing timeout's own timer noticed the deadline first: still a call
                    # that left the queue at its deadline, counted as such whichever timer won.
                    self._note_rejected("deadline")
                raise
            if self._too_late(deadline):
                self.release()
                raise self._not_started(deadline, start)
        self.note_acquired(_clock.monotonic() - start)

    # -- administration ----------------------------------------------------------------------------
    def reconfigure(self, options: BulkheadOptions) -> None:
        """Adopt new options; calls in flight and queued keep their places.

        A raised limit admits waiters at once; a lowered one lets calls in flight finish and admits
        nobody until the count is under it. A smaller ``max_queue`` only affects new arrivals.
        """
        with self._lock:
            self.limit = _limit(options)
            self.max_queue = options.max_queue
            self.queue_timeout = options.queue_timeout
            while self._waiters and self._active < self.limit:
                waiter = self._waiters.popleft()
                waiter.granted = True
                if waiter.wake():
                    self._active += 1
                else:
                    waiter.granted = False

    def snapshot(self) -> BulkheadSnapshot:
        """Calls in flight and queued, the limit and the utilization (active / limit)."""
        with self._lock:
            active, queued, limit = self._active, len(self._waiters), self.limit
        return BulkheadSnapshot(
            service=self.service,
            active=active,
            queued=queued,
            limit=limit,
            utilization=active / limit,
        )

    # -- shadow mode -------------------------------------------------------------------------------
    def shadow_acquire(self) -> bool:
        """Take a slot if one is free; else note where enforcement would have rejected.

        Returns whether a slot was taken (the caller releases it). A call that would have been
        queued is let through uncounted; one that would have been rejected also emits a
        ``ShadowDecision``.
        """
        with self._lock:
            if self._active < self.limit:
                self._active += 1
                return True
            would_reject = self._overflow >= self.max_queue
            self._overflow += 1
        if would_reject:
            handlers = events.ROUTES.get(events.ShadowDecision)
            if handlers:
                events.dispatch(handlers, events.ShadowDecision(self.service, PATTERN, "reject"))
        return False

    def shadow_release(self, counted: bool) -> None:
        if counted:
            self.release()
        else:
            with self._lock:
                self._overflow -= 1


_deadline = _context.deadline


class BulkheadStrategy:
    """``with_bulkhead`` at one call site, over the service's shared :class:`Bulkhead`."""

    pattern: ClassVar[str] = PATTERN

    def __init__(self, bulkhead: Bulkhead, mode: Mode = "enforce") -> None:
        self.bulkhead = bulkhead
        self.mode = mode

    def wrap(self, call: Call) -> Call:
        bulkhead = self.bulkhead
        if self.mode == "shadow":

            def observed(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                counted = bulkhead.shadow_acquire()
                try:
                    return call(args, kwargs)
                finally:
                    bulkhead.shadow_release(counted)

            return observed

        try_acquire, acquire, note_acquired, release = (
            bulkhead.try_acquire,
            bulkhead.acquire,
            bulkhead.note_acquired,
            bulkhead.release,
        )

        def guarded(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not try_acquire():
                acquire()
            elif events.ROUTES.get(events.BulkheadAcquired):
                note_acquired(0.0)
            try:
                return call(args, kwargs)
            finally:
                release()

        return guarded

    def awrap(self, call: AsyncCall) -> AsyncCall:
        bulkhead = self.bulkhead
        if self.mode == "shadow":

            async def observed(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                counted = bulkhead.shadow_acquire()
                try:
                    return await call(args, kwargs)
                finally:
                    bulkhead.shadow_release(counted)

            return observed

        try_acquire, aacquire, note_acquired, release = (
            bulkhead.try_acquire,
            bulkhead.aacquire,
            bulkhead.note_acquired,
            bulkhead.release,
        )

        async def guarded(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not try_acquire():
                await aacquire()
            elif events.ROUTES.get(events.BulkheadAcquired):
                note_acquired(0.0)
            try:
                return await call(args, kwargs)
            finally:
                release()

        return guarded


def build(ctx: BuildContext) -> Strategy | None:
    """A :class:`BulkheadStrategy` over the shared bulkhead of ``ctx.key``; no limit: ``None``."""
    options: BulkheadOptions = ctx.options
    if not options.enabled or options.limit is None:
        return None
    service = ctx.service
    bulkhead = registry.shared(PATTERN, ctx.key, options, lambda opts: Bulkhead(service, opts))
    return BulkheadStrategy(bulkhead, ctx.mode)
