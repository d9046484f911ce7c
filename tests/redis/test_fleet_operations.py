"""Fleet-wide operations and the quorum of rate-based trips, on a real redis-server.

Each ``CircuitBreaker`` here makes its own storage from ``state_url`` (its own connections,
near-cache and subscription), standing for one process of the fleet; they meet only in Redis.
Every behaviour runs on ``def`` and ``async def`` (the ``mode`` fixture).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from tests.redis._doubles import Dependency, Down

from buttress import events
from buttress.exceptions import CircuitOpenError
from buttress.patterns.circuit_breaker import (
    CircuitBreaker,
    CircuitBreakerOptions,
    CircuitBreakerStrategy,
)
from buttress.testing import capture_events

pytestmark = pytest.mark.redis

CIRCUIT = "buttress:{svc}:circuit"


class Process:
    """One process of the fleet: a breaker with its own storage, and a protected call."""

    def __init__(self, mode: Any, url: str, **options: Any) -> None:
        settings = {"fail_max": 3, "timeout": 30, "near_cache_ttl": 30, **options}
        self.breaker = CircuitBreaker("svc", CircuitBreakerOptions(state_url=url, **settings))
        self.dep = Dependency()
        self.mode = mode
        strategy = CircuitBreakerStrategy(self.breaker, shadow=False)
        self.call = mode.chain(strategy, mode.define(self.dep))

    def outcome(self) -> Any:
        return self.mode.outcome(self.call)


@pytest.fixture
def fleet(mode: Any, redis_server: Any) -> Iterator[Callable[..., Process]]:
    made: list[Process] = []

    def make(url: str | None = None, **options: Any) -> Process:
        process = Process(mode, url or redis_server.url, **options)
        made.append(process)
        return process

    yield make
    for process in made:
        storage = process.breaker.storage
        if mode.is_async:
            mode.run(storage.aclose)
        storage.close()


def until(condition: Callable[[], bool], what: str, within: float = 1.0) -> None:
    """Wait (real time, bounded) for a message of another process to arrive."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        time.sleep(0.002)


def rejected(process: Process) -> bool:
    return isinstance(process.outcome(), CircuitOpenError)


# --- fleet-wide force open / force closed / disable, with a TTL ----------------------------------


def test_force_open_with_a_ttl_reaches_every_process(fleet: Any, redis_server: Any) -> None:
    a, b = fleet(), fleet()
    assert (a.outcome(), b.outcome()) == ("ok", "ok")
    a.breaker.force_open(ttl=60)
    assert redis_server.client().hget(CIRCUIT, "override") == "forced_open"
    assert rejected(a)
    until(lambda: rejected(b), "b rejects")  # pub/sub, not b's 30 s near_cache_ttl
    # b calls the dependency until the message arrives (how many times depends on the host's
    # speed); once it has, it rejects without calling.
    calls = b.dep.calls
    error = b.outcome()
    assert (error.retry_after, b.breaker.state_label) == (None, "forced_open")
    assert b.breaker.snapshot()["state"] == "forced_open"
    assert b.dep.calls == calls
    ttl = redis_server.client().pttl(CIRCUIT)
    assert ttl > 50_000  # the keys outlive the override


def test_any_process_ends_a_fleet_override_with_reset(fleet: Any) -> None:
    a, b = fleet(), fleet()
    a.outcome(), b.outcome()
    a.breaker.force_open(ttl=600)
    until(lambda: rejected(b), "b rejects")
    with capture_events([events.CircuitStateChanged]) as changes:
        b.breaker.reset()
    assert b.outcome() == "ok"
    until(lambda: a.outcome() == "ok", "a admits again")
    assert a.breaker.state_label == "closed"
    assert next((c.old_state, c.new_state) for c in changes.of(events.CircuitStateChanged)) == (
        "forced_open",
        "closed",
    )


@pytest.mark.realtime
def test_a_fleet_override_ends_by_itself_when_its_ttl_runs_out(fleet: Any) -> None:
    a, b = fleet(timeout=0.2), fleet(timeout=0.2)
    a.outcome(), b.outcome()
    a.breaker.force_open(ttl=0.3)
    until(lambda: rejected(b), "b rejects")
    # Then as after a trip: open for its time (run out by now), a trial, closed.
    until(lambda: b.outcome() == "ok", "b admits once the override ended", within=1.5)
    assert a.outcome() == "ok"
    assert b.breaker.state_label == "closed"


def test_force_closed_with_a_ttl_never_trips_the_fleet(fleet: Any, redis_server: Any) -> None:
    a, b = fleet(), fleet()
    a.outcome(), b.outcome()
    b.breaker.force_closed(ttl=60)
    until(lambda: a.breaker.state_label == "forced_closed" or not a.outcome(), "a learns it")
    a.dep.down = True
    for _ in range(6):  # twice fail_max
        assert isinstance(a.outcome(), Down)
    assert redis_server.client().hget(CIRCUIT, "state") == "closed"
    assert a.breaker.state_label == "forced_closed"
    assert a.dep.calls >= 7


def test_disable_with_a_ttl_lets_every_process_straight_through(
    fleet: Any, redis_server: Any
) -> None:
    a, b = fleet(), fleet()
    a.outcome(), b.outcome()
    a.breaker.disable(ttl=60)
    until(lambda: b.breaker.state_label == "disabled" or not b.outcome(), "b learns it")
    b.dep.down = True
    with capture_events([events.CircuitCallRecorded]) as seen:
        for _ in range(6):
            assert isinstance(b.outcome(), Down)
    assert seen == []  # disabled: nothing recorded, not even an event
    assert redis_server.client().hget(CIRCUIT, "seq") == "0"
    b.breaker.enable()  # any process ends it
    assert redis_server.client().hget(CIRCUIT, "override") == ""


def test_a_ttl_override_without_redis_holds_in_this_process_and_ends(
    fleet: Any, closed_port: str, clock: Any
) -> None:
    a = fleet(url=closed_port)
    a.breaker.force_open(ttl=10)
    assert rejected(a)
    assert a.breaker.state_label == "forced_open"
    clock.advance(10)
    assert a.breaker.state_label != "forced_open"
    with capture_events([events.CircuitStateChanged]) as changes:
        a.outcome()
    assert [c.reason for c in changes.of(events.CircuitStateChanged)][:1] == ["override_expired"]


def test_a_local_breaker_takes_a_ttl_too(mode: Any, clock: Any) -> None:
    cb = CircuitBreaker("svc", CircuitBreakerOptions(fail_max=3, timeout=30))
    call = mode.chain(CircuitBreakerStrategy(cb, shadow=False), mode.define(lambda: "ok"))
    cb.disable(ttl=5)
    assert mode.run(call) == "ok"
    assert cb.state_label == "disabled"
    cb.force_closed(ttl=5)
    clock.advance(5)
    assert mode.run(call) == "ok"
    assert cb.state_label == "closed"
    cb.force_open(ttl=5)
    assert isinstance(mode.outcome(call), CircuitOpenError)
    for wrong in (0, -1, float("nan"), float("inf"), "5", True):
        for override in (cb.force_open, cb.force_closed, cb.disable):
            with pytest.raises(ValueError, match="ttl"):
                override(ttl=wrong)  # type: ignore[arg-type]


# --- quorum: a rate-based trip opens the fleet only when min_reporters processes saw it -----------

RATE = {"failure_rate_threshold": 0.5, "minimum_calls": 4, "fail_max": 100}


def test_below_the_quorum_only_the_reporting_process_opens(
    fleet: Any, redis_server: Any, clock: Any
) -> None:
    a, b = fleet(min_reporters=2, **RATE), fleet(min_reporters=2, **RATE)
    a.outcome(), b.outcome()
    a.dep.down = True
    with capture_events([events.CircuitStateChanged]) as changes:
        for _ in range(4):
            a.outcome()
    assert [(c.new_state, c.reason) for c in changes.of(events.CircuitStateChanged)] == [
        ("open", "failure_rate")
    ]
    assert rejected(a)  # a opened its own breaker
    assert redis_server.client().hget(CIRCUIT, "state") in {None, "closed"}  # not the fleet's
    assert b.outcome() == "ok"
    clock.advance(30)  # a's own open time: then the fleet's state again, with a fresh window
    a.dep.down = False
    assert a.outcome() == "ok"
    assert a.breaker.state_label == "closed"


def test_the_quorum_reached_opens_the_fleet(fleet: Any, redis_server: Any) -> None:
    a, b, c = (fleet(min_reporters=2, **RATE) for _ in range(3))
    a.outcome(), b.outcome(), c.outcome()
    a.dep.down = b.dep.down = True
    for _ in range(4):
        a.outcome()
    assert redis_server.client().hget(CIRCUIT, "state") in {None, "closed"}
    for _ in range(4):
        b.outcome()
    assert redis_server.client().hget(CIRCUIT, "state") == "open"  # two processes reported
    until(lambda: rejected(c), "c, which saw no failure, rejects too")


REPORTERS = "buttress:{svc}:reporters"
# How long a vote stands: a time window's span (window_seconds, here 300), or, for a count
# window, which has none, the voter's own open time (Process's timeout, 30).
STANDING = {"time": 300, "count": 30}


def trip(process: Process) -> None:
    """The process's own rate window trips: it votes, and rejects from then on."""
    process.dep.down = True
    for _ in range(RATE["minimum_calls"]):
        process.outcome()
    assert rejected(process)


def age_votes(redis_server: Any, seconds: float) -> None:
    """Every vote cast so far, ``seconds`` older. Redis scores votes by its own time, which the
    injected clock does not move: this moves it for them."""
    client = redis_server.client()
    votes = client.zrange(REPORTERS, 0, -1, withscores=True)
    client.zadd(REPORTERS, {member: score - seconds * 1000 for member, score in votes})


@pytest.mark.parametrize(
    ("window", "later", "fleet_opens"),
    [
        ("count", 29, True),
        ("count", 31, False),  # by window_seconds (300) it would still stand
        ("time", 31, True),
        ("time", 299, True),
        ("time", 301, False),
    ],
)
def test_a_vote_stands_for_its_time_windows_span_or_its_count_windows_open_time(
    fleet: Any, redis_server: Any, clock: Any, window: str, later: float, fleet_opens: bool
) -> None:
    options = {"window": window, "window_size": 4, "window_seconds": 300, **RATE}
    a, b = fleet(min_reporters=2, **options), fleet(min_reporters=2, **options)
    a.outcome(), b.outcome()
    trip(a)
    assert 0 < redis_server.client().pttl(REPORTERS) <= STANDING[window] * 1000
    # `later` seconds on, for this process and for Redis alike.
    clock.advance(later)
    age_votes(redis_server, later)
    if later > STANDING["count"]:  # a's own open time is over: it calls again, and is answered
        a.dep.down = False
        assert a.outcome() == "ok"
    trip(b)
    state = redis_server.client().hget(CIRCUIT, "state")
    if fleet_opens:
        assert state == "open"  # a's vote stood: two processes reported
        until(lambda: rejected(a), "a rejects with the fleet")
    else:
        assert state in {None, "closed"}  # a's vote aged out: b opened alone, and voted
        assert redis_server.client().zcard(REPORTERS) == 1
        assert a.outcome() == "ok"


def test_one_reporter_is_todays_behaviour(fleet: Any, redis_server: Any) -> None:
    a, b = fleet(**RATE), fleet(**RATE)
    a.outcome(), b.outcome()
    a.dep.down = True
    for _ in range(4):
        a.outcome()
    assert redis_server.client().hget(CIRCUIT, "state") == "open"
    until(lambda: rejected(b), "b rejects")
