"""The breaker's per-call events go through pre-bound recorders: no event built for a binder."""

from __future__ import annotations

import pytest

from buttress import CircuitOpenError, circuit_breaker, events
from buttress.events import CallRejected, CircuitCallRecorded


@pytest.fixture
def bound():
    """A subscriber with a fast path for both kinds: what it was handed, and by which path."""
    seen: list[tuple[str, tuple[object, ...]]] = []

    def handler(event: object) -> None:
        seen.append(("event", tuple(event)))  # type: ignore[arg-type]

    def binder(kind: str):
        def bind(service: str):
            return lambda *fields: seen.append((kind, (service, *fields)))

        return bind

    undo_calls = events.subscribe(handler, [CircuitCallRecorded], binder=binder("recorded"))
    undo_rejections = events.subscribe(handler, [CallRejected], binder=binder("rejected"))
    yield seen
    undo_calls()
    undo_rejections()


def test_the_breaker_records_calls_and_rejections_through_the_bound_path(mode, clock, bound):
    def fail() -> str:
        raise ConnectionError("down")

    fn = circuit_breaker(name="recorded", fail_max=1, timeout=30)(mode.define(fail))
    assert isinstance(mode.outcome(fn), ConnectionError)
    rejected = mode.outcome(fn)
    assert isinstance(rejected, CircuitOpenError)
    assert [kind for kind, _ in bound] == ["recorded", "rejected"]
    service, outcome, _elapsed, slow, error_type, *_rates = bound[0][1]
    assert (service, outcome, slow, error_type) == ("recorded", "failure", False, "ConnectionError")
    assert bound[1][1] == ("recorded", "circuit_breaker", "open", pytest.approx(30.0))


def test_a_failing_recorder_never_breaks_the_call(mode, clock):
    def binder(service: str):
        def broken(*fields: object) -> None:
            raise RuntimeError("subscriber bug")

        return broken

    undo = events.subscribe(lambda event: None, [CircuitCallRecorded], binder=binder)
    try:
        fn = circuit_breaker(name="broken-recorder", fail_max=5)(mode.define(lambda: "ok"))
        assert mode.run(fn) == "ok"
        assert mode.run(fn) == "ok"
    finally:
        undo()


def test_subscribers_bind_a_service_on_its_first_event_of_each_kind(mode, clock):
    """Decorating builds the recorders; the subscribers bind on the first event of each kind,
    so a service that never sees a rejection holds no binding for rejections."""
    bound: list[tuple[str, str]] = []

    def binder(kind: str):
        def bind(service: str):
            bound.append((kind, service))
            return lambda *fields: None

        return bind

    undos = [
        events.subscribe(lambda event: None, [CircuitCallRecorded], binder=binder("recorded")),
        events.subscribe(lambda event: None, [CallRejected], binder=binder("rejected")),
    ]
    try:
        fn = circuit_breaker(name="lazy-binding", fail_max=1)(mode.define(lambda: "ok"))
        assert bound == []
        assert mode.run(fn) == "ok"
        assert mode.run(fn) == "ok"
        assert bound == [("recorded", "lazy-binding")]  # once, at the first call
    finally:
        for undo in undos:
            undo()


def test_a_new_subscription_binds_again_on_the_next_event(mode, clock):
    fn = circuit_breaker(name="rebinding", fail_max=5)(mode.define(lambda: "ok"))
    assert mode.run(fn) == "ok"
    seen: list[tuple[object, ...]] = []
    undo = events.subscribe(
        lambda event: None,
        [CircuitCallRecorded],
        binder=lambda service: lambda *fields: seen.append((service, *fields)),
    )
    try:
        assert mode.run(fn) == "ok"
        assert [fields[:2] for fields in seen] == [("rebinding", "success")]
    finally:
        undo()
    assert mode.run(fn) == "ok"
    assert len(seen) == 1


def test_a_scrape_shows_a_service_once_it_was_called(mode, clock):
    from prometheus_client import CollectorRegistry

    from buttress import instrumentation

    before = instrumentation.installed()
    registry = CollectorRegistry()
    instrumentation.configure(prometheus=registry, otel=False, logging=False)
    try:
        fn = circuit_breaker(name="scraped-lazily", fail_max=5)(mode.define(lambda: "ok"))
        calls = {"service": "scraped-lazily", "outcome": "success"}
        assert registry.get_sample_value("buttress_calls_total", calls) is None
        assert mode.run(fn) == "ok"
        assert registry.get_sample_value("buttress_calls_total", calls) == 1
        # Every outcome exists from the first call.
        rejected = {**calls, "outcome": "rejected"}
        assert registry.get_sample_value("buttress_calls_total", rejected) == 0
        successes = {"service": "scraped-lazily"}
        value = registry.get_sample_value("buttress_circuit_breaker_successes_total", successes)
        assert value == 1
    finally:
        instrumentation.configure(
            prometheus=before.get("prometheus", False),  # type: ignore[arg-type]
            otel=before.get("otel", False),  # type: ignore[arg-type]
            logging=before.get("logging", False),  # type: ignore[arg-type]
        )


def test_a_failing_call_recorder_leaves_a_rejection_as_it_was(mode, clock):
    from buttress.events import CallFinished

    def binder(service: str):
        def broken(*fields: object) -> None:
            raise RuntimeError("subscriber bug")

        return broken

    undo = events.subscribe(lambda event: None, [CallFinished], binder=binder)
    try:

        def fail() -> str:
            raise ConnectionError("down")

        fn = circuit_breaker(name="broken-call-recorder", fail_max=1)(mode.define(fail))
        assert isinstance(mode.outcome(fn), ConnectionError)
        assert isinstance(mode.outcome(fn), CircuitOpenError)
    finally:
        undo()


def test_a_timed_call_hands_its_elapsed_time_to_the_recorder(mode, clock):
    # The async driver calls the recorder of TimedCallFinished inline; both drivers hand it the
    # same fields, and a recorder that raises never breaks the call.
    from buttress import with_timeout
    from buttress.events import TimedCallFinished

    seen: list[tuple[object, ...]] = []

    def binder(service: str):
        def timed(*fields: object) -> None:
            seen.append((service, *fields))
            if len(seen) > 1:
                raise RuntimeError("subscriber bug")

        return timed

    undo = events.subscribe(lambda event: None, [TimedCallFinished], binder=binder)
    try:
        fn = with_timeout(name="timed-recorder", seconds=5)(mode.define(latency=2))
        assert mode.run(fn) == "ok"
        assert mode.run(fn) == "ok"
    finally:
        undo()
    assert seen == [("timed-recorder", 2.0, False)] * 2
