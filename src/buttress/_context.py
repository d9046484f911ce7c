"""What code running inside a protected call can ask about it.

``attempt()`` and ``idempotency_key()`` read the innermost retry; ``remaining()`` reads the tightest
deadline of the enclosing ``with_timeout`` scopes. All three are context variables, so they follow
the call into ``asyncio`` tasks and into the worker thread of a sync timeout.
"""

from __future__ import annotations

import uuid
from contextvars import ContextVar, Token

from buttress import _clock

__all__ = [
    "RetryScope",
    "attempt",
    "deadline",
    "idempotency_key",
    "remaining",
    "repeatable",
    "within",
]


class RetryScope:
    """One logical call under a retry: its attempt number and its lazily made idempotency key."""

    __slots__ = ("attempt", "key")

    def __init__(self) -> None:
        self.attempt = 1
        self.key: str | None = None


retry_scope: ContextVar[RetryScope | None] = ContextVar("buttress_retry_scope", default=None)

# Absolute deadline on the buttress clock (``_clock.monotonic()``); None when no timeout encloses.
# Set by ``with_timeout`` around each call and by the inbound integrations (a deadline the caller
# sent in a request header).
deadline: ContextVar[float | None] = ContextVar("buttress_deadline", default=None)

# Whether the request an integration is sending may be sent again after it may have reached the
# server (its method is idempotent or it carries an Idempotency-Key); ``None`` outside them. Retry
# reads it when its own ``idempotent`` is unset: only the integration knows the method of a
# request whose error does not name it (aiohttp's, gRPC's).
repeatable: ContextVar[bool | None] = ContextVar("buttress_repeatable", default=None)


def within(seconds: float) -> Token[float | None]:
    """Set the deadline ``seconds`` from now, unless an enclosing one is nearer.

    Returns the token that restores the previous deadline (``deadline.reset(token)``).
    """
    limit = _clock.monotonic() + seconds
    enclosing = deadline.get()
    return deadline.set(limit if enclosing is None else min(limit, enclosing))


def attempt() -> int:
    """The attempt number of the innermost retried call: 1 for the first call, 2 for a retry.

    Outside a retried call it is 1.
    """
    scope = retry_scope.get()
    return 1 if scope is None else scope.attempt


def idempotency_key() -> str | None:
    """A key that stays the same across all attempts of one logical retried call.

    Send it with a request (for example as an ``Idempotency-Key`` header) so the server can tell a
    retry from a new request. ``None`` outside a retried call.
    """
    scope = retry_scope.get()
    if scope is None:
        return None
    if scope.key is None:
        scope.key = uuid.uuid4().hex
    return scope.key


def remaining() -> float | None:
    """Seconds left before the tightest enclosing ``with_timeout`` deadline, or ``None`` if none.

    Pass it down as the I/O timeout of a socket, HTTP or database call: a sync call that times out
    cannot be stopped from outside, so cooperating is the only way to stop its work early.
    """
    limit = deadline.get()
    if limit is None:
        return None
    return max(0.0, limit - _clock.monotonic())
