"""Bulkhead: cap the concurrent calls to a dependency so one slow service cannot take them all.

One :class:`Bulkhead` per service (shared by every call site that names it) counts the calls in
flight and keeps a FIFO queue of waiters. A free slot is taken and given back without a lock (a
list of tokens, popped and appended in single C calls); the queue, a changed limit and a slot
that someone is owed go through a plain lock. A released slot is handed straight to the oldest
waiter, so a newcomer never overtakes the queue. The drivers in :mod:`buttress.policy`
make the waiters: threads (a ``threading.Event``) or tasks on any event loop (a future resolved on
its own loop), so one bulkhead serves threads and several event loops at once. The lock is never
held while a protected call runs or while anybody waits.

With ``adaptive="aimd"`` or ``"gradient2"`` the limit is not fixed: every call that ends feeds
its round-trip time and whether it was dropped (timed out, refused) to an adaptive limit
(:mod:`buttress.patterns._limits`, Netflix concurrency-limits semantics, one update per window of
about a second), which moves the limit between ``min_limit`` and ``max_limit``; ``limit`` is then
where it starts. Calls in flight over a
lowered limit finish; a raised one admits waiters at once.

A queued call never waits past the enclosing deadline (``buttress.remaining()``): it gives up then
with :class:`~buttress.TimeoutExceededError`, which the enclosing ``with_timeout`` reports as its
own. A call that gets its slot after its deadline, or after the caller of its sync timeout gave up,
gives the slot back without starting.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar, Final, TypedDict

from pydantic import Field, model_validator

from buttress import _clock, _context, events
from buttress._deadline import caller_gave_up, not_started
from buttress._values import Seconds
from buttress.exceptions import BulkheadFullError, RejectedError, TimeoutExceededError
from buttress.patterns import _transient
from buttress.patterns._base import BuildContext, Mode, Options, Strategy, Waiter, WaitForSlot
from buttress.patterns._limits import Algorithm, Windowed, make_limit

__all__ = [
    "PATTERN",
    "AdaptiveBulkheadStrategy",
    "Bulkhead",
    "BulkheadOptions",
    "BulkheadSnapshot",
    "BulkheadStrategy",
    "build",
]

PATTERN = "bulkhead"


# The queue of every bulkhead nobody has waited in yet: always empty (maxlen 0), never appended to
# (``_enqueue`` gives the bulkhead a deque of its own first).
_NO_WAITERS: deque[Waiter] = deque(maxlen=0)


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
    adaptive: Algorithm | None = Field(
        None,
        description='"aimd" or "gradient2": the limit adapts to latency and drops, starting at '
        "limit (unset: the limit is fixed)",
    )
    min_limit: int = Field(default=1, gt=0, description="lowest adaptive limit")
    max_limit: int = Field(default=200, gt=0, description="highest adaptive limit")

    @model_validator(mode="after")
    def _bounds(self) -> BulkheadOptions:
        if self.min_limit > self.max_limit:
            raise ValueError(
                f"min_limit ({self.min_limit}) must be <= max_limit ({self.max_limit})"
            )
        return self


class BulkheadSnapshot(TypedDict):
    """A bulkhead at one instant (what ``buttress.health()`` shows)."""

    service: str
    active: int
    queued: int
    limit: int
    utilization: float  # active / limit


# Where an adaptive limit starts when no limit is given (Netflix concurrency-limits' default).
INITIAL_ADAPTIVE_LIMIT: Final = 20


def _limit(options: BulkheadOptions) -> int:
    if options.adaptive is not None:
        initial = INITIAL_ADAPTIVE_LIMIT if options.limit is None else options.limit
        return min(max(initial, options.min_limit), options.max_limit)
    if options.limit is None:  # build() makes no bulkhead without a limit
        raise ValueError("a bulkhead needs a limit")
    return options.limit


def _adaptive(options: BulkheadOptions) -> Windowed | None:
    if options.adaptive is None:
        return None
    return make_limit(options.adaptive, _limit(options), options.min_limit, options.max_limit)


def dropped(failure: BaseException | None, now: float) -> bool | None:
    """What a finished call says about the limit: dropped, not (``False``), or nothing (``None``).

    Dropped: it timed out (its deadline passed, whoever noticed), was refused further in, or the
    dependency answered 429 or 503. Another error of its own says nothing about capacity.
    """
    deadline = _deadline.get()
    if deadline is not None and now >= deadline:
        return True
    if failure is None:
        return False
    if isinstance(failure, TimeoutError | RejectedError):
        return True
    if isinstance(failure, Exception) and _transient.http_status(failure) in (429, 503):
        return True
    return None


# Free slots kept where a call takes one without the lock (see Bulkhead); the rest of the free
# slots are a count under the lock. Enough for the calls a service usually has in flight at once;
# a bulkhead holds at most about this many references however large its limit. A new bulkhead
# keeps one there (the rest in the count): the list grows toward this share only when calls
# overlap (the first call that finds it empty refills it under the lock), so a service whose
# calls never overlap keeps a list of one token (≈ 120 bytes less than sixteen).
FAST_SLOTS: Final = 16

# The bulkheads' locks: each bulkhead takes one of these (by its service) rather than a lock of
# its own (≈ 90 bytes per service). Held for a few bookkeeping instructions (the queue, a changed
# limit, a slot someone is owed), never across a call, a wait or an event, and never two at once:
# nothing done under one takes another (a waiter's ``wake()`` sets an event or schedules a
# callback), so bulkheads that share one never deadlock, and contend only on their slow paths.
_LOCKS = tuple(threading.Lock() for _ in range(16))


class Bulkhead:
    """The shared state of one service's bulkhead: slots in use and the queue of waiters.

    A free slot is taken without a lock: ``_free`` is a list of tokens, and ``list.pop()`` and
    ``list.append()`` are single C calls, atomic under the GIL, so taking and giving back a slot
    is a semaphore with no Python-level lock. Everything else (the queue, a changed limit, the
    free slots beyond the list's, kept as the count ``_spare``) is under ``_lock`` (one of
    ``_LOCKS``, shared with other services' bulkheads). Slots are never made or lost:
    ``len(_free) + _spare + in flight == limit + _debt`` at every instant,
    where ``_debt`` is how far a lowered limit is below the calls in flight (slots to drop as
    they come back).

    ``_claims`` (``_debt`` plus the queued waiters, written under the lock) says whether a free
    slot is owed to someone before any newcomer. Both lock-free paths read it *after* their own
    step, which makes them safe against the locked ones: a newcomer that took a slot while
    anything is owed gives it back under the lock and queues (so it never overtakes a waiter nor
    runs over a lowered limit), and a slot given back while anything is owed is handed on under
    the lock. A waiter is queued (and its claim written) before the queue looks for a free slot
    once more, so a slot given back in between is found by one side or the other.
    """

    __slots__ = (
        "_acquired",
        "_claims",
        "_debt",
        "_free",
        "_limiter",
        "_lock",
        "_overflow",
        "_spare",
        "_waiters",
        "limit",
        "max_queue",
        "queue_timeout",
        "service",
    )

    def __init__(self, service: str, options: BulkheadOptions) -> None:
        self.service = service
        self._lock = _LOCKS[hash(service) % len(_LOCKS)]
        self.limit = limit = _limit(options)
        fast = min(limit, 1)  # the list grows when calls overlap (FAST_SLOTS)
        self._free = [True] * fast
        self._spare = limit - fast
        self._debt = 0
        self._claims = 0
        # Calls let through by shadow mode although no slot was free (never queued, never counted
        # in ``active``): how far over the limit enforcement would have been.
        self._overflow = 0
        # A queue of its own once a call first waits: an empty deque is ~0.6 KB per service.
        self._waiters: deque[Waiter] = _NO_WAITERS
        # Where a slot taken at once is reported: a pre-bound recorder, no event built for it.
        self._acquired = events.recorder(events.BulkheadAcquired, service)
        self.max_queue = options.max_queue
        self.queue_timeout = options.queue_timeout
        self._limiter = _adaptive(options)

    # -- the slots (``_locked`` methods: the caller holds the lock) -------------------------------
    def _in_flight(self) -> int:
        """Calls holding a slot (exact under the lock; a fair reading without it)."""
        return max(0, self.limit + self._debt - len(self._free) - self._spare)

    def _take_locked(self) -> bool:
        """Take a free slot if there is one (lock held; a lock-free pop may race it)."""
        if self._spare:
            self._spare -= 1
            return True
        try:
            self._free.pop()
        except IndexError:
            return False
        return True

    def _put_locked(self) -> None:
        """Put a slot back among the free ones (lock held)."""
        if len(self._free) < FAST_SLOTS:
            self._free.append(True)
        else:
            self._spare += 1

    def _distribute_locked(self) -> None:
        """Hand free slots to whoever is owed them: a lowered limit's debt, then the oldest
        waiters (lock held). Ends with ``_claims`` up to date.
        """
        free = self._free
        while len(free) > FAST_SLOTS:  # given back past the lock-free share: into the count
            try:
                free.pop()
            except IndexError:
                break
            self._spare += 1
        while self._debt and self._take_locked():
            self._debt -= 1
        waiters = self._waiters
        while waiters and self._take_locked():
            while waiters:
                waiter = waiters.popleft()
                waiter.granted = True
                if waiter.wake():
                    break
                waiter.granted = False  # its event loop is closed: the next one
            else:
                self._put_locked()
        self._claims = claims = self._debt + len(waiters)
        if not claims:  # a raised limit's slots: where a call takes one without the lock
            while self._spare and len(free) < FAST_SLOTS:
                self._spare -= 1
                free.append(True)

    def _resize_locked(self, limit: int) -> None:
        """Make the limit ``limit``: free slots added or dropped, the rest as debt (lock held)."""
        delta = limit - self.limit
        self.limit = limit
        if delta > 0:
            paid = min(delta, self._debt)
            self._debt -= paid
            self._spare += delta - paid
        elif delta < 0:
            owed = -delta
            while owed and self._take_locked():
                owed -= 1
            self._debt += owed
        self._distribute_locked()

    def _admit_locked(self, *, holding: bool) -> _SlotWait | None:
        """``admit()``'s slow path: ``holding`` a slot taken while something was owed, or none
        free without the lock. Takes a slot nobody is owed (``None``), else queue for one.
        """
        with self._lock:
            if holding:
                self._put_locked()
            self._distribute_locked()
            if not self._claims and self._take_locked():
                return None
        return _SlotWait(self)

    # -- decisions (plain code the drivers call; nothing here waits) --------------------------
    def _enqueue(self, waiter: Waiter) -> str | None:
        """Queue ``waiter``, or take a slot freed meanwhile; return the rejection reason if full."""
        with self._lock:
            self._distribute_locked()
            if not self._claims and self._take_locked():
                waiter.granted = True
                return None
            if len(self._waiters) >= self.max_queue:
                return "full"
            if self._waiters is _NO_WAITERS:
                self._waiters = deque()
            self._waiters.append(waiter)
            # Claimed first, then looked again: a slot given back without the lock since the
            # look above is found here, or its giver sees the claim (see the class docstring).
            self._claims += 1
            self._distribute_locked()
            if waiter.granted:
                return None
            queued = len(self._waiters)
        handlers = events.ROUTES.get(events.BulkheadQueued)
        if handlers:
            events.dispatch(handlers, events.BulkheadQueued(self.service, queued))
        return None

    def _withdraw(self, waiter: Waiter) -> bool:
        """The waiter stops waiting (timeout, cancellation); return whether it was granted a slot.

        A slot granted in the same instant is the waiter's: it either uses it or releases it.
        """
        with self._lock:
            if waiter.granted:
                return True
            # Gone already if a release found its event loop closed and passed the slot on.
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            self._claims = self._debt + len(self._waiters)
            return False

    def release(self, _token: object = None) -> None:
        """Give a slot back: to the oldest waiter if the limit allows, else to the pool.

        Also the driver's ``after`` (which passes the call's token, unused here): one frame less
        on every call than a method that forwards to it. Without a lock unless something is owed
        a slot (a waiter, a lowered limit) or the lock-free share is full.
        """
        free = self._free
        free.append(True)
        if self._claims or len(free) > FAST_SLOTS:
            with self._lock:
                self._distribute_locked()
        handlers = events.ROUTES.get(events.BulkheadReleased)
        if handlers:
            event = events.BulkheadReleased(self.service, self._in_flight(), len(self._waiters))
            events.dispatch(handlers, event)

    def note_acquired(self, waited: float) -> None:
        """Emit ``BulkheadAcquired`` (if anyone listens) for a slot taken after ``waited`` s."""
        handlers = events.ROUTES.get(events.BulkheadAcquired)
        if handlers:
            event = events.BulkheadAcquired(
                self.service, waited, self._in_flight(), len(self._waiters), self.limit
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
        return caller_gave_up()

    def _not_started(self, deadline: float | None, start: float) -> TimeoutExceededError:
        """The deadline (or the caller) did not wait for a slot: the call never starts."""
        self._note_rejected("deadline")
        waited = (deadline if deadline is not None else _clock.monotonic()) - start
        return not_started(self.service, waited, "a bulkhead slot")

    # -- the call's turn --------------------------------------------------------------------------
    def admit(self) -> _SlotWait | None:
        """Take a free slot (``None``), or ask the driver to queue for one.

        A free slot is never taken out of turn: one taken while a waiter is queued (or a lowered
        limit is owed slots) goes to them, and this call queues. A full queue raises
        ``BulkheadFullError`` when the driver queues the call.
        """
        try:
            self._free.pop()
        except IndexError:
            wait = self._admit_locked(holding=False)
            if wait is not None:
                return wait
        else:
            if self._claims:
                wait = self._admit_locked(holding=True)
                if wait is not None:
                    return wait
        record = self._acquired.record
        if record is not None:  # inline, not note_acquired(): this runs on every call
            # _in_flight() inline: a fair reading, as any count taken without the lock.
            active = self.limit + self._debt - len(self._free) - self._spare
            try:
                # Nobody was queued: waiters exist only while every slot is busy.
                record(0.0, active if active > 0 else 0, 0, self.limit)
            except Exception:  # noqa: BLE001 - a subscriber must never break the call
                events.failed(record)
        return None

    # -- administration ----------------------------------------------------------------------------
    def reconfigure(self, options: BulkheadOptions) -> None:
        """Adopt new options; calls in flight and queued keep their places.

        A raised limit admits waiters at once; a lowered one lets calls in flight finish and admits
        nobody until the count is under it. A smaller ``max_queue`` only affects new arrivals.
        """
        with self._lock:
            self.max_queue = options.max_queue
            self.queue_timeout = options.queue_timeout
            self._limiter = _adaptive(options)
            self._resize_locked(_limit(options))

    # -- the adaptive limit ------------------------------------------------------------------------
    def admit_timed(self) -> float | _SlotWait:
        """``admit()`` for an adaptive bulkhead: the token is when the call got its slot."""
        wait = self.admit()
        if wait is None:
            return _clock.monotonic()
        wait.timed = True
        return wait

    def finish(self, started: float, failure: BaseException | None) -> None:
        """The call that got its slot at ``started`` ended: learn from it, give the slot back."""
        now = _clock.monotonic()
        verdict = dropped(failure, now)
        previous = limit = self.limit
        limiter = self._limiter
        if verdict is not None and limiter is not None:
            with self._lock:
                limit = limiter.sample(now, now - started, self._in_flight(), verdict)
                if limit != self.limit:
                    self._resize_locked(limit)
        self.release()
        if limit != previous:
            handlers = events.ROUTES.get(events.BulkheadLimitChanged)
            if handlers:
                reason = "drop" if verdict else "growth" if limit > previous else "latency"
                event = events.BulkheadLimitChanged(self.service, limit, previous, reason)
                events.dispatch(handlers, event)

    def snapshot(self) -> BulkheadSnapshot:
        """Calls in flight and queued, the limit and the utilization (active / limit)."""
        with self._lock:
            active, queued, limit = self._in_flight(), len(self._waiters), self.limit
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
            self._distribute_locked()
            if not self._claims and self._take_locked():
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


class _SlotWait(WaitForSlot):
    """A call's wait in the queue of a full bulkhead.

    It never waits past the enclosing deadline: then it gives up with ``TimeoutExceededError``;
    a slot that comes too late (or after the caller of its sync timeout left) is given back.
    """

    __slots__ = ("bulkhead", "by_deadline", "deadline", "queued", "start", "timed")

    def __init__(self, bulkhead: Bulkhead) -> None:
        super().__init__()
        self.bulkhead = bulkhead
        self.start = _clock.monotonic()
        self.deadline: float | None = None
        self.by_deadline = False
        self.queued = False
        self.timed = False  # an adaptive bulkhead's: the token is when the slot was taken

    def queue(self, waiter: Waiter) -> bool:
        bulkhead = self.bulkhead
        reason = bulkhead._enqueue(waiter)
        if reason is not None:
            raise bulkhead._rejected(reason)
        if waiter.granted:  # a slot freed between admit() and here
            return False
        self.queued = True
        self.deadline = deadline = _deadline.get()
        self.bound, self.by_deadline = bulkhead._bound(deadline)
        return True

    def resume(self, waiter: Waiter) -> float | None:
        bulkhead = self.bulkhead
        if self.queued:
            deadline = self.deadline
            if not bulkhead._withdraw(waiter):
                if self.by_deadline:
                    raise bulkhead._not_started(deadline, self.start)
                raise bulkhead._rejected("queue_timeout")
            if bulkhead._too_late(deadline):
                bulkhead.release()
                raise bulkhead._not_started(deadline, self.start)
        now = _clock.monotonic()
        bulkhead.note_acquired(now - self.start)
        return now if self.timed else None

    def abandon(self, waiter: Waiter) -> None:
        # Cancelled while queued, possibly just as a slot was granted.
        bulkhead = self.bulkhead
        if bulkhead._withdraw(waiter):
            bulkhead.release()
        elif (deadline := self.deadline) is not None and _clock.monotonic() >= deadline:
            # The enclosing timeout's own timer noticed the deadline first: still a call that
            # left the queue at its deadline, counted as such whichever timer won.
            bulkhead._note_rejected("deadline")


class BulkheadStrategy:
    """``with_bulkhead`` at one call site, over the service's shared :class:`Bulkhead`.

    A gate that holds a slot for the length of the call.
    """

    pattern: ClassVar[str] = PATTERN

    def __init__(self, bulkhead: Bulkhead, mode: Mode = "enforce") -> None:
        self.bulkhead = bulkhead
        self.mode = mode
        # Bound once: the driver calls them on every call. Shadow mode's token is whether the
        # call holds a counted slot.
        self.before: Callable[[], object]
        self.after: Callable[[Any], None]
        if mode == "shadow":
            self.before, self.after = bulkhead.shadow_acquire, bulkhead.shadow_release
        else:
            self.before, self.after = bulkhead.admit, bulkhead.release


class AdaptiveBulkheadStrategy:
    """``with_bulkhead(adaptive=...)``: a gate told how each call ended, to move the limit."""

    pattern: ClassVar[str] = PATTERN

    def __init__(self, bulkhead: Bulkhead) -> None:
        self.bulkhead = bulkhead
        self.before = bulkhead.admit_timed
        self.finish = bulkhead.finish


def build(ctx: BuildContext) -> Strategy | None:
    """The bulkhead gate over the shared bulkhead of ``ctx.key``; no limit: ``None``."""
    options: BulkheadOptions = ctx.options
    if not options.enabled or (options.limit is None and options.adaptive is None):
        return None
    service = ctx.service
    bulkhead = ctx.shared(PATTERN, lambda opts: Bulkhead(service, opts))
    if options.adaptive is not None and ctx.mode == "enforce":
        # Shadow mode keeps the fixed gate: it never rejects, so it has no drops to learn from.
        return AdaptiveBulkheadStrategy(bulkhead)
    return BulkheadStrategy(bulkhead, ctx.mode)
