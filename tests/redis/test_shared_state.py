"""Shared circuit state on a real redis-server: the decisions, the keys, the cost, the secrets.

Two storages on one service stand for two processes of a fleet: each has its own connections and
its own local copy, and they meet only in Redis. Every behaviour runs through the sync decision
API and through the asyncio one (the ``mode`` fixture).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import pybreaker
import pytest

from buttress import events
from buttress.exceptions import ConfigurationError
from buttress.patterns.circuit_breaker.redis_storage import Limits, SharedStateStorage, make_storage
from buttress.policy import asettle
from buttress.testing import capture_events

pytestmark = pytest.mark.redis

SCRIPT_INNER = {
    "time",
    "hmget",
    "hset",
    "pexpire",
    "del",
    "zadd",
    "zrem",
    "zcard",
    "zremrangebyscore",
}
LIMITS = Limits(fail_max=3, reset_timeout=60.0, success_threshold=1, half_open_max_calls=2)


class Down(ConnectionError):
    """The dependency failed."""


def fail() -> None:
    raise Down("dependency down")


def fail_times(peer: Any, n: int, limits: Limits = LIMITS) -> Any:
    after = None
    for _ in range(n):
        ticket = peer.admit(limits)
        assert ticket.admitted
        after = peer.record(ticket, "failure", limits)
    return after


# --- trips, clears and generations ----------------------------------------------------------------


def test_fail_max_failures_across_processes_trip_the_fleet(peers: Any) -> None:
    a, b = peers(), peers()
    fail_times(a, 1)
    fail_times(b, 1)
    tripped = fail_times(a, 1)
    assert (tripped.state, tripped.change, tripped.shared) == ("open", "fail_max", True)

    seen_by_b = b.admit(LIMITS)
    assert (seen_by_b.state, seen_by_b.admitted) == ("open", False)
    assert 59.0 < seen_by_b.retry_after <= 60.0


def test_a_success_clears_only_the_failures_recorded_before_its_call_was_admitted(
    peers: Any, redis_server: Any
) -> None:
    a, b = peers(), peers()
    slow_success = a.admit(LIMITS)  # admitted with no failures recorded
    fail_times(b, 2)  # recorded while a's call runs
    assert a.record(slow_success, "success", LIMITS) is None  # nothing to send yet
    assert a.admit(LIMITS).failures == 2  # its success rode on this request and cleared nothing

    later = b.admit(LIMITS)  # admitted after both failures
    b.record(later, "success", LIMITS)
    assert b.admit(LIMITS).failures == 0
    stored = redis_server.client().hgetall("buttress:{svc}:circuit")
    assert (stored["seq"], stored["base"]) == ("2", "2")


def test_reading_the_state_never_resets_anyones_failures(peers: Any) -> None:
    a, b = peers(), peers()
    fail_times(b, 2)
    for _ in range(5):
        assert a.storage.observe().failures == 2
        assert a.admit(LIMITS).failures == 2
    assert fail_times(b, 1).change == "fail_max"


def test_an_outcome_from_an_ended_generation_changes_nothing(peers: Any) -> None:
    a, b = peers(), peers()
    in_flight = a.admit(LIMITS)
    tripped = fail_times(b, 3)
    late = a.record(in_flight, "failure", LIMITS)
    assert (late.state, late.generation, late.change) == ("open", tripped.generation, None)

    reset = b.force("closed", LIMITS)
    assert reset.generation > tripped.generation
    old_ticket = tripped._replace(state="closed", admitted=True)
    assert a.record(old_ticket, "failure", LIMITS).failures == 0


def test_half_open_trials_are_limited_across_the_fleet(peers: Any) -> None:
    a, b, c = peers(), peers(), peers()
    a.force("half_open", LIMITS)
    first, second, third = a.admit(LIMITS), b.admit(LIMITS), c.admit(LIMITS)
    assert (first.trial, second.trial) == (True, True)
    assert (third.state, third.admitted, third.retry_after) == ("half_open", False, None)

    limits = LIMITS._replace(success_threshold=2)
    assert a.record(first, "success", limits).state == "half_open"
    closed = b.record(second, "success", limits)
    assert (closed.state, closed.change) == ("closed", "success_threshold")
    assert c.admit(LIMITS).admitted


def test_a_failed_trial_reopens_for_everyone(peers: Any) -> None:
    a, b = peers(), peers()
    a.force("half_open", LIMITS)
    trial = a.admit(LIMITS)
    reopened = a.record(trial, "failure", LIMITS)
    assert (reopened.state, reopened.change) == ("open", "trial_failed")
    assert (b.admit(LIMITS).state, b.admit(LIMITS).admitted) == ("open", False)


def test_an_ignored_trial_gives_its_slot_back(peers: Any) -> None:
    limits = LIMITS._replace(half_open_max_calls=1)
    a, b = peers(), peers()
    a.force("half_open", limits)
    trial = a.admit(limits)
    assert not b.admit(limits).admitted
    assert a.record(trial, "ignored", limits).state == "half_open"
    assert b.admit(limits).trial


def test_a_transition_applies_only_to_the_generation_it_was_decided_in(peers: Any) -> None:
    a, b = peers(), peers()
    seen = a.admit(LIMITS)
    first = a.storage.transition("open", seen.generation, LIMITS)  # say a failure-rate trip
    second = b.storage.transition("open", seen.generation, LIMITS)  # the same trip, decided late
    assert (first.state, first.change) == ("open", "manual")
    assert (second.state, second.generation, second.change) == ("open", first.generation, None)
    assert second.age >= first.age  # the open period was not restarted


def test_last_known_reads_nothing_from_redis(peers: Any, redis_server: Any) -> None:
    a, b = peers(), peers()
    fail_times(a, 3)
    counts = redis_server.counter()
    assert (b.storage.last_known().state, b.storage.last_known().shared) == ("closed", False)
    assert (a.storage.last_known().state, a.storage.last_known().shared) == ("open", False)
    assert counts() == {}


@pytest.mark.realtime
def test_a_trial_whose_process_vanished_frees_its_slot_after_the_lease(peers: Any) -> None:
    limits = LIMITS._replace(half_open_max_calls=1)
    a, b = peers(trial_lease=0.2), peers(trial_lease=0.2)
    a.force("half_open", limits)
    assert a.admit(limits).trial  # and never reports
    assert not b.admit(limits).admitted
    time.sleep(0.25)
    assert b.admit(limits).trial


@pytest.mark.realtime
def test_the_open_period_is_timed_on_redis_in_milliseconds(peers: Any) -> None:
    limits = LIMITS._replace(reset_timeout=0.3)
    a, b = peers(), peers()
    fail_times(a, 3, limits)
    early = b.admit(limits)
    assert early.state == "open"
    assert 0.1 < early.retry_after <= 0.3
    time.sleep(early.retry_after + 0.01)
    trial = b.admit(limits)
    assert (trial.state, trial.trial, trial.change) == ("half_open", True, "timeout_elapsed")


# --- a circuit this version cannot read -----------------------------------------------------------

CIRCUIT = "buttress:{svc}:circuit"
TRIALS = "buttress:{svc}:trials"


def _unknown_state(client: Any) -> None:  # garbage, or a state of a later version
    client.hset(CIRCUIT, mapping={"state": "forced_open_fleetwide", "gen": "7"})


def _state_with_a_space(client: Any) -> None:  # would shift every field of the reply
    client.hset(CIRCUIT, mapping={"state": "half open", "gen": "7"})


def _a_count_that_is_not_one(client: Any) -> None:
    client.hset(CIRCUIT, mapping={"state": "closed", "gen": "1e400", "seq": "-2"})


def _not_a_hash(client: Any) -> None:
    client.set(CIRCUIT, "garbage")


def _trials_not_a_sorted_set(client: Any) -> None:
    client.hset(CIRCUIT, mapping={"state": "half_open", "gen": "7"})
    client.rpush(TRIALS, "garbage")


@pytest.mark.parametrize(
    "corrupt",
    [
        _unknown_state,
        _state_with_a_space,
        _a_count_that_is_not_one,
        _not_a_hash,
        _trials_not_a_sorted_set,
    ],
)
def test_a_circuit_that_cannot_be_read_is_decided_locally_once_and_repaired(
    peers: Any, redis_server: Any, corrupt: Any
) -> None:
    peer = peers()
    assert peer.call(LIMITS) == "ok"
    client = redis_server.client()
    corrupt(client)
    with capture_events([events.StateStoreError]) as seen:
        once = peer.admit(LIMITS)  # this call: the local copy decides (closed here)
        assert (once.admitted, once.shared) == (True, False)
        assert [peer.call(LIMITS) for _ in range(3)] == ["ok"] * 3
        repaired = peer.admit(LIMITS)
    assert seen == [events.StateStoreError("svc", "admit", "CorruptStateError")]
    assert (repaired.state, repaired.shared, repaired.failures) == ("closed", True, 0)
    assert peer.storage.available  # Redis works: no reconnect wait
    assert client.hget(CIRCUIT, "state") == "closed"
    assert client.type(TRIALS) in {"none", "zset"}
    fail_times(peer, 3)  # and it protects again
    assert peers().admit(LIMITS).state == "open"


def test_a_process_whose_local_copy_is_open_keeps_rejecting_on_a_corrupt_circuit(
    peers: Any, redis_server: Any
) -> None:
    peer = peers()
    fail_times(peer, 3)
    _unknown_state(redis_server.client())
    once = peer.admit(LIMITS)  # the last state it read: open
    assert (once.state, once.admitted, once.shared) == ("open", False, False)
    assert peer.admit(LIMITS).state == "closed"  # the repaired circuit, as Redis restarted empty


# --- keys, expiry, cost ---------------------------------------------------------------------------


def test_keys_are_namespaced_per_service_and_expire_when_idle(
    peers: Any, redis_server: Any
) -> None:
    client: Any = redis_server.client()
    openfga, llm = peers("openfga", idle_ttl=600), peers("llm", idle_ttl=600)
    assert openfga.storage.keys == ("buttress:{openfga}:circuit", "buttress:{openfga}:trials")
    fail_times(openfga, 3)
    assert llm.admit(LIMITS).state == "closed"
    assert sorted(client.keys("*")) == ["buttress:{openfga}:circuit"]
    assert 590_000 < client.pttl("buttress:{openfga}:circuit") <= 600_000

    openfga.force("half_open", LIMITS)
    openfga.admit(LIMITS)
    assert 0 < client.pttl("buttress:{openfga}:trials") <= 600_000


def test_an_open_circuit_outlives_a_short_idle_ttl(peers: Any, redis_server: Any) -> None:
    peer = peers(idle_ttl=1)
    fail_times(peer, 3)
    # two open periods plus the trial lease: an idle TTL never cuts an open period short
    assert redis_server.client().pttl("buttress:{svc}:circuit") > 120_000


def test_a_healthy_circuit_is_never_written(peers: Any, redis_server: Any) -> None:
    peer = peers()
    for _ in range(20):
        assert peer.call(LIMITS) == "ok"
    assert redis_server.client().exists("buttress:{svc}:circuit") == 0


def test_a_closed_state_success_costs_one_request(peers: Any, redis_server: Any) -> None:
    peer, other = peers(), peers()
    peer.call(LIMITS)  # connect and load the script outside the count
    fail_times(other, 2)

    counts = redis_server.counter()
    for _ in range(10):
        assert peer.call(LIMITS) == "ok"
    ran = counts()
    # INFO commandstats also counts the commands the script runs inside Redis
    assert {name: n for name, n in ran.items() if name not in SCRIPT_INNER} == {"evalsha": 10}
    assert ran["time"] == 10
    # the first success cleared the two failures, on the next call's request
    assert peer.admit(LIMITS).failures == 0


def test_pybreakers_own_redis_storage_costs_two_requests_per_success(
    redis_server: Any,
) -> None:
    import redis

    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    breaker = pybreaker.CircuitBreaker(
        state_storage=pybreaker.CircuitRedisStorage("closed", client, namespace="svc")
    )
    breaker.call(lambda: "ok")
    counts = redis_server.counter()
    for _ in range(10):
        breaker.call(lambda: "ok")
    assert counts() == {"get": 10, "set": 10}
    client.close()


def test_the_script_is_loaded_again_after_redis_forgets_it(peers: Any, redis_server: Any) -> None:
    peer = peers()
    fail_times(peer, 1)
    redis_server.client().script_flush()
    with capture_events([events.StateStoreError]) as seen:
        ticket = peer.admit(LIMITS)
    assert (ticket.shared, ticket.failures, seen) == (True, 1, [])


# --- credentials and configuration ----------------------------------------------------------------


def test_a_password_in_the_url_is_used_and_never_shown(
    mode: Any, secured_redis_server: Any
) -> None:
    storage = make_storage(secured_redis_server.url, "svc")
    try:
        decision = (
            mode.run(asettle, storage.admission(LIMITS)) if mode.is_async else storage.admit(LIMITS)
        )
        assert decision.shared
        assert "s3cr3t" not in repr(storage)
        assert "s3cr3t" not in storage.url
        assert "s3cr3t" not in repr(vars(storage)) + repr(vars(storage.transport._link))
        assert storage.url == f"redis://:***@127.0.0.1:{secured_redis_server.port}/0"
    finally:
        if mode.is_async:
            mode.run(storage.aclose)
        storage.close()


def test_a_wrong_password_is_a_store_error_that_names_no_secret(
    mode: Any, secured_redis_server: Any
) -> None:
    url = f"redis://:wrong-pass-123@127.0.0.1:{secured_redis_server.port}/0"
    storage = make_storage(url, "svc")
    try:
        with capture_events() as seen:
            decision = (
                mode.run(asettle, storage.admission(LIMITS))
                if mode.is_async
                else storage.admit(LIMITS)
            )
        assert (decision.admitted, decision.shared) == (True, False)
        assert seen == [events.StateStoreError("svc", "admit", "AuthenticationError")]
        assert "wrong-pass" not in repr(seen) + repr(storage)
    finally:
        if mode.is_async:
            mode.run(storage.aclose)
        storage.close()


# The least-privilege ACL of docs/distributed.md.
ACL = (
    "+evalsha +script|load +hello +time +hmget +hset +pexpire +del +zadd +zrem +zcard "
    "+zremrangebyscore +publish +subscribe +unsubscribe &buttress:*"
)


def test_the_documented_acl_is_enough(peers: Any, redis_server: Any) -> None:
    admin = redis_server.client()
    admin.execute_command(
        "ACL", "SETUSER", "buttress", "on", ">acl-pw", "~buttress:*", *ACL.split()
    )
    url = f"redis://buttress:acl-pw@127.0.0.1:{redis_server.port}/0"
    a, b = peers(url=url), peers(url=url)
    with capture_events([events.StateStoreError]) as seen:
        fail_times(a, 3)
        a.force("half_open", LIMITS)
        trial = b.admit(LIMITS)
        assert b.record(trial, "success", LIMITS).state == "closed"
        admin.script_flush()
        assert a.admit(LIMITS).shared
    assert seen == []
    assert admin.execute_command("ACL", "LOG") == []


@pytest.mark.parametrize(
    "url", ["http://:pw-123@host/0", "redis//:pw-123@host", "postgres://u:pw-123@h/db"]
)
def test_a_url_that_is_not_redis_is_a_configuration_error_without_the_password(
    url: str,
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        make_storage(url, "openfga")
    assert "pw-123" not in str(raised.value)
    assert "openfga" in str(raised.value)
    assert raised.value.errors[0][0] == "services.openfga.circuit_breaker.state_url"


def test_without_the_redis_package_state_url_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [m for m in sys.modules if m == "redis" or m.startswith("redis.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ConfigurationError, match=r"buttress\[redis\]") as raised:
        make_storage("redis://:pw-123@127.0.0.1:6379/0", "openfga")
    assert "pw-123" not in str(raised.value)


def test_nothing_connects_before_the_first_call(closed_port: str) -> None:
    storage = make_storage(closed_port, "svc")
    assert isinstance(storage, SharedStateStorage)
    assert storage.available
    storage.close()
