"""What the ASGI and WSGI middleware share: reading the caller's deadline, answering a rejection."""

from __future__ import annotations

import math

from buttress.exceptions import RateLimitedError, RejectedError

__all__ = ["EXPIRED_BODY", "EXPIRED_STATUS", "budget", "rejection"]

# A request whose caller has no time left is answered at once: nobody waits for the answer.
EXPIRED_STATUS = 504
EXPIRED_BODY = b"deadline already passed\n"
# Sent deadlines above this are read as this (a day): a typo or a hostile value must not become
# a deadline that overflows a timer.
_MAX_BUDGET = 86_400.0


def budget(value: str | None) -> float | None:
    """Seconds the caller has left, from the deadline header's value (milliseconds).

    ``None`` when there is no header or it cannot be read (non-numeric, NaN, infinite): such a
    request gets no deadline rather than an error, as if the header were absent. A negative
    value reads as 0 (the deadline has passed).
    """
    if value is None:
        return None
    try:
        millis = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(millis):
        return None
    return min(max(0.0, millis / 1000), _MAX_BUDGET)


def rejection(exc: RejectedError) -> tuple[int, list[tuple[str, str]], bytes]:
    """The answer to a ``RejectedError`` that escaped the app: status, headers, body.

    429 for a rate limit, 503 for everything else (an open circuit, a full bulkhead), with
    ``Retry-After`` in whole seconds (rounded up) when the rejection says how long.
    """
    status = 429 if isinstance(exc, RateLimitedError) else 503
    headers = [("content-type", "text/plain; charset=utf-8")]
    if exc.retry_after is not None and math.isfinite(exc.retry_after):
        headers.append(("retry-after", str(max(0, math.ceil(exc.retry_after)))))
    reason = "rate limited" if status == 429 else "service unavailable"
    body = f"{reason}: {type(exc).__name__} ({exc.service or 'unknown'})\n".encode()
    return status, headers, body
