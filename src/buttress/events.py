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
    "ROUTES",
    "BulkheadAcquired",
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
    "RateLimitAcquired",
    "RetryExhausted",
    "RetryScheduled",
    "RetrySucceeded",
    "SettingsReloaded",
    "ShadowDecision",
    "StateStoreError",
    "TimedCallFinished",
    "TimeoutExceeded",
    "WorkerAbandoned",
    "WorkerFinishedLate",
    "dispatch",
    "emit",
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
    pattern: str  # circuit_breaker | bulkhead | rate_limit
    reason: str  # open | half_open_full | forced_open | full | queue_timeout | no_tokens | deadline
    retry_after: float | None


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
    reason: str  # max_attempts | deadline | not_idempotent


class RetrySucceeded(NamedTuple):
    """A call succeeded after at least one retry."""

    service: str
    attempts: int


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
    """The shared state store failed; the breaker went on with local state."""

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
    | TimedCallFinished
    | TimeoutExceeded
    | WorkerAbandoned
    | WorkerFinishedLate
    | BulkheadQueued
    | BulkheadAcquired
    | BulkheadReleased
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


def subscribe(handler: Handler, kinds: Iterable[type[Any]] | None = None) -> Callable[[], None]:
    """Call ``handler(event)`` for every event of ``kinds`` (default: every kind).

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
        ROUTES = routes

    def undo() -> None:
        unsubscribe(handler)

    return undo


def unsubscribe(handler: Handler) -> None:
    """Stop calling ``handler`` for any event."""
    global ROUTES
    with _lock:
        routes = {}
        for kind, handlers in ROUTES.items():
            kept = tuple(h for h in handlers if h is not handler)
            if kept:
                routes[kind] = kept
        ROUTES = routes


def dispatch(handlers: tuple[Handler, ...], event: Any) -> None:
    """Deliver ``event`` to ``handlers``; a failing handler is reported once and skipped."""
    for handler in handlers:
        try:
            handler(event)
        except Exception:  # noqa: BLE001 - a subscriber must never break the protected call
            key = id(handler)
            if key not in _failed_handlers:
                _failed_handlers.add(key)
                _log.exception("buttress.subscriber_failed", extra={"handler": repr(handler)})


def emit(event: Any) -> None:
    """Deliver ``event`` to whoever subscribed to its kind (for code off the hot path)."""
    handlers = ROUTES.get(type(event))
    if handlers:
        dispatch(handlers, event)
