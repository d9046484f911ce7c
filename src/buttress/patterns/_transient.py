"""Which failures are worth another try, and what the server said about when.

Shared by retry (its default ``retry_on="transient"``) and fallback (its default ``on``). Which
errors count as network or transient, when a failed call is safe to repeat, and why the HTTP and
Redis libraries are never imported here: ``docs/internals.md`` (Transient failures).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import math
import socket
import sys
from collections.abc import Mapping
from typing import Any

__all__ = [
    "FailedResponse",
    "http_status",
    "is_network",
    "is_transient",
    "never_sent",
    "not_idempotent",
    "parse_retry_after",
    "retry_after",
    "server_delay",
    "should_retry",
]

# RFC 9110 §9.2.2: the methods whose repetition has the same effect on the server as one request.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


_REDIS_NOT_NETWORK = (
    "AuthenticationError",
    "AuthorizationError",
    "ExternalAuthProviderError",
    "BusyLoadingError",
)
# Redis answers that mean "not now": loading its data, a slot migrating, a failover under way.
_REDIS_BUSY = ("BusyLoadingError", "TryAgainError", "ClusterDownError")


class FailedResponse(Exception):  # noqa: N818 - it is a response, not an error of buttress's
    """A response an integration classified as a failure, raised inside its policy.

    The integrations (``buttress.integrations``) raise it from each attempt that got a transient
    answer (HTTP 408, 429, 5xx; gRPC UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED), so every
    pattern sees a failure without the caller raising: retry tries again, the breaker counts it,
    fallback may answer it. The integration catches it at its edge and returns ``response`` (or
    raises the client's own error). A ``retry_on`` predicate or a breaker's ``exclude`` sees it.

    Attributes:
        response: the client's response object (an ``httpx.Response``, a ``requests.Response``,
            an ``aiohttp.ClientResponse``, a gRPC call).
        status: the HTTP status code, or the gRPC status code's name (``"UNAVAILABLE"``).
        retryable: whether another attempt may help (``False`` when the server said
            ``x-should-retry: false``).
        delay: seconds the server asked to wait before the next attempt, or ``None``.
        method: the HTTP method (or the gRPC method's full name).
    """

    def __init__(
        self,
        response: Any,
        status: int | str,
        *,
        method: str,
        retryable: bool = True,
        delay: float | None = None,
    ) -> None:
        super().__init__(f"{method} answered {status}")
        self.response = response
        self.status = status
        self.method = method
        self.retryable = retryable
        self.delay = delay


def _is_transient_status(status: int) -> bool:
    # 408 Request Timeout, 429 Too Many Requests, and every server error.
    return status in (408, 429) or 500 <= status <= 599


def _classes(module: str, *names: str) -> tuple[type[BaseException], ...]:
    """The named exception classes of ``module`` if it is imported, else nothing."""
    loaded = sys.modules.get(module)
    if loaded is None:
        return ()
    return tuple(c for name in names if isinstance(c := getattr(loaded, name, None), type))


def is_network(exc: BaseException) -> bool:
    """Whether ``exc`` says the connection failed or timed out (not what the server answered)."""
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if isinstance(
        exc, _classes("httpx", "TimeoutException", "NetworkError", "RemoteProtocolError")
    ):
        return True
    if isinstance(exc, _classes("requests.exceptions", "SSLError")):
        return False
    if isinstance(
        exc,
        _classes("requests.exceptions", "ConnectionError", "Timeout", "ChunkedEncodingError"),
    ):
        return True
    if isinstance(exc, _classes("urllib3.exceptions", "TimeoutError", "ProtocolError")):
        return True
    if isinstance(exc, _classes("aiohttp", "ClientSSLError", "ServerFingerprintMismatch")):
        return False
    if isinstance(exc, _classes("aiohttp", "ClientConnectionError", "ClientPayloadError")):
        return True
    # redis-py's ConnectionError family also holds refused credentials (which another try only
    # repeats) and a server still loading its data (an answer, counted by is_transient).
    if isinstance(exc, _classes("redis.exceptions", *_REDIS_NOT_NETWORK)):
        return False
    if isinstance(exc, _classes("redis.exceptions", "ConnectionError", "TimeoutError")):
        return True
    # botocore's connection family (refused, reset, proxy, endpoint) and its timeouts; not a TLS
    # failure, which it files there too and which another try only repeats.
    if isinstance(exc, _classes("botocore.exceptions", "SSLError")):
        return False
    return isinstance(
        exc,
        _classes(
            "botocore.exceptions",
            "ConnectionError",
            "ConnectionClosedError",
            "ConnectTimeoutError",
            "ReadTimeoutError",
        ),
    )


def never_sent(exc: BaseException) -> bool:
    """Whether ``exc`` says no connection was made, so the server cannot have seen the request.

    Connection refused, no address for the host, a connect timeout, no pooled connection free:
    repeating such a call is safe whatever it does.
    """
    if isinstance(exc, ConnectionRefusedError):
        return True
    if isinstance(exc, _classes("httpx", "ConnectError", "ConnectTimeout", "PoolTimeout")):
        return True
    # urllib3's NewConnectionError (refused, and NameResolutionError) is a ConnectTimeoutError.
    connect_failed = _classes("urllib3.exceptions", "ConnectTimeoutError")
    if isinstance(exc, connect_failed + _classes("requests.exceptions", "ConnectTimeout")):
        return True
    if isinstance(exc, _classes("requests.exceptions", "ConnectionError")):
        # requests wraps urllib3's "max retries exceeded", whose reason says what failed.
        wrapped = exc.args[0] if exc.args else None
        return isinstance(getattr(wrapped, "reason", None), connect_failed)
    if isinstance(exc, _classes("aiohttp", "ClientConnectorError", "ConnectionTimeoutError")):
        return True
    if isinstance(
        exc, _classes("botocore.exceptions", "EndpointConnectionError", "ConnectTimeoutError")
    ):
        return True
    if isinstance(exc, _classes("redis.exceptions", "ConnectionError")):
        # redis-py raises its ConnectionError from (5.x: while handling) the socket's own error.
        cause = exc.__cause__ or exc.__context__
        return isinstance(cause, ConnectionRefusedError | socket.gaierror)
    return False


def _request(exc: BaseException) -> tuple[str, Mapping[str, str]] | None:
    """The method and headers of the HTTP request an httpx, requests or aiohttp error is about."""
    request: Any = None
    if isinstance(exc, _classes("httpx", "RequestError", "HTTPStatusError")):
        try:
            request = getattr(exc, "request", None)
        except RuntimeError:  # httpx raises when the error was made without a request
            return None
    elif isinstance(exc, _classes("requests.exceptions", "RequestException")):
        request = getattr(exc, "request", None)
    elif isinstance(exc, _classes("aiohttp", "ClientResponseError")):
        request = getattr(exc, "request_info", None)
    method = getattr(request, "method", None)
    if not isinstance(method, str):
        return None
    return method, getattr(request, "headers", None) or {}


def not_idempotent(exc: BaseException) -> bool:
    """Whether ``exc`` is about an HTTP request that must not be sent twice.

    That is a method other than GET, HEAD, OPTIONS, PUT, DELETE and TRACE (POST, PATCH, ...)
    without an ``Idempotency-Key`` header. ``False`` when the error names no request: aiohttp's
    transport errors and everything that is not HTTP.
    """
    request = _request(exc)
    if request is None:
        return False
    method, headers = request
    return method.upper() not in IDEMPOTENT_METHODS and not headers.get("Idempotency-Key")


def _response(exc: BaseException) -> tuple[int | None, Mapping[str, str] | None]:
    """The HTTP status and headers carried by an httpx, requests or aiohttp error, if any."""
    if isinstance(exc, _classes("httpx", "HTTPStatusError")):
        response: Any = getattr(exc, "response", None)
        return response.status_code, response.headers
    if isinstance(exc, _classes("requests.exceptions", "HTTPError")):
        response = getattr(exc, "response", None)
        if response is None:
            return None, None
        return response.status_code, response.headers
    if isinstance(exc, _classes("aiohttp", "ClientResponseError")):
        return getattr(exc, "status", None), getattr(exc, "headers", None)
    return None, None


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of an httpx, requests or aiohttp error response, else ``None``."""
    status, _ = _response(exc)
    return status if isinstance(status, int) else None


# gRPC status codes that say "not now" rather than "never": the server is down or overloaded, or
# the attempt ran out of time.
GRPC_TRANSIENT = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"})

# botocore's error codes for a throttled request (the AWS SDKs' own retry tables).
_AWS_THROTTLING = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "TransactionInProgressException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "LimitExceededException",
        "RequestThrottled",
        "SlowDown",
        "PriorRequestNotComplete",
        "EC2ThrottledException",
    }
)


def grpc_code(exc: BaseException) -> str | None:
    """The status code name of a gRPC error (sync or ``grpc.aio``), else ``None``."""
    if not isinstance(exc, _classes("grpc", "RpcError")):
        return None
    code = getattr(exc, "code", None)
    if not callable(code):
        return None
    try:
        value = code()
    except Exception:  # noqa: BLE001 - a hand-made RpcError may not know its code
        return None
    name = getattr(value, "name", None)
    return name if isinstance(name, str) else None


def _sqlstate(exc: BaseException) -> str | None:
    # psycopg 3 and asyncpg expose ``sqlstate``, psycopg2 ``pgcode``; other DB-API drivers name
    # no SQLSTATE, so only their connection errors (is_network) count.
    if type(exc).__module__.split(".")[0] not in ("psycopg", "psycopg2", "asyncpg"):
        return None
    state = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    return state if isinstance(state, str) else None


def _aws_throttled(exc: BaseException) -> bool:
    # A botocore ClientError is the service's answer: throttling codes and 5xx are transient.
    if not isinstance(exc, _classes("botocore.exceptions", "ClientError")):
        return False
    answer = getattr(exc, "response", None) or {}
    code = answer.get("Error", {}).get("Code")
    status = answer.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in _AWS_THROTTLING or (isinstance(status, int) and _is_transient_status(status))


def is_transient(exc: BaseException) -> bool:
    """Failures another try may not repeat: network errors, HTTP 408/429/5xx and their kin.

    Also a :class:`FailedResponse` the server did not forbid retrying, gRPC UNAVAILABLE,
    RESOURCE_EXHAUSTED and DEADLINE_EXCEEDED, botocore connection and throttling errors, and
    the SQLSTATEs of a lost connection (08xxx), a serialization failure (40001) and a deadlock
    (40P01) from psycopg, psycopg2 and asyncpg: each only when its library is imported.
    """
    if isinstance(exc, FailedResponse):
        return exc.retryable
    if is_network(exc):
        return True
    if isinstance(exc, _classes("redis.exceptions", *_REDIS_BUSY)):
        return True
    status, headers = _response(exc)
    if isinstance(status, int):
        told = should_retry(headers) if headers is not None else None
        return told if told is not None else _is_transient_status(status)
    if grpc_code(exc) in GRPC_TRANSIENT:
        return True
    state = _sqlstate(exc)
    if state is not None:
        return state.startswith("08") or state in ("40001", "40P01")
    return _aws_throttled(exc)


def retry_after(exc: BaseException, now: float) -> float | None:
    """Seconds the server asked to wait (its ``Retry-After`` header), or ``None``.

    Args:
        exc: the failure; only httpx, requests and aiohttp error responses carry headers.
        now: the current wall-clock time in epoch seconds, for a header given as an HTTP date.
    """
    if isinstance(exc, FailedResponse):
        return exc.delay
    _, headers = _response(exc)
    if headers is None:
        return None
    return server_delay(headers, now)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    # httpx, requests and aiohttp headers are case-insensitive; a plain dict (gRPC metadata,
    # lower-case by the protocol) is looked up in lower case.
    value = headers.get(name)
    if value is None:
        value = headers.get(name.lower())
    return value if isinstance(value, str) else None


def _milliseconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        millis = float(value.strip())
    except ValueError:
        return None
    return millis / 1000 if math.isfinite(millis) and millis >= 0 else None


def server_delay(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds the server asked to wait before another attempt, from its headers, or ``None``.

    ``retry-after-ms`` (milliseconds, sent by the OpenAI and Anthropic APIs), then ``Retry-After``
    (seconds or an HTTP date), then ``grpc-retry-pushback-ms`` (gRPC trailing metadata). A value
    that cannot be read, is negative or is not finite is ignored; callers cap the result.
    """
    delay = _milliseconds(_header(headers, "retry-after-ms"))
    if delay is not None:
        return delay
    value = _header(headers, "Retry-After")
    if value is not None and (delay := parse_retry_after(value, now)) is not None:
        return delay
    return _milliseconds(_header(headers, "grpc-retry-pushback-ms"))


def should_retry(headers: Mapping[str, str]) -> bool | None:
    """The server's ``x-should-retry`` answer (the OpenAI/Anthropic convention), or ``None``."""
    value = _header(headers, "x-should-retry")
    if value is None:
        return None
    told = value.strip().lower()
    return True if told == "true" else False if told == "false" else None


def parse_retry_after(value: str, now: float) -> float | None:
    """Parse a ``Retry-After`` value (RFC 9110: delay-seconds or an HTTP date) into seconds.

    A date in the past gives 0; an unreadable value gives ``None``. Fractional seconds are
    accepted although the RFC only allows integers, because some servers send them.
    """
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    # An HTTP date is always GMT; a date without a zone (or "-0000") is read as GMT too.
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, when.timestamp() - now)
