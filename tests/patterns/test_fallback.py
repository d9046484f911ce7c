"""Fallback: every behaviour on ``def`` and ``async def`` (the ``mode`` fixture)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

import buttress
from buttress import events
from buttress.exceptions import (
    BulkheadFullError,
    CircuitOpenError,
    ConfigurationError,
    TimeoutExceededError,
)
from buttress.patterns import fallback
from buttress.patterns._base import BuildContext
from buttress.patterns.fallback import FallbackOptions, FallbackStrategy
from buttress.policy import alink, link
from buttress.testing import FakeClock, capture_events


def strategy(run_mode: str = "enforce", **options: Any) -> FallbackStrategy:
    ctx = BuildContext("svc", FallbackOptions(**options), "svc", run_mode)  # type: ignore[arg-type]
    built = fallback.build(ctx)
    assert built is not None
    return built


def protect(mode, body: Any, **options: Any) -> Any:
    return mode.chain(strategy(**options), mode.define(body))


class Flaky:
    """Returns ``f"fresh {args}"`` while ``failure`` is None, else raises it; counts calls."""

    def __init__(self) -> None:
        self.failure: BaseException | None = None
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> str:
        self.calls += 1
        if self.failure is not None:
            raise self.failure
        return f"fresh {args} {sorted(kwargs.items())}"


def raising(error: Exception) -> Any:
    def body(*args: Any, **kwargs: Any) -> Any:
        raise error

    return body


def notes(exc: BaseException) -> list[str]:
    return list(getattr(exc, "__notes__", []))


def httpx_status(status: int) -> httpx.HTTPStatusError:
    request = httpx.Request("GET", "http://127.0.0.1/resource")
    response = httpx.Response(status, request=request)
    return httpx.HTTPStatusError(f"HTTP {status}", request=request, response=response)


# -- value, handler, chain -------------------------------------------------------------------------


def test_success_passes_through_untouched(mode) -> None:
    with capture_events() as seen:
        assert mode.run(protect(mode, None, value="stale")) == "ok"
    assert seen == []


def test_value_replaces_a_failure(mode) -> None:
    with capture_events() as seen:
        assert mode.run(protect(mode, raising(ConnectionError("down")), value="stale")) == "stale"
    assert seen == [events.FallbackUsed("svc", "value", "ConnectionError")]


def test_none_is_a_fallback_value(mode) -> None:
    assert mode.run(protect(mode, raising(TimeoutError()), value=None)) is None


def test_handler_gets_the_exception_and_the_arguments(mode) -> None:
    down = ConnectionError("down")
    received: list[Any] = []

    def handler(exc: BaseException, *args: Any, **kwargs: Any) -> str:
        received.append((exc, args, kwargs))
        return "from handler"

    with capture_events() as seen:
        result = mode.run(protect(mode, raising(down), handler=handler), "alice", doc=7)
    assert result == "from handler"
    assert received == [(down, ("alice",), {"doc": 7})]
    assert seen == [events.FallbackUsed("svc", "callable", "ConnectionError")]


def test_async_handler_is_awaited_for_an_async_function() -> None:
    async def handler(exc: BaseException, user: str) -> str:
        await asyncio.sleep(0)
        return f"cached answer for {user}"

    async def down(user: str) -> str:
        raise ConnectionError("down")

    protected_step = alink(strategy(handler=handler), lambda args, kwargs: down(*args, **kwargs))
    assert asyncio.run(protected_step(("bob",), {})) == "cached answer for bob"


def test_async_handler_for_a_sync_function_is_refused() -> None:
    async def handler(exc: BaseException) -> str:
        return "never"

    with pytest.raises(TypeError, match=r"handler .*handler is async but the protected function"):
        link(strategy(handler=handler), lambda args, kwargs: "ok")


def test_chain_tries_each_alternative_in_order(mode) -> None:
    tried: list[str] = []

    def replica(exc: BaseException) -> str:
        tried.append("replica")
        raise ConnectionError("replica down too")

    def cache(exc: BaseException) -> str:
        tried.append("cache")
        return "from cache"

    def default(exc: BaseException) -> str:
        tried.append("default")
        return "default"

    with capture_events() as seen:
        result = mode.run(protect(mode, raising(TimeoutError()), chain=(replica, cache, default)))
    assert result == "from cache"
    assert tried == ["replica", "cache"]
    assert seen == [events.FallbackUsed("svc", "chain", "TimeoutError")]


def test_handler_comes_before_chain_and_value_comes_last(mode) -> None:
    def handler(exc: BaseException) -> str:
        raise ValueError("handler bug")

    def second(exc: BaseException) -> str:
        raise KeyError("nothing")

    with capture_events() as seen:
        result = mode.run(
            protect(mode, raising(ConnectionError()), handler=handler, chain=(second,), value="v")
        )
    assert result == "v"
    assert seen == [events.FallbackUsed("svc", "value", "ConnectionError")]


def test_when_every_alternative_fails_the_original_exception_propagates(mode) -> None:
    down = ConnectionError("down")

    def primary_replica(exc: BaseException) -> str:
        raise TimeoutError("replica slow")

    def secondary_replica(exc: BaseException) -> str:
        raise KeyError("no data")

    with capture_events() as seen:
        exc = mode.outcome(
            protect(mode, raising(down), handler=primary_replica, chain=(secondary_replica,))
        )
    assert exc is down
    assert notes(exc) == [
        "buttress fallback (svc): every alternative failed: "
        "test_when_every_alternative_fails_the_original_exception_propagates.<locals>"
        ".primary_replica raised TimeoutError; "
        "test_when_every_alternative_fails_the_original_exception_propagates.<locals>"
        ".secondary_replica raised KeyError"
    ]
    assert seen == [events.FallbackFailed("svc", "ConnectionError")]


# -- which failures --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        ConnectionError("down"),
        TimeoutError("slow"),
        TimeoutExceededError("slow", service="svc", seconds=1.0),
        CircuitOpenError("open", service="svc", retry_after=3.0),
        BulkheadFullError("full", service="svc"),
        httpx_status(503),
        httpx_status(429),
        httpx.ConnectError("refused"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_default_on_covers_buttress_and_transient_errors(mode, error: Exception) -> None:
    assert mode.run(protect(mode, raising(error), value="stale")) == "stale"


@pytest.mark.parametrize(
    "error",
    [
        ValueError("bug"),
        TypeError("bug"),
        KeyError("k"),
        httpx_status(404),
        httpx_status(400),
        ConfigurationError("bad setting"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_default_on_never_covers_bugs_or_client_errors(mode, error: Exception) -> None:
    with capture_events() as seen:
        assert mode.outcome(protect(mode, raising(error), value="stale")) is error
    assert notes(error) == []
    assert seen == []


def test_on_exception_types(mode) -> None:
    protected = protect(mode, raising(KeyError("k")), value="default", on=(LookupError,))
    assert mode.run(protected) == "default"
    down = ConnectionError("down")
    assert mode.outcome(protect(mode, raising(down), value="x", on=(LookupError,))) is down


def test_on_a_lone_exception_class_is_that_type_not_a_predicate(mode) -> None:
    down = ConnectionError("down")
    assert mode.outcome(protect(mode, raising(down), value="x", on=KeyError)) is down
    assert mode.run(protect(mode, raising(KeyError("k")), value="x", on=KeyError)) == "x"


def test_on_a_predicate(mode) -> None:
    def is_quota(exc: BaseException) -> bool:
        return "quota" in str(exc)

    protected = protect(mode, raising(RuntimeError("quota exceeded")), value="later", on=is_quota)
    assert mode.run(protected) == "later"
    other = RuntimeError("other")
    assert mode.outcome(protect(mode, raising(other), value="later", on=is_quota)) is other


@pytest.mark.parametrize(
    "error",
    [asyncio.CancelledError(), KeyboardInterrupt(), SystemExit(2), GeneratorExit()],
    ids=lambda e: type(e).__name__,
)
def test_cancellation_and_exits_are_never_caught(mode, error: BaseException) -> None:
    def body() -> None:
        raise error

    with capture_events() as seen, pytest.raises(type(error)) as raised:
        mode.run(protect(mode, body, value="never", on=lambda exc: True))
    assert raised.value is error
    assert seen == []


# -- cache -----------------------------------------------------------------------------------------


def test_cache_serves_the_last_good_result_for_the_same_arguments(mode, clock: FakeClock) -> None:
    flaky = Flaky()
    protected = protect(mode, flaky, cache_ttl=60, value="default")
    assert mode.run(protected, "a", page=1) == "fresh ('a',) [('page', 1)]"
    flaky.failure = ConnectionError("down")
    clock.advance(59)
    with capture_events() as seen:
        assert mode.run(protected, "a", page=1) == "fresh ('a',) [('page', 1)]"
        # Other arguments have no cached result: the next alternative answers.
        assert mode.run(protected, "b", page=1) == "default"
    assert seen == [
        events.FallbackUsed("svc", "cache", "ConnectionError"),
        events.FallbackUsed("svc", "value", "ConnectionError"),
    ]


def test_cache_entries_expire_after_cache_ttl(mode, clock: FakeClock) -> None:
    flaky = Flaky()
    protected = protect(mode, flaky, cache_ttl=10, value="default")
    mode.run(protected, "a")
    flaky.failure = ConnectionError("down")
    clock.advance(10.5)
    assert mode.run(protected, "a") == "default"


def test_cache_keeps_the_newest_good_result(mode, clock: FakeClock) -> None:
    answers = iter(["first", "second"])
    down = ConnectionError("down")
    state = {"fail": False}

    def body(key: str) -> str:
        if state["fail"]:
            raise down
        return next(answers)

    protected = protect(mode, body, cache_ttl=60)
    assert mode.run(protected, "k") == "first"
    clock.advance(30)
    assert mode.run(protected, "k") == "second"
    state["fail"] = True
    clock.advance(45)  # 75 s after the first answer, 45 s after the second
    assert mode.run(protected, "k") == "second"


def test_keyword_order_does_not_matter_for_the_cache(mode, clock: FakeClock) -> None:
    flaky = Flaky()
    protected = protect(mode, flaky, cache_ttl=60)
    fresh = mode.run(protected, x=1, y=2)
    flaky.failure = ConnectionError("down")
    assert mode.run(protected, y=2, x=1) == fresh


def test_unhashable_arguments_skip_the_cache(mode, clock: FakeClock) -> None:
    flaky = Flaky()
    protected = protect(mode, flaky, cache_ttl=60, value="default")
    assert mode.run(protected, ["a", "list"]) == "fresh (['a', 'list'],) []"
    flaky.failure = ConnectionError("down")
    assert mode.run(protected, ["a", "list"]) == "default"


def test_cache_comes_before_the_handler(mode, clock: FakeClock) -> None:
    flaky = Flaky()
    protected = protect(mode, flaky, cache_ttl=60, handler=lambda exc, *a: "handler")
    fresh = mode.run(protected, 1)
    flaky.failure = ConnectionError("down")
    assert mode.run(protected, 1) == fresh
    assert mode.run(protected, 2) == "handler"


def test_cache_is_bounded(mode, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fallback, "CACHE_SIZE", 2)
    flaky = Flaky()
    built = strategy(cache_ttl=60, value="default")
    protected = mode.chain(built, mode.define(flaky))
    for key in ("a", "b", "a", "c"):  # "a" is stored again after "b", so "b" is the oldest
        mode.run(protected, key)
    assert len(built._cache) == 2
    flaky.failure = ConnectionError("down")
    assert mode.run(protected, "a") == "fresh ('a',) []"
    assert mode.run(protected, "c") == "fresh ('c',) []"
    assert mode.run(protected, "b") == "default"


def test_cache_alone_with_nothing_cached_lets_the_failure_through(mode, clock: FakeClock) -> None:
    down = ConnectionError("down")
    with capture_events() as seen:
        assert mode.outcome(protect(mode, raising(down), cache_ttl=30), "x") is down
    assert notes(down) == ["buttress fallback (svc): no cached result to fall back to"]
    assert seen == [events.FallbackFailed("svc", "ConnectionError")]


# -- shadow mode, build ----------------------------------------------------------------------------


# Raised again and again, like an exception a module keeps as a constant.
REUSED = ConnectionError("reused")


def test_a_reused_exception_keeps_one_fallback_note(mode, clock: FakeClock) -> None:
    REUSED.__notes__ = ["the caller's own note"]
    protected = protect(mode, raising(REUSED), handler=raising(KeyError("no replica")))
    for _ in range(1000):
        assert mode.outcome(protected) is REUSED
    assert notes(REUSED) == [
        "the caller's own note",
        "buttress fallback (svc): every alternative failed: raising.<locals>.body raised KeyError",
    ]


def test_shadow_mode_reports_the_fallback_it_would_have_used(mode) -> None:
    down = ConnectionError("down")
    called: list[BaseException] = []
    protected = protect(mode, raising(down), run_mode="shadow", handler=called.append)
    with capture_events() as seen:
        assert mode.outcome(protected) is down
    assert called == []
    assert seen == [events.ShadowDecision("svc", "fallback", "fallback")]
    with capture_events() as seen:
        bug = ValueError("bug")
        assert mode.outcome(protect(mode, raising(bug), run_mode="shadow", value=1)) is bug
    assert seen == []


def test_nothing_to_fall_back_to_builds_nothing() -> None:
    assert fallback.build(BuildContext("svc", FallbackOptions(), "svc")) is None
    disabled = FallbackOptions(enabled=False, value="x")
    assert fallback.build(BuildContext("svc", disabled, "svc")) is None


# -- through the public decorators -----------------------------------------------------------------


def test_with_fallback_decorator(mode) -> None:
    decorated = buttress.with_fallback("stale", name="catalog")(
        mode.define(raising(TimeoutError()))
    )
    with capture_events([events.FallbackUsed]) as seen:
        assert mode.run(decorated) == "stale"
    assert seen == [events.FallbackUsed("catalog", "value", "TimeoutError")]


def test_fallback_outside_retry_answers_after_the_retries_ran_out(mode, clock: FakeClock) -> None:
    calls: list[int] = []

    def body() -> str:
        calls.append(buttress.attempt())
        raise ConnectionError("down")

    def handler(exc: BaseException) -> str:
        return f"fallback after: {notes(exc)[0]}"

    decorated = buttress.with_fallback(name="catalog", handler=handler)(
        buttress.retry_with_backoff("catalog", max_attempts=3, jitter="none", initial=0.1)(
            mode.define(body)
        )
    )
    with capture_events([events.RetryExhausted, events.FallbackUsed]) as seen:
        assert mode.run(decorated) == (
            "fallback after: buttress retry (catalog): gave up after 3 attempts (max_attempts): "
            "#1 ConnectionError, backoff 0.1s; #2 ConnectionError, backoff 0.2s; #3 ConnectionError"
        )
    assert calls == [1, 2, 3]
    assert clock.sleeps == [0.1, 0.2]
    assert [type(e).__name__ for e in seen] == ["RetryExhausted", "FallbackUsed"]
