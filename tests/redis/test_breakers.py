"""The shared storage under real breakers: pybreaker's own, and buttress's.

Each breaker gets its own storage (its own connections and local copy), standing for one process;
they share only the Redis server.
"""

from __future__ import annotations

import time
from typing import Any

import pybreaker
import pytest
from tests.redis._doubles import Dependency, Down

from buttress import events
from buttress.exceptions import CircuitOpenError
from buttress.patterns.circuit_breaker import (
    CircuitBreaker,
    CircuitBreakerOptions,
    CircuitBreakerStrategy,
)
from buttress.patterns.circuit_breaker.redis_storage import make_storage
from buttress.testing import capture_events

pytestmark = pytest.mark.redis


@pytest.fixture
def storages(redis_server: Any, request: pytest.FixtureRequest) -> Any:
    made: list[Any] = []

    def make(**options: Any) -> Any:
        storage = make_storage(redis_server.url, "svc", **options)
        made.append(storage)
        return storage

    # asyncio connections are closed on the loop that opened them (the mode's)
    mode = request.getfixturevalue("mode") if "mode" in request.fixturenames else None
    yield make
    for storage in made:
        if mode is not None and mode.is_async:
            mode.run(storage.aclose)
        storage.close()


# --- pybreaker.CircuitBreaker, unchanged --------------------------------------------------------


@pytest.mark.realtime
def test_pybreaker_fleet_trips_together_and_keeps_every_processes_failures(
    storages: Any,
) -> None:
    # The two-process run of library-facts 1.6, where CircuitRedisStorage lost B's failures.
    a = pybreaker.CircuitBreaker(fail_max=3, reset_timeout=0.2, state_storage=storages())
    b = pybreaker.CircuitBreaker(fail_max=3, reset_timeout=0.2, state_storage=storages())
    dep = Dependency()
    dep.down = True
    for _ in range(2):
        with pytest.raises(Down):
            a.call(dep)
    with pytest.raises(pybreaker.CircuitBreakerError, match="threshold"):
        a.call(dep)
    with pytest.raises(pybreaker.CircuitBreakerError, match="still open"):
        b.call(dep)
    assert dep.calls == 3  # b failed fast

    time.sleep(0.25)
    dep.down = False
    assert b.call(dep) == "ok"  # b's trial closes the fleet's circuit
    assert a.current_state == b.current_state == "closed"

    dep.down = True
    for _ in range(2):
        with pytest.raises(Down):
            b.call(dep)
    # a still caches "open"; noticing the close must not wipe b's two failures
    with pytest.raises(pybreaker.CircuitBreakerError, match="threshold"):
        a.call(dep)
    assert b.current_state == "open"


@pytest.mark.realtime
def test_pybreaker_opens_for_a_sub_second_reset_timeout(storages: Any) -> None:
    breaker = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=0.3, state_storage=storages())
    dep = Dependency()
    dep.down = True
    with pytest.raises(pybreaker.CircuitBreakerError):
        breaker.call(dep)
    tripped = time.monotonic()
    dep.down = False
    while True:
        try:
            breaker.call(dep)
            break
        except pybreaker.CircuitBreakerError:
            time.sleep(0.01)
    assert 0.28 <= time.monotonic() - tripped < 0.6  # CircuitRedisStorage: anywhere in 0..1 s


def test_pybreaker_goes_on_locally_when_redis_is_gone(storages: Any, redis_server: Any) -> None:
    storage = storages()
    breaker = pybreaker.CircuitBreaker(fail_max=2, reset_timeout=60, state_storage=storage)
    dep = Dependency()
    assert breaker.call(dep) == "ok"
    redis_server.kill()
    with capture_events([events.StateStoreError]) as seen:
        assert breaker.call(dep) == "ok"
        dep.down = True
        with pytest.raises(Down):
            breaker.call(dep)
        with pytest.raises(pybreaker.CircuitBreakerError, match="threshold"):
            breaker.call(dep)  # trips on local state: the dependency stays protected
        with pytest.raises(pybreaker.CircuitBreakerError, match="still open"):
            breaker.call(dep)
    assert dep.calls == 4
    assert seen[0].service == "svc"
    assert seen[0].error_type == "ConnectionError"
    assert not storage.available


# --- buttress's CircuitBreaker given the storage (it uses the storage's decision API) -------------


def chained(mode: Any, storage: Any, dep: Dependency, **options: Any) -> Any:
    breaker = CircuitBreaker("svc", CircuitBreakerOptions(**options), state_storage=storage)
    return mode.chain(CircuitBreakerStrategy(breaker, shadow=False), mode.define(dep))


def test_a_trip_in_one_breaker_makes_the_others_reject_without_calling(
    mode: Any, storages: Any
) -> None:
    dep = Dependency()
    a = chained(mode, storages(), dep, fail_max=2, timeout=30)
    b = chained(mode, storages(), dep, fail_max=2, timeout=30)
    assert mode.run(b) == "ok"
    dep.down = True
    with capture_events([events.CircuitStateChanged]) as changes:
        assert isinstance(mode.outcome(a), Down)
        assert isinstance(mode.outcome(a), Down)  # the tripping call raises its own error
        rejected = mode.outcome(b)
    assert isinstance(rejected, CircuitOpenError)
    assert 29 < rejected.retry_after <= 30
    assert dep.calls == 3
    assert [(c.old_state, c.new_state, c.reason) for c in changes] == [
        ("closed", "open", "fail_max"),
        ("closed", "open", "shared_state"),
    ]


def test_a_buttress_breaker_keeps_failures_of_other_processes(mode: Any, storages: Any) -> None:
    dep = Dependency()
    a = chained(mode, storages(), dep, fail_max=3, timeout=30)
    b = chained(mode, storages(), dep, fail_max=3, timeout=30)
    dep.down = True
    assert isinstance(mode.outcome(a), Down)
    assert isinstance(mode.outcome(b), Down)
    assert isinstance(mode.outcome(a), Down)  # the third failure of the fleet trips it
    assert isinstance(mode.outcome(b), CircuitOpenError)


def test_a_buttress_breaker_call_never_fails_because_redis_does(
    mode: Any, storages: Any, redis_server: Any
) -> None:
    dep = Dependency()
    call = chained(mode, storages(), dep, fail_max=3, timeout=30)
    assert mode.run(call) == "ok"
    redis_server.kill()
    assert [mode.run(call) for _ in range(5)] == ["ok"] * 5
    redis_server.restart()
    assert mode.run(call) == "ok"


def test_a_chain_built_before_the_storage_changed_follows_it(
    mode: Any, storages: Any, redis_server: Any
) -> None:
    dep = Dependency()
    cb = CircuitBreaker("svc", CircuitBreakerOptions(fail_max=2, timeout=30))
    call = mode.chain(CircuitBreakerStrategy(cb, shadow=False), mode.define(dep))  # in memory
    storages().force("open")
    cb.reconfigure(CircuitBreakerOptions(fail_max=2, timeout=30, state_url=redis_server.url))
    assert isinstance(mode.outcome(call), CircuitOpenError)  # the fleet's state
    assert dep.calls == 0
    shared = cb.storage
    shared_call = mode.chain(CircuitBreakerStrategy(cb, shadow=False), mode.define(dep))
    cb.reconfigure(CircuitBreakerOptions(fail_max=2, timeout=30))
    commands = redis_server.counter()
    assert isinstance(mode.outcome(shared_call), CircuitOpenError)  # in memory: still open
    cb.reset()
    assert [mode.run(shared_call), mode.run(call)] == ["ok", "ok"]
    assert commands() == {}
    if mode.is_async:
        mode.run(shared.aclose)


# --- open time that grows, and a Retry-After, across the fleet ----------------------------------


def breaker_and_chain(mode: Any, storage: Any, body: Any, **options: Any) -> tuple[Any, Any]:
    breaker = CircuitBreaker("svc", CircuitBreakerOptions(**options), state_storage=storage)
    return breaker, mode.chain(CircuitBreakerStrategy(breaker, shadow=False), mode.define(body))


def test_the_fleets_open_time_grows_on_repeated_trips_and_a_close_resets_it(
    mode: Any, storages: Any
) -> None:
    def down() -> str:
        raise Down("dependency down")

    options = {"fail_max": 1, "timeout": 30, "open_backoff": 2, "max_timeout": 100}
    a, call_a = breaker_and_chain(mode, storages(), down, **options)
    _, call_b = breaker_and_chain(mode, storages(), down, **options)
    for expected in (30, 60, 100, 100):  # the third trip in a row: 120, capped
        assert isinstance(mode.outcome(call_a), Down)  # trips (or fails the trial)
        rejected = mode.outcome(call_b)  # the other process sees the open time Redis chose
        assert isinstance(rejected, CircuitOpenError)
        assert expected - 1 < rejected.retry_after <= expected
        a.half_open()  # the fleet's circuit half-opens; the streak goes on
    a.close()
    assert isinstance(mode.outcome(call_a), Down)
    rejected = mode.outcome(call_b)
    assert isinstance(rejected, CircuitOpenError)
    assert 29 < rejected.retry_after <= 30


def test_a_retry_after_holds_the_fleets_circuit_open(mode: Any, storages: Any) -> None:
    from buttress.patterns._transient import FailedResponse

    def unavailable() -> str:
        raise FailedResponse(object(), 503, method="GET", delay=300)

    _, call_a = breaker_and_chain(mode, storages(), unavailable, fail_max=1, timeout=30)
    b, call_b = breaker_and_chain(mode, storages(), unavailable, fail_max=1, timeout=30)
    assert isinstance(mode.outcome(call_a), FailedResponse)
    rejected = mode.outcome(call_b)
    assert isinstance(rejected, CircuitOpenError)
    assert 299 < rejected.retry_after <= 300
    assert 299 < b.snapshot()["seconds_left_open"] <= 300
