"""Shared circuits through Sentinel and Redis Cluster (real processes on loopback), and the URL
forms: ``redis+sentinel://``, ``redis+cluster://`` and the ``valkey`` aliases.

The promise under test through every topology change: a Redis fault never fails a good call.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from buttress import DeferOptions, Deferred, circuit_breaker, events, with_fallback
from buttress._values import redact
from buttress.exceptions import ConfigurationError, RateLimitedError
from buttress.patterns.circuit_breaker.redis_storage import Limits, make_storage
from buttress.patterns.rate_limit import RateLimiter, RateLimitOptions, RateLimitStrategy
from buttress.policy import asettle
from buttress.testing import capture_events, force_circuit_state

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


@pytest.mark.parametrize("user", ["rate_limit", "fallback.defer"])
def test_every_state_url_user_reads_the_topology_urls_alike(user: str) -> None:
    # The same parser for all: a malformed URL is refused when the user is built, naming its key.
    for url, why in [
        ("redis+sentinel://127.0.0.1:1", "master"),
        ("valkey+cluster://127.0.0.1:1/0", "path"),
    ]:
        if user == "rate_limit":
            build = functools.partial(RateLimiter, "svc", RateLimitOptions(rate=1, state_url=url))
        else:
            # A policy is built on its first call.
            build = with_fallback(name="svc", defer=DeferOptions(state_url=url))(lambda: "ok")
        with pytest.raises(ConfigurationError) as caught:
            build()
        assert f"services.svc.{user}.state_url" in str(caught.value.errors)
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


# --- every state_url user: the fleet rate limit and the deferral stream ---------------------------

QUOTA = "quota"


@pytest.fixture
def limiters(mode: Any) -> Iterator[Callable[[str], Any]]:
    """``limit(url, rate=..., burst=...)``: another process's fleet limiter of ``QUOTA`` and a
    call through it (the mode's kind); their connections are closed afterwards."""
    made: list[RateLimiter] = []

    def make(url: str, **options: Any) -> Any:
        limiter = RateLimiter(QUOTA, RateLimitOptions(state_url=url, **options))
        made.append(limiter)
        return mode.chain(RateLimitStrategy(limiter), mode.define())

    yield make
    for limiter in made:
        assert limiter.fleet is not None
        if mode.is_async:
            mode.run(limiter.fleet.transport.aclose)
        limiter.fleet.transport.close()


def _shares_one_burst(mode: Any, first: Any, second: Any) -> None:
    assert [mode.run(first), mode.run(second), mode.run(first)] == ["ok"] * 3
    refused = mode.outcome(second)
    assert isinstance(refused, RateLimitedError)
    assert 90 < refused.retry_after <= 100  # the next token, on Redis's clock


def test_a_fleet_rate_limit_is_shared_through_sentinel(
    mode: Any, sentinel_set: Any, limiters: Any, clock: Any
) -> None:
    first = limiters(sentinel_set.url, rate=0.01, burst=3)
    second = limiters(sentinel_set.url.replace("redis+", "valkey+"), rate=0.01, burst=3)
    _shares_one_burst(mode, first, second)
    assert sentinel_set.master.client().exists("buttress:{quota}:rate")


def test_a_fleet_rate_limit_is_shared_through_a_cluster(
    mode: Any, redis_cluster: Any, limiters: Any, clock: Any
) -> None:
    owner = redis_cluster.owner("buttress:{quota}:rate")
    other = next(node for node in redis_cluster.nodes if node is not owner)
    first = limiters(f"redis+cluster://127.0.0.1:{other.port}", rate=0.01, burst=3)
    second = limiters(redis_cluster.url, rate=0.01, burst=3)
    _shares_one_burst(mode, first, second)
    assert owner.client().exists("buttress:{quota}:rate", "buttress:{quota}:rate:pods") == 2


def test_the_loss_of_the_rate_limits_cluster_node_fails_no_call(
    mode: Any, redis_cluster: Any, limiters: Any, clock: Any
) -> None:
    call = limiters(redis_cluster.url, rate=100, burst=100, expected_pods=2)
    assert mode.run(call) == "ok"
    redis_cluster.owner("buttress:{quota}:rate").kill()
    with capture_events([events.StateStoreError]) as faults:
        assert [mode.run(call) for _ in range(20)] == ["ok"] * 20  # the pod's share: 50
    assert [(f.service, f.operation) for f in faults] == [(QUOTA, "rate_limit")]
    clock.advance(0.6)  # Redis is asked again: the slot's owner is looked up again, still gone
    with capture_events([events.StateStoreError]) as faults:
        assert mode.run(call) == "ok"
    assert len(faults) == 1


@pytest.mark.parametrize("topology", ["sentinel", "cluster"])
def test_deferred_calls_are_kept_in_a_stream_through_the_topology(
    topology: str, request: pytest.FixtureRequest
) -> None:
    setup = request.getfixturevalue("sentinel_set" if topology == "sentinel" else "redis_cluster")

    @with_fallback(name="notify", defer=DeferOptions(state_url=setup.url, retry_interval=0.05))
    @circuit_breaker(name="notify", fail_max=1, timeout=60)
    def send(text: str) -> str:
        return f"sent {text}"

    force_circuit_state("notify", "forced_open")
    handle = send("hello")
    assert isinstance(handle, Deferred)
    # The stream and its lease carry the service's hash tag: one node holds both.
    holder = setup.master if topology == "sentinel" else setup.owner("buttress:defer:{notify}:")
    streams = list(holder.client().scan_iter("buttress:defer:{notify}:*"))
    assert len(streams) == 1
    assert holder.client().xlen(streams[0]) == 1
    force_circuit_state("notify", "closed")
    assert handle.result(timeout=5) == "sent hello"
    assert holder.client().xlen(streams[0]) == 0


# --- four processes (spawned) through the topologies, real time -----------------------------------

SPAWN = multiprocessing.get_context("spawn")
RATE, BURST = 20.0, 5
SHARE_BURST = max(1, BURST // 4)  # each of the four processes' share of the burst


@pytest.fixture
def spawnable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A spawned process imports this module by name: the repository root must be on its path."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))


def _quota_worker(url: str, is_async: bool, ready: Any, stop: Any, results: Any) -> None:
    """In a spawned process: two threads or two tasks call a counting upstream behind the fleet
    rate limit and a shared circuit until ``stop`` is set; report when each admitted call
    reached it, whether its token came from Redis, and what else happened."""
    try:
        _quota_calls(url, is_async, ready, stop, results)
    except BaseException as exc:  # reported: the test fails with it instead of waiting
        results.put({"failed": 1, "errors": [repr(exc)]})


def _quota_calls(url: str, is_async: bool, ready: Any, stop: Any, results: Any) -> None:
    from buttress import circuit_breaker, registry, with_rate_limit

    faults: list[Any] = []
    events.subscribe(faults.append, [events.StateStoreError])
    reached: list[float] = []  # wall-clock times: comparable across the processes
    local: list[float] = []  # those whose token the process's fair share gave
    seen = {"limited": 0, "failed": 0}
    errors: list[str] = []
    lock = threading.Lock()
    # Whether the limiter decided locally when this thread's or task's call started.
    was_down: contextvars.ContextVar[bool] = contextvars.ContextVar("was_down", default=False)

    def is_down() -> bool:
        limiter = registry.instances("rate_limit").get(QUOTA)  # made on the first call
        return limiter is not None and bool(limiter.fleet.is_down())

    def upstream() -> str:
        # Down before the call or now: the token came from the fair share (a fault and a
        # recovery between the two cannot happen: Redis is asked again 0.5 s after a fault).
        off = was_down.get() or is_down()
        with lock:
            (local if off else reached).append(time.time())
        return "ok"

    async def aupstream() -> str:
        return upstream()

    # While Redis cannot answer each process takes its fair share: a quarter of the rate.
    limit = with_rate_limit(QUOTA, rate=RATE, burst=BURST, state_url=url, expected_pods=4)
    shared = circuit_breaker(name=QUOTA, fail_max=3, timeout=30, state_url=url)
    call = limit(shared(aupstream if is_async else upstream))

    def note(error: BaseException) -> None:
        with lock:
            if isinstance(error, RateLimitedError):
                seen["limited"] += 1  # the limit doing its job, not a failure
            else:
                seen["failed"] += 1
                errors.append(repr(error))

    ready.wait(60)
    started = time.time()
    deadline = time.monotonic() + 15  # in case the test never says stop

    def running() -> bool:
        return not stop.is_set() and time.monotonic() < deadline

    def loop() -> None:
        while running():
            was_down.set(is_down())
            try:
                call()
            except Exception as exc:  # counted; the test fails on it
                note(exc)
            time.sleep(0.003)

    async def aloop() -> None:
        while running():
            was_down.set(is_down())
            try:
                await call()
            except Exception as exc:  # counted; the test fails on it
                note(exc)
            await asyncio.sleep(0.003)

    if is_async:

        async def main() -> None:
            await asyncio.gather(aloop(), aloop())

        asyncio.run(main())
    else:
        threads = [threading.Thread(target=loop) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    results.put(
        {
            **seen,
            "reached": reached,
            "local": local,
            "errors": errors[:3],
            "store_errors": len(faults),
            "rate_faults": sum(f.operation == "rate_limit" for f in faults),
            "store_error_types": sorted({(f.operation, f.error_type) for f in faults}),
            "started": started,
            "ended": time.time(),
        }
    )


def _run_fleet(url: str, during: Callable[[], None]) -> list[Any]:
    """Four spawned processes (two on threads, two on tasks) calling while ``during`` runs in
    the test; their reports."""
    ready, stop, results = SPAWN.Barrier(5), SPAWN.Event(), SPAWN.Queue()
    workers = [
        SPAWN.Process(target=_quota_worker, args=(url, i % 2 == 1, ready, stop, results))
        for i in range(4)
    ]
    for worker in workers:
        worker.start()
    try:
        ready.wait(60)  # a spawned interpreter takes a while to import everything
        try:
            during()
        finally:
            stop.set()
        summaries = [results.get(timeout=30) for _ in workers]
    finally:
        for worker in workers:
            worker.join(10)
            if worker.exitcode is None:
                worker.kill()
    assert [worker.exitcode for worker in workers] == [0] * 4
    return summaries


def _window(summaries: list[Any]) -> float:
    return float(max(s["ended"] for s in summaries) - min(s["started"] for s in summaries))


def _counted(summaries: list[Any], key: str) -> int:
    return sum(len(s[key]) for s in summaries)


@pytest.mark.realtime
@pytest.mark.parametrize("topology", ["sentinel", "cluster"])
def test_four_processes_see_at_most_rate_times_t_plus_burst_through_the_topology(
    topology: str, request: pytest.FixtureRequest, spawnable: None
) -> None:
    setup = request.getfixturevalue("sentinel_set" if topology == "sentinel" else "redis_cluster")
    summaries = _run_fleet(setup.url, lambda: time.sleep(1.5))
    assert [(s["failed"], s["errors"]) for s in summaries] == [(0, [])] * 4
    # All four asked the fleet's bucket, where the topology keeps it.
    holder = setup.master if topology == "sentinel" else setup.owner("buttress:{quota}:rate")
    assert holder.client().zcard("buttress:{quota}:rate:pods") == 4
    window = _window(summaries)
    in_redis, locally = _counted(summaries, "reached"), _counted(summaries, "local")
    assert RATE * window * 0.5 <= in_redis + locally  # the processes kept asking
    assert in_redis <= RATE * window + BURST, (in_redis, window)  # Redis's clock decided
    # Each fault lets its process decide at its fair share until Redis is asked again (5 s at
    # the longest): a reply made late by a loaded machine, not the limit failing.
    faults = sum(s["rate_faults"] for s in summaries)
    assert locally <= faults * (SHARE_BURST + RATE / 4 * 5.0), (locally, faults)


@pytest.mark.realtime
def test_a_sentinel_failover_mid_load_fails_no_call_of_a_spawned_fleet(
    sentinel_set: Any, spawnable: None
) -> None:
    """Four spawned processes call through the fleet rate limit and a shared circuit while the
    Sentinel master is killed and its replica promoted: no call fails (the limit refuses some,
    as it should), and every process goes back to deciding in the promoted master."""
    moments: dict[str, float] = {}
    back: list[bytes] = []

    def fail_over() -> None:
        time.sleep(0.4)
        moments["killed"] = time.time()
        sentinel_set.fail_over()  # the master is killed; the replica is promoted (~1 s)
        moments["promoted"] = time.time()
        # Each process's limiter beats in the fleet's heartbeat set as soon as Redis answers
        # it again (it asks again after 0.5 s, then 1 s, 2 s...): wait for all four, bounded.
        master = sentinel_set.replica.client()
        seconds, micros = master.time()
        since = seconds * 1_000_000 + micros
        deadline = time.monotonic() + 8
        while len(back) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
            back[:] = master.zrangebyscore("buttress:{quota}:rate:pods", since, "+inf")
        moments["back"] = time.time()
        time.sleep(0.3)

    summaries = _run_fleet(sentinel_set.url, fail_over)
    assert [(s["failed"], s["errors"]) for s in summaries] == [(0, [])] * 4
    assert all(s["limited"] > 0 for s in summaries)  # the limit held throughout
    assert all(s["store_errors"] >= 1 for s in summaries)  # each saw the master go
    assert len(back) == 4  # and each went on with the promoted replica
    assert sum(t > moments["promoted"] for s in summaries for t in s["reached"]) > 0
    window, outage = _window(summaries), moments["back"] - moments["killed"]
    # From the kill until the last process is back on Redis, the processes that decide locally
    # take their fair shares (together at most the rate, plus a share of the burst each) while
    # those already back share the whole rate in Redis, whose bucket refilled meanwhile: the
    # fleet gets at most the rate more over that time, and one burst more.
    total = _counted(summaries, "reached") + _counted(summaries, "local")
    assert total <= RATE * window + RATE * outage + BURST + 4 * SHARE_BURST, (total, outage)
