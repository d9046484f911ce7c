"""The collector: every family of a single process, built when Prometheus scrapes.

Counters and histograms come from the subscriber's :class:`~.series.LocalFamilies`. Gauges hold
current state (circuit states, bulkhead occupancy, tokens, abandoned workers, flags) and are read
at scrape time from one seam, :func:`buttress.health_app.snapshot`: exact, and free for the calls.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import accumulate
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from buttress.health_app import degradation_level, snapshot
from buttress.instrumentation.prometheus.catalog import (
    CATALOG,
    CIRCUIT_STATES,
    KILL_SWITCH,
    OUTCOMES,
    Family,
)
from buttress.instrumentation.prometheus.series import (
    OTHER_SERVICE,
    LocalFamilies,
    ServiceLabels,
    label_values,
)

__all__ = ["Collector"]

# The services the subscriber has seen: those whose sync calls were ever abandoned (shown with 0
# once their workers finish), and those that made a call (their flags are shown even when they
# have no breaker).
Seen = Callable[[], tuple[set[str], set[str]]]


class Collector:
    """The ``prometheus_client`` collector of a single process's subscriber.

    Args:
        local: the subscriber's counters and histograms.
        seen: a copy of the subscriber's ``(abandoning, services)``.
        service_labels: the ``service`` label of each service (the cardinality guard): the
            gauges of the services past it are summed under ``_other``.
    """

    def __init__(self, local: LocalFamilies, seen: Seen, service_labels: ServiceLabels) -> None:
        self._local = local
        self._seen = seen
        self._label = service_labels

    def describe(self) -> list[Metric]:
        return [_empty(family) for family in CATALOG]

    def collect(self) -> list[Metric]:
        out = {family.name: _empty(family) for family in CATALOG}
        self._collect_recorded(out)
        self._collect_gauges(out)
        return list(out.values())

    def _collect_recorded(self, out: dict[str, Any]) -> None:
        series = self._local.series
        calls = out["buttress_calls_total"]
        for family in CATALOG:
            if family.kind == "gauge":
                continue
            metric = out[family.name]
            found = dict(series[family.name])  # one C-level copy: safe while threads add series
            items: dict[tuple[str, ...], Any] = {label_values(k): v for k, v in found.items()}
            if family.name == "buttress_call_duration_seconds":
                # Every outcome of a service that made a call is shown; the subscriber makes an
                # outcome's series at its first call, and this one reads as zeros until then.
                for label in {self._label(service) for service in self._seen()[1]}:
                    for outcome in OUTCOMES:
                        items.setdefault((label, outcome), None)
            for labels, one in sorted(items.items()):
                if family.kind == "counter":
                    metric.add_metric(labels, one.read())
                    continue
                if one is None:
                    buckets, total = [0] * (len(family.buckets or ()) + 1), 0.0
                else:
                    buckets, total = one.read()
                bounds = [*map(floatToGoString, family.buckets or ()), "+Inf"]
                metric.add_metric(
                    labels, list(zip(bounds, accumulate(buckets), strict=True)), total
                )
                if family.name == "buttress_call_duration_seconds":
                    calls.add_metric(labels, sum(buckets))

    def _collect_gauges(self, out: dict[str, Any]) -> None:

        def add(name: str, labels: tuple[str, ...], value: float) -> None:
            out[name].add_metric(labels, value)

        label = self._label
        state = snapshot()
        circuits = list(state["circuits"].values())
        in_state: dict[tuple[str, str], int] = {}
        worst_rate: dict[str, dict[str, float]] = {"failure_rate": {}, "slow_call_rate": {}}
        for circuit in circuits:
            service = label(circuit["service"])
            for each in CIRCUIT_STATES:
                key = (service, each)
                in_state[key] = in_state.get(key, 0) + (circuit["state"] == each)
            for field, worst in worst_rate.items():
                rate = circuit.get(field)
                if rate is not None:
                    worst[service] = max(rate, worst.get(service, 0.0))
        for (service, each), count in sorted(in_state.items()):
            add("buttress_circuit_breaker_state", (service, each), count)
        for service, rate in sorted(worst_rate["failure_rate"].items()):
            add("buttress_circuit_breaker_failure_rate", (service,), rate)
        for service, rate in sorted(worst_rate["slow_call_rate"].items()):
            add("buttress_circuit_breaker_slow_call_rate", (service,), rate)
        add(
            "buttress_health_degradation_level",
            (),
            degradation_level((c["service"], c["state"]) for c in circuits),
        )

        bulkheads: dict[str, list[int]] = {}
        for snap in state["bulkheads"].values():
            total = bulkheads.setdefault(label(snap["service"]), [0, 0, 0])
            total[0] += snap["active"]
            total[1] += snap["queued"]
            total[2] += snap["limit"]
        for service, (active, queued, limit) in sorted(bulkheads.items()):
            add("buttress_bulkhead_active", (service,), active)
            add("buttress_bulkhead_queue_depth", (service,), queued)
            add("buttress_bulkhead_limit", (service,), limit)

        tokens: dict[str, float] = {}
        for snap in state["rate_limiters"].values():
            service = label(snap["service"])
            tokens[service] = tokens.get(service, 0.0) + snap["tokens"]
        for service, left in sorted(tokens.items()):
            add("buttress_rate_limit_tokens", (service,), left)

        running: dict[str, int] = {}
        for service, count in state["worker_pool"]["abandoned"].items():
            running[label(service)] = running.get(label(service), 0) + count
        abandoning, services = self._seen()
        for service in sorted({label(s) for s in abandoning} | set(running)):
            add("buttress_timeout_abandoned_workers", (service,), running.get(service, 0))

        settings = state["settings"]
        if settings is not None:  # None: invalid settings; the first protected call says why
            add(KILL_SWITCH, (), 1 if settings.enabled else 0)
            add("buttress_config_generation", (), settings.generation)
            for kind in ("circuits", "bulkheads", "rate_limiters"):
                services |= {each["service"] for each in state[kind].values()}
            # A service past the cardinality guard has no flags of its own ("_other" is no service).
            for service in sorted(s for s in services if label(s) == s != OTHER_SERVICE):
                view = settings.service(service)
                add("buttress_flag_service_enabled", (service,), 1 if view.enabled else 0)
                add("buttress_flag_rollout_ratio", (service,), view.rollout)
                add("buttress_flag_shadow_mode", (service,), 1 if view.mode == "shadow" else 0)


def _empty(family: Family) -> Metric:
    if family.kind == "counter":
        return CounterMetricFamily(family.name, family.help, labels=family.labels)
    if family.kind == "histogram":
        return HistogramMetricFamily(family.name, family.help, labels=family.labels)
    return GaugeMetricFamily(family.name, family.help, labels=family.labels)
