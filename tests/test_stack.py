"""Patterns composed: every stacking order stays correct, sync and async."""

from __future__ import annotations

import asyncio
import threading

import pytest

from buttress import (
    BulkheadFullError,
    CircuitOpenError,
    TimeoutExceededError,
    circuit_breaker,
    registry,
    resilient,
    retry_with_backoff,
    with_bulkhead,
    with_fallback,
    with_timeout,
)
from buttress.events import CallFinished, CircuitCallRecorded, RetryScheduled
from buttress.testing import capture_events


class Upstream:
    """A dependency that fails a given number of times, then answers."""

    def __init__(self, failures: int = 0, exc: type[Exception] = ConnectionError) -> None:
        self.failures = failures
        self.exc = exc
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, *args: object) -> str:
        with self.lock:
            self.calls += 1
            if self.calls <= self.failures:
                raise self.exc(f"failure {self.calls}")
        return "ok"


def breaker_of(service: str):
    return registry.instances("circuit_breaker")[service]


def test_breaker_outside_retry_counts_one_failure_per_logical_call(mode, clock):
    upstream = Upstream(failures=100)
    fn = circuit_breaker(name="seed-order", fail_max=2, timeout=30)(
        retry_with_backoff(max_attempts=3, jitter="none")(mode.define(upstream))
    )
    first = mode.outcome(fn)
    assert isinstance(first, ConnectionError)
    assert upstream.calls == 3
    assert "3 attempts" in "".join(getattr(first, "__notes__", []))
    second = mode.outcome(fn)
    assert isinstance(second, ConnectionError)  # the tripping call raises its own error
    assert upstream.calls == 6
    third = mode.outcome(fn)
    assert isinstance(third, CircuitOpenError)
    assert third.service == "seed-order"
    assert 0 < third.retry_after <= 30
    assert upstream.calls == 6


def test_retry_outside_breaker_never_retries_a_rejection(mode, clock):
    upstream = Upstream(failures=100)
    fn = retry_with_backoff(max_attempts=5, jitter="none")(
        circuit_breaker(name="canonical", fail_max=2, timeout=30)(mode.define(upstream))
    )
    with capture_events([RetryScheduled, CircuitCallRecorded]) as seen:
        outcome = mode.outcome(fn)
    # Two real failures trip the breaker; the third attempt is rejected and not retried further.
    assert isinstance(outcome, CircuitOpenError)
    assert upstream.calls == 2
    assert len(seen.of(RetryScheduled)) == 2
    assert [e.outcome for e in seen.of(CircuitCallRecorded)] == ["failure", "failure"]


def test_full_bulkhead_is_neither_retried_nor_a_breaker_failure(mode, clock):
    inner = with_bulkhead(name="crowded", limit=1)(mode.define(Upstream()))
    stacked = retry_with_backoff(max_attempts=3)(circuit_breaker(name="crowded", fail_max=1)(inner))
    # Occupy the only slot from another call site of the same service, then call the stack.
    assert mode.run(stacked) == "ok"  # builds the shared instances
    bh = registry.instances("bulkhead")["crowded"]
    assert bh.snapshot()["active"] == 0
    held = _hold_slot(bh, mode)
    try:
        with capture_events([RetryScheduled, CircuitCallRecorded]) as seen:
            outcome = mode.outcome(stacked)
        assert isinstance(outcome, BulkheadFullError)
        assert seen.of(RetryScheduled) == []
        # The breaker may note the rejection as "ignored"; it never counts it as a failure.
        assert all(e.outcome == "ignored" for e in seen.of(CircuitCallRecorded))
        assert breaker_of("crowded").snapshot()["state"] == "closed"
    finally:
        held()
    assert mode.run(stacked) == "ok"


def _hold_slot(bulkhead, mode):
    """Take one slot of ``bulkhead`` from another thread; return a function that gives it back."""
    taken = threading.Event()
    release = threading.Event()

    def body() -> str:
        taken.set()
        release.wait(5)
        return "held"

    holder = with_bulkhead(name=bulkhead.snapshot()["service"])(body)
    thread = threading.Thread(target=holder)
    thread.start()
    assert taken.wait(5)

    def give_back() -> None:
        release.set()
        thread.join(5)

    return give_back


def test_timeout_inside_breaker_counts_as_failure(mode, clock):
    slow = mode.define(latency=10.0)
    fn = circuit_breaker(name="slow-svc", fail_max=1, timeout=30)(with_timeout(seconds=1)(slow))
    outcome = mode.outcome(fn)
    assert isinstance(outcome, TimeoutExceededError)
    assert outcome.seconds == 1
    assert breaker_of("slow-svc").snapshot()["state"] == "open"
    assert isinstance(mode.outcome(fn), CircuitOpenError)


def test_resilient_builds_the_canonical_stack(mode, clock):
    upstream = Upstream(failures=1)
    fn = resilient("canon", retry={"jitter": "none"})(mode.define(upstream))
    policy = fn.__buttress_policy__
    assert [s.pattern for s in policy.specs] == [
        "fallback",
        "cache",
        "coalescing",
        "retry",
        "hedging",
        "circuit_breaker",
        "adaptive_throttle",
        "rate_limit",
        "timeout",
        "bulkhead",
        "chaos",
    ]
    with capture_events([CallFinished]) as seen:
        assert mode.run(fn) == "ok"
    assert upstream.calls == 2
    assert [(e.service, e.outcome) for e in seen] == [("canon", "success")]


def test_fallback_outside_everything_answers_a_rejection(mode, clock):
    upstream = Upstream(failures=100)
    fn = with_fallback(False, name="authz")(
        circuit_breaker(name="authz", fail_max=1, timeout=60)(mode.define(upstream))
    )
    assert mode.run(fn) is False  # the failure itself is transient: fallback answers
    assert mode.run(fn) is False  # now rejected by the open circuit: fallback answers
    assert upstream.calls == 1


def test_programming_errors_are_not_retried_nor_hidden(mode, clock):
    upstream = Upstream(failures=100, exc=TypeError)
    fn = with_fallback("fallback", name="bugs")(
        retry_with_backoff(name="bugs", max_attempts=5)(mode.define(upstream))
    )
    outcome = mode.outcome(fn)
    assert isinstance(outcome, TypeError)
    assert upstream.calls == 1


@pytest.mark.realtime
def test_cancellation_through_the_whole_stack_is_never_counted_or_retried():
    async def scenario() -> None:
        entered = asyncio.Event()

        @circuit_breaker(name="cancel-svc", fail_max=1)
        @retry_with_backoff(max_attempts=5)
        @with_timeout(seconds=30)
        @with_bulkhead(limit=1)
        async def call() -> str:
            entered.set()
            await asyncio.Event().wait()
            return "never"

        task = asyncio.create_task(call())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        snapshot = breaker_of("cancel-svc").snapshot()
        assert snapshot["state"] == "closed"
        assert snapshot["failures"] == 0
        bulkhead = next(iter(registry.instances("bulkhead").values()))
        assert bulkhead.snapshot()["active"] == 0

    asyncio.run(scenario())


@pytest.mark.realtime
def test_64_threads_through_one_breaker_and_one_bulkhead():
    in_flight = 0
    peak = 0
    lock = threading.Lock()

    @circuit_breaker(name="crowd", fail_max=1000)
    @with_bulkhead(name="crowd", limit=8, max_queue=64, queue_timeout=5)
    def call(i: int) -> int:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        threading.Event().wait(0.02)  # long enough that the 64 calls overlap
        with lock:
            in_flight -= 1
        return i

    threads = []
    results: list[int] = []

    def worker(i: int) -> None:
        results.append(call(i))

    for i in range(64):
        thread = threading.Thread(target=worker, args=(i,))
        threads.append(thread)
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(results) == list(range(64))
    assert 1 < peak <= 8
    snapshot = registry.instances("bulkhead")["crowd"].snapshot()
    assert (snapshot["active"], snapshot["queued"]) == (0, 0)


@pytest.mark.realtime
def test_1000_tasks_through_one_breaker_and_one_bulkhead():
    in_flight = 0
    peak = 0

    @circuit_breaker(name="crowd-async", fail_max=1000)
    @with_bulkhead(name="crowd-async", limit=16, max_queue=1000, queue_timeout=5)
    async def call(i: int) -> int:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0)
        in_flight -= 1
        return i

    async def scenario() -> list[int]:
        return await asyncio.gather(*(call(i) for i in range(1000)))

    assert asyncio.run(scenario()) == list(range(1000))
    assert peak == 16
    snapshot = registry.instances("bulkhead")["crowd-async"].snapshot()
    assert (snapshot["active"], snapshot["queued"]) == (0, 0)
