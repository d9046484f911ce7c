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

import logging
import re
from collections.abc import Callable
from typing import Any

from opentelemetry import trace

from buttress import events
from buttress.events import (
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


def _call_level(event: CallFinished) -> int:
    return DEBUG if event.outcome == "success" else INFO


def _state_level(event: CircuitStateChanged) -> int:
    return WARNING if event.new_state in _OPENING else INFO


def _rejected_level(event: CallRejected) -> int:
    # An open circuit rejects every call until it half-opens; its opening was logged at WARNING.
    # A full bulkhead or an empty token bucket is announced by nothing else.
    return DEBUG if event.pattern == "circuit_breaker" else INFO


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
    TimeoutExceeded: ("buttress.timeout.exceeded", WARNING),
    WorkerAbandoned: ("buttress.timeout.worker_abandoned", WARNING),
    WorkerFinishedLate: ("buttress.timeout.worker_finished_late", INFO),
    BulkheadQueued: ("buttress.bulkhead.queued", DEBUG),
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

# user:password@ in a URL (a redis state_url quoted back in a settings error).
_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/\s@]*@", re.IGNORECASE)


def _mask(text: str) -> str:
    return _CREDENTIALS.sub(r"\g<scheme>***@", text)


def _fields(name: str, event: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"event": name, **event._asdict()}
    error = fields.get("error")
    if isinstance(error, str):
        fields["error"] = _mask(error)
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        fields["trace_id"] = format(context.trace_id, "032x")
        fields["span_id"] = format(context.span_id, "016x")
    return fields


class LoggingSubscriber:
    """Logs buttress events to ``logger`` (default: the ``buttress`` logger)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logging.getLogger("buttress") if logger is None else logger

    def handlers(self) -> dict[type[Any], events.Handler]:
        """The handler for each event kind this subscriber consumes."""
        return {kind: self._handler(name, level) for kind, (name, level) in EVENT_NAMES.items()}

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
