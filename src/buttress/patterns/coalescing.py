"""Coalescing (single-flight): identical concurrent calls share one run and its outcome.

The first call with a key runs; every identical call made while it runs waits for it and gets
its result, or raises its error, without calling again. Threads and tasks alike: an ``async def``
call runs in a task of its own, so cancelling a waiting caller (the first included) only ends
that caller's wait, and the run goes on for the others (and to its end when nobody waits any
more). A run interrupted rather than finished (KeyboardInterrupt in the thread that ran it, its
task cancelled) ends nobody else's call: the callers waiting for it start over.

Once the run is over its key is free: the next call runs again (caching results is
``with_cache``'s job). The key of a call: see :mod:`buttress.patterns._keys`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from types import TracebackType
from typing import Any, ClassVar

from pydantic import Field

from buttress import events
from buttress.patterns._base import BuildContext, Effect, Join, Mode, Options, Return, Waiter
from buttress.patterns._keys import KeyFunction, call_key

PATTERN = "coalescing"


class CoalescingOptions(Options):
    """Options of ``with_coalescing`` (and of ``services.<name>.coalescing``).

    Off unless asked for (``with_coalescing`` asks; in settings, ``enabled = true``): sharing one
    run between callers is only right for calls that read.
    """

    code_only: ClassVar[frozenset[str]] = frozenset({"key"})

    enabled: bool = Field(
        default=False, description="share one run between identical concurrent calls"
    )
    key: Callable[..., Hashable] | None = Field(
        None, description="key(*args, **kwargs): what makes two calls the same"
    )


class _Run:
    """One shared run: who waits for it, and how it ended."""

    __slots__ = ("done", "error", "interrupted", "result", "traceback", "waiters")

    def __init__(self) -> None:
        self.waiters: list[Waiter] = []
        self.done = False
        self.interrupted = False
        self.result: Any = None
        self.error: Exception | None = None
        self.traceback: TracebackType | None = None


class Flights:
    """The runs in flight of one call site, by key (shared by its strategies across reloads)."""

    def __init__(self, options: CoalescingOptions) -> None:
        self.runs: dict[Hashable, _Run] = {}
        self.lock = threading.Lock()

    def reconfigure(self, options: CoalescingOptions) -> None:
        """Nothing to adopt: runs in flight finish as they started."""


class _Seat(Join):
    """One caller's place in a run: the :class:`Join` the driver performs."""

    __slots__ = ("flights", "key", "run", "strategy")

    def __init__(
        self, strategy: CoalescingStrategy, key: Hashable, run: _Run, *, leads: bool
    ) -> None:
        super().__init__(leads=leads)
        self.strategy = strategy
        self.flights = strategy.flights
        self.key = key
        self.run = run

    def settle(self, result: Any, error: BaseException | None) -> None:
        run = self.run
        with self.flights.lock:
            if self.flights.runs.get(self.key) is run:
                del self.flights.runs[self.key]
            run.done = True
            if error is None:
                run.result = result
            elif isinstance(error, Exception):
                run.error = error
                run.traceback = error.__traceback__
            else:
                run.interrupted = True
            waiters, run.waiters = run.waiters, []
        for waiter in waiters:
            waiter.wake()

    def wait(self, waiter: Waiter) -> bool:
        with self.flights.lock:
            if self.run.done:
                return False
            self.run.waiters.append(waiter)
            return True

    def outcome(self, waiter: Waiter) -> Effect:
        run = self.run
        if run.interrupted:
            return self.strategy.seat(self.key)
        if run.error is not None:
            raise run.error.with_traceback(run.traceback)
        return Return(run.result)

    def leave(self, waiter: Waiter) -> None:
        with self.flights.lock:
            if waiter in self.run.waiters:
                self.run.waiters.remove(waiter)


class CoalescingStrategy:
    """Seats each call in the run in flight for its key, or starts one."""

    pattern: ClassVar[str] = PATTERN
    returned = None
    raised = None

    def __init__(
        self, service: str, flights: Flights, options: CoalescingOptions, mode: Mode
    ) -> None:
        self.service = service
        self.flights = flights
        self.key: KeyFunction | None = options.key
        self.shadow = mode == "shadow"

    def enter(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A :class:`Join` for the run of this call's key (``None`` in shadow mode)."""
        key = call_key(PATTERN, self.key, args, kwargs)
        if self.shadow:
            if key in self.flights.runs:  # a read without the lock: only a report
                events.emit(events.ShadowDecision(self.service, PATTERN, "coalesced"))
            return None
        return self.seat(key)

    def seat(self, key: Hashable) -> _Seat:
        """A seat in the run of ``key``: leading a new one, or waiting for the one in flight."""
        flights = self.flights
        with flights.lock:
            run = flights.runs.get(key)
            leads = run is None
            if run is None:
                run = flights.runs[key] = _Run()
        if not leads:
            events.emit(events.CoalescingJoined(self.service))
        return _Seat(self, key, run, leads=leads)


def build(ctx: BuildContext) -> CoalescingStrategy | None:
    """The coalescing strategy of a call site."""
    options: CoalescingOptions = ctx.options
    if not options.enabled:
        return None
    return CoalescingStrategy(ctx.service, ctx.shared(PATTERN, Flights), options, ctx.mode)
