"""Events: what every pattern decided, as small immutable records, and the hub that routes them.

Patterns emit events and know nothing about Prometheus, OpenTelemetry or logging: those subscribe
(:mod:`buttress.instrumentation`). How an event is built only when somebody listens, and the
bounded vocabularies that become metric labels: ``docs/internals.md`` (Events).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, get_args

__all__ = [
    "FUSED",
    "REJECTED_ERROR",
    "ROUTES",
    "Binder",
    "BulkheadAcquired",
    "BulkheadLimitChanged",
    "BulkheadQueued",
    "BulkheadReleased",
    "CacheLookup",
    "CacheServedStale",
    "CallFinished",
    "CallRejected",
    "ChaosInjected",
    "CircuitCallRecorded",
    "CircuitStateChanged",
    "CircuitTrialStarted",
    "CoalescingJoined",
    "DeferralDropped",
    "DeferralQueued",
    "DeferralReplayed",
    "Event",
    "FallbackFailed",
    "FallbackUsed",
    "Handler",
    "HedgeLaunched",
    "HedgeWon",
    "RateLimitAcquired",
    "Recorder",
    "RejectedCall",
    "RetryBudgetExhausted",
    "RetryExhausted",
    "RetryScheduled",
    "RetrySucceeded",
    "SettingsReloaded",
    "ShadowDecision",
    "StateStoreError",
    "SucceededCall",
    "TimedCallFinished",
    "TimeoutExceeded",
    "WorkerAbandoned",
    "WorkerFinishedLate",
    "dispatch",
    "emit",
    "failed",
    "fuse",
    "rebind",
    "recorder",
    "subscribe",
    "unsubscribe",
]

_log = logging.getLogger("buttress.events")


# --- calls -----------------------------------------------------------------------------------


class CallFinished(NamedTuple):
    """A protected call ended (once per logical call, after retries and fallbacks)."""

    service: str
    # success | failure | rejected | timeout, or how a pattern answered in the call's place:
    # fallback | cached | deferred (never counted as success)
    outcome: str
    duration: float  # seconds, whole call including retries
    error_type: str | None  # class name of the exception that escaped, if any


class CallRejected(NamedTuple):
    """A pattern refused a call without attempting it."""

    service: str
    pattern: str  # circuit_breaker | adaptive_throttle | rate_limit | bulkhead
    reason: str  # open | half_open_full | forced_open | throttled | full | queue_timeout |
    #              no_tokens | deadline
    retry_after: float | None


class RejectedCall(NamedTuple):
    """Not an event of its own: a :class:`Recorder` kind for the call an open circuit rejects
    when nothing outside the breaker can answer it, so the rejection ends the call.

    Recording one delivers what two recordings did: ``CallRejected(service, pattern, reason,
    retry_after)`` and then ``CallFinished(service, "rejected", 0.0, "CircuitOpenError")`` (a
    call that never ran is recorded with no duration). A subscriber may offer one bound function
    for both (:func:`fuse`); a plain handler of either kind gets its event, built, as before.
    Nobody subscribes to this kind; it is not in :data:`EVENT_TYPES`.
    """

    service: str
    pattern: str
    reason: str
    retry_after: float | None


class SucceededCall(NamedTuple):
    """Not an event of its own: a :class:`Recorder` kind for a successful call whose breaker
    is the final step (see :class:`RejectedCall`) and had nothing to judge but the outcome.

    Recording one delivers what two recordings did: ``CircuitCallRecorded(service, "success",
    duration, False, None, None, None)`` and then ``CallFinished(service, "success", duration,
    None)`` (the breaker admitted the call when it started; a breaker with a slow-call duration
    has a window, so it never records this kind). Nobody subscribes to this kind.
    """

    service: str
    duration: float


# --- circuit breaker -----------------------------------------------------------------------------


class CircuitCallRecorded(NamedTuple):
    """The breaker recorded the outcome of a call it admitted."""

    service: str
    outcome: str  # success | failure | ignored
    duration: float
    slow: bool
    error_type: str | None
    failure_rate: float | None  # over the window, when a rate window is configured
    slow_call_rate: float | None


class CircuitStateChanged(NamedTuple):
    """The circuit moved from one state to another."""

    service: str
    old_state: str
    new_state: str
    reason: str  # fail_max | failure_rate | slow_call_rate | timeout_elapsed | trial_failed |
    #              success_threshold | manual | reset | shared_state
    seconds_in_old_state: float | None


class CircuitTrialStarted(NamedTuple):
    """A half-open trial call was admitted."""

    service: str
    in_flight: int


# --- retry ---------------------------------------------------------------------------------------


class RetryScheduled(NamedTuple):
    """An attempt failed with a retryable error and another attempt follows after ``delay``."""

    service: str
    attempt: int  # the attempt that failed (1 = the first call)
    delay: float
    error_type: str
    reason: str  # backoff | retry_after


class RetryExhausted(NamedTuple):
    """The last attempt failed; its exception propagates."""

    service: str
    attempts: int
    error_type: str
    reason: str  # max_attempts | deadline | not_idempotent | budget


class RetrySucceeded(NamedTuple):
    """A call succeeded after at least one retry."""

    service: str
    attempts: int


class RetryBudgetExhausted(NamedTuple):
    """The service's retry budget refused a retry or a hedge; the call goes on without it."""

    service: str
    kind: str  # retry | hedge


# --- hedging -------------------------------------------------------------------------------------


class HedgeLaunched(NamedTuple):
    """A call was still unanswered after ``delay`` seconds: another copy of it started."""

    service: str
    hedge: int  # 1 for the first extra copy
    delay: float  # seconds since the previous copy started


class HedgeWon(NamedTuple):
    """A hedged call was answered (once per call that launched at least one hedge)."""

    service: str
    winner: str  # primary | hedge | none (every copy failed)


# --- timeout -------------------------------------------------------------------------------------


class TimedCallFinished(NamedTuple):
    """A call under ``with_timeout`` ended (in time or not)."""

    service: str
    elapsed: float
    timed_out: bool


class TimeoutExceeded(NamedTuple):
    """A call exceeded its time limit; the caller gets ``TimeoutExceededError``."""

    service: str
    seconds: float
    elapsed: float


class WorkerAbandoned(NamedTuple):
    """A sync call timed out and its worker thread was left running (threads cannot be killed)."""

    service: str
    abandoned: int  # workers of this service still running after their caller gave up


class WorkerFinishedLate(NamedTuple):
    """An abandoned worker finished."""

    service: str
    abandoned: int
    overran: float  # seconds past the deadline


# --- bulkhead ------------------------------------------------------------------------------------


class BulkheadQueued(NamedTuple):
    """A call found every slot busy and is waiting in the queue."""

    service: str
    queued: int


class BulkheadAcquired(NamedTuple):
    """A call took a bulkhead slot."""

    service: str
    waited: float
    active: int
    queued: int
    limit: int


class BulkheadReleased(NamedTuple):
    """A call gave its bulkhead slot back (on every path, including cancellation)."""

    service: str
    active: int
    queued: int


class BulkheadLimitChanged(NamedTuple):
    """An adaptive bulkhead moved its limit (from observed latency and drops)."""

    service: str
    limit: int
    previous: int
    reason: str  # drop | latency | growth


# --- rate limit ----------------------------------------------------------------------------------


class RateLimitAcquired(NamedTuple):
    """A call took a token, possibly after waiting."""

    service: str
    waited: float
    tokens: float  # tokens left in the bucket


# --- fallback ------------------------------------------------------------------------------------


class FallbackUsed(NamedTuple):
    """A fallback replaced the failure of the protected call."""

    service: str
    source: str  # value | callable | chain | cache
    error_type: str


class FallbackFailed(NamedTuple):
    """Every fallback alternative failed; the original exception propagates."""

    service: str
    error_type: str


# --- cache, coalescing, deferral ----------------------------------------------------------------


class CacheLookup(NamedTuple):
    """The cache looked a call up: a fresh entry answered it (``hit``) or none did (``miss``)."""

    service: str
    result: str  # hit | miss


class CacheServedStale(NamedTuple):
    """The call failed and an entry past its ttl (within stale_ttl) answered it."""

    service: str
    error_type: str


class CoalescingJoined(NamedTuple):
    """A call joined an identical call in flight instead of running."""

    service: str


class DeferralQueued(NamedTuple):
    """A rejected call was queued, to be replayed later; the caller got a handle."""

    service: str
    error_type: str  # the rejection: CircuitOpenError | BulkheadFullError | RateLimitedError
    depth: int  # items queued, this one included


class DeferralDropped(NamedTuple):
    """A deferred call was given up without running."""

    service: str
    reason: str  # full | expired | unserializable | store_error


class DeferralReplayed(NamedTuple):
    """A deferred call was run again."""

    service: str
    outcome: str  # success | failure
    waited: float  # seconds between queueing and the replay (wall clock)


# --- settings, shadow mode, shared state, chaos --------------------------------------------------


class SettingsReloaded(NamedTuple):
    """``reload_settings()`` ran: ``ok`` says whether the new settings were swapped in."""

    ok: bool
    generation: int
    error: str | None


class ShadowDecision(NamedTuple):
    """Shadow mode: a pattern would have acted here, but let the call through untouched."""

    service: str
    pattern: str
    action: str  # reject | retry | timeout | fallback | cached | stale | coalesced | deferred


class StateStoreError(NamedTuple):
    """The shared state store failed; the pattern went on with local state.

    ``operation`` is the breaker's request, or ``"rate_limit"`` for the fleet rate limit (which
    took the process's fair share of the rate).
    """

    service: str
    operation: str
    error_type: str


class ChaosInjected(NamedTuple):
    """Fault injection changed a call."""

    service: str
    kind: str  # exception | latency | result


Event = (
    CallFinished
    | CallRejected
    | CircuitCallRecorded
    | CircuitStateChanged
    | CircuitTrialStarted
    | RetryScheduled
    | RetryExhausted
    | RetrySucceeded
    | RetryBudgetExhausted
    | HedgeLaunched
    | HedgeWon
    | TimedCallFinished
    | TimeoutExceeded
    | WorkerAbandoned
    | WorkerFinishedLate
    | BulkheadQueued
    | BulkheadAcquired
    | BulkheadReleased
    | BulkheadLimitChanged
    | RateLimitAcquired
    | FallbackUsed
    | FallbackFailed
    | CacheLookup
    | CacheServedStale
    | CoalescingJoined
    | DeferralQueued
    | DeferralDropped
    | DeferralReplayed
    | SettingsReloaded
    | ShadowDecision
    | StateStoreError
    | ChaosInjected
)
EVENT_TYPES: tuple[type[Any], ...] = get_args(Event)

Handler = Callable[[Any], object]

# --- the hub ------------------------------------------------------------------------------------

# Event class -> the handlers subscribed to it. Replaced wholesale (copy on write) under _lock, so
# the hot path reads it without locking and never sees a half-updated route.
ROUTES: dict[type[Any], tuple[Handler, ...]] = {}
_lock = threading.Lock()
_failed_handlers: set[int] = set()

# A subscriber's fast path for one kind: ``binder(service)`` returns a function that takes the
# event's fields after ``service`` (no event object is built), or ``None`` when it records nothing
# for that service. Keyed by (kind, handler): the handler still takes events given to emit().
Binder = Callable[[str], "Callable[..., object] | None"]
_binders: dict[tuple[type[Any], Handler], Binder] = {}
# kind -> service -> its Recorder; rebound when a subscription of that kind changes. By kind,
# then by service: no (kind, service) tuple is kept per recorder, and a change of one kind's
# subscriptions walks the recorders of that kind only.
_recorders: dict[type[Any], dict[str, Recorder]] = {}


class Recorder:
    """The bound fast path of one event kind for one service.

    ``record`` is ``None`` while nobody listens to the kind; otherwise it takes the event's
    fields after ``service`` and hands them to every subscriber: to a bound function where the
    subscriber offered one (pre-bound series, a level check before anything is built), and as a
    built event to the other handlers. An emit site looks ``record`` up on every call, so a
    subscription made later applies to calls already compiled, and nothing is rebuilt.

    The subscribers bind on the first event of the kind for the service, not when the recorder
    is made: until then ``record`` is the recorder itself, which binds, puts what they bound in
    ``record``, and records. A service that never sees a kind (most never see a rejection)
    holds no binding for it, and a subscriber never shows a series for a kind before its first
    event.
    """

    __slots__ = ("record", "service")

    # Each kind's recorders are of a subclass of this class that names the kind (made once per
    # kind, see _of_kind): a slot less per recorder, and a service has one recorder per kind.
    kind: type[Any]

    def __new__(cls, kind: type[Any], _service: str) -> Recorder:
        return object.__new__(_of_kind(kind))

    def __init__(self, kind: type[Any], service: str) -> None:
        del kind  # (the class names it)
        self.service = service
        self.record: Callable[..., object] | None = None

    def __call__(self, *fields: Any) -> None:
        me: Recorder = self  # (mypy narrows ``self`` by the identity test below)
        with _lock:
            if me.record is self:  # not bound since the subscriptions last changed
                me.record = _compose(me.kind, me.service)
            record = me.record
        if record is not None:
            record(*fields)


# Event kind -> the subclass of Recorder for it (made under _lock, or racing harmlessly: a kind
# whose class is made twice has two equivalent classes, one of them kept).
_KINDS: dict[type[Any], type[Recorder]] = {}


def _of_kind(kind: type[Any]) -> type[Recorder]:
    found = _KINDS.get(kind)
    if found is None:
        made = type(f"Recorder[{kind.__name__}]", (Recorder,), {"__slots__": (), "kind": kind})
        found = _KINDS.setdefault(kind, made)
    return found


def recorder(kind: type[Any], service: str) -> Recorder:
    """The :class:`Recorder` of ``kind`` for ``service`` (one object per pair, made once)."""
    found = _recorders.get(kind, _NONE).get(service)
    if found is None:
        with _lock:
            by_service = _recorders.setdefault(kind, {})
            found = by_service.get(service)
            if found is None:
                found = Recorder(kind, service)
                found.record = _pending(found)
                by_service[service] = found
    return found


_NONE: dict[str, Recorder] = {}  # (never written)


def _pending(found: Recorder) -> Callable[..., object] | None:
    """``found`` itself (it binds on its first event), or ``None`` if nobody listens to its kind.

    The caller holds ``_lock``.
    """
    fusion = _FUSIONS.get(found.kind)
    if fusion is not None:
        first, second = fusion[0], fusion[1]
        return found if ROUTES.get(first) or ROUTES.get(second) else None
    return found if ROUTES.get(found.kind) else None


# What a rejected call records as its CallFinished (the only rejection that ends a call inside
# the breaker is the circuit breaker's; see RejectedCall).
REJECTED_ERROR = "CircuitOpenError"

Adapter = Callable[[Callable[..., object]], Callable[..., object]]


def _rejected_finished(finished: Callable[..., object]) -> Callable[..., object]:
    def part(_pattern: str, _reason: str, _retry_after: float | None) -> None:
        finished("rejected", 0.0, REJECTED_ERROR)

    return part


def _succeeded_recorded(recorded: Callable[..., object]) -> Callable[..., object]:
    def part(duration: float) -> None:
        recorded("success", duration, False, None, None, None)  # noqa: FBT003 - the fields

    return part


def _succeeded_finished(finished: Callable[..., object]) -> Callable[..., object]:
    def part(duration: float) -> None:
        finished("success", duration, None)

    return part


# A fused kind -> the two kinds it records, in order, and how each one's function is called
# with the fused kind's fields (None: with the same fields).
_FUSIONS: dict[type[Any], tuple[type[Any], type[Any], Adapter | None, Adapter]] = {
    RejectedCall: (CallRejected, CallFinished, None, _rejected_finished),
    SucceededCall: (CircuitCallRecorded, CallFinished, _succeeded_recorded, _succeeded_finished),
}
# The two kinds each fused kind stands for (for subscribers that offer a fused binder).
FUSED: dict[type[Any], tuple[type[Any], type[Any]]] = {
    kind: (first, second) for kind, (first, second, _, _) in _FUSIONS.items()
}
# A subscriber's one bound function for a fused kind, by (the fused kind, the handler it
# subscribed to the first kind): (its handler of the second kind, the binder). See fuse().
_fused: dict[tuple[type[Any], Handler], tuple[Handler, Binder]] = {}


def _compose(kind: type[Any], service: str) -> Callable[..., object] | None:
    """What a recorder of ``kind`` for ``service`` calls now (the caller holds ``_lock``)."""
    if kind in _FUSIONS:
        return _joined(kind, _fused_parts(kind, service))
    return _joined(kind, _parts(kind, service, ROUTES.get(kind, ())))


Part = tuple[Callable[..., object], Callable[..., object]]  # (whom to report, what to call)


def _parts(kind: type[Any], service: str, handlers: Iterable[Handler]) -> list[Part]:
    """The bound functions of ``handlers`` for ``kind``, and one that builds the event for the
    handlers that offer none (the caller holds ``_lock``)."""
    parts: list[Part] = []
    plain: list[Handler] = []
    for handler in handlers:
        binder = _binders.get((kind, handler))
        if binder is None:
            plain.append(handler)
            continue
        try:
            bound = binder(service)
        except Exception:  # noqa: BLE001 - a subscriber must never break the protected call
            _report(handler)
            plain.append(handler)
            continue
        if bound is not None:
            parts.append((handler, bound))
    if plain:
        handlers = tuple(plain)

        def build(*fields: Any) -> None:
            dispatch(handlers, kind(service, *fields))

        parts.append((build, build))
    return parts


def _fused_parts(kind: type[Any], service: str) -> list[Part]:
    """A fused kind's parts: each subscriber's one function where it offers one (:func:`fuse`),
    then the two kinds' functions for every other handler, in the kinds' order."""
    first_kind, second_kind, first_adapter, second_adapter = _FUSIONS[kind]
    seconds = ROUTES.get(second_kind, ())
    parts: list[Part] = []
    covered: set[Handler] = set()
    firsts: list[Handler] = []
    for handler in ROUTES.get(first_kind, ()):
        entry = _fused.get((kind, handler))
        if entry is None or entry[0] not in seconds:
            firsts.append(handler)
            continue
        try:
            bound = entry[1](service)
        except Exception:  # noqa: BLE001 - a subscriber must never break the protected call
            _report(handler)
            firsts.append(handler)
            continue
        covered.add(entry[0])
        if bound is not None:
            parts.append((handler, bound))
    first = _joined(first_kind, _parts(first_kind, service, firsts))
    if first is not None:
        parts.append((first, first if first_adapter is None else first_adapter(first)))
    second = _joined(
        second_kind, _parts(second_kind, service, [h for h in seconds if h not in covered])
    )
    if second is not None:
        parts.append((second, second_adapter(second)))
    return parts


def _joined(kind: type[Any], parts: list[Part]) -> Callable[..., object] | None:
    """One function that calls every part, reporting (once) and skipping a part that fails."""
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0][1]  # the emit site reports a failure (see failed())
    if len(parts) == 2:  # the default subscribers on a per-call kind: no loop
        (first_handler, first), (second_handler, second) = parts
        if len(kind._fields) == 4:  # CallFinished, CallRejected: no tuple of fields to pack

            def both3(a: Any, b: Any, c: Any) -> None:
                try:
                    first(a, b, c)
                except Exception:  # noqa: BLE001 - a subscriber must never break the call
                    _report(first_handler)
                try:
                    second(a, b, c)
                except Exception:  # noqa: BLE001 - a subscriber must never break the call
                    _report(second_handler)

            return both3

        def both(*fields: Any) -> None:
            try:
                first(*fields)
            except Exception:  # noqa: BLE001 - a subscriber must never break the protected call
                _report(first_handler)
            try:
                second(*fields)
            except Exception:  # noqa: BLE001 - a subscriber must never break the protected call
                _report(second_handler)

        return both

    if len(kind._fields) == 4:  # CallRejected with three subscribers: no tuple to pack

        def each3(a: Any, b: Any, c: Any) -> None:
            for handler, bound in parts:
                try:
                    bound(a, b, c)
                except Exception:  # noqa: BLE001 - a subscriber must never break the call
                    _report(handler)

        return each3

    def each(*fields: Any) -> None:
        for handler, bound in parts:
            try:
                bound(*fields)
            except Exception:  # noqa: BLE001 - a subscriber must never break the protected call
                _report(handler)

    return each


def failed(record: Callable[..., object]) -> None:
    """For an emit site: ``record`` (a recorder's function) raised; report it once, go on."""
    _report(record)


def rebind(kinds: Iterable[type[Any]], *, blocking: bool = True) -> bool:
    """Bind the recorders of ``kinds`` again at their next event: a subscriber's binders would
    now answer differently (the logging subscriber's, after a level changed).

    Without ``blocking``, gives up and returns ``False`` if the hub's lock is taken (for a
    caller holding a lock that code under the hub's lock may wait for).
    """
    if not _lock.acquire(blocking=blocking):
        return False
    try:
        _rebind(kinds)
    finally:
        _lock.release()
    return True


def _rebind(kinds: Iterable[type[Any]]) -> None:
    # The caller holds _lock. Only the recorders of the kinds whose subscriptions changed.
    changed = set(kinds)
    for fused, (first, second, _, _) in _FUSIONS.items():
        if first in changed or second in changed:
            changed.add(fused)
    for kind in changed:
        for found in _recorders.get(kind, _NONE).values():
            found.record = _pending(found)


def subscribe(
    handler: Handler,
    kinds: Iterable[type[Any]] | None = None,
    *,
    binder: Binder | None = None,
) -> Callable[[], None]:
    """Call ``handler(event)`` for every event of ``kinds`` (default: every kind).

    ``binder``, for the per-call kinds emitted through a :class:`Recorder`, is the handler's
    fast path there: ``binder(service)`` returns a function of the event's fields after
    ``service`` (or ``None``: nothing to record for that service), so no event is built for it.

    Returns a function that undoes the subscription.
    """
    global ROUTES
    selected = tuple(kinds) if kinds is not None else EVENT_TYPES
    unknown = [k for k in selected if k not in EVENT_TYPES]
    if unknown:
        raise TypeError(f"not buttress event types: {unknown!r}")
    with _lock:
        routes = dict(ROUTES)
        for kind in selected:
            routes[kind] = (*routes.get(kind, ()), handler)
            if binder is not None:
                _binders[kind, handler] = binder
        ROUTES = routes
        _rebind(selected)

    def undo() -> None:
        unsubscribe(handler)

    return undo


def unsubscribe(handler: Handler) -> None:
    """Stop calling ``handler`` for any event."""
    global ROUTES
    with _lock:
        routes = {}
        changed = []
        for kind, handlers in ROUTES.items():
            kept = tuple(h for h in handlers if h is not handler)
            if len(kept) != len(handlers):
                changed.append(kind)
                _binders.pop((kind, handler), None)
            if kept:
                routes[kind] = kept
        ROUTES = routes
        _rebind(changed)


def fuse(kind: type[Any], first: Handler, second: Handler, binder: Binder) -> Callable[[], None]:
    """Let ``binder`` record the fused ``kind`` (:data:`FUSED`) for two handlers at once.

    ``first`` and ``second`` are one subscriber's handlers of the two kinds ``kind`` stands for
    (for :class:`RejectedCall`: ``CallRejected`` and ``CallFinished``); ``binder(service)``
    returns one function of the fused kind's fields that records what both would record
    (``None``: nothing). While either handler is not subscribed, each is given its own kind as
    usual. Returns a function that undoes it.
    """
    if kind not in _FUSIONS:
        raise TypeError(f"not a fused kind: {kind!r}")
    with _lock:
        _fused[kind, first] = (second, binder)
        _rebind((kind,))

    def undo() -> None:
        with _lock:
            if _fused.get((kind, first), (None,))[0] is second:
                del _fused[kind, first]
                _rebind((kind,))

    return undo


def dispatch(handlers: tuple[Handler, ...], event: Any) -> None:
    """Deliver ``event`` to ``handlers``; a failing handler is reported once and skipped."""
    for handler in handlers:
        try:
            handler(event)
        except Exception:  # noqa: BLE001 - a subscriber must never break the protected call
            _report(handler)


def _report(handler: Callable[..., object]) -> None:
    """Log a failing subscriber once (with the exception being handled)."""
    key = id(handler)
    if key not in _failed_handlers:
        _failed_handlers.add(key)
        _log.exception("buttress.subscriber_failed", extra={"handler": repr(handler)})


def emit(event: Any) -> None:
    """Deliver ``event`` to whoever subscribed to its kind (for code off the hot path)."""
    handlers = ROUTES.get(type(event))
    if handlers:
        dispatch(handlers, event)
