"""Which failures are worth another try, and what the server said about when.

Shared by retry (its default ``retry_on="transient"``) and fallback (its default ``on``).

* *network* errors: the connection failed or timed out. The builtin ``ConnectionError`` and
  ``TimeoutError`` (``TimeoutExceededError`` included), the transport errors of httpx, requests,
  urllib3 and aiohttp, and redis-py's ``ConnectionError`` and ``TimeoutError`` (which are not the
  builtins). Certificate, TLS and authentication failures are not network errors: trying again
  gets the same certificate or the same refusal.
* *transient* errors: network errors, plus HTTP responses 408, 429 and 5xx raised as exceptions by
  httpx (``HTTPStatusError``), requests (``HTTPError``) and aiohttp (``ClientResponseError``), and
  the Redis answers that mean "not now" (``LOADING``, ``TRYAGAIN``, ``CLUSTERDOWN``,
  ``MASTERDOWN``).

The HTTP and Redis libraries are optional and never imported here: their exception classes are
looked up in ``sys.modules`` only when a call has already failed. If a library was never imported,
none of its exceptions can exist, so a missing module simply means "not one of those".
"""

from __future__ import annotations

import datetime as dt
import email.utils
import math
import sys
from collections.abc import Mapping
from typing import Any

__all__ = [
    "http_status",
    "is_network",
    "is_transient",
    "parse_retry_after",
    "retry_after",
]


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
