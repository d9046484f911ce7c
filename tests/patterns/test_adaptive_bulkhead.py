"""Adaptive bulkhead: AIMD and Gradient2 limits learned from latency and drops."""

from __future__ import annotations

import threading

import pytest

import buttress
from buttress import config, events, registry
from buttress.exceptions import ConfigurationError, TimeoutExceededError
from buttress.patterns._limits import AIMD, Gradient2
from buttress.patterns.bulkhead import Bulkhead, BulkheadOptions, dropped
from buttress.testing import FakeClock, capture_events

# -- the algorithms ------------------------------------------------------------------------------


def test_aimd_grows_by_one_while_the_limit_is_used_and_backs_off_on_a_drop() -> None:
    limit = AIMD(10, 1, 200)
    assert limit.update(0.01, inflight=5, dropped=False) == 11  # half the limit in use: + 1
    assert limit.update(0.01, inflight=2, dropped=False) == 11  # mostly unused: says nothing
    assert limit.update(5.0, inflight=11, dropped=True) == 9  # floor(11 x 0.9)
    floor = AIMD(2, 2, 200)
    assert floor.update(1.0, inflight=2, dropped=True) == 2  # never under min_limit
    ceiling = AIMD(200, 1, 200)
    assert ceiling.update(0.01, inflight=200, dropped=False) == 200  # nor over max_limit


def test_gradient2_grows_at_steady_latency_and_shrinks_when_latency_rises() -> None:
    limit = Gradient2(20, 1, 200)
    for _ in range(50):
        grown = limit.update(0.010, inflight=limit.limit, dropped=False)
    assert grown > 20
    for _ in range(50):
        shrunk = limit.update(0.040, inflight=limit.limit, dropped=False)  # latency x4
    assert shrunk < grown
    assert shrunk >= 1


def test_gradient2_does_not_grow_a_limit_it_does_not_use() -> None:
    limit = Gradient2(20, 1, 200)
    for _ in range(100):
        assert limit.update(0.010, inflight=3, dropped=False) == 20


def test_what_a_finished_call_says_about_the_limit() -> None:
    assert dropped(None, 0.0) is False
    assert dropped(TimeoutExceededError("late", service="s", seconds=1), 0.0) is True
    assert dropped(buttress.BulkheadFullError("full", service="s"), 0.0) is True
    assert dropped(ValueError("bad request"), 0.0) is None  # its own error: no sample


def test_bounds_are_checked_at_decoration_and_at_load() -> None:
    with pytest.raises(ConfigurationError, match="min_limit"):
        buttress.with_bulkhead(adaptive="aimd", min_limit=10, max_limit=5)
    with pytest.raises(ConfigurationError, match=r"services\.db\.bulkhead\.adaptive"):
        config.load_settings({"BUTTRESS_SERVICES__DB__BULKHEAD__ADAPTIVE": "vegas"})
    options = BulkheadOptions(adaptive="gradient2", min_limit=4, max_limit=8)
    assert Bulkhead("db", options).limit == 8  # starts at 20, kept within the bounds


# -- through with_bulkhead -----------------------------------------------------------------------


def live_limit(service: str) -> int:
    (bulkhead,) = [b for b in registry.instances("bulkhead").values() if b.service == service]
    return int(bulkhead.snapshot()["limit"])


def test_healthy_calls_raise_the_limit_once_a_window_and_say_so(mode, clock) -> None:
    fn = buttress.with_bulkhead("grow", adaptive="aimd", limit=1)(mode.define(latency=0.1))
    with capture_events([events.BulkheadLimitChanged]) as seen:
        for _ in range(40):
            assert mode.run(fn) == "ok"
    # A window closes every 11 calls (10 calls and a second); one call at a time uses half a
    # limit of 1 or 2: + 1 each; at 3 and more the limit is not what holds the calls back.
    assert [(e.previous, e.limit, e.reason) for e in seen] == [(1, 2, "growth"), (2, 3, "growth")]
    assert live_limit("grow") == 3


def test_timeouts_drop_the_limit(mode, clock) -> None:
    fn = buttress.with_timeout("slow", seconds=0.5)(
        buttress.with_bulkhead("slow", adaptive="aimd", limit=20)(mode.define(latency=1.0))
    )
    with capture_events([events.BulkheadLimitChanged]) as seen:
        for _ in range(20):
            assert isinstance(mode.outcome(fn), TimeoutExceededError)
        if not mode.is_async:
            # A sync call runs on, abandoned, and finishes after its deadline: then it drops.
            for _ in range(500):
                if len(seen) == 2:
                    break
                threading.Event().wait(0.01)
    # Two windows of 10 timed-out calls: 20 x 0.9 = 18, then 16.
    assert [e.limit for e in seen] == [18, 16]
    assert {e.reason for e in seen} == {"drop"}
    assert live_limit("slow") == 16


def test_a_raised_limit_admits_the_queue_at_once(clock: FakeClock) -> None:
    bulkhead = Bulkhead("queue", BulkheadOptions(adaptive="aimd", limit=1, max_queue=5))
    first = bulkhead.admit_timed()
    assert isinstance(first, float)
    waiting = bulkhead.admit_timed()
    assert not isinstance(waiting, float)  # the one slot is taken: it must queue

    class Woken:
        granted = False
        woken = False

        def wake(self) -> bool:
            self.woken = True
            return True

    waiter = Woken()
    assert waiting.queue(waiter)  # type: ignore[arg-type]
    limiter = bulkhead._limiter
    assert limiter is not None
    for step in range(9):  # a window of calls that used the whole limit, all but the last
        limiter.sample(clock.monotonic() + step * 0.2, 0.01, 1, False)
    clock.advance(2)
    bulkhead.finish(first, None)  # closes the window: the limit grows to 2, then it releases
    assert waiter.woken
    assert bulkhead.snapshot()["active"] == 1
    assert bulkhead.snapshot()["limit"] == 2


def test_concurrent_threads_and_tasks_stay_within_the_limit(mode, clock) -> None:
    in_flight: list[int] = []
    peak: list[int] = []
    lock = threading.Lock()

    def body() -> str:
        with lock:
            in_flight.append(1)
            peak.append(len(in_flight))
        with lock:
            in_flight.pop()
        return "ok"

    fn = buttress.with_bulkhead("crowd", adaptive="gradient2", limit=4, max_limit=4, max_queue=100)(
        mode.define(body, latency=0.001)
    )
    assert mode.gather(fn, 30) == ["ok"] * 30
    assert max(peak) <= 4
    (crowd,) = [b for b in registry.instances("bulkhead").values() if b.service == "crowd"]
    assert crowd.snapshot()["active"] == 0
    assert 1 <= crowd.snapshot()["limit"] <= 4


def test_shadow_mode_keeps_the_limit_where_it_is(mode, clock) -> None:
    config.reload_settings(env={"BUTTRESS_SERVICES__WATCHED__MODE": "shadow"})
    try:
        fn = buttress.with_bulkhead("watched", adaptive="aimd", limit=1)(mode.define(latency=0.1))
        with capture_events([events.BulkheadLimitChanged]) as seen:
            for _ in range(40):
                assert mode.run(fn) == "ok"
    finally:
        config.reload_settings()
    assert seen == []  # it never refuses, so it has nothing to learn from
    assert live_limit("watched") == 1
