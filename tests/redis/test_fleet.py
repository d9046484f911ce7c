"""Four worker processes share one circuit through a real redis-server.

Each worker is a forked process with its own storage, driven five ways: the decision API from
threads (performed by the thread driver) and from tasks (by the task driver), buttress's
``CircuitBreaker`` given the storage (``breaker.call``, from threads), and what users write:
``@circuit_breaker(name=..., state_url=...)`` on a ``def`` (from threads) and on an ``async def``
(from tasks). The dependency
is shared: a counter in shared memory tells how many calls reached it, and how many ran at once.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import multiprocessing
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from buttress import events
from buttress.exceptions import CircuitOpenError
from buttress.patterns.circuit_breaker.redis_storage import Limits, make_storage
from buttress.policy import asettle

pytestmark = [pytest.mark.redis, pytest.mark.realtime]

FORK = multiprocessing.get_context("fork")
WORKERS = 4
KINDS = ["sync", "async", "breaker", "decorated", "adecorated"]
ASYNC_KINDS = {"async", "adecorated"}
# Outside the fault test, a loaded machine must not look like a Redis outage: a request that
# times out is decided locally, which these tests would count as the fleet's limit not holding.
PATIENT = {"socket_timeout": 1.0, "connect_timeout": 1.0}


class Down(ConnectionError):
    """The dependency failed."""


class Dependency:
    """A dependency shared by the processes: counts calls, and the most that ran at once."""

    def __init__(self) -> None:
        self.hits = FORK.Value("i", 0)
        self.running = FORK.Value("i", 0)
        self.most = FORK.Value("i", 0)

    def enter(self) -> None:
        with self.hits.get_lock():
            self.hits.value += 1
            self.running.value += 1
            self.most.value = max(self.most.value, self.running.value)

    def leave(self) -> None:
        with self.hits.get_lock():
            self.running.value -= 1


class Worker:
    """What runs inside one process: ``concurrency`` threads or tasks, each making calls."""

    def __init__(
        self,
        kind: str,
        url: str,
        limits: Limits,
        near_cache_ttl: float = 1.0,
        **storage_options: Any,
    ) -> None:
        self.near_cache_ttl = near_cache_ttl  # of the decorated kinds
        self.kind = kind
        self.url = url
        self.limits = limits
        self.storage_options = storage_options

    def start(self, target: Callable[..., dict[str, Any]], *args: Any) -> Any:
        results = FORK.Queue()
        process = FORK.Process(target=self._main, args=(results, target, *args))
        process.start()
        return process, results

    def _main(self, results: Any, target: Callable[..., dict[str, Any]], *args: Any) -> None:
        faults: list[Any] = []
        events.subscribe(faults.append, [events.StateStoreError])
        try:
            summary = target(self._caller(), *args)
        except BaseException as exc:  # reported to the test, which fails with it
            summary = {"crashed": repr(exc)}
        summary["store_errors"] = len(faults)
        results.put(summary)

    def _caller(self) -> Any:
        limits = self.limits
        if self.kind in {"decorated", "adecorated"}:
            return self._decorated()
        storage = make_storage(self.url, "fleet", **self.storage_options)
        if self.kind == "breaker":
            from buttress.patterns.circuit_breaker import CircuitBreaker, CircuitBreakerOptions

            options = CircuitBreakerOptions(
                fail_max=limits.fail_max,
                timeout=limits.reset_timeout,
                success_threshold=limits.success_threshold,
                half_open_max_calls=limits.half_open_max_calls,
            )
            breaker = CircuitBreaker("fleet", options, state_storage=storage)

            def via_breaker(fn: Callable[[], Any]) -> tuple[str, bool]:
                try:
                    return breaker.call(fn), False
                except CircuitOpenError:
                    return "rejected", False

            return via_breaker

        if self.kind == "async":

            async def acall(fn: Callable[[], Any]) -> tuple[str, bool]:
                ticket = await asettle(storage.admission(limits))
                if not ticket.admitted:
                    return "rejected", False
                try:
                    result = await fn()
                except Exception:
                    await asettle(storage.recording(ticket, "failure", limits))
                    raise
                await asettle(storage.recording(ticket, "success", limits))
                return result, ticket.trial

            return acall

        def call(fn: Callable[[], Any]) -> tuple[str, bool]:
            ticket = storage.admit(limits)
            if not ticket.admitted:
                return "rejected", False
            try:
                result = fn()
            except Exception:
                storage.record(ticket, "failure", limits)
                raise
            storage.record(ticket, "success", limits)
            return result, ticket.trial

        return call

    def _decorated(self) -> Any:
        """A function decorated the way users do, in this worker process."""
        from buttress import circuit_breaker
        from buttress.patterns.circuit_breaker import redis_storage

        if self.storage_options:
            # Faster reconnects than the defaults, so a test of a few seconds sees the fleet
            # come back (the breaker builds its storage through this module function).
            redis_storage.make_storage = functools.partial(
                redis_storage.make_storage, **self.storage_options
            )
        limits = self.limits
        protect = circuit_breaker(
            name="fleet",
            fail_max=limits.fail_max,
            timeout=limits.reset_timeout,
            success_threshold=limits.success_threshold,
            half_open_max_calls=limits.half_open_max_calls,
            state_url=self.url,
            near_cache_ttl=self.near_cache_ttl,
        )
        # A call was a half-open trial when the breaker announced one in the caller's context.
        trial: contextvars.ContextVar[bool] = contextvars.ContextVar("trial", default=False)
        events.subscribe(lambda _: trial.set(True), [events.CircuitTrialStarted])

        if self.kind == "adecorated":

            @protect
            async def athrough(fn: Callable[[], Any]) -> Any:
                return await fn()

            async def acall(fn: Callable[[], Any]) -> tuple[str, bool]:
                trial.set(False)
                try:
                    return await athrough(fn), trial.get()
                except CircuitOpenError:
                    return "rejected", False

            return acall

        @protect
        def through(fn: Callable[[], Any]) -> Any:
            return fn()

        def call(fn: Callable[[], Any]) -> tuple[str, bool]:
            trial.set(False)
            try:
                return through(fn), trial.get()
            except CircuitOpenError:
                return "rejected", False

        return call


def run_concurrently(kind: str, n: int, body: Callable[[int], Any]) -> list[Any]:
    """``body(i)`` for i in range(n), on n threads, or as n tasks of one event loop."""
    if kind in ASYNC_KINDS:

        async def main() -> list[Any]:
            return list(await asyncio.gather(*(body(i) for i in range(n))))

        return asyncio.run(main())
    out: list[Any] = [None] * n

    def run(i: int) -> None:
        out[i] = body(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return out


def dependency_call(kind: str, dep: Dependency, seconds: float, *, fails: bool) -> Any:
    def enter_and_leave() -> str:
        dep.enter()
        try:
            time.sleep(seconds)
            if fails:
                raise Down("dependency down")
            return "ok"
        finally:
            dep.leave()

    if kind not in ASYNC_KINDS:
        return enter_and_leave

    async def aenter_and_leave() -> str:
        dep.enter()
        try:
            await asyncio.sleep(seconds)
            if fails:
                raise Down("dependency down")
            return "ok"
        finally:
            dep.leave()

    return aenter_and_leave


def collect(started: list[Any], timeout: float = 15.0) -> list[dict[str, Any]]:
    out = []
    for process, results in started:
        summary = results.get(timeout=timeout)
        process.join(timeout)
        assert "crashed" not in summary, summary["crashed"]
        out.append(summary)
    return out


# --- the workloads (run inside the worker processes) ----------------------------------------------


def hammer_failing(
    call: Any, kind: str, concurrency: int, dep: Dependency, barrier: Any
) -> dict[str, Any]:
    """Call a failing dependency until rejected three times in a row (or 3 s pass)."""
    barrier.wait(10)
    fn = dependency_call(kind, dep, 0.002, fails=True)
    deadline = time.monotonic() + 3

    def loop_sync(_: int) -> int:
        rejected_in_a_row = 0
        while rejected_in_a_row < 3 and time.monotonic() < deadline:
            try:
                outcome, _trial = call(fn)
            except Down:
                rejected_in_a_row = 0
                continue
            rejected_in_a_row += outcome == "rejected"
        return rejected_in_a_row

    async def loop_async(_: int) -> int:
        rejected_in_a_row = 0
        while rejected_in_a_row < 3 and time.monotonic() < deadline:
            try:
                outcome, _trial = await call(fn)
            except Down:
                rejected_in_a_row = 0
                continue
            rejected_in_a_row += outcome == "rejected"
        return rejected_in_a_row

    ends = run_concurrently(kind, concurrency, loop_async if kind in ASYNC_KINDS else loop_sync)
    return {"rejecting_at_end": all(n >= 3 for n in ends)}


def trip_then_signal(call: Any, kind: str, fail_max: int, dep: Dependency, tripped: Any) -> dict:
    fn = dependency_call(kind, dep, 0.0, fails=True)
    for _ in range(fail_max):
        try:
            if kind in ASYNC_KINDS:
                asyncio.run(call(fn))
            else:
                call(fn)
        except Down:
            pass
    tripped.set()
    return {}


def call_after_signal(call: Any, kind: str, dep: Dependency, tripped: Any) -> dict[str, Any]:
    fn = dependency_call(kind, dep, 0.0, fails=False)
    tripped.wait(10)
    outcome, _trial = asyncio.run(call(fn)) if kind in ASYNC_KINDS else call(fn)
    return {"outcome": outcome}


def probe(call: Any, kind: str, concurrency: int, dep: Dependency, barrier: Any) -> dict:
    """One call per thread or task, all at once, against a slow dependency that recovered."""
    barrier.wait(10)
    fn = dependency_call(kind, dep, 0.4, fails=False)

    def one_sync(_: int) -> tuple[str, bool]:
        return call(fn)

    async def one_async(_: int) -> tuple[str, bool]:
        return await call(fn)

    outcomes = run_concurrently(kind, concurrency, one_async if kind in ASYNC_KINDS else one_sync)
    return {
        "trials": sum(trial for _, trial in outcomes),
        "rejected": sum(outcome == "rejected" for outcome, _ in outcomes),
    }


def steady_load(call: Any, kind: str, concurrency: int, seconds: float, barrier: Any) -> dict:
    """Succeeding calls for ``seconds``: count failures, the slowest call, and shared decisions."""
    barrier.wait(10)
    deadline = time.monotonic() + seconds
    if kind in ASYNC_KINDS:

        async def ok() -> str:
            return "ok"

        fn: Any = ok
    else:

        def fn() -> str:
            return "ok"

    def loop_sync(_: int) -> tuple[int, int, float]:
        calls = failed = 0
        slowest = 0.0
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                outcome, _trial = call(fn)
                failed += outcome != "ok"
            except Exception:
                failed += 1
            slowest = max(slowest, time.monotonic() - started)
            calls += 1
            time.sleep(0.005)
        return calls, failed, slowest

    async def loop_async(_: int) -> tuple[int, int, float]:
        calls = failed = 0
        slowest = 0.0
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                outcome, _trial = await call(fn)
                failed += outcome != "ok"
            except Exception:
                failed += 1
            slowest = max(slowest, time.monotonic() - started)
            calls += 1
            await asyncio.sleep(0.005)
        return calls, failed, slowest

    per_loop = run_concurrently(kind, concurrency, loop_async if kind in ASYNC_KINDS else loop_sync)
    return {
        "calls": sum(c for c, _, _ in per_loop),
        "failed": sum(f for _, f, _ in per_loop),
        "slowest": max(s for _, _, s in per_loop),
    }


# --- the tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_the_fleet_opens_after_fail_max_plus_the_calls_in_flight(
    redis_server: Any, kind: str
) -> None:
    limits = Limits(fail_max=5, reset_timeout=30, success_threshold=1, half_open_max_calls=1)
    concurrency = 3 if kind in ASYNC_KINDS else 2
    dep = Dependency()
    barrier = FORK.Barrier(WORKERS)
    worker = Worker(kind, redis_server.url, limits, **PATIENT)
    started = [
        worker.start(hammer_failing, kind, concurrency, dep, barrier) for _ in range(WORKERS)
    ]
    summaries = collect(started)
    assert [s["store_errors"] for s in summaries] == [0] * WORKERS  # Redis answered every time
    in_flight = WORKERS * concurrency
    assert limits.fail_max <= dep.hits.value <= limits.fail_max + in_flight
    assert all(s["rejecting_at_end"] for s in summaries)
    assert redis_server.client().hget("buttress:{fleet}:circuit", "state") == "open"


@pytest.mark.parametrize("kind", KINDS)
def test_a_trip_in_one_process_makes_the_others_reject_without_calling(
    redis_server: Any, kind: str
) -> None:
    limits = Limits(fail_max=3, reset_timeout=30, success_threshold=1, half_open_max_calls=1)
    tripping, others = Dependency(), Dependency()
    tripped = FORK.Event()
    worker = Worker(kind, redis_server.url, limits, **PATIENT)
    # the others connect first, so each has seen the circuit closed before the trip
    started = [worker.start(call_after_signal, kind, others, tripped) for _ in range(WORKERS - 1)]
    started.append(worker.start(trip_then_signal, kind, limits.fail_max, tripping, tripped))
    summaries = collect(started)
    assert tripping.hits.value == limits.fail_max
    assert [s["outcome"] for s in summaries[:-1]] == ["rejected"] * (WORKERS - 1)
    assert others.hits.value == 0


@pytest.mark.parametrize("kind", ["sync", "async", "decorated", "adecorated"])
def test_concurrent_half_open_probes_across_processes_are_limited(
    redis_server: Any, kind: str
) -> None:
    limits = Limits(fail_max=1, reset_timeout=0.3, success_threshold=2, half_open_max_calls=2)
    opener = make_storage(redis_server.url, "fleet")
    opener.force("open", limits)
    dep = Dependency()
    barrier = FORK.Barrier(WORKERS + 1)
    worker = Worker(kind, redis_server.url, limits, **PATIENT)
    started = [worker.start(probe, kind, 3, dep, barrier) for _ in range(WORKERS)]
    time.sleep(0.35)  # the open period ends
    barrier.wait(10)
    summaries = collect(started)
    assert [s["store_errors"] for s in summaries] == [0] * WORKERS
    assert dep.most.value <= limits.half_open_max_calls
    assert sum(s["trials"] for s in summaries) == limits.half_open_max_calls
    assert sum(s["rejected"] for s in summaries) == WORKERS * 3 - limits.half_open_max_calls
    assert opener.observe().state == "closed"  # two trial successes closed it for everyone
    opener.close()


@pytest.mark.parametrize("kind", KINDS)
def test_redis_frozen_killed_and_restarted_mid_load_fails_no_call(
    redis_server: Any, kind: str
) -> None:
    limits = Limits(fail_max=5, reset_timeout=30, success_threshold=1, half_open_max_calls=1)
    # Every call asks Redis, so each worker meets each fault (the near-cache under faults:
    # test_near_cache.py).
    worker = Worker(
        kind, redis_server.url, limits, near_cache_ttl=0, socket_timeout=0.1,
        connect_timeout=0.1, reconnect_min=0.1, reconnect_max=0.2,
    )  # fmt: skip
    bound = make_storage(redis_server.url, "fleet", socket_timeout=0.1, connect_timeout=0.1)
    barrier = FORK.Barrier(WORKERS + 1)
    started = [worker.start(steady_load, kind, 2, 2.6, barrier) for _ in range(WORKERS)]
    barrier.wait(10)
    time.sleep(0.4)
    redis_server.freeze()
    time.sleep(0.5)
    redis_server.thaw()
    time.sleep(0.4)
    redis_server.kill()
    time.sleep(0.4)
    redis_server.start()  # empty
    time.sleep(0.3)
    calls_before_end = redis_server.counter()
    summaries = collect(started)
    assert [s["failed"] for s in summaries] == [0] * WORKERS
    assert all(s["calls"] > 50 for s in summaries)
    assert max(s["slowest"] for s in summaries) < bound.max_delay
    assert all(s["store_errors"] >= 1 for s in summaries)
    assert calls_before_end().get("evalsha", 0) > 0  # the fleet went back to the shared state
