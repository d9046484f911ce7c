"""Redis failing under a shared circuit: unreachable, killed, frozen, restarted empty.

A fault never fails a call: the storage decides locally, from the last state it saw in Redis,
reports ``StateStoreError``, waits before asking Redis again (one probe at a time, the wait
doubling up to ``reconnect_max``), and uses the shared state again as soon as Redis answers.
The reconnect waits run on the buttress clock (the ``clock`` fixture); Redis's own timeouts are
real, so the frozen-server tests run in real time.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from buttress import events
from buttress.patterns.circuit_breaker.redis_storage import Limits, make_storage
from buttress.policy import asettle
from buttress.testing import capture_events

pytestmark = pytest.mark.redis

LIMITS = Limits(fail_max=3, reset_timeout=60.0, success_threshold=1, half_open_max_calls=1)


class Down(ConnectionError):
    """The dependency failed."""


def fail() -> None:
    raise Down("dependency down")


def trip(peer: Any) -> None:
    for _ in range(LIMITS.fail_max):
        with pytest.raises(Down):
            peer.call(LIMITS, fail)


def test_unreachable_at_start_up_calls_go_on_locally(
    peers: Any, closed_port: str, clock: Any
) -> None:
    peer = peers(url=closed_port)
    with capture_events([events.StateStoreError]) as seen:
        assert [peer.call(LIMITS) for _ in range(3)] == ["ok"] * 3
        trip(peer)  # the local copy still protects the dependency
        assert peer.call(LIMITS) == "rejected"
    assert seen == [events.StateStoreError("svc", "admit", "ConnectionError")]
    assert not peer.storage.available


def test_killed_mid_run_the_local_copy_starts_from_the_shared_state(
    peers: Any, redis_server: Any, clock: Any
) -> None:
    a, b = peers(), peers()
    trip(b)
    assert a.admit(LIMITS).state == "open"  # a has seen the fleet's trip
    redis_server.kill()
    with capture_events([events.StateStoreError]) as seen:
        local = a.admit(LIMITS)
    assert (local.state, local.admitted, local.shared) == ("open", False, False)
    assert 59 < local.retry_after <= 60
    assert [e.operation for e in seen] == ["admit"]


def test_the_local_copy_keeps_the_failures_while_open_and_counts_a_failed_trial(
    peers: Any, redis_server: Any, clock: Any
) -> None:
    peer = peers()
    trip(peer)
    redis_server.kill()
    local = peer.admit(LIMITS)
    assert (local.state, local.failures, local.shared) == ("open", 3, False)
    clock.advance(LIMITS.reset_timeout)
    trial = peer.admit(LIMITS)
    assert (trial.state, trial.trial, trial.failures) == ("half_open", True, 3)
    after = peer.record(trial, "failure", LIMITS)
    assert (after.state, after.change, after.failures) == ("open", "trial_failed", 4)


def test_restarted_empty_the_shared_state_is_used_again_after_the_reconnect_wait(
    peers: Any, redis_server: Any, clock: Any
) -> None:
    peer = peers(reconnect_min=0.5)
    trip(peer)
    redis_server.restart()  # empty: the fleet's trip is forgotten
    with capture_events([events.StateStoreError]) as seen:
        assert peer.admit(LIMITS).shared is False  # the old connection broke: local, open
        assert peer.admit(LIMITS).state == "open"
        clock.advance(0.5)
        back = peer.admit(LIMITS)
    assert (back.shared, back.state, back.admitted) == (True, "closed", True)
    assert len(seen) == 1
    assert peer.storage.available


def test_reconnect_attempts_back_off_and_never_pile_up(
    peers: Any, redis_server: Any, clock: Any
) -> None:
    peer = peers(reconnect_min=0.5, reconnect_max=2.0)
    assert peer.call(LIMITS) == "ok"
    redis_server.kill()
    attempts = []
    with capture_events([events.StateStoreError]) as seen:
        for _ in range(16):  # 8 simulated seconds, a call every half second
            before = len(seen)
            assert peer.call(LIMITS) == "ok"
            attempts.append(len(seen) - before)
            clock.advance(0.5)
    # tried at 0, then after waits of 0.5, 1, 2, 2, 2 seconds
    assert attempts == [1, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1]


def test_an_outcome_recorded_while_redis_is_down_counts_locally(
    peers: Any, redis_server: Any, clock: Any
) -> None:
    peer = peers()
    for _ in range(2):
        with pytest.raises(Down):
            peer.call(LIMITS, fail)
    admitted = peer.admit(LIMITS)
    redis_server.kill()
    after = peer.record(admitted, "failure", LIMITS)
    assert (after.state, after.change, after.shared) == ("open", "fail_max", False)


def test_a_call_admitted_before_a_restart_cannot_touch_the_new_state(
    peers: Any, redis_server: Any, clock: Any
) -> None:
    a, b = peers(reconnect_min=0.1), peers(reconnect_min=0.1)
    for _ in range(2):
        with pytest.raises(Down):
            a.call(LIMITS, fail)
    b.force("half_open", LIMITS)
    trial = b.admit(LIMITS)
    redis_server.restart()
    assert a.admit(LIMITS).shared is False  # a's pooled connection broke
    clock.advance(0.1)
    assert a.admit(LIMITS).shared is True
    after = b.record(trial, "failure", LIMITS)  # b's connection broke: counted locally only
    assert after.shared is False
    clock.advance(0.1)
    assert (b.admit(LIMITS).state, a.admit(LIMITS).failures) == ("closed", 0)


@pytest.mark.realtime
@pytest.mark.parametrize("fault", ["freeze", "kill"])
def test_a_frozen_or_killed_redis_delays_one_call_by_at_most_max_delay(
    peers: Any, redis_server: Any, fault: str
) -> None:
    peer = peers(socket_timeout=0.1, connect_timeout=0.1, reconnect_min=0.3)
    assert peer.call(LIMITS) == "ok"
    getattr(redis_server, fault)()
    durations = []
    with capture_events([events.StateStoreError]) as seen:
        for _ in range(5):
            started = time.monotonic()
            assert peer.call(LIMITS) == "ok"
            durations.append(time.monotonic() - started)
    assert max(durations) < peer.storage.max_delay
    assert sum(d > 0.05 for d in durations) <= 1  # after the first fault: local, at once
    assert [e.error_type for e in seen] == [
        "TimeoutError" if fault == "freeze" else "ConnectionError"
    ]

    if fault == "freeze":
        redis_server.thaw()
    else:
        redis_server.start()
    time.sleep(0.35)
    assert peer.admit(LIMITS).shared


def wait_for(condition: Any, seconds: float = 2.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.mark.realtime
def test_a_trial_redis_granted_too_late_to_answer_is_given_back(
    peers: Any, redis_server: Any, clock: Any
) -> None:
    a = peers(socket_timeout=0.1, connect_timeout=0.1, reconnect_min=0.5)
    b = peers()
    a.force("half_open", LIMITS)  # one trial slot for the fleet
    redis_server.freeze()  # a latency spike
    late = a.admit(LIMITS)  # no reply in time: a decides locally...
    assert (late.shared, late.trial) == (False, True)
    redis_server.thaw()
    # ...but Redis ran the admission once it could, and granted the lease to nobody
    trials = redis_server.client()
    assert wait_for(lambda: trials.zcard("buttress:{svc}:trials") == 1)
    assert b.admit(LIMITS).admitted is False
    a.record(late, "success", LIMITS)  # still local: a waits before asking Redis again
    clock.advance(0.5)
    trial = a.admit(LIMITS)  # a's next request gives the orphaned lease back first
    assert (trial.shared, trial.admitted, trial.trial) == (True, True, True)
    assert a.record(trial, "success", LIMITS).state == "closed"
    assert b.admit(LIMITS).admitted


def test_a_record_that_never_reached_redis_gives_its_trial_lease_back_later(
    peers: Any, redis_server: Any, clock: Any
) -> None:
    admin = redis_server.client()
    connected = {c["id"] for c in admin.client_list()}
    a = peers(reconnect_min=0.5)
    a.force("half_open", LIMITS)  # connects a
    (a_connection,) = {c["id"] for c in admin.client_list()} - connected
    trial = a.admit(LIMITS)
    admin.client_kill_filter(_id=a_connection)  # the record will find its connection gone
    with capture_events([events.StateStoreError]) as seen:
        after = a.record(trial, "ignored", LIMITS)  # say a 429: neither success nor failure
    assert (after.shared, len(seen)) == (False, 1)
    b = peers()
    assert b.admit(LIMITS).admitted is False  # the lease is still held in Redis
    clock.advance(0.5)
    a.storage.observe()  # a's next request, whatever it is, gives the lease back
    assert b.admit(LIMITS).trial


@pytest.mark.realtime
def test_a_cancelled_probe_lets_the_next_caller_probe(redis_server: Any, clock: Any) -> None:
    # asyncio only: a task can be cancelled while it waits for Redis, a thread cannot
    storage = make_storage(redis_server.url, "svc", socket_timeout=5, reconnect_min=0.5)

    async def scenario() -> tuple[bool, bool]:
        redis_server.kill()
        during_outage = (await asettle(storage.admission(LIMITS))).shared
        redis_server.start()
        redis_server.freeze()
        clock.advance(0.5)
        probe = asyncio.ensure_future(asettle(storage.admission(LIMITS)))
        await asyncio.sleep(0.05)  # the probe waits on the frozen server
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
        redis_server.thaw()
        after = (await asettle(storage.admission(LIMITS))).shared
        await storage.aclose()
        return during_outage, after

    assert asyncio.run(scenario()) == (False, True)
