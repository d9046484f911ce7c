"""OpenTelemetry subscriber: buttress's decisions as events and attributes on the caller's span.

buttress never starts a span per call: the caller's own span (an HTTP request, a job) is the one
that should show that its call to ``openfga`` was retried twice and then short-circuited. Each
handler annotates the *current* span, and only when it is recording, so with no SDK installed a
handler costs one ``get_current_span()`` and one ``is_recording()``. Nothing is subscribed to the
events of a successful call, so the success path pays nothing.

Exceptions buttress swallows (a failed attempt that was retried, a failure a fallback replaced)
are added as ``exception`` events carrying ``exception.type``; buttress never records messages or
arguments. An exception that reaches the caller is the caller's span's to record (OpenTelemetry's
``start_as_current_span`` does so by default), so it is not recorded twice.

A circuit state change that happens outside any recording span (an operator's admin action, a
state seen in the shared store) becomes a short span of its own, ``buttress.circuit.state_changed``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN, Span, TracerProvider, get_current_span
from opentelemetry.trace.propagation import _SPAN_KEY

from buttress import events
from buttress.events import (
    CacheServedStale,
    CallRejected,
    ChaosInjected,
    CircuitStateChanged,
    CircuitTrialStarted,
    DeferralQueued,
    FallbackFailed,
    FallbackUsed,
    HedgeLaunched,
    RetryBudgetExhausted,
    RetryExhausted,
    RetryScheduled,
    RetrySucceeded,
    ShadowDecision,
    StateStoreError,
    TimeoutExceeded,
    WorkerAbandoned,
)

__all__ = ["OTelSubscriber"]

SCOPE = "buttress"
ERROR_TYPE = "error.type"  # semantic-conventions key, stable
SERVICE = "buttress.service"


def _span_context() -> tuple[Callable[[], Any], Any] | None:
    """Where the current span is, for the one handler that runs per call (an open circuit's
    rejection): ``(get, key)`` such that ``get().get(key)`` is the span, or ``None``.

    With opentelemetry-api's default runtime context (a ``ContextVar`` holding the context
    dict) that is one C call and a lookup, against ``get_current_span``'s four Python frames
    (about 0.1 us). Any other runtime context, or an API whose internals differ, gets ``None``
    and the public function. A test pins both to the same answer on the lowest and newest API
    versions.
    """
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    variable = getattr(runtime, "_current_context", None)
    if type(runtime).__name__ != "ContextVarsRuntimeContext" or not isinstance(
        variable, ContextVar
    ):
        return None
    return variable.get, _SPAN_KEY


def _recording() -> Span | None:
    span = get_current_span()
    # No span in the context is INVALID_SPAN, which never records: no call to ask it.
    return span if span is not INVALID_SPAN and span.is_recording() else None


class OTelSubscriber:
    """Annotates the current span with buttress events.

    Args:
        tracer_provider: the provider for the standalone state-change spans; ``None`` uses the
            global one (a no-op until an SDK is installed, and it picks the SDK up afterwards).
    """

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        if tracer_provider is None:
            self._tracer = trace.get_tracer(SCOPE)
        else:
            self._tracer = tracer_provider.get_tracer(SCOPE)

    def handlers(self) -> dict[type[Any], events.Handler]:
        """The handler for each event kind this subscriber consumes."""
        return {
            RetryScheduled: self._on_retry,
            RetryExhausted: self._on_exhausted,
            RetrySucceeded: self._on_retry_succeeded,
            RetryBudgetExhausted: self._on_budget_exhausted,
            HedgeLaunched: self._on_hedge,
            CircuitStateChanged: self._on_state_changed,
            CircuitTrialStarted: self._on_trial,
            CallRejected: self._on_rejected,
            TimeoutExceeded: self._on_timeout,
            WorkerAbandoned: self._on_abandoned,
            FallbackUsed: self._on_fallback,
            FallbackFailed: self._on_fallback_failed,
            CacheServedStale: self._on_stale,
            DeferralQueued: self._on_deferred,
            ShadowDecision: self._on_shadow,
            StateStoreError: self._on_state_store,
            ChaosInjected: self._on_chaos,
        }

    def binders(self) -> dict[type[Any], events.Binder]:
        """The fast path of the per-call kinds: nothing is built unless a span is recording."""
        return {CallRejected: self._bind_rejected}

    def _bind_rejected(self, service: str) -> Callable[[str, str, float | None], None]:
        on_rejected = self._on_rejected
        found = _span_context()
        if found is None:

            def rejected(pattern: str, reason: str, retry_after: float | None) -> None:
                # _recording() inline: an open circuit rejects every call.
                span = get_current_span()
                if span is not INVALID_SPAN and span.is_recording():
                    on_rejected(CallRejected(service, pattern, reason, retry_after))

            return rejected
        current, key = found

        def rejected_in_context(pattern: str, reason: str, retry_after: float | None) -> None:
            # get_current_span() inline (see _span_context): no span is the common case.
            span = current().get(key)
            if span is not None and isinstance(span, Span) and span.is_recording():
                on_rejected(CallRejected(service, pattern, reason, retry_after))

        return rejected_in_context

    def _on_retry(self, event: RetryScheduled) -> None:
        span = _recording()
        if span is None:
            return
        span.add_event("exception", {"exception.type": event.error_type, SERVICE: event.service})
        span.add_event(
            "buttress.retry",
            {
                SERVICE: event.service,
                "buttress.retry.attempt": event.attempt,
                "buttress.retry.delay_seconds": event.delay,
                "buttress.retry.reason": event.reason,
                ERROR_TYPE: event.error_type,
            },
        )
        span.set_attribute("buttress.retry.count", event.attempt)

    def _on_exhausted(self, event: RetryExhausted) -> None:
        span = _recording()
        if span is not None:
            span.add_event(
                "buttress.retry.exhausted",
                {
                    SERVICE: event.service,
                    "buttress.retry.attempts": event.attempts,
                    "buttress.retry.reason": event.reason,
                    ERROR_TYPE: event.error_type,
                },
            )

    def _on_retry_succeeded(self, event: RetrySucceeded) -> None:
        span = _recording()
        if span is not None:
            span.add_event(
                "buttress.retry.succeeded",
                {SERVICE: event.service, "buttress.retry.attempts": event.attempts},
            )

    def _on_budget_exhausted(self, event: RetryBudgetExhausted) -> None:
        span = _recording()
        if span is not None:
            span.add_event(
                "buttress.retry.budget_exhausted",
                {SERVICE: event.service, "buttress.retry.budget.kind": event.kind},
            )

    def _on_hedge(self, event: HedgeLaunched) -> None:
        span = _recording()
        if span is not None:
            span.add_event(
                "buttress.hedging.launched",
                {
                    SERVICE: event.service,
                    "buttress.hedging.hedge": event.hedge,
                    "buttress.hedging.delay_seconds": event.delay,
                },
            )

    def _on_state_changed(self, event: CircuitStateChanged) -> None:
        attributes: dict[str, Any] = {
            SERVICE: event.service,
            "buttress.circuit.previous_state": event.old_state,
            "buttress.circuit.state": event.new_state,
            "buttress.circuit.reason": event.reason,
        }
        if event.seconds_in_old_state is not None:
            attributes["buttress.circuit.seconds_in_previous_state"] = event.seconds_in_old_state
        span = _recording()
        if span is None:
            self._tracer.start_span("buttress.circuit.state_changed", attributes=attributes).end()
            return
        span.add_event("buttress.circuit.state_changed", attributes)
        span.set_attribute("buttress.circuit.state", event.new_state)

    def _on_trial(self, event: CircuitTrialStarted) -> None:
        span = _recording()
        if span is not None:
            span.add_event(
                "buttress.circuit.trial",
                {SERVICE: event.service, "buttress.circuit.trials_in_flight": event.in_flight},
            )
            span.set_attribute("buttress.circuit.state", "half_open")

    def _on_rejected(self, event: CallRejected) -> None:
        span = _recording()
        if span is None:
            return
        attributes: dict[str, Any] = {
            SERVICE: event.service,
            "buttress.pattern": event.pattern,
            "buttress.reason": event.reason,
        }
        if event.retry_after is not None:
            attributes["buttress.retry_after_seconds"] = event.retry_after
        span.add_event("buttress.rejected", attributes)
        span.set_attribute("buttress.rejected_by", event.pattern)

    def _on_timeout(self, event: TimeoutExceeded) -> None:
        span = _recording()
        if span is not None:
            span.add_event(
                "buttress.timeout",
                {
                    SERVICE: event.service,
                    "buttress.timeout.seconds": event.seconds,
                    "buttress.timeout.elapsed_seconds": event.elapsed,
                },
            )

    def _on_abandoned(self, event: WorkerAbandoned) -> None:
        span = _recording()
        if span is not None:
            span.add_event(
                "buttress.timeout.worker_abandoned",
                {SERVICE: event.service, "buttress.timeout.abandoned_workers": event.abandoned},
            )

    def _on_fallback(self, event: FallbackUsed) -> None:
        span = _recording()
        if span is None:
            return
        span.add_event("exception", {"exception.type": event.error_type, SERVICE: event.service})
        span.add_event(
            "buttress.fallback",
            {
                SERVICE: event.service,
                "buttress.fallback.source": event.source,
                ERROR_TYPE: event.error_type,
            },
        )
        span.set_attribute("buttress.fallback.source", event.source)

    def _on_stale(self, event: CacheServedStale) -> None:
        # A stale answer replaced a failure: recorded like a fallback, with its own source.
        span = _recording()
        if span is None:
            return
        span.add_event("exception", {"exception.type": event.error_type, SERVICE: event.service})
        span.add_event(
            "buttress.cache.stale", {SERVICE: event.service, ERROR_TYPE: event.error_type}
        )
        span.set_attribute("buttress.fallback.source", "stale_cache")

    def _on_deferred(self, event: DeferralQueued) -> None:
        span = _recording()
        if span is None:
            return
        span.add_event(
            "buttress.deferral",
            {
                SERVICE: event.service,
                ERROR_TYPE: event.error_type,
                "buttress.deferral.depth": event.depth,
            },
        )
        span.set_attribute("buttress.fallback.source", "deferred")

    def _on_fallback_failed(self, event: FallbackFailed) -> None:
        span = _recording()
        if span is not None:
            span.add_event(
                "buttress.fallback.failed", {SERVICE: event.service, ERROR_TYPE: event.error_type}
            )

    def _on_shadow(self, event: ShadowDecision) -> None:
        span = _recording()
        if span is not None:
            span.add_event(
                "buttress.shadow",
                {
                    SERVICE: event.service,
                    "buttress.pattern": event.pattern,
                    "buttress.shadow.action": event.action,
                },
            )

    def _on_state_store(self, event: StateStoreError) -> None:
        span = _recording()
        if span is not None:
            span.add_event(
                "buttress.state_store.error",
                {
                    SERVICE: event.service,
                    "buttress.state_store.operation": event.operation,
                    ERROR_TYPE: event.error_type,
                },
            )

    def _on_chaos(self, event: ChaosInjected) -> None:
        span = _recording()
        if span is not None:
            span.add_event(
                "buttress.chaos", {SERVICE: event.service, "buttress.chaos.kind": event.kind}
            )
