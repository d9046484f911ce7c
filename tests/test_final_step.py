"""The breaker as the final step: a rejection or a plain success recorded once, for two events.

When the breaker is the outermost step and nothing outside it can answer in the call's place,
its rejection is the call's end. The policy's final step then records the call itself, and the
breaker records a rejection in one pre-bound call that writes what ``CallRejected`` and the
rejected call's ``CallFinished`` wrote (``RejectedCall``); a success with nothing else to judge
writes what ``CircuitCallRecorded`` and the call's ``CallFinished`` wrote (``SucceededCall``).
These tests pin what every subscriber still sees.
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
from buttress.events import CallFinished, CallRejected, CircuitCallRecorded
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
    unfuse = events.fuse(
        events.RejectedCall,
        rejected,
        finished,
        lambda service: lambda *f: fused.append((service, *f)),
    )
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
        events.fuse(events.RejectedCall, rejected, finished, broken),
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


# --- a success with nothing to judge: SucceededCall ------------------------------------------


@pytest.fixture
def plain_success():
    """A plain handler (no binder) of CircuitCallRecorded and CallFinished."""
    seen: list[Any] = []
    undo = events.subscribe(seen.append, [CircuitCallRecorded, CallFinished])
    yield seen
    undo()


def test_a_success_gives_a_plain_handler_both_events_in_order(mode, clock, plain_success):
    fn = circuit_breaker(name="plain-success", fail_max=5)(mode.define(latency=0.75))
    assert mode.run(fn) == "ok"
    assert plain_success == [
        CircuitCallRecorded(
            "plain-success", "success", pytest.approx(0.75), False, None, None, None
        ),
        CallFinished("plain-success", "success", pytest.approx(0.75), None),
    ]


@pytest.mark.parametrize(
    "options",
    [
        {"failure_rate_threshold": 0.5},  # a window: judged as before
        {"slow_call_duration": 1.0, "slow_call_rate_threshold": 0.5},
        {"failure_on_result": lambda result: result == "bad"},
        {},
    ],
    ids=["window", "slow_calls", "failure_on_result", "plain"],
)
def test_every_kind_of_breaker_records_a_success_the_same_way(mode, clock, plain_success, options):
    fn = circuit_breaker(name="same-way", fail_max=5, **options)(mode.define(latency=0.25))
    assert mode.run(fn) == "ok"
    assert [(type(e).__name__, e.outcome, e.duration) for e in plain_success] == [
        ("CircuitCallRecorded", "success", pytest.approx(0.25)),
        ("CallFinished", "success", pytest.approx(0.25)),
    ]


def test_a_success_after_a_failure_clears_it(mode, clock):
    """Failures to clear: the success is judged under the lock, not by the fused path."""
    outcomes = iter([ConnectionError("down"), "ok", ConnectionError("down"), "ok"])

    def flaky() -> str:
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    fn = circuit_breaker(name="cleared", fail_max=2)(mode.define(flaky))
    for _ in range(4):
        mode.outcome(fn)
    # Never two failures in a row: each success cleared the one before it.
    assert registry.instances("circuit_breaker")["cleared"].current_state == "closed"


def test_a_pybreaker_listener_hears_every_success(mode, clock):
    import pybreaker

    heard: list[str] = []

    class Listener(pybreaker.CircuitBreakerListener):
        def success(self, cb: Any) -> None:
            heard.append("success")

    fn = circuit_breaker(name="listened", fail_max=5)(mode.define())
    assert mode.run(fn) == "ok"
    registry.instances("circuit_breaker")["listened"].add_listener(Listener())
    for _ in range(3):
        assert mode.run(fn) == "ok"
    assert heard == ["success"] * 3


def test_the_default_subscribers_count_a_success_once(mode, clock, subscribers):
    fn = circuit_breaker(name="counted", fail_max=5)(mode.define(latency=0.75))
    for _ in range(3):
        assert mode.run(fn) == "ok"

    def value(name: str, **labels: str) -> float | None:
        return subscribers.get_sample_value(name, {"service": "counted", **labels})

    assert value("buttress_calls_total", outcome="success") == 3
    assert value("buttress_call_duration_seconds_sum", outcome="success") == pytest.approx(2.25)
    assert value("buttress_circuit_breaker_successes_total") == 3


def test_a_failing_fused_success_binder_never_breaks_the_call(mode, clock, plain_success):
    def recorded(event: object) -> None: ...

    def finished(event: object) -> None: ...

    def broken(service: str):
        def record(*fields: object) -> None:
            raise RuntimeError("subscriber bug")

        return record

    undos = [
        events.subscribe(recorded, [CircuitCallRecorded]),
        events.subscribe(finished, [CallFinished]),
        events.fuse(events.SucceededCall, recorded, finished, broken),
    ]
    try:
        fn = circuit_breaker(name="broken-success", fail_max=5)(mode.define())
        for _ in range(2):
            assert mode.run(fn) == "ok"
        assert [type(e).__name__ for e in plain_success] == [
            "CircuitCallRecorded",
            "CallFinished",
        ] * 2
    finally:
        for undo in reversed(undos):
            undo()


def test_a_success_from_many_threads_or_tasks_loses_no_count(mode, clock, subscribers):
    fn = circuit_breaker(name="many", fail_max=5)(mode.define())
    for _ in range(5):
        assert mode.gather(fn, 16) == ["ok"] * 16
    labels = {"service": "many", "outcome": "success"}
    assert subscribers.get_sample_value("buttress_calls_total", labels) == 80
    successes = {"service": "many"}
    assert subscribers.get_sample_value("buttress_circuit_breaker_successes_total", successes) == 80
