"""``with_rate_limit(..., state_url=...)``: one rate for the fleet, on a real redis-server.

A limiter of its own (``pod``) stands for another process of the fleet, meeting this one only in
Redis. Every behaviour runs on ``def`` and ``async def`` (the ``mode`` fixture); the local side
runs on the fake clock (Redis keeps its own time, which the script reads). The four-process
fleet against a counting upstream is the last test.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Iterator
from typing import Any

import pytest

from buttress import config, events, registry, with_rate_limit, with_timeout
from buttress.exceptions import ConfigurationError, RateLimitedError
from buttress.patterns.rate_limit import RateLimiter, RateLimitOptions, RateLimitStrategy
from buttress.testing import capture_events

pytestmark = pytest.mark.redis

SERVICE = "quota"
FORK = multiprocessing.get_context("fork")


PODS: list[RateLimiter] = []


@pytest.fixture(autouse=True)
def _close_fleet_transports(
    request: pytest.FixtureRequest, _fresh_registry: None
) -> Iterator[None]:
    """Close the connections of the limiters the test built (asyncio: on the mode's loop)."""
    mode = request.getfixturevalue("mode") if "mode" in request.fixturenames else None
    yield
    for limiter in [*registry.instances("rate_limit").values(), *PODS]:
        if limiter.fleet is not None:
            if mode is not None and mode.is_async:
                mode.run(limiter.fleet.transport.aclose)
            limiter.fleet.transport.close()
    PODS.clear()
    config.reload_settings()


def pod(mode: Any, url: str, **options: Any) -> tuple[RateLimiter, Any]:
    """Another process's limiter of the same service, and a call through it."""
    limiter = RateLimiter(SERVICE, RateLimitOptions(state_url=url, **options))
    PODS.append(limiter)
    return limiter, mode.chain(RateLimitStrategy(limiter), mode.define())


def test_the_fleet_shares_one_burst(mode: Any, redis_server: Any, clock: Any) -> None:
    call = with_rate_limit(SERVICE, rate=0.01, burst=3, state_url=redis_server.url)(mode.define())
    _, other = pod(mode, redis_server.url, rate=0.01, burst=3)
    assert [mode.run(call), mode.run(other), mode.run(call)] == ["ok"] * 3
    refused = mode.outcome(other)
    assert isinstance(refused, RateLimitedError)
    assert 90 < refused.retry_after <= 100  # the next token, on Redis's clock
    assert isinstance(mode.outcome(call), RateLimitedError)
    snap = registry.instances("rate_limit")[SERVICE].snapshot()
    assert snap["shared"] == "redis"
    assert snap["rate"] == 0.01
    assert snap["burst"] == 3
    assert snap["tokens"] == 0


def test_max_wait_paces_locally_on_a_token_reserved_in_redis(
    mode: Any, redis_server: Any, clock: Any
) -> None:
    call = with_rate_limit(SERVICE, rate=5, burst=1, max_wait=1.0, state_url=redis_server.url)(
        mode.define()
    )
    assert mode.run(call) == "ok"
    start = clock.monotonic()
    with capture_events([events.RateLimitAcquired]) as got:
        assert mode.run(call) == "ok"
    waited = clock.monotonic() - start
    assert 0.1 < waited <= 0.2  # the reserved token's wait, slept by the driver
    assert [e.waited for e in got] == [pytest.approx(waited)]
    # A wait longer than max_wait is refused without taking anything.
    _, other = pod(mode, redis_server.url, rate=5, burst=1, max_wait=0.0)
    assert isinstance(mode.outcome(other), RateLimitedError)


def test_a_token_after_the_deadline_is_refused_at_once(
    mode: Any, redis_server: Any, clock: Any
) -> None:
    limited = with_rate_limit(SERVICE, rate=1, burst=1, max_wait=5.0, state_url=redis_server.url)
    call = with_timeout(seconds=0.5)(limited(mode.define()))
    assert mode.run(call) == "ok"
    start = clock.monotonic()
    with capture_events([events.CallRejected]) as got:
        refused = mode.outcome(call)
    assert isinstance(refused, RateLimitedError)
    assert clock.monotonic() == start
    assert [e.reason for e in got] == ["deadline"]


def test_redis_unreachable_falls_back_to_the_pods_fair_share(
    mode: Any, closed_port: str, clock: Any
) -> None:
    call = with_rate_limit(SERVICE, rate=8, burst=4, expected_pods=2, state_url=closed_port)(
        mode.define()
    )
    with capture_events([events.StateStoreError]) as faults:
        results = [mode.outcome(call) for _ in range(3)]
    assert results[:2] == ["ok", "ok"]  # the share of the burst: 4 / 2
    assert isinstance(results[2], RateLimitedError)
    assert [(e.operation, e.error_type) for e in faults] == [
        ("rate_limit", "ConnectionError")
    ]  # one fault; the later calls do not ask Redis until the retry interval passed
    snap = registry.instances("rate_limit")[SERVICE].snapshot()
    assert snap["shared"] == "local"
    assert snap["pods"] == 2
    clock.advance(0.25)  # the share refills at 8 / 2 per second
    assert mode.run(call) == "ok"


def test_redis_is_asked_again_after_the_retry_interval(
    mode: Any, redis_server: Any, clock: Any
) -> None:
    call = with_rate_limit(SERVICE, rate=0.01, burst=2, state_url=redis_server.url)(mode.define())
    redis_server.kill()
    with capture_events([events.StateStoreError]) as faults:
        assert mode.run(call) == "ok"  # the local share (1 pod: the whole burst)
    assert len(faults) == 1
    redis_server.restart()
    clock.advance(0.6)
    _, other = pod(mode, redis_server.url, rate=0.01, burst=2)
    assert mode.run(other) == "ok"
    assert mode.run(call) == "ok"  # back on Redis: the fleet's second token
    assert isinstance(mode.outcome(other), RateLimitedError)
    assert registry.instances("rate_limit")[SERVICE].snapshot()["shared"] == "redis"


def test_pods_are_counted_by_their_heartbeats(mode: Any, redis_server: Any, clock: Any) -> None:
    first, call_first = pod(mode, redis_server.url, rate=100, burst=100)
    second, call_second = pod(mode, redis_server.url, rate=100, burst=100)
    mode.run(call_first)
    mode.run(call_second)
    assert second.snapshot()["pods"] == 2  # the second pod's beat counted both
    clock.advance(1.0)  # the first pod beats again
    mode.run(call_first)
    assert first.snapshot()["pods"] == 2
    redis_server.kill()
    mode.outcome(call_first)
    assert first.rate == 50  # its fair share while Redis is unreachable
    assert first.burst == 50


def test_shadow_mode_reports_a_fleet_refusal_and_lets_the_call_run(
    mode: Any, redis_server: Any, clock: Any
) -> None:
    limiter, _ = pod(mode, redis_server.url, rate=0.01, burst=1)
    call = mode.chain(RateLimitStrategy(limiter, "shadow"), mode.define())
    with capture_events([events.ShadowDecision]) as got:
        assert [mode.run(call), mode.run(call)] == ["ok", "ok"]
    assert [e.action for e in got] == ["reject"]


def test_the_fleet_settings_are_checked_when_settings_load() -> None:
    secret = "hunter2-typed-in-the-wrong-place"
    with pytest.raises(ConfigurationError) as info:
        config.load_settings(env={"BUTTRESS_SERVICES__PAY__RATE_LIMIT__STATE_URL": secret})
    message = str(info.value)
    assert "services.pay.rate_limit.state_url" in message
    assert "must be a redis://, rediss:// or unix:// URL" in message
    assert secret not in message
    with pytest.raises(ConfigurationError, match=r"services\.pay\.rate_limit\.expected_pods"):
        config.load_settings(env={"BUTTRESS_SERVICES__PAY__RATE_LIMIT__EXPECTED_PODS": "0"})
    with pytest.raises(ConfigurationError, match="state_url: must be a redis://"):
        with_rate_limit("pay", rate=1, state_url="http://example")  # at decoration time


# --- the fleet ------------------------------------------------------------------------------------

RATE, BURST, SECONDS = 20.0, 5, 1.0


def _worker(url: str, allowed: Any, is_async: bool, start_at: float) -> None:
    def upstream() -> None:
        with allowed.get_lock():
            allowed.value += 1

    async def aupstream() -> None:
        upstream()

    # The fair share a worker would take if a loaded machine made a Redis reply late.
    policy = with_rate_limit(SERVICE, rate=RATE, burst=BURST, state_url=url, expected_pods=4)
    while time.time() < start_at:
        time.sleep(0.001)
    end = start_at + SECONDS
    if is_async:
        acall = policy(aupstream)

        async def main() -> None:
            while time.time() < end:
                try:
                    await acall()
                except RateLimitedError:
                    await asyncio.sleep(0.002)

        asyncio.run(main())
    else:
        call = policy(upstream)
        while time.time() < end:
            try:
                call()
            except RateLimitedError:
                time.sleep(0.002)


@pytest.mark.realtime
def test_four_processes_see_at_most_rate_times_t_plus_burst(redis_server: Any) -> None:
    allowed = FORK.Value("i", 0)
    start_at = time.time() + 0.3
    workers = [
        FORK.Process(target=_worker, args=(redis_server.url, allowed, i % 2 == 1, start_at))
        for i in range(4)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(5)
        assert worker.exitcode == 0
    # Redis's clock decides: over the run the fleet got at most rate x t + burst, and, since
    # four processes kept asking, close to it.
    assert RATE * SECONDS * 0.5 <= allowed.value <= RATE * SECONDS + BURST
