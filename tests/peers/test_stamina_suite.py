"""stamina 26.1.0's own tests (``tests/test_sync.py``, ``test_async.py``, ``test_config.py``,
``test_instrumentation.py``), translated to buttress.

Each test names the stamina test it comes from. stamina maps to buttress as
``docs/migration.md`` lists it: ``stamina.retry(on=..., attempts=..., wait_*=...)`` is
``retry_with_backoff(retry_on=..., max_attempts=..., initial=/max_delay=/exponential_base=)``,
``timeout=`` is ``with_timeout(seconds=...)`` above the retry, ``RetryingCaller`` is a
``Policy`` (``policy.call(fn, ...)``), ``retry_context``'s ``attempt.num`` is
``buttress.attempt()``, ``set_testing`` is ``buttress.testing.set_testing``/``testing_mode``,
``set_active(False)`` is ``FF_ENABLE_RESILIENCE_PATTERNS=false``, on-retry hooks are
``buttress.events`` subscribers, a backoff hook is a server's ``Retry-After`` (or a rejection's
``retry_after``), and ``stamina_retries_total`` is ``buttress_retry_attempts_total``.

stamina's ``on`` fixture (a type, a tuple of types, a predicate) is the ``on`` fixture here.
Where buttress differs on purpose, the test asserts the documented behaviour and says so:

* ``timeout=0`` (stamina: a warning) and ``attempts<=0`` (stamina: unlimited or one) are refused
  at decoration;
* the total time budget also interrupts the attempt running when it ends (stamina only stops
  scheduling retries);
* generator functions are refused at decoration (``docs/composition.md``), where stamina
  retries them;
* testing mode makes the waits zero but does not cap the attempts;
* scheduled retries are logged at INFO and the give-up at WARNING (stamina: WARNING per retry).

Time is the ``clock`` fixture; the two testing-mode tests use the real clock and are bounded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

import buttress
from buttress import (
    Policy,
    RateLimitedError,
    TimeoutExceededError,
    _clock,
    config,
    events,
    instrumentation,
    reload_settings,
    retry_with_backoff,
    testing,
    with_timeout,
)
from buttress.exceptions import ConfigurationError
from buttress.patterns import retry
from buttress.testing import FakeClock, capture_events, fake_clock


@pytest.fixture(
    params=[ValueError, (ValueError,), lambda exc: isinstance(exc, ValueError)],
    ids=["type", "tuple", "predicate"],
)
def on(request: pytest.FixtureRequest) -> Any:
    """stamina's ``on`` fixture: the three ways to say what is retried."""
    return request.param


@pytest.fixture
def settings(monkeypatch) -> Callable[..., Any]:
    """Install settings from an explicit environment; the old ones return after the test."""
    monkeypatch.setattr(config, "SNAPSHOT", config.SNAPSHOT)

    def install(**env: str) -> Any:
        return reload_settings(env=env)

    return install


class Flaky:
    """Raises ``make()`` ``failures`` times, then returns ``result``; records each attempt."""

    def __init__(self, failures: int, make: Callable[[], BaseException] = ValueError) -> None:
        self.failures = failures
        self.make = make
        self.calls = 0
        self.attempts: list[int] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        self.attempts.append(buttress.attempt())
        if self.calls <= self.failures:
            raise self.make()
        return (args, kwargs) if args or kwargs else 42


def budget(seconds: float | None) -> Callable[[Any], Any]:
    """stamina's ``timeout=``: ``with_timeout`` above the retry, or nothing."""
    return with_timeout(seconds=seconds) if seconds is not None else (lambda fn: fn)


# -- test_sync.py / test_async.py: the decorator ------------------------------------------------


@pytest.mark.parametrize("attempts", [1, 3])
@pytest.mark.parametrize("timeout", [None, 1.0, 86400.0])
@pytest.mark.parametrize("duration", [1.0, 86400.0])
def test_ok(mode, clock: FakeClock, attempts: int, timeout: float | None, duration: float) -> None:
    """From stamina test_ok (sync and async): no error, no problem, whatever the settings."""
    fn = budget(timeout)(
        retry_with_backoff(
            retry_on=Exception, max_attempts=attempts, initial=duration, max_delay=duration
        )(mode.define(lambda: 42))
    )
    assert mode.run(fn) == 42
    assert clock.sleeps == []


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: with_timeout(seconds=0), "seconds"),
        (lambda: with_timeout(seconds=0.0), "seconds"),
        (lambda: retry_with_backoff(max_attempts=0), "max_attempts"),
        (lambda: retry_with_backoff(max_attempts=-1), "max_attempts"),
    ],
    ids=["timeout-int", "timeout-float", "attempts-0", "attempts-negative"],
)
def test_timeout_zero_warns(make: Callable[[], Policy], argument: str) -> None:
    """From stamina test_timeout_zero_warns (and test_ok's attempts of 0 and -1).

    Deliberate difference: refused at decoration with a ConfigurationError naming the argument,
    where stamina warns that ``timeout=0`` means no retries.
    """
    with pytest.raises(ConfigurationError, match=argument):
        make()


@pytest.mark.parametrize("timeout", [None, 1.0, 86400.0])
def test_retries(mode, clock: FakeClock, on: Any, timeout: float | None) -> None:
    """From stamina test_retries (sync and async): the ``on`` error is retried."""
    flaky = Flaky(1)
    fn = budget(timeout)(
        retry_with_backoff(retry_on=on, initial=0, max_delay=0)(mode.define(flaky))
    )
    assert mode.run(fn) == 42
    assert flaky.calls == 2
    assert clock.sleeps == [0.0]


def test_retries_method(mode, clock: FakeClock, on: Any) -> None:
    """From stamina test_async test_retries_method, for ``def`` and ``async def`` methods."""
    flaky = Flaky(1)
    policy = retry_with_backoff(retry_on=on, initial=0, max_delay=0)
    if mode.is_async:

        class C:
            @policy
            async def f(self) -> Any:
                return flaky()

    else:

        class C:  # type: ignore[no-redef]
            @policy
            def f(self) -> Any:
                return flaky()

    assert mode.run(C().f) == 42
    assert flaky.calls == 2


def test_wrong_exception(mode, clock: FakeClock, on: Any) -> None:
    """From stamina test_wrong_exception: other errors pass through, untouched, at once."""
    flaky = Flaky(5, lambda: TypeError("passed"))
    fn = retry_with_backoff(retry_on=on)(mode.define(flaky))
    exc = mode.outcome(fn)
    assert isinstance(exc, TypeError)
    assert str(exc) == "passed"
    assert not getattr(exc, "__notes__", [])
    assert flaky.calls == 1


def test_retry_inactive(mode, clock: FakeClock, settings) -> None:
    """From stamina test_retry_inactive, test_retry_inactive_ok and test_config
    test_activate_deactivate: ``set_active(False)`` is ``FF_ENABLE_RESILIENCE_PATTERNS=false``.
    """
    failing = Flaky(5, lambda: Exception("passed"))
    fn = retry_with_backoff(retry_on=Exception)(mode.define(failing))
    ok = Flaky(0)
    fine = retry_with_backoff(retry_on=Exception)(mode.define(ok))
    assert settings(FF_ENABLE_RESILIENCE_PATTERNS="false").enabled is False
    exc = mode.outcome(fn)
    assert str(exc) == "passed"
    assert failing.calls == 1
    assert mode.run(fine) == 42
    assert ok.calls == 1
    assert settings().enabled is True
    mode.outcome(fn)
    assert failing.calls == 1 + 3


def test_retry_blocks_can_be_disabled(mode, clock: FakeClock, settings) -> None:
    """From stamina test_retry_inactive_block, _block_ok, test_retry_blocks_can_be_disabled:
    ``retry_context`` blocks are ``policy.call``.
    """
    policy = retry_with_backoff(retry_on=Exception, max_attempts=2)
    failing = Flaky(5, lambda: Exception("passed"))
    settings(FF_ENABLE_RESILIENCE_PATTERNS="false")
    with pytest.raises(Exception, match="passed"):
        mode.run(policy.acall if mode.is_async else policy.call, mode.define(failing))
    assert failing.calls == 1


def test_retry_block(mode, clock: FakeClock, on: Any) -> None:
    """From stamina test_retry_block (sync and async): ``attempt.num`` is ``buttress.attempt()``
    and ``attempt.next_wait`` is the ``RetryScheduled`` delay.
    """
    flaky = Flaky(1)
    policy = retry_with_backoff(retry_on=on, initial=0, max_delay=0)
    with capture_events([events.RetryScheduled]) as seen:
        result = mode.run(policy.acall if mode.is_async else policy.call, mode.define(flaky))
    assert result == 42
    assert flaky.attempts == [1, 2]
    assert [(e.attempt, e.delay) for e in seen] == [(1, 0.0)]


def test_next_wait(mode, clock: FakeClock) -> None:
    """From stamina test_next_wait and test_attempt_next_wait: the announced wait is the wait."""
    flaky = Flaky(3)
    fn = retry_with_backoff(
        retry_on=ValueError, max_attempts=4, initial=0.0001, max_delay=0.0004, jitter="none"
    )(mode.define(flaky))
    with capture_events([events.RetryScheduled]) as seen:
        assert mode.run(fn) == 42
    assert [e.delay for e in seen] == pytest.approx([0.0001, 0.0002, 0.0004])
    assert clock.sleeps == [e.delay for e in seen]


@pytest.mark.parametrize("jitter", ["none", "full", "equal", "decorrelated"])
def test_backoff_computation_clamps(mode, clock: FakeClock, jitter: str) -> None:
    """From stamina test_backoff_computation_clamps: no wait exceeds ``max_delay``."""
    fn = retry_with_backoff(retry_on=ValueError, max_attempts=10, max_delay=0.42, jitter=jitter)(
        mode.define(Flaky(100))
    )
    for _ in range(5):
        mode.outcome(fn)
    assert len(clock.sleeps) == 45
    assert all(0 <= wait <= 0.42 for wait in clock.sleeps)


@pytest.mark.parametrize("jitter", ["none", "full", "equal", "decorrelated"])
def test_backoff_no_overflow_on_high_attempt_numbers(jitter: str) -> None:
    """From stamina test_backoff_no_overflow_on_high_attempt_numbers (stamina #104).

    Attempt numbers past 1024 (where ``2.0 ** n`` overflows), with the largest allowed
    ``initial`` and growth factor too: the wait is the cap, or below it with jitter.
    """
    exc = ConnectionError()
    for initial, base in ((1.0, 2.0), (7 * 24 * 3600.0, 100.0)):
        strategy = retry.RetryStrategy(
            "peer",
            retry.RetryOptions(
                initial=initial, max_delay=7 * 24 * 3600.0, exponential_base=base, jitter=jitter
            ),
        )
        for n in (1025, 2000, 10_000):
            wait, reason = strategy.delay(exc, n, 7 * 24 * 3600.0)
            assert reason == "backoff"
            assert 0 <= wait <= 7 * 24 * 3600.0
            if jitter == "none":
                assert wait == 7 * 24 * 3600.0


def test_backoff_no_overflow_through_the_decorator(clock: FakeClock) -> None:
    """From stamina test_backoff_no_overflow_on_high_attempt_numbers, end to end: 1,100 attempts."""
    flaky = Flaky(2000, ConnectionError)
    fn = retry_with_backoff(max_attempts=1100, initial=1, max_delay=5, jitter="none")(flaky)
    with pytest.raises(ConnectionError):
        fn()
    assert flaky.calls == 1100
    assert clock.sleeps[-1] == 5.0


# -- testing mode -------------------------------------------------------------------------------


@pytest.mark.realtime
def test_testing_mode(mode) -> None:
    """From stamina test_testing_mode: testing mode can be set and reset; its waits are zero.

    Deliberate difference: it does not cap the attempts (stamina's ``attempts=3``); a retry
    scheduled for 100 s returns at once.
    """
    testing.set_testing(True)
    try:
        assert isinstance(_clock.get_clock(), _clock.ZeroWaitClock)
        flaky = Flaky(2)
        fn = retry_with_backoff(
            retry_on=ValueError, max_attempts=3, initial=100, max_delay=100, jitter="none"
        )(mode.define(flaky))
        started = time.monotonic()
        with capture_events([events.RetryScheduled]) as seen:
            assert mode.run(fn) == 42
        assert time.monotonic() - started < 1.5
        assert [e.delay for e in seen] == [100, 100]
    finally:
        testing.set_testing(False)
    assert isinstance(_clock.get_clock(), _clock.SystemClock)


def test_testing_mode_context() -> None:
    """From stamina test_testing_mode_context and test_config TestTesting.test_context_manager,
    _nested and _exception: the previous clock comes back, also after an error.
    """
    with fake_clock() as fake:
        with testing.testing_mode():
            assert isinstance(_clock.get_clock(), _clock.ZeroWaitClock)
            with testing.testing_mode():
                assert isinstance(_clock.get_clock(), _clock.ZeroWaitClock)
            assert isinstance(_clock.get_clock(), _clock.ZeroWaitClock)
        assert _clock.get_clock() is fake
        with pytest.raises(ValueError, match="test"), testing.testing_mode():
            raise ValueError("test")
        assert _clock.get_clock() is fake


@pytest.mark.realtime
def test_backoff_hook_in_test_mode_returns_zero(mode) -> None:
    """From stamina TestBackoffHookSync.test_backoff_hook_in_test_mode_returns_zero: a wait the
    server asked for (Retry-After) is zero in testing mode too.
    """
    flaky = Flaky(2, lambda: http_error(429, "10"))
    fn = retry_with_backoff(max_attempts=3)(mode.define(flaky))
    with testing.testing_mode():
        started = time.monotonic()
        assert mode.run(fn) == 42
        assert time.monotonic() - started < 1.5
    assert flaky.calls == 3


# -- RetryingCaller (a Policy) ------------------------------------------------------------------


def test_retrying_caller_ok(mode) -> None:
    """From stamina TestRetryingCaller.test_ok and TestAsyncRetryingCaller.test_ok."""
    policy = retry_with_backoff(retry_on=BaseException)
    run = policy.acall if mode.is_async else policy.call
    assert mode.run(run, mode.define(lambda: 42)) == 42


def test_retrying_caller_retries(mode, clock: FakeClock, on: Any) -> None:
    """From stamina TestRetryingCaller.test_retries (sync and async): arguments pass through."""
    flaky = Flaky(1)
    policy = retry_with_backoff(retry_on=on, initial=0, max_delay=0)
    run = policy.acall if mode.is_async else policy.call
    args, kw = mode.run(run, mode.define(flaky), 42, foo="bar")
    assert flaky.calls == 2
    assert args == (42,)
    assert kw == {"foo": "bar"}


def test_retrying_caller_repr() -> None:
    """From stamina TestRetryingCaller.test_repr: repr() shows every option given."""
    policy = retry_with_backoff(
        max_attempts=42, initial=23, max_delay=123, exponential_base=66, jitter="equal"
    )
    assert repr(policy) == (
        "Policy(retry(max_attempts=42, initial=23, exponential_base=66, max_delay=123, "
        "jitter='equal'))"
    )
    assert "retry_on=(<class 'ValueError'>,)" in repr(retry_with_backoff(retry_on=ValueError))
    both = with_timeout(seconds=13.0).then(retry_with_backoff(max_attempts=2))
    assert repr(both) == "Policy(timeout(seconds=13.0), retry(max_attempts=2))"


# -- TestGeneratorFunctionDecoration ------------------------------------------------------------


def test_generator_function_decoration_is_refused(mode) -> None:
    """From stamina TestGeneratorFunctionDecoration and TestAsyncGeneratorFunctionDecoration.

    Deliberate difference (docs/composition.md): a generator function, sync or async, is
    refused at decoration with TypeError, where stamina retries it.
    """
    if mode.is_async:

        async def gen() -> Any:
            yield 1

    else:

        def gen() -> Iterator[int]:  # type: ignore[misc]
            yield 1

    with pytest.raises(TypeError, match="generator function"):
        retry_with_backoff(retry_on=Exception)(gen)


# -- the total budget (stamina's timeout=) ------------------------------------------------------


def test_timeout_bounds_the_retries(mode, clock: FakeClock) -> None:
    """From stamina's ``timeout`` (test_retries with timeout): no retry is scheduled past it.

    With a 1 s budget and waits of 0.4 s then 0.8 s, the second wait would end past the budget:
    the retry gives up at once with the last error itself (not a timeout).
    """
    flaky = Flaky(10, ConnectionError)
    fn = with_timeout(seconds=1)(
        retry_with_backoff(max_attempts=10, initial=0.4, jitter="none")(mode.define(flaky))
    )
    with capture_events([events.RetryExhausted]) as seen:
        exc = mode.outcome(fn)
    assert isinstance(exc, ConnectionError)
    assert not isinstance(exc, TimeoutExceededError)
    assert flaky.calls == 2
    assert clock.sleeps == [0.4]
    assert [(e.attempts, e.reason) for e in seen] == [(2, "deadline")]


def test_attempts_end_before_the_timeout(mode, clock: FakeClock) -> None:
    """From stamina test_retries with both ``attempts`` and ``timeout``: whichever comes first."""
    flaky = Flaky(10, ConnectionError)
    fn = with_timeout(seconds=100)(
        retry_with_backoff(max_attempts=3, initial=0.1, jitter="none")(mode.define(flaky))
    )
    with capture_events([events.RetryExhausted]) as seen:
        assert isinstance(mode.outcome(fn), ConnectionError)
    assert flaky.calls == 3
    assert [(e.attempts, e.reason) for e in seen] == [(3, "max_attempts")]


def test_timeout_interrupts_the_running_attempt(mode, clock: FakeClock) -> None:
    """From stamina's ``timeout`` (a total budget across attempts).

    Deliberate difference (docs/migration.md, docs/patterns/timeout.md): the budget also ends
    the attempt running when it runs out: an ``async def`` attempt is cancelled, a ``def``
    attempt's caller is released at the limit (its worker thread is abandoned). stamina lets
    that attempt finish. Either way no retry follows.
    """
    calls: list[int] = []
    slow = mode.define(lambda: calls.append(1), latency=5)
    fn = with_timeout(seconds=1)(retry_with_backoff(max_attempts=3)(slow))
    with capture_events([events.RetryScheduled]) as seen:
        exc = mode.outcome(fn)
    assert isinstance(exc, TimeoutExceededError)
    assert exc.seconds == 1
    assert seen == []
    if mode.is_async:
        assert calls == []


# -- backoff hooks: the wait a server or a rejection asks for -----------------------------------


def http_error(status: int, retry_after: str) -> httpx.HTTPStatusError:
    request = httpx.Request("GET", "http://127.0.0.1/resource")
    response = httpx.Response(status, headers={"Retry-After": retry_after}, request=request)
    return httpx.HTTPStatusError(f"HTTP {status}", request=request, response=response)


@pytest.mark.parametrize(("asked", "waited"), [("0", 0.0), ("1.5", 1.5), ("3600", 5.0)])
def test_backoff_hook_returns_float(mode, clock: FakeClock, asked: str, waited: float) -> None:
    """From stamina test_backoff_hook_returns_float, _returns_timedelta (+ async): a wait the
    failure asks for replaces the backoff (``initial=5``), capped by ``max_delay``.
    """
    flaky = Flaky(2, lambda: http_error(503, asked))
    fn = retry_with_backoff(max_attempts=3, initial=5, max_delay=5)(mode.define(flaky))
    with capture_events([events.RetryScheduled]) as seen:
        assert mode.run(fn) == 42
    assert clock.sleeps == [waited, waited]
    assert {e.reason for e in seen} == {"retry_after"}


def test_backoff_hook_custom_backoff_from_exception(mode, clock: FakeClock) -> None:
    """From stamina test_backoff_hook_custom_backoff_from_exception: a backoff carried by the
    exception (a rejection's ``retry_after``, with ``retry_rejected=True``).
    """
    flaky = Flaky(1, lambda: RateLimitedError("slow down", service="peer", retry_after=0.25))
    fn = retry_with_backoff(max_attempts=3, initial=5, max_delay=5, retry_rejected=True)(
        mode.define(flaky)
    )
    assert mode.run(fn) == 42
    assert flaky.calls == 2
    assert clock.sleeps == [0.25]


# -- test_instrumentation.py --------------------------------------------------------------------


def test_context_manager_hooks(mode, clock: FakeClock) -> None:
    """From stamina TestSetOnRetryHooks (test_context_manager_hooks, _async, test_none_is_default,
    test_init_hooks): an on-retry hook is an events subscriber, and unsubscribing removes it.

    stamina's ``RetryDetails(name, retry_num=1, wait_for=0.0, caused_by=ValueError)`` is
    ``RetryScheduled(service, attempt=1, delay=0.0, error_type="ValueError", reason)``.
    """
    seen: list[Any] = []
    undo = events.subscribe(seen.append, [events.RetryScheduled])

    def f() -> None:
        raise ValueError

    fn = retry_with_backoff(retry_on=ValueError, initial=0, max_delay=0, max_attempts=2)(
        mode.define(f, name="f")
    )
    try:
        assert isinstance(mode.outcome(fn), ValueError)
    finally:
        undo()
    assert seen == [events.RetryScheduled("tests.conftest.f", 1, 0.0, "ValueError", "backoff")]
    mode.outcome(fn)
    assert len(seen) == 1


def function() -> None:
    raise ConnectionError


async def async_function() -> None:
    raise ConnectionError


class Foo:
    def method(self) -> None:
        raise ConnectionError

    async def async_method(self) -> None:
        raise ConnectionError


@pytest.mark.parametrize(
    ("obj", "name"),
    [
        (function, "function"),
        (async_function, "async_function"),
        (Foo().method, "foo.method"),
        (Foo().async_method, "foo.async_method"),
        (Foo.method, "foo.method"),
        (Foo.async_method, "foo.async_method"),
    ],
    ids=[
        "function",
        "async-function",
        "instance-method",
        "async-instance-method",
        "method",
        "async-method",
    ],
)
def test_guess_name(clock: FakeClock, obj: Callable[..., Any], name: str) -> None:
    """From stamina TestGuessName.test_module_scope: an unnamed call site's service is its
    qualified name (lower-cased: service names are case-insensitive).
    """
    fn = retry_with_backoff(max_attempts=2)(obj)
    args = (Foo(),) if obj in (Foo.method, Foo.async_method) else ()
    with capture_events([events.RetryExhausted]) as seen:
        try:
            result = fn(*args)
            if asyncio.iscoroutine(result):
                asyncio.run(result)
        except ConnectionError:
            pass
    assert [e.service for e in seen] == [f"{__name__}.{name}"]


def test_guess_name_local(clock: FakeClock) -> None:
    """From stamina TestGuessName.test_local."""

    def f() -> None:
        raise ConnectionError

    with capture_events([events.RetryExhausted]) as seen, pytest.raises(ConnectionError):
        retry_with_backoff(max_attempts=2)(f)()
    assert [e.service for e in seen] == [f"{__name__}.test_guess_name_local.<locals>.f"]


@pytest.fixture
def buttress_log(caplog) -> Iterator[pytest.LogCaptureFixture]:
    """The logging subscriber on the ``buttress`` logger, captured; the old subscribers after."""
    before = instrumentation.installed()
    instrumentation.configure(logging=True)
    caplog.set_level("INFO", logger="buttress")
    yield caplog
    instrumentation.configure(logging=before.get("logging", False))  # type: ignore[arg-type]


def test_logging(mode, clock: FakeClock, buttress_log) -> None:
    """From stamina TestLogging.test_sync and test_async: retries are logged.

    Deliberate difference: ``buttress.retry.scheduled`` at INFO, then the give-up as
    ``buttress.retry.exhausted`` at WARNING (stamina: ``stamina.retry_scheduled`` at WARNING).
    """

    def f() -> None:
        raise ValueError

    fn = retry_with_backoff(retry_on=ValueError, initial=0, max_delay=0, max_attempts=2)(
        mode.define(f)
    )
    assert isinstance(mode.outcome(fn), ValueError)
    retry_records = [t for t in buttress_log.record_tuples if t[2].startswith("buttress.retry.")]
    assert retry_records == [
        ("buttress", 20, "buttress.retry.scheduled"),
        ("buttress", 30, "buttress.retry.exhausted"),
    ]


def test_get_prometheus_counter(mode, clock: FakeClock, buttress_metrics) -> None:
    """From stamina test_get_prometheus_counter: ``stamina_retries_total`` is
    ``buttress_retry_attempts_total`` (by the number of the attempt about to run).
    """
    fn = retry_with_backoff(name="peer", retry_on=ValueError, initial=0, max_delay=0)(
        mode.define(Flaky(2))
    )
    assert mode.run(fn) == 42
    labels = {"service": "peer"}
    for attempt in ("2", "3"):
        value = buttress_metrics.get_sample_value(
            "buttress_retry_attempts_total", {**labels, "attempt_number": attempt}
        )
        assert value == 1.0
    assert buttress_metrics.get_sample_value("buttress_retry_succeeded_total", labels) == 1.0
