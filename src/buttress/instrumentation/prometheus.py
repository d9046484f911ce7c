"""Prometheus subscriber: the metric catalog and the handlers that feed it from events.

:data:`CATALOG` is the one list of metric families buttress exports. Each :class:`Family` names
the event kinds that feed it; ``docs/metrics.md``, the Grafana dashboard, the alert rules and the
tests are all checked against it.

Counters and histograms are written by event handlers. On the hot path a handler does a dict
lookup and calls ``inc()``/``observe()`` on a label child bound once per service, never
``.labels()``.

Gauges hold current state (circuit states, bulkhead occupancy, tokens, flags). In a single process
they are read from the objects themselves when Prometheus scrapes: exact, and free for the calls.
In multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) a scrape reads files that every worker
writes, so event handlers write the gauges instead, and each family's
:attr:`Family.multiprocess_mode` says how the workers' values combine. The ``live*`` modes drop a
worker's values once ``prometheus_client.multiprocess.mark_process_dead(pid)`` ran for it
(gunicorn's ``child_exit`` hook).
"""

from __future__ import annotations

import itertools
import os
import threading
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Generic, Literal, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from buttress import _clock, config, events
from buttress.events import (
    BulkheadAcquired,
    BulkheadQueued,
    BulkheadReleased,
    CallFinished,
    CallRejected,
    ChaosInjected,
    CircuitCallRecorded,
    CircuitStateChanged,
    CircuitTrialStarted,
    FallbackFailed,
    FallbackUsed,
    RateLimitAcquired,
    RetryExhausted,
    RetryScheduled,
    RetrySucceeded,
    SettingsReloaded,
    ShadowDecision,
    StateStoreError,
    TimedCallFinished,
    TimeoutExceeded,
    WorkerAbandoned,
    WorkerFinishedLate,
)
from buttress.exceptions import ConfigurationError
from buttress.health_app import degradation_level
from buttress.patterns.timeout import worker_pool_snapshot
from buttress.registry import instances as shared_instances

__all__ = [
    "CATALOG",
    "CIRCUIT_STATES",
    "LABELS",
    "OUTCOMES",
    "Family",
    "PrometheusSubscriber",
    "attempt_label",
]

Kind = Literal["counter", "gauge", "histogram"]

# Every label a family may carry. Each has a vocabulary bounded by buttress's code (or, for
# ``service``, by the services the application names); never an argument, message or config value.
LABELS = frozenset(
    {
        "service",
        "outcome",
        "state",
        "reason",
        "error_type",
        "pattern",
        "source",
        "attempt_number",
        "action",
        "kind",
        "operation",
    }
)
OUTCOMES = ("success", "failure", "rejected", "timeout")
CIRCUIT_STATES = ("closed", "open", "half_open", "forced_open", "forced_closed", "disabled")
MAX_ATTEMPT_LABEL = 10

# Buckets, in seconds. Calls to LLMs take a minute; calls to Redis take a millisecond.
CALL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
DELAY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
RECOVERY_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
OVERRUN_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900)


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family of the catalog.

    Attributes:
        name: the name as queried in PromQL (counters end in ``_total``).
        kind: ``counter``, ``gauge`` or ``histogram``.
        help: what one sample means.
        labels: label names, in order.
        fed_by: the event kinds whose handlers write it.
        multiprocess_mode: for gauges, how ``prometheus_client`` combines processes.
        buckets: for histograms, the upper bounds in seconds.
        off_dashboard: why no Grafana panel shows it (``None``: a panel does).
    """

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...]
    fed_by: tuple[type[Any], ...]
    multiprocess_mode: str | None = None
    buckets: tuple[float, ...] | None = None
    off_dashboard: str | None = None


def _counter(name: str, help_: str, labels: tuple[str, ...], *fed_by: type[Any]) -> Family:
    return Family(name, "counter", help_, labels, fed_by)


def _gauge(name: str, help_: str, labels: tuple[str, ...], mode: str, *fed_by: type[Any]) -> Family:
    return Family(name, "gauge", help_, labels, fed_by, multiprocess_mode=mode)


def _histogram(
    name: str, help_: str, labels: tuple[str, ...], buckets: tuple[float, ...], *fed_by: type[Any]
) -> Family:
    return Family(name, "histogram", help_, labels, fed_by, buckets=buckets)


S = ("service",)

CATALOG: tuple[Family, ...] = (
    # --- calls -------------------------------------------------------------------------------
    _counter(
        "buttress_calls_total",
        "Protected calls by outcome (success, failure, rejected, timeout), once per logical call "
        "after retries and fallbacks.",
        ("service", "outcome"),
        CallFinished,
    ),
    _histogram(
        "buttress_call_duration_seconds",
        "Duration of protected calls, retries and backoff included.",
        ("service", "outcome"),
        CALL_BUCKETS,
        CallFinished,
    ),
    # --- circuit breaker ---------------------------------------------------------------------
    _gauge(
        "buttress_circuit_breaker_state",
        "1 for the state the circuit is in, 0 for the others (one series per state); with "
        "several circuits or processes per service, how many are in that state.",
        ("service", "state"),
        "livesum",
        CircuitStateChanged,
        CircuitCallRecorded,
        CircuitTrialStarted,
        CallRejected,
    ),
    _counter(
        "buttress_circuit_breaker_transitions_total",
        "Circuit state changes, by the state entered and the reason.",
        ("service", "state", "reason"),
        CircuitStateChanged,
    ),
    _counter(
        "buttress_circuit_breaker_successes_total",
        "Calls the breaker admitted and recorded as successes.",
        S,
        CircuitCallRecorded,
    ),
    _counter(
        "buttress_circuit_breaker_failures_total",
        "Calls the breaker admitted and recorded as failures, by exception class.",
        ("service", "error_type"),
        CircuitCallRecorded,
    ),
    _counter(
        "buttress_circuit_breaker_ignored_total",
        "Calls that raised an excluded exception: neither success nor failure.",
        ("service", "error_type"),
        CircuitCallRecorded,
    ),
    _counter(
        "buttress_circuit_breaker_slow_calls_total",
        "Admitted calls slower than slow_call_duration.",
        S,
        CircuitCallRecorded,
    ),
    _gauge(
        "buttress_circuit_breaker_failure_rate",
        "Failure rate over the breaker's window (breakers with a failure-rate threshold).",
        S,
        "livemax",
        CircuitCallRecorded,
    ),
    _gauge(
        "buttress_circuit_breaker_slow_call_rate",
        "Slow-call rate over the breaker's window (breakers with slow-call detection).",
        S,
        "livemax",
        CircuitCallRecorded,
    ),
    _counter(
        "buttress_circuit_breaker_rejected_total",
        "Calls short-circuited by the breaker, by reason (open, half_open_full, forced_open).",
        ("service", "reason"),
        CallRejected,
    ),
    _counter(
        "buttress_circuit_breaker_trials_total",
        "Half-open trial calls admitted.",
        S,
        CircuitTrialStarted,
    ),
    _histogram(
        "buttress_circuit_breaker_recovery_seconds",
        "Time from a circuit opening to closing again (half-open re-trips included).",
        S,
        RECOVERY_BUCKETS,
        CircuitStateChanged,
    ),
    _counter(
        "buttress_circuit_breaker_state_store_errors_total",
        "Failures of the shared state store (Redis); the breaker went on with local state.",
        ("service", "operation", "error_type"),
        StateStoreError,
    ),
    # --- retry -------------------------------------------------------------------------------
    _counter(
        "buttress_retry_attempts_total",
        'Retries scheduled, by the number of the attempt about to run ("2" is the first retry; '
        'capped at "10+").',
        ("service", "attempt_number"),
        RetryScheduled,
    ),
    _counter(
        "buttress_retry_errors_total",
        "Failed attempts that were retried, by exception class.",
        ("service", "error_type"),
        RetryScheduled,
    ),
    _histogram(
        "buttress_retry_delay_seconds",
        "Delay before each retry, by what set it (backoff, retry_after, deadline).",
        ("service", "reason"),
        DELAY_BUCKETS,
        RetryScheduled,
    ),
    _counter(
        "buttress_retry_exhausted_total",
        "Calls whose last attempt failed, by why retrying stopped (max_attempts, deadline, "
        "not_idempotent) and the last exception class.",
        ("service", "reason", "error_type"),
        RetryExhausted,
    ),
    _counter(
        "buttress_retry_succeeded_total",
        "Calls that succeeded after at least one retry.",
        S,
        RetrySucceeded,
    ),
    # --- timeout -----------------------------------------------------------------------------
    _counter(
        "buttress_timeout_exceeded_total",
        "Calls that ran out of time; the caller got TimeoutExceededError.",
        S,
        TimeoutExceeded,
    ),
    _histogram(
        "buttress_timeout_elapsed_seconds",
        "Elapsed time of each call under with_timeout, in time or not.",
        S,
        CALL_BUCKETS,
        TimedCallFinished,
    ),
    _counter(
        "buttress_timeout_abandoned_total",
        "Sync calls whose worker thread was left running after the caller timed out.",
        S,
        WorkerAbandoned,
    ),
    _gauge(
        "buttress_timeout_abandoned_workers",
        "Abandoned worker threads still running.",
        S,
        "livesum",
        WorkerAbandoned,
        WorkerFinishedLate,
    ),
    _histogram(
        "buttress_timeout_overrun_seconds",
        "How long abandoned workers ran past their deadline.",
        S,
        OVERRUN_BUCKETS,
        WorkerFinishedLate,
    ),
    # --- bulkhead ----------------------------------------------------------------------------
    _gauge(
        "buttress_bulkhead_active",
        "Calls holding a bulkhead slot.",
        S,
        "livesum",
        BulkheadAcquired,
        BulkheadReleased,
    ),
    _gauge(
        "buttress_bulkhead_queue_depth",
        "Calls waiting for a bulkhead slot.",
        S,
        "livesum",
        BulkheadQueued,
        BulkheadAcquired,
        BulkheadReleased,
        CallRejected,
        TimeoutExceeded,
    ),
    _gauge(
        "buttress_bulkhead_limit",
        "Bulkhead slots (summed over processes in multiprocess mode).",
        S,
        "livesum",
        BulkheadAcquired,
    ),
    _counter(
        "buttress_bulkhead_queued_total",
        "Calls that found every slot busy and waited in the queue.",
        S,
        BulkheadQueued,
    ),
    _histogram(
        "buttress_bulkhead_queue_wait_seconds",
        "Time spent waiting for a slot, for the calls that had to wait.",
        S,
        WAIT_BUCKETS,
        BulkheadAcquired,
    ),
    _counter(
        "buttress_bulkhead_rejected_total",
        "Calls refused by the bulkhead, by reason (full, queue_timeout, deadline).",
        ("service", "reason"),
        CallRejected,
    ),
    # --- rate limit --------------------------------------------------------------------------
    _gauge(
        "buttress_rate_limit_tokens",
        "Tokens in the bucket.",
        S,
        "livesum",
        RateLimitAcquired,
    ),
    _counter(
        "buttress_rate_limit_waits_total",
        "Calls that waited for a token.",
        S,
        RateLimitAcquired,
    ),
    _histogram(
        "buttress_rate_limit_wait_seconds",
        "Time spent waiting for a token, for the calls that had to wait.",
        S,
        WAIT_BUCKETS,
        RateLimitAcquired,
    ),
    _counter(
        "buttress_rate_limit_rejected_total",
        "Calls refused by the rate limiter, by reason (no_tokens, deadline).",
        ("service", "reason"),
        CallRejected,
    ),
    # --- fallback ----------------------------------------------------------------------------
    _counter(
        "buttress_fallback_used_total",
        "Failures replaced by a fallback, by source (value, callable, chain, cache).",
        ("service", "source"),
        FallbackUsed,
    ),
    _counter(
        "buttress_fallback_failed_total",
        "Calls where every fallback alternative failed too, by the original exception class.",
        ("service", "error_type"),
        FallbackFailed,
    ),
    # --- degradation, settings and flags -----------------------------------------------------
    _gauge(
        "buttress_health_degradation_level",
        "0 normal ... 4 critical, from the open circuits and their services' criticality "
        "(see docs/observability.md).",
        (),
        "livemax",
        CircuitStateChanged,
        SettingsReloaded,
    ),
    _counter(
        "buttress_config_reloads_total",
        "reload_settings() runs, by outcome (success, failure).",
        ("outcome",),
        SettingsReloaded,
    ),
    _gauge(
        "buttress_config_generation",
        "Generation of the settings in use (increases on every successful reload).",
        (),
        "livemax",
        SettingsReloaded,
    ),
    _gauge(
        "buttress_flag_enabled",
        "1 while FF_ENABLE_RESILIENCE_PATTERNS is on, 0 when every pattern is switched off.",
        (),
        "livemostrecent",
        SettingsReloaded,
    ),
    _gauge(
        "buttress_flag_service_enabled",
        "1 while the service's patterns are enabled in settings.",
        S,
        "livemostrecent",
        SettingsReloaded,
        CallFinished,
    ),
    _gauge(
        "buttress_flag_rollout_ratio",
        "Fraction of the service's calls that get the patterns (rollout).",
        S,
        "livemostrecent",
        SettingsReloaded,
        CallFinished,
    ),
    _gauge(
        "buttress_flag_shadow_mode",
        "1 while the service runs in shadow mode (observe, never act).",
        S,
        "livemostrecent",
        SettingsReloaded,
        CallFinished,
    ),
    _counter(
        "buttress_shadow_decisions_total",
        "Shadow mode: what a pattern would have done (reject, retry, timeout, fallback) but did "
        "not.",
        ("service", "pattern", "action"),
        ShadowDecision,
    ),
    _counter(
        "buttress_chaos_injections_total",
        "Faults injected by chaos testing, by kind (exception, latency, result).",
        ("service", "kind"),
        ChaosInjected,
    ),
)

FAMILIES: dict[str, Family] = {family.name: family for family in CATALOG}


GAUGES = tuple(family for family in CATALOG if family.kind == "gauge")

Inc = Callable[[], None]
Observe = Callable[[float], None]


def attempt_label(attempt: int) -> str:
    """The bounded ``attempt_number`` label: ``"1"`` ... ``"9"``, then ``"10+"``."""
    return str(attempt) if attempt < MAX_ATTEMPT_LABEL else f"{MAX_ATTEMPT_LABEL}+"


def multiprocess_mode() -> bool:
    """Whether ``prometheus_client`` keeps values in files (``PROMETHEUS_MULTIPROC_DIR``)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def _create(family: Family, registry: CollectorRegistry | None) -> Any:
    if family.kind == "counter":
        return Counter(family.name, family.help, family.labels, registry=registry)
    if family.kind == "histogram":
        return Histogram(
            family.name, family.help, family.labels, registry=registry, buckets=family.buckets or ()
        )
    return Gauge(
        family.name,
        family.help,
        family.labels,
        registry=registry,
        multiprocess_mode=family.multiprocess_mode or "all",  # type: ignore[arg-type]
    )


K = TypeVar("K")
V = TypeVar("V")


class _Lazy(dict[K, V], Generic[K, V]):
    """A dict that builds a missing entry with ``factory(key)``.

    Two threads may both build the same entry; ``setdefault`` keeps the first, and the loser only
    bound the same series again (both kinds of series store hand out one object per label set).
    """

    __slots__ = ("_factory",)

    def __init__(self, factory: Callable[[K], V]) -> None:
        super().__init__()
        self._factory = factory

    def __missing__(self, key: K) -> V:
        return self.setdefault(key, self._factory(key))


def _children(metric: Any, method: str | None) -> _Lazy[Any, Any]:
    """Children of ``metric`` by label values (a tuple, or one string), or their ``method``."""

    def bind(labels: Any) -> Any:
        child = metric.labels(*labels) if isinstance(labels, tuple) else metric.labels(labels)
        return child if method is None else getattr(child, method)

    return _Lazy(bind)


class _CounterSeries:
    """One series of a counter, kept in this process (a single process's fast path)."""

    __slots__ = ("_lock", "value")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        # acquire/try/finally rather than ``with``: the same guarantee, about 200 ns cheaper.
        lock = self._lock
        lock.acquire()
        try:
            self.value += amount
        finally:
            lock.release()

    def read(self) -> float:
        with self._lock:
            return self.value


class _HistogramSeries:
    """One series of a histogram, kept in this process: per-bucket counts and the sum."""

    __slots__ = ("_bounds", "_lock", "buckets", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._lock = threading.Lock()
        self.buckets = [0] * (len(bounds) + 1)  # not cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        index = bisect_left(self._bounds, amount)  # the first bound >= amount: Prometheus's le
        lock = self._lock
        lock.acquire()
        try:
            self.buckets[index] += 1
            self.sum += amount
        finally:
            lock.release()

    def read(self) -> tuple[list[int], float]:
        with self._lock:
            return list(self.buckets), self.sum


class _LocalFamilies:
    """The counters and histograms of a single process, by family and label values.

    ``prometheus_client``'s own metric objects cost about 0.4 us per counter increment and
    0.9 us per histogram observation; these series cost a third of that, which matters for the
    few events of every successful call. They are exposed by :class:`_Exporter` at scrape time.
    In multiprocess mode the values must live in ``prometheus_client``'s files instead.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.series: dict[str, dict[tuple[str, ...], Any]] = {
            family.name: {} for family in CATALOG if family.kind != "gauge"
        }

    def child(self, family: Family, labels: tuple[str, ...]) -> Any:
        with self._lock:
            by_labels = self.series[family.name]
            series = by_labels.get(labels)
            if series is None:
                if family.kind == "counter":
                    series = _CounterSeries()
                else:
                    series = _HistogramSeries(family.buckets or ())
                by_labels[labels] = series
            return series

    def binder(self, name: str, method: str) -> _Lazy[Any, Any]:
        family = FAMILIES[name]

        def bind(labels: Any) -> Any:
            values = labels if isinstance(labels, tuple) else (labels,)
            return getattr(self.child(family, values), method)

        return _Lazy(bind)


class PrometheusSubscriber:
    """Writes buttress's events into the families of :data:`CATALOG`, registered in ``registry``.

    Build one per registry (:func:`buttress.instrumentation.configure` keeps one per registry): the
    families are registered here, and a registry refuses a second family of the same name.

    Args:
        registry: where the families are registered (``None``: nowhere).
        multiprocess: whether values live in files for a multiprocess scrape; by default, whether
            ``PROMETHEUS_MULTIPROC_DIR`` is set. In a single process the gauges are read from the
            live objects at scrape time; in multiprocess mode events write them.
    """

    def __init__(
        self, registry: CollectorRegistry | None = REGISTRY, *, multiprocess: bool | None = None
    ) -> None:
        self.multiprocess = multiprocess_mode() if multiprocess is None else multiprocess
        self._lock = threading.Lock()
        # Services that made a call: their flags are shown even when they have no breaker.
        self.services: set[str] = set()
        # Services whose sync calls were ever abandoned: shown with 0 once their workers finish.
        self.abandoning: set[str] = set()
        self._opened_at: dict[str, float] = {}
        self._states: dict[str, str] = {}
        # Multiprocess mode: the services whose circuit this process last wrote as open, each
        # with the number of that write, and the thread that waits for their open time to run out.
        self._open: dict[str, int] = {}
        self._open_writes = itertools.count()
        self._wake = threading.Event()
        self._watcher: threading.Thread | None = None
        self.metrics: dict[str, Any] = {}
        if self.multiprocess:
            # An unlabelled gauge shows 0 from the moment it exists in a file, and 0 would read
            # "kill switch off": that one is created when first written.
            self._registry = registry
            self.metrics = {
                family.name: _create(family, registry)
                for family in CATALOG
                if family.name != _KILL_SWITCH
            }
            self._inc = {
                f.name: _children(self.metrics[f.name], "inc")
                for f in CATALOG
                if f.kind == "counter"
            }
            self._observe = {
                f.name: _children(self.metrics[f.name], "observe")
                for f in CATALOG
                if f.kind == "histogram"
            }
            self._set = {
                f.name: _children(self.metrics[f.name], "set")
                for f in GAUGES
                if f.labels and f.name in self.metrics
            }
        else:
            self.local = _LocalFamilies()
            self._inc = {
                f.name: self.local.binder(f.name, "inc") for f in CATALOG if f.kind == "counter"
            }
            self._observe = {
                f.name: self.local.binder(f.name, "observe")
                for f in CATALOG
                if f.kind == "histogram"
            }
            if registry is not None:
                registry.register(_Exporter(self))

    # -- handlers of the per-call events: a dict lookup and a ready child each ---------------------
    def handlers(self) -> dict[type[Any], events.Handler]:
        """The handler for each event kind this subscriber consumes."""
        calls: _Lazy[str, dict[str, tuple[Inc, Observe]]] = _Lazy(self._bind_calls)
        inc, observe = self._inc, self._observe
        successes = inc["buttress_circuit_breaker_successes_total"]
        failures = inc["buttress_circuit_breaker_failures_total"]
        ignored = inc["buttress_circuit_breaker_ignored_total"]
        slow_calls = inc["buttress_circuit_breaker_slow_calls_total"]
        queue_waits = observe["buttress_bulkhead_queue_wait_seconds"]
        timed = observe["buttress_timeout_elapsed_seconds"]
        rate_waits = inc["buttress_rate_limit_waits_total"]
        rate_wait_seconds = observe["buttress_rate_limit_wait_seconds"]

        def on_call_finished(event: CallFinished) -> None:
            count, time = calls[event.service][event.outcome]
            count()
            time(event.duration)

        local_calls: _Lazy[str, dict[str, Observe]] = _Lazy(self._bind_local_calls)

        def on_call_finished_locally(event: CallFinished) -> None:
            # buttress_calls_total is the count of this histogram series, read at scrape time.
            local_calls[event.service][event.outcome](event.duration)

        def on_circuit_call(event: CircuitCallRecorded) -> None:
            outcome = event.outcome
            if outcome == "success":
                successes[event.service]()
            elif outcome == "failure":
                failures[event.service, event.error_type or "unknown"]()
            else:
                ignored[event.service, event.error_type or "unknown"]()
            if event.slow:
                slow_calls[event.service]()

        def on_bulkhead_acquired(event: BulkheadAcquired) -> None:
            if event.waited > 0:
                queue_waits[event.service](event.waited)

        def on_timed_call(event: TimedCallFinished) -> None:
            timed[event.service](event.elapsed)

        def on_rate_limit(event: RateLimitAcquired) -> None:
            if event.waited > 0:
                rate_waits[event.service]()
                rate_wait_seconds[event.service](event.waited)

        # Rejections come in floods while a circuit is open: one lookup per event.
        rejections: _Lazy[tuple[str, str, str], Inc] = _Lazy(self._bind_rejection)

        def on_rejected(event: CallRejected) -> None:
            rejections[event.pattern, event.service, event.reason]()

        handlers: dict[type[Any], events.Handler] = {
            CallFinished: on_call_finished if self.multiprocess else on_call_finished_locally,
            CircuitCallRecorded: on_circuit_call,
            BulkheadAcquired: on_bulkhead_acquired,
            TimedCallFinished: on_timed_call,
            RateLimitAcquired: on_rate_limit,
            BulkheadQueued: self._on_queued,
            CallRejected: on_rejected,
            CircuitStateChanged: self._on_state_changed,
            CircuitTrialStarted: self._on_trial,
            RetryScheduled: self._on_retry,
            RetryExhausted: self._on_exhausted,
            RetrySucceeded: self._on_retry_succeeded,
            TimeoutExceeded: self._on_timeout,
            WorkerAbandoned: self._on_abandoned,
            WorkerFinishedLate: self._on_finished_late,
            FallbackUsed: self._on_fallback,
            FallbackFailed: self._on_fallback_failed,
            SettingsReloaded: self._on_settings,
            ShadowDecision: self._on_shadow,
            StateStoreError: self._on_state_store,
            ChaosInjected: self._on_chaos,
        }
        if self.multiprocess:
            handlers.update(self._multiprocess_handlers(handlers))
        return handlers

    def _bind_calls(self, service: str) -> dict[str, tuple[Inc, Observe]]:
        calls = self.metrics["buttress_calls_total"]
        durations = self.metrics["buttress_call_duration_seconds"]

        def bind(outcome: str) -> tuple[Inc, Observe]:
            return calls.labels(service, outcome).inc, durations.labels(service, outcome).observe

        by_outcome: dict[str, tuple[Inc, Observe]] = _Lazy(bind)
        for outcome in OUTCOMES:
            by_outcome[outcome] = bind(outcome)
        self._first_call(service)
        return by_outcome

    def _bind_local_calls(self, service: str) -> dict[str, Observe]:
        durations = self._observe["buttress_call_duration_seconds"]
        by_outcome: dict[str, Observe] = _Lazy(lambda outcome: durations[service, outcome])
        for outcome in OUTCOMES:
            by_outcome[outcome] = durations[service, outcome]
        self._first_call(service)
        return by_outcome

    def _first_call(self, service: str) -> None:
        # Every outcome exists from the first call, so a ratio such as timeouts / calls has its
        # series, and rate() sees the first increment of a new outcome.
        with self._lock:
            self.services.add(service)
        if self.multiprocess:
            self._write_flags(service)

    # -- handlers of the other events: clarity over speed ------------------------------------------
    def _on_queued(self, event: BulkheadQueued) -> None:
        self._inc["buttress_bulkhead_queued_total"][event.service]()

    def _bind_rejection(self, key: tuple[str, str, str]) -> Inc:
        pattern, service, reason = key
        name = _REJECTED.get(pattern)
        if name is None:
            return _ignore
        inc: Inc = self._inc[name][service, reason]
        return inc

    def _on_state_changed(self, event: CircuitStateChanged) -> None:
        service = event.service
        self._inc["buttress_circuit_breaker_transitions_total"][
            service, event.new_state, event.reason
        ]()
        now = _clock.monotonic()
        with self._lock:
            opened_at = self._opened_at.get(service)
            if event.new_state in _DOWN_STATES and opened_at is None:
                self._opened_at[service] = now
            elif event.new_state in _UP_STATES and opened_at is not None:
                del self._opened_at[service]
                self._observe["buttress_circuit_breaker_recovery_seconds"][service](now - opened_at)

    def _on_trial(self, event: CircuitTrialStarted) -> None:
        self._inc["buttress_circuit_breaker_trials_total"][event.service]()

    def _on_retry(self, event: RetryScheduled) -> None:
        service = event.service
        self._inc["buttress_retry_attempts_total"][service, attempt_label(event.attempt + 1)]()
        self._inc["buttress_retry_errors_total"][service, event.error_type]()
        self._observe["buttress_retry_delay_seconds"][service, event.reason](event.delay)

    def _on_exhausted(self, event: RetryExhausted) -> None:
        self._inc["buttress_retry_exhausted_total"][event.service, event.reason, event.error_type]()

    def _on_retry_succeeded(self, event: RetrySucceeded) -> None:
        self._inc["buttress_retry_succeeded_total"][event.service]()

    def _on_timeout(self, event: TimeoutExceeded) -> None:
        self._inc["buttress_timeout_exceeded_total"][event.service]()

    def _on_abandoned(self, event: WorkerAbandoned) -> None:
        with self._lock:
            self.abandoning.add(event.service)
        self._inc["buttress_timeout_abandoned_total"][event.service]()

    def _on_finished_late(self, event: WorkerFinishedLate) -> None:
        self._observe["buttress_timeout_overrun_seconds"][event.service](event.overran)

    def _on_fallback(self, event: FallbackUsed) -> None:
        self._inc["buttress_fallback_used_total"][event.service, event.source]()

    def _on_fallback_failed(self, event: FallbackFailed) -> None:
        self._inc["buttress_fallback_failed_total"][event.service, event.error_type]()

    def _on_settings(self, event: SettingsReloaded) -> None:
        self._inc["buttress_config_reloads_total"]["success" if event.ok else "failure"]()

    def _on_shadow(self, event: ShadowDecision) -> None:
        self._inc["buttress_shadow_decisions_total"][event.service, event.pattern, event.action]()

    def _on_state_store(self, event: StateStoreError) -> None:
        self._inc["buttress_circuit_breaker_state_store_errors_total"][
            event.service, event.operation, event.error_type
        ]()

    def _on_chaos(self, event: ChaosInjected) -> None:
        self._inc["buttress_chaos_injections_total"][event.service, event.kind]()

    # -- multiprocess mode: gauges written from events ---------------------------------------------
    # A value computed under a pattern's lock reaches its handler after the lock is released, so
    # two handlers can write in the opposite order: each gauge holds the value of the last event
    # handled, exact again at the next event. A single process never has this problem (its gauges
    # are read from the objects at scrape time).

    def _multiprocess_handlers(
        self, single: dict[type[Any], events.Handler]
    ) -> dict[type[Any], events.Handler]:
        gauges = self._set
        active = gauges["buttress_bulkhead_active"]
        depth = gauges["buttress_bulkhead_queue_depth"]
        limits = gauges["buttress_bulkhead_limit"]
        tokens = gauges["buttress_rate_limit_tokens"]
        rates = gauges["buttress_circuit_breaker_failure_rate"]
        slow_rates = gauges["buttress_circuit_breaker_slow_call_rate"]
        abandoned = gauges["buttress_timeout_abandoned_workers"]
        count_circuit_call = single[CircuitCallRecorded]
        count_wait = single[BulkheadAcquired]
        count_rate_limit = single[RateLimitAcquired]
        count_queued = single[BulkheadQueued]
        count_rejected = single[CallRejected]
        count_change = single[CircuitStateChanged]
        count_trial = single[CircuitTrialStarted]
        count_abandoned = single[WorkerAbandoned]
        count_late = single[WorkerFinishedLate]
        count_reload = single[SettingsReloaded]
        count_timeout = single[TimeoutExceeded]

        def on_circuit_call(event: CircuitCallRecorded) -> None:
            count_circuit_call(event)
            self._seen_circuit(event.service, "closed")
            if event.failure_rate is not None:
                rates[event.service](event.failure_rate)
            if event.slow_call_rate is not None:
                slow_rates[event.service](event.slow_call_rate)

        def on_bulkhead_acquired(event: BulkheadAcquired) -> None:
            count_wait(event)
            service = event.service
            active[service](event.active)
            depth[service](event.queued)
            limits[service](event.limit)

        def on_bulkhead_released(event: BulkheadReleased) -> None:
            active[event.service](event.active)
            depth[event.service](event.queued)

        def on_queued(event: BulkheadQueued) -> None:
            count_queued(event)
            depth[event.service](event.queued)

        def on_rate_limit(event: RateLimitAcquired) -> None:
            count_rate_limit(event)
            tokens[event.service](event.tokens)

        def on_rejected(event: CallRejected) -> None:
            count_rejected(event)
            if event.pattern == "circuit_breaker":
                self._seen_circuit(event.service, _STATE_OF_REJECTION.get(event.reason, "open"))
            elif event.pattern == "bulkhead" and event.reason != "full":
                # A waiter that gave up (queue_timeout) left the queue with no acquisition or
                # release to say so: read the depth from the bulkheads themselves.
                depth[event.service](self._queued(event.service))

        def on_timeout(event: TimeoutExceeded) -> None:
            count_timeout(event)
            # An async call that timed out while queued was cancelled out of the queue.
            depth[event.service](self._queued(event.service))

        def on_state_changed(event: CircuitStateChanged) -> None:
            count_change(event)
            self._write_state(event.service, event.new_state)

        def on_trial(event: CircuitTrialStarted) -> None:
            count_trial(event)
            self._seen_circuit(event.service, "half_open")

        def on_abandoned(event: WorkerAbandoned) -> None:
            count_abandoned(event)
            abandoned[event.service](event.abandoned)

        def on_finished_late(event: WorkerFinishedLate) -> None:
            count_late(event)
            abandoned[event.service](event.abandoned)

        def on_settings(event: SettingsReloaded) -> None:
            count_reload(event)
            if event.ok:
                self.metrics["buttress_config_generation"].set(event.generation)
                with self._lock:
                    services = sorted(self.services)
                for service in services:
                    self._write_flags(service)
                self._write_level()

        return {
            CircuitCallRecorded: on_circuit_call,
            BulkheadAcquired: on_bulkhead_acquired,
            BulkheadReleased: on_bulkhead_released,
            BulkheadQueued: on_queued,
            RateLimitAcquired: on_rate_limit,
            CallRejected: on_rejected,
            TimeoutExceeded: on_timeout,
            CircuitStateChanged: on_state_changed,
            CircuitTrialStarted: on_trial,
            WorkerAbandoned: on_abandoned,
            WorkerFinishedLate: on_finished_late,
            SettingsReloaded: on_settings,
        }

    def _seen_circuit(self, service: str, state: str) -> None:
        # A circuit first heard of through a call: its state is inferred once from that event.
        if service not in self._states:
            self._write_state(service, state)

    def _write_state(self, service: str, new_state: str, *, replacing: str | None = None) -> None:
        """Write the circuit state gauges of ``service`` (if still ``replacing``, when given)."""
        states = self._set["buttress_circuit_breaker_state"]
        with self._lock:
            if replacing is not None and self._states.get(service) != replacing:
                return  # an event moved the circuit meanwhile: the event's state stands
            self._states[service] = new_state
            for state in CIRCUIT_STATES:
                states[service, state](1 if state == new_state else 0)
            if new_state == "open":
                self._watch(service)
        self._write_level()

    # -- multiprocess mode: an open circuit whose open time runs out with no call ------------------
    # A breaker moves from open to half-open on the first call after its timeout, and a gauge
    # file changes only when this process writes it: without this, an instance that its load
    # balancer stopped sending to would show its circuit open (and its level critical) for ever.
    # A daemon thread, alive only while a circuit of this process is open, writes ``half_open``
    # (ready to probe) when the open time runs out, as the breaker's own snapshot then reads.

    def _watch(self, service: str) -> None:
        # The caller holds self._lock.
        self._open[service] = next(self._open_writes)
        if self._watcher is None:
            self._watcher = threading.Thread(
                target=self._watch_open_circuits, name="buttress-open-circuits", daemon=True
            )
            self._watcher.start()
        else:
            self._wake.set()

    def _watch_open_circuits(self) -> None:
        watching = True
        try:
            while watching:
                watching = self._watch_once()
        finally:
            if watching:  # ended by an exception: the next circuit that opens starts another
                with self._lock:
                    self._watcher = None

    def _watch_once(self) -> bool:
        """Look at every watched circuit, wait for the next deadline; False: nothing is left."""
        with self._lock:
            watched = dict(self._open)
            if not watched:
                self._watcher = None
                return False
            self._wake.clear()
        lefts = [
            left
            for service, write in watched.items()
            if (left := self._still_open(service, write)) is not None
        ]
        if lefts:
            self._sleep(min(lefts))
        return True

    def _still_open(self, service: str, write: int) -> float | None:
        """Seconds until the circuit of ``service`` may probe; None once there is nothing to wait
        for (its gauge now reads half-open, or no breaker of this process is open)."""
        snapshots = [
            breaker.snapshot()
            for breaker in shared_instances("circuit_breaker").values()
            if breaker.service == service
        ]
        left: list[float] = [s["seconds_left_open"] for s in snapshots if s["state"] == "open"]
        if left:
            return min(left)
        if any(s["state"] == "half_open" for s in snapshots):
            self._write_state(service, "half_open", replacing="open")
        with self._lock:
            if self._open.get(service) == write:  # not opened again meanwhile
                del self._open[service]
        return None

    def _sleep(self, seconds: float) -> None:
        """Wait ``seconds`` on the buttress clock, or until a circuit opens (``self._wake``).

        In real-time slices, reading the clock between them: under a fake clock (tests) the wait
        ends once simulated time has passed, and a thread that outlives the fake clock ends too.
        """
        deadline = _clock.monotonic() + seconds
        while (left := deadline - _clock.monotonic()) > 0:
            if self._wake.wait(min(left, _WATCH_SLICE_SECONDS)):
                return

    def _queued(self, service: str) -> int:
        return sum(
            bulkhead.snapshot()["queued"]
            for bulkhead in shared_instances("bulkhead").values()
            if bulkhead.service == service
        )

    def _write_level(self) -> None:
        with self._lock:
            pairs = list(self._states.items())
        self.metrics["buttress_health_degradation_level"].set(degradation_level(pairs))

    def _write_flags(self, service: str) -> None:
        snapshot = config.SNAPSHOT
        view = snapshot.service(service)
        self._set["buttress_flag_service_enabled"][service](view.enabled)
        self._set["buttress_flag_rollout_ratio"][service](view.rollout)
        self._set["buttress_flag_shadow_mode"][service](view.mode == "shadow")
        with self._lock:
            kill_switch = self.metrics.get(_KILL_SWITCH)
            if kill_switch is None:
                kill_switch = _create(FAMILIES[_KILL_SWITCH], self._registry)
                self.metrics[_KILL_SWITCH] = kill_switch
        kill_switch.set(snapshot.enabled)


class _Exporter:
    """Every family of a single process, at scrape time.

    Counters and histograms come from the subscriber's :class:`_LocalFamilies`; gauges are read
    from the objects themselves (breakers, bulkheads, rate limiters, the worker pool, settings).
    """

    def __init__(self, subscriber: PrometheusSubscriber) -> None:
        self._subscriber = subscriber

    def describe(self) -> list[Metric]:
        return [_empty(family) for family in CATALOG]

    def collect(self) -> list[Metric]:
        out = {family.name: _empty(family) for family in CATALOG}
        self._collect_recorded(out)
        self._collect_gauges(out)
        return list(out.values())

    def _collect_recorded(self, out: dict[str, Any]) -> None:
        series = self._subscriber.local.series
        calls = out["buttress_calls_total"]
        for family in CATALOG:
            if family.kind == "gauge":
                continue
            metric = out[family.name]
            for labels, one in sorted(series[family.name].items()):
                if family.kind == "counter":
                    metric.add_metric(labels, one.read())
                    continue
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

        circuits = [b.snapshot() for b in shared_instances("circuit_breaker").values()]
        in_state: dict[tuple[str, str], int] = {}
        worst_rate: dict[str, dict[str, float]] = {"failure_rate": {}, "slow_call_rate": {}}
        for circuit in circuits:
            service = circuit["service"]
            for state in CIRCUIT_STATES:
                key = (service, state)
                in_state[key] = in_state.get(key, 0) + (circuit["state"] == state)
            for field, worst in worst_rate.items():
                rate = circuit.get(field)
                if rate is not None:
                    worst[service] = max(rate, worst.get(service, 0.0))
        for (service, state), count in sorted(in_state.items()):
            add("buttress_circuit_breaker_state", (service, state), count)
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
        for bulkhead in shared_instances("bulkhead").values():
            snap = bulkhead.snapshot()
            total = bulkheads.setdefault(snap["service"], [0, 0, 0])
            total[0] += snap["active"]
            total[1] += snap["queued"]
            total[2] += snap["limit"]
        for service, (active, queued, limit) in sorted(bulkheads.items()):
            add("buttress_bulkhead_active", (service,), active)
            add("buttress_bulkhead_queue_depth", (service,), queued)
            add("buttress_bulkhead_limit", (service,), limit)

        tokens: dict[str, float] = {}
        for limiter in shared_instances("rate_limit").values():
            snap = limiter.snapshot()
            tokens[snap["service"]] = tokens.get(snap["service"], 0.0) + snap["tokens"]
        for service, left in sorted(tokens.items()):
            add("buttress_rate_limit_tokens", (service,), left)

        running = worker_pool_snapshot()["abandoned"]
        with self._subscriber._lock:
            abandoning = set(self._subscriber.abandoning)
            services = set(self._subscriber.services)
        for service in sorted(abandoning | set(running)):
            add("buttress_timeout_abandoned_workers", (service,), running.get(service, 0))

        try:
            snapshot = config.SNAPSHOT
        except ConfigurationError:
            pass  # invalid settings: the first protected call raises and says why
        else:
            add(_KILL_SWITCH, (), 1 if snapshot.enabled else 0)
            add("buttress_config_generation", (), snapshot.generation)
            services |= {c["service"] for c in circuits} | set(bulkheads) | set(tokens)
            for service in sorted(services):
                view = snapshot.service(service)
                add("buttress_flag_service_enabled", (service,), 1 if view.enabled else 0)
                add("buttress_flag_rollout_ratio", (service,), view.rollout)
                add("buttress_flag_shadow_mode", (service,), 1 if view.mode == "shadow" else 0)


def _empty(family: Family) -> Metric:
    if family.kind == "counter":
        return CounterMetricFamily(family.name, family.help, labels=family.labels)
    if family.kind == "histogram":
        return HistogramMetricFamily(family.name, family.help, labels=family.labels)
    return GaugeMetricFamily(family.name, family.help, labels=family.labels)


def _ignore() -> None:
    """What a rejection by a pattern without a rejection counter increments."""


_KILL_SWITCH = "buttress_flag_enabled"
_REJECTED = {
    "circuit_breaker": "buttress_circuit_breaker_rejected_total",
    "bulkhead": "buttress_bulkhead_rejected_total",
    "rate_limit": "buttress_rate_limit_rejected_total",
}
_STATE_OF_REJECTION = {"forced_open": "forced_open", "half_open_full": "half_open"}
# Longest real-time wait of the open-circuit watcher between two readings of the buttress clock.
_WATCH_SLICE_SECONDS = 0.25
# A circuit that is down until it closes again, and the states that end that (recovery time).
_DOWN_STATES = frozenset({"open", "forced_open", "half_open"})
_UP_STATES = frozenset({"closed", "forced_closed", "disabled"})
