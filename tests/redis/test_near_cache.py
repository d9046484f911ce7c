"""The near-cache of shared circuits on a real redis-server: healthy calls cost Redis nothing.

A closed circuit read from Redis decides this process's calls for ``near_cache_ttl`` seconds; a
transition anywhere in the fleet reaches it sooner, through the message the script publishes.
Another storage (the ``peers`` fixture, asking Redis on every call) stands for another process.
Every behaviour runs on ``def`` and ``async def`` (the ``mode`` fixture), on one server, through
Sentinel (before and after a failover) and through a Cluster; the four-process fleet
(spawned interpreters) is measured by ``bench/bench_fleet.py``, run here with a bound.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.redis._doubles import Dependency, Down

from buttress import circuit_breaker, config, registry
from buttress.exceptions import CircuitOpenError
from buttress.patterns.circuit_breaker import _listener
from buttress.patterns.circuit_breaker.redis_storage import Limits, SharedStateStorage

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import bench_fleet  # noqa: E402 - the repository root is on the path only now

pytestmark = pytest.mark.redis

SERVICE = "svc"
LIMITS = Limits(fail_max=3, reset_timeout=30.0, success_threshold=1, half_open_max_calls=1)
# The script's own commands, which INFO commandstats counts too.
SCRIPT_INNER = {"time", "hmget", "hset", "pexpire", "del", "zadd", "zrem", "zcard", "publish"}


@pytest.fixture(autouse=True)
def _close_breaker_storages(request: pytest.FixtureRequest) -> Iterator[None]:
    mode = request.getfixturevalue("mode") if "mode" in request.fixturenames else None
    yield
    for built in registry.instances("circuit_breaker").values():
        storage = built.storage
        if isinstance(storage, SharedStateStorage):
            if mode is not None and mode.is_async:
                mode.run(storage.aclose)
            storage.close()
    config.reload_settings()


def protected(mode: Any, url: str, dep: Dependency, **options: Any) -> Any:
    return circuit_breaker(
        name=SERVICE,
        state_url=url,
        fail_max=LIMITS.fail_max,
        timeout=LIMITS.reset_timeout,
        **{"near_cache_ttl": 30.0, **options},
    )(mode.define(dep))


def storage() -> SharedStateStorage:
    built = registry.breaker(SERVICE).storage
    assert isinstance(built, SharedStateStorage)
    return built


def until(condition: Callable[[], bool], what: str, within: float = 1.0) -> None:
    """Wait (real time, bounded) for the listener thread to have done something."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        time.sleep(0.002)


def subscribed() -> bool:
    subscriber = _listener._subscribers.get(storage()._redis_id)
    return subscriber is not None and subscriber.connected


def warm(mode: Any, call: Any) -> None:
    """First calls: read the state, subscribe, and read it again once subscribed."""
    assert mode.run(call) == "ok"
    until(subscribed, "subscribed")
    until(lambda: storage()._near is None or mode.run(call) == "ok", "settled")
    assert mode.run(call) == "ok"


def test_healthy_calls_cost_no_redis_command(mode: Any, redis_server: Any) -> None:
    dep = Dependency()
    call = protected(mode, redis_server.url, dep)
    warm(mode, call)
    counts = redis_server.counter()
    for _ in range(1000):
        assert mode.run(call) == "ok"
    ran = counts()
    assert ran.get("evalsha", 0) == 0, ran
    assert dep.calls >= 1000


def test_every_call_asks_redis_with_near_cache_ttl_zero(mode: Any, redis_server: Any) -> None:
    call = protected(mode, redis_server.url, Dependency(), near_cache_ttl=0)
    assert mode.run(call) == "ok"
    counts = redis_server.counter()
    for _ in range(10):
        assert mode.run(call) == "ok"
    assert counts()["evalsha"] == 10
    assert not storage()._subscribed  # nothing to hear: no subscription


def test_a_failure_costs_its_record_and_the_success_after_it_one_clearing(
    mode: Any, redis_server: Any
) -> None:
    dep = Dependency()
    call = protected(mode, redis_server.url, dep)
    warm(mode, call)
    counts = redis_server.counter()
    dep.down = True
    assert isinstance(mode.outcome(call), Down)
    dep.down = False
    for _ in range(20):
        assert mode.run(call) == "ok"
    ran = counts()
    # the failure's record; the first success's clearing rides on the next call's admission
    assert {k: n for k, n in ran.items() if k not in SCRIPT_INNER} == {"evalsha": 2}
    assert redis_server.client().hget("buttress:{svc}:circuit", "base") == "1"


@pytest.mark.realtime
def test_a_trip_elsewhere_reaches_this_process_by_pub_sub(
    mode: Any, redis_server: Any, peers: Any
) -> None:
    dep = Dependency()
    call = protected(mode, redis_server.url, dep)
    warm(mode, call)
    other = peers(SERVICE)
    for _ in range(LIMITS.fail_max):
        other.record(other.admit(LIMITS), "failure", LIMITS)
    tripped = time.monotonic()
    until(lambda: isinstance(mode.outcome(call), CircuitOpenError), "rejected", within=0.5)
    assert time.monotonic() - tripped < 0.5  # not the 30 s of near_cache_ttl
    calls = dep.calls
    counts = redis_server.counter()
    for _ in range(50):  # an open circuit known here rejects here too
        assert isinstance(mode.outcome(call), CircuitOpenError)
    assert counts().get("evalsha", 0) == 0
    assert dep.calls == calls

    other.force("closed", LIMITS)  # an operator closes it elsewhere
    until(lambda: mode.outcome(call) == "ok", "closed again", within=0.5)


def test_a_lost_message_is_bounded_by_near_cache_ttl(
    mode: Any, redis_server: Any, peers: Any, monkeypatch: pytest.MonkeyPatch, clock: Any
) -> None:
    dep = Dependency()
    call = protected(mode, redis_server.url, dep, near_cache_ttl=5.0)
    warm(mode, call)
    monkeypatch.setattr(SharedStateStorage, "heard", lambda self, message: None)  # lost
    other = peers(SERVICE)
    for _ in range(LIMITS.fail_max):
        other.record(other.admit(LIMITS), "failure", LIMITS)
    assert mode.run(call) == "ok"  # stale: the trip was not heard
    clock.advance(5.0)
    assert isinstance(mode.outcome(call), CircuitOpenError)  # re-read after the TTL


def test_a_pub_sub_fault_never_fails_a_call_the_ttl_still_bounds_staleness(
    mode: Any, redis_server: Any, peers: Any, clock: Any
) -> None:
    admin = redis_server.client()
    # A user that may run the script but not subscribe: every subscription attempt fails.
    admin.execute_command(
        "ACL", "SETUSER", "nosub", "on", ">pw", "~buttress:*", "&buttress:*",
        "+evalsha", "+script|load", "+hello", "+time", "+hmget", "+hset", "+pexpire",
        "+del", "+zadd", "+zrem", "+zcard", "+zremrangebyscore", "+publish",
    )  # fmt: skip
    url = f"redis://nosub:pw@127.0.0.1:{redis_server.port}/0"
    dep = Dependency()
    call = protected(mode, url, dep, near_cache_ttl=5.0)
    for _ in range(20):
        assert mode.run(call) == "ok"
    other = peers(SERVICE)
    for _ in range(LIMITS.fail_max):
        other.record(other.admit(LIMITS), "failure", LIMITS)
    assert mode.run(call) == "ok"  # not heard: the subscription keeps failing
    clock.advance(5.0)
    assert isinstance(mode.outcome(call), CircuitOpenError)
    assert not subscribed()


def test_the_listener_thread_ends_with_the_last_storage(mode: Any, redis_server: Any) -> None:
    call = protected(mode, redis_server.url, Dependency())
    warm(mode, call)
    subscriber = _listener._subscribers[storage()._redis_id]
    thread = subscriber._thread
    assert thread is not None
    assert thread.is_alive()
    if mode.is_async:
        mode.run(storage().aclose)
    storage().close()
    thread.join(2)
    assert not thread.is_alive()


def test_many_event_loops_share_the_one_listener(redis_server: Any, peers: Any) -> None:
    dep = Dependency()

    @circuit_breaker(name=SERVICE, state_url=redis_server.url, fail_max=3, near_cache_ttl=30)
    async def call() -> str:
        return dep()

    for _ in range(3):  # each asyncio.run is a new loop, closed after
        assert asyncio.run(call()) == "ok"
    until(subscribed, "subscribed")
    other = peers(SERVICE)
    for _ in range(LIMITS.fail_max):
        other.record(other.admit(LIMITS), "failure", LIMITS)

    def rejected() -> bool:
        try:
            asyncio.run(call())
        except CircuitOpenError:
            return True
        return False

    until(rejected, "rejected on a new loop")


@pytest.mark.realtime
def test_four_spawned_processes_cost_redis_nothing_and_all_reject_soon_after_a_trip(
    redis_server: Any,
) -> None:
    figures = bench_fleet.run(redis_server.url, workers=4, calls=500)
    assert figures["commands_per_1000_healthy_calls"] < 10  # one re-read per process at most
    assert figures["seconds_to_reject"] < 0.5  # pub/sub, not the 30 s near_cache_ttl


def test_redis_killed_and_restarted_under_a_near_cached_circuit_fails_no_call(
    mode: Any, redis_server: Any, clock: Any
) -> None:
    dep = Dependency()
    call = protected(mode, redis_server.url, dep, near_cache_ttl=2.0)
    warm(mode, call)
    redis_server.kill()
    for _ in range(20):  # near-cached: nothing asks the dead Redis
        assert mode.run(call) == "ok"
    clock.advance(2.0)
    for _ in range(20):  # the copy ran out: the re-read fails, the calls go on locally
        assert mode.run(call) == "ok"
    assert not storage().available
    redis_server.start()  # empty
    clock.advance(5.0)  # past the reconnect backoff
    assert mode.run(call) == "ok"
    assert storage().available
    assert dep.calls >= 41


# --- through Sentinel and Cluster -----------------------------------------------------------------


def trip_from(other: Any, check: Callable[[], bool]) -> None:
    """Trip the circuit through ``other`` (another process's storage) until Redis says open.

    Right after a topology change ``other`` may still decide locally for a moment (its own
    reconnect backoff): it records again until the shared state shows the trip.
    """

    def tripped() -> bool:
        for _ in range(LIMITS.fail_max):
            other.record(other.admit(LIMITS), "failure", LIMITS)
        return check()

    until(tripped, "tripped in Redis", within=5.0)


def heard_within(mode: Any, call: Any, seconds: float) -> None:
    tripped = time.monotonic()
    until(lambda: isinstance(mode.outcome(call), CircuitOpenError), "rejected", within=seconds)
    assert time.monotonic() - tripped < seconds  # pub/sub, not the 30 s of near_cache_ttl


@pytest.mark.realtime
def test_a_trip_reaches_a_near_cache_through_sentinel_before_and_after_a_failover(
    mode: Any, peers: Any, sentinel_set: Any
) -> None:
    key = "buttress:{svc}:circuit"
    dep = Dependency()
    call = protected(mode, sentinel_set.url, dep)
    warm(mode, call)
    other = peers(SERVICE, url=sentinel_set.url)
    trip_from(other, lambda: sentinel_set.master.client().hget(key, "state") == "open")
    heard_within(mode, call, 0.5)
    other.force("closed", LIMITS)
    until(lambda: mode.outcome(call) == "ok", "closed again", within=0.5)

    subscriber = _listener._subscribers[storage()._redis_id]
    sentinel_set.fail_over()  # the master (and the listener's connection) is gone
    until(lambda: not subscriber.connected, "the lost subscription noticed", within=2.0)
    # The listener finds the promoted replica through the sentinels and subscribes there.
    until(lambda: subscriber.connected, "subscribed to the new master", within=10.0)
    until(lambda: mode.outcome(call) == "ok" and storage().available, "settled", within=10.0)
    assert mode.run(call) == "ok"
    trip_from(other, lambda: sentinel_set.replica.client().hget(key, "state") == "open")
    heard_within(mode, call, 0.5)


@pytest.mark.realtime
def test_a_trip_reaches_a_near_cache_through_a_cluster(
    mode: Any, peers: Any, redis_cluster: Any
) -> None:
    key = "buttress:{svc}:circuit"
    owner = redis_cluster.owner(key)
    # Told only about a node that does not own the circuit's slot, as both "processes" are.
    other_node = next(node for node in redis_cluster.nodes if node is not owner)
    url = f"redis+cluster://127.0.0.1:{other_node.port}"
    dep = Dependency()
    call = protected(mode, url, dep)
    warm(mode, call)
    other = peers(SERVICE, url=url)
    trip_from(other, lambda: owner.client().hget(key, "state") == "open")
    heard_within(mode, call, 0.5)
    counts = owner.counter()
    for _ in range(50):  # known open here: rejected here, nothing asked
        assert isinstance(mode.outcome(call), CircuitOpenError)
    assert counts().get("evalsha", 0) == 0
    other.force("closed", LIMITS)
    until(lambda: mode.outcome(call) == "ok", "closed again", within=0.5)
