"""Deferred calls in a Redis stream: they outlive the process that queued them, and four
processes that see the dependency back replay each of them once, in order.

Every process is forked, defines the same protected function (so the same stream) and keeps its
circuit locally; what the replays did is recorded in the same redis-server.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from typing import Any

import pytest

import buttress
from buttress import (
    CircuitOpenError,
    DeferOptions,
    Deferred,
    circuit_breaker,
    events,
    idempotency_key,
    with_fallback,
)
from buttress.testing import capture_events, force_circuit_state

pytestmark = [pytest.mark.redis, pytest.mark.realtime]

FORK = multiprocessing.get_context("fork")
RACERS = 4
ITEMS = 6


def notifier(url: str, *, retry_interval: float = 0.05, max_items: int = 1000) -> Any:
    """The protected function every process defines: it records each call that ran in Redis."""
    import redis

    client = redis.Redis.from_url(url)

    @with_fallback(
        name="notify",
        defer=DeferOptions(state_url=url, retry_interval=retry_interval, max_items=max_items),
    )
    @circuit_breaker(name="notify", fail_max=1, timeout=60)
    def send(text: str) -> str:
        client.rpush("sent", json.dumps([text, idempotency_key(), os.getpid()]))
        return f"sent {text}"

    return send


def stream_length(url: str) -> int:
    import redis

    return sum(
        int(redis.Redis.from_url(url).xlen(key))
        for key in redis.Redis.from_url(url).scan_iter("buttress:defer:*")
        if not key.endswith(b":lease")
    )


def report(results: Any, value: Any) -> None:
    """Put ``value`` and wait until it is written: ``os._exit`` would drop it otherwise."""
    results.put(value)
    results.close()
    results.join_thread()


def defer_and_die(url: str, results: Any) -> None:
    """Queue ITEMS calls while the circuit is open, then die without any cleanup."""
    try:
        notify = notifier(url, retry_interval=3600)  # never tries a replay before it dies
        force_circuit_state("notify", "forced_open")
        handles = [notify(f"msg-{i}") for i in range(ITEMS)]
        report(results, [h.idempotency_key if isinstance(h, Deferred) else h for h in handles])
    except BaseException as exc:  # reported to the test, which fails with it
        report(results, [repr(exc)])
    finally:
        os._exit(0)


def race(url: str, ready: Any, results: Any) -> None:
    """A restarted process: its first call links the queue; it waits for the stream to drain."""
    try:
        notify = notifier(url)
        ready.wait(10)
        notify(f"live-{os.getpid()}")  # the dependency is back: this call closes nothing, runs
        deadline = time.monotonic() + 10
        while stream_length(url) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # a drain that found the stream empty has let go of its lease
        report(results, "ok")
    except BaseException as exc:  # reported to the test, which fails with it
        report(results, repr(exc))
    finally:
        os._exit(0)


def test_deferred_calls_survive_a_restart_and_are_replayed_once_in_order(redis_server) -> None:
    url = redis_server.url
    results = FORK.Queue()
    first = FORK.Process(target=defer_and_die, args=(url, results))
    first.start()
    keys = results.get(timeout=10)
    first.join(10)
    assert all(len(key) == 32 for key in keys), keys
    assert stream_length(url) == ITEMS

    ready = FORK.Event()
    racers = [FORK.Process(target=race, args=(url, ready, results)) for _ in range(RACERS)]
    for process in racers:
        process.start()
    ready.set()
    outcomes = [results.get(timeout=20) for _ in racers]
    for process in racers:
        process.join(10)
    assert outcomes == ["ok"] * RACERS

    sent = [json.loads(entry) for entry in redis_server.client().lrange("sent", 0, -1)]
    replayed = [(text, key) for text, key, _ in sent if text.startswith("msg-")]
    assert replayed == [(f"msg-{i}", key) for i, key in enumerate(keys)]  # once each, in order
    assert len({pid for text, _, pid in sent if text.startswith("msg-")}) == 1  # one drainer
    assert stream_length(url) == 0


def test_a_replay_in_the_same_process_settles_the_handle(redis_server) -> None:
    notify = notifier(redis_server.url)
    force_circuit_state("notify", "forced_open")
    handle = notify("hello")
    assert isinstance(handle, Deferred)
    assert stream_length(redis_server.url) == 1
    assert buttress.health()["deferred"] == {"notify": 1}
    force_circuit_state("notify", "closed")
    assert handle.result(timeout=5) == "sent hello"
    assert handle.status == "replayed"
    assert stream_length(redis_server.url) == 0
    assert buttress.health()["deferred"] == {}


def test_the_stream_is_bounded(redis_server) -> None:
    notify = notifier(redis_server.url, retry_interval=3600, max_items=2)
    force_circuit_state("notify", "forced_open")
    assert isinstance(notify("a"), Deferred)
    assert isinstance(notify("b"), Deferred)
    with capture_events([events.DeferralDropped]) as seen:
        with pytest.raises(CircuitOpenError):
            notify("c")
    assert seen == [events.DeferralDropped("notify", "full")]
    assert stream_length(redis_server.url) == 2


def test_arguments_that_are_not_json_are_not_deferred(redis_server) -> None:
    notify = notifier(redis_server.url, retry_interval=3600)
    force_circuit_state("notify", "forced_open")
    with capture_events([events.DeferralDropped]) as seen:
        with pytest.raises(CircuitOpenError):
            notify(object())  # type: ignore[arg-type]
    assert seen == [events.DeferralDropped("notify", "unserializable")]


def test_an_unreachable_redis_leaves_the_caller_its_rejection(closed_port) -> None:
    notify = notifier(closed_port, retry_interval=3600)
    force_circuit_state("notify", "forced_open")
    with capture_events([events.DeferralDropped]) as seen:
        started = time.monotonic()
        with pytest.raises(CircuitOpenError):
            notify("x")
    assert time.monotonic() - started < 1
    assert seen == [events.DeferralDropped("notify", "store_error")]


def test_a_policy_call_is_not_kept_in_a_shared_queue(redis_server) -> None:
    # Another process could not know which function Policy.call ran: the caller keeps its
    # rejection (locally, the same call is deferred: see tests/patterns/test_deferral.py).
    policy = with_fallback(
        name="notify", defer=DeferOptions(state_url=redis_server.url, retry_interval=3600)
    ).then(circuit_breaker(name="notify"))
    force_circuit_state("notify", "forced_open")
    with capture_events([events.DeferralDropped]) as seen:
        with pytest.raises(CircuitOpenError):
            policy.call(lambda: "sent")
    assert seen == [events.DeferralDropped("notify", "unserializable")]
    assert stream_length(redis_server.url) == 0
