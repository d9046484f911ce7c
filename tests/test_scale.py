"""Cost that must not grow with the number of services, call sites or threads.

Counts of operations, never wall time: how many stacks compile, whether the registry walks other
services' instances, how many series a call binds. Timing figures live in bench/.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import pickle
import statistics
import threading
import tracemalloc
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import pybreaker
import pytest
from prometheus_client import CollectorRegistry

import buttress
from buttress import (
    circuit_breaker,
    events,
    instrumentation,
    policy,
    registry,
    retry_with_backoff,
    testing,
    with_bulkhead,
)
from buttress.events import BulkheadAcquired, CallRejected
from buttress.instrumentation.prometheus import PrometheusSubscriber
from buttress.instrumentation.prometheus.series import CounterSeries, HistogramSeries
from buttress.patterns import retry
from buttress.patterns._budget import RetryBudget, RetryBudgetOptions
from buttress.patterns.circuit_breaker import CircuitBreaker, CircuitBreakerOptions
from buttress.patterns.circuit_breaker._breaker import _UNMADE


class NoScan(dict[str, Any]):
    """A registry table that fails the test if anybody walks it."""

    def _refuse(self, *_: object) -> Any:
        raise AssertionError("the registry walked every instance of a pattern")

    __iter__ = items = keys = values = _refuse  # type: ignore[assignment]


@pytest.fixture
def compiles(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The services whose stacks compiled, in order."""
    seen: list[str] = []
    original = policy._Bound._compile

    def counting(self: policy._Bound, snapshot: Any) -> Any:
        seen.append(self.service)
        return original(self, snapshot)

    monkeypatch.setattr(policy._Bound, "_compile", counting)
    return seen


def test_a_new_service_does_not_recompile_the_stacks_of_other_services(compiles):
    @circuit_breaker(name="first", fail_max=3)
    def first() -> int:
        return 1

    first()
    assert compiles == ["first"]
    for i in range(20):

        @circuit_breaker(name=f"other-{i}", fail_max=4)
        @with_bulkhead(limit=3)
        def other() -> int:
            return 2

        other()
        first()
    assert compiles.count("first") == 1


def test_a_claim_recompiles_only_the_stacks_of_its_own_service(compiles):
    @with_bulkhead(name="shared")
    def unlimited() -> int:
        return 1

    @circuit_breaker(name="elsewhere")
    def elsewhere() -> int:
        return 1

    unlimited()
    elsewhere()

    @with_bulkhead(name="shared", limit=2)  # adds an argument to the shared bulkhead
    def limited() -> int:
        return 1

    unlimited()
    elsewhere()
    limited()
    assert compiles.count("shared") == 3  # unlimited twice (its bulkhead appears), limited once
    assert compiles.count("elsewhere") == 1
    assert registry.instances("bulkhead")["shared"].limit == 2


def test_a_services_claims_of_every_pattern_are_one_entry_and_stay_apart() -> None:
    # One tuple per service for all its patterns' claims: an argument of one pattern never
    # conflicts with, or merges into, the same name of another.
    registry.claim("circuit_breaker", "Claims", {"timeout": 5}, "site a")
    registry.claim("bulkhead", "claims", {"timeout": 1, "limit": 3}, "site b")
    registry.claim("circuit_breaker", "claims", {"timeout": 5, "fail_max": 2}, "site c")
    registry.claim("bulkhead", "claims", {"limit": 3}, "site d")  # adds nothing: not kept
    assert registry._claims["claims"] == (
        "circuit_breaker",
        "site a",
        {"timeout": 5},
        "bulkhead",
        "site b",
        {"timeout": 1, "limit": 3},
        "circuit_breaker",
        "site c",
        {"timeout": 5, "fail_max": 2},
    )
    assert registry.code_args("circuit_breaker", "CLAIMS") == {"timeout": 5, "fail_max": 2}
    assert registry.code_args("bulkhead", "claims") == {"timeout": 1, "limit": 3}
    assert registry.code_args("rate_limit", "claims") == {}
    with pytest.raises(buttress.ConfigurationError, match="bulkhead argument limit"):
        registry.claim("bulkhead", "claims", {"limit": 4}, "site e")
    with pytest.raises(buttress.ConfigurationError, match="site a and timeout=6 at site f"):
        registry.claim("circuit_breaker", "claims", {"timeout": 6}, "site f")
    registry.claim("circuit_breaker", "claims", {"timeout": 6}, "site a")  # its own site: fine


def test_a_call_site_is_kept_as_its_code_and_named_only_in_a_conflict(mode):
    # A claim keeps the decorated function's code (shared by every decoration of one def), not a
    # string per service: a function decorated per request is one site, and a conflict still
    # names both sites by their qualified name, file and line.
    def per_request(fail_max: int) -> Callable[[], Any]:
        if mode.is_async:

            async def call() -> int:
                return 1

        else:

            def call() -> int:
                return 1

        return circuit_breaker(name="sites", fail_max=fail_max)(call)

    first = per_request(5)
    for _ in range(3):
        assert mode.run(per_request(6)) == 1  # its own site: never a conflict with itself
    code = first.__wrapped__.__code__
    assert registry._claims["sites"][1] is code
    with pytest.raises(buttress.ConfigurationError) as info:

        @circuit_breaker(name="sites", fail_max=7)
        def elsewhere() -> int:
            return 1

    name = "test_a_call_site_is_kept_as_its_code_and_named_only_in_a_conflict.<locals>"
    first_site = f"{name}.per_request.<locals>.call ({__file__}:{code.co_firstlineno})"
    assert f"fail_max=5 at {first_site} and fail_max=7 at {name}.elsewhere ({__file__}:" in str(
        info.value
    )


def test_decoration_first_call_and_drop_never_walk_other_instances(monkeypatch):
    for i in range(50):  # instances of other services, built before the tables are guarded

        @circuit_breaker(name=f"before-{i}")
        @with_bulkhead(limit=2)
        def before() -> int:
            return 1

        before()
    guarded = {pattern: NoScan(by_key) for pattern, by_key in registry._instances.items()}
    monkeypatch.setattr(registry, "_instances", guarded)

    def per_request() -> int:
        @circuit_breaker(fail_max=2)  # unnamed: private to this function, dropped with it
        @with_bulkhead(limit=2)
        def private() -> int:
            return 1

        return private()

    for _ in range(20):
        assert per_request() == 1
    assert registry.breaker("before-7") is guarded["circuit_breaker"]["before-7"]


def test_calls_from_many_threads_share_no_lock_in_the_series_and_lose_no_count():
    # Flat under threads: a series is written without a lock (per-thread cells, a C counter), so
    # the work per call does not grow with the number of threads, and no increment is lost.
    assert not {"_lock", "lock"} & set(HistogramSeries.__slots__ + CounterSeries.__slots__)
    prometheus = CollectorRegistry()
    before = instrumentation.installed()
    instrumentation.configure(prometheus=prometheus)
    try:

        @circuit_breaker(name="threaded", fail_max=5)
        def call() -> int:
            return 1

        threads, calls = 16, 300
        start = threading.Barrier(threads)

        def run() -> None:
            start.wait()
            for _ in range(calls):
                call()

        workers = [threading.Thread(target=run) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        total = prometheus.get_sample_value(
            "buttress_calls_total", {"service": "threaded", "outcome": "success"}
        )
        assert total == threads * calls
    finally:
        instrumentation.configure(prometheus=before.get("prometheus", False))  # type: ignore[arg-type]


def test_past_the_cardinality_guard_services_share_one_label_and_lose_no_count():
    # A scrape is bounded however many services a process names: the first ones keep their
    # label, the others are counted together under "_other".
    prometheus = CollectorRegistry()
    before = instrumentation.installed()
    instrumentation.configure(prometheus=prometheus, max_services=3)
    try:
        for i in range(5):

            @circuit_breaker(name=f"tenant-{i}")
            @with_bulkhead(limit=4)
            def call() -> int:
                return 1

            for _ in range(i + 1):
                call()

        def calls(service: str) -> float | None:
            labels = {"service": service, "outcome": "success"}
            return prometheus.get_sample_value("buttress_calls_total", labels)

        assert [calls(f"tenant-{i}") for i in range(5)] == [1, 2, 3, None, None]
        assert calls("_other") == 4 + 5
        limits = {"service": "_other"}
        assert prometheus.get_sample_value("buttress_bulkhead_limit", limits) == 8
        flags = {"service": "_other"}
        assert prometheus.get_sample_value("buttress_flag_service_enabled", flags) is None
    finally:
        instrumentation.configure(prometheus=before.get("prometheus", False), max_services=500)  # type: ignore[arg-type]


@pytest.mark.parametrize("multiprocess", [False, True], ids=["single", "multiprocess"])
def test_bound_functions_shared_past_the_guard_still_write_each_services_numbers(
    mode: Any, multiprocess: bool
) -> None:
    # Past the cardinality guard every service writes the "_other" series through one bound
    # function per kind; the services before it keep functions (and numbers) of their own.
    prometheus = CollectorRegistry()
    subscriber = PrometheusSubscriber(prometheus, multiprocess=multiprocess, max_services=2)
    binders = subscriber.binders()
    undos = [
        events.subscribe(handler, [kind], binder=binders.get(kind))
        for kind, handler in subscriber.handlers().items()
    ]
    names = [f"shared-{mode.name}-{'mp' if multiprocess else 'sp'}-{i}" for i in range(5)]
    failing = {"now": False}

    def body() -> str:
        if failing["now"]:
            raise ValueError("down")
        return "ok"

    try:
        for i, name in enumerate(names):
            fn = circuit_breaker(name=name, fail_max=100)(
                with_bulkhead(name=name, limit=4)(mode.define(body))
            )
            failing["now"] = False
            for _ in range(i + 1):
                assert mode.run(fn) == "ok"
            failing["now"] = True
            assert isinstance(mode.outcome(fn), ValueError)
            events.recorder(CallRejected, name)("bulkhead", "full", None)
        for kind in binders:
            bind = binders[kind]
            assert bind(names[2]) is bind(names[3]) is bind(names[4])
            if kind is not BulkheadAcquired:  # (declined: no function at all)
                assert bind(names[0]) is not bind(names[1])
    finally:
        for undo in undos:
            undo()

    def value(name: str, **labels: str) -> float | None:
        return prometheus.get_sample_value(name, labels)

    for service, successes, failures in (
        (names[0], 1, 1),
        (names[1], 2, 1),
        ("_other", 3 + 4 + 5, 3),
    ):
        calls = "buttress_calls_total"
        assert value(calls, service=service, outcome="success") == successes
        assert value(calls, service=service, outcome="failure") == failures
        count = "buttress_call_duration_seconds_count"
        assert value(count, service=service, outcome="success") == successes
        breaker = "buttress_circuit_breaker_successes_total"
        assert value(breaker, service=service) == successes
        breaker = "buttress_circuit_breaker_failures_total"
        assert value(breaker, service=service, error_type="ValueError") == failures
        rejected = "buttress_bulkhead_rejected_total"
        assert value(rejected, service=service, reason="full") == failures
    for name in names[2:]:
        assert value("buttress_calls_total", service=name, outcome="success") is None
    # The first of the services past the guard stands for all of them (none has flags).
    assert subscriber.services == set(names[:3])


def test_memory_per_service_does_not_grow_with_the_number_of_services():
    # Bytes, not time: what one more service costs at rest is the same with 40 services as with
    # 200 (a table walked or copied per service would make it grow).
    kept: list[Any] = []

    def add(count: int) -> float:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(count):
            i = len(kept)

            @circuit_breaker(name=f"many-{i}", fail_max=5)
            @with_bulkhead(limit=3)
            def call() -> int:
                return 1

            call()
            kept.append(call)
        gc.collect()
        return (tracemalloc.get_traced_memory()[0] - before) / count

    add(10)  # first-use costs of the modules
    tracemalloc.start()
    try:
        # Medians of small batches: a dict that doubles (the registry's, Prometheus's) costs one
        # batch a spike wherever it falls, which depends on what ran before in the process.
        early = statistics.median(add(10) for _ in range(7))
        add(120)
        late = statistics.median(add(10) for _ in range(7))
    finally:
        tracemalloc.stop()
    assert late < early * 1.25


def _bytes_each(make: Callable[[int], Any], count: int = 10, batches: int = 7) -> float:
    """Bytes at rest per object ``make(i)`` builds (``tracemalloc``), the median of batches.

    Medians of small batches: a dict that doubles (the registry's, Prometheus's) costs one batch a
    spike wherever it falls, which depends on what ran before in the process.
    """
    kept: list[Any] = []
    for _ in range(count):  # first-use costs of the modules
        kept.append(make(len(kept)))
    tracemalloc.start()
    try:
        sizes = []
        for _ in range(batches):
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(count):
                kept.append(make(len(kept)))
            gc.collect()
            sizes.append((tracemalloc.get_traced_memory()[0] - before) / count)
    finally:
        tracemalloc.stop()
    return statistics.median(sizes)


# Bytes at rest per service of bench/bench_scale.py's stack (breaker + retry + bulkhead, called
# once, default subscribers), by whether the service has its own Prometheus label or counts under
# "_other" (past the cardinality guard, where it shares its bound functions): ≈ 4.6 KB and
# ≈ 3.6 KB in this test since the sixth pass (≈ 5.6 KB and ≈ 4.2 KB before it, ≈ 6.9 KB and
# ≈ 5.2 KB before the fourth), from ≈ 10.1 KB and ≈ 9.1 KB at the start of issue 15's memory
# work (docs/performance.md, Scale). A margin of ≈ 10 % for other interpreters and library
# versions; what it catches is a table, a per-kind object or a function made per service.
SERVICE_AT_REST = {"own label": 5_100, "_other": 4_000}


@pytest.mark.parametrize("label", SERVICE_AT_REST)
def test_a_service_at_rest_stays_within_its_bytes(label: str) -> None:
    prometheus = CollectorRegistry()
    before = instrumentation.installed()
    # Its own label: no "_other" series; or every service but the first past the guard.
    limit = 500 if label == "own label" else 1
    instrumentation.configure(prometheus=prometheus, max_services=limit)

    def service(i: int) -> Any:
        @circuit_breaker(name=f"at-rest-{label}-{i}", fail_max=5, timeout=60)
        @retry_with_backoff(max_attempts=3, exponential_base=2)
        @with_bulkhead(limit=50)
        def call() -> int:
            return 1

        call()
        return call

    try:
        each = _bytes_each(service)
    finally:
        instrumentation.configure(prometheus=before.get("prometheus", False), max_services=500)  # type: ignore[arg-type]
    print(f"{each:,.0f} bytes per service at rest ({label})")
    assert each < SERVICE_AT_REST[label], f"{each:,.0f} bytes per service at rest ({label})"


def test_a_breaker_keeps_its_attributes_compact():
    # CPython keeps an instance's attributes in an array of values whose keys all instances of
    # the class share while they number at most 29; past that each instance gets a dictionary
    # of its own, ≈ 1.3 KB more per service. pybreaker's attributes count too.
    cb = CircuitBreaker("compact")
    assert len(vars(cb)) <= 26, sorted(vars(cb))  # 3 to spare below 29
    options = CircuitBreakerOptions()
    each = _bytes_each(lambda i: CircuitBreaker(f"compact-{i}", options))
    # ≈ 0.78 KB (1.2 KB with its lock, lists, outbox, messages and state object made up front;
    # 3.5 KB with 43 attributes)
    assert each < 1_000, f"{each:,.0f} bytes per breaker"


def test_what_a_service_never_used_costs_it_nothing():
    # A budget has slots for retries from its first retry on; every retry strategy copies one
    # tenacity template; a breaker that excludes nothing shares its exclusions, and has no
    # rejection messages until its calls may be rejected.
    budget = RetryBudget("quiet", RetryBudgetOptions())
    for _ in range(100):
        budget.deposit()
    assert budget._retries is None
    assert budget.withdraw("retry")
    assert budget._retries is not None
    assert sum(budget._retries) == budget.snapshot()["retries"] == 1
    first = retry.RetryStrategy("a", retry.RetryOptions())
    second = retry.RetryStrategy("b", retry.RetryOptions())
    assert first._retrying is second._retrying
    assert CircuitBreaker("x")._excluding is CircuitBreaker("y")._excluding
    # A breaker's rejection messages and recorders are made when its calls may first be
    # rejected.
    cb = CircuitBreaker("Quiet")
    assert cb._messages is _UNMADE
    assert "Quiet" not in events._recorders.get(events.CallRejected, {})
    cb.force_open()
    assert type(cb._messages) is dict
    assert cb._rejected is events.recorder(events.CallRejected, "Quiet")
    with pytest.raises(buttress.CircuitOpenError, match=r"^circuit of 'Quiet' is forced open$"):
        cb.call(lambda: 1)


def test_threads_and_tasks_racing_on_a_new_services_first_call_retry_and_failure(mode, compiles):
    # What is made on first use (the compiled stack, the budget's slots and its retry slots, the
    # recorders' bindings) is made once, and no count is lost, whoever arrives first.
    seen: list[Any] = []
    undo = events.subscribe(seen.append, [events.RetryScheduled, events.CircuitCallRecorded])

    def body() -> str:
        if buttress.attempt() == 1:
            raise ConnectionError("the first attempt of every call fails")
        return "ok"

    protected = retry_with_backoff(name="racing", max_attempts=2)(
        circuit_breaker(fail_max=1_000)(with_bulkhead(limit=64)(mode.define(body)))
    )
    callers = 16
    try:
        with testing.testing_mode():
            if mode.is_async:

                async def race() -> list[Any]:
                    return await asyncio.gather(*(protected() for _ in range(callers)))

                results = mode.run(race)
            else:
                start = threading.Barrier(callers)
                results = []

                def call() -> None:
                    start.wait()
                    results.append(protected())

                workers = [threading.Thread(target=call) for _ in range(callers)]
                for worker in workers:
                    worker.start()
                for worker in workers:
                    worker.join()
    finally:
        undo()
    assert results == ["ok"] * callers
    assert compiles == ["racing"]
    budget = registry.instances("retry_budget")["racing"]
    counted = budget.snapshot()
    assert (counted["requests"], counted["retries"]) == (callers, callers)
    kinds = collections.Counter((type(e).__name__, getattr(e, "outcome", None)) for e in seen)
    assert kinds == {
        ("RetryScheduled", None): callers,
        ("CircuitCallRecorded", "failure"): callers,
        ("CircuitCallRecorded", "success"): callers,
    }


def test_a_breaker_makes_its_lock_lists_and_outbox_when_first_needed() -> None:
    # A closed circuit that never failed holds no lock, no outbox, no listener or exclusion
    # list and no rejection messages; each is made at its first use, and behaves as pybreaker's.
    cb = CircuitBreaker("lazy")
    cb.call(lambda: 1)
    assert (cb._rlock, cb._outbox, cb._listening, cb._excluded) == (None, (), (), ())
    assert cb._messages is _UNMADE
    assert cb._shown == pybreaker.STATE_CLOSED  # pybreaker's state object: its name, until read
    lock = cb.lock
    assert lock is cb.lock is cb._lock
    assert lock.acquire(blocking=False)
    lock.release()
    listener = pybreaker.CircuitBreakerListener()
    cb.add_listener(listener)
    assert cb._listeners == [listener]
    assert cb.listeners == (listener,)
    cb.remove_listener(listener)
    assert cb._listening == ()
    with pytest.raises(ValueError):
        cb.remove_listener(listener)
    cb.add_excluded_exceptions(KeyError, ValueError)
    assert cb._excluded_exceptions == [KeyError, ValueError]
    assert not cb.is_system_error(KeyError())
    cb.remove_excluded_exception(KeyError)
    cb.remove_excluded_exception(ValueError)
    assert cb._excluded == ()
    assert cb.is_system_error(KeyError())
    with pytest.raises(ValueError):
        cb.remove_excluded_exception(KeyError)
    state = cb.state
    assert isinstance(state, pybreaker.CircuitClosedState)
    assert state is cb.state is cb._state
    cb.force_open()  # no listener: only the name is kept
    assert cb._shown == pybreaker.STATE_OPEN
    assert isinstance(cb.state, pybreaker.CircuitOpenState)
    assert cb.current_state == pybreaker.STATE_OPEN
    changes: list[tuple[str, str]] = []

    class Changes(pybreaker.CircuitBreakerListener):
        def state_change(self, cb: Any, old: Any, new: Any) -> None:
            changes.append((old.name, new.name))

    cb.add_listener(Changes())
    cb.reset()
    assert changes == [(pybreaker.STATE_OPEN, pybreaker.STATE_CLOSED)]
    assert isinstance(cb._shown, pybreaker.CircuitClosedState)


def test_threads_racing_on_a_new_breakers_lock_get_one_lock() -> None:
    cb = CircuitBreaker("lock-race")
    start = threading.Barrier(16)
    locks: list[Any] = []

    def take() -> None:
        start.wait()
        with cb.lock:
            locks.append(cb.lock)

    workers = [threading.Thread(target=take) for _ in range(16)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(locks) == 16
    assert all(lock is cb._rlock for lock in locks)


def test_threads_and_tasks_racing_on_a_new_breakers_first_failure_and_rejection(mode):
    # The first failure makes the breaker's lock, the trip its outbox and rejection messages:
    # racing callers make each once and lose no count or event.
    callers = 16
    seen: list[Any] = []
    undo = events.subscribe(
        seen.append, [events.CircuitCallRecorded, events.CircuitStateChanged, CallRejected]
    )
    start = threading.Barrier(callers)

    def body() -> None:
        if not mode.is_async:
            start.wait()  # every thread fails, and records its failure, at once
        raise ConnectionError("down")

    async def abody() -> None:
        await asyncio.sleep(0)
        raise ConnectionError("down")

    protected = circuit_breaker(name="first-failure-race", fail_max=callers, timeout=60)(
        abody if mode.is_async else body
    )
    try:
        failed = mode.gather(protected, callers)
        rejected = mode.gather(protected, callers)
    finally:
        undo()
    assert all(isinstance(exc, ConnectionError) for exc in failed)
    assert all(isinstance(exc, buttress.CircuitOpenError) for exc in rejected)
    cb = registry.breaker("first-failure-race")
    assert cb.state_label == "open"
    assert cb.fail_counter == callers
    kinds = collections.Counter(
        (type(e).__name__, getattr(e, "outcome", None) or getattr(e, "new_state", None))
        for e in seen
    )
    assert kinds == {
        ("CircuitCallRecorded", "failure"): callers,
        ("CircuitStateChanged", "open"): 1,
        ("CallRejected", None): callers,
    }
    assert cb._rlock is not None
    assert cb._outbox == []
    assert type(cb._messages) is dict
    assert cb._messages["open"] == "circuit of 'first-failure-race' is open"


def test_threads_and_tasks_racing_on_a_policys_first_call_make_one_runner(
    monkeypatch: pytest.MonkeyPatch, compiles: list[str]
) -> None:
    # call() and acall() make their runner at their first use (a policy that only decorates
    # holds none): racing first calls make it once, and every call runs through it.
    made: list[bool] = []
    original = policy._target_runner

    def counting(*, is_async: bool) -> Callable[..., Any]:
        made.append(is_async)
        return original(is_async=is_async)

    monkeypatch.setattr(policy, "_target_runner", counting)
    shared = policy.Policy(policy.Spec("bulkhead", "runner-race", {"limit": 64}))
    assert shared._call_runner is None
    assert shared._acall_runner is None
    barrier = threading.Barrier(16)
    results: list[int] = []

    def run(i: int) -> None:
        barrier.wait()
        results.append(shared.call(lambda: i))

    workers = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert sorted(results) == list(range(16))

    async def answer(i: int) -> int:
        await asyncio.sleep(0)
        return i

    async def tasks() -> list[int]:
        return await asyncio.gather(*(shared.acall(answer, i) for i in range(16)))

    assert asyncio.run(tasks()) == list(range(16))
    assert sorted(made) == [False, True]
    assert compiles.count("runner-race") == 2  # one stack each for call() and acall()


def test_services_settings_leave_alone_share_their_resolved_options(monkeypatch):
    # At rest a service costs little: views with nothing from settings share one options cache,
    # so the same code arguments resolve to one object whichever service gives them; a service
    # with settings of its own resolves its own, with its settings on top.
    from buttress import config, reload_settings

    monkeypatch.setattr(config, "SNAPSHOT", config.SNAPSHOT)
    reload_settings(env={"BUTTRESS_SERVICES__TUNED__CIRCUIT_BREAKER__FAIL_MAX": "9"})
    snapshot = config.SNAPSHOT
    code = {"fail_max": 5, "timeout": 60}
    first = snapshot.service("plain-a").options("circuit_breaker", code)
    second = snapshot.service("plain-b").options("circuit_breaker", code)
    tuned = snapshot.service("tuned").options("circuit_breaker", code)
    assert first is second
    assert (first.fail_max, tuned.fail_max) == (5, 9)
    assert snapshot.service("tuned").explain()["circuit_breaker"]["fail_max"]["source"] != "code"
    other = snapshot.service("plain-a").options("circuit_breaker", {"fail_max": 6})
    assert other.fail_max == 6


def test_equal_code_arguments_of_different_types_resolve_apart(mode):
    # 0 == False and they hash alike: the shared options cache must still keep them apart.
    from buttress import with_fallback

    def fail() -> str:
        raise ConnectionError("down")

    zero = with_fallback(0, name="typed-zero")(mode.define(fail))
    false = with_fallback(False, name="typed-false")(mode.define(fail))
    assert mode.run(zero) == 0
    assert mode.run(false) is False


def test_equal_code_arguments_are_one_mapping_shared_by_their_specs() -> None:
    # The same fail_max=5, timeout=60 at many services: one validated mapping for all of them.
    def spec(service: str, **code_args: Any) -> policy.Spec:
        return policy.Spec("circuit_breaker", service, code_args)

    first, second = spec("args-a", fail_max=5, timeout=60), spec("args-b", fail_max=5, timeout=60)
    assert first.code_args is second.code_args
    assert type(first.code_args) is MappingProxyType  # read-only, as the registry expects
    with pytest.raises(TypeError):
        first.code_args["fail_max"] = 6  # type: ignore[index]
    # Equal values of other types, or another order, are other arguments.
    as_float = spec("args-c", fail_max=5, timeout=60.0)
    assert as_float.code_args is not first.code_args
    assert type(as_float.code_args["timeout"]) is float
    assert type(first.code_args["timeout"]) is int
    reordered = spec("args-d", timeout=60, fail_max=5)
    assert list(reordered.code_args) == ["timeout", "fail_max"]
    assert list(first.code_args) == ["fail_max", "timeout"]
    assert policy._flat(-0.0) != policy._flat(0.0)
    assert policy._flat((1, "a")) != policy._flat((True, "a"))
    unshared = policy.Spec("fallback", "args-e", {"value": [1]})  # a list: never shared
    assert unshared.code_args is not policy.Spec("fallback", "args-f", {"value": [1]}).code_args
    # Pickled, a spec is an equal spec, sharing again once loaded.
    loaded = pickle.loads(pickle.dumps(first))
    assert loaded == first
    assert loaded.code_args is first.code_args
    # Threads racing on new equal arguments get one mapping.
    made: list[policy.Spec] = []
    barrier = threading.Barrier(16)

    def make(i: int) -> None:
        barrier.wait()
        made.append(spec(f"args-race-{i}", fail_max=7, timeout=61))

    workers = [threading.Thread(target=make, args=(i,)) for i in range(16)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len({id(each.code_args) for each in made}) == 1
    # The shared entry goes with the last spec that gives those arguments.
    entries = len(policy._args)
    made.clear()
    del first, second, loaded
    gc.collect()
    assert len(policy._args) < entries


def test_a_function_decorated_per_request_leaves_no_bookkeeping_behind(mode):
    # Decorating inside a handler claims the service's instances on every request; the
    # references to stacks that are gone must not pile up (they did: one per request, forever).
    def handle(i: int) -> Any:
        protected = circuit_breaker(name="per-request", fail_max=5)(
            with_bulkhead(limit=4)(mode.define(lambda: i))
        )
        return mode.run(protected)

    for i in range(1_000):
        assert handle(i) == i
    gc.collect()
    kept = registry._dependents["per-request"]  # (every pattern's: one reference per stack)
    assert not isinstance(kept, list) or len(kept) <= 32, len(kept)
    alive = sum(ref() is not None for ref in registry._everyone)
    assert len(registry._everyone) <= 2 * max(alive, 16)


def test_a_shared_instance_is_reconfigured_when_its_options_change_and_only_then() -> None:
    # Most instances of a pattern have the options its first one was built with, and the
    # registry keeps no entry for those: whichever options an instance has, a build with equal
    # ones returns it as it is, and other ones reconfigure it (once).
    class Counted:
        def __init__(self, options: dict[str, int]) -> None:
            self.options = options
            self.reconfigured: list[dict[str, int]] = []

        def reconfigure(self, options: dict[str, int]) -> None:
            self.reconfigured.append(options)

    usual, other = {"limit": 1}, {"limit": 2}
    first = registry.shared("usual-test", "first", usual, Counted)
    second = registry.shared("usual-test", "second", dict(usual), Counted)
    assert registry.shared("usual-test", "first", dict(usual), Counted) is first
    assert registry.shared("usual-test", "SECOND", other, Counted) is second
    assert registry.shared("usual-test", "second", dict(other), Counted) is second
    assert (first.reconfigured, second.reconfigured) == ([], [other])
    assert registry.shared("usual-test", "second", usual, Counted) is second
    assert registry.shared("usual-test", "first", other, Counted) is first
    assert (first.reconfigured, second.reconfigured) == ([other], [other, usual])
    registry.forget("first")
    third = registry.shared("usual-test", "first", usual, Counted)
    assert third is not first
    assert third.reconfigured == []
    assert registry.shared("usual-test", "first", other, Counted).reconfigured == [other]
