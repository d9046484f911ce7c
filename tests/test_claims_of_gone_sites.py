"""Code arguments claimed by call sites whose stacks no longer exist.

A test suite decorates inside each test (``@circuit_breaker(name="svc", fail_max=N)`` with
another ``N`` per test, as pybreaker's users make a breaker per test), at the test's own line or
through a helper (one site for every test):

* a helper's site decorated again with another value, once its earlier stacks are gone, takes the
  new value (it was ignored: the breaker kept the first test's);
* another site's value still conflicts, unless ``buttress.testing.reset()`` (the
  ``buttress_fresh`` fixture) ran in between: it forgets the arguments of functions that no
  longer exist, and keeps those of the code under test.
"""

from __future__ import annotations

import gc
from typing import Any

import pytest

from buttress import ConfigurationError, circuit_breaker, registry, testing, with_bulkhead


def as_mode(mode: Any, body: Any) -> Any:
    """``body`` itself in sync mode; in async mode an ``async def`` of its own site."""
    if not mode.is_async:
        return body

    async def run() -> Any:
        return body()

    return run


def test_a_helper_decorating_again_once_its_stacks_are_gone_takes_the_new_value(mode) -> None:
    def make(fail_max: int) -> Any:  # one site, used by one test after another
        return circuit_breaker(name="again", fail_max=fail_max)(mode.define())

    first = make(1)
    assert mode.run(first) == "ok"
    assert registry.breaker("again").fail_max == 1
    del first
    gc.collect()

    second = make(3)

    assert mode.run(second) == "ok"
    assert registry.breaker("again").fail_max == 3


def test_a_helper_decorating_again_while_its_first_stack_exists_keeps_the_first_value(
    mode,
) -> None:
    # A function decorated per request: the first value holds while a stack runs with it.
    def make(fail_max: int) -> Any:
        return circuit_breaker(name="again", fail_max=fail_max)(mode.define())

    first = make(1)
    second = make(3)
    assert [mode.run(first), mode.run(second)] == ["ok", "ok"]
    assert registry.breaker("again").fail_max == 1


def test_another_sites_value_conflicts_even_once_the_first_is_gone(mode) -> None:
    circuit_breaker(name="again", fail_max=1)(mode.define())  # not kept: gone at once

    def body() -> str:
        return "second"

    with pytest.raises(ConfigurationError, match=r"fail_max=1 at .*fail_max=3 at"):
        circuit_breaker(name="again", fail_max=3)(as_mode(mode, body))


def test_after_a_reset_another_site_gives_the_gone_sites_service_other_values(mode) -> None:
    first = circuit_breaker(name="again", fail_max=1)(mode.define())
    assert mode.run(first) == "ok"
    del first
    testing.reset()  # between two tests

    def body() -> str:
        return "second"

    second = circuit_breaker(name="again", fail_max=3)(as_mode(mode, body))

    assert mode.run(second) == "second"
    assert registry.breaker("again").fail_max == 3


def test_a_reset_keeps_the_arguments_of_functions_that_exist(mode) -> None:
    under_test = circuit_breaker(name="again", fail_max=1)(mode.define())
    kept = with_bulkhead(name="again", limit=2)(mode.define())
    gone = with_bulkhead(name="gone", limit=2)(mode.define())
    del gone
    testing.reset()

    assert registry.code_args("circuit_breaker", "again") == {"fail_max": 1}
    assert registry.code_args("bulkhead", "again") == {"limit": 2}
    assert registry.code_args("bulkhead", "gone") == {}

    def body() -> str:
        return "second"

    with pytest.raises(ConfigurationError, match=r"fail_max=1 at .*fail_max=3 at"):
        circuit_breaker(name="again", fail_max=3)(as_mode(mode, body))
    assert [mode.run(under_test), mode.run(kept)] == ["ok", "ok"]
    assert registry.breaker("again").fail_max == 1


def test_a_predicate_made_anew_at_each_decoration_is_not_a_new_value(mode) -> None:
    # A function decorated per request with a lambda: each request's lambda is another object,
    # not another setting; taking it would reconfigure the shared breaker on every request.
    predicates = []

    def handle() -> Any:
        predicate = lambda result: result is None  # noqa: E731 - one per request, as written inline
        predicates.append(predicate)
        return circuit_breaker(name="again", failure_on_result=predicate)(mode.define())

    for _ in range(3):
        assert mode.run(handle()) == "ok"
        gc.collect()

    assert registry.code_args("circuit_breaker", "again")["failure_on_result"] is predicates[0]


def test_a_policy_run_with_call_in_one_test_leaves_the_next_free_after_a_reset(mode) -> None:
    # pybreaker's tests make a breaker per test and call it; translated: a policy per test,
    # run with call()/acall(). Dropped, the policy and its runner go at once (no cycle for a
    # garbage collection to find), so a reset forgets what it claimed.
    gc.disable()
    try:
        first = circuit_breaker(name="again", fail_max=1)
        assert run_through(mode, first, mode.define()) == "ok"
        del first
        testing.reset()

        second = circuit_breaker(name="again", fail_max=3)
        assert run_through(mode, second, mode.define()) == "ok"
        assert registry.breaker("again").fail_max == 3
    finally:
        gc.enable()


def run_through(mode: Any, policy: Any, fn: Any) -> Any:
    return mode.run(policy.acall, fn) if mode.is_async else policy.call(fn)
