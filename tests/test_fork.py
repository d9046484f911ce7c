"""A process forked after buttress ran calls (a pre-forking server that warms up, then forks its
workers): the child's protected calls work, with none of the parent's threads.

A child of ``os.fork`` has only the thread that forked; whatever bookkeeping the parent kept about
its other threads (idle workers of the sync timeouts' pool) describes threads the child does not
have.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import threading
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from buttress import _deadline, circuit_breaker, events, with_fallback, with_timeout
from buttress.instrumentation.prometheus import PrometheusSubscriber
from buttress.testing import force_circuit_state

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork"),
    # The child's call runs on real threads (the sync timeouts' workers): bounded by its limit.
    pytest.mark.realtime,
]

LIMIT = 5.0  # the timeout of the child's call: a child that cannot run it reports within this


def in_child(run: Callable[[], Any]) -> str:
    """``repr(run())`` in a forked child (or the error it raised), as the parent reads it."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running the parent's teardown
        try:
            try:
                report = repr(run())
            except BaseException as exc:  # reported to the parent, which asserts
                report = f"{type(exc).__name__}: {exc}"
            os.write(write, report.encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], LIMIT * 4)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        assert ready, "the child did not report"
        return os.read(read, 4096).decode()
    finally:
        os.close(read)
        os.waitpid(pid, 0)


def run_in_child(mode: Any, fn: Callable[[], Any]) -> str:
    # The parent's event loop is not the child's to use (its selector is shared with the parent).
    return in_child(lambda: asyncio.run(fn()) if mode.is_async else fn())


def test_a_timeout_call_runs_in_a_child_forked_after_the_parent_made_one(mode) -> None:
    protected = with_timeout("forked", seconds=LIMIT)(mode.define(lambda: os.getpid()))
    assert mode.run(protected) == os.getpid()
    if not mode.is_async:
        # The parent's worker stays alive, idle, after the call: the state the child inherits.
        assert _deadline.POOL.snapshot()["idle"] >= 1

    report = run_in_child(mode, protected)

    assert report.isdigit(), report
    assert int(report) != os.getpid()  # it ran, in the child


def test_a_forked_child_starts_with_an_empty_worker_pool() -> None:
    protected = with_timeout("forked-pool", seconds=LIMIT)(lambda: None)
    protected()

    report = in_child(_deadline.worker_pool_snapshot)

    assert report == repr({"threads": 0, "idle": 0, "pending": 0, "abandoned": {}})


def test_a_child_replays_its_own_deferred_calls_and_not_the_parents(mode) -> None:
    ran: list[str] = []
    protected = with_fallback(name="forked-defer", defer=True)(
        circuit_breaker(name="forked-defer", timeout=30)(mode.define(ran.append))
    )
    force_circuit_state("forked-defer", "forced_open")
    parents = mode.run(protected, "parent's")  # queued: a replay thread waits for its turn

    def child() -> list[str]:
        async def deferred_and_replayed() -> Any:
            # One loop: a task's replay runs on the loop its function was last called on.
            handle = await protected("child's")
            force_circuit_state("forked-defer", "closed")
            async with asyncio.timeout(LIMIT):
                return await handle.wait()

        if mode.is_async:
            asyncio.run(deferred_and_replayed())
        else:
            handle = protected("child's")
            force_circuit_state("forked-defer", "closed")
            handle.result(LIMIT)
        return ran

    # The parent's call is the parent's to replay: the child replays only its own.
    assert in_child(child) == repr(["child's"])
    assert ran == []
    force_circuit_state("forked-defer", "closed")
    if mode.is_async:

        async def replayed() -> Any:
            # The parent's async replay runs as a task on the loop its function was called on.
            async with asyncio.timeout(LIMIT):
                return await parents.wait()

        assert mode.run(replayed) is None
    else:
        assert parents.result(LIMIT) is None
    assert ran == ["parent's"]


def test_a_childs_multiprocess_gauges_follow_its_circuits_open_time(mode, clock) -> None:
    # In multiprocess mode a watcher thread of the subscriber writes half_open when an idle
    # circuit's open time runs out. The parent's watcher (a circuit of its was open at the fork)
    # is not in the child: the child starts its own for its circuits.
    registry = CollectorRegistry()
    subscriber = PrometheusSubscriber(registry, multiprocess=True)

    def state(service: str, name: str) -> float | None:
        labels = {"service": service, "state": name}
        return registry.get_sample_value("buttress_circuit_breaker_state", labels)

    def down() -> None:
        raise ConnectionError("down")

    undos = [events.subscribe(h, [kind]) for kind, h in subscriber.handlers().items()]
    try:
        parents = circuit_breaker(name="forked-pay", fail_max=1, timeout=20)(mode.define(down))
        assert isinstance(mode.outcome(parents), ConnectionError)
        assert subscriber._watcher is not None  # watching the parent's open circuit

        def child() -> float | None:
            childs = circuit_breaker(name="forked-ship", fail_max=1, timeout=20)(down)
            with contextlib.suppress(ConnectionError):
                childs()
            assert state("forked-ship", "open") == 1
            clock.advance(20)
            ready = threading.Event()
            for _ in range(int(LIMIT / 0.01)):  # the watcher reads the clock in slices
                if state("forked-ship", "half_open") == 1:
                    break
                ready.wait(0.01)
            return state("forked-ship", "half_open")

        assert in_child(child) == "1.0"
    finally:
        for undo in undos:
            undo()
