"""Feature flags flipped at runtime: every call site obeys the next call, without re-decorating."""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path

import pytest

from buttress import (
    CircuitOpenError,
    ConfigurationError,
    RateLimitedError,
    TimeoutExceededError,
    circuit_breaker,
    config,
    events,
    get_settings,
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


def test_services_share_the_all_or_nothing_samplers_across_threads():
    # rollout 1 and 0 (the common cases) are one shared C-level callable each, not one per
    # service: views built by 16 threads at once all answer alike, and as often as asked.
    for rollout, answer in (("1", True), ("0", False)):
        settings = config.load_settings({"BUTTRESS_DEFAULTS__ROLLOUT": rollout})
        snapshot = config.Snapshot(0, settings)
        start = threading.Barrier(16)
        samplers: list[object] = []
        answers: list[bool] = []

        def view(n: int, snapshot=snapshot, start=start, samplers=samplers, answers=answers):
            start.wait()
            sample = snapshot.service(f"svc-{n % 4}").sample
            samplers.append(sample)
            answers.extend(sample() for _ in range(100))

        threads = [threading.Thread(target=view, args=(n,)) for n in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len({id(sample) for sample in samplers}) == 1
        assert answers == [answer] * 1600


# --- the kill switch beats invalid settings ------------------------------------------------


@pytest.fixture
def environment(monkeypatch):
    """``os.environ`` without buttress variables, and no settings loaded yet (a fresh process).

    ``set(**variables)`` sets variables; the next protected call loads settings from them.
    """
    for name in list(os.environ):
        if name.upper().startswith(("BUTTRESS_", "FF_ENABLE_")):
            monkeypatch.delenv(name)
    monkeypatch.delattr(config, "SNAPSHOT", raising=False)

    def set_variables(**variables):
        for name, value in variables.items():
            monkeypatch.setenv(name, value)

    return set_variables


def test_the_admin_token_variable_is_not_a_settings_error(mode, clock, environment):
    # health.asgi_app() reads BUTTRESS_ADMIN_TOKEN; settings must accept it, not fail every call.
    environment(BUTTRESS_ADMIN_TOKEN="a-long-enough-admin-token")
    fn, dependency = retried(mode)
    assert attempts(mode, fn, dependency) == 3
    assert reload_settings(env={"BUTTRESS_ADMIN_TOKEN": "x" * 20}).enabled is True


def test_every_buttress_variable_read_in_the_source_is_recognised():
    # Variables buttress reads that are not settings keys live in one list, OTHER_VARIABLES.
    found = set()
    for path in (Path(__file__).resolve().parents[1] / "src" / "buttress").rglob("*.py"):
        found |= set(re.findall(r"[\"'](BUTTRESS_[A-Z0-9_]*[A-Z0-9])[\"']", path.read_text()))
    assert {"BUTTRESS_ADMIN_TOKEN", "BUTTRESS_CONFIG_FILE"} <= found
    for variable in found - set(config.KILL_SWITCH_VARIABLES):
        assert variable in config.OTHER_VARIABLES, variable
        assert "unknown key" not in str(_problems_of({variable: "x"}))


def _problems_of(env):
    try:
        config.load_settings(env)
    except ConfigurationError as exc:
        return exc.errors
    return ()


@pytest.mark.parametrize(
    ("variable", "meant"),
    [
        ("BUTTRESS_ADMIN_TOKN", "BUTTRESS_ADMIN_TOKEN"),
        ("BUTTRESS_CONFIGFILE", "BUTTRESS_CONFIG_FILE"),
    ],
)
def test_a_misspelled_non_settings_variable_is_still_caught(variable, meant):
    [(path, source, message)] = _problems_of({variable: "x"})
    assert (path, source) == (variable.removeprefix("BUTTRESS_").lower(), f"env {variable}")
    assert f"did you mean the variable {meant}?" in message


BROKEN = {
    "a misspelled variable": {"BUTTRESS_SERVICES__SVC__RETRY__MAX_ATEMPTS": "2"},
    "a bad value": {"BUTTRESS_SERVICES__SVC__RETRY__MAX_ATTEMPTS": "none"},
    "a missing config file": {"BUTTRESS_CONFIG_FILE": "/nonexistent/buttress.toml"},
}


@pytest.mark.parametrize("broken", BROKEN.values(), ids=BROKEN.keys())
@pytest.mark.parametrize("switch", ["FF_ENABLE_RESILIENCE_PATTERNS", "BUTTRESS_ENABLED"])
def test_kill_switch_off_sends_calls_through_invalid_settings(
    mode, clock, environment, caplog, broken, switch
):
    environment(**{switch: "false"}, **broken)
    fn, dependency = retried(mode)
    with caplog.at_level(logging.WARNING, logger="buttress.config"):
        assert [attempts(mode, fn, dependency) for _ in range(3)] == [1, 1, 1]
        assert get_settings().enabled is False
    # Said once, on the load that fell back, with what is wrong.
    [record] = caplog.records
    assert "the kill switch is off" in record.getMessage()
    assert "invalid buttress settings" in record.getMessage()


def test_kill_switch_off_in_the_config_file_beats_the_rest_of_that_file(
    mode, clock, environment, tmp_path
):
    file = tmp_path / "buttress.toml"
    file.write_text("enabled = false\n[services.svc.retry]\nmax_attempts = 'three'\n")
    environment(BUTTRESS_CONFIG_FILE=str(file))
    fn, dependency = retried(mode)
    assert attempts(mode, fn, dependency) == 1
    assert get_settings().source_of(("enabled",)) == f"file {file}"


@pytest.mark.parametrize("switch", [None, "true", "maybe"])
def test_with_the_switch_on_invalid_settings_fail_every_call_naming_path_and_source(
    mode, clock, environment, switch
):
    environment(BUTTRESS_TYPO="1", **({"FF_ENABLE_RESILIENCE_PATTERNS": switch} if switch else {}))
    fn, dependency = retried(mode)
    for _ in range(2):  # every call, not only the first: nothing half-loaded stays behind
        error = mode.outcome(fn)
        assert isinstance(error, ConfigurationError)
        assert (
            "typo",
            "env BUTTRESS_TYPO",
            "unknown key 'typo'; known keys: enabled, defaults, services",
        ) in error.errors
        assert "typo (from env BUTTRESS_TYPO)" in str(error)
    assert dependency.calls == 0


def test_a_reload_that_turns_the_switch_off_takes_effect_despite_invalid_settings(
    mode, clock, apply
):
    fn, dependency = retried(mode)
    with pytest.raises(ConfigurationError, match="typo"):
        reload_settings(env={"FF_ENABLE_RESILIENCE_PATTERNS": "false", "BUTTRESS_TYPO": "1"})
    assert attempts(mode, fn, dependency) == 1
    apply()
    assert attempts(mode, fn, dependency) == 3
