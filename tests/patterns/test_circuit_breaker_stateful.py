"""The breaker against a small reference model of design §3, driven by hypothesis.

Rules: instant calls through the real chain step (``def`` or ``async def``, per ``mode``) that
succeed, fail, raise an excluded error or are cancelled; calls that start now and finish later
(through the same admit/record protocol the steps use, so several can be in flight at once, which
is how concurrent half-open trials and late results arise); time passing; manual resets.

The model is the specification, written as plainly as possible:

* closed: a failure adds one to the consecutive count and ``fail_max`` of them open the circuit;
  a success clears the count;
* open for ``timeout`` seconds; then the first call half-opens it;
* half-open: at most ``half_open_max_calls`` trials in flight; ``success_threshold`` successes
  close it; one failure re-opens it;
* excluded errors and cancellations count as nothing, but free a trial slot;
* a result counts only if the state it was admitted in has not ended since.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from buttress import _clock
from buttress.exceptions import CircuitOpenError
from buttress.patterns.circuit_breaker import (
    CircuitBreaker,
    CircuitBreakerOptions,
    CircuitBreakerStrategy,
)
from buttress.testing import FakeClock

TIMEOUT = 10.0
OUTCOMES = st.sampled_from(["success", "failure", "excluded", "cancelled"])


class NotFound(LookupError):
    """Excluded: the dependency answered correctly."""


class Down(ConnectionError):
    """A failure of the dependency."""


def _raise_for(outcome: str) -> BaseException | None:
    return {
        "success": None,
        "failure": Down("down"),
        "excluded": NotFound("no such row"),
        "cancelled": asyncio.CancelledError(),
    }[outcome]


@dataclass(frozen=True)
class Ticket:
    generation: int
    trial: bool


class Model:
    """Design §3, nothing else."""

    def __init__(self, fail_max: int, success_threshold: int, max_trials: int) -> None:
        self.fail_max = fail_max
        self.success_threshold = success_threshold
        self.max_trials = max_trials
        self.state = "closed"
        self.failures = 0
        self.successes = 0
        self.trials = 0
        self.generation = 0
        self.opened_at = 0.0

    def enter(self, state: str, now: float) -> None:
        self.state = state
        self.generation += 1
        self.trials = 0
        self.successes = 0
        if state == "closed":
            self.failures = 0
        if state == "open":
            self.opened_at = now

    def admit(self, now: float) -> Ticket | float | None:
        """A ticket, or the rejection's retry_after (None when unknown)."""
        if self.state == "open":
            if now < self.opened_at + TIMEOUT:
                return self.opened_at + TIMEOUT - now
            self.enter("half_open", now)
        if self.state == "half_open":
            if self.trials >= self.max_trials:
                return None
            self.trials += 1
            return Ticket(self.generation, trial=True)
        return Ticket(self.generation, trial=False)

    def finish(self, ticket: Ticket, outcome: str, now: float) -> None:
        if ticket.generation != self.generation:
            return
        if ticket.trial:
            self.trials -= 1
        if outcome in ("excluded", "cancelled"):
            return
        if self.state == "closed":
            if outcome == "failure":
                self.failures += 1
                if self.failures >= self.fail_max:
                    self.enter("open", now)
            else:
                self.failures = 0
        elif outcome == "failure":
            self.failures += 1  # as pybreaker counts it: failures are kept until a close
            self.enter("open", now)
        else:
            self.successes += 1
            if self.successes >= self.success_threshold:
                self.enter("closed", now)

    def visible_state(self, now: float) -> str:
        """What health reads: an open circuit whose time ran out is ready to probe (half-open)."""
        if self.state == "open" and now >= self.opened_at + TIMEOUT:
            return "half_open"
        return self.state

    def seconds_left_open(self, now: float) -> float | None:
        if self.visible_state(now) != "open":
            return None
        return self.opened_at + TIMEOUT - now


@dataclass
class InFlight:
    token: int
    ticket: Ticket
    started: float


class BreakerMachine(RuleBasedStateMachine):
    mode: Any = None  # set per test: runs the instant calls as def or async def

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.previous_clock = _clock.set_clock(self.clock)
        self.in_flight: list[InFlight] = []
        self.next_outcome: str = "success"

    def teardown(self) -> None:
        _clock.set_clock(self.previous_clock)

    @initialize(
        fail_max=st.integers(1, 3),
        success_threshold=st.integers(1, 3),
        max_trials=st.integers(1, 3),
    )
    def build(self, fail_max: int, success_threshold: int, max_trials: int) -> None:
        options = CircuitBreakerOptions(
            fail_max=fail_max,
            timeout=TIMEOUT,
            success_threshold=success_threshold,
            half_open_max_calls=max_trials,
            exclude=(NotFound,),
        )
        self.breaker = CircuitBreaker("svc", options)
        self.model = Model(fail_max, success_threshold, max_trials)

        def dependency() -> str:
            exc = _raise_for(self.next_outcome)
            if exc is not None:
                raise exc
            return "ok"

        self.fn = self.mode.chain(
            CircuitBreakerStrategy(self.breaker, shadow=False), self.mode.define(dependency)
        )

    @rule(seconds=st.sampled_from([0.5, 3.0, 9.99, 10.0, 25.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(outcome=OUTCOMES)
    def instant_call(self, outcome: str) -> None:
        now = self.clock.monotonic()
        expected = self.model.admit(now)
        self.next_outcome = outcome
        try:
            result: Any = self.mode.run(self.fn)
        except BaseException as exc:  # the rule inspects it
            result = exc
        if not isinstance(expected, Ticket):
            assert isinstance(result, CircuitOpenError), result
            assert result.retry_after == (None if expected is None else pytest.approx(expected))
            return
        wanted = _raise_for(outcome)
        assert type(result) is (str if wanted is None else type(wanted))
        self.model.finish(expected, outcome, now)

    @rule()
    def start_call(self) -> None:
        now = self.clock.monotonic()
        expected = self.model.admit(now)
        if isinstance(expected, Ticket):
            self.in_flight.append(InFlight(self.breaker.admit(), expected, now))
            return
        with pytest.raises(CircuitOpenError) as rejected:
            self.breaker.admit()
        assert rejected.value.retry_after == (None if expected is None else pytest.approx(expected))

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data(), outcome=OUTCOMES)
    def finish_call(self, data: st.DataObject, outcome: str) -> None:
        call = self.in_flight.pop(data.draw(st.integers(0, len(self.in_flight) - 1)))
        exc = _raise_for(outcome)
        if exc is None:
            self.breaker.on_success(call.token, call.started)
        else:
            self.breaker.on_error(call.token, exc, call.started)
        self.model.finish(call.ticket, outcome, self.clock.monotonic())

    @rule()
    def manual_reset(self) -> None:
        self.breaker.reset()
        self.model.enter("closed", self.clock.monotonic())

    @invariant()
    def agrees_with_the_model(self) -> None:
        if not hasattr(self, "model"):
            return
        snap = self.breaker.snapshot()
        model = self.model
        assert snap["state"] == model.visible_state(self.clock.monotonic())
        assert snap["failures"] == model.failures
        assert snap["successes"] == model.successes
        assert snap["trials_in_flight"] == model.trials
        assert snap["trials_in_flight"] <= model.max_trials
        left = model.seconds_left_open(self.clock.monotonic())
        assert snap["seconds_left_open"] == (None if left is None else pytest.approx(left))


def test_breaker_follows_the_reference_model(mode):
    machine = type(f"BreakerMachine_{mode.name}", (BreakerMachine,), {"mode": mode})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=150,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
