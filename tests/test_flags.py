"""Feature flags flipped at runtime: every call site obeys the next call, without re-decorating."""

from __future__ import annotations

import pytest

from buttress import (
    CircuitOpenError,
    ConfigurationError,
    RateLimitedError,
    TimeoutExceededError,
    circuit_breaker,
    config,
    events,
    reload_settings,
    resilient,
    retry_with_backoff,
    with_fallback,
    with_rate_limit,
    with_timeout,
)
from buttress.testing import capture_events


@pytest.fixture
def apply(monkeypatch):
    """Install settings from an explicit environment; the old ones return after the test."""
    monkeypatch.setattr(config, "SNAPSHOT", config.SNAPSHOT)

    def install(**env):
        return reload_settings(env=env)

    install()
    return install


class Dependency:
    """A dependency that fails with a transient error and counts the calls it receives."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *_args, **_kwargs):
        self.calls += 1
        raise ConnectionError("down")


def attempts(mode, fn, dependency):
    """How many times one logical call reached the dependency."""
    before = dependency.calls
    outcome = mode.outcome(fn)
    assert isinstance(outcome, ConnectionError)
    return dependency.calls - before


def retried(mode, name="svc"):
    dependency = Dependency()
    return retry_with_backoff(name=name, max_attempts=3)(mode.define(dependency)), dependency


# --- on and off --------------------------------------------------------------------------


def test_kill_switch_flips_existing_call_sites(mode, clock, apply):
    fn, dependency = retried(mode)
    assert attempts(mode, fn, dependency) == 3
    apply(FF_ENABLE_RESILIENCE_PATTERNS="false")
    assert attempts(mode, fn, dependency) == 1
    apply(FF_ENABLE_RESILIENCE_PATTERNS="true")
    assert attempts(mode, fn, dependency) == 3


def test_buttress_enabled_is_the_same_switch(mode, clock, apply):
    fn, dependency = retried(mode)
    apply(BUTTRESS_ENABLED="0")
    assert attempts(mode, fn, dependency) == 1
    apply()
    assert attempts(mode, fn, dependency) == 3


def test_kill_switch_sends_calls_straight_through_every_pattern(mode, clock, apply):
    dependency = Dependency()
    fn = resilient("svc", circuit_breaker={"fail_max": 1})(mode.define(dependency))
    # The first failure opens the circuit, so the retry is rejected rather than attempted.
    assert isinstance(mode.outcome(fn), CircuitOpenError)
    assert isinstance(mode.outcome(fn), CircuitOpenError)
    assert dependency.calls == 1
    apply(FF_ENABLE_RESILIENCE_PATTERNS="false")
    # The open circuit is bypassed, not consulted, and nothing is retried.
    assert [attempts(mode, fn, dependency) for _ in range(3)] == [1, 1, 1]
    apply()
    assert isinstance(mode.outcome(fn), CircuitOpenError)


def test_service_flag_switches_one_service_only(mode, clock, apply):
    svc, svc_dependency = retried(mode, "svc")
    other, other_dependency = retried(mode, "other")
    apply(BUTTRESS_SERVICES__SVC__ENABLED="false")
    assert attempts(mode, svc, svc_dependency) == 1
    assert attempts(mode, other, other_dependency) == 3
    apply()
    assert attempts(mode, svc, svc_dependency) == 3


def test_pattern_flag_switches_one_pattern_only(mode, clock, apply):
    dependency = Dependency()
    fn = with_fallback("cached", name="svc")(
        retry_with_backoff(max_attempts=3)(mode.define(dependency))
    )
    assert mode.run(fn) == "cached"
    assert dependency.calls == 3
    apply(BUTTRESS_SERVICES__SVC__RETRY__ENABLED="false")
    assert mode.run(fn) == "cached"  # the fallback still acts
    assert dependency.calls == 4
    apply(BUTTRESS_SERVICES__SVC__FALLBACK__ENABLED="false")
    assert isinstance(mode.outcome(fn), ConnectionError)
    assert dependency.calls == 7


def test_pattern_flag_in_defaults_applies_to_every_service(mode, clock, apply):
    svc, svc_dependency = retried(mode, "svc")
    other, other_dependency = retried(mode, "other")
    apply(BUTTRESS_DEFAULTS__RETRY__ENABLED="false")
    assert attempts(mode, svc, svc_dependency) == 1
    assert attempts(mode, other, other_dependency) == 1
    # A service section switches it back on for that service.
    apply(BUTTRESS_DEFAULTS__RETRY__ENABLED="false", BUTTRESS_SERVICES__OTHER__RETRY__ENABLED="1")
    assert attempts(mode, svc, svc_dependency) == 1
    assert attempts(mode, other, other_dependency) == 3


def test_a_failed_reload_leaves_the_flags_as_they_were(mode, clock, apply):
    fn, dependency = retried(mode)
    apply(FF_ENABLE_RESILIENCE_PATTERNS="false")
    with pytest.raises(ConfigurationError):
        reload_settings(env={"FF_ENABLE_RESILIENCE_PATTERNS": "true", "BUTTRESS_TYPO": "1"})
    assert attempts(mode, fn, dependency) == 1


# --- shadow mode: observe, never act -------------------------------------------------------


def shadow_decisions(captured):
    return [(e.service, e.pattern, e.action) for e in captured.of(events.ShadowDecision)]


def test_shadow_breaker_calls_the_function_where_enforce_rejects(mode, clock, apply):
    dependency = Dependency()
    fn = circuit_breaker(name="svc", fail_max=1)(mode.define(dependency))
    assert isinstance(mode.outcome(fn), ConnectionError)
    assert isinstance(mode.outcome(fn), CircuitOpenError)
    assert dependency.calls == 1
    apply(BUTTRESS_SERVICES__SVC__MODE="shadow")
    with capture_events([events.ShadowDecision]) as captured:
        assert isinstance(mode.outcome(fn), ConnectionError)
    assert dependency.calls == 2
    assert shadow_decisions(captured) == [("svc", "circuit_breaker", "reject")]
    apply()
    assert isinstance(mode.outcome(fn), CircuitOpenError)


def test_shadow_retry_records_the_retry_it_did_not_make(mode, clock, apply):
    fn, dependency = retried(mode)
    apply(BUTTRESS_SERVICES__SVC__MODE="shadow")
    with capture_events([events.ShadowDecision]) as captured:
        assert attempts(mode, fn, dependency) == 1
    assert ("svc", "retry", "retry") in shadow_decisions(captured)
    assert clock.sleeps == []


def test_shadow_timeout_lets_a_slow_call_finish(mode, clock, apply):
    fn = with_timeout(name="svc", seconds=1)(mode.define(latency=5))
    assert isinstance(mode.outcome(fn), TimeoutExceededError)
    apply(BUTTRESS_DEFAULTS__MODE="shadow")
    with capture_events([events.ShadowDecision]) as captured:
        assert mode.run(fn) == "ok"
    assert shadow_decisions(captured) == [("svc", "timeout", "timeout")]


def test_shadow_rate_limit_admits_what_enforce_rejects(mode, clock, apply):
    fn = with_rate_limit(name="svc", rate=1, burst=1)(mode.define())
    assert mode.run(fn) == "ok"
    assert isinstance(mode.outcome(fn), RateLimitedError)
    apply(BUTTRESS_SERVICES__SVC__MODE="shadow")
    with capture_events([events.ShadowDecision]) as captured:
        assert [mode.run(fn) for _ in range(3)] == ["ok", "ok", "ok"]
    assert shadow_decisions(captured) == [("svc", "rate_limit", "reject")] * 3


def test_shadow_fallback_lets_the_failure_through(mode, clock, apply):
    dependency = Dependency()
    fn = with_fallback("cached", name="svc")(mode.define(dependency))
    assert mode.run(fn) == "cached"
    apply(BUTTRESS_SERVICES__SVC__MODE="shadow")
    with capture_events([events.ShadowDecision]) as captured:
        assert isinstance(mode.outcome(fn), ConnectionError)
    assert shadow_decisions(captured) == [("svc", "fallback", "fallback")]


# --- rollout -------------------------------------------------------------------------------

CALLS = 10_000


def protected_share(mode, fn, n=CALLS):
    """The fraction of ``n`` calls that got the patterns (answered by the fallback)."""
    if mode.is_async:

        async def many():
            out = []
            for _ in range(n):
                try:
                    out.append(await fn())
                except ConnectionError:
                    out.append(None)
            return out

        results = mode.run(many)
    else:
        results = [mode.outcome(fn) for _ in range(n)]
    return [result == "fallback" for result in results]


@pytest.mark.parametrize("rollout", [0.25, 0.9])
def test_rollout_fraction_over_ten_thousand_seeded_calls(mode, apply, rollout):
    fn = with_fallback("fallback", name="svc")(mode.define(Dependency()))
    apply(BUTTRESS_SERVICES__SVC__ROLLOUT=str(rollout), BUTTRESS_SERVICES__SVC__SEED="7")
    decisions = protected_share(mode, fn)
    # Five standard deviations of a binomial share at n=10,000 is under 0.022.
    assert abs(sum(decisions) / CALLS - rollout) < 0.022
    # The same seed gives the same calls the patterns, after a reload too.
    apply(BUTTRESS_SERVICES__SVC__ROLLOUT=str(rollout), BUTTRESS_SERVICES__SVC__SEED="7")
    assert protected_share(mode, fn) == decisions


def test_rollout_zero_and_one(mode, apply):
    fn = with_fallback("fallback", name="svc")(mode.define(Dependency()))
    apply(BUTTRESS_SERVICES__SVC__ROLLOUT="0")
    assert not any(protected_share(mode, fn, 200))
    apply(BUTTRESS_SERVICES__SVC__ROLLOUT="1")
    assert all(protected_share(mode, fn, 200))


def test_different_seeds_sample_differently():
    def draws(seed):
        settings = config.load_settings(
            {"BUTTRESS_DEFAULTS__ROLLOUT": "0.5", "BUTTRESS_DEFAULTS__SEED": str(seed)}
        )
        sample = config.Snapshot(0, settings).service("svc").sample
        return [sample() for _ in range(64)]

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)
