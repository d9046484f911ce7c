"""pybreaker 1.4.1's own test suite (``tests/pybreaker_test.py``), translated to buttress.

Each test names the pybreaker test it comes from. The breaker under test is buttress's
``CircuitBreaker`` (a ``pybreaker.CircuitBreaker``) used through pybreaker's API: ``call`` (and
``acall`` for ``async def``, where pybreaker used tornado), ``calling``, the ``@breaker``
decorator, listeners, exclusions, the counters and the manual transitions.

Where buttress differs on purpose (``docs/patterns/circuit-breaker.md``, "pybreaker
compatibility"; ``docs/migration.md``), the test asserts the documented behaviour and says so:

* the call that trips the circuit, and a failed trial, raise the caller's own exception
  (pybreaker's ``throw_new_error_on_trip=False``); a rejected call raises ``CircuitOpenError``,
  never ``CircuitBreakerError``;
* an excluded exception counts as nothing (pybreaker counts it as a success);
* listeners run outside the breaker's lock, so they may run concurrently;
* ``call_async`` (tornado) raises ``NotImplementedError``: asyncio uses ``acall``.

pybreaker's storage-based tests ran on memory and on Redis storage. Here they run on pybreaker's
memory storage, on "another storage" (a ``CircuitMemoryStorage`` subclass) and on pybreaker's own
``CircuitRedisStorage`` over a real redis-server; the last two take the path buttress documents
for any other ``pybreaker.CircuitBreakerStorage`` (the state is re-read from the storage before
each admission). The main cases also run through buttress's own ``@circuit_breaker``. Time is
the ``clock`` fixture, never a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import importlib.util
import itertools
import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pybreaker
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from buttress import CircuitOpenError, circuit_breaker
from buttress.patterns.circuit_breaker import CircuitBreaker, CircuitBreakerOptions
from buttress.registry import breaker
from buttress.testing import FakeClock


class OtherStorage(pybreaker.CircuitMemoryStorage):
    """A storage that is not pybreaker's own memory storage (as ``CircuitRedisStorage`` is)."""


@functools.cache
def redis_harness() -> ModuleType:
    """``tests/redis/conftest.py`` (its ``RedisServer``), loaded by path: tests are no package."""
    path = Path(__file__).parents[1] / "redis" / "conftest.py"
    spec = importlib.util.spec_from_file_location("buttress_peers_redis_harness", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class RedisDB:
    """The real redis-server of a test, and the clients pybreaker's Redis storage is given."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.clients: list[redis.Redis] = []
        self._namespaces = itertools.count()

    def client(self) -> redis.Redis:
        # pybreaker's storage reads bytes: no decode_responses. No retries inside redis-py: its
        # default backs off for seconds on a refused connection, which test_fallback_state makes.
        client = redis.Redis(
            host="127.0.0.1",
            port=self.server.port,
            socket_timeout=2,
            socket_connect_timeout=2,
            retry=Retry(NoBackoff(), 0),
        )
        self.clients.append(client)
        return client

    def storage(self, namespace: str | None = None, **kwargs: Any) -> pybreaker.CircuitRedisStorage:
        """A ``CircuitRedisStorage`` on a fresh namespace unless one is given."""
        name = namespace if namespace is not None else f"peer{next(self._namespaces)}"
        return pybreaker.CircuitRedisStorage(
            pybreaker.STATE_CLOSED, self.client(), namespace=name, **kwargs
        )


@pytest.fixture(scope="module")
def peer_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One redis-server for this module (skipped without the binary locally, failing under CI)."""
    harness = redis_harness()
    server = harness.RedisServer(harness._binary(), tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_db(peer_redis_server: Any) -> Iterator[RedisDB]:
    """The module's redis-server, empty for this test (started again if a test killed it)."""
    if peer_redis_server.process is None:
        peer_redis_server.start()
    db = RedisDB(peer_redis_server)
    db.client().flushall()
    try:
        yield db
    finally:
        for client in db.clients:
            client.close()


@pytest.fixture(params=["memory", "other", pytest.param("redis", marks=pytest.mark.redis)])
def storage(request: pytest.FixtureRequest) -> Callable[[], pybreaker.CircuitBreakerStorage | None]:
    """Makes the storage each breaker of the test gets (``None``: the breaker's own).

    ``redis`` is pybreaker's own ``CircuitRedisStorage`` on a real redis-server, as in
    pybreaker's CircuitBreakerRedisTestCase.
    """
    if request.param == "memory":
        return lambda: None
    if request.param == "redis":
        db: RedisDB = request.getfixturevalue("redis_db")
        return db.storage
    return lambda: OtherStorage(pybreaker.STATE_CLOSED)


def make(
    storage: Callable[[], pybreaker.CircuitBreakerStorage | None] | None = None,
    listeners: tuple[pybreaker.CircuitBreakerListener, ...] = (),
    **options: Any,
) -> CircuitBreaker:
    return CircuitBreaker(
        "peer",
        CircuitBreakerOptions(**options),
        state_storage=storage() if storage is not None else None,
        listeners=listeners,
    )


def call(mode: Any, cb: CircuitBreaker, body: Callable[..., Any] | None = None) -> Any:
    """``cb.call(fn)``, or ``await cb.acall(fn)`` in async mode; ``fn`` runs ``body``."""
    fn = mode.define(body)
    return mode.run(cb.acall if mode.is_async else cb.call, fn)


def outcome(mode: Any, cb: CircuitBreaker, body: Callable[..., Any] | None = None) -> Any:
    """Like ``call`` but returns the exception instead of raising it."""
    try:
        return call(mode, cb, body)
    except Exception as exc:
        return exc


def err() -> None:
    raise NotImplementedError


def suc() -> bool:
    return True


class Counting:
    """A body that counts its calls."""

    def __init__(self, result: Any = True) -> None:
        self.calls = 0
        self.result = result

    def __call__(self) -> Any:
        self.calls += 1
        return self.result


class Recorder(pybreaker.CircuitBreakerListener):
    """pybreaker's test listeners, all in one: writes what it hears into ``out``."""

    def __init__(self) -> None:
        self.out = ""

    def before_call(self, cb: Any, func: Any, *args: Any, **kwargs: Any) -> None:
        assert cb
        self.out += "-"

    def success(self, cb: Any) -> None:
        assert cb
        self.out += "success"

    def failure(self, cb: Any, exc: BaseException) -> None:
        assert cb
        assert exc
        self.out += "failure"

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        assert cb
        if old_state:
            self.out += old_state.name
        if new_state:
            self.out += "->" + new_state.name
        self.out += ","


def trip(mode: Any, cb: CircuitBreaker, times: int) -> list[Any]:
    return [outcome(mode, cb, err) for _ in range(times)]


# -- CircuitBreakerStorageBasedTestCase --------------------------------------------------------


def test_successful_call(mode, storage) -> None:
    """From pybreaker test_successful_call."""
    cb = make(storage)
    assert call(mode, cb, suc)
    assert cb.fail_counter == 0
    assert cb.current_state == "closed"


def test_one_failed_call(mode, storage) -> None:
    """From pybreaker test_one_failed_call."""
    cb = make(storage)
    with pytest.raises(NotImplementedError):
        call(mode, cb, err)
    assert cb.fail_counter == 1
    assert cb.current_state == "closed"


def test_one_successful_call_after_failed_call(mode, storage) -> None:
    """From pybreaker test_one_successful_call_after_failed_call."""
    cb = make(storage)
    with pytest.raises(NotImplementedError):
        call(mode, cb, err)
    assert cb.fail_counter == 1
    assert call(mode, cb, suc)
    assert cb.fail_counter == 0
    assert cb.current_state == "closed"


def test_several_failed_calls_setting_absent(mode, storage) -> None:
    """From pybreaker test_several_failed_calls_setting_absent.

    Deliberate difference: the third (tripping) call raises its own NotImplementedError, not
    CircuitBreakerError.
    """
    cb = make(storage, fail_max=3)
    with pytest.raises(NotImplementedError):
        call(mode, cb, err)
    with pytest.raises(NotImplementedError):
        call(mode, cb, err)
    with pytest.raises(NotImplementedError):
        call(mode, cb, err)
    assert cb.fail_counter == 3
    assert cb.current_state == "open"


def test_throw_new_error_on_trip_false(mode, storage) -> None:
    """From pybreaker test_throw_new_error_on_trip_false (buttress's only mode).

    The open circuit rejects with CircuitOpenError (pybreaker: CircuitBreakerError) without
    running the function, and the count stays at 3.
    """
    cb = make(storage, fail_max=3)
    for _ in range(3):
        with pytest.raises(NotImplementedError):
            call(mode, cb, err)
    assert cb.fail_counter == 3
    assert cb.current_state == "open"
    body = Counting()
    with pytest.raises(CircuitOpenError):
        call(mode, cb, body)
    assert body.calls == 0
    assert cb.fail_counter == 3
    assert cb.current_state == "open"


def test_throw_new_error_on_trip_true_and_traceback(mode) -> None:
    """From pybreaker test_throw_new_error_on_trip_true and test_traceback_in_circuitbreaker_error.

    Deliberate difference: buttress has no ``throw_new_error_on_trip=True``. The tripping call
    raises the very exception the function raised, with the function's frame in its traceback
    (what pybreaker's test checks the CircuitBreakerError's traceback for), and ``open()``
    returns False.
    """
    cb = make(fail_max=3)
    raised: list[BaseException] = []

    def failing() -> None:
        exc = NotImplementedError("down")
        raised.append(exc)
        raise exc

    trip(mode, cb, 2)
    exc = outcome(mode, cb, failing)
    assert exc is raised[-1]
    assert not isinstance(exc, pybreaker.CircuitBreakerError)
    assert "failing" in "".join(traceback.format_exception(exc))
    assert cb.fail_counter == 3
    assert cb.current_state == "open"
    assert cb.open() is False


def test_failed_call_after_timeout(mode, storage, clock: FakeClock) -> None:
    """From pybreaker test_failed_call_after_timeout: a failed trial re-opens the circuit.

    Deliberate difference: the failed trial raises its own error, not CircuitBreakerError.
    (The failure count pybreaker also checks is in the next test.)
    """
    cb = make(storage, fail_max=3, timeout=0.5)
    trip(mode, cb, 2)
    assert cb.current_state == "closed"
    with pytest.raises(NotImplementedError):
        call(mode, cb, err)
    assert cb.fail_counter == 3
    clock.advance(0.6)
    with pytest.raises(NotImplementedError):
        call(mode, cb, err)
    assert cb.current_state == "open"
    with pytest.raises(CircuitOpenError):
        call(mode, cb, suc)


def test_failed_call_after_timeout_counts_the_failed_trial(mode, storage, clock) -> None:
    """From pybreaker test_failed_call_after_timeout: ``fail_counter == 4`` after the trial."""
    cb = make(storage, fail_max=3, timeout=0.5)
    trip(mode, cb, 3)
    clock.advance(0.6)
    with pytest.raises(NotImplementedError):
        call(mode, cb, err)
    assert cb.fail_counter == 4


def test_successful_after_timeout(mode, storage, clock: FakeClock) -> None:
    """From pybreaker test_successful_after_timeout: the trial runs once and closes the circuit."""
    cb = make(storage, fail_max=3, timeout=1)
    body = Counting()
    trip(mode, cb, 2)
    assert cb.current_state == "closed"
    with pytest.raises(NotImplementedError):
        call(mode, cb, err)
    with pytest.raises(CircuitOpenError):
        call(mode, cb, body)
    assert cb.fail_counter == 3
    clock.advance(2)
    assert call(mode, cb, body)
    assert cb.fail_counter == 0
    assert cb.current_state == "closed"
    assert body.calls == 1


def test_failed_call_when_halfopen(mode, storage) -> None:
    """From pybreaker test_failed_call_when_halfopen (the state part).

    Deliberate difference: the failed trial raises its own error.
    """
    cb = make(storage)
    cb.half_open()
    assert cb.fail_counter == 0
    assert cb.current_state == "half-open"
    with pytest.raises(NotImplementedError):
        call(mode, cb, err)
    assert cb.current_state == "open"


def test_failed_call_when_halfopen_counts_the_failure(mode, storage) -> None:
    """From pybreaker test_failed_call_when_halfopen: ``fail_counter == 1`` after the trial."""
    cb = make(storage)
    cb.half_open()
    with pytest.raises(NotImplementedError):
        call(mode, cb, err)
    assert cb.fail_counter == 1


def test_successful_call_when_halfopen(mode, storage) -> None:
    """From pybreaker test_successful_call_when_halfopen."""
    cb = make(storage)
    cb.half_open()
    assert cb.fail_counter == 0
    assert cb.current_state == "half-open"
    assert call(mode, cb, suc)
    assert cb.fail_counter == 0
    assert cb.current_state == "closed"


def test_close(mode, storage) -> None:
    """From pybreaker test_close."""
    cb = make(storage, fail_max=3)
    trip(mode, cb, 3)
    with pytest.raises(CircuitOpenError):
        call(mode, cb, err)
    assert cb.fail_counter == 3
    assert cb.current_state == "open"
    cb.close()
    assert cb.fail_counter == 0
    assert cb.current_state == "closed"
    assert call(mode, cb, suc)


def test_transition_events(storage) -> None:
    """From pybreaker test_transition_events: manual transitions notify ``state_change``."""
    listener = Recorder()
    cb = make(storage, listeners=(listener,))
    assert cb.current_state == "closed"
    cb.open()
    assert cb.current_state == "open"
    cb.half_open()
    assert cb.current_state == "half-open"
    cb.close()
    assert cb.current_state == "closed"
    assert listener.out == "closed->open,open->half-open,half-open->closed,"


def test_transition_events_through_calls(mode, storage, clock: FakeClock) -> None:
    """From pybreaker test_transition_events and test_call_events, over a whole cycle of calls.

    pybreaker's order: ``before_call``, then ``failure`` before the ``state_change`` it causes;
    an elapsed timeout half-opens before the trial's ``before_call``; a trial success closes
    before ``success``. A rejected call notifies nobody.
    """
    listener = Recorder()
    cb = make(storage, listeners=(listener,), fail_max=2, timeout=10)
    trip(mode, cb, 2)
    assert listener.out == "-failure-failureclosed->open,"
    listener.out = ""
    with pytest.raises(CircuitOpenError):
        call(mode, cb, suc)
    assert listener.out == ""
    clock.advance(10)
    assert call(mode, cb, suc)
    assert listener.out == "open->half-open,-half-open->closed,success"


def test_call_events(mode, storage) -> None:
    """From pybreaker test_call_events."""
    listener = Recorder()
    cb = make(storage, listeners=(listener,))
    assert call(mode, cb, suc)
    with pytest.raises(NotImplementedError):
        call(mode, cb, err)
    assert listener.out == "-success-failure"


def test_generator() -> None:
    """From pybreaker test_generator: an error raised while iterating counts as a failure.

    Refusing the generator function at decoration, as buttress's decorators do, also passes.
    """
    cb = make()
    try:

        @cb
        def failing(value: Any) -> Iterator[Any]:
            "Docstring"
            x = yield value
            raise NotImplementedError(x)

    except TypeError:
        return
    gen = failing(True)
    next(gen)
    with pytest.raises(NotImplementedError):
        gen.send(True)
    assert cb.fail_counter == 1


def test_contextmanager(mode) -> None:
    """From pybreaker test_contextmanager: the breaker guards a block inside a context manager.

    pybreaker decorates the generator behind ``@contextmanager``; here ``calling()`` guards the
    ``with`` block (generator functions are not supported by ``call()``, see the docs).
    """
    cb = make()

    @contextlib.contextmanager
    def wrapper() -> Iterator[None]:
        try:
            with cb.calling():
                yield
        except NotImplementedError:
            raise ValueError from None

    with pytest.raises(ValueError), wrapper():
        raise NotImplementedError
    assert cb.fail_counter == 1


# -- the same, through buttress's own decorator --------------------------------------------------


class Decorated:
    """``@circuit_breaker(name="peer", **options)`` over each body; ``cb`` is its breaker."""

    def __init__(self, mode: Any, **options: Any) -> None:
        self.mode = mode
        self.policy = circuit_breaker(name="peer", **options)

    def __call__(self, body: Callable[..., Any] | None = None) -> Any:
        return self.mode.run(self.policy(self.mode.define(body)))

    def outcome(self, body: Callable[..., Any] | None = None) -> Any:
        return self.mode.outcome(self.policy(self.mode.define(body)))

    @property
    def cb(self) -> CircuitBreaker:
        return breaker("peer")


def test_decorated_several_failed_calls_then_rejections(mode, clock: FakeClock) -> None:
    """From pybreaker test_several_failed_calls_setting_absent and
    test_throw_new_error_on_trip_false, through ``@circuit_breaker``.

    Deliberate difference: the tripping call raises its own error; then CircuitOpenError.
    """
    protected = Decorated(mode, fail_max=3)
    for _ in range(3):
        assert isinstance(protected.outcome(err), NotImplementedError)
    assert protected.cb.fail_counter == 3
    assert protected.cb.current_state == "open"
    body = Counting()
    rejected = protected.outcome(body)
    assert isinstance(rejected, CircuitOpenError)
    assert not isinstance(rejected, pybreaker.CircuitBreakerError)
    assert rejected.retry_after == pytest.approx(60)
    assert body.calls == 0


def test_decorated_successful_after_timeout(mode, clock: FakeClock) -> None:
    """From pybreaker test_successful_after_timeout, through ``@circuit_breaker``."""
    protected = Decorated(mode, fail_max=3, timeout=1)
    body = Counting()
    for _ in range(3):
        protected.outcome(err)
    assert isinstance(protected.outcome(body), CircuitOpenError)
    clock.advance(2)
    assert protected(body)
    assert protected.cb.fail_counter == 0
    assert protected.cb.current_state == "closed"
    assert body.calls == 1


def test_decorated_failed_call_after_timeout(mode, clock: FakeClock) -> None:
    """From pybreaker test_failed_call_after_timeout, through ``@circuit_breaker``."""
    protected = Decorated(mode, fail_max=3, timeout=0.5)
    for _ in range(3):
        protected.outcome(err)
    clock.advance(0.6)
    assert isinstance(protected.outcome(err), NotImplementedError)
    assert protected.cb.current_state == "open"
    assert isinstance(protected.outcome(suc), CircuitOpenError)


def test_decorated_success_threshold(mode, clock: FakeClock) -> None:
    """From pybreaker test_success_threshold_multiple_successes_required and
    test_success_threshold_failure_resets_counter, through ``@circuit_breaker``.
    """
    protected = Decorated(mode, fail_max=3, timeout=0.1, success_threshold=3)
    for _ in range(3):
        protected.outcome(err)
    clock.advance(0.2)
    protected(suc)
    protected(suc)
    assert (protected.cb.current_state, protected.cb.success_counter) == ("half-open", 2)
    assert isinstance(protected.outcome(err), NotImplementedError)
    assert (protected.cb.current_state, protected.cb.success_counter) == ("open", 0)
    clock.advance(0.2)
    for _ in range(3):
        protected(suc)
    assert (protected.cb.current_state, protected.cb.success_counter) == ("closed", 0)


def test_decorated_excluded_exceptions(mode) -> None:
    """From pybreaker test_excluded_exceptions, through ``@circuit_breaker(exclude=...)``.

    Deliberate difference: excluded errors count as nothing (pybreaker: as successes).
    """
    protected = Decorated(mode, exclude=(LookupError,))
    protected.outcome(err)
    assert protected.cb.fail_counter == 1
    assert isinstance(protected.outcome(raising(KeyError("k"))), KeyError)
    assert protected.cb.fail_counter == 1
    assert protected.cb.excluded_exceptions == (LookupError,)


def test_decorated_call_events(mode, clock: FakeClock) -> None:
    """From pybreaker test_call_events and test_transition_events, through ``@circuit_breaker``
    with a listener added to the service's breaker.
    """
    protected = Decorated(mode, fail_max=1, timeout=5)
    listener = Recorder()
    protected(suc)
    protected.cb.add_listener(listener)
    assert protected(suc)
    protected.outcome(err)
    assert listener.out == "-success-failureclosed->open,"
    clock.advance(5)
    protected(suc)
    assert listener.out.endswith("open->half-open,-half-open->closed,success")


def test_decorated_half_open_thread_safety(mode, clock: FakeClock) -> None:
    """From pybreaker test_half_open_thread_safety, through ``@circuit_breaker``."""
    ran: list[int] = []

    def failing() -> None:
        ran.append(1)
        raise SpecificError

    fn = circuit_breaker(name="peer", fail_max=1, timeout=0.01)(mode.define(failing, latency=0.001))
    breaker("peer").open()
    clock.advance(0.01)
    mode.gather(looping(mode, fn, 1), 5)
    assert len(ran) == 1
    assert breaker("peer").current_state == "open"


# -- CircuitBreakerConfigurationTestCase --------------------------------------------------------


@pytest.mark.parametrize(
    "state", [pybreaker.STATE_OPEN, pybreaker.STATE_CLOSED, pybreaker.STATE_HALF_OPEN]
)
@pytest.mark.parametrize("kind", [pybreaker.CircuitMemoryStorage, OtherStorage])
def test_default_state(state: str, kind: type[pybreaker.CircuitMemoryStorage]) -> None:
    """From pybreaker test_default_state: the initial state comes from the storage."""
    cb = CircuitBreaker("peer", state_storage=kind(state))
    assert cb.state.name == state
    assert cb.current_state == state


def test_default_params() -> None:
    """From pybreaker test_default_params (buttress's defaults are pybreaker's)."""
    cb = CircuitBreaker("peer")
    assert cb.fail_counter == 0
    assert cb.reset_timeout == 60
    assert cb.fail_max == 5
    assert cb.current_state == "closed"
    assert cb.excluded_exceptions == ()
    assert cb.listeners == ()
    assert cb.storage.name == "memory"


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"timeout": 30}, (30, 5, ())),
        ({"fail_max": 10}, (60, 10, ())),
        ({"exclude": (Exception,)}, (60, 5, (Exception,))),
    ],
    ids=["reset_timeout", "fail_max", "excluded_exceptions"],
)
def test_new_with_custom_options(options: dict[str, Any], expected: tuple[Any, ...]) -> None:
    """From pybreaker test_new_with_custom_reset_timeout, _fail_max, _excluded_exceptions."""
    cb = CircuitBreaker("peer", CircuitBreakerOptions(**options))
    assert cb.fail_counter == 0
    assert (cb.reset_timeout, cb.fail_max, cb.excluded_exceptions) == expected
    assert cb.listeners == ()
    assert cb.storage.name == "memory"


def test_fail_max_setter(mode) -> None:
    """From pybreaker test_fail_max_setter; the new value also decides the next trip."""
    cb = make()
    assert cb.fail_max == 5
    cb.fail_max = 10
    assert cb.fail_max == 10
    cb.fail_max = 2
    trip(mode, cb, 2)
    assert cb.current_state == "open"


def test_reset_timeout_setter(mode, clock: FakeClock) -> None:
    """From pybreaker test_reset_timeout_setter; the new value also applies to an open circuit."""
    cb = make(fail_max=1)
    assert cb.reset_timeout == 60
    cb.reset_timeout = 30
    assert cb.reset_timeout == 30
    trip(mode, cb, 1)
    clock.advance(10)
    with pytest.raises(CircuitOpenError) as rejected:
        call(mode, cb, suc)
    assert rejected.value.retry_after == pytest.approx(20)
    cb.reset_timeout = 5
    assert call(mode, cb, suc)
    assert cb.current_state == "closed"


def test_call_with_args_and_kwargs(mode) -> None:
    """From pybreaker test_call_with_no_args, _with_args, _with_kwargs and test_call_async_*.

    The async variants used tornado; here ``await cb.acall(...)`` (asyncio).
    """
    cb = make()
    assert call(mode, cb, suc)
    fn = mode.define(lambda *a, **kw: (a, kw))
    method = cb.acall if mode.is_async else cb.call
    assert mode.run(method, fn, 42, "abc") == ((42, "abc"), {})
    assert mode.run(method, fn, a=1, b=2) == ((), {"a": 1, "b": 2})


def test_call_async_with_call() -> None:
    """From pybreaker test_call_async_with_no_args (tornado coroutines through ``call()``).

    An ``async def`` handed to the sync ``call()`` must be refused (TypeError, as
    ``Policy.call`` does) or counted; either passes.
    """
    cb = make(fail_max=1)

    async def failing() -> None:
        raise NotImplementedError

    try:
        coroutine = cb.call(failing)
    except TypeError:
        return

    async def scenario() -> None:
        with pytest.raises(NotImplementedError):
            await coroutine

    asyncio.run(scenario())
    assert cb.fail_counter == 1


def test_add_listener(mode) -> None:
    """From pybreaker test_add_listener; a listener added later is notified."""
    cb = make()
    assert cb.listeners == ()
    first = Recorder()
    cb.add_listener(first)
    assert cb.listeners == (first,)
    second = Recorder()
    cb.add_listener(second)
    assert cb.listeners == (first, second)
    call(mode, cb, suc)
    assert first.out == second.out == "-success"


def test_add_listeners(mode) -> None:
    """From pybreaker test_add_listeners; both are notified."""
    cb = make()
    first, second = Recorder(), Recorder()
    cb.add_listeners(first, second)
    assert cb.listeners == (first, second)
    outcome(mode, cb, err)
    assert first.out == second.out == "-failure"


def test_remove_listener(mode) -> None:
    """From pybreaker test_remove_listener; a removed listener hears nothing more."""
    cb = make()
    first = Recorder()
    cb.add_listener(first)
    assert cb.listeners == (first,)
    cb.remove_listener(first)
    assert cb.listeners == ()
    call(mode, cb, suc)
    assert first.out == ""


class ValuedError(Exception):
    def __init__(self, value: str) -> None:
        super().__init__(value)
        self.value = value


def raising(exc: BaseException) -> Callable[[], None]:
    def body() -> None:
        raise exc

    return body


def test_excluded_exceptions(mode, storage) -> None:
    """From pybreaker test_excluded_exceptions (subclasses are excluded too).

    Deliberate difference: an excluded exception counts as nothing, where pybreaker counts it as
    a success and clears the count. So the count stays at 1 after LookupError and KeyError
    (pybreaker: 0), and reaches 2 with the next failure.
    """
    cb = make(storage, exclude=(LookupError,))
    with pytest.raises(NotImplementedError):
        call(mode, cb, err)
    assert cb.fail_counter == 1
    with pytest.raises(LookupError):
        call(mode, cb, raising(LookupError()))
    assert cb.fail_counter == 1
    with pytest.raises(KeyError):
        call(mode, cb, lambda: {}["missing"])
    assert cb.fail_counter == 1
    with pytest.raises(NotImplementedError):
        call(mode, cb, err)
    assert cb.fail_counter == 2


def test_excluded_callable_exceptions(mode) -> None:
    """From pybreaker test_excluded_callable_exceptions.

    Deliberate difference (as above): the excluded "good" error leaves the count at 1.
    """
    cb = make(exclude=(lambda e: type(e) is ValuedError and e.value == "good",))
    with pytest.raises(ValuedError):
        call(mode, cb, raising(ValuedError("bad")))
    assert cb.fail_counter == 1
    with pytest.raises(ValuedError):
        call(mode, cb, raising(ValuedError("good")))
    assert cb.fail_counter == 1
    with pytest.raises(NotImplementedError):
        call(mode, cb, err)
    assert cb.fail_counter == 2


def test_excluded_callable_and_types_exceptions(mode) -> None:
    """From pybreaker test_excluded_callable_and_types_exceptions.

    Deliberate difference (as above): excluded errors leave the count where it was.
    """
    cb = make(exclude=(lambda e: type(e) is ValuedError and e.value == "good", LookupError))
    with pytest.raises(ValuedError):
        call(mode, cb, raising(ValuedError("bad")))
    assert cb.fail_counter == 1
    with pytest.raises(ValuedError):
        call(mode, cb, raising(ValuedError("good")))
    assert cb.fail_counter == 1
    with pytest.raises(NotImplementedError):
        call(mode, cb, err)
    assert cb.fail_counter == 2
    with pytest.raises(LookupError):
        call(mode, cb, raising(LookupError()))
    assert cb.fail_counter == 2
    call(mode, cb, suc)
    assert cb.fail_counter == 0


def test_add_and_remove_excluded_exceptions(mode) -> None:
    """From pybreaker test_add_excluded_exception, _add_excluded_exceptions, _remove_...

    Also checks that each change decides the next call's outcome.
    """
    cb = make()
    assert cb.excluded_exceptions == ()
    cb.add_excluded_exception(NotImplementedError)
    assert cb.excluded_exceptions == (NotImplementedError,)
    outcome(mode, cb, err)
    assert cb.fail_counter == 0
    cb.add_excluded_exception(Exception)
    assert cb.excluded_exceptions == (NotImplementedError, Exception)
    cb.remove_excluded_exception(NotImplementedError)
    cb.remove_excluded_exception(Exception)
    assert cb.excluded_exceptions == ()
    outcome(mode, cb, err)
    assert cb.fail_counter == 1
    cb.add_excluded_exceptions(NotImplementedError, KeyError)
    assert cb.excluded_exceptions == (NotImplementedError, KeyError)
    outcome(mode, cb, err)
    assert cb.fail_counter == 1


def test_decorator() -> None:
    """From pybreaker test_decorator: ``@breaker`` keeps the name and docstring, and counts."""
    cb = make()

    @cb
    def succeeding(value: Any) -> Any:
        "Docstring"
        return value

    @cb
    def failing(value: Any) -> Any:
        "Docstring"
        raise NotImplementedError

    assert succeeding.__doc__ == failing.__doc__ == "Docstring"
    assert (succeeding.__name__, failing.__name__) == ("succeeding", "failing")
    with pytest.raises(NotImplementedError):
        failing(True)
    assert cb.fail_counter == 1
    assert succeeding(True)
    assert cb.fail_counter == 0


def test_decorator_call_future() -> None:
    """From pybreaker test_decorator_call_future: ``@breaker`` on a coroutine function counts.

    pybreaker did it for tornado (``__pybreaker_call_async=True``); buttress documents asyncio
    support, so ``@breaker`` on ``async def`` must count awaited failures, or be refused.
    """
    cb = make(fail_max=2)
    try:

        @cb
        async def failing(value: Any) -> Any:
            "Docstring"
            raise NotImplementedError

    except TypeError:
        return
    assert failing.__doc__ == "Docstring"

    async def scenario() -> None:
        for _ in range(2):
            with pytest.raises(NotImplementedError):
                await failing(True)
        assert cb.fail_counter == 2
        assert cb.current_state == "open"

    asyncio.run(scenario())


def test_no_tornado_raises() -> None:
    """From pybreaker test_no_tornado_raises: ``call_async`` (tornado) is refused.

    Deliberate difference: NotImplementedError pointing at ``acall``, whether or not tornado is
    installed.
    """
    cb = make()
    with pytest.raises(NotImplementedError, match="acall"):
        cb.call_async(suc)


def test_name() -> None:
    """From pybreaker test_name: the breaker's name is the service name."""
    cb = CircuitBreaker("test_breaker")
    assert cb.name == "test_breaker"
    assert cb.service == "test_breaker"


def test_success_threshold_default_behavior(mode, storage, clock: FakeClock) -> None:
    """From pybreaker test_success_threshold_default_behavior."""
    cb = make(storage, fail_max=3, timeout=0.1)
    trip(mode, cb, 3)
    clock.advance(0.2)
    assert call(mode, cb, suc)
    assert cb.current_state == "closed"
    assert cb.success_counter == 0


def test_success_threshold_multiple_successes_required(mode, storage, clock: FakeClock) -> None:
    """From pybreaker test_success_threshold_multiple_successes_required."""
    cb = make(storage, fail_max=3, timeout=0.1, success_threshold=3)
    trip(mode, cb, 3)
    clock.advance(0.2)
    for expected in (1, 2):
        assert call(mode, cb, suc)
        assert cb.current_state == "half-open"
        assert cb.success_counter == expected
    assert call(mode, cb, suc)
    assert cb.current_state == "closed"
    assert cb.success_counter == 0


def test_success_threshold_failure_resets_counter(mode, storage, clock: FakeClock) -> None:
    """From pybreaker test_success_threshold_failure_resets_counter.

    Deliberate difference: the failed trial raises its own error, not CircuitBreakerError.
    """
    cb = make(storage, fail_max=3, timeout=0.1, success_threshold=3)
    trip(mode, cb, 3)
    clock.advance(0.2)
    call(mode, cb, suc)
    call(mode, cb, suc)
    assert cb.success_counter == 2
    with pytest.raises(NotImplementedError):
        call(mode, cb, err)
    assert cb.current_state == "open"
    assert cb.success_counter == 0
    clock.advance(0.2)
    call(mode, cb, suc)
    assert cb.success_counter == 1
    call(mode, cb, suc)
    assert cb.current_state == "half-open"
    call(mode, cb, suc)
    assert cb.current_state == "closed"
    assert cb.success_counter == 0


def test_success_threshold_property(mode, clock: FakeClock) -> None:
    """From pybreaker test_success_threshold_property; the new threshold applies to trials."""
    cb = make(success_threshold=5)
    assert cb.success_threshold == 5
    cb.success_threshold = 10
    assert cb.success_threshold == 10
    cb.success_threshold = 2
    cb.half_open()
    call(mode, cb, suc)
    assert cb.current_state == "half-open"
    call(mode, cb, suc)
    assert cb.current_state == "closed"


# -- CircuitBreakerTestCase ---------------------------------------------------------------------


def test_create_new_state_bad_state() -> None:
    """From pybreaker test_create_new_state__bad_state, through the public ``state`` setter."""
    cb = make()
    with pytest.raises(ValueError, match="foo"):
        cb.state = "foo"  # type: ignore[assignment]
    assert cb.current_state == "closed"


def test_notify_on_state_change_not_on_init() -> None:
    """From pybreaker test_notify_not_called_on_init and test_notify_called_on_state_change."""
    listener = Recorder()
    cb = CircuitBreaker(
        "peer", state_storage=pybreaker.CircuitMemoryStorage("open"), listeners=(listener,)
    )
    assert listener.out == ""
    cb.state = "closed"  # type: ignore[assignment]
    assert listener.out == "open->closed,"
    cb.state = "open"  # type: ignore[assignment]
    assert listener.out == "open->closed,closed->open,"


@pytest.mark.parametrize(
    "state", [pybreaker.STATE_OPEN, pybreaker.STATE_CLOSED, pybreaker.STATE_HALF_OPEN]
)
def test_failure_count_not_reset_during_creation(state: str) -> None:
    """From pybreaker test_failure_count_not_reset_during_creation."""
    storage = pybreaker.CircuitMemoryStorage(state)
    storage.increment_counter()
    cb = CircuitBreaker("peer", state_storage=storage)
    assert cb.state.name == state
    assert cb.fail_counter == 1


@pytest.mark.parametrize(
    "state", [pybreaker.STATE_OPEN, pybreaker.STATE_CLOSED, pybreaker.STATE_HALF_OPEN]
)
def test_state_opened_at_not_reset_during_creation(state: str) -> None:
    """From pybreaker test_state_opened_at_not_reset_during_creation."""
    storage = pybreaker.CircuitMemoryStorage(state)
    now = dt.datetime.now(dt.UTC)
    storage.opened_at = now
    cb = CircuitBreaker("peer", state_storage=storage)
    assert cb.state.name == state
    assert storage.opened_at == now


# -- CircuitBreakerThreadsTestCase (threads, and tasks in async mode) ---------------------------


class SpecificError(Exception):
    pass


def looping(mode: Any, fn: Callable[..., Any], times: int) -> Callable[..., Any]:
    """A worker of ``mode`` that calls ``fn`` ``times`` times, swallowing expected errors."""
    if mode.is_async:

        async def aworker() -> None:
            for _ in range(times):
                with contextlib.suppress(SpecificError, CircuitOpenError):
                    await fn()
                await asyncio.sleep(0)

        return aworker

    def worker() -> None:
        for _ in range(times):
            with contextlib.suppress(SpecificError, CircuitOpenError):
                fn()

    return worker


def test_fail_thread_safety(mode, clock: FakeClock) -> None:
    """From pybreaker test_fail_thread_safety: 3 workers x 500 failures count 1,500."""
    cb = make(fail_max=3000, timeout=1)
    fn = mode.define(raising(SpecificError()))
    protected = cb(fn) if not mode.is_async else (lambda: cb.acall(fn))
    mode.gather(looping(mode, protected, 500), 3)
    assert cb.fail_counter == 1500


def test_success_thread_safety(mode, clock: FakeClock) -> None:
    """From pybreaker test_success_thread_safety: every success reaches the listener.

    Deliberate difference: buttress calls listeners outside the breaker's lock, so they may run
    concurrently; pybreaker's unlocked read-modify-write listener is made thread-safe here.
    """
    cb = make()
    lock = threading.Lock()

    class SuccessListener(pybreaker.CircuitBreakerListener):
        count = 0

        def success(self, cb: Any) -> None:
            with lock:
                SuccessListener.count += 1

    cb.add_listener(SuccessListener())
    fn = mode.define(suc)
    protected = cb(fn) if not mode.is_async else (lambda: cb.acall(fn))
    mode.gather(looping(mode, protected, 500), 3)
    assert SuccessListener.count == 1500


def test_half_open_thread_safety(mode, clock: FakeClock) -> None:
    """From pybreaker test_half_open_thread_safety: 5 concurrent callers, one half-open move."""
    cb = make(fail_max=1, timeout=0.01)
    cb.open()
    clock.advance(0.01)
    ran = []

    class StateListener(pybreaker.CircuitBreakerListener):
        count = 0

        def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
            if new_state.name == "half-open":
                StateListener.count += 1

    cb.add_listener(StateListener())

    def failing() -> None:
        ran.append(1)
        raise SpecificError

    fn = mode.define(failing, latency=0.001)
    protected = cb(fn) if not mode.is_async else (lambda: cb.acall(fn))
    mode.gather(looping(mode, protected, 1), 5)
    assert StateListener.count == 1
    assert len(ran) == 1


def test_fail_max_thread_safety(mode, clock: FakeClock) -> None:
    """From pybreaker test_fail_max_thread_safety: the count never passes ``fail_max``.

    Failures admitted before the trip and recorded after it do not count (the clock is frozen,
    so no trial runs).
    """
    cb = make(fail_max=3000, timeout=1)

    class SlowListener(pybreaker.CircuitBreakerListener):
        def before_call(self, cb: Any, func: Any, *args: Any, **kwargs: Any) -> None:
            # pybreaker sleeps 50 us here to widen the race; sleep(0) only lets another thread
            # run between admission and the call (no time passes).
            time.sleep(0)

    cb.add_listener(SlowListener())
    fn = mode.define(raising(SpecificError()))
    protected = cb(fn) if not mode.is_async else (lambda: cb.acall(fn))
    mode.gather(looping(mode, protected, 2000), 3)
    assert cb.fail_counter == cb.fail_max
    assert cb.current_state == "open"


@pytest.mark.parametrize("backend", ["other", pytest.param("redis", marks=pytest.mark.redis)])
def test_fail_max_across_breakers_sharing_a_storage(
    mode, clock: FakeClock, request: pytest.FixtureRequest, backend: str
) -> None:
    """From pybreaker CircuitBreakerRedisConcurrencyTestCase (several machines, one storage).

    Two breakers (two processes) on one non-memory storage count failures into it together;
    when one trips the circuit, the other rejects on its next call, and a trial through either
    closes it for both. With Redis each "machine" has its own client and storage object.
    """
    if backend == "redis":
        db: RedisDB = request.getfixturevalue("redis_db")
        stores = [db.storage("fleet"), db.storage("fleet")]
    else:
        shared = OtherStorage(pybreaker.STATE_CLOSED)
        stores = [shared, shared]
    first = make(lambda: stores[0], fail_max=4, timeout=10)
    second = make(lambda: stores[1], fail_max=4, timeout=10)
    for cb in (first, second, first):
        with pytest.raises(NotImplementedError):
            call(mode, cb, err)
    assert first.fail_counter == second.fail_counter == 3
    with pytest.raises(NotImplementedError):
        call(mode, second, err)
    assert stores[0].state == pybreaker.STATE_OPEN
    body = Counting()
    with pytest.raises(CircuitOpenError):
        call(mode, first, body)
    assert body.calls == 0
    clock.advance(10)
    assert call(mode, second, body)
    assert stores[0].state == pybreaker.STATE_CLOSED
    assert call(mode, first, body)
    assert first.current_state == second.current_state == "closed"
    assert body.calls == 2


# -- CircuitBreakerRedisTestCase ----------------------------------------------------------------


@pytest.mark.redis
def test_namespace(redis_db: RedisDB) -> None:
    """From pybreaker CircuitBreakerRedisTestCase.test_namespace: every key is namespaced."""
    cb = make(lambda: redis_db.storage("my_app"))
    with pytest.raises(NotImplementedError):
        cb.call(err)
    keys = sorted(k.decode() for k in redis_db.client().scan_iter())
    assert keys == [
        "my_app:pybreaker:fail_counter",
        "my_app:pybreaker:state",
        "my_app:pybreaker:success_counter",
    ]


@pytest.mark.redis
@pytest.mark.parametrize(("fallback", "admitted"), [("open", False), ("closed", True)])
def test_fallback_state(
    mode,
    clock: FakeClock,
    redis_db: RedisDB,
    caplog: pytest.LogCaptureFixture,
    fallback: str,
    admitted: bool,
) -> None:
    """From pybreaker CircuitBreakerRedisTestCase.test_fallback_state: Redis down, the storage's
    fallback state decides.

    With ``open`` the call is rejected with CircuitOpenError, without running; with ``closed``
    it runs, and Redis being down never costs it its result.
    """
    caplog.set_level(logging.CRITICAL, logger="pybreaker")  # it logs each RedisError it absorbs
    cb = make(lambda: redis_db.storage(fallback_circuit_state=fallback))
    redis_db.server.kill()
    body = Counting()
    result = outcome(mode, cb, body)
    if admitted:
        assert result is True
        assert body.calls == 1
    else:
        assert isinstance(result, CircuitOpenError)
        assert body.calls == 0
        assert cb.current_state == "open"


@pytest.mark.redis
def test_missing_state(mode, clock: FakeClock, redis_db: RedisDB) -> None:
    """From pybreaker CircuitBreakerRedisTestCase.test_missing_state: the state key vanished.

    The storage re-creates it with its fallback state, which the breaker adopts on its next
    call. Deliberate difference (docs: "adopts a state another process wrote ... without wiping
    the shared failure counter"): the failure count stays 1 (pybreaker resets it to 0).
    """
    store = redis_db.storage("gone", fallback_circuit_state="open")
    cb = make(lambda: store)
    with pytest.raises(NotImplementedError):
        call(mode, cb, err)
    assert cb.fail_counter == 1
    redis_db.client().delete("gone:pybreaker:state")
    with pytest.raises(CircuitOpenError):
        call(mode, cb, suc)
    assert cb.state.name == "open"
    assert cb.fail_counter == 1


@pytest.mark.redis
def test_cluster_mode(redis_db: RedisDB) -> None:
    """From pybreaker CircuitBreakerRedisTestCase.test_cluster_mode: building a breaker over an
    open cluster-mode storage keeps its state and its opening time.
    """
    store = pybreaker.CircuitRedisStorage(
        pybreaker.STATE_OPEN, redis_db.client(), namespace="my_app", cluster_mode=True
    )
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    store.opened_at = now
    cb = make(lambda: store)
    assert cb.state.name == pybreaker.STATE_OPEN
    assert store.opened_at == now


@pytest.mark.redis
def test_redis_fail_thread_safety(mode, clock: FakeClock, redis_db: RedisDB) -> None:
    """From pybreaker CircuitBreakerRedisConcurrencyTestCase.test_fail_thread_safety (3 workers;
    100 failures each instead of 500, to stay fast).
    """
    cb = make(redis_db.storage, fail_max=3000, timeout=1)
    fn = mode.define(raising(SpecificError()))
    protected = cb(fn) if not mode.is_async else (lambda: cb.acall(fn))
    mode.gather(looping(mode, protected, 100), 3)
    assert cb.fail_counter == 300


@pytest.mark.redis
def test_redis_fail_max_thread_safety(mode, clock: FakeClock, redis_db: RedisDB) -> None:
    """From pybreaker CircuitBreakerRedisConcurrencyTestCase.test_fail_max_thread_safety: the
    count passes ``fail_max`` by less than the number of workers (scaled to fail_max=30).
    """
    cb = make(redis_db.storage, fail_max=30, timeout=1)
    fn = mode.define(raising(SpecificError()))
    protected = cb(fn) if not mode.is_async else (lambda: cb.acall(fn))
    mode.gather(looping(mode, protected, 40), 3)
    assert cb.fail_max <= cb.fail_counter < cb.fail_max + 3
    assert cb.current_state == "open"


# -- CircuitBreakerContextManagerTestCase -------------------------------------------------------


def test_calling(mode, clock: FakeClock) -> None:
    """From pybreaker test_calling: ``with breaker.calling():`` guards the block.

    Deliberate differences: the tripping block raises its own error (pybreaker:
    CircuitBreakerError), and an open circuit raises CircuitOpenError. In async mode the block
    awaits.
    """
    cb = make(fail_max=2, timeout=0.01)
    ran: list[int] = []
    work = mode.define(lambda: ran.append(1))

    if mode.is_async:

        async def do_raise() -> None:
            with cb.calling():
                await asyncio.sleep(0)
                raise SpecificError

        async def do_succeed() -> None:
            with cb.calling():
                await work()

    else:

        def do_raise() -> None:  # type: ignore[misc]
            with cb.calling():
                raise SpecificError

        def do_succeed() -> None:  # type: ignore[misc]
            with cb.calling():
                work()

    with pytest.raises(SpecificError):
        mode.run(do_raise)
    with pytest.raises(SpecificError):
        mode.run(do_raise)
    assert cb.fail_counter == 2
    assert cb.current_state == "open"
    with pytest.raises(CircuitOpenError):
        mode.run(do_succeed)
    assert ran == []
    clock.advance(0.01)
    mode.run(do_succeed)
    assert ran == [1]
    assert cb.fail_counter == 0
    assert cb.current_state == "closed"
