"""``@circuit_breaker(name=..., state_url=...)`` on a real redis-server, in one process.

The decorated function is this process; a storage of its own (the ``peers`` fixture) stands for
another process of the fleet, meeting it only in Redis. Every behaviour runs on ``def`` and on
``async def`` (the ``mode`` fixture). The worker-process fleet is in ``test_fleet.py``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pybreaker
import pytest
from tests.redis._doubles import Dependency, Down

from buttress import circuit_breaker, config, events, registry
from buttress.exceptions import CircuitOpenError
from buttress.patterns.circuit_breaker.redis_storage import Limits, SharedStateStorage, make_storage
from buttress.registry import breaker
from buttress.testing import capture_events

pytestmark = pytest.mark.redis

SERVICE = "svc"
LIMITS = Limits(fail_max=3, reset_timeout=30.0, success_threshold=1, half_open_max_calls=1)


def fail() -> None:
    raise Down("dependency down")


@pytest.fixture(autouse=True)
def _close_breaker_storages(request: pytest.FixtureRequest) -> Iterator[None]:
    """Close the connections of the breakers the test built (asyncio: on the mode's loop)."""
    mode = request.getfixturevalue("mode") if "mode" in request.fixturenames else None
    yield
    if mode is not None and mode.is_async:
        mode.run(asyncio.sleep, 0.05)  # a storage a reload retired closes on this loop
    for built in registry.instances("circuit_breaker").values():
        storage = built.storage
        if isinstance(storage, SharedStateStorage):
            if mode is not None and mode.is_async:
                mode.run(storage.aclose)
            storage.close()
    config.reload_settings()


def protected(mode: Any, url: str, dep: Dependency, **options: Any) -> Any:
    limits = {
        "fail_max": LIMITS.fail_max,
        "timeout": LIMITS.reset_timeout,
        "success_threshold": LIMITS.success_threshold,
        "half_open_max_calls": LIMITS.half_open_max_calls,
        # Every call asks Redis: these tests follow the fleet's state call by call (the
        # near-cache, which serves a known state for a while, has its own in test_near_cache.py).
        "near_cache_ttl": 0,
    }
    return circuit_breaker(name=SERVICE, state_url=url, **{**limits, **options})(mode.define(dep))


def state_in_redis(server: Any) -> str | None:
    return server.client().hget(f"buttress:{{{SERVICE}}}:circuit", "state")


# --- one circuit for the fleet ------------------------------------------------------------------


def test_failures_of_the_fleet_add_up_and_the_trip_is_shared(
    mode: Any, redis_server: Any, peers: Any
) -> None:
    dep = Dependency()
    call = protected(mode, redis_server.url, dep)
    other = peers(SERVICE)
    assert mode.run(call) == "ok"
    dep.down = True
    with capture_events([events.CircuitStateChanged]) as changes:
        with pytest.raises(Down):
            other.call(LIMITS, fail)
        assert isinstance(mode.outcome(call), Down)
        assert isinstance(mode.outcome(call), Down)  # the fleet's third failure trips it
        rejected = mode.outcome(call)
    assert isinstance(rejected, CircuitOpenError)
    assert 29 < rejected.retry_after <= 30
    assert dep.calls == 3
    assert [(c.old_state, c.new_state, c.reason) for c in changes] == [
        ("closed", "open", "fail_max")
    ]
    assert state_in_redis(redis_server) == "open"
    assert other.admit(LIMITS).admitted is False  # the other process fails fast too
    assert isinstance(breaker(SERVICE).storage, SharedStateStorage)


def test_a_result_counted_as_a_failure_trips_the_fleet(
    mode: Any, redis_server: Any, peers: Any
) -> None:
    dep = Dependency()  # answers "ok", which the predicate counts as a failure
    call = protected(mode, redis_server.url, dep, failure_on_result=lambda r: r == "ok")
    with capture_events([events.CircuitCallRecorded]) as recorded:
        assert [mode.run(call) for _ in range(3)] == ["ok"] * 3  # still returned
    assert [(r.outcome, r.error_type) for r in recorded] == [("failure", "FailedResult")] * 3
    assert isinstance(mode.outcome(call), CircuitOpenError)
    assert dep.calls == 3
    assert state_in_redis(redis_server) == "open"
    assert peers(SERVICE).admit(LIMITS).admitted is False


def test_a_trip_elsewhere_rejects_here_without_calling(
    mode: Any, redis_server: Any, peers: Any
) -> None:
    dep = Dependency()
    call = protected(mode, redis_server.url, dep)
    assert mode.run(call) == "ok"
    peers(SERVICE).force("open", LIMITS)
    kinds = [events.CircuitStateChanged, events.CallRejected, events.CallFinished]
    with capture_events(kinds) as seen:
        rejected = mode.outcome(call)
        again = mode.outcome(call)  # known open here now
    assert isinstance(rejected, CircuitOpenError)
    assert isinstance(again, CircuitOpenError)
    assert dep.calls == 1
    assert [(e.new_state, e.reason) for e in seen.of(events.CircuitStateChanged)] == [
        ("open", "shared_state")
    ]
    assert [e.reason for e in seen.of(events.CallRejected)] == ["open", "open"]
    # The rejection ends each call, recorded once (the breaker is outermost: its step records).
    finished = [(e.outcome, e.error_type) for e in seen.of(events.CallFinished)]
    assert finished == [("rejected", "CircuitOpenError")] * 2
    assert breaker(SERVICE).snapshot()["state"] == "open"


def test_a_subscriber_may_read_a_shared_breaker_from_another_thread(
    mode: Any, redis_server: Any, peers: Any
) -> None:
    dep = Dependency()
    call = protected(mode, redis_server.url, dep)
    assert mode.run(call) == "ok"
    cb = breaker(SERVICE)
    seen: list[tuple[str, str]] = []
    stuck: list[bool] = []

    def subscriber(event: Any) -> None:
        # Hands the event to a thread that reads the breaker, and waits for it: under the
        # breaker's lock this would deadlock (bounded by the join's timeout).
        def look() -> None:
            seen.append((type(event).__name__, cb.snapshot()["state"]))

        reader = threading.Thread(target=look, daemon=True)
        reader.start()
        reader.join(2)
        stuck.append(reader.is_alive())

    kinds = [events.CircuitStateChanged, events.CallRejected, events.CircuitTrialStarted]
    undo = events.subscribe(subscriber, kinds)
    try:
        dep.down = True
        for _ in range(LIMITS.fail_max):
            assert isinstance(mode.outcome(call), Down)
        assert isinstance(mode.outcome(call), CircuitOpenError)
        peers(SERVICE).force("half_open", LIMITS)
        dep.down = False
        assert mode.run(call) == "ok"  # adopts half-open, runs as the trial, closes
    finally:
        undo()
    assert not any(stuck)
    assert seen == [
        ("CircuitStateChanged", "open"),
        ("CallRejected", "open"),
        ("CircuitStateChanged", "half_open"),
        ("CircuitTrialStarted", "half_open"),
        ("CircuitStateChanged", "closed"),
    ]


def test_a_circuit_redis_holds_in_an_unknown_state_never_fails_a_good_call(
    mode: Any, redis_server: Any, peers: Any
) -> None:
    dep = Dependency()
    call = protected(mode, redis_server.url, dep)
    assert mode.run(call) == "ok"
    client = redis_server.client()
    client.hset(f"buttress:{{{SERVICE}}}:circuit", mapping={"state": "ajar", "gen": "9"})
    with capture_events([events.StateStoreError]) as seen:
        assert [mode.run(call) for _ in range(5)] == ["ok"] * 5
    assert [e.error_type for e in seen] == ["CorruptStateError"]
    assert breaker(SERVICE).state_label == "closed"
    assert state_in_redis(redis_server) == "closed"
    dep.down = True
    for _ in range(LIMITS.fail_max):
        assert isinstance(mode.outcome(call), Down)
    assert peers(SERVICE).admit(LIMITS).state == "open"  # shared again


def test_half_open_trials_are_limited_across_the_fleet(
    mode: Any, redis_server: Any, peers: Any
) -> None:
    dep = Dependency()
    call = protected(mode, redis_server.url, dep)
    other = peers(SERVICE)
    other.force("half_open", LIMITS)
    trial = other.admit(LIMITS)  # the other process holds the only trial
    assert trial.trial
    with capture_events([events.CallRejected]) as rejections:
        assert isinstance(mode.outcome(call), CircuitOpenError)
    assert [e.reason for e in rejections] == ["half_open_full"]
    assert dep.calls == 0
    other.record(trial, "success", LIMITS)  # its success closes the fleet's circuit
    with capture_events([events.CircuitStateChanged]) as changes:
        assert mode.run(call) == "ok"
    assert [(c.old_state, c.new_state) for c in changes] == [("half_open", "closed")]


def test_a_trial_here_closes_the_fleet_and_an_excluded_error_gives_its_slot_back(
    mode: Any, redis_server: Any, peers: Any
) -> None:
    outcomes: list[BaseException | None] = [KeyError("not a failure"), None]

    def body() -> str:
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome
        return "ok"

    call = circuit_breaker(name=SERVICE, state_url=redis_server.url, exclude=[KeyError])(
        mode.define(body)
    )
    other = peers(SERVICE)
    other.force("half_open")
    with capture_events([events.CircuitTrialStarted, events.CircuitStateChanged]) as seen:
        assert isinstance(mode.outcome(call), KeyError)  # a trial, neither success nor failure
        assert mode.run(call) == "ok"  # the slot was given back: another trial, which closes
    assert len(seen.of(events.CircuitTrialStarted)) == 2
    assert [(c.new_state, c.reason) for c in seen.of(events.CircuitStateChanged)] == [
        ("half_open", "shared_state"),
        ("closed", "success_threshold"),
    ]
    assert other.admit(LIMITS).state == "closed"


def test_a_failure_rate_trip_opens_the_fleet(mode: Any, redis_server: Any, peers: Any) -> None:
    dep = Dependency()
    call = protected(
        mode, redis_server.url, dep, fail_max=100, failure_rate_threshold=0.5, minimum_calls=4
    )
    for _ in range(2):
        assert mode.run(call) == "ok"
    dep.down = True
    with capture_events([events.CircuitStateChanged]) as changes:
        for _ in range(2):
            assert isinstance(mode.outcome(call), Down)
    assert [(c.new_state, c.reason) for c in changes] == [("open", "failure_rate")]
    assert state_in_redis(redis_server) == "open"
    assert peers(SERVICE).admit(LIMITS).admitted is False


# --- manual control -------------------------------------------------------------------------------


def test_reset_open_and_half_open_move_the_fleet_and_overrides_stay_local(
    mode: Any, redis_server: Any, peers: Any
) -> None:
    dep = Dependency()
    call = protected(mode, redis_server.url, dep)
    other = peers(SERVICE)
    assert mode.run(call) == "ok"
    cb = breaker(SERVICE)

    cb.open()
    assert state_in_redis(redis_server) == "open"
    assert other.admit(LIMITS).admitted is False
    cb.reset()
    assert state_in_redis(redis_server) == "closed"
    assert other.admit(LIMITS).admitted is True
    cb.half_open()
    assert state_in_redis(redis_server) == "half_open"
    cb.close()
    assert state_in_redis(redis_server) == "closed"

    cb.force_open()  # this process only
    assert isinstance(mode.outcome(call), CircuitOpenError)
    assert state_in_redis(redis_server) == "closed"
    assert other.admit(LIMITS).admitted is True
    cb.force_closed()
    dep.down = True
    for _ in range(LIMITS.fail_max + 1):
        assert isinstance(mode.outcome(call), Down)  # counted here, never tripping, not shared
    assert cb.snapshot()["failures"] == LIMITS.fail_max + 1
    assert other.admit(LIMITS).failures == 0
    dep.down = False
    cb.disable()
    assert mode.run(call) == "ok"
    cb.enable()  # back to the fleet's circuit
    other.force("open", LIMITS)
    assert isinstance(mode.outcome(call), CircuitOpenError)
    assert cb.state_label == "open"


def test_failures_are_kept_while_open_and_a_failed_trial_counts_as_in_memory(
    mode: Any, redis_server: Any, peers: Any
) -> None:
    dep = Dependency()
    call = protected(mode, redis_server.url, dep)
    other = peers(SERVICE)
    cb = breaker(SERVICE)
    dep.down = True
    for _ in range(LIMITS.fail_max):
        assert isinstance(mode.outcome(call), Down)
    assert isinstance(mode.outcome(call), CircuitOpenError)
    # the count that tripped it, as memory mode (and pybreaker) report it while open
    assert (cb.fail_counter, cb.snapshot()["failures"]) == (3, 3)
    assert other.admit(LIMITS).failures == 3
    other.force("half_open", LIMITS)  # pybreaker's half_open(): the count is kept
    assert other.admit(LIMITS).failures == 3
    assert other.admit(LIMITS).admitted is False  # (that admission took the only trial slot)
    other.force("half_open", LIMITS)
    assert isinstance(mode.outcome(call), Down)  # the trial fails: counted, open again
    assert (cb.state_label, cb.fail_counter, cb.snapshot()["failures"]) == ("open", 4, 4)
    assert other.admit(LIMITS).failures == 4
    cb.reset()
    assert (cb.fail_counter, other.admit(LIMITS).failures) == (0, 0)


def test_the_fleets_failure_count_never_goes_backwards_for_a_reader(
    redis_server: Any,
) -> None:
    # Threads only: replies to concurrent requests arrive in any order.
    dep = Dependency()
    dep.down = True
    call = circuit_breaker(name=SERVICE, state_url=redis_server.url, fail_max=10_000)(dep)
    cb = breaker(SERVICE)
    workers, each = 6, 40
    done = threading.Event()
    readings: list[tuple[int, int]] = []

    def read() -> None:
        while not done.is_set():
            readings.append((cb.fail_counter, cb.snapshot()["failures"]))
            time.sleep(0)  # let the workers run

    def work() -> None:
        for _ in range(each):
            with pytest.raises(Down):
                call()

    reader = threading.Thread(target=read)
    reader.start()
    threads = [threading.Thread(target=work) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    done.set()
    reader.join(5)
    assert (cb.fail_counter, cb.snapshot()["failures"]) == (workers * each, workers * each)
    counters = [r[0] for r in readings]
    snapshots = [r[1] for r in readings]
    assert counters == sorted(counters)
    assert snapshots == sorted(snapshots)


def test_snapshot_and_pybreaker_counters_report_the_fleet_without_a_request(
    mode: Any, redis_server: Any, peers: Any
) -> None:
    dep = Dependency()
    call = protected(mode, redis_server.url, dep)
    with pytest.raises(Down):
        peers(SERVICE).call(LIMITS, fail)
    dep.down = True
    assert isinstance(mode.outcome(call), Down)  # recording it, Redis told the fleet's count
    cb = breaker(SERVICE)
    commands = redis_server.counter()
    snapshot = cb.snapshot()
    pybreaker_view = (cb.current_state, cb.fail_counter, cb.success_counter)
    assert commands() == {}
    assert (snapshot["state"], snapshot["failures"], snapshot["trials_in_flight"]) == (
        "closed",
        2,
        0,
    )
    assert pybreaker_view == ("closed", 2, 0)


def test_event_loops_that_ended_leave_no_connection_open(redis_server: Any) -> None:
    # A script or worker that runs each job with asyncio.run(): one event loop per job.
    @circuit_breaker(name=SERVICE, state_url=redis_server.url)
    async def job() -> str:
        return "ok"

    client = redis_server.client()
    before = client.info("clients")["connected_clients"]
    for _ in range(100):
        assert asyncio.run(job()) == "ok"
    gc.collect()  # a connection dropped unclosed would warn here (warnings are errors)
    assert client.info("clients")["connected_clients"] - before <= 1
    assert asyncio.run(job()) == "ok"  # and the next loop connects again


def test_a_unix_socket_state_url_shares_the_circuit(
    mode: Any, unix_redis_server: Any, peers: Any
) -> None:
    url = f"unix://{unix_redis_server.unixsocket}?db=0"
    dep = Dependency()
    call = protected(mode, url, dep)
    other = peers(SERVICE, url=url)  # another process, on the same socket
    assert mode.run(call) == "ok"
    dep.down = True
    for _ in range(LIMITS.fail_max):
        assert isinstance(mode.outcome(call), Down)
    assert state_in_redis(unix_redis_server) == "open"
    decision = other.admit(LIMITS)
    assert (decision.shared, decision.state) == (True, "open")
    assert breaker(SERVICE).storage.available


# --- settings -------------------------------------------------------------------------------------


def test_state_url_from_settings_and_a_reload_swaps_the_storage(
    mode: Any, redis_server: Any, peers: Any
) -> None:
    dep = Dependency()
    call = circuit_breaker(name=SERVICE, fail_max=3, timeout=30)(mode.define(dep))
    assert mode.run(call) == "ok"
    assert type(breaker(SERVICE).storage) is pybreaker.CircuitMemoryStorage
    peers(SERVICE).force("open", LIMITS)
    variable = "BUTTRESS_SERVICES__SVC__CIRCUIT_BREAKER__STATE_URL"

    config.reload_settings(env={variable: redis_server.url})
    assert isinstance(mode.outcome(call), CircuitOpenError)  # the fleet's state, adopted
    assert isinstance(breaker(SERVICE).storage, SharedStateStorage)

    config.reload_settings(env={})  # applied when a call next runs
    assert isinstance(mode.outcome(call), CircuitOpenError)  # in memory, from the state it knew
    cb = breaker(SERVICE)
    assert type(cb.storage) is pybreaker.CircuitMemoryStorage
    assert cb.state_label == "open"
    assert dep.calls == 1


def test_shadow_mode_lets_a_call_through_an_open_fleet(
    mode: Any, redis_server: Any, peers: Any
) -> None:
    dep = Dependency()
    config.reload_settings(env={"BUTTRESS_SERVICES__SVC__MODE": "shadow"})
    call = protected(mode, redis_server.url, dep)
    peers(SERVICE).force("open", LIMITS)
    with capture_events([events.ShadowDecision]) as seen:
        assert mode.run(call) == "ok"
    assert seen == [events.ShadowDecision(SERVICE, "circuit_breaker", "reject")]
    assert dep.calls == 1


# --- Redis failing ------------------------------------------------------------------------------


def test_calls_never_fail_because_redis_does_and_the_password_stays_hidden(
    mode: Any, secured_redis_server: Any, clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server = secured_redis_server
    password = server.password
    dep = Dependency()
    call = protected(mode, server.url, dep)
    assert mode.run(call) == "ok"
    server.kill()
    caplog.set_level(logging.DEBUG, logger="buttress")
    with capture_events() as seen:
        assert [mode.run(call) for _ in range(3)] == ["ok"] * 3
        dep.down = True
        for _ in range(LIMITS.fail_max):
            assert isinstance(mode.outcome(call), Down)
        rejected = mode.outcome(call)  # tripped on the local copy
    assert isinstance(rejected, CircuitOpenError)
    assert dep.calls == 1 + 3 + LIMITS.fail_max
    faults = seen.of(events.StateStoreError)
    assert [(e.service, e.operation) for e in faults] == [(SERVICE, "admit")]
    cb = breaker(SERVICE)
    logged = [caplog.text, *(repr(vars(record)) for record in caplog.records)]
    shown = [repr(cb), repr(cb.storage), str(rejected), *logged, *map(repr, seen)]
    assert [text for text in shown if password in text] == []
    assert "***" in repr(cb.storage)


@pytest.mark.realtime
def test_redis_restarted_empty_the_fleet_state_is_used_again(
    mode: Any, redis_server: Any, peers: Any
) -> None:
    dep = Dependency()
    call = protected(mode, redis_server.url, dep)
    peers(SERVICE).force("open", LIMITS)
    assert isinstance(mode.outcome(call), CircuitOpenError)
    redis_server.restart()  # empty: the circuit there is closed
    assert isinstance(mode.outcome(call), CircuitOpenError)  # local copy: still open
    time.sleep(0.55)  # the first reconnect wait
    assert mode.run(call) == "ok"
    assert breaker(SERVICE).state_label == "closed"


@pytest.mark.realtime
def test_an_async_call_waiting_on_a_frozen_redis_does_not_block_the_event_loop(
    redis_server: Any,
) -> None:
    # Asking Redis on every call (the near-cache would answer this call without asking).
    @circuit_breaker(name=SERVICE, state_url=redis_server.url, near_cache_ttl=0)
    async def call() -> str:
        return "ok"

    async def main() -> tuple[str, int, float]:
        assert await call() == "ok"  # connected
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        redis_server.freeze()
        ticking = asyncio.ensure_future(ticker())
        started = time.monotonic()
        try:
            result = await call()  # waits for the frozen Redis, then decides locally
        finally:
            elapsed = time.monotonic() - started
            ticking.cancel()
            redis_server.thaw()
        await breaker(SERVICE).storage.aclose()
        return result, ticks, elapsed

    result, ticks, elapsed = asyncio.run(main())
    assert result == "ok"
    assert 0.09 <= elapsed < breaker(SERVICE).storage.max_delay
    assert ticks >= 5  # the loop ran other tasks meanwhile


def test_a_cancelled_async_trial_gives_its_slot_back(redis_server: Any) -> None:
    started = asyncio.Event()

    @circuit_breaker(name=SERVICE, state_url=redis_server.url)
    async def hang() -> str:
        started.set()
        await asyncio.Event().wait()
        return "never"

    async def main() -> None:
        task = asyncio.ensure_future(hang())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await breaker(SERVICE).storage.aclose()

    other = make_storage(redis_server.url, SERVICE)
    other.force("half_open")
    asyncio.run(main())
    assert other.admit(LIMITS).trial  # the lease came back at once, not after it expired
    other.close()


def test_pybreaker_call_acall_and_calling_go_through_the_fleet_circuit(
    mode: Any, redis_server: Any, peers: Any
) -> None:
    dep = Dependency()
    protected(mode, redis_server.url, dep)
    cb = breaker(SERVICE)
    fn = mode.define(dep)
    other = peers(SERVICE)

    def through() -> Any:
        return mode.outcome(cb.acall, fn) if mode.is_async else mode.outcome(cb.call, fn)

    def block() -> Any:
        try:
            with cb.calling():
                return dep()
        except Exception as exc:
            return exc

    assert [through(), block()] == ["ok", "ok"]
    other.force("open", LIMITS)
    assert [type(through()), type(block())] == [CircuitOpenError, CircuitOpenError]
    dep.down = True
    other.force("closed", LIMITS)
    for _ in range(LIMITS.fail_max - 1):
        assert isinstance(through(), Down)
    assert isinstance(block(), Down)  # the fleet's third failure
    assert state_in_redis(redis_server) == "open"
    assert dep.calls == 2 + LIMITS.fail_max


def test_asyncio_run_twice_leaves_no_unclosed_redis_connection(redis_server: Any) -> None:
    # An application that calls asyncio.run() more than once (a CLI, a test suite) must not leak
    # the shared-state connections of the loops that ended.
    script = f"""
import asyncio, gc, warnings
warnings.simplefilter("error", ResourceWarning)
from buttress import circuit_breaker

@circuit_breaker(name="leak-check", state_url={redis_server.url!r})
async def ok() -> str:
    return "ok"

print(asyncio.run(ok()), asyncio.run(ok()))
gc.collect()
"""
    result = subprocess.run(
        [sys.executable, "-X", "dev", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok ok"
    assert "ResourceWarning" not in result.stderr, result.stderr
