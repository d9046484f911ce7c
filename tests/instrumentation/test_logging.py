"""Logging subscriber: stable names, structured fields, trace ids, levels, and nothing secret."""

from __future__ import annotations

import logging
import time

import pytest
from opentelemetry.sdk.trace import TracerProvider

from buttress import (
    circuit_breaker,
    events,
    instrumentation,
    retry_with_backoff,
    with_timeout,
)
from buttress.events import CallFinished, SettingsReloaded
from buttress.instrumentation import logging as log_subscriber
from buttress.instrumentation.logging import EVENT_NAMES


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def named(self, name: str) -> list[logging.LogRecord]:
        return [r for r in self.records if r.getMessage() == name]


@pytest.fixture
def logged(restore_subscribers):
    """The logging subscriber alone, writing to a dedicated logger (level INFO)."""
    logger = logging.getLogger("tests.buttress")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = Records()
    logger.addHandler(handler)
    instrumentation.configure(prometheus=False, otel=False, logging=logger)
    yield handler
    logger.removeHandler(handler)


def test_event_names_are_stable_and_namespaced():
    names = [name for name, _ in EVENT_NAMES.values()]
    assert len(set(names)) == len(names)
    assert all(name.startswith("buttress.") and name == name.lower() for name in names)
    assert EVENT_NAMES[events.CircuitStateChanged][0] == "buttress.circuit.state_changed"


def test_the_library_logger_has_a_null_handler():
    handlers = logging.getLogger("buttress").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)


def test_a_circuit_opening_is_a_warning_with_structured_fields(logged, mode, clock):
    def down(user, password):
        raise ConnectionError(f"cannot reach openfga as {user}:{password}")

    fn = circuit_breaker(name="openfga", fail_max=1, timeout=30)(mode.define(down))
    with pytest.raises(ConnectionError):
        mode.run(fn, "alice", "s3cr3t-pw")
    (record,) = logged.named("buttress.circuit.state_changed")
    assert record.levelno == logging.WARNING
    assert (record.service, record.old_state, record.new_state, record.reason) == (
        "openfga",
        "closed",
        "open",
        "fail_max",
    )
    assert record.event == "buttress.circuit.state_changed"
    (finished,) = logged.named("buttress.call.finished")
    assert finished.levelno == logging.INFO
    assert (finished.outcome, finished.error_type) == ("failure", "ConnectionError")


def test_no_argument_value_or_exception_message_reaches_a_record(logged, mode, clock):
    def down(user, password):
        raise ConnectionError(f"cannot reach openfga as {user}:{password}")

    fn = retry_with_backoff(name="openfga", max_attempts=3)(
        circuit_breaker(name="openfga", fail_max=2)(mode.define(down))
    )
    logging.getLogger("tests.buttress").setLevel(logging.DEBUG)
    for _ in range(3):
        mode.outcome(fn, "alice", "s3cr3t-pw")
    assert len(logged.records) >= 5
    for record in logged.records:
        text = repr(vars(record)) + record.getMessage()
        assert "s3cr3t-pw" not in text
        assert "alice" not in text
        assert "cannot reach" not in text


def test_trace_and_span_ids_are_added_inside_a_span(logged, mode, clock):
    tracer = TracerProvider().get_tracer("tests")
    fn = with_timeout(name="llm", seconds=1)(mode.define(latency=2))
    with tracer.start_as_current_span("request") as span:
        mode.outcome(fn)
    (record,) = logged.named("buttress.timeout.exceeded")
    context = span.get_span_context()
    assert record.trace_id == format(context.trace_id, "032x")
    assert record.span_id == format(context.span_id, "016x")
    assert record.levelno == logging.WARNING


def test_without_a_span_there_are_no_trace_ids(logged):
    events.emit(events.RetryExhausted("llm", 3, "ConnectionError", "max_attempts"))
    (record,) = logged.named("buttress.retry.exhausted")
    assert not hasattr(record, "trace_id")
    assert (record.attempts, record.reason) == (3, "max_attempts")


def test_success_is_debug_and_builds_nothing_when_debug_is_off(logged, monkeypatch):
    def refuse(*_args):
        raise AssertionError("fields built for a record that is not logged")

    monkeypatch.setattr(log_subscriber, "_fields", refuse)
    events.emit(CallFinished("svc", "success", 0.01, None))
    assert logged.records == []
    monkeypatch.undo()
    logging.getLogger("tests.buttress").setLevel(logging.DEBUG)
    events.emit(CallFinished("svc", "success", 0.01, None))
    (record,) = logged.named("buttress.call.finished")
    assert record.levelno == logging.DEBUG
    assert (record.service, record.outcome, record.duration) == ("svc", "success", 0.01)


def test_a_failed_reload_is_an_error_with_credentials_masked(logged):
    error = "services.db.circuit_breaker.state_url (from env X): bad URL redis://app:hunter2@cache:6379/0"
    events.emit(SettingsReloaded(ok=False, generation=3, error=error))
    (record,) = logged.named("buttress.settings.reloaded")
    assert record.levelno == logging.ERROR
    assert "hunter2" not in record.error
    assert "redis://***@cache:6379/0" in record.error
    assert record.ok is False


def test_rejections_by_an_open_circuit_are_debug_but_a_full_bulkhead_is_info(logged):
    logging.getLogger("tests.buttress").setLevel(logging.DEBUG)
    events.emit(events.CallRejected("api", "circuit_breaker", "open", 3.0))
    events.emit(events.CallRejected("api", "bulkhead", "full", None))
    levels = [(r.pattern, r.levelno) for r in logged.named("buttress.call.rejected")]
    assert levels == [("circuit_breaker", logging.DEBUG), ("bulkhead", logging.INFO)]


def test_a_successful_call_is_logged_through_the_recorder_only_while_debug_is_on(logged):
    # The policy hands a call's outcome to the recorder, which checks the level before anything
    # is built; a level changed later applies at once.
    record = events.recorder(CallFinished, "rec").record
    assert record is not None
    record("success", 0.01, None)
    assert logged.named("buttress.call.finished") == []
    logging.getLogger("tests.buttress").setLevel(logging.DEBUG)
    record("success", 0.01, None)
    record("failure", 0.02, "OSError")
    success, failure = logged.named("buttress.call.finished")
    assert (success.levelno, success.service, success.outcome) == (logging.DEBUG, "rec", "success")
    assert (failure.levelno, failure.error_type) == (logging.INFO, "OSError")
    logging.getLogger("tests.buttress").setLevel(logging.WARNING)
    record("failure", 0.02, "OSError")
    assert len(logged.named("buttress.call.finished")) == 2


def test_a_rejection_through_the_recorder_is_logged_like_the_event(logged):
    record = events.recorder(events.CallRejected, "rec").record
    assert record is not None
    record("circuit_breaker", "open", 2.0)  # DEBUG: the logger is at INFO
    record("bulkhead", "full", None)
    (full,) = logged.named("buttress.call.rejected")
    events.emit(events.CallRejected("rec", "bulkhead", "full", None))
    _, emitted = logged.named("buttress.call.rejected")
    fields = ("levelno", "service", "pattern", "reason", "retry_after")
    assert [getattr(full, f) for f in fields] == [getattr(emitted, f) for f in fields]
    assert full.levelno == logging.INFO


# --- nothing bound for the per-call kinds while neither of their levels is on -------------------


@pytest.fixture
def quiet(restore_subscribers):
    """The logging subscriber alone, on a dedicated logger at WARNING (the default level)."""
    logger = logging.getLogger("tests.buttress.quiet")
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    handler = Records()
    logger.addHandler(handler)
    instrumentation.configure(prometheus=False, otel=False, logging=logger)
    yield logger, handler
    logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)


def test_calls_bind_nothing_of_logging_until_a_level_change_lets_them_log(quiet, mode, clock):
    logger, handler = quiet
    fn = circuit_breaker(name="quiet", fail_max=5)(mode.define())
    # The breaker is the final step: a success is recorded through the fused kind, which holds
    # the call's CallFinished (see events.SucceededCall).
    finished = events.recorder(events.SucceededCall, "quiet")
    assert mode.run(fn) == "ok"
    assert finished.record is None  # WARNING: no call is ever logged, nothing is called
    logger.setLevel(logging.DEBUG)
    assert mode.run(fn) == "ok"
    (record,) = handler.named("buttress.call.finished")
    assert (record.levelno, record.service, record.outcome) == (logging.DEBUG, "quiet", "success")
    assert finished.record is not None
    logger.setLevel(logging.INFO)  # failures only: bound, successes not logged
    assert mode.run(fn) == "ok"
    assert finished.record is not None
    logger.setLevel(logging.WARNING)
    assert mode.run(fn) == "ok"
    assert finished.record is None
    assert len(handler.named("buttress.call.finished")) == 1


def test_a_rejection_binds_nothing_of_logging_until_a_level_change_lets_it_log(quiet, mode, clock):
    # Both ways a rejection is recorded: the call it ends (the breaker outermost: one fused
    # RejectedCall) and one a pattern outside the breaker sees (CallRejected, then CallFinished).
    logger, handler = quiet

    def down() -> str:
        raise ConnectionError("down")

    breaker = circuit_breaker(name="quiet-rejections", fail_max=1, timeout=30)
    ended = breaker(mode.define(down))
    retried = retry_with_backoff(name="quiet-rejections", max_attempts=2)(
        breaker(mode.define(down))
    )
    mode.outcome(ended)
    for fn in (ended, retried):
        assert isinstance(mode.outcome(fn), Exception)
    recorders = [events.recorder(kind, "quiet-rejections") for kind in _REJECTION_KINDS]
    assert [r.record for r in recorders] == [None, None, None]
    logger.setLevel(logging.DEBUG)
    for fn in (ended, retried):
        assert isinstance(mode.outcome(fn), Exception)
    records = handler.named("buttress.call.rejected")
    assert [(r.levelno, r.pattern, r.reason) for r in records] == [
        (logging.DEBUG, "circuit_breaker", "open")
    ] * 2
    finished = handler.named("buttress.call.finished")
    assert [(r.levelno, r.outcome) for r in finished] == [(logging.INFO, "rejected")] * 2
    assert all(r.record is not None for r in recorders)


_REJECTION_KINDS = (events.RejectedCall, events.CallRejected, CallFinished)


def test_a_level_changed_on_an_ancestor_or_by_logging_disable_rebinds_too(
    quiet, restore_subscribers
):
    logger, handler = quiet
    parent = logging.getLogger("tests.buttress")
    before = parent.level
    logger.setLevel(logging.NOTSET)  # inherits from its ancestors
    parent.setLevel(logging.WARNING)
    finished = events.recorder(CallFinished, "inherited")
    try:
        finished.record("success", 0.01, None)  # binds
        assert finished.record is None
        parent.setLevel(logging.DEBUG)
        finished.record("success", 0.01, None)
        assert len(handler.named("buttress.call.finished")) == 1
        logging.disable(logging.INFO)
        assert finished.record is not None  # not bound yet: it binds at the next call
        finished.record("failure", 0.01, "OSError")
        assert finished.record is None
        logging.disable(logging.NOTSET)
        finished.record("failure", 0.01, "OSError")
        assert len(handler.named("buttress.call.finished")) == 2
    finally:
        logging.disable(logging.NOTSET)
        parent.setLevel(before)


def test_a_level_change_while_the_events_lock_is_taken_rebinds_once_it_is_free(quiet):
    # logging calls back under its own lock, which code under the events lock may wait for: the
    # rebinding never waits there, a thread does it once the events lock is free.
    logger, handler = quiet
    finished = events.recorder(CallFinished, "contended")
    finished.record("success", 0.01, None)
    assert finished.record is None
    with events._lock:
        logger.setLevel(logging.DEBUG)
        assert finished.record is None  # not yet: the lock is taken
    limit = time.monotonic() + 5
    while finished.record is None:  # the rebinding thread's progress (bounded real-time poll)
        assert time.monotonic() < limit, "not rebound"
        time.sleep(0.0005)
    finished.record("success", 0.01, None)
    assert len(handler.named("buttress.call.finished")) == 1


def test_a_logger_outside_logging_manager_or_disabled_is_always_bound(restore_subscribers):
    # A level change of a logger that logging's manager does not know is never announced, and
    # `disabled` changes without one: for them the bound function checks per record.
    direct = logging.Logger("tests.direct", logging.WARNING)  # noqa: LOG001 - the point
    handler = Records()
    instrumentation.configure(prometheus=False, otel=False, logging=direct)
    finished = events.recorder(CallFinished, "direct")
    finished.record("success", 0.01, None)
    assert finished.record is not None

    named = logging.getLogger("tests.buttress.disabled")
    named.setLevel(logging.DEBUG)
    named.disabled = True
    named.addHandler(handler)
    instrumentation.configure(logging=named)
    finished = events.recorder(CallFinished, "disabled")
    finished.record("success", 0.01, None)
    assert finished.record is not None
    assert handler.named("buttress.call.finished") == []
    named.disabled = False
    finished.record("success", 0.01, None)
    assert len(handler.named("buttress.call.finished")) == 1
    named.removeHandler(handler)
    named.setLevel(logging.NOTSET)


def test_a_level_change_never_fails_for_buttress(quiet, monkeypatch):
    logger, _ = quiet

    def broken(*_args: object, **_kwargs: object) -> bool:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(events, "rebind", broken)
    logger.setLevel(logging.DEBUG)
    assert logger.isEnabledFor(logging.DEBUG)
