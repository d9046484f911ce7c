"""The retry budget: how many retries and hedges a service may add to its own traffic.

In a total outage every retrying client multiplies the load on the failing dependency by its
attempt count. A budget caps that: over a sliding window of ``window_seconds`` (on the buttress
clock), the retries and hedges of one service may number at most ``ratio`` of its first attempts,
and never fewer than ``min_per_second`` per second of the window, so a quiet service can still
retry. It is Finagle's ``RetryBudget`` with one deliberate difference: the floor is a floor (as
in Envoy's ``min_retry_concurrency`` and failsafe-go's ``minConcurrency``), not an addition, so
``1 + ratio`` bounds the amplification whenever the service sends more than
``min_per_second / ratio`` calls a second. Why: ``docs/patterns/retry-budget.md``.

One :class:`RetryBudget` per service, shared by every retrying call site and every hedge of that
service (through ``BuildContext.shared``). It decides only; nothing here waits.
"""

from __future__ import annotations

import itertools
import threading
from typing import Literal, TypedDict, cast

from pydantic import Field

from buttress import _clock, events
from buttress._context import RetryScope
from buttress._values import PositiveSeconds
from buttress.patterns._base import BuildContext, Options
from buttress.patterns._sliding import SLOTS

__all__ = ["BUDGET", "RetryBudget", "RetryBudgetOptions", "RetryBudgetSnapshot", "shared_budget"]

# The key of the shared instance (``BuildContext.shared``): one budget per service.
BUDGET = "retry_budget"

Draw = Literal["retry", "hedge"]


class RetryBudgetOptions(Options):
    """``retry.budget``: the share of a service's traffic that retries and hedges may add."""

    enabled: bool = Field(default=True, description="false: retries are limited by attempts only")
    ratio: float = Field(
        default=0.2,
        ge=0,
        le=10,
        description="retries and hedges per first attempt, over the window",
    )
    min_per_second: float = Field(
        default=10.0,
        ge=0,
        le=1_000_000,
        description="floor: retries a second allowed whatever the ratio",
    )
    window_seconds: PositiveSeconds = Field(
        default=10.0, description="length of the sliding window"
    )


class RetryBudgetSnapshot(TypedDict):
    """A budget at one instant."""

    service: str
    enabled: bool
    requests: int  # first attempts in the window
    retries: int  # retries and hedges in the window
    remaining: int  # retries and hedges it would allow now


# The budgets' locks: each budget takes one of these (by its service) rather than a lock of its
# own. Held for a few counts at a slot's end, a retry or a snapshot, never across a call or an
# event, and never two at once.
_LOCKS = tuple(threading.Lock() for _ in range(16))


class RetryBudget:
    """First attempts and retries of one service over a sliding window, under a lock.

    ``deposit()`` counts a first attempt (every call of a retrying or hedging call site);
    ``withdraw(kind)`` takes one retry or hedge if the budget allows it.

    A first attempt within the current slot of the window takes no lock: it steps a counter
    (``next()`` on an ``itertools.count``, one atomic C call), and the locked steps (a slot's end,
    ``withdraw``, ``snapshot``) fold what it counted into the slot before they read the window.

    The window is :data:`SLOTS` slots that slide one at a time (as ``_sliding.SlidingCounts``, kept
    here in the budget itself, compactly: one budget per service): a first attempt leaves it
    between ``window`` and ``window * (1 + 1/SLOTS)`` seconds after it was counted. The retries
    have slots of their own from the first retry on: a service that never retried has none; the
    first attempts from the first slide past a slot that counted some (see ``_restart``).
    """

    __slots__ = (
        "_deposits",
        "_folded",
        "_lock",
        "_requests",
        "_retries",
        "_tick",
        "enabled",
        "min_per_second",
        "ratio",
        "requests",
        "retries",
        "service",
        "slot_end",
        "window",
    )

    def __init__(self, service: str, options: RetryBudgetOptions) -> None:
        self.service = service
        self._lock = _LOCKS[hash(service) % len(_LOCKS)]
        self._restart(options.window_seconds)
        # First attempts counted without the lock: every value ``_deposits`` gave below
        # ``_folded`` is in the window already (see _fold).
        self._deposits = itertools.count()
        self._folded = 0
        self._configure(options)

    def _restart(self, window: float) -> None:
        """An empty window of ``window`` seconds (under the lock, or while the budget is built)."""
        self.window = window  # each slot is window / SLOTS (worked out when the window slides)
        # First attempts per slot, from the first time the window slides past a slot that
        # counted some: until then every first attempt in the window is in the slot being filled,
        # and ``requests`` is that slot's count (a budget of a service called within one slot,
        # or never again, keeps no list: ≈ 136 bytes).
        self._requests: list[int] | None = None
        self._retries: list[int] | None = None  # retries and hedges per slot, from the first
        self._tick = 0  # the slot being filled is _tick % SLOTS, until slot_end
        self.slot_end = 0.0  # the first deposit slides to its own time
        # Each count's sum over the window as of the last _advance.
        self.requests = 0
        self.retries = 0

    def _advance(self, now: float) -> None:
        """Slide the window to ``now`` (locked): the slots that passed are emptied."""
        if now < self.slot_end:
            return
        # Worked out here, on the slots' slow path (once a slot at most), rather than kept: 32
        # bytes less per budget.
        slot = self.window / SLOTS
        tick = int(now // slot)
        passed = tick - self._tick
        if passed:
            requests, retries = self._requests, self._retries
            if passed >= SLOTS or passed < 0:
                if requests is not None:
                    requests[:] = [0] * SLOTS
                if retries is not None:
                    retries[:] = [0] * SLOTS
                self.requests = self.retries = 0
            else:
                if requests is None and self.requests:
                    # The slot being left holds every first attempt of the window: slots now.
                    requests = self._requests = [0] * SLOTS
                    requests[self._tick % SLOTS] = self.requests
                for step in range(1, passed + 1):
                    gone = (self._tick + step) % SLOTS
                    if requests is not None:
                        self.requests -= requests[gone]
                        requests[gone] = 0
                    if retries is not None:
                        self.retries -= retries[gone]
                        retries[gone] = 0
            self._tick = tick
        self.slot_end = (tick + 1) * slot

    def _configure(self, options: RetryBudgetOptions) -> None:
        self.enabled = options.enabled
        self.ratio = options.ratio
        self.min_per_second = options.min_per_second

    def reconfigure(self, options: RetryBudgetOptions) -> None:
        """Adopt new options; the counts in the window are kept (a new length restarts them)."""
        with self._lock:
            if options.window_seconds != self.window:
                self._fold()  # into the counts about to restart: dropped with them
                self._restart(options.window_seconds)
            self._configure(options)

    def _fold(self) -> None:
        """Move the first attempts counted without the lock into the current slot (locked)."""
        # next() both reads the counter and takes one value, which no deposit then holds.
        seen = next(self._deposits)
        pending = seen - self._folded
        self._folded = seen + 1
        if pending:
            requests = self._requests
            if requests is not None:
                requests[self._tick % SLOTS] += pending
            self.requests += pending

    def _deposit_late(self, now: float) -> None:
        """A first attempt past the current slot's end: fold, then slide the window to ``now``."""
        with self._lock:
            self._fold()
            self._advance(now)
            requests = self._requests
            if requests is not None:
                requests[self._tick % SLOTS] += 1
            self.requests += 1

    def _allowed(self) -> float:
        # The floor is a reserve for the whole window (Finagle's): a quiet service, or one just
        # started, may spend it at once.
        floor = self.min_per_second * self.window
        return max(self.ratio * self.requests, floor)

    def deposit(self) -> None:
        """Count one first attempt (on every call of a retrying call site: kept short)."""
        now = _clock.monotonic()
        if now < self.slot_end:
            next(self._deposits)
        else:
            self._deposit_late(now)

    def new_scope(self) -> RetryScope:
        """``deposit()``, then a fresh retry scope: retry's ``new_scope``, one call per call."""
        now = _clock.monotonic()
        if now < self.slot_end:
            next(self._deposits)
        else:
            self._deposit_late(now)
        return RetryScope()

    def withdraw(self, kind: Draw) -> bool:
        """Take one retry (or hedge) if the budget allows it; say so when it does not."""
        if not self.enabled:
            return True
        now = _clock.monotonic()
        with self._lock:
            self._fold()
            self._advance(now)
            allowed = self.retries + 1 <= self._allowed()
            if allowed:
                retries = self._retries
                if retries is None:
                    retries = self._retries = [0] * SLOTS
                retries[self._tick % SLOTS] += 1
                self.retries += 1
        if not allowed:
            handlers = events.ROUTES.get(events.RetryBudgetExhausted)
            if handlers:
                events.dispatch(handlers, events.RetryBudgetExhausted(self.service, kind))
        return allowed

    def snapshot(self) -> RetryBudgetSnapshot:
        """Counts in the window now, and how many retries or hedges it would allow."""
        now = _clock.monotonic()
        with self._lock:
            self._fold()
            self._advance(now)
            requests, retries = self.requests, self.retries
            remaining = max(0, int(self._allowed()) - retries)
        return RetryBudgetSnapshot(
            service=self.service,
            enabled=self.enabled,
            requests=requests,
            retries=retries,
            remaining=remaining,
        )


def shared_budget(ctx: BuildContext, options: RetryBudgetOptions) -> RetryBudget:
    """The budget of ``ctx.service``, shared by its retrying call sites and its hedges.

    Keyed by the service, never by a call site's private key: a budget exists to be shared.
    """
    service = ctx.service

    def make(opts: RetryBudgetOptions) -> RetryBudget:
        return RetryBudget(service, opts)

    if ctx.instances is None:
        return make(options)
    return cast("RetryBudget", ctx.instances(BUDGET, service, options, make))
