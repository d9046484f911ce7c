"""retry_with_backoff(retry_on_result=pred): a returned value as a failure, def and async def."""

from __future__ import annotations

from typing import Any

import pytest

import buttress
from buttress import events
from buttress.exceptions import ConfigurationError
from buttress.testing import FakeClock, capture_events


class Answers:
    """Returns ``values`` in order (the last repeats); records the attempt numbers."""

    def __init__(self, *values: Any) -> None:
        self.values = values
        self.attempts: list[int] = []

    def __call__(self) -> Any:
        self.attempts.append(buttress.attempt())
        return self.values[min(len(self.attempts), len(self.values)) - 1]


def test_a_rejected_result_is_retried_until_a_good_one(mode, clock: FakeClock) -> None:
    answers = Answers(503, 502, 200)
    call = buttress.retry_with_backoff(
        max_attempts=5, jitter="none", initial=1, retry_on_result=lambda status: status >= 500
    )(mode.define(answers))
    with capture_events([events.RetryScheduled, events.RetrySucceeded]) as seen:
        assert mode.run(call) == 200
    assert answers.attempts == [1, 2, 3]
    assert clock.sleeps == [1, 2]
    assert [type(e).__name__ for e in seen] == [
        "RetryScheduled",
        "RetryScheduled",
        "RetrySucceeded",
    ]
    assert seen.of(events.RetryScheduled)[0].error_type == "RetriedResult"


def test_the_last_result_is_returned_when_attempts_run_out(mode, clock: FakeClock) -> None:
    answers = Answers("busy-1", "busy-2", "busy-3")
    call = buttress.retry_with_backoff(
        max_attempts=3, initial=0.5, retry_on_result=lambda value: value.startswith("busy")
    )(mode.define(answers))
    with capture_events([events.RetryExhausted]) as seen:
        assert mode.run(call) == "busy-3"
    assert answers.attempts == [1, 2, 3]
    assert [(e.attempts, e.reason) for e in seen] == [(3, "max_attempts")]


def test_a_good_first_result_costs_one_call(mode, clock: FakeClock) -> None:
    answers = Answers("fine")
    call = buttress.retry_with_backoff(retry_on_result=lambda value: value != "fine")(
        mode.define(answers)
    )
    assert mode.run(call) == "fine"
    assert answers.attempts == [1]
    assert clock.sleeps == []


def test_not_idempotent_call_returns_the_rejected_result_at_once(mode, clock: FakeClock) -> None:
    answers = Answers(None, "late")
    call = buttress.retry_with_backoff(idempotent=False, retry_on_result=lambda v: v is None)(
        mode.define(answers)
    )
    assert mode.run(call) is None
    assert answers.attempts == [1]


def test_errors_are_still_retried_beside_results(mode, clock: FakeClock) -> None:
    outcomes = iter([ConnectionError("down"), "empty", "full"])

    def body() -> str:
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    call = buttress.retry_with_backoff(
        max_attempts=4, initial=0.1, retry_on_result=lambda v: v == "empty"
    )(mode.define(body))
    assert mode.run(call) == "full"


def test_the_deadline_stops_result_retries_too(mode, clock: FakeClock) -> None:
    # A 1 s deadline; the second wait (2 s) would end past it.
    answers = Answers("no", "no", "no")
    inner = buttress.retry_with_backoff(
        max_attempts=5, jitter="none", initial=0.5, retry_on_result=lambda v: v == "no"
    )(mode.define(answers))
    call = buttress.with_timeout(seconds=1)(inner)
    assert mode.run(call) == "no"
    assert answers.attempts == [1, 2]


def test_a_breaker_inside_sees_a_success(mode, clock: FakeClock) -> None:
    # Only retry treats the value as a failure: the breaker counts its own outcomes.
    answers = Answers("bad")
    call = buttress.retry_with_backoff(max_attempts=2, retry_on_result=lambda v: v == "bad")(
        buttress.circuit_breaker(name="result-breaker", fail_max=1)(mode.define(answers))
    )
    assert mode.run(call) == "bad"
    assert mode.run(call) == "bad"
    assert answers.attempts == [1, 2, 1, 2]


def test_retry_on_result_is_code_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUTTRESS_SERVICES__SVC__RETRY__RETRY_ON_RESULT", "x")
    with pytest.raises(ConfigurationError, match="retry_on_result"):
        buttress.reload_settings()
    monkeypatch.delenv("BUTTRESS_SERVICES__SVC__RETRY__RETRY_ON_RESULT")
    buttress.reload_settings()
