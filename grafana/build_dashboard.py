"""Writes ``buttress-dashboard.json`` (``python grafana/build_dashboard.py``).

The dashboard is data: the rows and panels below, each with its PromQL. Every query selects
``job=~"$job"`` and, where the family has a ``service`` label, ``service=~"$service"``; the tests
check each metric name against the catalog (``buttress.instrumentation.prometheus.CATALOG``) and
run every query against a real Prometheus that scraped real buttress metrics.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("buttress-dashboard.json")
DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
RATE = "$__rate_interval"

# Label matchers added to every selector: job always, service where the family has it.
_SELECTOR = re.compile(r"(buttress_[a-z_]+)(\{([^}]*)\})?")
_UNLABELLED = {
    "buttress_health_degradation_level",
    "buttress_config_generation",
    "buttress_config_reloads_total",
    "buttress_flag_enabled",
}


def q(expr: str) -> str:
    """``expr`` with the dashboard's variables added to every buttress selector."""

    def add(match: re.Match[str]) -> str:
        name, inner = match.group(1), match.group(3)
        family = re.sub(r"_(bucket|count|sum)$", "", name)
        matchers = ['job=~"$job"']
        if family not in _UNLABELLED:
            matchers.append('service=~"$service"')
        if inner:
            matchers.append(inner)
        return f"{name}{{{', '.join(matchers)}}}"

    return _SELECTOR.sub(add, expr)


def rate(metric: str, by: str, extra: str = "") -> str:
    selector = f"{metric}{{{extra}}}" if extra else metric
    return q(f"sum by ({by}) (rate({selector}[{RATE}]))")


def quantile(metric: str, phi: float, by: str = "service") -> str:
    return q(f"histogram_quantile({phi}, sum by ({by}, le) (rate({metric}_bucket[{RATE}])))")


def target(expr: str, legend: str, ref: str = "A", *, instant: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "datasource": DS,
        "expr": expr,
        "legendFormat": legend,
        "refId": ref,
    }
    if instant:
        out["instant"] = True
        out["format"] = "table"
    return out


def targets(*pairs: tuple[str, str], instant: bool = False) -> list[dict[str, Any]]:
    return [
        target(expr, legend, chr(ord("A") + i), instant=instant)
        for i, (expr, legend) in enumerate(pairs)
    ]


def panel(
    title: str,
    kind: str,
    queries: list[dict[str, Any]],
    *,
    unit: str = "short",
    description: str = "",
    width: int = 8,
    height: int = 8,
) -> dict[str, Any]:
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": queries,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
        "_size": (width, height),
    }


def timeseries(
    title: str, *pairs: tuple[str, str], unit: str = "short", **kw: Any
) -> dict[str, Any]:
    return panel(title, "timeseries", targets(*pairs), unit=unit, **kw)


def stat(title: str, expr: str, *, unit: str = "short", description: str = "") -> dict[str, Any]:
    return panel(
        title, "stat", targets((expr, title)), unit=unit, description=description, width=4, height=4
    )


ROWS: list[tuple[str, list[dict[str, Any]]]] = [
    (
        "Overview",
        [
            stat("Calls / s", q(f"sum(rate(buttress_calls_total[{RATE}]))"), unit="reqps"),
            stat(
                "Success ratio",
                q(
                    f'sum(rate(buttress_calls_total{{outcome="success"}}[{RATE}])) '
                    f"/ sum(rate(buttress_calls_total[{RATE}]))"
                ),
                unit="percentunit",
            ),
            stat(
                "Circuits not closed",
                q('sum(buttress_circuit_breaker_state{state=~"open|half_open|forced_open"})'),
                description="Circuits (per process) that are open, half-open or forced open.",
            ),
            stat(
                "Degradation level",
                q("max(buttress_health_degradation_level)"),
                description="0 normal ... 4 critical (see docs/observability.md).",
            ),
            stat(
                "Patterns enabled",
                q("min(buttress_flag_enabled)"),
                description="0 while FF_ENABLE_RESILIENCE_PATTERNS switches every pattern off.",
            ),
            stat("Settings generation", q("max(buttress_config_generation)")),
            timeseries(
                "Calls by outcome",
                (rate("buttress_calls_total", "service, outcome"), "{{service}} {{outcome}}"),
                unit="reqps",
                width=12,
            ),
            timeseries(
                "Call duration p50 / p99",
                (quantile("buttress_call_duration_seconds", 0.5), "{{service}} p50"),
                (quantile("buttress_call_duration_seconds", 0.99), "{{service}} p99"),
                unit="s",
                width=12,
            ),
            panel(
                "Service flags",
                "table",
                targets(
                    (q("max by (service) (buttress_flag_service_enabled)"), "enabled"),
                    (q("max by (service) (buttress_flag_shadow_mode)"), "shadow"),
                    (q("max by (service) (buttress_flag_rollout_ratio)"), "rollout"),
                    instant=True,
                ),
                description="Per service: patterns enabled, shadow mode, rollout fraction.",
            ),
            timeseries(
                "Settings reloads",
                (
                    q(f"sum by (outcome) (increase(buttress_config_reloads_total[{RATE}]))"),
                    "{{outcome}}",
                ),
            ),
            timeseries(
                "Shadow decisions / s",
                (
                    rate("buttress_shadow_decisions_total", "service, pattern, action"),
                    "{{service}} {{pattern}} would {{action}}",
                ),
                unit="reqps",
                description="What patterns in shadow mode would have done, and did not.",
            ),
            timeseries(
                "Chaos injections / s",
                (rate("buttress_chaos_injections_total", "service, kind"), "{{service}} {{kind}}"),
                unit="reqps",
            ),
        ],
    ),
    (
        "Circuit breakers",
        [
            timeseries(
                "Circuit state",
                (
                    q("max by (service, state) (buttress_circuit_breaker_state)"),
                    "{{service}} {{state}}",
                ),
                description="1 for the state each circuit is in (summed over processes).",
            ),
            timeseries(
                "Transitions",
                (
                    q(
                        "sum by (service, state, reason) "
                        f"(increase(buttress_circuit_breaker_transitions_total[{RATE}]))"
                    ),
                    "{{service}} to {{state}} ({{reason}})",
                ),
            ),
            timeseries(
                "Short-circuited calls / s",
                (
                    rate("buttress_circuit_breaker_rejected_total", "service, reason"),
                    "{{service}} {{reason}}",
                ),
                unit="reqps",
            ),
            timeseries(
                "Recorded outcomes / s",
                (
                    rate("buttress_circuit_breaker_successes_total", "service"),
                    "{{service}} success",
                ),
                (rate("buttress_circuit_breaker_failures_total", "service"), "{{service}} failure"),
                (rate("buttress_circuit_breaker_ignored_total", "service"), "{{service}} ignored"),
                unit="reqps",
            ),
            timeseries(
                "Failures by error type / s",
                (
                    rate("buttress_circuit_breaker_failures_total", "service, error_type"),
                    "{{service}} {{error_type}}",
                ),
                unit="reqps",
            ),
            timeseries(
                "Failure rate and slow-call rate (window)",
                (
                    q("max by (service) (buttress_circuit_breaker_failure_rate)"),
                    "{{service}} failures",
                ),
                (
                    q("max by (service) (buttress_circuit_breaker_slow_call_rate)"),
                    "{{service}} slow",
                ),
                unit="percentunit",
            ),
            timeseries(
                "Slow calls / s",
                (rate("buttress_circuit_breaker_slow_calls_total", "service"), "{{service}}"),
                unit="reqps",
            ),
            timeseries(
                "Half-open trials / s",
                (rate("buttress_circuit_breaker_trials_total", "service"), "{{service}}"),
                unit="reqps",
            ),
            timeseries(
                "Time from open to closed p50 / p95",
                (quantile("buttress_circuit_breaker_recovery_seconds", 0.5), "{{service}} p50"),
                (quantile("buttress_circuit_breaker_recovery_seconds", 0.95), "{{service}} p95"),
                unit="s",
            ),
            timeseries(
                "Shared state store errors / s",
                (
                    rate(
                        "buttress_circuit_breaker_state_store_errors_total",
                        "service, operation, error_type",
                    ),
                    "{{service}} {{operation}} {{error_type}}",
                ),
                unit="reqps",
                description="Redis failures; the breaker went on with local state.",
            ),
        ],
    ),
    (
        "Retries",
        [
            timeseries(
                "Retries by attempt number / s",
                (
                    rate("buttress_retry_attempts_total", "service, attempt_number"),
                    "{{service}} attempt {{attempt_number}}",
                ),
                unit="reqps",
            ),
            timeseries(
                "Retried errors / s",
                (
                    rate("buttress_retry_errors_total", "service, error_type"),
                    "{{service}} {{error_type}}",
                ),
                unit="reqps",
            ),
            timeseries(
                "Success after retry and exhaustion / s",
                (rate("buttress_retry_succeeded_total", "service"), "{{service}} succeeded"),
                (
                    rate("buttress_retry_exhausted_total", "service, reason"),
                    "{{service}} exhausted ({{reason}})",
                ),
                unit="reqps",
            ),
            timeseries(
                "Retry delay p50 / p95",
                (quantile("buttress_retry_delay_seconds", 0.5), "{{service}} p50"),
                (quantile("buttress_retry_delay_seconds", 0.95), "{{service}} p95"),
                unit="s",
            ),
        ],
    ),
    (
        "Timeouts",
        [
            timeseries(
                "Timeout ratio",
                (
                    q(
                        f"sum by (service) (rate(buttress_timeout_exceeded_total[{RATE}])) / "
                        f"sum by (service) (rate(buttress_timeout_elapsed_seconds_count[{RATE}]))"
                    ),
                    "{{service}}",
                ),
                unit="percentunit",
                description="Timed-out attempts over all attempts under with_timeout.",
            ),
            timeseries(
                "Elapsed time of timed calls p50 / p99",
                (quantile("buttress_timeout_elapsed_seconds", 0.5), "{{service}} p50"),
                (quantile("buttress_timeout_elapsed_seconds", 0.99), "{{service}} p99"),
                unit="s",
            ),
            timeseries(
                "Abandoned sync workers",
                (q("sum by (service) (buttress_timeout_abandoned_workers)"), "{{service}} running"),
                (rate("buttress_timeout_abandoned_total", "service"), "{{service}} abandoned / s"),
                description="Worker threads still running after their caller timed out.",
            ),
            timeseries(
                "Overrun of abandoned workers p95",
                (quantile("buttress_timeout_overrun_seconds", 0.95), "{{service}}"),
                unit="s",
            ),
        ],
    ),
    (
        "Bulkheads",
        [
            timeseries(
                "Active calls and limit",
                (q("sum by (service) (buttress_bulkhead_active)"), "{{service}} active"),
                (q("sum by (service) (buttress_bulkhead_limit)"), "{{service}} limit"),
            ),
            timeseries(
                "Utilization",
                (
                    q(
                        "sum by (service) (buttress_bulkhead_active) / "
                        "sum by (service) (buttress_bulkhead_limit)"
                    ),
                    "{{service}}",
                ),
                unit="percentunit",
            ),
            timeseries(
                "Queue depth and queued calls / s",
                (q("sum by (service) (buttress_bulkhead_queue_depth)"), "{{service}} waiting"),
                (rate("buttress_bulkhead_queued_total", "service"), "{{service}} queued / s"),
            ),
            timeseries(
                "Queue wait p95",
                (quantile("buttress_bulkhead_queue_wait_seconds", 0.95), "{{service}}"),
                unit="s",
            ),
            timeseries(
                "Bulkhead rejections / s",
                (
                    rate("buttress_bulkhead_rejected_total", "service, reason"),
                    "{{service}} {{reason}}",
                ),
                unit="reqps",
            ),
        ],
    ),
    (
        "Rate limits",
        [
            timeseries(
                "Tokens left",
                (q("sum by (service) (buttress_rate_limit_tokens)"), "{{service}}"),
            ),
            timeseries(
                "Waits / s and rejections / s",
                (rate("buttress_rate_limit_waits_total", "service"), "{{service}} waited"),
                (
                    rate("buttress_rate_limit_rejected_total", "service, reason"),
                    "{{service}} rejected ({{reason}})",
                ),
                unit="reqps",
            ),
            timeseries(
                "Wait for a token p95",
                (quantile("buttress_rate_limit_wait_seconds", 0.95), "{{service}}"),
                unit="s",
            ),
        ],
    ),
    (
        "Fallbacks and degradation",
        [
            timeseries(
                "Fallbacks by source / s",
                (rate("buttress_fallback_used_total", "service, source"), "{{service}} {{source}}"),
                unit="reqps",
            ),
            timeseries(
                "Fallback ratio",
                (
                    q(
                        f"sum by (service) (rate(buttress_fallback_used_total[{RATE}])) / "
                        f"sum by (service) (rate(buttress_calls_total[{RATE}]))"
                    ),
                    "{{service}}",
                ),
                unit="percentunit",
                description="Calls answered by a fallback over all calls.",
            ),
            timeseries(
                "Fallback failures / s",
                (
                    rate("buttress_fallback_failed_total", "service, error_type"),
                    "{{service}} {{error_type}}",
                ),
                unit="reqps",
            ),
            timeseries(
                "Degradation level by instance",
                (q("max by (instance) (buttress_health_degradation_level)"), "{{instance}}"),
                description="0 normal ... 4 critical: open circuits weighed by criticality.",
            ),
        ],
    ),
    (
        "Cache, coalescing and deferred calls",
        [
            timeseries(
                "Calls answered in the call's place / s",
                (
                    rate(
                        "buttress_calls_total",
                        "service, outcome",
                        'outcome=~"fallback|cached|deferred"',
                    ),
                    "{{service}} {{outcome}}",
                ),
                unit="reqps",
                description="Fallback, cache and deferral answers: never counted as success.",
            ),
            timeseries(
                "Cache lookups / s",
                (rate("buttress_cache_lookups_total", "service, result"), "{{service}} {{result}}"),
                (
                    rate("buttress_cache_stale_served_total", "service"),
                    "{{service}} stale served",
                ),
                unit="reqps",
            ),
            timeseries(
                "Coalesced calls / s",
                (rate("buttress_coalescing_joined_total", "service"), "{{service}}"),
                unit="reqps",
                description="Calls that shared an identical call's run instead of running.",
            ),
            timeseries(
                "Deferred calls / s",
                (
                    rate("buttress_deferral_queued_total", "service, error_type"),
                    "{{service}} queued ({{error_type}})",
                ),
                (
                    rate("buttress_deferral_replayed_total", "service, outcome"),
                    "{{service}} replayed {{outcome}}",
                ),
                (
                    rate("buttress_deferral_dropped_total", "service, reason"),
                    "{{service}} dropped {{reason}}",
                ),
                unit="reqps",
            ),
            timeseries(
                "Deferred wait before replay p95",
                (quantile("buttress_deferral_wait_seconds", 0.95), "{{service}}"),
                unit="s",
            ),
        ],
    ),
]


def _layout() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    y = 0
    next_id = 1
    for title, row_panels in ROWS:
        panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "id": next_id,
                "panels": [],
            }
        )
        next_id += 1
        y += 1
        x = 0
        line_height = 0
        for item in row_panels:
            body = dict(item)
            width, height = body.pop("_size")
            if x + width > 24:
                x = 0
                y += line_height
                line_height = 0
            body["gridPos"] = {"h": height, "w": width, "x": x, "y": y}
            body["id"] = next_id
            next_id += 1
            panels.append(body)
            x += width
            line_height = max(line_height, height)
        y += line_height
    return panels


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": f"{name}-values"},
        "definition": query,
        "refresh": 2,
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
        "regex": "",
    }


def dashboard() -> dict[str, Any]:
    """The dashboard as Grafana imports it (``__inputs`` asks for the Prometheus datasource)."""
    return {
        "__inputs": [
            {
                "name": "DS_PROMETHEUS",
                "label": "Prometheus",
                "description": "The Prometheus that scrapes your buttress services",
                "type": "datasource",
                "pluginId": "prometheus",
                "pluginName": "Prometheus",
            }
        ],
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "9.0.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
            {"type": "panel", "id": "stat", "name": "Stat", "version": ""},
            {"type": "panel", "id": "table", "name": "Table", "version": ""},
            {"type": "panel", "id": "timeseries", "name": "Time series", "version": ""},
        ],
        "title": "buttress: resilience",
        "uid": "buttress-resilience",
        "description": "Calls, circuits, retries, timeouts, bulkheads, rate limits, fallbacks "
        "and degradation of services protected by buttress.",
        "tags": ["buttress", "resilience"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 38,
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "",
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [
                _variable("job", "Job", "label_values(buttress_calls_total, job)"),
                _variable(
                    "service",
                    "Service",
                    'label_values(buttress_calls_total{job=~"$job"}, service)',
                ),
            ]
        },
        "panels": _layout(),
        "version": 1,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    sys.stdout.write(f"wrote {OUT}\n")
