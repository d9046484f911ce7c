"""Circuit breaker: trips, half-open trials, exclusions, late results, manual control, events.

Every behaviour runs on ``def`` and ``async def`` (the ``mode`` fixture) with simulated time (the
``clock`` fixture). Calls that must stay in flight while the test acts run on their own thread
(async: on their own event loop in that thread) and wait for a gate.
"""

from __future__ import annotations

import abc
import ast
import asyncio
import http.server
import importlib
import inspect
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import httpx
import pybreaker
import pytest
import requests

import buttress
from buttress import circuit_breaker, registry
from buttress.events import (
    CallRejected,
    CircuitCallRecorded,
    CircuitStateChanged,
    CircuitTrialStarted,
    ShadowDecision,
    StateStoreError,
)
from buttress.exceptions import (
    BulkheadFullError,
    CircuitOpenError,
    ConfigurationError,
    TimeoutExceededError,
)
from buttress.patterns import circuit_breaker as cbmod
from buttress.patterns._base import BuildContext
from buttress.patterns.circuit_breaker import (
    CircuitBreaker,
    CircuitBreakerOptions,
    CircuitBreakerStrategy,
    _breaker,
)
from buttress.patterns.circuit_breaker.redis_storage import SharedStateStorage
from buttress.policy import alink
from buttress.testing import capture_events, force_circuit_state


class Down(ConnectionError):
    """The dependency is down."""


def strategy(service: str = "svc", mode: str = "enforce", **options: Any) -> CircuitBreakerStrategy:
    ctx = BuildContext(service, CircuitBreakerOptions(**options), service, mode, registry.shared)
    built = cbmod.build(ctx)
    assert isinstance(built, CircuitBreakerStrategy)
    return built


class Dependency:
    """A fake dependency whose next outcomes the test scripts; counts the calls that reached it."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail_with: BaseException | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.fail_with is not None:
            raise self.fail_with
        return ("ok", args, kwargs)


class Guarded:
    """A dependency behind one breaker strategy, called through ``mode``."""

    def __init__(self, mode, service: str = "svc", shadow: bool = False, **options: Any) -> None:
        self.mode = mode
        self.strategy = strategy(service, "shadow" if shadow else "enforce", **options)
        self.breaker = self.strategy.breaker
        self.dep = Dependency()
        self.fn = mode.chain(self.strategy, mode.define(self.dep))

    def ok(self) -> Any:
        self.dep.fail_with = None
        return self.mode.outcome(self.fn)

    def fail(self, exc: BaseException | None = None) -> Any:
        self.dep.fail_with = exc if exc is not None else Down("down")
        return self.mode.outcome(self.fn)


class Held:
    """One call through ``strategy`` that stays in flight until ``release()``.

    Sync: a thread. Async: ``asyncio.run`` on a thread, so the awaiting step runs on its own loop.
    """

    def __init__(self, mode, strat: CircuitBreakerStrategy, outcome: BaseException | None = None):
        self.entered = threading.Event()
        self._gate = threading.Event()
        self.done = threading.Event()
        self.result: Any = None

        def body() -> str:
            self.entered.set()
            assert self._gate.wait(5), "held call never released"
            if outcome is not None:
                raise outcome
            return "ok"

        fn = mode.chain(strat, mode.define(body))

        def run() -> None:
            try:
                self.result = asyncio.run(fn()) if mode.is_async else fn()
            except BaseException as exc:  # the test inspects it
                self.result = exc
            finally:
                self.done.set()

        threading.Thread(target=run, daemon=True).start()
        # Either admitted (in the body) or rejected (done): both happen without waiting on time.
        deadline = time.monotonic() + 5
        while not (self.entered.is_set() or self.done.is_set()):
            assert time.monotonic() < deadline, "held call neither entered nor finished"
            time.sleep(0.0005)

    @property
    def admitted(self) -> bool:
        return self.entered.is_set()

    def release(self) -> Any:
        self._gate.set()
        assert self.done.wait(5), "held call did not finish"
        return self.result


# --- closed: consecutive failures ----------------------------------------------------------------


def test_success_passes_arguments_and_result_through(mode, clock):
    g = Guarded(mode)
    assert mode.run(g.fn, 1, key="v") == ("ok", (1,), {"key": "v"})
    snap = g.breaker.snapshot()
    assert snap["state"] == "closed"
    assert snap["failures"] == 0


def test_fail_max_consecutive_failures_trip_and_the_tripping_call_raises_its_own_error(mode, clock):
    g = Guarded(mode, fail_max=3, timeout=30)
    errors = [Down(f"down {i}") for i in range(3)]
    raised = [g.fail(exc) for exc in errors]
    assert raised == errors  # the very objects, the third (tripping) one included
    assert all(r is e for r, e in zip(raised, errors, strict=True))
    assert g.breaker.state_label == "open"
    assert g.dep.calls == 3

    rejected = g.ok()
    assert isinstance(rejected, CircuitOpenError)
    assert not isinstance(rejected, pybreaker.CircuitBreakerError)
    assert rejected.service == "svc"
    assert rejected.retry_after == pytest.approx(30)
    assert g.dep.calls == 3  # not called while open


def test_a_success_resets_the_consecutive_count(mode, clock):
    g = Guarded(mode, fail_max=3)
    g.fail()
    g.fail()
    assert g.breaker.snapshot()["failures"] == 2
    g.ok()
    assert g.breaker.snapshot()["failures"] == 0
    g.fail()
    g.fail()
    assert g.breaker.state_label == "closed"
    assert isinstance(g.fail(), Down)
    assert g.breaker.state_label == "open"


def test_retry_after_is_the_time_left_open_on_the_monotonic_clock(mode, clock):
    g = Guarded(mode, fail_max=1, timeout=10)
    g.fail()
    clock.advance(4)
    assert g.ok().retry_after == pytest.approx(6)
    assert g.breaker.snapshot()["seconds_left_open"] == pytest.approx(6)
    clock.advance(5.5)
    assert g.ok().retry_after == pytest.approx(0.5)


# --- half-open ---------------------------------------------------------------------------------


def test_after_timeout_one_trial_success_closes(mode, clock):
    g = Guarded(mode, fail_max=1, timeout=10)
    with capture_events([CircuitStateChanged, CircuitTrialStarted]) as seen:
        g.fail()
        clock.advance(10)
        assert g.ok()[0] == "ok"
    assert g.breaker.state_label == "closed"
    changes = seen.of(CircuitStateChanged)
    assert [(c.old_state, c.new_state, c.reason) for c in changes] == [
        ("closed", "open", "fail_max"),
        ("open", "half_open", "timeout_elapsed"),
        ("half_open", "closed", "success_threshold"),
    ]
    assert changes[1].seconds_in_old_state == pytest.approx(10)
    assert changes[2].seconds_in_old_state == pytest.approx(0)
    assert seen.of(CircuitTrialStarted) == [CircuitTrialStarted("svc", 1)]


def test_a_failed_trial_reopens_for_a_full_timeout_and_raises_its_own_error(mode, clock):
    g = Guarded(mode, fail_max=2, timeout=10)
    g.fail()
    g.fail()
    clock.advance(12)
    trial_error = Down("still down")
    with capture_events([CircuitStateChanged]) as seen:
        assert g.fail(trial_error) is trial_error
    assert [(c.old_state, c.new_state, c.reason) for c in seen] == [
        ("open", "half_open", "timeout_elapsed"),
        ("half_open", "open", "trial_failed"),
    ]
    assert g.ok().retry_after == pytest.approx(10)


def test_success_threshold_needs_that_many_trial_successes(mode, clock):
    g = Guarded(mode, fail_max=1, timeout=5, success_threshold=3)
    g.fail()
    clock.advance(5)
    g.ok()
    g.ok()
    snap = g.breaker.snapshot()
    assert (snap["state"], snap["successes"]) == ("half_open", 2)
    g.ok()
    assert g.breaker.state_label == "closed"
    # And a failure in between starts over after the next timeout.
    g.fail()
    clock.advance(5)
    g.ok()
    g.fail()
    assert g.breaker.state_label == "open"
    clock.advance(5)
    g.ok()
    assert g.breaker.snapshot()["successes"] == 1


def test_half_open_admits_at_most_half_open_max_calls_concurrent_trials(mode, clock):
    strat = strategy(fail_max=1, timeout=5, half_open_max_calls=2, success_threshold=2)
    cb = strat.breaker
    cb.open()
    clock.advance(5)
    with capture_events([CallRejected, CircuitTrialStarted]) as seen:
        first, second = Held(mode, strat), Held(mode, strat)
        third = Held(mode, strat)
        assert (first.admitted, second.admitted, third.admitted) == (True, True, False)
        rejected = third.release()
        assert isinstance(rejected, CircuitOpenError)
        assert rejected.retry_after is None
        assert cb.snapshot()["trials_in_flight"] == 2
        assert first.release() == "ok"
        assert cb.state_label == "half_open"
        assert second.release() == "ok"
    assert cb.state_label == "closed"
    assert cb.snapshot()["trials_in_flight"] == 0
    assert [e.in_flight for e in seen.of(CircuitTrialStarted)] == [1, 2]
    assert seen.of(CallRejected) == [CallRejected("svc", "circuit_breaker", "half_open_full", None)]


def test_one_failed_trial_reopens_even_with_other_trials_in_flight(mode, clock):
    strat = strategy(fail_max=1, timeout=5, half_open_max_calls=2)
    cb = strat.breaker
    cb.open()
    clock.advance(5)
    slow_success = Held(mode, strat)
    failing = Held(mode, strat, outcome=Down("trial failed"))
    assert isinstance(failing.release(), Down)
    assert cb.state_label == "open"
    assert slow_success.release() == "ok"  # lands late: the circuit stays open
    assert cb.state_label == "open"
    assert cb.snapshot()["trials_in_flight"] == 0


# --- what counts ---------------------------------------------------------------------------------


class NotFound(LookupError):
    """A business error: the dependency answered correctly."""


def test_excluded_exceptions_are_neither_success_nor_failure(mode, clock):
    g = Guarded(mode, fail_max=2, exclude=(NotFound,))
    g.fail()
    assert isinstance(g.fail(NotFound("no such user")), NotFound)
    assert g.breaker.snapshot()["failures"] == 1  # pybreaker would have reset it to 0
    g.fail()
    assert g.breaker.state_label == "open"


def test_an_excluded_trial_neither_closes_nor_reopens_and_frees_its_slot(mode, clock):
    g = Guarded(mode, fail_max=1, timeout=5, exclude=(NotFound,))
    g.fail()
    clock.advance(5)
    g.fail(NotFound("x"))
    snap = g.breaker.snapshot()
    assert (snap["state"], snap["trials_in_flight"], snap["successes"]) == ("half_open", 0, 0)
    g.ok()  # the slot was freed: this is the next trial
    assert g.breaker.state_label == "closed"


class _Answers(http.server.BaseHTTPRequestHandler):
    """``GET /<status>`` answers with that status (and a Retry-After)."""

    def do_GET(self) -> None:
        self.send_response(int(self.path.strip("/")))
        self.send_header("Retry-After", "30")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def http_errors() -> Any:
    """The errors httpx, requests and aiohttp raise for real 429 and 503 responses."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"

    def from_httpx(status: int) -> BaseException:
        with httpx.Client() as client:
            try:
                client.get(f"{base}/{status}").raise_for_status()
            except httpx.HTTPStatusError as exc:
                return exc
        raise AssertionError(status)

    def from_requests(status: int) -> BaseException:
        with requests.Session() as session:
            try:
                session.get(f"{base}/{status}").raise_for_status()
            except requests.HTTPError as exc:
                return exc
        raise AssertionError(status)

    async def from_aiohttp(status: int) -> BaseException:
        async with aiohttp.ClientSession() as session, session.get(f"{base}/{status}") as answer:
            try:
                answer.raise_for_status()
            except aiohttp.ClientResponseError as exc:
                return exc
        raise AssertionError(status)

    try:
        yield {
            (library, status): make(status) if library != "aiohttp" else asyncio.run(make(status))
            for library, make in [
                ("httpx", from_httpx),
                ("requests", from_requests),
                ("aiohttp", from_aiohttp),
            ]
            for status in (429, 503)
        }
    finally:
        server.shutdown()
        server.server_close()


class ApiError(Exception):
    """An SDK's error (openai, anthropic and others carry the HTTP status as ``status_code``)."""

    def __init__(self, status_code: int) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code


@pytest.mark.parametrize("library", ["httpx", "requests", "aiohttp"])
def test_a_429_is_neither_success_nor_failure_and_a_5xx_is_a_failure(
    mode, clock, http_errors, library
):
    throttled, broken = http_errors[library, 429], http_errors[library, 503]
    g = Guarded(mode, fail_max=2, timeout=5)
    with capture_events([CircuitCallRecorded]) as seen:
        for _ in range(5):
            assert g.fail(throttled) is throttled  # the caller still gets the 429
        assert g.breaker.state_label == "closed"
        g.fail(broken)
        g.fail(throttled)  # does not clear the count either
        g.fail(broken)
    assert [e.outcome for e in seen] == ["ignored"] * 5 + ["failure", "ignored", "failure"]
    assert g.breaker.state_label == "open"
    clock.advance(29.9)  # the 503 that opened it said Retry-After: 30 (honor_retry_after)
    assert g.breaker.state_label == "open"
    clock.advance(0.1)
    g.fail(throttled)  # a throttled trial gives its slot back, the circuit stays half-open
    assert (g.breaker.state_label, g.ok()[0]) == ("half_open", "ok")
    assert g.breaker.state_label == "closed"


def test_an_sdk_error_with_status_code_429_is_not_a_failure(mode, clock):
    g = Guarded(mode, fail_max=1)
    g.fail(ApiError(429))
    assert g.breaker.state_label == "closed"
    g.fail(ApiError(500))
    assert g.breaker.state_label == "open"


@pytest.mark.parametrize("library", ["httpx", "requests", "aiohttp"])
def test_count_throttled_counts_a_429_as_a_failure(mode, clock, http_errors, library):
    g = Guarded(mode, fail_max=2, count_throttled=True)
    g.fail(http_errors[library, 429])
    g.fail(ApiError(429))
    assert g.breaker.state_label == "open"


def test_count_throttled_can_be_reconfigured(mode, clock):
    g = Guarded(mode, fail_max=1)
    g.breaker.reconfigure(CircuitBreakerOptions(fail_max=1, count_throttled=True))
    g.fail(ApiError(429))
    assert g.breaker.state_label == "open"


def test_the_decorator_takes_count_throttled(mode, clock):
    calls = []

    def throttled():
        calls.append(1)
        raise ApiError(429)

    counted = circuit_breaker(name="counted", fail_max=1, count_throttled=True)(
        mode.define(throttled)
    )
    ignored = circuit_breaker(name="ignored", fail_max=1)(mode.define(throttled))
    for _ in range(2):
        mode.outcome(counted)
        mode.outcome(ignored)
    assert isinstance(mode.outcome(counted), CircuitOpenError)
    assert isinstance(mode.outcome(ignored), ApiError)


# --- failure_on_result: a returned value can be a failure ----------------------------------------


def answering(mode, *answers: Any) -> tuple[Callable[..., Any], list[Any]]:
    """A function of ``mode`` returning ``answers`` in turn; the list of answers it gave."""
    given: list[Any] = []
    pending = iter(answers)

    def answer() -> Any:
        given.append(next(pending))
        return given[-1]

    return mode.define(answer), given


def test_failure_on_result_counts_a_flagged_value_and_still_returns_it(mode, clock):
    fn, given = answering(mode, {"busy": True}, {"busy": True}, {"busy": False})
    protected = circuit_breaker(
        name="flagged", fail_max=2, timeout=10, failure_on_result=lambda r: r["busy"]
    )(fn)
    with capture_events([CircuitCallRecorded]) as seen:
        assert mode.run(protected) == {"busy": True}  # counted, not raised
        assert registry.breaker("flagged").snapshot()["failures"] == 1
        assert mode.run(protected) == {"busy": True}  # trips, and the caller still gets it
    assert registry.breaker("flagged").state_label == "open"
    assert isinstance(mode.outcome(protected), CircuitOpenError)
    assert len(given) == 2
    assert [(e.outcome, e.error_type) for e in seen] == [("failure", "FailedResult")] * 2
    clock.advance(10)
    assert mode.run(protected) == {"busy": False}  # the trial's value passes: it closes
    assert registry.breaker("flagged").state_label == "closed"


def test_failure_on_result_a_passing_value_is_a_success_and_clears_the_count(mode, clock):
    g = Guarded(mode, fail_max=2, failure_on_result=lambda r: r is None)
    g.fail()
    assert g.breaker.snapshot()["failures"] == 1
    assert g.ok() == ("ok", (), {})
    assert g.breaker.snapshot()["failures"] == 0


def test_failure_on_result_a_flagged_trial_reopens_the_circuit(mode, clock):
    fn, _ = answering(mode, "bad", "bad")
    strat = strategy(fail_max=1, timeout=5, failure_on_result=lambda r: r == "bad")
    protected = mode.chain(strat, fn)
    assert mode.run(protected) == "bad"
    assert strat.breaker.state_label == "open"
    clock.advance(5)
    assert mode.run(protected) == "bad"
    assert strat.breaker.state_label == "open"
    assert strat.breaker.snapshot()["seconds_left_open"] == pytest.approx(5)


def test_failure_on_result_tells_pybreaker_listeners_a_failure(mode, clock):
    g = Guarded(mode, fail_max=1, failure_on_result=lambda r: True)
    listener = Recorder()
    g.breaker.add_listener(listener)
    g.ok()
    assert listener.seen == [
        ("before_call", ()),
        ("failure", "FailedResult"),
        ("state_change", "closed", "open"),
    ]


def test_failure_on_result_a_raising_predicate_leaves_the_result_a_success(mode, clock):
    def broken(result: Any) -> bool:
        raise KeyError("bug in the predicate")

    g = Guarded(mode, fail_max=1, failure_on_result=broken)
    assert g.ok() == ("ok", (), {})
    assert g.breaker.state_label == "closed"


def test_failure_on_result_is_ignored_for_a_call_that_raised(mode, clock):
    g = Guarded(mode, fail_max=1, exclude=(NotFound,), failure_on_result=lambda r: True)
    assert isinstance(g.fail(NotFound("no such row")), NotFound)
    assert g.breaker.state_label == "closed"


def test_failure_on_result_can_be_reconfigured(mode, clock):
    g = Guarded(mode, fail_max=1)
    g.ok()
    g.breaker.reconfigure(CircuitBreakerOptions(fail_max=1, failure_on_result=lambda r: True))
    g.ok()
    assert g.breaker.state_label == "open"


def test_failure_on_result_is_code_only():
    variable = "BUTTRESS_SERVICES__X__CIRCUIT_BREAKER__FAILURE_ON_RESULT"
    with pytest.raises(ConfigurationError, match="can only be given in code") as caught:
        buttress.config.load_settings({variable: "is_busy"}, None)
    [(key_path, _, _)] = caught.value.errors
    assert key_path == "services.x.circuit_breaker.failure_on_result"


def test_exclude_takes_predicates(mode, clock):
    def client_error(exc: BaseException) -> bool:
        return getattr(exc, "status", 500) < 500

    class HTTPError(Exception):
        def __init__(self, status: int) -> None:
            super().__init__(status)
            self.status = status

    g = Guarded(mode, fail_max=1, exclude=(client_error,))
    g.fail(HTTPError(404))
    assert g.breaker.state_label == "closed"
    g.fail(HTTPError(503))
    assert g.breaker.state_label == "open"


def test_exception_classes_with_a_custom_metaclass_are_matched_as_classes(mode, clock):
    class ABCError(Exception, metaclass=abc.ABCMeta):
        """pybreaker calls such a class as a predicate, and then excludes every exception."""

    class Specific(ABCError):
        pass

    g = Guarded(mode, fail_max=1, exclude=(ABCError,))
    g.fail(Specific())
    assert g.breaker.state_label == "closed"
    g.fail(ValueError("a real failure"))
    assert g.breaker.state_label == "open"


def test_a_broken_exclude_predicate_counts_the_failure_and_keeps_the_callers_error(mode, clock):
    def broken(exc: BaseException) -> bool:
        raise RuntimeError("bug in predicate")

    g = Guarded(mode, fail_max=1, exclude=(broken,))
    error = Down("down")
    assert g.fail(error) is error
    assert g.breaker.state_label == "open"


def test_rejections_from_inner_patterns_are_ignored(mode, clock):
    g = Guarded(mode, fail_max=1)
    inner = BulkheadFullError("full", service="svc", retry_after=None)
    assert g.fail(inner) is inner
    assert g.breaker.state_label == "closed"
    assert g.breaker.snapshot()["failures"] == 0


def test_an_inner_timeout_counts_as_a_failure(mode, clock):
    g = Guarded(mode, fail_max=1)
    g.fail(TimeoutExceededError("late", service="svc", seconds=1))
    assert g.breaker.state_label == "open"


def test_keyboard_interrupt_and_system_exit_are_never_counted(mode, clock):
    g = Guarded(mode, fail_max=1)
    for exc in (KeyboardInterrupt(), SystemExit(3), GeneratorExit()):
        g.dep.fail_with = exc
        with pytest.raises(type(exc)):
            mode.run(g.fn)
    assert g.breaker.state_label == "closed"
    assert g.breaker.snapshot()["failures"] == 0


def test_a_cancelled_call_is_not_counted_and_frees_its_trial_slot(clock):
    strat = strategy(fail_max=1, timeout=5)
    cb = strat.breaker

    async def cancel_one_call() -> None:
        started = asyncio.Event()

        async def hang(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            started.set()
            await asyncio.Event().wait()

        task = asyncio.create_task(alink(strat, hang)((), {}))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_one_call())
    assert (cb.state_label, cb.snapshot()["failures"]) == ("closed", 0)

    cb.open()
    clock.advance(5)
    asyncio.run(cancel_one_call())  # the cancelled call was the trial
    snap = cb.snapshot()
    assert (snap["state"], snap["trials_in_flight"]) == ("half_open", 0)


def test_failures_are_kept_while_open_and_a_failed_trial_counts(mode, clock):
    g = Guarded(mode, fail_max=2, timeout=5)
    g.fail()
    g.fail()  # trips
    assert (g.breaker.snapshot()["failures"], g.breaker.fail_counter) == (2, 2)
    clock.advance(5)
    g.fail()  # the trial fails: one more failure, open again
    snap = g.breaker.snapshot()
    assert (snap["state"], snap["failures"], g.breaker.fail_counter) == ("open", 3, 3)
    clock.advance(5)
    g.ok()  # the trial succeeds: closed, the count starts again
    assert (g.breaker.snapshot()["failures"], g.breaker.fail_counter) == (0, 0)


# --- late results --------------------------------------------------------------------------------


def test_a_failure_landing_after_the_trip_changes_nothing(mode, clock):
    g = Guarded(mode, fail_max=2, timeout=10)
    late = Held(mode, g.strategy, outcome=Down("late"))
    with capture_events([CircuitStateChanged]) as seen:
        g.fail()
        g.fail()
        clock.advance(3)
        result = late.release()
    assert isinstance(result, Down)  # its own error, not a CircuitOpenError
    assert [(c.old_state, c.new_state) for c in seen] == [("closed", "open")]
    assert g.ok().retry_after == pytest.approx(7)  # opened_at was not moved by the late failure


def test_a_failure_landing_after_a_manual_reset_is_not_counted(mode, clock):
    strat = strategy(fail_max=1)
    cb = strat.breaker
    late = Held(mode, strat, outcome=Down("late"))
    cb.reset()
    assert isinstance(late.release(), Down)
    assert (cb.state_label, cb.snapshot()["failures"]) == ("closed", 0)


def test_a_success_admitted_while_closed_does_not_count_as_a_trial_success(mode, clock):
    strat = strategy(fail_max=1, timeout=5)
    cb = strat.breaker
    old = Held(mode, strat)  # admitted while closed
    cb.open()
    clock.advance(5)
    trial = Held(mode, strat)
    assert trial.admitted
    assert old.release() == "ok"
    snap = cb.snapshot()
    assert (snap["state"], snap["successes"], snap["trials_in_flight"]) == ("half_open", 0, 1)
    assert trial.release() == "ok"
    assert cb.state_label == "closed"


# --- rate windows --------------------------------------------------------------------------------


def test_failure_rate_trips_once_minimum_calls_are_in_the_window(mode, clock):
    g = Guarded(mode, fail_max=100, failure_rate_threshold=0.5, minimum_calls=6)
    with capture_events([CircuitStateChanged]) as seen:
        for _ in range(2):
            g.ok()
            g.fail()
        assert g.breaker.snapshot()["failure_rate"] == pytest.approx(0.5)
        assert g.breaker.state_label == "closed"  # 4 calls < minimum_calls
        g.ok()
        g.fail()
    assert g.breaker.state_label == "open"
    assert seen[-1].reason == "failure_rate"


def test_the_rate_window_forgets_calls_older_than_window_seconds(mode, clock):
    g = Guarded(mode, fail_max=100, failure_rate_threshold=0.5, minimum_calls=4, window_seconds=10)
    g.fail()
    g.fail()
    g.fail()
    clock.advance(11)
    assert g.breaker.snapshot()["failure_rate"] == 0.0
    g.ok()
    g.ok()
    g.ok()
    g.fail()
    assert g.breaker.snapshot()["failure_rate"] == pytest.approx(0.25)
    assert g.breaker.state_label == "closed"


def test_slow_call_rate_trips_on_slow_successes(mode, clock):
    strat = strategy(
        fail_max=100, slow_call_duration=1.0, slow_call_rate_threshold=0.5, minimum_calls=4
    )
    fast = mode.chain(strat, mode.define())
    slow = mode.chain(strat, mode.define(latency=2.0))
    with capture_events([CircuitCallRecorded, CircuitStateChanged]) as seen:
        mode.run(fast)
        mode.run(slow)
        mode.run(fast)
        assert strat.breaker.state_label == "closed"
        mode.run(slow)
    assert strat.breaker.state_label == "open"
    assert seen.of(CircuitStateChanged)[-1].reason == "slow_call_rate"
    recorded = seen.of(CircuitCallRecorded)
    assert [r.slow for r in recorded] == [False, True, False, True]
    assert recorded[1].duration == pytest.approx(2.0)
    assert recorded[3].slow_call_rate == pytest.approx(0.5)


def test_closing_starts_an_empty_window(mode, clock):
    g = Guarded(mode, fail_max=100, failure_rate_threshold=0.5, minimum_calls=2, timeout=5)
    g.fail()
    g.fail()
    assert g.breaker.state_label == "open"
    clock.advance(5)
    g.ok()
    assert g.breaker.snapshot()["failure_rate"] == 0.0
    g.fail()
    assert g.breaker.state_label == "closed"  # one call in the fresh window


# --- manual control ------------------------------------------------------------------------------


def test_force_open_rejects_until_reset(mode, clock):
    g = Guarded(mode, timeout=5)
    with capture_events([CallRejected, CircuitStateChanged]) as seen:
        g.breaker.force_open()
        clock.advance(100)
        rejected = g.ok()
    assert isinstance(rejected, CircuitOpenError)
    assert rejected.retry_after is None
    assert g.dep.calls == 0
    assert seen.of(CallRejected) == [CallRejected("svc", "circuit_breaker", "forced_open", None)]
    assert g.breaker.snapshot()["state"] == "forced_open"
    assert g.breaker.snapshot()["seconds_left_open"] is None
    g.breaker.reset()
    assert g.ok()[0] == "ok"
    assert [(c.old_state, c.new_state, c.reason) for c in seen.of(CircuitStateChanged)] == [
        ("closed", "forced_open", "manual")
    ]


def test_force_closed_admits_and_counts_but_never_trips(mode, clock):
    g = Guarded(mode, fail_max=2)
    g.breaker.force_closed()
    for _ in range(5):
        g.fail()
    snap = g.breaker.snapshot()
    assert (snap["state"], snap["failures"]) == ("forced_closed", 5)
    assert g.dep.calls == 5
    g.breaker.reset()
    assert g.breaker.snapshot()["failures"] == 0


def test_disable_is_a_pass_through_until_enabled(mode, clock):
    g = Guarded(mode, fail_max=1)
    g.breaker.disable()
    with capture_events([CircuitCallRecorded]) as seen:
        g.fail()
        g.fail()
        assert g.ok()[0] == "ok"
    assert seen == []
    assert g.breaker.snapshot()["state"] == "disabled"
    g.breaker.enable()
    assert g.breaker.state_label == "closed"
    g.fail()
    assert g.breaker.state_label == "open"


def test_enable_does_nothing_unless_disabled(mode, clock):
    g = Guarded(mode)
    g.breaker.force_open()
    g.breaker.enable()
    assert g.breaker.state_label == "forced_open"


def test_reset_closes_an_open_circuit_and_clears_counters(mode, clock):
    g = Guarded(mode, fail_max=2, timeout=60)
    g.fail()
    g.fail()
    with capture_events([CircuitStateChanged]) as seen:
        g.breaker.reset()
    assert seen == [CircuitStateChanged("svc", "open", "closed", "reset", 0.0)]
    assert g.ok()[0] == "ok"
    g.fail()
    assert g.breaker.state_label == "closed"


def test_force_circuit_state_reaches_the_breaker_of_a_named_service(mode, clock):
    fn = circuit_breaker(name="openfga", fail_max=5, timeout=60)(mode.define(name="check"))
    force_circuit_state("openfga", "forced_open")
    rejected = mode.outcome(fn)
    assert isinstance(rejected, CircuitOpenError)
    assert rejected.service == "openfga"
    force_circuit_state("openfga", "closed")
    assert mode.run(fn) == "ok"
    assert registry.breaker("openfga") is registry.instances("circuit_breaker")["openfga"]
    with pytest.raises(ValueError, match="unknown circuit state 'ajar'"):
        force_circuit_state("openfga", "ajar")


def test_force_circuit_state_before_the_first_call_uses_the_call_sites_arguments(mode, clock):
    fn = circuit_breaker(name="keycloak", timeout=30)(mode.define(name="token"))
    force_circuit_state("keycloak", "open")
    assert mode.outcome(fn).retry_after == pytest.approx(30)
    clock.advance(30)
    assert mode.run(fn) == "ok"


# --- through the public decorators ---------------------------------------------------------------


def test_the_architecture_decision_example_trips_and_recovers(mode, clock):
    dep = Dependency()
    check_permission = circuit_breaker(name="openfga", fail_max=5, timeout=60)(mode.define(dep))
    dep.fail_with = Down("openfga down")
    for _ in range(5):
        assert isinstance(mode.outcome(check_permission, "alice", "doc"), Down)
    rejected = mode.outcome(check_permission, "alice", "doc")
    assert isinstance(rejected, buttress.CircuitOpenError)
    assert rejected.retry_after == pytest.approx(60)
    clock.advance(60)
    dep.fail_with = None
    assert mode.run(check_permission, "alice", "doc") == ("ok", ("alice", "doc"), {})
    assert registry.breaker("openfga").state_label == "closed"


def test_two_call_sites_with_one_service_share_one_breaker(mode, clock):
    dep = Dependency()
    dep.fail_with = Down("down")
    first = circuit_breaker(name="redis", fail_max=2)(mode.define(dep, name="get"))
    second = circuit_breaker(name="redis")(mode.define(dep, name="set"))
    mode.outcome(first)
    mode.outcome(second)
    assert isinstance(mode.outcome(first), CircuitOpenError)
    assert isinstance(mode.outcome(second), CircuitOpenError)


# --- shadow mode ---------------------------------------------------------------------------------


def test_shadow_mode_never_rejects_but_says_where_it_would_have(mode, clock):
    g = Guarded(mode, shadow=True, fail_max=2, timeout=10)
    with capture_events([ShadowDecision, CallRejected, CircuitCallRecorded]) as seen:
        g.fail()
        g.fail()
        assert g.breaker.state_label == "open"  # it keeps the state it would have
        assert g.ok()[0] == "ok"  # ...but lets the call through
        assert isinstance(g.fail(), Down)
    assert g.dep.calls == 4
    assert seen.of(ShadowDecision) == [ShadowDecision("svc", "circuit_breaker", "reject")] * 2
    assert seen.of(CallRejected) == []
    assert [r.outcome for r in seen.of(CircuitCallRecorded)] == [
        "failure",
        "failure",
        "success",
        "failure",
    ]
    clock.advance(10)
    g.ok()
    assert g.breaker.state_label == "closed"


def test_shadow_mode_lets_calls_past_a_forced_open_circuit(mode, clock):
    g = Guarded(mode, shadow=True)
    g.breaker.force_open()
    assert g.ok()[0] == "ok"
    with capture_events([ShadowDecision]) as seen:
        assert g.ok()[0] == "ok"
    assert seen == [ShadowDecision("svc", "circuit_breaker", "reject")]


def test_shadow_mode_lets_calls_past_a_full_half_open(mode, clock):
    strat = strategy(mode="shadow", fail_max=1, timeout=5)
    strat.breaker.open()
    clock.advance(5)
    trial = Held(mode, strat)
    extra = Held(mode, strat)
    assert (trial.admitted, extra.admitted) == (True, True)
    assert extra.release() == "ok"
    assert strat.breaker.state_label == "half_open"  # the extra call was not a trial
    trial.release()
    assert strat.breaker.state_label == "closed"


# --- events --------------------------------------------------------------------------------------


def test_every_admitted_call_is_recorded_once_with_its_outcome(mode, clock):
    strat = strategy(fail_max=10, exclude=(NotFound,))
    ok = mode.chain(strat, mode.define(latency=0.25))
    dep = Dependency()
    failing = mode.chain(strat, mode.define(dep, latency=0.5))
    with capture_events([CircuitCallRecorded]) as seen:
        mode.run(ok)
        dep.fail_with = Down("x")
        mode.outcome(failing)
        dep.fail_with = NotFound("y")
        mode.outcome(failing)
    assert seen == [
        CircuitCallRecorded("svc", "success", 0.25, False, None, None, None),
        CircuitCallRecorded("svc", "failure", 0.5, False, "Down", None, None),
        CircuitCallRecorded("svc", "ignored", 0.5, False, "NotFound", None, None),
    ]


def test_open_rejections_are_events_with_retry_after(mode, clock):
    g = Guarded(mode, fail_max=1, timeout=8)
    g.fail()
    clock.advance(3)
    with capture_events([CallRejected]) as seen:
        g.ok()
    assert seen == [CallRejected("svc", "circuit_breaker", "open", pytest.approx(5))]


class LooksFromAnotherThread:
    """A subscriber that hands each event to a thread which reads the breaker, and joins it.

    Delivered under the breaker's lock, the thread would wait for the lock this subscriber's
    caller holds, and the join would wait for the thread: a deadlock (bounded here by the
    join's timeout, so a failing test reports it instead of hanging).
    """

    def __init__(self, cb: CircuitBreaker) -> None:
        self.cb = cb
        self.seen: list[tuple[str, str, str]] = []
        self.stuck = 0

    def __call__(self, event: Any) -> None:
        def look() -> None:
            self.seen.append(
                (type(event).__name__, self.cb.current_state, self.cb.snapshot()["state"])
            )

        reader = threading.Thread(target=look, daemon=True)
        reader.start()
        reader.join(2)
        self.stuck += reader.is_alive()


def test_a_subscriber_may_read_the_breaker_from_another_thread(mode, clock):
    g = Guarded(mode, fail_max=1, timeout=5)
    subscriber = LooksFromAnotherThread(g.breaker)
    undo = buttress.events.subscribe(
        subscriber, [CircuitStateChanged, CallRejected, CircuitTrialStarted, CircuitCallRecorded]
    )
    try:
        g.fail()  # trips
        g.ok()  # rejected
        clock.advance(5)
        g.ok()  # a trial, which closes it
    finally:
        undo()
    assert subscriber.stuck == 0
    # In the order the breaker decided them, each seen with the state it announced.
    assert subscriber.seen == [
        ("CircuitStateChanged", "open", "open"),
        ("CircuitCallRecorded", "open", "open"),
        ("CallRejected", "open", "open"),
        ("CircuitStateChanged", "half-open", "half_open"),
        ("CircuitTrialStarted", "half-open", "half_open"),
        ("CircuitStateChanged", "closed", "closed"),
        ("CircuitCallRecorded", "closed", "closed"),
    ]


def test_a_pybreaker_listener_may_read_the_breaker_from_another_thread(mode, clock):
    g = Guarded(mode, fail_max=1, timeout=5)

    class Listener(pybreaker.CircuitBreakerListener):
        def __init__(self) -> None:
            self.look = LooksFromAnotherThread(g.breaker)

        def state_change(self, cb, old_state, new_state):
            self.look((old_state.name, new_state.name))

    listener = Listener()
    g.breaker.add_listener(listener)
    g.fail()
    clock.advance(5)
    g.ok()
    assert listener.look.stuck == 0
    assert [state for _, state, _ in listener.look.seen] == ["open", "half-open", "closed"]


# --- options -------------------------------------------------------------------------------------


def test_reconfigure_keeps_the_state_and_applies_the_new_options(mode, clock):
    g = Guarded(mode, fail_max=3, timeout=10)
    g.fail()
    g.fail()
    again = strategy(fail_max=2, timeout=20)  # same service: the registry reconfigures
    assert again.breaker is g.breaker
    assert g.breaker.snapshot()["failures"] == 2
    assert g.breaker.fail_max == 2
    g.fail()
    assert g.breaker.state_label == "open"
    clock.advance(5)
    strategy(fail_max=2, timeout=30)
    assert g.ok().retry_after == pytest.approx(25)


def test_reconfigure_swaps_the_exclusions(mode, clock):
    g = Guarded(mode, fail_max=1, exclude=(NotFound,))
    strategy(fail_max=1)
    assert g.breaker.excluded_exceptions == ()
    g.fail(NotFound("now it counts"))
    assert g.breaker.state_label == "open"


def test_reconfigure_keeps_the_window_unless_its_length_changes(mode, clock):
    g = Guarded(mode, fail_max=100, failure_rate_threshold=0.9, minimum_calls=2)
    g.fail()
    g.ok()
    strategy(fail_max=100, failure_rate_threshold=0.5, minimum_calls=2)
    assert g.breaker.snapshot()["failure_rate"] == pytest.approx(0.5)
    g.fail()
    assert g.breaker.state_label == "open"
    g.breaker.reset()
    g.fail()
    strategy(fail_max=100, failure_rate_threshold=0.5, minimum_calls=2, window_seconds=30)
    assert g.breaker.snapshot()["failure_rate"] == 0.0
    strategy(fail_max=100)
    assert g.breaker.snapshot()["failure_rate"] is None


def test_disabled_options_build_nothing():
    ctx = BuildContext("svc", CircuitBreakerOptions(enabled=False), "svc")
    assert cbmod.build(ctx) is None


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_state_url_shares_the_state_and_calls_go_on_while_redis_is_unreachable(mode, clock):
    # tests/redis runs a real Redis; here nothing listens on the port
    g = Guarded(mode, fail_max=2, state_url=f"redis://:pw@127.0.0.1:{unused_port()}/0")
    assert isinstance(g.breaker.storage, SharedStateStorage)
    with capture_events([StateStoreError, CircuitStateChanged]) as seen:
        assert g.ok()[0] == "ok"
        g.fail()
        g.fail()  # trips on the local copy: the dependency stays protected
        assert isinstance(g.ok(), CircuitOpenError)
    assert g.dep.calls == 3
    assert seen.of(StateStoreError) == [StateStoreError("svc", "admit", "ConnectionError")]
    assert [(e.new_state, e.reason) for e in seen.of(CircuitStateChanged)] == [("open", "fail_max")]
    assert "pw" not in repr(g.breaker.storage)


def test_a_state_url_that_is_not_a_redis_url_fails_at_decoration_without_repeating_it():
    with pytest.raises(ConfigurationError) as caught:
        circuit_breaker(name="svc", state_url="hunter2@cache:6379")
    assert "redis://" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_memory_is_the_default_and_no_storage_is_made_without_a_state_url(mode, clock):
    g = Guarded(mode)
    assert type(g.breaker.storage) is pybreaker.CircuitMemoryStorage
    assert g.breaker._fast_token is not None  # the lock-free closed path


def test_slow_call_options_must_come_together():
    with pytest.raises(ValueError, match="set together"):
        CircuitBreakerOptions(slow_call_duration=1.0)


# --- pybreaker stays reachable -------------------------------------------------------------------


class Recorder(pybreaker.CircuitBreakerListener):
    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    def before_call(self, cb, func, *args, **kwargs):
        self.seen.append(("before_call", args))

    def failure(self, cb, exc):
        self.seen.append(("failure", type(exc).__name__))

    def success(self, cb):
        self.seen.append(("success",))

    def state_change(self, cb, old_state, new_state):
        self.seen.append(("state_change", old_state.name, new_state.name))


def test_pybreaker_listeners_fire(mode, clock):
    g = Guarded(mode, fail_max=1, timeout=5, exclude=(NotFound,))
    listener = Recorder()
    g.breaker.add_listener(listener)
    mode.run(g.fn, "a")
    g.fail(NotFound("not a failure, not a success"))
    g.fail()
    g.ok()  # rejected: pybreaker fires nothing for rejections
    clock.advance(5)
    g.ok()
    assert listener.seen == [
        ("before_call", ("a",)),
        ("success",),
        ("before_call", ()),
        ("before_call", ()),
        ("failure", "Down"),
        ("state_change", "closed", "open"),
        ("state_change", "open", "half-open"),
        ("before_call", ()),
        ("state_change", "half-open", "closed"),
        ("success",),
    ]
    g.breaker.remove_listener(listener)
    g.ok()
    assert len(listener.seen) == 10


def test_a_raising_listener_never_costs_the_caller_its_result(mode, clock):
    class Broken(pybreaker.CircuitBreakerListener):
        def success(self, cb):
            raise RuntimeError("metrics backend down")

        def failure(self, cb, exc):
            raise RuntimeError("metrics backend down")

    g = Guarded(mode, fail_max=1)
    g.breaker.add_listener(Broken())
    assert g.ok()[0] == "ok"
    error = Down("down")
    assert g.fail(error) is error


def test_pybreaker_views_follow_the_state(clock):
    cb = CircuitBreaker("svc", CircuitBreakerOptions(fail_max=1, timeout=5))
    assert (cb.current_state, cb.state.name, cb.fail_counter) == ("closed", "closed", 0)
    with pytest.raises(Down):
        cb.call(_failing_dependency())
    assert (cb.current_state, cb.state.name, cb.fail_counter) == ("open", "open", 1)
    cb.state = "half-open"
    assert cb.state_label == "half_open"
    cb.state = "closed"
    assert (cb.current_state, cb.fail_counter) == ("closed", 0)
    with pytest.raises(ValueError, match="unknown state"):
        cb.state = "ajar"


def _failing_dependency() -> Dependency:
    dep = Dependency()
    dep.fail_with = Down("down")
    return dep


def test_pybreaker_call_runs_through_the_breaker_and_rejects_with_circuit_open_error(clock):
    cb = CircuitBreaker("svc", CircuitBreakerOptions(fail_max=1, timeout=5))
    assert cb.call(lambda x, y=0: x + y, 1, y=2) == 3
    with pytest.raises(Down):
        cb.call(_failing_dependency())
    with pytest.raises(CircuitOpenError) as caught:
        cb.call(lambda: "never")
    assert caught.value.retry_after == pytest.approx(5)


def test_pybreaker_decorator_and_calling_work(clock):
    cb = CircuitBreaker("svc", CircuitBreakerOptions(fail_max=2))

    @cb
    def double(x: int) -> int:
        return 2 * x

    assert double(4) == 8
    with pytest.raises(Down), cb.calling():
        raise Down("in a with block")
    assert cb.snapshot()["failures"] == 1
    with cb.calling():
        pass
    assert cb.snapshot()["failures"] == 0


def test_acall_and_calling_work_on_asyncio_without_tornado(clock):
    cb = CircuitBreaker("svc", CircuitBreakerOptions(fail_max=1, timeout=5))

    async def fetch(x: int) -> int:
        await asyncio.sleep(0)
        return x + 1

    async def failing() -> None:
        await asyncio.sleep(0)
        raise Down("down")

    async def scenario() -> list[Any]:
        out: list[Any] = [await cb.acall(fetch, 1)]
        with cb.calling():
            out.append(await fetch(2))
        try:
            await cb.acall(failing)
        except Down as exc:
            out.append(exc)
        try:
            await cb.acall(fetch, 3)
        except CircuitOpenError as exc:
            out.append(exc.retry_after)
        return out

    result = asyncio.run(scenario())
    assert result[:2] == [2, 3]
    assert isinstance(result[2], Down)
    assert result[3] == pytest.approx(5)
    with pytest.raises(NotImplementedError, match="acall"):
        cb.call_async(fetch)


def test_add_excluded_exception_uses_the_fixed_semantics(clock):
    cb = CircuitBreaker("svc", CircuitBreakerOptions(fail_max=1))
    cb.add_excluded_exception(NotFound)
    assert cb.is_system_error(NotFound()) is False
    assert cb.is_system_error(asyncio.CancelledError()) is False
    cb.remove_excluded_exception(NotFound)
    assert cb.is_system_error(NotFound()) is True


class SharedStorage(pybreaker.CircuitMemoryStorage):
    """One storage behind two breakers: what a Redis storage looks like to each process."""


def test_any_storage_works_and_a_state_written_elsewhere_is_adopted(mode, clock):
    storage = SharedStorage(pybreaker.STATE_CLOSED)
    here = CircuitBreaker(
        "svc", CircuitBreakerOptions(fail_max=2, timeout=10), state_storage=storage
    )
    there = CircuitBreaker(
        "svc", CircuitBreakerOptions(fail_max=2, timeout=10), state_storage=storage
    )
    step_here = mode.chain(
        CircuitBreakerStrategy(here, shadow=False), mode.define(_failing_dependency())
    )
    step_there = mode.chain(CircuitBreakerStrategy(there, shadow=False), mode.define())
    mode.outcome(step_here)
    mode.outcome(step_here)
    assert storage.state == "open"
    assert storage.counter == 2
    with capture_events([CircuitStateChanged]) as seen:
        rejected = mode.outcome(step_there)
    assert isinstance(rejected, CircuitOpenError)
    assert seen == [CircuitStateChanged("svc", "closed", "open", "shared_state", 0.0)]
    assert storage.counter == 2  # adopting a state does not wipe the shared counter


def test_a_breaker_built_on_an_open_storage_starts_open(clock):
    storage = SharedStorage(pybreaker.STATE_OPEN)
    storage.opened_at = _breaker._wall_datetime()
    clock.advance(4)
    cb = CircuitBreaker("svc", CircuitBreakerOptions(timeout=10), state_storage=storage)
    snap = cb.snapshot()
    assert snap["state"] == "open"
    assert snap["seconds_left_open"] == pytest.approx(6)


def test_the_fast_circuit_open_error_equals_the_constructed_one():
    fast = _breaker._open_error("circuit of 'svc' is open", "svc", 2.5)
    slow = CircuitOpenError("circuit of 'svc' is open", service="svc", retry_after=2.5)
    assert type(fast) is type(slow)
    assert fast.args == slow.args
    assert str(fast) == str(slow)
    assert vars(fast) == vars(slow)


def test_snapshot_has_the_health_keys(clock):
    cb = CircuitBreaker("svc", CircuitBreakerOptions(failure_rate_threshold=0.5))
    assert cb.snapshot() == {
        "service": "svc",
        "state": "closed",
        "failures": 0,
        "successes": 0,
        "trials_in_flight": 0,
        "seconds_left_open": None,
        "failure_rate": 0.0,
        "slow_call_rate": 0.0,
    }
    assert repr(cb) == "<buttress CircuitBreaker 'svc' closed>"


# --- concurrency ---------------------------------------------------------------------------------


def _count_concurrent(
    mode, on_enter: Callable[[], None]
) -> tuple[Callable[..., Any], dict[str, int]]:
    """A dependency that records how many calls are inside it at once."""
    state = {"inside": 0, "peak": 0, "calls": 0}
    lock = threading.Lock()

    def enter() -> None:
        with lock:
            state["inside"] += 1
            state["calls"] += 1
            state["peak"] = max(state["peak"], state["inside"])
        on_enter()

    def leave() -> None:
        with lock:
            state["inside"] -= 1

    if mode.is_async:

        async def op() -> str:
            enter()
            try:
                for _ in range(3):
                    await asyncio.sleep(0)  # a real yield to the other tasks, not a wait
            finally:
                leave()
            return "ok"

    else:

        def op() -> str:  # type: ignore[misc]
            enter()
            try:
                time.sleep(0.001)  # real time: lets the other threads overlap this call
            finally:
                leave()
            return "ok"

    return op, state


@pytest.mark.realtime
def test_many_concurrent_callers_never_get_more_than_half_open_max_calls_trials(mode, clock):
    callers = 1000 if mode.is_async else 64
    strat = strategy(fail_max=1, timeout=5, half_open_max_calls=3, success_threshold=1000)
    cb = strat.breaker
    peaks: list[int] = []
    op, state = _count_concurrent(mode, lambda: peaks.append(cb.snapshot()["trials_in_flight"]))
    fn = mode.chain(strat, op)
    cb.open()
    clock.advance(5)
    with capture_events([CircuitTrialStarted]) as seen:
        results = mode.gather(fn, callers)
    assert state["peak"] <= 3
    assert max(peaks) <= 3
    assert max(e.in_flight for e in seen) <= 3
    assert results.count("ok") == state["calls"] >= 1
    rejected = [r for r in results if isinstance(r, CircuitOpenError)]
    assert len(rejected) == callers - state["calls"]
    assert cb.snapshot()["trials_in_flight"] == 0


@pytest.mark.realtime
def test_many_concurrent_callers_through_trips_and_recoveries_keep_the_invariants(mode, clock):
    callers = 1000 if mode.is_async else 64
    strat = strategy(fail_max=3, timeout=1, half_open_max_calls=2)
    cb = strat.breaker
    sequence = iter(range(10**9))
    lock = threading.Lock()
    violations: list[int] = []

    def body() -> str:
        with lock:
            n = next(sequence)
        in_flight = cb.snapshot()["trials_in_flight"]
        if in_flight > 2:
            violations.append(in_flight)
        if n % 7 == 0:
            clock.advance(0.05)  # time moves while calls are in flight
        if (n // 4) % 2 == 0:  # runs of four failures, then four successes
            raise Down("flaky")
        return "ok"

    fn = mode.chain(strat, mode.define(body))

    if mode.is_async:

        async def five() -> list[Any]:
            out = []
            for _ in range(5):
                clock.advance(0.05)
                try:
                    out.append(await fn())
                except Exception as exc:  # the test inspects it
                    out.append(exc)
                await asyncio.sleep(0)  # a real yield to the other tasks, not a wait
            return out

    else:

        def five() -> list[Any]:  # type: ignore[misc]
            out = []
            for _ in range(5):
                clock.advance(0.05)
                try:
                    out.append(fn())
                except Exception as exc:  # the test inspects it
                    out.append(exc)
            return out

    with capture_events([CircuitTrialStarted, CircuitStateChanged]) as seen:
        batches = mode.gather(five, callers)
    outcomes = [o for batch in batches for o in batch]
    assert violations == []
    trials = seen.of(CircuitTrialStarted)
    assert trials, "the run never reached half-open"
    assert max(e.in_flight for e in trials) <= 2
    assert {e.reason for e in seen.of(CircuitStateChanged)} >= {"fail_max", "timeout_elapsed"}
    assert len(outcomes) == 5 * callers
    assert {type(o).__name__ for o in outcomes} <= {"str", "Down", "CircuitOpenError"}
    assert cb.snapshot()["trials_in_flight"] == 0


@pytest.mark.realtime
def test_four_threads_through_one_breaker_do_not_serialise():
    """pybreaker runs the call under its lock (4 x 0.2 s = 0.8 s); buttress does not."""
    call_seconds = 0.2

    def slow() -> str:
        time.sleep(call_seconds)
        return "ok"

    def run_four(call: Callable[[], Any]) -> float:
        threads = [threading.Thread(target=call) for _ in range(4)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - started

    ours = CircuitBreaker("svc", CircuitBreakerOptions())
    theirs = pybreaker.CircuitBreaker()
    ours_elapsed = run_four(lambda: ours.call(slow))
    theirs_elapsed = run_four(lambda: theirs.call(slow))
    assert ours_elapsed < 1.5 * call_seconds, ours_elapsed
    assert theirs_elapsed > 3 * call_seconds, theirs_elapsed


@pytest.mark.realtime
def test_four_tasks_through_one_breaker_run_concurrently():
    call_seconds = 0.2
    strat = strategy()

    async def slow(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        await asyncio.sleep(call_seconds)
        return "ok"

    step = alink(strat, slow)

    async def four() -> list[Any]:
        return await asyncio.gather(*(step((), {}) for _ in range(4)))

    started = time.perf_counter()
    assert asyncio.run(four()) == ["ok"] * 4
    assert time.perf_counter() - started < 1.5 * call_seconds


# --- the breaker only decides -------------------------------------------------------------------

# Every module of the package but its transport (the connections to Redis, which the drivers use).
DECIDING_MODULES = (
    "_breaker",
    "_machine",
    "_options",
    "_protocol",
    "_pybreaker_compat",
    "_states",
    "_window",
    "redis_storage",
)
# pybreaker's @breaker decorator must give an async def function an async def wrapper
# (inspect.iscoroutinefunction stays true); it awaits acall(), the drivers' step, and nothing else.
COROUTINE_WRAPPERS = {"guarded_async"}


@pytest.mark.parametrize("name", DECIDING_MODULES)
def test_no_breaker_module_awaits_sleeps_or_blocks(name: str) -> None:
    module = importlib.import_module(f"buttress.patterns.circuit_breaker.{name}")
    tree = ast.parse(inspect.getsource(module))
    allowed = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.AsyncFunctionDef) and node.name in COROUTINE_WRAPPERS
        for inner in ast.walk(node)
    }
    waits = {"sleep", "asleep", "wait", "timeout", "call_later"}
    found = []
    for node in ast.walk(tree):
        if id(node) in allowed:
            continue
        if isinstance(node, ast.AsyncFunctionDef | ast.Await | ast.AsyncWith | ast.AsyncFor):
            found.append(f"line {node.lineno}: {type(node).__name__}")
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names = [alias.name for alias in node.names]
            if "asyncio" in names or getattr(node, "module", None) == "asyncio":
                found.append(f"line {node.lineno}: imports asyncio")
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in {"_clock", "time", "asyncio"}
            and node.attr in waits
        ):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    assert found == [], f"circuit_breaker.{name} waits itself: {found}"


def test_no_decision_has_an_async_twin() -> None:
    # One decision path for threads and tasks: no a-prefixed copy of a method of the breaker or
    # its storage. Allowed: the entry points whose two forms are the drivers' own steps
    # (CircuitBreaker.call/acall), and closing connections (SharedStateStorage.close/aclose).
    allowed = {CircuitBreaker: ["acall"], SharedStateStorage: ["aclose"]}
    for cls in (CircuitBreaker, SharedStateStorage):
        names = {name for name in dir(cls) if not name.startswith("__")}
        twins = sorted(
            name
            for name in names
            if name.startswith(("a", "_a")) and name.replace("a", "", 1) in names
        )
        assert twins == allowed[cls], cls
