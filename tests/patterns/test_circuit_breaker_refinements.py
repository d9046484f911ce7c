"""Circuit breaker refinements: open time that grows on repeated trips, a server's Retry-After
holding the circuit open, the count window, and throttled answers (HTTP 429, gRPC
RESOURCE_EXHAUSTED) that are neither success nor failure.

Every behaviour runs on ``def`` and ``async def`` (the ``mode`` fixture) on the fake clock.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from tests.patterns.test_circuit_breaker import Guarded, strategy

from buttress import config
from buttress.events import CallRejected, CircuitCallRecorded, CircuitStateChanged
from buttress.exceptions import CircuitOpenError, ConfigurationError
from buttress.patterns._transient import FailedResponse
from buttress.patterns.circuit_breaker import CircuitBreakerOptions
from buttress.testing import capture_events


def rejected_for(g: Guarded) -> float:
    """The retry_after of the rejection a call gets now (the circuit must be open)."""
    outcome = g.ok()
    assert isinstance(outcome, CircuitOpenError), outcome
    assert outcome.retry_after is not None
    return outcome.retry_after


def failing_trial(g: Guarded, clock: Any, after: float) -> None:
    clock.advance(after)
    assert g.breaker.state_label == "half_open"
    g.fail()
    assert g.breaker.state_label == "open"


# --- open time that grows on repeated trips -----------------------------------------------------


def test_each_trip_without_a_close_multiplies_the_open_time_up_to_max_timeout(mode, clock):
    g = Guarded(mode, fail_max=1, timeout=5, open_backoff=2, max_timeout=30)
    with capture_events([CircuitStateChanged]) as seen:
        g.fail()
        assert rejected_for(g) == pytest.approx(5)
        failing_trial(g, clock, 5)  # a failed trial is a repeated trip
        assert rejected_for(g) == pytest.approx(10)
        clock.advance(9.9)
        assert g.breaker.state_label == "open"
        failing_trial(g, clock, 0.1)
        assert rejected_for(g) == pytest.approx(20)
        assert g.breaker.snapshot()["seconds_left_open"] == pytest.approx(20)
        failing_trial(g, clock, 20)
        assert rejected_for(g) == pytest.approx(30)  # 40, capped
        failing_trial(g, clock, 30)
        assert rejected_for(g) == pytest.approx(30)
        clock.advance(30)
        assert g.ok()[0] == "ok"  # the trial closes it: the streak ends
        assert g.breaker.state_label == "closed"
        g.fail()
        assert rejected_for(g) == pytest.approx(5)
    assert [e.reason for e in seen if e.new_state == "open"] == ["fail_max"] + [
        "trial_failed"
    ] * 4 + ["fail_max"]


def test_the_default_cap_is_ten_times_timeout(mode, clock):
    g = Guarded(mode, fail_max=1, timeout=1, open_backoff=100)
    g.fail()
    failing_trial(g, clock, 1)
    assert rejected_for(g) == pytest.approx(10)


def test_without_open_backoff_the_open_time_stays_timeout(mode, clock):
    g = Guarded(mode, fail_max=1, timeout=5)
    g.fail()
    for _ in range(3):
        failing_trial(g, clock, 5)
        assert rejected_for(g) == pytest.approx(5)


def test_a_rate_window_trip_is_a_repeated_trip_too(mode, clock):
    g = Guarded(
        mode,
        fail_max=100,
        timeout=5,
        open_backoff=3,
        failure_rate_threshold=0.5,
        minimum_calls=2,
    )
    g.ok()
    g.fail()
    assert rejected_for(g) == pytest.approx(5)
    failing_trial(g, clock, 5)
    assert rejected_for(g) == pytest.approx(15)


def test_a_manual_reset_ends_the_streak(mode, clock):
    g = Guarded(mode, fail_max=1, timeout=5, open_backoff=2)
    g.fail()
    failing_trial(g, clock, 5)
    g.breaker.reset()
    g.fail()
    assert rejected_for(g) == pytest.approx(5)


# --- a server's Retry-After holds the circuit open ----------------------------------------------


def unavailable(delay: float | None) -> FailedResponse:
    return FailedResponse(object(), 503, method="GET", delay=delay)


def test_the_failure_that_opens_the_circuit_holds_it_open_for_its_retry_after(mode, clock):
    g = Guarded(mode, fail_max=1, timeout=5)
    with capture_events([CallRejected]) as seen:
        g.fail(unavailable(40))
        assert rejected_for(g) == pytest.approx(40)
    assert seen[-1].retry_after == pytest.approx(40)
    clock.advance(39)
    assert g.breaker.state_label == "open"
    clock.advance(1)
    assert g.ok()[0] == "ok"


def test_a_retry_after_is_capped_by_max_timeout(mode, clock):
    g = Guarded(mode, fail_max=1, timeout=5, max_timeout=60)
    g.fail(unavailable(3600))
    assert rejected_for(g) == pytest.approx(60)
    h = Guarded(mode, "other", fail_max=1, timeout=5)
    h.fail(unavailable(3600))
    assert rejected_for(h) == pytest.approx(50)  # 10 x timeout


def test_a_shorter_retry_after_never_shortens_the_open_time(mode, clock):
    g = Guarded(mode, fail_max=1, timeout=5, open_backoff=4)
    g.fail(unavailable(1))
    assert rejected_for(g) == pytest.approx(5)
    clock.advance(5)
    g.fail(unavailable(2))  # a failed trial with a Retry-After
    assert rejected_for(g) == pytest.approx(20)


def test_only_the_failure_that_opens_it_holds_it(mode, clock):
    g = Guarded(mode, fail_max=2, timeout=5)
    g.fail(unavailable(40))
    g.fail()
    assert rejected_for(g) == pytest.approx(5)


def test_honor_retry_after_false_ignores_it(mode, clock):
    g = Guarded(mode, fail_max=1, timeout=5, honor_retry_after=False)
    g.fail(unavailable(40))
    assert rejected_for(g) == pytest.approx(5)


def test_a_failed_trial_with_a_retry_after_holds_it_again(mode, clock):
    g = Guarded(mode, fail_max=1, timeout=5)
    g.fail()
    clock.advance(5)
    g.fail(unavailable(25))
    assert rejected_for(g) == pytest.approx(25)


# --- the count window ---------------------------------------------------------------------------


def test_the_count_window_rates_the_last_window_size_calls(mode, clock):
    g = Guarded(
        mode,
        fail_max=100,
        failure_rate_threshold=0.5,
        minimum_calls=4,
        window="count",
        window_size=4,
    )
    g.fail()
    g.ok()
    g.ok()
    g.ok()
    assert g.breaker.snapshot()["failure_rate"] == pytest.approx(0.25)
    g.ok()  # pushes the failure out
    assert g.breaker.snapshot()["failure_rate"] == 0.0
    clock.advance(10_000)  # time does not move a count window
    g.fail()
    assert g.breaker.snapshot()["failure_rate"] == pytest.approx(0.25)
    assert g.breaker.state_label == "closed"
    g.fail()
    assert g.breaker.state_label == "open"


def test_the_count_window_waits_for_minimum_calls(mode, clock):
    g = Guarded(
        mode,
        fail_max=100,
        failure_rate_threshold=0.5,
        minimum_calls=3,
        window="count",
        window_size=10,
    )
    g.fail()
    g.fail()
    assert g.breaker.state_label == "closed"
    g.fail()
    assert g.breaker.state_label == "open"


def test_the_count_window_rates_slow_calls(mode, clock):
    strat = strategy(
        fail_max=100,
        slow_call_duration=1.0,
        slow_call_rate_threshold=1.0,
        minimum_calls=2,
        window="count",
        window_size=2,
    )
    fast = mode.chain(strat, mode.define())
    slow = mode.chain(strat, mode.define(latency=2.0))
    mode.run(slow)
    mode.run(fast)
    assert strat.breaker.snapshot()["slow_call_rate"] == pytest.approx(0.5)
    mode.run(fast)  # the slow call left the window
    assert strat.breaker.snapshot()["slow_call_rate"] == 0.0
    mode.run(slow)
    assert strat.breaker.state_label == "closed"
    mode.run(slow)
    assert strat.breaker.state_label == "open"


def test_switching_the_window_kind_starts_an_empty_window(mode, clock):
    g = Guarded(mode, fail_max=100, failure_rate_threshold=0.9, minimum_calls=2)
    g.fail()
    strategy(fail_max=100, failure_rate_threshold=0.9, minimum_calls=2, window="count")
    assert g.breaker.snapshot()["failure_rate"] == 0.0
    g.fail()
    strategy(
        fail_max=100, failure_rate_threshold=0.9, minimum_calls=2, window="count", window_size=5
    )
    assert g.breaker.snapshot()["failure_rate"] == 0.0


# --- throttled answers: neither success nor failure ---------------------------------------------


class Exhausted(grpc.RpcError):
    """A gRPC error as grpcio raises it (``code()`` gives the status)."""

    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code.name)
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


THROTTLED = {
    "grpc": lambda: Exhausted(grpc.StatusCode.RESOURCE_EXHAUSTED),
    "http-response": lambda: FailedResponse(object(), 429, method="GET", delay=30),
    "grpc-response": lambda: FailedResponse(object(), "RESOURCE_EXHAUSTED", method="/a.B/C"),
}


@pytest.mark.parametrize("kind", sorted(THROTTLED))
def test_a_throttled_answer_is_neither_success_nor_failure(mode, clock, kind):
    g = Guarded(mode, fail_max=1, timeout=5)
    with capture_events([CircuitCallRecorded]) as seen:
        for _ in range(3):
            assert isinstance(g.fail(THROTTLED[kind]()), Exception)
    assert [e.outcome for e in seen] == ["ignored"] * 3
    assert g.breaker.state_label == "closed"


@pytest.mark.parametrize("kind", sorted(THROTTLED))
def test_count_throttled_counts_it_as_a_failure(mode, clock, kind):
    g = Guarded(mode, fail_max=1, timeout=5, count_throttled=True)
    g.fail(THROTTLED[kind]())
    assert g.breaker.state_label == "open"


def test_a_counted_429_with_a_retry_after_holds_the_circuit(mode, clock):
    g = Guarded(mode, fail_max=1, timeout=5, count_throttled=True)
    g.fail(THROTTLED["http-response"]())
    assert rejected_for(g) == pytest.approx(30)


def test_other_grpc_errors_are_failures(mode, clock):
    g = Guarded(mode, fail_max=1)
    g.fail(Exhausted(grpc.StatusCode.UNAVAILABLE))
    assert g.breaker.state_label == "open"


# --- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("OPEN_BACKOFF", "0.5", "greater than or equal to 1"),
        ("MAX_TIMEOUT", "10", "max_timeout must be at least timeout"),
        ("WINDOW", "sliding", "'time' or 'count'"),
        ("WINDOW_SIZE", "0", "greater than 0"),
    ],
)
def test_bad_refinement_settings_fail_at_load_with_the_key(key, value, message):
    with pytest.raises(ConfigurationError) as info:
        config.load_settings(env={f"BUTTRESS_SERVICES__PAY__CIRCUIT_BREAKER__{key}": value})
    text = str(info.value)
    assert "services.pay.circuit_breaker" in text
    assert message in text


def test_the_refinement_settings_load():
    settings = config.load_settings(
        env={
            "BUTTRESS_SERVICES__PAY__CIRCUIT_BREAKER__OPEN_BACKOFF": "2",
            "BUTTRESS_SERVICES__PAY__CIRCUIT_BREAKER__MAX_TIMEOUT": "600",
            "BUTTRESS_SERVICES__PAY__CIRCUIT_BREAKER__WINDOW": "count",
            "BUTTRESS_SERVICES__PAY__CIRCUIT_BREAKER__WINDOW_SIZE": "50",
            "BUTTRESS_SERVICES__PAY__CIRCUIT_BREAKER__HONOR_RETRY_AFTER": "false",
        }
    )
    options = config.Snapshot(0, settings).service("pay").options("circuit_breaker", {}, None)
    assert isinstance(options, CircuitBreakerOptions)
    assert (
        options.open_backoff,
        options.max_timeout,
        options.window,
        options.window_size,
        options.honor_retry_after,
    ) == (2.0, 600.0, "count", 50, False)
