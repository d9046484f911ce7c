"""OpenTelemetry subscriber: events and attributes on the caller's span, with the real SDK."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from buttress import (
    CircuitOpenError,
    DeferOptions,
    TimeoutExceededError,
    circuit_breaker,
    events,
    instrumentation,
    registry,
    retry_with_backoff,
    with_cache,
    with_fallback,
    with_hedging,
    with_timeout,
)
from buttress.events import (
    BulkheadAcquired,
    BulkheadReleased,
    CallFinished,
    CircuitCallRecorded,
    CircuitStateChanged,
    RateLimitAcquired,
    TimedCallFinished,
)
from buttress.instrumentation.otel import OTelSubscriber
from buttress.testing import force_circuit_state

PER_CALL = {
    CallFinished,
    CircuitCallRecorded,
    BulkheadAcquired,
    BulkheadReleased,
    TimedCallFinished,
    RateLimitAcquired,
}


class Traced:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("tests")

    def spans(self, name: str | None = None):
        return [s for s in self.exporter.get_finished_spans() if name is None or s.name == name]

    def only(self, name: str):
        (span,) = self.spans(name)
        return span


def events_of(span, name=None):
    return [(e.name, dict(e.attributes)) for e in span.events if name is None or e.name == name]


@pytest.fixture
def traced(restore_subscribers) -> Traced:
    """The OTel subscriber alone, with a local SDK provider (never the set-once global)."""
    t = Traced()
    instrumentation.configure(prometheus=False, otel=t.provider, logging=False)
    return t


def test_nothing_is_subscribed_to_the_events_of_a_successful_call():
    assert not set(OTelSubscriber().handlers()) & PER_CALL


def test_retries_annotate_the_callers_span(traced, mode, clock):
    attempts = []

    def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("refused")
        return "ok"

    fn = retry_with_backoff(name="llm", max_attempts=3, jitter="none", initial=0.5)(
        mode.define(flaky)
    )
    with traced.tracer.start_as_current_span("GET /answer"):
        assert mode.run(fn) == "ok"
    span = traced.only("GET /answer")
    retries = events_of(span, "buttress.retry")
    assert [attrs["buttress.retry.attempt"] for _, attrs in retries] == [1, 2]
    assert [attrs["buttress.retry.delay_seconds"] for _, attrs in retries] == [0.5, 1.0]
    assert {attrs["error.type"] for _, attrs in retries} == {"ConnectionError"}
    assert {attrs["buttress.service"] for _, attrs in retries} == {"llm"}
    # The swallowed failures are recorded as exceptions (class only: no message, no arguments).
    exceptions = events_of(span, "exception")
    assert (
        exceptions
        == [("exception", {"exception.type": "ConnectionError", "buttress.service": "llm"})] * 2
    )
    assert events_of(span, "buttress.retry.succeeded") == [
        ("buttress.retry.succeeded", {"buttress.service": "llm", "buttress.retry.attempts": 3})
    ]
    assert span.attributes["buttress.retry.count"] == 2
    assert len(traced.spans()) == 1  # no span of buttress's own


def test_exhausted_retries_say_why(traced, mode, clock):
    def down():
        raise ConnectionError("refused")

    fn = retry_with_backoff(name="llm", max_attempts=2)(mode.define(down))
    with traced.tracer.start_as_current_span("job"):
        with pytest.raises(ConnectionError):
            mode.run(fn)
    ((_, attrs),) = events_of(traced.only("job"), "buttress.retry.exhausted")
    assert attrs == {
        "buttress.service": "llm",
        "buttress.retry.attempts": 2,
        "buttress.retry.reason": "max_attempts",
        "error.type": "ConnectionError",
    }


def test_state_changes_and_rejections_land_on_the_span_of_the_call(traced, mode, clock):
    def down():
        raise ConnectionError("refused")

    fn = circuit_breaker(name="openfga", fail_max=1, timeout=30)(mode.define(down))
    with traced.tracer.start_as_current_span("trip"):
        with pytest.raises(ConnectionError):
            mode.run(fn)
    with traced.tracer.start_as_current_span("rejected"):
        assert isinstance(mode.outcome(fn), CircuitOpenError)
    trip = traced.only("trip")
    ((_, change),) = events_of(trip, "buttress.circuit.state_changed")
    assert change["buttress.circuit.previous_state"] == "closed"
    assert change["buttress.circuit.state"] == "open"
    assert change["buttress.circuit.reason"] == "fail_max"
    assert trip.attributes["buttress.circuit.state"] == "open"
    rejected = traced.only("rejected")
    ((_, rejection),) = events_of(rejected, "buttress.rejected")
    assert rejection["buttress.pattern"] == "circuit_breaker"
    assert rejection["buttress.reason"] == "open"
    assert rejection["buttress.retry_after_seconds"] == pytest.approx(30)
    assert rejected.attributes["buttress.rejected_by"] == "circuit_breaker"


def test_a_state_change_outside_any_span_gets_a_span_of_its_own(traced, mode, clock):
    fn = circuit_breaker(name="search")(mode.define())
    assert mode.run(fn) == "ok"
    (breaker,) = registry.instances("circuit_breaker").values()
    breaker.force_open()  # an operator's action: no request span is current
    span = traced.only("buttress.circuit.state_changed")
    assert span.attributes["buttress.service"] == "search"
    assert span.attributes["buttress.circuit.state"] == "forced_open"
    assert span.attributes["buttress.circuit.reason"] == "manual"


def test_timeouts_annotate_the_span(traced, mode, clock):
    fn = with_timeout(name="llm", seconds=2)(mode.define(latency=5))
    with traced.tracer.start_as_current_span("slow"):
        assert isinstance(mode.outcome(fn), TimeoutExceededError)
    ((_, attrs),) = events_of(traced.only("slow"), "buttress.timeout")
    assert attrs["buttress.service"] == "llm"
    assert attrs["buttress.timeout.seconds"] == 2


def test_a_fallback_records_the_failure_it_replaced(traced, mode, clock):
    def down():
        raise ConnectionError("refused")

    fn = with_fallback("cached", name="prices")(mode.define(down))
    with traced.tracer.start_as_current_span("quote"):
        assert mode.run(fn) == "cached"
    span = traced.only("quote")
    assert ("exception", {"exception.type": "ConnectionError", "buttress.service": "prices"}) in (
        events_of(span, "exception")
    )
    ((_, attrs),) = events_of(span, "buttress.fallback")
    assert attrs == {
        "buttress.service": "prices",
        "buttress.fallback.source": "value",
        "error.type": "ConnectionError",
    }
    assert span.attributes["buttress.fallback.source"] == "value"


def test_without_a_recording_span_nothing_is_recorded(traced):
    events.emit(events.RetryScheduled("llm", 1, 0.1, "ConnectionError", "backoff"))
    events.emit(events.CallRejected("llm", "bulkhead", "full", None))
    assert traced.spans() == []


def test_without_an_sdk_everything_is_a_no_op():
    # No provider given: the global one, in this test process the API's proxy (no SDK installed).
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    subscriber = OTelSubscriber()
    assert trace.get_current_span() is trace.INVALID_SPAN
    assert not subscriber._tracer.start_span("probe").is_recording()
    handle = subscriber.handlers()
    handle[CircuitStateChanged](CircuitStateChanged("svc", "closed", "open", "fail_max", 1.0))
    handle[events.RetryScheduled](events.RetryScheduled("svc", 1, 0.1, "OSError", "backoff"))
    assert trace.get_current_span() is trace.INVALID_SPAN


def test_a_rejection_through_the_recorder_annotates_the_recording_span_only():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    subscriber = OTelSubscriber(provider)
    rejected = subscriber.binders()[events.CallRejected]("rec")
    rejected("circuit_breaker", "open", 1.5)  # no span: nothing, and no event built
    with provider.get_tracer("t").start_as_current_span("request"):
        rejected("circuit_breaker", "open", 1.5)
    (span,) = exporter.get_finished_spans()
    with provider.get_tracer("t").start_as_current_span("request"):
        subscriber.handlers()[events.CallRejected](
            events.CallRejected("rec", "circuit_breaker", "open", 1.5)
        )
    _, emitted = exporter.get_finished_spans()
    assert [(e.name, dict(e.attributes)) for e in span.events] == [
        (e.name, dict(e.attributes)) for e in emitted.events
    ]
    assert span.events


def test_a_spent_retry_budget_says_so_on_the_span(traced, mode, clock):
    def down():
        raise ConnectionError("refused")

    fn = retry_with_backoff(name="llm", budget={"ratio": 0.0, "min_per_second": 0.0})(
        mode.define(down)
    )
    with traced.tracer.start_as_current_span("job"):
        with pytest.raises(ConnectionError):
            mode.run(fn)
    span = traced.only("job")
    assert events_of(span, "buttress.retry.budget_exhausted") == [
        (
            "buttress.retry.budget_exhausted",
            {"buttress.service": "llm", "buttress.retry.budget.kind": "retry"},
        )
    ]
    ((_, attrs),) = events_of(span, "buttress.retry.exhausted")
    assert attrs["buttress.retry.reason"] == "budget"


def test_a_hedge_is_an_event_on_the_callers_span(traced, clock):
    calls = []

    @with_hedging("replica", delay=0.05, idempotent=True)
    async def read():
        calls.append(1)
        if len(calls) == 1:
            await clock.asleep(1)  # slow: the copy is due meanwhile
            await asyncio.Event().wait()  # cancelled once the copy answers
        return "ok"

    async def main():
        with traced.tracer.start_as_current_span("job"):
            return await read()

    assert asyncio.run(main()) == "ok"
    ((_, attrs),) = events_of(traced.only("job"), "buttress.hedging.launched")
    assert attrs["buttress.service"] == "replica"
    assert attrs["buttress.hedging.hedge"] == 1
    assert attrs["buttress.hedging.delay_seconds"] == 0.05


def test_a_stale_cache_answer_and_a_deferral_are_recorded_like_fallbacks(traced, mode, clock):
    source = {"down": False}

    def answer() -> str:
        if source["down"]:
            raise ConnectionError("refused")
        return "fresh"

    cached = with_cache(name="llm", ttl=1, stale_ttl=60)(mode.define(answer))
    mode.run(cached)
    clock.advance(2)
    source["down"] = True
    deferring = with_fallback(name="notify", defer=DeferOptions(retry_interval=3600))(
        circuit_breaker(name="notify")(mode.define(answer))
    )
    force_circuit_state("notify", "forced_open")
    with traced.tracer.start_as_current_span("work"):
        assert mode.run(cached) == "fresh"
        mode.run(deferring)
    span = traced.only("work")
    assert events_of(span, "buttress.cache.stale") == [
        ("buttress.cache.stale", {"buttress.service": "llm", "error.type": "ConnectionError"})
    ]
    assert events_of(span, "buttress.deferral") == [
        (
            "buttress.deferral",
            {
                "buttress.service": "notify",
                "error.type": "CircuitOpenError",
                "buttress.deferral.depth": 1,
            },
        )
    ]
    assert span.attributes["buttress.fallback.source"] == "deferred"
