"""The metric catalog: the one list of the metric families buttress exports.

Each :class:`Family` names the event kinds that feed it; ``docs/metrics.md``, the Grafana
dashboard, the alert rules and the tests are all checked against :data:`CATALOG`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from buttress.events import (
    BulkheadAcquired,
    BulkheadLimitChanged,
    BulkheadQueued,
    BulkheadReleased,
    CacheLookup,
    CacheServedStale,
    CallFinished,
    CallRejected,
    ChaosInjected,
    CircuitCallRecorded,
    CircuitStateChanged,
    CircuitTrialStarted,
    CoalescingJoined,
    DeferralDropped,
    DeferralQueued,
    DeferralReplayed,
    FallbackFailed,
    FallbackUsed,
    HedgeLaunched,
    HedgeWon,
    RateLimitAcquired,
    RetryBudgetExhausted,
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

__all__ = [
    "CALL_BUCKETS",
    "CATALOG",
    "CIRCUIT_STATES",
    "DELAY_BUCKETS",
    "FAMILIES",
    "GAUGES",
    "KILL_SWITCH",
    "LABELS",
    "MAX_ATTEMPT_LABEL",
    "OUTCOMES",
    "OVERRUN_BUCKETS",
    "RECOVERY_BUCKETS",
    "WAIT_BUCKETS",
    "Family",
    "Kind",
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
        "result",
    }
)
# How a protected call ended: it ran (success, failure), was refused or ran out of time, or a
# pattern answered in its place (fallback, cached, deferred), which is never counted as success.
OUTCOMES = ("success", "failure", "rejected", "timeout", "fallback", "cached", "deferred")
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

# Families of the overload controls (retry budget, hedging, adaptive throttle) that no panel shows
# yet; their PromQL is in docs/metrics.md.
_OVERLOAD_OFF_DASHBOARD = "overload controls: no dashboard row yet (queries in docs/metrics.md)"


def _off(family: Family) -> Family:
    return Family(
        family.name,
        family.kind,
        family.help,
        family.labels,
        family.fed_by,
        family.multiprocess_mode,
        family.buckets,
        off_dashboard=_OVERLOAD_OFF_DASHBOARD,
    )


CATALOG: tuple[Family, ...] = (
    # --- calls -------------------------------------------------------------------------------
    _counter(
        "buttress_calls_total",
        "Protected calls by outcome (success, failure, rejected, timeout; fallback, cached, "
        "deferred when a pattern answered in the call's place), once per logical call after "
        "retries and fallbacks.",
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
    _off(
        _counter(
            "buttress_retry_budget_exhausted_total",
            "Retries (kind=retry) and hedges (kind=hedge) the service's retry budget refused.",
            ("service", "kind"),
            RetryBudgetExhausted,
        )
    ),
    # --- hedging -----------------------------------------------------------------------------
    _off(
        _counter(
            "buttress_hedging_hedges_total",
            "Copies of slow calls sent by hedging.",
            S,
            HedgeLaunched,
        )
    ),
    _off(
        _counter(
            "buttress_hedging_calls_total",
            "Hedged calls (at least one copy sent), by the copy that answered (kind=primary, "
            "hedge, or none when every copy failed).",
            ("service", "kind"),
            HedgeWon,
        )
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
        "Bulkhead slots (summed over processes in multiprocess mode); an adaptive bulkhead's "
        "live limit.",
        S,
        "livesum",
        BulkheadAcquired,
        BulkheadLimitChanged,
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
    # --- adaptive throttle -------------------------------------------------------------------
    _off(
        _counter(
            "buttress_adaptive_throttle_rejected_total",
            "Calls the adaptive throttle refused locally (reason=throttled).",
            ("service", "reason"),
            CallRejected,
        )
    ),
    # --- rate limit --------------------------------------------------------------------------
    _gauge(
        "buttress_rate_limit_tokens",
        "Tokens in the bucket.",
        S,
        "livesum",
        RateLimitAcquired,
    ),
    Family(
        "buttress_rate_limit_store_errors_total",
        "counter",
        "Fleet rate limit: requests Redis did not answer; the process took its local fair share "
        "of the rate until Redis answered again.",
        ("service", "error_type"),
        (StateStoreError,),
        off_dashboard="fleet rate limit faults: no dashboard row yet (query in docs/metrics.md)",
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
    # --- cache, coalescing, deferral -------------------------------------------------------
    _counter(
        "buttress_cache_lookups_total",
        "Cache lookups, by result: hit (a fresh entry answered, the call did not run) or miss.",
        ("service", "result"),
        CacheLookup,
    ),
    _counter(
        "buttress_cache_stale_served_total",
        "Failed or rejected calls answered by a stale cache entry, by the failure's class.",
        ("service", "error_type"),
        CacheServedStale,
    ),
    _counter(
        "buttress_coalescing_joined_total",
        "Calls that shared the run of an identical call in flight instead of running.",
        S,
        CoalescingJoined,
    ),
    _counter(
        "buttress_deferral_queued_total",
        "Rejected calls queued for a later replay, by the rejection's class.",
        ("service", "error_type"),
        DeferralQueued,
    ),
    _counter(
        "buttress_deferral_dropped_total",
        "Deferred calls given up unreplayed, by reason (full, expired, unserializable, "
        "store_error).",
        ("service", "reason"),
        DeferralDropped,
    ),
    _counter(
        "buttress_deferral_replayed_total",
        "Deferred calls replayed, by outcome (success, failure).",
        ("service", "outcome"),
        DeferralReplayed,
    ),
    _histogram(
        "buttress_deferral_wait_seconds",
        "How long deferred calls waited in their queue before their replay.",
        S,
        RECOVERY_BUCKETS,
        DeferralReplayed,
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

# The one unlabelled gauge whose 0 means something ("every pattern switched off"): in
# multiprocess mode it is created only when first written (see the subscriber).
KILL_SWITCH = "buttress_flag_enabled"


def attempt_label(attempt: int) -> str:
    """The bounded ``attempt_number`` label: ``"1"`` ... ``"9"``, then ``"10+"``."""
    return str(attempt) if attempt < MAX_ATTEMPT_LABEL else f"{MAX_ATTEMPT_LABEL}+"
