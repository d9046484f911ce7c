"""Which failures are transient, and what a server's Retry-After header asks for.

The errors are real httpx, requests, urllib3, aiohttp and redis-py objects built locally (no
network).
"""

from __future__ import annotations

import email.utils
import subprocess
import sys
import textwrap

import aiohttp
import httpx
import pytest
import redis.exceptions
import requests
import urllib3
import yarl
from multidict import CIMultiDict

from buttress.exceptions import (
    BulkheadFullError,
    CircuitOpenError,
    ConfigurationError,
    RateLimitedError,
    TimeoutExceededError,
)
from buttress.patterns import _transient

NOW = 1_800_000_000.0


def httpx_status(status: int, headers: dict[str, str] | None = None) -> httpx.HTTPStatusError:
    request = httpx.Request("GET", "http://127.0.0.1/resource")
    response = httpx.Response(status, headers=headers or {}, request=request)
    return httpx.HTTPStatusError(f"HTTP {status}", request=request, response=response)


def requests_status(status: int, headers: dict[str, str] | None = None) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    response.headers.update(headers or {})
    return requests.HTTPError(f"HTTP {status}", response=response)


def aiohttp_status(
    status: int, headers: dict[str, str] | None = None
) -> aiohttp.ClientResponseError:
    return aiohttp.ClientResponseError(
        None, (), status=status, headers=CIMultiDict(headers) if headers is not None else None
    )


HTTP_ERRORS = [httpx_status, requests_status, aiohttp_status]

NETWORK_ERRORS = [
    ConnectionError("down"),
    ConnectionRefusedError(111, "refused"),
    ConnectionResetError(104, "reset by peer"),
    BrokenPipeError(32, "broken pipe"),
    TimeoutError("slow"),
    TimeoutExceededError("too slow", service="svc", seconds=1.0),
    httpx.ConnectError("refused"),
    httpx.ReadTimeout("slow"),
    httpx.PoolTimeout("no connection free"),
    httpx.ReadError("reset"),
    httpx.RemoteProtocolError("server hung up mid-response"),
    requests.ConnectionError("refused"),
    requests.ConnectTimeout("slow connect"),
    requests.ReadTimeout("slow read"),
    requests.exceptions.ChunkedEncodingError("connection broken"),
    urllib3.exceptions.ReadTimeoutError(None, "/resource", "read timed out"),  # type: ignore[arg-type]
    urllib3.exceptions.ProtocolError("connection aborted"),
    aiohttp.ServerDisconnectedError(),
    aiohttp.ServerTimeoutError("slow"),
    aiohttp.ClientPayloadError("truncated body"),
    redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."),
    redis.exceptions.ConnectionError("Connection closed by server."),
    redis.exceptions.TimeoutError("Timeout reading from 127.0.0.1:6379"),
    redis.exceptions.MaxConnectionsError("Too many connections"),
]

# The server answered, but only to say "not now": worth another try, though not a network error.
REDIS_BUSY = [
    redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory"),
    redis.exceptions.TryAgainError("TRYAGAIN Multiple keys request during rehashing of slot"),
    redis.exceptions.ClusterDownError("CLUSTERDOWN The cluster is down"),
    redis.exceptions.MasterDownError("MASTERDOWN Link with MASTER is down"),
]

NOT_TRANSIENT = [
    ValueError("bad"),
    TypeError("bug"),
    AttributeError("bug"),
    KeyError("missing"),
    ZeroDivisionError("bug"),
    RuntimeError("bug"),
    ConfigurationError("bad setting"),
    CircuitOpenError("open", service="svc", retry_after=3.0),
    BulkheadFullError("full", service="svc"),
    RateLimitedError("limited", service="svc", retry_after=1.0),
    httpx.LocalProtocolError("we sent garbage"),
    httpx.UnsupportedProtocol("ftp://"),
    httpx.DecodingError("bad gzip"),
    requests.exceptions.SSLError("certificate verify failed"),
    requests.exceptions.InvalidURL("no host"),
    requests.exceptions.MissingSchema("no scheme"),
    aiohttp.ServerFingerprintMismatch(b"a", b"b", "127.0.0.1", 443),
    aiohttp.InvalidURL("not a url"),
    redis.exceptions.ResponseError("WRONGTYPE Operation against a key holding the wrong kind"),
    redis.exceptions.AuthenticationError("invalid username-password pair"),
    redis.exceptions.AuthorizationError("NOPERM"),
    redis.exceptions.DataError("Invalid input of type: 'dict'"),
    redis.exceptions.NoScriptError("NOSCRIPT No matching script"),
    redis.exceptions.ReadOnlyError("READONLY You can't write against a read only replica."),
]


@pytest.mark.parametrize("exc", NETWORK_ERRORS, ids=lambda e: type(e).__name__)
def test_connection_and_timeout_errors_are_network_and_transient(exc: BaseException) -> None:
    assert _transient.is_network(exc) is True
    assert _transient.is_transient(exc) is True


@pytest.mark.parametrize("exc", NOT_TRANSIENT, ids=lambda e: type(e).__name__)
def test_programming_errors_rejections_and_tls_failures_are_not_transient(
    exc: BaseException,
) -> None:
    assert _transient.is_network(exc) is False
    assert _transient.is_transient(exc) is False


@pytest.mark.parametrize("exc", REDIS_BUSY, ids=lambda e: type(e).__name__)
def test_a_busy_or_failing_over_redis_is_transient_not_network(exc: BaseException) -> None:
    assert _transient.is_transient(exc) is True
    assert _transient.is_network(exc) is False


@pytest.mark.parametrize("make", HTTP_ERRORS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504, 599])
def test_http_408_429_and_5xx_are_transient(make, status: int) -> None:
    exc = make(status)
    assert _transient.http_status(exc) == status
    assert _transient.is_transient(exc) is True
    # An answer from the server is not a network failure.
    assert _transient.is_network(exc) is False


@pytest.mark.parametrize("make", HTTP_ERRORS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("status", [300, 304, 400, 401, 403, 404, 405, 409, 410, 413, 422, 451])
def test_other_http_statuses_are_not_transient(make, status: int) -> None:
    exc = make(status)
    assert _transient.http_status(exc) == status
    assert _transient.is_transient(exc) is False


def test_errors_without_a_response_have_no_status() -> None:
    assert _transient.http_status(requests.HTTPError("no response attached")) is None
    assert _transient.is_transient(requests.HTTPError("no response attached")) is False
    assert _transient.http_status(ConnectionError("down")) is None
    assert _transient.retry_after(requests.HTTPError("no response"), NOW) is None
    assert _transient.retry_after(aiohttp_status(503, None), NOW) is None


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("7", 7.0),
        ("0", 0.0),
        (" 120 ", 120.0),
        ("1.5", 1.5),
        ("-3", None),
        ("inf", None),
        ("nan", None),
        ("soon", None),
        ("", None),
    ],
)
def test_parse_retry_after_delay_seconds(value: str, seconds: float | None) -> None:
    assert _transient.parse_retry_after(value, NOW) == seconds


def test_parse_retry_after_http_date_is_measured_against_now() -> None:
    in_30s = email.utils.formatdate(NOW + 30, usegmt=True)
    assert in_30s.endswith("GMT")
    assert _transient.parse_retry_after(in_30s, NOW) == 30.0
    assert _transient.parse_retry_after(email.utils.formatdate(NOW - 60, usegmt=True), NOW) == 0.0
    # "-0000" (an unknown zone in RFC 5322) parses as a naive datetime: HTTP dates are GMT.
    naive = email.utils.formatdate(NOW + 5).replace("+0000", "-0000")
    assert _transient.parse_retry_after(naive, NOW) == 5.0
    assert _transient.parse_retry_after("Wed, 99 Foo 2026 25:61:00 GMT", NOW) is None


@pytest.mark.parametrize("make", HTTP_ERRORS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("header", ["Retry-After", "retry-after", "RETRY-AFTER"])
def test_retry_after_is_read_from_each_library_case_insensitively(make, header: str) -> None:
    assert _transient.retry_after(make(429, {header: "12"}), NOW) == 12.0
    date = email.utils.formatdate(NOW + 45, usegmt=True)
    assert _transient.retry_after(make(503, {header: date}), NOW) == 45.0
    assert _transient.retry_after(make(503, {}), NOW) is None


def test_classification_never_imports_an_http_library() -> None:
    code = textwrap.dedent(
        """
        import sys
        from buttress.patterns import _transient
        results = (
            _transient.is_transient(ConnectionError()),
            _transient.is_transient(ValueError()),
            _transient.retry_after(ValueError(), 0.0),
        )
        loaded = sorted(m for m in ("httpx", "requests", "aiohttp", "urllib3") if m in sys.modules)
        print(results, loaded)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    assert out == "(True, False, None) []"


def _redis_error_from(cause: BaseException) -> redis.exceptions.ConnectionError:
    try:
        raise redis.exceptions.ConnectionError("Error connecting") from cause
    except redis.exceptions.ConnectionError as exc:
        return exc


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ConnectionRefusedError(111, "refused"), True),
        (httpx.ConnectError("refused"), True),
        (httpx.ConnectTimeout("slow connect"), True),
        (httpx.PoolTimeout("no connection free"), True),
        (requests.ConnectTimeout("slow connect"), True),
        (
            requests.ConnectionError(
                urllib3.exceptions.MaxRetryError(
                    None,  # type: ignore[arg-type]
                    "/",
                    urllib3.exceptions.NewConnectionError(None, "refused"),  # type: ignore[arg-type]
                )
            ),
            True,
        ),
        # aiohttp 3.10 added ConnectionTimeoutError (3.9, the lowest allowed, lacks it).
        *(
            [(aiohttp.ConnectionTimeoutError("slow connect"), True)]
            if hasattr(aiohttp, "ConnectionTimeoutError")
            else []
        ),
        (_redis_error_from(ConnectionRefusedError(111, "refused")), True),
        # The request may have been sent: a reset, a read timeout, a dropped answer.
        (ConnectionResetError(104, "reset"), False),
        (httpx.ReadTimeout("slow"), False),
        (httpx.RemoteProtocolError("hung up"), False),
        (requests.ReadTimeout("slow"), False),
        (requests.ConnectionError(urllib3.exceptions.ProtocolError("aborted")), False),
        (aiohttp.ServerDisconnectedError(), False),
        (aiohttp.ServerTimeoutError("slow read"), False),
        (_redis_error_from(ConnectionResetError(104, "reset")), False),
        (redis.exceptions.TimeoutError("Timeout reading"), False),
    ],
    ids=lambda v: v if isinstance(v, bool) else type(v).__name__,
)
def test_never_sent_only_when_no_connection_was_made(exc: BaseException, expected: bool) -> None:
    assert _transient.never_sent(exc) is expected


@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        ("POST", {}, True),
        ("PATCH", {}, True),
        ("post", {}, True),
        ("POST", {"Idempotency-Key": "k1"}, False),
        ("POST", {"idempotency-key": "k1"}, False),
        ("POST", {"Idempotency-Key": ""}, True),
        ("GET", {}, False),
        ("HEAD", {}, False),
        ("OPTIONS", {}, False),
        ("PUT", {}, False),
        ("DELETE", {}, False),
        ("TRACE", {}, False),
    ],
)
def test_not_idempotent_reads_the_method_and_idempotency_key_of_each_library(
    method: str, headers: dict[str, str], expected: bool
) -> None:
    url = "http://127.0.0.1/resource"
    request = httpx.Request(method, url, headers=headers)
    response = httpx.Response(503, request=request)
    prepared = requests.Request(method, url, headers=headers).prepare()
    info = aiohttp.RequestInfo(yarl.URL(url), method, CIMultiDict(headers), yarl.URL(url))
    for exc in (
        httpx.HTTPStatusError("503", request=request, response=response),
        httpx.ReadTimeout("slow", request=request),
        requests.HTTPError("503", request=prepared),
        requests.ReadTimeout("slow", request=prepared),
        aiohttp.ClientResponseError(info, (), status=503),
    ):
        assert _transient.not_idempotent(exc) is expected, type(exc).__name__


def test_an_error_that_names_no_request_is_not_judged() -> None:
    for exc in (
        httpx.ReadTimeout("made without a request"),
        requests.ReadTimeout("made without a request"),
        aiohttp.ServerDisconnectedError(),
        ConnectionResetError(104, "reset"),
        redis.exceptions.ConnectionError("Connection closed by server."),
    ):
        assert _transient.not_idempotent(exc) is False, type(exc).__name__
