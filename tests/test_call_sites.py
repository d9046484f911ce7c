"""What a call site is when the decorated callable is no plain function.

A ``functools.partial`` is the function it calls: its site (a conflict between code arguments
is told apart, and named, by that function) and, for an unnamed stack, its service.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest

from buttress import ConfigurationError, circuit_breaker, retry_with_backoff
from buttress.testing import capture_events


def send_email(to: str) -> str:
    return f"emailed {to}"


def charge_card(to: str) -> str:
    return f"charged {to}"


async def asend_email(to: str) -> str:
    return f"emailed {to}"


async def acharge_card(to: str) -> str:
    return f"charged {to}"


def test_partials_of_two_functions_that_give_one_argument_two_values_conflict(mode) -> None:
    email, charge = (asend_email, acharge_card) if mode.is_async else (send_email, charge_card)
    protected = circuit_breaker(name="billing", fail_max=5)(functools.partial(email, "ann"))
    assert mode.run(protected) == "emailed ann"

    with pytest.raises(ConfigurationError) as info:
        circuit_breaker(name="billing", fail_max=9)(functools.partial(charge, "bob"))

    message = str(info.value)
    assert f"fail_max=5 at {email.__qualname__} ({__file__}:" in message
    assert f"fail_max=9 at {charge.__qualname__} ({__file__}:" in message


def test_partials_of_one_function_are_one_site(mode) -> None:
    email = asend_email if mode.is_async else send_email
    first = circuit_breaker(name="mailer", fail_max=5)(functools.partial(email, "ann"))
    second = circuit_breaker(name="mailer", fail_max=5)(functools.partial(email, "bob"))
    assert [mode.run(first), mode.run(second)] == ["emailed ann", "emailed bob"]


def test_an_unnamed_partial_is_the_service_of_the_function_it_calls(mode) -> None:
    email = asend_email if mode.is_async else send_email
    protected: Any = retry_with_backoff()(functools.partial(functools.partial(email), "ann"))

    with capture_events() as seen:
        assert mode.run(protected) == "emailed ann"

    assert {event.service for event in seen} == {f"{__name__}.{email.__qualname__}".lower()}


def run_through(mode: Any, policy: Any, fn: Any) -> Any:
    return mode.run(policy.acall, fn) if mode.is_async else policy.call(fn)


def test_two_policies_run_with_call_that_give_one_argument_two_values_conflict(mode) -> None:
    # Policy.call()/acall() decorate one runner of buttress's: the site is the policy.
    first = circuit_breaker(name="runner", fail_max=3)
    assert run_through(mode, first, mode.define()) == "ok"

    with pytest.raises(ConfigurationError) as info:
        run_through(mode, circuit_breaker(name="runner", fail_max=9), mode.define())

    kind = "acall" if mode.is_async else "call"
    message = str(info.value)
    assert f"fail_max=3 at Policy(circuit_breaker(runner, fail_max=3)).{kind}()" in message
    assert f"fail_max=9 at Policy(circuit_breaker(runner, fail_max=9)).{kind}()" in message
    assert "policy.py" not in message


def test_a_policy_run_with_call_and_acall_with_the_same_values_shares_freely(mode) -> None:
    policy = circuit_breaker(name="runner-twice", fail_max=3)
    same = circuit_breaker(name="runner-twice", fail_max=3)
    assert [run_through(mode, p, mode.define()) for p in (policy, same)] == ["ok", "ok"]
    assert policy.call(lambda: "sync") == "sync"


def test_the_wrapper_of_a_partial_is_named_after_the_function_it_calls(mode) -> None:
    email = asend_email if mode.is_async else send_email
    protected: Any = circuit_breaker()(functools.partial(email, "ann"))

    assert (protected.__module__, protected.__name__, protected.__qualname__) == (
        __name__,
        email.__name__,
        email.__qualname__,
    )
    assert mode.run(protected) == "emailed ann"


def test_a_policy_made_per_call_with_a_predicate_is_one_site(mode) -> None:
    # circuit_breaker(..., failure_on_result=lambda ...).call(fn) written inline, once a request:
    # each request's lambda is another object, its policy the same site (never a conflict).
    def handle(value: str) -> Any:
        policy = circuit_breaker(name="inline", fail_max=3, failure_on_result=lambda r: r is None)
        return run_through(mode, policy, mode.define(lambda: value))

    assert [handle(value) for value in ("a", "b", "c")] == ["a", "b", "c"]
    with pytest.raises(ConfigurationError, match=r"fail_max=3, failure_on_result=<function>\)"):
        circuit_breaker(name="inline", fail_max=4).call(lambda: None)
