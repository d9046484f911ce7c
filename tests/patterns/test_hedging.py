"""Hedging: a copy of a slow call, first good answer wins; on ``def`` (threads) and ``async def``.

Time is the fake clock's. A slow copy moves the clock itself (past the hedge delay) and then waits
for something only the test releases: on a thread (``def``) it stays abandoned after the race, on
a task (``async def``) it is cancelled.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

import buttress
from buttress import config, events, registry
from buttress.exceptions import ConfigurationError
from buttress.patterns._budget import BUDGET
from buttress.patterns.hedging import MIN_SAMPLES, HedgingOptions, LatencyPercentile
from buttress.testing import FakeClock, capture_events


def advance_until(clock: FakeClock, seconds: float, done) -> None:
    """Move the fake clock by ``seconds`` until ``done()`` (a thread: the caller may register its
    wait just after a move, so one move may come too early for it)."""
    for _ in range(1000):
        clock.advance(seconds)
        if done():
            return
        threading.Event().wait(0.002)
    raise AssertionError("the caller never sent the next copy")


class Replica:
    """Copy ``n`` of a call (0 is the call) behaves as ``plan[n]``: ``"fast"``, ``"slow"`` (past
    the delay, then held until released), or an exception to raise."""

    def __init__(self, mode, clock: FakeClock, *plan: Any, slow_for: float = 1.0) -> None:
        self.mode = mode
        self.clock = clock
        self.plan = plan
        self.slow_for = slow_for
        self.copies = 0
        self.finished: list[int] = []
        self.failed: list[int] = []
        self.cancelled: list[int] = []
        self.release = threading.Event()

    def _next(self) -> tuple[int, Any]:
        copy = self.copies
        self.copies += 1
        return copy, self.plan[min(copy, len(self.plan) - 1)]

    def fn(self):
        if self.mode.is_async:

            async def read() -> str:
                copy, step = self._next()
                if isinstance(step, BaseException):
                    raise step
                if step == "slow, then fails":
                    await self.clock.asleep(self.slow_for)
                    raise ValueError("bad replica")
                if step == "slow":
                    await self.clock.asleep(self.slow_for)
                    try:
                        await asyncio.Event().wait()
                    except asyncio.CancelledError:
                        self.cancelled.append(copy)
                        raise
                self.finished.append(copy)
                return f"copy {copy}"

            return read

        def sync_read() -> str:
            copy, step = self._next()
            if isinstance(step, BaseException):
                self.failed.append(copy)
                raise step
            if step == "slow, then fails":
                advance_until(self.clock, self.slow_for, lambda: self.copies > copy + 1)
                self.failed.append(copy)
                raise ValueError("bad replica")
            if step == "slow":
                advance_until(self.clock, self.slow_for, lambda: self.copies > copy + 1)
                assert self.release.wait(5), "never released"
            self.finished.append(copy)
            return f"copy {copy}"

        return sync_read


def hedged(replica: Replica, **options: Any):
    options.setdefault("delay", 0.05)
    options.setdefault("idempotent", True)
    return buttress.with_hedging("replica", **options)(replica.fn())


def settle(replica: Replica) -> None:
    """Let the losers end: release the held threads, run the loop once for cancelled tasks."""
    replica.release.set()
    if not replica.mode.is_async:
        for _ in range(500):
            if len(replica.finished) + len(replica.failed) == replica.copies:
                return
            threading.Event().wait(0.01)


# -- declaring and refusing ------------------------------------------------------------------------


def test_a_call_not_declared_idempotent_is_refused_at_decoration() -> None:
    with pytest.raises(ConfigurationError, match="idempotent=True"):
        buttress.with_hedging(delay=0.05)
    with pytest.raises(ConfigurationError, match="percentile"):
        buttress.with_hedging(delay="p100", idempotent=True)
    with pytest.raises(ConfigurationError, match="percentile"):
        buttress.with_hedging(delay="soon", idempotent=True)


def test_settings_are_checked_at_load_naming_the_key() -> None:
    with pytest.raises(ConfigurationError, match=r"services\.replica\.hedging"):
        config.load_settings({"BUTTRESS_SERVICES__REPLICA__HEDGING__DELAY": "0.05"})
    settings = config.load_settings(
        {
            "BUTTRESS_SERVICES__REPLICA__HEDGING__DELAY": "p99",
            "BUTTRESS_SERVICES__REPLICA__HEDGING__IDEMPOTENT": "true",
        }
    )
    options = config.Snapshot(1, settings).service("replica").options("hedging", {}, None)
    assert (options.delay, options.idempotent) == ("p99", True)
    assert HedgingOptions(delay="0.25", idempotent=True).delay == 0.25


# -- the race --------------------------------------------------------------------------------------


def test_a_slow_call_is_answered_by_its_hedge(mode, clock) -> None:
    replica = Replica(mode, clock, "slow", "fast")
    with capture_events([events.HedgeLaunched, events.HedgeWon, events.CallFinished]) as seen:
        assert mode.run(hedged(replica)) == "copy 1"
        settle(replica)
    assert seen.of(events.HedgeLaunched) == [events.HedgeLaunched("replica", 1, 0.05)]
    # One answer, counted once: the losing copy (abandoned thread or cancelled task) never is.
    assert seen.of(events.HedgeWon) == [events.HedgeWon("replica", "hedge")]
    assert [e.outcome for e in seen.of(events.CallFinished)] == ["success"]
    if mode.is_async:
        assert replica.cancelled == [0]
    else:
        assert sorted(replica.finished) == [0, 1]  # the abandoned copy ran to its end, unread


def test_a_fast_call_sends_no_copy(mode, clock) -> None:
    replica = Replica(mode, clock, "fast")
    with capture_events([events.HedgeLaunched, events.HedgeWon]) as seen:
        assert mode.run(hedged(replica)) == "copy 0"
    assert seen == []
    assert replica.copies == 1


def test_a_failure_with_nothing_else_running_is_the_answer(mode, clock) -> None:
    replica = Replica(mode, clock, ConnectionError("refused"))
    outcome = mode.outcome(hedged(replica))
    assert isinstance(outcome, ConnectionError)
    assert replica.copies == 1  # hedging answers slowness, not failure: that is retry's job


def test_a_failed_copy_leaves_the_race_to_the_others(mode, clock) -> None:
    # The call is slow, its first hedge fails (when the second is due), the second answers.
    replica = Replica(mode, clock, "slow", "slow, then fails", "fast", slow_for=0.05)
    with capture_events([events.HedgeWon]) as seen:
        assert mode.run(hedged(replica, max_hedges=2)) == "copy 2"
        settle(replica)
    assert seen == [events.HedgeWon("replica", "hedge")]


def test_when_every_copy_fails_the_last_failure_is_raised(mode, clock) -> None:
    # The call is slow and fails after its hedge has failed.
    replica = Replica(mode, clock, "slow", KeyError("gone"))
    if mode.is_async:
        hedge_failed: list[asyncio.Event] = []

        async def read() -> str:
            copy, _ = replica._next()
            if copy == 0:
                hedge_failed.append(asyncio.Event())
                await clock.asleep(1)
                await hedge_failed[0].wait()
                raise LookupError("late")
            hedge_failed[0].set()
            raise KeyError("gone")

    else:

        def read() -> str:  # type: ignore[misc]
            copy, _ = replica._next()
            if copy == 0:
                advance_until(clock, 1, lambda: replica.copies > 1)
                assert replica.release.wait(5)
                raise LookupError("late")
            raise KeyError("gone")

    fn = buttress.with_hedging("replica", delay=0.05, idempotent=True)(read)
    if mode.is_async:
        with capture_events([events.HedgeWon]) as seen:
            assert isinstance(mode.outcome(fn), LookupError)
    else:
        result: list[Any] = []
        with capture_events([events.HedgeWon]) as seen:
            caller = threading.Thread(target=lambda: result.append(mode.outcome(fn)))
            caller.start()
            for _ in range(500):  # the hedge has failed: only the call is still running
                if replica.copies == 2:
                    break
                threading.Event().wait(0.01)
            replica.release.set()
            caller.join(5)
        assert isinstance(result[0], LookupError)
    assert seen == [events.HedgeWon("replica", "none")]


def test_max_hedges_copies_at_most(mode, clock) -> None:
    replica = Replica(mode, clock, "slow", "slow", "slow", "fast", slow_for=0.05)
    with capture_events([events.HedgeLaunched]) as seen:
        assert mode.run(hedged(replica, max_hedges=3)) == "copy 3"
        settle(replica)
    assert [e.hedge for e in seen] == [1, 2, 3]


def test_each_hedge_draws_on_the_service_budget(mode, clock) -> None:
    # No budget at all: the copy is refused, the call answers late, and the budget says so.
    buttress.retry_with_backoff("replica", budget={"ratio": 0.0, "min_per_second": 0.0})(
        mode.define()
    )
    copies: list[int] = []
    with capture_events([events.HedgeLaunched, events.RetryBudgetExhausted]) as seen:
        if mode.is_async:

            async def read() -> str:
                copies.append(1)
                await clock.asleep(1)  # the copy is due meanwhile, and refused
                await asyncio.sleep(0)
                return "late"

        else:

            def read() -> str:  # type: ignore[misc]
                copies.append(1)
                advance_until(clock, 1, lambda: bool(seen))  # until the copy was refused
                return "late"

        fn = buttress.with_hedging("replica", delay=0.05, idempotent=True)(read)
        assert mode.run(fn) == "late"
    assert seen == [events.RetryBudgetExhausted("replica", "hedge")]
    assert copies == [1]
    (budget,) = registry.instances(BUDGET).values()
    assert budget.snapshot()["requests"] >= 1


def test_a_retried_call_counts_once_in_the_budget(mode, clock) -> None:
    calls: list[int] = []

    def body() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("once")
        return "ok"

    fn = buttress.retry_with_backoff("both", jitter="none")(
        buttress.with_hedging("both", delay=10.0, idempotent=True)(mode.define(body))
    )
    assert mode.run(fn) == "ok"
    (budget,) = registry.instances(BUDGET).values()
    assert budget.snapshot()["requests"] == 1  # the retry counted it; the hedging inside did not
    assert budget.snapshot()["retries"] == 1


def test_concurrent_hedged_calls_on_threads_and_tasks(mode, clock) -> None:
    fn = buttress.with_hedging("many", delay=1.0, idempotent=True)(mode.define(lambda: "ok"))
    assert mode.gather(fn, 20) == ["ok"] * 20


# -- the delay from recent latency ---------------------------------------------------------------


def test_a_percentile_delay_waits_for_enough_samples() -> None:
    latency = LatencyPercentile(0.9)
    for seconds in range(1, MIN_SAMPLES):
        latency.record(seconds / 100)
    assert latency.value is None
    latency.record(0.2)
    assert latency.value == pytest.approx(0.19)  # the 90th of 0.01 ... 0.20


def test_a_percentile_delay_hedges_only_the_slow_tail(mode, clock) -> None:
    # 30 calls of 30 ms down to 1 ms, then one that takes 0.5 s (held until released).
    calls: list[int] = []
    release = threading.Event()
    if mode.is_async:

        async def read() -> str:
            calls.append(1)
            if len(calls) == 31:
                await clock.asleep(0.5)
                await asyncio.Event().wait()
            await clock.asleep(max(31 - len(calls), 1) / 1000)
            return "ok"

    else:

        def read() -> str:  # type: ignore[misc]
            calls.append(1)
            if len(calls) == 31:
                advance_until(clock, 0.5, lambda: len(calls) > 31)
                assert release.wait(5)
            clock.advance(max(31 - len(calls), 1) / 1000)
            return "ok"

    fn = buttress.with_hedging("tail", delay="p90", idempotent=True)(read)
    with capture_events([events.HedgeLaunched]) as seen:
        for _ in range(30):
            assert mode.run(fn) == "ok"
        # After 20 calls the p90 of 30 ... 11 ms is 29 ms; the calls after are faster.
        assert seen == []
        assert mode.run(fn) == "ok"  # answered by the copy sent once the call passed the p90
    release.set()
    assert len(seen) == 1
    assert seen[0].delay == pytest.approx(0.029)
    assert len(calls) == 32


def test_a_cancelled_caller_cancels_every_copy(clock) -> None:
    cancelled: list[int] = []
    copies: list[int] = []

    async def read() -> str:
        copy = len(copies)
        copies.append(copy)
        try:
            if copy == 0:
                await clock.asleep(1)  # the copy is due meanwhile
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(copy)
            raise
        return "never"

    fn = buttress.with_hedging("replica", delay=0.05, idempotent=True)(read)

    async def main() -> None:
        caller = asyncio.ensure_future(fn())
        while len(copies) < 2:
            await asyncio.sleep(0)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await asyncio.sleep(0)

    asyncio.run(main())
    assert sorted(cancelled) == [0, 1]


def test_each_copy_runs_under_its_own_timeout(mode, clock) -> None:
    # A timeout inside hedging (the canonical order) bounds each copy, not the race.
    replica = Replica(mode, clock, "slow", "fast", slow_for=0.2)
    fn = buttress.with_hedging("replica", delay=0.05, idempotent=True)(
        buttress.with_timeout("replica", seconds=10)(replica.fn())
    )
    assert mode.run(fn) == "copy 1"
    settle(replica)


def test_shadow_mode_learns_the_latency_and_sends_no_copy(mode, clock) -> None:
    config.reload_settings(env={"BUTTRESS_SERVICES__WATCHED__MODE": "shadow"})
    try:
        fn = buttress.with_hedging("watched", delay="p50", idempotent=True)(mode.define())
        with capture_events([events.HedgeLaunched]) as seen:
            for _ in range(MIN_SAMPLES + 5):
                assert mode.run(fn) == "ok"
    finally:
        config.reload_settings()
    assert seen == []
    assert registry.instances("hedging")["watched"].value is not None
