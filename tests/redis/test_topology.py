"""Shared circuits through Sentinel and Redis Cluster (real processes on loopback), and the URL
forms: ``redis+sentinel://``, ``redis+cluster://`` and the ``valkey`` aliases.

The promise under test through every topology change: a Redis fault never fails a good call.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
from typing import Any

import pytest

from buttress import events
from buttress._values import redact
from buttress.exceptions import ConfigurationError
from buttress.patterns.circuit_breaker.redis_storage import Limits, make_storage
from buttress.policy import asettle

pytestmark = pytest.mark.redis

FORK = multiprocessing.get_context("fork")
LIMITS = Limits(fail_max=3, reset_timeout=30, success_threshold=1, half_open_max_calls=1)
# Quick to give up and quick to come back: a topology change lasts about a second here.
FAST = {"socket_timeout": 0.2, "connect_timeout": 0.2, "reconnect_min": 0.05, "reconnect_max": 0.1}


class Down(ConnectionError):
    """The dependency failed."""


def trip(peer: Any) -> None:
    for _ in range(LIMITS.fail_max):
        with pytest.raises(Down):
            peer.call(LIMITS, _fail)


def _fail() -> str:
    raise Down("dependency down")


# --- the URL forms --------------------------------------------------------------------------------


def test_a_valkey_url_is_a_redis_url(peers: Any, redis_server: Any) -> None:
    valkey = peers(url=redis_server.url.replace("redis://", "valkey://"))
    plain = peers()
    trip(valkey)
    assert plain.call(LIMITS) == "rejected"
    assert redis_server.client().hget("buttress:{svc}:circuit", "state") == "open"


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("redis+sentinel://127.0.0.1:26379", "master"),
        ("redis+sentinel://127.0.0.1:26379/", "master"),
        ("redis+sentinel://127.0.0.1/bt", "host:port"),
        ("valkey+sentinel://127.0.0.1:x/bt", "host:port"),
        ("redis+cluster://127.0.0.1:7000/0", "path"),
        ("redis+cluster://127.0.0.1:7000,127.0.0.1/", "host:port"),
    ],
)
def test_a_malformed_topology_url_fails_when_the_storage_is_made(url: str, why: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        make_storage(url, "svc")
    assert "services.svc.circuit_breaker.state_url" in str(caught.value.errors)
    assert why in str(caught.value)


def test_making_a_topology_storage_connects_to_nothing() -> None:
    # Nothing listens on these ports: an unreachable Sentinel or Cluster at start-up only means
    # the first calls decide locally (as with redis://).
    for url in ("redis+sentinel://127.0.0.1:1,127.0.0.1:2/bt", "redis+cluster://127.0.0.1:1"):
        storage = make_storage(url, "svc", **FAST)
        assert storage.admit(LIMITS).admitted
        storage.close()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "redis+sentinel://:pw-1@127.0.0.1:1,127.0.0.1:2/bt/0",
            "redis+sentinel://:***@127.0.0.1:1,127.0.0.1:2/bt/0",
        ),
        (
            "valkey+cluster://user:pw-1@127.0.0.1:1,127.0.0.1:2",
            "valkey+cluster://user:***@127.0.0.1:1,127.0.0.1:2",
        ),
        ("valkeys://:pw-1@127.0.0.1:1/0", "valkeys://:***@127.0.0.1:1/0"),
    ],
)
def test_topology_urls_are_shown_without_their_password(url: str, shown: str) -> None:
    assert redact(url) == shown
    assert make_storage(url, "svc").url == shown


@pytest.mark.parametrize("service", ["svc", "a:b", "x}y", "{z}", "payments-eu"])
def test_a_circuits_keys_hash_to_one_cluster_slot(service: str) -> None:
    from redis.crc import key_slot

    circuit, trials = make_storage("redis://127.0.0.1:1/0", service).keys
    assert key_slot(circuit.encode()) == key_slot(trials.encode())


# --- Sentinel -------------------------------------------------------------------------------------


@pytest.mark.realtime
def test_a_circuit_is_shared_through_sentinel(peers: Any, sentinel_set: Any) -> None:
    first, second = peers(url=sentinel_set.url), peers(url=sentinel_set.url)
    trip(first)
    assert second.call(LIMITS) == "rejected"
    master = sentinel_set.master.client()
    assert master.hget("buttress:{svc}:circuit", "state") == "open"


def _steady(url: str, is_async: bool, seconds: float, started: Any, results: Any) -> None:
    """In a worker process: two threads or two tasks of good calls; count those that failed."""
    faults: list[Any] = []
    events.subscribe(faults.append, [events.StateStoreError])
    storage = make_storage(url, "fleet", **FAST)
    counts = {"calls": 0, "failed": 0, "shared": 0}
    lock = threading.Lock()
    started.wait(10)
    deadline = time.monotonic() + seconds

    def note(decision: Any) -> None:
        with lock:
            counts["calls"] += 1
            counts["failed"] += not decision.admitted

    def loop() -> None:
        while time.monotonic() < deadline:
            try:
                ticket = storage.admit(LIMITS)
                if ticket.admitted:
                    storage.record(ticket, "success", LIMITS)
                note(ticket)
            except Exception:
                with lock:
                    counts["failed"] += 1
            time.sleep(0.005)

    async def aloop() -> None:
        while time.monotonic() < deadline:
            try:
                ticket = await asettle(storage.admission(LIMITS))
                if ticket.admitted:
                    await asettle(storage.recording(ticket, "success", LIMITS))
                note(ticket)
            except Exception:
                counts["failed"] += 1
            await asyncio.sleep(0.005)

    if is_async:

        async def main() -> None:
            await asyncio.gather(aloop(), aloop())
            await storage.aclose()

        asyncio.run(main())
    else:
        threads = [threading.Thread(target=loop) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    storage.close()
    results.put({**counts, "store_errors": len(faults)})


@pytest.mark.realtime
def test_a_sentinel_failover_mid_load_fails_no_call(sentinel_set: Any) -> None:
    """Four processes (two on threads, two on tasks) through a failover of the master."""
    started, results = FORK.Barrier(5), FORK.Queue()
    workers = [
        FORK.Process(target=_steady, args=(sentinel_set.url, i % 2 == 1, 3.0, started, results))
        for i in range(4)
    ]
    for worker in workers:
        worker.start()
    started.wait(10)
    time.sleep(0.4)
    sentinel_set.fail_over()  # the master is killed; the replica is promoted (~1 s)
    promoted = sentinel_set.replica.counter()
    summaries = [results.get(timeout=20) for _ in workers]
    for worker in workers:
        worker.join(10)
    assert [s["failed"] for s in summaries] == [0] * 4
    assert all(s["calls"] > 50 for s in summaries)
    assert all(s["store_errors"] >= 1 for s in summaries)  # they did see the master go
    assert promoted().get("evalsha", 0) > 0  # and went on with the promoted replica


# --- Cluster --------------------------------------------------------------------------------------


@pytest.mark.realtime
def test_a_circuit_is_shared_through_a_cluster(peers: Any, redis_cluster: Any) -> None:
    owner = redis_cluster.owner("buttress:{svc}:circuit")
    # Told only about a node that does not own the slot: redis-py's map finds the owner.
    other = next(node for node in redis_cluster.nodes if node is not owner)
    first = peers(url=f"redis+cluster://127.0.0.1:{other.port}")
    second = peers(url=redis_cluster.url)
    trip(first)
    assert second.call(LIMITS) == "rejected"
    assert owner.client().hget("buttress:{svc}:circuit", "state") == "open"


@pytest.mark.realtime
def test_the_loss_of_a_cluster_node_fails_no_call(peers: Any, redis_cluster: Any) -> None:
    """The owner of one circuit's slot dies: that circuit goes local, the others stay shared."""
    lost = redis_cluster.owner("buttress:{svc}:circuit")
    kept_service = next(
        name
        for name in (f"svc{i}" for i in range(100))
        if redis_cluster.owner(f"buttress:{{{name}}}:circuit") is not lost
    )
    faults: list[Any] = []
    events.subscribe(faults.append, [events.StateStoreError])
    on_lost = peers(url=redis_cluster.url, **FAST)
    on_kept = peers(service=kept_service, url=redis_cluster.url, **FAST)
    assert on_lost.call(LIMITS) == on_kept.call(LIMITS) == "ok"
    kept = redis_cluster.owner(f"buttress:{{{kept_service}}}:circuit").counter()
    lost.kill()
    for _ in range(20):
        assert on_lost.call(LIMITS) == "ok"  # decided locally, never failed
        assert on_kept.call(LIMITS) == "ok"
    assert faults
    assert {f.service for f in faults} == {"svc"}
    assert kept().get("evalsha", 0) >= 20  # the other circuit stayed shared: one per call


@pytest.mark.parametrize(
    "url",
    ["redis+sentinel://127.0.0.1:1/bt", "valkey+cluster://127.0.0.1:1", "valkeys://127.0.0.1:1/0"],
)
def test_settings_accept_the_topology_urls(url: str) -> None:
    from buttress import config

    env = {"BUTTRESS_SERVICES__PAY__CIRCUIT_BREAKER__STATE_URL": url}
    settings = config.load_settings(env=env)
    assert settings.services["pay"].circuit_breaker.state_url == url
