"""The subscriber: event handlers that write the catalog's series.

Counters and histograms are written by event handlers. On the hot path a handler does a dict
lookup and calls ``inc()``/``observe()`` on a label child bound once per service, never
``.labels()``.

Gauges hold current state (circuit states, bulkhead occupancy, tokens, flags). In a single process
the collector reads them when Prometheus scrapes. In multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``) a scrape reads files that every worker writes, so event handlers
write the gauges instead, and each family's :attr:`~.catalog.Family.multiprocess_mode` says how
the workers' values combine. The ``live*`` modes drop a worker's values once
``prometheus_client.multiprocess.mark_process_dead(pid)`` ran for it (gunicorn's ``child_exit``
hook).
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
import weakref
from bisect import bisect_left
from collections.abc import Callable
from threading import get_ident
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry

from buttress import _clock, config, events
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
from buttress.health_app import bulkheads, circuits, degradation_level
from buttress.instrumentation.prometheus.catalog import (
    CATALOG,
    CIRCUIT_STATES,
    FAMILIES,
    GAUGES,
    KILL_SWITCH,
    OUTCOMES,
    attempt_label,
)
from buttress.instrumentation.prometheus.collector import Collector
from buttress.instrumentation.prometheus.series import (
    DEFAULT_MAX_SERVICES,
    OTHER_SERVICE,
    CounterSeries,
    HistogramSeries,
    Inc,
    Lazy,
    LocalFamilies,
    Observe,
    ServiceLabels,
    ServiceSeries,
    children,
    create,
    layout,
    multiprocess_mode,
)

__all__ = ["PrometheusSubscriber"]

_BREAKER = "circuit_breaker"  # the pattern whose rejections may end a call (RejectedCall)
_CALL_DURATIONS = FAMILIES["buttress_call_duration_seconds"]
_CIRCUIT_SUCCESSES = FAMILIES["buttress_circuit_breaker_successes_total"]
# Where an observation of the calls histogram goes: the same for every service (see layout).
_CALL_BOUNDS = _CALL_DURATIONS.buckets or ()
_CALL_FIRST, _CALL_SUM = layout(_CALL_BOUNDS)

# A call's outcome, duration and error type, recorded without building a CallFinished.
RecordCall = Callable[[str, float, "str | None"], None]


class PrometheusSubscriber:
    """Writes buttress's events into the families of :data:`CATALOG`, registered in ``registry``.

    Build one per registry (:func:`buttress.instrumentation.configure` keeps one per registry): the
    families are registered here, and a registry refuses a second family of the same name.

    Args:
        registry: where the families are registered (``None``: nowhere).
        multiprocess: whether values live in files for a multiprocess scrape; by default, whether
            ``PROMETHEUS_MULTIPROC_DIR`` is set. In a single process the gauges are read from the
            live objects at scrape time; in multiprocess mode events write them.
        max_services: the cardinality guard: how many services get a ``service`` label of their
            own (in the order they are first seen); later ones are counted under ``_other``, and
            their flags are not shown. ``None``: no limit.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = REGISTRY,
        *,
        multiprocess: bool | None = None,
        max_services: int | None = DEFAULT_MAX_SERVICES,
    ) -> None:
        self.multiprocess = multiprocess_mode() if multiprocess is None else multiprocess
        # The cardinality guard: services past max_services share the service label "_other".
        self.service_labels = ServiceLabels(max_services)
        self._lock = threading.Lock()
        # Services that made a call: their flags are shown even when they have no breaker (of
        # the services past the cardinality guard, only the first).
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
        # The call series of each service, bound at its first call.
        self._calls: Lazy[str, dict[str, tuple[Inc, Observe]]] = Lazy(self._bind_calls)
        self._local_calls: Lazy[str, dict[str, HistogramSeries]] = Lazy(self._bind_local_calls)
        # What a call of each service records (the CallFinished fast path and plain handler).
        self._call_recorders: Lazy[str, RecordCall] = Lazy(self._bind_call_finished)
        # Rejections come in floods while a circuit is open: one lookup per rejection.
        self._rejections: Lazy[tuple[str, str, str], Inc] = Lazy(self._bind_rejection)
        # What every service past the cardinality guard shares, by binder: they all write the
        # "_other" series, so one binding (made for the first of them) serves them all.
        self._other: dict[str, Any] = {}
        self._other_called = False  # whether ``services`` holds one of them (one is enough)
        if self.multiprocess:
            # A forked worker (what multiprocess mode is for) has no copy of the parent's watcher
            # thread: it starts its own when one of its circuits opens.
            reset = weakref.WeakMethod(self._forked)
            os.register_at_fork(after_in_child=functools.partial(_call, reset))
            # An unlabelled gauge shows 0 from the moment it exists in a file, and 0 would read
            # "kill switch off": that one is created when first written.
            self._registry = registry
            try:
                for family in CATALOG:
                    if family.name != KILL_SWITCH:
                        self.metrics[family.name] = create(family, registry)
            except ValueError:
                # A name the registry already has (DuplicateTimeseries): leave it as it was, so
                # nothing of this subscriber is half there.
                if registry is not None:
                    for metric in self.metrics.values():
                        registry.unregister(metric)
                raise
            self._inc = {
                f.name: children(self.metrics[f.name], "inc", f, self.service_labels)
                for f in CATALOG
                if f.kind == "counter"
            }
            self._observe = {
                f.name: children(self.metrics[f.name], "observe", f, self.service_labels)
                for f in CATALOG
                if f.kind == "histogram"
            }
            self._set = {
                f.name: children(self.metrics[f.name], "set", f, self.service_labels)
                for f in GAUGES
                if f.labels and f.name in self.metrics
            }
        else:
            self.local = LocalFamilies(self.service_labels)
            self._inc = {
                f.name: self.local.binder(f.name, "inc") for f in CATALOG if f.kind == "counter"
            }
            self._observe = {
                f.name: self.local.binder(f.name, "observe")
                for f in CATALOG
                if f.kind == "histogram"
            }
            if registry is not None:
                registry.register(Collector(self.local, self.seen, self.service_labels))

    def seen(self) -> tuple[set[str], set[str]]:
        """Copies of :attr:`abandoning` and :attr:`services`, read together (for the collector)."""
        with self._lock:
            return set(self.abandoning), set(self.services)

    # -- handlers of the per-call events: a dict lookup and a ready child each ---------------------
    def handlers(self) -> dict[type[Any], events.Handler]:
        """The handler for each event kind this subscriber consumes."""
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
            self._call_recorders[event.service](event.outcome, event.duration, None)

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

        rejections = self._rejections

        def on_rejected(event: CallRejected) -> None:
            rejections[event.pattern, event.service, event.reason]()

        handlers: dict[type[Any], events.Handler] = {
            CallFinished: on_call_finished,
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
            RetryBudgetExhausted: self._on_budget_exhausted,
            HedgeLaunched: self._on_hedge,
            HedgeWon: self._on_hedged_call,
            TimeoutExceeded: self._on_timeout,
            WorkerAbandoned: self._on_abandoned,
            WorkerFinishedLate: self._on_finished_late,
            FallbackUsed: self._on_fallback,
            FallbackFailed: self._on_fallback_failed,
            CacheLookup: self._on_cache_lookup,
            CacheServedStale: self._on_cache_stale,
            CoalescingJoined: self._on_coalescing_joined,
            DeferralQueued: self._on_deferral_queued,
            DeferralDropped: self._on_deferral_dropped,
            DeferralReplayed: self._on_deferral_replayed,
            SettingsReloaded: self._on_settings,
            ShadowDecision: self._on_shadow,
            StateStoreError: self._on_state_store,
            ChaosInjected: self._on_chaos,
        }
        if self.multiprocess:
            handlers.update(self._multiprocess_handlers(handlers))
        return handlers

    def binders(self) -> dict[type[Any], events.Binder]:
        """The fast path of the per-call kinds: series bound once per service (see events).

        In multiprocess mode only CallFinished has one: the other per-call events write gauges
        there, through the plain handlers.
        """
        if self.multiprocess:
            return {CallFinished: self._call_recorders.__getitem__}
        return {
            CallFinished: self._call_recorders.__getitem__,
            CircuitCallRecorded: self._bind_circuit_call,
            BulkheadAcquired: self._bind_bulkhead_acquired,
            TimedCallFinished: self._bind_timed_call,
            CallRejected: self._bind_rejected,
            events.RejectedCall: self._bind_rejected_call,
            events.SucceededCall: self._bind_succeeded_call,
            CacheLookup: self._bind_cache_lookup,
        }

    def _shared(self, service: str, bind: Callable[[str], Any]) -> Any:
        """What ``bind`` binds for ``service``: for a service past the cardinality guard, the one
        binding that all of them share (made for the first of them; they write the same series).

        Binders run under the events lock (one at a time); ``setdefault`` keeps the first anyway.
        """
        if self.service_labels(service) != OTHER_SERVICE:
            return bind(service)
        name = bind.__name__
        found = self._other.get(name)
        if found is None:
            found = self._other.setdefault(name, bind(service))
        return found

    def _bind_cache_lookup(self, service: str) -> Callable[[str], None]:
        bound: Callable[[str], None] = self._shared(service, self._cache_lookup_for)
        return bound

    def _cache_lookup_for(self, service: str) -> Callable[[str], None]:
        def looked_up(
            result: str,
            service: str = service,
            lookups: Lazy[Any, Inc] = self._inc["buttress_cache_lookups_total"],
        ) -> None:
            lookups[service, result]()

        return looked_up

    def _bind_rejected(self, service: str) -> Callable[[str, str, float | None], None]:
        bound: Callable[[str, str, float | None], None] = self._shared(service, self._rejected_for)
        return bound

    def _rejected_for(self, service: str) -> Callable[[str, str, float | None], None]:
        def rejected(
            pattern: str,
            reason: str,
            _retry_after: float | None,
            service: str = service,
            rejections: Lazy[tuple[str, str, str], Inc] = self._rejections,
        ) -> None:
            rejections[pattern, service, reason]()

        return rejected

    def _bind_rejected_call(self, service: str) -> Callable[[str, str, float | None], None]:
        bound: Callable[[str, str, float | None], None] = self._shared(
            service, self._rejected_call_for
        )
        return bound

    def _rejected_call_for(self, service: str) -> Callable[[str, str, float | None], None]:
        """A call an open circuit rejected and so ended (events.RejectedCall): the rejection's
        counter, and the ``rejected`` series of the calls histogram observed with no duration.

        Two C calls and a lookup: while a circuit is open, every call comes here.
        """
        rejections = self._rejections
        by_reason: Lazy[str, Inc] = Lazy(lambda reason: rejections[_BREAKER, service, reason])
        ended = self._local_calls[service]["rejected"].zeros()

        def rejected_call(pattern: str, reason: str, _retry_after: float | None) -> None:
            if pattern == _BREAKER:
                by_reason[reason]()
            else:
                rejections[pattern, service, reason]()
            ended()

        return rejected_call

    def _bind_succeeded_call(self, service: str) -> Callable[[float], None]:
        """A successful call whose breaker is the final step (events.SucceededCall): the
        breaker's success counter and the call's observation, in one frame.

        What ``_bind_circuit_call`` and ``_bind_call_finished`` write for a success: every
        successful call of such a stack comes here. The services past the cardinality guard
        share one function.

        The service's first call, as ``_bind_local_calls``'s, but with no series by outcome:
        a service whose calls only ever succeed needs none (≈ 120 bytes and a table entry
        less); its other outcomes' calls make it then.
        """
        self._first_call(service)  # its label fixed
        bound: Callable[[float], None] = self._shared(service, self._succeeded_call_for)
        return bound

    def _succeeded_call_for(self, service: str) -> Callable[[float], None]:
        series: HistogramSeries = self.local.child(_CALL_DURATIONS, (service, "success"))
        hot, hot_cell = series.mine()  # the binding thread's cell, found by one comparison

        # What it reads is in its defaults: smaller than closure cells, and read as locals. What
        # every service shares (where an observation goes) is module constants: 24 bytes less.
        # The breaker's success counter is the series itself, stepped by next() (a C call no
        # slower than its bound __next__, which would cost 48 bytes and an entry in _inc).
        successes: CounterSeries = self.local.child(_CIRCUIT_SUCCESSES, (service,))

        def succeeded_call(  # defaults, never passed
            duration: float,
            success: CounterSeries = successes,
            series: HistogramSeries = series,
            hot: int = hot,
            hot_cell: list[float] = hot_cell,
        ) -> None:
            next(success)
            # HistogramSeries.observe inline (as in _bind_call_finished's success).
            if get_ident() == hot:
                cell = hot_cell
            else:  # another thread: its cell is in the series' dict (made by a second thread)
                found = series.cells.get(get_ident())
                cell = series.cell() if found is None else found
            if duration <= _CALL_FIRST:
                cell[0] += 1
            else:
                cell[bisect_left(_CALL_BOUNDS, duration)] += 1
            cell[_CALL_SUM] += duration

        return succeeded_call

    def _bind_circuit_call(
        self, service: str
    ) -> Callable[[str, float, bool, str | None, float | None, float | None], None]:
        bound: Callable[[str, float, bool, str | None, float | None, float | None], None] = (
            self._shared(service, self._circuit_call_for)
        )
        return bound

    def _circuit_call_for(
        self, service: str
    ) -> Callable[[str, float, bool, str | None, float | None, float | None], None]:
        inc = self._inc
        successes = inc["buttress_circuit_breaker_successes_total"]
        # The success series, bound at the first success (no series before its first value).
        success: Inc | None = None

        # What the function only reads is in its defaults (smaller than closure cells, and read
        # as locals); the success series, set once, is its one cell.
        def circuit_call(  # noqa: PLR0917 - defaults, never passed
            outcome: str,
            _duration: float,
            slow: bool,
            error_type: str | None,
            _failure_rate: float | None,
            _slow_call_rate: float | None,
            service: str = service,
            successes: Lazy[Any, Inc] = successes,
            failures: Lazy[Any, Inc] = inc["buttress_circuit_breaker_failures_total"],
            ignored: Lazy[Any, Inc] = inc["buttress_circuit_breaker_ignored_total"],
            slow_calls: Lazy[Any, Inc] = inc["buttress_circuit_breaker_slow_calls_total"],
        ) -> None:
            nonlocal success
            if outcome == "success":
                if success is None:
                    success = successes[service]
                success()
            elif outcome == "failure":
                failures[service, error_type or "unknown"]()
            else:
                ignored[service, error_type or "unknown"]()
            if slow:
                slow_calls[service]()

        return circuit_call

    def _bind_bulkhead_acquired(self, service: str) -> None:
        """Nothing: the recorder of ``BulkheadAcquired`` carries only slots taken at once.

        A slot taken at once has waited 0 s, which the queue-wait histogram does not observe;
        the occupancy it changes is shown by the gauges, read from the bulkheads at scrape time.
        A call that waited for its slot is emitted as an event (``Bulkhead.note_acquired``), and
        the plain handler observes its wait. Declining leaves the recorder's ``record`` at
        ``None`` when nobody else binds the kind: the bulkhead then makes no call at all per
        slot (the default subscribers). In multiprocess mode the plain handler writes the
        gauges from every event instead, and this subscriber binds no fast path for the kind.
        """

    def _bind_timed_call(self, service: str) -> Callable[[float, bool], None]:
        bound: Callable[[float, bool], None] = self._shared(service, self._timed_call_for)
        return bound

    def _timed_call_for(self, service: str) -> Callable[[float, bool], None]:
        # Bound at the service's first timed call (recorders bind on their first event).
        series = self.local.child(FAMILIES["buttress_timeout_elapsed_seconds"], (service,))
        bounds = series.bounds
        first, total = layout(bounds)
        hot, hot_cell = series.mine()  # the binding thread's cell, found by one comparison

        def timed_call(  # noqa: PLR0917 - defaults, never passed
            elapsed: float,
            _timed_out: bool,
            series: HistogramSeries = series,
            bounds: tuple[float, ...] = bounds,
            first: float = first,
            total: int = total,
            hot: int = hot,
            hot_cell: list[float] = hot_cell,
        ) -> None:
            # HistogramSeries.observe inline, one frame per call; what it reads in its defaults.
            cell: list[float] | None
            if get_ident() == hot:
                cell = hot_cell
            else:  # another thread: its cell is in the series' dict (made by a second thread)
                cell = series.cells.get(get_ident())
                if cell is None:
                    cell = series.cell()
            if elapsed <= first:
                cell[0] += 1
            else:
                cell[bisect_left(bounds, elapsed)] += 1
            cell[total] += elapsed

        return timed_call

    def _bind_call_finished(self, service: str) -> RecordCall:
        """What a call of ``service`` records: its outcome and duration, into bound series.

        Called at the service's first call (recorders bind on their first event), so a
        subscriber added later does not show services it never saw; every outcome's series is
        made then. The services past the cardinality guard share one function.
        """
        if self.multiprocess:
            self._calls[service]  # the service's first call: its label fixed
        else:
            self._local_calls[service]  # (the same)
        bound: RecordCall = self._shared(service, self._call_finished_for)
        return bound

    def _call_finished_for(self, service: str) -> RecordCall:
        if self.multiprocess:

            def record_call(
                outcome: str,
                duration: float,
                _error_type: str | None,
                by_outcome: dict[str, tuple[Inc, Observe]] = self._calls[service],
            ) -> None:
                count, time = by_outcome[outcome]
                count()
                time(duration)

            return record_call
        # buttress_calls_total is the count of this histogram series, read at scrape time.
        by_outcome = self._local_calls[service]
        success = by_outcome["success"]
        # Every outcome's series has the family's bounds.
        first, total = layout(success.bounds)
        hot, hot_cell = success.mine()  # the binding thread's cell, found by one comparison

        # What it reads is in its defaults: smaller than closure cells, and read as locals.
        def observe(  # noqa: PLR0917 - defaults, never passed
            outcome: str,
            duration: float,
            _unrecorded: str | None,
            by_outcome: dict[str, HistogramSeries] = by_outcome,
            success: HistogramSeries = success,
            bounds: tuple[float, ...] = success.bounds,
            first: float = first,
            total: int = total,
            hot: int = hot,
            hot_cell: list[float] = hot_cell,
        ) -> None:
            # HistogramSeries.observe inline, one frame per call: this runs on every call.
            cell: list[float] | None
            if outcome == "success":
                if get_ident() == hot:
                    cell = hot_cell
                else:  # another thread: its cell is in the series' dict (made by a second one)
                    cell = success.cells.get(get_ident())
                    if cell is None:
                        cell = success.cell()
            else:
                series = by_outcome[outcome]
                ident = get_ident()
                cell = series.first if ident == series.ident else series.cells.get(ident)
                if cell is None:
                    cell = series.cell()
            if duration <= first:
                cell[0] += 1
            else:
                cell[bisect_left(bounds, duration)] += 1
            cell[total] += duration

        return observe

    def _bind_calls(self, service: str) -> dict[str, tuple[Inc, Observe]]:
        """A service's (multiprocess) call series by outcome; one dict for all under ``_other``."""
        self._first_call(service)
        shared: dict[str, tuple[Inc, Observe]] = self._shared(service, self._calls_for)
        return shared

    def _calls_for(self, service: str) -> dict[str, tuple[Inc, Observe]]:
        calls = self.metrics["buttress_calls_total"]
        durations = self.metrics["buttress_call_duration_seconds"]

        label = self.service_labels(service)

        def bind(outcome: str) -> tuple[Inc, Observe]:
            return calls.labels(label, outcome).inc, durations.labels(label, outcome).observe

        by_outcome: dict[str, tuple[Inc, Observe]] = Lazy(bind)
        for outcome in OUTCOMES:
            by_outcome[outcome] = bind(outcome)
        return by_outcome

    def _bind_local_calls(self, service: str) -> dict[str, HistogramSeries]:
        """A service's call series by outcome, each made at its first call; one dict for all
        the services under ``_other``.

        Until an outcome's first call the collector shows it as zeros (the service is in
        ``services``), which costs the service nothing at rest. The label is fixed now, so the
        cardinality guard counts services in the order of their first calls.
        """
        self.service_labels(service)
        self._first_call(service)
        shared: dict[str, HistogramSeries] = self._shared(service, self._local_calls_for)
        return shared

    def _local_calls_for(self, service: str) -> dict[str, HistogramSeries]:
        return ServiceSeries(self.local, _CALL_DURATIONS, service)

    def _first_call(self, service: str) -> None:
        # Every outcome exists from the first call, so a ratio such as timeouts / calls has its
        # series, and rate() sees the first increment of a new outcome. Past the cardinality
        # guard the first service stands for all: they show as "_other" and have no flags.
        other = self.service_labels(service) == OTHER_SERVICE
        with self._lock:
            if not other or not self._other_called:
                self._other_called = self._other_called or other
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

    def _on_budget_exhausted(self, event: RetryBudgetExhausted) -> None:
        self._inc["buttress_retry_budget_exhausted_total"][event.service, event.kind]()

    def _on_hedge(self, event: HedgeLaunched) -> None:
        self._inc["buttress_hedging_hedges_total"][event.service]()

    def _on_hedged_call(self, event: HedgeWon) -> None:
        self._inc["buttress_hedging_calls_total"][event.service, event.winner]()

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

    def _on_cache_lookup(self, event: CacheLookup) -> None:
        self._inc["buttress_cache_lookups_total"][event.service, event.result]()

    def _on_cache_stale(self, event: CacheServedStale) -> None:
        self._inc["buttress_cache_stale_served_total"][event.service, event.error_type]()

    def _on_coalescing_joined(self, event: CoalescingJoined) -> None:
        self._inc["buttress_coalescing_joined_total"][event.service]()

    def _on_deferral_queued(self, event: DeferralQueued) -> None:
        self._inc["buttress_deferral_queued_total"][event.service, event.error_type]()

    def _on_deferral_dropped(self, event: DeferralDropped) -> None:
        self._inc["buttress_deferral_dropped_total"][event.service, event.reason]()

    def _on_deferral_replayed(self, event: DeferralReplayed) -> None:
        self._inc["buttress_deferral_replayed_total"][event.service, event.outcome]()
        self._observe["buttress_deferral_wait_seconds"][event.service](event.waited)

    def _on_settings(self, event: SettingsReloaded) -> None:
        self._inc["buttress_config_reloads_total"]["success" if event.ok else "failure"]()

    def _on_shadow(self, event: ShadowDecision) -> None:
        self._inc["buttress_shadow_decisions_total"][event.service, event.pattern, event.action]()

    def _on_state_store(self, event: StateStoreError) -> None:
        if event.operation == "rate_limit":  # the fleet rate limit's store, not a circuit's
            self._inc["buttress_rate_limit_store_errors_total"][event.service, event.error_type]()
            return
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

        def on_limit_changed(event: BulkheadLimitChanged) -> None:
            limits[event.service](event.limit)

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
            BulkheadLimitChanged: on_limit_changed,
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

    def _forked(self) -> None:
        self._lock = threading.Lock()  # another of the parent's threads may have held it
        self._wake = threading.Event()
        self._watcher = None

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
        snapshots = [s for s in circuits().values() if s["service"] == service]
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
        return sum(s["queued"] for s in bulkheads().values() if s["service"] == service)

    def _write_level(self) -> None:
        with self._lock:
            pairs = list(self._states.items())
        self.metrics["buttress_health_degradation_level"].set(degradation_level(pairs))

    def _write_flags(self, service: str) -> None:
        if self.service_labels(service) != service:
            return  # past the cardinality guard: "_other" has no flags of its own
        snapshot = config.SNAPSHOT
        view = snapshot.service(service)
        self._set["buttress_flag_service_enabled"][service](view.enabled)
        self._set["buttress_flag_rollout_ratio"][service](view.rollout)
        self._set["buttress_flag_shadow_mode"][service](view.mode == "shadow")
        with self._lock:
            kill_switch = self.metrics.get(KILL_SWITCH)
            if kill_switch is None:
                kill_switch = create(FAMILIES[KILL_SWITCH], self._registry)
                self.metrics[KILL_SWITCH] = kill_switch
        kill_switch.set(snapshot.enabled)


def _ignore() -> None:
    """What a rejection by a pattern without a rejection counter increments."""


_REJECTED = {
    "circuit_breaker": "buttress_circuit_breaker_rejected_total",
    "bulkhead": "buttress_bulkhead_rejected_total",
    "rate_limit": "buttress_rate_limit_rejected_total",
    "adaptive_throttle": "buttress_adaptive_throttle_rejected_total",
}
_STATE_OF_REJECTION = {"forced_open": "forced_open", "half_open_full": "half_open"}
# Longest real-time wait of the open-circuit watcher between two readings of the buttress clock.
_WATCH_SLICE_SECONDS = 0.25
# A circuit that is down until it closes again, and the states that end that (recovery time).
_DOWN_STATES = frozenset({"open", "forced_open", "half_open"})
_UP_STATES = frozenset({"closed", "forced_closed", "disabled"})


def _call(method: weakref.WeakMethod[Callable[[], None]]) -> None:
    """Call ``method`` if its object still exists (a fork hook that must not keep it alive)."""
    bound = method()
    if bound is not None:
        bound()
