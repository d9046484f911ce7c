"""Bulkhead: bounded concurrency with a FIFO queue, for threads and tasks on any event loop."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections import deque
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from buttress import _clock, _context, events, registry, with_bulkhead, with_timeout
from buttress.events import (
    BulkheadAcquired,
    BulkheadQueued,
    BulkheadReleased,
    CallRejected,
    ShadowDecision,
    TimeoutExceeded,
)
from buttress.exceptions import BulkheadFullError, TimeoutExceededError
from buttress.patterns import bulkhead
from buttress.patterns._base import BuildContext, Waiter
from buttress.patterns.bulkhead import Bulkhead, BulkheadOptions, BulkheadStrategy
from buttress.patterns.timeout import TimeoutStrategy
from buttress.policy import alink, asettle, link, settle
from buttress.testing import FakeClock, capture_events


def acquire(bh: Bulkhead) -> None:
    """Take a slot for this thread as a call does: queue for one when none is free."""
    wait = bh.admit()
    if wait is not None:
        settle(wait)


async def aacquire(bh: Bulkhead) -> None:
    """Take a slot for this task as a call does: queue for one when none is free."""
    wait = bh.admit()
    if wait is not None:
        await asettle(wait)


def strategy(service: str = "svc", mode: str = "enforce", **options: Any) -> BulkheadStrategy:
    ctx = BuildContext(service, BulkheadOptions(**options), service, mode, registry.shared)
    built = bulkhead.build(ctx)
    assert isinstance(built, BulkheadStrategy)
    return built


def wait_for(predicate, seconds: float = 5.0) -> None:
    """Real-time poll for another thread's progress (bounded; never a duration under test)."""
    limit = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < limit, "condition not reached in time"
        time.sleep(0.0005)


class Background:
    """One call of a ``mode`` function on its own thread (async: on its own event loop)."""

    def __init__(self, mode, fn, *args: Any) -> None:
        self.outcome: Any = None
        self.done = threading.Event()

        def run() -> None:
            try:
                self.outcome = asyncio.run(fn(*args)) if mode.is_async else fn(*args)
            except BaseException as exc:  # the test inspects it
                self.outcome = exc
            finally:
                self.done.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self) -> Any:
        assert self.done.wait(5), "background call did not finish"
        return self.outcome


class Scene:
    """Calls through one bulkhead that can be held open and let go from the test."""

    def __init__(self, mode, built: BulkheadStrategy) -> None:
        self.mode = mode
        self.built = built
        self.gates: list[threading.Event] = []
        self.order: list[str] = []

    def function(self, label: str = "call", *, hold: bool = False):
        gate = threading.Event()
        self.gates.append(gate)

        def body() -> str:
            self.order.append(label)
            if hold:
                assert gate.wait(5)
            return label

        return self.mode.chain(self.built, self.mode.define(body)), gate

    def start(
        self, label: str = "call", *, hold: bool = False
    ) -> tuple[Background, threading.Event]:
        fn, gate = self.function(label, hold=hold)
        return Background(self.mode, fn), gate

    def hold(self, n: int) -> list[tuple[Background, threading.Event]]:
        held = [self.start(f"holder{i}", hold=True) for i in range(n)]
        wait_for(lambda: self.snapshot()["active"] == n)
        return held

    def snapshot(self):
        return self.built.bulkhead.snapshot()

    def release_all(self) -> None:
        for gate in self.gates:
            gate.set()


@pytest.fixture
def scenes():
    made: list[Scene] = []

    def make(mode, *, shadow: bool = False, **options: Any) -> Scene:
        scene = Scene(mode, strategy(mode="shadow" if shadow else "enforce", **options))
        made.append(scene)
        return scene

    yield make
    for scene in made:
        scene.release_all()


def advance_until(clock: FakeClock, done: threading.Event, step: float = 0.5) -> None:
    """Move simulated time until ``done`` (the waiter registers its deadline at its own pace)."""
    limit = time.monotonic() + 5
    while not done.is_set():
        assert time.monotonic() < limit
        clock.advance(step)
        done.wait(0.001)


# --- admission ------------------------------------------------------------------------------------


def test_build_shares_one_bulkhead_per_key_and_is_off_when_disabled():
    first, second = strategy("shared", limit=3), strategy("shared", limit=3)
    assert first.bulkhead is second.bulkhead
    assert first.pattern == "bulkhead"
    off = BulkheadOptions(enabled=False)
    assert bulkhead.build(BuildContext("svc", off, "svc")) is None


def test_a_call_takes_and_gives_back_a_slot(mode, clock):
    fn = mode.chain(strategy(limit=2), mode.define(lambda x: x + 1))
    with capture_events([BulkheadAcquired, BulkheadReleased]) as seen:
        assert mode.run(fn, 1) == 2
    assert seen == [BulkheadAcquired("svc", 0.0, 1, 0, 2), BulkheadReleased("svc", 0, 0)]


def test_limit_calls_run_and_the_next_is_rejected_without_a_queue(mode, clock, scenes):
    scene = scenes(mode, limit=2)
    held = scene.hold(2)
    probe, _ = scene.function("probe")
    with capture_events([CallRejected]) as seen:
        error = mode.outcome(probe)
    assert isinstance(error, BulkheadFullError)
    assert (error.service, error.retry_after) == ("svc", None)
    assert "2 calls in flight" in str(error)
    assert seen == [CallRejected("svc", "bulkhead", "full", None)]
    assert "probe" not in scene.order
    scene.release_all()
    assert [call.result() for call, _ in held] == ["holder0", "holder1"]
    assert scene.snapshot()["active"] == 0
    assert mode.run(probe) == "probe"


def test_queued_calls_get_freed_slots_in_arrival_order(mode, clock, scenes):
    scene = scenes(mode, limit=1, max_queue=2)
    [(holder, gate)] = scene.hold(1)
    with capture_events([BulkheadQueued]) as seen:
        first, _ = scene.start("first")
        wait_for(lambda: scene.snapshot()["queued"] == 1)
        second, _ = scene.start("second")
        wait_for(lambda: scene.snapshot()["queued"] == 2)
    assert seen == [BulkheadQueued("svc", 1), BulkheadQueued("svc", 2)]
    gate.set()
    assert (holder.result(), first.result(), second.result()) == ("holder0", "first", "second")
    assert scene.order == ["holder0", "first", "second"]
    assert scene.snapshot() == {
        "service": "svc",
        "active": 0,
        "queued": 0,
        "limit": 1,
        "utilization": 0.0,
    }


def test_a_full_queue_rejects_at_once(mode, clock, scenes):
    scene = scenes(mode, limit=1, max_queue=1)
    scene.hold(1)
    waiting, _ = scene.start("waiting")
    wait_for(lambda: scene.snapshot()["queued"] == 1)
    probe, _ = scene.function("probe")
    error = mode.outcome(probe)
    assert isinstance(error, BulkheadFullError)
    assert "1 queued" in str(error)
    scene.release_all()
    assert waiting.result() == "waiting"
    assert (scene.snapshot()["active"], scene.snapshot()["queued"]) == (0, 0)


def test_a_queued_call_gives_up_after_queue_timeout(mode, clock, scenes):
    scene = scenes(mode, limit=1, max_queue=1, queue_timeout=2)
    scene.hold(1)
    with capture_events([CallRejected]) as seen:
        waiting, _ = scene.start("waiting")
        wait_for(lambda: scene.snapshot()["queued"] == 1)
        advance_until(clock, waiting.done)
    error = waiting.result()
    assert isinstance(error, BulkheadFullError)
    assert "within 2 s" in str(error)
    assert seen == [CallRejected("svc", "bulkhead", "queue_timeout", None)]
    assert scene.snapshot()["queued"] == 0
    assert "waiting" not in scene.order
    scene.release_all()
    wait_for(lambda: scene.snapshot()["active"] == 0)


def test_a_queued_call_reports_how_long_it_waited(mode, clock, scenes):
    scene = scenes(mode, limit=1, max_queue=1)
    [(_, gate)] = scene.hold(1)
    with capture_events([BulkheadAcquired]) as seen:
        waiting, _ = scene.start("waiting")
        wait_for(lambda: scene.snapshot()["queued"] == 1)
        clock.advance(3)
        gate.set()
        assert waiting.result() == "waiting"
    assert [e.waited for e in seen] == [3.0]


# --- slots come back on every path ----------------------------------------------------------------


def test_a_failing_call_gives_its_slot_back(mode, clock):
    own = ConnectionError("down")

    def body():
        raise own

    built = strategy(limit=1)
    assert mode.outcome(mode.chain(built, mode.define(body))) is own
    assert built.bulkhead.snapshot()["active"] == 0


def test_a_timed_out_async_call_gives_its_slot_back(clock):
    fn = with_timeout(name="slow", seconds=1)(
        with_bulkhead(name="slow", limit=1)(_async_sleeper(10))
    )
    with pytest.raises(TimeoutExceededError):
        asyncio.run(fn())
    assert registry.instances("bulkhead")["slow"].snapshot()["active"] == 0


def _async_sleeper(seconds: float):
    async def sleeper() -> str:
        await _clock.asleep(seconds)
        return "done"

    return sleeper


def test_an_abandoned_sync_call_keeps_its_slot_until_it_really_ends(clock):
    gate = threading.Event()

    def hung() -> str:
        clock.sleep(10)
        gate.wait(5)
        return "late"

    fn = with_timeout(name="hung", seconds=1)(with_bulkhead(name="hung", limit=1)(hung))
    with pytest.raises(TimeoutExceededError):
        fn()
    shared = registry.instances("bulkhead")["hung"]
    # The dependency is still busy with the abandoned call: the slot says so.
    assert shared.snapshot()["active"] == 1
    gate.set()
    wait_for(lambda: shared.snapshot()["active"] == 0)


def test_a_task_cancelled_while_queued_leaves_no_trace(clock):
    async def scenario() -> None:
        bh = Bulkhead("svc", BulkheadOptions(limit=1, max_queue=2))
        assert bh.admit() is None  # took the free slot
        waiters = [asyncio.create_task(aacquire(bh)) for _ in range(2)]
        await asyncio.sleep(0)
        assert bh.snapshot()["queued"] == 2
        waiters[0].cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiters[0]
        assert (bh.snapshot()["active"], bh.snapshot()["queued"]) == (1, 1)
        bh.release()  # goes to the remaining waiter, not to the cancelled one
        await waiters[1]
        assert (bh.snapshot()["active"], bh.snapshot()["queued"]) == (1, 0)
        bh.release()
        assert (bh.snapshot()["active"], bh.snapshot()["queued"]) == (0, 0)

    asyncio.run(scenario())


def test_a_task_granted_a_slot_as_it_is_cancelled_gives_it_back(clock):
    async def scenario() -> None:
        bh = Bulkhead("svc", BulkheadOptions(limit=1, max_queue=1))
        assert bh.admit() is None  # took the free slot
        waiter = asyncio.create_task(aacquire(bh))
        await asyncio.sleep(0)
        bh.release()  # hands the slot to the waiter ...
        waiter.cancel()  # ... which is cancelled before it runs again
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert (bh.snapshot()["active"], bh.snapshot()["queued"]) == (0, 0)

    asyncio.run(scenario())


def test_a_task_granted_a_slot_from_another_thread_as_it_is_cancelled_gives_it_back(clock):
    async def scenario() -> None:
        bh = Bulkhead("svc", BulkheadOptions(limit=1, max_queue=1))
        assert bh.admit() is None  # took the free slot
        waiter = asyncio.create_task(aacquire(bh))
        await asyncio.sleep(0)
        releaser = threading.Thread(target=bh.release)
        releaser.start()
        releaser.join(5)  # the grant is in flight to this loop through call_soon_threadsafe
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert (bh.snapshot()["active"], bh.snapshot()["queued"]) == (0, 0)

    asyncio.run(scenario())


def test_a_task_granted_a_slot_as_its_queue_timeout_fires_keeps_it(clock):
    async def scenario() -> None:
        bh = Bulkhead("svc", BulkheadOptions(limit=1, max_queue=1, queue_timeout=1))
        assert bh.admit() is None  # took the free slot
        waiter = asyncio.create_task(aacquire(bh))
        await asyncio.sleep(0)
        clock.advance(1)  # the queue timeout fires ...
        bh.release()  # ... and a slot is handed over in the same instant
        await waiter  # the slot won: no BulkheadFullError
        assert (bh.snapshot()["active"], bh.snapshot()["queued"]) == (1, 0)
        bh.release()
        assert bh.snapshot()["active"] == 0

    asyncio.run(scenario())


def test_a_thread_granted_a_slot_as_its_queue_timeout_fires_never_leaks(clock):
    # Which side wins the race is up to the scheduler; either way nothing leaks.
    outcomes = set()
    for _ in range(20):
        bh = Bulkhead("svc", BulkheadOptions(limit=1, max_queue=1, queue_timeout=1))
        assert bh.admit() is None  # took the free slot
        result: list[object] = []

        def waiter(bh: Bulkhead = bh, result: list[object] = result) -> None:
            try:
                acquire(bh)
            except BulkheadFullError as exc:
                result.append(exc)
                return
            result.append("slot")
            bh.release()

        thread = threading.Thread(target=waiter)
        thread.start()
        wait_for(lambda bh=bh: bh.snapshot()["queued"] == 1)
        clock.advance(1)
        bh.release()
        thread.join(5)
        outcomes.add(type(result[0]).__name__)
        assert (bh.snapshot()["active"], bh.snapshot()["queued"]) == (0, 0)
    assert outcomes <= {"str", "BulkheadFullError"}


class Interrupt(BaseException):
    """Stands in for a KeyboardInterrupt arriving while a thread waits."""


def test_a_thread_interrupted_while_queued_leaves_no_trace(clock, monkeypatch):
    bh = Bulkhead("svc", BulkheadOptions(limit=1, max_queue=1))
    assert bh.admit() is None  # took the free slot

    def interrupted(event, seconds):
        raise Interrupt

    with monkeypatch.context() as patch:
        patch.setattr(_clock, "wait", interrupted)
        with pytest.raises(Interrupt):
            acquire(bh)
    assert (bh.snapshot()["active"], bh.snapshot()["queued"]) == (1, 0)


def test_a_thread_granted_a_slot_as_it_is_interrupted_gives_it_back(clock, monkeypatch):
    bh = Bulkhead("svc", BulkheadOptions(limit=1, max_queue=1))
    assert bh.admit() is None  # took the free slot

    def granted_then_interrupted(event, seconds):
        bh.release()  # the slot is handed to this waiter ...
        raise Interrupt  # ... just before the interrupt lands

    with monkeypatch.context() as patch:
        patch.setattr(_clock, "wait", granted_then_interrupted)
        with pytest.raises(Interrupt):
            acquire(bh)
    assert (bh.snapshot()["active"], bh.snapshot()["queued"]) == (0, 0)


def test_a_closed_event_loop_does_not_swallow_the_slot(clock):
    bh = Bulkhead("svc", BulkheadOptions(limit=1, max_queue=2))
    assert bh.admit() is None  # took the free slot
    loop = asyncio.new_event_loop()
    abandoned = loop.create_task(aacquire(bh))
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()  # with its waiter still queued: that task can never take a slot
    thread_got_it = threading.Event()

    def waiter() -> None:
        acquire(bh)
        thread_got_it.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    wait_for(lambda: bh.snapshot()["queued"] == 2)
    bh.release()
    assert thread_got_it.wait(5)
    thread.join(5)
    assert (bh.snapshot()["active"], bh.snapshot()["queued"]) == (1, 0)
    abandoned._log_destroy_pending = False


# --- concurrency ----------------------------------------------------------------------------------


class Peak:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


@pytest.mark.realtime
def test_64_threads_never_exceed_the_limit():
    built = strategy("threads", limit=8, max_queue=64)
    peak = Peak()
    gate = threading.Event()

    def body(args, kwargs):
        peak.enter()
        gate.wait(5)
        time.sleep(0.0005)  # overlap the waiters' hand-offs with calls still leaving
        peak.leave()
        return args[0]

    step = link(built, body)
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda i=i: results.append(step((i,), {}))) for i in range(64)
    ]
    for thread in threads:
        thread.start()
    wait_for(lambda: built.bulkhead.snapshot()["queued"] == 56)
    assert (peak.peak, built.bulkhead.snapshot()["active"]) == (8, 8)
    gate.set()
    for thread in threads:
        thread.join(5)
    assert sorted(results) == list(range(64))
    assert peak.peak == 8
    snapshot = built.bulkhead.snapshot()
    assert (snapshot["active"], snapshot["queued"]) == (0, 0)


def test_1000_tasks_never_exceed_the_limit():
    built = strategy("tasks", limit=16, max_queue=1000)
    peak = Peak()

    async def body(args, kwargs):
        peak.enter()
        for _ in range(3):
            await asyncio.sleep(0)
        peak.leave()
        return args[0]

    step = alink(built, body)

    async def scenario() -> list[int]:
        return await asyncio.gather(*(step((i,), {}) for i in range(1000)))

    assert asyncio.run(scenario()) == list(range(1000))
    assert peak.peak == 16
    snapshot = built.bulkhead.snapshot()
    assert (snapshot["active"], snapshot["queued"]) == (0, 0)


def test_1000_tasks_with_cancellations_and_timeouts_leak_nothing(clock):
    built = strategy("churn", limit=8, max_queue=1000, queue_timeout=5)
    peak = Peak()

    async def body(args, kwargs):
        peak.enter()
        try:
            await _clock.asleep(args[0] % 3)  # the fake clock jumps: queue timeouts fire
        finally:
            peak.leave()
        return args[0]

    step = alink(built, body)

    async def scenario() -> list[object]:
        tasks = [asyncio.create_task(step((i,), {})) for i in range(1000)]
        await asyncio.sleep(0)
        for task in tasks[::7]:
            task.cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    outcomes = asyncio.run(scenario())
    kinds = {type(o).__name__ for o in outcomes}
    assert kinds <= {"int", "CancelledError", "BulkheadFullError"}
    assert "CancelledError" in kinds
    assert peak.peak <= 8
    snapshot = built.bulkhead.snapshot()
    assert (snapshot["active"], snapshot["queued"]) == (0, 0)


@pytest.mark.realtime
def test_one_bulkhead_serves_four_event_loops_in_four_threads_at_once():
    built = strategy("loops", limit=3, max_queue=200)
    peak = Peak()
    loops_seen: set[int] = set()

    async def body(args, kwargs):
        peak.enter()
        loops_seen.add(id(asyncio.get_running_loop()))
        await asyncio.sleep(0.001)
        peak.leave()
        return args[0]

    step = alink(built, body)
    results: dict[int, list[int]] = {}

    def run_loop(n: int) -> None:
        async def many() -> list[int]:
            return await asyncio.gather(*(step((n * 100 + i,), {}) for i in range(25)))

        results[n] = asyncio.run(many())

    started = time.monotonic()
    threads = [threading.Thread(target=run_loop, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert time.monotonic() - started < 2
    assert results == {n: [n * 100 + i for i in range(25)] for n in range(4)}
    assert len(loops_seen) == 4
    assert peak.peak <= 3
    snapshot = built.bulkhead.snapshot()
    assert (snapshot["active"], snapshot["queued"]) == (0, 0)


class Told(Waiter):
    """A waiter that only notes it was woken (the drivers' own wait is not under test here)."""

    __slots__ = ("woken",)

    def __init__(self) -> None:
        super().__init__()
        self.woken = False

    def wake(self) -> bool:
        self.woken = True
        return True


def test_a_slot_given_back_without_the_lock_as_a_call_queues_is_found_by_the_queue():
    # The interleaving the lock-free release must survive: the queue looked for a free slot, found
    # none, and before the waiter is in the queue a holder gives its slot back (lock-free: nothing
    # was owed yet, so it takes no lock). The queue must find that slot when it looks again.
    bh = Bulkhead("race", BulkheadOptions(limit=1, max_queue=1))
    assert bh.admit() is None  # the one slot is taken

    class ReleasedMeanwhile(deque[Waiter]):
        def append(self, waiter: Waiter) -> None:
            bh.release()  # the holder, "on another thread", in the lock-free path
            super().append(waiter)

    bh._waiters = ReleasedMeanwhile()
    wait = bh.admit()
    assert wait is not None
    waiter = Told()
    assert wait.queue(waiter) is False  # no wait: it holds the slot given back meanwhile
    assert waiter.granted
    assert bh.snapshot() == {
        "service": "race",
        "active": 1,
        "queued": 0,
        "limit": 1,
        "utilization": 1.0,
    }
    bh.release()
    assert (bh.snapshot()["active"], len(bh._free), bh._claims) == (0, 1, 0)


def test_a_newcomer_never_takes_a_free_slot_a_waiter_is_owed():
    # A slot given back while a call waits sits, for an instant, among the free slots before its
    # giver hands it on under the lock. A newcomer that takes it then must pass it to the waiter
    # and queue behind it.
    bh = Bulkhead("fair", BulkheadOptions(limit=1, max_queue=2))
    assert bh.admit() is None
    first = Told()
    assert bh.admit().queue(first) is True  # type: ignore[union-attr]
    bh._free.append(True)  # the holder's release, stopped between its append and its check
    newcomer = bh.admit()
    assert newcomer is not None  # queued, not admitted
    assert first.granted
    assert first.woken
    second = Told()
    assert newcomer.queue(second) is True
    assert (bh.snapshot()["active"], bh.snapshot()["queued"]) == (1, 1)
    bh.release()  # the first waiter's call ends: the second waiter's turn
    assert second.granted
    bh.release()
    assert (bh.snapshot()["active"], bh.snapshot()["queued"], bh._claims) == (0, 0, 0)


def test_a_newcomer_never_takes_a_free_slot_a_lowered_limit_is_owed():
    bh = Bulkhead("owed", BulkheadOptions(limit=2))
    assert bh.admit() is None
    assert bh.admit() is None
    bh.reconfigure(BulkheadOptions(limit=1))  # two in flight over a limit of one: one is owed
    assert (bh._debt, bh._claims) == (1, 1)
    bh._free.append(True)  # a release stopped between its append and its check
    assert bh.admit() is not None  # must queue (and, with no queue, be rejected): 2 in flight
    assert (bh.snapshot()["active"], bh._debt) == (1, 0)  # the slot paid what was owed
    bh.release()
    assert (bh.snapshot()["active"], len(bh._free) + bh._spare, bh._claims) == (0, 1, 0)


@pytest.fixture
def switch_often():
    """Switch threads as often as CPython allows: races in the lock-free paths get their turn."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def _assert_at_rest(bh: Bulkhead, limit: int) -> None:
    """Every slot is back: free (with or without the lock), none in flight, none owed."""
    snapshot = bh.snapshot()
    assert (snapshot["active"], snapshot["queued"], snapshot["limit"]) == (0, 0, limit)
    assert (bh._debt, bh._claims) == (0, 0)
    assert len(bh._free) + bh._spare == limit


@pytest.mark.parametrize("fast_slots", [bulkhead.FAST_SLOTS, 2])
def test_threads_hammering_the_lock_free_slots_never_exceed_the_limit_nor_lose_one(
    fast_slots, switch_often, monkeypatch
):
    # No call waits on anything but the bulkhead: the slots go round as fast as the threads can
    # take them, through admit()/release() without the lock and the queue when none is free.
    monkeypatch.setattr(bulkhead, "FAST_SLOTS", fast_slots)
    bh = Bulkhead("hammer", BulkheadOptions(limit=3, max_queue=64))
    peak = Peak()
    done = [0] * 8

    def worker(n: int) -> None:
        for _ in range(1500):
            acquire(bh)
            peak.enter()
            peak.leave()
            bh.release()
            done[n] += 1

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "a waiter was never woken"
    assert done == [1500] * 8
    assert peak.peak <= 3
    _assert_at_rest(bh, 3)


def test_a_new_bulkhead_keeps_one_lock_free_token_and_grows_the_list_when_calls_overlap():
    # Memory at rest: one token, the rest of the free slots a count. Calls that never overlap
    # stay on the lock-free path with it; the first overlap refills the list to its share.
    bh = Bulkhead("grow", BulkheadOptions(limit=50))
    assert (len(bh._free), bh._spare) == (1, 49)
    for _ in range(3):
        assert bh.admit() is None
        bh.release()
    assert (len(bh._free), bh._spare) == (1, 49)
    assert bh.admit() is None
    assert bh.admit() is None  # found the list empty: refilled under the lock
    assert (len(bh._free), bh._spare) == (bulkhead.FAST_SLOTS, 48 - bulkhead.FAST_SLOTS)
    bh.release()
    bh.release()
    _assert_at_rest(bh, 50)
    assert len(bh._free) == bulkhead.FAST_SLOTS
    assert (len(Bulkhead("one", BulkheadOptions(limit=1))._free), bulkhead.FAST_SLOTS) == (1, 16)


@pytest.mark.parametrize("limit", [4, 50])
def test_threads_and_tasks_racing_on_a_new_bulkheads_first_calls_never_exceed_it(
    limit, switch_often
):
    # 16 threads and 16 tasks take their first slots of a new bulkhead at once (its list holds
    # one token): every call gets one, never more in flight than the limit, every slot comes back.
    bh = Bulkhead(f"first-{limit}", BulkheadOptions(limit=limit, max_queue=64))
    peak = Peak()
    start = threading.Barrier(17)
    done: list[str] = []

    def thread_call(name: str) -> None:
        start.wait()
        acquire(bh)
        peak.enter()
        peak.leave()
        bh.release()
        done.append(name)

    async def task_call(name: str) -> None:
        await aacquire(bh)
        peak.enter()
        await asyncio.sleep(0)
        peak.leave()
        bh.release()
        done.append(name)

    async def tasks() -> None:
        start.wait()
        await asyncio.gather(*(task_call(f"task-{n}") for n in range(16)))

    threads = [threading.Thread(target=thread_call, args=(f"thread-{n}",)) for n in range(16)]
    threads.append(threading.Thread(target=asyncio.run, args=(tasks(),)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "a waiter was never woken"
    assert len(done) == 32
    assert peak.peak <= limit
    _assert_at_rest(bh, limit)


def test_bulkheads_sharing_a_lock_hand_their_slots_on_independently(monkeypatch):
    # Bulkheads take one of 16 shared locks: two that share one keep their own slots and queues,
    # and one's release (which wakes its waiter under the lock) never needs the other's turn.
    monkeypatch.setattr(bulkhead, "_LOCKS", (threading.Lock(),))
    first = Bulkhead("first", BulkheadOptions(limit=1, max_queue=1))
    second = Bulkhead("second", BulkheadOptions(limit=1, max_queue=1))
    assert first._lock is second._lock
    assert first.admit() is None
    assert second.admit() is None
    waiters = Told(), Told()
    for bh, waiter in zip((first, second), waiters, strict=True):
        assert bh.admit().queue(waiter) is True  # type: ignore[union-attr]
    first.release()
    assert waiters[0].granted
    assert not waiters[1].granted
    assert (first.snapshot()["queued"], second.snapshot()["queued"]) == (0, 1)
    second.release()
    assert waiters[1].granted
    first.release()
    second.release()
    _assert_at_rest(first, 1)
    _assert_at_rest(second, 1)


def test_threads_and_tasks_through_a_limit_that_keeps_changing_keep_every_slot(switch_often):
    # Threads and two event loops call through one bulkhead while another thread moves its limit
    # between 1 and 4: never more calls in flight than the largest limit, and when all is done
    # every slot is back and nothing is owed.
    bh = Bulkhead("moving", BulkheadOptions(limit=2, max_queue=1000))
    peak = Peak()
    stop = threading.Event()
    counts: dict[str, int] = {}

    def thread_calls(name: str) -> None:
        for _ in range(800):
            acquire(bh)
            peak.enter()
            peak.leave()
            bh.release()
        counts[name] = 800

    def loop_calls(name: str) -> None:
        async def one() -> None:
            await aacquire(bh)
            peak.enter()
            await asyncio.sleep(0)
            peak.leave()
            bh.release()

        async def many() -> None:
            for _ in range(20):
                await asyncio.gather(*(one() for _ in range(20)))

        asyncio.run(many())
        counts[name] = 400

    def mover() -> None:
        limits = [1, 4, 2, 3]
        i = 0
        while not stop.is_set():
            bh.reconfigure(BulkheadOptions(limit=limits[i % 4], max_queue=1000))
            i += 1
        bh.reconfigure(BulkheadOptions(limit=2, max_queue=1000))

    workers = [threading.Thread(target=thread_calls, args=(f"thread{n}",)) for n in range(4)]
    workers += [threading.Thread(target=loop_calls, args=(f"loop{n}",)) for n in range(2)]
    moving = threading.Thread(target=mover)
    moving.start()
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(60)
    stop.set()
    moving.join(10)
    assert not any(thread.is_alive() for thread in workers), "a waiter was never woken"
    assert counts == {**{f"thread{n}": 800 for n in range(4)}, "loop0": 400, "loop1": 400}
    assert peak.peak <= 4
    _assert_at_rest(bh, 2)


# --- reconfiguration, snapshot, shadow ------------------------------------------------------------


def test_reconfigure_keeps_calls_in_flight_and_a_raised_limit_admits_waiters(mode, clock, scenes):
    scene = scenes(mode, limit=1, max_queue=2)
    scene.hold(1)
    first, _ = scene.start("first")
    wait_for(lambda: scene.snapshot()["queued"] == 1)
    scene.built.bulkhead.reconfigure(BulkheadOptions(limit=2, max_queue=2))
    assert first.result() == "first"  # admitted by the raised limit while the holder still runs
    assert scene.snapshot()["active"] == 1
    scene.built.bulkhead.reconfigure(BulkheadOptions(limit=1, max_queue=0))
    assert scene.snapshot()["limit"] == 1
    scene.release_all()
    wait_for(lambda: scene.snapshot()["active"] == 0)


def test_a_lowered_limit_admits_nobody_until_calls_in_flight_drop_below_it(mode, clock, scenes):
    scene = scenes(mode, limit=3, max_queue=1)
    held = scene.hold(3)
    scene.built.bulkhead.reconfigure(BulkheadOptions(limit=1, max_queue=1))
    snapshot = scene.snapshot()
    assert (snapshot["active"], snapshot["limit"], snapshot["utilization"]) == (3, 1, 3.0)
    waiting, _ = scene.start("waiting")
    wait_for(lambda: scene.snapshot()["queued"] == 1)
    held[0][1].set()
    held[1][1].set()
    wait_for(lambda: scene.snapshot()["active"] == 1)
    assert not waiting.done.is_set()  # the last holder is still at the (new) limit
    held[2][1].set()
    assert waiting.result() == "waiting"
    assert (scene.snapshot()["active"], scene.snapshot()["queued"]) == (0, 0)


def test_registry_reconfigures_the_shared_instance_in_place(clock):
    first = strategy("svc", limit=1)
    assert first.bulkhead.admit() is None  # took the free slot
    second = strategy("svc", limit=4)
    assert second.bulkhead is first.bulkhead
    assert first.bulkhead.snapshot()["limit"] == 4
    assert first.bulkhead.snapshot()["active"] == 1
    first.bulkhead.release()


def test_snapshot_reports_utilization(mode, clock, scenes):
    scene = scenes(mode, limit=4)
    scene.hold(1)
    assert scene.snapshot() == {
        "service": "svc",
        "active": 1,
        "queued": 0,
        "limit": 4,
        "utilization": 0.25,
    }


def test_shadow_mode_never_rejects_but_says_when_it_would_have(mode, clock, scenes):
    scene = scenes(mode, shadow=True, limit=1, max_queue=1)
    scene.hold(1)
    fn, _ = scene.function("extra")
    with capture_events([ShadowDecision, CallRejected]) as seen:
        assert mode.run(fn) == "extra"  # would have queued: let through silently
        overflow, _ = scene.start("overflow", hold=True)
        wait_for(lambda: "overflow" in scene.order)
        assert mode.run(fn) == "extra"  # the queue would have been full: would have rejected
    assert seen == [ShadowDecision("svc", "bulkhead", "reject")]
    assert scene.snapshot()["active"] == 1  # only calls that found a free slot are counted
    scene.release_all()
    assert overflow.result() == "overflow"
    wait_for(lambda: scene.snapshot()["active"] == 0)
    assert scene.built.bulkhead._overflow == 0


def test_with_bulkhead_decorator_shares_the_service_bulkhead(mode, clock):
    one = with_bulkhead(name="api", limit=2)(mode.define(lambda: "one"))
    two = with_bulkhead(name="api", limit=2)(mode.define(lambda: "two"))
    assert (mode.run(one), mode.run(two)) == ("one", "two")
    assert list(registry.instances("bulkhead")) == ["api"]
    assert registry.instances("bulkhead")["api"].snapshot()["limit"] == 2


# --- a stateful model -----------------------------------------------------------------------------


class BulkheadMachine(RuleBasedStateMachine):
    """Tasks start, finish, get cancelled, time out in the queue, and the limits change.

    After every step the real bulkhead must agree with a plain model: who holds a slot, who waits
    in which order, and why each rejected call was rejected.
    """

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.previous_clock = _clock.set_clock(self.clock)
        self.loop = asyncio.new_event_loop()
        self.tasks: dict[int, asyncio.Task[Any]] = {}
        self.gates: dict[int, asyncio.Event] = {}
        self.inside: set[int] = set()
        self.next_id = 0
        # The model.
        self.running: set[int] = set()
        self.queue: list[tuple[int, float]] = []  # (call, simulated time it queued)
        self.rejected: dict[int, str] = {}
        self.cancelled: set[int] = set()

    @initialize(
        limit=st.integers(1, 3),
        max_queue=st.integers(0, 3),
        queue_timeout=st.none() | st.sampled_from([1.0, 2.5]),
    )
    def setup(self, limit: int, max_queue: int, queue_timeout: float | None) -> None:
        self.options = BulkheadOptions(
            limit=limit, max_queue=max_queue, queue_timeout=queue_timeout
        )
        self.built = strategy("model", **self.options.model_dump())
        self.step = alink(self.built, self._body)

    async def _body(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        call = args[0]
        self.inside.add(call)
        try:
            await self.gates[call].wait()
        finally:
            self.inside.discard(call)
        return call

    def _settle(self) -> None:
        for _ in range(6):
            self.loop.run_until_complete(asyncio.sleep(0))

    def _hand_off(self, leaving: int) -> None:
        """Model of release: the oldest waiter takes the slot unless over a lowered limit."""
        over_limit = len(self.running) > self.options.limit
        self.running.discard(leaving)
        if self.queue and not over_limit:
            self.running.add(self.queue.pop(0)[0])

    @rule()
    def start(self) -> None:
        call = self.next_id
        self.next_id += 1
        self.gates[call] = asyncio.Event()
        self.tasks[call] = self.loop.create_task(self.step((call,), {}))
        if len(self.running) < self.options.limit:
            self.running.add(call)
        elif len(self.queue) < self.options.max_queue:
            self.queue.append((call, self.clock.monotonic()))
        else:
            self.rejected[call] = "full"
        self._settle()

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        call = data.draw(st.sampled_from(sorted(self.running)))
        self.gates[call].set()
        self._hand_off(call)
        self._settle()

    @precondition(lambda self: self.running or self.queue)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        call = data.draw(st.sampled_from(sorted(self.running | {c for c, _ in self.queue})))
        self.tasks[call].cancel()
        self.cancelled.add(call)
        if call in self.running:
            self._hand_off(call)
        else:
            self.queue = [(c, t) for c, t in self.queue if c != call]
        self._settle()

    @rule(seconds=st.sampled_from([0.5, 1.0, 2.0]))
    def advance(self, seconds: float) -> None:
        async def move() -> None:
            self.clock.advance(seconds)

        self.loop.run_until_complete(move())
        timeout = self.options.queue_timeout
        if timeout is not None:
            now = self.clock.monotonic()
            for call, since in list(self.queue):
                if since + timeout <= now:
                    self.queue.remove((call, since))
                    self.rejected[call] = "queue_timeout"
        self._settle()

    @rule(limit=st.integers(1, 3), max_queue=st.integers(0, 3))
    def reconfigure(self, limit: int, max_queue: int) -> None:
        self.options = self.options.model_copy(update={"limit": limit, "max_queue": max_queue})
        self.built.bulkhead.reconfigure(self.options)
        while self.queue and len(self.running) < limit:
            self.running.add(self.queue.pop(0)[0])
        self._settle()

    @invariant()
    def agrees_with_the_model(self) -> None:
        if not hasattr(self, "built"):
            return
        snapshot = self.built.bulkhead.snapshot()
        assert self.inside == self.running
        assert snapshot["active"] == len(self.running)
        assert snapshot["queued"] == len(self.queue)
        # The slots taken without the lock agree with the counts kept under it.
        bh = self.built.bulkhead
        assert bh._debt == max(0, len(self.running) - self.options.limit)
        assert bh._claims == bh._debt + len(self.queue)
        assert bh._spare >= 0
        assert len(bh._free) <= bulkhead.FAST_SLOTS
        if self.queue or bh._debt:  # something is owed a slot: none is free
            assert (len(bh._free), bh._spare) == (0, 0)
        for call, reason in self.rejected.items():
            task = self.tasks[call]
            assert task.done()
            error = task.exception()
            assert isinstance(error, BulkheadFullError)
            assert ("within" in str(error)) == (reason == "queue_timeout")

    def teardown(self) -> None:
        try:
            for gate in self.gates.values():
                gate.set()
            self._settle()
            if hasattr(self, "built"):
                snapshot = self.built.bulkhead.snapshot()
                assert (snapshot["active"], snapshot["queued"]) == (0, 0)
        finally:
            for task in self.tasks.values():
                if not task.done():
                    task.cancel()
            self._settle()
            self.loop.close()
            _clock.set_clock(self.previous_clock)
            registry.clear()


TestBulkheadMachine = BulkheadMachine.TestCase
TestBulkheadMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


class OneFreeSlotMachine(BulkheadMachine):
    """The same model with one free slot kept where a call takes it without the lock.

    The other free slots are then the count under the lock: every path between the two (a slot
    given back past the share, a raised limit, a lowered one) runs with limits of 1 to 3.
    """

    def __init__(self) -> None:
        self.fast_slots = bulkhead.FAST_SLOTS
        bulkhead.FAST_SLOTS = 1  # type: ignore[misc]
        super().__init__()

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            bulkhead.FAST_SLOTS = self.fast_slots  # type: ignore[misc]


TestOneFreeSlotMachine = OneFreeSlotMachine.TestCase
TestOneFreeSlotMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


# --- waiting within the enclosing deadline --------------------------------------------------------


def _with_deadline(mode, fn, deadline: float):
    """``fn`` called under a published deadline, as inside an enclosing ``with_timeout``."""
    if mode.is_async:

        async def call() -> Any:
            _context.deadline.set(deadline)
            return await fn()

        return call

    def sync_call() -> Any:
        _context.deadline.set(deadline)
        return fn()

    return sync_call


def test_a_call_queued_inside_a_timeout_leaves_at_its_deadline_and_never_starts(mode, clock):
    # Regression: a sync call queued for a slot inside with_timeout kept its worker thread in the
    # queue after the caller timed out, then called the dependency once a slot freed up.
    gate = threading.Event()
    ran: list[str] = []

    def hold() -> str:
        assert gate.wait(5)
        return "holder"

    def late() -> str:
        ran.append("late")
        return "late"

    holder_fn = with_bulkhead(name="q", limit=1, max_queue=1)(mode.define(hold))
    timed_fn = with_timeout(name="q", seconds=2)(
        with_bulkhead(name="q", limit=1, max_queue=1)(mode.define(late))
    )
    try:
        holder = Background(mode, holder_fn)
        wait_for(lambda: "q" in registry.instances("bulkhead"))
        shared = registry.instances("bulkhead")["q"]
        wait_for(lambda: shared.snapshot()["active"] == 1)
        with capture_events([CallRejected]) as seen:
            waiting = Background(mode, timed_fn)
            wait_for(lambda: shared.snapshot()["queued"] == 1)
            advance_until(clock, waiting.done)
            error = waiting.result()
            assert isinstance(error, TimeoutExceededError)
            assert (error.service, error.seconds) == ("q", 2)  # the timeout's own error
            # Its place in the queue went with its caller (a sync worker does not wait on).
            wait_for(lambda: shared.snapshot()["queued"] == 0, seconds=1)
            wait_for(lambda: len(seen) == 1, seconds=1)
        assert seen == [CallRejected("q", "bulkhead", "deadline", None)]
    finally:
        gate.set()
    assert holder.result() == "holder"
    wait_for(lambda: shared.snapshot()["active"] == 0)
    assert ran == []  # the freed slot never started the call whose caller had given up


def test_a_queued_call_never_waits_past_the_enclosing_deadline(mode, clock, scenes):
    scene = scenes(mode, limit=1, max_queue=1, queue_timeout=10)
    scene.hold(1)
    fn, _ = scene.function("waiting")
    started = clock.monotonic()
    deadline = started + 3
    with capture_events([CallRejected, BulkheadAcquired]) as seen:
        waiting = Background(mode, _with_deadline(mode, fn, deadline))
        wait_for(lambda: scene.snapshot()["queued"] == 1)
        advance_until(clock, waiting.done)
    error = waiting.result()
    assert isinstance(error, TimeoutExceededError)
    assert error.service == "svc"
    assert "deadline" in str(error)
    assert clock.monotonic() < started + 10  # gave up at the deadline, before queue_timeout
    assert seen == [CallRejected("svc", "bulkhead", "deadline", None)]
    assert (scene.snapshot()["active"], scene.snapshot()["queued"]) == (1, 0)
    assert "waiting" not in scene.order


def test_a_queue_timeout_shorter_than_the_deadline_still_rejects_as_full(mode, clock, scenes):
    scene = scenes(mode, limit=1, max_queue=1, queue_timeout=1)
    scene.hold(1)
    fn, _ = scene.function("waiting")
    waiting = Background(mode, _with_deadline(mode, fn, clock.monotonic() + 30))
    wait_for(lambda: scene.snapshot()["queued"] == 1)
    advance_until(clock, waiting.done)
    error = waiting.result()
    assert isinstance(error, BulkheadFullError)
    assert "within 1 s" in str(error)


def test_a_slot_granted_at_the_deadline_is_given_back_and_the_call_never_starts(mode, clock):
    built = strategy("edge", limit=1, max_queue=1)
    bh = built.bulkhead
    ran: list[int] = []
    fn = mode.chain(built, mode.define(lambda: ran.append(1)))
    assert bh.admit() is None  # took the free slot
    deadline = clock.monotonic() + 2
    # Scheduled before the waiter's own deadline timer: the slot arrives in the very instant the
    # deadline passes, and a call never starts at or after its deadline.
    clock.call_at(deadline, bh.release)
    with capture_events([CallRejected]) as seen:
        waiting = Background(mode, _with_deadline(mode, fn, deadline))
        wait_for(lambda: bh.snapshot()["queued"] == 1)
        advance_until(clock, waiting.done)
    error = waiting.result()
    assert isinstance(error, TimeoutExceededError)
    assert ran == []
    assert seen == [CallRejected("edge", "bulkhead", "deadline", None)]
    assert (bh.snapshot()["active"], bh.snapshot()["queued"]) == (0, 0)


def test_a_sync_call_abandoned_while_queued_never_starts_when_a_slot_frees(clock, monkeypatch):
    # The caller of the sync timeout is interrupted before the deadline: its worker still waits
    # in the bulkhead queue, and must give the slot back instead of calling the dependency.
    bh = Bulkhead("gone", BulkheadOptions(limit=1, max_queue=1))
    ran: list[int] = []
    step = link(TimeoutStrategy("gone", 5), link(BulkheadStrategy(bh), lambda a, kw: ran.append(1)))
    assert bh.admit() is None  # took the free slot
    real_wait = _clock.wait
    caller = threading.get_ident()
    finished = threading.Event()

    def interrupted(event, seconds):
        if threading.get_ident() != caller:  # the worker's own wait in the queue
            return real_wait(event, seconds)
        wait_for(lambda: bh.snapshot()["queued"] == 1)
        raise Interrupt

    unsubscribe = events.subscribe(lambda e: finished.set(), [events.WorkerFinishedLate])
    try:
        with monkeypatch.context() as patch:
            patch.setattr(_clock, "wait", interrupted)
            with pytest.raises(Interrupt):
                step((), {})
            bh.release()  # the slot goes to the abandoned worker ...
            assert finished.wait(5)
    finally:
        unsubscribe()
    assert ran == []  # ... which gives it back without calling the dependency
    assert (bh.snapshot()["active"], bh.snapshot()["queued"]) == (0, 0)


@pytest.mark.realtime
def test_a_queued_call_in_real_time_gets_the_timeouts_own_error_reported_once(mode):
    # Real timers: the bulkhead's wait and the enclosing timeout end at the same instant, and
    # either may notice first. The caller sees the timeout's own error, and each event once.
    gate = threading.Event()
    holder_fn = with_bulkhead(name="rt", limit=1, max_queue=5)(mode.define(lambda: gate.wait(5)))
    timed_fn = with_timeout(name="rt", seconds=0.2)(
        with_bulkhead(name="rt", limit=1, max_queue=5)(mode.define(lambda: "late"))
    )
    started = time.monotonic()
    try:
        holder = Background(mode, holder_fn)
        wait_for(lambda: "rt" in registry.instances("bulkhead"))
        shared = registry.instances("bulkhead")["rt"]
        wait_for(lambda: shared.snapshot()["active"] == 1)
        for _ in range(2):
            with capture_events([CallRejected, TimeoutExceeded]) as seen:
                error = mode.outcome(timed_fn)
                wait_for(lambda: len(seen.of(CallRejected)) == 1, seconds=1)
            assert isinstance(error, TimeoutExceededError)
            assert (error.service, error.seconds) == ("rt", 0.2)
            assert seen.of(CallRejected) == [CallRejected("rt", "bulkhead", "deadline", None)]
            assert [e.seconds for e in seen.of(TimeoutExceeded)] == [0.2]
            assert shared.snapshot()["queued"] == 0
    finally:
        gate.set()
    assert holder.result() is True
    assert time.monotonic() - started < 2
