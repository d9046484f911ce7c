"""What code running inside a protected call can ask about it.

``attempt()`` and ``idempotency_key()`` read the innermost retry; ``remaining()`` reads the tightest
deadline of the enclosing ``with_timeout`` scopes. All three are context variables, so they follow
the call into ``asyncio`` tasks and into the worker thread of a sync timeout.

Two more travel with a call for the patterns' sake: the function ``Policy.call()`` runs (part of
a cache or coalescing key) and the cell where a pattern that answered the call in its place
(fallback, cache, deferral) notes how, read by the policy when it counts the call's outcome.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import Any

from buttress import _clock

__all__ = [
    "RetryScope",
    "answered",
    "answered_as",
    "attempt",
    "bounds_own_io",
    "call_scope",
    "call_target",
    "deadline",
    "idempotency_key",
    "remaining",
    "repeatable",
    "within",
]


class RetryScope:
    """One logical call under a retry: its attempt number and its lazily made idempotency key."""

    # Defaults on the class, no __init__: one is made on every call of a retrying call site, and
    # an instance with nothing to initialise is made about 30 ns faster.
    attempt: int = 1
    key: str | None = None


retry_scope: ContextVar[RetryScope | None] = ContextVar("buttress_retry_scope", default=None)

# The logical call around every retry (set by a deferring fallback): the retries inside take its
# idempotency key, so a call replayed later sends the key its first attempts sent.
call_scope: ContextVar[RetryScope | None] = ContextVar("buttress_call_scope", default=None)

# The function Policy.call()/acall() is running: it follows the call into the worker thread of a
# sync timeout and across retries, while the arguments the patterns see stay the caller's own.
call_target: ContextVar[Callable[..., Any]] = ContextVar("buttress_call_target")

# A one-slot list per observed call: the outcome a pattern answered it with (``fallback``,
# ``cached``, ``deferred``); ``None`` while nobody counts outcomes (no cell is made then).
answered_as: ContextVar[list[str] | None] = ContextVar("buttress_answered_as", default=None)

# Absolute deadline on the buttress clock (``_clock.monotonic()``); None when no timeout encloses.
# Set by ``with_timeout`` around each call and by the inbound integrations (a deadline the caller
# sent in a request header).
deadline: ContextVar[float | None] = ContextVar("buttress_deadline", default=None)

# Whether the request an integration is sending may be sent again after it may have reached the
# server (its method is idempotent or it carries an Idempotency-Key); ``None`` outside them. Retry
# reads it when its own ``idempotent`` is unset: only the integration knows the method of a
# request whose error does not name it (aiohttp's, gRPC's).
repeatable: ContextVar[bool | None] = ContextVar("buttress_repeatable", default=None)

# Whether the call about to run bounds its own I/O by ``remaining()`` (an outbound integration's
# attempt: its client's timeouts are set to the time left). A sync timeout then sets the deadline
# and runs the call inline instead of handing it to a worker thread; see docs/integrations.md.
bounds_own_io: ContextVar[bool] = ContextVar("buttress_bounds_own_io", default=False)


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
    retry from a new request. ``None`` outside a retried call, unless a deferring fallback
    encloses the call: then every attempt, and the replay of a deferred call, share its key.
    """
    scope = retry_scope.get()
    outer = call_scope.get()
    if scope is None:
        if outer is None:
            return None
        scope = outer
    if scope.key is None:
        if outer is not None and outer is not scope:
            if outer.key is None:
                outer.key = uuid.uuid4().hex
            scope.key = outer.key
        else:
            scope.key = uuid.uuid4().hex
    return scope.key


def answered(outcome: str) -> None:
    """Note that a pattern answered the current call in its place (``outcome`` of CallFinished)."""
    cell = answered_as.get()
    if cell is not None:
        cell[0] = outcome


def remaining() -> float | None:
    """Seconds left before the tightest enclosing ``with_timeout`` deadline, or ``None`` if none.

    Pass it down as the I/O timeout of a socket, HTTP or database call: a sync call that times out
    cannot be stopped from outside, so cooperating is the only way to stop its work early.
    """
    limit = deadline.get()
    if limit is None:
        return None
    return max(0.0, limit - _clock.monotonic())
