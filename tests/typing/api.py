"""Checked by mypy --strict (``make typecheck``): decorated functions keep their types."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, assert_type

from buttress import (
    DeferOptions,
    Policy,
    circuit_breaker,
    resilient,
    retry_with_backoff,
    with_adaptive_throttle,
    with_bulkhead,
    with_cache,
    with_coalescing,
    with_fallback,
    with_hedging,
    with_rate_limit,
    with_timeout,
)


@circuit_breaker(name="openfga", fail_max=5, timeout=60)
@retry_with_backoff(max_attempts=3, exponential_base=2)
@with_timeout(seconds=5)
@with_bulkhead(limit=50)
async def check_permission(user: str, resource: str) -> bool:
    return user == resource


@resilient("db", preset="database")
@with_rate_limit(rate=5)
@with_fallback([], name="db")
def list_rows(table: str, *, limit: int = 10) -> list[str]:
    return [table] * limit


@retry_with_backoff("catalog", budget={"ratio": 0.1})
@with_hedging("catalog", delay="p95", idempotent=True)
@with_adaptive_throttle("catalog", k=2.0)
@with_bulkhead("catalog", adaptive="gradient2", min_limit=5, max_limit=100)
async def product(sku: str, *, fresh: bool = False) -> dict[str, str]:
    return {"sku": sku}


product_shape: Callable[[str], Coroutine[Any, Any, dict[str, str]]] = product


@with_cache(name="llm", ttl=300, stale_ttl=3600, key=lambda prompt, **_: prompt)
@with_coalescing(name="llm")
async def complete(prompt: str, *, temperature: float = 0.0) -> str:
    return prompt


@with_fallback(name="telegram", defer=DeferOptions(max_items=100))
def send_message(chat_id: int, text: str) -> str:
    return text


assert_type(send_message(1, "hi"), str)


async def ask() -> str:
    answer = await complete("hi", temperature=0.5)
    assert_type(answer, str)
    return answer


# The parameter names survive too, so the decorated function is still assignable to its shape.
as_callable: Callable[[str, str], Coroutine[Any, Any, bool]] = check_permission
assert_type(list_rows("t", limit=2), list[str])


async def use() -> bool:
    allowed = await check_permission("alice", "doc")
    assert_type(allowed, bool)
    return allowed


def policy_calls(policy: Policy) -> None:
    assert_type(policy.call(list_rows, "t"), list[str])


async def policy_acalls(policy: Policy) -> bool:
    result = await policy.acall(check_permission, "a", "b")
    assert_type(result, bool)
    return result


_: Callable[..., Awaitable[bool]] = check_permission


class Client:
    # Above @staticmethod / @classmethod: still a static or class method for the type checker.
    @circuit_breaker(name="client")
    @staticmethod
    def ping(host: str) -> bool:
        return bool(host)

    @retry_with_backoff(max_attempts=2)
    @classmethod
    async def create(cls, url: str) -> Client:
        return cls()


async def use_client() -> None:
    assert_type(Client().ping("h"), bool)
    assert_type(Client.ping("h"), bool)
    assert_type(await Client.create("u"), Client)
