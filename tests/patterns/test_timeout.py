"""Timeout: async calls cancelled, sync calls abandoned on a daemon worker, deadlines published."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import buttress
from buttress import _clock, _context, _deadline, events, registry
from buttress.events import (
    ShadowDecision,
    TimedCallFinished,
    TimeoutExceeded,
    WorkerAbandoned,
    WorkerFinishedLate,
)
from buttress.exceptions import TimeoutExceededError
from buttress.patterns import timeout
from buttress.patterns._base import BuildContext
from buttress.patterns.timeout import TimeoutOptions, TimeoutStrategy
from buttress.policy import alink, link
from buttress.testing import capture_events

SRC = Path(__file__).resolve().parents[2] / "src"


def strategy(seconds: float, service: str = "svc", mode: str = "enforce") -> TimeoutStrategy:
    built = timeout.build(BuildContext(service, TimeoutOptions(seconds=seconds), service, mode))
    assert isinstance(built, TimeoutStrategy)
    return built


def timed(mode, seconds, body=None, *, latency=0.0, service="svc", shadow=False):
    """``body`` (plain code) after ``latency`` simulated seconds, behind one timeout."""
    fn = mode.define(body, latency=latency)
    return mode.chain(strategy(seconds, service, "shadow" if shadow else "enforce"), fn)


def calling(mode, inner):
    """A function of ``mode`` whose body calls (and awaits) ``inner``."""
    if mode.is_async:

        async def outer():
            return await inner()

        return outer
    return lambda: inner()


def wait_for(predicate, seconds: float = 5.0) -> None:
    """Real-time poll for another thread's progress (bounded; never a duration under test)."""
    limit = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < limit, "condition not reached in time"
        time.sleep(0.001)


# --- the basic contract ---------------------------------------------------------------------------


def test_build_gives_a_timeout_strategy_or_nothing_when_disabled():
    built = strategy(5)
    assert built.pattern == "timeout"
    assert built.seconds == 5
    off = TimeoutOptions(seconds=5, enabled=False)
    assert timeout.build(BuildContext("svc", off, "svc")) is None


def test_a_call_in_time_returns_its_result(mode, clock):
    fn = timed(mode, 5, lambda x: x * 2, latency=1)
    with capture_events([TimedCallFinished, TimeoutExceeded]) as seen:
        assert mode.run(fn, 21) == 42
    assert seen == [TimedCallFinished("svc", 1.0, False)]


def test_a_slow_call_raises_timeout_exceeded(mode, clock):
    fn = timed(mode, 5, latency=10, service="slow")
    with capture_events([TimedCallFinished, TimeoutExceeded]) as seen:
        error = mode.outcome(fn)
    assert isinstance(error, TimeoutExceededError)
    assert isinstance(error, TimeoutError)
    assert (error.service, error.seconds) == ("slow", 5)
    assert "5 s" in str(error)
    [exceeded] = seen.of(TimeoutExceeded)
    assert exceeded.service == "slow"
    assert exceeded.seconds == 5
    assert exceeded.elapsed >= 5  # the fake clock jumps by the whole sleep
    [finished] = seen.of(TimedCallFinished)
    assert finished.timed_out is True
    if mode.is_async:
        # Chained from the cancellation, whose traceback shows where the call was waiting.
        assert isinstance(error.__cause__, asyncio.CancelledError)


def test_the_functions_own_timeout_error_passes_through_unchanged(mode, clock):
    own = TimeoutError("the upstream's own socket timeout")

    def body():
        raise own

    with capture_events([TimeoutExceeded, TimedCallFinished]) as seen:
        error = mode.outcome(timed(mode, 5, body))
    assert error is own
    assert seen.of(TimeoutExceeded) == []
    assert [e.timed_out for e in seen.of(TimedCallFinished)] == [False]


def test_the_callers_exceptions_pass_through_unchanged(mode, clock):
    own = KeyError("missing")

    def body():
        raise own

    assert mode.outcome(timed(mode, 5, body)) is own


def test_remaining_is_published_inside_the_call(mode, clock):
    assert buttress.remaining() is None
    fn = timed(mode, 5, buttress.remaining)
    assert mode.run(fn) == 5.0
    assert buttress.remaining() is None


def test_a_sync_call_runs_on_a_worker_thread_that_sees_the_deadline(clock):
    seen = {}

    def body():
        seen["thread"] = threading.current_thread()
        clock.advance(1)
        seen["remaining"] = buttress.remaining()
        return "ok"

    step = link(strategy(5), lambda a, kw: body())
    assert step((), {}) == "ok"
    assert seen["thread"] is not threading.current_thread()
    assert seen["thread"].daemon is True
    assert seen["remaining"] == 4.0


def test_retry_context_reaches_the_sync_worker(mode, clock):
    attempts, keys = [], []

    def body():
        attempts.append(buttress.attempt())
        keys.append(buttress.idempotency_key())
        if len(attempts) < 3:
            raise ConnectionError("flaky")
        return "ok"

    fn = buttress.retry_with_backoff(max_attempts=3, jitter="none")(
        buttress.with_timeout(seconds=5)(mode.define(body))
    )
    assert mode.run(fn) == "ok"
    assert attempts == [1, 2, 3]
    assert len(set(keys)) == 1
    assert keys[0] is not None


# --- nesting --------------------------------------------------------------------------------------


def test_nested_timeouts_use_the_tighter_outer_deadline(mode, clock):
    inner = timed(mode, 10, buttress.remaining, service="inner")
    outer = mode.chain(strategy(5, "outer"), calling(mode, inner))
    assert mode.run(outer) == 5.0


def test_a_tighter_inner_timeout_fires_first(mode, clock):
    inner = timed(mode, 2, latency=3, service="inner")
    outer = mode.chain(strategy(10, "outer"), calling(mode, inner))
    error = mode.outcome(outer)
    assert isinstance(error, TimeoutExceededError)
    assert (error.service, error.seconds) == ("inner", 2)


def test_the_outer_deadline_bounds_a_looser_inner_timeout(mode, clock):
    inner = timed(mode, 10, latency=30, service="inner")
    outer = mode.chain(strategy(5, "outer"), calling(mode, inner))
    error = mode.outcome(outer)
    assert isinstance(error, TimeoutExceededError)
    assert error.seconds == 5  # whichever scope reports it, the limit was the outer 5 s


def test_a_call_whose_enclosing_deadline_passed_is_not_started(mode, clock):
    calls = []
    fn = timed(mode, 5, lambda: calls.append(1))
    token = _context.deadline.set(clock.monotonic() - 1)
    try:
        with capture_events([TimeoutExceeded]) as seen:
            error = mode.outcome(fn)
    finally:
        _context.deadline.reset(token)
    assert isinstance(error, TimeoutExceededError)
    assert error.seconds == 0
    assert "already passed" in str(error)
    assert calls == []
    assert [e.elapsed for e in seen] == [0.0]


def test_a_wait_inside_that_gave_up_at_the_deadline_is_reported_as_this_timeout(mode, clock):
    # A bulkhead queue inside gives up at the same deadline the timeout enforces, and may notice
    # first: the caller still gets this timeout's own error, reported once.
    def body():
        raise timeout.not_started("queued", 5.0, "a bulkhead slot")

    fn = timed(mode, 5, body, service="outer")
    with capture_events([TimeoutExceeded, TimedCallFinished]) as seen:
        error = mode.outcome(fn)
    assert type(error) is TimeoutExceededError
    assert (error.service, error.seconds) == ("outer", 5)
    # Only this test's services: a worker an earlier test abandoned may still report its own.
    ours = {"outer", "queued"}
    assert [e.service for e in seen.of(TimeoutExceeded) if e.service in ours] == ["outer"]
    assert [e.timed_out for e in seen.of(TimedCallFinished) if e.service in ours] == [True]


# --- abandoned sync work ------------------------------------------------------------------------


def test_an_abandoned_worker_is_counted_until_it_finishes(clock):
    gate = threading.Event()
    finished_late = threading.Event()

    def body():
        clock.sleep(10)  # passes the caller's 5 s deadline
        gate.wait(5)  # and keeps the worker busy after the caller gave up
        return "late"

    step = link(strategy(5, "hung"), lambda a, kw: body())
    with capture_events([WorkerAbandoned, WorkerFinishedLate]) as seen:
        unsubscribe = events.subscribe(lambda e: finished_late.set(), [WorkerFinishedLate])
        try:
            with pytest.raises(TimeoutExceededError):
                step((), {})
            assert seen.of(WorkerAbandoned) == [WorkerAbandoned("hung", 1)]
            assert timeout.worker_pool_snapshot()["abandoned"] == {"hung": 1}
            gate.set()
            assert finished_late.wait(5)
        finally:
            unsubscribe()
    assert seen.of(WorkerFinishedLate) == [WorkerFinishedLate("hung", 0, 5.0)]
    assert timeout.worker_pool_snapshot()["abandoned"] == {}


class Interrupt(BaseException):
    """Stands in for a KeyboardInterrupt arriving while the caller waits."""


def test_a_caller_interrupted_while_waiting_abandons_its_worker(clock, monkeypatch):
    gate = threading.Event()
    started = threading.Event()
    finished = threading.Event()

    def body(args, kwargs):
        started.set()
        return gate.wait(5)

    def interrupted(event, seconds):
        assert started.wait(5)  # the interrupt lands while the call runs
        raise Interrupt

    step = link(strategy(5, "interrupted"), body)
    with capture_events([WorkerAbandoned, TimeoutExceeded]) as seen:
        unsubscribe = events.subscribe(lambda e: finished.set(), [WorkerFinishedLate])
        try:
            with monkeypatch.context() as patch:
                patch.setattr(_clock, "wait", interrupted)
                with pytest.raises(Interrupt):
                    step((), {})
            assert seen.of(WorkerAbandoned) == [WorkerAbandoned("interrupted", 1)]
            assert timeout.worker_pool_snapshot()["abandoned"] == {"interrupted": 1}
            gate.set()
            assert finished.wait(5)
        finally:
            gate.set()
            unsubscribe()
    assert seen.of(TimeoutExceeded) == []  # an interrupt is not a timeout
    assert timeout.worker_pool_snapshot()["abandoned"] == {}


def test_a_call_waits_for_a_worker_within_its_deadline_and_never_runs_late(clock, monkeypatch):
    pool = _deadline.WorkerPool(max_workers=1)
    monkeypatch.setattr(_deadline, "POOL", pool)
    gate = threading.Event()
    ran = []

    def hog():
        clock.sleep(10)
        gate.wait(5)

    try:
        with pytest.raises(TimeoutExceededError):
            link(strategy(5, "hog"), lambda a, kw: hog())((), {})
        assert pool.snapshot()["threads"] == 1  # the only worker is abandoned and still busy
        done = threading.Event()
        result = {}

        def caller():
            try:
                link(strategy(5, "next"), lambda a, kw: ran.append(1))((), {})
            except TimeoutExceededError as exc:
                result["error"] = exc
            done.set()

        thread = threading.Thread(target=caller)
        thread.start()
        wait_for(lambda: pool.snapshot()["pending"] == 1)
        while not done.is_set():  # move simulated time until the caller's deadline fires
            clock.advance(1)
            done.wait(0.001)
        thread.join(5)
    finally:
        gate.set()
    assert "no worker thread was free" in str(result["error"])
    assert result["error"].seconds == 5
    wait_for(lambda: pool.snapshot()["abandoned"] == {})
    assert ran == []  # dropped before it started: a late start would be a surprise side effect
    assert pool.snapshot()["pending"] == 0


def test_a_process_out_of_threads_times_out_the_call_without_running_it(clock, monkeypatch):
    class NoThread(threading.Thread):
        def start(self):
            raise RuntimeError("can't start new thread")

    monkeypatch.setattr(
        _deadline, "threading", SimpleNamespace(**{**vars(threading), "Thread": NoThread})
    )
    pool = _deadline.WorkerPool(max_workers=4)
    monkeypatch.setattr(_deadline, "POOL", pool)
    ran, outcome = [], {}
    done = threading.Event()

    def caller():
        try:
            link(strategy(5, "starved"), lambda a, kw: ran.append(1))((), {})
        except TimeoutExceededError as exc:
            outcome["error"] = exc
        done.set()

    thread = threading.Thread(target=caller)
    thread.start()
    wait_for(lambda: pool.snapshot()["pending"] == 1)
    while not done.is_set():
        clock.advance(1)
        done.wait(0.001)
    thread.join(5)
    assert "no worker thread was free" in str(outcome["error"])
    assert ran == []
    assert pool.snapshot() == {"threads": 0, "idle": 0, "pending": 0, "abandoned": {}}


def test_many_concurrent_sync_calls_each_get_their_own_result(clock):
    step = link(strategy(5), lambda a, kw: a[0] * 2)
    results: dict[int, int] = {}

    def worker(i: int) -> None:
        results[i] = step((i,), {})

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert results == {i: i * 2 for i in range(32)}
    assert timeout.worker_pool_snapshot()["threads"] <= timeout.MAX_WORKERS


@pytest.mark.realtime
def test_interpreter_exit_is_not_blocked_by_an_abandoned_worker():
    script = textwrap.dedent(
        """
        import time
        from buttress import TimeoutExceededError, with_timeout

        @with_timeout(seconds=0.05)
        def hang():
            time.sleep(60)

        try:
            hang()
        except TimeoutExceededError as exc:
            print("timed out", exc.seconds)
        """
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=20,
        env={"PYTHONPATH": str(SRC)},
        check=False,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "timed out 0.05"
    assert elapsed < 10  # interpreter start-up included; an awaited worker would take 60 s


# --- async specifics ------------------------------------------------------------------------------


def test_an_outside_cancellation_is_not_turned_into_a_timeout(clock):
    async def scenario():
        entered = asyncio.Event()

        async def body(args, kwargs):
            entered.set()
            await asyncio.Event().wait()

        step = alink(strategy(5), body)
        with capture_events([TimeoutExceeded]) as seen:
            task = asyncio.create_task(step((), {}))
            await entered.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert seen == []
        assert buttress.remaining() is None

    asyncio.run(scenario())


def test_a_call_that_swallows_the_expiry_leaves_no_cancellation_behind(clock):
    async def scenario():
        async def stubborn(args, kwargs):
            try:
                await clock.asleep(10)
            except asyncio.CancelledError:
                return "finished anyway"
            return "in time"

        step = alink(strategy(1), stubborn)
        assert await step((), {}) == "finished anyway"
        task = asyncio.current_task()
        assert task is not None
        assert task.cancelling() == 0
        await asyncio.sleep(0)  # the caller's next await is not hit by the withdrawn cancel
        return "caller carried on"

    assert asyncio.run(scenario()) == "caller carried on"


def test_an_outside_cancellation_racing_the_deadline_stays_a_cancellation(clock):
    async def scenario():
        async def body(args, kwargs):
            task = asyncio.current_task()
            assert task is not None
            task.cancel()  # somebody else asks first ...
            await clock.asleep(10)  # ... and then the deadline passes too

        step = alink(strategy(1), body)
        with pytest.raises(asyncio.CancelledError):
            await step((), {})

    asyncio.run(scenario())


# --- shadow mode ----------------------------------------------------------------------------------


def test_shadow_mode_never_times_out_but_says_it_would_have(mode, clock):
    slow = timed(mode, 5, latency=10, service="shady", shadow=True)
    fast = timed(mode, 5, latency=1, service="shady", shadow=True)
    with capture_events([ShadowDecision, TimeoutExceeded, TimedCallFinished]) as seen:
        assert mode.run(slow) == "ok"
        assert mode.run(fast) == "ok"
    assert seen.of(ShadowDecision) == [ShadowDecision("shady", "timeout", "timeout")]
    assert seen.of(TimeoutExceeded) == []
    assert [e.elapsed for e in seen.of(TimedCallFinished)] == [10.0, 1.0]


def test_shadow_mode_publishes_no_deadline(mode, clock):
    # Cooperative code that honoured a shadow deadline would change behaviour.
    fn = timed(mode, 5, buttress.remaining, shadow=True)
    assert mode.run(fn) is None


# --- through the public decorator -----------------------------------------------------------------


def test_with_timeout_decorator_on_def_and_async_def(mode, clock):
    fn = buttress.with_timeout(name="deco", seconds=1)(mode.define(latency=2))
    error = mode.outcome(fn)
    assert isinstance(error, TimeoutExceededError)
    assert (error.service, error.seconds) == ("deco", 1)
    quick = buttress.with_timeout(name="deco", seconds=1)(mode.define(lambda: "fine", latency=0.5))
    assert mode.run(quick) == "fine"
    assert registry.instances("timeout") == {}  # a timeout keeps no shared state


# --- one service never starves another ------------------------------------------------------------


class Caller:
    """One sync call on its own thread; ``outcome`` is its result or its exception."""

    def __init__(self, step) -> None:
        self.outcome: object = None
        self.done = threading.Event()

        def run() -> None:
            try:
                self.outcome = step((), {})
            except BaseException as exc:  # the test inspects it
                self.outcome = exc
            finally:
                self.done.set()

        threading.Thread(target=run, daemon=True).start()


def advance_until_all(clock, callers, step: float = 0.5) -> None:
    """Move simulated time until every caller is done (each registers its deadline at its pace)."""
    limit = time.monotonic() + 5
    while not all(c.done.is_set() for c in callers):
        assert time.monotonic() < limit, "callers did not finish"
        clock.advance(step)
        time.sleep(0.001)


def test_a_stuck_service_cannot_take_the_workers_another_service_needs(clock, monkeypatch):
    # Regression: one service whose dependency hangs took every worker of the process-wide pool
    # (abandoned, still running), so an unrelated service's sync timeouts could only fail.
    pool = _deadline.WorkerPool(max_workers=8)
    monkeypatch.setattr(_deadline, "POOL", pool)
    gate = threading.Event()
    started: list[int] = []

    def hang(args, kwargs):
        started.append(1)
        return gate.wait(10)

    stuck = link(strategy(1, "stuck"), hang)
    healthy = link(strategy(1, "healthy"), lambda a, kw: "ok")
    try:
        callers = [Caller(stuck) for _ in range(12)]
        wait_for(lambda: len(started) >= 2 and len(started) + pool.snapshot()["pending"] == 12)
        advance_until_all(clock, callers)
        assert all(isinstance(c.outcome, TimeoutExceededError) for c in callers)

        # The other service still gets a worker at once, without any simulated time passing.
        other = Caller(healthy)
        assert other.done.wait(2), "the healthy service was starved of workers"
        assert other.outcome == "ok"

        # The stuck service holds its share of the pool (a quarter: 2 of 8), no more; its other
        # calls waited for one of its own workers, never got one, and never ran.
        assert len(started) == 2
        assert pool.snapshot()["abandoned"] == {"stuck": 2}
        threads = pool.snapshot()["threads"]

        # A new call to the stuck service fails at once, without taking a thread.
        with capture_events([TimeoutExceeded]) as seen:
            again = Caller(stuck)
            assert again.done.wait(2)
        assert isinstance(again.outcome, TimeoutExceededError)
        assert "abandoned" in str(again.outcome)
        assert [e.elapsed for e in seen] == [0.0]
        assert pool.snapshot()["threads"] == threads
        assert len(started) == 2
    finally:
        gate.set()
    wait_for(lambda: pool.snapshot()["abandoned"] == {})
    assert len(started) == 2  # the calls dropped while waiting for a worker never started later


def test_calls_over_a_services_share_wait_for_one_of_its_workers(clock, monkeypatch):
    pool = _deadline.WorkerPool(max_workers=8)
    monkeypatch.setattr(_deadline, "POOL", pool)
    gates = [threading.Event() for _ in range(3)]
    started: list[int] = []

    def body(args, kwargs):
        started.append(args[0])
        assert gates[args[0]].wait(5)
        return args[0]

    busy = link(strategy(5, "busy"), body)

    def call(i: int):
        return lambda a, kw: busy((i,), {})

    try:
        callers = [Caller(call(i)) for i in range(3)]
        wait_for(lambda: len(started) == 2 and pool.snapshot()["pending"] == 1)
        waiting = ({0, 1, 2} - set(started)).pop()
        first = started[0]
        gates[first].set()  # a worker of the service frees up and takes the waiting call
        wait_for(lambda: waiting in started)
    finally:
        for gate in gates:
            gate.set()
    for caller in callers:
        assert caller.done.wait(5)
    assert sorted(c.outcome for c in callers) == [0, 1, 2]
    assert pool.snapshot()["pending"] == 0


def test_a_nested_timeout_of_the_same_service_runs_in_its_parents_place(clock, monkeypatch):
    # Every place of the service's share is held by an outer call waiting for its inner call:
    # the inner calls must not wait for a place (none would ever free up before the deadline).
    pool = _deadline.WorkerPool(max_workers=8)
    monkeypatch.setattr(_deadline, "POOL", pool)
    both_outer = threading.Barrier(2, timeout=5)
    inner = link(strategy(5, "nest"), lambda a, kw: "inner")

    def outer_body(args, kwargs):
        both_outer.wait()  # the two places of the share are both taken now
        return inner((), {})

    outer = link(strategy(5, "nest"), outer_body)
    callers = [Caller(outer) for _ in range(2)]
    for caller in callers:
        assert caller.done.wait(2), "the inner call waited for a place its parent held"
    assert [c.outcome for c in callers] == ["inner", "inner"]


def test_the_share_of_one_service_is_a_quarter_of_the_pool():
    assert timeout.MAX_WORKERS_PER_SERVICE == timeout.MAX_WORKERS // 4 == 64


def test_a_call_a_worker_picks_up_after_its_deadline_never_starts(clock, monkeypatch):
    pool = _deadline.WorkerPool(max_workers=1)
    monkeypatch.setattr(_deadline, "POOL", pool)
    gate = threading.Event()
    ran: list[int] = []
    try:
        hog = Caller(link(strategy(50, "hog"), lambda a, kw: gate.wait(5)))
        wait_for(lambda: pool.snapshot()["threads"] == 1 and pool.snapshot()["pending"] == 0)
        real_wait = _clock.wait
        caller = threading.get_ident()

        def freed_too_late(event, seconds):
            if threading.get_ident() != caller:
                return real_wait(event, seconds)
            clock.advance(seconds)  # the deadline passes while the call is still queued ...
            gate.set()  # ... and only then does the worker free up and pick it up
            wait_for(lambda: pool.snapshot()["pending"] == 0)
            return real_wait(event, 1)

        with monkeypatch.context() as patch:
            patch.setattr(_clock, "wait", freed_too_late)
            with pytest.raises(TimeoutExceededError):
                link(strategy(5, "late"), lambda a, kw: ran.append(1))((), {})
    finally:
        gate.set()
    assert hog.done.wait(5)
    assert ran == []


# --- many event loops -----------------------------------------------------------------------------


@pytest.mark.realtime
def test_one_stack_serves_event_loops_in_turn_and_in_several_threads_at_once():
    peak = {"now": 0, "max": 0}
    lock = threading.Lock()

    @buttress.with_rate_limit(name="loops", rate=1_000_000, burst=1_000)
    @buttress.with_timeout(name="loops", seconds=5)
    @buttress.with_bulkhead(name="loops", limit=2, max_queue=1_000)
    async def call(i: int) -> int:
        with lock:
            peak["now"] += 1
            peak["max"] = max(peak["max"], peak["now"])
        await asyncio.sleep(0)
        with lock:
            peak["now"] -= 1
        return i

    async def many(base: int) -> list[int]:
        return await asyncio.gather(*(call(base + i) for i in range(20)))

    started = time.monotonic()
    for n in range(5):  # one loop after another, each asyncio.run a fresh loop
        assert asyncio.run(many(n * 100)) == [n * 100 + i for i in range(20)]
    results: dict[int, list[int]] = {}

    def run_loop(n: int) -> None:
        results[n] = asyncio.run(many(n * 100))

    threads = [threading.Thread(target=run_loop, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert results == {n: [n * 100 + i for i in range(20)] for n in range(3)}
    assert time.monotonic() - started < 2
    assert peak["max"] <= 2
    bh = registry.instances("bulkhead")["loops"].snapshot()
    assert (bh["active"], bh["queued"]) == (0, 0)
