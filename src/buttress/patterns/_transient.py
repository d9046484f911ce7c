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
    "http_status",
    "is_network",
    "is_transient",
    "never_sent",
    "not_idempotent",
    "parse_retry_after",
    "retry_after",
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
    return isinstance(exc, _classes("redis.exceptions", "ConnectionError", "TimeoutError"))


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


def is_transient(exc: BaseException) -> bool:
    """Network errors and HTTP 408, 429 and 5xx: failures that another try may not repeat."""
    if is_network(exc):
        return True
    if isinstance(exc, _classes("redis.exceptions", *_REDIS_BUSY)):
        return True
    status = http_status(exc)
    return status is not None and _is_transient_status(status)


def retry_after(exc: BaseException, now: float) -> float | None:
    """Seconds the server asked to wait (its ``Retry-After`` header), or ``None``.

    Args:
        exc: the failure; only httpx, requests and aiohttp error responses carry headers.
        now: the current wall-clock time in epoch seconds, for a header given as an HTTP date.
    """
    _, headers = _response(exc)
    if headers is None:
        return None
    value = headers.get("Retry-After")
    if value is None:
        return None
    return parse_retry_after(value, now)


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
