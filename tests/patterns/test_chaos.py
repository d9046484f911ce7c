"""Chaos: injected exceptions, latency and wrong results at a rate; off by default, kill switch."""

from __future__ import annotations

import pytest

from buttress import (
    CircuitOpenError,
    circuit_breaker,
    config,
    events,
    instrumentation,
    resilient,
    retry_with_backoff,
    with_chaos,
)
from buttress.exceptions import ConfigurationError
from buttress.patterns import chaos
from buttress.patterns._base import BuildContext
from buttress.patterns.chaos import ChaosOptions, InjectedConnectionError
from buttress.testing import capture_events


@pytest.fixture
def armed(monkeypatch):
    """The process-wide kill switch on, for this test only."""
    monkeypatch.setenv(chaos.KILL_SWITCH, "true")
    config.reload_settings()
    yield
    monkeypatch.delenv(chaos.KILL_SWITCH)
    config.reload_settings()


def built(mode_name="enforce", service="upstream", **options):
    ctx = BuildContext(
        service=service,
        options=ChaosOptions(enabled=True, **options),
        key=service,
        mode=mode_name,
        armed=config.get_settings().chaos_enabled,  # as a compiling policy reads it
    )
    return chaos.build(ctx)


def counting(mode, result="real"):
    calls = []

    def body():
        calls.append(1)
        return result

    return mode.define(body), calls


def test_options_are_off_by_default():
    options = ChaosOptions()
    assert options.enabled is False
    assert (options.exception_rate, options.latency_rate, options.result_rate) == (0.0, 0.0, 0.0)
    assert options.exception is InjectedConnectionError
    assert issubclass(InjectedConnectionError, ConnectionError)
    assert ChaosOptions.code_only == {"exception", "result"}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("exception_rate", 1.5),
        ("latency_rate", -0.1),
        ("result_rate", 2),
        ("latency_seconds", 0),
        ("exception", KeyboardInterrupt),
        ("exception", "ConnectionError"),
        ("surprise", 1),
    ],
)
def test_invalid_options_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        ChaosOptions(**{field: value})


def test_nothing_is_built_unless_enabled_armed_and_some_rate_is_set(armed, monkeypatch):
    assert built(exception_rate=1.0) is not None
    assert built() is None  # enabled, but no fault has a rate
    disabled = BuildContext("upstream", ChaosOptions(exception_rate=1.0), "upstream")
    assert chaos.build(disabled) is None
    monkeypatch.setenv(chaos.KILL_SWITCH, "false")
    config.reload_settings()
    assert config.get_settings().chaos_enabled is False
    assert built(exception_rate=1.0) is None


def test_kill_switch_is_off_when_unset(monkeypatch):
    monkeypatch.delenv(chaos.KILL_SWITCH, raising=False)
    config.reload_settings()
    assert config.get_settings().chaos_enabled is False
    assert built(exception_rate=1.0, latency_rate=1.0, result_rate=1.0) is None


def test_kill_switch_rejects_a_value_that_is_not_a_boolean(monkeypatch):
    monkeypatch.setenv(chaos.KILL_SWITCH, "sometimes")
    with pytest.raises(ConfigurationError, match=chaos.KILL_SWITCH):
        config.reload_settings()
    monkeypatch.delenv(chaos.KILL_SWITCH)
    config.reload_settings()


def test_injected_exception_replaces_the_call(mode, armed):
    fn, calls = counting(mode)
    wrapped = mode.chain(built(exception_rate=1.0), fn)
    with capture_events([events.ChaosInjected]) as seen:
        outcome = mode.outcome(wrapped)
    assert isinstance(outcome, InjectedConnectionError)
    assert "upstream" in str(outcome)
    assert calls == []
    assert seen == [events.ChaosInjected("upstream", "exception")]


def test_exception_factory_and_class_are_both_accepted(mode, armed):
    class Unavailable(Exception):
        def __init__(self, status: int) -> None:
            super().__init__(f"status {status}")
            self.status = status

    fn, _ = counting(mode)
    from_factory = mode.chain(built(exception_rate=1.0, exception=lambda: Unavailable(503)), fn)
    outcome = mode.outcome(from_factory)
    assert isinstance(outcome, Unavailable)
    assert outcome.status == 503
    from_class = mode.chain(built(exception_rate=1.0, exception=TimeoutError), fn)
    assert isinstance(mode.outcome(from_class), TimeoutError)


def test_a_factory_that_returns_no_exception_is_a_type_error(mode, armed):
    fn, _ = counting(mode)
    wrapped = mode.chain(built(exception_rate=1.0, exception=lambda: "not an exception"), fn)
    outcome = mode.outcome(wrapped)
    assert isinstance(outcome, TypeError)
    assert "not an Exception" in str(outcome)


def test_injected_latency_waits_on_the_buttress_clock_then_calls(mode, armed, clock):
    fn, calls = counting(mode)
    wrapped = mode.chain(built(latency_rate=1.0, latency_seconds=2.5), fn)
    started = clock.monotonic()
    with capture_events([events.ChaosInjected]) as seen:
        assert mode.run(wrapped) == "real"
    assert clock.monotonic() - started == 2.5
    assert clock.sleeps == [2.5]
    assert calls == [1]
    assert seen.of(events.ChaosInjected) == [events.ChaosInjected("upstream", "latency")]


def test_injected_result_replaces_the_call(mode, armed):
    fn, calls = counting(mode)
    wrapped = mode.chain(built(result_rate=1.0, result={"allowed": True}), fn)
    with capture_events([events.ChaosInjected]) as seen:
        assert mode.run(wrapped) == {"allowed": True}
    assert calls == []
    assert [e.kind for e in seen] == ["result"]


def test_an_exception_wins_over_a_result_and_latency_comes_first(mode, armed, clock):
    fn, calls = counting(mode)
    wrapped = mode.chain(
        built(exception_rate=1.0, result_rate=1.0, latency_rate=1.0, latency_seconds=1.0), fn
    )
    with capture_events([events.ChaosInjected]) as seen:
        assert isinstance(mode.outcome(wrapped), InjectedConnectionError)
    assert [e.kind for e in seen] == ["latency", "exception"]
    assert calls == []
    assert clock.sleeps == [1.0]


def test_rates_are_fractions_of_calls_and_a_seed_repeats_them(mode, armed):
    def run_many(seed):
        fn, calls = counting(mode)
        wrapped = mode.chain(built(exception_rate=0.25, seed=seed), fn)
        return [
            isinstance(mode.outcome(wrapped), InjectedConnectionError) for _ in range(2000)
        ], calls

    first, calls = run_many(seed=7)
    again, _ = run_many(seed=7)
    other, _ = run_many(seed=8)
    assert first == again
    assert first != other
    assert 0.21 < sum(first) / len(first) < 0.29
    assert len(calls) == len(first) - sum(first)


def test_shadow_mode_injects_nothing_and_says_what_it_would_have_done(mode, armed, clock):
    fn, calls = counting(mode)
    wrapped = mode.chain(built("shadow", exception_rate=1.0, latency_rate=1.0), fn)
    with capture_events() as seen:
        assert mode.run(wrapped) == "real"
    assert calls == [1]
    assert clock.sleeps == []
    assert seen.of(events.ChaosInjected) == []
    assert seen.of(events.ShadowDecision) == [
        events.ShadowDecision("upstream", "chaos", "latency"),
        events.ShadowDecision("upstream", "chaos", "exception"),
    ]


@pytest.fixture
def no_subscribers():
    """The default subscribers (metrics, traces, logs) off for the test, then as they were."""
    before = instrumentation.installed()
    instrumentation.configure(prometheus=False, otel=False, logging=False)
    yield
    instrumentation.configure(
        **{name: before.get(name, False) for name in ("prometheus", "otel", "logging")}
    )


def test_no_event_is_built_without_a_subscriber(mode, armed, no_subscribers):
    fn, _ = counting(mode)
    wrapped = mode.chain(built(result_rate=1.0, result="wrong"), fn)
    assert events.ROUTES.get(events.ChaosInjected) is None
    assert mode.run(wrapped) == "wrong"


def test_callers_exceptions_pass_through_unchanged(mode, armed):
    class Mine(Exception):
        pass

    def body():
        raise Mine("mine")

    wrapped = mode.chain(built(result_rate=0.5, result="wrong", seed=1), mode.define(body))
    outcomes = [mode.outcome(wrapped) for _ in range(40)]
    assert {type(o) for o in outcomes} == {Mine, str}
    assert {str(o) for o in outcomes} == {"mine", "wrong"}


# --- through a Policy, with settings ---------------------------------------------------------


def chaos_policy(service="payments", **code_args):
    return with_chaos(name=service, **code_args)


def test_settings_turn_chaos_on_for_a_service(mode, armed, monkeypatch):
    fn, calls = counting(mode)
    decorated = chaos_policy(result_rate=1.0, result="from chaos")(fn)
    assert mode.run(decorated) == "real"  # enabled defaults to false
    monkeypatch.setenv("BUTTRESS_SERVICES__PAYMENTS__CHAOS__ENABLED", "true")
    config.reload_settings()
    assert mode.run(decorated) == "from chaos"
    assert calls == [1]


def test_settings_rates_override_code_and_code_only_keys_stay_in_code(mode, armed, monkeypatch):
    fn, _ = counting(mode)
    decorated = chaos_policy(enabled=True, exception_rate=1.0, exception=TimeoutError)(fn)
    assert isinstance(mode.outcome(decorated), TimeoutError)
    monkeypatch.setenv("BUTTRESS_SERVICES__PAYMENTS__CHAOS__EXCEPTION_RATE", "0")
    config.reload_settings()
    assert mode.run(decorated) == "real"
    monkeypatch.setenv("BUTTRESS_SERVICES__PAYMENTS__CHAOS__EXCEPTION", "ValueError")
    with pytest.raises(ConfigurationError, match="only be given in code"):
        config.reload_settings()
    monkeypatch.delenv("BUTTRESS_SERVICES__PAYMENTS__CHAOS__EXCEPTION")


def test_disarming_and_reloading_stops_every_injection(mode, armed, monkeypatch):
    fn, calls = counting(mode)
    decorated = chaos_policy(enabled=True, exception_rate=1.0)(fn)
    assert isinstance(mode.outcome(decorated), InjectedConnectionError)
    monkeypatch.setenv(chaos.KILL_SWITCH, "false")
    config.reload_settings()
    assert mode.run(decorated) == "real"
    assert calls == [1]


def test_injected_faults_are_retried_and_trip_the_breaker_like_real_ones(mode, armed, clock):
    fn, calls = counting(mode)
    stacked = retry_with_backoff(name="payments", max_attempts=3, jitter="none")(
        circuit_breaker(name="payments", fail_max=3)(
            with_chaos(enabled=True, exception_rate=1.0)(fn)
        )
    )
    with capture_events() as seen:
        first = mode.outcome(stacked)
        second = mode.outcome(stacked)
    assert isinstance(first, InjectedConnectionError)
    assert isinstance(second, CircuitOpenError)
    assert calls == []
    assert len(seen.of(events.ChaosInjected)) == 3
    assert [e.attempt for e in seen.of(events.RetryScheduled)] == [1, 2]
    assert [e.new_state for e in seen.of(events.CircuitStateChanged)] == ["open"]


def test_resilient_carries_chaos_innermost_and_inactive_until_enabled(mode, armed, monkeypatch):
    fn, calls = counting(mode)
    decorated = resilient("ledger", fallback={"value": "fallback"})(fn)
    assert [s.pattern for s in decorated.__buttress_policy__.specs][-1] == "chaos"
    assert mode.run(decorated) == "real"
    monkeypatch.setenv("BUTTRESS_SERVICES__LEDGER__CHAOS__ENABLED", "true")
    monkeypatch.setenv("BUTTRESS_SERVICES__LEDGER__CHAOS__EXCEPTION_RATE", "1")
    monkeypatch.setenv("BUTTRESS_SERVICES__LEDGER__RETRY__MAX_ATTEMPTS", "1")
    config.reload_settings()
    with capture_events([events.FallbackUsed]) as seen:
        assert mode.run(decorated) == "fallback"
    assert seen == [events.FallbackUsed("ledger", "value", "InjectedConnectionError")]
    assert calls == [1]
    for name in ("ENABLED", "EXCEPTION_RATE"):
        monkeypatch.delenv(f"BUTTRESS_SERVICES__LEDGER__CHAOS__{name}")
    monkeypatch.delenv("BUTTRESS_SERVICES__LEDGER__RETRY__MAX_ATTEMPTS")
