"""Prometheus subscriber: the metric catalog and the handlers that feed it from events.

:data:`CATALOG` is the one list of metric families buttress exports. Each :class:`Family` names
the event kinds that feed it; ``docs/metrics.md``, the Grafana dashboard, the alert rules and the
tests are all checked against it.

Cost on the hot path: label children are bound once per service (and per outcome) and kept in
dicts, so a handler does a dict lookup and calls ``inc()``/``observe()`` on a ready child, never
``.labels()``. Gauges whose value races between threads (bulkhead occupancy, abandoned workers) are
moved with ``inc()``/``dec()``, which commute, instead of being ``set()`` to a value computed
before the handler ran.

Multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``): counters and histograms are summed across
processes by ``prometheus_client``; every gauge declares how processes combine
(:attr:`Family.multiprocess_mode`). The ``live*`` modes drop a process's values once
``prometheus_client.multiprocess.mark_process_dead(pid)`` ran for it (gunicorn ``child_exit``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

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
        dashboard: whether a Grafana panel shows it; when not, ``off_dashboard`` says why.
    """

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...]
    fed_by: tuple[type[Any], ...]
    multiprocess_mode: str | None = None
    buckets: tuple[float, ...] | None = None
    off_dashboard: str | None = None

    @property
    def dashboard(self) -> bool:
        return self.off_dashboard is None


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
        "1 for the state the circuit is in, 0 for the others (one series per state). In "
        "multiprocess mode: the number of live processes whose circuit is in that state.",
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
        "Failure rate over the breaker's window at the last recorded call (rate window only).",
        S,
        "livemax",
        CircuitCallRecorded,
    ),
    _gauge(
        "buttress_circuit_breaker_slow_call_rate",
        "Slow-call rate over the breaker's window at the last recorded call (slow-call "
        "detection only).",
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
        "Calls refused by the bulkhead, by reason (full, queue_timeout).",
        ("service", "reason"),
        CallRejected,
    ),
    # --- rate limit --------------------------------------------------------------------------
    _gauge(
        "buttress_rate_limit_tokens",
        "Tokens left in the bucket after the last acquisition.",
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
        "Calls refused by the rate limiter, by reason (no_tokens).",
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


def attempt_label(attempt: int) -> str:
    """The bounded ``attempt_number`` label: ``"1"`` ... ``"9"``, then ``"10+"``."""
    return str(attempt) if attempt < MAX_ATTEMPT_LABEL else f"{MAX_ATTEMPT_LABEL}+"


def _create(family: Family, registry: CollectorRegistry | None) -> MetricWrapperBase:
    if family.kind == "counter":
        return Counter(family.name, family.help, family.labels, registry=registry)
    if family.kind == "histogram":
        assert family.buckets is not None  # noqa: S101 - every histogram of the catalog has them
        return Histogram(
            family.name, family.help, family.labels, registry=registry, buckets=family.buckets
        )
    assert family.multiprocess_mode is not None  # noqa: S101 - every gauge of the catalog has one
    return Gauge(
        family.name,
        family.help,
        family.labels,
        registry=registry,
        multiprocess_mode=family.multiprocess_mode,  # type: ignore[arg-type]
    )


K = TypeVar("K")
V = TypeVar("V")


class _Lazy(dict[K, V], Generic[K, V]):
    """A dict that builds a missing entry with ``factory(key)``.

    Two threads may both build the same entry; ``setdefault`` keeps the first, and the loser only
    re-bound the same label children, which ``prometheus_client`` returns again.
    """

    __slots__ = ("_factory",)

    def __init__(self, factory: Callable[[K], V]) -> None:
        super().__init__()
        self._factory = factory

    def __missing__(self, key: K) -> V:
        return self.setdefault(key, self._factory(key))


class _Circuit:
    """Children of one service's breaker metrics, and what the recovery histogram needs."""

    __slots__ = (
        "failures",
        "ignored",
        "opened_at",
        "rate",
        "slow",
        "slow_rate",
        "state",
        "states",
        "successes",
    )

    def __init__(self, metrics: dict[str, Any], service: str) -> None:
        self.successes: Callable[[], None] = (
            metrics["buttress_circuit_breaker_successes_total"].labels(service).inc
        )
        self.slow: Callable[[], None] = (
            metrics["buttress_circuit_breaker_slow_calls_total"].labels(service).inc
        )
        failures = metrics["buttress_circuit_breaker_failures_total"]
        ignored = metrics["buttress_circuit_breaker_ignored_total"]
        self.failures: _Lazy[str, Callable[[], None]] = _Lazy(
            lambda error: failures.labels(service, error).inc
        )
        self.ignored: _Lazy[str, Callable[[], None]] = _Lazy(
            lambda error: ignored.labels(service, error).inc
        )
        rate = metrics["buttress_circuit_breaker_failure_rate"]
        slow_rate = metrics["buttress_circuit_breaker_slow_call_rate"]
        self.rate: _Lazy[None, Callable[[float], None]] = _Lazy(lambda _: rate.labels(service).set)
        self.slow_rate: _Lazy[None, Callable[[float], None]] = _Lazy(
            lambda _: slow_rate.labels(service).set
        )
        state = metrics["buttress_circuit_breaker_state"]
        self.states = {name: state.labels(service, name) for name in CIRCUIT_STATES}
        self.state = ""
        self.opened_at: float | None = None

    def enter(self, new_state: str) -> None:
        for name, child in self.states.items():
            child.set(1 if name == new_state else 0)
        self.state = new_state


class PrometheusSubscriber:
    """Writes every event into the families of :data:`CATALOG`, registered in ``registry``.

    Build it once per registry (buttress keeps one per registry, see
    :func:`buttress.instrumentation.configure`): the families are registered in the constructor,
    and a registry refuses a second family of the same name.
    """

    def __init__(self, registry: CollectorRegistry | None = REGISTRY) -> None:
        self.metrics: dict[str, Any] = {f.name: _create(f, registry) for f in CATALOG}
        self._lock = threading.Lock()
        self._calls: _Lazy[str, _Lazy[str, tuple[Callable[[], None], Callable[[float], None]]]]
        self._calls = _Lazy(self._bind_calls)
        self._circuits: _Lazy[str, _Circuit] = _Lazy(self._bind_circuit)
        self._flagged: set[str] = set()
        m = self.metrics
        self._degradation = m["buttress_health_degradation_level"]
        self._degradation.set_function(self._level)
        m["buttress_flag_enabled"].set_function(_from_settings(lambda s: s.enabled))
        m["buttress_config_generation"].set_function(_from_settings(lambda s: s.generation))
        self._counters: dict[str, _Lazy[Any, Callable[[], None]]] = {
            name: self._children(name, "inc")
            for name, family in FAMILIES.items()
            if family.kind == "counter" and family.labels and family.name != "buttress_calls_total"
        }
        self._observers: dict[str, _Lazy[Any, Callable[[float], None]]] = {
            name: self._children(name, "observe")
            for name, family in FAMILIES.items()
            if family.kind == "histogram" and family.name != "buttress_call_duration_seconds"
        }
        self._gauges: dict[str, _Lazy[Any, Any]] = {
            name: self._children(name, None)
            for name, family in FAMILIES.items()
            if family.kind == "gauge" and family.labels
        }

    def _children(self, name: str, method: str | None) -> _Lazy[Any, Any]:
        metric = self.metrics[name]

        def bind(labels: Any) -> Any:
            child = metric.labels(*labels) if isinstance(labels, tuple) else metric.labels(labels)
            return child if method is None else getattr(child, method)

        return _Lazy(bind)

    # -- binding --------------------------------------------------------------------------------
    def _bind_calls(
        self, service: str
    ) -> _Lazy[str, tuple[Callable[[], None], Callable[[float], None]]]:
        calls = self.metrics["buttress_calls_total"]
        durations = self.metrics["buttress_call_duration_seconds"]

        def bind(outcome: str) -> tuple[Callable[[], None], Callable[[float], None]]:
            return calls.labels(service, outcome).inc, durations.labels(service, outcome).observe

        by_outcome: _Lazy[str, tuple[Callable[[], None], Callable[[float], None]]] = _Lazy(bind)
        # Every outcome exists from the first call, so ratios such as timeouts / calls have a
        # denominator and rate() sees the first increment of a new outcome.
        for outcome in OUTCOMES:
            by_outcome[outcome] = bind(outcome)
        self._write_flags(service)
        return by_outcome

    def _bind_circuit(self, service: str) -> _Circuit:
        return _Circuit(self.metrics, service)

    # -- handlers -------------------------------------------------------------------------------
    def handlers(self) -> dict[type[Any], events.Handler]:
        """The handler for each event kind this subscriber consumes."""
        calls = self._calls
        circuits = self._circuits
        counters = self._counters
        observers = self._observers
        gauges = self._gauges

        def on_call_finished(event: CallFinished) -> None:
            inc, observe = calls[event.service][event.outcome]
            inc()
            observe(event.duration)

        def on_circuit_call(event: CircuitCallRecorded) -> None:
            circuit = circuits[event.service]
            if not circuit.state:
                circuit.enter("closed")
            outcome = event.outcome
            if outcome == "success":
                circuit.successes()
            elif outcome == "failure":
                circuit.failures[event.error_type or "unknown"]()
            else:
                circuit.ignored[event.error_type or "unknown"]()
            if event.slow:
                circuit.slow()
            if event.failure_rate is not None:
                circuit.rate[None](event.failure_rate)
            if event.slow_call_rate is not None:
                circuit.slow_rate[None](event.slow_call_rate)

        active = gauges["buttress_bulkhead_active"]
        queue_depth = gauges["buttress_bulkhead_queue_depth"]
        limits = gauges["buttress_bulkhead_limit"]
        queue_waits = observers["buttress_bulkhead_queue_wait_seconds"]
        # Services whose bulkhead ever queued: only those pay for updating the queue gauge.
        queued_services: set[str] = set()

        def on_bulkhead_acquired(event: BulkheadAcquired) -> None:
            service = event.service
            if service not in limits:
                limits[service].set(event.limit)
            active[service].inc()
            if service in queued_services:
                queue_depth[service].set(event.queued)
                if event.waited > 0:
                    queue_waits[service](event.waited)

        def on_bulkhead_released(event: BulkheadReleased) -> None:
            service = event.service
            active[service].dec()
            if service in queued_services:
                queue_depth[service].set(event.queued)

        queued_total = counters["buttress_bulkhead_queued_total"]

        def on_bulkhead_queued(event: BulkheadQueued) -> None:
            queued_services.add(event.service)
            queued_total[event.service]()
            queue_depth[event.service].set(event.queued)

        timed = observers["buttress_timeout_elapsed_seconds"]

        def on_timed_call(event: TimedCallFinished) -> None:
            timed[event.service](event.elapsed)

        tokens = gauges["buttress_rate_limit_tokens"]
        rate_waits = counters["buttress_rate_limit_waits_total"]
        rate_wait_seconds = observers["buttress_rate_limit_wait_seconds"]

        def on_rate_limit(event: RateLimitAcquired) -> None:
            tokens[event.service].set(event.tokens)
            if event.waited > 0:
                rate_waits[event.service]()
                rate_wait_seconds[event.service](event.waited)

        return {
            CallFinished: on_call_finished,
            CircuitCallRecorded: on_circuit_call,
            BulkheadAcquired: on_bulkhead_acquired,
            BulkheadReleased: on_bulkhead_released,
            BulkheadQueued: on_bulkhead_queued,
            TimedCallFinished: on_timed_call,
            RateLimitAcquired: on_rate_limit,
            CallRejected: self._on_rejected,
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

    # Handlers of events off the success path: clarity over speed.

    def _on_rejected(self, event: CallRejected) -> None:
        name = _REJECTED.get(event.pattern)
        if name is None:
            return
        if event.pattern == "circuit_breaker":
            circuit = self._circuits[event.service]
            if not circuit.state:
                circuit.enter(_STATE_OF_REJECTION.get(event.reason, "open"))
        self._counters[name][event.service, event.reason]()

    def _on_state_changed(self, event: CircuitStateChanged) -> None:
        service = event.service
        self._counters["buttress_circuit_breaker_transitions_total"][
            service, event.new_state, event.reason
        ]()
        with self._lock:
            circuit = self._circuits[service]
            circuit.enter(event.new_state)
            now = _clock.monotonic()
            if event.new_state in _OPEN_STATES:
                if circuit.opened_at is None:
                    circuit.opened_at = now
            elif event.new_state in _CLOSED_STATES and circuit.opened_at is not None:
                self._observers["buttress_circuit_breaker_recovery_seconds"][service](
                    now - circuit.opened_at
                )
                circuit.opened_at = None
            self._degradation.set(self._level())

    def _on_trial(self, event: CircuitTrialStarted) -> None:
        circuit = self._circuits[event.service]
        if not circuit.state:
            circuit.enter("half_open")
        self._counters["buttress_circuit_breaker_trials_total"][event.service]()

    def _on_retry(self, event: RetryScheduled) -> None:
        service = event.service
        self._counters["buttress_retry_attempts_total"][service, attempt_label(event.attempt + 1)]()
        self._counters["buttress_retry_errors_total"][service, event.error_type]()
        self._observers["buttress_retry_delay_seconds"][service, event.reason](event.delay)

    def _on_exhausted(self, event: RetryExhausted) -> None:
        self._counters["buttress_retry_exhausted_total"][
            event.service, event.reason, event.error_type
        ]()

    def _on_retry_succeeded(self, event: RetrySucceeded) -> None:
        self._counters["buttress_retry_succeeded_total"][event.service]()

    def _on_timeout(self, event: TimeoutExceeded) -> None:
        self._counters["buttress_timeout_exceeded_total"][event.service]()

    def _on_abandoned(self, event: WorkerAbandoned) -> None:
        self._counters["buttress_timeout_abandoned_total"][event.service]()
        self._gauges["buttress_timeout_abandoned_workers"][event.service].inc()

    def _on_finished_late(self, event: WorkerFinishedLate) -> None:
        self._gauges["buttress_timeout_abandoned_workers"][event.service].dec()
        self._observers["buttress_timeout_overrun_seconds"][event.service](event.overran)

    def _on_fallback(self, event: FallbackUsed) -> None:
        self._counters["buttress_fallback_used_total"][event.service, event.source]()

    def _on_fallback_failed(self, event: FallbackFailed) -> None:
        self._counters["buttress_fallback_failed_total"][event.service, event.error_type]()

    def _on_settings(self, event: SettingsReloaded) -> None:
        self._counters["buttress_config_reloads_total"]["success" if event.ok else "failure"]()
        if not event.ok:
            return
        self.metrics["buttress_config_generation"].set(event.generation)
        self.write_settings()

    def _on_shadow(self, event: ShadowDecision) -> None:
        self._counters["buttress_shadow_decisions_total"][
            event.service, event.pattern, event.action
        ]()

    def _on_state_store(self, event: StateStoreError) -> None:
        self._counters["buttress_circuit_breaker_state_store_errors_total"][
            event.service, event.operation, event.error_type
        ]()

    def _on_chaos(self, event: ChaosInjected) -> None:
        self._counters["buttress_chaos_injections_total"][event.service, event.kind]()

    # -- values derived from settings -----------------------------------------------------------
    # These gauges are computed at scrape time (set_function) so they are right even before the
    # first call; in multiprocess mode a scrape reads files instead, so they are also written
    # whenever settings are reloaded and when a service makes its first call.

    def write_settings(self) -> None:
        """Write the flag gauges and the degradation level from the current settings."""
        with self._lock:
            services = sorted(self._flagged)
        for service in services:
            self._write_flags(service)
        self.metrics["buttress_flag_enabled"].set(config.SNAPSHOT.enabled)
        self._degradation.set(self._level())

    def _write_flags(self, service: str) -> None:
        enabled = self._gauges["buttress_flag_service_enabled"][service]
        rollout = self._gauges["buttress_flag_rollout_ratio"][service]
        shadow = self._gauges["buttress_flag_shadow_mode"][service]
        with self._lock:
            if service not in self._flagged:
                self._flagged.add(service)
                enabled.set_function(lambda: config.SNAPSHOT.service(service).enabled)
                rollout.set_function(lambda: config.SNAPSHOT.service(service).rollout)
                shadow.set_function(lambda: config.SNAPSHOT.service(service).mode == "shadow")
        snapshot = config.SNAPSHOT
        view = snapshot.service(service)
        enabled.set(view.enabled)
        rollout.set(view.rollout)
        shadow.set(view.mode == "shadow")
        self.metrics["buttress_flag_enabled"].set(snapshot.enabled)

    def _level(self) -> float:
        # Imported here: health imports the registry and settings, which the hot path of this
        # module never needs.
        from buttress.health import degradation_level  # noqa: PLC0415

        circuits = list(self._circuits.items())
        return degradation_level((service, circuit.state) for service, circuit in circuits)


def _from_settings(read: Callable[[config.Snapshot], float]) -> Callable[[], float]:
    def value() -> float:
        try:
            return float(read(config.SNAPSHOT))
        except ConfigurationError:
            return math.nan  # invalid settings: the first protected call raises and says why

    return value


_REJECTED = {
    "circuit_breaker": "buttress_circuit_breaker_rejected_total",
    "bulkhead": "buttress_bulkhead_rejected_total",
    "rate_limit": "buttress_rate_limit_rejected_total",
}
_STATE_OF_REJECTION = {"forced_open": "forced_open", "half_open_full": "half_open"}
_OPEN_STATES = frozenset({"open", "forced_open", "half_open"})
_CLOSED_STATES = frozenset({"closed", "forced_closed", "disabled"})
