"""A rejection that ends the call: the breaker records it once, for both events (RejectedCall).

When the breaker is the outermost step and nothing outside it can answer in the call's place,
its rejection is the call's end. The policy's final step then records the call itself, and the
breaker records a rejection in one pre-bound call that writes what ``CallRejected`` and the
rejected call's ``CallFinished`` wrote: these tests pin what every subscriber still sees.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import INVALID_SPAN, get_current_span
from prometheus_client import CollectorRegistry

from buttress import (
    CircuitOpenError,
    circuit_breaker,
    events,
    instrumentation,
    registry,
    retry_with_backoff,
    with_fallback,
)
from buttress.events import CallFinished, CallRejected
from buttress.instrumentation import otel


@pytest.fixture
def plain():
    """A plain handler (no binder) of CallRejected and CallFinished: the events it was given."""
    seen: list[Any] = []
    undo = events.subscribe(seen.append, [CallRejected, CallFinished])
    yield seen
    undo()


@pytest.fixture
def subscribers():
    """The three default subscribers on a registry of the test's own."""
    before = instrumentation.installed()
    metrics = CollectorRegistry()
    instrumentation.configure(prometheus=metrics, otel=True, logging=True)
    yield metrics
    instrumentation.configure(
        prometheus=before.get("prometheus", False),  # type: ignore[arg-type]
        otel=before.get("otel", False),  # type: ignore[arg-type]
        logging=before.get("logging", False),  # type: ignore[arg-type]
    )


def _open(mode, name: str, **kwargs: Any):
    def fail() -> str:
        raise ConnectionError("down")

    fn = circuit_breaker(name=name, fail_max=1, timeout=30, **kwargs)(mode.define(fail))
    assert isinstance(mode.outcome(fn), ConnectionError)
    return fn


def test_a_plain_handler_gets_both_events_in_order(mode, clock, plain):
    fn = _open(mode, "ended")
    plain.clear()
    assert isinstance(mode.outcome(fn), CircuitOpenError)
    assert plain == [
        CallRejected("ended", "circuit_breaker", "open", pytest.approx(30.0)),
        CallFinished("ended", "rejected", 0.0, "CircuitOpenError"),
    ]


def test_a_forced_open_rejection_ends_the_call_the_same_way(mode, clock, plain):
    fn = circuit_breaker(name="forced", fail_max=5)(mode.define())
    assert mode.run(fn) == "ok"
    registry.instances("circuit_breaker")["forced"].force_open()
    plain.clear()
    assert isinstance(mode.outcome(fn), CircuitOpenError)
    assert [type(e).__name__ for e in plain] == ["CallRejected", "CallFinished"]
    assert plain[0].reason == "forced_open"
    assert plain[1].outcome == "rejected"


def test_a_fused_binder_is_called_once_and_covers_its_two_handlers(mode, clock, plain):
    """A subscriber that offers one function for both is given one call per rejection, while
    another subscriber's plain handlers still get their events."""
    fused: list[tuple[object, ...]] = []
    own: list[object] = []

    def rejected(event: object) -> None:
        own.append(event)

    def finished(event: object) -> None:
        own.append(event)

    undos = [
        events.subscribe(rejected, [CallRejected]),
        events.subscribe(finished, [CallFinished]),
    ]
    unfuse = events.fuse(rejected, finished, lambda service: lambda *f: fused.append((service, *f)))
    try:
        fn = _open(mode, "fused")
        own.clear()
        plain.clear()
        assert isinstance(mode.outcome(fn), CircuitOpenError)
        assert fused == [("fused", "circuit_breaker", "open", pytest.approx(30.0))]
        assert own == []  # covered by the fused call
        assert [e.outcome for e in plain if isinstance(e, CallFinished)] == ["rejected"]
        # Undone: each handler is given its own kind again.
        unfuse()
        own.clear()
        assert isinstance(mode.outcome(fn), CircuitOpenError)
        assert [type(e).__name__ for e in own] == ["CallRejected", "CallFinished"]
        assert len(fused) == 1
    finally:
        unfuse()
        for undo in undos:
            undo()


def test_a_failing_fused_binder_never_breaks_the_call_nor_the_others(mode, clock, plain):
    def rejected(event: object) -> None: ...

    def finished(event: object) -> None: ...

    def broken(service: str):
        def record(*fields: object) -> None:
            raise RuntimeError("subscriber bug")

        return record

    undos = [
        events.subscribe(rejected, [CallRejected]),
        events.subscribe(finished, [CallFinished]),
        events.fuse(rejected, finished, broken),
    ]
    try:
        fn = _open(mode, "broken-fused")
        plain.clear()
        for _ in range(2):
            assert isinstance(mode.outcome(fn), CircuitOpenError)
        assert [type(e).__name__ for e in plain] == ["CallRejected", "CallFinished"] * 2
    finally:
        for undo in reversed(undos):
            undo()


def test_the_default_subscribers_record_a_rejected_call_once(mode, clock, subscribers, caplog):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    caplog.set_level(logging.INFO, logger="buttress")
    fn = _open(mode, "scraped")
    with tracer.start_as_current_span("request"):
        assert isinstance(mode.outcome(fn), CircuitOpenError)
        assert isinstance(mode.outcome(fn), CircuitOpenError)

    def value(name: str, **labels: str) -> float | None:
        return subscribers.get_sample_value(name, {"service": "scraped", **labels})

    rejected = {"outcome": "rejected"}
    assert value("buttress_calls_total", **rejected) == 2
    assert value("buttress_call_duration_seconds_count", **rejected) == 2
    assert value("buttress_call_duration_seconds_sum", **rejected) == 0.0
    first_bucket = min(
        float(sample.labels["le"])
        for family in subscribers.collect()
        if family.name == "buttress_call_duration_seconds"
        for sample in family.samples
        if sample.name.endswith("_bucket")
    )
    assert value("buttress_call_duration_seconds_bucket", le=str(first_bucket), **rejected) == 2
    assert value("buttress_circuit_breaker_rejected_total", reason="open") == 2
    assert value("buttress_calls_total", outcome="failure") == 1
    finished = [r for r in caplog.records if r.getMessage() == "buttress.call.finished"]
    assert [r.outcome for r in finished] == ["failure", "rejected", "rejected"]  # type: ignore[attr-defined]
    (span,) = exporter.get_finished_spans()
    assert [e.name for e in span.events].count("buttress.rejected") == 2


def test_a_fallback_outside_the_breaker_still_answers_a_rejection(mode, clock, plain):
    def fail() -> str:
        raise ConnectionError("down")

    fn = with_fallback("stale")(
        circuit_breaker(name="answered", fail_max=1, timeout=30)(mode.define(fail))
    )
    assert mode.run(fn) == "stale"
    plain.clear()
    assert mode.run(fn) == "stale"
    assert [(type(e).__name__, getattr(e, "outcome", None)) for e in plain] == [
        ("CallRejected", None),
        ("CallFinished", "fallback"),
    ]


def test_a_rejection_inside_retry_is_recorded_once_by_the_wrapper(mode, clock, plain):
    """Retry outside the breaker: the breaker is not outermost, the policy records the call."""

    def fail() -> str:
        raise ConnectionError("down")

    fn = retry_with_backoff(max_attempts=3, initial=0, jitter="none")(
        circuit_breaker(name="inner", fail_max=1, timeout=30)(mode.define(fail))
    )
    plain.clear()
    assert isinstance(mode.outcome(fn), CircuitOpenError)
    finished = [e for e in plain if isinstance(e, CallFinished)]
    assert [(e.outcome, e.error_type) for e in finished] == [("rejected", "CircuitOpenError")]
    assert finished[0].duration >= 0.0


def test_a_half_open_rejection_inside_the_trial_is_recorded_once(mode, clock, plain):
    """The slower rejections (a taken trial slot) come through before() and are recorded as
    the end of the call by the final step, once."""
    inner: list[object] = []
    fn: Any = None
    state = {"open": True}

    if mode.is_async:

        async def trial() -> str:
            if state["open"]:
                raise ConnectionError("down")
            try:
                await fn()
            except CircuitOpenError as exc:
                inner.append(exc)
            return "ok"

    else:

        def trial() -> str:  # type: ignore[misc]
            if state["open"]:
                raise ConnectionError("down")
            try:
                fn()
            except CircuitOpenError as exc:
                inner.append(exc)
            return "ok"

    fn = circuit_breaker(name="half-open", fail_max=1, timeout=30)(trial)
    assert isinstance(mode.outcome(fn), ConnectionError)
    state["open"] = False
    clock.advance(31)
    plain.clear()
    assert mode.run(fn) == "ok"
    assert len(inner) == 1
    seen = [(type(e).__name__, getattr(e, "outcome", getattr(e, "reason", None))) for e in plain]
    assert seen == [
        ("CallRejected", "half_open_full"),
        ("CallFinished", "rejected"),
        ("CallFinished", "success"),
    ]


def test_the_span_lookup_answers_as_get_current_span_does():
    """The rejection's span check reads opentelemetry-api's context directly: it must find the
    span get_current_span() finds, with a span and without (pinned on every tested version)."""
    found = otel._span_context()
    assert found is not None, "the default runtime context is no longer a ContextVar of a dict"
    current, key = found
    assert current().get(key) is None
    assert get_current_span() is INVALID_SPAN
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("request") as span:
        assert current().get(key) is span is get_current_span()
