"""The metric catalog and the Prometheus subscriber: names, registries, gauges, multiprocess."""

from __future__ import annotations

import ast
import asyncio
import os
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from buttress import (
    circuit_breaker,
    config,
    events,
    instrumentation,
    retry_with_backoff,
    with_bulkhead,
    with_timeout,
)
from buttress.events import (
    BulkheadAcquired,
    BulkheadQueued,
    BulkheadReleased,
    CallFinished,
    CallRejected,
    CircuitCallRecorded,
    CircuitStateChanged,
    CircuitTrialStarted,
    RateLimitAcquired,
    RetryScheduled,
    SettingsReloaded,
    WorkerAbandoned,
    WorkerFinishedLate,
)
from buttress.instrumentation import prometheus
from buttress.instrumentation.prometheus import CATALOG, FAMILIES, LABELS, PrometheusSubscriber
from buttress.registry import breaker as shared_breaker

SRC = Path(__file__).resolve().parents[2] / "src"
GAUGE_MODES = {
    "all",
    "liveall",
    "min",
    "livemin",
    "max",
    "livemax",
    "sum",
    "livesum",
    "mostrecent",
    "livemostrecent",
}


@contextmanager
def attached(subscriber: PrometheusSubscriber) -> Iterator[PrometheusSubscriber]:
    """``subscriber``'s handlers subscribed for the block (without touching configure())."""
    undos = [events.subscribe(h, [kind]) for kind, h in subscriber.handlers().items()]
    try:
        yield subscriber
    finally:
        for undo in undos:
            undo()


# --- the package's parts ------------------------------------------------------------------------


def buttress_imports(module: str) -> set[str]:
    """The buttress modules (and ``from buttress import`` names) that ``module`` imports."""
    path = SRC / (module.replace(".", "/") + ".py")
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("buttress"):
            if node.module == "buttress":
                found |= {f"buttress.{alias.name}" for alias in node.names}
            else:
                found.add(node.module or "")
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("buttress")}
    return found


def test_the_collector_reads_buttress_state_only_through_the_health_snapshot():
    package = "buttress.instrumentation.prometheus"
    imported = buttress_imports(f"{package}.collector")
    assert {m for m in imported if not m.startswith(f"{package}.")} == {"buttress.health_app"}
    for part in ("__init__", "catalog", "series", "subscriber", "collector"):
        reached = buttress_imports(f"{package}.{part}")
        assert not {m for m in reached if m.startswith(("buttress.registry", "buttress.patterns"))}


# --- the catalog ----------------------------------------------------------------------------------


def test_the_catalog_has_at_least_30_uniquely_named_families():
    names = [family.name for family in CATALOG]
    assert len(names) >= 30
    assert len(set(names)) == len(names)
    assert set(FAMILIES) == set(names)


@pytest.mark.parametrize("family", CATALOG, ids=lambda f: f.name)
def test_names_follow_the_convention(family):
    assert family.name.startswith("buttress_")
    assert family.name == family.name.lower()
    if family.kind == "counter":
        assert family.name.endswith("_total")
    else:
        assert not family.name.endswith("_total")
    if family.kind == "histogram":
        assert family.name.endswith("_seconds")
        assert family.buckets == tuple(sorted(family.buckets or ()))
    assert family.help.strip()


@pytest.mark.parametrize("family", CATALOG, ids=lambda f: f.name)
def test_labels_are_bounded_vocabularies(family):
    assert set(family.labels) <= LABELS
    assert len(set(family.labels)) == len(family.labels)


@pytest.mark.parametrize("family", CATALOG, ids=lambda f: f.name)
def test_every_family_is_fed_by_events_both_subscriber_modes_consume(family):
    assert family.fed_by, f"{family.name} is fed by no event"
    # Multiprocess mode writes every family from events; a single process reads gauges at scrape.
    multiprocess = PrometheusSubscriber(None, multiprocess=True).handlers()
    assert set(family.fed_by) <= set(multiprocess)
    if family.kind != "gauge":
        assert set(family.fed_by) <= set(PrometheusSubscriber(None, multiprocess=False).handlers())


@pytest.mark.parametrize("family", [f for f in CATALOG if f.kind == "gauge"], ids=lambda f: f.name)
def test_every_gauge_says_how_processes_combine(family):
    assert family.multiprocess_mode in GAUGE_MODES


def test_attempt_numbers_are_capped():
    labels = [prometheus.attempt_label(n) for n in range(1, 13)]
    assert labels == ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10+", "10+", "10+"]


# --- registries and configure() -------------------------------------------------------------------


def test_a_custom_registry_gets_every_family(metrics):
    exposed = {metric.name for metric in metrics.registry.collect()}
    # prometheus_client names a counter family without its _total suffix.
    assert exposed == {f.name.removesuffix("_total") for f in CATALOG}


def test_the_default_registry_has_the_families_after_install_defaults(restore_subscribers):
    instrumentation.install_defaults()
    instrumentation.install_defaults()  # idempotent: no duplicate registration
    assert instrumentation.installed()["prometheus"] is REGISTRY
    registered = {metric.name for metric in REGISTRY.collect()}
    assert {f.name.removesuffix("_total") for f in CATALOG} <= registered


def test_configure_again_with_the_same_targets_changes_nothing(restore_subscribers):
    registry = CollectorRegistry()
    instrumentation.configure(prometheus=registry, otel=False, logging=False)
    routes = dict(events.ROUTES)
    instrumentation.configure(prometheus=registry, otel=False, logging=False)
    assert routes == events.ROUTES
    events.emit(CallFinished("svc", "success", 0.01, None))
    assert (
        registry.get_sample_value("buttress_calls_total", {"service": "svc", "outcome": "success"})
        == 1
    )


def test_off_and_on_again_reuses_the_registered_families(restore_subscribers):
    registry = CollectorRegistry()
    instrumentation.configure(prometheus=registry, otel=False, logging=False)
    events.emit(CallFinished("svc", "failure", 0.01, "ValueError"))
    instrumentation.configure(prometheus=False)
    assert "prometheus" not in instrumentation.installed()
    events.emit(CallFinished("svc", "failure", 0.01, "ValueError"))  # nobody counts it
    instrumentation.configure(prometheus=registry)  # no DuplicateTimeseries
    events.emit(CallFinished("svc", "failure", 0.01, "ValueError"))
    labels = {"service": "svc", "outcome": "failure"}
    assert registry.get_sample_value("buttress_calls_total", labels) == 2


def test_switching_registries_moves_the_counting(restore_subscribers):
    first, second = CollectorRegistry(), CollectorRegistry()
    instrumentation.configure(prometheus=first, otel=False, logging=False)
    events.emit(CallFinished("svc", "success", 0.01, None))
    instrumentation.configure(prometheus=second)
    events.emit(CallFinished("svc", "success", 0.01, None))
    events.emit(CallFinished("svc", "success", 0.01, None))
    labels = {"service": "svc", "outcome": "success"}
    assert first.get_sample_value("buttress_calls_total", labels) == 1
    assert second.get_sample_value("buttress_calls_total", labels) == 2


def test_with_every_subscriber_off_no_event_is_routed_to_them(restore_subscribers):
    instrumentation.configure(prometheus=False, otel=False, logging=False)
    assert instrumentation.installed() == {}
    ours = [
        handler
        for handlers in events.ROUTES.values()
        for handler in handlers
        if handler.__module__.startswith("buttress.instrumentation")
    ]
    assert ours == []


class Counting:
    """Wraps a binding function and counts the calls (a spy on the hot path's cost)."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def test_series_are_bound_once_per_service_and_outcome_in_a_single_process():
    registry = CollectorRegistry()
    subscriber = PrometheusSubscriber(registry, multiprocess=False)
    spy = subscriber.local.child = Counting(subscriber.local.child)
    with attached(subscriber):
        for _ in range(50):
            events.emit(CallFinished("svc", "success", 0.001, None))
            events.emit(CallFinished("svc", "failure", 0.001, "ValueError"))
    # Once per outcome the service had (at its first call of that outcome), never per call.
    assert spy.calls == 2
    # The outcomes it has not had yet are still shown, as zeros, from its first call.
    for outcome in prometheus.OUTCOMES:
        labels = {"service": "svc", "outcome": outcome}
        expected = 50 if outcome in {"success", "failure"} else 0
        assert registry.get_sample_value("buttress_calls_total", labels) == expected
    (series,) = [
        s
        for labels, s in subscriber.local.series["buttress_call_duration_seconds"].items()
        if labels == ("svc", "success")
    ]
    assert sum(series.read()[0]) == 50


def test_suspended_removes_every_subscriber_and_restores_them(restore_subscribers):
    instrumentation.install_defaults()
    registry = CollectorRegistry()
    instrumentation.configure(prometheus=registry)
    before = instrumentation.installed()
    assert before["prometheus"] is registry
    routes = dict(events.ROUTES)
    with instrumentation.suspended():
        assert instrumentation.installed() == {}
        assert events.ROUTES.get(events.ChaosInjected) is None
        assert events.ROUTES.get(events.FallbackUsed) is None  # health's tracking too
    assert instrumentation.installed() == before
    assert {k: len(v) for k, v in events.ROUTES.items()} == {k: len(v) for k, v in routes.items()}


def test_label_children_are_bound_once_per_service_and_outcome_in_multiprocess_mode():
    registry = CollectorRegistry()
    subscriber = PrometheusSubscriber(registry, multiprocess=True)
    metric = subscriber.metrics["buttress_calls_total"]
    spy = metric.labels = Counting(metric.labels)
    with attached(subscriber):
        for _ in range(50):
            events.emit(CallFinished("svc", "success", 0.001, None))
            events.emit(CallFinished("svc", "failure", 0.001, "ValueError"))
    assert spy.calls == len(prometheus.OUTCOMES)
    labels = {"service": "svc", "outcome": "success"}
    assert registry.get_sample_value("buttress_calls_total", labels) == 50


def test_a_single_process_exposes_counters_and_histograms_like_prometheus_client(metrics):
    for duration in (0.0005, 0.001, 0.3, 200.0):
        events.emit(CallFinished("svc", "success", duration, None))
    buckets = {
        dict(labels)["le"]: value
        for labels, value in metrics.samples("buttress_call_duration_seconds_bucket").items()
        if dict(labels)["outcome"] == "success"
    }
    assert buckets["0.001"] == 2  # le is inclusive
    assert buckets["0.25"] == 2
    assert buckets["0.5"] == 3
    assert buckets["120.0"] == 3
    assert buckets["+Inf"] == 4
    assert (
        metrics.value("buttress_call_duration_seconds_count", service="svc", outcome="success") == 4
    )
    assert metrics.value(
        "buttress_call_duration_seconds_sum", service="svc", outcome="success"
    ) == pytest.approx(200.3015)
    assert metrics.value("buttress_calls_total", service="svc", outcome="success") == 4
    assert metrics.value("buttress_calls_total", service="svc", outcome="timeout") == 0


@pytest.fixture
def switch_often() -> Iterator[None]:
    """Switch threads as often as CPython allows: races on a series' first cells get their turn."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


# Amounts at, just above and far from the bounds of the call and timeout histograms, for the
# recorders' inlined observation (the first bucket tested with one comparison, then a search).
_AMOUNTS = (0.0, 0.0004, 0.001, 0.0010000001, 0.003, 0.25, 0.2500001, 60, 120, 121.5, 1e9)


@pytest.mark.parametrize("kind", [CallFinished, events.TimedCallFinished], ids=lambda k: k.__name__)
def test_a_histogram_written_from_threads_and_tasks_scrapes_what_was_observed(
    kind, restore_subscribers
):
    # Through the recorder (the inlined observation of the bound path), from 8 threads and from
    # tasks on two of them: every bucket, the count and the sum are what prometheus_client's own
    # Histogram shows for the same amounts.
    registry = CollectorRegistry()
    instrumentation.configure(prometheus=registry, otel=False, logging=False)
    reference = CollectorRegistry()
    family = FAMILIES[
        "buttress_call_duration_seconds"
        if kind is CallFinished
        else "buttress_timeout_elapsed_seconds"
    ]
    expected = prometheus.series.create(family, reference)
    service = f"observed-{kind.__name__}"
    labels = (service, "success") if kind is CallFinished else (service,)
    record = events.recorder(kind, service)

    def observe(amount: float) -> None:
        if kind is CallFinished:
            record.record("success", amount, None)
        else:
            record.record(amount, False)

    rounds, threads = 40, 8
    start = threading.Barrier(threads)

    def run(index: int) -> None:
        start.wait()
        for _ in range(rounds):
            for amount in _AMOUNTS:
                observe(amount)
        if index < 2:  # tasks share their thread's cell

            async def task() -> None:
                for amount in _AMOUNTS:
                    observe(amount)
                    await asyncio.sleep(0)

            async def main() -> None:
                await asyncio.gather(*(task() for _ in range(5)))

            asyncio.run(main())

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    observed = threads * rounds + 2 * 5
    for _ in range(observed):
        for amount in _AMOUNTS:
            expected.labels(*labels).observe(amount)

    def samples(source: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for metric in source.collect()
            if metric.name == family.name
            for sample in metric.samples
            if sample.labels.get("service") == service
            and not sample.name.endswith("_created")
            and sample.labels.get("outcome", "success") == "success"
        }

    got, want = samples(registry), samples(reference)
    [total] = [key for key in want if key[0].endswith("_sum")]
    assert got.pop(total) == pytest.approx(want.pop(total))
    assert got == want
    [count] = [value for key, value in got.items() if key[0].endswith("_count")]
    assert count == observed * len(_AMOUNTS)


def test_a_histogram_series_observed_by_one_thread_keeps_its_cell_without_a_dict():
    # Most series only ever see one thread: its cell is the series' ``first``, no dict of its own.
    series = prometheus.series.HistogramSeries((0.1, 1.0))
    assert series.read() == ([0, 0, 0], 0.0)
    for amount in (0.05, 0.5, 5.0, 0.5):
        series.observe(amount)
    assert series.cells is prometheus.series._NO_CELLS
    assert series.mine() == (threading.get_ident(), series.first)
    assert series.read() == ([1, 2, 1], 6.05)
    assert prometheus.series._NO_CELLS == {}


def test_threads_and_tasks_racing_on_a_new_histogram_series_keep_every_observation(
    switch_often,
):
    # 16 threads (one of them running 8 tasks) make their first cells of a new series at once,
    # through observe(), cell() and mine(): each thread has one cell, the first thread's is in
    # the dict the second one made, and a read (taken while they write, and after) loses nothing.
    series = prometheus.series.HistogramSeries((0.1, 1.0))
    start = threading.Barrier(17)
    cells: dict[int, list[list[float]]] = {}
    reads: list[int] = []

    def observe(n: int) -> None:
        cell = series.cell() if n % 3 == 1 else series.mine()[1] if n % 3 == 2 else None
        for _ in range(500):
            series.observe(0.5)
        cells.setdefault(threading.get_ident(), []).append(series.cell())
        if cell is not None:
            cells[threading.get_ident()].append(cell)

    def thread(n: int) -> None:
        start.wait()
        observe(n)

    async def tasks() -> None:
        start.wait()

        async def task(n: int) -> None:
            await asyncio.sleep(0)
            observe(n)

        await asyncio.gather(*(task(n) for n in range(8)))

    def reader() -> None:
        start.wait()
        for _ in range(50):
            reads.append(sum(series.read()[0]))

    workers = [threading.Thread(target=thread, args=(n,)) for n in range(15)]
    workers += [threading.Thread(target=asyncio.run, args=(tasks(),))]
    workers += [threading.Thread(target=reader)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    buckets, total = series.read()
    assert buckets == [0, 500 * 23, 0]
    assert total == pytest.approx(0.5 * 500 * 23)
    assert reads == sorted(reads)  # a read never loses what an earlier one counted
    assert all(read <= 500 * 23 for read in reads)
    # One cell per thread, every one in the dict (the first thread's too).
    assert len(cells) == 16
    assert all(len({id(cell) for cell in mine}) == 1 for mine in cells.values())
    assert {ident: mine[0] for ident, mine in cells.items()} == series.cells
    assert series.first is series.cells[series.ident]


def test_a_thread_that_observed_first_finds_its_cell_after_another_binds(restore_subscribers):
    # The series' first cell is one thread's; a recorder bound on another thread later (its hot
    # thread) leaves the first thread to the dict, where its cell is, not a new one.
    series = prometheus.series.HistogramSeries((0.1, 1.0))
    series.observe(0.5)
    first = series.first
    bound: list[tuple[int, list[float]]] = []
    binder = threading.Thread(target=lambda: bound.append(series.mine()))
    binder.start()
    binder.join()
    assert bound[0][1] is not first
    assert series.cells == {threading.get_ident(): first, bound[0][0]: bound[0][1]}
    series.observe(0.5)
    assert series.read() == ([0, 2, 0], 1.0)


def test_a_failing_outcome_on_one_thread_makes_its_cell_once(restore_subscribers, monkeypatch):
    # The recorder's inlined path for an outcome other than success finds the thread's cell in
    # the series' ``first`` (no dict, no call to cell() after the first observation).
    registry = CollectorRegistry()
    instrumentation.configure(prometheus=registry, otel=False, logging=False)
    made: list[int] = []
    cell = prometheus.series.HistogramSeries.cell

    def counted(self: prometheus.series.HistogramSeries) -> list[float]:
        made.append(1)
        return cell(self)

    monkeypatch.setattr(prometheus.series.HistogramSeries, "cell", counted)
    record = events.recorder(CallFinished, "one-thread-failures")
    for _ in range(5):
        record.record("failure", 0.5, "ConnectionError")
    for _ in range(5):
        record.record("success", 0.05, None)
    assert len(made) == 2  # the success series' (bound), the failure series' (first observed)
    metric = {
        (sample.name, sample.labels.get("outcome")): sample.value
        for family in registry.collect()
        if family.name == "buttress_call_duration_seconds"
        for sample in family.samples
        if sample.labels.get("service") == "one-thread-failures"
    }
    assert metric["buttress_call_duration_seconds_count", "failure"] == 5
    assert metric["buttress_call_duration_seconds_count", "success"] == 5


# --- counters and histograms from events ----------------------------------------------------------


def test_calls_count_every_outcome_from_the_first_call(metrics):
    events.emit(CallFinished("openfga", "timeout", 5.0, "TimeoutExceededError"))
    for outcome in prometheus.OUTCOMES:
        expected = 1 if outcome == "timeout" else 0
        assert metrics.value("buttress_calls_total", service="openfga", outcome=outcome) == expected
    bucket = metrics.value(
        "buttress_call_duration_seconds_bucket", service="openfga", outcome="timeout", le="5.0"
    )
    assert bucket == 1


def test_retry_attempts_are_labelled_with_the_attempt_about_to_run(metrics):
    for failed in (1, 2, 9, 10, 30):
        events.emit(RetryScheduled("llm", failed, 0.5, "ConnectionError", "backoff"))
    samples = metrics.samples("buttress_retry_attempts_total")
    by_number = {dict(labels)["attempt_number"]: value for labels, value in samples.items()}
    assert by_number == {"2": 1, "3": 1, "10+": 3}
    assert (
        metrics.value("buttress_retry_errors_total", service="llm", error_type="ConnectionError")
        == 5
    )
    assert metrics.value("buttress_retry_delay_seconds_count", service="llm", reason="backoff") == 5


def test_recovery_time_runs_from_opening_to_closing_across_half_open_retrips(metrics, clock):
    changes = [
        ("closed", "open", "fail_max", 0),
        ("open", "half_open", "timeout_elapsed", 30),
        ("half_open", "open", "trial_failed", 1),
        ("open", "half_open", "timeout_elapsed", 30),
        ("half_open", "closed", "success_threshold", 2),
    ]
    for old, new, reason, after in changes:
        clock.advance(after)
        events.emit(CircuitStateChanged("redis", old, new, reason, None))
    assert metrics.value("buttress_circuit_breaker_recovery_seconds_count", service="redis") == 1
    assert metrics.value("buttress_circuit_breaker_recovery_seconds_sum", service="redis") == 63
    transitions = metrics.samples("buttress_circuit_breaker_transitions_total")
    assert sum(transitions.values()) == 5
    key = (("reason", "trial_failed"), ("service", "redis"), ("state", "open"))
    assert transitions[key] == 1


def test_waits_are_observed_only_for_calls_that_waited(metrics):
    events.emit(BulkheadAcquired("db", 0.0, 1, 0, 10))
    events.emit(BulkheadAcquired("db", 0.25, 10, 3, 10))
    events.emit(RateLimitAcquired("db", 0.0, 4.0))
    events.emit(RateLimitAcquired("db", 0.5, 0.0))
    assert metrics.value("buttress_bulkhead_queue_wait_seconds_count", service="db") == 1
    assert metrics.value("buttress_bulkhead_queue_wait_seconds_sum", service="db") == 0.25
    assert metrics.value("buttress_rate_limit_waits_total", service="db") == 1
    assert metrics.value("buttress_rate_limit_wait_seconds_sum", service="db") == 0.5


def test_rejections_are_counted_per_pattern(metrics):
    events.emit(CallRejected("api", "circuit_breaker", "open", 12.0))
    events.emit(CallRejected("api", "bulkhead", "full", None))
    events.emit(CallRejected("api", "bulkhead", "queue_timeout", None))
    events.emit(CallRejected("api", "rate_limit", "no_tokens", 0.2))
    assert (
        metrics.value("buttress_circuit_breaker_rejected_total", service="api", reason="open") == 1
    )
    assert metrics.value("buttress_bulkhead_rejected_total", service="api", reason="full") == 1
    assert (
        metrics.value("buttress_bulkhead_rejected_total", service="api", reason="queue_timeout")
        == 1
    )
    assert (
        metrics.value("buttress_rate_limit_rejected_total", service="api", reason="no_tokens") == 1
    )


# --- gauges in a single process: read from the objects at scrape time -----------------------------


def test_gauges_show_the_live_state_of_breakers_and_bulkheads(metrics, clock):
    inside = {}

    @circuit_breaker(name="billing", fail_max=2, timeout=30)
    @with_bulkhead(limit=4)
    def charge(fail=False):
        inside["active"] = metrics.value("buttress_bulkhead_active", service="billing")
        if fail:
            raise ConnectionError("down")
        return "ok"

    assert charge() == "ok"
    assert inside["active"] == 1  # read during the call
    assert metrics.value("buttress_bulkhead_active", service="billing") == 0
    assert metrics.value("buttress_bulkhead_limit", service="billing") == 4
    assert metrics.value("buttress_bulkhead_queue_depth", service="billing") == 0
    assert metrics.value("buttress_circuit_breaker_state", service="billing", state="closed") == 1
    for _ in range(2):
        with pytest.raises(ConnectionError):
            charge(fail=True)
    states = {
        dict(labels)["state"]: value
        for labels, value in metrics.samples("buttress_circuit_breaker_state").items()
    }
    assert states == {
        "closed": 0,
        "open": 1,
        "half_open": 0,
        "forced_open": 0,
        "forced_closed": 0,
        "disabled": 0,
    }
    assert metrics.value("buttress_health_degradation_level") == 2  # normal criticality
    assert metrics.value("buttress_flag_enabled") == 1
    assert metrics.value("buttress_flag_service_enabled", service="billing") == 1
    assert metrics.value("buttress_flag_shadow_mode", service="billing") == 0
    assert metrics.value("buttress_flag_rollout_ratio", service="billing") == 1
    assert metrics.value("buttress_config_generation") == config.SNAPSHOT.generation


def test_an_open_circuit_whose_time_ran_out_is_scraped_as_half_open(metrics, clock, mode):
    # Nothing calls the service (its instance left the load balancer): the scrape must not show
    # the circuit open, nor the level critical, for ever. The breaker itself is not moved.
    config.reload_settings(env={"BUTTRESS_SERVICES__AUTH__CRITICALITY": "critical"})
    try:

        def down():
            raise ConnectionError("down")

        call = circuit_breaker(name="auth", fail_max=1, timeout=30)(mode.define(down))
        assert isinstance(mode.outcome(call), ConnectionError)
        assert metrics.value("buttress_circuit_breaker_state", service="auth", state="open") == 1
        assert metrics.value("buttress_health_degradation_level") == 4
        clock.advance(30)
        state = metrics.samples("buttress_circuit_breaker_state")
        assert {dict(k)["state"] for k, v in state.items() if v == 1} == {"half_open"}
        assert metrics.value("buttress_health_degradation_level") == 1
        moves = metrics.samples("buttress_circuit_breaker_transitions_total")
        assert [dict(k)["state"] for k in moves] == ["open"]  # no transition was made
    finally:
        config.reload_settings()


def test_a_breaker_forced_open_shows_before_any_call(metrics):
    from buttress import registry
    from buttress.patterns.circuit_breaker import CircuitBreaker, CircuitBreakerOptions

    breaker = registry.shared(
        "circuit_breaker",
        "search",
        CircuitBreakerOptions(),
        lambda opts: CircuitBreaker("search", opts),
    )
    breaker.force_open()
    assert (
        metrics.value("buttress_circuit_breaker_state", service="search", state="forced_open") == 1
    )
    assert metrics.value("buttress_flag_service_enabled", service="search") == 1


# --- gauges in multiprocess mode: written from events ---------------------------------------------


def test_multiprocess_gauges_follow_the_events():
    registry = CollectorRegistry()
    subscriber = PrometheusSubscriber(registry, multiprocess=True)

    def value(name, **labels):
        return registry.get_sample_value(name, labels)

    with attached(subscriber):
        assert value("buttress_flag_enabled") is None  # not 0 ("switched off") before it is known
        events.emit(CallFinished("pay", "success", 0.01, None))
        assert value("buttress_flag_enabled") == 1
        assert value("buttress_flag_service_enabled", service="pay") == 1
        events.emit(CircuitCallRecorded("pay", "failure", 0.01, False, "OSError", 0.75, None))
        assert value("buttress_circuit_breaker_state", service="pay", state="closed") == 1
        assert value("buttress_circuit_breaker_failure_rate", service="pay") == 0.75
        events.emit(CircuitStateChanged("pay", "closed", "open", "failure_rate", 12.0))
        assert value("buttress_circuit_breaker_state", service="pay", state="open") == 1
        assert value("buttress_circuit_breaker_state", service="pay", state="closed") == 0
        assert value("buttress_health_degradation_level") == 2
        events.emit(CircuitTrialStarted("pay", 1))
        events.emit(BulkheadQueued("pay", 2))
        assert value("buttress_bulkhead_queue_depth", service="pay") == 2
        events.emit(BulkheadAcquired("pay", 0.1, 5, 1, 5))
        assert value("buttress_bulkhead_active", service="pay") == 5
        assert value("buttress_bulkhead_limit", service="pay") == 5
        events.emit(BulkheadReleased("pay", 4, 0))
        assert value("buttress_bulkhead_active", service="pay") == 4
        assert value("buttress_bulkhead_queue_depth", service="pay") == 0
        events.emit(RateLimitAcquired("pay", 0.0, 7.5))
        assert value("buttress_rate_limit_tokens", service="pay") == 7.5
        events.emit(WorkerAbandoned("pay", 2))
        assert value("buttress_timeout_abandoned_workers", service="pay") == 2
        events.emit(WorkerFinishedLate("pay", 1, 0.3))
        assert value("buttress_timeout_abandoned_workers", service="pay") == 1
        events.emit(SettingsReloaded(ok=True, generation=7, error=None))
        assert value("buttress_config_generation") == 7
        assert value("buttress_config_reloads_total", outcome="success") == 1


@pytest.mark.parametrize("multiprocess", [False, True], ids=["single", "multiprocess"])
def test_the_default_stack_writes_the_same_numbers_in_both_modes(multiprocess, mode, clock):
    # Through the recorders as configure() binds them (single process: the bulkhead's declined,
    # the histograms inlined; multiprocess: gauges written from built events), with logging at
    # its default level (its binders decline): every per-call number the stack writes.
    registry = CollectorRegistry()
    subscriber = PrometheusSubscriber(registry, multiprocess=multiprocess)
    binders = subscriber.binders()
    undos = [
        events.subscribe(handler, [kind], binder=binders.get(kind))
        for kind, handler in subscriber.handlers().items()
    ]
    before = instrumentation.installed()
    instrumentation.configure(prometheus=False, otel=True, logging=True)
    service = f"both-modes-{mode.name}-{'mp' if multiprocess else 'sp'}"
    try:
        fn = circuit_breaker(name=service, fail_max=5)(
            retry_with_backoff(name=service, max_attempts=2)(
                with_timeout(name=service, seconds=5)(
                    with_bulkhead(name=service, limit=3)(mode.define(latency=0.002))
                )
            )
        )
        for _ in range(7):
            assert mode.run(fn) == "ok"
    finally:
        for undo in undos:
            undo()
        instrumentation.configure(
            prometheus=before.get("prometheus", False),  # type: ignore[arg-type]
            otel=before.get("otel", False),  # type: ignore[arg-type]
            logging=before.get("logging", False),  # type: ignore[arg-type]
        )

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"service": service, **labels})

    assert value("buttress_calls_total", outcome="success") == 7
    assert value("buttress_call_duration_seconds_count", outcome="success") == 7
    assert value("buttress_call_duration_seconds_bucket", outcome="success", le="0.005") == 7
    assert value("buttress_call_duration_seconds_bucket", outcome="success", le="0.001") == 0
    assert value("buttress_call_duration_seconds_sum", outcome="success") == pytest.approx(0.014)
    assert value("buttress_timeout_elapsed_seconds_count") == 7
    assert value("buttress_timeout_elapsed_seconds_sum") == pytest.approx(0.014)
    assert value("buttress_circuit_breaker_successes_total") == 7
    assert value("buttress_bulkhead_queue_wait_seconds_count") in (None, 0)
    assert value("buttress_bulkhead_limit") == 3
    assert value("buttress_bulkhead_active") == 0


def wait_for(condition, seconds=2.0):
    """Poll ``condition`` (a background thread writes the value) for at most ``seconds``."""
    done = threading.Event()
    for _ in range(int(seconds / 0.01)):
        if condition():
            return True
        done.wait(0.01)
    return condition()


@pytest.mark.realtime  # waits (< 1 s) for the watcher thread, which reads the clock in slices
def test_multiprocess_gauges_follow_an_open_circuit_whose_time_runs_out(clock, mode):
    # In multiprocess mode gauges are written from events, and an idle circuit emits none: a
    # watcher thread of the subscriber writes half_open when the open time has run out.
    registry = CollectorRegistry()
    subscriber = PrometheusSubscriber(registry, multiprocess=True)

    def state(name):
        return registry.get_sample_value(
            "buttress_circuit_breaker_state", {"service": "pay", "state": name}
        )

    def down():
        raise ConnectionError("down")

    call = circuit_breaker(name="pay", fail_max=1, timeout=20)(mode.define(down))
    with attached(subscriber):
        assert isinstance(mode.outcome(call), ConnectionError)
        assert (state("open"), registry.get_sample_value("buttress_health_degradation_level")) == (
            1,
            2,
        )
        clock.advance(19)
        assert not wait_for(lambda: state("half_open") == 1, seconds=0.3)
        clock.advance(1)
        assert wait_for(lambda: state("half_open") == 1)
        assert state("open") == 0
        assert registry.get_sample_value("buttress_health_degradation_level") == 1
        assert wait_for(lambda: subscriber._watcher is None)  # nothing left to watch
        assert shared_breaker("pay").current_state == "open"  # the breaker was not moved
        # A failed trial opens it again, for another 20 s: watched again.
        assert isinstance(mode.outcome(call), ConnectionError)
        assert state("open") == 1
        clock.advance(20)
        assert wait_for(lambda: state("half_open") == 1)


def test_multiprocess_queue_depth_drops_after_a_queue_timeout(clock):
    registry = CollectorRegistry()
    release = threading.Event()
    entered = threading.Event()

    @with_bulkhead(name="db", limit=1, max_queue=1, queue_timeout=5)
    def hold():
        entered.set()
        release.wait(10)
        return "done"

    def depth():
        return registry.get_sample_value("buttress_bulkhead_queue_depth", {"service": "db"})

    with attached(PrometheusSubscriber(registry, multiprocess=True)):
        holder = threading.Thread(target=hold)
        holder.start()
        assert entered.wait(5)
        outcome = []
        waiter = threading.Thread(target=lambda: outcome.append(_outcome(hold)))
        waiter.start()
        assert wait_for(lambda: depth() == 1)
        for _ in range(100):  # until the queued call has timed out (it may not wait yet)
            clock.advance(5)
            waiter.join(0.05)
            if not waiter.is_alive():
                break
        assert type(outcome[0]).__name__ == "BulkheadFullError"
        assert depth() == 0
        release.set()
        holder.join(5)


def test_multiprocess_queue_depth_drops_when_a_queued_task_times_out(clock):
    registry = CollectorRegistry()

    async def hang():
        await asyncio.Event().wait()  # until cancelled

    held = with_bulkhead(name="db", limit=1, max_queue=1)(hang)
    timed = with_timeout(name="db", seconds=1)(held)

    def depth():
        return registry.get_sample_value("buttress_bulkhead_queue_depth", {"service": "db"})

    async def scenario():
        holder = asyncio.create_task(held())
        await asyncio.sleep(0)
        queued = asyncio.create_task(timed())
        for _ in range(20):  # until it waits in the queue
            await asyncio.sleep(0)
        assert depth() == 1
        clock.advance(1)  # its timeout cancels it out of the queue; the holder keeps its slot
        outcome = await asyncio.gather(queued, return_exceptions=True)
        in_queue = depth()
        holder.cancel()
        await asyncio.gather(holder, return_exceptions=True)
        return outcome[0], in_queue

    with attached(PrometheusSubscriber(registry, multiprocess=True)):
        outcome, in_queue = asyncio.run(scenario())
    assert type(outcome).__name__ == "TimeoutExceededError"
    assert in_queue == 0


def _outcome(fn):
    try:
        return fn()
    except Exception as exc:
        return exc


def test_multiprocess_circuit_state_is_inferred_from_a_rejection():
    registry = CollectorRegistry()
    with attached(PrometheusSubscriber(registry, multiprocess=True)):
        events.emit(CallRejected("pay", "circuit_breaker", "forced_open", None))
    assert (
        registry.get_sample_value(
            "buttress_circuit_breaker_state", {"service": "pay", "state": "forced_open"}
        )
        == 1
    )


WORKER = """
import os, sys
import buttress
from buttress import circuit_breaker, instrumentation, with_bulkhead
instrumentation.install_defaults()

@circuit_breaker(name="openfga", fail_max=2, timeout=60)
@with_bulkhead(limit=5)
def check(ok):
    if not ok:
        raise ConnectionError("down")
    return True

for ok in (True, True, True, False, False):
    try:
        check(ok)
    except ConnectionError:
        pass
print(os.getpid())
"""

SCRAPE = """
import sys
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
for pid in sys.argv[1:]:
    multiprocess.mark_process_dead(int(pid))
registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry)
sys.stdout.write(generate_latest(registry).decode())
"""


def scrape(env, *dead_pids):
    run = subprocess.run(
        [sys.executable, "-c", SCRAPE, *map(str, dead_pids)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    values = {}
    for family in text_string_to_metric_families(run.stdout):
        for sample in family.samples:
            values[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return values


def test_two_worker_processes_and_one_scrape(tmp_path):
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
        "PYTHONPATH": str(SRC),
    }
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(WORKER)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    pids = []
    for worker in workers:
        out, err = worker.communicate(timeout=60)
        assert worker.returncode == 0, err
        pids.append(int(out.strip()))
    both = scrape(env)
    service = ("service", "openfga")
    assert both["buttress_calls_total", (("outcome", "success"), service)] == 6
    assert both["buttress_calls_total", (("outcome", "failure"), service)] == 4
    assert (
        both[
            "buttress_circuit_breaker_failures_total", (("error_type", "ConnectionError"), service)
        ]
        == 4
    )
    assert both["buttress_call_duration_seconds_count", (("outcome", "success"), service)] == 6
    # Gauges combine per their mode: livesum counts the workers in each state and adds the limits.
    assert both["buttress_circuit_breaker_state", (service, ("state", "open"))] == 2
    assert both["buttress_circuit_breaker_state", (service, ("state", "closed"))] == 0
    assert both["buttress_bulkhead_limit", (service,)] == 10
    assert both["buttress_bulkhead_active", (service,)] == 0
    assert both["buttress_health_degradation_level", ()] == 2  # livemax
    assert both["buttress_flag_enabled", ()] == 1  # livemostrecent
    # A worker that died (gunicorn's child_exit) leaves the live gauges, not the counters.
    one = scrape(env, pids[0])
    assert one["buttress_circuit_breaker_state", (service, ("state", "open"))] == 1
    assert one["buttress_bulkhead_limit", (service,)] == 5
    assert one["buttress_calls_total", (("outcome", "success"), service)] == 6


IDLE_WORKER = """
import os, threading
from buttress import circuit_breaker, instrumentation
instrumentation.install_defaults()

@circuit_breaker(name="openfga", fail_max=1, timeout=0.2)
def check():
    raise ConnectionError("down")

try:
    check()
except ConnectionError:
    pass
threading.Event().wait(0.6)  # idle, as an instance its load balancer dropped: no call at all
print(os.getpid())
"""


@pytest.mark.realtime
def test_an_idle_worker_writes_its_open_circuit_ready_to_probe(tmp_path):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(SRC)}
    worker = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(IDLE_WORKER)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert worker.returncode == 0, worker.stderr
    values = scrape(env)
    service = ("service", "openfga")
    assert values["buttress_circuit_breaker_state", (service, ("state", "half_open"))] == 1
    assert values["buttress_circuit_breaker_state", (service, ("state", "open"))] == 0
    assert values["buttress_health_degradation_level", ()] == 1


# --- docs/metrics.md ------------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
ROW = re.compile(
    r"^\| `(buttress_[a-z_]+)` \| (counter|gauge|histogram)(?: \(`(\w+)`\))? \| ([^|]+) \|"
)


def test_docs_list_every_family_with_its_type_mode_and_labels():
    documented = {}
    for line in DOCS.read_text().splitlines():
        match = ROW.match(line)
        if match:
            name, kind, mode, labels = match.groups()
            assert name not in documented, f"{name} documented twice"
            documented[name] = (kind, mode, tuple(re.findall(r"`(\w+)`", labels)))
    expected = {f.name: (f.kind, f.multiprocess_mode, f.labels) for f in CATALOG}
    assert documented == expected


def test_docs_map_the_adr_names():
    text = DOCS.read_text()
    for adr in (
        "circuit_breaker_state{service, state}",
        "retry_attempts_total{service, attempt_number}",
        "circuit_breaker_failures_total{service, error_type}",
        "retry_success_after_retry_total{service}",
        "bulkhead_queue_depth{service}",
    ):
        assert f"`{adr}`" in text


@pytest.mark.parametrize(
    "event",
    [
        CallFinished("fast", "success", 0.002, None),
        CallFinished("fast", "timeout", 3.0, "TimeoutExceededError"),
        events.CircuitCallRecorded("fast", "success", 0.002, True, None, None, None),
        events.CircuitCallRecorded("fast", "failure", 0.002, False, "OSError", 0.5, None),
        events.CircuitCallRecorded("fast", "ignored", 0.002, False, "KeyError", None, None),
        events.BulkheadAcquired("fast", 0.0, 1, 0, 4),
        events.TimedCallFinished("fast", 0.3, timed_out=False),
        events.CallRejected("fast", "circuit_breaker", "open", 2.5),
        events.CallRejected("fast", "bulkhead", "full", None),
        events.CacheLookup("fast", "hit"),
        events.CacheLookup("fast", "miss"),
    ],
    ids=repr,
)
def test_a_recorder_writes_what_the_event_handler_writes(event, restore_subscribers):
    # The fast path of a per-call kind (no event built) and its plain handler (an event given to
    # emit) must leave the same samples behind.
    def samples_after(write) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        registry = CollectorRegistry()
        instrumentation.configure(prometheus=registry, otel=False, logging=False)
        write()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for metric in registry.collect()
            for sample in metric.samples
            if sample.labels.get("service") == "fast"
        }

    kind = type(event)
    through_recorder = samples_after(lambda: events.recorder(kind, "fast").record(*event[1:]))
    through_handler = samples_after(lambda: events.emit(event))
    assert through_recorder == through_handler
    # Something was written, but for a slot taken at once (the gauges are read at scrape time).
    assert through_recorder or event == events.BulkheadAcquired("fast", 0.0, 1, 0, 4)


def test_a_slot_taken_at_once_costs_the_bulkhead_no_recorder_call(mode, restore_subscribers):
    # The recorder of BulkheadAcquired carries only slots taken at once, which write nothing
    # (the gauges are read at scrape time): with the default subscribers its record is None, so
    # the bulkhead makes no call per slot. A wait still comes as an event and is observed, and a
    # plain handler still gets every acquisition.
    registry = CollectorRegistry()
    instrumentation.configure(prometheus=registry, otel=True, logging=True)
    fn = with_bulkhead(name="slot-at-once", limit=2)(mode.define())
    assert mode.run(fn) == "ok"
    assert events.recorder(BulkheadAcquired, "slot-at-once").record is None
    seen: list[object] = []
    undo = events.subscribe(seen.append, [BulkheadAcquired])
    try:
        assert mode.run(fn) == "ok"
    finally:
        undo()
    assert seen == [BulkheadAcquired("slot-at-once", 0.0, 1, 0, 2)]
    assert mode.run(fn) == "ok"
    assert events.recorder(BulkheadAcquired, "slot-at-once").record is None
    events.emit(BulkheadAcquired("slot-at-once", 0.25, 2, 1, 2))
    waits = {"service": "slot-at-once"}
    assert registry.get_sample_value("buttress_bulkhead_queue_wait_seconds_count", waits) == 1
    assert registry.get_sample_value("buttress_bulkhead_queue_wait_seconds_sum", waits) == 0.25
