"""Failure scenarios through the public decorators, for the metric tests and the live exporter.

``run_all(mode, clock)`` exercises every pattern on its success and failure paths (a circuit trips,
rejects, half-opens and closes; retries succeed and run out; calls time out and workers are
abandoned; a bulkhead queues and rejects; a rate limiter makes calls wait and refuses one;
fallbacks serve and fail; a cache answers fresh and stale; identical calls share one run; a
rejected call is deferred, replayed, and another dropped; shadow mode and chaos injection act; a
circuit's shared state store cannot be reached; settings reload and fail to). It can run again
and again in one process: every run ends with the circuits closed.

Used by ``test_scenarios.py`` (fresh registry, fake clock) and by the exporter process that the
real-Prometheus test scrapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from buttress import (
    DeferOptions,
    Policy,
    circuit_breaker,
    config,
    events,
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
from buttress.exceptions import ConfigurationError
from buttress.patterns import chaos
from buttress.policy import Spec
from buttress.testing import FakeClock

# Settings the scenarios run under: a service in shadow mode, fault injection armed.
SETTINGS_ENV = {
    "BUTTRESS_SERVICES__SHADOWED__MODE": "shadow",
    chaos.KILL_SWITCH: "true",
}
BAD_SETTINGS_ENV = {**SETTINGS_ENV, "BUTTRESS_SERVICES__SHADOWED__RETRY__MAX_ATTEMPTS": "many"}


@functools.cache
def closed_port_url() -> str:
    """A Redis URL on a loopback port where nothing listens (the same one for every run)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"redis://127.0.0.1:{sock.getsockname()[1]}/0"


def wait_for(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    """Real-time poll for another thread's progress (bounded; never a duration under test)."""
    limit = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > limit:
            raise AssertionError("condition not reached in time")
        time.sleep(0.0005)


class Background:
    """One call of a ``mode`` function on its own thread (async: its own event loop)."""

    def __init__(self, mode: Any, fn: Callable[..., Any]) -> None:
        self.outcome: Any = None
        self.done = threading.Event()

        def run() -> None:
            try:
                self.outcome = asyncio.run(fn()) if mode.is_async else fn()
            except Exception as exc:
                self.outcome = exc
            finally:
                self.done.set()

        threading.Thread(target=run, daemon=True).start()

    def result(self) -> Any:
        if not self.done.wait(5):
            raise AssertionError("background call did not finish")
        return self.outcome


def raising(exc_type: type[Exception]) -> Callable[..., Any]:
    def body(*_args: Any) -> Any:
        raise exc_type("scenario")

    return body


def circuit(mode: Any, clock: FakeClock) -> None:
    """openfga trips after two failures, rejects, half-opens after 30 s and closes again."""
    failing = [False]

    def body() -> str:
        if failing[0]:
            raise ConnectionError("down")
        return "ok"

    check = circuit_breaker(name="openfga", fail_max=2, timeout=30, exclude=[KeyError])(
        mode.define(body)
    )
    ignored = circuit_breaker(name="openfga", fail_max=2, timeout=30, exclude=[KeyError])(
        mode.define(raising(KeyError))
    )
    mode.run(check)
    mode.outcome(ignored)  # excluded: neither success nor failure
    failing[0] = True
    mode.outcome(check)
    mode.outcome(check)  # trips
    mode.outcome(check)  # rejected: open
    clock.advance(30)
    failing[0] = False
    mode.run(check)  # the half-open trial closes it


def windows(mode: Any, clock: FakeClock) -> None:
    """ledger: failure-rate and slow-call windows (never tripping: the thresholds stay high)."""
    protect = circuit_breaker(
        name="ledger",
        fail_max=100,
        failure_rate_threshold=0.99,
        minimum_calls=50,
        slow_call_duration=1.0,
        slow_call_rate_threshold=0.99,
    )
    mode.run(protect(mode.define(latency=2)))  # slow
    mode.outcome(protect(mode.define(raising(ConnectionError))))


def retries(mode: Any, clock: FakeClock) -> None:
    """llm: succeeds on the third attempt; then runs out of attempts."""
    attempts: list[int] = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) % 3:
            raise ConnectionError("refused")
        return "answer"

    mode.run(retry_with_backoff(name="llm", max_attempts=3)(mode.define(flaky)))
    mode.outcome(retry_with_backoff(name="llm", max_attempts=3)(mode.define(raising(TimeoutError))))


def timeouts(mode: Any, clock: FakeClock) -> None:
    """search: times out; a sync worker is abandoned and finishes 5 s late."""
    mode.outcome(with_timeout(name="search", seconds=1)(mode.define(latency=3)))
    gate = threading.Event()

    def hung() -> str:
        clock.sleep(10)  # past the 5 s deadline
        gate.wait(5)  # keeps the worker busy after its caller gave up
        return "late"

    finished = threading.Event()
    undo = events.subscribe(lambda _: finished.set(), [events.WorkerFinishedLate])
    try:
        with contextlib.suppress(TimeoutError):
            with_timeout(name="search", seconds=5)(hung)()
        gate.set()
        if not finished.wait(5):
            raise AssertionError("the abandoned worker did not finish")
    finally:
        undo()


def bulkhead(mode: Any, clock: FakeClock) -> None:
    """db: one slot, one queue place: a call holds the slot, one queues, one is refused."""
    gate = threading.Event()
    started = threading.Event()

    def body(hold: bool) -> str:
        if hold:
            started.set()
            gate.wait(5)
        return "row"

    def call(hold: bool) -> Callable[[], Any]:
        return with_bulkhead(name="db", limit=1, max_queue=1)(mode.define(lambda: body(hold)))

    holder = Background(mode, call(hold=True))
    if not started.wait(5):
        raise AssertionError("the holder did not start")
    queued = Background(mode, call(hold=False))
    from buttress import registry

    (db,) = [b for b in registry.instances("bulkhead").values() if b.service == "db"]
    wait_for(lambda: db.snapshot()["queued"] == 1)
    mode.outcome(call(hold=False))  # refused: the slot and the queue are taken
    clock.advance(0.5)
    gate.set()
    holder.result()
    queued.result()


def rate_limits(mode: Any, clock: FakeClock) -> None:
    """search waits for a token; quota refuses one."""
    paced = with_rate_limit(name="search", rate=1, burst=1, max_wait=5)(mode.define())
    mode.run(paced)
    mode.run(paced)  # waits about 1 s for the next token
    strict = with_rate_limit(name="quota", rate=0.1, burst=1)(mode.define())
    mode.outcome(strict)
    mode.outcome(strict)  # no token and no waiting allowed


def fallbacks(mode: Any, clock: FakeClock) -> None:
    """prices: a value replaces the failure; every alternative of a chain failing too."""
    mode.run(with_fallback("cached", name="prices")(mode.define(raising(ConnectionError))))
    chain = (raising(OSError), raising(OSError))
    mode.outcome(with_fallback(name="prices", chain=chain)(mode.define(raising(ConnectionError))))


def overload(mode: Any, clock: FakeClock) -> None:
    """The overload controls: a spent retry budget, a hedge, a throttled call, an adaptive limit.

    outage has a budget that allows no retry; replica's first copy hangs and its hedge answers;
    overloaded refuses every call and gets throttled; pool's adaptive limit grows.
    """
    mode.outcome(
        retry_with_backoff(name="outage", budget={"ratio": 0.0, "min_per_second": 0.0})(
            mode.define(raising(ConnectionError))
        )
    )
    release = threading.Event()
    copies: list[int] = []
    hedged = with_hedging(name="replica", delay=0.05, idempotent=True)
    if mode.is_async:

        async def read() -> str:
            copies.append(1)
            if len(copies) == 1:
                await clock.asleep(1)  # slow: the hedge is due meanwhile
                await asyncio.Event().wait()  # cancelled once the hedge answers
            return "fast"

        mode.run(hedged(read))
    else:

        def sync_read() -> str:
            copies.append(1)
            if len(copies) == 1:
                clock.advance(1)  # slow: the hedge is due meanwhile
                release.wait(5)  # abandoned: still running when the hedge answers
                return "slow"
            return "fast"

        mode.run(hedged(sync_read))
        release.set()
    throttled = with_adaptive_throttle(name="overloaded", seed=1)(
        mode.define(raising(ConnectionError))
    )
    for _ in range(20):
        mode.outcome(throttled)
    pool = with_bulkhead(name="pool", adaptive="aimd", limit=1)(mode.define(latency=0.1))
    for _ in range(12):  # one window: 10 calls and (at least) a second
        mode.run(pool)


def degraded(mode: Any, clock: FakeClock) -> None:
    """answers: cached fresh, then stale; two identical calls share one run. notify: a rejected
    call is deferred and replayed once the circuit lets calls through; a second finds the queue
    full."""
    failing = [False]

    def answer(question: str) -> str:
        if failing[0]:
            raise ConnectionError("down")
        return question.upper()

    cached = with_cache(name="answers", ttl=10, stale_ttl=60)(mode.define(answer))
    mode.run(cached, "q")  # miss
    mode.run(cached, "q")  # hit
    clock.advance(11)
    failing[0] = True
    mode.run(cached, "q")  # miss, the call fails, the stale entry answers

    gate = threading.Event()
    started = threading.Event()
    joined = threading.Event()

    def held() -> str:
        started.set()
        gate.wait(5)
        return "shared"

    shared = with_coalescing(name="answers")(mode.define(held))
    undo = events.subscribe(lambda _: joined.set(), [events.CoalescingJoined])
    try:
        first = Background(mode, shared)
        if not started.wait(5):
            raise AssertionError("the first call did not start")
        second = Background(mode, shared)
        if not joined.wait(5):
            gate.set()
            raise AssertionError("the second call did not join the first")
        gate.set()
        first.result()
        second.result()
    finally:
        undo()

    down = [True]

    def send(text: str) -> str:
        if down[0]:
            raise ConnectionError("down")
        return text

    notify = with_fallback(name="notify", defer=DeferOptions(max_items=1))(
        circuit_breaker(name="notify", fail_max=1, timeout=5)(mode.define(send))
    )
    mode.outcome(notify, "a")  # trips the circuit
    handle = mode.run(notify, "b")  # rejected: deferred
    mode.outcome(notify, "c")  # rejected, and the queue is full: dropped
    down[0] = False
    clock.advance(5)  # the circuit's open time passes: the replay is the trial that closes it
    if mode.is_async:
        mode.run(handle.wait)
    else:
        handle.result(timeout=5)


def shadow(mode: Any, clock: FakeClock) -> None:
    """shadowed (mode = shadow): the breaker would reject, and lets the call through."""
    fn = circuit_breaker(name="shadowed", fail_max=1)(mode.define(raising(ConnectionError)))
    mode.outcome(fn)
    mode.outcome(fn)


def shared_state(mode: Any, clock: FakeClock) -> None:
    """inventory keeps its circuit in a Redis that is not there: the call goes on locally."""
    protect = circuit_breaker(name="inventory", state_url=closed_port_url())
    mode.run(protect(mode.define()))


def shared_rate_limit(mode: Any, clock: FakeClock) -> None:
    """fleet_quota shares its rate through a Redis that is not there: the local share decides."""
    limit = with_rate_limit(name="fleet_quota", rate=10, state_url=closed_port_url())
    mode.run(limit(mode.define()))


def chaos_injection(mode: Any, clock: FakeClock) -> None:
    """flaky: every call gets an injected connection error."""
    inject = Policy(Spec("chaos", "flaky", {"enabled": True, "exception_rate": 1.0}))
    mode.outcome(inject(mode.define()))


def run_all(mode: Any, clock: FakeClock) -> None:
    """Every scenario once, under the scenario settings; a failed reload at the end."""
    config.reload_settings(env=SETTINGS_ENV)
    for scenario in (
        circuit,
        windows,
        retries,
        timeouts,
        bulkhead,
        rate_limits,
        fallbacks,
        overload,
        degraded,
        shadow,
        shared_state,
        shared_rate_limit,
        chaos_injection,
    ):
        scenario(mode, clock)
    with contextlib.suppress(ConfigurationError):  # a failed reload: the settings stay
        config.reload_settings(env=BAD_SETTINGS_ENV)
