"""Prometheus: the metric catalog and the subscriber that feeds it from events.

:data:`CATALOG` is the one list of metric families buttress exports. Each :class:`Family` names
the event kinds that feed it; ``docs/metrics.md``, the Grafana dashboard, the alert rules and the
tests are all checked against it.

The package has four parts: :mod:`.catalog` (the families), :mod:`.series` (where values live,
bound once per label set), :mod:`.subscriber` (event handlers, and in multiprocess mode the gauges
they write) and :mod:`.collector` (in a single process, the gauges read at scrape time through
:func:`buttress.health_app.snapshot`).
"""

from __future__ import annotations

from buttress.instrumentation.prometheus.catalog import (
    CALL_BUCKETS,
    CATALOG,
    CIRCUIT_STATES,
    DELAY_BUCKETS,
    FAMILIES,
    GAUGES,
    LABELS,
    MAX_ATTEMPT_LABEL,
    OUTCOMES,
    OVERRUN_BUCKETS,
    RECOVERY_BUCKETS,
    WAIT_BUCKETS,
    Family,
    Kind,
    attempt_label,
)
from buttress.instrumentation.prometheus.series import multiprocess_mode
from buttress.instrumentation.prometheus.subscriber import PrometheusSubscriber

__all__ = [
    "CALL_BUCKETS",
    "CATALOG",
    "CIRCUIT_STATES",
    "DELAY_BUCKETS",
    "FAMILIES",
    "GAUGES",
    "LABELS",
    "MAX_ATTEMPT_LABEL",
    "OUTCOMES",
    "OVERRUN_BUCKETS",
    "RECOVERY_BUCKETS",
    "WAIT_BUCKETS",
    "Family",
    "Kind",
    "PrometheusSubscriber",
    "attempt_label",
    "multiprocess_mode",
]
