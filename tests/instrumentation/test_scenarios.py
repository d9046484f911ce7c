"""Every family of the catalog is produced by real scenarios through the public decorators."""

from __future__ import annotations

import pytest

from buttress import config
from buttress.instrumentation.prometheus import CATALOG


@pytest.fixture
def scenario_run(metrics, mode, clock, scenarios):
    try:
        scenarios.run_all(mode, clock)
        yield metrics  # still under the scenario settings: flags are read when scraped
    finally:
        config.reload_settings()


def produced(metrics, family) -> bool:
    if family.kind == "counter":
        return sum(metrics.samples(family.name).values()) > 0
    if family.kind == "histogram":
        return sum(metrics.samples(f"{family.name}_count").values()) > 0
    return bool(metrics.samples(family.name))


def test_every_family_is_produced(scenario_run):
    missing = [f.name for f in CATALOG if not produced(scenario_run, f)]
    assert missing == []
    # Every family comes from a real call, the state store's errors included.
    store_errors = scenario_run.samples("buttress_circuit_breaker_state_store_errors_total")
    assert store_errors == {
        (("error_type", "ConnectionError"), ("operation", "admit"), ("service", "inventory")): 1
    }


def test_the_circuit_lifecycle_in_numbers(scenario_run):
    m = scenario_run
    transitions = {
        dict(labels)["state"]: value
        for labels, value in m.samples("buttress_circuit_breaker_transitions_total").items()
        if dict(labels)["service"] == "openfga"
    }
    assert transitions == {"open": 1, "half_open": 1, "closed": 1}
    assert m.value("buttress_circuit_breaker_recovery_seconds_count", service="openfga") == 1
    assert m.value("buttress_circuit_breaker_recovery_seconds_sum", service="openfga") == 30
    assert m.value("buttress_circuit_breaker_rejected_total", service="openfga", reason="open") == 1
    assert m.value("buttress_circuit_breaker_trials_total", service="openfga") == 1
    ignored = m.value(
        "buttress_circuit_breaker_ignored_total", service="openfga", error_type="KeyError"
    )
    assert ignored == 1
    assert m.value("buttress_circuit_breaker_state", service="openfga", state="closed") == 1
    assert m.value("buttress_calls_total", service="openfga", outcome="rejected") == 1
    assert m.value("buttress_circuit_breaker_slow_calls_total", service="ledger") == 1
    assert m.value("buttress_circuit_breaker_failure_rate", service="ledger") == 0.5
    assert m.value("buttress_circuit_breaker_slow_call_rate", service="ledger") == 0.5


def test_retries_timeouts_and_waits_in_numbers(scenario_run):
    m = scenario_run
    assert m.value("buttress_retry_attempts_total", service="llm", attempt_number="2") == 2
    assert m.value("buttress_retry_attempts_total", service="llm", attempt_number="3") == 2
    assert m.value("buttress_retry_succeeded_total", service="llm") == 1
    exhausted = m.samples("buttress_retry_exhausted_total")
    assert exhausted == {
        (("error_type", "TimeoutError"), ("reason", "max_attempts"), ("service", "llm")): 1,
        (("error_type", "ConnectionError"), ("reason", "budget"), ("service", "outage")): 1,
    }
    assert m.value("buttress_timeout_exceeded_total", service="search") == 2
    assert m.value("buttress_timeout_abandoned_total", service="search") == 1
    assert m.value("buttress_timeout_abandoned_workers", service="search") == 0
    assert m.value("buttress_timeout_overrun_seconds_sum", service="search") == 5
    assert m.value("buttress_bulkhead_queued_total", service="db") == 1
    assert m.value("buttress_bulkhead_queue_wait_seconds_sum", service="db") == 0.5
    assert m.value("buttress_bulkhead_rejected_total", service="db", reason="full") == 1
    assert m.value("buttress_bulkhead_limit", service="db") == 1
    assert m.value("buttress_rate_limit_waits_total", service="search") == 1
    assert m.value("buttress_rate_limit_wait_seconds_sum", service="search") == pytest.approx(1)
    assert m.value("buttress_rate_limit_rejected_total", service="quota", reason="no_tokens") == 1


def test_fallbacks_shadow_chaos_and_settings_in_numbers(scenario_run):
    m = scenario_run
    assert m.value("buttress_fallback_used_total", service="prices", source="value") == 1
    failed = m.value(
        "buttress_fallback_failed_total", service="prices", error_type="ConnectionError"
    )
    assert failed == 1
    shadow = m.value(
        "buttress_shadow_decisions_total",
        service="shadowed",
        pattern="circuit_breaker",
        action="reject",
    )
    assert shadow == 1
    assert m.value("buttress_flag_shadow_mode", service="shadowed") == 1
    assert m.value("buttress_chaos_injections_total", service="flaky", kind="exception") == 1
    assert m.value("buttress_config_reloads_total", outcome="success") == 1
    assert m.value("buttress_config_reloads_total", outcome="failure") == 1


def test_the_overload_controls_in_numbers(scenario_run):
    m = scenario_run
    assert m.value("buttress_retry_budget_exhausted_total", service="outage", kind="retry") == 1
    assert m.value("buttress_retry_attempts_total", service="outage", attempt_number="2") is None
    assert m.value("buttress_hedging_hedges_total", service="replica") == 1
    assert m.value("buttress_hedging_calls_total", service="replica", kind="hedge") == 1
    assert m.value("buttress_calls_total", service="replica", outcome="success") == 1
    refused = m.value(
        "buttress_adaptive_throttle_rejected_total", service="overloaded", reason="throttled"
    )
    assert refused > 0
    assert m.value("buttress_calls_total", service="overloaded", outcome="rejected") == refused
    assert m.value("buttress_bulkhead_limit", service="pool") == 2  # AIMD: one window, one more
