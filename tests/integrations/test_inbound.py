"""The inbound middleware (ASGI and WSGI): the caller's deadline, expired work, rejections.

Most tests call the middleware directly (an ASGI/WSGI call is a function call) on the fake
clock; the chain test runs three real uvicorn servers on loopback and the real clock.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn

import buttress
from buttress.exceptions import (
    BulkheadFullError,
    CircuitOpenError,
    ConfigurationError,
    RateLimitedError,
)
from buttress.integrations.asgi import ResilienceMiddleware as AsgiMiddleware
from buttress.integrations.httpx import AsyncResilientTransport
from buttress.integrations.wsgi import ResilienceMiddleware as WsgiMiddleware
from buttress.testing import FakeClock


# -- calling the middleware directly -------------------------------------------------------------
def asgi_call(app: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    asyncio.run(app(scope, receive, send))
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


def wsgi_call(app: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    started: list[Any] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        started.append((status, headers))
        return lambda data: None

    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/",
        **{"HTTP_" + k.upper().replace("-", "_"): v for k, v in (headers or {}).items()},
    }
    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        getattr(result, "close", lambda: None)()
    status, response_headers = started[0]
    return int(status.split()[0]), dict(response_headers), body


def asgi_app(behaviour: Callable[[], bytes]) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = behaviour()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    return AsgiMiddleware(app)


def wsgi_app(behaviour: Callable[[], bytes]) -> Any:
    def app(environ: Any, start_response: Any) -> Any:
        body = behaviour()
        start_response("200 OK", [])
        # The body is produced lazily too: the deadline must still hold while it is iterated.
        yield body
        yield repr(buttress.remaining()).encode()

    return WsgiMiddleware(app)


@pytest.fixture(params=["asgi", "wsgi"])
def serve(request: pytest.FixtureRequest) -> Any:
    """``serve(behaviour, headers)`` -> (status, headers, body) through the ASGI or WSGI twin."""

    def run(behaviour: Callable[[], bytes], headers: dict[str, str] | None = None) -> Any:
        if request.param == "asgi":
            return asgi_call(asgi_app(behaviour), headers)
        status, answer_headers, body = wsgi_call(wsgi_app(behaviour), headers)
        return status, answer_headers, body

    run.kind = request.param  # type: ignore[attr-defined]
    return run


def remaining() -> bytes:
    return repr(buttress.remaining()).encode()


def test_the_callers_deadline_is_the_requests(serve: Any, clock: FakeClock) -> None:
    status, _, body = serve(remaining, {"X-Buttress-Deadline-Ms": "1500"})
    assert status == 200
    assert body.startswith(b"1.5")
    if serve.kind == "wsgi":
        assert body == b"1.51.5"  # and still while the body is iterated


def test_no_header_no_deadline(serve: Any, clock: FakeClock) -> None:
    assert serve(remaining)[2].startswith(b"None")


@pytest.mark.parametrize("value", ["soon", "nan", "inf", "-inf", "", "1,5"])
def test_an_unreadable_header_is_ignored(serve: Any, clock: FakeClock, value: str) -> None:
    status, _, body = serve(remaining, {"X-Buttress-Deadline-Ms": value})
    assert status == 200
    assert body.startswith(b"None")


def test_a_deadline_said_twice_is_read_alike_by_both_twins(clock: FakeClock) -> None:
    # A WSGI server joins the two lines ("250,90000": unreadable, so no deadline); the ASGI twin
    # took the first line alone, so one request had a deadline on one server and none on another.
    lines = [(b"x-buttress-deadline-ms", b"250"), (b"x-buttress-deadline-ms", b"90000")]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/", "headers": lines}
    asyncio.run(asgi_app(remaining)(scope, receive, send))
    joined = wsgi_call(wsgi_app(remaining), {"X-Buttress-Deadline-Ms": "250,90000"})
    assert sent[1]["body"] == b"None" == joined[2][: len(b"None")]


def test_a_huge_deadline_is_capped_at_a_day(serve: Any, clock: FakeClock) -> None:
    assert serve(remaining, {"X-Buttress-Deadline-Ms": "1e300"})[2].startswith(b"86400.0")


@pytest.mark.parametrize("value", ["0", "-250"])
def test_expired_work_is_rejected_without_running(serve: Any, clock: FakeClock, value: str) -> None:
    ran: list[bool] = []

    def behaviour() -> bytes:
        ran.append(True)
        return b"ran"

    status, _, body = serve(behaviour, {"X-Buttress-Deadline-Ms": value})
    assert status == 504
    assert body == b"deadline already passed\n"
    assert ran == []


@pytest.mark.parametrize(
    ("error", "status", "retry_after"),
    [
        (CircuitOpenError("open", service="billing", retry_after=12.2), 503, "13"),
        (BulkheadFullError("full", service="billing"), 503, None),
        (RateLimitedError("slow down", service="billing", retry_after=0.4), 429, "1"),
        (CircuitOpenError("open", service="billing", retry_after=-3.0), 503, "0"),
    ],
)
def test_an_escaping_rejection_becomes_503_or_429(
    serve: Any, clock: FakeClock, error: Exception, status: int, retry_after: str | None
) -> None:
    def behaviour() -> bytes:
        raise error

    answer_status, headers, body = serve(behaviour)
    assert answer_status == status
    assert headers.get("retry-after") == retry_after
    assert type(error).__name__.encode() in body


@pytest.mark.parametrize("value", [None, "", 5, "X Budget", "X-Budget:", "Budget-\u00e9"])
def test_a_deadline_header_that_is_no_header_name_fails_at_construction(value: object) -> None:
    # A space, a colon or a non-ASCII letter could never arrive as that header; "" never matches.
    for middleware in (AsgiMiddleware, WsgiMiddleware):
        with pytest.raises(ConfigurationError, match="deadline_header") as info:
            middleware(lambda *args: None, deadline_header=value)  # type: ignore[arg-type]
        assert info.value.errors[0][:2] == ("deadline_header", "code")


def test_the_deadline_header_name_is_configurable(clock: FakeClock) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": remaining()})

    wrapped = AsgiMiddleware(app, deadline_header="Request-Budget-Ms")
    assert asgi_call(wrapped, {"Request-Budget-Ms": "250"})[2] == b"0.25"
    assert asgi_call(wrapped, {"X-Buttress-Deadline-Ms": "250"})[2] == b"None"


def test_a_rejection_after_the_answer_started_propagates(clock: FakeClock) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise CircuitOpenError("open", service="billing")

    with pytest.raises(CircuitOpenError):
        asgi_call(AsgiMiddleware(app))


def test_the_inbound_deadline_bounds_the_retries(clock: FakeClock) -> None:
    # 150 ms left: the retry's backoff (initial 0.1, no jitter) fits once, not twice.
    attempts: list[int] = []

    @buttress.retry_with_backoff(max_attempts=5, jitter="none", initial=0.1)
    def flaky() -> bytes:
        attempts.append(buttress.attempt())
        raise ConnectionError("down")

    def behaviour() -> bytes:
        try:
            return flaky()
        except ConnectionError:
            return repr(attempts).encode()

    assert asgi_call(asgi_app(behaviour), {"X-Buttress-Deadline-Ms": "150"})[2] == b"[1, 2]"


# -- three real services in a chain -----------------------------------------------------------
class Hop:
    """An ASGI service under uvicorn that reports the budget it got and calls the next hop."""

    def __init__(self, name: str, next_url: str | None) -> None:
        transport = AsyncResilientTransport(f"hop-{name}")

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return
            headers = dict(scope["headers"])
            got = headers.get(b"x-buttress-deadline-ms", b"none").decode()
            await asyncio.sleep(0.05)  # some work before the next call: the budget shrinks
            chain = [got]
            if next_url is not None:
                async with httpx.AsyncClient(transport=transport) as client:
                    chain += (await client.get(next_url)).json()
            body = ("[" + ",".join(f'"{c}"' for c in chain) + "]").encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}/"
        config = uvicorn.Config(
            AsgiMiddleware(app),
            log_level="warning",
            access_log=False,
            loop="asyncio",
            http="h11",
            ws="none",
            lifespan="off",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )
        self.thread.start()
        while not self.server.started:
            assert self.thread.is_alive(), "uvicorn stopped while starting"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)
        self.socket.close()


@pytest.fixture
def chain() -> Iterator[str]:
    c = Hop("c", None)
    b = Hop("b", c.url)
    a = Hop("a", b.url)
    yield a.url
    for hop in (a, b, c):
        hop.stop()


@pytest.mark.realtime
def test_a_deadline_shrinks_hop_by_hop(chain: str) -> None:
    answer = httpx.get(chain, headers={"X-Buttress-Deadline-Ms": "1000"}, timeout=5)
    budgets = [int(b) for b in answer.json()]
    assert budgets[0] == 1000
    # Each hop spent at least its 50 ms of work before calling the next.
    assert budgets[0] - 50 >= budgets[1] >= budgets[2] + 50 > 0
