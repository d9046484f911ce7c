"""Rate limit: a token bucket on the buttress clock, with bounded waiting and reservations."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from buttress import _clock, _context, registry, with_rate_limit, with_timeout
from buttress.events import CallRejected, RateLimitAcquired, ShadowDecision
from buttress.exceptions import RateLimitedError
from buttress.patterns import rate_limit
from buttress.patterns._base import BuildContext
from buttress.patterns.rate_limit import RateLimitOptions, RateLimitStrategy
from buttress.policy import alink, link
from buttress.testing import capture_events


def strategy(service: str = "svc", mode: str = "enforce", **options: Any) -> RateLimitStrategy:
    ctx = BuildContext(service, RateLimitOptions(**options), service, mode, registry.shared)
    built = rate_limit.build(ctx)
    assert isinstance(built, RateLimitStrategy)
    return built


def limited(mode, body=None, *, shadow: bool = False, **options: Any):
    built = strategy(mode="shadow" if shadow else "enforce", **options)
    return mode.chain(built, mode.define(body)), built.limiter


def test_no_rate_means_no_strategy():
    assert rate_limit.build(BuildContext("svc", RateLimitOptions(), "svc")) is None
    off = RateLimitOptions(rate=5, enabled=False)
    assert rate_limit.build(BuildContext("svc", off, "svc")) is None
    assert registry.instances("rate_limit") == {}


def test_burst_defaults_to_the_rate_and_at_least_one(clock):
    assert strategy("fast", rate=5).limiter.burst == 5
    assert strategy("slow", rate=0.5).limiter.burst == 1
    assert strategy("given", rate=5, burst=2).limiter.burst == 2


def test_a_burst_passes_then_calls_are_rejected_with_retry_after(mode, clock):
    fn, _ = limited(mode, rate=2, burst=3)
    with capture_events([RateLimitAcquired, CallRejected]) as seen:
        assert [mode.run(fn) for _ in range(3)] == ["ok"] * 3
        error = mode.outcome(fn)
    assert isinstance(error, RateLimitedError)
    assert (error.service, error.retry_after) == ("svc", 0.5)
    assert "2/s" in str(error)
    assert [e.tokens for e in seen.of(RateLimitAcquired)] == [2.0, 1.0, 0.0]
    assert [e.waited for e in seen.of(RateLimitAcquired)] == [0.0, 0.0, 0.0]
    assert seen.of(CallRejected) == [CallRejected("svc", "rate_limit", "no_tokens", 0.5)]
    assert clock.sleeps == []  # rejected without waiting


def test_tokens_refill_with_the_clock(mode, clock):
    fn, limiter = limited(mode, rate=2, burst=2)
    mode.run(fn)
    mode.run(fn)
    clock.advance(0.2)
    error = mode.outcome(fn)
    assert isinstance(error, RateLimitedError)
    assert error.retry_after == pytest.approx(0.3)
    clock.advance(0.3)
    assert mode.run(fn) == "ok"
    clock.advance(10)  # never more than the burst
    assert limiter.snapshot() == {"service": "svc", "tokens": 2.0, "rate": 2.0, "burst": 2}


def test_a_rejected_call_takes_no_token(mode, clock):
    fn, _ = limited(mode, rate=1, burst=1)
    mode.run(fn)
    for _ in range(3):
        assert isinstance(mode.outcome(fn), RateLimitedError)
    clock.advance(1)
    assert mode.run(fn) == "ok"


def test_a_call_waits_up_to_max_wait_for_a_token(mode, clock):
    fn, _ = limited(mode, rate=4, burst=1, max_wait=1)
    mode.run(fn)
    with capture_events([RateLimitAcquired]) as seen:
        assert mode.run(fn) == "ok"
    assert clock.sleeps == [0.25]
    assert [e.waited for e in seen] == [0.25]


def test_a_wait_longer_than_max_wait_is_rejected_at_once(mode, clock):
    fn, _ = limited(mode, rate=1, burst=1, max_wait=0.5)
    mode.run(fn)
    error = mode.outcome(fn)
    assert isinstance(error, RateLimitedError)
    assert error.retry_after == 1.0
    assert clock.sleeps == []


def test_concurrent_waiters_reserve_tokens_and_never_overshoot_the_rate(clock):
    async def body(args, kwargs):
        return args[0]

    step = alink(strategy(rate=2, burst=1, max_wait=10), body)

    async def scenario() -> list[Any]:
        return await asyncio.gather(*(step((i,), {}) for i in range(5)))

    started = clock.monotonic()
    assert asyncio.run(scenario()) == [0, 1, 2, 3, 4]
    # One token at once, then four more at 2 per second: each waiter waited for its own token.
    assert clock.sleeps == [0.5, 0.5, 0.5, 0.5]
    assert clock.monotonic() - started == 2.0


def test_reservations_queue_behind_each_other(clock):
    limiter = strategy(rate=1, burst=1, max_wait=3.5).limiter
    # All at the same instant: each later caller waits one more token interval.
    assert [limiter.reserve() for _ in range(4)] == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(RateLimitedError) as raised:
        limiter.reserve()
    assert raised.value.retry_after == 4.0


def test_a_waiter_cancelled_before_its_turn_gives_the_token_back(clock):
    built = strategy(rate=1, burst=1, max_wait=10)

    async def body(args, kwargs):
        return "ran"

    step = alink(built, body)

    async def scenario() -> None:
        assert await step((), {}) == "ran"  # the bucket is empty now
        waiter = asyncio.create_task(step((), {}))
        await asyncio.sleep(0)  # it reserved the next token and is waiting for it
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter

    asyncio.run(scenario())
    # The refill during the wait brought the debt back to zero; the refund adds the unused token.
    assert built.limiter.snapshot()["tokens"] == 1.0


class Interrupt(BaseException):
    """Stands in for a KeyboardInterrupt arriving while a thread waits."""


def test_a_thread_interrupted_while_waiting_gives_the_token_back(clock, monkeypatch):
    built = strategy(rate=1, burst=1, max_wait=10)
    step = link(built, lambda a, kw: "ran")
    assert step((), {}) == "ran"

    def interrupted(seconds):
        raise Interrupt

    with monkeypatch.context() as patch:
        patch.setattr(_clock, "sleep", interrupted)
        with pytest.raises(Interrupt):
            step((), {})
    clock.advance(1)
    assert built.limiter.snapshot()["tokens"] == 1.0  # not 0: the reservation was returned


def test_one_bucket_is_shared_per_key_and_reconfigure_keeps_its_tokens(clock):
    first = strategy("api", rate=2, burst=4)
    first.limiter.reserve()
    second = strategy("api", rate=10, burst=2)
    assert second.limiter is first.limiter
    assert first.limiter.snapshot() == {"service": "api", "tokens": 2.0, "rate": 10.0, "burst": 2}


def test_shadow_mode_never_waits_or_rejects_but_says_when_it_would_have(mode, clock):
    fn, limiter = limited(mode, shadow=True, rate=1, burst=1, max_wait=0)
    with capture_events([ShadowDecision, CallRejected]) as seen:
        assert [mode.run(fn) for _ in range(3)] == ["ok"] * 3
    assert seen == [ShadowDecision("svc", "rate_limit", "reject")] * 2
    assert clock.sleeps == []
    assert limiter.snapshot()["tokens"] == 0.0


def test_shadow_mode_counts_a_call_it_would_have_delayed(mode, clock):
    fn, limiter = limited(mode, shadow=True, rate=1, burst=1, max_wait=5)
    with capture_events([ShadowDecision]) as seen:
        assert mode.run(fn) == "ok"
        assert mode.run(fn) == "ok"  # enforcement would have waited 1 s: not a rejection
    assert seen == []
    assert clock.sleeps == []
    clock.advance(1)
    assert limiter.snapshot()["tokens"] == 0.0  # the delayed call holds the next token


def test_with_rate_limit_decorator(mode, clock):
    fn = with_rate_limit(name="quota", rate=1)(mode.define(lambda: "ok"))
    assert mode.run(fn) == "ok"
    error = mode.outcome(fn)
    assert isinstance(error, RateLimitedError)
    assert (error.service, error.retry_after) == ("quota", 1.0)
    assert registry.instances("rate_limit")["quota"].snapshot()["burst"] == 1


# --- waiting within the enclosing deadline --------------------------------------------------------


def test_a_pacing_wait_that_would_end_past_the_deadline_is_refused_at_once(mode, clock):
    # Regression: a max_wait pacing wait slept past the enclosing deadline.
    calls: list[int] = []
    fn, _ = limited(mode, lambda: calls.append(1) or "ok", rate=1, burst=1, max_wait=5)
    assert mode.run(fn) == "ok"
    token = _context.deadline.set(clock.monotonic() + 0.5)
    try:
        with capture_events([CallRejected]) as seen:
            error = mode.outcome(fn)
    finally:
        _context.deadline.reset(token)
    assert isinstance(error, RateLimitedError)
    assert error.retry_after == 1.0
    assert "deadline" in str(error)
    assert seen == [CallRejected("svc", "rate_limit", "deadline", 1.0)]
    assert clock.sleeps == []  # refused without waiting: the token would come too late anyway
    assert calls == [1]
    # Nothing was taken: without a deadline the next call waits for the very next token.
    assert mode.run(fn) == "ok"
    assert clock.sleeps == [1.0]


def test_a_pacing_wait_that_ends_before_the_deadline_waits(mode, clock):
    fn, _ = limited(mode, rate=1, burst=1, max_wait=5)
    assert mode.run(fn) == "ok"
    token = _context.deadline.set(clock.monotonic() + 2)
    try:
        assert mode.run(fn) == "ok"
    finally:
        _context.deadline.reset(token)
    assert clock.sleeps == [1.0]


def test_a_rate_limit_inside_a_timeout_never_paces_past_it(mode, clock):
    calls: list[int] = []
    fn = with_timeout(name="paced", seconds=0.5)(
        with_rate_limit(name="paced", rate=1, max_wait=5)(
            mode.define(lambda: calls.append(1) or "ok")
        )
    )
    assert mode.run(fn) == "ok"
    error = mode.outcome(fn)
    assert isinstance(error, RateLimitedError)  # refused at once, not a timeout 0.5 s later
    assert clock.sleeps == []
    assert calls == [1]
