"""Logging subscriber: one stdlib log record per decision, with a stable name and structured fields.

The message of every record is a stable event name (``buttress.circuit.state_changed``); the
details are in ``extra`` (``record.service``, ``record.new_state``, ...), so a JSON formatter or a
format string such as ``%(message)s service=%(service)s`` picks them up. When a span is current the
record also carries ``trace_id`` and ``span_id`` (hex, as OpenTelemetry prints them).

Records hold the event's fields only: service names, outcomes, exception *class* names, counts and
durations. Never argument values, results or exception messages, and credentials in a settings
error are masked.

Levels: the success path is DEBUG (and costs one ``isEnabledFor`` check when DEBUG is off); a
decision that changes what callers get (circuit opening, retries running out, timeouts) is WARNING.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from opentelemetry import trace

from buttress import events
from buttress._values import redact_text
from buttress.events import (
    BulkheadLimitChanged,
    BulkheadQueued,
    CacheServedStale,
    CallFinished,
    CallRejected,
    ChaosInjected,
    CircuitStateChanged,
    CircuitTrialStarted,
    CoalescingJoined,
    DeferralDropped,
    DeferralQueued,
    DeferralReplayed,
    FallbackFailed,
    FallbackUsed,
    HedgeLaunched,
    RetryBudgetExhausted,
    RetryExhausted,
    RetryScheduled,
    RetrySucceeded,
    SettingsReloaded,
    ShadowDecision,
    StateStoreError,
    TimeoutExceeded,
    WorkerAbandoned,
    WorkerFinishedLate,
)

__all__ = ["EVENT_NAMES", "LoggingSubscriber"]

DEBUG, INFO, WARNING, ERROR = logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR

_OPENING = frozenset({"open", "forced_open"})


def _outcome_level(outcome: str) -> int:
    return DEBUG if outcome == "success" else INFO


def _call_level(event: CallFinished) -> int:
    return _outcome_level(event.outcome)


def _state_level(event: CircuitStateChanged) -> int:
    return WARNING if event.new_state in _OPENING else INFO


def _rejection_level(pattern: str) -> int:
    # An open circuit rejects every call until it half-opens; its opening was logged at WARNING.
    # A full bulkhead or an empty token bucket is announced by nothing else.
    return DEBUG if pattern == "circuit_breaker" else INFO


def _rejected_level(event: CallRejected) -> int:
    return _rejection_level(event.pattern)


def _replayed_level(event: DeferralReplayed) -> int:
    return INFO if event.outcome == "success" else WARNING


def _settings_level(event: SettingsReloaded) -> int:
    return INFO if event.ok else ERROR


# Event kind -> (stable name, level or a function of the event giving it).
EVENT_NAMES: dict[type[Any], tuple[str, int | Callable[[Any], int]]] = {
    CallFinished: ("buttress.call.finished", _call_level),
    CallRejected: ("buttress.call.rejected", _rejected_level),
    CircuitStateChanged: ("buttress.circuit.state_changed", _state_level),
    CircuitTrialStarted: ("buttress.circuit.trial_started", DEBUG),
    RetryScheduled: ("buttress.retry.scheduled", INFO),
    RetryExhausted: ("buttress.retry.exhausted", WARNING),
    RetrySucceeded: ("buttress.retry.succeeded", INFO),
    RetryBudgetExhausted: ("buttress.retry.budget_exhausted", WARNING),
    HedgeLaunched: ("buttress.hedging.launched", DEBUG),
    TimeoutExceeded: ("buttress.timeout.exceeded", WARNING),
    WorkerAbandoned: ("buttress.timeout.worker_abandoned", WARNING),
    WorkerFinishedLate: ("buttress.timeout.worker_finished_late", INFO),
    BulkheadQueued: ("buttress.bulkhead.queued", DEBUG),
    BulkheadLimitChanged: ("buttress.bulkhead.limit_changed", DEBUG),
    FallbackUsed: ("buttress.fallback.used", INFO),
    FallbackFailed: ("buttress.fallback.failed", WARNING),
    CacheServedStale: ("buttress.cache.served_stale", INFO),
    CoalescingJoined: ("buttress.coalescing.joined", DEBUG),
    DeferralQueued: ("buttress.deferral.queued", INFO),
    DeferralDropped: ("buttress.deferral.dropped", WARNING),
    DeferralReplayed: ("buttress.deferral.replayed", _replayed_level),
    SettingsReloaded: ("buttress.settings.reloaded", _settings_level),
    ShadowDecision: ("buttress.shadow.decision", INFO),
    StateStoreError: ("buttress.state_store.error", WARNING),
    ChaosInjected: ("buttress.chaos.injected", DEBUG),
}

# A library's logger gets a NullHandler, so an application that configured no logging does not
# see buttress's warnings on stderr through logging's last-resort handler.
logging.getLogger("buttress").addHandler(logging.NullHandler())


# --- the per-call kinds: nothing bound while nothing of theirs can be logged ---------------------
# CallFinished and CallRejected come at DEBUG (a success, a rejection by an open circuit) or INFO:
# while a logger has neither enabled (its default, WARNING, inherited from the root), their
# binders decline, so the recorders call nothing of this subscriber's on the call path. logging
# empties every logger's cache of isEnabledFor answers whenever a level changes anywhere
# (setLevel, logging.disable, dictConfig); the watched logger's cache tells us (_LevelWatch),
# and the recorders of these kinds bind again at their next event (and those of RejectedCall,
# which records both: events rebinds it with either).
_BOUND_KINDS: tuple[type[Any], ...] = (CallFinished, CallRejected)


class _LevelWatch(dict[int, bool]):
    """A logger's cache of ``isEnabledFor`` answers that says when logging empties it."""

    __slots__ = ()

    def clear(self) -> None:
        super().clear()
        # setLevel() must never fail for buttress's sake (no thread at interpreter shutdown).
        with contextlib.suppress(Exception):
            _levels_changed()


def _levels_changed() -> None:
    # Called under logging's module lock. Code under the events lock may wait for that lock (a
    # subscriber that logs while it binds), so this never waits for the events lock: when it is
    # taken, a thread rebinds once it is free (no logging lock held there).
    if not events.rebind(_BOUND_KINDS, blocking=False):
        threading.Thread(
            target=events.rebind, args=(_BOUND_KINDS,), name="buttress-log-levels", daemon=True
        ).start()


def _watch(logger: logging.Logger) -> bool:
    """Whether a change of ``logger``'s levels is seen (its cache is then a :class:`_LevelWatch`).

    Only a logger that logging's manager empties the cache of: the root, or one that
    ``getLogger`` made. Its cache is replaced by an empty one, which is always right (logging
    fills it again on the next question); an answer written meanwhile to the old one is lost.
    """
    cache = getattr(logger, "_cache", None)
    if isinstance(cache, _LevelWatch):
        return True
    manager = getattr(logger, "manager", None)
    if type(cache) is not dict or manager is None:
        return False
    if logger is not manager.root and manager.loggerDict.get(logger.name) is not logger:
        return False
    logger._cache = _LevelWatch()
    return True


def _may_log(logger: logging.Logger, level: int) -> bool:
    """``isEnabledFor(level)`` without its cache, its lock or ``disabled``.

    Not ``disabled``: logging turns it on and off without emptying caches, so it is checked
    where a record would be made, never decided on in advance. No lock: a binder runs under the
    events lock (see _levels_changed).
    """
    return bool(logger.manager.disable < level and level >= logger.getEffectiveLevel())


def _fields(name: str, event: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"event": name, **event._asdict()}
    error = fields.get("error")
    if isinstance(error, str):
        fields["error"] = redact_text(error)  # a state_url quoted back in a settings error
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        fields["trace_id"] = format(context.trace_id, "032x")
        fields["span_id"] = format(context.span_id, "016x")
    return fields


class LoggingSubscriber:
    """Logs buttress events to ``logger`` (default: the ``buttress`` logger)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logging.getLogger("buttress") if logger is None else logger
        # Whether a level change is seen: then the per-call kinds bind nothing while neither
        # of their levels is enabled (see _BOUND_KINDS).
        self._watched = _watch(self.logger)

    def handlers(self) -> dict[type[Any], events.Handler]:
        """The handler for each event kind this subscriber consumes."""
        return {kind: self._handler(name, level) for kind, (name, level) in EVENT_NAMES.items()}

    def binders(self) -> dict[type[Any], events.Binder]:
        """The fast path of the per-call kinds: the level is checked before an event is built."""
        # Rebound when a level changes: _BOUND_KINDS (and so RejectedCall, see events._rebind).
        return {
            CallFinished: self._bind_call_finished,
            CallRejected: self._bind_rejected,
            events.RejectedCall: self._bind_rejected_call,
        }

    def _quiet(self) -> bool:
        """Whether no record of the per-call kinds can be made until a level changes: neither
        DEBUG nor INFO is enabled, and a change would be seen."""
        return self._watched and not _may_log(self.logger, INFO)

    def _bind_call_finished(self, service: str) -> Callable[[str, float, str | None], None] | None:
        if self._quiet():
            return None  # bound again when a level changes
        log = self.logger.log
        # The logger's own answers to isEnabledFor, which logging empties whenever a level
        # changes: a "no" found there saves a call per event. Anything else (a "yes", no answer
        # yet, a logging without the cache) asks isEnabledFor itself.
        known: dict[int, bool] = getattr(self.logger, "_cache", {})
        enabled = self.logger.isEnabledFor
        name = EVENT_NAMES[CallFinished][0]

        def record_call(outcome: str, duration: float, error_type: str | None) -> None:
            # _outcome_level and the cache inline, no frame: this runs on every call.
            level = DEBUG if outcome == "success" else INFO
            if known.get(level) is not False and enabled(level):
                event = CallFinished(service, outcome, duration, error_type)
                log(level, name, extra=_fields(name, event))

        return record_call

    def _bind_rejected(self, service: str) -> Callable[[str, str, float | None], None] | None:
        if self._quiet():
            return None  # bound again when a level changes
        log = self.logger.log
        known: dict[int, bool] = getattr(self.logger, "_cache", {})
        enabled = self.logger.isEnabledFor
        name = EVENT_NAMES[CallRejected][0]

        def rejected(pattern: str, reason: str, retry_after: float | None) -> None:
            # _rejection_level and the cache inline: an open circuit rejects every call.
            level = DEBUG if pattern == "circuit_breaker" else INFO
            if known.get(level) is not False and enabled(level):
                event = CallRejected(service, pattern, reason, retry_after)
                log(level, name, extra=_fields(name, event))

        return rejected

    def _bind_rejected_call(self, service: str) -> Callable[[str, str, float | None], None] | None:
        """A call the rejection ended (events.RejectedCall): its CallRejected and CallFinished
        lines, each after its own level check."""
        if self._quiet():
            return None  # bound again when a level changes
        log = self.logger.log
        known: dict[int, bool] = getattr(self.logger, "_cache", {})
        enabled = self.logger.isEnabledFor
        rejected_name = EVENT_NAMES[CallRejected][0]
        finished_name = EVENT_NAMES[CallFinished][0]

        def rejected_call(pattern: str, reason: str, retry_after: float | None) -> None:
            # _rejection_level, _outcome_level("rejected") and the cache inline: while a
            # circuit is open, every call comes here.
            level = DEBUG if pattern == "circuit_breaker" else INFO
            if known.get(level) is not False and enabled(level):
                event: Any = CallRejected(service, pattern, reason, retry_after)
                log(level, rejected_name, extra=_fields(rejected_name, event))
            if known.get(INFO) is not False and enabled(INFO):
                event = CallFinished(service, "rejected", 0.0, events.REJECTED_ERROR)
                log(INFO, finished_name, extra=_fields(finished_name, event))

        return rejected_call

    def _handler(self, name: str, level: int | Callable[[Any], int]) -> events.Handler:
        log = self.logger.log
        enabled = self.logger.isEnabledFor
        if isinstance(level, int):
            fixed = level

            def handle_fixed(event: Any) -> None:
                if enabled(fixed):
                    log(fixed, name, extra=_fields(name, event))

            return handle_fixed
        level_of = level

        def handle(event: Any) -> None:
            chosen = level_of(event)
            if enabled(chosen):
                log(chosen, name, extra=_fields(name, event))

        return handle
