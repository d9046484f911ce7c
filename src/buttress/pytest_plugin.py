"""pytest fixtures for code that uses buttress (registered through the ``pytest11`` entry point).

Installed with buttress, nothing to configure; every fixture is opt-in by name:

* ``buttress_testing``: testing mode for the test: real time, but backoff and rate-limit waits are
  zero. ``buttress_testing = true`` in the pytest ini turns it on for every test.
* ``buttress_clock``: a :class:`~buttress.testing.FakeClock` for the test; sleeping moves it.
* ``buttress_events``: every event buttress emits during the test, with ``.of(Kind)``.
* ``buttress_metrics``: a fresh Prometheus ``CollectorRegistry`` that receives buttress's
  metrics during the test (read it with ``get_sample_value``).
* ``buttress_circuits``: force a service's circuit into a state; every forced circuit is reset
  when the test ends.
* ``buttress_chaos``: arm fault injection (``FF_ENABLE_CHAOS_INJECTION``) for the test.
* ``buttress_fresh``: forget every shared breaker, bulkhead and rate limiter before and after the
  test, so state never leaks from one test into the next.

See ``docs/testing.md`` for examples.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

import pytest

from buttress import testing
from buttress.testing import CapturedEvents, FakeClock

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = [
    "CircuitControl",
    "buttress_chaos",
    "buttress_circuits",
    "buttress_clock",
    "buttress_events",
    "buttress_fresh",
    "buttress_metrics",
    "buttress_testing",
]

_INI_TESTING: Final = "buttress_testing"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        _INI_TESTING,
        type="bool",
        default=False,
        help="buttress: run every test in testing mode (backoff and rate-limit waits are zero)",
    )


@pytest.fixture(autouse=True)
def _buttress_testing_everywhere(request: pytest.FixtureRequest) -> Iterator[None]:
    # The ini switch; costs one lookup per test when off.
    if request.config.getini(_INI_TESTING):
        with testing.testing_mode():
            yield
    else:
        yield


@pytest.fixture
def buttress_testing() -> Iterator[None]:
    """Testing mode: real time, but every wait buttress chooses itself (backoff, pacing) is zero."""
    with testing.testing_mode():
        yield


@pytest.fixture
def buttress_clock() -> Iterator[FakeClock]:
    """A fake clock for the test: ``sleep`` and ``advance`` move it; nothing waits for real."""
    with testing.fake_clock() as clock:
        yield clock


@pytest.fixture
def buttress_events() -> Iterator[CapturedEvents]:
    """The events buttress emits during the test, in order (``buttress_events.of(Kind)``)."""
    with testing.capture_events() as captured:
        yield captured


@pytest.fixture
def buttress_metrics() -> Iterator[CollectorRegistry]:
    """A fresh ``CollectorRegistry`` that receives buttress's metrics instead of the usual one.

    Read it with ``buttress_metrics.get_sample_value(name, labels)``: it holds only what happened
    during the test. Afterwards metrics go where they went before.
    """
    # Imported here: only tests that ask for metrics pay for the instrumentation.
    from prometheus_client import CollectorRegistry  # noqa: PLC0415

    from buttress import instrumentation  # noqa: PLC0415

    fresh = CollectorRegistry()
    previous = instrumentation.installed().get("prometheus")
    instrumentation.configure(prometheus=fresh)
    try:
        yield fresh
    finally:
        restored = previous if isinstance(previous, CollectorRegistry) else False
        instrumentation.configure(prometheus=restored)


class CircuitControl:
    """Forces circuits into a state for one test (the ``buttress_circuits`` fixture)."""

    def __init__(self) -> None:
        self._forced: set[str] = set()

    def force(self, service: str, state: str) -> None:
        """Put the circuit of ``service`` into ``state``.

        ``state`` is one of ``closed``, ``open`` (open for its ``timeout``, then half-open as
        usual), ``half_open`` (the next calls are trials), ``forced_open`` (rejects until the test
        ends), ``forced_closed`` (admits everything, never trips) or ``disabled`` (calls go
        straight through, nothing is recorded).

        Raises:
            ValueError: an unknown state.
        """
        testing.force_circuit_state(service, state)
        self._forced.add(service)

    def state(self, service: str) -> str:
        """The state of the circuit of ``service`` now."""
        from buttress.registry import breaker  # noqa: PLC0415 - only when used

        return breaker(service).state_label

    def reset_all(self) -> None:
        """Close every circuit this test forced, with fresh counters."""
        for service in sorted(self._forced):
            testing.force_circuit_state(service, "closed")
        self._forced.clear()


@pytest.fixture
def buttress_circuits() -> Iterator[CircuitControl]:
    """Force circuits into a state (``buttress_circuits.force("openfga", "open")``); reset after."""
    control = CircuitControl()
    try:
        yield control
    finally:
        control.reset_all()


@pytest.fixture
def buttress_chaos() -> Iterator[None]:
    """Arm fault injection for the test; services still choose what to inject (``chaos``)."""
    from buttress import config  # noqa: PLC0415 - keep the plugin's import light
    from buttress.patterns.chaos import KILL_SWITCH  # noqa: PLC0415

    # Its own MonkeyPatch: undoing the test's would also undo the test's own patches.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(KILL_SWITCH, "true")
        config.reload_settings()
        try:
            yield
        finally:
            patch.undo()
            config.reload_settings()


@pytest.fixture
def buttress_fresh() -> Iterator[None]:
    """No shared breaker, bulkhead or rate limiter survives from before the test, or after it.

    Health also forgets the fallbacks it remembered, so ``buttress.health()`` starts healthy.
    """
    testing.reset()
    try:
        yield
    finally:
        testing.reset()
