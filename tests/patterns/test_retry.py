"""Retry: every behaviour on ``def`` and ``async def`` (the ``mode`` fixture), on simulated time."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import email.utils
import http.server
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import httpx
import pytest
import requests
import tenacity

import buttress
from buttress import _context, events, testing
from buttress.exceptions import CircuitOpenError, RateLimitedError, TimeoutExceededError
from buttress.patterns import retry
from buttress.patterns._base import BuildContext
from buttress.patterns.retry import RetryOptions, RetryStrategy
from buttress.policy import link
from buttress.testing import FakeClock, capture_events


class Script:
    """Plays ``outcomes`` in order (the last one repeats): an exception is raised, else returned.

    Records what each attempt saw of ``buttress.attempt()`` and ``buttress.idempotency_key()``.
    """

    def __init__(self, *outcomes: Any) -> None:
        self.outcomes = outcomes
        self.calls = 0
        self.attempts: list[int] = []
        self.keys: list[str | None] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        self.attempts.append(buttress.attempt())
        self.keys.append(buttress.idempotency_key())
        outcome = self.outcomes[min(self.calls, len(self.outcomes)) - 1]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def strategy(service: str = "svc", run_mode: str = "enforce", **options: Any) -> RetryStrategy:
    options.setdefault("jitter", "none")
    ctx = BuildContext(service, RetryOptions(**options), service, run_mode)  # type: ignore[arg-type]
    built = retry.build(ctx)
    assert built is not None
    return built


def protect(mode, body: Any, **options: Any) -> Any:
    return mode.chain(strategy(**options), mode.define(body))


def httpx_status(status: int, headers: dict[str, str] | None = None) -> httpx.HTTPStatusError:
    request = httpx.Request("GET", "http://127.0.0.1/resource")
    response = httpx.Response(status, headers=headers or {}, request=request)
    return httpx.HTTPStatusError(f"HTTP {status}", request=request, response=response)


def requests_status(status: int, headers: dict[str, str] | None = None) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    response.headers.update(headers or {})
    return requests.HTTPError(f"HTTP {status}", response=response)


def notes(exc: BaseException) -> list[str]:
    return list(getattr(exc, "__notes__", []))


# -- attempts and backoff ----------------------------------------------------------------------


def test_success_on_the_first_call_costs_no_wait_and_no_event(mode, clock: FakeClock) -> None:
    script = Script("ok")
    with capture_events() as seen:
        assert mode.run(protect(mode, script), 1, k=2) == "ok"
    assert script.calls == 1
    assert clock.sleeps == []
    assert seen == []


def test_transient_failures_are_retried_with_exponential_backoff(mode, clock: FakeClock) -> None:
    script = Script(ConnectionError("a"), ConnectionError("b"), "ok")
    with capture_events() as seen:
        result = mode.run(protect(mode, script, initial=0.1, exponential_base=2), "x")
    assert result == "ok"
    assert script.calls == 3
    assert clock.sleeps == [0.1, 0.2]
    assert seen == [
        events.RetryScheduled("svc", 1, 0.1, "ConnectionError", "backoff"),
        events.RetryScheduled("svc", 2, 0.2, "ConnectionError", "backoff"),
        events.RetrySucceeded("svc", 3),
    ]


def test_exhausted_retries_raise_the_last_original_exception_with_a_note(
    mode, clock: FakeClock
) -> None:
    first, second, last = ConnectionError("a"), TimeoutError("b"), ConnectionError("c")
    script = Script(first, second, last)
    with capture_events() as seen:
        exc = mode.outcome(protect(mode, script, max_attempts=3, initial=0.5, exponential_base=3))
    assert exc is last
    assert not isinstance(exc, tenacity.RetryError)
    assert exc.__cause__ is None
    assert script.calls == 3
    assert clock.sleeps == [0.5, 1.5]
    assert notes(exc) == [
        "buttress retry (svc): gave up after 3 attempts (max_attempts): "
        "#1 ConnectionError, backoff 0.5s; #2 TimeoutError, backoff 1.5s; #3 ConnectionError"
    ]
    assert seen.of(events.RetryExhausted) == [
        events.RetryExhausted("svc", 3, "ConnectionError", "max_attempts")
    ]
    assert notes(first) == notes(second) == []


# Raised again and again, like an exception a module keeps as a constant.
REUSED = ConnectionError("reused")


def test_a_reused_exception_keeps_one_retry_note(mode, clock: FakeClock) -> None:
    REUSED.__notes__ = ["the caller's own note"]
    protected = protect(mode, Script(REUSED), max_attempts=2)
    for _ in range(1000):
        assert mode.outcome(protected) is REUSED
    assert notes(REUSED) == [
        "the caller's own note",
        "buttress retry (svc): gave up after 2 attempts (max_attempts): "
        "#1 ConnectionError, backoff 0.1s; #2 ConnectionError",
    ]


def test_max_attempts_counts_the_first_call(mode, clock: FakeClock) -> None:
    script = Script(ConnectionError("down"))
    with capture_events() as seen:
        exc = mode.outcome(protect(mode, script, max_attempts=1))
    assert isinstance(exc, ConnectionError)
    assert script.calls == 1
    assert clock.sleeps == []
    assert seen == [events.RetryExhausted("svc", 1, "ConnectionError", "max_attempts")]


def test_each_delay_is_capped_by_max_delay(mode, clock: FakeClock) -> None:
    script = Script(ConnectionError("down"))
    mode.outcome(protect(mode, script, max_attempts=5, initial=1, exponential_base=10, max_delay=5))
    assert script.calls == 5
    assert clock.sleeps == [1.0, 5.0, 5.0, 5.0]


def test_a_long_run_of_attempts_stays_at_the_cap() -> None:
    retrying = strategy(initial=1, exponential_base=2, max_delay=7)
    # 2.0 ** 5000 overflows a float; the delay is still the cap.
    assert retrying.delay(ConnectionError(), 5000, 7.0) == (7.0, "backoff")


@pytest.mark.parametrize("jitter", ["full", "equal", "decorrelated"])
def test_jitter_stays_within_its_bounds_and_varies(mode, clock: FakeClock, jitter: str) -> None:
    retry._rng.seed(20261123)
    script = Script(ConnectionError("down"))
    protected = protect(
        mode, script, jitter=jitter, max_attempts=9, initial=0.5, exponential_base=2, max_delay=8
    )
    mode.outcome(protected)
    delays = clock.sleeps
    assert len(delays) == 8
    below_cap = [d for d in delays if d < 8.0]
    assert len(set(below_cap)) == len(below_cap) >= 5  # jittered: no two the same
    previous = 0.5
    for n, delay in enumerate(delays):
        ceiling = min(8.0, 0.5 * 2**n)
        if jitter == "full":
            assert 0.0 <= delay <= ceiling
        elif jitter == "equal":
            assert ceiling / 2 <= delay <= ceiling
        else:
            assert 0.5 <= delay <= min(8.0, previous * 3)
        previous = delay
    # The same seed gives the same delays: the generator is the only source of randomness.
    retry._rng.seed(20261123)
    clock.sleeps.clear()
    mode.outcome(protected)
    assert clock.sleeps == delays


def test_full_jitter_is_the_default() -> None:
    assert RetryOptions().jitter == "full"


# -- what is retried -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [ValueError("bad"), TypeError("bug"), AttributeError("bug"), KeyError("k"), RuntimeError("x")],
    ids=lambda e: type(e).__name__,
)
def test_programming_errors_are_never_retried(mode, clock: FakeClock, error: Exception) -> None:
    script = Script(error)
    with capture_events() as seen:
        exc = mode.outcome(protect(mode, script))
    assert exc is error
    assert script.calls == 1
    assert clock.sleeps == []
    assert notes(exc) == []
    assert seen == []


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (httpx_status(503), True),
        (httpx_status(429), True),
        (httpx_status(408), True),
        (httpx_status(404), False),
        (httpx_status(400), False),
        (requests_status(500), True),
        (requests_status(403), False),
        (httpx.ConnectError("refused"), True),
        (requests.ReadTimeout("slow"), True),
    ],
    ids=lambda v: repr(v) if isinstance(v, bool) else f"{type(v).__name__}",
)
def test_http_errors_are_retried_only_when_transient(
    mode, clock: FakeClock, error: Exception, retried: bool
) -> None:
    script = Script(error, "ok")
    outcome = mode.outcome(protect(mode, script))
    if retried:
        assert outcome == "ok"
        assert script.calls == 2
    else:
        assert outcome is error
        assert script.calls == 1


def test_a_non_retryable_error_after_retries_carries_the_history(mode, clock: FakeClock) -> None:
    bug = ValueError("bad payload")
    script = Script(ConnectionError("down"), bug, "never reached")
    with capture_events() as seen:
        exc = mode.outcome(protect(mode, script, initial=0.25))
    assert exc is bug
    assert script.calls == 2
    assert notes(exc) == [
        "buttress retry (svc): attempt 2 raised ValueError, which is not retried: "
        "#1 ConnectionError, backoff 0.25s; #2 ValueError"
    ]
    assert seen.of(events.RetryExhausted) == []


def test_retry_on_network_leaves_http_statuses_alone(mode, clock: FakeClock) -> None:
    unavailable = httpx_status(503)
    script = Script(unavailable)
    assert mode.outcome(protect(mode, script, retry_on="network")) is unavailable
    assert script.calls == 1
    script = Script(ConnectionResetError(104, "reset"), httpx.ReadTimeout("slow"), "ok")
    assert mode.run(protect(mode, script, retry_on="network")) == "ok"
    assert script.calls == 3


def test_retry_on_exception_types(mode, clock: FakeClock) -> None:
    script = Script(KeyError("cache miss"), "ok")
    assert mode.run(protect(mode, script, retry_on=(KeyError, LookupError))) == "ok"
    assert script.calls == 2
    down = ConnectionError("down")
    script = Script(down)
    assert mode.outcome(protect(mode, script, retry_on=(KeyError,))) is down
    assert script.calls == 1


def test_retry_on_a_lone_exception_class_is_that_type_not_a_predicate(
    mode, clock: FakeClock
) -> None:
    # A class is callable: used as a predicate it would return a (truthy) instance for anything.
    down = ConnectionError("down")
    script = Script(down)
    assert mode.outcome(protect(mode, script, retry_on=KeyError)) is down
    assert script.calls == 1
    script = Script(KeyError("k"), "ok")
    assert mode.run(protect(mode, script, retry_on=KeyError)) == "ok"


def test_retry_on_a_predicate(mode, clock: FakeClock) -> None:
    def flaky_only(exc: BaseException) -> bool:
        return "flaky" in str(exc)

    script = Script(RuntimeError("flaky backend"), "ok")
    assert mode.run(protect(mode, script, retry_on=flaky_only)) == "ok"
    assert script.calls == 2
    broken = RuntimeError("broken backend")
    script = Script(broken)
    assert mode.outcome(protect(mode, script, retry_on=flaky_only)) is broken
    assert script.calls == 1


@pytest.mark.parametrize(
    "outcomes", [("a", "b", "ok"), ("a", "b", "c")], ids=["recovers", "gives_up"]
)
def test_the_predicate_runs_once_per_failed_attempt(mode, clock: FakeClock, outcomes) -> None:
    asked: list[str] = []

    def counting(exc: BaseException) -> bool:
        asked.append(str(exc))
        return True

    script = Script(*(o if o == "ok" else ConnectionError(o) for o in outcomes))
    mode.outcome(protect(mode, script, retry_on=counting, max_attempts=3))
    assert script.calls == 3
    assert asked == [o for o in outcomes if o != "ok"]


def test_rejections_are_never_retried_even_when_listed(mode, clock: FakeClock) -> None:
    rejected = CircuitOpenError("open", service="svc", retry_after=2.0)
    script = Script(rejected)
    assert mode.outcome(protect(mode, script, retry_on=(Exception,))) is rejected
    assert script.calls == 1
    assert clock.sleeps == []


def test_retry_rejected_waits_the_rejections_retry_after(mode, clock: FakeClock) -> None:
    script = Script(RateLimitedError("limited", service="svc", retry_after=2.5), "ok")
    with capture_events() as seen:
        assert mode.run(protect(mode, script, retry_rejected=True)) == "ok"
    assert clock.sleeps == [2.5]
    assert seen.of(events.RetryScheduled) == [
        events.RetryScheduled("svc", 1, 2.5, "RateLimitedError", "retry_after")
    ]
    # Capped by max_delay like any delay.
    script = Script(CircuitOpenError("open", service="svc", retry_after=100.0), "ok")
    clock.sleeps.clear()
    assert mode.run(protect(mode, script, retry_rejected=True, max_delay=30)) == "ok"
    assert clock.sleeps == [30.0]


def test_retry_rejected_without_a_retry_after_does_not_retry(mode, clock: FakeClock) -> None:
    rejected = CircuitOpenError("open", service="svc", retry_after=None)
    script = Script(rejected, "ok")
    assert mode.outcome(protect(mode, script, retry_rejected=True)) is rejected
    assert script.calls == 1


@pytest.mark.parametrize(
    "error",
    [asyncio.CancelledError(), KeyboardInterrupt(), SystemExit(3), GeneratorExit()],
    ids=lambda e: type(e).__name__,
)
def test_cancellation_and_exits_pass_through_untouched(
    mode, clock: FakeClock, error: BaseException
) -> None:
    script = Script(ConnectionError("down"), error, "never reached")
    with capture_events() as seen, pytest.raises(type(error)) as raised:
        mode.run(protect(mode, script, retry_on=lambda exc: True))
    assert raised.value is error
    assert script.calls == 2
    assert notes(error) == []
    assert seen.of(events.RetryExhausted) == []
    script = Script(error, "never reached")
    with pytest.raises(type(error)):
        mode.run(protect(mode, script, retry_on=lambda exc: True))
    assert script.calls == 1


def test_a_timeout_from_an_inner_with_timeout_is_retried(mode, clock: FakeClock) -> None:
    script = Script(TimeoutExceededError("slow", service="svc", seconds=1.0), "ok")
    assert mode.run(protect(mode, script)) == "ok"
    assert script.calls == 2


# -- Retry-After -----------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [httpx_status, requests_status])
def test_retry_after_seconds_sets_the_delay(mode, clock: FakeClock, make) -> None:
    script = Script(make(503, {"Retry-After": "7"}), make(429, {"Retry-After": "2"}), "ok")
    with capture_events() as seen:
        assert mode.run(protect(mode, script, initial=0.1)) == "ok"
    assert clock.sleeps == [7.0, 2.0]
    assert [e.reason for e in seen.of(events.RetryScheduled)] == ["retry_after", "retry_after"]


def test_retry_after_http_date_is_read_against_the_clock(mode, clock: FakeClock) -> None:
    when = email.utils.formatdate(clock.wall() + 30, usegmt=True)
    script = Script(httpx_status(503, {"Retry-After": when}), "ok")
    assert mode.run(protect(mode, script)) == "ok"
    assert clock.sleeps == [30.0]


def test_retry_after_is_capped_by_max_delay(mode, clock: FakeClock) -> None:
    script = Script(httpx_status(429, {"Retry-After": "3600"}), "ok")
    assert mode.run(protect(mode, script, max_delay=30)) == "ok"
    assert clock.sleeps == [30.0]


def test_retry_after_can_be_ignored(mode, clock: FakeClock) -> None:
    script = Script(httpx_status(503, {"Retry-After": "60"}), "ok")
    assert mode.run(protect(mode, script, initial=0.2, respect_retry_after=False)) == "ok"
    assert clock.sleeps == [0.2]


def test_without_retry_after_the_backoff_applies(mode, clock: FakeClock) -> None:
    script = Script(httpx_status(503, {"Retry-After": "whenever"}), "ok")
    assert mode.run(protect(mode, script, initial=0.2)) == "ok"
    assert clock.sleeps == [0.2]


# -- deadline --------------------------------------------------------------------------------------


def run_with_deadline(mode, protected: Any, seconds_left: float) -> Any:
    token = _context.deadline.set(buttress._clock.monotonic() + seconds_left)
    try:
        return mode.outcome(protected)
    finally:
        _context.deadline.reset(token)


def test_never_sleeps_past_an_enclosing_deadline(mode, clock: FakeClock) -> None:
    last = ConnectionError("second")
    script = Script(ConnectionError("first"), last, "never reached")
    protected = protect(mode, script, max_attempts=5, initial=0.1, exponential_base=2)
    with capture_events() as seen:
        exc = run_with_deadline(mode, protected, 0.25)
    # 0.1 s fits before the deadline; the next 0.2 s would end at 0.3 s, past it.
    assert exc is last
    assert script.calls == 2
    assert clock.sleeps == [0.1]
    assert seen.of(events.RetryExhausted) == [
        events.RetryExhausted("svc", 2, "ConnectionError", "deadline")
    ]
    assert notes(exc) == [
        "buttress retry (svc): gave up after 2 attempts: the next wait (0.2s) would end past "
        "the enclosing deadline: #1 ConnectionError, backoff 0.1s; #2 ConnectionError"
    ]


def test_a_retry_after_longer_than_the_deadline_gives_up_at_once(mode, clock: FakeClock) -> None:
    busy = httpx_status(503, {"Retry-After": "20"})
    script = Script(busy, "ok")
    exc = run_with_deadline(mode, protect(mode, script), 5.0)
    assert exc is busy
    assert script.calls == 1
    assert clock.sleeps == []


def test_the_deadline_is_seen_in_a_sync_worker_thread(clock: FakeClock) -> None:
    # A sync with_timeout runs the call on a worker thread with a copy of the caller's context.
    script = Script(ConnectionError("first"), ConnectionError("second"), "ok")
    step = link(strategy(max_attempts=5, initial=1.0), lambda args, kwargs: script())
    token = _context.deadline.set(clock.monotonic() + 1.5)
    try:
        context = contextvars.copy_context()
    finally:
        _context.deadline.reset(token)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(context.run, step, (), {})
        with pytest.raises(ConnectionError, match="second"):
            future.result(timeout=10)
    assert script.calls == 2
    assert clock.sleeps == [1.0]


# -- context: attempt() and idempotency_key() ------------------------------------------------------


def test_attempt_and_idempotency_key_inside_a_retried_call(mode, clock: FakeClock) -> None:
    script = Script(ConnectionError("a"), ConnectionError("b"), "ok")
    protected = protect(mode, script)
    assert mode.run(protected) == "ok"
    assert script.attempts == [1, 2, 3]
    key = script.keys[0]
    assert isinstance(key, str)
    assert len(key) == 32
    assert script.keys == [key, key, key]
    # A new logical call gets a new key; outside a call there is none.
    assert mode.run(protected) == "ok"
    assert script.attempts[3:] == [1]
    assert script.keys[3] not in (None, key)
    assert buttress.attempt() == 1
    assert buttress.idempotency_key() is None


def test_concurrent_calls_keep_their_own_attempts(mode, clock: FakeClock) -> None:
    # A shared tenacity object would mix up the state of concurrent calls; each call counts alone.
    seen: list[tuple[int, str | None]] = []

    def body() -> int:
        seen.append((buttress.attempt(), buttress.idempotency_key()))
        if buttress.attempt() < 3:
            raise ConnectionError("not yet")
        return buttress.attempt()

    protected = protect(mode, body, max_attempts=3, initial=0.01)
    assert mode.gather(protected, 16) == [3] * 16
    assert len(seen) == 48
    keys: dict[str | None, list[int]] = {}
    for number, key in seen:
        keys.setdefault(key, []).append(number)
    assert len(keys) == 16
    assert all(sorted(numbers) == [1, 2, 3] for numbers in keys.values())


# -- idempotent=False, shadow mode, testing mode ---------------------------------------------------


def test_not_idempotent_disables_retries(mode, clock: FakeClock) -> None:
    down = ConnectionError("down")
    script = Script(down, "ok")
    with capture_events() as seen:
        assert mode.outcome(protect(mode, script, idempotent=False)) is down
    assert script.calls == 1
    assert clock.sleeps == []
    assert seen == [events.RetryExhausted("svc", 1, "ConnectionError", "not_idempotent")]


def test_shadow_mode_reports_the_retry_it_would_have_made(mode, clock: FakeClock) -> None:
    down = ConnectionError("down")
    script = Script(down, "ok")
    with capture_events() as seen:
        assert mode.outcome(protect(mode, script, run_mode="shadow")) is down
    assert script.calls == 1
    assert clock.sleeps == []
    assert seen == [events.ShadowDecision("svc", "retry", "retry")]
    # Nothing to report for an error it would not retry either.
    with capture_events() as seen:
        assert isinstance(
            mode.outcome(protect(mode, Script(ValueError()), run_mode="shadow")), ValueError
        )
    assert seen == []


def test_testing_mode_skips_the_waits(mode) -> None:
    script = Script(ConnectionError("a"), ConnectionError("b"), "ok")
    started = time.perf_counter()
    with testing.testing_mode():
        assert mode.run(protect(mode, script, initial=20, max_delay=60)) == "ok"
    assert script.calls == 3
    assert time.perf_counter() - started < 1.0


def test_the_first_attempt_does_not_enter_tenacity(mode, clock: FakeClock, monkeypatch) -> None:
    built = strategy()
    copies: list[str] = []
    template = built._retrying  # one template serves def and async def callers
    original = template.copy

    def counting_copy(*args: Any, **kwargs: Any) -> Any:
        copies.append("copy")
        return original(*args, **kwargs)

    monkeypatch.setattr(template, "copy", counting_copy)
    script = Script("ok", ConnectionError("down"), "ok")
    protected = mode.chain(built, mode.define(script))
    assert mode.run(protected) == "ok"
    assert copies == []
    assert mode.run(protected) == "ok"
    assert copies == ["copy"]


def test_disabled_retry_builds_nothing() -> None:
    ctx = BuildContext("svc", RetryOptions(enabled=False), "svc")
    assert retry.build(ctx) is None


# -- through the public decorator ------------------------------------------------------------------


def test_retry_with_backoff_decorator(mode, clock: FakeClock) -> None:
    script = Script(ConnectionError("a"), "ok")
    decorated = buttress.retry_with_backoff(max_attempts=2, jitter="none", initial=0.3)(
        mode.define(script)
    )
    assert mode.run(decorated) == "ok"
    assert clock.sleeps == [0.3]
    bug = KeyError("k")
    script = Script(bug)
    decorated = buttress.retry_with_backoff(retry_on=KeyError, max_attempts=2, jitter="none")(
        mode.define(script)
    )
    assert mode.outcome(decorated) is bug
    assert script.calls == 2


def test_retry_outside_with_timeout_retries_a_timed_out_attempt(mode, clock: FakeClock) -> None:
    latencies = [5.0, 0.0]
    calls: list[int] = []

    if mode.is_async:

        async def op() -> str:
            calls.append(buttress.attempt())
            await buttress._clock.asleep(latencies[len(calls) - 1])
            return "ok"

    else:

        def op() -> str:  # type: ignore[misc]
            calls.append(buttress.attempt())
            buttress._clock.sleep(latencies[len(calls) - 1])
            return "ok"

    decorated = buttress.retry_with_backoff(max_attempts=3, jitter="none", initial=0.1)(
        buttress.with_timeout(seconds=1)(op)
    )
    with capture_events([events.RetryScheduled]) as seen:
        assert mode.run(decorated) == "ok"
    assert calls == [1, 2]
    assert [(e.attempt, e.error_type) for e in seen] == [(1, "TimeoutExceededError")]


def test_retry_inside_with_timeout_stops_before_the_deadline(mode, clock: FakeClock) -> None:
    script = Script(ConnectionError("down"))
    decorated = buttress.with_timeout(seconds=1)(
        buttress.retry_with_backoff(max_attempts=10, jitter="none", initial=0.3)(
            mode.define(script)
        )
    )
    with capture_events([events.RetryExhausted]) as seen:
        exc = mode.outcome(decorated)
    assert isinstance(exc, ConnectionError)
    # 0.3 and 0.6 fit in 1 s; the next 1.2 s would not.
    assert clock.sleeps == [0.3, 0.6]
    assert script.calls == 3
    assert [e.reason for e in seen] == ["deadline"]


# -- which calls are repeated: real clients against a local server --------------------------------


class _Upstream(http.server.BaseHTTPRequestHandler):
    """Answers 503 on /busy, hangs up without an answer on /hangup, stalls on /stall."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the test output is not the place for an access log

    def answer(self) -> None:
        server: Any = self.server
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with server.lock:
            server.seen.append(self.command)
        if self.path == "/hangup":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if self.path == "/stall":
            server.release.wait(5)
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = do_PUT = do_DELETE = do_POST = do_PATCH = answer


@pytest.fixture
def upstream() -> Iterator[Any]:
    server: Any = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    server.daemon_threads = True
    server.seen, server.lock, server.release = [], threading.Lock(), threading.Event()
    server.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def closed_port() -> Iterator[int]:
    # Bound but not listening: every connection attempt is refused, and no one else can take it.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


def clients(mode) -> list[str]:
    """The HTTP clients of this mode; each request raises on an error status, as users do."""
    return ["httpx", "aiohttp"] if mode.is_async else ["httpx", "requests"]


def http_call(mode, library: str, method: str, url: str, **options: Any) -> Any:
    """A protectable function sending ``method url`` with a fresh client, and its call count."""
    headers = options.pop("headers", {})
    read_timeout = options.pop("read_timeout", 5.0)
    calls: list[int] = []

    def send() -> None:
        calls.append(1)
        if library == "httpx":
            with httpx.Client(timeout=httpx.Timeout(5.0, read=read_timeout)) as client:
                client.request(method, url, headers=headers).raise_for_status()
        else:
            response = requests.request(method, url, headers=headers, timeout=(5.0, read_timeout))
            response.raise_for_status()

    async def asend() -> None:
        calls.append(1)
        if library == "httpx":
            timeout = httpx.Timeout(5.0, read=read_timeout)
            async with httpx.AsyncClient(timeout=timeout) as client:
                (await client.request(method, url, headers=headers)).raise_for_status()
        else:
            async with (
                aiohttp.ClientSession() as session,
                session.request(method, url, headers=headers) as response,
            ):
                response.raise_for_status()

    return (asend if mode.is_async else send), calls


def attempts(mode, library: str, method: str, url: str, **options: Any) -> int:
    """How many times a 3-attempt retry sent ``method url`` before giving up."""
    retry_options = {k: options.pop(k) for k in ("idempotent",) if k in options}
    fn, calls = http_call(mode, library, method, url, **options)
    protected = buttress.retry_with_backoff(max_attempts=3, jitter="none", **retry_options)(fn)
    assert isinstance(mode.outcome(protected), Exception)  # each library raises its own type
    return len(calls)


def test_a_post_or_patch_answered_with_an_error_is_not_repeated_by_default(
    mode, upstream, clock: FakeClock
) -> None:
    with capture_events([events.RetryExhausted]) as seen:
        for library in clients(mode):
            for method in ("POST", "PATCH"):
                assert attempts(mode, library, method, upstream.url + "/busy") == 1, library
    assert upstream.seen == ["POST", "PATCH"] * 2
    assert [e.reason for e in seen] == ["not_idempotent"] * 4


def test_idempotent_methods_keyed_posts_and_declared_calls_are_repeated(
    mode, upstream, clock: FakeClock
) -> None:
    busy = upstream.url + "/busy"
    for library in clients(mode):
        for method in ("GET", "PUT", "DELETE"):
            assert attempts(mode, library, method, busy) == 3, (library, method)
        keyed = {"Idempotency-Key": "k1"}
        assert attempts(mode, library, "POST", busy, headers=keyed) == 3, library
        assert attempts(mode, library, "POST", busy, idempotent=True) == 3, library
    assert len(upstream.seen) == 30


def test_a_post_the_server_hung_up_on_is_not_repeated(mode, upstream, clock: FakeClock) -> None:
    # The server read the request, then closed the connection: it may have acted on it.
    # (aiohttp's ServerDisconnectedError does not say which request it was about: see the docs.)
    hangup = upstream.url + "/hangup"
    for library in [c for c in clients(mode) if c != "aiohttp"]:
        assert attempts(mode, library, "POST", hangup) == 1, library
        assert attempts(mode, library, "GET", hangup) == 3, library


@pytest.mark.realtime
def test_a_post_whose_answer_timed_out_is_not_repeated(mode, upstream, clock: FakeClock) -> None:
    stall = upstream.url + "/stall"
    assert attempts(mode, "httpx", "POST", stall, read_timeout=0.1) == 1
    assert attempts(mode, "httpx", "GET", stall, read_timeout=0.1) == 3


def test_a_connection_never_made_is_repeated_even_when_not_idempotent(
    mode, closed_port: int, clock: FakeClock
) -> None:
    url = f"http://127.0.0.1:{closed_port}/"
    with capture_events([events.RetryExhausted]) as seen:
        for library in clients(mode):
            assert attempts(mode, library, "POST", url, idempotent=False) == 3, library
    assert [e.reason for e in seen] == ["max_attempts"] * 2


def test_a_refused_socket_or_redis_connection_is_repeated_even_when_not_idempotent(
    mode, closed_port: int, clock: FakeClock
) -> None:
    import redis
    import redis.asyncio
    import redis.asyncio.retry
    import redis.backoff
    import redis.retry

    calls: list[str] = []

    def refused_socket() -> None:
        calls.append("socket")
        socket.create_connection(("127.0.0.1", closed_port), timeout=5).close()

    def redis_ping() -> None:
        calls.append("redis")
        # redis-py's own retries off, so every attempt is buttress's.
        no_retry = redis.retry.Retry(redis.backoff.NoBackoff(), 0)
        with redis.Redis(port=closed_port, retry=no_retry) as client:
            client.ping()

    async def aredis_ping() -> None:
        calls.append("redis")
        no_retry = redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 0)
        client = redis.asyncio.Redis(port=closed_port, retry=no_retry)
        try:
            await client.ping()
        finally:
            # aclose() came in redis-py 5.0.1 (close() is deprecated since); 5.0 is allowed.
            await getattr(client, "aclose", client.close)()

    bodies = [mode.define(refused_socket), aredis_ping if mode.is_async else redis_ping]
    for body in bodies:
        protected = buttress.retry_with_backoff(max_attempts=3, idempotent=False)(body)
        assert isinstance(mode.outcome(protected), ConnectionError | redis.ConnectionError)
    assert calls == ["socket"] * 3 + ["redis"] * 3


def test_a_later_attempt_that_may_have_reached_the_server_stops_the_retries(
    mode, clock: FakeClock
) -> None:
    request = httpx.Request("POST", "http://127.0.0.1/charges")
    refused = httpx.ConnectError("refused", request=request)
    timed_out = httpx.ReadTimeout("no answer", request=request)
    script = Script(refused, timed_out, "never reached")
    with capture_events([events.RetryExhausted]) as seen:
        assert mode.outcome(protect(mode, script, initial=0.5)) is timed_out
    assert script.calls == 2
    assert seen == [events.RetryExhausted("svc", 2, "ReadTimeout", "not_idempotent")]
    assert notes(timed_out) == [
        "buttress retry (svc): attempt 2 raised ReadTimeout after the request may have reached "
        "the server, and it is not idempotent: #1 ConnectError, backoff 0.5s; #2 ReadTimeout"
    ]


def test_a_rejection_is_repeated_even_when_not_idempotent(mode, clock: FakeClock) -> None:
    # Rejected calls never reached the dependency: waiting out retry_after is always safe.
    script = Script(RateLimitedError("limited", service="svc", retry_after=1.0), "ok")
    assert mode.run(protect(mode, script, retry_rejected=True, idempotent=False)) == "ok"


def test_a_long_run_of_attempts_leaves_a_short_note(mode, clock):
    # 1,100 attempts must not make a note of tens of kilobytes: the first and last are listed.
    # (The retry budget, on by default, would stop such a run at 101 attempts: switched off.)
    fn = buttress.retry_with_backoff(
        max_attempts=1100, jitter="none", initial=0.001, max_delay=0.001, budget=False
    )(mode.define(lambda: (_ for _ in ()).throw(ConnectionError("down"))))
    exc = mode.outcome(fn)
    assert isinstance(exc, ConnectionError)
    (note,) = [n for n in exc.__notes__ if n.startswith("buttress retry")]
    assert "gave up after 1100 attempts" in note
    assert "#1 ConnectionError" in note
    assert "#1100 ConnectionError" in note
    assert "... 1090 more" in note
    assert len(note) < 600
