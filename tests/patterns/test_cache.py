"""Cache: read-through answers, stale answers on failure, keys; on ``def`` and ``async def``."""

from __future__ import annotations

from typing import Any

import pytest

import buttress
from buttress import (
    ConfigurationError,
    circuit_breaker,
    config,
    events,
    with_cache,
)
from buttress.events import CallFinished
from buttress.testing import FakeClock, capture_events


class Source:
    """Answers ``f"{n}:{args}"`` (n: its call count) while ``failure`` is None, else raises it."""

    def __init__(self) -> None:
        self.calls = 0
        self.failure: Exception | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> str:
        self.calls += 1
        if self.failure is not None:
            raise self.failure
        return f"{self.calls}:{args}:{sorted(kwargs.items())}"


def cached(mode, source: Source, **options: Any) -> Any:
    return with_cache(name="llm", **options)(mode.define(source))


def test_a_fresh_hit_answers_without_calling(mode, clock: FakeClock) -> None:
    source = Source()
    ask = cached(mode, source, ttl=10)
    with capture_events([events.CacheLookup, CallFinished]) as seen:
        first = mode.run(ask, "q")
        clock.advance(9.9)
        assert mode.run(ask, "q") == first
    assert source.calls == 1
    assert [(type(e).__name__, e[1]) for e in seen] == [
        ("CacheLookup", "miss"),
        ("CallFinished", "success"),
        ("CacheLookup", "hit"),
        ("CallFinished", "cached"),
    ]


def test_an_entry_past_its_ttl_is_not_served_to_a_healthy_call(mode, clock: FakeClock) -> None:
    source = Source()
    ask = cached(mode, source, ttl=10, stale_ttl=100)
    mode.run(ask, "q")
    clock.advance(10.5)
    assert mode.run(ask, "q").startswith("2:")
    assert source.calls == 2


def test_a_failed_call_gets_a_stale_entry_within_stale_ttl(mode, clock: FakeClock) -> None:
    source = Source()
    ask = cached(mode, source, ttl=10, stale_ttl=60)
    answer = mode.run(ask, "q")
    clock.advance(30)
    source.failure = ConnectionError("down")
    with capture_events([events.CacheServedStale, CallFinished]) as seen:
        assert mode.run(ask, "q") == answer
    assert seen == [
        events.CacheServedStale("llm", "ConnectionError"),
        CallFinished("llm", "cached", 0.0, None),
    ]
    assert source.calls == 2  # it did try: a stale entry only answers a failure


def test_stale_entries_are_bounded_by_stale_ttl(mode, clock: FakeClock) -> None:
    source = Source()
    ask = cached(mode, source, ttl=10, stale_ttl=60)
    mode.run(ask, "q")
    clock.advance(70.5)
    source.failure = ConnectionError("down")
    assert isinstance(mode.outcome(ask, "q"), ConnectionError)


def test_without_stale_ttl_nothing_stale_is_served(mode, clock: FakeClock) -> None:
    source = Source()
    ask = cached(mode, source, ttl=10)
    mode.run(ask, "q")
    clock.advance(11)
    source.failure = ConnectionError("down")
    assert isinstance(mode.outcome(ask, "q"), ConnectionError)


def test_a_bug_is_not_answered_with_a_stale_entry(mode, clock: FakeClock) -> None:
    source = Source()
    ask = cached(mode, source, ttl=10, stale_ttl=60)
    mode.run(ask, "q")
    clock.advance(11)
    source.failure = ValueError("bug")
    assert isinstance(mode.outcome(ask, "q"), ValueError)


def test_a_rejected_call_gets_a_stale_entry(mode, clock: FakeClock) -> None:
    source = Source()
    ask = with_cache(name="llm", ttl=1, stale_ttl=300)(
        circuit_breaker(name="llm", fail_max=1, timeout=60)(mode.define(source))
    )
    answer = mode.run(ask, "q")
    clock.advance(2)
    source.failure = ConnectionError("down")
    assert mode.run(ask, "q") == answer  # trips the circuit, answered stale
    source.failure = None
    with capture_events([events.CacheServedStale]) as seen:
        assert mode.run(ask, "q") == answer  # rejected: the circuit is open
    assert seen == [events.CacheServedStale("llm", "CircuitOpenError")]
    assert source.calls == 2
    assert buttress.health()["status"] == "degraded"


def test_errors_are_never_cached(mode, clock: FakeClock) -> None:
    source = Source()
    ask = cached(mode, source, ttl=10, stale_ttl=60)
    source.failure = ConnectionError("down")
    assert isinstance(mode.outcome(ask, "q"), ConnectionError)
    source.failure = None
    assert mode.run(ask, "q").startswith("2:")
    # A failure does not replace the good entry either.
    clock.advance(11)
    source.failure = ConnectionError("down")
    assert mode.run(ask, "q").startswith("2:")


def test_a_fresh_hit_is_not_degraded_service(mode, clock: FakeClock) -> None:
    ask = cached(mode, Source(), ttl=10)
    mode.run(ask, "q")
    mode.run(ask, "q")
    assert buttress.health()["status"] == "healthy"


# -- keys --------------------------------------------------------------------------------------


def test_the_default_key_is_the_arguments(mode, clock: FakeClock) -> None:
    source = Source()
    ask = cached(mode, source, ttl=10)
    mode.run(ask, "a", model="x", temperature=0)
    mode.run(ask, "a", temperature=0, model="x")  # keyword order does not matter
    assert source.calls == 1
    mode.run(ask, "b", model="x", temperature=0)
    mode.run(ask, 1)
    mode.run(ask, True)  # equal to 1, but not the same argument
    mode.run(ask, 1.0)
    assert source.calls == 5


def test_lists_and_dicts_are_part_of_the_default_key(mode, clock: FakeClock) -> None:
    source = Source()
    ask = cached(mode, source, ttl=10)
    messages = [{"role": "user", "content": "hi"}]
    mode.run(ask, messages, stop={"\n"})
    mode.run(ask, [{"content": "hi", "role": "user"}], stop={"\n"})
    assert source.calls == 1
    mode.run(ask, [{"role": "user", "content": "hello"}], stop={"\n"})
    mode.run(ask, ({"role": "user", "content": "hi"},), stop={"\n"})  # a tuple is not a list
    assert source.calls == 3


def test_a_dicts_keys_are_told_apart_by_type_as_arguments_are(mode, clock: FakeClock) -> None:
    # {1: v} == {True: v} == {1.0: v}: the keys were compared as values, so all three calls got
    # the first one's answer.
    source = Source()
    ask = cached(mode, source, ttl=10)
    for options in ({1: "x"}, {True: "x"}, {1.0: "x"}, {(1,): "x"}, {(True,): "x"}):
        mode.run(ask, options)
    mode.run(ask, {1: "x"})
    assert source.calls == 5


class Opaque:
    __hash__ = None  # type: ignore[assignment]


def test_an_unhashable_argument_is_a_clear_error_at_the_call(mode, clock: FakeClock) -> None:
    source = Source()
    ask = cached(mode, source, ttl=10)
    error = mode.outcome(ask, Opaque())
    assert isinstance(error, TypeError)
    assert "Opaque" in str(error)
    assert "key=" in str(error)
    assert source.calls == 0


def test_a_key_function_says_what_makes_calls_the_same(mode, clock: FakeClock) -> None:
    source = Source()
    ask = cached(mode, source, ttl=10, key=lambda prompt, **_: prompt.lower())
    mode.run(ask, "Hello", request=Opaque())
    mode.run(ask, "HELLO", request=Opaque())
    assert source.calls == 1


def test_a_key_function_returning_something_unhashable_is_an_error(mode, clock) -> None:
    ask = cached(mode, Source(), ttl=10, key=lambda prompt: [prompt])
    error = mode.outcome(ask, "q")
    assert isinstance(error, TypeError)
    assert "key function returned an unhashable list" in str(error)


def test_policy_call_keeps_apart_the_functions_it_runs(mode, clock: FakeClock) -> None:
    policy = with_cache(name="llm", ttl=10)
    first, second = Source(), Source()
    one, two = mode.define(first), mode.define(second)
    run = policy.acall if mode.is_async else policy.call
    mode.run(run, one, "q")
    mode.run(run, two, "q")
    mode.run(run, one, "q")
    assert (first.calls, second.calls) == (1, 1)


def test_the_least_recently_used_entry_goes_first(mode, clock: FakeClock) -> None:
    source = Source()
    ask = cached(mode, source, ttl=100, max_entries=2)
    mode.run(ask, "a")
    mode.run(ask, "b")
    mode.run(ask, "a")  # a is now the most recently used
    mode.run(ask, "c")  # evicts b
    mode.run(ask, "a")
    assert source.calls == 3
    mode.run(ask, "b")
    assert source.calls == 4


# -- settings, shadow, decoration --------------------------------------------------------------


def test_the_cache_outlives_a_settings_reload(mode, clock: FakeClock) -> None:
    source = Source()
    ask = cached(mode, source, ttl=10)
    mode.run(ask, "q")
    config.reload_settings(env={"BUTTRESS_SERVICES__LLM__CACHE__MAX_ENTRIES": "5"})
    try:
        mode.run(ask, "q")
    finally:
        config.reload_settings(env={})
    assert source.calls == 1


def test_settings_turn_the_cache_on_for_resilient(mode, clock: FakeClock) -> None:
    source = Source()
    config.reload_settings(env={"BUTTRESS_SERVICES__LLM__CACHE__TTL": "30"})
    try:
        ask = buttress.resilient("llm")(mode.define(source))
        mode.run(ask, "q")
        mode.run(ask, "q")
    finally:
        config.reload_settings(env={})
    assert source.calls == 1


def test_shadow_mode_reports_a_hit_and_calls_anyway(mode, clock: FakeClock) -> None:
    source = Source()
    config.reload_settings(env={"BUTTRESS_SERVICES__LLM__MODE": "shadow"})
    try:
        ask = cached(mode, source, ttl=10)
        with capture_events([events.ShadowDecision]) as seen:
            mode.run(ask, "q")
            mode.run(ask, "q")
    finally:
        config.reload_settings(env={})
    assert source.calls == 2
    assert seen == [events.ShadowDecision("llm", "cache", "cached")]


@pytest.mark.parametrize(
    "arguments", [{"ttl": 0}, {"ttl": 1, "stale_ttl": -1}, {"ttl": 1, "max_entries": 0}]
)
def test_bad_arguments_fail_at_decoration(arguments: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match="invalid argument for cache"):
        with_cache(**arguments)


def test_a_config_file_cannot_name_a_key_function() -> None:
    with pytest.raises(ConfigurationError, match="key"):
        config.load_settings({"BUTTRESS_SERVICES__LLM__CACHE__KEY": "x"})
