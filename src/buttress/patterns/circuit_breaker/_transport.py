"""The breaker's connections to Redis: the shared transport (``patterns._redis``) with its script.

The transport moved to ``buttress.patterns._redis`` so the fleet rate limit uses the same one;
this name stays for the breaker's storage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from buttress.patterns._redis import RedisTransport as _Transport
from buttress.patterns.circuit_breaker._protocol import LOAD

__all__ = ["RedisTransport"]


class RedisTransport(_Transport):
    """The shared transport, reloading the breaker's script when Redis has lost it."""

    __slots__ = ()

    def __init__(
        self,
        make_sync: Callable[[], Any],
        make_async: Callable[[], Any],
        timeout: float,
        stale: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(make_sync, make_async, timeout, LOAD, stale)
