"""The HTTP client integrations against a real server on 127.0.0.1.

Every behaviour runs for each client: httpx sync and async, requests, aiohttp (the session
wrapper, and its middleware where aiohttp has them). Waits go through the fake clock.
"""

from __future__ import annotations

import asyncio
import email.utils
from collections.abc import Callable
from typing import Any

import aiohttp
import httpx
import pytest
import requests

import buttress
from buttress import events, registry
from buttress.exceptions import CircuitOpenError, ConfigurationError, RejectedError
from buttress.integrations import aiohttp as b_aiohttp
from buttress.integrations import httpx as b_httpx
from buttress.integrations import requests as b_requests
from buttress.testing import FakeClock, capture_events

Upstream = Any  # the conftest's scripted server (its fixtures hand it over)

HAS_MIDDLEWARES = tuple(int(p) for p in aiohttp.__version__.split(".")[:2]) >= (3, 12)

CLIENTS = ["httpx", "httpx-async", "requests", "aiohttp"] + (
    ["aiohttp-middleware"] if HAS_MIDDLEWARES else []
)


class Result:
    def __init__(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.status = status
        self.body = body
        self.headers = headers


def send(
    client: str,
    service: str,
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    **options: Any,
) -> Result:
    """One request through ``client``'s integration for ``service``; the answer, read."""
    if client == "httpx":
        with httpx.Client(transport=_transport(client, service, options)) as c:
            r = c.request(method, url, headers=headers, content=body)
            return Result(r.status_code, r.content, dict(r.headers))
    if client == "httpx-async":

        async def go() -> Result:
            async with httpx.AsyncClient(transport=_transport(client, service, options)) as c:
                r = await c.request(method, url, headers=headers, content=body)
                return Result(r.status_code, r.content, dict(r.headers))

        return asyncio.run(go())
    if client == "requests":
        with requests.Session() as s:
            s.mount("http://", _transport(client, service, options))
            r = s.request(method, url, headers=headers, data=body)
            return Result(r.status_code, r.content, dict(r.headers))

    async def go_aiohttp() -> Result:
        if client == "aiohttp":
            async with aiohttp.ClientSession() as session:
                wrapper = _transport(client, service, options, session=session)
                async with wrapper.request(method, url, headers=headers, data=body) as r:
                    return Result(r.status, await r.read(), dict(r.headers))
        async with aiohttp.ClientSession(
            middlewares=(_transport(client, service, options),)
        ) as session:
            async with session.request(method, url, headers=headers, data=body) as r:
                return Result(r.status, await r.read(), dict(r.headers))

    return asyncio.run(go_aiohttp())


# Integration objects are kept per test and service, so per-host state persists across calls.
_objects: dict[tuple[str, str, str], Any] = {}


def _transport(client: str, service: str, options: dict[str, Any], **extra: Any) -> Any:
    key = (client, service, repr(sorted(options.items())))
    made = _objects.get(key)
    if client == "aiohttp":
        if made is None:
            made = _objects[key] = b_aiohttp.ResilientSession(service, **options)
        # Each send runs its own event loop, so its own session; the wrapper (and the per-host
        # state it holds) lives on across them.
        made._session = extra["session"]
        return made
    if made is None:
        made = {
            "httpx": lambda: b_httpx.ResilientTransport(service, **options),
            "httpx-async": lambda: b_httpx.AsyncResilientTransport(service, **options),
            "requests": lambda: b_requests.ResilientAdapter(service, **options),
            "aiohttp-middleware": lambda: b_aiohttp.ResilientMiddleware(service, **options),
        }[client]()
        _objects[key] = made
    return made


@pytest.fixture(autouse=True)
def _forget_objects() -> Any:
    _objects.clear()
    yield
    _objects.clear()


@pytest.fixture(params=CLIENTS)
def client(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    def configure(**values: str) -> None:
        for key, value in values.items():
            monkeypatch.setenv(f"BUTTRESS_SERVICES__{key.upper()}", value)
        buttress.reload_settings()

    yield configure
    monkeypatch.undo()
    buttress.reload_settings()


def test_transient_responses_are_retried_and_the_good_one_returned(
    client: str, upstream: Upstream, clock: FakeClock
) -> None:
    upstream.then(503, body=b"busy").then(500).then(200, body=b"fine")
    with capture_events([events.RetryScheduled]) as seen:
        answer = send(client, "billing", "GET", upstream.url + "/a")
    assert (answer.status, answer.body) == (200, b"fine")
    assert len(upstream.seen) == 3
    assert [e.attempt for e in seen] == [1, 2]
    assert [e.error_type for e in seen] == ["FailedResponse", "FailedResponse"]


def test_the_last_transient_response_is_returned_when_attempts_run_out(
    client: str, upstream: Upstream, clock: FakeClock
) -> None:
    upstream.then(503).then(502).then(500, body=b"last")
    answer = send(client, "billing", "GET", upstream.url + "/a")
    assert (answer.status, answer.body) == (500, b"last")
    assert len(upstream.seen) == 3


def test_on_exhausted_raise_raises_the_clients_own_error(
    client: str, upstream: Upstream, clock: FakeClock
) -> None:
    upstream.then(503).then(503).then(503)
    expected = {
        "httpx": httpx.HTTPStatusError,
        "httpx-async": httpx.HTTPStatusError,
        "requests": requests.HTTPError,
        "aiohttp": aiohttp.ClientResponseError,
        "aiohttp-middleware": aiohttp.ClientResponseError,
    }[client]
    with pytest.raises(expected) as raised:
        send(client, "billing", "GET", upstream.url + "/a", on_exhausted="raise")
    assert "503" in str(raised.value)
    assert len(upstream.seen) == 3


def test_non_transient_responses_are_answers(
    client: str, upstream: Upstream, clock: FakeClock
) -> None:
    upstream.then(404, body=b"no such thing")
    answer = send(client, "billing", "GET", upstream.url + "/a")
    assert (answer.status, answer.body) == (404, b"no such thing")
    assert len(upstream.seen) == 1
    assert clock.sleeps == []


def test_post_is_not_retried_without_an_idempotency_key(
    client: str, upstream: Upstream, clock: FakeClock
) -> None:
    upstream.then(503).then(200)
    answer = send(client, "billing", "POST", upstream.url + "/pay", body=b"{}")
    assert answer.status == 503
    assert len(upstream.seen) == 1


def test_post_with_an_idempotency_key_is_retried(
    client: str, upstream: Upstream, clock: FakeClock
) -> None:
    upstream.then(503).then(200, body=b"paid")
    answer = send(
        client,
        "billing",
        "POST",
        upstream.url + "/pay",
        headers={"Idempotency-Key": "k-1"},
        body=b"{}",
    )
    assert (answer.status, answer.body) == (200, b"paid")
    assert [s.headers.get("Idempotency-Key") for s in upstream.seen] == ["k-1", "k-1"]
    assert [s.body for s in upstream.seen] == [b"{}", b"{}"]


def test_idempotency_key_option_sends_one_key_for_every_attempt(
    client: str, upstream: Upstream, clock: FakeClock
) -> None:
    upstream.then(503).then(429).then(201)
    answer = send(client, "billing", "POST", upstream.url + "/pay", body=b"x", idempotency_key=True)
    assert answer.status == 201
    keys = [s.headers.get("Idempotency-Key") for s in upstream.seen]
    assert len(keys) == 3
    assert keys[0] is not None
    assert len(set(keys)) == 1


def test_a_reset_connection_is_retried_for_get_not_for_post(
    client: str, upstream: Upstream, clock: FakeClock
) -> None:
    upstream.then(action="reset").then(200, body=b"again")
    answer = send(client, "billing", "GET", upstream.url + "/a")
    assert (answer.status, answer.body) == (200, b"again")
    upstream.seen.clear()
    upstream.then(action="reset").then(200)
    with pytest.raises(Exception) as raised:
        send(client, "billing", "POST", upstream.url + "/pay", body=b"x")
    assert buttress.patterns._transient.is_network(raised.value)
    assert len(upstream.seen) == 1


def test_a_connection_never_made_is_retried_even_for_post(
    client: str, clock: FakeClock, refused_url: str
) -> None:
    url = refused_url + "/pay"  # nobody listens: refused every time
    with capture_events([events.RetryScheduled]) as seen:
        with pytest.raises(Exception) as raised:
            send(client, "billing", "POST", url, body=b"x")
    assert buttress.patterns._transient.never_sent(raised.value)
    assert len(seen) == 2  # three attempts: the default max_attempts


def _http_date(epoch: float) -> str:
    return email.utils.formatdate(epoch, usegmt=True)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"Retry-After": "3600"}, 30.0),  # capped by max_delay (30 s)
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "250", "Retry-After": "9"}, 0.25),  # the precise one wins
        ({"retry-after-ms": "99999999999"}, 30.0),
        ({"grpc-retry-pushback-ms": "400"}, 0.4),
    ],
)
def test_server_signals_set_the_next_delay_capped(
    client: str, upstream: Upstream, clock: FakeClock, headers: dict[str, str], expected: float
) -> None:
    upstream.then(503, headers).then(200)
    send(client, "billing", "GET", upstream.url + "/a")
    assert clock.sleeps == [pytest.approx(expected)]


def test_retry_after_as_an_http_date(client: str, upstream: Upstream, clock: FakeClock) -> None:
    upstream.then(429, {"Retry-After": _http_date(clock.wall() + 12)}).then(200)
    send(client, "billing", "GET", upstream.url + "/a")
    assert clock.sleeps == [pytest.approx(12, abs=1)]


@pytest.mark.parametrize(
    "value",
    ["soon", "-5", "nan", "inf", "", "Wed, 99 Foo 2020 99:99:99 GMT", "1e400"],
)
def test_unreadable_retry_after_falls_back_to_backoff(
    client: str, upstream: Upstream, clock: FakeClock, value: str
) -> None:
    buttress.patterns.retry._rng.seed(1)
    upstream.then(503, {"Retry-After": value, "retry-after-ms": value}).then(200)
    with capture_events([events.RetryScheduled]) as seen:
        assert send(client, "billing", "GET", upstream.url + "/a").status == 200
    assert [e.reason for e in seen] == ["backoff"]
    assert 0 <= clock.sleeps[0] <= 0.1  # full jitter under the first backoff (initial 0.1)


def test_a_date_in_the_past_means_retry_now(
    client: str, upstream: Upstream, clock: FakeClock
) -> None:
    upstream.then(503, {"Retry-After": _http_date(clock.wall() - 3600)}).then(200)
    send(client, "billing", "GET", upstream.url + "/a")
    assert clock.sleeps == [0.0]


def test_x_should_retry_overrides_the_status(
    client: str, upstream: Upstream, clock: FakeClock
) -> None:
    upstream.then(503, {"x-should-retry": "false"}, b"no").then(200)
    assert send(client, "billing", "GET", upstream.url + "/a").status == 503
    assert len(upstream.seen) == 1
    upstream.seen.clear()
    upstream.script.clear()
    upstream.then(409, {"x-should-retry": "true"}).then(200, body=b"ok now")
    assert send(client, "billing", "GET", upstream.url + "/a").body == b"ok now"
    assert len(upstream.seen) == 2


def test_transient_responses_count_as_breaker_failures(
    client: str, upstream: Upstream, clock: FakeClock, settings: Callable[..., None]
) -> None:
    settings(BILLING__RETRY__ENABLED="false", BILLING__CIRCUIT_BREAKER__FAIL_MAX="2")
    upstream.then(503).then(503)
    assert send(client, "billing", "GET", upstream.url + "/a").status == 503
    assert send(client, "billing", "GET", upstream.url + "/a").status == 503
    with pytest.raises(CircuitOpenError):
        send(client, "billing", "GET", upstream.url + "/a")
    assert len(upstream.seen) == 2


def test_per_host_isolation(
    client: str,
    upstream: Upstream,
    second_upstream: Upstream,
    clock: FakeClock,
    settings: Callable[..., None],
) -> None:
    settings(BILLING__RETRY__ENABLED="false", BILLING__CIRCUIT_BREAKER__FAIL_MAX="1")
    bad, good = upstream, second_upstream
    bad.then(500)
    assert send(client, "billing", "GET", bad.url + "/a", per_host=True).status == 500
    with pytest.raises(CircuitOpenError) as raised:
        send(client, "billing", "GET", bad.url + "/a", per_host=True)
    assert raised.value.service == f"billing[127.0.0.1:{bad.port}]"
    # The other host's breaker is its own, and closed.
    assert send(client, "billing", "GET", good.url + "/a", per_host=True).status == 200
    breakers = registry.instances("circuit_breaker")
    assert f"billing[127.0.0.1:{good.port}]" in breakers


def test_per_host_bound_puts_later_hosts_in_one_overflow_instance(
    client: str,
    upstream: Upstream,
    second_upstream: Upstream,
    clock: FakeClock,
    settings: Callable[..., None],
) -> None:
    settings(BILLING__RETRY__ENABLED="false", BILLING__CIRCUIT_BREAKER__FAIL_MAX="1")
    second_upstream.then(500)
    assert send(client, "billing", "GET", upstream.url, per_host=True, max_hosts=1).status == 200
    assert (
        send(client, "billing", "GET", second_upstream.url, per_host=True, max_hosts=1).status
        == 500
    )
    with pytest.raises(CircuitOpenError) as raised:
        send(client, "billing", "GET", second_upstream.url, per_host=True, max_hosts=1)
    assert raised.value.service == "billing[*]"
    assert send(client, "billing", "GET", upstream.url, per_host=True, max_hosts=1).status == 200


def test_outbound_requests_carry_the_time_left(
    client: str, upstream: Upstream, clock: FakeClock, settings: Callable[..., None]
) -> None:
    settings(BILLING__TIMEOUT__SECONDS="2.5")
    send(client, "billing", "GET", upstream.url + "/a")
    assert upstream.seen[0].headers["X-Buttress-Deadline-Ms"] == "2500"
    upstream.seen.clear()
    send(client, "billing", "GET", upstream.url + "/a", deadline_header="Grpc-Like-Budget")
    assert upstream.seen[0].headers["Grpc-Like-Budget"] == "2500"
    assert "X-Buttress-Deadline-Ms" not in upstream.seen[0].headers


def test_settings_of_the_service_apply_per_host(
    client: str, upstream: Upstream, clock: FakeClock, settings: Callable[..., None]
) -> None:
    settings(BILLING__RETRY__MAX_ATTEMPTS="2")
    upstream.then(503).then(503).then(200)
    assert send(client, "billing", "GET", upstream.url, per_host=True).status == 503
    assert len(upstream.seen) == 2


def test_bad_arguments_fail_at_construction() -> None:
    with pytest.raises(ConfigurationError, match="max_hosts"):
        b_httpx.ResilientTransport("billing", max_hosts=0)
    with pytest.raises(ConfigurationError, match="on_exhausted"):
        b_requests.ResilientAdapter("billing", on_exhausted="explode")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="service name"):
        b_httpx.AsyncResilientTransport("")


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("max_hosts", "8"),
        ("max_hosts", True),
        ("max_hosts", 8.0),
        ("per_host", "no"),
        ("per_host", 1),
        ("idempotency_key", "false"),
        ("idempotency_key", 0),
        ("deadline_header", 5),
        ("deadline_header", ""),
        ("deadline_header", "X Budget"),
        ("on_exhausted", "RAISE"),
    ],
)
def test_wrong_typed_arguments_fail_at_construction_naming_them(
    argument: str, value: object
) -> None:
    # Strict like a decorator's arguments: "no" is not a truthy flag, "8" not a number.
    for make in (b_httpx.ResilientTransport, b_requests.ResilientAdapter):
        with pytest.raises(
            ConfigurationError, match=f"invalid argument for the integration: {argument}:"
        ) as info:
            make("billing", **{argument: value})
        assert info.value.errors[0][:2] == (argument, "code")


@pytest.mark.realtime
def test_a_slow_answer_times_out_per_attempt_and_is_retried(
    client: str, upstream: Upstream, settings: Callable[..., None]
) -> None:
    settings(
        BILLING__TIMEOUT__SECONDS="0.2",
        BILLING__RETRY__INITIAL="0.01",
        BILLING__RETRY__MAX_DELAY="0.05",
    )
    upstream.then(200, body=b"too late", action="hang", hang=0.6).then(200, body=b"in time")
    answer = send(client, "billing", "GET", upstream.url + "/a")
    assert (answer.status, answer.body) == (200, b"in time")
    # The second attempt was told what it had left: its own 0.2 s, not the client's default.
    assert 0 < int(upstream.seen[1].headers["X-Buttress-Deadline-Ms"]) <= 200


# The service's whole policy from settings, per attempt: the patterns merged after the clients.


def test_the_retry_budget_from_settings_limits_retries(
    client: str, upstream: Upstream, clock: FakeClock, settings: Callable[..., None]
) -> None:
    settings(
        BILLING__RETRY__MAX_ATTEMPTS="5",
        BILLING__RETRY__BUDGET__RATIO="0.01",
        BILLING__RETRY__BUDGET__MIN_PER_SECOND="0.1",
    )
    for _ in range(8):
        upstream.then(503)
    with capture_events() as seen:
        assert send(client, "billing", "GET", upstream.url).status == 503
    # The window's reserve (0.1 a second over 10 s) allows one retry: two sends, not five.
    assert len(upstream.seen) == 2
    assert any(type(e).__name__ == "RetryBudgetExhausted" for e in seen)


@pytest.mark.realtime
def test_hedging_from_settings_sends_a_copy_of_an_idempotent_request_only(
    client: str, upstream: Upstream, settings: Callable[..., None]
) -> None:
    settings(BILLING__HEDGING__DELAY="0.05", BILLING__HEDGING__IDEMPOTENT="true")
    upstream.then(200, body=b"slow", action="hang", hang=0.6).then(200, body=b"copy")
    answer = send(client, "billing", "GET", upstream.url + "/get")
    assert (answer.status, answer.body) == (200, b"copy")
    assert len(upstream.seen) == 2
    # A POST without an idempotency key is never sent twice at once, whatever settings say.
    upstream.then(200, body=b"posted", action="hang", hang=0.2)
    assert send(client, "billing", "POST", upstream.url + "/post", body=b"x").body == b"posted"
    assert [s.path for s in upstream.seen].count("/post") == 1


def test_the_adaptive_throttle_from_settings_refuses_locally(
    client: str, upstream: Upstream, clock: FakeClock, settings: Callable[..., None]
) -> None:
    settings(
        BILLING__RETRY__ENABLED="false",
        BILLING__CIRCUIT_BREAKER__ENABLED="false",
        BILLING__ADAPTIVE_THROTTLE__ENABLED="true",
        BILLING__ADAPTIVE_THROTTLE__K="1.1",
        BILLING__ADAPTIVE_THROTTLE__SEED="1",
    )
    for _ in range(40):
        upstream.then(503)
    refused = 0
    for _ in range(40):
        try:
            send(client, "billing", "GET", upstream.url)
        except RejectedError:
            refused += 1
    # Every answer failed: the throttle refuses most requests without sending them.
    assert refused > 10
    assert len(upstream.seen) == 40 - refused


def test_cache_and_coalescing_settings_never_share_a_response(
    client: str, upstream: Upstream, clock: FakeClock, settings: Callable[..., None]
) -> None:
    # A response is its caller's stream: the integrations leave these two out (documented).
    settings(BILLING__CACHE__TTL="60", BILLING__COALESCING__ENABLED="true")
    upstream.then(200, body=b"first").then(200, body=b"second")
    assert send(client, "billing", "GET", upstream.url).body == b"first"
    assert send(client, "billing", "GET", upstream.url).body == b"second"
    assert len(upstream.seen) == 2


def test_a_429_is_retried_but_neither_opens_nor_closes_the_circuit(
    client: str, upstream: Upstream, clock: FakeClock, settings: Callable[..., None]
) -> None:
    settings(throttled__circuit_breaker__fail_max="1")
    upstream.then(429).then(429).then(429)
    with capture_events([events.CircuitCallRecorded]) as recorded:
        answer = send(client, "throttled", "GET", upstream.url + "/a")
    assert answer.status == 429  # the last answer, after every attempt was throttled
    assert len(upstream.seen) == 3
    assert [e.outcome for e in recorded] == ["ignored"] * 3
    assert registry.breaker("throttled").state_label == "closed"
    upstream.then(503)  # a real failure opens it (fail_max=1): the retry is rejected
    with pytest.raises(CircuitOpenError):
        send(client, "throttled", "GET", upstream.url + "/b")
    assert registry.breaker("throttled").state_label == "open"


class _Recording(httpx.HTTPTransport):
    """The real transport, noting the I/O timeouts each request was handed."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[dict[str, float | None]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.timeouts.append(dict(request.extensions["timeout"]))
        return super().handle_request(request)


class _AsyncRecording(httpx.AsyncHTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[dict[str, float | None]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.timeouts.append(dict(request.extensions["timeout"]))
        return await super().handle_async_request(request)


@pytest.mark.parametrize(
    ("timeout", "expected"),
    [
        (
            httpx.Timeout(5.0),
            (2.5, 2.5, 2.5, 2.5),
        ),  # the client's default: longer than the time left
        (httpx.Timeout(1.0), (1.0, 1.0, 1.0, 1.0)),  # shorter: the client's own, kept
        (httpx.Timeout(None), (2.5, 2.5, 2.5, 2.5)),  # none at all: the time left
        (httpx.Timeout(1.0, read=None), (1.0, 2.5, 1.0, 1.0)),  # per key
    ],
)
@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_httpx_io_timeouts_are_the_clients_no_longer_than_the_time_left(
    flavour: str,
    timeout: httpx.Timeout,
    expected: tuple[float, ...],
    upstream: Upstream,
    clock: FakeClock,
    settings: Callable[..., None],
) -> None:
    settings(BILLING__TIMEOUT__SECONDS="2.5")
    if flavour == "sync":
        inner = _Recording()
        with httpx.Client(transport=b_httpx.ResilientTransport("billing", inner)) as c:
            assert c.get(upstream.url, timeout=timeout).status_code == 200
    else:
        inner = _AsyncRecording()  # type: ignore[assignment]

        async def go() -> None:
            transport = b_httpx.AsyncResilientTransport("billing", inner)  # type: ignore[arg-type]
            async with httpx.AsyncClient(transport=transport) as c:
                assert (await c.get(upstream.url, timeout=timeout)).status_code == 200

        asyncio.run(go())
    (handed,) = inner.timeouts
    assert tuple(handed[key] for key in ("connect", "read", "write", "pool")) == expected


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_httpx_a_request_with_no_timeout_extension_gets_the_time_left(
    flavour: str, upstream: Upstream, clock: FakeClock, settings: Callable[..., None]
) -> None:
    # A transport called directly (no client) gets a request with no "timeout" extension.
    settings(BILLING__TIMEOUT__SECONDS="2.5")
    request = httpx.Request("GET", upstream.url)
    if flavour == "sync":
        inner = _Recording()
        transport = b_httpx.ResilientTransport("billing", inner)
        assert transport.handle_request(request).status_code == 200
        transport.close()
    else:
        inner = _AsyncRecording()  # type: ignore[assignment]

        async def go() -> None:
            transport = b_httpx.AsyncResilientTransport("billing", inner)  # type: ignore[arg-type]
            assert (await transport.handle_async_request(request)).status_code == 200
            await transport.aclose()

        asyncio.run(go())
    (handed,) = inner.timeouts
    assert handed == {"connect": 2.5, "read": 2.5, "write": 2.5, "pool": 2.5}


@pytest.mark.parametrize("broken", [False, True])
@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_httpx_each_attempt_reports_its_time_and_a_failing_recorder_breaks_nothing(
    flavour: str, broken: bool, clock: FakeClock
) -> None:
    """The timeout's TimedCallFinished goes to its bound recorder on the integration's path
    (inline for the sync client, a loop timer for the async one); a recorder that raises is a
    subscriber bug the request never sees."""
    seen: list[tuple[object, ...]] = []

    def binder(service: str) -> Callable[..., None]:
        def record(*fields: object) -> None:
            if broken:
                raise RuntimeError("subscriber bug")
            seen.append((service, *fields))

        return record

    def answer(request: httpx.Request) -> httpx.Response:
        clock.advance(0.25)
        return httpx.Response(200, content=b"ok")

    undo = events.subscribe(lambda event: None, [events.TimedCallFinished], binder=binder)
    try:
        if flavour == "sync":
            transport = b_httpx.ResilientTransport("timed-edge", httpx.MockTransport(answer))
            with httpx.Client(transport=transport) as c:
                statuses = [c.get("http://127.0.0.1:1/").status_code for _ in range(2)]
        else:

            async def go() -> list[int]:
                transport = b_httpx.AsyncResilientTransport(
                    "timed-edge-async", httpx.MockTransport(answer)
                )
                async with httpx.AsyncClient(transport=transport) as c:
                    return [(await c.get("http://127.0.0.1:1/")).status_code for _ in range(2)]

            statuses = asyncio.run(go())
    finally:
        undo()
    assert statuses == [200, 200]
    service = "timed-edge" if flavour == "sync" else "timed-edge-async"
    assert seen == ([] if broken else [(service, pytest.approx(0.25), False)] * 2)
