"""``registry.breaker(name)`` asked before a call site of ``name`` was decorated.

The breaker is built then, from the settings and the code arguments claimed so far. A decorator
that gives ``name`` code arguments afterwards applies them to that same breaker the next time
``breaker(name)`` is asked, not only at its own first call: manual control and pybreaker's
``call``/``acall`` on it follow the decorator's settings.
"""

from __future__ import annotations

import pytest

from buttress import CircuitOpenError, circuit_breaker, registry


def test_a_decorators_code_arguments_apply_to_a_breaker_built_before_it(mode) -> None:
    early = registry.breaker("early")
    assert early.fail_max == 5  # the default: nothing claimed yet

    @circuit_breaker(name="early", fail_max=2, timeout=30)
    def decorated() -> str:
        return "never called here"

    breaker = registry.breaker("early")
    assert breaker is early  # the same breaker, reconfigured in place
    assert (breaker.fail_max, breaker.reset_timeout) == (2, 30)

    def down() -> None:
        raise ConnectionError("down")

    failing = mode.define(down)
    run = breaker.acall if mode.is_async else breaker.call
    for _ in range(2):
        assert isinstance(mode.outcome(run, failing), ConnectionError)
    with pytest.raises(CircuitOpenError):
        mode.run(run, failing)


def test_a_breaker_built_after_the_decoration_has_its_arguments_at_once() -> None:
    @circuit_breaker(name="late", fail_max=3)
    def decorated() -> str:
        return "ok"

    assert registry.breaker("late").fail_max == 3
    assert registry._unapplied == set()
