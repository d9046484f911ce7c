"""The pytest plugin, exercised the way users meet it: inside a pytest run (pytester)."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]


def _plugin_args() -> list[str]:
    # Installed (make test): the pytest11 entry point loads the plugin by itself, and loading it a
    # second time by module name would register it twice. From a source tree, name it.
    installed = any(
        ep.value == "buttress.pytest_plugin"
        for ep in importlib.metadata.entry_points(group="pytest11")
    )
    return [] if installed else ["-p", "buttress.pytest_plugin"]


# The inner runs share this process; pytester restores sys.modules after each, so a plugin that
# imports a heavy package late (hypothesis, at the end of every session) pays for it every run.
QUIET = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest")

INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
filterwarnings = error
"""


@pytest.fixture
def run(pytester):
    pytester.makeini(INI)

    def run_tests(source: str, *args: str) -> pytest.RunResult:
        pytester.makepyfile(test_user=source)
        return pytester.runpytest_inprocess(*_plugin_args(), *QUIET, *args)

    return run_tests


def test_the_entry_point_names_the_plugin_module():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["entry-points"]["pytest11"] == {
        "buttress": "buttress.pytest_plugin"
    }


def test_fixtures_are_listed_with_their_docs(run, pytester):
    pytester.makepyfile(test_user="def test_nothing(): pass")
    result = pytester.runpytest_inprocess(*_plugin_args(), *QUIET, "--fixtures")
    out = result.stdout.str()
    for name in (
        "buttress_testing",
        "buttress_clock",
        "buttress_events",
        "buttress_metrics",
        "buttress_circuits",
        "buttress_chaos",
        "buttress_fresh",
    ):
        assert name in out
    assert "A fake clock for the test" in out
    assert "Force circuits into a state" in out


def test_testing_mode_makes_backoff_free_and_ends_with_the_test(run):
    result = run(
        """
        from buttress import _clock, retry_with_backoff

        calls = []

        @retry_with_backoff(max_attempts=4, initial=30, max_delay=60, jitter="none")
        def flaky():
            calls.append(_clock.monotonic())
            if len(calls) < 4:
                raise ConnectionError("down")
            return "ok"

        def test_retries_without_waiting(buttress_testing):
            assert flaky() == "ok"
            assert len(calls) == 4
            assert calls[-1] - calls[0] < 5  # three backoffs of 30 s+ would take 210 s

        def test_real_clock_again_afterwards():
            assert type(_clock.get_clock()).__name__ == "SystemClock"
        """
    )
    result.assert_outcomes(passed=2)


def test_ini_switch_turns_testing_mode_on_for_every_test(run, pytester):
    pytester.makeini(INI + "buttress_testing = true\n")
    result = run(
        """
        from buttress import _clock

        def test_zero_waits():
            assert type(_clock.get_clock()).__name__ == "ZeroWaitClock"
        """
    )
    result.assert_outcomes(passed=1)


def test_fake_clock_drives_an_open_circuit_and_async_backoff(run):
    result = run(
        """
        from buttress import CircuitOpenError, circuit_breaker, retry_with_backoff

        @circuit_breaker(name="billing", fail_max=2, timeout=30)
        def charge():
            raise ConnectionError("billing is down")

        @retry_with_backoff(max_attempts=3, initial=2, jitter="none")
        async def fetch(log):
            log.append(1)
            if len(log) < 3:
                raise ConnectionError("down")
            return "ok"

        def test_open_then_half_open_after_timeout(buttress_clock, buttress_fresh):
            for _ in range(2):
                try:
                    charge()
                except ConnectionError:
                    pass
            try:
                charge()
            except CircuitOpenError as exc:
                assert exc.retry_after == 30
            buttress_clock.advance(30)
            try:
                charge()  # the half-open trial reaches the function again
            except ConnectionError as exc:
                assert str(exc) == "billing is down"

        async def test_async_backoff_is_simulated(buttress_clock):
            log = []
            assert await fetch(log) == "ok"
            assert buttress_clock.sleeps == [2.0, 4.0]
        """
    )
    result.assert_outcomes(passed=2)


def test_events_are_captured_for_the_test(run):
    result = run(
        """
        from buttress import retry_with_backoff
        from buttress.events import RetryExhausted, RetryScheduled

        @retry_with_backoff(name="search", max_attempts=2)
        def search():
            raise TimeoutError("slow")

        def test_retry_events(buttress_events, buttress_testing):
            try:
                search()
            except TimeoutError:
                pass
            assert [e.attempt for e in buttress_events.of(RetryScheduled)] == [1]
            (exhausted,) = buttress_events.of(RetryExhausted)
            assert (exhausted.service, exhausted.attempts) == ("search", 2)
        """
    )
    result.assert_outcomes(passed=1)


def test_metrics_registry_is_fresh_per_test(run):
    result = run(
        """
        import pytest
        from prometheus_client import REGISTRY
        from buttress import with_fallback

        @with_fallback("cached", name="profile")
        def profile():
            raise ConnectionError("down")

        @pytest.mark.parametrize("run", [1, 2])
        def test_counts_only_this_test(buttress_metrics, run):
            labels = {"service": "profile", "outcome": "fallback"}  # answered by the fallback
            before = REGISTRY.get_sample_value("buttress_calls_total", labels)
            assert profile() == "cached"
            assert buttress_metrics.get_sample_value("buttress_calls_total", labels) == 1.0
            assert REGISTRY.get_sample_value("buttress_calls_total", labels) == before
        """
    )
    result.assert_outcomes(passed=2)


def test_circuits_can_be_forced_and_are_reset_after_the_test(run):
    result = run(
        """
        import pytest
        from buttress import CircuitOpenError, circuit_breaker

        @circuit_breaker(name="inventory")
        def stock():
            return 7

        def test_forced_open_rejects(buttress_circuits):
            buttress_circuits.force("inventory", "forced_open")
            assert buttress_circuits.state("inventory") == "forced_open"
            with pytest.raises(CircuitOpenError):
                stock()

        def test_closed_again_in_the_next_test(buttress_circuits):
            assert buttress_circuits.state("inventory") == "closed"
            assert stock() == 7

        def test_unknown_state_is_refused(buttress_circuits):
            with pytest.raises(ValueError, match="unknown circuit state"):
                buttress_circuits.force("inventory", "ajar")
        """
    )
    result.assert_outcomes(passed=3)


def test_chaos_fixture_arms_injection_for_the_test_only(run):
    result = run(
        """
        from buttress import config

        def test_armed(buttress_chaos):
            assert config.get_settings().chaos_enabled is True

        def test_disarmed_afterwards():
            assert config.get_settings().chaos_enabled is False
        """
    )
    result.assert_outcomes(passed=2)


def test_a_failing_user_test_still_fails(run):
    result = run(
        """
        def test_wrong(buttress_testing, buttress_events):
            assert buttress_events == ["something"]
        """
    )
    result.assert_outcomes(failed=1)


def test_fresh_forgets_shared_state_and_remembered_fallbacks(run):
    result = run(
        """
        import pytest
        import buttress
        from buttress import CircuitOpenError, circuit_breaker, with_fallback

        @circuit_breaker(name="ledger", fail_max=1)
        def post(entry):
            raise ConnectionError("ledger is down")

        @with_fallback(0, name="balance")
        def balance():
            raise ConnectionError("down")

        def test_trips_and_degrades(buttress_fresh):
            with pytest.raises(ConnectionError):
                post(1)
            with pytest.raises(CircuitOpenError):
                post(1)
            assert balance() == 0
            assert buttress.health()["status"] == "degraded"

        def test_starts_clean(buttress_fresh):
            assert buttress.health()["status"] == "healthy"
            with pytest.raises(ConnectionError):  # the circuit is closed again: the call runs
                post(1)
        """
    )
    result.assert_outcomes(passed=2)
