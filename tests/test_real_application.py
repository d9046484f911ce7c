"""A real application, built as a new user would: FastAPI on uvicorn calling a flaky upstream.

Every test starts two real servers on 127.0.0.1: the *upstream*, a stdlib ``ThreadingHTTPServer``
whose behaviour the test switches (healthy, 503, 503 or 429 with ``Retry-After``, slow, stopped),
and the *service*, a FastAPI app served by a real ``uvicorn.Server`` on its own thread and event
loop. The service calls the upstream through buttress as the docs show: an ``async def`` endpoint
with ``httpx.AsyncClient`` under ``@resilient("upstream")``, a ``def`` endpoint (run in FastAPI's
thread pool) with ``httpx.Client`` under the README's headline stack, a ``POST`` endpoint, two
endpoints that decorate a function per request, ``/health`` mounted as docs/observability.md
says, and ``/metrics`` served by ``prometheus_client``. The test drives the service over HTTP and
checks what a user expects, counting the requests the upstream really received.

Settings come from environment variables (monkeypatch) and ``reload_settings()``, as
docs/configuration.md says. The fake clock cannot drive uvicorn's thread, so the few waits here
are real and short (marked ``realtime``). fastapi and uvicorn come with the ``dev`` extra: without
them these tests are skipped locally and fail under ``CI``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from prometheus_client import make_asgi_app
from prometheus_client.parser import text_string_to_metric_families

import buttress
from buttress import (
    CircuitOpenError,
    RejectedError,
    TimeoutExceededError,
    circuit_breaker,
    config,
    events,
    registry,
    resilient,
    retry_with_backoff,
    with_bulkhead,
    with_timeout,
)
from buttress.health_app import asgi_app

try:
    import fastapi
    import uvicorn
except ImportError as exc:  # checked by the autouse fixture below
    MISSING: str | None = f"{exc.name} is not installed (pip install -e '.[dev]')"
else:
    MISSING = None

DEADLINE = 10.0  # seconds to wait for a server to answer or stop; never reached when all is well
ADMIN_TOKEN = "an-admin-token-long-enough"


@pytest.fixture(autouse=True)
def _real_application_dependencies() -> None:
    if MISSING is not None:
        if os.environ.get("CI"):
            pytest.fail(MISSING + "; CI must run the real-application tests")
        pytest.skip(MISSING)


def _poll(condition: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    """Wait until ``condition()`` holds, checking every few milliseconds, at most ``deadline``."""
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {deadline} s")
        time.sleep(0.005)


def _free_socket() -> socket.socket:
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
    # without it every response waits ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


# --- the flaky upstream ---------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """One request the upstream received."""

    at: float  # time.monotonic()
    method: str
    path: str


class Upstream:
    """A real HTTP server on 127.0.0.1 whose behaviour the test switches.

    ``behaviour``: ``healthy`` (200 JSON), ``503``, ``429`` (both with ``Retry-After`` when
    ``retry_after`` is set), ``slow`` (200 after ``delay`` seconds). ``script`` holds behaviours
    for the next requests, one each, before ``behaviour`` applies again. ``stop()`` closes the
    port (connections are refused); ``start()`` opens the same port again.
    """

    def __init__(self) -> None:
        self.behaviour = "healthy"
        self.retry_after: str | None = None
        self.delay = 0.3
        self.script: list[str] = []
        self.seen: list[Seen] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self._lock = threading.Lock()
        self.port = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, method: str | None = None) -> int:
        with self._lock:
            return sum(1 for s in self.seen if method is None or s.method == method)

    def start(self) -> None:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.0: one request per connection, so a stopped upstream refuses the next
            # request instead of answering it on a kept-alive connection.
            disable_nagle_algorithm = True  # headers and body go out at once

            def do_GET(self) -> None:
                upstream._answer(self)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                upstream._answer(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: the test counts requests itself

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # a burst of connections is not dropped by the backlog
            daemon_threads = False  # stop() joins the handlers: nothing outlives the test

        self._server = Server(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._server.server_close()
            self._server = None

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.seen.append(Seen(time.monotonic(), handler.command, handler.path))
            behaviour = self.script.pop(0) if self.script else self.behaviour
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if behaviour == "slow":
                time.sleep(self.delay)
            status = {"healthy": 200, "slow": 200, "503": 503, "429": 429}[behaviour]
            body = b'{"item": 42}' if status == 200 else b'{"error": "unavailable"}'
            handler.send_response(status)
            handler.send_header("content-type", "application/json")
            handler.send_header("content-length", str(len(body)))
            if status != 200 and self.retry_after is not None:
                handler.send_header("retry-after", self.retry_after)
            handler.end_headers()
            with contextlib.suppress(OSError):  # the client gave up (its timeout fired)
                handler.wfile.write(body)
        finally:
            with self._lock:
                self.in_flight -= 1


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    server.start()
    yield server
    server.stop()


# --- the service: what a user writes --------------------------------------------------------


@dataclass
class Calls:
    """The service's buttress-decorated functions, for calling them directly from the test."""

    fetch_async: Callable[[httpx.AsyncClient], Any]
    fetch_sync: Callable[[], Any]


def build_app(upstream_url: str) -> tuple[Any, Calls]:
    """The service a user would write after reading the README and docs/."""
    sync_client = httpx.Client(base_url=upstream_url, timeout=5)
    clients: dict[str, httpx.AsyncClient] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        clients["upstream"] = httpx.AsyncClient(base_url=upstream_url, timeout=5)
        yield
        await clients["upstream"].aclose()
        sync_client.close()

    app = fastapi.FastAPI(lifespan=lifespan)
    app.add_middleware(AnswerUnexpectedErrors)
    app.mount("/health", asgi_app())  # docs/observability.md: probe /health/
    app.mount("/metrics", make_asgi_app())

    @resilient("upstream")
    async def fetch_async(client: httpx.AsyncClient) -> Any:
        response = await client.get("/items")
        response.raise_for_status()
        return response.json()

    # The README's headline stack, on a def function.
    @circuit_breaker(name="upstream", fail_max=5, timeout=60)
    @retry_with_backoff(max_attempts=3, exponential_base=2)
    @with_timeout(seconds=5)
    @with_bulkhead(limit=50)
    def fetch_sync() -> Any:
        response = sync_client.get("/items")
        response.raise_for_status()
        return response.json()

    @resilient("upstream")
    async def create_order(client: httpx.AsyncClient, order: dict[str, Any]) -> Any:
        response = await client.post("/orders", json=order)
        response.raise_for_status()
        return response.json()

    # A service nobody configured: what @resilient does with no settings at all.
    @resilient("catalog")
    async def fetch_catalog(client: httpx.AsyncClient) -> Any:
        response = await client.get("/catalog")
        response.raise_for_status()
        return response.json()

    @app.get("/async/items")
    async def async_items() -> Any:
        return await fetch_async(clients["upstream"])

    @app.get("/sync/items")
    def sync_items() -> Any:
        return fetch_sync()

    @app.post("/orders")
    async def orders(order: dict[str, Any]) -> Any:
        return await create_order(clients["upstream"], order)

    @app.get("/catalog")
    async def catalog() -> Any:
        return await fetch_catalog(clients["upstream"])

    # Decorated per request, with the caller's time budget: a pattern users write.
    @app.get("/per-request/async")
    async def per_request_async(budget: float) -> Any:
        @resilient("upstream", timeout={"seconds": budget})
        async def call() -> Any:
            response = await clients["upstream"].get("/items")
            response.raise_for_status()
            return response.json()

        return await call()

    @app.get("/per-request/sync")
    def per_request_sync(budget: float) -> Any:
        @circuit_breaker(fail_max=3)
        @with_timeout(seconds=budget)
        def call() -> Any:
            response = sync_client.get("/items")
            response.raise_for_status()
            return response.json()

        return call()

    def answer(status: int, error: BaseException, **extra: Any) -> Any:
        return fastapi.responses.JSONResponse(
            {"error": type(error).__name__, **extra}, status_code=status
        )

    @app.exception_handler(CircuitOpenError)
    async def circuit_open(request: Any, exc: CircuitOpenError) -> Any:
        return answer(503, exc, retry_after=exc.retry_after)

    @app.exception_handler(RejectedError)
    async def rejected(request: Any, exc: RejectedError) -> Any:
        return answer(503, exc)

    @app.exception_handler(TimeoutExceededError)
    async def timed_out(request: Any, exc: TimeoutExceededError) -> Any:
        return answer(504, exc)

    @app.exception_handler(httpx.HTTPError)
    async def upstream_failed(request: Any, exc: httpx.HTTPError) -> Any:
        return answer(502, exc)

    return app, Calls(fetch_async=fetch_async, fetch_sync=fetch_sync)


class AnswerUnexpectedErrors:
    """Turn an exception no handler took into a 500 naming it, as many services do.

    Without it Starlette answers 500 and re-raises, and uvicorn's thread prints the traceback
    while pytest formats the failure: CPython 3.11 parses source with ``ast`` for both, and two
    threads doing so at once can raise ``SystemError`` inside pytest.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        started = False

        async def tracked(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if started or scope["type"] != "http":
                raise
            body = {"error": type(exc).__name__, "detail": str(exc)[:500]}
            await fastapi.responses.JSONResponse(body, status_code=500)(scope, receive, send)


class Service:
    """The app served by a real uvicorn on 127.0.0.1, on its own thread and event loop."""

    def __init__(self, upstream_url: str) -> None:
        self.app, self.calls = build_app(upstream_url)
        self._socket = _free_socket()
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        settings = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            loop="asyncio",
            http="h11",
            ws="none",
            lifespan="on",
        )
        self.server = uvicorn.Server(settings)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )
        self.client = httpx.Client(base_url=self.url, timeout=DEADLINE)

    def start(self) -> None:
        self._thread.start()

        def answers() -> bool:
            if not self._thread.is_alive():
                raise AssertionError("uvicorn stopped while starting")
            try:  # any answer will do: what it says is the tests' business
                httpx.get(f"{self.url}/health/", timeout=DEADLINE)
            except httpx.TransportError:
                return False
            return True

        _poll(answers, "the service answers")

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self._thread.join(DEADLINE)
        self._socket.close()
        assert not self._thread.is_alive(), "uvicorn did not stop"

    def health(self) -> tuple[int, dict[str, Any]]:
        response = self.client.get("/health/")
        return response.status_code, response.json()

    def metric(self, name: str, **labels: str) -> float | None:
        """The value of one sample on ``/metrics/`` (``None`` when the series is absent)."""
        text = self.client.get("/metrics/").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        return None

    def label_values(self, label: str, prefix: str = "buttress_") -> set[str]:
        text = self.client.get("/metrics/").text
        return {
            sample.labels[label]
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name.startswith(prefix) and label in sample.labels
        }


# Quick retries for every test (a real backoff would only slow the suite); a circuit that stays
# open long enough not to move during a test unless the test shortens it.
BASE_SETTINGS = {
    "BUTTRESS_SERVICES__UPSTREAM__RETRY__INITIAL": "0.005",
    "BUTTRESS_SERVICES__UPSTREAM__RETRY__MAX_DELAY": "0.02",
    "BUTTRESS_SERVICES__UPSTREAM__CIRCUIT_BREAKER__TIMEOUT": "30",
}


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """``environment(VAR=value, ...)``: the process environment buttress reads, then applied.

    Every ``BUTTRESS_*``/``FF_*`` variable of the machine is removed first. By default the
    variables are applied with ``reload_settings()``; ``fresh=True`` drops the loaded settings
    instead, so the next call loads them as in a process that just started.
    """

    def apply(*, fresh: bool = False, **variables: str) -> None:
        for name in list(os.environ):
            if name.upper().startswith(("BUTTRESS_", "FF_ENABLE_")):
                monkeypatch.delenv(name)
        if fresh:  # before the variables are set: reading SNAPSHOT may load settings
            monkeypatch.delattr(config, "SNAPSHOT", raising=False)
        for name, value in {**BASE_SETTINGS, **variables}.items():
            monkeypatch.setenv(name, value)
        if not fresh:
            buttress.reload_settings()

    yield apply
    monkeypatch.undo()
    buttress.reload_settings()


@pytest.fixture
def serve(upstream: Upstream) -> Iterator[Callable[[], Service]]:
    """``serve()`` starts the service (after the test set its environment); stopped afterwards."""
    started: list[Service] = []

    def start() -> Service:
        service = Service(upstream.url)
        started.append(service)
        service.start()
        return service

    yield start
    for service in started:
        service.stop()


@pytest.fixture
def service(environment: Callable[..., None], serve: Callable[[], Service]) -> Service:
    environment()
    return serve()


def _circuit(service: Service) -> dict[str, Any]:
    status, body = service.health()
    return dict(body["circuits"]["upstream"], http_status=status, status=body["status"])


# --- healthy, outage, recovery --------------------------------------------------------------


@pytest.mark.parametrize("path", ["/async/items", "/sync/items"])
def test_healthy_calls_go_through(service: Service, upstream: Upstream, path: str) -> None:
    for _ in range(5):
        response = service.client.get(path)
        assert response.status_code == 200
        assert response.json() == {"item": 42}
    assert upstream.count() == 5
    status, body = service.health()
    assert status == 200
    assert body["status"] == "healthy"
    assert body["circuits"]["upstream"]["state"] == "closed"


# Canonical order (resilient): retry outside the breaker, so fail_max attempts open it. The
# README's stack puts the breaker outside retry: fail_max calls of max_attempts attempts each.
MOST_UPSTREAM_REQUESTS = {"/async/items": 5, "/sync/items": 5 * 3}


@pytest.mark.parametrize("path", ["/async/items", "/sync/items"])
def test_an_outage_opens_the_circuit_and_the_service_answers_without_calling_upstream(
    service: Service, upstream: Upstream, path: str
) -> None:
    upstream.behaviour = "503"
    answers = [service.client.get(path) for _ in range(20)]

    assert upstream.count() <= MOST_UPSTREAM_REQUESTS[path]
    assert [r.status_code for r in answers[-10:]] == [503] * 10
    assert {r.json()["error"] for r in answers[-10:]} == {"CircuitOpenError"}
    assert 0 < answers[-1].json()["retry_after"] <= 30
    seen = upstream.count()
    for _ in range(10):
        assert service.client.get(path).status_code == 503
    assert upstream.count() == seen  # an open circuit sends nothing upstream
    circuit = _circuit(service)
    # A service of normal criticality: degraded, still in rotation (docs/observability.md).
    assert (circuit["state"], circuit["http_status"], circuit["status"]) == (
        "open",
        200,
        "degraded",
    )


def test_a_refused_connection_opens_the_circuit_too(service: Service, upstream: Upstream) -> None:
    upstream.stop()
    answers = [service.client.get("/async/items") for _ in range(5)]
    assert answers[0].status_code == 502
    assert answers[0].json()["error"] == "ConnectError"
    assert answers[-1].status_code == 503
    assert answers[-1].json()["error"] == "CircuitOpenError"
    assert _circuit(service)["state"] == "open"


@pytest.mark.realtime
def test_a_slow_upstream_times_out_then_the_circuit_answers_at_once(
    environment: Callable[..., None], serve: Callable[[], Service], upstream: Upstream
) -> None:
    environment(BUTTRESS_SERVICES__UPSTREAM__TIMEOUT__SECONDS="0.05")
    service = serve()
    upstream.behaviour = "slow"
    upstream.delay = 0.3
    first = service.client.get("/async/items")
    assert first.status_code == 504  # three attempts of 0.05 s, each timed out
    answers = [service.client.get("/async/items") for _ in range(10)]
    assert answers[-1].json()["error"] == "CircuitOpenError"
    assert upstream.count() <= 5
    started = time.monotonic()
    for _ in range(10):
        assert service.client.get("/async/items").status_code == 503
    # Ten rejected requests take less than one slow upstream answer, let alone ten timeouts.
    assert time.monotonic() - started < upstream.delay


@pytest.mark.realtime
def test_health_reports_an_idle_open_circuit_as_ready_to_probe_and_it_closes_when_upstream_heals(
    environment: Callable[..., None], serve: Callable[[], Service], upstream: Upstream
) -> None:
    environment(
        BUTTRESS_SERVICES__UPSTREAM__CIRCUIT_BREAKER__TIMEOUT="0.5",
        BUTTRESS_SERVICES__UPSTREAM__CRITICALITY="critical",
    )
    service = serve()
    upstream.behaviour = "503"
    not_before = time.monotonic()  # the circuit opens after this
    for _ in range(3):
        service.client.get("/async/items")
    circuit = _circuit(service)
    assert circuit["state"] == "open"
    assert (circuit["http_status"], circuit["status"]) == (503, "critical")
    assert service.metric("buttress_circuit_breaker_state", service="upstream", state="open") == 1
    seen = upstream.count()

    # No traffic at all: only health checks, as from a load balancer that dropped the instance.
    _poll(lambda: _circuit(service)["state"] == "half_open", "half_open", deadline=1.5)
    assert time.monotonic() - not_before >= 0.5
    circuit = _circuit(service)
    assert (circuit["http_status"], circuit["status"]) == (200, "degraded")
    assert (
        service.metric("buttress_circuit_breaker_state", service="upstream", state="half_open") == 1
    )
    assert upstream.count() == seen  # health reads the circuit; it never probes the upstream

    upstream.behaviour = "healthy"
    assert service.client.get("/async/items").status_code == 200  # the trial call
    circuit = _circuit(service)
    assert (circuit["state"], circuit["http_status"], circuit["status"]) == (
        "closed",
        200,
        "healthy",
    )
    assert service.metric("buttress_circuit_breaker_state", service="upstream", state="closed") == 1


def test_metrics_count_calls_by_service_and_outcome(service: Service, upstream: Upstream) -> None:
    def calls(outcome: str) -> float:
        return service.metric("buttress_calls_total", service="upstream", outcome=outcome) or 0.0

    def openings() -> float:
        return (
            service.metric(
                "buttress_circuit_breaker_transitions_total",
                service="upstream",
                state="open",
                reason="fail_max",
            )
            or 0.0
        )

    before = {outcome: calls(outcome) for outcome in ("success", "failure", "rejected")}
    opened_before = openings()
    for path in ["/async/items", "/sync/items"] * 3:
        assert service.client.get(path).status_code == 200
    upstream.behaviour = "503"
    for _ in range(8):
        service.client.get("/async/items")

    assert calls("success") - before["success"] == 6
    # The first call failed 3 times; the second failed twice, which opened the circuit, and its
    # third attempt was rejected: so were the 6 calls after it.
    assert calls("failure") - before["failure"] == 1
    assert calls("rejected") - before["rejected"] == 7
    assert service.metric("buttress_circuit_breaker_state", service="upstream", state="open") == 1
    assert service.metric("buttress_circuit_breaker_state", service="upstream", state="closed") == 0
    assert openings() - opened_before == 1


# --- retries: what is repeated, and how long it waits ---------------------------------------


def test_a_post_that_got_a_503_is_not_retried_a_get_is(
    service: Service, upstream: Upstream
) -> None:
    upstream.behaviour = "503"
    assert service.client.post("/orders", json={"sku": "a-1"}).status_code == 502
    assert upstream.count("POST") == 1  # it may have reached the server: never sent twice

    assert service.client.get("/async/items").status_code == 502
    assert upstream.count("GET") == 3


def test_a_post_whose_connection_was_refused_is_retried(
    service: Service, upstream: Upstream
) -> None:
    # A connection that was never made carried no request: repeating it is always safe.
    upstream.stop()
    retried: list[str] = []

    def bring_the_upstream_back(event: events.RetryScheduled) -> None:
        retried.append(event.error_type)
        upstream.start()  # listening again (same port) before the retry is sent

    unsubscribe = events.subscribe(bring_the_upstream_back, [events.RetryScheduled])
    try:
        response = service.client.post("/orders", json={"sku": "a-1"})
    finally:
        unsubscribe()
    assert response.status_code == 200
    assert retried == ["ConnectError"]
    assert upstream.count("POST") == 1


@pytest.mark.realtime
@pytest.mark.parametrize("status", ["503", "429"])
def test_retry_after_sets_the_wait_before_the_next_attempt(
    environment: Callable[..., None], serve: Callable[[], Service], upstream: Upstream, status: str
) -> None:
    environment(BUTTRESS_SERVICES__UPSTREAM__RETRY__MAX_DELAY="1")
    service = serve()
    upstream.script = [status]
    upstream.retry_after = "0.2"
    response = service.client.get("/async/items")
    assert response.status_code == 200
    first, second = upstream.seen
    assert second.at - first.at >= 0.18  # the server's wait, not the 5 ms backoff


def test_rate_limited_answers_do_not_open_the_circuit(service: Service, upstream: Upstream) -> None:
    upstream.behaviour = "429"
    upstream.retry_after = "0"
    for _ in range(4):  # 12 answers of 429, more than fail_max
        assert service.client.get("/async/items").status_code == 502
    assert upstream.count() == 12
    assert _circuit(service)["state"] == "closed"


# --- settings a user sets -------------------------------------------------------------------


def test_the_admin_token_in_the_environment_does_not_break_calls_and_guards_admin_routes(
    environment: Callable[..., None], serve: Callable[[], Service], upstream: Upstream
) -> None:
    environment(fresh=True, BUTTRESS_ADMIN_TOKEN=ADMIN_TOKEN)  # as in a process just started
    service = serve()
    assert service.client.get("/async/items").json() == {"item": 42}
    assert service.client.get("/sync/items").json() == {"item": 42}
    assert service.health()[0] == 200

    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    assert service.client.post("/health/circuits/upstream/force_open").status_code == 401
    response = service.client.post("/health/circuits/upstream/force_open", headers=admin)
    assert response.status_code == 200
    assert service.client.get("/async/items").status_code == 503
    assert service.client.post("/health/circuits/upstream/reset", headers=admin).status_code == 200
    assert service.client.get("/async/items").status_code == 200
    assert upstream.count() == 3


@pytest.mark.parametrize("path", ["/async/items", "/sync/items"])
def test_the_kill_switch_sends_calls_straight_through(
    environment: Callable[..., None],
    serve: Callable[[], Service],
    upstream: Upstream,
    path: str,
) -> None:
    environment(FF_ENABLE_RESILIENCE_PATTERNS="false")
    service = serve()
    upstream.behaviour = "503"
    answers = [service.client.get(path) for _ in range(10)]
    assert {r.status_code for r in answers} == {502}  # never a circuit answer
    assert upstream.count() == 10  # one request per call: no retry, no breaker
    status, body = service.health()
    assert (status, body["enabled"]) == (200, False)


def test_the_kill_switch_beats_an_invalid_setting(
    environment: Callable[..., None], serve: Callable[[], Service], upstream: Upstream
) -> None:
    environment(
        fresh=True,
        FF_ENABLE_RESILIENCE_PATTERNS="false",
        BUTTRESS_SERVICES__UPSTREAM__RETRY__MAX_ATEMPTS="2",
    )
    service = serve()
    assert service.client.get("/async/items").json() == {"item": 42}
    assert service.client.get("/sync/items").json() == {"item": 42}
    assert upstream.count() == 2
    status, body = service.health()
    assert (status, body["enabled"]) == (200, False)


@pytest.mark.realtime
def test_an_unconfigured_service_serves_a_burst_of_concurrent_requests(
    service: Service, upstream: Upstream
) -> None:
    upstream.behaviour = "slow"
    upstream.delay = 0.3

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=service.url, timeout=DEADLINE) as client:
            answers = await asyncio.gather(*(client.get("/catalog") for _ in range(20)))
        return [a.status_code for a in answers]

    statuses = asyncio.run(burst())
    assert statuses == [200] * 20
    assert upstream.most_in_flight > 10  # they did overlap


# --- many event loops, and per-request decoration -------------------------------------------


def test_one_circuit_serves_uvicorns_loop_the_tests_loops_and_threads(
    service: Service, upstream: Upstream
) -> None:
    calls = service.calls

    async def direct(n: int) -> list[Any]:
        async with httpx.AsyncClient(base_url=upstream.url, timeout=DEADLINE) as client:
            return await asyncio.gather(*(calls.fetch_async(client) for _ in range(n)))

    async def over_http(n: int) -> list[int]:
        async with httpx.AsyncClient(base_url=service.url, timeout=DEADLINE) as client:
            paths = ["/async/items", "/sync/items"] * (n // 2)
            answers = await asyncio.gather(*(client.get(p) for p in paths))
        return [a.status_code for a in answers]

    def threads(n: int) -> list[Any]:
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(lambda _: calls.fetch_sync(), range(n)))

    # Three fresh event loops of the test, uvicorn's loop, FastAPI's worker threads and threads
    # of the test, all through the same breaker and bulkhead, at the same time.
    with ThreadPoolExecutor(3) as pool:
        on_loops = pool.submit(asyncio.run, direct(10))
        over_uvicorn = pool.submit(asyncio.run, over_http(20))
        on_threads = pool.submit(threads, 10)
    assert on_loops.result() == [{"item": 42}] * 10
    assert over_uvicorn.result() == [200] * 20
    assert on_threads.result() == [{"item": 42}] * 10
    assert asyncio.run(direct(5)) == [{"item": 42}] * 5  # a loop started after the others ended
    assert upstream.count() == 45

    # The circuit opened by requests on uvicorn's loop rejects calls on the test's loops.
    upstream.behaviour = "503"
    for _ in range(3):
        service.client.get("/async/items")
    assert _circuit(service)["state"] == "open"
    seen = upstream.count()
    with pytest.raises(CircuitOpenError):
        asyncio.run(direct(1))
    with pytest.raises(CircuitOpenError):
        calls.fetch_sync()
    assert upstream.count() == seen


def _live_stacks() -> int:
    """The decorated functions alive (each one's stack is known to the registry, weakly)."""
    return sum(ref() is not None for ref in registry._everyone)


def _options_cache_sizes() -> dict[str, int]:
    views = config.SNAPSHOT.service.__self__  # type: ignore[attr-defined]
    return {name: len(view._cache) for name, view in dict(views).items()}


# 500 requests, each decorating its function anew with its own time budget.
PER_REQUEST_ASYNC = 400
PER_REQUEST_SYNC = 100
# A bounded cache keeps a few hundred resolved options at most (1 to 2 KB each), not one per
# distinct budget a caller ever sent.
MOST_CACHED_OPTIONS = 300


def test_decorating_per_request_keeps_nothing_behind(service: Service, upstream: Upstream) -> None:
    async def requests(path: str, budgets: list[float]) -> list[int]:
        limit = asyncio.Semaphore(8)
        async with httpx.AsyncClient(base_url=service.url, timeout=DEADLINE) as client:

            async def one(budget: float) -> int:
                async with limit:
                    response = await client.get(path, params={"budget": budget})
                    return response.status_code

            return await asyncio.gather(*(one(b) for b in budgets))

    stacks = _live_stacks()
    labels = service.label_values("service")
    # Every request gives its own budget: that many distinct code arguments.
    budgets = [1 + i / 10_000 for i in range(PER_REQUEST_ASYNC)]
    assert asyncio.run(requests("/per-request/async", budgets)) == [200] * PER_REQUEST_ASYNC
    budgets = budgets[:PER_REQUEST_SYNC]
    assert asyncio.run(requests("/per-request/sync", budgets)) == [200] * PER_REQUEST_SYNC
    assert upstream.count() == PER_REQUEST_ASYNC + PER_REQUEST_SYNC
    gc.collect()

    # The per-request sync stack names no service: its breaker is private to each decoration
    # and goes with it. Named services keep one instance each.
    assert sorted(registry.instances("circuit_breaker")) == ["upstream"]
    assert len(registry._instances) <= 3  # upstream's breaker, bulkhead (and rate limiter)
    # No decoration outlives its request (at most as many stacks as before: earlier tests' apps
    # may be collected meanwhile).
    assert _live_stacks() <= stacks
    # One metrics series per service, whatever the number of decorations.
    unnamed = f"{__name__}.build_app.<locals>.per_request_sync.<locals>.call"
    assert service.label_values("service") - labels <= {"upstream", unnamed}
    sizes = _options_cache_sizes()
    assert max(sizes.values()) <= MOST_CACHED_OPTIONS, sizes
