"""Health of a circuit kept in Redis: what this process last saw, read without a request.

The decorated function is this process; a storage of its own (the ``peers`` fixture) stands for
another process of the fleet. Every behaviour runs on ``def`` and on ``async def``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import buttress
from buttress import circuit_breaker, events, registry
from buttress.exceptions import CircuitOpenError
from buttress.patterns.circuit_breaker.redis_storage import Limits, SharedStateStorage
from buttress.registry import breaker
from buttress.testing import capture_events

pytestmark = pytest.mark.redis

SERVICE = "svc"
LIMITS = Limits(fail_max=3, reset_timeout=30.0, success_threshold=1, half_open_max_calls=1)


@pytest.fixture(autouse=True)
def _close_breaker_storages(mode: Any) -> Iterator[None]:
    """Close the connections of the breakers the test built (asyncio: on the mode's loop)."""
    yield
    for built in registry.instances("circuit_breaker").values():
        storage = built.storage
        if isinstance(storage, SharedStateStorage):
            if mode.is_async:
                mode.run(storage.aclose)
            storage.close()


def test_a_shared_circuit_past_its_open_time_reads_ready_to_probe_without_asking_redis(
    mode: Any, redis_server: Any, peers: Any, clock: Any
) -> None:
    call = circuit_breaker(
        name=SERVICE,
        state_url=redis_server.url,
        fail_max=LIMITS.fail_max,
        timeout=LIMITS.reset_timeout,
        half_open_max_calls=LIMITS.half_open_max_calls,
        near_cache_ttl=0,  # the next call learns the trip (not a message, some time later)
    )(mode.define(lambda: "ok"))
    assert mode.run(call) == "ok"
    peers(SERVICE).force("open", LIMITS)  # another process of the fleet tripped it
    assert isinstance(mode.outcome(call), CircuitOpenError)  # this process learns it
    circuit = buttress.health()["circuits"][SERVICE]
    assert circuit["state"] == "open"
    assert 29 < circuit["seconds_left_open"] <= 30  # from when the fleet's circuit opened
    commands = redis_server.counter()
    clock.advance(30)
    with capture_events([events.CircuitStateChanged, events.CircuitTrialStarted]) as seen:
        snapshot = buttress.health()
    assert snapshot["circuits"][SERVICE]["state"] == "half_open"
    assert (snapshot["status"], snapshot["degradation_level"]) == ("degraded", 1)
    assert breaker(SERVICE).state_label == "half_open"
    assert seen == []
    assert commands() == {}  # health asked Redis nothing
    client = redis_server.client()
    assert client.hget(f"buttress:{{{SERVICE}}}:circuit", "state") == "open"  # not moved
    assert client.zcard(f"buttress:{{{SERVICE}}}:trials") == 0  # and no trial lease taken


def test_an_admin_override_with_a_ttl_reaches_the_whole_fleet(
    mode: Any, redis_server: Any, peers: Any
) -> None:
    from buttress.health_app import _Handler

    call = circuit_breaker(name=SERVICE, state_url=redis_server.url, fail_max=LIMITS.fail_max)(
        mode.define(lambda: "ok")
    )
    assert mode.run(call) == "ok"
    token = "an-admin-token-long-enough"
    response = _Handler(token)(
        "POST", f"/circuits/{SERVICE}/force_open", f"Bearer {token}", "ttl=60"
    )
    assert response is not None
    assert response[0] == 200
    decision = peers(SERVICE).admit(LIMITS)  # another process, asking Redis
    assert (decision.admitted, decision.override) == (False, "forced_open")
    assert 59 < decision.override_left <= 60
    assert isinstance(mode.outcome(call), CircuitOpenError)
    assert buttress.health()["circuits"][SERVICE]["state"] == "forced_open"
