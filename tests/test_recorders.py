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
