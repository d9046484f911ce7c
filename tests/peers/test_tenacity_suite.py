"""tenacity 9.2.1's own tests (``tests/test_tenacity.py``, ``test_asyncio.py``,
``test_issue_478.py``), translated to ``retry_with_backoff``.

Each test names the tenacity test it comes from. tenacity's knobs map to buttress's as
``docs/migration.md`` lists them: ``stop_after_attempt(n)`` is ``max_attempts=n``,
``wait_exponential``/``wait_fixed``/``wait_random_exponential`` are ``initial``,
``exponential_base``, ``max_delay`` and ``jitter``, ``retry_if_exception_type`` and
``retry_if_exception`` are ``retry_on``, hooks are ``buttress.events``,
``statistics["attempt_number"]`` is ``buttress.attempt()``, ``Retrying(...)(fn)`` is
``policy.call(fn)``, ``retry_error_callback`` is ``with_fallback`` above the retry.

Where buttress differs on purpose (``docs/migration.md``, ``docs/patterns/retry.md``), the test
asserts the documented behaviour and says so:

* the last original exception is always re-raised (``reraise=True``), never ``RetryError``;
* the default ``retry_on`` retries transient errors only, not every exception;
* ``"equal"`` jitter draws its random part below the cap (tenacity's
  ``wait_exponential_jitter`` adds it on top and clips at the cap);
* ``max_delay`` below ``initial`` is refused at decoration.

Not translated: what buttress documents as unsupported (``retry_if_result``, ``TryAgain``,
``Retrying`` as an iterator, ``retry_with``, stop/wait combinators, ``before_sleep_log``'s
message text). Every wait goes through the ``clock`` fixture (``clock.sleeps``), never a sleep.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import pickle
import random
import re
import typing
from collections.abc import Callable
from typing import Any

import pytest

import buttress
from buttress import Policy, config, events, reload_settings, retry_with_backoff, with_fallback
from buttress.exceptions import ConfigurationError
from buttress.instrumentation.logging import LoggingSubscriber
from buttress.patterns import retry
from buttress.testing import FakeClock, capture_events


class Thing:
    """tenacity's ``No<X>ErrorAfterCount``: raises ``make()`` ``count`` times, then returns True."""

    def __init__(self, count: int, make: Callable[[], BaseException]) -> None:
        self.counter = 0
        self.count = count
        self.make = make
        self.attempts: list[int] = []

    def go(self) -> Any:
        self.attempts.append(buttress.attempt())
        if self.counter < self.count:
            self.counter += 1
            raise self.make()
        return True


class CustomError(Exception):
    """tenacity's CustomError: the message is its value."""

    derived_message = "This is a Custom exception class"

    def __init__(self, value: str) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return self.value


def io_error() -> OSError:
    return OSError("Hi there, I'm an IOError")


def name_error() -> NameError:
    return NameError("Hi there, I'm a NameError")


def custom_error() -> CustomError:
    return CustomError(CustomError.derived_message)


def protect(mode: Any, thing: Thing, **options: Any) -> Callable[..., Any]:
    """``thing.go`` as a function of ``mode`` behind ``retry_with_backoff(**options)``."""
    return retry_with_backoff(**options)(mode.define(lambda: thing.go()))


def raising(exc: BaseException) -> Callable[[], None]:
    def body() -> None:
        raise exc

    return body


def always_failing(mode: Any, make: Callable[[], BaseException], **options: Any) -> Any:
    """A function of ``mode`` that always raises ``make()``, behind the retry; and its log."""
    raised: list[BaseException] = []

    def body() -> None:
        exc = make()
        raised.append(exc)
        raise exc

    return retry_with_backoff(**options)(mode.define(body)), raised


# -- TestRetryingName ---------------------------------------------------------------------------


def test_retrying_name(mode, clock: FakeClock) -> None:
    """From tenacity TestRetryingName (test_str_with_name, test_get_fn_name_decorator,
    test_logging_uses_name): the name is in the policy's repr, the events and the note.

    A decorated function without a name is known by its qualified name; names are
    case-insensitive (docs/configuration.md), so "My_Block" is reported as "my_block".
    """
    named = retry_with_backoff(name="My_Block", max_attempts=2)
    assert "my_block" in repr(named)
    fn, _ = always_failing(mode, ConnectionError, max_attempts=2)
    with capture_events([events.RetryExhausted]) as seen:
        exc = mode.outcome(named(mode.define(raising(ConnectionError()))))
        mode.outcome(fn)
    assert exc.__notes__[-1].startswith("buttress retry (my_block): ")
    assert [e.service for e in seen] == ["my_block", "tests.conftest.op"]


def test_get_fn_name_context_manager_no_name(mode, clock: FakeClock) -> None:
    """From tenacity test_get_fn_name_context_manager_no_name (``Retrying()`` without a name is
    "<unknown>"): ``policy.call(fn)`` with no name carries the label the docs promise.
    """
    policy = retry_with_backoff(max_attempts=2)
    with capture_events([events.RetryExhausted]) as seen, pytest.raises(ConnectionError):
        run_policy(mode, policy, mode.define(raising(ConnectionError())))
    expected = "policy_acall" if mode.is_async else "policy_call"
    assert [e.service for e in seen] == [f"buttress.policy.{expected}"]


# -- TestStopConditions -------------------------------------------------------------------------


@pytest.mark.parametrize("attempts", [1, 3, 5])
def test_stop_after_attempt(mode, clock: FakeClock, attempts: int) -> None:
    """From tenacity test_stop_after_attempt (and test_asyncio test_stop_after_attempt)."""
    fn, raised = always_failing(mode, ConnectionError, max_attempts=attempts, jitter="none")
    exc = mode.outcome(fn)
    assert exc is raised[-1]
    assert len(raised) == attempts
    assert len(clock.sleeps) == attempts - 1


# -- TestWaitConditions -------------------------------------------------------------------------


def test_exponential(mode, clock: FakeClock) -> None:
    """From tenacity test_exponential: 1, 2, 4, ... 128 with ``wait_exponential()``."""
    fn, _ = always_failing(
        mode, ConnectionError, max_attempts=9, initial=1, max_delay=1000, jitter="none"
    )
    mode.outcome(fn)
    assert clock.sleeps == [1, 2, 4, 8, 16, 32, 64, 128]


@pytest.mark.parametrize(("cap", "initial"), [(40, 1), (50, 1), (100, 10)])
def test_exponential_with_max_wait(mode, clock: FakeClock, cap: float, initial: float) -> None:
    """From tenacity test_exponential_with_max_wait, _and_multiplier, _with_min_wait_andmax__wait.

    (buttress has no ``min``: ``initial`` is the first wait, growing from there.)
    """
    fn, _ = always_failing(
        mode, ConnectionError, max_attempts=12, initial=initial, max_delay=cap, jitter="none"
    )
    mode.outcome(fn)
    assert clock.sleeps == [min(cap, initial * 2**n) for n in range(11)]
    assert clock.sleeps[-1] == cap


@pytest.mark.parametrize(("initial", "expected"), [(0, 0.0), (1, 1.0)])
def test_fixed_sleep(mode, clock: FakeClock, initial: float, expected: float) -> None:
    """From tenacity test_no_sleep and test_fixed_sleep: ``exponential_base=1`` is wait_fixed."""
    fn, _ = always_failing(
        mode,
        ConnectionError,
        max_attempts=6,
        initial=initial,
        max_delay=max(initial, 1),
        exponential_base=1,
        jitter="none",
    )
    mode.outcome(fn)
    assert clock.sleeps == [expected] * 5


def test_wait_random_exponential(mode, clock: FakeClock, monkeypatch) -> None:
    """From tenacity test_wait_random_exponential: full jitter stays in [0, ceiling]."""
    monkeypatch.setattr(retry, "_rng", random.Random(478))
    runs = 50
    fn, _ = always_failing(
        mode, ConnectionError, max_attempts=10, initial=0.5, max_delay=60.0, jitter="full"
    )
    for _ in range(runs):
        mode.outcome(fn)
    ceilings = [min(60.0, 0.5 * 2**n) for n in range(9)]
    for run in range(runs):
        waits = clock.sleeps[run * 9 : (run + 1) * 9]
        assert all(0 <= w <= c for w, c in zip(waits, ceilings, strict=True)), waits
    assert len(set(clock.sleeps)) > runs


def test_wait_random_exponential_max_below_initial_is_refused() -> None:
    """From tenacity test_wait_random_exponential ("max wait": multiplier 10, max 5).

    Deliberate difference: ``max_delay`` below ``initial`` is refused at decoration, naming both.
    """
    with pytest.raises(ConfigurationError, match="max_delay"):
        retry_with_backoff(initial=10, max_delay=5)


def test_wait_random_exponential_statistically(monkeypatch) -> None:
    """From tenacity test_wait_random_exponential_statistically: the mean is half the ceiling.

    Drawn through the strategy's own delay decision (the one tenacity asks for), 4,000 per attempt.
    """
    monkeypatch.setattr(retry, "_rng", random.Random(662))
    strategy = retry.RetryStrategy(
        "peer", retry.RetryOptions(initial=0.5, max_delay=60.0, jitter="full")
    )
    exc = ConnectionError()
    for attempt in range(1, 10):
        ceiling = min(60.0, 0.5 * 2 ** (attempt - 1))
        waits = [strategy.delay(exc, attempt, 0.5)[0] for _ in range(4000)]
        mean = sum(waits) / len(waits)
        # tenacity's tolerance: 4% of the mean's ceiling, 8% above 1 s.
        assert abs(mean - ceiling / 2) <= 0.04 * ceiling + 0.001, (attempt, mean)


def test_wait_exponential_jitter(mode, clock: FakeClock, monkeypatch) -> None:
    """From tenacity test_wait_exponential_jitter: jitter on top of an exponential wait.

    Deliberate difference: ``"equal"`` jitter waits ``ceiling/2 + uniform(0, ceiling/2)``, so
    the random part stays below the cap even once the cap is reached (tenacity adds up to 1 s on
    top and clips at the cap, so capped clients retry in lockstep).
    """
    monkeypatch.setattr(retry, "_rng", random.Random(681))
    fn, _ = always_failing(
        mode, ConnectionError, max_attempts=10, initial=1, max_delay=60, jitter="equal"
    )
    for _ in range(30):
        mode.outcome(fn)
    ceilings = [min(60, 2**n) for n in range(9)]
    for run in range(30):
        waits = clock.sleeps[run * 9 : (run + 1) * 9]
        assert all(c / 2 <= w <= c for w, c in zip(waits, ceilings, strict=True)), waits
    capped = clock.sleeps[8::9]
    assert len(set(capped)) > 1


# -- TestRetryConditions / TestDecoratorWrapper --------------------------------------------------


def test_retry_if_exception_of_type(mode, clock: FakeClock) -> None:
    """From tenacity test_retry_if_exception_of_type."""
    io = Thing(5, io_error)
    assert mode.run(protect(mode, io, retry_on=OSError, max_attempts=10)) is True
    assert io.counter == 5
    names = Thing(5, name_error)
    exc = mode.outcome(protect(mode, names, retry_on=OSError, max_attempts=10))
    assert isinstance(exc, NameError)
    assert names.counter == 1
    custom = Thing(5, custom_error)
    assert mode.run(protect(mode, custom, retry_on=(CustomError,), max_attempts=10)) is True
    names = Thing(5, name_error)
    assert isinstance(
        mode.outcome(protect(mode, names, retry_on=(CustomError,), max_attempts=10)), NameError
    )
    assert names.counter == 1


def test_retry_except_exception_of_type(mode, clock: FakeClock) -> None:
    """From tenacity test_retry_except_exception_of_type (``retry_if_not_exception_type``)."""

    def not_io(exc: BaseException) -> bool:
        return not isinstance(exc, OSError)

    names = Thing(5, name_error)
    assert mode.run(protect(mode, names, retry_on=not_io, max_attempts=10)) is True
    io = Thing(5, io_error)
    assert isinstance(mode.outcome(protect(mode, io, retry_on=not_io, max_attempts=10)), OSError)
    assert io.counter == 1


def test_retry_if_exception_message(mode, clock: FakeClock) -> None:
    """From tenacity test_retry_if_exception_message and _message_match."""
    by_message = Thing(3, custom_error)
    assert mode.run(
        protect(
            mode,
            by_message,
            retry_on=lambda e: str(e) == CustomError.derived_message,
            max_attempts=5,
        )
    )
    pattern = re.compile(CustomError.derived_message[:3] + ".*")
    by_match = Thing(3, custom_error)
    assert mode.run(
        protect(mode, by_match, retry_on=lambda e: bool(pattern.match(str(e))), max_attempts=5)
    )
    assert by_message.counter == by_match.counter == 3


def test_retry_if_not_exception_message(mode, clock: FakeClock) -> None:
    """From tenacity test_retry_if_not_exception_message and _match.

    The error that is not retried reaches the caller untouched on the first attempt (no note).
    """
    thing = Thing(2, custom_error)
    exc = mode.outcome(
        protect(mode, thing, retry_on=lambda e: str(e) != CustomError.derived_message)
    )
    assert isinstance(exc, CustomError)
    assert thing.attempts == [1]
    assert not getattr(exc, "__notes__", [])


def caused_by(kind: type[BaseException]) -> Callable[[BaseException], bool]:
    """tenacity's ``retry_if_exception_cause_type``: ``kind`` anywhere in the cause chain."""

    def predicate(exc: BaseException) -> bool:
        seen: set[int] = set()
        cause = exc.__cause__
        while cause is not None and id(cause) not in seen:
            if isinstance(cause, kind):
                return True
            seen.add(id(cause))
            cause = cause.__cause__
        return False

    return predicate


def test_retry_if_exception_cause_type(mode, clock: FakeClock) -> None:
    """From tenacity test_retry_if_exception_cause_type."""

    def io_from_name() -> BaseException:
        exc = OSError()
        exc.__cause__ = name_error()
        return exc

    def name_from_io() -> BaseException:
        exc = NameError()
        exc.__cause__ = io_error()
        return exc

    good = Thing(5, io_from_name)
    assert mode.run(protect(mode, good, retry_on=caused_by(NameError), max_attempts=10)) is True
    bad = Thing(5, name_from_io)
    assert isinstance(
        mode.outcome(protect(mode, bad, retry_on=caused_by(NameError), max_attempts=10)),
        NameError,
    )


@pytest.mark.parametrize("retry_on", ["transient", "network", "predicate"])
def test_retry_if_exception_cause_type_handles_cause_cycles(
    mode, clock: FakeClock, retry_on: str
) -> None:
    """From tenacity test_retry_if_exception_cause_type_handles_cause_cycles (#658).

    A cyclic ``__cause__``/``__context__`` chain must not hang or crash the retry decision,
    with buttress's own predicates or a user's.
    """

    def cyclic() -> BaseException:
        a, b = ConnectionError("a"), RuntimeError("b")
        a.__cause__, b.__cause__ = b, a
        a.__context__, b.__context__ = b, a
        return a

    spec: Any = caused_by(KeyError) if retry_on == "predicate" else retry_on
    fn, raised = always_failing(mode, cyclic, retry_on=spec, max_attempts=2)
    exc = mode.outcome(fn)
    assert exc is raised[-1]
    assert len(raised) == (1 if retry_on == "predicate" else 2)


def test_retry_preserves_argument_defaults(mode) -> None:
    """From tenacity test_retry_preserves_argument_defaults (sync and asyncio)."""
    if mode.is_async:

        async def with_defaults(a: int = 1) -> int:
            return a

        async def with_kwdefaults(*, a: int = 1) -> int:
            return a

    else:

        def with_defaults(a: int = 1) -> int:  # type: ignore[misc]
            return a

        def with_kwdefaults(*, a: int = 1) -> int:  # type: ignore[misc]
            return a

    policy = retry_with_backoff(max_attempts=3, initial=0.01)
    assert policy(with_defaults).__defaults__ == with_defaults.__defaults__ == (1,)
    assert policy(with_kwdefaults).__kwdefaults__ == with_kwdefaults.__kwdefaults__ == {"a": 1}
    assert mode.run(policy(with_defaults)) == 1


def test_defaults(mode, clock: FakeClock) -> None:
    """From tenacity test_defaults (``@retry()`` retries NameError and CustomError).

    Deliberate difference: the default retries transient errors only, so a NameError or a
    CustomError (bugs, to buttress) reach the caller at once, untouched, while a transient one
    is retried up to the default 3 attempts.
    """
    for make in (name_error, custom_error):
        thing = Thing(5, make)
        exc = mode.outcome(protect(mode, thing))
        assert isinstance(exc, type(make()))
        assert thing.attempts == [1]
        assert not getattr(exc, "__notes__", [])
    transient = Thing(2, ConnectionError)
    assert mode.run(protect(mode, transient)) is True
    assert transient.attempts == [1, 2, 3]


def test_retry_function_object(mode, clock: FakeClock) -> None:
    """From tenacity test_retry_function_object: a callable object, ``def`` or ``async def``."""
    if mode.is_async:

        class Hello:
            def __init__(self) -> None:
                self.calls = 0

            async def __call__(self) -> str:
                self.calls += 1
                if self.calls < 2:
                    raise ConnectionError
                return "Hello"

    else:

        class Hello:  # type: ignore[no-redef]
            def __init__(self) -> None:
                self.calls = 0

            def __call__(self) -> str:
                self.calls += 1
                if self.calls < 2:
                    raise ConnectionError
                return "Hello"

    hello = Hello()
    wrapped = retry_with_backoff(max_attempts=3, initial=0.01)(hello)
    assert inspect.iscoroutinefunction(wrapped) == mode.is_async
    assert mode.run(wrapped) == "Hello"
    assert hello.calls == 2


# -- TestBeforeAfterAttempts --------------------------------------------------------------------


def test_before_after_attempts_and_before_sleep(mode, clock: FakeClock) -> None:
    """From tenacity test_before_attempts, test_after_attempts and test_before_sleep.

    ``before`` is ``buttress.attempt()`` inside the call; ``before_sleep``/``after`` are
    ``RetryScheduled`` (the failed attempt's number and a delay > 0).
    """
    thing = Thing(2, ConnectionError)
    with capture_events([events.RetryScheduled, events.RetrySucceeded]) as seen:
        assert mode.run(protect(mode, thing, max_attempts=3, initial=0.01, jitter="none"))
    assert thing.attempts == [1, 2, 3]
    scheduled = seen.of(events.RetryScheduled)
    assert [e.attempt for e in scheduled] == [1, 2]
    assert all(e.delay > 0 for e in scheduled)
    assert [e.attempts for e in seen.of(events.RetrySucceeded)] == [3]
    once = Thing(0, ConnectionError)
    with capture_events() as quiet:
        assert mode.run(protect(mode, once, max_attempts=1))
    assert once.attempts == [1]
    assert quiet.of(events.RetryScheduled) == []


def test_before_sleep_log_raises(mode, clock: FakeClock) -> None:
    """From tenacity test_before_sleep_log_raises: one log record per scheduled retry.

    buttress's logging subscriber writes the stable name ``buttress.retry.scheduled`` with the
    delay and the error's class; deliberate difference: never the exception's message (it may
    hold data), where tenacity logs "... as it raised OSError: Hi there, I'm an IOError.".
    """
    logger = logging.getLogger("tests.peers.tenacity")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    handlers = LoggingSubscriber(logger).handlers()
    undo = events.subscribe(handlers[events.RetryScheduled], [events.RetryScheduled])
    try:
        thing = Thing(2, io_error)
        assert mode.run(
            protect(mode, thing, retry_on=OSError, max_attempts=3, initial=0.01, jitter="none")
        )
    finally:
        undo()
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["buttress.retry.scheduled"] * 2
    assert [(r.attempt, r.delay, r.error_type) for r in records] == [  # type: ignore[attr-defined]
        (1, 0.01, "OSError"),
        (2, 0.02, "OSError"),
    ]
    assert not any("Hi there" in str(vars(r)) for r in records)


# -- TestReraiseExceptions ----------------------------------------------------------------------


def test_reraise_by_default(mode, clock: FakeClock) -> None:
    """From tenacity test_reraise_by_default and test_reraise_from_retry_error.

    ``reraise=True`` is buttress's only mode: the caller gets the last KeyError object itself
    (with a note of the attempts), never a RetryError to unwrap.
    """
    fn, raised = always_failing(
        mode, lambda: KeyError("Bad key"), retry_on=KeyError, max_attempts=2
    )
    exc = mode.outcome(fn)
    assert exc is raised[-1]
    assert len(raised) == 2
    assert "gave up after 2 attempts" in exc.__notes__[-1]


def test_retry_error_callback(mode, clock: FakeClock) -> None:
    """From tenacity test_retry_error_callback: with_fallback above the retry (migration guide).

    The handler runs once, after the 3 attempts, with the last error; its value is the result.
    """
    seen: list[BaseException] = []

    def callback(exc: BaseException) -> str:
        seen.append(exc)
        return "fallback"

    fn, raised = always_failing(mode, ConnectionError, max_attempts=3)
    protected = with_fallback(handler=callback)(fn)
    assert mode.run(protected) == "fallback"
    assert len(raised) == 3
    assert seen == [raised[-1]]


# -- TestStatistics -----------------------------------------------------------------------------


def test_stats_during_execution(mode, clock: FakeClock) -> None:
    """From tenacity test_stats, test_stats_failing, test_retry_object_statistics_during_execution.

    ``statistics["attempt_number"]`` is ``buttress.attempt()``: 1 outside any retry and on a
    first success, then 1, 2, 3 inside a call that needed three attempts.
    """
    assert buttress.attempt() == 1
    ok = Thing(0, ValueError)
    assert mode.run(protect(mode, ok))
    assert ok.attempts == [1]
    thing = Thing(2, lambda: ValueError("retry"))
    assert mode.run(protect(mode, thing, retry_on=ValueError, max_attempts=3))
    assert thing.attempts == [1, 2, 3]
    failing = Thing(5, lambda: ValueError(42))
    mode.outcome(protect(mode, failing, retry_on=ValueError, max_attempts=2))
    assert failing.attempts == [1, 2]


# -- TestInvokeAsCallable (Retrying(...)(fn) is policy.call(fn)) --------------------------------


def run_policy(mode: Any, policy: Policy, fn: Callable[..., Any], *args: Any) -> Any:
    return mode.run(policy.acall if mode.is_async else policy.call, fn, *args)


def test_invoke_as_callable_retry_one(mode, clock: FakeClock) -> None:
    """From tenacity TestInvokeAsCallable.test_retry_one (and test_context_manager_retry_one)."""
    calls: list[int] = []

    def body() -> int:
        calls.append(len(calls) + 1)
        if len(calls) <= 1:
            raise ConnectionError("Retry it!")
        return 42

    assert run_policy(mode, retry_with_backoff(), mode.define(body)) == 42
    assert calls == [1, 2]


def test_invoke_as_callable_on_error(mode, clock: FakeClock) -> None:
    """From tenacity TestInvokeAsCallable.test_on_error (and test_context_manager_on_error)."""
    calls: list[int] = []

    def body() -> int:
        calls.append(len(calls) + 1)
        raise CustomError("Don't retry!")

    with pytest.raises(CustomError):
        run_policy(mode, retry_with_backoff(retry_on=OSError), mode.define(body))
    assert calls == [1]


def test_invoke_as_callable_reraise(mode, clock: FakeClock) -> None:
    """From tenacity TestInvokeAsCallable.test_retry_error and test_reraise (+ context manager).

    Deliberate difference: no RetryError, the last CustomError itself.
    """
    calls: list[int] = []

    def body() -> int:
        calls.append(len(calls) + 1)
        raise CustomError("Retry it!")

    policy = retry_with_backoff(retry_on=CustomError, max_attempts=2)
    with pytest.raises(CustomError) as raised:
        run_policy(mode, policy, mode.define(body))
    assert calls == [1, 2]
    assert "gave up after 2 attempts" in raised.value.__notes__[-1]


# -- TestRetryException / TestPickle ------------------------------------------------------------


def test_retry_error_is_pickleable(mode, clock: FakeClock) -> None:
    """From tenacity test_retry_error_is_pickleable: what the caller gets crosses processes.

    That is the original exception, with its note of the attempts.
    """
    fn, _ = always_failing(mode, lambda: ConnectionError("down"), max_attempts=2)
    exc = mode.outcome(fn)
    restored = pickle.loads(pickle.dumps(exc))
    assert type(restored) is ConnectionError
    assert restored.args == ("down",)
    assert restored.__notes__ == exc.__notes__


def test_retrying_pickle_round_trip_works(mode, clock: FakeClock) -> None:
    """From tenacity test_retrying_picklable, _after_run and _pickle_round_trip_works."""
    policy = retry_with_backoff(max_attempts=3, initial=0.5, jitter="none", retry_on="network")
    thing = Thing(1, ConnectionError)
    assert run_policy(mode, policy, mode.define(lambda: thing.go())) is True
    restored = pickle.loads(pickle.dumps(policy))
    assert repr(restored) == repr(policy)
    again = Thing(2, ConnectionError)
    assert run_policy(mode, restored, mode.define(lambda: again.go())) is True
    assert again.attempts == [1, 2, 3]
    assert clock.sleeps == [0.5, 0.5, 1.0]


# -- TestRetryTyping ----------------------------------------------------------------------------


def test_retry_type_annotations_and_bound_signature(mode) -> None:
    """From tenacity test_retry_type_annotations and
    test_retry_decorated_method_keeps_bound_signature.
    """
    if mode.is_async:

        class Client:
            async def fetch(self, key: str, *, fresh: bool = False) -> int:
                return len(key)

    else:

        class Client:  # type: ignore[no-redef]
            def fetch(self, key: str, *, fresh: bool = False) -> int:
                return len(key)

    class Retried(Client):
        fetch = retry_with_backoff()(Client.fetch)

    assert inspect.signature(Retried().fetch) == inspect.signature(Client().fetch)
    assert typing.get_type_hints(Retried.fetch) == {"key": str, "fresh": bool, "return": int}
    assert inspect.iscoroutinefunction(Retried.fetch) == mode.is_async
    assert mode.run(Retried().fetch, "abc") == 3


# -- TestMockingSleep ---------------------------------------------------------------------------


def test_mocking_sleep(mode, clock: FakeClock) -> None:
    """From tenacity TestMockingSleep (``fn.retry.sleep = mock``): the fake clock takes waits."""
    thing = Thing(4, ConnectionError)
    assert mode.run(protect(mode, thing, max_attempts=5, initial=1, jitter="none"))
    assert clock.sleeps == [1, 2, 4, 8]


# -- TestEnabled --------------------------------------------------------------------------------


@pytest.fixture
def settings(monkeypatch) -> Callable[..., Any]:
    """Install settings from an explicit environment; the old ones return after the test."""
    monkeypatch.setattr(config, "SNAPSHOT", config.SNAPSHOT)

    def install(**env: str) -> Any:
        return reload_settings(env=env)

    return install


@pytest.mark.parametrize(
    "env",
    [
        {"BUTTRESS_SERVICES__PEER__RETRY__ENABLED": "false"},
        {"FF_ENABLE_RESILIENCE_PATTERNS": "false"},
    ],
    ids=["retry-enabled-false", "kill-switch"],
)
def test_enabled_false_skips_retry(mode, clock: FakeClock, settings, env) -> None:
    """From tenacity TestEnabled (test_enabled_false_skips_retry, _raises_original_exception,
    _succeeds_on_first_attempt, test_enabled_true_retries_normally; sync and asyncio).
    """
    fn, raised = always_failing(mode, ConnectionError, name="peer", max_attempts=3)
    thing = Thing(0, ConnectionError)
    ok = protect(mode, thing, name="peer", max_attempts=3)
    settings(**env)
    assert mode.outcome(fn) is raised[-1]
    assert len(raised) == 1
    assert not getattr(raised[-1], "__notes__", [])
    assert mode.run(ok) is True
    settings()
    raised.clear()
    mode.outcome(fn)
    assert len(raised) == 3


# -- test_asyncio -------------------------------------------------------------------------------


def test_iscoroutinefunction() -> None:
    """From tenacity test_asyncio test_iscoroutinefunction."""

    @retry_with_backoff()
    async def fetch() -> int:
        return 1

    assert inspect.iscoroutinefunction(fetch)


def test_attempt_number_is_correct_for_interleaved_coroutines(clock: FakeClock) -> None:
    """From tenacity test_asyncio test_attempt_number_is_correct_for_interleaved_coroutines."""
    attempts: list[tuple[str, int]] = []

    @retry_with_backoff(max_attempts=5, initial=0, max_delay=0, jitter="none")
    async def interleaved(name: str, thing: Thing) -> Any:
        attempts.append((name, buttress.attempt()))
        await asyncio.sleep(0)
        return thing.go()

    async def both() -> None:
        await asyncio.gather(
            interleaved("one", Thing(2, ConnectionError)),
            interleaved("two", Thing(2, ConnectionError)),
        )

    asyncio.run(both())
    assert [n for name, n in attempts if name == "one"] == [1, 2, 3]
    assert [n for name, n in attempts if name == "two"] == [1, 2, 3]
    assert [name for name, _ in attempts[:2]] == ["one", "two"]


def test_statistics_visible_through_outer_decorator(mode, clock: FakeClock) -> None:
    """From tenacity test_asyncio test_statistics_visible_through_outer_decorator (#519).

    A well-behaved outer decorator (functools.wraps) sees the retry work through it:
    ``buttress.attempt()`` inside, and the retried call's result outside.
    """

    def outer(fn: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def awrapper(*args: Any, **kwargs: Any) -> Any:
                return await fn(*args, **kwargs)

            return awrapper

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

        return wrapper

    thing = Thing(1, ConnectionError)
    wrapped = outer(protect(mode, thing, max_attempts=3))
    assert mode.run(wrapped) is True
    assert thing.attempts == [1, 2]
    assert inspect.iscoroutinefunction(wrapped) == mode.is_async


# -- test_issue_478 -----------------------------------------------------------------------------


def test_issue_478(mode, clock: FakeClock) -> None:
    """From tenacity test_issue_478 (test_issue and test_async): a predicate that calls the
    retried function itself.

    tenacity's predicate reads ``retry_state.attempt_number``; buttress's reads
    ``buttress.attempt()``, which must still be the outer call's after the nested call.
    """
    results: list[str] = []
    seen: list[int] = []
    max_retry_fix_attempts = 2

    def do_retry(exc: BaseException) -> bool:
        # The predicate is sync even for async functions: the nested "fix" runs sync.
        if buttress.attempt() >= max_retry_fix_attempts:
            return False
        do_fix_work("Fix")
        seen.append(buttress.attempt())
        return True

    def work(subject: str) -> None:
        if subject == "Error":
            results.append(f"{subject} is not working")
            raise Exception(f"{subject} is not working")
        results.append(f"{subject} is working")

    do_work = retry_with_backoff(retry_on=do_retry, max_attempts=5)(mode.define(work))
    do_fix_work = retry_with_backoff(retry_on=do_retry, max_attempts=5)(work)

    exc = mode.outcome(do_work, "Error")
    assert str(exc) == "Error is not working"
    assert results == ["Error is not working", "Fix is working", "Error is not working"]
    assert seen == [1]


class FixFailedError(Exception):
    pass


def test_issue_478_when_the_fix_fails(mode, clock: FakeClock) -> None:
    """From tenacity test_issue_478, when the fix the predicate runs fails.

    tenacity lets the predicate's exception propagate; so does buttress, but no note may say an
    attempt raised it: the attempts raised "Error is not working".
    """
    subjects: list[str] = []

    def do_retry(exc: BaseException) -> bool:
        if buttress.attempt() >= 2:
            raise FixFailedError("the fix failed")
        return True

    def work(subject: str) -> None:
        subjects.append(subject)
        raise Exception(f"{subject} is not working")

    do_work = retry_with_backoff(retry_on=do_retry, max_attempts=5)(mode.define(work))
    exc = mode.outcome(do_work, "Error")
    assert isinstance(exc, FixFailedError)
    assert subjects == ["Error", "Error"]
    notes = getattr(exc, "__notes__", [])
    assert not any("attempt 2 raised FixFailedError" in note for note in notes)
    assert any("retry_on predicate raised FixFailedError" in note for note in notes)
